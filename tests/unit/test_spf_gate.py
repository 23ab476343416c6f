"""ingress.policy.spf_gate: the admission rule of the SPF service (pure, clock as an argument)."""

from __future__ import annotations

import pytest

from ingress.core import metrics
from ingress.policy.spf_gate import SpfGate, SpfLimits, SpfVerdict

A, T, D, N, B = (SpfVerdict.ADMIT, SpfVerdict.TIMEOUT, SpfVerdict.DOMAIN, SpfVerdict.NETWORK,
                 SpfVerdict.BACKLOG)
SMALL = SpfLimits(per_domain=2, per_network=3, backlog=4, timeout_ttl=10.0, timeouts_max=3)

# Each step: ("admit", domain, net, now, expected verdict) or ("release", domain, net, now,
# stalled). The gate starts empty for every case.
CASES: dict[str, list[tuple]] = {
    "per domain": [
        ("admit", "d.test", "n1", 0, A), ("admit", "d.test", "n2", 0, A),
        ("admit", "d.test", "n3", 0, D),                    # a third of d.test: refused
        ("admit", "e.test", "n3", 0, A),                    # another domain: in
        ("release", "d.test", "n1", 1, False),
        ("admit", "d.test", "n3", 1, A),                    # room again
    ],
    "per network": [
        ("admit", "a.test", "n1", 0, A), ("admit", "b.test", "n1", 0, A),
        ("admit", "c.test", "n1", 0, A),
        ("admit", "x.test", "n1", 0, N),                    # a thousand domains, one /24
        ("admit", "x.test", "n2", 0, A),
    ],
    "backlog": [
        ("admit", "a.test", "n1", 0, A), ("admit", "b.test", "n2", 0, A),
        ("admit", "c.test", "n3", 0, A), ("admit", "d.test", "n4", 0, A),
        ("admit", "e.test", "n5", 0, B),                    # fresh domain, fresh network
        ("release", "c.test", "n3", 1, False),
        ("admit", "e.test", "n5", 1, A),
    ],
    "a stall is remembered for timeout_ttl": [
        ("admit", "dead.test", "n1", 0, A), ("admit", "dead.test", "n2", 0, A),
        ("release", "dead.test", "n1", 2, True),
        ("admit", "dead.test", "n3", 2, T),                 # at once, no lookup
        ("admit", "dead.test", "n3", 11.9, T),
        ("admit", "good.test", "n3", 5, A),                 # other domains are not touched
        ("admit", "dead.test", "n3", 12, A),                # 2 + 10 s: looked up again
    ],
    "a temperror that is not a stall is not remembered": [
        ("admit", "d.test", "n1", 0, A), ("release", "d.test", "n1", 1, False),
        ("admit", "d.test", "n1", 1, A),
    ],
    "the cache of timeouts is checked before the bounds": [
        ("admit", "d.test", "n1", 0, A), ("admit", "d.test", "n2", 0, A),
        ("release", "d.test", "n2", 0, True),
        ("admit", "d.test", "n3", 1, T),
    ],
    "refusals change nothing": [
        ("admit", "d.test", "n1", 0, A), ("admit", "d.test", "n1", 0, A),
        *[("admit", "d.test", "n1", 0, D)] * 50,           # a flood of refusals
        ("release", "d.test", "n1", 1, False), ("release", "d.test", "n1", 1, False),
        ("admit", "d.test", "n1", 1, A),                    # nothing cached, counts at zero
    ],
    "a release without its admit is ignored": [
        ("release", "d.test", "n1", 0, True),
        ("admit", "d.test", "n1", 0, A),                    # and caches nothing
        ("release", "d.test", "n1", 0, False),
        ("release", "d.test", "n1", 0, False),
        ("admit", "d.test", "n1", 0, A), ("admit", "d.test", "n1", 0, A),
        ("admit", "d.test", "n1", 0, D),                    # counts never went below zero
    ],
    "the cache of timeouts is bounded (oldest out first)": [
        *[step for i in range(4) for step in (
            ("admit", f"d{i}.test", "n1", i, A), ("release", f"d{i}.test", "n1", i, True))],
        ("admit", "d0.test", "n1", 5, A),                   # the oldest of 4 went (max 3)
        ("admit", "d1.test", "n1", 5, T),
        ("admit", "d3.test", "n1", 5, T),
    ],
}


@pytest.mark.parametrize("steps", CASES.values(), ids=list(CASES))
def test_gate(steps: list[tuple]) -> None:
    gate = SpfGate(SMALL)
    for n, (op, domain, net, now, want) in enumerate(steps):
        if op == "admit":
            assert gate.admit(domain, net, now) is want, (n, op, domain, net, now)
        else:
            gate.release(domain, net, now, want)
        assert 0 <= len(gate) <= SMALL.backlog
        assert gate.held(domain) <= SMALL.per_domain and gate.held_net(net) <= SMALL.per_network


def test_counts_drop_to_nothing() -> None:
    """The counts keep no entry for a domain or network with nothing under way (an attacker's
    thousand domains leave nothing behind)."""
    gate = SpfGate(SpfLimits(per_domain=4, per_network=4, backlog=8, timeout_ttl=0.0))
    for i in range(1000):
        assert gate.admit(f"d{i}.test", f"n{i}", 0) is A
        gate.release(f"d{i}.test", f"n{i}", 0, stalled=True)   # timeout_ttl 0: not cached
    assert len(gate) == 0 and not gate._domains and not gate._nets and not gate._timeouts
    assert gate.admit("d1.test", "n1", 0) is A


@pytest.mark.parametrize("kw", [
    {"per_domain": 0}, {"per_domain": 9, "backlog": 8}, {"per_network": 0},
    {"per_network": 9, "backlog": 8}, {"timeout_ttl": -1.0}, {"timeouts_max": 0},
])
def test_limits_are_validated(kw: dict) -> None:
    base = {"per_domain": 2, "per_network": 2, "backlog": 8, "timeout_ttl": 5.0}
    with pytest.raises(ValueError):
        SpfLimits(**{**base, **kw})


def test_refusals_are_the_metric_labels() -> None:
    assert {v.value for v in SpfVerdict if v is not A} == set(metrics.SPF_REFUSALS)
    with pytest.raises(ValueError):
        metrics.spf_refused("admit")
