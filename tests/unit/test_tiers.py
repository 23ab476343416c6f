"""ingress.policy.tiers: which tier an identity is in, what each tier may hold of a fast resource
(issue 17, Build item 1), table-driven."""

from __future__ import annotations

import itertools

import pytest

from ingress.core import config
from ingress.core.derived import rate_parts, tier_buckets
from ingress.core.wire import Lane
from ingress.policy.identity import served_over_share
from ingress.policy.tiers import (
    CAPPED,
    FAST_TIERS,
    Tier,
    TierShares,
    admits,
    cap,
    caps,
    commit_slots,
    dedicated_tier,
    dnswl_identity,
    fast_tier,
    floor_above,
    hands_off,
    journals,
    may_evict,
    operator_floor,
    over_ip_reason,
    over_tier_rate_reason,
    over_tier_reason,
    per_ip_capped,
    pick_victim,
    rate_key,
    tier_of,
    tier_rates,
    worker_takes,
)

OP, TP, SP, UN = Tier.OPERATOR, Tier.THIRD_PARTY, Tier.SELF_PROVEN, Tier.UNKNOWN
SHARES = TierShares(third_party=0.25, self_proven=0.5)


@pytest.mark.parametrize("identity, tier", [
    ("allow:192.0.2.0/24", OP),
    ("cert:ab12", OP),
    ("dnswl:list.dnswl.test", TP),
    ("org:example.com", SP),
    ("learned:example.com", SP),
    ("learned:", SP),
    ("fcrdns:provider.test", SP),      # a kind not known here: capped (fail closed)
    ("other", SP),
    ("", UN),
])
def test_tier_of(identity: str, tier: Tier) -> None:
    assert tier_of(identity) is tier


def test_fast_tier_without_identity_is_capped() -> None:
    assert fast_tier("") is SP and fast_tier("allow:x") is OP


def test_labels_and_order() -> None:
    assert [t.label for t in Tier] == ["operator", "third-party", "self-proven", "unknown"]
    assert FAST_TIERS == (OP, TP, SP) and CAPPED == (TP, SP)
    assert sorted([SP, UN, OP, TP]) == [OP, TP, SP, UN]       # priority: a lower value first
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
    assert (c[TP], c[SP], operator_floor(total, SHARES)) == want
    assert cap(OP, total, SHARES) == total and cap(UN, total, SHARES) == 0


@pytest.mark.parametrize("tp, sp", [(-0.1, 0.5), (0.5, 0.5), (0.0, 1.0), (0.6, 0.5)])
def test_shares_are_validated(tp: float, sp: float) -> None:
    with pytest.raises(ValueError):
        TierShares(third_party=tp, self_proven=sp)


def test_shares_of_config() -> None:
    cfg = config.load(None)
    assert TierShares.of(cfg) == TierShares(0.25, 0.5)


@pytest.mark.parametrize("tier, want", [(OP, 0), (TP, 12 - 3 - 6), (SP, 12 - 6), (UN, 12)])
def test_floor_above(tier: Tier, want: int) -> None:
    assert floor_above(tier, 12, SHARES) == want


# capacity 20 slots, reserve 12: caps third-party 3, self-proven 6, operator floor 3
@pytest.mark.parametrize("tier, held, used, ok", [
    # self-proven: within its cap, and leaves the unused floor above it (12 - 6 = 6) free
    (SP, {}, 0, True),
    (SP, {SP: 5}, 5, True),
    (SP, {SP: 6}, 6, False),                  # at its cap, however much room there is
    (SP, {SP: 1}, 13, True),                  # 13 + 1 + 6 free above = 20
    (SP, {SP: 1}, 14, False),                 # would eat into the floor above it
    (SP, {SP: 1, OP: 6}, 19, True),            # the operator uses its floor: nothing to keep
    (SP, {SP: 1, OP: 6}, 20, False),           # full
    # third-party: its cap 3, the operator's floor 3 kept free
    (TP, {TP: 3}, 3, False),
    (TP, {}, 16, True),
    (TP, {}, 17, False),
    (TP, {OP: 2}, 17, True),
    # operator: any free slot
    (OP, {SP: 6, TP: 3}, 19, True),
    (OP, {SP: 6, TP: 3, OP: 11}, 20, False),
    # bulk: never the unused reserve (admission's rule before tiers)
    (UN, {}, 7, True),
    (UN, {}, 8, False),
    (UN, {SP: 6}, 13, True),
    (UN, {SP: 6}, 14, False),
    (UN, {OP: 12}, 19, True),                 # the fast lane past its reserve: the rest is free
])
def test_admits_slots(tier: Tier, held: dict[Tier, int], used: int, ok: bool) -> None:
    assert admits(tier, 1, held, used, 20, 12, SHARES) is ok


def test_admits_bytes() -> None:
    """The same rule in bytes (the DATA budget): n units at once."""
    held = {SP: 0}
    assert admits(SP, 500, held, 0, 1000, 1000, SHARES)
    assert not admits(SP, 501, held, 0, 1000, 1000, SHARES)
    assert admits(UN, 200, {}, 0, 1000, 800, SHARES)
    assert not admits(UN, 201, {}, 0, 1000, 800, SHARES)


def test_operator_always_finds_its_floor() -> None:
    """Whatever the lower tiers do, each by the rule, the operator's unused floor stays free:
    brute force over every sequence of admissions of a small resource."""
    capacity, reserve = 7, 5        # caps: third-party 1, self-proven 2; operator floor 2
    floor = operator_floor(reserve, SHARES)
    for seq in itertools.product([TP, SP, UN], repeat=8):
        held: dict[Tier, int] = {}
        used = 0
        for t in seq:
            if admits(t, 1, held, used, capacity, reserve, SHARES):
                used += 1
                if t is not UN:
                    held[t] = held.get(t, 0) + 1
        assert held.get(SP, 0) <= 2 and held.get(TP, 0) <= 1
        for i in range(floor):          # the operator gets its whole floor, one at a time
            assert admits(OP, 1, held, used + i, capacity, reserve, SHARES), (seq, held, used)


@pytest.mark.parametrize("tier, handed, evicts, per_ip", [
    (OP, True, True, False), (TP, True, True, True), (SP, False, False, True),
    (UN, False, False, False)])
def test_tier_rules(tier: Tier, handed: bool, evicts: bool, per_ip: bool) -> None:
    assert hands_off(tier) is handed
    assert may_evict(tier) is evicts
    assert per_ip_capped(tier) is per_ip


@pytest.mark.parametrize("evictor, seats, victim", [
    # lowest tier first, then the longest connected; busy ones and equal/higher tiers never
    (OP, [("a", SP, False, 1.0), ("b", UN, False, 5.0), ("c", UN, False, 2.0)], "c"),
    (OP, [("a", SP, False, 1.0), ("b", UN, True, 0.0)], "a"),
    (OP, [("a", TP, False, 1.0), ("b", SP, False, 9.0)], "b"),
    (OP, [("a", OP, False, 1.0), ("b", SP, True, 1.0)], None),
    (TP, [("a", TP, False, 1.0), ("b", SP, False, 2.0)], "b"),
    (TP, [("a", OP, False, 1.0)], None),
    (SP, [("a", UN, False, 1.0)], None),      # a tier anyone can mint never evicts
    (UN, [("a", UN, False, 1.0)], None),
    (OP, [], None),
])
def test_pick_victim(evictor: Tier, seats: list[tuple[str, Tier, bool, float]],
                     victim: str | None) -> None:
    assert pick_victim(evictor, seats) == victim


def test_reasons_are_served_as_bulk() -> None:
    assert over_tier_reason(SP) == "over-share:tier:self-proven"
    assert over_tier_rate_reason(SP) == "over-rate:tier:self-proven"
    assert over_ip_reason("192.0.2.1") == "over-share:ip:192.0.2.1"
    assert rate_key(TP) == "tier:third-party"
    assert rate_key(SP, "2001:db8:1::/48") == "tier:self-proven@2001:db8:1::/48"
    for reason in (over_tier_reason(SP), over_tier_rate_reason(SP), over_ip_reason("x")):
        assert served_over_share(("spf-pass:x", reason))


@pytest.mark.parametrize("tables, rates, parts", [
    ({}, {SP: (200.0, 20.0)}, 2 + 0),
    ({"tiers": {"self_proven_rate": 0.0}}, {}, 2),
    ({"tiers": {"third_party_rate": 5.0, "third_party_burst": 2.0}},
     {SP: (200.0, 20.0), TP: (5.0, 2.0)}, 2),
    ({"listen": {"fast_port": 0}}, {SP: (200.0, 20.0)}, 3),   # the fast port's learned clients
    ({"listen": {"fast_port": 0}, "supervisor": {"acceptors": 2, "fast_acceptors": 0}},
     {SP: (200.0, 20.0)}, 2),
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


OP, TP, SP, UN = Tier.OPERATOR, Tier.THIRD_PARTY, Tier.SELF_PROVEN, Tier.UNKNOWN


@pytest.mark.parametrize(("tiers", "free", "want"), [
    ([], [True, True], [[], []]),
    # both free: the priority tiers' on the second committer, the rest on the first
    ([SP, OP, UN, TP], [True, True], [[0, 2], [1, 3]]),
    # the second busy: the first takes everything, whichever is free first
    ([SP, OP], [True, False], [[0, 1], []]),
    # the first busy: the second takes only the priority tiers', never a lower tier's
    ([SP, OP, UN], [False, True], [[], [1]]),
    ([SP, UN], [False, True], [[], []]),
    # only lower tiers, both free: the second stays free for the operator
    ([SP, SP], [True, True], [[0, 1], []]),
    # both busy: nothing
    ([OP, SP], [False, False], [[], []]),
])
def test_commit_slots(tiers: list[Tier], free: list[bool], want: list[list[int]]) -> None:
    assert commit_slots(tiers, free) == want


@pytest.mark.parametrize(("lane", "dedicated", "tiers", "want"), [
    # a bulk worker's journal holds all of its mail, whatever identities it carries
    (Lane.BULK, False, [UN, UN], True), (Lane.BULK, False, [OP, SP], True),
    # a worker dedicated to the self-proven tier: its tier's
    (Lane.FAST, True, [SP, SP], True),
    # the operator's fast workers: their journal is the operator's reserve
    (Lane.FAST, False, [OP, TP], True),
    (Lane.FAST, False, [OP, SP], False),    # minted identities never fill it
    (Lane.FAST, False, [SP], False), (Lane.FAST, False, [UN], False),
])
def test_journals(lane: Lane, dedicated: bool, tiers: list[Tier], want: bool) -> None:
    assert journals(lane, dedicated, tiers) is want


@pytest.mark.parametrize(("tier", "serves", "dedicated_up", "takes"), [
    # a worker dedicated to the self-proven tier takes its tier's mail and nothing else
    (SP, SP, True, True), (OP, SP, True, False), (TP, SP, True, False), (UN, SP, True, False),
    # any other worker: every tier but the dedicated one's while a dedicated worker is up
    (OP, None, True, True), (TP, None, True, True), (UN, None, True, True),
    (SP, None, True, False),
    # none up (restarting, or tiers.self_proven_workers = 0): it takes that tier's too
    (SP, None, False, True), (OP, None, False, True),
])
def test_worker_takes(tier: Tier, serves: Tier | None, dedicated_up: bool,
                      takes: bool) -> None:
    assert worker_takes(tier, serves, dedicated_up) is takes


def test_dedicated_tier_labels() -> None:
    assert dedicated_tier("self-proven") is SP
    for label in ("operator", "third-party", "unknown", "", "SELF-PROVEN"):
        with pytest.raises(ValueError):
            dedicated_tier(label)
