"""The child skeleton: what every process the supervisor starts does the same way, owned once.

The acceptors, the lane brokers and workers and the relay each hand this their service and let
it run their life (as gunicorn's Worker base class and Postfix's single_server / multi_server
skeletons do for theirs): an entry point only builds its service and calls main() or
main_loop().

API:
    Spec(name, signals, nice=0, policy="other")
                                         who the child is: its name (the process title
                                         "smtp-ingress: <name>", the log lines' proc), which signal
                                         does what, its CPU priority and scheduling policy
    lane_spec(cfg, lane, name, dedicated=False) -> Spec   a lane's broker or worker
                                         (lanes.<lane>.nice, ...; a worker dedicated to the
                                         self-proven tier at least tiers.self_proven_nice; the
                                         fast broker and the other fast workers
                                         tiers.operator_policy)
    operator_policy(cfg, otherwise) -> str   the scheduling policy of a process serving the
                                         operator's tiers (SCHED_RR by default)
    quiet_io_threads(ctx) -> ctx         a zmq Context, before its first socket: SCHED_BATCH
                                         for its I/O threads in a process that yields the cores
    Service(serve, stop, started=None, stopped=None, connections=None)
                                         what the child runs: serve() is its life until stop()
                                         and its drain (blocking, or a coroutine function on
                                         the event loop); stop() is a stop order (a signal, the
                                         parent's death) and only sets a flag or an event;
                                         started() and stopped() (as Postfix's post-init and
                                         exit hooks) write its start and exit lines, called
                                         before and after serve
    main(cfg, spec, setup)               a child with its own (zmq) loop, which beats its own
                                         Heartbeat (a lane worker beats only while its work in
                                         hand is vouched for): start(); service = setup(sig)
                                         (sig: the Signals, whose .retire a service may read);
                                         settle_heap(); stop orders call service.stop(); the
                                         start line; service.serve(); the exit line
    main_loop(cfg, spec, setup, hb, slot, runner=run_uvloop)
                                         a child on an event loop (an acceptor, the relay):
                                         start(); then on the loop: the signal handlers through
                                         the loop, service = await setup(sig), settle_heap(),
                                         stop orders call service.stop(), the heartbeat task
                                         (parent death -> service.stop()), the start line, await
                                         service.serve(), the heartbeat task cancelled, the
                                         exit line
    settle_heap(loop=False)              after setup, before serve (main, main_loop): the start-up
                                         heap frozen out of the collector's full collections;
                                         an event-loop child (loop=True) has no automatic full
                                         collection at all: keep_heap runs them
    keep_heap(connections)               an event-loop child's task: a full collection when it is
                                         quiet (full_collection_due), logged as heap_collected;
                                         its exit line "heap" says what the collector found
    run_uvloop(coro), run_asyncio(coro)  the runners: uvloop (asyncio's own loop where uvloop
                                         is missing), asyncio's
    start(cfg, name, table, nice=0, policy="other") -> Signals
                                         the skeleton's first step (also for a child run by
                                         hand): log set-up and process title, the CPU priority
                                         lowered by `nice` (lanes.<lane>.nice, relay.nice) and
                                         the scheduling policy, then the signal handlers of
                                         `table`
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

Order: setup runs after start(), so every thread it starts (zmq's io threads, pools) inherits
the priority and policy; an event-loop child's setup runs on its loop (it may create servers and
tasks) with the loop's signal handlers installed already, and a stop ordered during setup
reaches the service as soon as it exists (Signals.on_stop calls a late callback at once).

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
running while it waits. An exception out of setup or serve is not caught: the child exits
non-zero and the supervisor restarts it (its heartbeat task is cancelled on the way out).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import zmq

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


# schema.SCHED_POLICIES and schema_tiers.OPERATOR_POLICIES, as the kernel's constants
POLICY = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE,
          "rr": os.SCHED_RR}
RR_PRIORITY = 1     # the lowest real-time priority: above every ordinary task, below the kernel's


def start(cfg: Config, name: str, table: Mapping[int, Action], nice: int = 0,
          policy: str = "other") -> Signals:
    """A child's first call: JSON logging and the process title, its CPU priority, then its
    signal handlers. `nice` > 0 lowers the priority (os.nice), so that on shared cores the
    bulk lane's brokers and workers and the relay yield to the acceptors and the fast lane.
    `policy` (lanes.<lane>.sched_policy, as systemd's CPUSchedulingPolicy=) "idle" runs it
    only on CPU time no other task wants (SCHED_IDLE: a waking fast-lane task preempts it at
    once), "batch" as a CPU-bound task (SCHED_BATCH), "rr" (tiers.operator_policy) before every
    ordinary task (SCHED_RR, RR_PRIORITY). Set before the child starts any thread
    (zmq's io threads, pools), so every thread inherits it. A failure is logged and the child
    runs on at its inherited priority and policy."""
    log.setup(cfg.log.level, name)          # also sets the title: "smtp-ingress: <name>"
    log.configure_throttle(cfg.log.throttle_interval, cfg.log.throttle_lines,
                           cfg.log.throttle_total)
    if policy != "other":
        try:
            os.sched_setscheduler(0, POLICY[policy],
                                  os.sched_param(RR_PRIORITY if policy == "rr" else 0))
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


# --- the skeleton ----------------------------------------------------------------------------

R = TypeVar("R", covariant=True)     # a Service[Coroutine] is a Service[Awaitable]
Life = Coroutine[Any, Any, None]


@dataclass(frozen=True)
class Spec:
    """Who a child is (the arguments of start())."""

    name: str                           # "broker-fast": the process title, the log lines' proc
    signals: Mapping[int, Action]       # ACCEPTOR_SIGNALS or LANE_SIGNALS
    nice: int = 0                       # > 0: a lower CPU priority
    policy: str = "other"               # the scheduling policy (POLICY)


def lane_spec(cfg: Config, lane: str, name: str, dedicated: bool = False) -> Spec:
    """A lane's broker or worker: LANE_SIGNALS, lanes.<lane>.nice and .sched_policy; a worker
    dedicated to the self-proven tier yields more (tiers.self_proven_nice); the fast broker and
    the other fast workers serve the operator's tiers: tiers.operator_policy, unless "other"."""
    lc = getattr(cfg.lanes, lane)
    nice = max(lc.nice, cfg.tiers.self_proven_nice) if dedicated else lc.nice
    return Spec(name, LANE_SIGNALS, nice, operator_policy(cfg, lc.sched_policy)
                if lane == "fast" and not dedicated else lc.sched_policy)


def operator_policy(cfg: Config, otherwise: str = "other") -> str:
    """The scheduling policy of a process that serves the operator's tiers (a fast acceptor,
    the fast broker, a fast worker not dedicated to the self-proven tier)."""
    return otherwise if cfg.tiers.operator_policy == "other" else cfg.tiers.operator_policy


ZmqContext = TypeVar("ZmqContext", bound="zmq.Context[Any]")


def quiet_io_threads(ctx: ZmqContext) -> ZmqContext:
    """`ctx`, before its first socket. In a process that yields the cores (nice > 0 under
    SCHED_OTHER: the acceptors that own the listeners, bulk's broker and workers, the
    self-proven tier's worker) its ZeroMQ I/O threads run as SCHED_BATCH: a wake-up of one
    (every message sent or received) then never preempts what runs, the process's own loop
    included; it runs when a core is next free, several messages at a time (issue 20: about
    a tenth more messages a second, one per connection). A process at full priority, or one
    already at another policy, keeps zmq's default (libzmq aborts on a policy its thread may
    not take: an RR thread's priority is no SCHED_BATCH one)."""
    if os.sched_getscheduler(0) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, 0) > 0:
        ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
    return ctx


@dataclass(frozen=True)
class Service(Generic[R]):
    """What a child runs: Service[None] for main(), Service[Awaitable[object]] for main_loop()."""

    serve: Callable[[], R]              # the life until stop(), the drain included
    stop: Callable[[], None]            # a stop order: set a flag or an event, nothing more
    started: Callable[[], None] | None = None   # its start line, once it is set up
    stopped: Callable[[], None] | None = None   # its exit line, once serve returned
    connections: Callable[[], int] | None = None   # an event-loop child's: what it holds open


# The heap of an event-loop child. An acceptor holding 10,000 silent bots has 250,000 objects, and
# CPython runs a full collection whenever its long-lived objects grow by a quarter: measured, it
# stopped the acceptor, and every session it serves, for 130-350 ms, six times while 20,000
# bots connected. Its sessions and lobby seats end without reference cycles (reference counting
# frees them: ingress.edge.smtp, ingress.edge.lobby; tests/integration/test_heap.py), so a full
# collection finds next to nothing there. The young generations are collected as usual; the
# oldest only by keep_heap: when the child is quiet, and at the latest every FULL_LATEST.
HEAP_CHECK = 30.0           # seconds between keep_heap's looks
FULL_QUIET = 600.0          # a full collection when quiet, at most this often
FULL_LATEST = 3600.0        # and at the latest this long after the last one, quiet or not
QUIET_CONNECTIONS = 500     # quiet: at most this many connections open (a pause of a few ms)
_NO_AUTOMATIC_FULL = 2**31 - 1   # the oldest generation's threshold (a C int): never reached


def full_collection_due(since: float, connections: int) -> bool:
    """Is a full collection due, `since` seconds after the last one, with `connections`
    open? (Pure: its cost is the heap's size, which the connections make.)"""
    return since >= FULL_LATEST or (since >= FULL_QUIET and connections <= QUIET_CONNECTIONS)


async def keep_heap(connections: Callable[[], int]) -> None:
    """An event-loop child's full collections (full_collection_due), each logged."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(HEAP_CHECK)
        open_now = connections()
        if full_collection_due(time.monotonic() - last, open_now):
            started = time.perf_counter()
            found = gc.collect()
            last = time.monotonic()
            log.event("heap_collected", ms=round((time.perf_counter() - started) * 1000, 1),
                      found=found, connections=open_now)


def _heap_line(base: list[dict[str, int]]) -> None:
    """The exit line "heap": the collections of each generation since settle_heap, and the
    objects found in reference cycles since (garbage that reference counting left), a last
    full collection's included."""
    ran = [n["collections"] - b["collections"]
           for n, b in zip(gc.get_stats(), base, strict=True)]
    gc.collect()
    found = sum(n["collected"] - b["collected"] for n, b in zip(gc.get_stats(), base, strict=True))
    log.event("heap", collections=ran, found=found, frozen=gc.get_freeze_count())


def settle_heap(loop: bool = False) -> None:
    """Once set up: collect the start-up garbage, then move every object left (modules, classes,
    functions, the config, the tables made at setup: 35,000-55,000 of them in a worker or an
    acceptor) to the collector's permanent generation (gc.freeze). A full collection then
    scans only what the child allocated since, instead of all of it each time: measured, a
    full collection of an acceptor's start-up heap took 8-9 ms idle and up to 48 ms on the
    loaded cores of a flood (a fast acceptor, a fast worker 26-35 ms), the whole process
    stopped meanwhile, every session it serves with it. Frozen objects are still freed when
    their reference count drops; only a reference cycle among them is never collected."""
    gc.collect()
    gc.freeze()
    if loop:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _NO_AUTOMATIC_FULL)


def _hook(hook: Callable[[], None] | None) -> None:
    if hook is not None:
        hook()


def main(cfg: Config, spec: Spec, setup: Callable[[Signals], Service[None]]) -> None:
    """A child with its own blocking loop (a lane broker or worker): it beats its heartbeat and
    checks for its parent's death itself, and returns once stop() was called and it drained."""
    sig = start(cfg, spec.name, spec.signals, spec.nice, spec.policy)
    service = setup(sig)
    settle_heap()
    sig.on_stop(service.stop)
    _hook(service.started)
    service.serve()
    _hook(service.stopped)


def run_uvloop(life: Life) -> None:
    """`life` on uvloop (on asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:     # pragma: no cover - uvloop is a hard dependency; keep serving anyway
        asyncio.run(life)
        return
    uvloop.run(life)


def run_asyncio(life: Life) -> None:
    """`life` on asyncio's own event loop."""
    asyncio.run(life)


def main_loop(cfg: Config, spec: Spec,
              setup: Callable[[Signals], Awaitable[Service[Awaitable[object]]]],
              hb: Any = None, slot: int = 0,
              runner: Callable[[Life], None] = run_uvloop) -> None:
    """A child on an event loop (an acceptor, the relay): the skeleton writes its heartbeat slot
    from a task of that loop (so a hung loop stops heartbeating) and turns its parent's death
    into service.stop()."""
    sig = start(cfg, spec.name, spec.signals, spec.nice, spec.policy)

    async def life() -> None:
        sig.install_loop(asyncio.get_running_loop())
        service = await setup(sig)
        settle_heap(loop=True)
        base = gc.get_stats()
        sig.on_stop(service.stop)
        tasks = [asyncio.create_task(Heartbeat(hb, slot).run(heartbeat_period(cfg), service.stop)),
                 asyncio.create_task(keep_heap(service.connections or (lambda: 0)))]
        _hook(service.started)
        try:
            await service.serve()
        finally:
            for task in tasks:
                task.cancel()
        _hook(service.stopped)
        _heap_line(base)

    runner(life())
