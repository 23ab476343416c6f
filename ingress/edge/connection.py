"""One connection's state and facts: the object a lobby seat (ingress.edge.lobby.Lobby) and the
SMTP session (ingress.edge.smtp.IngressSMTP) share. The seat hands it to the session on the
client's first bytes; nothing is copied.

API:
    Connection()       __slots__ only (a lobby seat must stay cheap):
        state          ingress.policy.conn_state.ConnState; moved only by fire(event), which
                       raises IllegalTransition on a move the table does not have (a bug)
        peer_ip, peer_port, started (monotonic, at connect), lane, evidence, reasons,
        identity (who vouched for the fast lane), ticket (the admission's), refused_why
                       the facts ingress.edge.connect.classify_and_admit, the session table
                       (ingress.edge.sessions) and the handler (ingress.edge.handler) read and
                       move (promote/demote: lane, identity; SPF: evidence, reasons)
        admitted, greeted, spoken, early_talker, busy, awaiting_ack
                       derived from the state (ingress.policy.conn_state: ADMITTED, ...)
        hold(), ready() -> bool
                       what the banner waits for: each condition (the greet pause today;
                       connect-stage checks, with their deadline, later) holds it once and
                       calls ready() once when met; ready() is True for the call that met the
                       last one while the connection still waits (WAITING or EARLY_TALK): that
                       caller writes the banner (or refuses an early talker). Evidence that
                       arrives meanwhile promotes in place (SessionTable.promote), any time.
        checks         the pending tasks of its connect-stage checks (ingress.edge.
                       connect_checks: the ones the banner waits for, the others);
                       drop_checks() cancels them (the connection went)
        seat           the protocol that holds it while its checks run (the lobby seat, then
                       the session: the session table's key, for a promotion in place); None
                       otherwise (no reference cycle outlives the checks)
    ConnView           mixin: read-only views of the facts (peer_ip, lane, ...) on the protocol
                       that holds `conn`, for log lines; every write goes through `conn`

Failure modes: IllegalTransition (a bug, never a client's doing: see ingress.policy.conn_state).
Limits: a dozen slots, no per-instance dict.
"""

from __future__ import annotations

from typing import Any

from ingress.core.wire import Lane
from ingress.policy.admission import Ticket
from ingress.policy.classify import Evidence
from ingress.policy.conn_state import (
    ADMITTED,
    BUSY,
    GREETED,
    SPOKEN,
    ConnState,
    Event,
    advance,
)

_NO_EVIDENCE = Evidence()      # frozen: shared by every connection until its own is set


class Connection:
    __slots__ = ("checks", "evidence", "holds", "identity", "lane", "peer_ip", "peer_port",
                 "reasons", "refused_why", "seat", "started", "state", "ticket")

    def __init__(self) -> None:
        self.state = ConnState.CONNECTED
        self.peer_ip = ""
        self.peer_port = 0
        self.started = 0.0
        self.lane = Lane.BULK
        self.evidence = _NO_EVIDENCE
        self.reasons: tuple[str, ...] = ()
        self.identity = ""
        self.ticket: Ticket | None = None
        self.refused_why = ""
        self.holds = 0
        self.checks: tuple[Any, ...] = ()
        self.seat: Any = None

    def fire(self, event: Event) -> ConnState:
        self.state = advance(self.state, event)
        return self.state

    @property
    def admitted(self) -> bool:
        return self.state in ADMITTED

    @property
    def greeted(self) -> bool:
        return self.state in GREETED

    @property
    def spoken(self) -> bool:
        return self.state in SPOKEN

    @property
    def early_talker(self) -> bool:
        return self.state is ConnState.EARLY_TALK

    @property
    def busy(self) -> bool:
        return self.state in BUSY

    @property
    def awaiting_ack(self) -> bool:
        return self.state is ConnState.AWAITING_ACK

    # --- what the banner waits for ----------------------------------------------------------

    def hold(self) -> None:
        self.holds += 1

    def ready(self) -> bool:
        if self.holds <= 0:          # nothing held it (or a condition met twice): not again
            return False
        self.holds -= 1
        return self.holds == 0 and self.state in (ConnState.WAITING, ConnState.EARLY_TALK)

    def drop_checks(self) -> None:
        for task in self.checks:
            task.cancel()
        self.checks = ()
        self.seat = None


class ConnView:
    """Read-only views of a protocol's Connection (`conn`)."""

    __slots__ = ()
    conn: Connection

    @property
    def peer_ip(self) -> str:
        return self.conn.peer_ip

    @property
    def peer_port(self) -> int:
        return self.conn.peer_port

    @property
    def started(self) -> float:
        return self.conn.started

    @property
    def lane(self) -> Lane:
        return self.conn.lane

    @property
    def identity(self) -> str:
        return self.conn.identity

    @property
    def evidence(self) -> Evidence:
        return self.conn.evidence

    @property
    def reasons(self) -> tuple[str, ...]:
        return self.conn.reasons

    @property
    def admitted(self) -> bool:
        return self.conn.admitted

    @property
    def busy(self) -> bool:
        return self.conn.busy
