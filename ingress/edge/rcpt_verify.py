"""Recipient verification against the downstream MTA at RCPT time: a cached callout, as Postfix's
reject_unverified_recipient does, so the ingress does not accept mail the downstream will refuse
(and then bounce to a sender that is usually forged: backscatter).

API:
    RecipientVerifier(host, port, *, helo, timeout, positive_ttl, negative_ttl, tempfail_ttl,
                      cache_size, concurrency, backlog=None, timer=time.monotonic)
    .cached(address) -> Answer | None       a cached answer, no I/O
    .export() -> (expiry {key: t}, answers {key: Answer}, now)   copies of the cache (dict
                                             copies: cheap on the event loop), `timer` time;
                                             .changes counts the 2xx/5xx answers cached, so a
                                             saver (ingress/edge/verify_store.py) knows what is new
    .preload([(key, answer, seconds left)]) -> int   answers kept from before (a reload: the
                                             store's file), each for at most its TTL
    await .verify(address, smtputf8=False) -> Answer
        OK (the downstream said 2xx to RCPT TO), UNKNOWN (it said 5xx), TEMPFAIL (anything else:
        4xx, a refused MAIL FROM:<>, connection refused or reset, a timeout, a garbled reply).
        Never raises (bar cancellation).
    Answer                                   StrEnum; session_rules.verify_verdict maps it to
                                             250 / 550 5.1.1 / 450 4.1.1 (never 5xx when unsure)

The callout: connect, EHLO, MAIL FROM:<>, RCPT TO:<address> (SMTPUTF8 on MAIL when the address
needs it and the downstream offers it; else TEMPFAIL) within `timeout`, the wait for a slot
included; then RSET and QUIT in a background task that still holds the callout's concurrency
slot, bounded by GOODBYE_TIMEOUT, after which the connection is closed (aiosmtplib, one fresh
connection per callout; nothing is ever delivered). The caller has its answer at once; the slot
(and so the downstream connection) is free only when the goodbye is done, so the downstream
never sees more than `concurrency` connections from one process.

Bounds (so a flood of RCPTs cannot turn us into an amplifier against the downstream):
- answers cached per address (domain case-folded), at most `cache_size` of them
  (ingress.core.expiry.ExpiryMap): 2xx for positive_ttl, 5xx for negative_ttl, uncertain for
  tempfail_ttl (0: never). When full, the answer expiring soonest goes first: a flood of
  made-up recipients (5xx, an hour) cannot push out the known ones (2xx, a day) unless those
  are near their end anyway;
- single flight: concurrent RCPTs for one address share one callout;
- at most `concurrency` callouts at once per acceptor process (a connection's RSET/QUIT
  included: at most `concurrency` downstream connections), and at most `backlog` (default
  4 x concurrency) waiting for a slot; beyond that TEMPFAIL at once, without a connection;
- the caller caps callouts per session (smtp.verify_per_session) and counts every refusal in the
  session's error accounting (ingress/policy/session_rules.py).
Limits: only an smtp:// downstream (config validation says so for lmtp); the cache is per
acceptor process; its 2xx and 5xx answers are kept across reloads and restarts by
ingress/edge/verify_store.py (a file per acceptor in spool.state_dir); callouts are not
authenticated or encrypted (the downstream is the operator's own MTA, normally on a private
network).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from enum import StrEnum

import aiosmtplib

from ingress.core import log
from ingress.core.expiry import ExpiryMap

GOODBYE_TIMEOUT = 2.0       # seconds for RSET + QUIT after the answer


class Answer(StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"
    TEMPFAIL = "tempfail"


PERSISTED = (Answer.OK, Answer.UNKNOWN)     # what outlives the process (never an unsure one)


def cache_key(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}"


class RecipientVerifier:
    def __init__(self, host: str, port: int, *, helo: str, timeout: float, positive_ttl: float,
                 negative_ttl: float, tempfail_ttl: float, cache_size: int, concurrency: int,
                 backlog: int | None = None,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.host, self.port, self.helo, self.timeout = host, port, helo, timeout
        self.ttl = {Answer.OK: positive_ttl, Answer.UNKNOWN: negative_ttl,
                    Answer.TEMPFAIL: tempfail_ttl}
        self.timer = timer
        self.answers: dict[str, Answer] = {}
        self.expiry = ExpiryMap(cache_size, on_drop=self._dropped)
        self.changes = 0            # 2xx/5xx answers cached so far (what a saver keeps)
        self.slots = asyncio.Semaphore(concurrency)
        self.backlog = backlog if backlog is not None else 4 * concurrency
        self.waiting = 0
        self.inflight: dict[str, asyncio.Future[Answer]] = {}
        self.callouts = 0           # made, for logs and tests
        self._goodbyes: set[asyncio.Task[None]] = set()

    # --- the cache ---------------------------------------------------------------------------

    def _dropped(self, key: str) -> None:
        self.answers.pop(key, None)

    def _get(self, key: str) -> Answer | None:
        if self.expiry.get(key, self.timer()) is None:
            return None
        return self.answers.get(key)

    def _store(self, key: str, answer: Answer, seconds: float) -> bool:
        """Cache `answer` for `seconds` (replacing what was there); False if the cache is full
        of answers that all outlive it."""
        self.expiry.pop(key)
        if not self.expiry.put(key, self.timer() + seconds, self.timer()):
            return False
        self.answers[key] = answer
        return True

    def remember(self, key: str, answer: Answer) -> bool:
        """Cache `answer` for its own TTL (smtp.verify_*_ttl; 0: not cached)."""
        return self.ttl[answer] > 0 and self._store(key, answer, self.ttl[answer])

    def cached(self, address: str) -> Answer | None:
        return self._get(cache_key(address))

    def __len__(self) -> int:
        return len(self.answers)

    def export(self) -> tuple[dict[str, float], dict[str, Answer], float]:
        return self.expiry.snapshot(), dict(self.answers), self.timer()

    def preload(self, entries: Iterable[tuple[str, Answer, float]]) -> int:
        """Answers from before (the store's file): each kept for `seconds left`, but never
        longer than its TTL now (a file cannot extend an answer) and never one that is
        unsure. Answers this process got itself are not replaced. The number kept."""
        kept = 0
        for key, answer, left in entries:
            ttl = self.ttl.get(answer, 0.0)
            if answer not in PERSISTED or ttl <= 0 or left <= 0 or self._get(key) is not None:
                continue
            kept += self._store(key, answer, min(left, ttl))
        return kept

    # --- callouts ---------------------------------------------------------------------------

    async def verify(self, address: str, smtputf8: bool = False) -> Answer:
        key = cache_key(address)
        hit = self._get(key)
        if hit is not None:
            return hit
        fut = self.inflight.get(key)
        if fut is not None:                      # single flight
            return await asyncio.shield(fut)
        if self.waiting >= self.backlog:
            log.event("verify_backlog", "warning", rcpt=address[:200])
            return Answer.TEMPFAIL
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        answer: Answer | None = None
        try:
            answer = await self._bounded(address, smtputf8)
        finally:             # cancelled (the client left): nothing cached, waiters unsure
            self.inflight.pop(key, None)
            if answer is not None and self.remember(key, answer) and answer in PERSISTED:
                self.changes += 1
            if not fut.done():
                fut.set_result(answer or Answer.TEMPFAIL)
        return answer

    async def _bounded(self, address: str, smtputf8: bool) -> Answer:
        """One callout within the deadline, the wait for a slot included."""
        try:
            async with asyncio.timeout(self.timeout):
                self.waiting += 1
                try:
                    await self.slots.acquire()
                finally:
                    self.waiting -= 1
                handed = False
                try:
                    answer, client = await self._callout(address, smtputf8)
                    if client is not None:          # the goodbye releases the slot
                        self._goodbye(client)
                        handed = True
                    return answer
                finally:
                    if not handed:
                        self.slots.release()
        except TimeoutError:
            log.event("verify_timeout", "warning", rcpt=address[:200], timeout=self.timeout)
            return Answer.TEMPFAIL

    async def _callout(self, address: str,
                       smtputf8: bool) -> tuple[Answer, aiosmtplib.SMTP | None]:
        """(answer, the connection still open for its goodbye, or None when it is closed)."""
        self.callouts += 1
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout,
                                 start_tls=False, use_tls=False, local_hostname=self.helo)
        stage = "connect"
        answered = False
        try:
            await client.connect()
            stage = "ehlo"
            await client.ehlo()
            utf8 = smtputf8 or not address.isascii()
            if utf8 and "smtputf8" not in client.esmtp_extensions:
                log.event("verify_uncertain", "info", rcpt=address[:200],
                          why="downstream lacks SMTPUTF8")
                return Answer.TEMPFAIL, None
            stage = "mail"
            r = await client.execute_command(b"MAIL", b"FROM:<>",
                                             *([b"SMTPUTF8"] if utf8 else []))
            if r.code != 250:
                log.event("verify_uncertain", "warning", rcpt=address[:200], stage=stage,
                          reply=f"{r.code} {r.message}"[:200])
                return Answer.TEMPFAIL, None
            stage = "rcpt"
            r = await client.execute_command(
                b"RCPT", b"TO:<" + address.encode("utf-8" if utf8 else "ascii") + b">")
            answer = Answer.OK if 200 <= r.code < 300 else \
                Answer.UNKNOWN if 500 <= r.code < 600 else Answer.TEMPFAIL
            log.event("verify", rcpt=address[:200], answer=answer.value,
                      reply=f"{r.code} {r.message}"[:200])
            answered = True
            return answer, client
        except (aiosmtplib.SMTPException, OSError, UnicodeError) as e:
            log.event("verify_uncertain", "warning", rcpt=address[:200], stage=stage,
                      error=f"{type(e).__name__}: {e}"[:200])
            return Answer.TEMPFAIL, None
        finally:
            if not answered:
                client.close()

    def _goodbye(self, client: aiosmtplib.SMTP) -> None:
        """RSET and QUIT after the answer, outside the callout's deadline (the answer is in;
        a downstream slow to say goodbye must not turn it into a 450), bounded on its own by
        GOODBYE_TIMEOUT. Owns the callout's concurrency slot: releases it when the connection
        is closed, so goodbyes never add connections beyond `concurrency`."""
        async def bye() -> None:
            try:
                async with asyncio.timeout(min(self.timeout, GOODBYE_TIMEOUT)):
                    await client.execute_command(b"RSET")
                    await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                pass

        def done(task: asyncio.Task[None]) -> None:     # also when cancelled before it ran
            self._goodbyes.discard(task)
            client.close()
            self.slots.release()

        task = asyncio.get_running_loop().create_task(bye())
        self._goodbyes.add(task)
        task.add_done_callback(done)
