"""ingress.policy.fairqueue.FairQueue: deficit round robin between identities (issue 8: one
domain's burst cannot delay another's), per-identity bounds, eligibility (in-flight bounds)."""

from __future__ import annotations

import pytest

from ingress.policy.fairqueue import FairQueue


def order(q: FairQueue[str], eligible=None) -> list[str]:
    out = []
    while (got := q.pop(eligible)) is not None:
        out.append(got[1])
    return out


@pytest.mark.parametrize("pushes, quantum, expected", [
    # a burst of 4 from "spam" queued first does not hold back "good": they alternate
    ([("spam", "s1", 10), ("spam", "s2", 10), ("spam", "s3", 10), ("spam", "s4", 10),
      ("good", "g1", 10), ("good", "g2", 10)], 10, ["s1", "g1", "s2", "g2", "s3", "s4"]),
    # bytes, not messages: a 30-byte identity gets one message per 3 of a 10-byte one
    ([("big", "b1", 30), ("big", "b2", 30), ("small", "m1", 10), ("small", "m2", 10),
      ("small", "m3", 10), ("small", "m4", 10)], 10,
     ["m1", "m2", "b1", "m3", "m4", "b2"]),
    # quantum larger than messages: several per turn
    ([("a", "a1", 5), ("a", "a2", 5), ("a", "a3", 5), ("b", "b1", 5)], 10,
     ["a1", "a2", "b1", "a3"]),
    # one identity alone is plain FIFO (the bulk lane: every message has the same key)
    ([("", "x1", 7), ("", "x2", 700), ("", "x3", 1)], 64, ["x1", "x2", "x3"]),
    # three identities round robin
    ([("a", "a1", 1), ("a", "a2", 1), ("b", "b1", 1), ("c", "c1", 1), ("c", "c2", 1)], 1,
     ["a1", "b1", "c1", "a2", "c2"]),
])
def test_drr_order(pushes: list[tuple[str, str, int]], quantum: int, expected: list[str]) -> None:
    q: FairQueue[str] = FairQueue(quantum, key_count=100, key_bytes=10_000)
    for key, item, size in pushes:
        assert q.push(key, item, size)
    assert len(q) == len(pushes)
    assert order(q) == expected
    assert len(q) == 0 and q.bytes == 0 and q.keys() == []


@pytest.mark.parametrize("key_count, key_bytes, sizes, accepted", [
    (2, 1000, [10, 10, 10], [True, True, False]),      # count share
    (10, 25, [10, 10, 10], [True, True, False]),       # bytes share
    (10, 25, [26], [False]),
])
def test_per_identity_bound(key_count: int, key_bytes: int, sizes: list[int],
                            accepted: list[bool]) -> None:
    q: FairQueue[str] = FairQueue(10, key_count=key_count, key_bytes=key_bytes)
    assert [q.push("spam", str(i), s) for i, s in enumerate(sizes)] == accepted
    # the bound is per identity: another one still gets in
    assert q.push("good", "g", 10)


def test_ineligible_identity_is_skipped_not_lost() -> None:
    q: FairQueue[str] = FairQueue(10, key_count=10, key_bytes=1000)
    for i in range(3):
        q.push("busy", f"b{i}", 10)
    q.push("free", "f0", 10)
    assert order(q, eligible=lambda k: k != "busy") == ["f0"]
    assert q.pop(lambda k: False) is None
    assert q.depth("busy") == 3
    assert order(q) == ["b0", "b1", "b2"]


def test_push_front_and_drain() -> None:
    q: FairQueue[str] = FairQueue(10, key_count=1, key_bytes=10)
    assert q.push("a", "a1", 10)
    got = q.pop()
    assert got == ("a", "a1", 10)
    q.push_front("a", "a1", 10)          # a send failed: back at the head, bound or not
    q.push_front("a", "a0", 10)
    assert q.bytes == 20
    assert [x[1] for x in q.drain()] == ["a0", "a1"]
    assert len(q) == 0 and q.pop() is None


def test_idle_identity_saves_no_credit() -> None:
    q: FairQueue[str] = FairQueue(100, key_count=10, key_bytes=10_000)
    q.push("a", "a1", 1)
    assert q.pop()[1] == "a1"          # "a" leaves with 99 unused: forgotten
    q.push("b", "b1", 100)
    q.push("b", "b2", 100)
    q.push("a", "a2", 100)
    q.push("a", "a3", 100)
    assert order(q) == ["b1", "a2", "b2", "a3"]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        FairQueue(0, 1, 1)


def test_unbounded_push_skips_the_share() -> None:
    q: FairQueue[str] = FairQueue(10, key_count=1, key_bytes=10)
    assert q.push("", "a", 10, bounded=False)
    assert q.push("", "b", 100, bounded=False)
    assert not q.push("", "c", 10)
    assert len(q) == 2


# --------------------------------------------------------------------------- trust tiers (issue 17)

from ingress.policy.fairqueue import TieredQueue  # noqa: E402
from ingress.policy.tiers import Tier  # noqa: E402

OP, TP, SP, UN = Tier.OPERATOR, Tier.THIRD_PARTY, Tier.SELF_PROVEN, Tier.UNKNOWN


def tiered_order(q: TieredQueue[str], tier_ok=None, key_ok=None) -> list[str]:
    out = []
    while (got := q.pop(tier_ok, key_ok)) is not None:
        out.append(got[2])
    return out


@pytest.mark.parametrize("pushes, tier_ok, expected", [
    # strict priority: the operator's work first, whatever was queued before it
    ([(SP, "org:a", "s1"), (SP, "org:b", "b1"), (SP, "org:a", "s2"), (OP, "allow:x", "o1"),
      (TP, "dnswl:z", "t1"), (OP, "cert:y", "o2")], None,
     ["o1", "o2", "t1", "s1", "b1", "s2"]),
    # DRR between identities inside a tier
    ([(SP, "org:a", "a1"), (SP, "org:a", "a2"), (SP, "org:b", "b1")], None, ["a1", "b1", "a2"]),
    # a tier at its in-flight cap is skipped: the next one goes
    ([(SP, "org:a", "s1"), (OP, "allow:x", "o1")], lambda t: t is not OP, ["s1"]),
    ([(SP, "org:a", "s1"), (OP, "allow:x", "o1")], lambda t: t is not SP, ["o1"]),
    # the bulk lane: one tier, one key, FIFO
    ([(UN, "", "x1"), (UN, "", "x2")], None, ["x1", "x2"]),
])
def test_tiered_order(pushes, tier_ok, expected: list[str]) -> None:
    q: TieredQueue[str] = TieredQueue(10, key_count=100, key_bytes=10_000)
    for tier, key, item in pushes:
        assert q.push(tier, key, item, 10)
    assert tiered_order(q, tier_ok) == expected


@pytest.mark.parametrize("limits, pushes, accepted", [
    # the self-proven tier as a whole: 3 messages, however many identities
    ({SP: (3, 10_000)}, [(SP, f"org:d{i}", 10) for i in range(5)],
     [True, True, True, False, False]),
    # ... and bytes
    ({SP: (100, 25)}, [(SP, "org:a", 10), (SP, "org:b", 10), (SP, "org:c", 10)],
     [True, True, False]),
    # the operator tier is never capped by another tier's limit
    ({SP: (1, 10)}, [(SP, "org:a", 10), (OP, "allow:x", 10), (OP, "allow:y", 10),
                   (SP, "org:b", 10)], [True, True, True, False]),
    # a cap of 0: nothing of that tier is queued
    ({TP: (0, 0)}, [(TP, "dnswl:z", 1)], [False]),
    # the per-key share still applies inside the tier
    ({SP: (100, 10_000)}, [(SP, "org:a", 10), (SP, "org:a", 10), (SP, "org:a", 10)],
     [True, True, False]),
])
def test_tier_caps(limits, pushes, accepted: list[bool]) -> None:
    q: TieredQueue[str] = TieredQueue(10, key_count=2, key_bytes=10_000, limits=limits)
    got = [q.push(t, k, f"{k}{i}", size) for i, (t, k, size) in enumerate(pushes)]
    assert got == accepted


def test_tiered_counts_and_drain() -> None:
    q: TieredQueue[str] = TieredQueue(10, key_count=10, key_bytes=10_000)
    q.push(SP, "org:a", "s1", 7)
    q.push(OP, "allow:x", "o1", 5)
    q.push_front(SP, "org:a", "s0", 3)
    assert (len(q), q.bytes, q.tier_len(SP), q.tier_bytes(SP), q.depth("org:a")) == \
        (3, 15, 2, 10, 2)
    assert bool(q) and q.tier_room(SP, 1)
    assert sorted(item for _, _, item, _ in q.drain()) == ["o1", "s0", "s1"]
    assert not q and len(q) == 0 and q.bytes == 0
