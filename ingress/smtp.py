"""The SMTP dialogue: a thin aiosmtpd subclass plus the hooks that apply our policy.

API:
    Session context: AcceptorContext (the per-process state the acceptor builds; see acceptor.py)
    IngressSMTP(ctx)   one instance per connection (the asyncio protocol)

What this layer adds to aiosmtpd (docs/design.md lists the aiosmtpd traps it works around):
- classification and admission in connection_made, before aiosmtpd builds anything: a refused
  connection (421 4.7.0, no banner) costs microseconds; behind a PROXY-protocol balancer (per
  listener: IngressSMTP(proxy_protocol=...)) they wait for the header, and the greet pause and
  the early-talker test start after it; the fast port (listen.fast_port) serves fast-lane
  clients only;
- on the mutual-TLS port a connection takes its slot before the TLS handshake
  (admit_before_handshake; acceptor.MtlsListener), and a verified certificate promotes it after;
- a session is built from a per-process prototype (aiosmtpd's __init__ introspects the class
  and the handler on every connection: ~0.5 ms);
- lane state on the protocol instance (STARTTLS builds a new Session); SPF at MAIL FROM can
  promote it;
- bulk over its cap is shed at MAIL FROM with a tarpit (451 4.7.1 after shed_delay) and a
  per-session limit (421); slots full: the longest-silent bulk session is evicted;
- an early-talker test for bulk clients (554, and a penalty shared by every acceptor);
- a whole-session deadline on top of the idle timeout, and a 421 line before closing on either;
  the idle timer is re-armed by incoming bytes while DATA is being received;
- EHLO advertises PIPELINING (aiosmtpd supports but does not advertise it) and never AUTH;
- the decisions on command arguments and the per-session limits are ingress/policy/session_rules.py
  (pure); this layer applies them: 501 5.5.2 for NUL / invalid UTF-8 / control characters in
  HELO, EHLO, MAIL, RCPT (aiosmtpd decodes them with surrogateescape whether or not the client
  said SMTPUTF8), 553 5.6.7 for non-ASCII addresses without SMTPUTF8, RCPT only for accepted
  domains (550 5.7.1) with no sender-specified routing in the local part (% ! @), the recipient
  map (550 5.1.1), at most max_recipients (452 4.5.3), a bare <postmaster> stored as
  postmaster@<first accepted domain>; optional recipient verification against the downstream
  (ingress/rcpt_verify.py: 550 5.1.1 / 450 4.1.1), at most smtp.verify_per_session callouts;
- per-session error accounting in push() (every final reply passes there): the tarpit delay
  past smtp.soft_error_limit, 421 4.7.0 and a close at smtp.hard_error_limit, junk commands
  (NOOP/RSET/VRFY/HELP) and MAILs without a delivered message limited; after a 421 that closes
  the session, pipelined commands are not parsed (the handler task is cancelled, as on QUIT);
- DATA read into one bytearray in bulk (ingress.dataread; aiosmtpd keeps one per line, ~23x the
  message), charged to the acceptor's DATA budget (smtp.data_memory_budget; bulk never takes
  smtp.data_fast_reserve): a bulk DATA with the bulk share spent gets 452 4.3.1 at once, a
  message that overflows it mid-transfer is read to its end, dropped, and gets 452 4.3.1;
- no idle timer (stress or not) while the worker's ack is awaited: the ack wait has its own
  deadline (smtp.ack_timeout), and the session deadline waits for it;
- bare CR or LF in DATA -> 550 5.6.0 (SMTP smuggling);
- after DATA the message goes to the lane broker; 250 only on the worker's ACK (durable);
  a NACK, a timeout or an unreachable broker -> 451;
- any exception -> 451 4.3.0 and a log line (aiosmtpd's default is a 500 with internals);
- a per-instance command_size_limits (aiosmtpd's is a class attribute shared by all sessions
  and grows with every EHLO);
- the lines of a multi-line reply (EHLO) leave in one write; <addr> parsing has a fast path.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import MISSING, SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from ingress import proxy
from ingress.core import log, metrics
from ingress.core.wire import Envelope, Lane, new_qid
from ingress.dataread import DataReader, DataState
from ingress.evidence import received_spf_header, spf_identity
from ingress.policy import replies, session_rules
from ingress.policy.admission import Ticket
from ingress.policy.classify import AuthResult, Evidence, normalize_ip
from ingress.policy.session_rules import Counters, Refusal
from ingress.rcpt_verify import Answer

if TYPE_CHECKING:
    from ingress.acceptor import AcceptorContext


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ADDRESS = re.compile(
    rf"\s*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>\s*(.*)\Z",
    re.DOTALL)

# Per-connection state that SMTP.__init__ sets and that must not be shared between sessions.
_PER_CONNECTION = frozenset({
    "_timeout_handle", "_tls_handshake_okay", "_tls_protocol", "_original_transport", "session",
    "envelope", "transport", "_handler_coroutine", "_smtp_methods", "command_size_limits"})


class IngressSMTP(SMTP):
    def __init__(self, ctx: AcceptorContext, implicit_tls: bool = False,
                 fast_only: bool = False, proxy_protocol: bool = False) -> None:
        # aiosmtpd's SMTP.__init__ introspects the handler and the class on every connection
        # (inspect.getmembers, dir(), inspect.signature): ~0.5 ms, more than the rest of a
        # one-message session costs here. It is run once per (acceptor, listener kind); every
        # later connection copies that configuration and builds only its own stream state.
        proto = ctx.smtp_prototypes.get(implicit_tls)
        if proto is None:
            s = ctx.cfg.smtp
            super().__init__(
                ctx.handler, hostname=s.hostname, ident="smtp-ingress",
                data_size_limit=s.max_message_size, enable_SMTPUTF8=True, decode_data=False,
                timeout=s.idle_timeout, tls_context=None if implicit_tls else ctx.tls_context,
                loop=ctx.loop,
            )
            stream_keys = set(asyncio.StreamReaderProtocol(
                asyncio.StreamReader(loop=ctx.loop), client_connected_cb=self._cb_client_connected,
                loop=ctx.loop).__dict__)
            shared = {k: v for k, v in self.__dict__.items()
                      if k not in stream_keys and k not in _PER_CONNECTION}
            ctx.smtp_prototypes[implicit_tls] = (shared, tuple(self._smtp_methods))
        else:
            shared, names = proto
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
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.fast_only = fast_only         # listen.fast_port: fast-lane clients only
        self.proxy_protocol = proxy_protocol   # this listener is behind a PROXY balancer
        self.awaiting_proxy = proxy_protocol   # the PROXY header has not been read yet
        self.lane = Lane.BULK
        self.evidence = Evidence()
        self.reasons: tuple[str, ...] = ()
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

    # --- connection life cycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Admission at connect, before aiosmtpd builds a session, a timer and a task: when
        # thousands of bots reconnect every second, a refusal must cost as little as possible.
        # (Behind a PROXY-protocol balancer the client is known only after the header, so
        # admission waits for it in _handle_client.)
        self.abort_handshake = None
        if self.transport is None and not self.proxy_protocol:
            self.started = time.monotonic()
            peer = transport.get_extra_info("peername")
            if peer:
                self.peer_ip = normalize_ip(peer[0])
                self.peer_port = int(peer[1])
            refusal = self._classify_and_admit(transport)
            if refusal is not None:
                self.refused = True
                transport.write(refusal.encode() + b"\r\n")
                transport.close()
                return
        super().connection_made(transport)

    def _classify_and_admit(self, transport: asyncio.BaseTransport) -> str | None:
        """Evidence at connect (allow lists, learned allow, client certificate) -> lane ->
        admission. Returns the refusal line, or None when admitted."""
        ctx = self.ctx
        der = None
        if self.implicit_tls:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        # The TLS handshake of the mutual-TLS port succeeded, so a certificate is verified.
        self.evidence = ctx.connect_evidence(self.peer_ip, der, verified=der is not None)
        decision = ctx.decide(self.evidence)
        if self.admitted:     # mutual-TLS port: the slot was taken before the handshake
            self.reasons = decision.reasons
            if decision.lane is Lane.FAST and self.lane is Lane.BULK:
                ctx.promote(self)
            metrics.connection(self.lane, "admitted")
            return None
        self.lane, self.reasons = decision.lane, decision.reasons
        if self.fast_only and self.lane is Lane.BULK:
            metrics.connection(self.lane, "not_fast")
            return replies.FAST_PORT_ONLY.format(host=self.hostname)
        refusal = ctx.admit(self)
        if refusal is not None:
            ctx.count("refused", self.lane)
            metrics.connection(self.lane, self.refused_why or "draining")
            return refusal
        self.admitted = True
        metrics.connection(self.lane, "admitted")
        metrics.session_open(self.lane)
        return None

    def admit_before_handshake(self, peer: tuple[Any, ...]) -> bool:
        """Mutual-TLS port (MtlsListener): take a connection slot for the TCP connection from
        `peer`, before the TLS handshake, by connect-time evidence (an unproven client is bulk:
        the bulk share, the per-IP cap and rate). False: refused (the caller closes; no SMTP
        reply is possible before TLS). The handshake then has tls.handshake_timeout; a stalled
        one is silent and can be evicted like any silent bulk session (abort_handshake)."""
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
            metrics.connection(self.lane, self.refused_why or "draining")
            log.event("mtls_refused", "debug", peer=self.peer_ip, why=self.refused_why)
            return False
        self.admitted = True
        metrics.session_open(self.lane)
        return True

    def handshake_failed(self, why: str) -> None:
        """The mutual-TLS handshake failed, timed out or the client went: give the slot back."""
        self.abort_handshake = None
        if self.admitted:
            self.admitted = False
            self.ctx.release(self)
            metrics.session_close(self.lane)
            metrics.connection(self.lane, "tls_failed")
            log.event("mtls_handshake_failed", "info", peer=self.peer_ip, why=why[:200])

    async def _handle_client(self) -> None:
        ctx = self.ctx
        if self.proxy_protocol and not await self._proxy_header():
            return
        self._deadline = self.loop.call_later(ctx.cfg.smtp.session_deadline, self._deadline_cb)
        pause = ctx.cfg.admission.greet_pause
        if pause > 0 and self.lane is Lane.BULK:
            await asyncio.sleep(pause)
            if self.early_talker:     # spoke before our banner: a bot that does not listen
                ctx.penalise(self.peer_ip)
                ctx.count("early_talker", self.lane)
                metrics.connection(self.lane, "early_talker")
                log.event("early_talker", peer=self.peer_ip)
                self._close_with(replies.EARLY_TALKER)
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
            metrics.connection(self.lane, "proxy_rejected")
            log.event("proxy_rejected", peer=self.peer_ip, why="untrusted peer")
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
            metrics.connection(self.lane, "proxy_rejected")
            log.event("proxy_rejected", peer=self.peer_ip, why=data.error or "invalid")
            transport.close()
            return False
        self.peer_ip, self.peer_port = client
        self._reset_timeout()
        if self.session is not None:
            self.session.proxy_data = data
        refusal = self._classify_and_admit(transport)
        if refusal is not None:
            self._close_with(refusal)
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
            self.ctx.release(self)
            metrics.session_close(self.lane)
            log.event("session", peer=self.peer_ip, lane=self.lane.value, messages=self.messages,
                      last_reply=self.last_reply[:3],
                      duration_ms=round((time.monotonic() - self.started) * 1000, 1))
        super().connection_lost(error)

    def _close_with(self, line: str) -> None:
        if self.transport is None and self.abort_handshake is not None:
            self.abort_handshake()            # mid TLS handshake: no SMTP line is possible
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line.encode() + b"\r\n")
            self.transport.close()

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(replies.IDLE_TIMEOUT.format(host=self.hostname).encode() + b"\r\n")
        super()._timeout_cb()

    def _deadline_cb(self) -> None:
        if self.awaiting_ack:    # let the ack (bounded by smtp.ack_timeout) come first
            self._deadline = self.loop.call_later(0.1, self._deadline_cb)
            return
        log.event("session_deadline", "info", peer=self.peer_ip, lane=self.lane.value)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(
                replies.SESSION_DEADLINE.format(host=self.hostname).encode() + b"\r\n")
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.busy:      # a large message on a slow link is not idle
            self._reset_timeout()
        elif self.awaiting_proxy:    # the balancer's PROXY header (and what follows it: see
            pass                     # _proxy_header) is not the client talking
        elif not self.greeted:
            self.early_talker = True
        elif not self.spoken:
            self.spoken = True
            self.ctx.spoke(self)
        super().data_received(data)

    def evict(self, line: str) -> None:
        """Make room now (the slot is released at once, not when the close completes)."""
        if self.admitted:
            self.admitted = False
            self.ctx.release(self)
            metrics.session_close(self.lane)
            log.event("evicted", peer=self.peer_ip, lane=self.lane.value,
                      silent_s=round(time.monotonic() - self.started, 1))
        self._close_with(line)

    def _reset_timeout(self, duration: float | None = None) -> None:
        if self.awaiting_ack:    # the ack wait has its own deadline (smtp.ack_timeout): a
            return               # 421 now would leave a message spooled that the client retries
        # Stress mode: while the bulk lane is saturated, bulk sessions get a short idle timeout
        # (as Postfix's stress-dependent smtpd_timeout) and get it back afterwards.
        if duration is None and self.lane is Lane.BULK and self.ctx.lane_saturated(Lane.BULK):
            duration = min(self._timeout_duration, self.ctx.cfg.admission.stress_idle_timeout)
        super()._reset_timeout(duration)

    def trace_evidence(self) -> dict[str, str]:
        """What the worker needs for the trace headers and the learned allow cache."""
        ev = self.evidence
        out = {"reasons": ",".join(self.reasons), "cert": ev.cert.value}
        if self.spf_header:
            out.update(spf=ev.spf.value, spf_domain=ev.spf_domain or "",
                       received_spf=self.spf_header)
        return out

    def close_if_idle(self, line: str) -> bool:
        """Used when draining: close a session between transactions, after `line` if any."""
        if self.busy or self.transport is None or self.transport.is_closing():
            return False
        if line:
            self.transport.write(line.encode() + b"\r\n")
        self.transport.close()
        return True

    # --- commands -----------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """As aiosmtpd's, but the lines of a multi-line reply (EHLO) go out in one write:
        one system call instead of seven, the largest single cost of a short session."""
        if not self.banner_sent:
            self.banner_sent = True
            metrics.observe_banner(self.lane, time.monotonic() - self.started)
        line = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") \
            if isinstance(status, str) else status
        if line[3:4] == b"-":
            self._continuation.append(line + b"\r\n")
            return
        if self.cut_off:                   # pipelined commands after our 421: not answered
            await self._stop_reading()
            return
        self.last_reply = line[:3].decode("ascii", "replace")
        line += b"\r\n" + await self._account(line)
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
            log.event("command_error", peer=self.peer_ip, lane=self.lane.value,
                      command=command, reply=line[:80].decode("utf-8", "replace"),
                      errors=step.counters.errors)
        self.counters = step.counters
        if step.delay > 0:
            log.event("error_delay", peer=self.peer_ip,
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
        task = self._handler_coroutine
        if task is not None and task is asyncio.current_task():
            task.cancel()
            await asyncio.sleep(0)         # the CancelledError is raised here

    def _refused(self, refusal: Refusal, command: str, **fields: object) -> str:
        """Log line, metric and close flag for one of session_rules' refusals; the reply."""
        log.event(refusal.event, peer=self.peer_ip, lane=self.lane.value, command=command,
                  **fields)
        self._logged = True
        if refusal.metric in metrics.RCPT_RESULTS:
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
        why = session_rules.check_argument(arg)
        if why is None:
            return True
        await self.push(self._refused(session_rules.argument_refusal(why, command), command,
                                      why=why, arg=repr(arg)[:200]))
        return False

    async def smtp_HELO(self, hostname: str) -> None:
        if await self._checked("HELO", hostname):
            await super().smtp_HELO(hostname)

    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._checked("EHLO", hostname):
            await super().smtp_EHLO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._checked("MAIL", arg):
            await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._checked("RCPT", arg):
            await super().smtp_RCPT(arg)

    async def smtp_NOOP(self, arg: str) -> None:
        if await self._checked("NOOP", None):
            await super().smtp_NOOP(arg)

    async def smtp_RSET(self, arg: str) -> None:
        if await self._checked("RSET", None):
            await super().smtp_RSET(arg)

    async def smtp_VRFY(self, arg: str) -> None:
        if await self._checked("VRFY", arg):
            await super().smtp_VRFY(arg)

    async def smtp_HELP(self, arg: str) -> None:
        if await self._checked("HELP", None):
            await super().smtp_HELP(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common case, <dot-atom@domain> [params], without the email package's full
        RFC 5322 parser (5% of a session's CPU); anything else goes the long way."""
        m = _SIMPLE_ADDRESS.match(arg) if arg else None
        if m is not None and not self.local_part_limit:
            return m.group(1), m.group(2)
        return super()._getaddr(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's smtp_DATA (same checks, replies and end-of-data, dot-unstuffing,
        line-length and size semantics), but the message is read into one bytearray in bulk
        (ingress.dataread) and charged to the acceptor's DATA budget; the idle timers are off
        while the worker's ack is awaited (the ack wait has its own deadline)."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        budget = self.ctx.data_budget
        if self.lane is Lane.BULK and budget.bulk_full():
            self.ctx.count("data_no_storage", self.lane)
            log.event("data_no_storage", peer=self.peer_ip, lane=self.lane.value, at="DATA")
            await self.push(replies.DATA_NO_STORAGE)
            return
        self.busy = True
        reader = DataReader(self.data_size_limit, budget, self.lane, self.line_length_limit)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            if not await self._read_data(reader):
                return
            if reader.state is not DataState.NOMINAL:
                if reader.state is DataState.TOO_LONG:
                    await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
                elif reader.state is DataState.TOO_MUCH:
                    await self.push("552 Error: Too much mail data")
                else:
                    self.ctx.count("data_no_storage", self.lane)
                    log.event("data_no_storage", peer=self.peer_ip, lane=self.lane.value,
                              at="end of data", size=reader.total)
                    await self.push(replies.DATA_NO_STORAGE)
                self._set_post_data_state()
                return
            content = reader.content()
            self.envelope.content = content
            self.envelope.original_content = content
            self.awaiting_ack = True
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            try:
                status = await self._call_handler_hook("DATA")
            finally:
                self.awaiting_ack = False
                self.envelope.content = self.envelope.original_content = None
                self._reset_timeout()       # the idle timer again, whatever happened
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            reader.release()
            self.busy = False

    async def _read_data(self, reader: DataReader) -> bool:
        """Feed the stream buffer to `reader` until the end of data. False: the connection
        is gone (aiosmtpd's eof_received cancels this task in the same case)."""
        stream = self._reader
        buf: bytearray = stream._buffer           # type: ignore[attr-defined]
        while True:
            if stream._exception is not None:     # type: ignore[attr-defined]
                raise stream._exception           # type: ignore[attr-defined]
            if buf:
                n, done = reader.feed(buf)
                if n:
                    del buf[:n]
                    stream._maybe_resume_transport()  # type: ignore[attr-defined]
                if done:
                    return True
            if stream.at_eof() or stream._eof:    # type: ignore[attr-defined]
                return False
            try:
                await stream._wait_for_data("smtp_DATA")  # type: ignore[attr-defined]
            except asyncio.CancelledError:
                self._writer.close()              # the connection was reset during DATA
                raise

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(replies.AUTH_NOT_OFFERED)


class IngressHandler:
    """aiosmtpd hooks. One instance per acceptor process; per-session state is on the protocol."""

    def __init__(self, ctx: AcceptorContext) -> None:
        self.ctx = ctx

    async def handle_EHLO(self, server: IngressSMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses if not r[4:].startswith(("AUTH", "HELP"))]
        out.insert(1, "250-PIPELINING")
        out.append("250 ENHANCEDSTATUSCODES")
        return out

    async def handle_MAIL(self, server: IngressSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if self.ctx.draining:      # no new transaction on a draining acceptor: come back later
            self.ctx.loop.call_soon(server.close_if_idle, "")
            return replies.SHUTTING_DOWN.format(host=server.hostname)
        ctx = self.ctx
        refusal = session_rules.mail_verdict(address, bool(envelope.smtp_utf8)) \
            or session_rules.before_mail(server.counters, ctx.error_policy, server.hostname)
        if refusal is not None:
            why = {"why": "mail_without_data"} if refusal.close else {}
            return server._refused(refusal, "MAIL", sender=address[:200], **why)
        server.evidence = replace(server.evidence, spf=AuthResult.NONE, spf_domain=None)
        server.spf_header = ""
        # SPF can only promote, so a session already in the fast lane never waits for DNS.
        if ctx.resolver is not None and server.lane is Lane.BULK:
            result, why = await ctx.spf(server, address, session.host_name or "")
            _, domain = spf_identity(address, session.host_name or "")
            server.evidence = server.evidence.with_spf(result, domain or None)
            server.spf_header = received_spf_header(
                result, client_ip=server.peer_ip, mail_from=address,
                helo=session.host_name or "", receiver=server.hostname,
                explanation=why).decode("ascii", "replace")
            decision = ctx.decide(server.evidence)
            if decision.lane is Lane.FAST and server.lane is Lane.BULK:
                ctx.promote(server)
                server.reasons = decision.reasons
                ctx.count("promoted", Lane.FAST)
                log.event("promoted", peer=server.peer_ip, reasons=",".join(decision.reasons))
        if server.lane is Lane.BULK and not ctx.bulk_mail_admitted():
            return await self.shed(server)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        server.counters = session_rules.mail_accepted(server.counters)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: IngressSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        ctx = self.ctx
        verdict = session_rules.rcpt_verdict(
            address, smtputf8=bool(envelope.smtp_utf8), domains=ctx.domains,
            primary_domain=ctx.cfg.smtp.accepted_domains[0], recipients=ctx.recipients,
            accepted=len(envelope.rcpt_tos), max_recipients=ctx.cfg.smtp.max_recipients)
        refusal = verdict.refusal
        if refusal is None and verdict.verify and ctx.verifier is not None:
            refusal = session_rules.verify_verdict(verdict.address,
                                                   await self.verify(server, verdict.address))
        if refusal is not None:
            return server._refused(refusal, "RCPT", rcpt=verdict.address[:200])
        address = verdict.address
        metrics.recipient(server.lane, "accepted")
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def verify(self, server: IngressSMTP, address: str) -> Answer:
        """The downstream's answer for `address`: cached, or a callout if this session has not
        used up smtp.verify_per_session (then TEMPFAIL: 450, never an amplifier)."""
        verifier = self.ctx.verifier
        assert verifier is not None
        hit = verifier.cached(address)
        if hit is not None:
            return hit
        if server.callouts >= self.ctx.cfg.smtp.verify_per_session:
            log.event("verify_session_cap", peer=server.peer_ip, rcpt=address[:200])
            return Answer.TEMPFAIL
        server.callouts += 1
        return await verifier.verify(address, bool(server.envelope and server.envelope.smtp_utf8))

    async def handle_DATA(self, server: IngressSMTP, session: Session,
                          envelope: SmtpEnvelope) -> str:
        body: bytes = envelope.original_content or b""
        n_lf = body.count(b"\n")
        if n_lf != body.count(b"\r") or n_lf != body.count(b"\r\n"):
            log.event("bare_line_ending", peer=server.peer_ip, lane=server.lane.value)
            metrics.message(server.lane, "rejected")
            return replies.BARE_LINE_ENDING
        ctx = self.ctx
        now = time.time()
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        tls = str(ssl_object.version() or "TLS") if ssl_object is not None else ""
        env = Envelope(
            qid=new_qid(now), lane=server.lane, peer_ip=server.peer_ip,
            peer_port=server.peer_port, helo=session.host_name or "",
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            rcpts=tuple(envelope.rcpt_tos),
            received_at=now, deadline=now + ctx.cfg.smtp.ack_timeout, acceptor=ctx.ident,
            smtputf8=bool(envelope.smtp_utf8), tls=tls, evidence=server.trace_evidence(),
        )
        t0 = time.monotonic()
        reply, why = await ctx.submit(env, body)
        ms = round((time.monotonic() - t0) * 1000, 2)
        metrics.observe_ack(server.lane, time.monotonic() - t0)
        metrics.message(server.lane, "accepted" if reply is not None and reply.ok
                        else "tempfailed")
        if reply is not None and reply.ok:
            server.messages += 1
            ctx.count("accepted", server.lane)
            log.event("message", qid=env.qid, peer=server.peer_ip, lane=env.lane.value,
                      size=len(body), rcpts=len(env.rcpts), reply="250", ack_ms=ms,
                      reasons=env.evidence.get("reasons", ""), spf=env.evidence.get("spf", ""))
            return replies.QUEUED.format(qid=env.qid)
        ctx.count("tempfail", server.lane)
        log.event("message", qid=env.qid, peer=server.peer_ip, lane=env.lane.value,
                  size=len(body), rcpts=len(env.rcpts), reply="451", why=why, ack_ms=ms)
        if reply is not None and reply.reason is not None and reply.reason.value == "rate":
            return await self.shed(server)
        return replies.NOT_QUEUED.format(why=why)

    async def shed(self, server: IngressSMTP) -> str:
        """Refuse a bulk transaction over the cap, cheaply for us and expensively for a bot:
        the 451 comes after admission.shed_delay (a tarpit, like Postfix's error sleep, so a
        spam loop costs us a few commands a second instead of thousands), and the
        admission.shed_limit-th refusal in a session is 421 and a close."""
        a = self.ctx.cfg.admission
        server.sheds += 1
        self.ctx.count("shed", server.lane)
        metrics.message(server.lane, "shed")
        if server.sheds >= a.shed_limit:
            server.close_after_reply = True
            return replies.LANE_BUSY_CLOSING.format(host=server.hostname)
        if a.shed_delay > 0:
            await asyncio.sleep(a.shed_delay)
        return replies.LANE_BUSY

    async def handle_exception(self, error: Exception) -> str:
        log.get().error("smtp_exception", exc_info=error,
                        extra={"fields": {"error": type(error).__name__}})
        return replies.INTERNAL_ERROR
