"""ingress.edge.dataread: DATA parsing in bulk and the per-acceptor DATA budget (pure)."""

from __future__ import annotations

import pytest

from ingress.core.wire import Lane
from ingress.edge.dataread import DataBudget, DataReader, DataState
from ingress.policy.tiers import Tier


def read_all(data: bytes, step: int, size_limit: int = 4096,
             budget: DataBudget | None = None, lane: Lane = Lane.BULK,
             tier: Tier | None = None) -> tuple[DataReader, int]:
    """Feed `data` `step` bytes at a time as a stream buffer would; return the reader and how
    many bytes were left unconsumed after the end of data."""
    r = DataReader(size_limit, budget, lane, tier=tier)
    buf = bytearray()
    for i in range(0, len(data), step):
        buf += data[i:i + step]
        n, done = r.feed(buf)
        del buf[:n]
        if done:
            return r, len(buf) + len(data) - (i + step if i + step < len(data) else len(data))
    raise AssertionError("no end of data")


@pytest.mark.parametrize("step", [1, 2, 3, 5, 64, 100000])
@pytest.mark.parametrize(("data", "state", "content"), [
    (b".\r\n", DataState.NOMINAL, b""),
    (b"\r\n.\r\n", DataState.NOMINAL, b"\r\n"),
    (b"a\r\n.\r\n", DataState.NOMINAL, b"a\r\n"),
    (b"..a\r\n.b\r\n..\r\n.\r\n", DataState.NOMINAL, b".a\r\nb\r\n.\r\n"),
    (b"a.\r\nb\r\n.\r\n", DataState.NOMINAL, b"a.\r\nb\r\n"),
    (b"a\nb\r\r\n.\r\n", DataState.NOMINAL, b"a\nb\r\r\n"),    # bare LF/CR stay in a line
    (b"x" * 999 + b"\r\n.\r\n", DataState.NOMINAL, b"x" * 999 + b"\r\n"),
    (b"x" * 1000 + b"\r\n.\r\n", DataState.TOO_LONG, None),
    (b"a\r\n" + b"x" * 999 + b"\r\nb\r\n.\r\n", DataState.NOMINAL,
     b"a\r\n" + b"x" * 999 + b"\r\nb\r\n"),
    (b"a\r\n" + b"x" * 1000 + b"\r\nb\r\n.\r\n", DataState.TOO_LONG, None),
    (b"a\r\n" + b"x" * 600 + b"\n" + b"x" * 600 + b"\r\nb\r\n.\r\n", DataState.TOO_LONG, None),
    (b"a\r\n" + b"x" * 600 + b"\r" + b"x" * 600 + b"\r\nb\r\n.\r\n", DataState.TOO_LONG, None),
    (b"a\n\r\n" + b"x" * 998 + b"\r\r\nb\r\n.\r\n", DataState.NOMINAL,
     b"a\n\r\n" + b"x" * 998 + b"\r\r\nb\r\n"),
    (b"y\r\n" * 2000 + b".\r\n", DataState.TOO_MUCH, None),
    (b"x" * 1500 + b"\r\n" + b"y\r\n" * 2000 + b".\r\n", DataState.TOO_LONG, None),
    (b"y\r\n" * 2000 + b"x" * 1500 + b"\r\n.\r\n", DataState.TOO_MUCH, None),
])
def test_reader(step: int, data: bytes, state: DataState, content: bytes | None) -> None:
    r, left = read_all(data + b"QUIT\r\n", step)
    assert r.state is state
    if content is not None:
        assert r.content() == content
    assert left == len(b"QUIT\r\n")        # pipelined bytes after the end stay in the stream


def test_budget_bulk_share_and_fast_reserve() -> None:
    b = DataBudget(total=1000, fast_reserve=300)
    assert b.take(Lane.BULK, 700) and not b.take(Lane.BULK, 1)
    assert b.take(Lane.FAST, 300) and not b.take(Lane.FAST, 1)
    b.give(Lane.BULK, 700)
    assert b.take(Lane.FAST, 700) and not b.take(Lane.BULK, 1)   # fast may use it all
    b.give(Lane.FAST, 1000)
    assert (b.used, b.used_bulk) == (0, 0)
    with pytest.raises(ValueError):
        DataBudget(total=10, fast_reserve=10)


def test_bulk_full_before_354() -> None:
    b = DataBudget(total=4 << 20, fast_reserve=1 << 20)
    assert not b.bulk_full()
    assert b.take(Lane.BULK, (3 << 20) - 1000)
    assert b.bulk_full()                      # less than 64 KiB left for bulk


def test_reader_over_budget_gives_everything_back() -> None:
    b = DataBudget(total=10000, fast_reserve=5000)
    r, _ = read_all(b"z\r\n" * 3000 + b".\r\n", 512, size_limit=100000, budget=b)
    assert r.state is DataState.NO_STORAGE
    assert b.used == 0 and r.charged == 0
    ok, _ = read_all(b"z\r\n" * 1000 + b".\r\n", 512, size_limit=100000, budget=b)
    assert ok.state is DataState.NOMINAL and b.used == 3000
    ok.release()
    assert b.used == 0


@pytest.mark.parametrize("steps", [
    # (tier, bytes, charged as): total 1000, reserve 400: self-proven 200 of it, third-party
    # 100, the operator's floor 100; bulk 600
    [("S", 200, "S"), ("S", 1, "U"), ("U", 599, "U"), ("S", 1, None), ("O", 200, "O")],
    [("U", 600, "U"), ("U", 1, None), ("S", 200, "S"), ("S", 1, None), ("T", 100, "T"),
     ("T", 1, None), ("O", 100, "O"), ("O", 1, None)],
    # the operator past its floor takes whatever is free; lower tiers then get less
    [("O", 900, "O"), ("S", 100, "S"), ("S", 1, None), ("U", 1, None)],
])
def test_budget_by_tier(steps: list[tuple[str, int, str | None]]) -> None:
    names = {"O": Tier.OPERATOR, "T": Tier.THIRD_PARTY, "S": Tier.SELF_PROVEN,
             "U": Tier.UNKNOWN}
    b = DataBudget(total=1000, fast_reserve=400)
    charged = []
    for tier, n, want in steps:
        got = b.charge(names[tier], n)
        assert got is (names[want] if want else None), (tier, n, got)
        if got is not None:
            charged.append((got, n))
    for got, n in charged:
        b.release(got, n)
    assert b.used == 0 and b.used_bulk == 0


def test_reader_of_a_capped_tier_overflows_into_the_bulk_share() -> None:
    b = DataBudget(total=10000, fast_reserve=4000)        # self-proven: 2000 of the reserve
    r, _ = read_all(b"z\r\n" * 1000 + b".\r\n", 512, size_limit=100000, budget=b,
                    lane=Lane.FAST, tier=Tier.SELF_PROVEN)
    assert r.state is DataState.NOMINAL and b.used == 3000
    # pieces are charged whole: as much as fits in the tier's part, the rest as bulk
    assert 2000 - 512 < b.held(Tier.SELF_PROVEN) <= 2000
    assert b.held(Tier.SELF_PROVEN) + b.used_bulk == 3000
    assert b.full(Tier.OPERATOR) is False
    r.release()
    assert b.used == 0 and b.held(Tier.SELF_PROVEN) == 0
