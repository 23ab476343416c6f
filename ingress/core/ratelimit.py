"""Token buckets: the bulk lane's rate cap, one bucket per key (a domain's fast-lane rate), and
one bucket shared fairly by many keys (a trust tier's total rate). Pure: the clock is an
argument.

API: TokenBucket(rate, burst); .take(now) -> bool; .tokens(now) -> float.
     SlidingCount(window); .add(now, n=1) ; .value(now) -> float   events over the last
         `window` seconds, estimated from two fixed windows (this one's count and the one
         before, weighted by how much of it is still inside): O(1), three numbers. News of the
         window before (a count shared late) still counts; older news is dropped.
     KeyedBuckets(rate, burst, max_keys, keep_partial=False); .take(key, now) -> bool; len();
         `key in buckets`. keep_partial=True: when the table is full, a new key only replaces
         the least recently used key whose bucket has refilled completely (forgetting it then
         changes nothing: a key seen again starts full); if that one has not, the new key is
         refused (take() is False, nothing stored). So no number of other keys can reset a
         drained key's bucket; the price is that max_keys keys kept draining lock newcomers
         out until the oldest refills (at most burst / rate seconds after its last take).
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
seen again starts with a full bucket (keep `burst` small where that matters, or keep_partial).
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
    """One TokenBucket(rate, burst) per key, at most `max_keys` of them (LRU; with
    keep_partial, only a refilled bucket makes room: see the module docstring)."""

    __slots__ = ("_buckets", "burst", "keep_partial", "max_keys", "rate")

    def __init__(self, rate: float, burst: float = 0, max_keys: int = 4096,
                 keep_partial: bool = False) -> None:
        self.rate, self.burst, self.max_keys = float(rate), float(burst), max(1, max_keys)
        self.keep_partial = keep_partial
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def take(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                oldest = next(iter(self._buckets.values()))
                if self.keep_partial and oldest.tokens(now) < oldest.burst:
                    return False              # forgetting it would refill it: refuse instead
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now=now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


class SlidingCount:
    __slots__ = ("cur", "prev", "slot", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.slot = -1.0                # the fixed window `cur` counts (now // window)
        self.cur = self.prev = 0.0

    def add(self, now: float, n: float = 1.0) -> None:
        slot = now // self.window
        if slot > self.slot:
            self.cur, self.prev = 0.0, (self.cur if slot == self.slot + 1 else 0.0)
            self.slot = slot
        if slot == self.slot:
            self.cur += n
        elif slot == self.slot - 1:
            self.prev += n               # late news of the window before

    def value(self, now: float) -> float:
        slot = now // self.window
        inside = 1.0 - (now / self.window - slot)    # of the window before, still inside
        if slot == self.slot:
            return self.cur + self.prev * inside
        if slot == self.slot + 1:
            return self.cur * inside
        return 0.0


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
        self._keys: OrderedDict[str, _FairKey] = OrderedDict()
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
            if first.last >= now - self.KEEP * self.window and len(keys) <= self.max_keys:
                break
            keys.popitem(last=False)

    def active(self, now: float) -> int:
        """Keys that asked within the last window."""
        self._forget(now)
        return sum(1 for st in self._keys.values() if st.last >= now - self.window)

    def _recompute(self, now: float) -> None:
        """Water-filling over the keys' asks in the last window: the level L (per second) at
        which sum(min(asks, L x window)) is HEADROOM x rate x window."""
        demands = sorted(state.asks.value(now) for state in self._keys.values())
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
            state = _FairKey(now, SlidingCount(self.window))
        state.last = now
        self._keys[key] = state              # the most recently asking last
        self._forget(now)
        state.asks.add(now)
        if now - self._level_at >= self.window / 10 or now < self._level_at:
            self._recompute(now)
        # the key's own bucket: the fair level, one window deep (a key asking at random times
        # for less than its level is rarely short)
        own_burst = max(1.0, 2.0 * self._level * self.window)
        if now > state.refill:
            state.tokens = min(own_burst, state.tokens + (now - state.refill) * self._level)
            state.refill = now
        if fresh:       # a new key starts with a full bucket of its own (at least a token)
            state.tokens = own_burst
        if state.tokens >= 1.0:
            # its own token is spent whether or not the shared bucket has one: a key that
            # asks more than its level cannot hoard tokens while the bucket is empty (and then
            # empty it at once, before a modest key's turn)
            state.tokens -= 1.0
            return self.bucket.take(now)
        # beyond its level: only a full bucket's token, which would be lost otherwise
        return self.bucket.tokens(now) >= self.bucket.burst - 1.0 and self.bucket.take(now)


class _FairKey:
    """One key of a FairBucket: when it last asked, its asks over the window, its own bucket."""

    __slots__ = ("asks", "last", "refill", "tokens")

    def __init__(self, now: float, asks: SlidingCount) -> None:
        self.last, self.asks = now, asks
        self.tokens, self.refill = 0.0, now
