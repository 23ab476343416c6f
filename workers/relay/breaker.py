"""The relay's circuit breaker over the downstream: while the downstream cannot be reached,
nothing is sent until a backoff has passed, then one delivery at a time probes it.

API:
    Breaker(target, rc, counters)       one per relay process (in memory: after a restart the
                                        first delivery is the probe)
    .failures                           consecutive connection-level failures (0: closed)
    .holds() -> bool                    no delivery may start now (open, or a probe under way)
    .taken(name)                        a delivery starts: while failures, it is the probe
    .released(name)                     that delivery ended (the probe is free again)
    .failed(why)                        a session could not be opened: open for backoff(failures)
    .ok()                               a session opened: closed
    .woken(requests) -> bool            an operator's retry request ends the wait now (True:
                                        wake the deliveries)
    .wait_hint(t) -> float              at most `t`, or until the backoff ends

Downstream down: only a failure to open a session (connect refused, greeting/EHLO not 2xx, timeout)
is connection-level: it opens the breaker (nothing is sent until backoff(consecutive failures)
has passed: relay.retry_base doubling to relay.retry_max, then one delivery at a time probes
until a session opens) and does not count against the message (put back unchanged; the
delivery decides that: delivery.py). Mail waits and drains once the downstream is back, without
a busy loop. An operator's retry request (`smtp-ingress queue retry`) ends the wait at once:
one probe goes now, and if it fails the backoff goes on from the same failure count
(relay_breaker_woken in the log): one probe per retry request, never a storm against a
downstream still down.

Failure modes: none (counters, the clock, a log line and the breaker gauges:
smtp_ingress_relay_breaker_state and _failures; relay_downstream_down / _up in the log).
Limits: one downstream per relay; the state is lost on restart (the first delivery probes).
"""

from __future__ import annotations

import time
from typing import Any

from ingress.core import log, metrics
from ingress.core.config import RelayConfig
from ingress.core.downstream import Target
from workers.spool.state import backoff


class Breaker:
    def __init__(self, target: Target, rc: RelayConfig, counters: dict[str, Any]) -> None:
        self.target, self.rc = target, rc
        self.counters = counters                   # the relay's (its relay_stop line): "down"
        self.failures = 0                          # consecutive connection-level failures
        self.until = 0.0                           # monotonic; open until then
        self.probe: str | None = None              # the one delivery allowed while half-open

    def holds(self) -> bool:
        return bool(self.failures) and (time.monotonic() < self.until or self.probe is not None)

    def taken(self, name: str) -> None:
        if self.failures:
            self.probe = name
            metrics.relay_breaker(metrics.BREAKER_HALF_OPEN, self.failures)

    def released(self, name: str) -> None:
        if self.probe == name:
            self.probe = None

    def wait_hint(self, t: float) -> float:
        if self.failures and self.probe is None:
            t = min(t, max(0.01, self.until - time.monotonic()))
        return t

    def woken(self, requests: int) -> bool:
        """An operator's retry while the breaker is open: the next due delivery is the probe,
        now. The failure count stays, so a probe that fails backs off as before (one probe
        per retry request, never a storm against a downstream still down)."""
        now = time.monotonic()
        if self.probe is None and self.until > now:
            log.event("relay_breaker_woken", downstream=str(self.target), requests=requests,
                      failures=self.failures,
                      backoff_left_s=round(self.until - now, 3))
            self.until = now
            return True
        return False

    def failed(self, why: str) -> None:
        self.failures += 1
        delay = backoff(self.failures, self.rc.retry_base, self.rc.retry_max)
        self.until = time.monotonic() + delay
        self.counters["down"] += 1
        metrics.relay_breaker(metrics.BREAKER_OPEN, self.failures)
        log.event("relay_downstream_down", "warning", downstream=str(self.target), error=why,
                  failures=self.failures, retry_in_s=round(delay, 3))

    def ok(self) -> None:
        if self.failures:
            log.event("relay_downstream_up", downstream=str(self.target),
                      after_failures=self.failures)
        self.failures = 0
        metrics.relay_breaker(metrics.BREAKER_CLOSED)
