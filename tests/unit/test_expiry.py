"""ExpiryMap (ingress.core.expiry): table-driven."""

from __future__ import annotations

import pytest

from ingress.core.expiry import ExpiryMap

# (max_size, [(key, expires_at, now)], {key: expected get(key, at)}, at)
CASES = [
    ("stores", 2, [("a", 10, 0)], {"a": 10}, 5),
    ("expires at its time", 2, [("a", 10, 0)], {"a": None}, 10),
    ("never shortens", 2, [("a", 10, 0), ("a", 5, 0)], {"a": 10}, 1),
    ("extends", 2, [("a", 10, 0), ("a", 20, 0)], {"a": 20}, 15),
    ("expired not stored", 2, [("a", 5, 5)], {"a": None}, 0),
    ("full: soonest evicted", 2, [("a", 10, 0), ("b", 20, 0), ("c", 30, 0)],
     {"a": None, "b": 20, "c": 30}, 1),
    ("full: sooner newcomer dropped", 2, [("a", 10, 0), ("b", 20, 0), ("c", 5, 0)],
     {"a": 10, "b": 20, "c": None}, 1),
    ("full: expired purged first", 2, [("a", 10, 0), ("b", 20, 0), ("c", 15, 12)],
     {"a": None, "b": 20, "c": 15}, 13),
    ("full: refresh of a held key evicts nobody", 2, [("a", 10, 0), ("b", 20, 0), ("a", 30, 0)],
     {"a": 30, "b": 20}, 1),
    ("no clock: put without now", 1, [("a", 10, None), ("b", 20, None)],
     {"a": None, "b": 20}, 1),
]


@pytest.mark.parametrize("name,size,puts,expect,at", CASES, ids=[c[0] for c in CASES])
def test_expiry_map(name: str, size: int, puts: list, expect: dict, at: float) -> None:
    m = ExpiryMap(size)
    for key, exp, now in puts:
        m.put(key, exp, now)
    assert len(m) <= size
    for key, want in expect.items():
        assert m.get(key, at) == want


def test_put_result_purge_peek_items() -> None:
    m = ExpiryMap(1)
    assert m.put("a", 10, 0) is True
    assert m.put("b", 5, 0) is False
    assert m.peek("a") == 10 and m.peek("b") is None
    assert m.items() == [("a", 10)]
    assert m.purge(9) == 0 and m.purge(10) == 1 and len(m) == 0
    assert m.peek("a") is None


def test_snapshot_is_a_copy_of_what_is_held() -> None:
    """snapshot(): every held entry, expired ones not yet purged included; a copy, so changes
    to the map after it do not show in it (the callout cache serialises it later)."""
    m = ExpiryMap(4)
    m.put("a", 10, 0)
    m.put("b", 5, 0)
    snap = m.snapshot()
    assert snap == {"a": 10, "b": 5}
    m.put("c", 20, 0)
    m.pop("a")
    assert snap == {"a": 10, "b": 5}


def test_bounded_heap_under_refreshes() -> None:
    m = ExpiryMap(4)
    for i in range(10_000):
        m.put("k", float(i + 1))
    assert len(m) == 1 and len(m._heap) <= 2 * len(m) + 65


def test_bad_size() -> None:
    with pytest.raises(ValueError):
        ExpiryMap(0)


def test_on_drop_follows_every_removal_and_pop() -> None:
    """on_drop names every key that leaves (expired lazily or by purge, evicted, popped): the
    learned cache keeps its per-domain and per-network groups exact by it."""
    gone: list[str] = []
    m = ExpiryMap(2, on_drop=gone.append)
    m.put("a", 10, 0)
    m.put("b", 20, 0)
    m.put("c", 30, 0)             # full: "a" evicted
    assert m.get("b", 25) is None  # lazily expired
    assert m.pop("c") == 30 and m.pop("c") is None
    m.put("d", 5, 0)
    assert m.purge(6) == 1
    assert gone == ["a", "b", "c", "d"] and len(m) == 0
