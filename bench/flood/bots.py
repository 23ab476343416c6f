"""The flood generator's bots (stalling, trickling, early talking, spam) and legitimate senders.

API
    StallingBot, TrickleBot, EarlyTalkerBot, SpamSender, LegitSender: ``await run(end)`` until the
    loop.time() deadline ``end``, recording into their stats; LegitSpec.parse(text)

Failure modes and limits: those of the whole generator, in the package docstring
(bench/flood/__init__.py), with the accounting definitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.flood.adversary import SpamMessages
from bench.flood.client import (
    Attempt,
    ProtocolError,
    ServerClosed,
    make_message,
    open_conn,
    read_reply,
    smtp_attempt,
)
from bench.flood.common import MAX_LINE, Target, bump
from bench.flood.stats import BotStats, LegitStats, SpamStats

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
            bump(s.errors, f"connect {type(e).__name__}")
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
            bump(s.errors, type(e).__name__)
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
        bump(into, str(code))
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
                bump(self.stats.later_replies, line[:3].decode())
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
                bump(self.stats.later_replies, str(code))
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
        messages: SpamMessages | None = None,
        index: int = 0,
    ) -> None:
        self.target, self.source, self.stats = target, source, stats
        self.messages, self.index, self.conns = messages, index, 0
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
                        bump(bucket[0], str(code))
                        bump(bucket[1], f"{name} {code}")
                    return code

                stage = "banner"
                async with asyncio.timeout(self.deadline_s):
                    code, _ = await read_reply(reader)
                bump(s.banner_codes, str(code))
                if code != 220:
                    bump(s.shed if code < 500 else s.rejected, str(code))
                    bump(s.shed_by_stage if code < 500 else s.rejected_by_stage, f"banner {code}")
                    return False
                if await cmd(b"EHLO spam.invalid\r\n", "EHLO") != 250:
                    return False
                t_next = loop.time()
                self.conns += 1
                for _ in range(self.per_conn):
                    if self.count >= self.max_messages or loop.time() >= end:
                        break
                    if self.rate > 0:
                        await _sleep_until(t_next)
                        t_next += 1.0 / self.rate
                    self.count += 1
                    s.sent += 1
                    in_txn = True
                    sender, message = self.mail_from, self.message
                    if self.messages is not None:
                        sender = self.messages.sender(self.index, self.conns, self.count)
                        message = self.messages.message(sender)
                    code = await cmd(b"MAIL FROM:<%s>\r\n" % sender.encode(), "MAIL")
                    if code == 250:
                        code = await cmd(b"RCPT TO:<%s>\r\n" % self.rcpt.encode(), "RCPT")
                    if code == 250:
                        code = await cmd(b"DATA\r\n", "DATA")
                    if code == 354:
                        code = await cmd(message, "DOT")
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
            bump(s.timeouts, stage)
        except ConnectionRefusedError:
            s.refused += 1
        except ServerClosed:
            bump(s.conn_errors, f"closed at {stage}")
        except (OSError, ProtocolError) as e:
            bump(s.conn_errors, f"{type(e).__name__} at {stage}")
        finally:
            if writer is not None:
                writer.close()
        return False


# --------------------------------------------------------------------------------------------
# Legitimate senders


LEGIT_KINDS = ("trusted", "cert", "spf", "dnswl", "pool", "mta")


@dataclass(frozen=True)
class LegitSpec:
    """One legitimate sender.

    Text form: ``KIND:SOURCE:INTERVAL[,key=value...]``, KIND in trusted | cert | spf | dnswl |
    pool | mta, e.g.
    ``trusted:127.0.0.10:0.1``, ``spf:127.0.0.12:0.1,mail_from=a@spf.example``,
    ``cert:127.0.0.11:0.1,tls=implicit,port=4650,cert=c.pem,key=k.pem,ca=ca.pem``.
    Keys: name, mail_from, rcpt, helo, size, deadline, tls (none|implicit|starttls), port,
    cert, key, ca, servername, retry_s, pool, learn_s, dkim_key, dkim_selector (unset: the
    FloodConfig defaults). mta: one message retried every retry_s after a 4xx (adversary.
    RetryingMTA); dnswl: as trusted, from an address on a DNS allow list; pool: a provider's
    `pool` addresses from SOURCE on, its mail DKIM-signed (bench.flood.pool.PoolSender).
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
    retry_s: float | None = None   # kind "mta": one message, retried this often after a 4xx
    pool: int = 0                  # kind "pool": its addresses (SOURCE and the next ones)
    learn_s: float | None = None   # kind "pool": pause after the first (learned) message
    prime: int = 0                 # messages sent once at the bots' start, before their ramp,
                                   # not counted: a correspondent the target has seen before
    dkim_key: str | None = None    # kind "pool": sign for the sender's domain (a PEM file)
    dkim_selector: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in LEGIT_KINDS:
            raise ValueError(f"legit kind {self.kind!r}: expected one of {LEGIT_KINDS}")
        if (self.kind == "pool") != (self.pool > 0) or not 0 <= self.pool <= 254:
            raise ValueError("legit kind pool needs pool=N (1..254), and only it takes pool")
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
        conv: dict[str, Callable[[str], Any]] = {"size": int, "port": int, "deadline": float,
                                                 "retry_s": float, "pool": int,
                                                 "learn_s": float, "prime": int}
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
        t_run0: float, grace: float = 2.0, prime_at: float | None = None,
    ) -> None:
        self.target = target.with_port(spec.port)
        self.spec, self.stats = spec, stats
        self.start_at, self.t_run0, self.grace = start_at, t_run0, grace
        self.prime_at = prime_at       # the bots' start (spec.prime)
        self.tls = spec.tls or ("implicit" if spec.kind == "cert" else "none")
        self.ssl_ctx = _client_ssl_context(spec) if self.tls != "none" else None

    async def run(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        sp = self.spec
        assert sp.mail_from and sp.rcpt and sp.helo and sp.size and sp.deadline_s
        tasks: set[asyncio.Task[Attempt]] = set()
        if sp.prime and self.prime_at is not None and self.prime_at < self.start_at:
            await _sleep_until(self.prime_at)
            for i in range(sp.prime):     # before the measured window: not in the stats
                primed = await self.attempt(-1 - i)
                self.stats.primed.append(primed.outcome)
        max_attempts = int((end - self.start_at) / sp.interval_s) + 1
        for k in range(max_attempts):
            t = self.start_at + k * sp.interval_s
            if t >= end:
                break
            await _sleep_until(t)
            task = asyncio.create_task(self.attempt(k))
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

    async def attempt(self, k: int) -> Attempt:
        """Attempt k: one timed transaction from source(k) with message(k) (subclasses: pool)."""
        sp = self.spec
        assert sp.mail_from and sp.rcpt and sp.helo and sp.deadline_s
        return await smtp_attempt(
            self.target, self.source(k), helo=sp.helo, mail_from=sp.mail_from, rcpt=sp.rcpt,
            message=self.message(k), deadline_s=sp.deadline_s, tls=self.tls,
            ssl_ctx=self.ssl_ctx, server_hostname=sp.servername, t_run0=self.t_run0)

    def source(self, k: int) -> str | None:
        return self.spec.source

    def message(self, k: int) -> bytes:
        sp = self.spec
        assert sp.mail_from and sp.rcpt and sp.size
        return make_message(sp.mail_from, sp.rcpt, sp.size, f"{sp.name}-{k}")

    def _done(self, task: asyncio.Task[Attempt]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.stats.record(task.result())
