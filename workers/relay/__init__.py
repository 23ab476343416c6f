"""The relay: the process that drains the spool to the downstream MTA (SMTP or LMTP).

What lives here: state.py (the pure delivery rules: replies, per-message state, settling,
backoff, address checks), dsn.py (the RFC 3464 bounce builder), clients.py (the SMTP and LMTP
sessions with STARTTLS / AUTH), scheduler.py (the Relay: scan, schedule, circuit breaker, one
delivery per spool file) and `run`, the entry point the supervisor starts by module name
("workers.relay" -> run; only when relay.downstream is set). The package may import the core
(ingress.core) and the spool module (workers.spool, which owns every change of a spool file);
nothing of the acceptor side, and no other lane worker. state.py and dsn.py do no I/O.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from ingress.core import log
from ingress.core.config import Config


def run(cfg: Config, hb: Any = None, slot: int = 0) -> None:
    log.setup(cfg.log.level, "relay")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if not cfg.relay.downstream:
        # Not meant to be started (the spool is the destination); idle rather than crash-loop.
        log.event("relay_disabled", "warning", why="relay.downstream is empty")
        stop = []
        signal.signal(signal.SIGUSR2, lambda s, f: stop.append(s))
        parent = os.getppid()
        while not stop and os.getppid() == parent:
            if hb is not None:
                hb[slot] = time.monotonic()
            time.sleep(0.2)
        return
    from workers.relay.scheduler import Relay  # not at import: the pure modules stay light
    asyncio.run(Relay(cfg, hb, slot).main())
