"""The SMTP session: IngressSMTP, the aiosmtpd SMTP subclass that runs one connection's dialogue
against our policy.

API:
    IngressSMTP(host, implicit_tls=False, fast_only=False, proxy_protocol=False, returned=False,
                hand_back_to=None)
        one instance per connection (the asyncio protocol); `host` is the acceptor process
        (ingress.edge.host.SessionHost); the aiosmtpd hooks are ingress.edge.handler.IngressHandler

It is built in layers, each its own module: aiosmtpd's SMTP <- ingress.edge.smtp_data.DataPhase
(DATA read in bulk into one buffer, charged to the DATA budget) <- ingress.edge.smtp_commands
.CommandPhase (every command checked and accounted, every reply cleaned: push) <- IngressSMTP
(this module: the per-process prototype and the connection's life cycle). What happens at
connect is ingress.edge.connect's (shared with the lobby). docs/design.md lists the aiosmtpd
traps the layers work around.

What this module adds to aiosmtpd:
- classification and admission in connection_made, before aiosmtpd builds anything: a refused
  connection (421 4.7.0, no banner) costs microseconds; a client of the operator or third-party
  trust tier known there is handed to a fast acceptor (ingress.edge.handoff) and served in that
  process (which gives it back, to be served here, if it cannot admit it: hand_back_to,
  returned); a fast session is admitted by its tier (ingress.policy.tiers); behind a
  PROXY-protocol balancer (per listener) they wait for the header (ingress/edge/proxy.py), and
  the greet pause and the early-talker test start after it; the fast port
  (listen.fast_port) serves fast-lane clients only;
- on the plain listeners (not behind PROXY) a connection starts in the lobby (ingress.edge.lobby)
  and the session is built on the client's first bytes with the seat's Connection
  (conn=; handed_off): admitted, greet pause done and banner written already (GREETED;
  aiosmtpd's banner push is skipped), and the session deadline counts from connect;
- on the mutual-TLS port a connection takes its slot before the TLS handshake
  (admit_before_handshake; ingress.edge.mtls: the handshake gate comes after it), and a verified
  certificate promotes it after;
- a session is built from a per-process prototype (aiosmtpd's __init__ introspects the class
  and the handler on every connection: ~0.5 ms); _PER_CONNECTION is the state each session
  builds itself (test_smtp_clone checks it; hence aiosmtpd <1.5 in pyproject); a per-instance
  command_size_limits (aiosmtpd's is a class attribute shared by all sessions and grows with
  every EHLO);
- the connection's state and facts in one object, self.conn (ingress.edge.connection.Connection:
  lane, evidence, identity, ticket, ...; not on aiosmtpd's Session, which STARTTLS rebuilds); its
  state (ingress.policy.conn_state) moves ADMIT/REFUSE/PASS at connect, TALK before the banner,
  GREET, SPEAK on the first bytes after it, DATA/ACK_WAIT/ACK_DONE/DATA_END (busy,
  awaiting_ack derive from it), EVICT or CLOSE when the slot goes back; evict() when slots are
  full;
- an early-talker test for bulk clients (554, and a penalty shared by every acceptor);
- a whole-session deadline on top of the idle timeout, and a 421 line before closing on either;
  the idle timer is re-armed by incoming bytes while DATA is being received; bulk sessions get
  admission.stress_idle_timeout while the bulk lane is saturated (admission.stress_timeouts);
  no idle timer (stress or not) while the worker's ack is awaited: the ack wait has its own
  deadline (smtp.ack_timeout), and the session deadline waits for it.

Failure modes: bad input gets an SMTP reply and a log line, never a traceback (the handler's
handle_exception answers 451 4.3.0); a PROXY header from an untrusted peer, or an invalid one,
closes the connection with a log line. Limits: those of the config (smtp.*, admission.*).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP, _AuthMechAttr

from ingress.core import log, metrics
from ingress.core.addr import normalize_ip
from ingress.core.metrics_labels import Outcome
from ingress.core.wire import Lane, WireEvidence
from ingress.edge import connect_checks, proxy
from ingress.edge.connect import IDENT, classify_and_admit, refuse_by_check, refuse_early_talker
from ingress.edge.connection import Connection
from ingress.edge.host import SessionHost
from ingress.edge.smtp_commands import CommandPhase
from ingress.policy.admission import stress_timeouts
from ingress.policy.conn_state import ConnState, Event
from ingress.policy.deferrals import Claim
from ingress.policy.replies import Refusal, text
from ingress.policy.session_rules import Counters

# Per-connection state that SMTP.__init__ sets and that must not be shared between sessions.
_PER_CONNECTION = frozenset({
    "_timeout_handle", "_tls_handshake_okay", "_tls_protocol", "_original_transport", "session",
    "envelope", "transport", "_handler_coroutine", "_smtp_methods", "_auth_methods",
    "command_size_limits"})



class _Bound(Mapping[str, Any]):
    """A session's table of commands (or AUTH mechanisms): fixed names, each value made (bound
    to the session) when it is looked up."""

    __slots__ = ("_make", "_names")

    def __init__(self, names: tuple[str, ...], make: Callable[[str], Any]) -> None:
        self._names, self._make = names, make

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_NONE = _Bound((), str)      # a finished session's command tables


def _write_line(transport: asyncio.BaseTransport, line: str) -> None:
    """One reply line straight onto the transport (before aiosmtpd's writer exists, or after)."""
    cast(asyncio.WriteTransport, transport).write(line.encode() + b"\r\n")


class IngressSMTP(CommandPhase):
    conn: Connection
    def __init__(self, ctx: SessionHost, implicit_tls: bool = False,
                 fast_only: bool = False, proxy_protocol: bool = False,
                 returned: bool = False, hand_back_to: Any = None,
                 conn: Connection | None = None) -> None:
        # aiosmtpd's SMTP.__init__ introspects the handler and the class on every connection
        # (inspect.getmembers, dir(), inspect.signature): ~0.5 ms, more than the rest of a
        # one-message session costs here. It is run once per (acceptor, listener kind); every
        # later connection copies that configuration and builds only its own stream state.
        proto = ctx.smtp_prototypes.get(implicit_tls)
        if proto is None:
            s = ctx.cfg.smtp
            super().__init__(
                ctx.handler, hostname=s.hostname, ident=IDENT,
                data_size_limit=s.max_message_size, enable_SMTPUTF8=True, decode_data=False,
                timeout=s.idle_timeout, tls_context=None if implicit_tls else ctx.tls_context,
                loop=ctx.loop,
            )
            stream_keys = set(asyncio.StreamReaderProtocol(
                asyncio.StreamReader(loop=ctx.loop), client_connected_cb=self._cb_client_connected,
                loop=ctx.loop).__dict__)
            shared = {k: v for k, v in self.__dict__.items()
                      if k not in stream_keys and k not in _PER_CONNECTION}
            auth = {m: (a.method.__name__, a.is_builtin) for m, a in self._auth_methods.items()}
            ctx.smtp_prototypes[implicit_tls] = (shared, tuple(self._smtp_methods), auth)
        else:
            shared, names, auth = proto
            asyncio.StreamReaderProtocol.__init__(
                self, asyncio.StreamReader(loop=ctx.loop, limit=self.line_length_limit),
                client_connected_cb=self._cb_client_connected, loop=ctx.loop)
            self.__dict__.update(shared)
            self._timeout_handle = None
            self._tls_handshake_okay = True
            self._tls_protocol = None
            self._original_transport = None
            self.session = None
            self.envelope = None
            self.transport = None
            self._handler_coroutine = None
            # Bound on use, not for every connection (a dict of bound methods per session was
            # one per cent of an acceptor's CPU): aiosmtpd only get()s, iterates and tests them.
            self._smtp_methods = _Bound(  # type: ignore[assignment]
                names, lambda n: getattr(self, "smtp_" + n))
            # AUTH mechanisms of this class are bound to the session; the handler's are shared.
            self._auth_methods = _Bound(tuple(auth), lambda m: self._auth_mech(auth[m]))  # type: ignore[assignment]
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.fast_only = fast_only         # listen.fast_port: fast-lane clients only
        self.proxy_protocol = proxy_protocol   # this listener is behind a PROXY balancer
        self.returned = returned           # handed back by a fast acceptor: never offered again
        self.hand_back_to = hand_back_to   # a fast acceptor: the acceptor that handed it over
        # The state and facts of the connection (ingress.edge.connection): a lobby seat's
        # (ingress.edge.lobby), handed over on the client's first bytes (admitted, greet pause
        # done, banner written: GREETED), or a new one.
        self.handed_off = conn is not None
        self.conn = conn if conn is not None else Connection()
        if self.conn.seat is not None:     # its connect checks run: a promotion finds us
            self.conn.seat = self
        self.banner_due = True         # the next push is aiosmtpd's banner (skipped if handed_off)
        self.messages = 0
        self.last_reply = ""
        self.spf_header = ""
        self._continuation: list[bytes] = []
        self.close_after_reply = False
        self.sheds = 0
        # the transaction (set at MAIL FROM; a bulk one is admitted at its first RCPT,
        # IngressHandler.admit): a claimed retry (deferrals), admitted (the bulk cap, or not
        # bulk), deferred (451 at its first RCPT), its recipients answered 451
        self.retry_claim: Claim | None = None
        self.txn_admitted = False
        self.txn_deferred = False
        self.deferred_rcpts = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0          # the idle timeout's deadline (_reset_timeout)
        self.counters = Counters()     # errors, junk commands, MAILs (session_rules)
        self._counted_messages = 0     # self.messages when the counters last started afresh
        self._command = ""             # the command the next final reply answers
        self.cut_off = False           # 421 written: nothing more is read or answered
        self.callouts = 0              # recipient verification callouts this session caused
        self._logged = False           # the next final reply's refusal is logged already
        self.abort_handshake: Callable[[], Any] | None = None   # mTLS port, during the handshake

    # --- connection life cycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Admission at connect, before aiosmtpd builds a session, a timer and a task: when
        # thousands of bots reconnect every second, a refusal must cost as little as possible.
        # (Behind a PROXY-protocol balancer the client is known only after the header, so
        # admission waits for it in _handle_client.)
        self.abort_handshake = None
        conn = self.conn
        if self.transport is None and not self.proxy_protocol and not self.handed_off:
            conn.started = time.monotonic()
            peer = transport.get_extra_info("peername")
            if peer:
                conn.peer_ip = normalize_ip(peer[0])
                conn.peer_port = int(peer[1])
            refusal = self._classify_and_admit(transport)
            if refusal is not None:
                if refusal:                 # "": handed to a fast acceptor, which answers
                    _write_line(transport, refusal)
                transport.close()
                return
        super().connection_made(transport)
        if self._handler_coroutine is not None:
            self._handler_coroutine.add_done_callback(self._task_ended)

    def _classify_and_admit(self, transport: asyncio.BaseTransport) -> str | None:
        """Evidence at connect -> lane -> admission (classify_and_admit). Returns the refusal
        line, or None when admitted."""
        return classify_and_admit(self, self.ctx, transport, implicit_tls=self.implicit_tls,
                                  fast_only=self.fast_only,
                                  may_hand_off=not self.implicit_tls and not self.proxy_protocol
                                  and not self.returned, hand_back_to=self.hand_back_to)

    def admit_before_handshake(self, peer: tuple[Any, ...]) -> bool:
        """Mutual-TLS port (ingress.edge.mtls.MtlsListener): take a connection slot for the TCP
        connection from `peer`, before the TLS handshake, by connect-time evidence (an unproven
        client is bulk: the bulk share, the per-IP cap and rate). False: refused (the caller
        closes; no SMTP reply is possible before TLS). The ClientHello, the handshake gate and
        the handshake then have tls.handshake_timeout; a stalled connection is silent and can
        be evicted like any silent bulk session (abort_handshake)."""
        ctx, conn = self.ctx, self.conn
        conn.started = time.monotonic()
        if peer:
            conn.peer_ip = normalize_ip(peer[0])
            conn.peer_port = int(peer[1])
        conn.evidence = ctx.connect_evidence(conn.peer_ip, None, verified=False)
        conn.lane = ctx.decide(conn.evidence).lane
        refusal = ctx.admit(self)
        if refusal is not None:
            conn.fire(Event.REFUSE)
            ctx.count("refused", self.lane)
            metrics.connection(self.lane, Outcome(conn.refused_why or "draining"))
            log.refused("connection_refused", self.peer_ip, stage="connect", code="close",
                        reason=conn.refused_why or "draining", port=self.peer_port,
                        lane=self.lane.value, listener="mtls")
            return False
        conn.fire(Event.ADMIT)
        metrics.session_open(self.lane)
        return True

    def handshake_failed(self, why: str, outcome: Outcome = Outcome.TLS_FAILED,
                         quiet: bool = False) -> None:
        """The mutual-TLS handshake failed, timed out or the client went, or the handshake gate
        refused it (Outcome.TLS_BUSY, `quiet`: the gate logs those, rate-limited): give the
        slot back."""
        self.abort_handshake = None
        if self.conn.admitted:
            self._release(Event.CLOSE)
            metrics.connection(self.lane, outcome)
            if not quiet:
                log.throttled("mtls_handshake_failed", self.peer_ip, port=self.peer_port,
                              why=why[:200])

    async def _handle_client(self) -> None:
        ctx = self.ctx
        if self.proxy_protocol and not await self._proxy_header():
            return
        conn = self.conn
        deadline = ctx.cfg.smtp.session_deadline
        if self.handed_off:       # the lobby's time counts
            deadline = max(0.0, deadline - (time.monotonic() - conn.started))
        self._deadline = self.loop.call_later(deadline, self._deadline_cb)
        if not self.handed_off:
            pause_ends = time.monotonic() + ctx.cfg.admission.greet_pause
            checks = connect_checks.held(conn)   # the connect checks the banner waits for
            if checks is not None:
                await asyncio.wait({checks})     # (their own deadline bounds it)
                refusal = "" if checks.cancelled() else checks.result()
                if refusal and conn.admitted:
                    refuse_by_check(self, ctx, refusal)
                    return
            if conn.lane is Lane.BULK and pause_ends > time.monotonic():   # (a promoted
                await asyncio.sleep(pause_ends - time.monotonic())          # client: none)
            if conn.state is ConnState.EARLY_TALK:  # spoke before our banner: a bot that
                refuse_early_talker(self, ctx)      # does not listen
                return
            if conn.state is not ConnState.WAITING:  # evicted, or gone, meanwhile
                return
            conn.fire(Event.GREET)
        await super()._handle_client()

    async def _proxy_header(self) -> bool:
        """Behind an L4 balancer: the client is who the PROXY header says, if the TCP peer is a
        trusted proxy; then classification and admission. False: the connection is closed."""
        ctx, transport = self.ctx, self.transport
        assert transport is not None
        conn = self.conn
        peer = transport.get_extra_info("peername")
        conn.started = time.monotonic()
        conn.peer_ip = normalize_ip(peer[0]) if peer else ""
        conn.peer_port = int(peer[1]) if peer else 0
        if not proxy.peer_trusted(self.peer_ip, ctx.trusted_proxies):
            conn.fire(Event.REFUSE)
            metrics.connection(self.lane, Outcome.PROXY_REJECTED)
            log.refused("proxy_rejected", self.peer_ip, stage="proxy", code="close",
                        reason="untrusted_peer", port=self.peer_port, why="untrusted peer")
            transport.close()
            return False
        self._reset_timeout(proxy.PROXY_TIMEOUT)
        data = await get_proxy(self._reader)
        # The greet pause starts now: bytes the client sent after the balancer's header and
        # before our banner (already in the buffer) are early talk; the header itself is not.
        early = bool(self._reader._buffer)      # type: ignore[attr-defined]
        client = proxy.proxy_peer(peer, data, ctx.trusted_proxies)
        if client is None:
            conn.fire(Event.REFUSE)
            metrics.connection(self.lane, Outcome.PROXY_REJECTED)
            log.refused("proxy_rejected", self.peer_ip, stage="proxy", code="close",
                        reason="invalid_header", port=self.peer_port,
                        why=(data.error or "invalid")[:200])
            transport.close()
            return False
        conn.peer_ip, conn.peer_port = client
        self._reset_timeout()
        if self.session is not None:
            self.session.proxy_data = data
        refusal = self._classify_and_admit(transport)
        if refusal is not None:
            self.close_with(refusal)
            return False
        if early:
            conn.fire(Event.TALK)
        return True

    def connection_lost(self, error: Exception | None) -> None:
        self.conn.drop_checks()
        if self.transport is None:    # refused in connection_made (aiosmtpd never set up), or
            # mutual-TLS port: lost during the handshake (the slot goes back if it had one)
            self.handshake_failed(f"connection lost: {error}" if error else "connection lost")
            self._unlink()
            return
        if self._deadline is not None:
            self._deadline.cancel()
        if self.conn.admitted:
            self._release(Event.CLOSE)
            log.event("session", peer=self.peer_ip, lane=self.lane.value, messages=self.messages,
                      last_reply=self.last_reply[:3],
                      duration_ms=round((time.monotonic() - self.started) * 1000, 1))
        super().connection_lost(error)
        task = self._handler_coroutine
        if task is None or task.done():
            self._unlink()

    def _task_ended(self, _: asyncio.Task[None]) -> None:
        if self.transport is None:       # connection_lost has run
            self._unlink()

    def _unlink(self) -> None:
        """The session is over (its connection lost, its task ended): drop what closes a
        reference cycle through it (aiosmtpd's writer and connect callback, the command
        tables bound to it, the lobby seat, the ended task, whose cancellation's traceback
        holds our frames), so that reference counting frees it at once and the cyclic
        collector has nothing of it to find (ingress.core.child.settle_heap)."""
        self._handler_coroutine = None
        self._smtp_methods = self._auth_methods = _NONE  # type: ignore[assignment]
        self._client_connected_cb = self._writer = None   # type: ignore[assignment]
        self._deadline = self._timeout_handle = None
        self.abort_handshake = None
        if self.conn.seat is self:
            self.conn.seat = None

    def close_with(self, line: str) -> None:
        if self.transport is None and self.abort_handshake is not None:
            self.abort_handshake()            # mid TLS handshake: no SMTP line is possible
            return
        if self.transport is not None and not self.transport.is_closing():
            _write_line(self.transport, line)
            self.transport.close()

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            _write_line(self.transport, text(Refusal.IDLE_TIMEOUT, host=self.hostname))
            log.refused("idle_timeout", self.peer_ip, stage="session", code=421,
                        port=self.peer_port, lane=self.lane.value, messages=self.messages)
        super()._timeout_cb()

    def _deadline_cb(self) -> None:
        if self.conn.awaiting_ack:    # let the ack (bounded by smtp.ack_timeout) come first
            self._deadline = self.loop.call_later(0.1, self._deadline_cb)
            return
        log.refused("session_deadline", self.peer_ip, stage="session", code=421,
                    port=self.peer_port, lane=self.lane.value, messages=self.messages)
        self.close_with(text(Refusal.SESSION_DEADLINE, host=self.hostname))

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        state = conn.state
        if conn.busy:      # a large message on a slow link is not idle
            self._reset_timeout()
        elif state is ConnState.GREETED:       # its first words after our banner
            conn.fire(Event.SPEAK)
            self.ctx.table.spoke(self)
            connect_checks.spoke(self, self.ctx)   # a bulk client's FCrDNS starts now
        elif state is ConnState.WAITING or state is ConnState.EARLY_TALK:
            conn.fire(Event.TALK)              # before our banner: judged when the wait ends
        # CONNECTED: behind PROXY, the balancer's header (and what follows it: see
        # _proxy_header) is not the client talking; ended states: nothing to judge
        super().data_received(data)

    def evict(self, line: str, reason: str) -> None:
        """Make room now (the slot is released at once, not when the close completes)."""
        if self.conn.admitted:
            spoken = self.conn.spoken
            self._release(Event.EVICT)
            log.refused("evicted", self.peer_ip, stage="session", code=line[:3],
                        reason=reason, port=self.peer_port,
                        lane=self.lane.value, tier=self.tier.label, spoken=spoken,
                        connected_s=round(time.monotonic() - self.started, 1))
        self.close_with(line)

    def _release(self, event: Event) -> None:
        """CLOSE or EVICT: the slot goes back."""
        self.conn.fire(event)
        self.ctx.table.release(self)
        metrics.session_close(self.lane)

    def _auth_mech(self, how: tuple[str, bool]) -> _AuthMechAttr:
        """An AUTH mechanism (method name, builtin) bound: a builtin one to this session, the
        handler's to the handler."""
        name, builtin = how
        return _AuthMechAttr(getattr(self if builtin else self.ctx.handler, name), builtin)

    def _reset_timeout(self, duration: float | None = None) -> None:
        if self.conn.awaiting_ack:    # the ack wait has its own deadline (smtp.ack_timeout): a
            return               # 421 now would leave a message spooled that the client retries
        # Stress mode: while the bulk lane is saturated, bulk sessions get a short idle timeout
        # (as Postfix's stress-dependent smtpd_timeout) and get it back afterwards.
        if duration is None and self.lane is Lane.BULK:
            duration = stress_timeouts(self._timeout_duration, self.ctx.lane_saturated(Lane.BULK),
                                       self.ctx.cfg.admission.stress_idle_timeout)
        # A lazy timer (what aiosmtpd does, cancel and call_later at every command and every
        # chunk of DATA, was a few per cent of an acceptor's CPU): the deadline moves, and a
        # timer that fires before it re-arms itself for the rest (_idle_check). Only a deadline
        # earlier than the armed timer (stress mode's shorter timeout) or no live timer arms
        # a new one.
        wait = duration or self._timeout_duration
        loop = self.loop
        self._idle_deadline = deadline = loop.time() + wait
        handle = self._timeout_handle
        if handle is not None:
            if not handle.cancelled() and handle.when() <= deadline:
                return
            handle.cancel()
        self._timeout_handle = loop.call_later(wait, self._idle_check)

    def _idle_check(self) -> None:
        left = self._idle_deadline - self.loop.time()
        if left > 0.0:
            self._timeout_handle = self.loop.call_later(left, self._idle_check)
        else:
            self._timeout_cb()

    def trace_evidence(self) -> WireEvidence:
        """What the worker needs for the trace headers and the learned allow cache."""
        ev = self.evidence
        spf = bool(self.spf_header)
        return WireEvidence(
            reasons=self.reasons, cert=ev.cert.value,
            # the fast broker's share key (DRR, shares)
            identity=self.identity if self.lane is Lane.FAST else "",
            # the network was learned: the worker may unlearn it
            learned=(ev.learned_domain or "?") if ev.learned_allow else "",
            spf=ev.spf if spf else None, spf_domain=(ev.spf_domain or "") if spf else "",
            received_spf=self.spf_header).with_facts(ev.facts)   # the evidence checks' facts

    def close_if_idle(self, line: str) -> bool:
        """Used when draining: close a session between transactions, after `line` if any."""
        if self.busy or self.transport is None or self.transport.is_closing():
            return False
        if line:
            _write_line(self.transport, line)
        self.transport.close()
        return True
