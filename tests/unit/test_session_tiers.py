"""ingress.edge.sessions.SessionTable with trust tiers (issue 17): the tier cap and the per-IP cap
of promoted sessions (served as bulk beyond them), and an operator client taking an idle lower-tier
session's slot when none is free (never the reverse). Fake seats; the real table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ingress.core import config
from ingress.core.wire import Lane
from ingress.edge.connection import Connection
from ingress.edge.sessions import SessionTable
from ingress.policy.classify import Decision
from ingress.policy.conn_state import Event
from tests.kit.harness import write_config


class FakeSeat:
    def __init__(self, ip: str, identity: str = "", lane: Lane = Lane.BULK,
                 started: float = 0.0) -> None:
        self.conn = Connection()
        self.conn.peer_ip, self.conn.identity, self.conn.lane = ip, identity, lane
        self.conn.started = started
        self.evicted: str | None = None
        self.table: SessionTable | None = None

    def evict(self, line: str, reason: str) -> None:
        self.evicted = line
        self.conn.fire(Event.EVICT)
        assert self.table is not None
        self.table.release(self)

    def close_if_idle(self, line: str) -> bool:
        return True

    def close_with(self, line: str) -> None:
        pass


def table(tmp_path: Path, **admission: object) -> SessionTable:
    # 10 slots, 8 reserved: self-proven cap 4, third-party 2, the operator's floor 2
    write_config(tmp_path / "c.toml", {"smtp": {"max_connections": 10, "fast_reserve": 8},
                                       "classify": {"identity_share": 1.0},
                                       "admission": dict(admission)})
    return SessionTable(config.load(tmp_path / "c.toml"), Counter(), now=0.0)


def seat(t: SessionTable, ip: str, identity: str = "", **kw: object) -> FakeSeat:
    s = FakeSeat(ip, identity, Lane.FAST if identity else Lane.BULK, **kw)  # type: ignore[arg-type]
    s.table = t
    assert t.admit(s, draining=False, now=1.0) is None, s.conn.refused_why
    s.conn.fire(Event.ADMIT)
    return s


def fast(identity: str) -> Decision:
    return Decision(Lane.FAST, ("x",), identity)


def test_tier_cap_as_a_whole(tmp_path: Path) -> None:
    t = table(tmp_path)
    for i in range(4):        # four domains, one session each: the tier's cap
        d = t.within_share(fast(f"org:d{i}.test"), f"10.0.0.{i}")
        assert d.lane is Lane.FAST
        seat(t, f"10.0.0.{i}", d.identity)
    d = t.within_share(fast("org:d9.test"), "10.0.0.9")        # a fifth domain: bulk
    assert d.lane is Lane.BULK and d.reasons[-1] == "over-share:tier:self-proven"
    assert t.within_share(fast("allow:10.1.0.0/16"), "10.1.0.1").lane is Lane.FAST


@pytest.mark.parametrize("identity, ip, lane", [
    ("org:other.test", "10.0.0.1", Lane.BULK),      # the same IP, another domain: per IP
    ("org:other.test", "10.0.0.2", Lane.FAST),
    ("allow:10.0.0.0/8", "10.0.0.1", Lane.FAST),    # the operator tier is exempt
])
def test_per_ip_fast_cap(tmp_path: Path, identity: str, ip: str, lane: Lane) -> None:
    t = table(tmp_path, per_ip_fast_max=2)
    seat(t, "10.0.0.1", "org:a.test")
    seat(t, "10.0.0.1", "learned:b.test")
    d = t.within_share(fast(identity), ip)
    assert d.lane is lane
    if lane is Lane.BULK:
        assert d.reasons[-1] == "over-share:ip:10.0.0.1"


def test_operator_takes_an_idle_lower_tier_slot(tmp_path: Path) -> None:
    t = table(tmp_path)
    bulk = seat(t, "10.9.0.1")
    t.spoke(bulk)                                   # spoke: not evictable for silence
    sp = [seat(t, f"10.0.0.{i}", f"org:d{i}.test", started=float(i)) for i in range(4)]
    for event in (Event.GREET, Event.SPEAK, Event.DATA):
        sp[0].conn.fire(event)                      # inside DATA: never evicted
    ops = [seat(t, f"10.1.0.{i}", "allow:10.1.0.0/16") for i in range(5)]
    assert t.admission.in_use == 10
    # a self-proven newcomer never takes anyone's slot
    newcomer = FakeSeat("10.0.0.99", "org:new.test", Lane.FAST)
    assert t.admit(newcomer, draining=False, now=2.0) is not None
    # the operator's: bulk first, then the longest-connected idle self-proven one
    first, second = FakeSeat("10.1.0.50", "allow:x", Lane.FAST), \
        FakeSeat("10.1.0.51", "allow:x", Lane.FAST)
    for s in (first, second):
        s.table = t
        assert t.admit(s, draining=False, now=2.0) is None
    assert bulk.evicted is not None and bulk.evicted.startswith("421 4.7.0")
    assert [s.evicted is not None for s in sp] == [False, True, False, False]
    assert t.counters["evicted_for_tier"] == 2
    assert all(s.evicted is None for s in ops)
