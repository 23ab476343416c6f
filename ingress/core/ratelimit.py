"""Token buckets: the bulk lane's rate cap, one bucket per key (a domain's fast-lane rate), and
one bucket shared fairly by many keys (a trust tier's total rate). Pure: the clock is an
argument.

API: TokenBucket(rate, burst); .take(now) -> bool; .tokens(now) -> float.
     KeyedBuckets(rate, burst, max_keys); .take(key, now) -> bool; len()
     FairBucket(rate, burst, now=0.0, window=1.0, max_keys=4096); .take(key, now) -> bool;
         .active(now) -> int (keys that asked within the window); .tokens(now)
         One TokenBucket shared by every key, max-min fair between the keys: the fair level is
         the water-filling level at which the keys' asks over the last `window` seconds, each
         cut at it, add up to HEADROOM (0.8) of the rate (recomputed every tenth of a window;
         .level(now)); each key has a bucket of its own at that level (two windows deep; a new
         key starts with it full), and takes a shared token only with one of its own (spent
         even when the shared bucket is empty, so a greedy key cannot hoard them), or when the
         shared bucket is full (its token would be lost: work-conserving). So however many
         keys ask, a key that asks for less than its fair share finds a token nearly always
         (the headroom keeps some in the shared bucket), and the keys that ask for more share
         the rest. Asks are a sliding window of two slots; a key is forgotten KEEP (10)
         windows after it last asked, and beyond max_keys the least recently asking first.
         Cost: O(1) per take, and an O(keys log keys) recomputation every tenth of a window
         (4096 keys: ~1 ms).
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


class FairBucket:
    __slots__ = ("_keys", "_level", "_level_at", "bucket", "max_keys", "rate", "window")

    KEEP = 10          # windows a key is remembered after it last asked (its own tokens)
    HEADROOM = 0.8     # the keys' fair levels add up to this much of the rate: the rest keeps
                       # tokens in the bucket for keys that ask for less (a full bucket's token,
                       # which would be lost, goes to anyone)

    def __init__(self, rate: float, burst: float = 0, now: float = 0.0, window: float = 1.0,
                 max_keys: int = 4096) -> None:
        self.bucket = TokenBucket(rate, burst, now)
        self.rate, self.window, self.max_keys = float(rate), max(1e-3, window), max(1, max_keys)
        # key -> [last asked, slot, asks in slot, asks the slot before, own tokens, own refill]
        self._keys: OrderedDict[str, list[float]] = OrderedDict()
        self._level = self.rate            # tokens per second a key may use (max-min)
        self._level_at = float("-inf")

    def tokens(self, now: float) -> float:
        return self.bucket.tokens(now)

    def level(self, now: float) -> float:
        """The fair level now: tokens per second one key may use."""
        self._recompute(now)
        return self._level

    def _forget(self, now: float) -> None:
        keys = self._keys
        while keys:
            first = next(iter(keys.values()))
            if first[0] >= now - self.KEEP * self.window and len(keys) <= self.max_keys:
                break
            keys.popitem(last=False)

    def active(self, now: float) -> int:
        """Keys that asked within the last window."""
        self._forget(now)
        return sum(1 for st in self._keys.values() if st[0] >= now - self.window)

    def _asks(self, state: list[float], now: float) -> float:
        """The key's asks over the last window (two slots, the older one weighted by how much
        of it is still inside the window); advances its slots to `now`."""
        slot = now // self.window
        if slot != state[1]:
            state[3] = state[2] if slot == state[1] + 1 else 0.0
            state[2], state[1] = 0.0, slot
        return state[3] * (1.0 - (now / self.window - slot)) + state[2]

    def _recompute(self, now: float) -> None:
        """Water-filling over the keys' asks in the last window: the level L (per second) at
        which sum(min(asks, L x window)) is HEADROOM x rate x window."""
        demands = sorted(self._asks(state, now) for state in self._keys.values())
        left, n = self.HEADROOM * self.rate * self.window, len(demands)
        level = self.rate
        for i, d in enumerate(demands):
            if d * (n - i) >= left:
                level = left / (n - i) / self.window
                break
            left -= d
        self._level, self._level_at = level, now

    def take(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        state = self._keys.pop(key, None)
        fresh = state is None
        if state is None:
            state = [now, now // self.window, 0.0, 0.0, 0.0, now]
        state[0] = now
        self._keys[key] = state              # the most recently asking last
        self._forget(now)
        self._asks(state, now)
        state[2] += 1.0
        if now - self._level_at >= self.window / 10 or now < self._level_at:
            self._recompute(now)
        # the key's own bucket: the fair level, one window deep (a key asking at random times
        # for less than its level is rarely short)
        own_burst = max(1.0, 2.0 * self._level * self.window)
        if now > state[5]:
            state[4] = min(own_burst, state[4] + (now - state[5]) * self._level)
            state[5] = now
        if fresh:       # a new key starts with a full bucket of its own (at least a token)
            state[4] = own_burst
        if state[4] >= 1.0:
            # its own token is spent whether or not the shared bucket has one: a key that
            # asks more than its level cannot hoard tokens while the bucket is empty (and then
            # empty it at once, before a modest key's turn)
            state[4] -= 1.0
            return self.bucket.take(now)
        # beyond its level: only a full bucket's token, which would be lost otherwise
        return self.bucket.tokens(now) >= self.bucket.burst - 1.0 and self.bucket.take(now)
