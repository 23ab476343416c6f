"""Bulk shaping by a DNS block-list score: who counts as listed, and the silent seats in the order
they are evicted (pure; no I/O, clock as an argument where one is needed).

Purpose
    A DNS block-list score (the sum of the weights of the zones listing the client:
    ingress.policy.classify.Evidence.bulk_score, from the connect checks) only ever *shapes*
    the bulk lane (issue 18 item 3). A listed client (score >= dnsbl.threshold):
      * is evicted first: when the slots are full, a listed silent bulk seat goes before any
        unlisted one, the highest score first, then the longest silent (SilentSeats.heads,
        session_rules.pick_eviction), still subject to admission.evict_silent_after and
        admission.evict_rate;
      * gets no retry bypass: its transaction never claims a deferral record, and a deferral
        made for it records nothing (ingress.edge.retries: listed=True);
      * is held to dnsbl.listed_per_ip_max bulk sessions per admission IP key
        (ingress.policy.admission: Admission.mark_listed when the verdict arrives, and a
        bounded memory of listed keys that refuses at admission, before any DNS).

API
    listed(score, threshold) -> bool       the one "listed" rule (every shell asks it)
    SilentSeats()                          the bulk seats that have not spoken, by class
        add(key, since)                    admitted (unlisted; since: monotonic seconds)
        mark(key, score) -> bool           its verdict listed it with `score` (a later,
                                           higher score moves it); False: not silent here
        pop(key) -> float | None           it spoke, was promoted or went: its `since`
        heads() -> Iterator[(key, since)]  each class's longest-silent seat, in eviction
                                           order: the listed classes by score, highest first,
                                           then the unlisted; pick_eviction takes the first
                                           that qualifies
        score(key) -> float                its listed score (0.0: unlisted or absent)
        listed_count, len(), in

Rules (SilentSeats)
    * A class is one score value; inside it, seats keep the order they joined it: admission
      order for the unlisted, the order their verdicts arrived for the listed (the verdict
      comes within checks.connect_deadline of admission, so it is admission order but for
      that spread).
    * Only silent bulk seats are held: a seat that spoke, was promoted or went is popped, so
      a listed client that speaks (a real MTA behind a listed address) is never evicted for
      silence: eviction stays the slowloris rule it was, in a different order.

Failure modes: none raised (marking or popping an unknown key is a no-op).
Limits: O(1) add/pop/mark within a class, O(log g + g) when a class is created or emptied and
O(g) per heads() walk, g = the distinct listed scores present (sums of the configured sites'
weights: at most 2^sites, in practice the handful of zone combinations seen). Memory: one
entry per silent seat (bounded by the slots), one small dict per class. Not thread-safe.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["SilentSeats", "listed"]

K = TypeVar("K")


def listed(score: float, threshold: float) -> bool:
    """A client is listed when its block-list score reaches the threshold (a score of 0 never
    is: no zone listed it, or no zone is configured)."""
    return score > 0 and score >= threshold


class SilentSeats(Generic[K]):
    """Silent bulk seats: unlisted in admission order, listed by score (module docstring)."""

    __slots__ = ("_classes", "_scores", "_unlisted", "_where")

    def __init__(self) -> None:
        self._unlisted: OrderedDict[K, float] = OrderedDict()
        self._classes: dict[float, OrderedDict[K, float]] = {}   # score -> seats (listed)
        self._scores: list[float] = []                             # the classes, ascending
        self._where: dict[K, float] = {}                           # listed seat -> its score

    def __len__(self) -> int:
        return len(self._unlisted) + len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._unlisted or key in self._where

    @property
    def listed_count(self) -> int:
        return len(self._where)

    def score(self, key: K) -> float:
        return self._where.get(key, 0.0)

    def add(self, key: K, since: float) -> None:
        self.pop(key)
        self._unlisted[key] = since

    def mark(self, key: K, score: float) -> bool:
        if key in self._where:
            if score <= self._where[key]:
                return True
            since = self._take_listed(key)
        elif key in self._unlisted:
            since = self._unlisted.pop(key)
        else:
            return False
        group = self._classes.get(score)
        if group is None:
            group = self._classes[score] = OrderedDict()
            bisect.insort(self._scores, score)
        group[key] = since
        self._where[key] = score
        return True

    def pop(self, key: K) -> float | None:
        if key in self._where:
            return self._take_listed(key)
        return self._unlisted.pop(key, None)

    def heads(self) -> Iterator[tuple[K, float]]:
        for score in reversed(self._scores):
            yield next(iter(self._classes[score].items()))
        if self._unlisted:
            yield next(iter(self._unlisted.items()))

    def _take_listed(self, key: K) -> float:
        score = self._where.pop(key)
        group = self._classes[score]
        since = group.pop(key)
        if not group:
            del self._classes[score]
            del self._scores[bisect.bisect_left(self._scores, score)]
        return since
