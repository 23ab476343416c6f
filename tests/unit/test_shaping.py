"""Bulk shaping by a DNS block-list score (issue 18 item 3; ingress.policy.shaping): the listed
rule, the eviction order of silent seats, the listed per-IP cap in admission (at the verdict and,
for a key remembered listed, at admission), and no retry bypass for a listed client. Pure tables
first; then the shells (SessionTable with fake seats, connect_checks.apply, RetryRecords) with
the real objects: until the DNS block-list check is on main a client cannot be listed through
DNS end to end, so a verdict is handed to the shell as the check would hand it."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ingress.core import config
from ingress.core.ratelimit import TokenBucket
from ingress.core.wire import Lane
from ingress.edge import connect_checks
from ingress.edge.connection import Connection
from ingress.edge.retries import RetryRecords
from ingress.edge.sessions import SessionTable
from ingress.policy.admission import Admission, AdmissionLimits, Refusal
from ingress.policy.checks import Verdict
from ingress.policy.classify import Decision
from ingress.policy.conn_state import ConnState, Event
from ingress.policy.replies import Refusal as Reply
from ingress.policy.replies import text
from ingress.policy.session_rules import pick_eviction
from ingress.policy.shaping import SilentSeats, listed
from ingress.policy.tiers import Tier
from tests.kit.harness import write_config

# --- the listed rule ------------------------------------------------------------------------


@pytest.mark.parametrize(("score", "threshold", "want"), [
    (0.0, 1.0, False),          # no zone listed it
    (0.5, 1.0, False),          # below the threshold
    (1.0, 1.0, True),           # at it
    (3.0, 1.0, True),
    (0.0, 0.0001, False),       # a score of 0 never lists, whatever the threshold
])
def test_listed(score: float, threshold: float, want: bool) -> None:
    assert listed(score, threshold) is want


# --- the eviction order -----------------------------------------------------------------------


def seats(unlisted: dict[str, float], marks: list[tuple[str, float]]) -> SilentSeats[str]:
    s: SilentSeats[str] = SilentSeats()
    for k, since in unlisted.items():
        s.add(k, since)
    for k, score in marks:
        s.mark(k, score)
    return s


@pytest.mark.parametrize(("unlisted", "marks", "heads"), [
    ({}, [], []),
    ({"a": 1, "b": 2}, [], ["a"]),                                 # the longest silent
    ({"a": 1, "b": 2, "c": 3}, [("c", 1.0)], ["c", "a"]),          # listed before unlisted
    ({"a": 1, "b": 2, "c": 3}, [("b", 1.0), ("c", 2.0)], ["c", "b", "a"]),   # by score
    ({"a": 1, "b": 2, "c": 3}, [("c", 1.0), ("b", 1.0)], ["c", "a"]),   # one class: listing order
    ({"a": 1, "b": 2}, [("a", 1.0), ("a", 3.0)], ["a", "b"]),      # a higher score moves it
    ({"a": 1, "b": 2}, [("a", 3.0), ("a", 1.0)], ["a", "b"]),      # a lower one does not
    ({"a": 1}, [("zz", 5.0)], ["a"]),                              # not silent here: no-op
])
def test_silent_heads(unlisted: dict[str, float], marks: list[tuple[str, float]],
                      heads: list[str]) -> None:
    s = seats(unlisted, marks)
    assert [k for k, _ in s.heads()] == heads
    assert len(s) == len(unlisted)


def test_silent_pop_empties_classes() -> None:
    s = seats({"a": 1, "b": 2, "c": 3}, [("a", 2.0), ("b", 1.0)])
    assert s.listed_count == 2 and s.score("a") == 2.0 and s.score("c") == 0.0
    assert s.pop("a") == 1 and s.pop("a") is None
    assert [k for k, _ in s.heads()] == ["b", "c"]
    assert s.pop("b") == 2 and s.pop("c") == 3
    assert len(s) == 0 and list(s.heads()) == [] and not s._classes and not s._scores
    assert "a" not in s


def bucket() -> TokenBucket:
    return TokenBucket(100.0, 100.0, now=0.0)


@pytest.mark.parametrize(("unlisted", "marks", "now", "after", "victim"), [
    ({"a": 1, "b": 2}, [("b", 1.0)], 10, 0, "b"),                  # listed first
    ({"a": 1, "b": 2, "c": 3}, [("b", 1.0), ("c", 4.0)], 10, 0, "c"),   # highest score first
    ({"a": 1, "b": 9}, [("b", 1.0)], 10, 5, "a"),      # listed, but not silent long enough
    ({"a": 8, "b": 9}, [("b", 1.0)], 10, 5, None),     # nobody silent long enough
    ({"a": 1, "b": 2}, [("a", 1.0), ("b", 2.0)], 10, 5, "b"),
])
def test_pick_eviction_listed_first(unlisted: dict[str, float], marks: list[tuple[str, float]],
                                    now: float, after: float, victim: str | None) -> None:
    s = seats(unlisted, marks)
    assert pick_eviction(s.heads(), now, silent_after=after, bucket=bucket()) == victim
    assert pick_eviction(s.heads(), now, silent_after=after, bucket=None) is None


# --- the listed per-IP cap in admission ---------------------------------------------------------


def adm(listed_max: int = 1, ttl: float = 300.0, per_ip: int = 20) -> Admission:
    return Admission(AdmissionLimits(max_connections=100, fast_reserve=10, per_ip_bulk_max=per_ip,
                                     per_ip_rate=0, per_ip_burst=1, listed_per_ip_max=listed_max,
                                     listed_ttl=ttl))


@pytest.mark.parametrize(("listed_max", "marked", "over"), [
    (1, 1, [False]),
    (1, 2, [False, True]),          # the second listed session is over: closed
    (2, 3, [False, False, True]),
    (0, 3, [False, False, False]),  # 0: no listed cap
])
def test_mark_listed_over(listed_max: int, marked: int, over: list[bool]) -> None:
    a = adm(listed_max)
    tickets = [a.try_admit("192.0.2.1", Lane.BULK, 0.0).ticket for _ in range(marked)]
    assert [a.mark_listed(t, 1.0) for t in tickets if t] == over
    assert a.listed_for("192.0.2.1") == marked


def test_known_listed_refused_at_admission() -> None:
    """A key remembered listed is refused over the cap before any verdict: every bulk session
    of the key counts (a burst of connections waits for no DNS), with the per-IP line."""
    a = adm(listed_max=1, ttl=60.0)
    t = a.try_admit("192.0.2.1", Lane.BULK, 0.0).ticket
    assert t is not None and not a.mark_listed(t, 0.0)
    v = a.try_admit("192.0.2.1", Lane.BULK, 1.0)
    assert not v.admitted and v.reason is Refusal.LISTED_PER_IP
    assert v.reply == text(Reply.PER_IP)
    assert a.try_admit("192.0.2.2", Lane.BULK, 1.0).admitted      # another key: not affected
    assert a.is_listed("192.0.2.1", 59.0) and not a.is_listed("192.0.2.1", 60.0)
    assert a.try_admit("192.0.2.1", Lane.BULK, 61.0).admitted     # forgotten after listed_ttl
    a.release(t)


def test_known_listed_room_again_after_release() -> None:
    a = adm(listed_max=1, ttl=60.0)
    t = a.try_admit("192.0.2.1", Lane.BULK, 0.0).ticket
    assert t is not None
    a.mark_listed(t, 0.0)
    a.release(t)
    assert a.listed_for("192.0.2.1") == 0
    assert a.try_admit("192.0.2.1", Lane.BULK, 1.0).admitted


def test_listed_not_remembered_with_ttl_0() -> None:
    a = adm(listed_max=1, ttl=0.0)
    t = a.try_admit("192.0.2.1", Lane.BULK, 0.0).ticket
    assert t is not None
    a.mark_listed(t, 0.0)
    assert not a.is_listed("192.0.2.1", 0.0)
    assert a.try_admit("192.0.2.1", Lane.BULK, 1.0).admitted      # the verdict decides


def test_listed_promote_demote_accounting() -> None:
    a = adm(listed_max=1)
    t = a.try_admit("192.0.2.1", Lane.BULK, 0.0).ticket
    assert t is not None
    a.mark_listed(t, 0.0)
    a.promote(t, Tier.SELF_PROVEN)                 # evidence only promotes: it stops counting
    assert a.listed_for("192.0.2.1") == 0
    assert not a.mark_listed(t, 0.0)               # a fast session is never marked
    a.demote(t)
    assert a.listed_for("192.0.2.1") == 1
    a.release(t)
    a.release(t)                                   # idempotent
    assert a.listed_for("192.0.2.1") == 0 and a.bulk_in_use == 0


def test_listed_per_ip_key_is_admissions() -> None:
    """IPv6: the /64 is one key (an address rotated inside it is the same client)."""
    a = adm(listed_max=1)
    t = a.try_admit("2001:db8::1", Lane.BULK, 0.0).ticket
    assert t is not None
    a.mark_listed(t, 0.0)
    assert a.try_admit("2001:db8::ffff", Lane.BULK, 1.0).reason is Refusal.LISTED_PER_IP
    assert a.try_admit("2001:db8:0:1::1", Lane.BULK, 1.0).admitted


def test_remembered_listed_keys_are_bounded() -> None:
    a = Admission(AdmissionLimits(max_connections=100, fast_reserve=0, per_ip_bulk_max=20,
                                  per_ip_rate=0, per_ip_burst=1, max_tracked_ips=4,
                                  listed_per_ip_max=1, listed_ttl=60.0))
    for i in range(50):
        t = a.try_admit(f"192.0.2.{i}", Lane.BULK, float(i)).ticket
        assert t is not None
        a.mark_listed(t, float(i))
        a.release(t)
    assert len(a._listed_keys) <= 4


# --- the session table (fake seats, the real table) -------------------------------------------


class FakeSeat:
    def __init__(self, ip: str) -> None:
        self.conn = Connection()
        self.conn.peer_ip = ip
        self.evicted: tuple[str, str] | None = None
        self.table: SessionTable | None = None

    def evict(self, line: str, reason: str) -> None:
        self.evicted = (line, reason)
        self.conn.fire(Event.EVICT)
        assert self.table is not None
        self.table.release(self)

    def close_if_idle(self, line: str) -> bool:
        return True

    def close_with(self, line: str) -> None:
        pass


def session_table(tmp_path: Path, slots: int = 6, **dnsbl: object) -> SessionTable:
    write_config(tmp_path / "c.toml", {"smtp": {"max_connections": slots, "fast_reserve": 1},
                                       "dnsbl": dict(dnsbl)})
    return SessionTable(config.load(tmp_path / "c.toml"), Counter(), now=0.0)


def admit(t: SessionTable, ip: str, now: float) -> FakeSeat:
    s = FakeSeat(ip)
    s.table = t
    assert t.admit(s, draining=False, now=now) is None, s.conn.refused_why
    s.conn.fire(Event.ADMIT)
    return s


def test_newcomer_evicts_listed_first(tmp_path: Path) -> None:
    """2 listed + 3 unlisted silent bots fill the bulk slots (listed after the unlisted ones,
    and scored after admission): newcomers evict the listed ones first, the higher score
    first, then the longest-silent unlisted one."""
    t = session_table(tmp_path)                 # 6 slots, 1 reserved: 5 bulk
    unlisted = [admit(t, f"192.0.2.{i}", float(i)) for i in range(3)]
    low, high = admit(t, "198.51.100.1", 10.0), admit(t, "198.51.100.2", 11.0)
    assert not t.shape(low, 1.0, 12.0) and not t.shape(high, 3.0, 12.0)
    order = []
    for i in range(3):
        admit(t, f"203.0.113.{i}", 20.0 + i)
        order.append(next(s for s in (low, high, *unlisted) if s.evicted and s not in order))
    assert order == [high, low, unlisted[0]]
    assert high.evicted == (text(Reply.EVICTED_SILENT, host=t.cfg.smtp.hostname),
                            "silent_listed")
    assert unlisted[0].evicted is not None and unlisted[0].evicted[1] == "silent"
    assert t.counters["evicted_listed"] == 2 and t.counters["evicted_silent"] == 3


def test_listed_that_spoke_is_not_evicted_for_silence(tmp_path: Path) -> None:
    t = session_table(tmp_path, slots=3)        # 2 bulk
    talker, quiet = admit(t, "198.51.100.1", 0.0), admit(t, "192.0.2.1", 1.0)
    t.shape(talker, 5.0, 2.0)
    t.spoke(talker)
    admit(t, "203.0.113.1", 3.0)
    assert talker.evicted is None and quiet.evicted is not None


def test_listed_over_per_ip_closed_then_refused_at_admission(tmp_path: Path) -> None:
    t = session_table(tmp_path, slots=20, listed_per_ip_max=1, listed_ttl=300.0)
    first, second = admit(t, "198.51.100.1", 0.0), admit(t, "198.51.100.1", 0.1)
    assert not t.shape(first, 2.0, 0.5)         # the first listed one keeps its seat
    assert t.shape(second, 2.0, 0.6)            # the second is over: the caller closes it
    t.close_listed(second)
    assert second.evicted == (text(Reply.PER_IP), "listed_per_ip")
    assert t.admission.listed_for("198.51.100.1") == 1
    s = FakeSeat("198.51.100.1")                # later: refused before any DNS
    assert t.admit(s, draining=False, now=1.0) == text(Reply.PER_IP)
    assert s.conn.refused_why == "listed-per-ip"
    assert t.counters["refused_listed-per-ip"] == 2
    admit(t, "198.51.100.2", 1.0)               # another client: not affected
    assert first.evicted is None


def test_shape_ignores_fast_and_gone_seats(tmp_path: Path) -> None:
    t = session_table(tmp_path, slots=20, listed_per_ip_max=1)
    s = admit(t, "198.51.100.1", 0.0)
    t.release(s)
    assert not t.shape(s, 5.0, 1.0) and s not in t.silent


# --- connect_checks.apply: the verdict reaches the table --------------------------------------


class Ctx:
    """What apply() uses of the acceptor (ingress.edge.host.SessionHost): the real table."""

    def __init__(self, table: SessionTable) -> None:
        self.table, self.cfg = table, table.cfg
        self.counted: Counter[str] = Counter()

    def decide(self, evidence: Any, peer: str = "") -> Decision:
        return Decision(Lane.BULK, ("bulk",))

    def count(self, what: str, lane: Lane) -> None:
        self.counted[what] += 1


def waiting(t: SessionTable, ip: str, now: float) -> FakeSeat:
    s = admit(t, ip, now)
    s.conn.seat = s
    return s


def test_apply_shapes_a_listed_verdict(tmp_path: Path) -> None:
    t = session_table(tmp_path, slots=20, threshold=2.0, listed_per_ip_max=1)
    ctx: Any = Ctx(t)
    a, b, c = (waiting(t, "198.51.100.1", 0.0), waiting(t, "198.51.100.1", 0.0),
               waiting(t, "192.0.2.9", 0.0))
    assert a.conn.state is ConnState.WAITING
    assert connect_checks.apply(a.conn, ctx, Verdict(score=1.0)) == ""   # below the threshold
    assert t.silent.score(a) == 0.0
    assert connect_checks.apply(a.conn, ctx, Verdict(score=1.5)) == ""   # 2.5 in all: listed
    assert t.silent.score(a) == 2.5 and a.evicted is None
    assert connect_checks.apply(b.conn, ctx, Verdict(score=2.0)) == ""   # the second: closed
    assert b.evicted == (text(Reply.PER_IP), "listed_per_ip")
    assert connect_checks.apply(c.conn, ctx, Verdict()) == "" and c.evicted is None


# --- no retry bypass for a listed client --------------------------------------------------------


class Lanes:
    def __init__(self) -> None:
        self.shared: list[bytes] = []

    def share_record(self, fact: bytes, doc: dict[str, object]) -> None:
        self.shared.append(fact)

    def retry_mail_admitted(self) -> bool:
        return True


def retries(tmp_path: Path) -> tuple[RetryRecords, Lanes]:
    write_config(tmp_path / "r.toml", {"admission": {"retry_min_delay": 0.0,
                                                     "retry_share": 0.5}})
    lanes = Lanes()
    return RetryRecords(config.load(tmp_path / "r.toml"), "a1", lanes), lanes  # type: ignore[arg-type]


def test_listed_deferral_records_nothing(tmp_path: Path) -> None:
    r, lanes = retries(tmp_path)
    r.deferred("198.51.100.1", "bot@spam.test", ("u@example.test",), None, listed=True)
    assert len(r.store) == 0 and lanes.shared == []
    assert r.retry_claim("198.51.100.1", "bot@spam.test", "u@example.test") is None


def test_listed_client_never_claims(tmp_path: Path) -> None:
    """A record made before the client was listed is not claimed while it is; it stays for an
    unlisted retry."""
    r, _ = retries(tmp_path)
    r.deferred("198.51.100.1", "mta@example.org", ("u@example.test",), None)
    assert len(r.store) == 1
    time.sleep(0.01)
    assert r.retry_claim("198.51.100.1", "mta@example.org", "u@example.test",
                         listed=True) is None
    assert len(r.store) == 1
    assert r.retry_claim("198.51.100.1", "mta@example.org", "u@example.test") is not None
