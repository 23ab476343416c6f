"""ingress.policy.tiers: which tier an identity is in, what each tier may hold of a fast resource
(issue 17, Build item 1), table-driven."""

from __future__ import annotations

import itertools

import pytest

from ingress.core import config
from ingress.policy.identity import served_over_share
from ingress.policy.tiers import (
    CAPPED,
    FAST_TIERS,
    Tier,
    TierShares,
    admits,
    cap,
    caps,
    dnswl_identity,
    fast_tier,
    floor_above,
    hands_off,
    may_evict,
    operator_floor,
    over_ip_reason,
    over_tier_rate_reason,
    over_tier_reason,
    per_ip_capped,
    pick_victim,
    rate_key,
    rate_parts,
    tier_buckets,
    tier_of,
    tier_rates,
)

O, T, S, U = Tier.OPERATOR, Tier.THIRD_PARTY, Tier.SELF_PROVEN, Tier.UNKNOWN
SHARES = TierShares(third_party=0.25, self_proven=0.5)


@pytest.mark.parametrize("identity, tier", [
    ("allow:192.0.2.0/24", O),
    ("cert:ab12", O),
    ("dnswl:list.dnswl.test", T),
    ("org:example.com", S),
    ("learned:example.com", S),
    ("learned:", S),
    ("fcrdns:provider.test", S),      # a kind not known here: capped (fail closed)
    ("other", S),
    ("", U),
])
def test_tier_of(identity: str, tier: Tier) -> None:
    assert tier_of(identity) is tier


def test_fast_tier_without_identity_is_capped() -> None:
    assert fast_tier("") is S and fast_tier("allow:x") is O


def test_labels_and_order() -> None:
    assert [t.label for t in Tier] == ["operator", "third-party", "self-proven", "unknown"]
    assert FAST_TIERS == (O, T, S) and CAPPED == (T, S)
    assert sorted([S, U, O, T]) == [O, T, S, U]       # priority: a lower value first
    assert dnswl_identity("List.DNSWL.test.") == "dnswl:list.dnswl.test"


@pytest.mark.parametrize("total, want", [
    # total -> caps of third-party and self-proven, operator floor (>= 1 whenever total >= 1)
    (0, (0, 0, 0)),
    (1, (0, 0, 1)),
    (2, (0, 1, 1)),
    (3, (0, 1, 2)),
    (4, (1, 2, 1)),
    (8, (2, 4, 2)),
    (12, (3, 6, 3)),
    (100, (25, 50, 25)),
])
def test_caps_and_operator_floor(total: int, want: tuple[int, int, int]) -> None:
    c = caps(total, SHARES)
    assert (c[T], c[S], operator_floor(total, SHARES)) == want
    assert cap(O, total, SHARES) == total and cap(U, total, SHARES) == 0


@pytest.mark.parametrize("tp, sp", [(-0.1, 0.5), (0.5, 0.5), (0.0, 1.0), (0.6, 0.5)])
def test_shares_are_validated(tp: float, sp: float) -> None:
    with pytest.raises(ValueError):
        TierShares(third_party=tp, self_proven=sp)


def test_shares_of_config() -> None:
    cfg = config.load(None)
    assert TierShares.of(cfg) == TierShares(0.25, 0.5)


@pytest.mark.parametrize("tier, want", [(O, 0), (T, 12 - 3 - 6), (S, 12 - 6), (U, 12)])
def test_floor_above(tier: Tier, want: int) -> None:
    assert floor_above(tier, 12, SHARES) == want


# capacity 20 slots, reserve 12: caps third-party 3, self-proven 6, operator floor 3
@pytest.mark.parametrize("tier, held, used, ok", [
    # self-proven: within its cap, and leaves the unused floor above it (12 - 6 = 6) free
    (S, {}, 0, True),
    (S, {S: 5}, 5, True),
    (S, {S: 6}, 6, False),                  # at its cap, however much room there is
    (S, {S: 1}, 13, True),                  # 13 + 1 + 6 free above = 20
    (S, {S: 1}, 14, False),                 # would eat into the floor above it
    (S, {S: 1, O: 6}, 19, True),            # the operator uses its floor: nothing to keep
    (S, {S: 1, O: 6}, 20, False),           # full
    # third-party: its cap 3, the operator's floor 3 kept free
    (T, {T: 3}, 3, False),
    (T, {}, 16, True),
    (T, {}, 17, False),
    (T, {O: 2}, 17, True),
    # operator: any free slot
    (O, {S: 6, T: 3}, 19, True),
    (O, {S: 6, T: 3, O: 11}, 20, False),
    # bulk: never the unused reserve (admission's rule before tiers)
    (U, {}, 7, True),
    (U, {}, 8, False),
    (U, {S: 6}, 13, True),
    (U, {S: 6}, 14, False),
    (U, {O: 12}, 19, True),                 # the fast lane past its reserve: the rest is free
])
def test_admits_slots(tier: Tier, held: dict[Tier, int], used: int, ok: bool) -> None:
    assert admits(tier, 1, held, used, 20, 12, SHARES) is ok


def test_admits_bytes() -> None:
    """The same rule in bytes (the DATA budget): n units at once."""
    held = {S: 0}
    assert admits(S, 500, held, 0, 1000, 1000, SHARES)
    assert not admits(S, 501, held, 0, 1000, 1000, SHARES)
    assert admits(U, 200, {}, 0, 1000, 800, SHARES)
    assert not admits(U, 201, {}, 0, 1000, 800, SHARES)


def test_operator_always_finds_its_floor() -> None:
    """Whatever the lower tiers do, each by the rule, the operator's unused floor stays free:
    brute force over every sequence of admissions of a small resource."""
    capacity, reserve = 7, 5        # caps: third-party 1, self-proven 2; operator floor 2
    floor = operator_floor(reserve, SHARES)
    for seq in itertools.product([T, S, U], repeat=8):
        held: dict[Tier, int] = {}
        used = 0
        for t in seq:
            if admits(t, 1, held, used, capacity, reserve, SHARES):
                used += 1
                if t is not U:
                    held[t] = held.get(t, 0) + 1
        assert held.get(S, 0) <= 2 and held.get(T, 0) <= 1
        for i in range(floor):          # the operator gets its whole floor, one at a time
            assert admits(O, 1, held, used + i, capacity, reserve, SHARES), (seq, held, used)


@pytest.mark.parametrize("tier, handed, evicts, per_ip", [
    (O, True, True, False), (T, True, True, True), (S, False, False, True),
    (U, False, False, False)])
def test_tier_rules(tier: Tier, handed: bool, evicts: bool, per_ip: bool) -> None:
    assert hands_off(tier) is handed
    assert may_evict(tier) is evicts
    assert per_ip_capped(tier) is per_ip


@pytest.mark.parametrize("evictor, seats, victim", [
    # lowest tier first, then the longest connected; busy ones and equal/higher tiers never
    (O, [("a", S, False, 1.0), ("b", U, False, 5.0), ("c", U, False, 2.0)], "c"),
    (O, [("a", S, False, 1.0), ("b", U, True, 0.0)], "a"),
    (O, [("a", T, False, 1.0), ("b", S, False, 9.0)], "b"),
    (O, [("a", O, False, 1.0), ("b", S, True, 1.0)], None),
    (T, [("a", T, False, 1.0), ("b", S, False, 2.0)], "b"),
    (T, [("a", O, False, 1.0)], None),
    (S, [("a", U, False, 1.0)], None),      # a tier anyone can mint never evicts
    (U, [("a", U, False, 1.0)], None),
    (O, [], None),
])
def test_pick_victim(evictor: Tier, seats: list[tuple[str, Tier, bool, float]],
                     victim: str | None) -> None:
    assert pick_victim(evictor, seats) == victim


def test_reasons_are_served_as_bulk() -> None:
    assert over_tier_reason(S) == "over-share:tier:self-proven"
    assert over_tier_rate_reason(S) == "over-rate:tier:self-proven"
    assert over_ip_reason("192.0.2.1") == "over-share:ip:192.0.2.1"
    assert rate_key(T) == "tier:third-party"
    for reason in (over_tier_reason(S), over_tier_rate_reason(S), over_ip_reason("x")):
        assert served_over_share(("spf-pass:x", reason))


@pytest.mark.parametrize("tables, rates, parts", [
    ({}, {S: (200.0, 20.0)}, 2 + 0),
    ({"tiers": {"self_proven_rate": 0.0}}, {}, 2),
    ({"tiers": {"third_party_rate": 5.0, "third_party_burst": 2.0}},
     {S: (200.0, 20.0), T: (5.0, 2.0)}, 2),
    ({"listen": {"fast_port": 0}}, {S: (200.0, 20.0)}, 3),   # the fast port's learned clients
    ({"listen": {"fast_port": 0}, "supervisor": {"acceptors": 2, "fast_acceptors": 0}},
     {S: (200.0, 20.0)}, 2),
])
def test_tier_rates_and_parts(tmp_path, tables: dict, rates: dict, parts: int) -> None:
    from tests.kit.harness import write_config
    base = {"supervisor": {"acceptors": 2, "fast_acceptors": 1}}
    for k, v in tables.items():
        base.setdefault(k, {}).update(v)
    write_config(tmp_path / "c.toml", base)
    cfg = config.load(tmp_path / "c.toml")
    assert tier_rates(cfg) == rates
    assert rate_parts(cfg) == parts


def test_tier_buckets_split_like_a_domain() -> None:
    assert tier_buckets(200.0, 20.0, 4) == ((50.0, 5.0), (200.0, 200.0))
    assert tier_buckets(3.0, 3.0, 1) == ((3.0, 3.0), (3.0, 3.0))
