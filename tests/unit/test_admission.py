"""Table-driven tests of connection admission (ingress.policy.admission)."""

from __future__ import annotations

import itertools
import random

import pytest

from ingress.core.wire import Lane
from ingress.policy import replies
from ingress.policy.admission import (
    Admission,
    AdmissionLimits,
    Refusal,
    stress_timeouts,
)

# the reply lines live in the one reply table (ingress.policy.replies)
REPLY_SLOTS = replies.REPLIES[replies.Refusal.SLOTS]
REPLY_PER_IP = replies.REPLIES[replies.Refusal.PER_IP]
REPLY_RATE = replies.REPLIES[replies.Refusal.RATE]
REPLY_PENALISED = replies.REPLIES[replies.Refusal.PENALISED]
EARLY_TALKER_REPLY = replies.REPLIES[replies.Refusal.EARLY_TALKER]

F, B = Lane.FAST, Lane.BULK


def limits(**kw: float) -> AdmissionLimits:
    base: dict = dict(
        max_connections=10,
        fast_reserve=3,
        per_ip_bulk_max=100,
        per_ip_rate=0.0,
        per_ip_burst=1,
        penalty_s=60.0,
    )
    base.update(kw)
    return AdmissionLimits(**base)


def distinct_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


# --------------------------------------------------------------------------- slots and reserve


@pytest.mark.parametrize(
    "max_c, reserve, fast_held, bulk_held, lane, admitted",
    [
        # bulk uses at most max - reserve while no fast session is connected
        (10, 3, 0, 6, B, True),
        (10, 3, 0, 7, B, False),
        # fast sessions inside the reserve do not shrink bulk's share
        (10, 3, 3, 6, B, True),
        (10, 3, 3, 7, B, False),
        # fast beyond its reserve shares the rest: bulk gets what is left
        (10, 3, 5, 4, B, True),
        (10, 3, 5, 5, B, False),
        # fast can use any free slot ...
        (10, 3, 0, 7, F, True),
        (10, 3, 2, 7, F, True),
        (10, 3, 9, 0, F, True),
        # ... but never more than max_connections
        (10, 3, 3, 7, F, False),
        (10, 3, 10, 0, F, False),
        # no reserve: everything shared
        (10, 0, 0, 9, B, True),
        (10, 0, 0, 10, B, False),
        # all reserved: bulk never gets in
        (5, 5, 0, 0, B, False),
        (5, 5, 4, 0, F, True),
        (1, 0, 0, 0, B, True),
        (1, 1, 0, 0, F, True),
    ],
)
def test_slots_and_reserve(
    max_c: int, reserve: int, fast_held: int, bulk_held: int, lane: Lane, admitted: bool
) -> None:
    adm = Admission(limits(max_connections=max_c, fast_reserve=reserve))
    # Fill in an order that is always possible: bulk first (within its share), then fast.
    for i in range(bulk_held):
        assert adm.try_admit(distinct_ip(i), B, 0).admitted
    for i in range(fast_held):
        assert adm.try_admit(distinct_ip(1000 + i), F, 0).admitted
    v = adm.try_admit("192.0.2.1", lane, 0)
    assert v.admitted is admitted
    if admitted:
        assert v.ticket is not None and v.reply is None and v.reason is Refusal.ADMITTED
        assert v.ticket.lane == lane
    else:
        assert v.ticket is None and v.reason is Refusal.SLOTS and v.reply == REPLY_SLOTS
        assert v.reply.startswith("421 4.7.0 ")


def test_bulk_flood_never_takes_the_reserve() -> None:
    """Property: under any interleaving, the fast lane always finds its reserve."""
    rng = random.Random(1)
    lim = limits(max_connections=20, fast_reserve=5, per_ip_bulk_max=3)
    adm = Admission(lim)
    held = []
    for step in range(5000):
        r = rng.random()
        if r < 0.6:
            v = adm.try_admit(distinct_ip(rng.randrange(50)), B, step)
        elif r < 0.7:
            v = adm.try_admit(distinct_ip(rng.randrange(50)), F, step)
        else:
            v = None
            if held:
                adm.release(held.pop(rng.randrange(len(held))))
        if v is not None and v.admitted:
            held.append(v.ticket)
        if rng.random() < 0.05 and held:
            adm.promote(rng.choice(held))
        assert adm.in_use <= lim.max_connections
        assert adm.bulk_in_use <= lim.bulk_share
        # the free slots always cover whatever part of the reserve fast is not using
        assert lim.max_connections - adm.in_use >= max(0, lim.fast_reserve - adm.fast_in_use)
        assert adm.in_use == sum(1 for t in held if not t.released)
    for t in held:
        adm.release(t)
    assert (adm.in_use, adm.fast_in_use, adm.bulk_in_use) == (0, 0, 0)
    assert adm._per_ip_bulk == {}


# --------------------------------------------------------------------------- per-IP cap


@pytest.mark.parametrize(
    "held_ips, new_ip, admitted",
    [
        (["192.0.2.1"] * 2, "192.0.2.1", False),
        (["192.0.2.1"] * 2, "192.0.2.2", True),
        (["192.0.2.1"], "192.0.2.1", True),
        (["192.0.2.1"] * 2, "::ffff:192.0.2.1", False),  # mapped IPv4 is the same client
        # IPv6: the cap is per /64
        (["2001:db8:0:1::1", "2001:db8:0:1::2"], "2001:db8:0:1:ffff::9", False),
        (["2001:db8:0:1::1", "2001:db8:0:1::2"], "2001:db8:0:2::1", True),
        (["2001:db8:0:1::1"], "2001:db8:0:1::1", True),
    ],
)
def test_per_ip_bulk_cap(held_ips: list[str], new_ip: str, admitted: bool) -> None:
    adm = Admission(limits(per_ip_bulk_max=2))
    for ip in held_ips:
        assert adm.try_admit(ip, B, 0).admitted
    v = adm.try_admit(new_ip, B, 0)
    assert v.admitted is admitted
    if not admitted:
        assert v.reason is Refusal.PER_IP and v.reply == REPLY_PER_IP


def test_per_ip_cap_does_not_apply_to_fast_and_frees_on_release() -> None:
    adm = Admission(limits(per_ip_bulk_max=1))
    t = adm.try_admit("192.0.2.1", B, 0).ticket
    assert not adm.try_admit("192.0.2.1", B, 0).admitted
    for _ in range(3):
        assert adm.try_admit("192.0.2.1", F, 0).admitted
    assert t is not None
    adm.release(t)
    adm.release(t)  # idempotent
    assert adm.bulk_for("192.0.2.1") == 0
    assert adm.try_admit("192.0.2.1", B, 0).admitted


# --------------------------------------------------------------------------- rate


@pytest.mark.parametrize(
    "rate, burst, times, expected",
    [
        # burst of 3, then nothing until tokens refill at 1/s
        (1.0, 3, [0, 0, 0, 0], [True, True, True, False]),
        (1.0, 3, [0, 0, 0, 0.5, 1.0], [True, True, True, False, True]),
        (1.0, 3, [0, 0, 0, 10, 10, 10, 10], [True, True, True, True, True, True, False]),
        (10.0, 1, [0, 0.05, 0.1, 0.1], [True, False, True, False]),
        # a clock that steps back earns nothing
        (1.0, 1, [5, 0, 5.5, 6.0], [True, False, False, True]),
        # rate <= 0 disables the bucket
        (0.0, 1, [0] * 10, [True] * 10),
    ],
)
def test_rate_token_bucket(
    rate: float, burst: int, times: list[float], expected: list[bool]
) -> None:
    adm = Admission(limits(per_ip_rate=rate, per_ip_burst=burst))
    got = []
    for t in times:
        v = adm.try_admit("192.0.2.1", B, t)
        got.append(v.admitted)
        if v.admitted:
            adm.release(v.ticket)  # type: ignore[arg-type]
        else:
            assert v.reason is Refusal.RATE and v.reply == REPLY_RATE
    assert got == expected


def test_rate_is_per_ip_and_per_64_and_not_for_fast() -> None:
    adm = Admission(limits(per_ip_rate=1.0, per_ip_burst=1))
    assert adm.try_admit("192.0.2.1", B, 0).admitted
    assert not adm.try_admit("192.0.2.1", B, 0).admitted
    assert adm.try_admit("192.0.2.2", B, 0).admitted
    assert adm.try_admit("2001:db8::1", B, 0).admitted
    assert not adm.try_admit("2001:db8::2", B, 0).admitted
    for _ in range(20):
        v = adm.try_admit("192.0.2.1", F, 0)
        assert v.admitted
        adm.release(v.ticket)  # type: ignore[arg-type]


def test_rate_counts_refused_attempts() -> None:
    """Attempts refused for lack of slots still spend a token (anvil-style attempt rate)."""
    adm = Admission(limits(max_connections=2, fast_reserve=1, per_ip_rate=1.0, per_ip_burst=2))
    assert adm.try_admit("192.0.2.9", B, 0).admitted
    assert adm.try_admit("192.0.2.1", B, 0).reason is Refusal.SLOTS
    assert adm.try_admit("192.0.2.1", B, 0).reason is Refusal.SLOTS
    assert adm.try_admit("192.0.2.1", B, 0).reason is Refusal.RATE


def test_rate_state_is_bounded() -> None:
    adm = Admission(limits(per_ip_rate=1.0, per_ip_burst=1, max_tracked_ips=100))
    for i in range(1000):
        v = adm.try_admit(distinct_ip(i), B, 0)
        assert v.admitted
        adm.release(v.ticket)  # type: ignore[arg-type]
    assert adm.tracked_ips == 100
    # the most recent IPs are still tracked; the oldest were evicted (fresh bucket)
    assert not adm.try_admit(distinct_ip(999), B, 0).admitted
    assert adm.try_admit(distinct_ip(0), B, 0).admitted


# --------------------------------------------------------------------------- promotion


def test_promote_moves_accounting() -> None:
    adm = Admission(limits(max_connections=4, fast_reserve=1, per_ip_bulk_max=1))
    tickets = [adm.try_admit(distinct_ip(i), B, 0).ticket for i in range(3)]
    assert all(tickets)
    assert not adm.try_admit("192.0.2.50", B, 0).admitted  # bulk share (3) full
    t0 = tickets[0]
    assert t0 is not None
    adm.promote(t0)
    assert (adm.fast_in_use, adm.bulk_in_use, adm.in_use) == (1, 2, 3)
    assert t0.lane == F
    assert adm.bulk_for(distinct_ip(0)) == 0
    # the promoted session now occupies the reserve, so one bulk slot is free again
    assert adm.try_admit("192.0.2.50", B, 0).admitted
    # and the promoted client's per-IP bulk count was freed
    assert adm.try_admit(distinct_ip(0), F, 0).admitted is False  # pool full (4/4)
    adm.promote(t0)  # idempotent
    assert (adm.fast_in_use, adm.bulk_in_use) == (1, 3)
    adm.release(t0)
    assert (adm.fast_in_use, adm.bulk_in_use) == (0, 3)
    adm.promote(t0)  # released: no-op
    assert (adm.fast_in_use, adm.bulk_in_use) == (0, 3)


def test_demote_moves_accounting_back() -> None:
    """A fast session whose domain went over its rate counts as bulk again: it keeps its
    slot, counts against its IP, and new bulk sessions wait while bulk is over its share."""
    adm = Admission(limits(max_connections=4, fast_reserve=2, per_ip_bulk_max=1))
    b0 = adm.try_admit(distinct_ip(0), B, 0).ticket
    b1 = adm.try_admit(distinct_ip(1), B, 0).ticket
    assert b0 is not None and b1 is not None
    adm.promote(b0)
    adm.promote(b1)
    assert (adm.fast_in_use, adm.bulk_in_use) == (2, 0)
    adm.demote(b0)
    assert b0.lane == B and (adm.fast_in_use, adm.bulk_in_use, adm.in_use) == (1, 1, 2)
    assert adm.bulk_for(distinct_ip(0)) == 1
    assert not adm.try_admit(distinct_ip(0), B, 0).admitted     # its IP's bulk count is back
    adm.demote(b0)                                              # idempotent
    assert (adm.fast_in_use, adm.bulk_in_use) == (1, 1)
    assert adm.try_admit(distinct_ip(2), B, 0).admitted          # 3 + 1 unused reserve = 4
    adm.demote(b1)                                               # bulk now over its share (3)
    assert (adm.fast_in_use, adm.bulk_in_use, adm.in_use) == (0, 3, 3)
    assert not adm.try_admit(distinct_ip(3), B, 0).admitted      # new bulk waits
    assert adm.try_admit(distinct_ip(3), F, 0).admitted          # the reserve is not what pays
    adm.release(b0)
    assert adm.bulk_for(distinct_ip(0)) == 0 and adm.bulk_in_use == 2
    adm.demote(b0)                                               # released: no-op
    assert adm.bulk_in_use == 2


def test_promote_never_fails_even_beyond_the_reserve() -> None:
    adm = Admission(limits(max_connections=5, fast_reserve=1))
    fast = [adm.try_admit(distinct_ip(100 + i), F, 0).ticket for i in range(1)]
    bulk = [adm.try_admit(distinct_ip(i), B, 0).ticket for i in range(4)]
    assert all(fast) and all(bulk)
    for t in bulk:
        adm.promote(t)  # type: ignore[arg-type]
    assert (adm.fast_in_use, adm.bulk_in_use, adm.in_use) == (5, 0, 5)
    for t in bulk + fast:
        adm.release(t)  # type: ignore[arg-type]
    assert adm.in_use == 0


# --------------------------------------------------------------------------- early talkers


def test_penalty_box() -> None:
    adm = Admission(limits(penalty_s=60.0))
    assert not adm.is_penalised("192.0.2.1", 0)
    adm.penalise("192.0.2.1", 10)
    assert adm.is_penalised("192.0.2.1", 69.9)
    v = adm.try_admit("192.0.2.1", B, 20)
    assert not v.admitted and v.reason is Refusal.PENALISED and v.reply == REPLY_PENALISED
    assert adm.try_admit("192.0.2.1", F, 20).admitted  # fast is not subject to penalties
    assert adm.try_admit("192.0.2.2", B, 20).admitted
    assert not adm.is_penalised("192.0.2.1", 70)
    assert adm.try_admit("192.0.2.1", B, 70).admitted
    # IPv6: per /64
    adm.penalise("2001:db8::1", 0)
    assert adm.is_penalised("2001:db8::ffff", 1)
    assert not adm.is_penalised("2001:db8:0:1::1", 1)
    assert EARLY_TALKER_REPLY.startswith("554 ")


def test_penalty_box_is_bounded() -> None:
    adm = Admission(limits(penalty_s=100.0, max_penalised=10))
    for i in range(50):
        adm.penalise(distinct_ip(i), float(i))
    assert adm.penalised_count == 10
    # the soonest-expiring (oldest) were evicted; the newest are kept
    assert adm.is_penalised(distinct_ip(49), 50)
    assert not adm.is_penalised(distinct_ip(0), 50)


# --------------------------------------------------------------------------- misc


@pytest.mark.parametrize(
    "normal, saturated, expected",
    [(300.0, False, 300.0), (300.0, True, 10.0), (5.0, True, 5.0), (5.0, False, 5.0)],
)
def test_stress_timeouts(normal: float, saturated: bool, expected: float) -> None:
    assert stress_timeouts(normal, saturated) == expected


def test_stress_timeouts_come_back() -> None:
    seq = [stress_timeouts(300.0, s, stress_idle=20.0) for s in (False, True, True, False)]
    assert seq == [300.0, 20.0, 20.0, 300.0]


@pytest.mark.parametrize(
    "kw",
    [
        {"max_connections": 0},
        {"fast_reserve": 11},
        {"fast_reserve": -1},
        {"per_ip_bulk_max": 0},
        {"per_ip_rate": 1.0, "per_ip_burst": 0},
        {"ipv6_prefix": 129},
        {"penalty_s": -1},
        {"max_tracked_ips": 0},
    ],
)
def test_bad_limits(kw: dict) -> None:
    with pytest.raises(ValueError):
        limits(**kw)


@pytest.mark.parametrize("lane, reason", list(itertools.product(Lane, Refusal)))
def test_refusal_replies_are_4xx_before_banner(lane: Lane, reason: Refusal) -> None:
    from ingress.policy.admission import _REPLIES

    reply = _REPLIES[reason]
    if reason is Refusal.ADMITTED:
        assert reply is None
    else:
        assert reply is not None and reply.startswith("421 4.7.0 ") and "\n" not in reply


# --------------------------------------------------------------------------- trust tiers (issue 17)

from ingress.policy.tiers import Tier  # noqa: E402

OP, TP, SP = Tier.OPERATOR, Tier.THIRD_PARTY, Tier.SELF_PROVEN


def tiered(**kw: float) -> Admission:
    # 20 slots, 12 reserved: self-proven cap 6, third-party 3, the operator's floor 3
    return Admission(limits(max_connections=20, fast_reserve=12, **kw))


@pytest.mark.parametrize("fill, tier, ip, want", [
    # the self-proven tier is capped as a whole, however many IPs and identities it has
    ([(SP, f"10.0.0.{i}") for i in range(6)], SP, "10.0.1.1", "tier"),
    ([(SP, f"10.0.0.{i}") for i in range(5)], SP, "10.0.1.1", None),
    ([(TP, f"10.0.0.{i}") for i in range(3)], TP, "10.0.1.1", "tier"),
    ([(TP, f"10.0.0.{i}") for i in range(3)], SP, "10.0.1.1", None),   # caps are per tier
    # per IP: per_ip_fast_max 2 for the capped tiers; the operator is exempt
    ([(SP, "10.0.0.1"), (SP, "10.0.0.1")], SP, "10.0.0.1", "per-ip"),
    ([(SP, "10.0.0.1"), (TP, "10.0.0.1")], TP, "10.0.0.1", "per-ip"),
    ([(SP, "10.0.0.1"), (SP, "10.0.0.1")], SP, "10.0.0.2", None),
    ([(OP, "10.0.0.1")] * 5, OP, "10.0.0.1", None),
    ([(SP, "10.0.0.1"), (SP, "10.0.0.1")], OP, "10.0.0.1", None),
])
def test_fast_refusal(fill: list[tuple[Tier, str]], tier: Tier, ip: str,
                      want: str | None) -> None:
    adm = tiered(per_ip_fast_max=2)
    for t, addr in fill:
        assert adm.try_admit(addr, F, 0, t).admitted
    assert adm.fast_refusal(ip, tier) == want


def test_fast_admission_per_tier_keeps_the_operator_floor() -> None:
    adm = tiered()
    for i in range(8):        # bulk: 20 - 12
        assert adm.try_admit(distinct_ip(i), B, 0).admitted
    for i in range(6):        # self-proven: its cap
        assert adm.try_admit(distinct_ip(100 + i), F, 0, SP).admitted
    assert not adm.try_admit(distinct_ip(200), F, 0, SP).admitted
    for i in range(3):        # third-party: its cap
        assert adm.try_admit(distinct_ip(300 + i), F, 0, TP).admitted
    v = adm.try_admit(distinct_ip(400), F, 0, TP)
    assert not v.admitted and v.reason is Refusal.SLOTS
    assert not adm.try_admit(distinct_ip(500), B, 0).admitted
    for i in range(3):        # the operator: its floor is free, then the slots are full
        assert adm.try_admit(distinct_ip(600 + i), F, 0, OP).admitted
    assert adm.in_use == 20 and not adm.try_admit(distinct_ip(700), F, 0, OP).admitted
    assert (adm.held(OP), adm.held(TP), adm.held(SP), adm.bulk_in_use) == (3, 3, 6, 8)


def test_self_proven_cannot_take_the_operator_floor_by_promotion_and_demotion() -> None:
    """Bulk sessions promoted to self-proven, demoted (domain over its rate), promoted again,
    while bulk refills whatever it may: the operator's floor (3 slots) stays free."""
    adm = tiered()
    held = []
    n = 0
    for _ in range(4):
        while (v := adm.try_admit(distinct_ip(n), B, 0)).admitted:     # bulk fills its room
            n += 1
            held.append(v.ticket)
        for t in held:
            if t.lane is B and adm.fast_refusal(t.ip, SP) is None:
                adm.promote(t, SP)
        assert adm.held(SP) == 6
        assert adm.limits.max_connections - adm.in_use >= 3
        for t in held:
            adm.demote(t)
        assert adm.limits.max_connections - adm.in_use >= 3
    for i in range(3):
        assert adm.try_admit(distinct_ip(10_000 + i), F, 0, OP).admitted


def test_promote_and_release_track_the_tier_and_ip() -> None:
    adm = tiered(per_ip_fast_max=1)
    t = adm.try_admit("10.0.0.1", B, 0).ticket
    assert t is not None
    adm.promote(t, SP)
    assert (t.lane, t.tier, adm.held(SP), adm.fast_for("10.0.0.1"), adm.bulk_for("10.0.0.1")) \
        == (F, SP, 1, 1, 0)
    assert adm.fast_refusal("10.0.0.1", SP) == "per-ip"
    adm.demote(t)
    assert (t.lane, t.tier, adm.held(SP), adm.fast_for("10.0.0.1"), adm.bulk_for("10.0.0.1")) \
        == (B, Tier.UNKNOWN, 0, 0, 1)
    adm.promote(t, OP)                  # e.g. a certificate after the handshake
    assert adm.fast_for("10.0.0.1") == 0 and adm.held(OP) == 1
    adm.release(t)
    adm.release(t)
    assert (adm.in_use, adm.held(OP)) == (0, 0)
