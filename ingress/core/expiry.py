"""A bounded map whose entries expire: key -> expiry time (pure; no I/O, clock as an argument).

Purpose
    The one expiring-entry structure behind the admission penalty box, the learned allow
    cache and the recipient-callout cache: each key holds an expiry, refreshed only forward,
    and the map holds at most `max_size` keys.

API
    ExpiryMap(max_size, on_drop=None)
        put(key, expires_at, now=None) -> bool   keep the later expiry; False if not stored
        get(key, now) -> float | None            the expiry while not expired (lazy delete)
        peek(key) -> float | None                the stored expiry, expired or not
        pop(key) -> float | None                 remove the entry now; its expiry, or None
        purge(now) -> int                        drop expired entries; how many
        items() -> list[(key, expires_at)]       sorted by key
        snapshot() -> dict[key, expires_at]      every entry as held (expired ones not yet
                                                 purged included), unsorted: a plain dict
                                                 copy, cheap enough for an event loop
        len(map)

Rules
    * An entry expires at `expires_at`: it is gone for any `now >= expires_at`.
    * put() never shortens an expiry. With `now` given, an already-expired entry is not stored.
    * When full, expired entries are purged first (if `now` is given); then the entry expiring
      soonest among the held ones and the newcomer is dropped (the newcomer itself, when it
      would expire strictly sooner than everything held). A caller with its own eviction
      rule (the learned allow cache: by quota) makes room before put() so this never runs.
    * on_drop(key), when given, is called for every entry that leaves the map (expired,
      evicted, popped), so a caller can keep indexes over the keys exact.

Failure modes
    ValueError from the constructor for max_size < 1. Nothing else raises.

Limits
    O(log n) amortised per put (a lazy-deletion heap); the heap is rebuilt when stale items
    dominate, so memory stays O(max_size). Not thread-safe. The clock is whatever the caller
    uses consistently (monotonic or epoch seconds).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["ExpiryMap"]


class ExpiryMap:
    """key -> expires_at, bounded in count; see the module docstring."""

    __slots__ = ("_expiry", "_heap", "max_size", "on_drop")

    def __init__(self, max_size: int, on_drop: Callable[[str], None] | None = None) -> None:
        if max_size < 1:
            raise ValueError("ExpiryMap max_size must be >= 1")
        self.max_size = max_size
        self.on_drop = on_drop
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def put(self, key: str, expires_at: float, now: float | None = None) -> bool:
        """Store key until expires_at (never shortens). False if the entry was not stored."""
        if now is not None and expires_at <= now:
            return False
        old = self._expiry.get(key)
        if old is not None and old >= expires_at:
            return True
        if old is None and len(self._expiry) >= self.max_size:
            if now is not None:
                self.purge(now)
            if len(self._expiry) >= self.max_size:
                soonest = self._peek_soonest()
                if soonest is not None and soonest > expires_at:
                    return False
                self._evict_soonest()
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        if len(self._heap) > 2 * len(self._expiry) + 64:
            self._heap = [(e, k) for k, e in self._expiry.items()]
            heapq.heapify(self._heap)
        return True

    def get(self, key: str, now: float) -> float | None:
        exp = self._expiry.get(key)
        if exp is None:
            return None
        if exp <= now:
            self._drop(key)
            return None
        return exp

    def pop(self, key: str) -> float | None:
        exp = self._expiry.get(key)
        if exp is not None:
            self._drop(key)      # its heap item goes stale (skipped, rebuilt when they dominate)
        return exp

    def peek(self, key: str) -> float | None:
        return self._expiry.get(key)

    def purge(self, now: float) -> int:
        removed = 0
        while self._heap and self._heap[0][0] <= now:
            exp, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == exp:
                self._drop(key)
                removed += 1
        return removed

    def items(self) -> list[tuple[str, float]]:
        return sorted(self._expiry.items())

    def snapshot(self) -> dict[str, float]:
        return dict(self._expiry)

    def _peek_soonest(self) -> float | None:
        while self._heap:
            exp, key = self._heap[0]
            if self._expiry.get(key) == exp:
                return exp
            heapq.heappop(self._heap)  # stale (refreshed or lazily deleted)
        return None

    def _evict_soonest(self) -> None:
        while self._heap:
            exp, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == exp:
                self._drop(key)
                return

    def _drop(self, key: str) -> None:
        del self._expiry[key]
        if self.on_drop is not None:
            self.on_drop(key)
