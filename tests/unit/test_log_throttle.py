"""log.Throttle: table of (every, max_keys, (key, now) calls) -> due() results."""

import pytest

from ingress.core.log import Throttle

CASES = [
    # every, max_keys, calls, expected (None: leave it out; n: log, n were left out)
    (10.0, 8, [("a", 0.0), ("a", 1.0), ("a", 9.9), ("a", 10.0), ("a", 25.0)],
     [0, None, None, 2, 0]),
    (10.0, 8, [("a", 0.0), ("b", 1.0), ("a", 2.0), ("b", 11.0)],
     [0, 0, None, 0]),                                     # one budget per key
    (10.0, 1, [("a", 0.0), ("b", 1.0), ("a", 2.0)],
     [0, 0, 0]),                                           # full: a due line forgets the rest
    (60.0, 1, [("", -5.0), ("", 50.0), ("", 56.0)], [0, None, 1]),   # any clock origin
]


@pytest.mark.parametrize(("every", "max_keys", "calls", "expected"), CASES)
def test_throttle(every: float, max_keys: int, calls: list[tuple[str, float]],
                  expected: list[int | None]) -> None:
    t = Throttle(every, max_keys)
    assert [t.due(k, now) for k, now in calls] == expected
