"""Token bucket: the bulk lane's rate cap. Pure: the clock is an argument.

API: TokenBucket(rate, burst); .take(now) -> bool; .tokens(now) -> float.
rate <= 0 means uncapped (take() always succeeds). burst <= 0 means one second of rate (at least 1).
Limits: monotonic `now` expected; a clock going backwards is treated as no time passing.
"""

from __future__ import annotations


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
