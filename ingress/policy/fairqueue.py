"""Deficit round robin between identities, with a bound per identity (pure; no I/O, no clock).

Purpose
    The fast broker's queue (workers/broker.py): one FIFO per identity's share key
    (ingress.policy.identity.share_key), served in deficit round robin (Shreedhar & Varghese,
    1995) with a quantum in bytes, so one identity's burst cannot delay another's: each
    identity with work gets about `quantum` bytes per round whatever its backlog. Each identity
    may hold at most `key_count` messages and `key_bytes` bytes queued (its share of queue_max
    and queue_bytes); dispatch can skip an identity that is at its in-flight bound.

API
    FairQueue(quantum, key_count, key_bytes)
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

Failure modes: none raised; sizes below 1 count as 1 (an empty body still costs a turn).
Limits: pop() runs in O(keys + size / quantum) in the worst case (a message far larger than the
quantum waits for its deficit to build up over rounds, as DRR intends); memory is O(items).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["FairQueue"]


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

    def push(self, key: str, item: T, size: int, bounded: bool = True) -> bool:
        size = max(1, size)
        if bounded and (self.depth(key) >= self.key_count
                or self._bytes.get(key, 0) + size > self.key_bytes):
            return False
        self._add(key, item, size, front=False)
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
