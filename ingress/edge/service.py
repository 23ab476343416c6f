"""An acceptor process's life: its listeners, its background tasks, its drain.

API:
    AcceptorService(cfg, index, sock, mtls_sock=None, fast_sock=None, handed=True, steered=None,
                    known=None)
        the service that ingress.core.child.main_loop runs (ingress.edge.acceptor's entry points
        build it): `await .setup(sig)` -> child.Service (its start line: acceptor_start),
        `await .serve()` until .stopped is set (a stop order, the parent's death), then the
        drain (its line: acceptor_drained) and the saves and closes; `sock` None: a fast
        acceptor, or with `handed` False an mTLS acceptor
    listeners(ctx, sock, mtls_sock, fast_sock, handed=True, steered=None, known=None)
        -> servers
        one server per listening socket (each a socket, a list of them or None)

Set-up: the fd limit is raised to what derived.fds_needed says (derived.configured_limit's
connections, FD_SPARE and SPF's DNS sockets); admission is capped at what the fd limit allows
(logged as connection_limit, with what limited it; nofile_too_low when it is below the need).
listen.port and listen.fast_port start each connection in the lobby (ingress.edge.lobby) unless
they are behind PROXY; the mutual-TLS port takes a slot at accept, before the TLS handshake
(ingress.edge.mtls).

Background tasks: the lane status (SUB: saturation, learned and unlearned networks, penalties,
deferral records), the lane clients' replies and broker watch, with [cluster] redis the shared
state, on port-25 acceptor 0 the learned cache's file (classify.learned_save_interval), with
smtp.verify_recipients the callout cache's file.

Stop (SIGUSR1 from the supervisor, retire after a reload): stop accepting and serve the sessions
already accepted until they end. SIGUSR2 or SIGTERM (shutdown): stop accepting (the listening
socket itself stays open in the supervisor, so nothing queued on it is reset), close idle
sessions with 421 4.3.2, let sessions inside DATA finish; in both cases what is left after
smtp.drain_grace gets 421 and is closed. Then the stores are saved (not the callout cache when
retiring: the replacement owns its file), the pools and sockets closed, exit 0.

Failure modes: a store that cannot be written is logged (learned_save_failed) or skipped at the
end; a handed-over socket whose client went is logged (handoff_session_failed). Limits:
smtp.drain_grace bounds the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ingress.core import child, log, procs
from ingress.core.config import Config
from ingress.core.derived import fds_needed
from ingress.core.fsutil import atomic_write
from ingress.edge import handoff, mtls
from ingress.edge.context import AcceptorContext
from ingress.edge.lobby import Lobby
from ingress.edge.smtp import IngressSMTP
from ingress.policy.replies import Refusal, text

Listening = socket.socket | Sequence[socket.socket] | None


class AcceptorService:
    """One acceptor process's life; `sock` None: a fast acceptor (its connections are handed to
    it by the others over ingress.edge.handoff, it has no port-25 socket), or with `handed`
    False an mTLS acceptor (the mutual-TLS port alone)."""

    def __init__(self, cfg: Config, index: int, sock: Listening, mtls_sock: Listening = None,
                 fast_sock: Listening = None, handed: bool = True,
                 steered: Listening = None,
                 steer: Callable[[str, float], None] | None = None,
                 known: Callable[[str, float], None] | None = None) -> None:
        self.cfg, self.index = cfg, index
        self.sock, self.mtls_sock, self.fast_sock = sock, mtls_sock, fast_sock
        self.handed, self.steered, self.steer = handed, steered, steer
        self.known = known
        self.servers: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def setup(self, sig: child.Signals) -> child.Service[Awaitable[None]]:
        """The context, the listeners and the background tasks (ingress.core.child.main_loop's
        setup; `sig`: whether a stop is a retire)."""
        cfg, index, sock = self.cfg, self.index, self.sock
        self.sig, self.stopped = sig, asyncio.Event()
        loop = asyncio.get_running_loop()
        needed = fds_needed(cfg)      # what config / memory allow, FD_SPARE, SPF's DNS sockets
        nofile, _ = procs.raise_nofile(needed)
        # Admission is capped at what the fd limit allows (derived.connection_limit): a client
        # beyond it gets 421 instead of libuv's silent accept-and-close on EMFILE.
        self.ctx = ctx = AcceptorContext(cfg, index, loop, nofile=nofile, fast=sock is None,
                                         mtls_only=not self.handed)
        ctx.steer_writer = self.steer
        limit = ctx.table.limit
        log.event("connection_limit", index=index, max_connections=limit.max_connections,
                  fast_reserve=limit.fast_reserve, limited_by=limit.limited_by, nofile=nofile,
                  configured=cfg.smtp.max_connections,
                  connection_memory=cfg.smtp.connection_memory)
        if nofile < needed:
            # An explicit smtp.max_connections the fd limit cannot hold is an error; the
            # automatic limit (0) adapts to it by design, so it is only worth a warning.
            log.event("nofile_too_low", "error" if cfg.smtp.max_connections else "warning",
                      limit=nofile, needed=needed,
                      max_connections_effective=ctx.table.admission.limits.max_connections,
                      hint="raise LimitNOFILE / ulimit -n, or lower smtp.max_connections")
        self.servers = await listeners(ctx, sock, self.mtls_sock, self.fast_sock, self.handed,
                                       self.steered, self.known)
        lanes = ctx.lanes
        self.tasks = [loop.create_task(t) for t in (
            lanes.read_status(ctx.learned_from_lane,
                              lambda ip: ctx.table.penalise(ip, time.monotonic()),
                              ctx.retries.on_record, on_unlearn=ctx.unlearned_from_lane),
            *(lc.read_replies() for lc in lanes.values()),
            *(lc.watch_broker() for lc in lanes.values()))]
        if index == 0 and sock is not None:     # one writer: port-25 acceptor 0
            self.tasks.append(loop.create_task(self.persist_learned()))
        if ctx.cluster is not None:
            self.tasks.append(loop.create_task(ctx.cluster.run()))
        self.saver = None if ctx.verify_store is None else loop.create_task(
            ctx.verify_store.run())
        return child.Service(self.serve, self.stopped.set, lambda: log.event(
            "acceptor_start", index=index, learned=len(ctx.learned_store.allow),
            tls=ctx.tls_context is not None, mtls=bool(cfg.tls.mtls_addresses),
            fast_port=bool(cfg.listen.fast_addresses), handed=sock is None,
            servers=len(self.servers)), connections=lambda: len(ctx.table.sessions))

    async def serve(self) -> None:
        """Until stopped; then the drain, the saves and the closes."""
        ctx = self.ctx
        await self.stopped.wait()
        retire = self.sig.retire
        if self.saver is not None:
            # retiring (a reload): the replacement owns the file now; shutting down: saved below
            self.saver.cancel()
        await self.drain(retire)
        for t in self.tasks:
            t.cancel()
        if ctx.verify_store is not None and not retire and ctx.verify_store.unsaved:
            ctx.verify_store.save()
        if self.index == 0 and self.sock is not None and ctx.learned_store.dirty:
            with contextlib.suppress(OSError):
                atomic_write(ctx.learned_store.path, ctx.learned_store.allow.to_json().encode())
        ctx.spf_service.shutdown()
        if ctx.cluster is not None:
            await ctx.cluster.close()
        ctx.lanes.close()
        if ctx.handoff is not None:
            ctx.handoff.close()

    async def persist_learned(self) -> None:
        """Acceptor 0 keeps the learned allow cache on disk (every acceptor learns the same
        entries over pub/sub and reads the file at start), so it survives restarts."""
        ctx = self.ctx
        while True:
            await asyncio.sleep(ctx.cfg.classify.learned_save_interval)
            data = ctx.learned_store.snapshot(time.time())
            if data is not None:
                try:
                    await ctx.loop.run_in_executor(
                        None, atomic_write, ctx.learned_store.path, data)
                except OSError as e:
                    log.event("learned_save_failed", "error", error=str(e))

    async def drain(self, retire: bool) -> None:
        """Stop accepting, then let the sessions go.

        retire (a reload: replacement acceptors already serve the same sockets): every session
        this process accepted is served as usual until it ends, up to smtp.drain_grace.
        shutdown: idle sessions are closed with 421 4.3.2 at once and a new transaction gets
        421; a message being received or acknowledged finishes first.
        In both cases what is left after drain_grace gets 421 and is closed."""
        ctx = self.ctx
        ctx.draining = not retire
        for server in self.servers:
            server.close()
        line = text(Refusal.SHUTTING_DOWN, host=ctx.cfg.smtp.hostname)
        deadline = time.monotonic() + ctx.cfg.smtp.drain_grace
        while ctx.table.sessions and time.monotonic() < deadline:
            if not retire:
                for proto in list(ctx.table.sessions):
                    proto.close_if_idle(line)
            await asyncio.sleep(0.05)
        for proto in list(ctx.table.sessions):
            proto.close_with(line)
        await asyncio.sleep(0.05)
        log.event("acceptor_drained", mode="retire" if retire else "shutdown",
                  left=len(ctx.table.sessions), **ctx.counters)


def _listening(socks: Listening) -> list[socket.socket]:
    """A listener's sockets (one per listen address) as a list, each non-blocking; None: []."""
    out = [] if socks is None else [socks] if isinstance(socks, socket.socket) else list(socks)
    for s in out:
        s.setblocking(False)
    return out


async def listeners(ctx: AcceptorContext, sock: Listening, mtls_sock: Listening,
                    fast_sock: Listening, handed: bool = True,
                    steered: Listening = None,
                    known: Callable[[str, float], None] | None = None) -> list[Any]:
    """What this acceptor serves: one server per listening socket, i.e. per listen address
    (e.g. 0.0.0.0 and [::]) of port 25, the mutual-TLS port and the fast port; for a fast
    acceptor (`sock` None) the hand-off socket instead of port 25 (not for an mTLS acceptor:
    `handed` False), and its own port-25 sockets that the kernel steers the operator's
    networks to (`steered`: ingress.core.reuseport; served like port 25's). `known`: where
    an mTLS acceptor lists the client addresses it verified (mtls.Gate's steer)."""
    loop, lst = ctx.loop, ctx.cfg.listen
    servers: list[Any] = []
    if sock is None and handed:
        ctx.receiver = handoff.Receiver(ctx.cfg, ctx.index, loop, ctx.serve_handed)
        servers.append(ctx.receiver)
    # A plain listener starts each connection in the lobby (ingress.edge.lobby: no aiosmtpd session
    # until the client speaks); behind PROXY the session is built at once.
    # backlog: create_server(sock=...) calls listen(2) again, with its own default (100)
    # unless told: the supervisor's listen.backlog would be lost (a flood's SYNs dropped)
    backlog = lst.backlog
    servers += [await loop.create_server(
        (lambda: IngressSMTP(ctx, proxy_protocol=True)) if lst.proxy_protocol else
        (lambda: Lobby(ctx)), sock=s, backlog=backlog) for s in _listening(sock)]
    servers += [await loop.create_server(lambda: Lobby(ctx, hand_back_to=handoff.ANY), sock=s,
                                         backlog=backlog) for s in _listening(steered)]
    if ctx.mtls_context is not None:
        gate = mtls.Gate(ctx.cfg, loop, known)    # one per process, for every address
        # a fast acceptor beside mTLS acceptors has mTLS sockets only where the kernel steers
        # the addresses they verified (ingress.tools.listeners): its clients come vouched for
        vouched = sock is None and handed and ctx.cfg.mtls_acceptor_count > 0
        servers += [mtls.MtlsListener(ctx, s, gate, vouched) for s in _listening(mtls_sock)]
    servers += [await loop.create_server(
        (lambda: IngressSMTP(ctx, fast_only=True, proxy_protocol=True))
        if lst.fast_port_proxy_protocol else (lambda: Lobby(ctx, fast_only=True)),
        sock=s, backlog=backlog) for s in _listening(fast_sock)]
    return servers
