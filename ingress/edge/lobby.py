"""The lobby: a cheap pre-session protocol for the plain listeners (issue 8: slots stop being
the scarce resource).

API:
    Lobby(ctx, fast_only=False)   the asyncio protocol of listen.port and listen.fast_port when
                                  they are not behind PROXY (ingress.edge.service.listeners);
                                  `ctx` is the acceptor process (ingress.edge.host.SessionHost)

A connection that has proven nothing costs a file descriptor, the kernel's socket buffers, this
object and its Connection (ingress.edge.connection; both __slots__; no StreamReader, no Task, no
aiosmtpd Session). The Connection holds the state (ingress.policy.conn_state: CONNECTED ->
WAITING -> GREETED, or EARLY_TALK, REFUSED, PASSED, EVICTED, CLOSED) and the facts (peer,
lane, evidence, identity, ticket). At connection_made it does what IngressSMTP does there
(ingress.edge.connect.classify_and_admit: the same code), then the banner waits (WAITING) for
what holds it (Connection.hold/ready: the greet pause today, one timer; the same _wait_done
path is what a connect-stage check calls when it is done) and the early-talker test
(admission.greet_pause); then it writes the 220 banner (GREETED) and arms one idle timer
(smtp.idle_timeout, also while the bulk lane is saturated: stress mode's short
timeout frees sessions, and a seat is not one; cutting silent seats early only makes their bots
reconnect, a storm on the accept queue that a fast client then waits in; when the seats are all
taken, the longest-silent one makes room instead). On the client's first bytes after the
banner it builds the IngressSMTP session with the same Connection (nothing is copied), swaps the
seat in the session table (SessionTable.swap), hands the transport over
(transport.set_protocol + connection_made: the session sees a GREETED connection, so no second
banner, no second greet pause or admission) and feeds it those bytes (pipelined commands
included).

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
from ingress.edge import connect_checks
from ingress.edge.connect import (
    banner_line,
    classify_and_admit,
    refuse_by_check,
    refuse_early_talker,
)
from ingress.edge.connection import Connection, ConnView
from ingress.edge.host import SessionHost
from ingress.edge.smtp import IngressSMTP
from ingress.policy.conn_state import ConnState, Event
from ingress.policy.replies import Refusal, text
from ingress.policy.tiers import session_tier


class Lobby(ConnView, asyncio.Protocol):
    __slots__ = ("conn", "ctx", "fast_only", "hand_back_to", "timer", "transport")

    def __init__(self, ctx: SessionHost, fast_only: bool = False,
                 hand_back_to: Any = None) -> None:
        self.ctx = ctx
        self.fast_only = fast_only
        # a fast acceptor's steered port-25 socket: handoff.ANY (when it has no room, the
        # client goes to a port-25 acceptor; ingress.core.reuseport)
        self.hand_back_to = hand_back_to
        self.transport: asyncio.Transport | None = None     # None again once handed off
        self.timer: asyncio.TimerHandle | None = None
        self.conn = Connection()     # the state and facts; the session takes this very object

    # --- the asyncio protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        conn = self.conn
        conn.started = time.monotonic()
        peer = transport.get_extra_info("peername")
        if peer:
            conn.peer_ip = normalize_ip(peer[0])
            conn.peer_port = int(peer[1])
        refusal = classify_and_admit(self, self.ctx, transport, fast_only=self.fast_only,
                                     may_hand_off=True, hand_back_to=self.hand_back_to)
        if refusal is not None:
            if refusal:              # "": handed to a fast acceptor, which answers
                self._write(refusal)
            transport.close()
            return
        pause = self.ctx.cfg.admission.greet_pause
        checks = connect_checks.held(conn)    # the connect checks it waits for (held already)
        if checks is not None:
            checks.add_done_callback(self._checked)
        conn.hold()                  # the banner waits for the greet pause (Connection.ready)
        if pause > 0 and conn.lane is Lane.BULK:
            self.timer = self.ctx.loop.call_later(pause, self._wait_done)
        else:
            self._wait_done()

    def data_received(self, data: bytes) -> None:
        state = self.conn.state
        if self.transport is None or self.transport.is_closing():
            return                   # handed off, refused, evicted, timed out, drained
        if state is ConnState.WAITING or state is ConnState.EARLY_TALK:
            self.conn.fire(Event.TALK)   # spoke before our banner: judged when the wait ends
        elif state is ConnState.GREETED:
            self._hand_off(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.conn
        conn.drop_checks()
        if self.transport is not None and conn.admitted:    # not handed off
            greeted = conn.greeted
            self._release(Event.CLOSE)
            log.event("session", peer=conn.peer_ip, lane=conn.lane.value, messages=0,
                      last_reply="220" if greeted else "",
                      duration_ms=round((time.monotonic() - conn.started) * 1000, 1))

    # --- Seat (ingress.edge.sessions) ----------------------------------------------------------

    def evict(self, line: str, reason: str) -> None:
        conn = self.conn
        if self.transport is not None and conn.admitted:
            self._release(Event.EVICT)
            log.refused("evicted", conn.peer_ip, stage="banner", code=line[:3],
                        reason=reason, port=conn.peer_port,
                        lane=conn.lane.value, tier=session_tier(conn.lane, conn.identity).label,
                        spoken=False, connected_s=round(time.monotonic() - conn.started, 1))
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

    def _release(self, event: Event) -> None:
        self.conn.fire(event)        # CLOSE or EVICT: the slot goes back
        self.conn.drop_checks()
        self.ctx.table.release(self)
        metrics.session_close(self.conn.lane)

    def _wait_done(self) -> None:
        self.timer = None
        if self.conn.ready():        # the last thing the banner waited for
            self._greet()

    def _checked(self, task: asyncio.Task[str]) -> None:
        """The connect checks the banner waited for ended (not cancelled: the seat is alive)."""
        if task.cancelled():
            return
        refusal = task.result()
        if refusal and self.transport is not None and self.conn.admitted:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            refuse_by_check(self, self.ctx, refusal)
            return
        if self.conn.lane is Lane.FAST and self.timer is not None \
                and self.conn.state is ConnState.WAITING:
            self.timer.cancel()          # promoted (a DNS allow list): the greet pause is for
            self.timer = None            # bulk clients only; its hold goes with it
            self.conn.ready()
        if self.conn.ready():
            self._greet()

    def _greet(self) -> None:
        ctx, transport, conn = self.ctx, self.transport, self.conn
        if transport is None or transport.is_closing():
            return
        if conn.state is ConnState.EARLY_TALK:   # a bot that does not listen (as IngressSMTP's)
            refuse_early_talker(self, ctx)
            return
        conn.fire(Event.GREET)
        self._write(banner_line(ctx.cfg.smtp.hostname))
        metrics.observe_banner(conn.lane, time.monotonic() - conn.started)
        # no stress timeout here (see the module docstring): a seat is cheap, a reconnect is not
        self.timer = ctx.loop.call_later(ctx.cfg.smtp.idle_timeout, self._idle)

    def _idle(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.refused("idle_timeout", self.conn.peer_ip, stage="banner", code=421,
                        port=self.conn.peer_port, lane=self.conn.lane.value)
        self.close_with(text(Refusal.IDLE_TIMEOUT, host=self.ctx.cfg.smtp.hostname))

    def _hand_off(self, data: bytes) -> None:
        """The client spoke: the full session takes the transport, the seat, the Connection
        (this very object: nothing is copied) and the bytes."""
        transport = self.transport
        assert transport is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        session = IngressSMTP(self.ctx, fast_only=self.fast_only, conn=self.conn)
        self.transport = None        # the seat is done: the session owns the connection now
        self.ctx.table.swap(self, session)
        transport.set_protocol(session)
        session.connection_made(transport)
        session.data_received(data)
