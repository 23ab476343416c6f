"""The supervisor's child table: which children a config runs, their heartbeat slots, and the
restart policy (start, watch, restart, retire, reap).

API:
    wanted(cfg) -> [(kind, key)]        the children `cfg` runs, in start order, for its
                                        cluster.role
    heartbeat_slots(cfg) -> int         the size of the shared heartbeat array
    Child                               one child: kind, key, cfg, slot, proc, restart state
    ChildTable(slots, target)           the children of one supervisor, `target(child)` ->
                                        (entry function, args) for each start
        .hb / .free_slots / .children   the heartbeat array (shared with every child), the
                                        free slots, the children (running, dead or retiring)
        .new(kind, key, cfg) -> Child   take a slot and start it
        .ready(c) -> bool               alive and has beaten since its start
        .watch(c, now, sup)             one pass of the restart policy over one child
        .retire(c, grace, replaced)     tell it to stop; killed once `grace` has passed
        .reap(c)                        forget a dead child, free its slot
        .fits(cfg) -> bool              are there free slots for every child `cfg` runs?

Children are multiprocessing processes (the *spawn* start method; no event loop or
zmq.Context exists in the supervisor). Watching: each child writes time.monotonic() into its
slot of a shared array from its own main loop. The array has heartbeat_slots(cfg) slots (every
child twice, for the overlap of a reload, plus a margin); a reload that needs more than are
free is refused like an invalid file (the supervisor asks fits()). A child that exits is
restarted after a backoff (restart_backoff doubling to restart_backoff_max while it keeps
crashing young); more than crash_limit restarts within crash_window is a crash loop: logged,
restarts throttled to the maximum backoff. A child whose heartbeat is older than
heartbeat_timeout is hung (at its start: max(30 s, heartbeat_timeout)): SIGKILL, then restarted.
A retiring child gets SIGUSR2 (SIGUSR1 for an acceptor replaced by a reload: it keeps serving
the sessions it has; ingress.core.child) and SIGKILL if it overruns its grace.

Failure modes: none raised; each event is a log line (child_start, child_exit, crash_loop,
child_hung, child_kill) and a metric (ingress.core.metrics_server.child_exited / child_dead).
Limits: new() with no free slot raises IndexError: the supervisor checks fits() first; a
child's restart history keeps its last 64 start times.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

from ingress.core import child, derived, log, metrics_server
from ingress.core.config import Config, SupervisorConfig
from ingress.policy.tiers import Tier

HB_MARGIN = 16       # heartbeat slots beyond two per child (a reload runs old and new side by side)


def heartbeat_slots(cfg: Config) -> int:
    """Size of the shared heartbeat array: every child twice (during a reload the old ones
    drain beside their replacements), plus a margin. A reload that needs more is refused
    (ChildTable.fits) and waits for a restart."""
    return 2 * cfg.child_count + HB_MARGIN


def wanted(cfg: Config) -> list[tuple[str, tuple[Any, ...]]]:
    out: list[tuple[str, tuple[Any, ...]]] = []
    for lane in ("fast", "bulk"):
        out.append(("broker", ("broker", lane)))
        out += [("worker", ("worker", lane, i)) for i in range(cfg.worker_count(lane))]
        # dedicated to the self-proven tier (ingress.policy.tiers.worker_takes)
        out += [("worker", ("worker", lane, i, Tier.SELF_PROVEN.label))
                for i in range(derived.dedicated_workers(cfg, lane))]
    if cfg.relay.downstream:         # "": the spool itself is the destination
        out.append(("relay", ("relay", "main")))
    out += [("acceptor", ("acceptor", i)) for i in range(cfg.acceptor_count)]
    out += [("acceptor", ("acceptor", "fast", i))
            for i in range(cfg.supervisor.fast_acceptors)]
    out += [("acceptor", ("acceptor", "mtls", i)) for i in range(cfg.mtls_acceptor_count)]
    # cluster.role: an edge runs only the acceptors, a lanes node everything else.
    if cfg.cluster.role == "edge":
        out = [w for w in out if w[0] == "acceptor"]
    elif cfg.cluster.role == "lanes":
        out = [w for w in out if w[0] != "acceptor"]
    return out


@dataclasses.dataclass
class Child:
    kind: str                       # "acceptor" | "broker" | "worker"
    key: tuple[Any, ...]            # ("acceptor", i) / ("acceptor", "fast", i) (a fast
                                    # acceptor: ingress.edge.handoff) / ("broker", lane) /
                                    # ("worker", lane, i) / ("worker", "fast", i, tier label)
                                    # (dedicated to that tier: tiers.self_proven_workers)
    cfg: Config
    slot: int
    proc: Any = None                # mp.Process
    started: float = 0.0
    restart_at: float | None = None
    failures: int = 0
    history: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=64))
    retiring: bool = False
    kill_at: float | None = None


Target = Callable[[Child], tuple[Any, tuple[Any, ...]]]


class ChildTable:
    def __init__(self, slots: int, target: Target) -> None:
        self.mp = mp.get_context("spawn")
        self.hb = self.mp.RawArray("d", slots)
        self.free_slots = list(range(slots - 1, -1, -1))
        self.children: list[Child] = []
        self.target = target

    def start(self, c: Child) -> None:
        target, args = self.target(c)
        self.hb[c.slot] = 0.0
        c.proc = self.mp.Process(target=target, args=args, name=f"smtp-ingress {c.key}",
                                 daemon=False)
        c.proc.start()
        c.started = time.monotonic()
        c.restart_at = None
        c.history.append(c.started)
        log.event("child_start", kind=c.kind, key=str(c.key[1:]), child_pid=c.proc.pid)

    def new(self, kind: str, key: tuple[Any, ...], cfg: Config) -> Child:
        c = Child(kind=kind, key=key, cfg=cfg, slot=self.free_slots.pop())
        self.children.append(c)
        self.start(c)
        return c

    def ready(self, c: Child) -> bool:
        return c.proc is not None and c.proc.is_alive() and self.hb[c.slot] >= c.started

    def fits(self, cfg: Config) -> bool:
        """Are there free heartbeat slots for every child a reload to `cfg` starts? (Brokers
        are counted though they may be kept: the check must not depend on what changed.)"""
        return len(wanted(cfg)) <= len(self.free_slots)

    def watch(self, c: Child, now: float, sup: SupervisorConfig) -> None:
        """A retiring child is reaped or killed at its deadline; a live one is checked for a
        hang; a dead one gets a restart time, and is started when that time comes (`sup`: the
        running config's restart policy)."""
        alive = c.proc is not None and c.proc.is_alive()
        if c.retiring:
            self._watch_retiring(c, now, alive)
            return
        if alive and not self._kill_if_hung(c, now, sup):
            return
        if c.restart_at is None:
            self._schedule_restart(c, now, sup)
        elif now >= c.restart_at:
            self.start(c)

    def _watch_retiring(self, c: Child, now: float, alive: bool) -> None:
        if not alive:
            self.reap(c)
        elif c.proc is not None and c.kill_at is not None and now > c.kill_at:
            log.event("child_kill", "warning", kind=c.kind, key=str(c.key[1:]),
                      why="drain overran")
            c.proc.kill()
            c.kill_at = None

    def _kill_if_hung(self, c: Child, now: float, sup: SupervisorConfig) -> bool:
        """True if this live child's heartbeat is too old and it was killed (it is dead now);
        False if it is well (its failure count is cleared once it has outlived crash_window)."""
        assert c.proc is not None
        beat = self.hb[c.slot]
        age = now - (beat if beat > 0 else c.started)
        limit = sup.heartbeat_timeout if beat > 0 else max(30.0, sup.heartbeat_timeout)
        if age > limit:
            log.event("child_hung", "error", kind=c.kind, key=str(c.key[1:]),
                      child_pid=c.proc.pid, silent_s=round(age, 2))
            c.proc.kill()
            c.proc.join(1.0)
            return True
        if now - c.started > sup.crash_window:
            c.failures = 0
        return False

    def _schedule_restart(self, c: Child, now: float, sup: SupervisorConfig) -> None:
        """A child has died: count the failure and set its restart time (exponential backoff,
        the maximum in a crash loop)."""
        code = c.proc.exitcode if c.proc is not None else None
        if c.proc is not None:
            c.proc.join(0)
            metrics_server.child_dead(c.proc.pid)
        c.failures += 1
        metrics_server.child_exited(c.kind)
        backoff = min(sup.restart_backoff * 2 ** (c.failures - 1), sup.restart_backoff_max)
        recent = sum(1 for t in c.history if now - t < sup.crash_window)
        if recent > sup.crash_limit:
            backoff = sup.restart_backoff_max
            log.event("crash_loop", "error", kind=c.kind, key=str(c.key[1:]),
                      restarts=recent, window_s=sup.crash_window)
        c.restart_at = now + backoff
        log.event("child_exit", "warning", kind=c.kind, key=str(c.key[1:]),
                  exitcode=code, restart_in_s=round(backoff, 3))

    def reap(self, c: Child) -> None:
        if c.proc is not None:
            c.proc.join(0)
            metrics_server.child_dead(c.proc.pid)
        self.children.remove(c)
        self.free_slots.append(c.slot)

    def retire(self, c: Child, grace: float, replaced: bool = False) -> None:
        """Stop a child: SIGUSR2 (shut down), or SIGUSR1 for an acceptor `replaced` by a
        reload (it keeps serving the sessions it has)."""
        c.retiring = True
        c.kill_at = time.monotonic() + grace
        sig = child.RETIRE_SIGNAL if replaced and c.kind == "acceptor" else child.STOP_SIGNAL
        if c.proc is not None and c.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.proc.pid, sig)
