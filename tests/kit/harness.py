"""Test harness: run a real smtp-ingress (supervisor + children) on loopback and talk to it.

API:
    Ingress(tmpdir, **overrides)   context manager (or .start(); .spawn() + .wait_ready());
                                   .port, .spool, .pid, .children(kind),
                                   .config (the TOML file written), .logfile,
                                   .signal(sig), .stop() -> exit code (the drain), .log_lines();
                                   leaving the block kills what is left (SIGKILL, its group)
                                   .addresses: every listen address as bound ("[::1]:p");
                                   overrides with listen.addresses drop listen.host/port
    spooled() -> dict[qid, SpoolEntry]   every file in spool/new, parsed
    start_all(*instances)                several started at once (the start-ups overlap); all
                                         stopped again if one fails
    smtp_dialogue(port, lines, ...)      raw client: send lines, collect every reply
    send_one(port, ...) -> (code, text)  one message on a fresh connection (aiosmtplib)
    send_tls(port, body, ca=, client=)   one message over implicit TLS (the mutual-TLS port)
    make_body(i, size, extra)            a test message of about `size` bytes
    short_message(subject, sender, msgid_domain)   a small message to bob@example.test
    wait_for(cond, timeout, what)        poll until cond() is true, return it; AssertionError
                                         naming `what` at the deadline
    eventually(cond, timeout=15)         poll until cond() is true: True, or False at the deadline
    relaying(ing)                        `ing` once its relay process runs
    spool_count(ing, sub)                spool files in spool/<sub>
    mtls_port(ing)                       the mutual-TLS port the ingress bound
    journals_settled(spool, timeout) -> bool   what the journals acknowledged is in new/
    realtime_allowed() -> bool           may a process here take SCHED_RR priority 1
                                         (tiers.operator_policy: CAP_SYS_NICE or LimitRTPRIO)

The ingress runs as `python -m ingress run --config FILE` with listen.port = 0 (or as
`command`, e.g. an installed entry point, from `cwd` with `env`); the real port comes from its
"ready" log line. Children are found with psutil (ingress.core.procs) so
tests can kill -9 one of them. Everything started here is stopped here, by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import orjson
import tomli_w

from ingress.core import procs
from workers.spool import journal as journal_mod
from workers.spool import store as spool_mod

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent.parent


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    """`tables` by dotted name ({"lanes.bulk": {"workers": 1}}; "" = top-level keys) as a TOML
    file (tomli-w). The bench writes its targets' configs with it too."""
    doc: dict[str, Any] = {}
    for table, kv in tables.items():
        node = doc
        for part in table.split(".") if table else ():
            node = node.setdefault(part, {})
        node.update({k: str(v) if isinstance(v, Path) else v for k, v in kv.items()})
    path.write_text(tomli_w.dumps(doc))


class Ingress:
    def __init__(self, tmpdir: Path, tables: dict[str, dict[str, Any]] | None = None,
                 state: Path | None = None, prefix: list[str] | None = None,
                 args: list[str] | None = None, command: list[str] | None = None,
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        """`state`: a state dir to reuse (kept at stop); by default a fresh one, removed.
        `prefix`: a command the ingress is started under, e.g. ["prlimit", "--nofile=64:64"].
        `args`: more arguments to `run`, e.g. ["--role", "lanes"].
        `command`: smtp-ingress itself (default: this interpreter's `-m ingress`), e.g. an
        installed venv's bin/smtp-ingress; `cwd` (default: the repository) and `env` (default:
        ours) for it."""
        self.prefix = list(prefix or [])
        self.args = list(args or [])
        self.command = list(command or [sys.executable, "-m", "ingress"])
        self.cwd = cwd or ROOT
        self.env = env
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.spool = self.tmpdir / "spool"
        # ipc socket paths must stay short: keep the state dir under /tmp.
        self.keep_state = state is not None
        self.state = state or Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
        base: dict[str, dict[str, Any]] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "smtp": {"hostname": "mx.test", "accepted_domains": ["example.test"],
                     "idle_timeout": 10.0, "ack_timeout": 5.0, "drain_grace": 5.0},
            "lanes.bulk": {"rate": 0.0},
            "classify": {"dkim_deadline": 3.0},
            # The tests send from one address as fast as they can: no per-IP limits here
            # (test_classify.py tests them).
            "admission": {"per_ip_rate": 0.0, "per_ip_bulk_max": 10000},
            "spool": {"path": str(self.spool), "state_dir": str(self.state)},
            "supervisor": {"acceptors": 2, "heartbeat_interval": 0.2, "heartbeat_timeout": 2.0},
            # ... and count log lines: refusal lines are not throttled here either
            # (test_refusal_log.py tests the throttle with it on).
            "log": {"level": "info", "throttle_lines": 0, "throttle_total": 0},
            "metrics": {"listen": ""},
        }
        if "addresses" in (tables or {}).get("listen", {}):    # several addresses: they
            base["listen"] = {}                                 # replace listen.host/port
        for table, kv in (tables or {}).items():
            base.setdefault(table, {}).update(kv)
        self.config = self.tmpdir / "ingress.toml"
        write_config(self.config, base)
        self.logfile = self.tmpdir / "ingress.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.addresses: list[str] = []     # listen.addresses as bound ("v4:port", "[v6]:port")

    def __enter__(self) -> Ingress:
        if self.proc is None or self.proc.poll() is not None:   # not already started_all
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The end of a test: SIGKILL to our own process group, not a drain (0.6 s an instance;
        # the drain has its own tests, which call stop() themselves).
        self.stop(graceful=False)

    def start(self, timeout: float = 60.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process and return at once (wait_ready waits for its "ready" line)."""
        self._log = open(self.logfile, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.prefix, *self.command, "run", "--config", str(self.config), *self.args],
            cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for doc in self.log_lines():
                if doc.get("event") == "ready":
                    self.port = int(str(doc["listen"]).rsplit(":", 1)[1])
                    self.addresses = list(doc.get("listen_addresses") or [doc["listen"]])
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingress exited {self.proc.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"ingress not ready in {timeout}s: {self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError), open(self.logfile, "rb") as f:
            for line in f:
                with contextlib.suppress(orjson.JSONDecodeError):
                    out.append(orjson.loads(line))
        return out

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""

    def events(self, name: str) -> list[dict[str, Any]]:
        return [d for d in self.log_lines() if d.get("event") == name]

    def children(self, kind: str | None = None) -> list[int]:
        """PIDs of live children; kind = 'acceptor' | 'fast-acceptor' | 'broker-bulk' |
        'worker-bulk' | 'worker-self-proven' (the fast workers dedicated to that tier; not
        among 'worker-fast') ..."""
        pids = procs.children(self.pid)
        if kind is None:
            return pids
        starts = {d["child_pid"]: d for d in self.events("child_start")}
        out = []
        for p in pids:
            d = starts.get(p)
            if d is None:
                continue
            if d["kind"] == "acceptor":     # fast acceptors: "fast-acceptor"
                key = "fast-acceptor" if "fast" in d["key"] else "acceptor"
            elif d["kind"] == "worker" and "self-proven" in d["key"]:
                key = "worker-self-proven"
            else:
                key = d["kind"] + "-" + d["key"].split("'")[1]
            if key.startswith(kind):
                out.append(p)
        return out

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0, graceful: bool = True) -> int | None:
        """SIGTERM (the drain) and wait up to `timeout`, then SIGKILL to the process group;
        graceful=False: SIGKILL at once. Then the state dir is removed (unless given)."""
        if self.proc is None:
            return None
        if not graceful and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)   # our own session only
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)   # our own session only
                self.proc.wait(5)
        code = self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)   # any child left behind, ours alone
        self._log.close()
        if self.keep_state:
            return code
        with contextlib.suppress(OSError):
            for f in (self.state / "run").iterdir():
                f.unlink()
            (self.state / "run").rmdir()
            for f in self.state.iterdir():
                f.unlink()
            self.state.rmdir()
        return code

    def settled(self, settle: float = 10.0) -> None:
        """Once the lane workers' journals have written into new/ every message they
        acknowledged (its file follows the 250 by milliseconds; at most `settle` seconds)."""
        journals_settled(self.spool, settle)

    def spooled(self, settle: float = 10.0) -> dict[str, spool_mod.SpoolEntry]:
        """Every message in new/, once settled()."""
        self.settled(settle)
        out = {}
        for p in (self.spool / "new").iterdir():
            e = spool_mod.read(p)
            qid = str(e.envelope["qid"])
            assert qid not in out, f"{qid} spooled twice"
            out[qid] = e
        return out


def start_all(*instances: Ingress, timeout: float = 60.0) -> None:
    """Start several instances at once (their start-ups overlap: a cluster's nodes, two edges)
    and return when every one is ready; if one fails, every one started here is stopped."""
    spawned: list[Ingress] = []
    try:
        for ing in instances:
            ing.spawn()
            spawned.append(ing)
        for ing in instances:
            ing.wait_ready(timeout)
    except BaseException:
        for ing in spawned:
            with contextlib.suppress(Exception):
                ing.stop(graceful=False)
        raise


def split_trace(msg: bytes) -> tuple[dict[str, bytes], bytes]:
    """Our trace headers (Authentication-Results, Received-SPF if any, Received, in that order)
    and the client's message after them, exactly."""
    trace: dict[str, bytes] = {}
    i = 0
    for name in (b"Authentication-Results: ", b"Received-SPF: ", b"Received: "):
        if not msg.startswith(name, i):
            assert name == b"Received-SPF: ", (name, msg[i:i + 80])
            continue
        j = msg.index(b"\r\n", i) + 2
        while msg[j:j + 1] in (b"\t", b" "):
            j = msg.index(b"\r\n", j) + 2
        trace[name[:-2].decode()] = msg[i:j]
        i = j
    return trace, msg[i:]


def client_bytes(entry: spool_mod.SpoolEntry) -> bytes:
    """The client's message out of a spool entry: everything after our trace headers."""
    return split_trace(entry.message)[1]


async def smtp_dialogue(port: int, lines: list[bytes], *, host: str = "127.0.0.1",
                        read_timeout: float = 10.0, wait_banner: bool = True,
                        source: str | None = None,
                        local_port: list[int] | None = None) -> list[str]:
    """Send each line (bytes, sent as is) after reading the previous reply; return all replies.
    The banner is the first reply (wait_banner False: the first line goes before it, and its
    reply is the first read). A closed connection ends the list with 'EOF'. `local_port`:
    our source port is appended to it."""
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(source, 0) if source else None)
    if local_port is not None:
        local_port.append(writer.get_extra_info("sockname")[1])
    replies: list[str] = []

    async def read_reply() -> str:
        text = []
        while True:
            line = await asyncio.wait_for(reader.readline(), read_timeout)
            if not line:
                return "EOF" if not text else "\n".join(text)
            text.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(text)

    try:
        if wait_banner:
            replies.append(await read_reply())
        for line in lines:
            writer.write(line)
            await writer.drain()
            r = await read_reply()
            replies.append(r)
            if r == "EOF":
                break
    except (ConnectionError, TimeoutError) as e:
        replies.append(f"ERR {type(e).__name__}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return replies


async def send_one(port: int, body: bytes, *, sender: str = "alice@sender.test",
                   rcpts: tuple[str, ...] = ("bob@example.test",), host: str = "127.0.0.1",
                   timeout: float = 15.0, source: str | None = None) -> tuple[int, str]:
    """One message on a fresh connection. Returns (code, text); connection trouble is (0, why)."""
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=timeout, start_tls=False,
                             local_hostname="client.test",
                             source_address=(source, 0) if source else None)
    try:
        await client.connect()
        await client.ehlo()
        await client.mail(sender)
        for r in rcpts:
            await client.rcpt(r)
        resp = await client.data(body)
        with contextlib.suppress(Exception):
            await client.quit()
        return resp.code, resp.message
    except aiosmtplib.SMTPResponseException as e:
        return e.code, e.message
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        return 0, f"{type(e).__name__}: {e}"
    finally:
        client.close()


def make_body(i: int, size: int = 1024, extra: bytes = b"") -> bytes:
    head = (f"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: test {i}\r\n"
            f"Message-ID: <{i}.{time.time_ns()}@sender.test>\r\n\r\n").encode()
    line = f"line of message {i} ".encode()
    body = b""
    while len(body) < size:
        body += line + os.urandom(8).hex().encode() + b"\r\n"
    return head + extra + body


async def send_tls(port: int, body: bytes, *, ca: Path, client: Path | None,
                   sender: str = "alice@other.test") -> tuple[int, str]:
    """One message over implicit TLS (the mutual-TLS port), with `client` as the client
    certificate (None: none); (code, text), or (0, the error) when no SMTP reply came."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client))
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=True, tls_context=ctx,
                           timeout=10, local_hostname="client.test")
    try:
        await smtp.connect()
        await smtp.ehlo()
        await smtp.mail(sender)
        await smtp.rcpt("bob@example.test")
        resp = await smtp.data(body)
        return resp.code, resp.message
    except aiosmtplib.SMTPResponseException as e:
        return e.code, e.message
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as e:
        return 0, repr(e)
    finally:
        smtp.close()


def wait_for(cond: Callable[[], T], timeout: float, what: str, poll: float = 0.1) -> T:
    """Poll `cond` until it is true and return what it returned; an AssertionError naming `what`
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return got


def eventually(cond: Callable[[], object], timeout: float = 15.0, poll: float = 0.2) -> bool:
    """Poll `cond` until it is true (True) or `timeout` seconds passed (its last answer), for an
    `assert eventually(...), message` that words its own failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return bool(cond())


def relaying(ing: Ingress) -> Ingress:
    """`ing` once its relay process runs (a relay child when relay.downstream is set)."""
    wait_for(lambda: ing.events("relay_start"), 15,
             "the relay process (supervisor wiring: a relay child when relay.downstream is set)")
    return ing


def spool_count(ing: Ingress, sub: str) -> int:
    """Spool files in spool/<sub> (names without a leading dot, as the spool lists them)."""
    return sum(1 for p in (ing.spool / sub).iterdir() if not p.name.startswith("."))


def journals_settled(spool: Path, timeout: float, poll: float = 0.01) -> bool:
    """Once every message the lane workers' journals in `spool` acknowledged is in new/ (True),
    or False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while journal_mod.outstanding(spool):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def realtime_allowed() -> bool:
    """Tried in a child process (a container may drop CAP_SYS_NICE even for root)."""
    probe = "import os; os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True,
                          timeout=30).returncode == 0


def mtls_port(ing: Ingress) -> int:
    """The mutual-TLS port the ingress bound (its last "ready" line)."""
    return int(ing.events("ready")[-1]["mtls_port"])


def short_message(subject: str, sender: str = "alice@good.test",
                  msgid_domain: str = "good.test") -> bytes:
    """A small message from `sender` to bob@example.test; its Message-ID is
    <subject@msgid_domain>."""
    return (f"From: {sender}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@{msgid_domain}>\r\n\r\nHello.\r\n").encode()
