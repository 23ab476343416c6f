"""Supervisor: starts, watches, restarts, reloads and drains every other process.

API: Supervisor(cfg, config_path, role=None).run() -> int (exit status)
     acceptor_slots(cfg) -> (max_connections, fast_reserve)  each acceptor's, for the metrics
     prepare_state_dir(path), sd_notify(msg)
The supervisor's parts, one job a module: children.py (the child table: which children, their
heartbeat slots, the restart policy), listeners.py (the listening sockets it binds and keeps,
and the kernel's steering among them). This module: the entry point of each child (_target,
by module name), the start in stages, the main loop, signals, reload and drain.

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
The supervisor binds one SO_REUSEPORT listening socket per listen address per acceptor slot and
hands that slot's sockets to its acceptor; a replacement acceptor (restart, reload) gets the
same sockets, so no connection waiting in a backlog is reset (listeners.py). A listener that
cannot be bound stops the start with one line naming the cause (listeners.BindError).

State dir: spool.state_dir and its run/ are created 0750 when missing; a start with either not
owned by the running user, or writable by group or others, is refused (OSError: one line
naming the dir): run/ holds the hand-off socket that receives every fast client's connection.

Watching: each child writes time.monotonic() into its slot of a shared heartbeat array; one
that exits is restarted after a backoff, one whose heartbeat is older than heartbeat_timeout is
hung (SIGKILL, then restarted), a crash loop is throttled (children.py). A reload that needs
more heartbeat slots than are free is refused like an invalid file.

Signals only set flags; the main loop acts on them. Children are told to stop with SIGUSR2 and
ignore SIGINT (and brokers and workers SIGTERM; the tables are in ingress.core.child, the
skeleton every child runs on), so a signal sent to the whole process group (^C,
`timeout`, systemd's KillMode=control-group) still drains in order:
    SIGTERM/SIGINT  drain: acceptors stop accepting and finish sessions within smtp.drain_grace,
                    then brokers and workers stop; exit 0.
    SIGHUP          reload: the file is re-read and validated (an invalid file is logged and the
                    running config kept); new acceptors and workers start one at a time beside
                    the old ones, and each old one drains once its successor is up, so no
                    connection is refused and a start-up's CPU never comes eight at once.
                    Brokers are replaced only when their lane settings changed.
systemd: READY=1 once every child is up, RELOADING=1/READY=1 around a reload, STOPPING=1 on
drain, WATCHDOG=1 from the main loop when WATCHDOG_USEC is set.

Failure modes: the start raises OSError (one line for the operator) for a state dir that is not
private, one in use by another instance (supervisor.lock), or a listener that cannot be bound;
children not ready within 60 s are logged (not_ready) and the start goes on. A reload whose
file is invalid or does not fit the heartbeat slots is logged (reload_failed) and the running
config kept; settings that need a restart (listen, spool, the acceptor counts, the mTLS port)
are kept from the running config (reload_restart_needed).
Limits: one instance per state dir; a reload waits up to 30 s for its new children; the drain
waits smtp.drain_grace + 10 s for the acceptors and 10 s for the rest, then kills them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

from ingress.core import config as config_mod
from ingress.core import log, metrics_server, reuseport
from ingress.core.config import Config, ConfigError
from ingress.core.derived import configured_limit, raised_nofile, steer_known, steer_listed
from ingress.core.fsutil import private_dir_problem
from ingress.core.steer_table import SteerTable
from ingress.tools.children import Child, ChildTable, heartbeat_slots, wanted
from ingress.tools.listeners import Listeners, listen_sets, with_bound
from workers.spool.collector import SpoolCollector

TICK = 0.05
STEER_EXPIRY_CHECK = 1.0     # seconds between reads of the steer table when nothing changed
RELOAD_READY = 30.0  # seconds a reload waits, in all, for its new children to be ready


def acceptor_slots(cfg: Config) -> tuple[int, int]:
    """(max_connections, fast_reserve) each acceptor derives (derived.configured_limit) under
    the fd limit it will run with: the hard RLIMIT_NOFILE it raises its soft one to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lim = configured_limit(cfg, raised_nofile(soft, hard))
    return lim.max_connections, lim.fast_reserve


def _entry(module: str, name: str = "run") -> Any:
    """A child's entry point, by module name: the supervisor imports no child's code itself
    (the acceptor side and the lane side stay apart; see the import-linter contract)."""
    return getattr(importlib.import_module(module), name)


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


class Supervisor:
    def __init__(self, cfg: Config, config_path: Path | None, role: str | None = None) -> None:
        self.role = role              # `run --role`: overrides cluster.role, also on reload
        self.cfg = cfg if role is None else config_mod.with_role(cfg, role)
        self.config_path = config_path
        self.table = ChildTable(heartbeat_slots(cfg), self._target)
        # dnswl.steer: the addresses the acceptors learned to steer, a region per child slot
        # (its size is the start's: dnswl.steer_max changes with a restart)
        self.steer = SteerTable.create(self.table.mp, heartbeat_slots(cfg), cfg.dnswl.steer_max)
        self.seen: dict[str, tuple[int, float]] = {}    # per table: generation, when read
        # the client addresses the mTLS acceptors verified (derived.steer_known), the same way
        self.known = SteerTable.create(self.table.mp, heartbeat_slots(cfg),
                                       reuseport.MAX_NETWORKS)
        self.listeners = Listeners()
        self.configured = listen_sets(cfg)      # as in the file (port 0 = any), for reloads
        self.flags: set[str] = set()
        self.watchdog = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        self.next_watchdog = 0.0
        self.metrics_server: metrics_server.MetricsServer | None = None

    # --- child management ---------------------------------------------------------------------

    def _target(self, c: Child) -> tuple[Any, tuple[Any, ...]]:
        """The entry point and arguments of child `c` (ChildTable.start calls it)."""
        hb, ls = self.table.hb, self.listeners
        st = self.steer
        steer = (st.array, st.regions, st.per_region) if steer_listed(c.cfg) else None
        # With fast acceptors, the mutual-TLS port and the fast port (clients that prove
        # themselves at connect or at the handshake) are theirs, not the port-25 acceptors'.
        # With mTLS acceptors (supervisor.mtls_acceptors), the mutual-TLS port is theirs alone:
        # strangers' handshakes never run on a fast acceptor's event loop.
        to_fast = c.cfg.supervisor.fast_acceptors > 0
        own_mtls = c.cfg.mtls_acceptor_count > 0
        if c.kind == "acceptor" and c.key[1] == "mtls":
            i = c.key[2]
            known = self.known
            return _entry("ingress.edge.acceptor", "run_mtls"), (
                c.cfg, i, hb, c.slot, ls.mtls_sockets[i],
                (known.array, known.regions, known.per_region)
                if ls.mtls_steered_sockets and steer_known(c.cfg) else None)
        if c.kind == "acceptor" and c.key[1] == "fast":
            i = c.key[2]
            mtls = ls.mtls_sockets[i] if ls.mtls_sockets and to_fast and not own_mtls \
                else None
            if i < len(ls.mtls_steered_sockets):   # the verified clients the kernel steers
                mtls = ls.mtls_steered_sockets[i]
            fast = ls.fast_sockets[i] if ls.fast_sockets and to_fast else None
            steered = ls.steered_sockets[i] if i < len(ls.steered_sockets) else None
            return _entry("ingress.edge.acceptor", "run_fast"), (c.cfg, i, hb, c.slot,
                                                            mtls, fast, steered, steer)
        if c.kind == "acceptor":
            i = c.key[1]
            mtls = ls.mtls_sockets[i] if ls.mtls_sockets and not to_fast else None
            fast = ls.fast_sockets[i] if ls.fast_sockets and not to_fast else None
            return _entry("ingress.edge.acceptor"), (c.cfg, i, ls.sockets[i], hb, c.slot,
                                                mtls, fast, steer)
        if c.kind == "relay":
            return _entry("workers.relay"), (c.cfg, hb, c.slot)
        if c.kind == "broker":
            return _entry("workers.lane.broker"), (c.cfg, c.key[1], hb, c.slot)
        return _entry("workers.lane.worker"), (c.cfg, c.key[1], c.key[2], hb, c.slot, *c.key[3:])

    def _wait_ready(self, kids: list[Child], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.table.ready(c) for c in kids):
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
        for c in list(self.table.children):
            self.table.watch(c, now, self.cfg.supervisor)
        if self.listeners.steered or self.listeners.mtls_steered_sockets:
            self._watch_steering()

    def _watch_steering(self) -> None:
        """Steer the operator's networks (and the mutual-TLS port's verified clients) to the
        fast acceptors only while every one of them is up: one that died (or is being
        replaced) would leave them in a backlog nobody reads; meanwhile the port-25 acceptors
        take them and hand them over, or serve them (the mTLS acceptors, theirs)."""
        # each fast acceptor slot served by a ready child that is not draining (during a
        # reload the old one serves until its replacement is ready: both accept on the slot's
        # socket, so steering stays on)
        up = {c.key[2] for c in self.table.children if c.kind == "acceptor"
              and c.key[1] == "fast" and not c.retiring and self.table.ready(c)}
        on = len(up) == self.cfg.supervisor.fast_acceptors
        if self.listeners.steered:
            self.listeners.set_steering(self.cfg, on, self._learned())
        if self.listeners.mtls_steered_sockets:       # (a reload may turn it off)
            self.listeners.steer_known(self.cfg, on and steer_known(self.cfg), self._known())

    def _known(self) -> dict[int, list[str]]:
        """The client addresses the mTLS acceptors verified (derived.steer_known)."""
        return self._live("known", self.known, self.listeners.known)

    def _learned(self) -> dict[int, list[str]]:
        """The addresses the acceptors learned to steer (dnswl.steer)."""
        if not steer_listed(self.cfg):
            return {}
        return self._live("steer", self.steer, self.listeners.learned)

    def _live(self, name: str, table: SteerTable,
              held: dict[int, list[str]]) -> dict[int, list[str]]:
        """A steer table's live addresses, read again when one was written and every
        STEER_EXPIRY_CHECK seconds for those that ended; else `held` (what was read last)."""
        now, (gen, when) = time.monotonic(), self.seen.get(name, (-1, 0.0))
        g = table.generation()
        if g == gen and now - when < STEER_EXPIRY_CHECK:
            return held
        self.seen[name] = (g, now)
        return table.live(now, reuseport.MAX_NETWORKS)

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

    def start(self) -> None:
        Path(self.cfg.spool.path).mkdir(parents=True, exist_ok=True)
        prepare_state_dir(self.cfg.spool.state_dir)
        self._lock_state_dir()
        if self.cfg.cluster.role != "lanes":
            self.cfg = self.listeners.bind(self.cfg)
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
            kids = [self.table.new(kind, key, self.cfg)
                    for kind, key in wanted(self.cfg) if kind in stage]
            ok = self._wait_ready(kids, 60.0) and ok
        log.event("ready" if ok else "not_ready", "info" if ok else "error",
                  listen=self.cfg.listen.addresses[0] if self.listeners.sockets
                  else self.cfg.cluster.lanes_bind, role=self.cfg.cluster.role,
                  listen_addresses=self.cfg.listen.addresses if self.listeners.sockets else (),
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
        acceptors = [c for c in self.table.children if c.kind == "acceptor"]
        for c in acceptors:
            self.table.retire(c, grace + 5.0)
        self._wait_gone(acceptors, grace + 10.0)
        rest = [c for c in self.table.children if c.kind != "acceptor"]
        for c in rest:
            self.table.retire(c, 5.0)
        self._wait_gone(rest, 10.0)
        self.listeners.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.event("stopped")
        return 0

    def _wait_gone(self, kids: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(c in self.table.children for c in kids) and time.monotonic() < deadline:
            self._watch()
            time.sleep(TICK)
        for c in kids:
            if c in self.table.children and c.proc is not None:
                c.proc.kill()
                c.proc.join(2.0)
                self.table.reap(c)

    def _replace_children(self, new: Config, old: Config) -> tuple[bool, int, int]:
        """A reload's children, replaced: (all ready in time, replaced, started)."""
        current = [c for c in self.table.children if not c.retiring]
        brokers_changed = new.lanes != old.lanes or new.cluster != old.cluster
        replace = [c for c in current if c.kind != "broker" or brokers_changed]
        for c in [c for c in replace if c.kind == "broker"]:
            self.table.retire(c, 3.0)
            self._wait_gone([c], 5.0)
        # One at a time (a rolling reload): each new child is started, then its predecessor
        # (same key) retired once the new one is ready. A child's start-up (its imports: ~0.6 s
        # of CPU) then competes with the running lanes alone, never eight at once on a loaded
        # host. Within RELOAD_READY in all; past it the rest start without waiting.
        deadline = time.monotonic() + RELOAD_READY
        ok, started = True, 0
        for kind, key in wanted(new):
            if kind == "broker" and not brokers_changed:
                continue
            fresh = self.table.new(kind, key, new)
            started += 1
            ok = self._wait_ready([fresh], max(0.0, deadline - time.monotonic())) and ok
            for c in replace:
                if c.kind != "broker" and c.key == key:
                    self.table.retire(c, new.smtp.drain_grace + 5.0, replaced=True)
        for c in replace:                  # children the new config no longer wants
            if c.kind != "broker" and not c.retiring:
                self.table.retire(c, new.smtp.drain_grace + 5.0, replaced=True)
        return ok, len(replace), started

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
        if not self.table.fits(new):
            log.event("reload_failed", "error",
                      error=f"{new.source}: the new config runs {new.child_count} processes; "
                            f"only {len(self.table.free_slots)} heartbeat slots are free beside "
                            "the running ones (a reload still draining, or more workers or "
                            "acceptors than at start): restart to apply it")
            sd_notify("READY=1")
            return
        self.cfg = new
        self.listeners.steering = None     # the new allow list, at the next _watch
        metrics_server.configured(new, acceptor_slots(new))
        ok, replaced, started = self._replace_children(new, old)
        log.event("reloaded" if ok else "reload_slow", "info" if ok else "warning",
                  replaced=replaced, started=started)
        sd_notify("READY=1")
