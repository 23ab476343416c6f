"""Flood generator: botnet load against an SMTP server on loopback, and legitimate senders measured.

Purpose
    Reproduce what a botnet does to port 25 (stalling connections, byte-trickling, early talkers,
    spam pushed as fast as possible) while a few *legitimate* senders each send one message at a
    steady rate on a fresh connection and measure connect -> 250 latency. The result is a
    JSON-serialisable dict (see ``FloodResult``-shaped dict built by ``run_flood``) that
    bench/run.py turns into tables and plots.

API
    Target.parse("127.0.0.1:2525")           loopback-only target (raises ValueError otherwise)
    LegitSpec / LegitSpec.parse(text)        one legitimate sender (kinds: trusted, cert, spf)
    BotConfig                                counts and parameters of the bot behaviours
    FloodConfig                              everything for one run
    run_flood(cfg, progress=None) -> dict    async; the whole run, child processes included
    run_flood_sync(cfg, progress=None)       same, with its own (uvloop) event loop
    ensure_fd_limit(needed, what)            raise soft RLIMIT_NOFILE to hard; FdLimitError if short
    percentile_nearest_rank(values, p)       the percentile method used everywhere
    smtp_attempt(...) -> Attempt             one timed SMTP transaction on a fresh connection
    Bot coroutine classes: StallingBot, TrickleBot, EarlyTalkerBot, SpamSender, LegitSender; each
    has ``async run(end)`` where ``end`` is a loop.time() deadline, and records into a stats object
    (BotStats, SpamStats, LegitStats; dataclasses, ``summary()`` gives JSON-ready dicts).

    CLI:  python -m bench.flood --target 127.0.0.1:2525 --duration 30 --stallers 300 \
            --spammers 50 --legit trusted:127.0.0.10:0.1 [--out FILE]
          python -m bench.flood bots ...   (internal: one bot process; JSON lines on stdout)
    ``python -m bench.flood --help`` lists every flag.

Processes
    Legitimate senders run in the calling process (the measuring one). Spam senders run in
    ``spam_procs`` child processes and the idle bots (stall/trickle/early) in ``bot_procs`` child
    processes (0 = inline), each ``python -m bench.flood bots ...``; a child prints one JSON
    progress line a second and a final result line, which the parent merges. All processes share
    a wall-clock start time so phases line up.

Accounting (definitions)
    Legit: every scheduled attempt counts. Outcomes: accepted (250 after end of DATA), tempfail
    (4xx, by code and by stage), permfail (5xx, by code and stage), refused (ECONNREFUSED), timeout
    (per-attempt deadline hit, by stage), error (server closed / reset / TLS failure, by stage),
    unfinished (still in flight when the run ended plus ``grace``; excluded from the accepted %
    denominator). Latency = perf_counter from just before connect() to the 250 after DATA, for
    accepted attempts only. Percentiles are *nearest-rank*: the value at 1-based rank
    ceil(p/100 * N) of the sorted sample (p=0 -> minimum); no interpolation, always an observed
    value. Attempts are scheduled open-loop (t0 + k*interval) so a slow server does not lower the
    offered load (no coordinated omission).
    Spam: sent = transactions that reached MAIL FROM, accepted = 250 after DATA, shed = 4xx by
    code (any stage, banner included), rejected = 5xx by code, refused = connections refused.

Failure modes
    Refuses (ValueError / FdLimitError, CLI exit 2) a target or source address outside
    127.0.0.0/8 and ::1, and a configuration whose sockets do not fit RLIMIT_NOFILE (after raising
    the soft limit to the hard one) or the system-wide file table. A child process that dies is
    reported under "processes" with its exit code and stderr tail; its stats are missing.

Limits
    Every loop is bounded both in iterations and by the run's end time; the run stops by itself at
    ``duration`` (+ ``grace`` for legit attempts in flight, + a few seconds for children to report).
    Distinct source addresses exist only for IPv4 targets (127.x.y.z); against ::1 all bots use ::1.
    Source ranges: stallers 127.1/16, tricklers 127.2/16, early talkers 127.3/16, spam 127.4/16 (up
    to 65024 each). The kernel's SYN backlog (somaxconn) shapes what thousands of simultaneous
    connects see; ``ramp`` spreads bot connects. One-message-per-connection spam from few sources
    can exhaust ephemeral ports (TIME_WAIT); IP_BIND_ADDRESS_NO_PORT is set to widen the space.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import math
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ingress.core import procs

FD_MARGIN = 64  # descriptors kept for the interpreter, pipes, logs
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MAX_REPLY_LINES = 100
MAX_LINE = 4096
CHILD_LINE_LIMIT = 256 * 1024 * 1024  # a child's result line holds every bot's held_s sample

# --------------------------------------------------------------------------------------------
# Targets, addresses, limits


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.version == 4:
        return ip in ipaddress.ip_network("127.0.0.0/8")
    return ip == ipaddress.ip_address("::1")


@dataclass(frozen=True)
class Target:
    """A loopback SMTP endpoint. ``parse`` accepts ``HOST:PORT`` or ``[::1]:PORT``."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not _is_loopback(self.host):
            raise ValueError(f"refusing target {self.host!r}: loopback only (127.0.0.0/8, ::1)")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @classmethod
    def parse(cls, text: str) -> Target:
        text = text.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = text.rpartition(":")
        if host == "localhost":
            host = "127.0.0.1"
        if not host or not port.isdigit():
            raise ValueError(f"bad target {text!r}: expected HOST:PORT")
        return cls(host, int(port))

    def with_port(self, port: int | None) -> Target:
        return self if not port else Target(self.host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def check_source(addr: str | None, target: Target) -> None:
    """Refuse a source address that is not loopback or not of the target's family."""
    if addr is None:
        return
    if not _is_loopback(addr):
        raise ValueError(f"refusing source address {addr!r}: loopback only")
    if (":" in addr) != (":" in target.host):
        raise ValueError(f"source {addr!r} and target {target.host!r} differ in address family")


def bot_address(role_octet: int, index: int) -> str:
    """Distinct source address number ``index`` of a role: 127.<role>.<x>.<y>, y in 1..254."""
    if not 0 <= index < 256 * 254:
        raise ValueError(f"bot index {index} out of range for 127.{role_octet}.0.0/16")
    return f"127.{role_octet}.{index // 254}.{index % 254 + 1}"


class FdLimitError(RuntimeError):
    """The configured sockets cannot fit in the file-descriptor limits."""


def ensure_fd_limit(needed: int, what: str = "") -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; raise FdLimitError if ``needed`` won't fit.

    ``needed`` is the number of descriptors this process will hold at once (sockets + margin).
    Also checks the system-wide table (/proc/sys/fs/file-max minus allocated). Returns the
    (soft, hard) pair in force afterwards.
    """
    soft, hard = procs.raise_nofile(needed)
    detail = f" ({what})" if what else ""
    if needed > soft:
        raise FdLimitError(
            f"refusing to start: need {needed} file descriptors{detail} but RLIMIT_NOFILE is "
            f"soft={soft} hard={hard} after raising soft to hard; raise the hard limit "
            f"(ulimit -Hn, systemd LimitNOFILE=) or configure fewer sockets"
        )
    try:
        allocated, _, file_max = (int(x) for x in Path("/proc/sys/fs/file-nr").read_text().split())
    except (OSError, ValueError):
        return soft, hard
    if needed > file_max - allocated:
        raise FdLimitError(
            f"refusing to start: need {needed} file descriptors{detail} but the system has only "
            f"{file_max - allocated} free (fs.file-max={file_max}, allocated={allocated})"
        )
    return soft, hard


def percentile_nearest_rank(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: sorted(values)[ceil(p/100*N) - 1]; p=0 gives the minimum.

    Returns None for an empty sample. Always an observed value, never interpolated.
    """
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(round(p / 100 * len(ordered), 9)))  # round: 99.9% of 1000 is 999
    return ordered[rank - 1]


def _bump(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


# --------------------------------------------------------------------------------------------
# A small SMTP client


class ServerClosed(ConnectionError):
    """The server closed the connection where a reply was expected."""


class ProtocolError(ConnectionError):
    """The server sent something that is not an SMTP reply."""


async def open_conn(
    target: Target,
    source: str | None,
    ssl_ctx: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect from ``source`` (bound before connect) to ``target``; implicit TLS if ``ssl_ctx``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            if target.family == socket.AF_INET:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        await loop.sock_connect(sock, (target.host, target.port))
        if ssl_ctx is None:
            return await asyncio.open_connection(sock=sock, limit=MAX_LINE * 4)
        return await asyncio.open_connection(
            sock=sock, ssl=ssl_ctx, server_hostname=server_hostname, limit=MAX_LINE * 4
        )
    except BaseException:
        sock.close()
        raise


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read one (possibly multi-line) SMTP reply; returns (code, text of the last line)."""
    for _ in range(MAX_REPLY_LINES):
        line = await reader.readline()
        if not line or not line.endswith(b"\n"):
            raise ServerClosed("connection closed by server")
        if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            raise ProtocolError(f"not an SMTP reply: {line[:60]!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line[4:].decode("latin-1").strip()
    raise ProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")


def dot_stuff(body: bytes) -> bytes:
    """CRLF-normalise, dot-stuff and terminate a message body for DATA."""
    lines = body.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
    return out + b"\r\n.\r\n"


def make_message(mail_from: str, rcpt: str, size: int, tag: str) -> bytes:
    """A plain RFC 5322 message of about ``size`` bytes, dot-stuffed and terminated."""
    head = (
        f"From: <{mail_from}>\r\nTo: <{rcpt}>\r\nSubject: flood {tag}\r\n"
        f"Message-ID: <{tag}.{time.time_ns()}@flood.invalid>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n"
    ).encode()
    filler = max(0, size - len(head))
    line = b"x" * 76 + b"\r\n"
    body = (line * (filler // len(line) + 1))[:filler]
    return dot_stuff(head + body)


@dataclass
class Attempt:
    """One legitimate transaction. ``t`` is seconds since the run started."""

    t: float
    latency_ms: float | None
    outcome: str  # accepted | tempfail | permfail | refused | timeout | error | unfinished
    code: int | None = None
    stage: str | None = None
    detail: str | None = None


class _Reply(Exception):
    def __init__(self, code: int, stage: str, text: str) -> None:
        super().__init__(f"{code} at {stage}: {text}")
        self.code, self.stage, self.text = code, stage, text


async def smtp_attempt(
    target: Target,
    source: str | None,
    *,
    helo: str,
    mail_from: str,
    rcpt: str,
    message: bytes,
    deadline_s: float,
    tls: str = "none",
    ssl_ctx: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    t_run0: float = 0.0,
) -> Attempt:
    """One SMTP transaction on a fresh connection, timed from connect to the 250 after DATA.

    ``tls``: "none", "implicit" (TLS from the first byte) or "starttls". Never raises for
    network/SMTP trouble: the outcome is in the returned Attempt (CancelledError propagates).
    """
    stage = "connect"
    writer: asyncio.StreamWriter | None = None
    t0 = time.perf_counter()
    t_rel = time.monotonic() - t_run0
    try:
        async with asyncio.timeout(deadline_s):
            reader, writer = await open_conn(
                target, source, ssl_ctx if tls == "implicit" else None, server_hostname
            )

            async def cmd(line: bytes | None, want: int, name: str) -> None:
                nonlocal stage
                stage = name
                if line is not None:
                    writer.write(line)
                code, text = await read_reply(reader)
                if code != want:
                    raise _Reply(code, name, text)

            await cmd(None, 220, "banner")
            await cmd(b"EHLO %s\r\n" % helo.encode(), 250, "EHLO")
            if tls == "starttls":
                await cmd(b"STARTTLS\r\n", 220, "STARTTLS")
                stage = "TLS"
                await writer.start_tls(ssl_ctx, server_hostname=server_hostname)
                await cmd(b"EHLO %s\r\n" % helo.encode(), 250, "EHLO")
            await cmd(b"MAIL FROM:<%s>\r\n" % mail_from.encode(), 250, "MAIL")
            await cmd(b"RCPT TO:<%s>\r\n" % rcpt.encode(), 250, "RCPT")
            await cmd(b"DATA\r\n", 354, "DATA")
            await cmd(message, 250, "DOT")
            latency = (time.perf_counter() - t0) * 1000.0
        # QUIT outside the timed part, best effort.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                writer.write(b"QUIT\r\n")
                await read_reply(reader)
        return Attempt(t_rel, latency, "accepted", 250, "DOT")
    except _Reply as r:
        kind = "tempfail" if 400 <= r.code < 500 else "permfail" if r.code >= 500 else "error"
        return Attempt(t_rel, None, kind, r.code, r.stage, r.text[:120])
    except TimeoutError:
        return Attempt(t_rel, None, "timeout", None, stage)
    except ConnectionRefusedError:
        return Attempt(t_rel, None, "refused", None, "connect")
    except ServerClosed:
        return Attempt(t_rel, None, "error", None, stage, "closed")
    except (OSError, ssl.SSLError, ProtocolError, EOFError) as e:
        return Attempt(t_rel, None, "error", None, stage, type(e).__name__)
    finally:
        if writer is not None:
            writer.close()


# --------------------------------------------------------------------------------------------
# Stats


def _merge_into(dst: Any, src: Any) -> None:
    """Merge a dataclass of counters: ints/floats add, dicts add per key, lists concatenate."""
    for f in dataclasses.fields(dst):
        a, b = getattr(dst, f.name), getattr(src, f.name)
        if isinstance(a, bool | str) or a is None:
            continue
        if isinstance(a, int | float):
            setattr(dst, f.name, a + b)
        elif isinstance(a, dict):
            for k, v in b.items():
                a[k] = a.get(k, 0) + v
        elif isinstance(a, list):
            a.extend(b)


def _pcts(values: Sequence[float], scale: float = 1.0, nd: int = 3) -> dict[str, float | None]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x * scale, nd)

    return {
        "n": len(values),
        "min": r(min(values)) if values else None,
        "p50": r(percentile_nearest_rank(values, 50)),
        "p95": r(percentile_nearest_rank(values, 95)),
        "p99": r(percentile_nearest_rank(values, 99)),
        "max": r(max(values)) if values else None,
        "mean": r(sum(values) / len(values)) if values else None,
    }


@dataclass
class LegitStats:
    """Per legitimate sender (or merged). ``summary()`` is the JSON shape documented in main()."""

    name: str = ""
    kind: str = ""
    source: str | None = None
    interval_s: float = 0.0
    attempts: int = 0
    accepted: int = 0
    unfinished: int = 0
    refused: int = 0
    tempfails: dict[str, int] = field(default_factory=dict)  # code -> n
    tempfails_by_stage: dict[str, int] = field(default_factory=dict)  # "MAIL 451" -> n
    permfails: dict[str, int] = field(default_factory=dict)
    permfails_by_stage: dict[str, int] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)  # stage -> n
    conn_errors: dict[str, int] = field(default_factory=dict)  # "closed at MAIL" -> n
    latencies_ms: list[float] = field(default_factory=list)
    timeline: list[Attempt] = field(default_factory=list)

    def record(self, a: Attempt) -> None:
        self.attempts += 1
        self.timeline.append(a)
        if a.outcome == "accepted":
            self.accepted += 1
            assert a.latency_ms is not None
            self.latencies_ms.append(a.latency_ms)
        elif a.outcome == "tempfail":
            _bump(self.tempfails, str(a.code))
            _bump(self.tempfails_by_stage, f"{a.stage} {a.code}")
        elif a.outcome == "permfail":
            _bump(self.permfails, str(a.code))
            _bump(self.permfails_by_stage, f"{a.stage} {a.code}")
        elif a.outcome == "timeout":
            _bump(self.timeouts, str(a.stage))
        elif a.outcome == "refused":
            self.refused += 1
        elif a.outcome == "unfinished":
            self.unfinished += 1
        else:
            _bump(self.conn_errors, f"{a.detail or 'error'} at {a.stage}")

    @property
    def accepted_pct(self) -> float | None:
        done = self.attempts - self.unfinished
        return round(100.0 * self.accepted / done, 3) if done else None

    def summary(self, timeline: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "interval_s": self.interval_s,
            "attempts": self.attempts,
            "accepted": self.accepted,
            "accepted_pct": self.accepted_pct,
            "unfinished": self.unfinished,
            "latency_ms": _pcts(self.latencies_ms),
            "tempfails": dict(self.tempfails),
            "tempfails_by_stage": dict(self.tempfails_by_stage),
            "permfails": dict(self.permfails),
            "permfails_by_stage": dict(self.permfails_by_stage),
            "timeouts": dict(self.timeouts),
            "conn_errors": dict(self.conn_errors),
            "refused": self.refused,
        }
        if timeline:
            out["timeline"] = [
                {
                    "t": round(a.t, 4),
                    "latency_ms": None if a.latency_ms is None else round(a.latency_ms, 3),
                    "outcome": a.outcome,
                    "code": a.code,
                    "stage": a.stage,
                }
                for a in sorted(self.timeline, key=lambda a: a.t)
            ]
        return out

    @classmethod
    def merged(cls, name: str, parts: Sequence[LegitStats]) -> LegitStats:
        total = cls(name=name, kind="all")
        for p in parts:
            _merge_into(total, p)
        return total


@dataclass
class BotStats:
    """Stalling / trickle / early-talker bots of one role (merged over bots and processes)."""

    role: str = ""
    bots: int = 0
    connections: int = 0  # connect attempts
    connected: int = 0
    refused: int = 0
    connect_timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    banner_codes: dict[str, int] = field(default_factory=dict)
    first_replies: dict[str, int] = field(default_factory=dict)  # early talker: first reply code
    later_replies: dict[str, int] = field(default_factory=dict)  # e.g. 421 on idle timeout
    closed_by_server: int = 0
    open_at_end: int = 0
    no_banner_at_end: int = 0  # of open_at_end: connected (TCP) but never got a first reply
    open_now: int = 0
    bytes_sent: int = 0
    held_s: list[float] = field(default_factory=list)  # connect -> close (server's or run end)

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["held_s"] = _pcts(self.held_s, nd=3)
        d.pop("open_now")
        return d


@dataclass
class SpamStats:
    """Spam senders (merged over bots and processes)."""

    bots: int = 0
    connections: int = 0
    connected: int = 0
    refused: int = 0
    timeouts: dict[str, int] = field(default_factory=dict)
    conn_errors: dict[str, int] = field(default_factory=dict)
    banner_codes: dict[str, int] = field(default_factory=dict)
    sent: int = 0  # transactions that reached MAIL FROM
    cut: int = 0  # of those, still in progress when the run ended (excluded from accepted_pct)
    accepted: int = 0
    shed: dict[str, int] = field(default_factory=dict)  # 4xx code -> n
    shed_by_stage: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # 5xx code -> n
    rejected_by_stage: dict[str, int] = field(default_factory=dict)
    open_now: int = 0
    active_s: float = 0.0  # the spam phase's length (per process; max when merged)

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("open_now")
        done = self.sent - self.cut
        d["accepted_pct"] = round(100.0 * self.accepted / done, 3) if done else None
        d["accepted_per_s"] = round(self.accepted / self.active_s, 2) if self.active_s else None
        d["sent_per_s"] = round(self.sent / self.active_s, 2) if self.active_s else None
        return d


# --------------------------------------------------------------------------------------------
# Bots


async def _sleep_until(t: float) -> None:
    delay = t - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


class _ConnBot:
    """Shared connect/hold logic of the idle bots. Subclasses implement ``session``."""

    def __init__(
        self,
        target: Target,
        source: str | None,
        stats: BotStats,
        *,
        start_at: float = 0.0,
        reconnect: bool = True,
        reconnect_delay: float = 1.0,
        max_connections: int = 10_000,
        connect_deadline: float = 30.0,
    ) -> None:
        self.target, self.source, self.stats = target, source, stats
        self.start_at = start_at
        self.reconnect, self.reconnect_delay = reconnect, reconnect_delay
        self.max_connections, self.connect_deadline = max_connections, connect_deadline
        self._greeted = False

    async def run(self, end: float) -> None:
        """Connect, run ``session``, reconnect; bounded by ``max_connections`` and ``end``."""
        loop = asyncio.get_running_loop()
        self.stats.bots += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(end):
                await _sleep_until(self.start_at)
                for _ in range(self.max_connections):
                    if loop.time() >= end:
                        break
                    await self._one(end)
                    if not self.reconnect:
                        break
                    await asyncio.sleep(self.reconnect_delay)

    async def _one(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        s = self.stats
        s.connections += 1
        try:
            async with asyncio.timeout(self.connect_deadline):
                reader, writer = await open_conn(self.target, self.source)
        except TimeoutError:
            if loop.time() >= end - 0.01:
                raise
            s.connect_timeouts += 1
            return
        except ConnectionRefusedError:
            s.refused += 1
            return
        except OSError as e:
            _bump(s.errors, f"connect {type(e).__name__}")
            return
        s.connected += 1
        s.open_now += 1
        self._greeted = False
        t0 = loop.time()
        try:
            closed = await self.session(reader, writer)
            if closed:
                s.closed_by_server += 1
        except (TimeoutError, asyncio.CancelledError):  # the run's end cancels us
            s.open_at_end += 1
            if not self._greeted:
                s.no_banner_at_end += 1
            raise
        except (OSError, ProtocolError) as e:
            _bump(s.errors, type(e).__name__)
        finally:
            s.open_now -= 1
            s.held_s.append(round(loop.time() - t0, 3))
            writer.close()

    async def _read_code(self, reader: asyncio.StreamReader, into: dict[str, int]) -> bool:
        """Read one reply and count its code; False when the server closed instead."""
        try:
            code, _ = await read_reply(reader)
        except ServerClosed:
            return False
        self._greeted = True
        _bump(into, str(code))
        return True

    async def _drain_until_closed(
        self, reader: asyncio.StreamReader, wait: float | None
    ) -> bool | None:
        """Read for up to ``wait`` s; True if server closed, None if still open, counts replies."""
        try:
            async with asyncio.timeout(wait):
                data = await reader.read(MAX_LINE)
        except TimeoutError:
            # Re-raise only if this is the run's outer deadline; asyncio.timeout(wait) inside an
            # outer timeout_at cancels cleanly either way.
            if wait is None:
                raise
            return None
        if not data:
            return True
        for line in data.split(b"\r\n"):
            if line[:3].isdigit():
                _bump(self.stats.later_replies, line[:3].decode())
        return None

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        raise NotImplementedError


class StallingBot(_ConnBot):
    """Connect, read the banner, say nothing; hold until the run ends or the server closes.

    After the server closes, reconnects after ``reconnect_delay`` (if ``reconnect``).
    """

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if not await self._read_code(reader, self.stats.banner_codes):
            return True
        for _ in range(1_000_000):
            if await self._drain_until_closed(reader, 60.0):
                return True
        return False


class TrickleBot(_ConnBot):
    """Connect, read the banner, then send one byte every ``interval`` seconds (an EHLO, then
    NOOPs, byte by byte) until the server closes or the run ends."""

    def __init__(self, *args: Any, interval: float = 5.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.interval = interval

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if not await self._read_code(reader, self.stats.banner_codes):
            return True
        script = b"EHLO trickle.invalid\r\n" + b"NOOP\r\n" * 10_000
        for i in range(len(script)):
            writer.write(script[i : i + 1])
            self.stats.bytes_sent += 1
            if await self._drain_until_closed(reader, self.interval):
                return True
        return False


class EarlyTalkerBot(_ConnBot):
    """Send EHLO right after connect, before the banner; record the first reply code; then QUIT
    and close (reconnecting after ``reconnect_delay``)."""

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"EHLO early.invalid\r\n")
        self.stats.bytes_sent += 20
        if not await self._read_code(reader, self.stats.first_replies):
            return True
        # If that was a 220 banner the server did not catch us: read the EHLO reply too.
        with contextlib.suppress(TimeoutError, ServerClosed, ProtocolError):
            async with asyncio.timeout(5.0):
                code, _ = await read_reply(reader)
                _bump(self.stats.later_replies, str(code))
                writer.write(b"QUIT\r\n")
                await read_reply(reader)
        return False


class SpamSender:
    """Connect, EHLO, then MAIL/RCPT/DATA as fast as possible, ``per_conn`` messages per
    connection (1 = one per connection), optionally capped at ``rate`` messages/s per bot.

    A 4xx/5xx at MAIL/RCPT/DATA is counted and followed by RSET; 421 or a close ends the
    connection and the bot reconnects. Bounded by ``max_messages`` and ``end``.
    """

    def __init__(
        self,
        target: Target,
        source: str | None,
        stats: SpamStats,
        *,
        start_at: float = 0.0,
        per_conn: int = 100,
        rate: float = 0.0,
        size: int = 1024,
        mail_from: str = "spam@bots.invalid",
        rcpt: str = "user@example.com",
        max_messages: int = 10_000_000,
        deadline_s: float = 30.0,
        reconnect_delay: float = 0.05,
    ) -> None:
        self.target, self.source, self.stats = target, source, stats
        self.start_at, self.per_conn, self.rate = start_at, max(1, per_conn), rate
        self.mail_from, self.rcpt = mail_from, rcpt
        self.message = make_message(mail_from, rcpt, size, "spam")
        self.max_messages, self.deadline_s = max_messages, deadline_s
        self.reconnect_delay = reconnect_delay
        self.count = 0

    async def run(self, end: float) -> None:
        self.stats.bots += 1
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(end):
                await _sleep_until(self.start_at)
                for _ in range(self.max_messages):
                    if self.count >= self.max_messages or loop.time() >= end:
                        break
                    ok = await self._connection(end)
                    if not ok:
                        await asyncio.sleep(self.reconnect_delay)

    async def _connection(self, end: float) -> bool:
        s = self.stats
        loop = asyncio.get_running_loop()
        s.connections += 1
        stage = "connect"
        in_txn = False
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.deadline_s):
                reader, writer = await open_conn(self.target, self.source)
            s.connected += 1
            s.open_now += 1
            try:

                async def cmd(line: bytes | None, name: str) -> int:
                    nonlocal stage
                    stage = name
                    if line is not None:
                        writer.write(line)
                    async with asyncio.timeout(self.deadline_s):
                        code, _ = await read_reply(reader)
                    if code >= 400:
                        bucket = (s.shed, s.shed_by_stage) if code < 500 else (
                            s.rejected, s.rejected_by_stage)
                        _bump(bucket[0], str(code))
                        _bump(bucket[1], f"{name} {code}")
                    return code

                stage = "banner"
                async with asyncio.timeout(self.deadline_s):
                    code, _ = await read_reply(reader)
                _bump(s.banner_codes, str(code))
                if code != 220:
                    _bump(s.shed if code < 500 else s.rejected, str(code))
                    _bump(s.shed_by_stage if code < 500 else s.rejected_by_stage, f"banner {code}")
                    return False
                if await cmd(b"EHLO spam.invalid\r\n", "EHLO") != 250:
                    return False
                t_next = loop.time()
                for _ in range(self.per_conn):
                    if self.count >= self.max_messages or loop.time() >= end:
                        break
                    if self.rate > 0:
                        await _sleep_until(t_next)
                        t_next += 1.0 / self.rate
                    self.count += 1
                    s.sent += 1
                    in_txn = True
                    code = await cmd(b"MAIL FROM:<%s>\r\n" % self.mail_from.encode(), "MAIL")
                    if code == 250:
                        code = await cmd(b"RCPT TO:<%s>\r\n" % self.rcpt.encode(), "RCPT")
                    if code == 250:
                        code = await cmd(b"DATA\r\n", "DATA")
                    if code == 354:
                        code = await cmd(self.message, "DOT")
                    in_txn = False
                    if code == 250:
                        s.accepted += 1
                        continue
                    if code == 421:
                        return False
                    if await cmd(b"RSET\r\n", "RSET") != 250:
                        return False
                writer.write(b"QUIT\r\n")
                return True
            finally:
                s.open_now -= 1
        except asyncio.CancelledError:  # the run's end
            if in_txn:
                s.cut += 1
            raise
        except TimeoutError:
            _bump(s.timeouts, stage)
        except ConnectionRefusedError:
            s.refused += 1
        except ServerClosed:
            _bump(s.conn_errors, f"closed at {stage}")
        except (OSError, ProtocolError) as e:
            _bump(s.conn_errors, f"{type(e).__name__} at {stage}")
        finally:
            if writer is not None:
                writer.close()
        return False


# --------------------------------------------------------------------------------------------
# Legitimate senders


@dataclass(frozen=True)
class LegitSpec:
    """One legitimate sender.

    Text form: ``KIND:SOURCE:INTERVAL[,key=value...]``, KIND in trusted | cert | spf, e.g.
    ``trusted:127.0.0.10:0.1``, ``spf:127.0.0.12:0.1,mail_from=a@spf.example``,
    ``cert:127.0.0.11:0.1,tls=implicit,port=4650,cert=c.pem,key=k.pem,ca=ca.pem``.
    Keys: name, mail_from, rcpt, helo, size, deadline, tls (none|implicit|starttls), port,
    cert, key, ca, servername. Unset keys take the FloodConfig defaults.
    """

    kind: str
    source: str | None
    interval_s: float
    name: str = ""
    mail_from: str | None = None
    rcpt: str | None = None
    helo: str | None = None
    size: int | None = None
    deadline_s: float | None = None
    tls: str | None = None
    port: int | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    servername: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("trusted", "cert", "spf"):
            raise ValueError(f"legit kind {self.kind!r}: expected trusted, cert or spf")
        if not self.interval_s > 0:
            raise ValueError("legit interval must be > 0")
        if self.tls not in (None, "none", "implicit", "starttls"):
            raise ValueError(f"legit tls {self.tls!r}: expected none, implicit or starttls")

    @classmethod
    def parse(cls, text: str) -> LegitSpec:
        head, *pairs = text.split(",")
        parts = head.split(":")
        if len(parts) == 4 and parts[1] == "" and "[" not in head:  # kind:::1:interval is ambiguous
            raise ValueError(f"bad legit spec {text!r}")
        if parts[1].startswith("["):  # kind:[::1]:interval
            src, _, rest = head.partition(":")[2].partition("]")
            kind, source, interval = parts[0], src.lstrip("["), rest.lstrip(":")
        elif len(parts) == 3:
            kind, source, interval = parts
        else:
            raise ValueError(f"bad legit spec {text!r}: expected KIND:SOURCE:INTERVAL[,k=v...]")
        kw: dict[str, Any] = {}
        conv: dict[str, Callable[[str], Any]] = {"size": int, "port": int, "deadline": float}
        for pair in pairs:
            k, sep, v = pair.partition("=")
            if not sep:
                raise ValueError(f"bad legit option {pair!r} in {text!r}")
            k = k.strip()
            name = "deadline_s" if k == "deadline" else k
            if name not in {f.name for f in dataclasses.fields(cls)} or name in (
                "kind", "source", "interval_s"):
                raise ValueError(f"unknown legit option {k!r} in {text!r}")
            kw[name] = conv.get(k, str)(v)
        return cls(kind=kind, source=source or None, interval_s=float(interval), **kw)


def _client_ssl_context(spec: LegitSpec) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if spec.ca:
        ctx.load_verify_locations(spec.ca)
    else:  # no CA: encrypt but do not verify (documented; only for quick runs)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.cert:
        ctx.load_cert_chain(spec.cert, spec.key)
    return ctx


class LegitSender:
    """Send one message every ``interval_s`` on a fresh connection, open-loop, recording each
    attempt into ``stats``. Attempts are launched at start_at + k*interval until ``end``; those
    still in flight at end + ``grace`` are cancelled and recorded as "unfinished"."""

    def __init__(
        self, target: Target, spec: LegitSpec, stats: LegitStats, *, start_at: float,
        t_run0: float, grace: float = 2.0,
    ) -> None:
        self.target = target.with_port(spec.port)
        self.spec, self.stats = spec, stats
        self.start_at, self.t_run0, self.grace = start_at, t_run0, grace
        self.tls = spec.tls or ("implicit" if spec.kind == "cert" else "none")
        self.ssl_ctx = _client_ssl_context(spec) if self.tls != "none" else None

    async def run(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        sp = self.spec
        assert sp.mail_from and sp.rcpt and sp.helo and sp.size and sp.deadline_s
        tasks: set[asyncio.Task[Attempt]] = set()
        max_attempts = int((end - self.start_at) / sp.interval_s) + 1
        for k in range(max_attempts):
            t = self.start_at + k * sp.interval_s
            if t >= end:
                break
            await _sleep_until(t)
            msg = make_message(sp.mail_from, sp.rcpt, sp.size, f"{sp.name}-{k}")
            task = asyncio.create_task(smtp_attempt(
                self.target, sp.source, helo=sp.helo, mail_from=sp.mail_from, rcpt=sp.rcpt,
                message=msg, deadline_s=sp.deadline_s, tls=self.tls, ssl_ctx=self.ssl_ctx,
                server_hostname=sp.servername, t_run0=self.t_run0,
            ))
            task.add_done_callback(self._done)
            task.add_done_callback(tasks.discard)
            task.t_start = t - self.t_run0  # type: ignore[attr-defined]
            tasks.add(task)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, end + self.grace -
                                                                    loop.time()))
            for task in pending:
                task.remove_done_callback(self._done)
                task.cancel()
                self.stats.record(Attempt(task.t_start, None, "unfinished"))  # type: ignore
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    def _done(self, task: asyncio.Task[Attempt]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.stats.record(task.result())


# --------------------------------------------------------------------------------------------
# Run configuration and orchestration


@dataclass(frozen=True)
class BotConfig:
    """Bot counts and behaviour parameters (for one process, or the whole run before splitting)."""

    stallers: int = 0
    tricklers: int = 0
    early: int = 0
    spammers: int = 0
    spam_per_conn: int = 100
    spam_rate: float = 0.0  # messages/s per spam bot; 0 = as fast as possible
    spam_size: int = 1024
    spam_from: str = "spam@bots.invalid"
    spam_rcpt: str = "user@example.com"
    trickle_interval: float = 5.0
    reconnect_delay: float = 1.0
    connect_deadline: float = 30.0
    ramp_s: float = 1.0  # spread idle-bot connects over this many seconds

    @property
    def sockets(self) -> int:
        return self.stallers + self.tricklers + self.early + self.spammers


@dataclass(frozen=True)
class FloodConfig:
    target: Target
    duration_s: float
    bots: BotConfig = field(default_factory=BotConfig)
    legit: tuple[LegitSpec, ...] = ()
    warmup_s: float = 0.0  # legit senders start this long after the bots
    grace_s: float = 2.0
    spam_procs: int = 1
    bot_procs: int = 1  # 0: stall/trickle/early bots inline in the measuring process
    mail_from: str = "legit@example.org"
    rcpt: str = "user@example.com"
    helo: str = "legit.example.org"
    size: int = 1024
    deadline_s: float = 10.0
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    servername: str = "localhost"
    use_uvloop: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.duration_s <= 24 * 3600:
            raise ValueError("duration must be in (0, 86400] seconds")
        for spec in self.legit:
            check_source(spec.source, self.target)
        b = self.bots
        if min(b.stallers, b.tricklers, b.early, b.spammers) < 0:
            raise ValueError("bot counts must be >= 0")
        for role, n in ((1, b.stallers), (2, b.tricklers), (3, b.early), (4, b.spammers)):
            if n:
                bot_address(role, n - 1)  # raises if out of range

    def resolved_legit(self) -> list[LegitSpec]:
        out = []
        for i, s in enumerate(self.legit):
            out.append(dataclasses.replace(
                s,
                name=s.name or f"{s.kind}{i}",
                mail_from=s.mail_from or self.mail_from,
                rcpt=s.rcpt or self.rcpt,
                helo=s.helo or self.helo,
                size=s.size or self.size,
                deadline_s=s.deadline_s or self.deadline_s,
                ca=s.ca or self.ca,
                cert=s.cert or (self.cert if s.kind == "cert" else None),
                key=s.key or (self.key if s.kind == "cert" else None),
                servername=s.servername or self.servername,
            ))
        return out

    def legit_sockets(self) -> int:
        return sum(math.ceil((s.deadline_s or self.deadline_s) / s.interval_s) + 2
                   for s in self.legit)

    def plan(self) -> list[tuple[str, BotConfig, dict[str, int]]]:
        """Split the bots over processes: [(role, BotConfig, first source index per role)].

        Role "spam" and "botsN" are child processes; "inline" runs in the measuring process.
        """
        b = self.bots
        plan: list[tuple[str, BotConfig, dict[str, int]]] = []
        if b.spammers:
            n = max(1, min(self.spam_procs, b.spammers))
            for i in range(n):
                lo, hi = b.spammers * i // n, b.spammers * (i + 1) // n
                plan.append(("spam", dataclasses.replace(
                    b, stallers=0, tricklers=0, early=0, spammers=hi - lo),
                    {"stall": 0, "trickle": 0, "early": 0, "spam": lo}))
        if b.stallers + b.tricklers + b.early:
            n = max(1, self.bot_procs)
            for i in range(n):
                def lo(x: int, i: int = i) -> int:
                    return x * i // n

                def cnt(x: int, i: int = i) -> int:
                    return x * (i + 1) // n - x * i // n

                plan.append(("inline" if self.bot_procs <= 0 else f"bots{i}", dataclasses.replace(
                    b, spammers=0, stallers=cnt(b.stallers), tricklers=cnt(b.tricklers),
                    early=cnt(b.early)),
                    {"stall": lo(b.stallers), "trickle": lo(b.tricklers), "early": lo(b.early),
                     "spam": 0}))
        return plan

    def fd_budget(self) -> dict[str, int]:
        """Descriptors each process needs: {'main': n, 'spam0': n, 'bots0': n, ...}."""
        need = {"main": self.legit_sockets() + FD_MARGIN}
        for k, (role, bc, _) in enumerate(self.plan()):
            if role == "inline":
                need["main"] += bc.sockets
            else:
                need[f"{role}#{k}"] = bc.sockets + FD_MARGIN
        return need


class BotRunner:
    """Runs one BotConfig's bots in this process and holds their stats."""

    def __init__(self, target: Target, bc: BotConfig, offsets: dict[str, int]) -> None:
        self.target, self.bc, self.offsets = target, bc, offsets
        self.stall = BotStats(role="stall")
        self.trickle = BotStats(role="trickle")
        self.early = BotStats(role="early")
        self.spam = SpamStats()

    def _src(self, role_octet: int, idx: int) -> str | None:
        return bot_address(role_octet, idx) if self.target.family == socket.AF_INET else None

    def coroutines(self, start_at: float, end: float) -> list[Any]:
        bc, t, off = self.bc, self.target, self.offsets
        idle = max(1, bc.stallers + bc.tricklers + bc.early)
        common = dict(reconnect_delay=bc.reconnect_delay, connect_deadline=bc.connect_deadline)
        coros: list[Any] = []
        k = 0

        def ramp() -> float:
            return start_at + bc.ramp_s * k / idle

        for i in range(bc.stallers):
            coros.append(StallingBot(t, self._src(1, off["stall"] + i), self.stall,
                                     start_at=ramp(), **common).run(end))
            k += 1
        for i in range(bc.tricklers):
            coros.append(TrickleBot(t, self._src(2, off["trickle"] + i), self.trickle,
                                    start_at=ramp(), interval=bc.trickle_interval,
                                    **common).run(end))
            k += 1
        for i in range(bc.early):
            coros.append(EarlyTalkerBot(t, self._src(3, off["early"] + i), self.early,
                                        start_at=ramp(), **common).run(end))
            k += 1
        for i in range(bc.spammers):
            coros.append(SpamSender(
                t, self._src(4, off["spam"] + i), self.spam, start_at=start_at,
                per_conn=bc.spam_per_conn, rate=bc.spam_rate, size=bc.spam_size,
                mail_from=bc.spam_from, rcpt=bc.spam_rcpt,
            ).run(end))
        return coros

    async def run(self, start_at: float, end: float) -> None:
        await asyncio.gather(*self.coroutines(start_at, end))
        loop = asyncio.get_running_loop()
        if self.bc.spammers:
            self.spam.active_s = max(0.0, min(loop.time(), end) - start_at)

    def progress(self) -> dict[str, Any]:
        return {
            "stall_open": self.stall.open_now, "trickle_open": self.trickle.open_now,
            "early_conns": self.early.connections, "spam_open": self.spam.open_now,
            "spam_sent": self.spam.sent, "spam_accepted": self.spam.accepted,
            "spam_shed": sum(self.spam.shed.values()),
        }

    def raw(self) -> dict[str, Any]:
        return {
            "stall": dataclasses.asdict(self.stall), "trickle": dataclasses.asdict(self.trickle),
            "early": dataclasses.asdict(self.early), "spam": dataclasses.asdict(self.spam),
        }


def _from_raw(raw: dict[str, Any]) -> tuple[BotStats, BotStats, BotStats, SpamStats]:
    return (BotStats(**raw["stall"]), BotStats(**raw["trickle"]), BotStats(**raw["early"]),
            SpamStats(**raw["spam"]))


def _bots_argv(cfg: FloodConfig, bc: BotConfig, offsets: dict[str, int],
               start_wall: float) -> list[str]:
    argv = [
        sys.executable, "-m", "bench.flood", "bots", "--target", str(cfg.target),
        "--start-at", repr(start_wall), "--duration", repr(cfg.duration_s),
        "--stallers", str(bc.stallers), "--tricklers", str(bc.tricklers),
        "--early", str(bc.early), "--spammers", str(bc.spammers),
        "--spam-per-conn", str(bc.spam_per_conn), "--spam-rate", repr(bc.spam_rate),
        "--spam-size", str(bc.spam_size), "--spam-from", bc.spam_from,
        "--spam-rcpt", bc.spam_rcpt, "--trickle-interval", repr(bc.trickle_interval),
        "--reconnect-delay", repr(bc.reconnect_delay),
        "--connect-deadline", repr(bc.connect_deadline), "--ramp", repr(bc.ramp_s),
    ]
    for role, off in offsets.items():
        argv += [f"--offset-{role}", str(off)]
    if not cfg.use_uvloop:
        argv.append("--no-uvloop")
    return argv


class _Child:
    def __init__(self, role: str, proc: asyncio.subprocess.Process) -> None:
        self.role, self.proc = role, proc
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.stderr = b""
        self.error: str | None = None

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        for _ in range(10_000_000):
            try:
                line = await self.proc.stdout.readline()
            except ValueError as e:  # a line over CHILD_LINE_LIMIT
                self.error = f"child output: {e}"
                break
            if not line:
                break
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if msg.get("type") == "progress":
                self.progress = msg
            elif msg.get("type") == "result":
                self.result = msg
            elif msg.get("type") == "error":
                self.error = msg.get("error")

    async def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = (await self.proc.stderr.read())[-4000:]


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


async def run_flood(
    cfg: FloodConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the whole flood (children included) and return the result dict (see main())."""
    loop = asyncio.get_running_loop()
    budget = cfg.fd_budget()
    for proc_name, need in budget.items():
        ensure_fd_limit(need, f"process {proc_name}")
    plan = cfg.plan()
    children_roles = [(r, bc, off) for r, bc, off in plan if r != "inline"]
    startup = 1.5 if children_roles else 0.05
    wall0 = time.time() + startup
    start_at = loop.time() + startup
    end = start_at + cfg.duration_s
    t_run0 = time.monotonic() + startup  # timeline zero (monotonic clock, as smtp_attempt)

    env = dict(os.environ)
    env["PYTHONPATH"] = _repo_root() + os.pathsep + env.get("PYTHONPATH", "")
    children: list[_Child] = []
    pumps: list[asyncio.Task[None]] = []
    try:
        for role, bc, off in children_roles:
            proc = await asyncio.create_subprocess_exec(
                *_bots_argv(cfg, bc, off, wall0), env=env, cwd=_repo_root(),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=CHILD_LINE_LIMIT,
            )
            ch = _Child(role, proc)
            children.append(ch)
            pumps += [asyncio.create_task(ch.pump()), asyncio.create_task(ch.read_stderr())]

        inline = [BotRunner(cfg.target, bc, off) for r, bc, off in plan if r == "inline"]
        specs = cfg.resolved_legit()
        legit_stats = [LegitStats(name=s.name, kind=s.kind, source=s.source,
                                  interval_s=s.interval_s) for s in specs]
        senders = [LegitSender(cfg.target, s, st, start_at=start_at + cfg.warmup_s,
                               t_run0=t_run0, grace=cfg.grace_s)
                   for s, st in zip(specs, legit_stats, strict=True)]
        work = [asyncio.create_task(r.run(start_at, end)) for r in inline]
        work += [asyncio.create_task(s.run(end)) for s in senders]

        async def ticker() -> None:
            for _ in range(int(cfg.duration_s + cfg.grace_s + 60) * 2):
                await asyncio.sleep(0.5)
                if progress is not None:
                    progress(_progress(loop.time() - start_at, cfg, legit_stats, inline,
                                       children))

        tick = asyncio.create_task(ticker())
        await asyncio.wait(work, timeout=max(0.0, end + cfg.grace_s + 2.0 - loop.time()))
        for w in work:
            w.cancel()
        # children report after `end`; give them a bounded time
        if children:
            await asyncio.wait(
                [asyncio.create_task(c.proc.wait()) for c in children],
                timeout=max(1.0, end + 10.0 - loop.time()),
            )
        tick.cancel()
    finally:
        for c in children:
            if c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.proc.wait(), 5.0)
        if pumps:
            await asyncio.wait(pumps, timeout=2.0)
        for p in pumps:
            p.cancel()

    stall, trickle, early, spam = (BotStats(role="stall"), BotStats(role="trickle"),
                                   BotStats(role="early"), SpamStats())
    processes: list[dict[str, Any]] = [
                 {"role": "main", "pid": os.getpid(), "fds_needed": budget["main"],
                  "legit": len(specs), "inline_bots": sum(r.bc.sockets for r in inline)}]
    spam_active = 0.0
    for r in inline:
        for a, b in zip((stall, trickle, early, spam), (r.stall, r.trickle, r.early, r.spam),
                        strict=True):
            _merge_into(a, b)
    for c in children:
        info: dict[str, Any] = {"role": c.role, "pid": c.proc.pid, "rc": c.proc.returncode}
        if c.result is not None:
            parts = _from_raw(c.result["bots"])
            spam_active = max(spam_active, parts[3].active_s)
            for a, b in zip((stall, trickle, early, spam), parts, strict=True):
                _merge_into(a, b)
            info["fds"] = c.result.get("fds")
        else:
            info["error"] = c.error or "no result"
            info["stderr_tail"] = c.stderr.decode("utf-8", "replace")[-1500:]
        processes.append(info)
    if spam_active:
        spam.active_s = spam_active
    total = LegitStats.merged("all", legit_stats)
    return {
        "version": 1,
        "target": str(cfg.target),
        "started_unix": round(wall0, 3),
        "duration_s": cfg.duration_s,
        "params": _params(cfg),
        "legit": [s.summary() for s in legit_stats],
        "legit_total": total.summary(timeline=False),
        "bots": {"stall": stall.summary(), "trickle": trickle.summary(),
                 "early": early.summary(), "spam": spam.summary()},
        "processes": processes,
        "percentile_method": "nearest-rank: sorted[ceil(p/100*N)-1]",
    }


def _params(cfg: FloodConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["target"] = str(cfg.target)
    d["legit"] = [dataclasses.asdict(s) for s in cfg.resolved_legit()]
    return d


def _progress(
    t: float, cfg: FloodConfig, legit: Sequence[LegitStats], inline: Sequence[BotRunner],
    children: Sequence[_Child],
) -> dict[str, Any]:
    agg: dict[str, int] = {}
    for r in inline:
        for k, v in r.progress().items():
            agg[k] = agg.get(k, 0) + v
    for c in children:
        for k, v in c.progress.items():
            if isinstance(v, int) and k != "pid":
                agg[k] = agg.get(k, 0) + v
    lat = [x for s in legit for x in s.latencies_ms]
    return {
        "t": round(t, 1), "duration": cfg.duration_s,
        "legit_attempts": sum(s.attempts for s in legit),
        "legit_accepted": sum(s.accepted for s in legit),
        "legit_p99_ms": percentile_nearest_rank(lat, 99),
        **agg,
    }


def format_progress(p: dict[str, Any]) -> str:
    p99 = p.get("legit_p99_ms")
    return (
        f"t={p['t']:5.1f}/{p['duration']:g}s legit {p['legit_accepted']}/{p['legit_attempts']}"
        f" p99={'-' if p99 is None else f'{p99:.1f}'}ms | stall {p.get('stall_open', 0)}"
        f" trickle {p.get('trickle_open', 0)} early {p.get('early_conns', 0)}"
        f" | spam open {p.get('spam_open', 0)} sent {p.get('spam_sent', 0)}"
        f" ok {p.get('spam_accepted', 0)} shed {p.get('spam_shed', 0)}"
    )


def _runner(use_uvloop: bool) -> asyncio.Runner:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def run_flood_sync(
    cfg: FloodConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """run_flood in a fresh event loop (uvloop when available and cfg.use_uvloop)."""
    with _runner(cfg.use_uvloop) as runner:
        return runner.run(run_flood(cfg, progress))


# --------------------------------------------------------------------------------------------
# Child process: `python -m bench.flood bots ...`


async def _bots_child(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    target = Target.parse(args.target)
    bc = BotConfig(
        stallers=args.stallers, tricklers=args.tricklers, early=args.early,
        spammers=args.spammers, spam_per_conn=args.spam_per_conn, spam_rate=args.spam_rate,
        spam_size=args.spam_size, spam_from=args.spam_from, spam_rcpt=args.spam_rcpt,
        trickle_interval=args.trickle_interval, reconnect_delay=args.reconnect_delay,
        connect_deadline=args.connect_deadline, ramp_s=args.ramp,
    )
    offsets = {"stall": args.offset_stall, "trickle": args.offset_trickle,
               "early": args.offset_early, "spam": args.offset_spam}
    for role, octet, n in (("stall", 1, bc.stallers), ("trickle", 2, bc.tricklers),
                           ("early", 3, bc.early), ("spam", 4, bc.spammers)):
        if n:
            bot_address(octet, offsets[role] + n - 1)
    fds = ensure_fd_limit(bc.sockets + FD_MARGIN, "bot process")
    start_at = loop.time() + max(0.0, args.start_at - time.time())
    end = start_at + args.duration
    runner = BotRunner(target, bc, offsets)

    async def ticker() -> None:
        for _ in range(int(args.duration + 60)):
            await asyncio.sleep(1.0)
            _emit({"type": "progress", **runner.progress()})

    tick = asyncio.create_task(ticker())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(runner.run(start_at, end), timeout=end + 5.0 - loop.time())
    tick.cancel()
    return {"type": "result", "bots": runner.raw(), "fds": list(fds)}


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(msg) + b"\n")
    sys.stdout.buffer.flush()


# --------------------------------------------------------------------------------------------
# CLI


def _add_bot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="HOST:PORT on loopback")
    p.add_argument("--duration", type=float, required=True, help="seconds; the run stops itself")
    p.add_argument("--stallers", type=int, default=0, help="stalling bots (127.1.x.y)")
    p.add_argument("--tricklers", type=int, default=0, help="one-byte-every-few-s bots (127.2/16)")
    p.add_argument("--early", type=int, default=0, help="early talkers (127.3/16)")
    p.add_argument("--spammers", type=int, default=0, help="spam senders (127.4/16)")
    p.add_argument("--spam-per-conn", type=int, default=100, help="messages per connection")
    p.add_argument("--spam-rate", type=float, default=0.0, help="msgs/s per spammer; 0=max")
    p.add_argument("--spam-size", type=int, default=1024)
    p.add_argument("--spam-from", default="spam@bots.invalid")
    p.add_argument("--spam-rcpt", default="user@example.com")
    p.add_argument("--trickle-interval", type=float, default=5.0)
    p.add_argument("--reconnect-delay", type=float, default=1.0,
                   help="idle bots: pause before reconnecting after the server closed")
    p.add_argument("--connect-deadline", type=float, default=30.0)
    p.add_argument("--ramp", type=float, default=1.0, help="spread idle-bot connects over S s")
    p.add_argument("--no-uvloop", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.flood",
        description="Loopback SMTP flood with measured legitimate senders (see module doc).",
    )
    _add_bot_flags(p)
    p.add_argument("--legit", action="append", default=[], metavar="KIND:SRC:INTERVAL[,k=v]",
                   help="legit sender, repeatable: trusted|cert|spf (see LegitSpec)")
    p.add_argument("--warmup", type=float, default=0.0, help="legit start after S s of bots")
    p.add_argument("--grace", type=float, default=2.0,
                   help="wait S s after the end for legit attempts in flight")
    p.add_argument("--deadline", type=float, default=10.0, help="per legit attempt, seconds")
    p.add_argument("--mail-from", default="legit@example.org")
    p.add_argument("--rcpt", default="user@example.com")
    p.add_argument("--helo", default="legit.example.org")
    p.add_argument("--size", type=int, default=1024, help="legit message size, bytes")
    p.add_argument("--ca", help="CA file to verify the server (TLS senders)")
    p.add_argument("--client-cert", help="client certificate (PEM) for cert senders")
    p.add_argument("--client-key", help="client key (PEM) for cert senders")
    p.add_argument("--servername", default="localhost", help="TLS server name to verify")
    p.add_argument("--spam-procs", type=int, default=1, help="processes for spam senders")
    p.add_argument("--bot-procs", type=int, default=1,
                   help="processes for stall/trickle/early bots (0 = in the measuring process)")
    p.add_argument("--out", help="write the JSON result here instead of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def config_from_args(a: argparse.Namespace) -> FloodConfig:
    return FloodConfig(
        target=Target.parse(a.target),
        duration_s=a.duration,
        bots=BotConfig(
            stallers=a.stallers, tricklers=a.tricklers, early=a.early, spammers=a.spammers,
            spam_per_conn=a.spam_per_conn, spam_rate=a.spam_rate, spam_size=a.spam_size,
            spam_from=a.spam_from, spam_rcpt=a.spam_rcpt, trickle_interval=a.trickle_interval,
            reconnect_delay=a.reconnect_delay, connect_deadline=a.connect_deadline,
            ramp_s=a.ramp,
        ),
        legit=tuple(LegitSpec.parse(x) for x in a.legit),
        warmup_s=a.warmup, grace_s=a.grace, spam_procs=a.spam_procs, bot_procs=a.bot_procs,
        mail_from=a.mail_from, rcpt=a.rcpt, helo=a.helo, size=a.size, deadline_s=a.deadline,
        ca=a.ca, cert=a.client_cert, key=a.client_key, servername=a.servername,
        use_uvloop=not a.no_uvloop,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry. Exit 0 on a completed run (whatever the server did), 2 on a refused config.

    Result JSON: {version, target, started_unix, duration_s, params, percentile_method,
      legit: [{name, kind, source, interval_s, attempts, accepted, accepted_pct, unfinished,
               latency_ms: {n, min, p50, p95, p99, max, mean}, tempfails: {code: n},
               tempfails_by_stage: {"MAIL 451": n}, permfails, permfails_by_stage,
               timeouts: {stage: n}, conn_errors: {"closed at MAIL": n}, refused,
               timeline: [{t, latency_ms, outcome, code, stage}]}],
      legit_total: (same without timeline, over all legit senders),
      bots: {stall|trickle|early: {bots, connections, connected, refused, connect_timeouts,
               errors, banner_codes, first_replies, later_replies, closed_by_server,
               open_at_end, no_banner_at_end, bytes_sent, held_s: {n, p50, ...}},
             spam: {bots, connections, connected, refused, timeouts, conn_errors, banner_codes,
               sent, cut, accepted, accepted_pct, accepted_per_s, sent_per_s, shed, shed_by_stage,
               rejected, rejected_by_stage, active_s}},
      processes: [{role, pid, rc, ...}]}
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bots":
        return _child_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"flood: {e}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def show(p: dict[str, Any]) -> None:
        if not args.quiet:
            sys.stderr.write(("\r" if tty else "") + format_progress(p) + ("" if tty else "\n"))
            sys.stderr.flush()

    try:
        result = run_flood_sync(cfg, show)
    except FdLimitError as e:
        print(f"flood: {e}", file=sys.stderr)
        return 2
    if tty and not args.quiet:
        sys.stderr.write("\n")
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    if args.out:
        Path(args.out).write_bytes(data + b"\n")
    else:
        sys.stdout.buffer.write(data + b"\n")
    return 0


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flood bots")
    _add_bot_flags(p)
    p.add_argument("--start-at", type=float, required=True, help="wall-clock start (time.time())")
    for role in ("stall", "trickle", "early", "spam"):
        p.add_argument(f"--offset-{role}", type=int, default=0)
    args = p.parse_args(argv)
    try:
        with _runner(not args.no_uvloop) as runner:
            result = runner.run(_bots_child(args))
    except (FdLimitError, ValueError) as e:
        _emit({"type": "error", "error": str(e)})
        print(f"flood bots: {e}", file=sys.stderr)
        return 2
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
