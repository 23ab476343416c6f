"""A connection's life as a state machine (pure; h11's style): one explicit state, and a
transition table that says which event may move it where.

API:
    ConnState          the states (below)
    Event              what happens to a connection (below)
    TRANSITIONS        {(state, event): next state}: every legal move, and nothing else
    advance(state, event) -> ConnState   the next state; IllegalTransition when the table has
                       no such move
    IllegalTransition  RuntimeError: a bug in the caller, never a client's doing (see below)
    ADMITTED, GREETED, SPOKEN, BUSY, ENDED   frozensets of states: what the booleans of the
                       lobby and the session were (ingress.edge.connection derives them)

The states (ingress.edge.connection.Connection holds one; ingress.edge.lobby and
ingress.edge.smtp move it):
    CONNECTED      TCP is up (or, behind PROXY, the header is awaited); nothing decided yet
    REFUSED        refused at connect (421/554, PROXY rejected): it never held a slot
    PASSED         handed to another acceptor (ingress.edge.handoff): served there, not here
    WAITING        admitted (holds a slot), before the banner: the greet pause, and whatever
                   else the banner waits for (Connection.hold / ready)
    EARLY_TALK     admitted, and it spoke before our banner: refused when the wait ends
    GREETED        the 220 banner is written; silent so far (a lobby seat, or a session)
    SESSION        it has spoken: an SMTP dialogue, between transactions
    IN_DATA        reading a message (DATA): busy, never evicted or drained
    AWAITING_ACK   the message is with the lane, its ack awaited: busy, no idle timer
    EVICTED        its slot was taken for another (421 4.4.2 / 4.7.0): released at once
    CLOSED         the connection went (or was closed) and its slot was released

Events: ADMIT, REFUSE, PASS (connect); TALK (bytes before the banner), GREET (the banner),
SPEAK (the first bytes after it); DATA, ACK_WAIT, ACK_DONE, DATA_END (a message); EVICT,
CLOSE (the slot goes back). Only an admitted connection is evicted or closed through the
table: one that never held a slot ends in REFUSED or PASSED (or stays CONNECTED when it goes
before a decision).

Why a client cannot cause an IllegalTransition: the callers fire TALK, GREET and SPEAK only
after testing the state (bytes in any other state are ignored or fed to the dialogue); the
dialogue's coroutine may still finish a DATA after its connection went, so DATA, ACK_WAIT,
ACK_DONE and DATA_END are self-loops in EVICTED and CLOSED; EVICT is never fired on a busy
connection (the session table picks only silent or idle ones) and CLOSE/EVICT only while
admitted. The unit
tests (tests/unit/test_conn_state.py) walk every entry of the table and some illegal moves.

Failure modes: IllegalTransition only (a bug). Limits: none; no I/O, no clock.
"""

from __future__ import annotations

import enum


class ConnState(enum.Enum):
    CONNECTED = "connected"
    REFUSED = "refused"
    PASSED = "passed"
    WAITING = "waiting"
    EARLY_TALK = "early_talk"
    GREETED = "greeted"
    SESSION = "session"
    IN_DATA = "in_data"
    AWAITING_ACK = "awaiting_ack"
    EVICTED = "evicted"
    CLOSED = "closed"


class Event(enum.Enum):
    ADMIT = "admit"
    REFUSE = "refuse"
    PASS = "pass"
    TALK = "talk"
    GREET = "greet"
    SPEAK = "speak"
    DATA = "data"
    ACK_WAIT = "ack_wait"
    ACK_DONE = "ack_done"
    DATA_END = "data_end"
    EVICT = "evict"
    CLOSE = "close"


class IllegalTransition(RuntimeError):
    """A move the table does not have: a bug in the caller (never a client's doing)."""

    def __init__(self, state: ConnState, event: Event) -> None:
        super().__init__(f"illegal connection transition: {event.value} in {state.value}")
        self.state, self.event = state, event


S, E = ConnState, Event

ADMITTED = frozenset({S.WAITING, S.EARLY_TALK, S.GREETED, S.SESSION, S.IN_DATA,
                      S.AWAITING_ACK})
GREETED = frozenset({S.GREETED, S.SESSION, S.IN_DATA, S.AWAITING_ACK})
SPOKEN = frozenset({S.SESSION, S.IN_DATA, S.AWAITING_ACK})
BUSY = frozenset({S.IN_DATA, S.AWAITING_ACK})
ENDED = frozenset({S.REFUSED, S.PASSED, S.EVICTED, S.CLOSED})

TRANSITIONS: dict[tuple[ConnState, Event], ConnState] = {
    (S.CONNECTED, E.ADMIT): S.WAITING,
    (S.CONNECTED, E.REFUSE): S.REFUSED,
    (S.CONNECTED, E.PASS): S.PASSED,
    (S.WAITING, E.TALK): S.EARLY_TALK,
    (S.WAITING, E.GREET): S.GREETED,
    (S.EARLY_TALK, E.TALK): S.EARLY_TALK,
    (S.GREETED, E.SPEAK): S.SESSION,
    (S.SESSION, E.DATA): S.IN_DATA,
    (S.IN_DATA, E.ACK_WAIT): S.AWAITING_ACK,
    (S.AWAITING_ACK, E.ACK_DONE): S.IN_DATA,
    (S.IN_DATA, E.DATA_END): S.SESSION,
    # an idle admitted connection may lose its slot to another; a busy one never does
    **{(s, E.EVICT): S.EVICTED for s in (S.WAITING, S.EARLY_TALK, S.GREETED, S.SESSION)},
    **{(s, E.CLOSE): S.CLOSED for s in ADMITTED},
    # the dialogue's coroutine finishes its DATA after the connection went
    **{(s, e): s for s in (S.EVICTED, S.CLOSED)
       for e in (E.DATA, E.ACK_WAIT, E.ACK_DONE, E.DATA_END)},
}


def advance(state: ConnState, event: Event) -> ConnState:
    """The state after `event` in `state`; IllegalTransition when the table has no such move."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(state, event) from None
