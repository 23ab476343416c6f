"""Which learn facts a lane broker passes on (ingress.policy.learn_repeats), as tables: each row a
sequence of (time, fact, payload) and what passes."""

from __future__ import annotations

import pytest

from ingress.core.wire import CLAIM_TOPIC, LEARN_TOPIC, PENALTY_TOPIC, UNLEARN_TOPIC
from ingress.policy.learn_repeats import LEARN_REPEAT, LearnRepeats, repeat_window

L, U = LEARN_TOPIC, UNLEARN_TOPIC
IP, IP2 = b"192.0.2.1", b"192.0.2.2"
A, B = [IP, b"a.test"], [IP, b"b.test"]
P = [IP, b"a.test", b"pool.example"]          # learned with a provider
UP = [IP2, b"", b"pool.example"]              # another pool address unlearns the provider

ROWS = {
    "a repeat within the window is dropped": (
        [(0, L, A), (1, L, A), (9.9, L, A)], [True, False, False]),
    "after the window it passes again (the refresh)": (
        [(0, L, A), (10, L, A), (11, L, A)], [True, True, False]),
    "domains rotated over one address pass once a window each": (
        [(0, L, A), (1, L, B), (2, L, A), (3, L, B), (10.5, L, A)],
        [True, True, False, False, True]),
    "the same domain with a provider is another fact": (
        [(0, L, A), (1, L, P), (2, L, P), (3, L, A)], [True, True, False, False]),
    "another address passes": (
        [(0, L, A), (1, L, [IP2, b"a.test"])], [True, True]),
    "an unlearn always passes, and every fact of its address passes again": (
        [(0, L, A), (1, L, B), (2, U, [IP]), (3, U, [IP]), (4, L, A), (5, L, B), (6, L, A)],
        [True, True, True, True, True, True, False]),
    "an unlearn of the provider from another address forgets its pool": (
        [(0, L, P), (1, U, UP), (2, L, P)], [True, True, True]),
    "an unlearn of another provider forgets nothing else": (
        [(0, L, P), (1, U, [IP2, b"", b"other.example"]), (2, L, P)], [True, True, False]),
    "penalties and records are never dropped": (
        [(0, PENALTY_TOPIC, [IP]), (0, PENALTY_TOPIC, [IP]), (0, CLAIM_TOPIC, [b"{}"]),
         (0, CLAIM_TOPIC, [b"{}"])], [True, True, True, True]),
}


@pytest.mark.parametrize("seq,passes", ROWS.values(), ids=ROWS.keys())
def test_table(seq: list[tuple[float, bytes, list[bytes]]], passes: list[bool]) -> None:
    r = LearnRepeats(10.0)
    assert [r.passes(fact, payload, now) for now, fact, payload in seq] == passes


def test_a_zero_window_drops_nothing() -> None:
    r = LearnRepeats(0.0)
    assert all(r.passes(L, A, 0.0) for _ in range(3))


def test_bounded_the_forgotten_address_passes_again() -> None:
    r = LearnRepeats(10.0, max_size=2)
    ips = [f"192.0.2.{i}".encode() for i in range(3)]
    assert all(r.passes(L, [ip, b"a.test"], float(k) / 10) for k, ip in enumerate(ips))
    assert r.passes(L, [ips[0], b"a.test"], 0.5)      # evicted (expiring soonest): passes
    assert not r.passes(L, [ips[2], b"a.test"], 0.6)  # held


@pytest.mark.parametrize("ttl,window", [(604800.0, LEARN_REPEAT), (20.0, 5.0), (0.0, 0.0)])
def test_the_window_is_well_inside_the_entry_s_life(ttl: float, window: float) -> None:
    assert repeat_window(ttl) == window


def test_bounds() -> None:
    with pytest.raises(ValueError):
        LearnRepeats(-1.0)
    with pytest.raises(ValueError):
        LearnRepeats(1.0, max_size=0)
