"""Tests of the learned allow cache (ingress.policy.learned): its TTL, merge, bounds and
persistence. Its quotas per network and per domain: test_learned_net.py."""

from __future__ import annotations

import json

import pytest

from ingress.policy.learned import LearnedAllow


def test_learned_ttl() -> None:
    la = LearnedAllow(ttl=100, max_size=10)
    assert not la.contains("192.0.2.1", 0)
    assert la.learn("192.0.2.1", 1000) == 1100
    assert la.contains("192.0.2.1", 1099.9)
    assert la.contains("::ffff:192.0.2.1", 1050)
    assert not la.contains("192.0.2.1", 1100)
    assert len(la) == 0  # expired entry dropped on lookup


def test_learned_refresh_and_merge() -> None:
    la = LearnedAllow(ttl=100, max_size=10)
    la.learn("192.0.2.1", 0)
    la.learn("192.0.2.1", 50)
    assert la.expiry("192.0.2.1") == 150
    assert la.add("192.0.2.1", 120)  # older info from a peer does not shorten
    assert la.expiry("192.0.2.1") == 150
    assert la.add("192.0.2.1", 400)
    assert la.expiry("192.0.2.1") == 400
    assert not la.add("192.0.2.2", 10, now=20)  # already expired
    assert not la.add("nonsense", 500)
    with pytest.raises(ValueError):
        la.learn("nonsense", 0)


def test_learned_bounded_evicts_soonest_expiring() -> None:
    la = LearnedAllow(ttl=1000, max_size=3)
    la.add("10.0.0.1", 500)
    la.add("10.0.0.2", 100)  # soonest
    la.add("10.0.0.3", 900)
    la.add("10.0.0.4", 800, now=0)
    assert len(la) == 3
    assert not la.contains("10.0.0.2", 0)
    assert all(la.contains(ip, 0) for ip in ("10.0.0.1", "10.0.0.3", "10.0.0.4"))
    # a newcomer expiring sooner than everything held is the one dropped
    assert not la.add("10.0.0.5", 50, now=0)
    assert len(la) == 3
    # expired entries are purged before anything live is evicted
    la.add("10.0.0.6", 2000, now=600)
    assert not la.contains("10.0.0.1", 600)
    assert la.contains("10.0.0.6", 600)


def test_learned_heap_stays_bounded_under_refresh() -> None:
    la = LearnedAllow(ttl=10, max_size=5)
    for t in range(10000):
        la.learn(f"10.0.0.{t % 5}", t)
    assert len(la) == 5
    assert len(la._heap) <= 2 * 5 + 64


def test_learned_json_roundtrip() -> None:
    la = LearnedAllow(ttl=100, max_size=10)
    la.learn("192.0.2.1", 0)
    la.learn("2001:db8::1", 50)
    doc = la.to_json()
    back = LearnedAllow.from_json(doc, ttl=100, max_size=10, now=60)
    assert back.items() == la.items()
    # expired entries dropped on load; a shorter configured TTL clamps expiries
    later = LearnedAllow.from_json(doc.encode(), ttl=30, max_size=10, now=120)
    assert later.items() == [("2001:db8::/64", 150.0)]     # keyed by network (issue 17)
    clamped = LearnedAllow.from_json(doc, ttl=10, max_size=10, now=60)
    assert clamped.items() == [("192.0.2.1", 70.0), ("2001:db8::/64", 70.0)]


def test_learned_json_tolerates_bad_entries_and_rejects_bad_documents() -> None:
    doc = json.dumps(
        {
            "format": "smtp-ingress/learned-allow",
            "version": 1,
            "entries": {"192.0.2.1": 500, "garbage": 500, "192.0.2.2": "x", "192.0.2.3": True},
        }
    )
    la = LearnedAllow.from_json(doc, ttl=1000, max_size=10, now=0)
    assert la.items() == [("192.0.2.1", 500.0)]
    for bad in ("", "[]", "{}", '{"format": "other", "entries": {}}', b"\xff"):
        with pytest.raises(ValueError):
            LearnedAllow.from_json(bad, ttl=1, max_size=1, now=0)
    with pytest.raises(ValueError, match="version"):
        LearnedAllow.from_json(
            '{"format": "smtp-ingress/learned-allow", "version": 9, "entries": {}}',
            ttl=1,
            max_size=1,
            now=0,
        )


@pytest.mark.parametrize("kwargs", [{"ttl": 0, "max_size": 1}, {"ttl": 1, "max_size": 0}])
def test_learned_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LearnedAllow(**kwargs)
