"""A real redis-server on a unix socket in its own temp dir, for the tests and the bench.

API
    RedisServer()          nothing started yet; .url ("unix:///tmp/rds-.../redis.sock")
        .start()           start (again after stop() or kill(): the same socket path, an empty
                           Redis: nothing is saved, `--save '' --appendonly no`)
        .client()          a redis.Redis on the socket (2 s timeout)
        .stop()            SIGTERM by PID, then SIGKILL (tests.kit.procs)
        .kill()            SIGKILL by PID at once (a crash; bench/cluster.py's outage)
        .close()           stop, and the temp dir removed

Failure modes
    RuntimeError when redis-server exits at start, TimeoutError when it does not answer PING
    within 10 s; FileNotFoundError when redis-server is not on PATH (tests: @needs_redis).

Limits
    Loopback only (a unix socket, --port 0: no TCP). Started in its own session, stopped by PID.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.kit.procs import Processes


class RedisServer:
    """redis-server on a unix socket in its own temp dir; start() again after stop() reuses
    the socket path (an empty Redis: nothing is saved)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rds-", dir="/tmp"))
        self.sock = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"unix://{self.sock}"
        self.procs = Processes()      # started in its own session, stopped by PID

    def start(self) -> None:
        self.proc = self.procs.spawn(
            ["redis-server", "--port", "0", "--unixsocket", str(self.sock),
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError):
                if self.client().ping():
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            time.sleep(0.05)
        raise TimeoutError("redis-server not ready in 10 s")

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.sock), socket_timeout=2,
                           decode_responses=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.procs.stop(self.proc, timeout=10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, by PID: Redis crashes (no shutdown, its socket file left behind)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()   # a restart binds the same path

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
