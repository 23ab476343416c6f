"""Which of the workers' learn facts a lane broker passes on to the acceptors (pure; no I/O, the
clock as an argument).

Purpose
    A worker sends a LEARN fact for every message that passes SPF with aligned DKIM
    (workers.lane.worker): a learned network's steady mail repeats the same fact hundreds of
    times a second, and the broker published each one to every acceptor, the fast acceptors and
    the mutual-TLS acceptors included, whose loops then woke for an entry that changed nothing
    but an expiry days away (measured, spfmany_learned: the fast acceptor's wake-ups 2.4x those
    of the same flood unlearned). A LEARN that names, for the same address, what was passed on
    within `window` seconds is dropped; anything else passes, and is remembered.

API
    LearnRepeats(window, max_size=REPEATS_KEPT)
        passes(fact, payload, now) -> bool   payload: the fact's frames after its name (the
                                             address, then the domain and provider when sent)
    LEARN_REPEAT                              the window's upper bound, in seconds
    repeat_window(learned_ttl) -> float       min(LEARN_REPEAT, learned_ttl / 4)

Rules
    * Only LEARN facts are ever dropped. UNLEARN, penalties and deferral records always pass.
    * A LEARN passes when its address has no fact passed within the window, or when the domain or
      provider it names differs from the last one passed (a shared address learned for two
      domains holds the latest, as before: ingress.policy.learned).
    * An UNLEARN forgets its address, and every address whose last LEARN named its provider,
      so that the next LEARN after it passes at once.
    * So an acceptor's entry is refreshed at most `window` seconds later than before: with the
      window at most a quarter of classify.learned_ttl, a network that keeps sending never
      expires.

Failure modes
    ValueError from the constructor for window < 0 or max_size < 1. Nothing else raises.

Limits
    At most max_size addresses remembered; beyond it the one expiring soonest is forgotten, and
    its next LEARN passes (one more publication, never a lost fact). An UNLEARN naming a
    provider scans the remembered addresses: O(max_size), rare (mail failing SPF or DKIM from
    a learned network).
"""

from __future__ import annotations

from collections.abc import Sequence

from ingress.core.expiry import ExpiryMap
from ingress.core.wire import LEARN_TOPIC, UNLEARN_TOPIC

__all__ = ["LEARN_REPEAT", "REPEATS_KEPT", "LearnRepeats", "repeat_window"]

LEARN_REPEAT = 60.0     # seconds: the window's upper bound
REPEATS_KEPT = 4096     # addresses remembered


def repeat_window(learned_ttl: float) -> float:
    """The window for classify.learned_ttl: short enough that a refresh comes long before an
    entry expires."""
    return max(0.0, min(LEARN_REPEAT, learned_ttl / 4))


class LearnRepeats:
    """See the module docstring."""

    __slots__ = ("_last", "_passed", "window")

    def __init__(self, window: float, max_size: int = REPEATS_KEPT) -> None:
        if window < 0:
            raise ValueError("LearnRepeats window must be >= 0")
        self.window = window
        self._last: dict[str, tuple[bytes, ...]] = {}
        self._passed = ExpiryMap(max_size, on_drop=self._forget)

    def _forget(self, key: str) -> None:
        self._last.pop(key, None)

    def passes(self, fact: bytes, payload: Sequence[bytes], now: float) -> bool:
        if not payload or fact not in (LEARN_TOPIC, UNLEARN_TOPIC):
            return True
        key = payload[0].decode("ascii", "replace")
        if fact == UNLEARN_TOPIC:
            self._passed.pop(key)
            provider = payload[2] if len(payload) > 2 else b""
            if provider:
                for other in [k for k, v in self._last.items() if v[1:2] == (provider,)]:
                    self._passed.pop(other)
            return True
        names = tuple(payload[1:3])
        if self._passed.get(key, now) is not None and self._last.get(key) == names:
            return False
        self._passed.pop(key)
        if self.window > 0 and self._passed.put(key, now + self.window, now):
            self._last[key] = names
        return True
