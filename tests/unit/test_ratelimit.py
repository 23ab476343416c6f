"""Token bucket: table of (rate, burst, take times) -> outcomes; keyed buckets: table of
(max_keys, (key, time) takes) -> outcomes."""

import pytest

from ingress.core.ratelimit import KeyedBuckets, SlidingCount, TokenBucket

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


KEEP_PARTIAL = [
    # max_keys, takes (key, now), expected: rate 1/s, burst 2 per key, keep_partial
    (2, [("a", 0), ("b", 0), ("c", 0)], [True, True, False]),   # full of drained keys: refused
    (2, [("a", 0), ("b", 0), ("c", 0), ("a", 0), ("a", 0)],
     [True, True, False, True, False]),                          # a was never reset by c
    (2, [("a", 0), ("b", 0.5), ("c", 1.0), ("d", 1.4)],
     [True, True, True, False]),          # a refilled at 1.0: c takes its place; b not yet
    (1, [("a", 0), ("a", 0), ("b", 1.0), ("b", 2.0), ("a", 2.0)],
     [True, True, False, True, False]),   # a empty: refilled at 2.0 only; then b holds it
]


@pytest.mark.parametrize(("max_keys", "takes", "expected"), KEEP_PARTIAL)
def test_keyed_keep_partial(max_keys: int, takes: list[tuple[str, float]],
                            expected: list[bool]) -> None:
    """keep_partial: no number of other keys resets a drained key (a rate per destination that
    an attacker could otherwise empty by naming max_keys other domains)."""
    kb = KeyedBuckets(1.0, 2.0, max_keys, keep_partial=True)
    assert [kb.take(k, t) for k, t in takes] == expected
    assert len(kb) <= max_keys


def test_keyed_uncapped_holds_nothing() -> None:
    kb = KeyedBuckets(0.0, 1.0, 4)
    assert all(kb.take(str(i), 0.0) for i in range(100)) and len(kb) == 0


# --------------------------------------------------------------------------- FairBucket (issue 17)

from ingress.core.ratelimit import FairBucket  # noqa: E402


def simulate(b: FairBucket, askers: dict[str, float], seconds: float, seed: int = 7
             ) -> tuple[dict[str, int], dict[str, int]]:
    """Each key asks at its rate (asks/s) on average, at random times (exponential gaps, a
    fixed seed: the same run every time); (asked, got) per key."""
    import heapq
    import random
    rng = random.Random(seed)
    asked = dict.fromkeys(askers, 0)
    got = dict.fromkeys(askers, 0)
    due = [(rng.expovariate(r), k) for k, r in askers.items()]
    heapq.heapify(due)
    while due[0][0] < seconds:
        t, k = heapq.heappop(due)
        asked[k] += 1
        got[k] += b.take(k, t)
        heapq.heappush(due, (t + rng.expovariate(askers[k]), k))
    return asked, got


@pytest.mark.parametrize("n, legit_rate, legit_min", [
    # 50 keys asking 20/s each (a spammer's domains) against 100/s: the fair level is about
    # 1.6/s; a key asking 1/s at random times gets nearly all of it (a plain bucket would give
    # every ask the same chance, 100 / 1000: a tenth)
    (50, 1.0, 0.8),
    (10, 5.0, 0.9),      # level ~7/s > 5
    (50, 5.0, 0.2),      # level ~1.6/s < 5: about its share (never nothing)
])
def test_fair_bucket_shares_the_rate_max_min(n: int, legit_rate: float,
                                             legit_min: float) -> None:
    b = FairBucket(100, 10, now=0.0)
    askers = {f"spam{i}": 20.0 for i in range(n)} | {"legit": legit_rate}
    asked, got = simulate(b, askers, 20.0)
    assert got["legit"] >= legit_min * asked["legit"], (got["legit"], asked["legit"])
    total = sum(got.values())
    assert 0.95 * 100 * 20 <= total <= 100 * 20 + 10, total    # the rate, work-conserving
    spam = sorted(got[f"spam{i}"] for i in range(n))
    assert spam[-1] <= 3 * spam[0] + 10, spam                 # shared, roughly evenly


def test_fair_bucket_alone_gets_the_whole_rate_and_forgets() -> None:
    b = FairBucket(100, 10, now=0.0)
    _, got = simulate(b, {"one": 500.0}, 5.0)
    assert 490 <= got["one"] <= 511                      # alone: all of it
    assert b.active(5.0) == 1 and b.active(7.0) == 0
    assert len(b._keys) == 1 and b.active(20.0) == 0 and not b._keys   # forgotten
    assert FairBucket(0, 0).take("x", 0.0)               # rate 0: uncapped


def test_fair_bucket_bounds_its_keys() -> None:
    b = FairBucket(1000, 10, now=0.0, max_keys=16)
    for i in range(100):
        b.take(f"k{i}", i * 0.001)
    assert b.active(0.1) == 16


@pytest.mark.parametrize(("events", "now", "expected"), [
    ([], 5.0, 0.0),
    ([(1.0, 3)], 5.0, 3.0),                      # this window: counted whole
    ([(1.0, 4)], 15.0, 2.0),                     # the window before, half of it still inside
    ([(1.0, 4), (12.0, 1)], 15.0, 3.0),
    ([(1.0, 4)], 25.0, 0.0),                     # two windows ago: gone
    ([(12.0, 1), (8.0, 4)], 15.0, 3.0),          # late news of the window before still counts
    ([(25.0, 1), (8.0, 4)], 25.0, 1.0),          # ... older news is dropped
])
def test_sliding_count(events: list[tuple[float, int]], now: float, expected: float) -> None:
    c = SlidingCount(10.0)
    for at, n in events:
        c.add(at, n)
    assert c.value(now) == pytest.approx(expected)
