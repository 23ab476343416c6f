"""The SMTP dialogue: a thin aiosmtpd subclass, glue between aiosmtpd and our policy.

API:
    IngressSMTP(host, implicit_tls=False, fast_only=False, proxy_protocol=False)
        one instance per connection (the asyncio protocol); `host` is the acceptor process
        (ingress.edge.host.SessionHost); the aiosmtpd hooks are ingress.edge.handler.IngressHandler

What this layer adds to aiosmtpd (docs/design.md lists the aiosmtpd traps it works around):
- classification and admission in connection_made, before aiosmtpd builds anything: a refused
  connection (421 4.7.0, no banner) costs microseconds; a client of the operator or third-party
  trust tier known there is handed to a fast acceptor (ingress.edge.handoff) and served in that
  process (which gives it back, to be served here, if it cannot admit it: hand_back_to,
  returned); a fast session is admitted by its tier (ingress.policy.tiers); behind a
  PROXY-protocol balancer (per listener) they wait for the header (ingress/edge/proxy.py), and
  the greet pause and the early-talker test start after it; the fast port
  (listen.fast_port) serves fast-lane clients only;
- on the plain listeners (not behind PROXY) a connection starts in the lobby (ingress.edge.lobby)
  and the session is built on the client's first bytes: handed_off (set by the lobby) means
  admitted, greet pause done and banner written already (aiosmtpd's banner push is skipped), and the
  session deadline counts from connect;
- on the mutual-TLS port a connection takes its slot before the TLS handshake
  (admit_before_handshake; ingress.edge.mtls: the handshake gate comes after it), and a verified
  certificate promotes it after;
- a session is built from a per-process prototype (aiosmtpd's __init__ introspects the class
  and the handler on every connection: ~0.5 ms); _PER_CONNECTION is the state each session
  builds itself (test_smtp_clone checks it; hence aiosmtpd <1.5 in pyproject);
- lane state on the protocol (STARTTLS builds a new Session); evict() when slots are full;
- an early-talker test for bulk clients (554, and a penalty shared by every acceptor);
- a whole-session deadline on top of the idle timeout, and a 421 line before closing on either;
  the idle timer is re-armed by incoming bytes while DATA is being received; bulk sessions get
  admission.stress_idle_timeout while the bulk lane is saturated (admission.stress_timeouts);
- 501 5.5.2 for NUL / invalid UTF-8 / control characters in HELO, EHLO, MAIL, RCPT (aiosmtpd
  decodes them with surrogateescape whether or not the client said SMTPUTF8), and for any
  non-ASCII in a HELO/EHLO name (RFC 6531 3.7.1: A-labels only there); the decisions are
  ingress/policy/session_rules.py (pure);
- per-session error accounting in push() (every final reply passes there): the tarpit delay
  past smtp.soft_error_limit, 421 4.7.0 and a close at smtp.hard_error_limit, junk commands
  (NOOP/RSET/VRFY/HELP) and MAILs without a delivered message limited; after a 421 that closes
  the session, pipelined commands are not parsed (the handler task is cancelled, as on QUIT);
- DATA read into one bytearray in bulk (ingress.edge.smtp_data, ingress.edge.dataread; aiosmtpd
  keeps one per line, ~23x the message), charged to the acceptor's DATA budget
  (smtp.data_memory_budget; bulk never takes smtp.data_fast_reserve): a bulk DATA with the bulk
  share spent gets 452 4.3.1 at once, a message that overflows it mid-transfer is read to its end,
  dropped, and gets 452 4.3.1;
- no idle timer (stress or not) while the worker's ack is awaited: the ack wait has its own
  deadline (smtp.ack_timeout), and the session deadline waits for it;
- a per-instance command_size_limits (aiosmtpd's is a class attribute shared by all sessions
  and grows with every EHLO); AUTH is never offered (502 5.5.1);
- every reply line replies.clean()ed in push() (no client control bytes echoed, 512 octets);
  STARTTLS inside TLS refused (503 5.5.1, RFC 3207); an address the stdlib parser chokes on
  ("a@": IndexError) is malformed (553 5.1.3); multi-line replies leave in one write.

Failure modes: bad input gets an SMTP reply and a log line, never a traceback (the handler's
handle_exception answers 451 4.3.0). Limits: those of the config (smtp.*, admission.*).
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP, _AuthMechAttr, syntax

from ingress.core import log, metrics
from ingress.core.addr import normalize_ip
from ingress.core.metrics_labels import Outcome, RcptResult
from ingress.core.wire import Lane
from ingress.edge import proxy
from ingress.edge.host import SessionHost
from ingress.edge.smtp_data import DataPhase
from ingress.policy import session_rules
from ingress.policy.admission import Ticket, stress_timeouts
from ingress.policy.classify import Evidence, promote
from ingress.policy.deferrals import Claim
from ingress.policy.identity import served_over_share
from ingress.policy.replies import Refusal, clean, text
from ingress.policy.session_rules import Counters, Refused
from ingress.policy.tiers import hands_off, tier_of

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ADDRESS = re.compile(
    rf"\s*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>\s*(.*)\Z",
    re.DOTALL)

# Per-connection state that SMTP.__init__ sets and that must not be shared between sessions.
_PER_CONNECTION = frozenset({
    "_timeout_handle", "_tls_handshake_okay", "_tls_protocol", "_original_transport", "session",
    "envelope", "transport", "_handler_coroutine", "_smtp_methods", "_auth_methods",
    "command_size_limits"})


def _checked_command(name: str, check_arg: bool = True) -> Callable[..., Awaitable[None]]:
    """smtp_<name>: IngressSMTP._checked (accounting; 501 5.5.2 for a bad argument), then
    aiosmtpd's own implementation of the command."""
    base = getattr(SMTP, "smtp_" + name)

    async def command(self: IngressSMTP, arg: str | None) -> None:
        if await self._checked(name, arg if check_arg else None):
            await base(self, arg)

    command.__name__ = command.__qualname__ = "smtp_" + name
    return command



def _write_line(transport: asyncio.BaseTransport, line: str) -> None:
    """One reply line straight onto the transport (before aiosmtpd's writer exists, or after)."""
    cast(asyncio.WriteTransport, transport).write(line.encode() + b"\r\n")

def classify_and_admit(seat: Any, ctx: SessionHost, transport: asyncio.BaseTransport, *,
                       implicit_tls: bool = False, fast_only: bool = False,
                       may_hand_off: bool = False, hand_back_to: Any = None) -> str | None:
    """Evidence at connect (allow lists, learned allow, client certificate) -> lane ->
    admission, for an IngressSMTP or a lobby seat (ingress.edge.lobby.Lobby): sets seat.evidence,
    .reasons, .lane, .identity, .admitted (and .ticket, .refused_why through ctx.admit).
    Returns the refusal line, "" when a fast acceptor took the connection (may_hand_off, and
    the operator or third-party tier: ingress.edge.handoff; close it without a word) or when this
    fast acceptor could not admit a connection handed to it and gave it back to the acceptor
    `hand_back_to` (the same), or None when admitted here."""
    der = None
    if implicit_tls:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    # The TLS handshake of the mutual-TLS port succeeded, so a certificate is verified.
    seat.evidence = ctx.connect_evidence(seat.peer_ip, der, verified=der is not None)
    decision = ctx.decide(seat.evidence, peer=seat.peer_ip)
    if seat.admitted:     # mutual-TLS port: the slot was taken before the handshake
        seat.reasons = decision.reasons
        if promote(seat.lane, decision) is not seat.lane:
            seat.identity = decision.identity
            ctx.table.promote(seat)
        metrics.connection(seat.lane, Outcome.ADMITTED)
        return None
    seat.lane, seat.reasons = decision.lane, decision.reasons
    seat.identity = decision.identity
    if seat.lane is Lane.FAST and may_hand_off and hands_off(tier_of(seat.identity)) \
            and ctx.hand_off(transport):
        metrics.connection(seat.lane, Outcome.HANDED_OFF)
        return ""                       # a fast acceptor serves it (ingress.edge.handoff)
    # listen.fast_port: a fast client over its identity's share is served as bulk there too
    # (never refused for it)
    if fast_only and seat.lane is Lane.BULK and not served_over_share(decision.reasons):
        metrics.connection(seat.lane, Outcome.NOT_FAST)
        log.refused("connection_refused", seat.peer_ip, stage="connect", code=554,
                    reason=Outcome.NOT_FAST.value, port=seat.peer_port, lane=seat.lane.value)
        return text(Refusal.FAST_PORT_ONLY, host=ctx.cfg.smtp.hostname)
    refusal = ctx.admit(seat)
    if refusal is not None and hand_back_to is not None and ctx.hand_back(transport,
                                                                          hand_back_to):
        metrics.connection(seat.lane, Outcome.HANDED_BACK)
        log.throttled("handed_back", seat.peer_ip, port=seat.peer_port, lane=seat.lane.value,
                      why=seat.refused_why or "draining")
        return ""                       # served where it arrived (ingress.edge.handoff)
    if refusal is not None:
        ctx.count("refused", seat.lane)
        metrics.connection(seat.lane, Outcome(seat.refused_why or "draining"))
        log.refused("connection_refused", seat.peer_ip, stage="connect", code=refusal[:3],
                    reason=seat.refused_why or "draining", port=seat.peer_port,
                    lane=seat.lane.value)
        return refusal
    seat.admitted = True
    metrics.connection(seat.lane, Outcome.ADMITTED)
    metrics.session_open(seat.lane)
    return None


def refuse_early_talker(seat: Any, ctx: SessionHost) -> None:
    """A bulk client spoke before our banner (the greet pause): 554, and the penalty shared by
    every acceptor. For an IngressSMTP or a lobby seat (ingress.edge.lobby.Lobby)."""
    ctx.penalise(seat.peer_ip)
    ctx.count("early_talker", seat.lane)
    metrics.connection(seat.lane, Outcome.EARLY_TALKER)
    log.refused("early_talker", seat.peer_ip, stage="greet", code=554, port=seat.peer_port,
                penalty_s=ctx.cfg.admission.penalty)
    seat.close_with(text(Refusal.EARLY_TALKER))


def banner_line(hostname: str) -> str:
    """The 220 greeting (aiosmtpd's format with our ident), for a session or a lobby seat."""
    return f"220 {hostname} {IDENT}"


IDENT = "smtp-ingress"


class IngressSMTP(DataPhase):
    def __init__(self, ctx: SessionHost, implicit_tls: bool = False,
                 fast_only: bool = False, proxy_protocol: bool = False,
                 returned: bool = False, hand_back_to: Any = None) -> None:
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
            auth = tuple((m, a.method.__name__, a.is_builtin)
                         for m, a in self._auth_methods.items())
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
            self._smtp_methods = {n: getattr(self, "smtp_" + n) for n in names}
            # AUTH mechanisms of this class are bound to the session; the handler's are shared.
            self._auth_methods = {
                m: _AuthMechAttr(getattr(self if builtin else ctx.handler, fn), builtin)
                for m, fn, builtin in auth}
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.fast_only = fast_only         # listen.fast_port: fast-lane clients only
        self.proxy_protocol = proxy_protocol   # this listener is behind a PROXY balancer
        self.returned = returned           # handed back by a fast acceptor: never offered again
        self.hand_back_to = hand_back_to   # a fast acceptor: the acceptor that handed it over
        self.awaiting_proxy = proxy_protocol   # the PROXY header has not been read yet
        self.lane = Lane.BULK
        self.evidence = Evidence()
        self.reasons: tuple[str, ...] = ()
        self.identity = ""          # who vouched for the fast lane (Decision.identity)
        self.ticket: Ticket | None = None
        self.peer_ip = ""
        self.peer_port = 0
        self.admitted = False
        self.greeted = False
        self.early_talker = False
        self.busy = False              # inside DATA or waiting for the ack
        self.awaiting_ack = False      # the message is with the lane: no idle timer now
        self.messages = 0
        self.started = 0.0
        self.last_reply = ""
        self.spf_header = ""
        self.refused_why = ""
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
        self.spoken = False
        self.refused = False
        self.banner_sent = False
        self._deadline: asyncio.TimerHandle | None = None
        self.counters = Counters()     # errors, junk commands, MAILs (session_rules)
        self._counted_messages = 0     # self.messages when the counters last started afresh
        self._command = ""             # the command the next final reply answers
        self.cut_off = False           # 421 written: nothing more is read or answered
        self.callouts = 0              # recipient verification callouts this session caused
        self._logged = False           # the next final reply's refusal is logged already
        self.abort_handshake: Callable[[], Any] | None = None   # mTLS port, during the handshake
        # Built by a lobby seat (ingress.edge.lobby) on the client's first bytes: admitted, greet
        # pause done and banner written already; aiosmtpd's own banner push is skipped.
        self.handed_off = False
        self.skip_banner = False

    # --- connection life cycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Admission at connect, before aiosmtpd builds a session, a timer and a task: when
        # thousands of bots reconnect every second, a refusal must cost as little as possible.
        # (Behind a PROXY-protocol balancer the client is known only after the header, so
        # admission waits for it in _handle_client.)
        self.abort_handshake = None
        if self.transport is None and not self.proxy_protocol and not self.handed_off:
            self.started = time.monotonic()
            peer = transport.get_extra_info("peername")
            if peer:
                self.peer_ip = normalize_ip(peer[0])
                self.peer_port = int(peer[1])
            refusal = self._classify_and_admit(transport)
            if refusal is not None:
                self.refused = True
                if refusal:                 # "": handed to a fast acceptor, which answers
                    _write_line(transport, refusal)
                transport.close()
                return
        super().connection_made(transport)

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
        ctx = self.ctx
        self.started = time.monotonic()
        if peer:
            self.peer_ip = normalize_ip(peer[0])
            self.peer_port = int(peer[1])
        self.evidence = ctx.connect_evidence(self.peer_ip, None, verified=False)
        self.lane = ctx.decide(self.evidence).lane
        refusal = ctx.admit(self)
        if refusal is not None:
            ctx.count("refused", self.lane)
            metrics.connection(self.lane, Outcome(self.refused_why or "draining"))
            log.refused("connection_refused", self.peer_ip, stage="connect", code="close",
                        reason=self.refused_why or "draining", port=self.peer_port,
                        lane=self.lane.value, listener="mtls")
            return False
        self.admitted = True
        metrics.session_open(self.lane)
        return True

    def handshake_failed(self, why: str, outcome: Outcome = Outcome.TLS_FAILED,
                         quiet: bool = False) -> None:
        """The mutual-TLS handshake failed, timed out or the client went, or the handshake gate
        refused it (Outcome.TLS_BUSY, `quiet`: the gate logs those, rate-limited): give the
        slot back."""
        self.abort_handshake = None
        if self.admitted:
            self.admitted = False
            self.ctx.table.release(self)
            metrics.session_close(self.lane)
            metrics.connection(self.lane, outcome)
            if not quiet:
                log.throttled("mtls_handshake_failed", self.peer_ip, port=self.peer_port,
                              why=why[:200])

    async def _handle_client(self) -> None:
        ctx = self.ctx
        if self.proxy_protocol and not await self._proxy_header():
            return
        deadline = ctx.cfg.smtp.session_deadline
        if self.handed_off:       # the lobby's time counts
            deadline = max(0.0, deadline - (time.monotonic() - self.started))
        self._deadline = self.loop.call_later(deadline, self._deadline_cb)
        pause = ctx.cfg.admission.greet_pause
        if pause > 0 and self.lane is Lane.BULK and not self.handed_off:
            await asyncio.sleep(pause)
            if self.early_talker:     # spoke before our banner: a bot that does not listen
                refuse_early_talker(self, ctx)
                return
        self.greeted = True
        await super()._handle_client()

    async def _proxy_header(self) -> bool:
        """Behind an L4 balancer: the client is who the PROXY header says, if the TCP peer is a
        trusted proxy; then classification and admission. False: the connection is closed."""
        ctx, transport = self.ctx, self.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        self.started = time.monotonic()
        self.peer_ip = normalize_ip(peer[0]) if peer else ""
        self.peer_port = int(peer[1]) if peer else 0
        if not proxy.peer_trusted(self.peer_ip, ctx.trusted_proxies):
            metrics.connection(self.lane, Outcome.PROXY_REJECTED)
            log.refused("proxy_rejected", self.peer_ip, stage="proxy", code="close",
                        reason="untrusted_peer", port=self.peer_port, why="untrusted peer")
            transport.close()
            return False
        self._reset_timeout(proxy.PROXY_TIMEOUT)
        data = await get_proxy(self._reader)
        self.awaiting_proxy = False
        # The greet pause starts now: bytes the client sent after the balancer's header and
        # before our banner (already in the buffer) are early talk; the header itself is not.
        if self._reader._buffer:       # type: ignore[attr-defined]
            self.early_talker = True
        client = proxy.proxy_peer(peer, data, ctx.trusted_proxies)
        if client is None:
            metrics.connection(self.lane, Outcome.PROXY_REJECTED)
            log.refused("proxy_rejected", self.peer_ip, stage="proxy", code="close",
                        reason="invalid_header", port=self.peer_port,
                        why=(data.error or "invalid")[:200])
            transport.close()
            return False
        self.peer_ip, self.peer_port = client
        self._reset_timeout()
        if self.session is not None:
            self.session.proxy_data = data
        refusal = self._classify_and_admit(transport)
        if refusal is not None:
            self.close_with(refusal)
            return False
        return True

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:          # refused in connection_made: aiosmtpd never set up
            return
        if self.transport is None:    # mutual-TLS port: lost during the handshake
            self.handshake_failed(f"connection lost: {error}" if error else "connection lost")
            return
        if self._deadline is not None:
            self._deadline.cancel()
        if self.admitted:
            self.admitted = False
            self.ctx.table.release(self)
            metrics.session_close(self.lane)
            log.event("session", peer=self.peer_ip, lane=self.lane.value, messages=self.messages,
                      last_reply=self.last_reply[:3],
                      duration_ms=round((time.monotonic() - self.started) * 1000, 1))
        super().connection_lost(error)

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
        if self.awaiting_ack:    # let the ack (bounded by smtp.ack_timeout) come first
            self._deadline = self.loop.call_later(0.1, self._deadline_cb)
            return
        log.refused("session_deadline", self.peer_ip, stage="session", code=421,
                    port=self.peer_port, lane=self.lane.value, messages=self.messages)
        self.close_with(text(Refusal.SESSION_DEADLINE, host=self.hostname))

    def data_received(self, data: bytes) -> None:
        if self.busy:      # a large message on a slow link is not idle
            self._reset_timeout()
        elif self.awaiting_proxy:    # the balancer's PROXY header (and what follows it: see
            pass                     # _proxy_header) is not the client talking
        elif not self.greeted:
            self.early_talker = True
        elif not self.spoken:
            self.spoken = True
            self.ctx.table.spoke(self)
        super().data_received(data)

    def evict(self, line: str, reason: str) -> None:
        """Make room now (the slot is released at once, not when the close completes)."""
        if self.admitted:
            self.admitted = False
            self.ctx.table.release(self)
            metrics.session_close(self.lane)
            log.refused("evicted", self.peer_ip, stage="session", code=line[:3],
                        reason=reason, port=self.peer_port,
                        lane=self.lane.value, tier=self.tier.label, spoken=self.spoken,
                        connected_s=round(time.monotonic() - self.started, 1))
        self.close_with(line)

    def _reset_timeout(self, duration: float | None = None) -> None:
        if self.awaiting_ack:    # the ack wait has its own deadline (smtp.ack_timeout): a
            return               # 421 now would leave a message spooled that the client retries
        # Stress mode: while the bulk lane is saturated, bulk sessions get a short idle timeout
        # (as Postfix's stress-dependent smtpd_timeout) and get it back afterwards.
        if duration is None and self.lane is Lane.BULK:
            duration = stress_timeouts(self._timeout_duration, self.ctx.lane_saturated(Lane.BULK),
                                       self.ctx.cfg.admission.stress_idle_timeout)
        super()._reset_timeout(duration)

    def trace_evidence(self) -> dict[str, str]:
        """What the worker needs for the trace headers and the learned allow cache."""
        ev = self.evidence
        out = {"reasons": ",".join(self.reasons), "cert": ev.cert.value}
        if self.lane is Lane.FAST and self.identity:
            out["identity"] = self.identity     # the fast broker's share key (DRR, shares)
        if ev.learned_allow:      # the network was learned: the worker may unlearn it
            out["learned"] = ev.learned_domain or "?"
        if self.spf_header:
            out.update(spf=ev.spf.value, spf_domain=ev.spf_domain or "",
                       received_spf=self.spf_header)
        return out

    def close_if_idle(self, line: str) -> bool:
        """Used when draining: close a session between transactions, after `line` if any."""
        if self.busy or self.transport is None or self.transport.is_closing():
            return False
        if line:
            _write_line(self.transport, line)
        self.transport.close()
        return True

    # --- commands -----------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """As aiosmtpd's, but every line replies.clean()ed (aiosmtpd echoes client bytes), and
        the lines of a multi-line reply (EHLO) go out in one write: one system call, not seven."""
        if self.skip_banner:               # handed off by a lobby seat: it wrote the banner
            self.skip_banner = False
            return
        if not self.banner_sent:
            self.banner_sent = True
            metrics.observe_banner(self.lane, time.monotonic() - self.started)
        if isinstance(status, bytes):
            status = status.decode("utf-8", "surrogateescape")
        line = clean(status).encode("utf-8" if self.enable_SMTPUTF8 else "ascii", "replace")
        if line[3:4] == b"-":
            self._continuation.append(line + b"\r\n")
            return
        if self.cut_off:                   # pipelined commands after our 421: not answered
            await self._stop_reading()
            return
        self.last_reply = line[:3].decode("ascii", "replace")
        line += b"\r\n" + await self._account(line)
        transport = self._writer.transport
        if transport is None or transport.is_closing():
            # Closed meanwhile (aiosmtpd's own "502 ... goodbye", a deadline, the client): a
            # closed TLS transport raises on write, so nothing more is written or read.
            self._continuation.clear()
            await self._stop_reading()
            return
        if self._continuation:
            self._continuation.append(line)
            self._writer.write(b"".join(self._continuation))
            self._continuation.clear()
        else:
            self._writer.write(line)
        if self.close_after_reply and self.transport is not None:
            self.transport.close()         # after the reply: close() flushes what is written
            await self._stop_reading()
            return
        await self._writer.drain()

    async def _account(self, line: bytes) -> bytes:
        """Per-session error accounting for one final reply (session_rules.after_reply): the
        tarpit delay before it, and at the hard limit the 421 line to send after it (returned;
        the session is then closed). Counts start afresh once a message was delivered."""
        if self.messages != self._counted_messages:
            self._counted_messages = self.messages
            self.counters = session_rules.delivered(self.counters)
        command, self._command = self._command, ""
        logged, self._logged = self._logged, False
        text = line[:9].decode("ascii", "replace")
        step = session_rules.after_reply(self.counters, self.ctx.error_policy, text, command)
        if not logged and session_rules.is_error_reply(text):
            # aiosmtpd's own refusals (500, 501 syntax, 503 sequence, 555 ...) get a line too
            log.refused("command_error", self.peer_ip, stage=command.lower() or "command",
                        code=text[:3], reason="protocol", port=self.peer_port,
                        lane=self.lane.value, command=command,
                        reply=line[:80].decode("utf-8", "replace"), errors=step.counters.errors)
        self.counters = step.counters
        if step.delay > 0:
            log.throttled("error_delay", self.peer_ip, port=self.peer_port,
                          errors=step.counters.errors, delay_ms=round(step.delay * 1000, 1))
            await asyncio.sleep(step.delay)
        if not step.cut_off:
            return b""
        refusal = session_rules.cut_off_refusal(self.hostname)
        self._refused(refusal, command, why="errors", errors=step.counters.errors)
        self._logged = False
        self.close_after_reply = True
        self.last_reply = refusal.reply[:3]
        return refusal.reply.encode() + b"\r\n"

    async def _stop_reading(self) -> None:
        """After a 421 and close(): aiosmtpd would go on parsing what the client pipelined
        (already buffered, so without yielding) until connection_lost runs; stop it here, as
        its own QUIT does."""
        self.cut_off = True
        current = asyncio.current_task()
        if current is not None and current is self._handler_coroutine:
            current.cancel()
            await asyncio.sleep(0)         # the CancelledError is raised here

    def _refused(self, refusal: Refused, command: str, **fields: Any) -> str:
        """Log line, metric and close flag for one of session_rules' refusals; the reply.
        The reason token is the `why` field when there is one, else the event."""
        log.refused(refusal.event, self.peer_ip, stage=command.lower() or "command",
                    code=refusal.reply[:3],
                    reason=str(fields.get("why") or refusal.event), port=self.peer_port,
                    lane=self.lane.value, command=command, **fields)
        self._logged = True
        if isinstance(refusal.metric, RcptResult):
            metrics.recipient(self.lane, refusal.metric)
        else:
            metrics.message(self.lane, refusal.metric)
        if refusal.close:
            self.close_after_reply = True
        return refusal.reply

    async def _checked(self, command: str, arg: str | None) -> bool:
        """Every command we parse passes here first: it names the command for the accounting
        and refuses NUL, invalid UTF-8 and control characters in its argument (501 5.5.2)."""
        self._command = command
        if self.cut_off:
            await self._stop_reading()
            return False
        why = session_rules.check_argument(arg, command)
        if why is None:
            return True
        await self.push(self._refused(session_rules.argument_refusal(why, command), command,
                                      why=why, arg=repr(arg)[:200]))
        return False

    smtp_HELO = _checked_command("HELO")
    smtp_EHLO = _checked_command("EHLO")
    smtp_MAIL = _checked_command("MAIL")
    smtp_RCPT = _checked_command("RCPT")
    smtp_NOOP = _checked_command("NOOP", check_arg=False)
    smtp_RSET = _checked_command("RSET", check_arg=False)
    smtp_VRFY = _checked_command("VRFY")
    smtp_HELP = _checked_command("HELP", check_arg=False)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207 4.2: no STARTTLS inside TLS (aiosmtpd would start TLS inside TLS)."""
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common case, <dot-atom@domain> [params], without the email package's full
        RFC 5322 parser (5% of a session's CPU); anything else goes the long way, where what
        the parser raises besides HeaderParseError ("a@": IndexError) is a malformed address."""
        m = _SIMPLE_ADDRESS.match(arg) if arg else None
        if m is not None and not self.local_part_limit:
            return m.group(1), m.group(2)
        try:
            return super()._getaddr(arg)
        except (IndexError, ValueError):   # the stdlib parser on "a@": a malformed address
            return None, None               # (553 5.1.3 for MAIL/RCPT, 502 for VRFY)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an exception in a command: the handler's 451 4.3.0, told whose
        session it was (its line names the client)."""
        return cast(str, await self.ctx.handler.handle_exception(error, self))

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(text(Refusal.AUTH_NOT_OFFERED))
