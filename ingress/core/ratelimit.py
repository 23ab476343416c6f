"""Token buckets: the bulk lane's rate cap, and one bucket per key (a domain's fast-lane
rate). Pure: the clock is an argument.

API: TokenBucket(rate, burst); .take(now) -> bool; .tokens(now) -> float.
     KeyedBuckets(rate, burst, max_keys); .take(key, now) -> bool; len()
rate <= 0 means uncapped (take() always succeeds). burst <= 0 means one second of rate (at least 1).
Limits: monotonic `now` expected; a clock going backwards is treated as no time passing.
KeyedBuckets holds at most max_keys buckets: the least recently used is forgotten, and a key
seen again starts with a full bucket (keep `burst` small where that matters).
"""

from __future__ import annotations

from collections import OrderedDict


class TokenBucket:
    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float = 0, now: float = 0.0) -> None:
        self.rate = float(rate)
        self.burst = float(burst) if burst > 0 else max(1.0, self.rate)
        self._tokens = self.burst
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def tokens(self, now: float) -> float:
        if self.rate <= 0:
            return float("inf")
        self._refill(now)
        return self._tokens

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class KeyedBuckets:
    """One TokenBucket(rate, burst) per key, at most `max_keys` of them (LRU)."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float = 0, max_keys: int = 4096) -> None:
        self.rate, self.burst, self.max_keys = float(rate), float(burst), max(1, max_keys)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now=now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
