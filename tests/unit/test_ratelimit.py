"""Token bucket: table of (rate, burst, take times) -> outcomes."""

import pytest

from ingress.core.ratelimit import TokenBucket

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
