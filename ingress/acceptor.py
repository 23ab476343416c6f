"""Acceptor process: holds TCP connections on a listening socket and runs the SMTP dialogue.

API:
    run(cfg, index, sock, hb, slot)   process entry point; `sock` is the listening socket the
                                      supervisor bound for this acceptor slot (SO_REUSEPORT)
    AcceptorContext                   per-process state shared by all sessions: the
                                      SessionHost (ingress.host) that smtp.py runs against;
                                      it holds the session table (ingress.sessions), the SPF
                                      service (ingress.spf_service), the learned store
                                      (ingress.learned_store) and the lane clients
                                      (ingress.lanes)
    MtlsListener                      the mutual-TLS port: a slot is taken at accept, before
                                      the TLS handshake (tls.handshake_timeout)

listen.port and listen.fast_port start each connection in the lobby (ingress.lobby) unless they
are behind PROXY; the slots are admission.configured_limit's (logged as connection_limit at
start, with what limited them).

Memory: the bytes all sessions hold in DATA (until their ack) are bounded by one DataBudget
(smtp.data_memory_budget, with smtp.data_fast_reserve for the fast lane only).

The event loop (uvloop) never blocks: no DNS, no disk, no CPU-heavy work here. Every wait has a
deadline: the ack wait is smtp.ack_timeout; a broker that is down fails the send at once
(IMMEDIATE) and the session gets 451. Lane status (saturation) arrives over SUB; status older than
STATUS_STALE is ignored, so a dead broker never makes us shed mail on old news.

SIGUSR1 from the supervisor (retire after a reload): stop accepting and serve the sessions
already accepted until they end. SIGUSR2 from the supervisor, or SIGTERM (shutdown): stop
accepting (the listening socket itself stays open in the supervisor, so nothing queued on it is
reset), close idle sessions with 421 4.3.2, let sessions inside DATA finish, and after
smtp.drain_grace close whatever is left with 421. Then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections import Counter
from typing import Any

from ingress import proxy
from ingress.core import child, log, procs
from ingress.core.config import Config
from ingress.core.downstream import parse_downstream
from ingress.core.fsutil import atomic_write
from ingress.core.wire import Envelope, Lane, Reply
from ingress.dataread import DataBudget
from ingress.evidence import cert_evidence, normalize_fingerprint
from ingress.handler import IngressHandler
from ingress.host import Prototype
from ingress.lanes import Lanes
from ingress.learned_store import LEARNED_SAVE_INTERVAL, LearnedStore
from ingress.lobby import Lobby
from ingress.policy.admission import FD_SPARE, configured_limit
from ingress.policy.classify import (
    AuthResult,
    ClassifyPolicy,
    Decision,
    Evidence,
    StaticAllow,
    decide,
)
from ingress.policy.replies import Refusal, text
from ingress.policy.session_rules import ErrorPolicy
from ingress.rcpt_verify import RecipientVerifier
from ingress.sessions import Seat, SessionTable
from ingress.smtp import IngressSMTP
from ingress.spf_service import SpfService


class AcceptorContext:
    """Everything the sessions of one acceptor process share (the SessionHost that smtp.py's
    IngressSMTP and IngressHandler run against): the classify policy, and the parts it holds,
    each its own module: the session table (ingress.sessions), the SPF service
    (ingress.spf_service), the learned store (ingress.learned_store), the lane clients
    (ingress.lanes)."""

    def __init__(self, cfg: Config, index: int, loop: asyncio.AbstractEventLoop,
                 nofile: int = 0) -> None:
        self.cfg, self.index, self.loop = cfg, index, loop
        self.ident = f"a{index}-{os.getpid()}"
        c, a, s = cfg.classify, cfg.admission, cfg.smtp
        self.domains = frozenset(s.accepted_domains)
        self.recipients = load_recipient_map(s.recipient_map) if s.recipient_map else None
        self.static_allow = StaticAllow.from_cidrs(c.allow_cidrs)
        self.trusted_proxies = proxy.trusted_networks(cfg.listen.trusted_proxies)
        self.learned_store = LearnedStore(cfg.spool.state_dir / "learned.json", c.learned_ttl,
                                          c.learned_max)
        self.policy = ClassifyPolicy(
            spf_promote=c.spf_promote, spf_domains=frozenset(c.spf_domains),
            cert_promotes=c.cert_promotes, learned_promotes=c.learned_ttl > 0)
        self.counters: Counter[str] = Counter()
        self.table = SessionTable(cfg, self.counters, time.monotonic(), nofile=nofile)
        self.pins = frozenset(normalize_fingerprint(f) for f in cfg.tls.pinned_sha256)
        self.spf_service = SpfService(cfg, self.counters)
        # Bytes held in DATA by all sessions (smtp.data_memory_budget); bulk never takes the
        # fast lane's part (smtp.data_fast_reserve).
        self.data_budget = DataBudget(*cfg.data_budget)
        self.tls_context = starttls_context(cfg)
        self.mtls_context = mtls_context(cfg)
        self.handler = IngressHandler(self)
        self.smtp_prototypes: dict[bool, Prototype] = {}
        self.error_policy = ErrorPolicy(
            soft_error_limit=s.soft_error_limit, hard_error_limit=s.hard_error_limit,
            # the delay runs on the idle timer: at most half of the shorter idle timeout
            error_sleep=s.error_sleep, error_sleep_max=min(
                s.error_sleep_max, min(s.idle_timeout, a.stress_idle_timeout) / 2),
            junk_command_limit=s.junk_command_limit,
            mail_without_data_limit=s.mail_without_data_limit,
            recipient_overshoot_limit=s.recipient_overshoot_limit)
        self.verifier = verifier(cfg)
        self.draining = False
        self.lanes = Lanes(cfg, self.ident)

    @property
    def resolver(self) -> Any:
        return self.spf_service.resolver

    # --- policy hooks used by smtp.py (the SessionHost protocol) ------------------------------

    def connect_evidence(self, ip: str, peercert_der: bytes | None, verified: bool) -> Evidence:
        ev = Evidence(static_allow=self.static_allow.contains(ip),
                      learned_allow=self.learned_store.contains(ip, time.time()))
        if peercert_der is not None:
            ev = ev.with_cert(cert_evidence(peercert_der, verified, self.pins))
        return ev

    def decide(self, evidence: Evidence) -> Decision:
        return decide(evidence, self.policy)

    def admit(self, proto: Seat) -> str | None:
        return self.table.admit(proto, self.draining, time.monotonic())

    def spoke(self, proto: Seat) -> None:
        self.table.spoke(proto)

    def release(self, proto: Seat) -> None:
        self.table.release(proto)

    def swap(self, old: Seat, new: Seat) -> None:
        self.table.swap(old, new)

    def promote(self, proto: Seat) -> None:
        self.table.promote(proto)

    def penalise(self, ip: str) -> None:
        """Here at once, and in every other acceptor through the bulk broker's fan-out."""
        self.table.penalise(ip, time.monotonic())
        self.lanes.share_penalty(ip)

    async def spf(self, peer_ip: str, lane: Lane, mail_from: str,
                  helo: str) -> tuple[AuthResult, str]:
        return await self.spf_service.check(peer_ip, lane, mail_from, helo)

    def lane_saturated(self, lane: Lane) -> bool:
        return self.lanes.lane_saturated(lane)

    def bulk_mail_admitted(self) -> bool:
        return self.lanes.bulk_mail_admitted()

    async def submit(self, env: Envelope, body: bytes) -> tuple[Reply | None, str]:
        return await self.lanes.submit(env, body)

    def count(self, what: str, lane: Lane) -> None:
        self.counters[f"{what}_{lane.value}"] += 1

    def learn(self, ip: str) -> None:
        self.learned_store.learn(ip, time.time())

    # --- background tasks ---------------------------------------------------------------------

    async def read_status(self) -> None:
        await self.lanes.read_status(
            self.learn, lambda ip: self.table.penalise(ip, time.monotonic()))

    async def persist_learned(self) -> None:
        """Acceptor 0 keeps the learned allow cache on disk (every acceptor learns the same
        entries over pub/sub and reads the file at start), so it survives restarts."""
        while True:
            await asyncio.sleep(LEARNED_SAVE_INTERVAL)
            data = self.learned_store.snapshot(time.time())
            if data is not None:
                try:
                    await self.loop.run_in_executor(
                        None, atomic_write, self.learned_store.path, data)
                except OSError as e:
                    log.event("learned_save_failed", "error", error=str(e))

    async def drain(self, servers: list[Any], retire: bool) -> None:
        """Stop accepting, then let the sessions go.

        retire (a reload: replacement acceptors already serve the same sockets): every session
        this process accepted is served as usual until it ends, up to smtp.drain_grace.
        shutdown: idle sessions are closed with 421 4.3.2 at once and a new transaction gets
        421; a message being received or acknowledged finishes first.
        In both cases what is left after drain_grace gets 421 and is closed."""
        self.draining = not retire
        for server in servers:
            server.close()
        line = text(Refusal.SHUTTING_DOWN, host=self.cfg.smtp.hostname)
        deadline = time.monotonic() + self.cfg.smtp.drain_grace
        while self.table.sessions and time.monotonic() < deadline:
            if not retire:
                for proto in list(self.table.sessions):
                    proto.close_if_idle(line)
            await asyncio.sleep(0.05)
        for proto in list(self.table.sessions):
            proto.close_with(line)
        await asyncio.sleep(0.05)
        log.event("acceptor_drained", mode="retire" if retire else "shutdown",
                  left=len(self.table.sessions), **self.counters)


class MtlsListener:
    """The mutual-TLS port. Connections are accepted here (loop.sock_accept), and each takes a
    slot (IngressSMTP.admit_before_handshake) before its TLS handshake, so handshakes are
    bounded by smtp.max_connections like any session; a refused one is closed at once. Then
    the handshake (loop.connect_accepted_socket, bounded by tls.handshake_timeout) and the SMTP
    session on the TLS transport. (A protocol on a plain listener calling start_tls would race
    uvloop, which starts reading after connection_made: the ClientHello could be lost.)
    close() stops accepting, like asyncio.Server.close()."""

    def __init__(self, ctx: AcceptorContext, sock: socket.socket) -> None:
        self.ctx, self.sock = ctx, sock
        self.task = ctx.loop.create_task(self._accept_loop())

    def close(self) -> None:
        self.task.cancel()

    async def _accept_loop(self) -> None:
        loop = self.ctx.loop
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as e:       # EMFILE, ENFILE, ECONNABORTED ...: no busy loop
                log.event("accept_failed", "warning", port="mtls", error=str(e))
                await asyncio.sleep(0.1)
                continue
            proto = IngressSMTP(self.ctx, implicit_tls=True)
            if not proto.admit_before_handshake(addr):
                conn.close()
                continue
            task = loop.create_task(self._handshake(conn, proto))
            proto.abort_handshake = task.cancel

    async def _handshake(self, conn: socket.socket, proto: IngressSMTP) -> None:
        ctx = self.ctx
        assert ctx.mtls_context is not None
        try:
            await ctx.loop.connect_accepted_socket(
                lambda: proto, conn, ssl=ctx.mtls_context,
                ssl_handshake_timeout=ctx.cfg.tls.handshake_timeout)
        except asyncio.CancelledError:     # evicted, or the acceptor is stopping
            proto.handshake_failed("cancelled")
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            proto.handshake_failed(f"{type(e).__name__}: {e}")
        else:
            proto.abort_handshake = None




def verifier(cfg: Config) -> RecipientVerifier | None:
    """smtp.verify_recipients: callouts to relay.downstream (config validation made sure it is
    smtp://host:port)."""
    s = cfg.smtp
    if not s.verify_recipients:
        return None
    target = parse_downstream(cfg.relay.downstream)
    return RecipientVerifier(
        target.host, target.port, helo=s.hostname, timeout=s.verify_timeout,
        positive_ttl=s.verify_positive_ttl, negative_ttl=s.verify_negative_ttl,
        tempfail_ttl=s.verify_tempfail_ttl, cache_size=s.verify_cache_size,
        concurrency=s.verify_concurrency)


def load_recipient_map(path: str) -> frozenset[str]:
    """One address a line ("user@domain"), or "@domain" for every user of a domain; # comments.
    Read at start (and so at every reload, which replaces the acceptors)."""
    out = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = line.split("#", 1)[0].strip().lower()
            if entry:
                out.add(entry.split()[0])
    return frozenset(out)


def starttls_context(cfg: Config) -> ssl.SSLContext | None:
    """STARTTLS on the public port: no client certificate is requested there (a client that
    presents an untrusted one would fail the handshake under CERT_OPTIONAL)."""
    if not cfg.tls.cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def mtls_context(cfg: Config) -> ssl.SSLContext | None:
    """The mutual-TLS port: implicit TLS, a client certificate required and verified against
    tls.client_ca (a pinned self-signed certificate must be in that bundle too: Python's ssl
    cannot request a certificate without verifying it; config validation requires the bundle)."""
    t = cfg.tls
    if t.mtls_port < 0 or not t.cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(t.cert, t.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if t.client_ca:
        ctx.load_verify_locations(cafile=t.client_ca)
    return ctx


async def serve(cfg: Config, index: int, sock: socket.socket, hb: Any, slot: int,
                mtls_sock: socket.socket | None, fast_sock: socket.socket | None,
                sig: child.Signals | None = None) -> None:
    loop = asyncio.get_running_loop()
    wanted = configured_limit(cfg, 0).max_connections    # what config / memory allow
    needed = wanted + FD_SPARE
    nofile, _ = procs.raise_nofile(needed)
    # Admission is capped at what the fd limit allows (admission.connection_limit): a client
    # beyond it gets 421 instead of libuv's silent accept-and-close on EMFILE.
    ctx = AcceptorContext(cfg, index, loop, nofile=nofile)
    limit = ctx.table.limit
    log.event("connection_limit", index=index, max_connections=limit.max_connections,
              fast_reserve=limit.fast_reserve, limited_by=limit.limited_by, nofile=nofile,
              configured=cfg.smtp.max_connections, connection_memory=cfg.smtp.connection_memory)
    if nofile < needed:
        # An explicit smtp.max_connections the fd limit cannot hold is an error; the automatic
        # limit (0) adapts to it by design, so it is only worth a warning.
        log.event("nofile_too_low", "error" if cfg.smtp.max_connections else "warning",
                  limit=nofile, needed=needed,
                  max_connections_effective=ctx.table.admission.limits.max_connections,
                  hint="raise LimitNOFILE / ulimit -n, or lower smtp.max_connections")
    sock.setblocking(False)
    lst = cfg.listen
    # A plain listener starts each connection in the lobby (ingress.lobby: no aiosmtpd session
    # until the client speaks); behind PROXY the session is built at once.
    servers: list[Any] = [await loop.create_server(
        (lambda: IngressSMTP(ctx, proxy_protocol=True)) if lst.proxy_protocol else
        (lambda: Lobby(ctx)), sock=sock)]
    if mtls_sock is not None and ctx.mtls_context is not None:
        mtls_sock.setblocking(False)
        servers.append(MtlsListener(ctx, mtls_sock))
    if fast_sock is not None:
        fast_sock.setblocking(False)
        servers.append(await loop.create_server(
            (lambda: IngressSMTP(ctx, fast_only=True, proxy_protocol=True))
            if lst.fast_port_proxy_protocol else (lambda: Lobby(ctx, fast_only=True)),
            sock=fast_sock))
    stop = asyncio.Event()
    # SIGUSR2 is the supervisor's order to shut down, SIGUSR1 to retire after a reload; SIGTERM
    # (e.g. sent to the whole process group) shuts down too. ^C in a terminal reaches every
    # process: only the supervisor acts on it (child.ACCEPTOR_SIGNALS).
    sig = sig if sig is not None else child.Signals(child.ACCEPTOR_SIGNALS)
    sig.install_loop(loop)
    sig.on_stop(stop.set)
    heart = child.Heartbeat(hb, slot)
    tasks = [loop.create_task(t) for t in (
        heart.run(child.heartbeat_period(cfg), stop.set), ctx.read_status(),
        *(lc.read_replies() for lc in ctx.lanes.values()),
        *(lc.watch_broker() for lc in ctx.lanes.values()))]
    if index == 0:
        tasks.append(loop.create_task(ctx.persist_learned()))
    log.event("acceptor_start", index=index, learned=len(ctx.learned_store.allow),
              tls=ctx.tls_context is not None, mtls=mtls_sock is not None,
              fast_port=fast_sock is not None)
    await stop.wait()
    await ctx.drain(servers, sig.retire)
    for t in tasks:
        t.cancel()
    if index == 0 and ctx.learned_store.dirty:
        with contextlib.suppress(OSError):
            atomic_write(ctx.learned_store.path, ctx.learned_store.allow.to_json().encode())
    for pool in ctx.spf_service.pools.values():
        pool.shutdown(wait=False, cancel_futures=True)
    ctx.lanes.close()


def run(cfg: Config, index: int, sock: socket.socket, hb: Any = None, slot: int = 0,
        mtls_sock: socket.socket | None = None, fast_sock: socket.socket | None = None) -> None:
    sig = child.start(cfg, f"acceptor-{index}", child.ACCEPTOR_SIGNALS)
    try:
        import uvloop
        uvloop.run(serve(cfg, index, sock, hb, slot, mtls_sock, fast_sock, sig))
    except ImportError:     # pragma: no cover - uvloop is a hard dependency; keep serving anyway
        asyncio.run(serve(cfg, index, sock, hb, slot, mtls_sock, fast_sock, sig))
