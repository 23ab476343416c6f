"""The mutual-TLS port (tls.mtls_port): accept, the handshake gate, the TLS handshake, its alert.

Purpose
    Only clients with a valid certificate get mail in here, but anyone can open connections
    and make the server do TLS handshakes (~1.2 ms of CPU each, on the event loop of the fast
    acceptor that also serves the allow-listed clients of port 25). Each connection goes:
      1. accept; a client the gate would refuse anyway (below) whose ClientHello is there
         already is refused at once (Gate.at_accept: under a flood most connections end
         here, cheaply); one whose ClientHello is not there yet (a bot's follows its ACK by
         microseconds) waits for it parked, without a session object, a slot or a task (at
         most derived.park_fds per listener, and tls.handshake_timeout), then is refused so,
         or served the long way if the gate has room by then; else a connection slot
         (IngressSMTP.admit_before_handshake: an unproven client is bulk: the bulk share,
         per-IP limits), or a close at once;
      2. its ClientHello's first byte (a readable wait and MSG_PEEK: a silent connection holds
         its slot only, can be evicted like any silent session, and is closed at
         tls.handshake_timeout); a first byte that does not open a TLS handshake record: closed;
      3. the handshake gate (ingress.policy.handshake_gate, one per process for all its
         mTLS listeners): a network that showed a valid certificate lately starts at once;
         a stranger takes a token of tls.stranger_handshake_rate, or waits for one (at most
         tls.stranger_wait), or is refused with a TLS alert (internal_error, a plaintext
         alert record written after its ClientHello is read, so that the close is a FIN and
         not a reset that could destroy the alert);
      4. the handshake (loop.connect_accepted_socket: uvloop's SSL protocol) within what is
         left of tls.handshake_timeout since the accept, then the SMTP session on the TLS
         transport. A verified certificate (a resumed TLS 1.3 session carries the one it was
         verified with) makes the client's network known (HandshakeGate.verified); a failure
         marks its address failed, and the client gets the alert OpenSSL wrote.

    Where: with mTLS acceptors (supervisor.mtls_acceptors) the port is theirs, and they
    run at supervisor.acceptor_nice when the kernel steers (derived.steer_known): each lists
    the client addresses it verified lately (Gate's steer, HandshakeGate.steered) in its region
    of a shared table (ingress.core.steer_table), and
    the supervisor attaches a reuseport program that sends exactly those addresses to the fast
    acceptors' own sockets in the port's group (ingress.tools.listeners.steer_known). There
    they come vouched for (known, within their prefix's known_rate): a certificate sender,
    once verified, never waits behind strangers' accepts, refusals and handshakes, and the
    strangers' work runs in a process that yields the cores to the operator's.

    Why an alert needs help: asyncio's and uvloop's SSL protocols abort the transport when
    do_handshake() raises, dropping the alert OpenSSL has just written to the outgoing memory
    BIO: the client saw a bare EOF. MtlsContext is an SSLContext whose wrap_bio() returns an
    AlertingSSLObject; on a failed handshake that object takes the pending bytes (the alert)
    out of its outgoing BIO and hangs them on the exception (`tls_alert`). The listener holds
    a duplicate of the socket's descriptor for the length of the handshake, and writes them
    on it when uvloop has closed its own.

API
    mtls_context(cfg) -> MtlsContext | None    the server context (None: no mTLS port)
    Gate(cfg, loop, steer=None)                the process's gate: .turn(ip) -> Tier | None,
                                               .verified(ip, der, tier), .failed(ip, tier)
    MtlsListener(ctx, sock, gate, vouched)     serves one listening socket (`vouched`: one the
                                               kernel steers verified addresses to); .close()
    alert_record(description) -> bytes         a plaintext fatal TLS alert record

Failure modes
    Every step has a deadline (tls.handshake_timeout from the accept covers the wait for the
    ClientHello, the gate and the handshake); any failure gives the slot back
    (IngressSMTP.handshake_failed) and closes the connection; nothing raises out of a
    connection's task. An alert that does not fit in the socket buffer at once is dropped.

Limits
    Per process: the gate's tables and bucket, and TLS session tickets (OpenSSL's ticket keys
    are per SSL_CTX: with several fast acceptors, a session resumes only on the process that
    issued its ticket; elsewhere it is a full handshake, gated by the client's network).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ingress.core import log, metrics
from ingress.core.addr import normalize_ip
from ingress.core.config import Config
from ingress.core.derived import park_fds
from ingress.core.metrics_labels import Outcome
from ingress.core.wire import Lane
from ingress.edge.evidence import sha256_fingerprint
from ingress.edge.smtp import IngressSMTP
from ingress.policy.handshake_gate import GateLimits, HandshakeGate, Tier, Verdict

if TYPE_CHECKING:
    from ingress.edge.context import AcceptorContext

TLS_HANDSHAKE_RECORD = 0x16        # the first byte of a ClientHello's record
ALERT_INTERNAL_ERROR = 80          # RFC 8446 6.2: "unrelated to the peer": we are busy
CLIENT_HELLO_MAX = 65536           # bytes read (and dropped) before a refusal's alert
PUBLISH_DELAY = 0.2                # s from a verified handshake to the steer table
REFRESH = 60.0                     # s an entry's end must grow by to be written again


def alert_record(description: int) -> bytes:
    """A fatal TLS alert in a plaintext record (before any keys: RFC 8446 5.1, 6)."""
    return bytes((0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description))


class AlertingSSLObject(ssl.SSLObject):
    """An SSLObject that, when its handshake fails, hands the alert OpenSSL wrote over on the
    exception (`tls_alert`: bytes) instead of leaving it in a BIO nobody will flush."""

    outgoing: ssl.MemoryBIO | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            if self.outgoing is not None and self.outgoing.pending:
                e.tls_alert = self.outgoing.read()     # type: ignore[attr-defined]
            raise


class MtlsContext(ssl.SSLContext):
    sslobject_class = AlertingSSLObject

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if isinstance(obj, AlertingSSLObject):
            obj.outgoing = outgoing
        return obj


def mtls_context(cfg: Config) -> MtlsContext | None:
    """The mutual-TLS port: implicit TLS, a client certificate required and verified against
    tls.client_ca (a pinned self-signed certificate must be in that bundle too: Python's ssl
    cannot request a certificate without verifying it; config validation requires the bundle).
    TLS 1.3 session tickets are on (OpenSSL's default, two per handshake): a resumed session
    costs the server about half a full handshake and keeps the certificate it was verified
    with."""
    t = cfg.tls
    if t.mtls_port < 0 or not t.cert:
        return None
    ctx = MtlsContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(t.cert, t.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if t.client_ca:
        ctx.load_verify_locations(cafile=t.client_ca)
    return ctx


def gate_limits(cfg: Config) -> GateLimits:
    t = cfg.tls
    return GateLimits(
        stranger_rate=t.stranger_handshake_rate, stranger_burst=t.stranger_handshake_burst,
        wait=t.stranger_wait, known_ttl=t.known_ttl, known_max=t.known_max,
        known_rate=t.known_handshake_rate, known_ipv4_prefix=t.known_ipv4_prefix,
        ipv6_prefix=cfg.admission.ipv6_prefix, failed_ttl=t.failed_ttl)


class Gate:
    """The handshake gate of one process (shared by its mTLS listeners: one per listen
    address): the pure HandshakeGate, a timer that starts waiters when tokens come and
    refuses them when their wait is over, the metrics and a rate-limited log line. With
    `steer` (an mTLS acceptor, ingress.core.derived.steer_known: its region of the
    supervisor's known-address table, ingress.core.steer_table): the addresses it verified
    lately (HandshakeGate.steered) are written there, each until its network's entry expires,
    at most PUBLISH_DELAY after a verified handshake changed them (one that went: ended now),
    for the supervisor to steer them to the fast acceptors."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop,
                 steer: Callable[[str, float], None] | None = None) -> None:
        self.loop = loop
        self.policy: HandshakeGate[asyncio.Future[bool]] = HandshakeGate(
            gate_limits(cfg), time.monotonic())
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.steer = steer
        self.written: dict[str, float] = {}   # address -> until, as in the table
        self.soon: asyncio.TimerHandle | None = None

    async def turn(self, ip: str, vouched: bool = False) -> Tier | None:
        """Wait for this client's turn to a handshake: its tier, or None (refused).
        `vouched`: it came on a socket the kernel steers verified addresses to (known)."""
        fut: asyncio.Future[bool] = self.loop.create_future()
        a = self.policy.arrive(ip, fut, time.monotonic(), vouched)
        if a.displaced is not None and not a.displaced.done():
            a.displaced.set_result(False)
        if a.verdict is Verdict.START:
            metrics.mtls_gate(a.tier, "started")
            return a.tier
        if a.verdict is Verdict.WAIT:
            self._arm()
            try:
                if await fut:
                    metrics.mtls_gate(a.tier, "waited")
                    return a.tier
            finally:
                if not fut.done() or fut.cancelled():
                    self.policy.leave(fut)
        self.refused(ip, a.tier)
        return None

    def refused(self, ip: str, tier: Tier) -> None:
        metrics.mtls_gate(tier, "refused")
        log.refused("mtls_gate_refused", ip, stage="tls", code="alert", reason=tier.value,
                    waiting=self.policy.waiting)

    def at_accept(self, conn: socket.socket, ip: str, vouched: bool = False) -> str:
        """A client the gate would refuse anyway (HandshakeGate.refused_at_once: in a flood,
        most of them) whose ClientHello is already there: refused here, before a session
        object, a slot, a task or a poll handle is made for it ("refused"); one whose
        ClientHello is not there yet: "pending" (MtlsListener._park); else "serve" (the long
        way, which also says what a closed or non-TLS connection gets)."""
        tier = self.policy.refused_at_once(ip, time.monotonic(), vouched)
        if tier is None:
            return "serve"
        try:
            if conn.recv(1, socket.MSG_PEEK) != bytes((TLS_HANDSHAKE_RECORD,)):
                return "serve"
        except (BlockingIOError, InterruptedError):
            return "pending"
        except OSError:                    # gone
            return "serve"
        refuse(conn)
        metrics.connection(Lane.BULK, Outcome.TLS_BUSY)
        self.refused(ip, tier)
        return "refused"

    def verified(self, ip: str, der: bytes | None, tier: Tier) -> None:
        metrics.mtls_handshake(tier, "ok")
        if der:
            self.policy.verified(ip, sha256_fingerprint(der), time.monotonic())
            if self.steer is not None and self.soon is None:
                self.soon = self.loop.call_later(PUBLISH_DELAY, self._publish)

    def _publish(self) -> None:
        """Write what changed: addresses new or whose network's entry was extended by more
        than REFRESH (a table entry is written in place), and those that went (ended now)."""
        assert self.steer is not None
        self.soon = None
        now = time.monotonic()
        current = dict(self.policy.steered(now))
        for ip, until in current.items():
            if ip not in self.written or until - self.written[ip] > REFRESH:
                self.steer(ip, until)
            else:
                current[ip] = self.written[ip]
        for ip in self.written.keys() - current.keys():
            self.steer(ip, now)
        self.written = current

    def failed(self, ip: str, tier: Tier) -> None:
        metrics.mtls_handshake(tier, "failed")
        self.policy.failed(ip, time.monotonic())

    def _arm(self) -> None:
        now = time.monotonic()
        at = self.policy.next_event(now)
        if at is None or (self.timer is not None and self.timer_at <= at):
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        # a hair late, so that the token is whole when due() looks (float arithmetic)
        self.timer = self.loop.call_later(max(0.0, at - now) + 0.0005, self._pump)

    def _pump(self) -> None:
        self.timer = None
        due = self.policy.due(time.monotonic())
        for fut in due.started:
            if not fut.done():
                fut.set_result(True)
        for fut in due.expired:
            if not fut.done():
                fut.set_result(False)
        self._arm()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def first_byte(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The first byte the client sent, left in the socket (MSG_PEEK); b"" if it closed."""
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return b""
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), _wake, fut)
        try:
            await fut
        finally:
            loop.remove_reader(conn.fileno())


def refuse(conn: socket.socket) -> None:
    """No handshake for this one: read its ClientHello (closing with unread bytes would be a
    reset, which may destroy the alert before the client reads it), a fatal internal_error
    alert, close."""
    with contextlib.suppress(OSError):
        for _ in range(CLIENT_HELLO_MAX // 16384):
            if not conn.recv(16384):
                break
    with contextlib.suppress(OSError):
        conn.send(alert_record(ALERT_INTERNAL_ERROR))
    conn.close()


class MtlsListener:
    """One listening socket of the mutual-TLS port. Connections are accepted here
    (loop.sock_accept), and each takes a slot (IngressSMTP.admit_before_handshake) before
    anything else, so they are bounded by smtp.max_connections like any session; a refused one
    is closed at once. Then the steps of the module docstring. (A protocol on a plain listener
    calling start_tls would race uvloop, which starts reading after connection_made: the
    ClientHello could be lost.) close() stops accepting, like asyncio.Server.close()."""

    def __init__(self, ctx: AcceptorContext, sock: socket.socket, gate: Gate,
                 vouched: bool = False) -> None:
        self.ctx, self.sock, self.gate, self.vouched = ctx, sock, gate, vouched
        # fd -> (connection, peer, its deadline's timer, when accepted): see _park
        self.parked: dict[int, tuple[socket.socket, Any, asyncio.TimerHandle, float]] = {}
        table = ctx.table
        self.park_max = park_fds(ctx.cfg, table.nofile, table.limit.max_connections)
        self.task = ctx.loop.create_task(self._accept_loop())

    def close(self) -> None:
        self.task.cancel()
        for fd in list(self.parked):
            self._unpark(fd, False)

    def _park(self, conn: socket.socket, addr: Any) -> bool:
        """A client the gate would refuse now whose ClientHello is not there yet (a bot's
        usually follows its ACK by microseconds): wait for it without a session object, a slot
        or a task, at most tls.handshake_timeout and park_max of them (derived.park_fds:
        what the fd limit leaves; beyond: the long way),
        then refuse it at once, or serve it the long way if the gate has room by then."""
        if len(self.parked) >= self.park_max:
            return False
        loop, fd = self.ctx.loop, conn.fileno()
        timer = loop.call_later(self.ctx.cfg.tls.handshake_timeout, self._unpark, fd, False)
        self.parked[fd] = (conn, addr, timer, loop.time())
        loop.add_reader(fd, self._unpark, fd, True)
        return True

    def _unpark(self, fd: int, readable: bool) -> None:
        item = self.parked.pop(fd, None)
        if item is None:
            return
        conn, addr, timer, accepted = item
        self.ctx.loop.remove_reader(fd)
        timer.cancel()
        ip = normalize_ip(addr[0])
        if not readable:                   # silent until tls.handshake_timeout, or stopping
            conn.close()
            metrics.connection(Lane.BULK, Outcome.TLS_FAILED)
            log.throttled("mtls_handshake_failed", ip, why="no ClientHello within "
                          "tls.handshake_timeout (parked)")
            return
        if self.gate.at_accept(conn, ip, self.vouched) != "refused":
            self._admit(conn, addr, accepted)   # room at the gate now, or not TLS

    async def _accept_loop(self) -> None:
        loop = self.ctx.loop
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as e:       # EMFILE, ENFILE, ECONNABORTED ...: no busy loop
                log.event("accept_failed", "warning", port="mtls", error=str(e))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            verdict = self.gate.at_accept(conn, normalize_ip(addr[0]), self.vouched) \
                if addr else "serve"
            if verdict == "refused" or (verdict == "pending" and self._park(conn, addr)):
                continue
            self._admit(conn, addr, loop.time())

    def _admit(self, conn: socket.socket, addr: Any, accepted: float) -> None:
        """The long way: a slot, then _serve in a task."""
        proto = IngressSMTP(self.ctx, implicit_tls=True)
        if not proto.admit_before_handshake(addr):
            conn.close()
            return
        task = self.ctx.loop.create_task(self._serve(conn, proto, accepted))
        proto.abort_handshake = task.cancel

    async def _serve(self, conn: socket.socket, proto: IngressSMTP, accepted: float) -> None:
        """Steps 2-4 for one admitted connection; every way out gives its slot back."""
        loop, tls = self.ctx.loop, self.ctx.cfg.tls
        deadline = accepted + tls.handshake_timeout       # a parked client's wait counts
        mine = True                   # the socket is ours until uvloop takes it
        try:
            async with asyncio.timeout_at(deadline):
                first = await first_byte(loop, conn)
                if first != bytes((TLS_HANDSHAKE_RECORD,)):
                    proto.handshake_failed("not a TLS handshake" if first else
                                           "closed before its ClientHello")
                    return
                tier = await self.gate.turn(proto.peer_ip, self.vouched)
            if tier is None:
                mine = False
                refuse(conn)
                proto.handshake_failed("handshake gate: busy", Outcome.TLS_BUSY, quiet=True)
                return
            mine = False
            await self._handshake(conn, proto, tier, deadline)
        except TimeoutError:
            proto.handshake_failed("no ClientHello, or no turn, within tls.handshake_timeout")
        except asyncio.CancelledError:     # evicted, or the acceptor is stopping
            proto.handshake_failed("cancelled")
        except Exception as e:             # pragma: no cover - a bug: log it, free the slot
            log.event("mtls_error", "error", peer=proto.peer_ip, error=repr(e)[:200])
            proto.handshake_failed(f"error: {e!r}")
        finally:
            if mine:
                conn.close()

    async def _handshake(self, conn: socket.socket, proto: IngressSMTP, tier: Tier,
                         deadline: float) -> None:
        ctx, ip = self.ctx, proto.peer_ip
        assert ctx.mtls_context is not None
        spare = os.dup(conn.fileno())      # the alert goes out on it after uvloop closes its own
        try:
            transport, _ = await ctx.loop.connect_accepted_socket(
                lambda: proto, conn, ssl=ctx.mtls_context,
                ssl_handshake_timeout=max(0.05, deadline - ctx.loop.time()))
        except asyncio.CancelledError:
            raise
        except ssl.SSLError as e:
            alert: bytes = getattr(e, "tls_alert", b"")
            if alert:
                with contextlib.suppress(OSError):
                    os.write(spare, alert)
            self.gate.failed(ip, tier)
            proto.handshake_failed(f"{type(e).__name__}: {e}")
        except (OSError, TimeoutError, ConnectionError) as e:
            self.gate.failed(ip, tier)
            proto.handshake_failed(f"{type(e).__name__}: {e}")
        else:
            proto.abort_handshake = None
            ssl_object: Any = transport.get_extra_info("ssl_object")
            self.gate.verified(ip, ssl_object.getpeercert(binary_form=True)
                               if ssl_object is not None else None, tier)
        finally:
            os.close(spare)
