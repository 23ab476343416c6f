"""ingress.core.steer_table: the acceptors' learned addresses to steer, in shared memory."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from ingress.core.steer_table import SteerTable


def table(regions: int = 2, per_region: int = 3) -> SteerTable:
    return SteerTable.create(mp.get_context("spawn"), regions, per_region)


@pytest.mark.parametrize(("adds", "now", "room", "want"), [
    # (region, ip, until) ...                    now   room  live
    ([], 0.0, 10, {4: [], 6: []}),
    ([(0, "192.0.2.1", 10.0)], 5.0, 10, {4: ["192.0.2.1"], 6: []}),
    ([(0, "192.0.2.1", 10.0)], 10.0, 10, {4: [], 6: []}),                     # ended
    ([(0, "2001:db8::1", 10.0)], 5.0, 10, {4: [], 6: ["2001:db8::1"]}),
    ([(0, "::ffff:192.0.2.9", 10.0)], 5.0, 10, {4: ["192.0.2.9"], 6: []}),   # mapped: v4
    ([(0, "192.0.2.1", 10.0), (0, "192.0.2.1", 20.0)], 15.0, 10, {4: ["192.0.2.1"], 6: []}),
    # the same address from two regions: once
    ([(0, "192.0.2.1", 10.0), (1, "192.0.2.1", 20.0)], 5.0, 10, {4: ["192.0.2.1"], 6: []}),
    # room: those that end last first
    ([(0, "192.0.2.1", 10.0), (0, "192.0.2.2", 30.0), (1, "192.0.2.3", 20.0)], 5.0, 2,
     {4: ["192.0.2.2", "192.0.2.3"], 6: []}),
    # a full region drops the entry that ends first
    ([(0, "192.0.2.1", 10.0), (0, "192.0.2.2", 30.0), (0, "192.0.2.3", 20.0),
      (0, "192.0.2.4", 40.0)], 5.0, 10, {4: ["192.0.2.4", "192.0.2.2", "192.0.2.3"], 6: []}),
    # not an address, or no such region: nothing
    ([(0, "not-an-ip", 10.0), (5, "192.0.2.1", 10.0), (-1, "192.0.2.1", 10.0)], 5.0, 10,
     {4: [], 6: []}),
])
def test_live(adds: list[tuple[int, str, float]], now: float, room: int,
              want: dict[int, list[str]]) -> None:
    t = table()
    for region, ip, until in adds:
        t.add(region, ip, until)
    assert t.live(now, room) == want


def test_generation_changes_with_every_write_and_a_child_sees_the_same_memory() -> None:
    t = table()
    g0 = t.generation()
    t.add(1, "192.0.2.1", 10.0)
    assert t.generation() != g0
    child = SteerTable(t.array, t.regions, t.per_region)     # what a child builds
    child.add(0, "192.0.2.2", 10.0)
    assert sorted(t.live(1.0, 10)[4]) == ["192.0.2.1", "192.0.2.2"]


def test_clear_ends_a_region_only() -> None:
    """A new writer (a restarted mTLS acceptor) starts its region afresh; others keep theirs."""
    t = table()
    t.add(0, "192.0.2.1", 10.0)
    t.add(1, "192.0.2.2", 10.0)
    g = t.generation()
    t.clear(0)
    assert t.generation() != g
    assert t.live(5.0, 10) == {4: ["192.0.2.2"], 6: []}
    t.clear(7)                         # no such region: nothing
