"""The acceptor's learned store: the learned allow cache of one acceptor and its file.

API:
    load_learned(path, ttl, max_size) -> LearnedAllow   the file's entries, or an empty cache
    LearnedStore(path, ttl, max_size)
        contains(ip, now) -> bool      is the client on the learned allow list?
        learn(ip, now, domain="")      remember it, for the domain it was learned for (its
                                       identity "learned:<org domain>"; marks the store dirty)
        allow                          the LearnedAllow itself (len(), to_json())
        dirty                          changed since the last snapshot
        snapshot(now) -> bytes | None  the JSON to save (purged), None when unchanged; clears
                                       `dirty`. The caller writes it (acceptor 0 does, every
                                       LEARNED_SAVE_INTERVAL; every acceptor learns the same
                                       entries over pub/sub and reads the file at start).

Failure modes: a missing file is an empty cache; an unreadable or corrupt one is logged
(learned_load_failed) and the cache starts empty. Limits: LearnedAllow's (max_size entries,
each expiring after ttl seconds, at least one second).
"""

from __future__ import annotations

import time
from pathlib import Path

from ingress.core import log
from ingress.policy.classify import LearnedAllow

LEARNED_SAVE_INTERVAL = 5.0  # seconds between saves of a changed learned allow cache


def load_learned(path: Path, ttl: float, max_size: int) -> LearnedAllow:
    try:
        return LearnedAllow.from_json(path.read_bytes(), ttl=max(ttl, 1.0),
                                      max_size=max_size, now=time.time())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.event("learned_load_failed", "warning", path=str(path), error=str(e))
    return LearnedAllow(ttl=max(ttl, 1.0), max_size=max_size)


class LearnedStore:
    def __init__(self, path: Path, ttl: float, max_size: int) -> None:
        self.path = path
        self.allow = load_learned(path, ttl, max_size)
        self.dirty = False

    def contains(self, ip: str, now: float) -> bool:
        return self.allow.contains(ip, now)

    def learn(self, ip: str, now: float, domain: str = "") -> None:
        self.allow.learn(ip, now, domain)
        self.dirty = True

    def snapshot(self, now: float) -> bytes | None:
        if not self.dirty:
            return None
        self.dirty = False
        self.allow.purge(now)
        return self.allow.to_json().encode()
