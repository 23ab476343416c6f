"""Token bucket: table of (rate, burst, take times) -> outcomes; keyed buckets: table of
(max_keys, (key, time) takes) -> outcomes."""

import pytest

from ingress.core.ratelimit import KeyedBuckets, TokenBucket

CASES = [
    # rate, burst, times, expected
    (0, 0, [0, 0, 0, 0], [True] * 4),                        # uncapped
    (1, 1, [0, 0, 0.5, 1.0, 1.0], [True, False, False, True, False]),
    (2, 0, [0, 0, 0, 0.5, 0.5], [True, True, False, True, False]),  # burst = 1 s of rate
    (10, 5, [0] * 6, [True] * 5 + [False]),
    (1, 3, [0, 0, 0, 0, 100], [True, True, True, False, True]),   # refill capped at burst
    (1, 1, [5, 4, 4.5, 6], [True, False, False, True]),           # clock going back: no refill
]


@pytest.mark.parametrize(("rate", "burst", "times", "expected"), CASES)
def test_bucket(rate: float, burst: float, times: list[float], expected: list[bool]) -> None:
    b = TokenBucket(rate, burst, now=times[0])
    assert [b.take(t) for t in times] == expected


def test_rate_over_long_run() -> None:
    b = TokenBucket(100, 10, now=0.0)
    took = sum(b.take(i / 1000) for i in range(10_000))   # 10 s at 1000 attempts/s
    assert 1000 <= took <= 1011                           # 100/s for 10 s plus the burst


KEYED = [
    # max_keys, takes (key, now), expected: rate 1/s, burst 1 per key
    (4, [("a", 0), ("a", 0), ("b", 0), ("b", 0.5), ("a", 1.0)],
     [True, False, True, False, True]),                     # one bucket per key
    (2, [("a", 0), ("b", 0), ("a", 0.1), ("c", 0.1), ("a", 0.2), ("b", 0.2)],
     [True, True, False, True, False, True]),               # c evicts b (least recent): b fresh
    (1, [("a", 0), ("b", 0), ("a", 0)], [True, True, True]),   # one key held: a forgotten
]


@pytest.mark.parametrize(("max_keys", "takes", "expected"), KEYED)
def test_keyed(max_keys: int, takes: list[tuple[str, float]], expected: list[bool]) -> None:
    kb = KeyedBuckets(1.0, 1.0, max_keys)
    assert [kb.take(k, t) for k, t in takes] == expected
    assert len(kb) <= max_keys


def test_keyed_uncapped_holds_nothing() -> None:
    kb = KeyedBuckets(0.0, 1.0, 4)
    assert all(kb.take(str(i), 0.0) for i in range(100)) and len(kb) == 0
