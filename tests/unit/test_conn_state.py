"""ingress.policy.conn_state (the transition table) and ingress.edge.connection.Connection (the
object a lobby seat and its session share): every legal move, every illegal one, the lives a
connection really has, the derived booleans, and the banner's wait (hold/ready)."""

from __future__ import annotations

import asyncio
import types
from typing import Any, cast

import pytest

from ingress.core import config
from ingress.edge.checks import Checks
from ingress.edge.connection import Connection
from ingress.edge.handler import IngressHandler
from ingress.edge.lobby import Lobby
from ingress.edge.smtp import IngressSMTP
from ingress.policy.conn_state import (
    ADMITTED,
    BUSY,
    GREETED,
    SPOKEN,
    TRANSITIONS,
    ConnState,
    Event,
    IllegalTransition,
    advance,
)

S, E = ConnState, Event

# Every legal move, spelled out (the table must be exactly this: a new entry is a decision).
LEGAL = [
    (S.CONNECTED, E.ADMIT, S.WAITING),
    (S.CONNECTED, E.REFUSE, S.REFUSED),
    (S.CONNECTED, E.PASS, S.PASSED),
    (S.WAITING, E.TALK, S.EARLY_TALK),
    (S.WAITING, E.GREET, S.GREETED),
    (S.EARLY_TALK, E.TALK, S.EARLY_TALK),
    (S.GREETED, E.SPEAK, S.SESSION),
    (S.SESSION, E.DATA, S.IN_DATA),
    (S.IN_DATA, E.ACK_WAIT, S.AWAITING_ACK),
    (S.AWAITING_ACK, E.ACK_DONE, S.IN_DATA),
    (S.IN_DATA, E.DATA_END, S.SESSION),
    (S.WAITING, E.EVICT, S.EVICTED),
    (S.EARLY_TALK, E.EVICT, S.EVICTED),
    (S.GREETED, E.EVICT, S.EVICTED),
    (S.SESSION, E.EVICT, S.EVICTED),
    (S.WAITING, E.CLOSE, S.CLOSED),
    (S.EARLY_TALK, E.CLOSE, S.CLOSED),
    (S.GREETED, E.CLOSE, S.CLOSED),
    (S.SESSION, E.CLOSE, S.CLOSED),
    (S.IN_DATA, E.CLOSE, S.CLOSED),
    (S.AWAITING_ACK, E.CLOSE, S.CLOSED),
    *[(s, e, s) for s in (S.EVICTED, S.CLOSED)
      for e in (E.DATA, E.ACK_WAIT, E.ACK_DONE, E.DATA_END)],
]


@pytest.mark.parametrize("state, event, after", LEGAL)
def test_legal_transition(state: ConnState, event: Event, after: ConnState) -> None:
    assert advance(state, event) is after


def test_the_table_is_exactly_the_legal_list() -> None:
    assert {(s, e): a for s, e, a in LEGAL} == TRANSITIONS


ILLEGAL = [(s, e) for s in ConnState for e in Event if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize("state, event", ILLEGAL)
def test_illegal_transition_raises(state: ConnState, event: Event) -> None:
    with pytest.raises(IllegalTransition, match=f"{event.value} in {state.value}"):
        advance(state, event)


@pytest.mark.parametrize("state, event", [
    (S.CONNECTED, E.GREET),          # a banner before admission
    (S.EARLY_TALK, E.GREET),         # an early talker is refused, never greeted
    (S.IN_DATA, E.EVICT),            # a busy session is never evicted
    (S.AWAITING_ACK, E.EVICT),
    (S.REFUSED, E.CLOSE),            # it never held a slot: nothing to give back
    (S.PASSED, E.CLOSE),
    (S.EVICTED, E.CLOSE),            # the slot is given back once
    (S.CLOSED, E.EVICT),
    (S.GREETED, E.DATA),             # DATA before a word was said
    (S.AWAITING_ACK, E.DATA_END),    # the ack's end comes first (ACK_DONE)
])
def test_the_moves_that_would_be_bugs(state: ConnState, event: Event) -> None:
    assert (state, event) in ILLEGAL


@pytest.mark.parametrize("events, end", [
    ([E.REFUSE], S.REFUSED),                                    # refused at connect
    ([E.PASS], S.PASSED),                                       # to a fast acceptor
    ([E.ADMIT, E.TALK, E.TALK, E.CLOSE], S.CLOSED),             # an early talker
    ([E.ADMIT, E.GREET, E.EVICT], S.EVICTED),                   # a silent bot evicted
    ([E.ADMIT, E.GREET, E.SPEAK, E.DATA, E.ACK_WAIT, E.ACK_DONE, E.DATA_END,
      E.DATA, E.DATA_END, E.CLOSE], S.CLOSED),                  # two messages (one refused)
    ([E.ADMIT, E.GREET, E.SPEAK, E.DATA, E.ACK_WAIT, E.CLOSE,
      E.ACK_DONE, E.DATA_END], S.CLOSED),                       # gone while its ack was awaited
    ([E.ADMIT, E.GREET, E.SPEAK, E.EVICT, E.DATA, E.DATA_END], S.EVICTED),
])
def test_lives(events: list[Event], end: ConnState) -> None:
    conn = Connection()
    for event in events:
        conn.fire(event)
    assert conn.state is end


@pytest.mark.parametrize("state", list(ConnState))
def test_derived_booleans(state: ConnState) -> None:
    conn = Connection()
    conn.state = state
    assert conn.admitted is (state in ADMITTED)
    assert conn.greeted is (state in GREETED)
    assert conn.spoken is (state in SPOKEN)
    assert conn.busy is (state in BUSY)
    assert conn.early_talker is (state is S.EARLY_TALK)
    assert conn.awaiting_ack is (state is S.AWAITING_ACK)
    assert not (conn.busy and not conn.spoken) and not (conn.spoken and not conn.greeted)


def test_the_banner_waits_for_every_hold() -> None:
    conn = Connection()
    conn.fire(E.ADMIT)
    conn.hold()                      # the greet pause
    conn.hold()                      # connect-stage checks (the lead's next change)
    assert not conn.ready()          # the pause is over, the checks are not
    assert conn.ready()              # the checks are done (or their deadline passed): greet
    assert not conn.ready()          # a late duplicate does not greet twice


@pytest.mark.parametrize("state, greets", [
    (S.WAITING, True), (S.EARLY_TALK, True),       # the caller greets or refuses the talker
    (S.EVICTED, False), (S.CLOSED, False),         # gone meanwhile: nothing to do
])
def test_ready_only_while_waiting(state: ConnState, greets: bool) -> None:
    conn = Connection()
    conn.hold()
    conn.state = state
    assert conn.ready() is greets


def test_drop_checks_cancels_the_pending_tasks() -> None:
    class Task:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    conn, held, other = Connection(), Task(), Task()
    conn.checks = (held, other)
    conn.seat = object()
    conn.drop_checks()
    assert held.cancelled and other.cancelled
    assert conn.checks == () and conn.seat is None      # no reference cycle is left
    conn.drop_checks()               # idempotent


def test_connection_and_seat_are_small() -> None:
    conn = Connection()
    assert not hasattr(conn, "__dict__")
    seat = Lobby(cast(Any, object()))
    assert not hasattr(seat, "__dict__")
    assert seat.conn.state is S.CONNECTED and seat.peer_ip == "" and not seat.admitted


# --- no client input moves the state illegally -----------------------------------------------

class FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("state", [s for s in ConnState if s is not S.GREETED])
def test_lobby_bytes_in_any_state(state: ConnState) -> None:
    """Bytes at any moment of a seat's life (GREETED hands off: the integration tests) never
    raise: before the banner they mark an early talker, otherwise they are ignored."""
    seat = Lobby(cast(Any, object()))
    seat.transport = cast(Any, FakeTransport())
    seat.conn.state = state
    for _ in range(3):
        seat.data_received(b"EHLO x\r\n")
    waiting = state in (S.WAITING, S.EARLY_TALK)
    assert seat.conn.state is (S.EARLY_TALK if waiting else state)


@pytest.mark.parametrize("state", list(ConnState))
def test_session_bytes_in_any_state(state: ConnState) -> None:
    """The same for an IngressSMTP (the PROXY and mutual-TLS listeners, and after a hand-off):
    bytes before the banner mark an early talker, the first after it SPEAK, and none raises."""
    loop = asyncio.new_event_loop()
    try:
        spoke: list[object] = []
        ctx = types.SimpleNamespace(cfg=config.load(None), smtp_prototypes={}, tls_context=None,
                                    loop=loop, table=types.SimpleNamespace(spoke=spoke.append),
                                    lane_saturated=lambda lane: False, checks=Checks((), 1.0))
        ctx.handler = IngressHandler(ctx)  # type: ignore[arg-type]
        session = IngressSMTP(cast(Any, ctx))
        session.conn.state = state
        for _ in range(3):
            session.data_received(b"EHLO x\r\n")
        after = {S.WAITING: S.EARLY_TALK, S.GREETED: S.SESSION}.get(state, state)
        assert session.conn.state is after
        assert spoke == ([session] if state is S.GREETED else [])
    finally:
        loop.close()
