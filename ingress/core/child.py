"""The child skeleton: what every process the supervisor starts does the same way.

The acceptors, the lane brokers and workers and the relay each call this instead of writing their
own set-up (as gunicorn's worker base class and Postfix's server skeletons do for theirs).

API:
    start(cfg, name, table, nice=0) -> Signals
                                         log set-up and process title ("smtp-ingress: <name>"),
                                         the CPU priority lowered by `nice` (lanes.<lane>.nice,
                                         relay.nice), then the signal handlers of `table`
    Signals(table)                       .stop / .retire flags; .on_stop(callback); .handle(signum)
                                         (what a handler does); .install() with signal.signal,
                                         .install_loop(loop) with loop.add_signal_handler
    ACCEPTOR_SIGNALS, LANE_SIGNALS       which signal does what (Action) in an acceptor, and in a
                                         broker, worker or the relay
    STOP_SIGNAL, RETIRE_SIGNAL           what the supervisor sends (SIGUSR2, SIGUSR1)
    Heartbeat(hb, slot)                  this child's slot of the supervisor's shared heartbeat
                                         array: .beat(); .orphaned() is the parent-death check;
                                         `await .run(period, on_orphan)` as a task of the child's
                                         own event loop, so a hung loop stops heartbeating
    heartbeat_period(cfg) -> float       how often an event-loop child writes its slot
    Reconnect(initial=1, maximum=32)     Paranoid Pirate's reconnect back-off for the ZeroMQ
                                         clients: .due(now), .attempted(now) -> delay, .reset()

Signals: the supervisor stops a child with SIGUSR2 and retires an acceptor replaced by a reload
with SIGUSR1 (it serves the sessions it has, then exits). Brokers, workers and the relay ignore
SIGTERM, SIGINT and SIGHUP, so a signal sent to the whole process group (^C, `timeout`,
systemd's KillMode=control-group) cannot cut a lane under sessions still finishing; acceptors
stop on SIGTERM too and ignore SIGINT and SIGHUP. A handler only sets a flag and calls the
registered on_stop callbacks, which must themselves only set flags or events.

Parent death: a child whose parent pid changed (the supervisor died, the child was re-parented)
stops as if told to with SIGUSR2; the "orphaned" line is logged once.

Failure modes and limits: with hb None (tests, a child run by hand) beat() writes nothing. The
parent-death check polls getppid() at the heartbeat's pace, so an orphan notices within one
period. Reconnect never sleeps: the caller asks due(now), so its loop (and its heartbeat) keeps
running while it waits.
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

from ingress.core import log
from ingress.core.config import Config


class Action(enum.Enum):
    STOP = "stop"           # finish what is in hand, then exit 0
    RETIRE = "retire"       # an acceptor replaced by a reload: stop accepting, serve, exit
    IGNORE = "ignore"


STOP_SIGNAL = signal.SIGUSR2        # the supervisor's order to stop
RETIRE_SIGNAL = signal.SIGUSR1      # ... and to an acceptor replaced by a reload, to retire

ACCEPTOR_SIGNALS: Mapping[int, Action] = {
    STOP_SIGNAL: Action.STOP, signal.SIGTERM: Action.STOP, RETIRE_SIGNAL: Action.RETIRE,
    signal.SIGINT: Action.IGNORE, signal.SIGHUP: Action.IGNORE,
}
LANE_SIGNALS: Mapping[int, Action] = {
    STOP_SIGNAL: Action.STOP, signal.SIGTERM: Action.IGNORE,
    signal.SIGINT: Action.IGNORE, signal.SIGHUP: Action.IGNORE,
}


class Signals:
    """The flags a child's signal handlers set, and the callbacks that wake its loop."""

    def __init__(self, table: Mapping[int, Action]) -> None:
        self.table = dict(table)
        self.stop = False
        self.retire = False
        self._callbacks: list[Callable[[], None]] = []

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` (it must only set a flag or an event) when a stop is ordered; at
        once if one was ordered already."""
        self._callbacks.append(callback)
        if self.stop:
            callback()

    def handle(self, signum: int) -> None:
        """What the handler of `signum` does: set the flags, call the callbacks."""
        action = self.table.get(signum, Action.IGNORE)
        if action is Action.IGNORE:
            return
        if action is Action.RETIRE:
            self.retire = True
        self.stop = True
        for cb in self._callbacks:
            cb()

    def install(self) -> None:
        """Handlers with signal.signal (a child without an event loop, or before it has one)."""
        for signum, action in self.table.items():
            if action is Action.IGNORE:
                signal.signal(signum, signal.SIG_IGN)
            else:
                signal.signal(signum, lambda s, _f: self.handle(s))

    def install_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handlers through the event loop, so that a signal wakes it."""
        for signum, action in self.table.items():
            if action is Action.IGNORE:
                loop.add_signal_handler(signum, lambda: None)
            else:
                loop.add_signal_handler(signum, self.handle, signum)


# config.SCHED_POLICIES, as the kernel's constants
POLICY = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}


def start(cfg: Config, name: str, table: Mapping[int, Action], nice: int = 0,
          policy: str = "other") -> Signals:
    """A child's first call: JSON logging and the process title, its CPU priority, then its
    signal handlers. `nice` > 0 lowers the priority (os.nice), so that on shared cores the
    bulk lane's brokers and workers and the relay yield to the acceptors and the fast lane.
    `policy` (lanes.<lane>.sched_policy, as systemd's CPUSchedulingPolicy=) "idle" runs it
    only on CPU time no other task wants (SCHED_IDLE: a waking fast-lane task preempts it at
    once), "batch" as a CPU-bound task (SCHED_BATCH). Set before the child starts any thread
    (zmq's io threads, pools), so every thread inherits it. A failure is logged and the child
    runs on at its inherited priority and policy."""
    log.setup(cfg.log.level, name)          # also sets the title: "smtp-ingress: <name>"
    log.configure_throttle(cfg.log.throttle_interval, cfg.log.throttle_lines,
                           cfg.log.throttle_total)
    if policy != "other":
        try:
            os.sched_setscheduler(0, POLICY[policy], os.sched_param(0))
        except OSError as e:
            log.event("sched_policy_failed", "warning", policy=policy, error=str(e))
    if nice > 0:
        try:
            os.nice(nice)
        except OSError as e:
            log.event("nice_failed", "warning", nice=nice, error=str(e))
    sig = Signals(table)
    sig.install()
    return sig


class Heartbeat:
    """This child's slot of the supervisor's heartbeat array, and the parent-death check."""

    def __init__(self, hb: Any = None, slot: int = 0, parent: int | None = None) -> None:
        self.hb, self.slot = hb, slot
        self.parent = os.getppid() if parent is None else parent
        self._orphan_logged = False

    def beat(self) -> None:
        if self.hb is not None:
            self.hb[self.slot] = time.monotonic()

    def orphaned(self) -> bool:
        """Has the parent gone (the supervisor died and this process was re-parented)?"""
        if os.getppid() == self.parent:
            return False
        if not self._orphan_logged:
            self._orphan_logged = True
            log.event("orphaned", "warning", why="supervisor gone")
        return True

    async def run(self, period: float, on_orphan: Callable[[], None]) -> None:
        """Beat every `period` seconds from the event loop; orphaned -> on_orphan() (once)."""
        told = False
        while True:
            self.beat()
            if not told and self.orphaned():
                told = True
                on_orphan()
            await asyncio.sleep(period)


def heartbeat_period(cfg: Config) -> float:
    """An event-loop child writes its slot twice per supervisor.heartbeat_interval."""
    return cfg.supervisor.heartbeat_interval / 2


class Reconnect:
    """Paranoid Pirate's reconnect back-off: after a peer went silent, reconnect at once, then
    wait initial, 2*initial, ... up to maximum seconds between attempts; reset() once the peer
    answers. Pure: the clock is an argument."""

    def __init__(self, initial: float = 1.0, maximum: float = 32.0) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum")
        self.initial, self.maximum = initial, maximum
        self.delay = initial
        self.not_before = 0.0

    def due(self, now: float) -> bool:
        return now >= self.not_before

    def attempted(self, now: float) -> float:
        """Record an attempt at `now`; returns the wait before the next one may be made."""
        delay = self.delay
        self.not_before = now + delay
        self.delay = min(delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.delay = self.initial
        self.not_before = 0.0
