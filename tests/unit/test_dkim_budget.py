"""The per-message DNS budget of DKIM key lookups (ingress.policy.dkim_budget) and the negative
cache of unresponsive key domains (workers.lane.dkim_keys.DeadKeyDomains), issue 17 Build 3."""

from __future__ import annotations

import math

import pytest

from ingress.policy.dkim_budget import DnsBudget, evaluation_order
from workers.lane.dkim_keys import MAX_DOMAIN_KEY, DeadKeyDomains

# per_lookup, total, spent, deadline_left -> the next lookup's lifetime
LIFETIMES = [
    (2.0, 2.0, 0.0, 5.0, 2.0),          # a fresh message: one full lookup
    (2.0, 2.0, 0.5, 5.0, 1.5),          # what is left of the message's budget
    (2.0, 2.0, 2.0, 5.0, 0.0),          # spent: no wait at all
    (2.0, 2.0, 2.5, 5.0, 0.0),          # overspent (a lookup ran a little long): still none
    (2.0, 5.0, 0.0, 0.3, 0.3),          # the deadline is nearer than either
    (2.0, 5.0, 1.0, -1.0, 0.0),         # deadline passed
    (1.0, 2.0, 0.0, math.inf, 1.0),     # no deadline: the per-lookup bound
    (3.0, 2.0, 0.0, 5.0, 2.0),          # a budget under one lookup's timeout caps it
]


@pytest.mark.parametrize(("per_lookup", "total", "spent", "left", "expected"), LIFETIMES)
def test_lifetime(per_lookup: float, total: float, spent: float, left: float,
                  expected: float) -> None:
    b = DnsBudget(per_lookup, total, spent)
    assert b.lifetime(left) == pytest.approx(expected)


# per_lookup, total, lifetime given -> does a timeout in it mark the domain?
CONCLUSIVE = [
    (2.0, 2.0, 2.0, True),              # the full allowance and no answer: the domain is dead
    (2.0, 2.0, 1.99, True),             # after a healthy lookup of a few ms: still conclusive
    (2.0, 2.0, 1.5, True),              # three quarters of it
    (2.0, 2.0, 1.4, False),             # cut short by the message's earlier lookups
    (2.0, 2.0, 0.3, False),             # cut short by the deadline
    (3.0, 2.0, 2.0, True),              # the allowance is min(per_lookup, total)
    (3.0, 2.0, 1.4, False),
    (1.0, 5.0, 1.0, True),
]


@pytest.mark.parametrize(("per_lookup", "total", "lifetime", "expected"), CONCLUSIVE)
def test_conclusive(per_lookup: float, total: float, lifetime: float, expected: bool) -> None:
    assert DnsBudget(per_lookup, total).conclusive(lifetime) is expected


def test_charge_accumulates_and_ignores_negative_time() -> None:
    b = DnsBudget(2.0, 2.0)
    b.charge(0.25)
    b.charge(-1.0)            # a clock oddity never gives time back
    b.charge(0.5)
    assert b.spent == pytest.approx(0.75)
    assert b.lifetime(10.0) == pytest.approx(1.25)


def test_a_spammer_cannot_get_a_working_domain_marked() -> None:
    """Dead keys first, then a slow but working domain: its lookup gets only the rest of the
    budget, and a timeout in that rest is not conclusive."""
    b = DnsBudget(2.0, 2.0)
    first = b.lifetime(5.0)
    assert b.conclusive(first)
    b.charge(first - 0.2)                       # the dead lookup (ended a bit early)
    rest = b.lifetime(5.0)
    assert 0 < rest < b.allowance and not b.conclusive(rest)


@pytest.mark.parametrize(("per_lookup", "total"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_budget_must_be_positive(per_lookup: float, total: float) -> None:
    with pytest.raises(ValueError):
        DnsBudget(per_lookup, total)


@pytest.mark.parametrize(("aligned", "order"), [
    ([], []),
    ([False, False, True], [2, 0, 1]),
    ([True, False, True, False], [0, 2, 1, 3]),
    ([False, False], [0, 1]),
    ([True], [0]),
])
def test_evaluation_order(aligned: list[bool], order: list[int]) -> None:
    assert evaluation_order(aligned) == order


# --------------------------------------------------------------------------- DeadKeyDomains


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_dead_domain_expires_after_its_ttl() -> None:
    clock = Clock()
    dead = DeadKeyDomains(ttl=60.0, maxsize=10, timer=clock)
    dead.mark("dead.test")
    assert dead.is_dead("dead.test")
    clock.t += 59.0
    assert dead.is_dead("dead.test")
    clock.t += 2.0
    assert not dead.is_dead("dead.test")
    assert len(dead) == 0


def test_keyed_by_canonical_organisational_domain() -> None:
    """A sender cannot make up a fresh subdomain (or spelling) per message: every name under
    one registered domain is one entry. A PSL private suffix keeps its customers apart."""
    dead = DeadKeyDomains(ttl=60.0, maxsize=10, timer=Clock())
    dead.mark("x1.Evil.TEST.")
    for name in ("evil.test", "x2.evil.test", "a.b.c.evil.test", "EVIL.test"):
        assert dead.is_dead(name), name
    assert not dead.is_dead("good.test")
    dead.mark("alice.github.io")
    assert dead.is_dead("mail.alice.github.io")
    assert not dead.is_dead("bob.github.io")


def test_bounded_in_count_and_name_length() -> None:
    dead = DeadKeyDomains(ttl=60.0, maxsize=3, timer=Clock())
    for i in range(10):
        dead.mark(f"d{i}.test")
    assert len(dead) == 3
    assert dead.is_dead("d9.test") and not dead.is_dead("d0.test")
    # A name over MAX_DOMAIN_KEY (here a 300-character label: not a domain name, which has
    # no canonical form at all) is never stored.
    long = "a" * 300 + ".test"
    assert len(long) > MAX_DOMAIN_KEY
    dead.mark(long)
    assert not dead.is_dead(long)
    assert len(dead) == 3 and dead.is_dead("d9.test")   # and it pushed nothing out


def test_ttl_zero_disables_it() -> None:
    dead = DeadKeyDomains(ttl=0.0, maxsize=10, timer=Clock())
    dead.mark("dead.test")
    assert not dead.is_dead("dead.test")
    assert len(dead) == 0
