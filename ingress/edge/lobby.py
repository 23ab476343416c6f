"""The lobby: a cheap pre-session protocol for the plain listeners (issue 8: slots stop being
the scarce resource).

API:
    Lobby(ctx, fast_only=False)   the asyncio protocol of listen.port and listen.fast_port when
                                  they are not behind PROXY (ingress.edge.service.listeners);
                                  `ctx` is the acceptor process (ingress.edge.host.SessionHost)

A connection that has proven nothing costs a file descriptor, the kernel's socket buffers and
this object (__slots__; no StreamReader, no Task, no aiosmtpd Session). At connection_made it
does what IngressSMTP does there (ingress.edge.connect.classify_and_admit: the same code), the greet
pause and early-talker test (admission.greet_pause, one timer), writes the 220 banner and arms
one idle timer (smtp.idle_timeout, also while the bulk lane is saturated: stress mode's short
timeout frees sessions, and a seat is not one; cutting silent seats early only makes their bots
reconnect, a storm on the accept queue that a fast client then waits in; when the seats are all
taken, the longest-silent one makes room instead). On the client's first bytes after the
banner it builds the IngressSMTP session, swaps the seat in the session table
(SessionTable.swap), hands the transport over
(transport.set_protocol + connection_made with IngressSMTP.handed_off: no second banner, no
second greet pause or admission) and feeds it those bytes (pipelined commands included).

A lobby seat is a Seat of ingress.edge.sessions: it is admitted, evicted (the longest-silent bulk
seat, 421 4.4.2), drained (close_if_idle: always idle; close_with) and penalised (an early
talker) exactly as a session; it opens and closes the lane's session gauge and logs `session`
when it ends without having been handed off.

Failure modes: none raised; a client that goes before speaking only frees its slot. Limits: the
idle timer bounds a seat's life (then 421 4.4.2); the session deadline, counted from connect,
applies after the hand-off.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from ingress.core import log, metrics
from ingress.core.addr import normalize_ip
from ingress.core.wire import Lane
from ingress.edge.connect import banner_line, classify_and_admit, refuse_early_talker
from ingress.edge.host import SessionHost
from ingress.edge.smtp import IngressSMTP
from ingress.policy.admission import Ticket
from ingress.policy.classify import Evidence
from ingress.policy.replies import Refusal, text
from ingress.policy.tiers import session_tier


class Lobby(asyncio.Protocol):
    __slots__ = ("admitted", "ctx", "early_talker", "evidence", "fast_only", "greeted",
                 "hand_back_to", "handed", "identity", "lane", "peer_ip", "peer_port",
                 "reasons", "refused_why", "started", "ticket", "timer", "transport")

    busy = False                     # a seat is always between transactions (Seat.busy)

    def __init__(self, ctx: SessionHost, fast_only: bool = False,
                 hand_back_to: Any = None) -> None:
        self.ctx = ctx
        self.fast_only = fast_only
        # a fast acceptor's steered port-25 socket: handoff.ANY (when it has no room, the
        # client goes to a port-25 acceptor; ingress.core.reuseport)
        self.hand_back_to = hand_back_to
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.lane = Lane.BULK
        self.evidence = Evidence()
        self.reasons: tuple[str, ...] = ()
        self.identity = ""           # who vouched for a fast seat (ingress.policy.identity)
        self.ticket: Ticket | None = None
        self.refused_why = ""
        self.peer_ip = ""
        self.peer_port = 0
        self.started = 0.0
        self.admitted = False
        self.greeted = False
        self.early_talker = False
        self.handed = False          # the transport belongs to an IngressSMTP now

    # --- the asyncio protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.started = time.monotonic()
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = normalize_ip(peer[0])
            self.peer_port = int(peer[1])
        refusal = classify_and_admit(self, self.ctx, transport, fast_only=self.fast_only,
                                     may_hand_off=True, hand_back_to=self.hand_back_to)
        if refusal is not None:
            if refusal:              # "": handed to a fast acceptor, which answers
                self._write(refusal)
            transport.close()
            return
        pause = self.ctx.cfg.admission.greet_pause
        if pause > 0 and self.lane is Lane.BULK:
            self.timer = self.ctx.loop.call_later(pause, self._greet)
        else:
            self._greet()

    def data_received(self, data: bytes) -> None:
        if not self.admitted or self.handed or self.transport is None \
                or self.transport.is_closing():     # refused, evicted, timed out, drained
            return
        if not self.greeted:         # spoke before our banner: judged when the pause ends
            self.early_talker = True
            return
        self._hand_off(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.admitted and not self.handed:
            self._release()
            log.event("session", peer=self.peer_ip, lane=self.lane.value, messages=0,
                      last_reply="220" if self.greeted else "",
                      duration_ms=round((time.monotonic() - self.started) * 1000, 1))

    # --- Seat (ingress.edge.sessions) ----------------------------------------------------------

    def evict(self, line: str, reason: str) -> None:
        if self.admitted:
            self._release()
            log.refused("evicted", self.peer_ip, stage="banner", code=line[:3],
                        reason=reason, port=self.peer_port,
                        lane=self.lane.value, tier=session_tier(self.lane, self.identity).label,
                        spoken=False, connected_s=round(time.monotonic() - self.started, 1))
        self.close_with(line)

    def close_if_idle(self, line: str) -> bool:
        """Draining: a lobby seat is always between transactions."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.close_with(line)
        return True

    def close_with(self, line: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if line:
                self._write(line)
            self.transport.close()

    # --- internals ------------------------------------------------------------------------

    def _write(self, line: str) -> None:
        assert self.transport is not None
        self.transport.write(line.encode() + b"\r\n")

    def _release(self) -> None:
        self.admitted = False
        self.ctx.table.release(self)
        metrics.session_close(self.lane)

    def _greet(self) -> None:
        ctx, transport = self.ctx, self.transport
        self.timer = None
        if transport is None or transport.is_closing():
            return
        if self.early_talker:        # a bot that does not listen (as IngressSMTP's test)
            refuse_early_talker(self, ctx)
            return
        self.greeted = True
        self._write(banner_line(ctx.cfg.smtp.hostname))
        metrics.observe_banner(self.lane, time.monotonic() - self.started)
        # no stress timeout here (see the module docstring): a seat is cheap, a reconnect is not
        self.timer = ctx.loop.call_later(ctx.cfg.smtp.idle_timeout, self._idle)

    def _idle(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.refused("idle_timeout", self.peer_ip, stage="banner", code=421,
                        port=self.peer_port, lane=self.lane.value)
        self.close_with(text(Refusal.IDLE_TIMEOUT, host=self.ctx.cfg.smtp.hostname))

    def _hand_off(self, data: bytes) -> None:
        """The client spoke: the full session takes the transport, the seat and the bytes."""
        transport = self.transport
        assert transport is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        session = IngressSMTP(self.ctx, fast_only=self.fast_only)
        for name in ("lane", "evidence", "reasons", "identity", "ticket", "peer_ip",
                     "peer_port", "started", "admitted", "refused_why"):
            setattr(session, name, getattr(self, name))
        session.handed_off = session.skip_banner = True
        session.greeted = session.banner_sent = True
        self.handed = True
        self.ctx.table.swap(self, session)
        transport.set_protocol(session)
        session.connection_made(transport)
        session.data_received(data)
