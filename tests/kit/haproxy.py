"""A real HAProxy in TCP mode on a loopback port, in front of one or more backends.

API
    HAProxy(tmp, backend_port, send_proxy, more=(), bind="127.0.0.1")
        started at once (its own config file and log in `tmp`, `haproxy -f cfg -db`: foreground,
        no master-worker, no system service); .port (the frontend), .log_text(), .stop().
        `send_proxy`: the server lines' option ("send-proxy", "send-proxy-v2"); `more`: further
        backends (host, port), balanced round-robin with the first; `bind`: the frontend's
        address ("::1": an IPv6 frontend; the backends stay IPv4).
    HAProxy.with_config(tmp, text, port, bind="127.0.0.1")
        the same with a whole config of the caller's (bench/proxy.py: the documented example),
        whose frontend listens on bind:port.
    free_port() -> int      a free loopback TCP port (for with_config's frontend)

Failure modes
    RuntimeError with the log's tail when HAProxy exits or does not listen within 10 s; an
    AssertionError when haproxy is not on PATH (the test lacks @pytest.mark.needs_haproxy).

Limits
    Linux (/proc/net/tcp*, to see the frontend listen without a probe connection); stopped by
    its PID (SIGTERM, then SIGKILL after 5 s).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def _haproxy_bin() -> str:
    path = shutil.which("haproxy")
    assert path is not None, "haproxy: the test lacks @pytest.mark.needs_haproxy"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_port6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


class HAProxy:
    def __init__(self, tmp: Path, backend_port: int, send_proxy: str,
                 more: tuple[tuple[str, int], ...] = (), bind: str = "127.0.0.1") -> None:
        """`more`: further backend servers (host, port), balanced round-robin with the first
        (tests/integration/test_cluster_redis.py: two edges behind one HAProxy). `bind`: the
        frontend's address ("::1": an IPv6 frontend; the backend stays IPv4)."""
        self.bind = bind
        self.port = free_port() if ":" not in bind else _free_port6()
        extra = "".join(f"    server ingress{i} {host}:{port} {send_proxy}\n"
                        for i, (host, port) in enumerate(more, 2))
        self._start(tmp, f"""\
global
    maxconn 200

defaults
    mode tcp
    timeout connect 2s
    timeout client 15s
    timeout server 15s

frontend smtp_in
    bind {f"[{bind}]" if ":" in bind else bind}:{self.port}
    default_backend smtp_ingress

backend smtp_ingress
    server ingress 127.0.0.1:{backend_port} {send_proxy}
{extra}""")

    @classmethod
    def with_config(cls, tmp: Path, text: str, port: int, bind: str = "127.0.0.1") -> HAProxy:
        """A HAProxy running `text` (a whole config), its frontend on bind:port."""
        self = cls.__new__(cls)
        self.bind, self.port = bind, port
        self._start(tmp, text)
        return self

    def _start(self, tmp: Path, text: str) -> None:
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text(text)
        self.log = open(tmp / "haproxy.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([_haproxy_bin(), "-f", str(self.cfg), "-db"],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not start: {self.log_text()}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        """Is the frontend port in LISTEN state? (/proc, so no probe connection reaches the
        backend.)"""
        want = f":{self.port:04X} "
        with open("/proc/net/tcp6" if ":" in self.bind else "/proc/net/tcp") as f:
            return any(want in ln and ln.split()[3] == "0A" for ln in f)

    def log_text(self) -> str:
        return (self.cfg.parent / "haproxy.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
