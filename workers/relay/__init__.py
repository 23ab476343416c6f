"""The relay: the process that drains the spool to the downstream MTA (SMTP or LMTP).

What lives here: dsn.py (the RFC 3464 bounce builder), forward.py (the pure choice and
encoding of XCLIENT / XFORWARD: the original client for the downstream), clients/ (the SMTP
and LMTP sessions over one transaction, with STARTTLS / AUTH; make_session), scheduler.py (the
Relay: scan, schedule), breaker.py (the circuit breaker), delivery.py (one delivery per spool
file, and its record) and `run`, the entry point the supervisor starts by module name
("workers.relay" -> run; only when relay.downstream is set). The package may import the core
(ingress.core), the pure policy (ingress.policy.dsn: who may get a DSN) and the spool
(workers.spool: the store, which owns every change of a spool file, and state, the delivery rules);
never the edge nor the lane. dsn.py and forward.py do no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from ingress.core import child, log
from ingress.core.config import Config


def run(cfg: Config, hb: Any = None, slot: int = 0) -> None:
    # SIGUSR2 stops; TERM/INT/HUP ignored; a lower CPU priority (relay.nice)
    async def setup(_: child.Signals) -> child.Service[Awaitable[object]]:
        if not cfg.relay.downstream:
            # Not meant to be started (the spool is the destination); idle rather than crash-loop.
            log.event("relay_disabled", "warning", why="relay.downstream is empty")
            stopped = asyncio.Event()
            return child.Service(stopped.wait, stopped.set)
        from workers.relay.scheduler import Relay  # not at import: the pure modules stay light
        relay = Relay(cfg)
        return child.Service(relay.main, relay.stop)
    child.main_loop(cfg, child.Spec("relay", child.LANE_SIGNALS, nice=cfg.relay.nice), setup,
                    hb, slot, runner=child.run_asyncio)
