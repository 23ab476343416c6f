"""Which of the workers' learn facts a lane broker passes on to the acceptors (pure; no I/O, the
clock as an argument).

Purpose
    A worker sends a LEARN fact for every message that passes SPF with aligned DKIM
    (workers.lane.worker): a learned network's steady mail repeats the same fact hundreds of
    times a second, and the broker published each one to every acceptor, the fast acceptors and
    the mutual-TLS acceptors included, whose loops then woke for an entry that changed nothing
    but an expiry days away (measured, spfmany_learned: the fast acceptor's wake-ups 2.2x those
    of the same flood unlearned). A LEARN that names an address, domain and provider passed on
    within `window` seconds is dropped; anything else passes, and is remembered.

API
    LearnRepeats(window, max_size=REPEATS_KEPT)
        passes(fact, payload, now) -> bool   payload: the fact's frames after its name (the
                                             address, then the domain and provider when sent)
    LEARN_REPEAT                              the window's upper bound, in seconds
    repeat_window(learned_ttl) -> float       min(LEARN_REPEAT, learned_ttl / 4)

Rules
    * Only LEARN facts are ever dropped. UNLEARN, penalties and deferral records always pass.
    * A LEARN passes when the same (address, domain, provider) was not passed on within the
      window. An address learned for several domains (a shared address, or a spammer rotating
      domains over its addresses: each message would otherwise change the acceptors' entry, which
      holds one domain, ingress.policy.learned) publishes each of them once a window; the
      acceptors then hold one of them, and mail of the others is judged afresh at MAIL FROM:
      a promotion at connect forgone, never one gained.
    * An UNLEARN forgets every (address, ...) it names, and every entry that named its provider,
      so that the next LEARN after it passes at once.
    * So an acceptor's entry is refreshed at most `window` seconds later than before: with the
      window at most a quarter of classify.learned_ttl, a network that keeps sending never
      expires.

Failure modes
    ValueError from the constructor for window < 0 or max_size < 1. Nothing else raises.

Limits
    At most max_size entries remembered; beyond it the one expiring soonest is forgotten, and
    its next LEARN passes (one more publication, never a lost fact). O(log n) a LEARN, O(entries
    of the address and of the provider) an UNLEARN.
"""

from __future__ import annotations

from collections.abc import Sequence

from ingress.core.expiry import ExpiryMap
from ingress.core.wire import LEARN_TOPIC, UNLEARN_TOPIC

__all__ = ["LEARN_REPEAT", "REPEATS_KEPT", "LearnRepeats", "repeat_window"]

LEARN_REPEAT = 60.0     # seconds: the window's upper bound
REPEATS_KEPT = 4096     # entries remembered


def repeat_window(learned_ttl: float) -> float:
    """The window for classify.learned_ttl: short enough that a refresh comes long before an
    entry expires."""
    return max(0.0, min(LEARN_REPEAT, learned_ttl / 4))


class LearnRepeats:
    """See the module docstring."""

    __slots__ = ("_by", "_passed", "window")

    def __init__(self, window: float, max_size: int = REPEATS_KEPT) -> None:
        if window < 0:
            raise ValueError("LearnRepeats window must be >= 0")
        self.window = window
        # keys: "address\0domain[\0provider]", the fact's own frames
        self._passed = ExpiryMap(max_size, on_drop=self._forget)
        self._by: dict[str, set[str]] = {}                 # address or "p:" provider -> keys

    def _forget(self, key: str) -> None:
        for index in self._index(key):
            keys = self._by.get(index)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by[index]

    @staticmethod
    def _index(key: str) -> list[str]:
        """The indexes a key is under: its address, and "p:" its provider when it names one."""
        address, *rest = key.split("\0")
        provider = rest[1] if len(rest) > 1 else ""
        return [i for i in (address, provider and f"p:{provider}") if i]

    def passes(self, fact: bytes, payload: Sequence[bytes], now: float) -> bool:
        if not payload or fact not in (LEARN_TOPIC, UNLEARN_TOPIC):
            return True
        key = b"\0".join(payload[:3]).decode("ascii", "replace")
        if fact == UNLEARN_TOPIC:     # its frames: address, "", provider
            for index in self._index(key):
                for known in list(self._by.get(index, ())):
                    self._passed.pop(known)
            return True
        if self._passed.get(key, now) is not None:
            return False
        if self.window > 0 and self._passed.put(key, now + self.window, now):
            for index in self._index(key):
                self._by.setdefault(index, set()).add(key)
        return True
