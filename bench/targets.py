"""Benchmark targets that bench/run.py starts and stops itself: smtp-ingress, plain aiosmtpd,
a private Postfix, smtp-sink, and the loopback DNS server and certificates they need.

Purpose
    Give every SMTP server under test one shape (``Running``: name, host, port, optional mutual-TLS
    port, the PIDs it consists of, ``stop()``) and make sure that every process started here is
    stopped here, by PID, also on ^C and on errors: all starters register with a ``Processes``
    registry (a context manager) whose exit stops whatever is still running, newest first.

API
    Processes()                          (from tests.kit.procs) context manager; .spawn(argv, ...)
                                         -> Popen (own session), .stop(proc), .stop_all()
    make_pki(dir) -> Pki                 trustme CA, server cert (localhost, 127.0.0.1) and a
                                         client cert (PEM files); Pki.as_dict() for the JSON
    start_dns(procs, dir, records, server="python") -> (addr, Popen)
                                         ``python -m tests.kit.dnsserver`` as a child, or
                                         unbound (server="unbound": bench.unbound); addr is
                                         "127.0.0.1@PORT" (the ingress's nameserver syntax)
    ingress_config(template, overrides) -> dict (written with tests.kit.harness.write_config)
    start_ingress(procs, dir, template, overrides, name) -> Running
    start_baseline(procs, dir) -> Running                     bench/baseline.py, port 0
    start_postfix(stack, dir, extra_main_cf=None) -> Running | str   a str: why it was skipped
    start_sink(stack) -> Running | str
    acceptor_pids(log_path, supervisor_pid) -> list[int]      from the ingress's JSON log

Failure modes
    TargetError (RuntimeError) when a target does not come up in time (the message carries the
    tail of its log); the partly started target is stopped before raising. Postfix/smtp-sink
    that cannot run here (not root, not installed) are returned as a reason string, not raised.

Limits
    Loopback only. Stop = SIGTERM to the PID, wait (bounded), then SIGKILL to that PID's own
    process group: every child is started with start_new_session=True, so a group is exactly one
    target (the ingress supervisor and its spawned children). Never pkill/killall.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import unbound
from ingress.core import procs as core_procs
from tests.kit.harness import journals_settled, write_config
from tests.kit.procs import Processes

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
PY = sys.executable


class TargetError(RuntimeError):
    """A target did not start (or answer) in time."""


# --------------------------------------------------------------------------------------------
# The common shape of a running target


@dataclass
class Running:
    """A started SMTP server. ``stop()`` returns its exit code (None if not applicable)."""

    name: str
    host: str
    port: int
    mtls_port: int | None = None
    pids: Callable[[], list[int]] = field(default=lambda: [], repr=False)
    stop: Callable[[], int | None] = field(default=lambda: None, repr=False)
    drain: Callable[[float], bool] | None = field(default=None, repr=False)
    reload: Callable[[], None] | None = field(default=None, repr=False)   # None: has none
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# --------------------------------------------------------------------------------------------
# Certificates and DNS


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_pem: Path  # client key + certificate chain, one PEM

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


def make_pki(directory: Path) -> Pki:
    """A throw-away CA (trustme), a server cert for localhost/127.0.0.1, a client cert."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("mx.bench.test", "localhost", "127.0.0.1")
    client = ca.issue_cert("legit-client.bench.test")
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key",
              directory / "client.pem")
    ca.cert_pem.write_to_path(str(pki.ca))
    server.cert_chain_pems[0].write_to_path(str(pki.server_cert))
    server.private_key_pem.write_to_path(str(pki.server_key))
    client.private_key_and_cert_chain_pem.write_to_path(str(pki.client_pem))
    return pki


def start_dns(procs: Processes, directory: Path, records: dict[str, Any],
              timeout: float = 15.0, server: str = "python") -> tuple[str, subprocess.Popen[bytes]]:
    """The bench's DNS server as a child; return ("127.0.0.1@PORT", process). `server`:
    "unbound" (bench.unbound: the resolver an MX has) or "python" (tests/kit/dnsserver.py).
    `records` as the test kit's, its "$silent" key the names never answered."""
    if server == "unbound":
        recs = {k: v for k, v in records.items() if k != "$silent"}
        try:
            return unbound.start(procs, directory, recs, records.get("$silent", ()), timeout)
        except RuntimeError as e:
            raise TargetError(str(e)) from None
    directory.mkdir(parents=True, exist_ok=True)
    rec = directory / "dns-records.json"
    rec.write_text(json.dumps(records, indent=1))
    proc = procs.spawn([PY, "-m", "tests.kit.dnsserver", str(rec)], log=directory / "dns.log",
                       stdout_pipe=True)
    assert proc.stdout is not None
    line = _read_line(proc, timeout)
    if not line.strip().isdigit():
        procs.stop(proc)
        raise TargetError(f"DNS server did not report its port (got {line!r})")
    return f"127.0.0.1@{int(line)}", proc


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """First stdout line of ``proc`` within ``timeout`` s ('' if none)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf and time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
    finally:
        sel.close()
    return buf.decode("utf-8", "replace").split("\n", 1)[0]


# --------------------------------------------------------------------------------------------
# smtp-ingress


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """{"lanes": {"bulk": {"rate": 1}}} -> {"lanes.bulk": {"rate": 1}} (tables of scalars)."""
    tables: dict[str, dict[str, Any]] = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            for tk, tv in _flatten(v, f"{prefix}{k}.").items():
                tables.setdefault(tk, {}).update(tv)
        else:
            tables.setdefault(prefix.rstrip("."), {})[k] = v
    return tables


def ingress_config(template: Path, overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str,
                                                                                         Any]]:
    """The template's tables (dotted names) with ``overrides`` merged in, table by table."""
    with open(template, "rb") as f:
        tables = _flatten(tomllib.load(f))
    for table, kv in overrides.items():
        tables.setdefault(table, {}).update(kv)
    return tables


def _log_docs(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for line in f:
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
    return out


def _tail(path: Path, n: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def acceptor_pids(log_path: Path, supervisor_pid: int) -> list[int]:
    """Live acceptor processes of the ingress, from its child_start log events."""
    live = set(core_procs.children(supervisor_pid))
    return [int(d["child_pid"]) for d in _log_docs(log_path)
            if d.get("event") == "child_start" and d.get("kind") == "acceptor"
            and int(d.get("child_pid", 0)) in live]


def start_ingress(procs: Processes, directory: Path, template: Path,
                  overrides: dict[str, dict[str, Any]], name: str = "smtp-ingress",
                  timeout: float = 90.0) -> Running:
    """Write the config (template + overrides + temp spool/state), start, wait for "ready"."""
    directory.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="sib-", dir="/tmp"))  # short: ipc socket paths
    tables = ingress_config(template, {
        "listen": {"port": 0},
        "spool": {"path": str(directory / "spool"), "state_dir": str(state)},
        **overrides,
    })
    cfg_path = directory / "ingress.toml"
    write_config(cfg_path, tables)
    log = directory / "ingress.log"
    proc = procs.spawn([PY, "-m", "ingress", "run", "--config", str(cfg_path)], log=log)

    def stop() -> int | None:
        code = procs.stop(proc, timeout=40.0)
        shutil.rmtree(state, ignore_errors=True)
        return code

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for doc in _log_docs(log):
            if doc.get("event") == "not_ready":
                stop()
                raise TargetError(f"{name}: not ready:\n{_tail(log)}")
            if doc.get("event") == "ready":
                port = int(str(doc["listen"]).rsplit(":", 1)[1])
                mport = int(doc.get("mtls_port", -1))
                return Running(
                    name, "127.0.0.1", port, mport if mport > 0 else None,
                    pids=lambda: [proc.pid, *core_procs.children(proc.pid)], stop=stop,
                    # the journals' files in new/ (they follow the 250): a throughput run's CPU
                    # then counts them, and the next run does not compete with them
                    drain=lambda timeout: journals_settled(
                        Path(tables["spool"]["path"]), timeout, poll=0.05),
                    reload=lambda: os.kill(proc.pid, signal.SIGHUP),
                    info={"config": str(cfg_path), "config_tables": tables, "log": str(log),
                          "supervisor_pid": proc.pid, "acceptors": doc.get("acceptors"),
                          "fast_port": doc.get("fast_port"),
                          "fast_workers": doc.get("fast_workers"),
                          "bulk_workers": doc.get("bulk_workers")})
        if proc.poll() is not None:
            stop()
            raise TargetError(f"{name} exited {proc.returncode} at start:\n{_tail(log)}")
        time.sleep(0.1)
    stop()
    raise TargetError(f"{name}: no ready line within {timeout:g}s:\n{_tail(log)}")


# --------------------------------------------------------------------------------------------
# Plain aiosmtpd, Postfix, smtp-sink


def start_baseline(procs: Processes, directory: Path, name: str = "aiosmtpd",
                   timeout: float = 30.0) -> Running:
    """bench/baseline.py on a free port (its READY line), spool in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = procs.spawn([PY, "-m", "bench.baseline", "--port", "0", "--spool",
                        str(directory / "spool"), "--domain", "example.test"],
                       log=directory / "baseline.log", stdout_pipe=True)
    line = _read_line(proc, timeout)
    if not line.startswith("READY "):
        procs.stop(proc)
        raise TargetError(f"{name}: no READY line (got {line!r}): "
                          f"{_tail(directory / 'baseline.log')}")
    return Running(name, "127.0.0.1", int(line.split()[1]), None,
                   pids=lambda: [proc.pid] if proc.poll() is None else [],
                   stop=lambda: procs.stop(proc, timeout=10.0),
                   info={"backlog": 100, "note": "single process, no connection cap"})


def start_postfix(stack: contextlib.ExitStack, directory: Path, name: str = "postfix",
                  extra_main_cf: dict[str, str] | None = None) -> Running | str:
    """A private Postfix (default limits, discard delivery; `extra_main_cf`: main.cf settings
    on top, e.g. bench.cost's restrictions); a str is why it was skipped."""
    from tests.kit.postfix import (
        PostfixError,
        PostfixInstance,
        PostfixUnavailable,
        check_available,
        free_port,
    )

    try:
        check_available()
    except PostfixUnavailable as e:
        return str(e)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the postfix user must traverse it
    pf = PostfixInstance(directory, free_port(), accept_domains=("example.test",),
                         delivery="discard", extra_main_cf=extra_main_cf)
    try:
        stack.enter_context(pf)
    except (PostfixUnavailable, PostfixError, ValueError, OSError) as e:
        return f"could not start: {str(e).splitlines()[0]}"
    info: dict[str, Any] = {"version": pf.version()}
    with contextlib.suppress(Exception):
        info["default_process_limit"] = pf.postconf("default_process_limit")
        info["smtpd_client_connection_count_limit"] = pf.postconf(
            "smtpd_client_connection_count_limit")

    def stop() -> None:
        pf.stop()

    return Running(name, pf.host, pf.port, None, pids=pf.pids, stop=stop,
                   drain=pf.wait_queue_empty, reload=pf.reload, info=info)


def start_sink(stack: contextlib.ExitStack, name: str = "smtp-sink") -> Running | str:
    from bench.throughput import SmtpSink, ToolMissing
    from tests.kit.postfix import free_port

    sink = SmtpSink(free_port())
    try:
        stack.enter_context(sink)
    except (ToolMissing, RuntimeError, OSError) as e:
        return str(e)

    def stop() -> None:
        sink.stop()

    return Running(name, sink.host, sink.port, None,
                   pids=sink.pids, stop=stop)


def postfix_version() -> str | None:
    with contextlib.suppress(Exception):
        from tests.kit.postfix import PostfixInstance

        return PostfixInstance.version()
    return None
