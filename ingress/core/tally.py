"""Counting by key: a count that drops its key at zero, and keys grouped with their largest group.

Purpose
    The quotas of the policy modules count things per key (sessions per IP, SPF checks per
    domain and per network, deferral records per network) and make room by quota (the learned
    cache by domain and by network, the deferral records by site): one implementation of each
    bookkeeping, so that no module keeps its own copy of the counting.

API
    decrement(counts, key)      counts[key] - 1, the key dropped when that reaches 0 (a key
                                not held is left alone: never below zero)
    Groups()                    keys grouped (a key in one group per Groups), in arrival order
        add(group, key) / remove(group, key)     (remove of a key not held: ignored)
        touch(group)            the group counts as the most recently changed of its size
        count(group) -> int     keys it holds
        keys(group) -> dict[key, None] | None    its keys, oldest first (do not modify)
        oldest(group) -> key | None
        largest() -> (group, n) the group holding the most keys ("", 0 when empty); of equal
                                sizes the least recently changed (added to, removed from or
                                touched)
        len(groups)             groups holding keys

Failure modes: none raised (KeyError never escapes). Limits: O(1) per change; largest() is
O(distinct group sizes), which the callers' quotas bound. Not thread-safe. Pure: no I/O, no
clock.
"""

from __future__ import annotations

__all__ = ["Groups", "decrement"]


def decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


class Groups:
    __slots__ = ("_of", "_sizes")

    def __init__(self) -> None:
        self._of: dict[str, dict[str, None]] = {}       # group -> keys, oldest first
        self._sizes: dict[int, dict[str, None]] = {}    # n -> groups of n keys, by last change

    def __len__(self) -> int:
        return len(self._of)

    def count(self, group: str) -> int:
        return len(self._of.get(group, ()))

    def keys(self, group: str) -> dict[str, None] | None:
        return self._of.get(group)

    def oldest(self, group: str) -> str | None:
        keys = self._of.get(group)
        return next(iter(keys)) if keys else None

    def add(self, group: str, key: str) -> None:
        keys = self._of.setdefault(group, {})
        self._resize(group, len(keys), len(keys) + 1)
        keys[key] = None

    def remove(self, group: str, key: str) -> None:
        keys = self._of.get(group)
        if keys is None or key not in keys:
            return
        del keys[key]
        self._resize(group, len(keys) + 1, len(keys))
        if not keys:
            del self._of[group]

    def touch(self, group: str) -> None:
        n = self.count(group)
        if n:
            self._resize(group, n, n)

    def largest(self) -> tuple[str, int]:
        if not self._sizes:
            return "", 0
        n = max(self._sizes)
        return next(iter(self._sizes[n])), n

    def _resize(self, group: str, old: int, new: int) -> None:
        if old:
            bucket = self._sizes[old]
            bucket.pop(group, None)
            if not bucket:
                del self._sizes[old]
        if new:
            self._sizes.setdefault(new, {})[group] = None
