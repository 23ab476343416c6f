"""The relay's queue manager: drains spool/new to the downstream MTA (SMTP or LMTP) with
retries, DSNs and a circuit breaker.

API:
    Relay(cfg)                        one relay process's state; `await main()` runs it until
                                      stop() (SIGUSR2, or orphaned: the skeleton's, run())
    Relay.scan() -> int               pick up new files in new/, forget the gone ones
    Relay.cleanup_states() -> int     at start: remove stale state files and tmp leftovers
    The pure rules are in workers/spool/state.py, the DSN in dsn.py, the clients in clients/,
    one delivery and its record in delivery.py, the circuit breaker in breaker.py.

What it does: the spool files in new/ are delivered oldest first (by their state's next_at),
at most relay.concurrency at once, each worker task keeping its own downstream connection for
reuse and closing it after IDLE_CLOSE; a file is handed to delivery.py, which delivers it and
records the result (and puts it back with its next retry time). Nothing starts while the
breaker holds (breaker.py: the downstream is down, or its one probe is under way).

Durable retry state: one small JSON file per message that has been tried, spool/relay/<name>,
written tmp + fsync + rename + fsync(dir): attempts, next_at (wall clock), delivered, failed,
last_error. Every recipient of the message without a result stays pending (the file is never
finished while one has none). A file rather than the file name (name changes would race the scan
and break the name the acceptor logged) or the spool file itself (rewriting a 10 MB message to
record one recipient is wasteful, and workers.spool.store owns that format). Missing state =
never tried.
State files without a spool file (a crash between finishing a message and removing its state) are
removed at start, and tmp leftovers too unless another relay (a reload overlap) holds that spool
file's lock: it writes state files only under it. The spool file is claimed (flock()ed) while it
is being delivered, so two relays (a reload overlap) never deliver one file at once; a file
unlinked or moved under us is noticed (st_nlink == 0, or another file at the path) and skipped.
Operator tools (workers/spool/queue_ops.py, `smtp-ingress queue`) take the same flock; the relay
keeps a failed message's final state in spool/relay.failed/<name> (for requeue-failed) and
reschedules a known message at once when spool/retry/<name> appears (queue retry, release,
requeue-failed; picked up by the next scan, every SCAN_MIN). Such a request also ends the
circuit breaker's wait (breaker.py): the next delivery probes the downstream now.

Failure modes: errors while recording a result (disk) or a bug in a delivery are logged
(relay_error) and the file is retried with backoff kept in memory, on a clean session; a scan
that fails (relay_scan_error) is tried again at the next. A message's own failures: delivery.py.

Signals: SIGUSR2 (the supervisor) stops taking new work, lets in-flight deliveries finish for up
to STOP_GRACE seconds, then cancels the rest (no file whose delivery did not finish is touched),
exits 0. SIGTERM/SIGINT/SIGHUP are ignored (the supervisor drains us in order). Orphaned (the
parent changed) -> the same stop. The heartbeat slot is written by a task of the event loop
(signals, heartbeat and parent check: ingress.core.child).

Limits: one relay process; the new/ scan is O(files) and runs at most every SCAN_MIN seconds,
stretched to 10x its own duration for huge spools; state writes and fsyncs are done on the event
loop (this process has nothing latency-critical; it keeps the bookkeeping after a reply
atomic with respect to cancellation). STARTTLS and AUTH PLAIN to a TCP downstream as relay.tls
says (clients/tls.py; a refusal is a connection-level failure). The message is held in memory
while it is sent.
"""


from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from typing import Any

from ingress.core import log, metrics
from ingress.core.config import Config
from ingress.core.downstream import parse_downstream
from workers.relay.breaker import Breaker
from workers.relay.clients import make_session
from workers.relay.clients.tls import policy
from workers.relay.delivery import Delivery
from workers.spool import store as spool_mod
from workers.spool.state import backoff

SCAN_MIN = 0.25            # seconds between two scans of new/ (at least)
IDLE_CLOSE = 5.0           # a downstream connection idle this long is closed (QUIT)
STOP_GRACE = 3.0           # SIGUSR2: in-flight deliveries may finish within this


# --- the relay ---------------------------------------------------------------------------------

class Relay:
    def __init__(self, cfg: Config) -> None:
        self.cfg, self.rc = cfg, cfg.relay
        self.target = parse_downstream(cfg.relay.downstream)
        self.spool = spool_mod.Spool(cfg.spool.path)
        self.spool.make_relay_dirs()
        self.hostname = cfg.smtp.hostname
        self.tls = policy(cfg.relay, self.target)
        self.known: dict[str, float] = {}          # name -> next_at (wall), not in flight
        self.heap: list[tuple[float, str]] = []
        self.inflight: set[str] = set()
        self.stopping = False
        self.wake = asyncio.Event()
        self.errors: dict[str, int] = {}           # name -> consecutive unexpected errors
        self.counters: dict[str, Any] = {
            "sent": 0, "rcpt_delivered": 0, "deferred": 0, "bounced": 0, "dsn_spooled": 0,
            "dsn_suppressed": 0, "null_sender_failed": 0, "down": 0, "corrupt": 0}
        self.breaker = Breaker(self.target, cfg.relay, self.counters)
        self.delivery = Delivery(cfg, self.spool, self.target, self.breaker, self.counters,
                                 self._schedule, busy_retry=SCAN_MIN)

    # --- scheduling ------------------------------------------------------------------------

    def cleanup_states(self) -> int:
        """At start: remove stale state files and tmp leftovers (Spool.cleanup_states)."""
        return self.spool.cleanup_states()

    def scan(self) -> int:
        """Pick up files in new/ we do not know yet; forget the ones that are gone."""
        self.take_retry_requests()
        names = self.spool.names("new")
        for gone in [n for n in self.known if n not in names]:
            del self.known[gone]
        fresh = [n for n in names if n not in self.known and n not in self.inflight]
        if not fresh:
            return 0
        with_state = self.spool.state_names()
        for name in fresh:
            at = self.spool.read_state(name).next_at if name in with_state else 0.0
            self._schedule(name, at)
        return len(fresh)

    def take_retry_requests(self) -> None:
        """spool/retry/<name> (written by `smtp-ingress queue retry`, `release` and
        `requeue-failed` after they set the state's next_at to 0 under the file's lock): a
        known message is due now, and an open circuit breaker lets its probe go now (the
        operator says the downstream is back: its backoff, up to retry_max after a long
        outage, is not waited out)."""
        names = self.spool.take_retry_requests()
        for name in names:
            if name in self.known:
                self._schedule(name, 0.0)
        if names and self.breaker.failures and self.breaker.woken(len(names)):
            self.wake.set()

    def _schedule(self, name: str, at: float) -> None:
        self.known[name] = at
        heapq.heappush(self.heap, (at, name))
        self.wake.set()

    def _pop_due(self) -> str | None:
        if self.stopping:
            return None
        if self.breaker.holds():
            return None
        now = time.time()
        while self.heap:
            at, name = self.heap[0]
            if self.known.get(name) != at:
                heapq.heappop(self.heap)          # stale entry
                continue
            if at > now:
                return None
            heapq.heappop(self.heap)
            del self.known[name]
            self.inflight.add(name)
            self.breaker.taken(name)
            return name
        return None

    def _wait_hint(self) -> float:
        t = self.breaker.wait_hint(SCAN_MIN)
        while self.heap and self.known.get(self.heap[0][1]) != self.heap[0][0]:
            heapq.heappop(self.heap)
        if self.heap:
            t = min(t, max(0.01, self.heap[0][0] - time.time()))
        return t

    # --- the delivery tasks --------------------------------------------------------------------

    async def worker(self, index: int) -> None:
        session = make_session(self.target, self.hostname, self.rc.timeout)
        session.tls = self.tls  # type: ignore[attr-defined]
        session.forward = self.rc.forward_client
        try:
            while not self.stopping:
                name = self._pop_due()
                if name is None:
                    if session.connected and time.monotonic() - session.last_used > IDLE_CLOSE:
                        await session.close()
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), self._wait_hint())
                    continue
                try:
                    await self.delivery.process(name, session)
                    self.errors.pop(name, None)
                except Exception:
                    # A disk error while recording (the downstream may have accepted: a
                    # duplicate is possible on the retry) or a bug: log it, retry later with
                    # backoff (in memory: recording is what failed), and a clean session.
                    n = self.errors[name] = self.errors.get(name, 0) + 1
                    delay = backoff(n, self.rc.retry_base, self.rc.retry_max)
                    log.get().exception("relay_error", extra={"fields": {
                        "file": name, "errors": n, "retry_in_s": round(delay, 3)}})
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(session.close(), 1.0)
                    self._schedule(name, time.time() + delay)
                finally:
                    self.inflight.discard(name)
                    self.breaker.released(name)
                    self.wake.set()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), 1.0)

    # --- process loop ------------------------------------------------------------------------

    async def scanner(self) -> None:
        interval = SCAN_MIN
        while not self.stopping:
            t0 = time.monotonic()
            try:
                if self.scan():
                    self.wake.set()
            except OSError as e:
                log.event("relay_scan_error", "error", error=str(e))
            interval = max(SCAN_MIN, 10 * (time.monotonic() - t0))
            await asyncio.sleep(interval)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    async def main(self) -> None:
        removed = self.cleanup_states()
        self.scan()
        metrics.relay_breaker(metrics.BREAKER_CLOSED)
        log.event("relay_start", downstream=str(self.target), concurrency=self.rc.concurrency,
                  backlog=len(self.known), stale_state_removed=removed)
        scanner = asyncio.create_task(self.scanner())
        workers = [asyncio.create_task(self.worker(i)) for i in range(self.rc.concurrency)]
        while not self.stopping:
            await asyncio.sleep(0.1)
        scanner.cancel()
        _done, busy = await asyncio.wait(workers, timeout=STOP_GRACE)
        for t in busy:
            t.cancel()                 # waiting for a reply: the file stays, retried later
        await asyncio.gather(*workers, scanner, return_exceptions=True)
        log.event("relay_stop", cancelled=len(busy), backlog=len(self.known) + len(self.inflight),
                  **self.counters)

