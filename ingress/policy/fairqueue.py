"""Deficit round robin between identities, with a bound per identity, in strict priority between
trust tiers (pure; no I/O, no clock).

Purpose
    The fast broker's queue (workers/lane/broker.py): one FIFO per identity's share key
    (ingress.policy.identity.share_key), served in deficit round robin (Shreedhar & Varghese,
    1995) with a quantum in bytes, so one identity's burst cannot delay another's: each
    identity with work gets about `quantum` bytes per round whatever its backlog. Each identity
    may hold at most `key_count` messages and `key_bytes` bytes queued (its share of queue_max
    and queue_bytes); dispatch can skip an identity that is at its in-flight bound.

API
    FairQueue(quantum, key_count, key_bytes)
        room(key, size) -> bool           is the key below its bound for one more item?
        push(key, item, size, bounded=True) -> bool
                                          False: the key is at its share (the caller NACKs);
                                          bounded=False skips the per-key bound (the caller
                                          applies its own global bounds)
        push_front(key, item, size)       put back an item that could not be sent (no bound)
        pop(eligible=None) -> (key, item, size) | None
                                          the next item in DRR order among keys for which
                                          eligible(key) is true; None when none is
        drain() -> list[(key, item, size)] everything, emptied (shutdown)
        len(q), q.bytes, q.depth(key), q.keys()
    TieredQueue(quantum, key_count, key_bytes, limits={tier: (count, bytes)})
        One FairQueue per trust tier (ingress.policy.tiers), served in strict priority: the
        operator tier's work before any lower tier's, whatever their backlog. A tier in
        `limits` holds at most that many messages and bytes queued (its cap of queue_max and
        queue_bytes, tiers.cap); the others only the per-key bound (and the caller's global
        bounds).
        push(tier, key, item, size, bounded=True) -> bool   False: the tier at its cap, or the
                                          key at its share (bounded; the caller NACKs)
        tier_room(tier, size) / key_room(tier, key, size) -> bool   room for one more item in
                                          the tier's cap / the key's share (no side effect)
        push_front(tier, key, item, size) put back an item that could not be sent (no bound)
        pop(tier_ok=None, key_ok=None) -> (tier, key, item, size) | None   the highest tier
                                          with work for which tier_ok(tier) holds (its
                                          in-flight cap), in DRR order among its keys for
                                          which key_ok(key) holds
        drain() -> list[(tier, key, item, size)]
        len(q), q.bytes, q.depth(key), q.tier_len(tier), q.tier_bytes(tier)

Failure modes: none raised; sizes below 1 count as 1 (an empty body still costs a turn).
Limits: pop() runs in O(keys + size / quantum) in the worst case (a message far larger than the
quantum waits for its deficit to build up over rounds, as DRR intends); memory is O(items).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from ingress.policy.tiers import Tier

T = TypeVar("T")

__all__ = ["FairQueue", "TieredQueue"]


class FairQueue(Generic[T]):
    def __init__(self, quantum: int, key_count: int, key_bytes: int) -> None:
        if quantum < 1 or key_count < 1 or key_bytes < 1:
            raise ValueError("quantum, key_count and key_bytes must be >= 1")
        self.quantum, self.key_count, self.key_bytes = quantum, key_count, key_bytes
        self._queues: dict[str, deque[tuple[T, int]]] = {}
        self._bytes: dict[str, int] = {}
        self._deficit: dict[str, int] = {}
        self._active: deque[str] = deque()   # keys with work, in round order
        self._turn = False                   # the front key has had its quantum this turn
        self._len = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self._len

    def depth(self, key: str) -> int:
        q = self._queues.get(key)
        return len(q) if q else 0

    def keys(self) -> list[str]:
        return list(self._active)

    def room(self, key: str, size: int) -> bool:
        """Is `key` below its bound for one more item of `size`?"""
        return self.depth(key) < self.key_count \
            and self._bytes.get(key, 0) + max(1, size) <= self.key_bytes

    def push(self, key: str, item: T, size: int, bounded: bool = True) -> bool:
        if bounded and not self.room(key, size):
            return False
        self._add(key, item, max(1, size), front=False)
        return True

    def push_front(self, key: str, item: T, size: int) -> None:
        self._add(key, item, max(1, size), front=True)

    def _add(self, key: str, item: T, size: int, *, front: bool) -> None:
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._deficit[key] = 0
            self._bytes[key] = 0
            self._active.append(key)
        if front:
            q.appendleft((item, size))
        else:
            q.append((item, size))
        self._bytes[key] += size
        self._len += 1
        self.bytes += size

    def pop(self, eligible: Callable[[str], bool] | None = None) -> tuple[str, T, int] | None:
        skipped = 0
        while self._active:
            key = self._active[0]
            if eligible is not None and not eligible(key):
                skipped += 1
                if skipped >= len(self._active):
                    return None
                self._next_turn()
                continue
            skipped = 0
            q = self._queues[key]
            size = q[0][1]
            if not self._turn:     # the key's turn begins: one quantum more
                self._deficit[key] += self.quantum
                self._turn = True
            if self._deficit[key] >= size:
                return self._serve(key, q)
            self._next_turn()
        return None

    def _serve(self, key: str, q: deque[tuple[T, int]]) -> tuple[str, T, int]:
        item, size = q.popleft()
        self._deficit[key] -= size
        self._bytes[key] -= size
        self._len -= 1
        self.bytes -= size
        if not q:          # an idle key keeps no deficit (DRR): it cannot save up credit
            self._active.popleft()
            del self._queues[key], self._deficit[key], self._bytes[key]
            self._turn = False
        return key, item, size

    def _next_turn(self) -> None:
        self._active.rotate(-1)
        self._turn = False

    def drain(self) -> list[tuple[str, T, int]]:
        out = [(k, item, size) for k in self._active for item, size in self._queues[k]]
        self._queues.clear()
        self._bytes.clear()
        self._deficit.clear()
        self._active.clear()
        self._turn = False
        self._len = self.bytes = 0
        return out


class TieredQueue(Generic[T]):
    def __init__(self, quantum: int, key_count: int, key_bytes: int,
                 limits: Mapping[Tier, tuple[int, int]] | None = None) -> None:
        self.limits = dict(limits or {})
        self._tiers: dict[Tier, FairQueue[T]] = {
            t: FairQueue(quantum, key_count, key_bytes) for t in Tier}

    def __len__(self) -> int:
        return sum(len(q) for q in self._tiers.values())

    def __bool__(self) -> bool:
        return any(len(q) for q in self._tiers.values())

    @property
    def bytes(self) -> int:
        return sum(q.bytes for q in self._tiers.values())

    def tier_len(self, tier: Tier) -> int:
        return len(self._tiers[tier])

    def tier_bytes(self, tier: Tier) -> int:
        return self._tiers[tier].bytes

    def depth(self, key: str) -> int:
        return sum(q.depth(key) for q in self._tiers.values())

    def tier_room(self, tier: Tier, size: int) -> bool:
        """Is there room in this tier's cap for one more item of `size`?"""
        q = self._tiers[tier]
        limit = self.limits.get(tier)
        return limit is None or (len(q) + 1 <= limit[0] and q.bytes + max(1, size) <= limit[1])

    def key_room(self, tier: Tier, key: str, size: int) -> bool:
        """Is this key below its share for one more item of `size`?"""
        return self._tiers[tier].room(key, size)

    def push(self, tier: Tier, key: str, item: T, size: int, bounded: bool = True) -> bool:
        if not self.tier_room(tier, size):
            return False
        return self._tiers[tier].push(key, item, size, bounded)

    def push_front(self, tier: Tier, key: str, item: T, size: int) -> None:
        self._tiers[tier].push_front(key, item, size)

    def pop(self, tier_ok: Callable[[Tier], bool] | None = None,
            key_ok: Callable[[str], bool] | None = None) -> tuple[Tier, str, T, int] | None:
        for tier in Tier:                      # strict priority: a lower value first
            q = self._tiers[tier]
            if not q or (tier_ok is not None and not tier_ok(tier)):
                continue
            got = q.pop(key_ok)
            if got is not None:
                return tier, *got
        return None

    def drain(self) -> list[tuple[Tier, str, T, int]]:
        return [(t, *got) for t, q in self._tiers.items() for got in q.drain()]
