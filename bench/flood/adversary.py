"""The flood generator's adversaries who have read the code (issue 17): minted identities, dead
DKIM keys, farmed deferrals, TLS handshake floods; and a real MTA that retries.

API
    Adversary                    frozen: what the spam senders and the TLS bots do beyond
                                 BotConfig's basics (one JSON argument to a bot child process)
        spam_domains, spam_stride  N > 0: spam_from's "{d}" is the sender domain number: bot i
                                 starts at i and moves on by spam_stride (the number of spam
                                 senders) on every new connection, cycling over N
        spam_senders             M > 0: spam_from's "{s}" is the sender number, the next one on
                                 every message (farming deferral records over many senders)
        dkim_key, dkim_selector  sign each spam message for its From: domain (dkimpy; signed
                                 once per domain and cached: the load generator stays cheap)
        dead_sigs                K DKIM-Signature headers per message whose key names
                                 (dead<i>._domainkey.<domain>) the bench's DNS never answers
        handshakers, tls_stallers, tls_port, handshake_pause
                                 bots that complete TLS handshakes on tls_port without a client
                                 certificate, back to back (127.5/16), and bots that connect to
                                 tls_port and say nothing (127.6/16)
    SpamMessages(adv, mail_from, rcpt, size)   .sender(bot, conn, msg) -> address;
                                 .message(sender) -> bytes (signed and cached per domain)
    signed_message(sender, rcpt, size, tag, key, selector, dead_sigs=0) -> bytes
                                 the one DKIM signer (SpamMessages, bench.flood.pool)
    HandshakeBot(target, source, stats, ...)   ``await run(end)``
    HandshakeStats               attempts, handshakes, alerts, refused, timeouts, errors
    RetryingMTA(target, spec, stats, retry_s, ...)   one message per MTA: on a 4xx it retries
                                 the same transaction after retry_s (a real MTA's queue) until
                                 250, a 5xx or the end; records the try that succeeded

Failure modes and limits: those of the whole generator (bench/flood/__init__.py): loopback only,
every loop bounded in count and by the run's end time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from bench.flood.client import make_message, open_conn, smtp_attempt
from bench.flood.common import Target, bump
from bench.flood.stats import LegitStats

TLS_HANDSHAKE_ROLE, TLS_STALL_ROLE = 5, 6   # source octets: 127.5/16 and 127.6/16


@dataclass(frozen=True)
class Adversary:
    spam_domains: int = 0
    spam_stride: int = 0      # domains a connection moves on by (the spam senders in all)
    spam_senders: int = 0
    dkim_key: str = ""
    dkim_selector: str = "bench"
    dead_sigs: int = 0
    handshakers: int = 0
    tls_stallers: int = 0
    tls_port: int = 0
    handshake_pause: float = 0.0

    def __post_init__(self) -> None:
        if min(self.spam_domains, self.spam_senders, self.dead_sigs, self.handshakers,
               self.tls_stallers) < 0:
            raise ValueError("adversary counts must be >= 0")
        if (self.handshakers or self.tls_stallers) and not 0 < self.tls_port < 65536:
            raise ValueError("handshakers and tls_stallers need tls_port")

    @property
    def tls_sockets(self) -> int:
        return self.handshakers + self.tls_stallers

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Adversary:
        return cls(**d)


class SpamMessages:
    """The spam a sender sends: its envelope sender per connection/message, and the message
    (signed for its From: domain when a DKIM key is given; cached per sender domain)."""

    def __init__(self, adv: Adversary, mail_from: str, rcpt: str, size: int) -> None:
        self.adv, self.mail_from, self.rcpt, self.size = adv, mail_from, rcpt, size
        self._key = open(adv.dkim_key, "rb").read() if adv.dkim_key else b""  # noqa: SIM115
        self._cache: dict[str, bytes] = {}

    def sender(self, bot: int, conn: int, msg: int) -> str:
        a = self.adv
        d = (bot + conn * (a.spam_stride or 97)) % a.spam_domains if a.spam_domains else 0
        s = msg % a.spam_senders if a.spam_senders else 0
        return self.mail_from.replace("{d}", str(d)).replace("{s}", str(s))

    def message(self, sender: str) -> bytes:
        domain = sender.rpartition("@")[2]
        cached = self._cache.get(domain)
        if cached is None:
            cached = self._build(sender, domain)
            if len(self._cache) < 100_000:
                self._cache[domain] = cached
        return cached

    def _build(self, sender: str, domain: str) -> bytes:
        return signed_message(sender, self.rcpt, self.size, "spam", self._key,
                              self.adv.dkim_selector, self.adv.dead_sigs)


def signed_message(sender: str, rcpt: str, size: int, tag: str, key: bytes, selector: str,
                   dead_sigs: int = 0) -> bytes:
    """make_message's message, signed with DKIM for the sender's domain when `key` (a PEM) is
    given, with `dead_sigs` signatures whose key names never answer in front (the one signer
    of the bench: issue 17's spam and issue 18's provider pool)."""
    domain = sender.rpartition("@")[2]
    plain = make_message(sender, rcpt, size, tag)[:-3]   # without ".\r\n"
    extra = b""
    for i in range(dead_sigs):
        extra += (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain}; "
                  f"s=dead{i}; h=from:to:subject; bh=AAAA; b=AAAA\r\n").encode()
    if key:
        import dkim  # dkimpy: a dependency of smtp-ingress itself

        sig = dkim.sign(plain, selector.encode(), domain.encode(), key,
                        include_headers=[b"from", b"to", b"subject"])
        extra = sig.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + extra
    return extra + plain + b".\r\n"


@dataclass
class HandshakeStats:
    bots: int = 0
    attempts: int = 0
    handshakes: int = 0   # the server finished a handshake with us (no client certificate)
    alerts: int = 0       # the server ended it with a TLS alert
    refused: int = 0
    timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    active_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["handshakes_per_s"] = round(self.handshakes / self.active_s, 1) \
            if self.active_s else None
        return d


@cache
def _stranger_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class HandshakeBot:
    """Back-to-back TLS handshakes without a client certificate: connect, handshake, read until
    the server closes (or 1 s), close; repeat after ``pause`` until ``end``."""

    def __init__(self, target: Target, source: str | None, stats: HandshakeStats, *,
                 start_at: float, pause: float = 0.0, deadline_s: float = 5.0,
                 max_attempts: int = 10_000_000) -> None:
        self.target, self.source, self.stats = target, source, stats
        self.start_at, self.pause, self.deadline_s = start_at, pause, deadline_s
        self.max_attempts = max_attempts

    async def run(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        self.stats.bots += 1
        delay = self.start_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        for _ in range(self.max_attempts):
            if loop.time() >= end:
                break
            await self._one(end)
            await asyncio.sleep(self.pause)

    async def _one(self, end: float) -> None:
        s = self.stats
        s.attempts += 1
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(min(self.deadline_s, max(0.01, end - _now()))):
                reader, writer = await open_conn(self.target, self.source, ssl_ctx=_stranger_ctx(),
                                                 server_hostname="localhost")
                s.handshakes += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await reader.read(4096)
        except ssl.SSLError as e:
            if "ALERT" in str(e).upper():
                s.alerts += 1
            else:
                bump(s.errors, type(e).__name__)
        except TimeoutError:
            s.timeouts += 1
        except ConnectionRefusedError:
            s.refused += 1
        except OSError as e:
            bump(s.errors, type(e).__name__)
        finally:
            if writer is not None:
                writer.close()


def _now() -> float:
    return asyncio.get_running_loop().time()


class RetryingMTA:
    """One message, retried like an MTA's queue: every ``retry_s`` after a 4xx (or a lost
    connection), until 250, a 5xx or ``end``. ``stats.tries`` gets the try number that
    succeeded (1 = first attempt), or 0 if it never did."""

    def __init__(self, target: Target, source: str | None, stats: LegitStats, *,
                 start_at: float, retry_s: float, helo: str, mail_from: str, rcpt: str,
                 size: int, deadline_s: float, t_run0: float, name: str) -> None:
        self.target, self.source, self.stats = target, source, stats
        self.start_at, self.retry_s = start_at, retry_s
        self.helo, self.mail_from, self.rcpt = helo, mail_from, rcpt
        self.deadline_s, self.t_run0 = deadline_s, t_run0
        self.message = make_message(mail_from, rcpt, size, name)

    async def run(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        delay = self.start_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        for tries in range(1, 10_000):
            if loop.time() >= end:
                break
            a = await smtp_attempt(self.target, self.source, helo=self.helo,
                                   mail_from=self.mail_from, rcpt=self.rcpt,
                                   message=self.message, deadline_s=self.deadline_s,
                                   tls="none", ssl_ctx=None, server_hostname=None,
                                   t_run0=self.t_run0)
            self.stats.record(a)
            if a.outcome == "accepted":
                self.stats.tries.append(tries)
                return
            if a.outcome == "permfail":
                break
            await asyncio.sleep(self.retry_s)
        self.stats.tries.append(0)
