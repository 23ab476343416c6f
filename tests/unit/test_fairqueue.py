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
