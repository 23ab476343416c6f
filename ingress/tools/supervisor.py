"""Supervisor: starts, watches, restarts, reloads and drains every other process.

API: Supervisor(cfg, config_path).run() -> int (exit status)

Children (multiprocessing, *spawn* start method; no event loop or zmq.Context exists in this
process): one broker per lane, `lanes.<lane>.workers` workers per lane, the relay (only with a
relay.downstream), `acceptors` acceptors, supervisor.fast_acceptors fast acceptors (no
port-25 socket: they serve the connections the acceptors hand them, ingress.edge.handoff), and,
with fast acceptors and a mutual-TLS port, supervisor.mtls_acceptors mTLS acceptors, which
serve that port alone (strangers' handshakes run on their event loop, not on the one that
serves port 25's operator clients).
cluster.role (or `run --role`, which overrides it, on reload too) picks among them: "edge"
starts only the acceptors, "lanes" all but the acceptors (and binds no listening socket),
"all" every one.
The supervisor binds one SO_REUSEPORT listening socket per listen address (listen.addresses,
listen.fast_addresses, tls.mtls_addresses: e.g. "0.0.0.0:25" and "[::]:25", the IPv6 one
V6ONLY) per acceptor slot and hands that slot's sockets to its acceptor, which serves them all.
A replacement acceptor (restart, reload) gets the same sockets. Because a socket outlives its
acceptor, restarting or replacing an acceptor never closes a listening socket, so connections
waiting in its backlog are never reset (plain SO_REUSEPORT would reset them unless
net.ipv4.tcp_migrate_req=1). A listener that cannot be bound stops the start with one line
naming the cause from the errno (bind_error_message: in use; a port below 1024 without
CAP_NET_BIND_SERVICE; an address this host does not have).

State dir: spool.state_dir and its run/ are created 0750 when missing; a start with either not
owned by the running user, or writable by group or others, is refused (OSError: one line
naming the dir): run/ holds the hand-off socket that receives every fast client's connection.

Watching: each child writes time.monotonic() into its slot of a shared array from its own main
loop. The array has heartbeat_slots(cfg) slots (every child twice, for the overlap of a reload,
plus a margin); a reload that needs more than are free is refused like an invalid file.
A child that exits is restarted after a backoff (restart_backoff doubling to
restart_backoff_max while it keeps crashing young); more than crash_limit restarts within
crash_window is a crash loop: logged, restarts throttled to the maximum backoff. A child whose
heartbeat is older than heartbeat_timeout is hung: SIGKILL, then restarted.

Signals only set flags; the main loop acts on them. Children are told to stop with SIGUSR2 and
ignore SIGINT (and brokers and workers SIGTERM; the tables are in ingress.core.child, the
skeleton every child runs on), so a signal sent to the whole process group (^C,
`timeout`, systemd's KillMode=control-group) still drains in order:
    SIGTERM/SIGINT  drain: acceptors stop accepting and finish sessions within smtp.drain_grace,
                    then brokers and workers stop; exit 0.
    SIGHUP          reload: the file is re-read and validated (an invalid file is logged and the
                    running config kept); new acceptors and workers start beside the old ones and
                    the old ones drain only once the new ones are up, so no connection is refused.
                    Brokers are replaced only when their lane settings changed.
systemd: READY=1 once every child is up, RELOADING=1/READY=1 around a reload, STOPPING=1 on
drain, WATCHDOG=1 from the main loop when WATCHDOG_USEC is set.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import importlib
import multiprocessing as mp
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

from ingress.core import child, log, metrics_server, reuseport
from ingress.core import config as config_mod
from ingress.core.config import Config, ConfigError, format_listen_address, parse_listen_address
from ingress.core.derived import configured_limit, raised_nofile
from ingress.core.fsutil import private_dir_problem
from workers.spool.collector import SpoolCollector

TICK = 0.05
HB_MARGIN = 16       # heartbeat slots beyond two per child (a reload runs old and new side by side)


def acceptor_slots(cfg: Config) -> tuple[int, int]:
    """(max_connections, fast_reserve) each acceptor derives (derived.configured_limit) under
    the fd limit it will run with: the hard RLIMIT_NOFILE it raises its soft one to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lim = configured_limit(cfg, raised_nofile(soft, hard))
    return lim.max_connections, lim.fast_reserve


def heartbeat_slots(cfg: Config) -> int:
    """Size of the shared heartbeat array: every child twice (during a reload the old ones
    drain beside their replacements), plus a margin. A reload that needs more is refused
    (Supervisor.reload_fits) and waits for a restart."""
    return 2 * cfg.child_count + HB_MARGIN


def _entry(module: str, name: str = "run") -> Any:
    """A child's entry point, by module name: the supervisor imports no child's code itself
    (the acceptor side and the lane side stay apart; see the import-linter contract)."""
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass
class Child:
    kind: str                       # "acceptor" | "broker" | "worker"
    key: tuple[Any, ...]            # ("acceptor", i) / ("acceptor", "fast", i) (a fast
                                    # acceptor: ingress.edge.handoff) / ("broker", lane) /
                                    # ("worker", lane, i)
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


def sd_notify(msg: str, wait: float = 1.0) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    # Never block for long: a notify socket whose reader lags (its datagram queue is short)
    # must not stall the supervisor's loop. State changes wait up to `wait` seconds for room;
    # WATCHDOG=1 is sent with wait=0 (a dropped one is followed by the next).
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(wait if wait > 0 else 0.0)     # 0.0: non-blocking
        s.connect(addr)
        s.send(msg.encode())


def prepare_state_dir(state: Path) -> None:
    """spool.state_dir and its run/ (created 0750 when missing), refused (OSError, one line for
    the operator) unless each is owned by the user we run as and not writable by group or
    others: run/ holds the hand-off socket that receives every fast client's connection and the
    lanes' ipc sockets, so whoever can write there could plant a socket of their own."""
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    (state / "run").mkdir(exist_ok=True, mode=0o750)
    for d in (state, state / "run"):
        problem = private_dir_problem(os.stat(d), (os.geteuid(),))
        if problem:
            raise OSError(f"spool.state_dir: {d} {problem}: it holds the sockets that receive "
                          "every fast client's connection; make it owned by the service user "
                          "and not writable by group or others (chown, chmod go-w)")


class BindError(OSError):
    """A listening socket that cannot be bound: str() is the message for the operator (the
    errno is kept in .errno)."""

    def __str__(self) -> str:
        return self.strerror or ""


def bind_error_message(address: str, errno_: int | None, strerror: str | None = None) -> str:
    """Why `address` ("v4:port" / "[v6]:port") cannot be bound, from the errno: in use, a
    privileged port without the capability, an address this host does not have."""
    if errno_ == errno.EADDRINUSE:
        return f"{address} is already in use (another smtp-ingress or MTA?)"
    if errno_ in (errno.EACCES, errno.EPERM):
        return (f"{address}: permission denied: a port below 1024 needs the capability "
                "CAP_NET_BIND_SERVICE (AmbientCapabilities= in the systemd unit) or root; "
                "or listen on a port >= 1024")
    if errno_ == errno.EADDRNOTAVAIL:
        return (f"{address}: the address is not on this host (no interface has it: check "
                "listen.host / listen.addresses and `ip addr`)")
    if errno_ == errno.EAFNOSUPPORT:
        return f"{address}: this host has no IPv6 (or IPv4) support for that address"
    return f"{address}: cannot bind: {strerror or 'error'}" + \
        (f" (errno {errno_})" if errno_ else "")


def bind_failure(host: str, port: int, e: OSError) -> BindError:
    return BindError(e.errno, bind_error_message(format_listen_address(host, port), e.errno,
                                                 e.strerror))


def port_taken(family: int, host: str, port: int) -> OSError | None:
    """SO_REUSEPORT would let a second instance (same user) share a port with the first, the
    kernel splitting the clients between two spools. A plain bind tells whether anyone
    listens there already: None when free, else the bind's error (EADDRINUSE, or EACCES,
    EADDRNOTAVAIL, ...: the real cause, for the message)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e
    return None


def bind_listener(cfg: Config, host: str, port: int, first: bool = False) -> socket.socket:
    """One SO_REUSEPORT listening socket on host:port; `first` refuses a port someone already
    listens on. An IPv6 socket is V6ONLY, so "0.0.0.0" and "[::]" on one port coexist (and a
    v4 client is never seen as ::ffff:a.b.c.d). BindError (naming the cause) when it fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if first and port:
        taken = port_taken(family, host, port)
        if taken is not None:
            raise bind_failure(host, port, taken)
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise bind_failure(host, port, e) from None
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(cfg.listen.backlog)
    except OSError as e:
        s.close()
        raise bind_failure(host, port, e) from None
    return s


def steer_networks(cfg: Config, host: str) -> list[reuseport.Network]:
    """classify.allow_cidrs of the family of listen address `host` (what the kernel steers
    to the fast acceptors there: listen.steer_operator)."""
    version = 6 if ":" in host else 4
    return [n for n in cfg.allow_networks if n.version == version]


PORT_PICK_TRIES = 20     # port 0 on several addresses: attempts to find one port free on all


def bind_addresses(cfg: Config, addresses: tuple[str, ...], count: int
                   ) -> tuple[list[list[socket.socket]], tuple[str, ...]]:
    """`count` sets (one per acceptor slot) of one SO_REUSEPORT socket per address, and the
    addresses as bound. Port 0 (tests): the addresses with port 0 share one free port (the
    first picks it; if another address has it taken, all are closed and a new one is tried)."""
    for attempt in range(PORT_PICK_TRIES):
        firsts: list[socket.socket] = []
        bound: list[str] = []
        shared = 0
        try:
            for a in addresses:
                host, port = parse_listen_address(a)
                pick = port == 0
                s = bind_listener(cfg, host, shared if pick else port, first=True)
                firsts.append(s)
                if pick and not shared:
                    shared = s.getsockname()[1]
                bound.append(format_listen_address(host, s.getsockname()[1]))
        except OSError:
            for s in firsts:
                s.close()
            if shared and attempt + 1 < PORT_PICK_TRIES:
                continue                 # the picked port is taken on another address
            raise
        break
    slots = [firsts]
    for _ in range(count - 1):
        slots.append([bind_listener(cfg, *parse_listen_address(a)) for a in bound])
    return slots, tuple(bound)


def with_bound(cfg: Config, main: tuple[str, ...], fast: tuple[str, ...],
               mtls: tuple[str, ...]) -> Config:
    """The config with its listen sets replaced by the addresses as bound (port 0 -> the real
    port); listen.host/port, listen.fast_port, tls.mtls_port mirror each set's first entry."""
    host, port = parse_listen_address(main[0])
    return dataclasses.replace(
        cfg,
        listen=dataclasses.replace(
            cfg.listen, addresses=main, host=host, port=port, fast_addresses=fast,
            fast_port=parse_listen_address(fast[0])[1] if fast else -1),
        tls=dataclasses.replace(
            cfg.tls, mtls_addresses=mtls,
            mtls_port=parse_listen_address(mtls[0])[1] if mtls else -1))


def listen_sets(cfg: Config) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    return cfg.listen.addresses, cfg.listen.fast_addresses, cfg.tls.mtls_addresses


class Supervisor:
    def __init__(self, cfg: Config, config_path: Path | None, role: str | None = None) -> None:
        self.role = role              # `run --role`: overrides cluster.role, also on reload
        self.cfg = cfg if role is None else config_mod.with_role(cfg, role)
        self.config_path = config_path
        self.mp = mp.get_context("spawn")
        slots = heartbeat_slots(cfg)
        self.hb = self.mp.RawArray("d", slots)
        self.free_slots = list(range(slots - 1, -1, -1))
        self.children: list[Child] = []
        # Per acceptor slot, one socket per listen address (listen.addresses, ...).
        self.sockets: list[list[socket.socket]] = []
        self.mtls_sockets: list[list[socket.socket]] = []
        self.fast_sockets: list[list[socket.socket]] = []
        # Per fast acceptor slot, its own socket in port 25's groups that the kernel steers the
        # operator's networks to (ingress.core.reuseport), for the addresses in self.steered.
        self.steered_sockets: list[list[socket.socket]] = []
        self.steered: list[int] = []      # indexes into the listen addresses
        self.steering: bool | None = None  # the programs attached send the operator's
                                           # networks to the fast acceptors (None: unknown)
        self.configured = listen_sets(cfg)      # as in the file (port 0 = any), for reloads
        self.flags: set[str] = set()
        self.watchdog = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        self.next_watchdog = 0.0
        self.metrics_server: metrics_server.MetricsServer | None = None

    # --- child management ---------------------------------------------------------------------

    def _target(self, c: Child) -> tuple[Any, tuple[Any, ...]]:
        # With fast acceptors, the mutual-TLS port and the fast port (clients that prove
        # themselves at connect or at the handshake) are theirs, not the port-25 acceptors'.
        # With mTLS acceptors (supervisor.mtls_acceptors), the mutual-TLS port is theirs alone:
        # strangers' handshakes never run on a fast acceptor's event loop.
        to_fast = c.cfg.supervisor.fast_acceptors > 0
        own_mtls = c.cfg.mtls_acceptor_count > 0
        if c.kind == "acceptor" and c.key[1] == "mtls":
            i = c.key[2]
            return _entry("ingress.edge.acceptor", "run_mtls"), (c.cfg, i, self.hb, c.slot,
                                                            self.mtls_sockets[i])
        if c.kind == "acceptor" and c.key[1] == "fast":
            i = c.key[2]
            mtls = self.mtls_sockets[i] if self.mtls_sockets and to_fast and not own_mtls \
                else None
            fast = self.fast_sockets[i] if self.fast_sockets and to_fast else None
            steered = self.steered_sockets[i] if i < len(self.steered_sockets) else None
            return _entry("ingress.edge.acceptor", "run_fast"), (c.cfg, i, self.hb, c.slot,
                                                            mtls, fast, steered)
        if c.kind == "acceptor":
            i = c.key[1]
            mtls = self.mtls_sockets[i] if self.mtls_sockets and not to_fast else None
            fast = self.fast_sockets[i] if self.fast_sockets and not to_fast else None
            return _entry("ingress.edge.acceptor"), (c.cfg, i, self.sockets[i], self.hb, c.slot,
                                                mtls, fast)
        if c.kind == "relay":
            return _entry("workers.relay"), (c.cfg, self.hb, c.slot)
        if c.kind == "broker":
            return _entry("workers.lane.broker"), (c.cfg, c.key[1], self.hb, c.slot)
        return _entry("workers.lane.worker"), (c.cfg, c.key[1], c.key[2], self.hb, c.slot)

    def _start(self, c: Child) -> None:
        target, args = self._target(c)
        self.hb[c.slot] = 0.0
        c.proc = self.mp.Process(target=target, args=args, name=f"smtp-ingress {c.key}",
                                 daemon=False)
        c.proc.start()
        c.started = time.monotonic()
        c.restart_at = None
        c.history.append(c.started)
        log.event("child_start", kind=c.kind, key=str(c.key[1:]), child_pid=c.proc.pid)

    def _new_child(self, kind: str, key: tuple[Any, ...], cfg: Config) -> Child:
        c = Child(kind=kind, key=key, cfg=cfg, slot=self.free_slots.pop())
        self.children.append(c)
        self._start(c)
        return c

    def _wanted(self, cfg: Config) -> list[tuple[str, tuple[Any, ...]]]:
        out: list[tuple[str, tuple[Any, ...]]] = []
        for lane in ("fast", "bulk"):
            out.append(("broker", ("broker", lane)))
            out += [("worker", ("worker", lane, i)) for i in range(cfg.worker_count(lane))]
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

    def _ready(self, c: Child) -> bool:
        return c.proc is not None and c.proc.is_alive() and self.hb[c.slot] >= c.started

    def _wait_ready(self, kids: list[Child], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ready(c) for c in kids):
                return True
            self._watch()
            time.sleep(TICK)
        return False

    def _watch(self) -> None:
        """One pass over the children; every wait loop (start, reload, drain) calls it, so the
        systemd watchdog is fed from here."""
        now = time.monotonic()
        if self.watchdog and now >= self.next_watchdog:
            sd_notify("WATCHDOG=1", wait=0)
            self.next_watchdog = now + self.watchdog / 2
        for c in list(self.children):
            self._watch_child(c, now)
        if self.steered:
            self._watch_steering()

    def _watch_steering(self) -> None:
        """Steer the operator's networks to the fast acceptors only while every one of them is
        up: one that died (or is being replaced) would leave them in a backlog nobody reads;
        meanwhile the port-25 acceptors take them and hand them over, or serve them."""
        # each fast acceptor slot served by a ready child that is not draining (during a
        # reload the old one serves until its replacement is ready: both accept on the slot's
        # socket, so steering stays on)
        up = {c.key[2] for c in self.children if c.kind == "acceptor" and c.key[1] == "fast"
              and not c.retiring and self._ready(c)}
        on = len(up) == self.cfg.supervisor.fast_acceptors
        if on == self.steering:
            return
        try:
            for j in self.steered:
                self._steer(j, self.cfg, on)
        except OSError as e:
            log.event("steer_unavailable", "warning", error=str(e))
            return
        self.steering = on
        log.event("steering", on=on)

    def _watch_child(self, c: Child, now: float) -> None:
        """A retiring child is reaped or killed at its deadline; a live one is checked for a
        hang; a dead one gets a restart time, and is started when that time comes."""
        alive = c.proc is not None and c.proc.is_alive()
        if c.retiring:
            self._watch_retiring(c, now, alive)
            return
        if alive and not self._kill_if_hung(c, now):
            return
        if c.restart_at is None:
            self._schedule_restart(c, now)
        elif now >= c.restart_at:
            self._start(c)

    def _watch_retiring(self, c: Child, now: float, alive: bool) -> None:
        if not alive:
            self._reap(c)
        elif c.proc is not None and c.kill_at is not None and now > c.kill_at:
            log.event("child_kill", "warning", kind=c.kind, key=str(c.key[1:]),
                      why="drain overran")
            c.proc.kill()
            c.kill_at = None

    def _kill_if_hung(self, c: Child, now: float) -> bool:
        """True if this live child's heartbeat is too old and it was killed (it is dead now);
        False if it is well (its failure count is cleared once it has outlived crash_window)."""
        sup = self.cfg.supervisor
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

    def _schedule_restart(self, c: Child, now: float) -> None:
        """A child has died: count the failure and set its restart time (exponential backoff,
        the maximum in a crash loop)."""
        sup = self.cfg.supervisor
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

    def reload_fits(self, new: Config) -> bool:
        """Are there free heartbeat slots for every child a reload to `new` starts? (Brokers
        are counted though they may be kept: the check must not depend on what changed.)"""
        return len(self._wanted(new)) <= len(self.free_slots)

    def _reap(self, c: Child) -> None:
        if c.proc is not None:
            c.proc.join(0)
            metrics_server.child_dead(c.proc.pid)
        self.children.remove(c)
        self.free_slots.append(c.slot)

    def _retire(self, c: Child, grace: float, replaced: bool = False) -> None:
        """Stop a child: SIGUSR2 (shut down), or SIGUSR1 for an acceptor `replaced` by a
        reload (it keeps serving the sessions it has)."""
        c.retiring = True
        c.kill_at = time.monotonic() + grace
        sig = child.RETIRE_SIGNAL if replaced and c.kind == "acceptor" else child.STOP_SIGNAL
        if c.proc is not None and c.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.proc.pid, sig)

    # --- life cycle ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self.flags.add("reload" if signum == signal.SIGHUP else "stop")

    def _lock_state_dir(self) -> None:
        """One instance per state dir: its ipc sockets, metrics files and learned cache."""
        path = self.cfg.spool.state_dir / "supervisor.lock"
        self.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(self.lock_fd, 32, 0).decode(errors="replace").strip()
            raise OSError(f"{self.cfg.spool.state_dir} is in use by another smtp-ingress "
                          f"(pid {other or '?'})") from None
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _bind_listeners(self) -> None:
        # Port 0 (tests): the first socket of an address picks a free port, the others share it.
        main, fast, mtls = listen_sets(self.cfg)
        n = self.cfg.acceptor_count
        self.sockets, main = bind_addresses(self.cfg, main, n)
        # the mTLS and fast ports are served by the fast acceptors when there are any (_target)
        nf = self.cfg.supervisor.fast_acceptors or n
        if mtls:
            self.mtls_sockets, mtls = bind_addresses(
                self.cfg, mtls, self.cfg.mtls_acceptor_count or nf)
        if fast:
            self.fast_sockets, fast = bind_addresses(self.cfg, fast, nf)
        self.cfg = with_bound(self.cfg, main, fast, mtls)
        self._bind_steered(main)

    def _bind_steered(self, main: tuple[str, ...]) -> None:
        """listen.steer_operator: one more socket per fast acceptor in each port-25 address's
        group whose family has allow-list networks, and the program that steers them there.
        Where the kernel refuses it, those sockets are closed (they leave the group: the
        others keep their indexes) and port 25 is served as without steering."""
        cfg = self.cfg
        nf = cfg.supervisor.fast_acceptors
        if not cfg.listen.steer_operator or nf <= 0 or cfg.listen.proxy_protocol:
            return
        per_slot: list[list[socket.socket]] = [[] for _ in range(nf)]
        for j, addr in enumerate(main):
            host, port = parse_listen_address(addr)
            if not steer_networks(cfg, host):
                continue
            extra = [bind_listener(cfg, host, port) for _ in range(nf)]
            try:
                self._steer(j, cfg, on=False)    # on once the fast acceptors are up (_watch)
            except OSError as e:
                for sock in extra:
                    sock.close()
                log.event("steer_unavailable", "warning", address=addr, error=str(e))
                continue
            self.steered.append(j)
            for slot, sock in zip(per_slot, extra, strict=True):
                slot.append(sock)
        if self.steered:
            self.steered_sockets = per_slot
            log.event("steer_operator", addresses=[main[j] for j in self.steered],
                      fast_acceptors=nf, networks=len(cfg.classify.allow_cidrs))

    def _steer(self, j: int, cfg: Config, on: bool) -> None:
        """(Re)attach the program of listen address `j`'s group for `cfg`'s allow list; `on`
        False: every client to the port-25 acceptors (then the operator's are handed over as
        without steering). More networks of its family than one program holds steer none."""
        sock = self.sockets[0][j]
        nets = steer_networks(cfg, sock.getsockname()[0]) if on else []
        prog = reuseport.program(nets, cfg.acceptor_count, cfg.supervisor.fast_acceptors)
        if prog is None:           # too many networks for one program
            log.event("steer_too_many", "warning", networks=len(nets),
                      max=reuseport.MAX_NETWORKS)
            prog = reuseport.program((), cfg.acceptor_count, cfg.supervisor.fast_acceptors)
        assert prog is not None
        reuseport.attach(sock, prog)

    def start(self) -> None:
        Path(self.cfg.spool.path).mkdir(parents=True, exist_ok=True)
        prepare_state_dir(self.cfg.spool.state_dir)
        self._lock_state_dir()
        if self.cfg.cluster.role != "lanes":
            self._bind_listeners()
        metrics_server.setup_dir(self.cfg.spool.state_dir)     # before any child is spawned
        self.metrics_server = metrics_server.serve(self.cfg.metrics.listen,
                                                   self.cfg.spool.state_dir,
                                                   SpoolCollector(self.cfg.spool.path))
        metrics_server.configured(self.cfg, acceptor_slots(self.cfg))
        # In stages, so that acceptors come up to lanes that already have workers (brokers and
        # workers start together: a worker's DEALER connects to its broker's socket whenever
        # that is bound, and announces itself then).
        ok = True
        for stage in (("broker", "worker"), ("relay",), ("acceptor",)):
            kids = [self._new_child(kind, key, self.cfg)
                    for kind, key in self._wanted(self.cfg) if kind in stage]
            ok = self._wait_ready(kids, 60.0) and ok
        log.event("ready" if ok else "not_ready", "info" if ok else "error",
                  listen=self.cfg.listen.addresses[0] if self.sockets
                  else self.cfg.cluster.lanes_bind, role=self.cfg.cluster.role,
                  listen_addresses=self.cfg.listen.addresses if self.sockets else (),
                  fast_addresses=self.cfg.listen.fast_addresses,
                  mtls_addresses=self.cfg.tls.mtls_addresses,
                  mtls_port=self.cfg.tls.mtls_port, fast_port=self.cfg.listen.fast_port,
                  acceptors=self.cfg.acceptor_count, spool=str(self.cfg.spool.path),
                  fast_workers=self.cfg.worker_count("fast"),
                  bulk_workers=self.cfg.worker_count("bulk"), config=self.cfg.source)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.start()
        while "stop" not in self.flags:
            if "reload" in self.flags:
                self.flags.discard("reload")
                self.reload()
            self._watch()
            time.sleep(TICK)
        return self.drain()

    def drain(self) -> int:
        sd_notify("STOPPING=1")
        grace = self.cfg.smtp.drain_grace
        log.event("draining", grace_s=grace)
        acceptors = [c for c in self.children if c.kind == "acceptor"]
        for c in acceptors:
            self._retire(c, grace + 5.0)
        self._wait_gone(acceptors, grace + 10.0)
        rest = [c for c in self.children if c.kind != "acceptor"]
        for c in rest:
            self._retire(c, 5.0)
        self._wait_gone(rest, 10.0)
        for slot in self.sockets + self.mtls_sockets + self.fast_sockets:
            for s in slot:
                s.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.event("stopped")
        return 0

    def _wait_gone(self, kids: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(c in self.children for c in kids) and time.monotonic() < deadline:
            self._watch()
            time.sleep(TICK)
        for c in kids:
            if c in self.children and c.proc is not None:
                c.proc.kill()
                c.proc.join(2.0)
                self._reap(c)

    def _keep_role(self, new: Config) -> Config:
        """A node keeps its role until a restart (the children it runs and the sockets it
        binds depend on it); ConfigError if the new [cluster] table does not fit that role."""
        role = self.cfg.cluster.role
        if new.cluster.role == role:
            return new
        log.event("reload_restart_needed", "warning",
                  why=f"cluster.role {new.cluster.role} takes effect on restart only")
        return config_mod.with_role(new, role)

    def reload(self) -> None:
        sd_notify("RELOADING=1")
        try:
            new = config_mod.load(self.config_path)
            new = new if self.role is None else config_mod.with_role(new, self.role)
            new = self._keep_role(new)
        except ConfigError as e:
            log.event("reload_failed", "error", error=str(e))
            sd_notify("READY=1")
            return
        old = self.cfg
        if listen_sets(new) == self.configured:     # port 0 means the one we already have
            new = with_bound(new, *listen_sets(old))
        if (new.listen, new.spool, new.acceptor_count, new.supervisor.fast_acceptors,
                new.mtls_acceptor_count, new.tls.mtls_port, new.tls.mtls_addresses) != (
                old.listen, old.spool, old.acceptor_count, old.supervisor.fast_acceptors,
                old.mtls_acceptor_count, old.tls.mtls_port, old.tls.mtls_addresses):
            # Changing these would mean closing listening sockets (resetting what is queued on
            # them) or moving the spool under running workers: they wait for a restart.
            log.event("reload_restart_needed", "warning",
                      why="listen, spool, supervisor.acceptors, fast_acceptors and "
                          "mtls_acceptors, tls.mtls_port and mtls_addresses take effect on "
                          "restart only")
            new = dataclasses.replace(
                new, listen=old.listen, spool=old.spool,
                tls=dataclasses.replace(new.tls, mtls_port=old.tls.mtls_port,
                                        mtls_addresses=old.tls.mtls_addresses),
                supervisor=dataclasses.replace(new.supervisor, acceptors=old.acceptor_count,
                                               fast_acceptors=old.supervisor.fast_acceptors,
                                               mtls_acceptors=old.supervisor.mtls_acceptors))
        if not self.reload_fits(new):
            log.event("reload_failed", "error",
                      error=f"{new.source}: the new config runs {new.child_count} processes; "
                            f"only {len(self.free_slots)} heartbeat slots are free beside the "
                            "running ones (a reload still draining, or more workers or "
                            "acceptors than at start): restart to apply it")
            sd_notify("READY=1")
            return
        self.cfg = new
        self.steering = None               # the new allow list, at the next _watch
        metrics_server.configured(new, acceptor_slots(new))
        current = [c for c in self.children if not c.retiring]
        brokers_changed = new.lanes != old.lanes or new.cluster != old.cluster
        replace = [c for c in current if c.kind != "broker" or brokers_changed]
        for c in [c for c in replace if c.kind == "broker"]:
            self._retire(c, 3.0)
            self._wait_gone([c], 5.0)
        fresh = [self._new_child(kind, key, new) for kind, key in self._wanted(new)
                 if kind != "broker" or brokers_changed]
        ok = self._wait_ready(fresh, 30.0)
        for c in replace:
            if c.kind != "broker":
                self._retire(c, new.smtp.drain_grace + 5.0, replaced=True)
        log.event("reloaded" if ok else "reload_slow", "info" if ok else "warning",
                  replaced=len(replace), started=len(fresh))
        sd_notify("READY=1")
