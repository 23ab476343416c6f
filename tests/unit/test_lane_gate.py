"""The lane's admission policy (ingress.policy.lane_gate): table-driven, the clock and the
workers' credit as arguments. Each row of the admission table is a lane's limits, the messages
submitted in order (identity, size, client address, retry mark) and the check expected to
refuse each (None: queued)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from ingress.core import config
from ingress.core.wire import NackReason
from ingress.policy.lane_gate import (
    OVER_RATE_HOLD,
    OVER_RATE_LISTED,
    Check,
    Decision,
    LaneGate,
    LaneLimits,
    Request,
)
from ingress.policy.tiers import Tier, TierShares

FAST = LaneLimits(fast=True, queue_max=8, queue_bytes=1000, max_message_size=100)
BULK = LaneLimits(fast=False, queue_max=8, queue_bytes=1000, max_message_size=100)
QF, QB, RATE = Check.QUEUE_FULL, Check.QUEUE_BYTES, Check.RATE
TS, KS, DR, TR = Check.TIER_SHARE, Check.KEY_SHARE, Check.DOMAIN_RATE, Check.TIER_RATE
SP_RATE = {Tier.SELF_PROVEN: (0.001, 1.0)}      # one token, none for ~1000 s


def m(identity: str = "", size: int = 10, ip: str = "192.0.2.1", retry: bool = False
      ) -> Request:
    return Request(size, identity, ip, retry)


# (limits, credit, [request, ...], [expected check per request])
ADMISSION: list[tuple[str, LaneLimits, int, list[Request], list[Check | None]]] = [
    # the lane's own bounds: count, then bytes (the bytes are the bodies', exactly)
    ("count", replace(BULK, queue_max=2), 0, [m(), m(), m()], [None, None, QF]),
    ("bytes", replace(BULK, queue_bytes=250), 0,
     [m(size=100), m(size=100), m(size=100), m(size=50)], [None, None, QB, None]),
    ("bytes, count first", replace(BULK, queue_max=1, queue_bytes=10), 0,
     [m(size=10), m(size=100)], [None, QF]),
    # the lane's bucket; a retry takes the retry share's token first, the lane's after
    ("rate", replace(BULK, rate=1.0, burst=2.0), 0, [m(), m(), m()], [None, None, RATE]),
    ("retry share first", replace(BULK, rate=1.0, burst=1.0, retry=(1.0, 1.0)), 0,
     [m(retry=True), m(retry=True), m(retry=True)], [None, None, RATE]),
    ("retry share not for others", replace(BULK, rate=1.0, burst=1.0, retry=(1.0, 1.0)), 0,
     [m(), m(), m(retry=True)], [None, RATE, None]),
    ("no retry share: the lane's bucket", replace(BULK, rate=1.0, burst=1.0), 0,
     [m(retry=True), m(retry=True)], [None, RATE]),
    # the bulk lane is one FIFO: no identity, no tier, whatever the envelope says
    ("bulk ignores identities", replace(BULK, identity_share=0.25, domain=(0.001, 1.0)), 0,
     [m("org:a.test")] * 4, [None] * 4),
    # fast: a capped tier holds at most its cap of the queue (8 x 0.5 = 4 self-proven, 8 x
    # 0.25 = 2 third-party), however many identities; the operator tier is not capped
    ("self-proven cap", FAST, 0, [m(f"org:d{i}.test") for i in range(5)] + [m("allow:x")],
     [None] * 4 + [TS, None]),
    ("third-party cap", FAST, 0, [m(f"dnswl:z{i}") for i in range(3)], [None, None, TS]),
    ("tier cap in bytes", replace(FAST, queue_bytes=400), 0,
     [m("org:a.test", 150), m("org:b.test", 50), m("org:c.test", 10)], [None, None, TS]),
    ("no identity counts as self-proven", FAST, 0, [m()] * 5, [None] * 4 + [TS]),
    # ... and of the credit: a cap of 0 credits is served as bulk at once; no worker at all
    # (credit 0): it waits, as every tier does
    ("third-party cap of 2 credits is 0", FAST, 2,
     [m("dnswl:z"), m("org:a.test"), m("allow:x")], [TS, None, None]),
    ("self-proven cap of 1 credit is 0", FAST, 1, [m("org:a.test")], [TS]),
    ("no credit: waits", FAST, 0, [m("dnswl:z")], [None]),
    # one identity: at most identity_share of the queue (8 x 0.25 = 2); learned: is its org:
    ("identity share", replace(FAST, identity_share=0.25), 0,
     [m("org:a.test"), m("org:a.test"), m("learned:a.test"), m("org:b.test")],
     [None, None, KS, None]),
    ("identity share (operator)", replace(FAST, identity_share=0.25), 0,
     [m("allow:x")] * 3, [None, None, KS]),
    ("no identity: no per-key bound", replace(FAST, identity_share=0.25), 0,
     [m()] * 3, [None] * 3),
    # its bytes: 1000 x 0.25 = 250, but always room for one message of max_message_size
    ("identity share in bytes", replace(FAST, identity_share=0.25, max_message_size=300), 0,
     [m("allow:x", 200), m("allow:x", 100), m("allow:x", 1), m("allow:y", 300)],
     [None, None, KS, None]),
    # a domain identity's rate; an operator identity has none
    ("domain rate", replace(FAST, domain=(0.001, 1.0)), 0,
     [m("org:a.test"), m("org:a.test"), m("learned:a.test"), m("org:b.test"), m("allow:x"),
      m("allow:x")], [None, DR, DR, None, None, None]),
    # the tier's total rate, shared between client sites; the operator tier has none
    ("tier rate", replace(FAST, tier_rates=SP_RATE), 0,
     [m("org:a.test"), m("org:b.test"), m("org:c.test", ip="198.51.100.1"), m("allow:x")],
     [None, TR, TR, None]),
    # the order: a message refused for its share of the queue spends no token of the rates
    ("share before rates", replace(FAST, identity_share=0.25, domain=(0.001, 1.0)), 0,
     [m("org:a.test", 10)] * 3, [None, DR, DR]),
    ("tier cap before rates", replace(FAST, queue_max=2, tier_rates=SP_RATE), 0,
     [m("org:a.test"), m("org:b.test"), m("dnswl:z")], [None, TS, TS]),
    ("the lane's bounds before a tier's", replace(FAST, queue_max=1), 0,
     [m("allow:x"), m("org:a.test")], [None, QF]),
]


@pytest.mark.parametrize(("limits", "credit", "requests", "expected"),
                         [row[1:] for row in ADMISSION], ids=[row[0] for row in ADMISSION])
def test_admission(limits: LaneLimits, credit: int, requests: list[Request],
                   expected: list[Check | None]) -> None:
    g: LaneGate[int] = LaneGate(limits, now=0.0)
    got = [g.admit(r, i, 0.0, credit).check for i, r in enumerate(requests)]
    assert got == expected
    assert len(g.queue) == expected.count(None)


@pytest.mark.parametrize(("check", "reason", "text"), [
    (None, None, ""),
    (QF, NackReason.QUEUE_FULL, "lane queue full"),
    (QB, NackReason.QUEUE_FULL, "lane queue full (bytes)"),
    (RATE, NackReason.RATE, "lane rate cap"),
    (TS, NackReason.SHARE, "tier over its share of the lane"),
    (KS, NackReason.SHARE, "identity over its share of the lane"),
    (DR, NackReason.SHARE, "identity over its share of the lane"),
    (TR, NackReason.SHARE, "tier over its rate"),
])
def test_decision_reasons(check: Check | None, reason: NackReason | None, text: str) -> None:
    d = Decision(check, Tier.OPERATOR, "allow:x")
    assert (d.ok, d.reason, d.text) == (check is None, reason, text)


@pytest.mark.parametrize(("limits", "identity", "tier", "key"), [
    (FAST, "allow:127.0.0.20/32", Tier.OPERATOR, "allow:127.0.0.20/32"),
    (FAST, "dnswl:list.test", Tier.THIRD_PARTY, "dnswl:list.test"),
    (FAST, "learned:a.test", Tier.SELF_PROVEN, "org:a.test"),
    (FAST, "", Tier.SELF_PROVEN, ""),
    (BULK, "allow:127.0.0.20/32", Tier.UNKNOWN, ""),
])
def test_decision_names_tier_and_share_key(limits: LaneLimits, identity: str, tier: Tier,
                                           key: str) -> None:
    d = LaneGate(limits, now=0.0).admit(m(identity), 0, 0.0, 0)
    assert (d.ok, d.tier, d.key) == (True, tier, key)


@pytest.mark.parametrize(("limits", "identity", "expected"), [
    # the queue's bounds before the lane's bucket (burst 2)
    (replace(BULK, queue_max=1, rate=0.001, burst=2.0), "", [None, QF, None, RATE]),
    # an identity's share of the queue (1 of 8) before its domain's rate (burst 2)
    (replace(FAST, identity_share=0.125, domain=(0.001, 2.0)), "org:a.test",
     [None, KS, None, DR]),
    # the tier's cap of the queue (1 of 2) before its total rate (burst 2)
    (replace(FAST, queue_max=2, tier_rates={Tier.SELF_PROVEN: (0.001, 2.0)}), "org:a.test",
     [None, TS, None, TR]),
])
def test_a_refusal_spends_no_token_of_the_rates_after_it(
        limits: LaneLimits, identity: str, expected: list[Check | None]) -> None:
    """Two messages, the second refused by a bound; the queue empties; a third finds the second
    token the refusal did not spend; the queue empties; a fourth finds none."""
    g: LaneGate[int] = LaneGate(limits, now=0.0)
    got = []
    for i in range(4):
        got.append(g.admit(m(identity), i, 0.0, 0).check)
        if i in (1, 2):
            g.drain()
    assert got == expected


def test_buckets_refill_with_the_clock() -> None:
    g: LaneGate[int] = LaneGate(replace(BULK, rate=2.0, burst=1.0), now=0.0)
    assert [g.admit(m(), 0, t, 0).check for t in (0.0, 0.25, 0.5, 0.5, 1.0)] == \
        [None, RATE, None, RATE, None]


# --- the over-rate list ---------------------------------------------------------------------


def test_over_rate_names_domains_and_sites_most_recent_first_for_a_while() -> None:
    g: LaneGate[int] = LaneGate(replace(FAST, queue_max=64, domain=(0.001, 1.0),
                                        tier_rates=SP_RATE), now=0.0)
    for t, identity, ip in [(0.0, "org:a.test", "192.0.2.1"),     # both tokens spent
                            (0.25, "org:a.test", "192.0.2.1"),    # DR: a named
                            (0.5, "org:b.test", "192.0.2.9"),     # TR: the site 192.0.2.0/24
                            (0.75, "org:c.test", "2001:db8:1:2::1")]:   # TR: a /48
        g.admit(m(identity, ip=ip), 0, t, 0)
    assert g.over_rate_now(0.75) == ["tier:self-proven@2001:db8:1::/48",
                                     "tier:self-proven@192.0.2.0/24", "org:a.test"]
    assert g.facts(0.75)["over_rate"] == g.over_rate_now(0.75)
    assert g.over_rate_now(0.5 + OVER_RATE_HOLD + 0.125) == ["tier:self-proven@2001:db8:1::/48"]
    assert g.over_rate_now(0.75 + OVER_RATE_HOLD + 0.125) == []
    assert len(g.over_rate) == 0


def test_over_rate_list_is_bounded_in_a_status() -> None:
    g: LaneGate[int] = LaneGate(replace(FAST, queue_max=8, domain=(0.001, 1.0)), now=0.0)
    for i in range(OVER_RATE_LISTED + 10):
        g.admit(m(f"org:d{i}.test"), 0, 0.0, 0)     # queue full after 8: no tokens spent
    assert g.over_rate_now(0.0) == []
    for i in range(OVER_RATE_LISTED + 10):
        g._name_over_rate(f"org:d{i}.test", 0.0)
    listed = g.over_rate_now(0.0)
    assert len(listed) == OVER_RATE_LISTED and listed[0] == f"org:d{OVER_RATE_LISTED + 9}.test"


def test_facts_without_rates_and_for_bulk() -> None:
    assert "over_rate" not in LaneGate(FAST, now=0.0).facts(0.0)
    assert LaneGate(BULK, now=0.0).facts(0.0) == {}
    assert LaneGate(FAST, now=0.0).facts(0.0)["tiers"] == {
        label: {"depth": 0, "inflight": 0}
        for label in ("operator", "third-party", "self-proven")}


# --- dispatch: strict tier priority, DRR, in-flight shares of the credit ----------------------

# (limits, credit, [identity queued, ...], identities picked in order until pick() says None)
PICKS: list[tuple[str, LaneLimits, int, list[str], list[str]]] = [
    ("bulk: FIFO", BULK, 1, ["a", "b", "c"], ["", "", ""]),
    ("operator first", FAST, 8, ["org:a.test", "dnswl:z", "allow:x"],
     ["allow:x", "dnswl:z", "org:a.test"]),
    # credit 4: self-proven may hold 2 in flight, third-party 1; the operator always finds room
    ("tier caps in flight", FAST, 4,
     ["org:a.test", "org:b.test", "org:c.test", "dnswl:y", "dnswl:z", "allow:x"],
     ["allow:x", "dnswl:y", "org:a.test", "org:b.test"]),
    # identity share 0.25 of credit 8: 2 in flight each (the third waits); DRR between
    # identities, a quantum of 64 KiB a turn (these small ones: all of an identity's at once)
    ("identity share in flight", replace(FAST, identity_share=0.25), 8,
     ["allow:x", "allow:x", "allow:x", "allow:y"], ["allow:x", "allow:x", "allow:y"]),
    ("DRR between identities", FAST, 8, ["allow:x"] * 2 + ["allow:y"] * 2,
     ["allow:x", "allow:x", "allow:y", "allow:y"]),
    ("share 1.0: no per-identity bound", FAST, 8, ["allow:x"] * 3, ["allow:x"] * 3),
]


@pytest.mark.parametrize(("limits", "credit", "queued", "picked"),
                         [row[1:] for row in PICKS], ids=[row[0] for row in PICKS])
def test_pick(limits: LaneLimits, credit: int, queued: list[str], picked: list[str]) -> None:
    g: LaneGate[int] = LaneGate(replace(limits, queue_max=64), now=0.0)
    for i, identity in enumerate(queued):
        assert g.admit(m(identity), i, 0.0, credit).ok
    got = []
    while (p := g.pick(credit)) is not None:
        g.sent(str(p.item).encode(), p)
        got.append(p.key)
    assert got == picked
    assert sum(g.inflight_by_tier.values()) == len(picked) == sum(g.inflight_by_key.values())


def test_release_and_requeue() -> None:
    g: LaneGate[str] = LaneGate(replace(FAST, identity_share=0.25), now=0.0)
    for item, identity in [("a0", "org:a.test"), ("a1", "org:a.test"), ("b0", "allow:x")]:
        g.admit(m(identity), item, 0.0, 4)
    first = g.pick(4)                # the operator's first; 1 in flight each at credit 4
    assert first is not None and first.item == "b0"
    g.sent(b"b0", first)
    p = g.pick(4)
    assert p is not None and p.item == "a0"
    g.requeue(p)                     # it could not be sent: first in line again
    p = g.pick(4)
    assert p is not None and p.item == "a0"
    g.sent(b"a0", p)
    assert g.pick(4) is None         # org:a.test at its share (1 of 4) in flight
    assert g.inflight_by_tier[Tier.SELF_PROVEN] == 1
    g.release(b"a0")
    g.release(b"a0")                 # twice (ACK after loss): counted once
    g.release(b"unknown")
    assert g.inflight_by_key == {"allow:x": 1} and g.inflight_by_tier[Tier.SELF_PROVEN] == 0
    p = g.pick(4)
    assert p is not None and p.item == "a1"


def test_drain_and_near_full() -> None:
    g: LaneGate[int] = LaneGate(replace(BULK, queue_max=5, queue_bytes=100), now=0.0)
    for i in range(3):
        g.admit(m(size=10), i, 0.0, 0)
    assert not g.near_full()
    g.admit(m(size=10), 3, 0.0, 0)         # 4 of 5: 0.8 of the count
    assert g.near_full()
    assert g.drain() == [0, 1, 2, 3] and not g.queue and not g.near_full()
    g.admit(m(size=80), 4, 0.0, 0)         # 0.8 of the bytes
    assert g.near_full()


# --- the limits from the config ---------------------------------------------------------------


@pytest.mark.parametrize(("toml", "lane", "want"), [
    ("", "fast", dict(fast=True, queue_max=256, rate=0.0, retry=None, identity_share=0.25,
                      domain=(50.0, 50.0), tier_rates={Tier.SELF_PROVEN: (200.0, 200.0)})),
    ("", "bulk", dict(fast=False, queue_max=256, rate=500.0, retry=(50.0, 50.0),
                      identity_share=1.0, domain=(0.0, 10.0), tier_rates={})),
    ("[classify]\ndomain_rate = 0.0\nidentity_share = 0.5\n"
     "[tiers]\nself_proven_rate = 0.0\nthird_party_rate = 4.0\nthird_party_burst = 8.0\n"
     "self_proven_share = 0.25\n", "fast",
     dict(identity_share=0.5, domain=(0.0, 10.0), tier_rates={Tier.THIRD_PARTY: (4.0, 8.0)},
          shares=TierShares(third_party=0.25, self_proven=0.25))),
    ("[admission]\nretry_share = 0.0\nipv6_prefix = 48\n[lanes.bulk]\nrate = 10.0\n"
     "burst = 4\nqueue_max = 32\n", "bulk",
     dict(queue_max=32, rate=10.0, burst=4.0, retry=None, ipv6_prefix=48)),
])
def test_limits_of_config(tmp_path, toml: str, lane: str, want: dict[str, Any]) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[spool]\nstate_dir = "{tmp_path}"\npath = "{tmp_path / "spool"}"\n' + toml)
    cfg = config.load(f)
    lim = LaneLimits.of(cfg, lane)
    assert {k: getattr(lim, k) for k in want} == want
    assert lim.queue_bytes == cfg.queue_bytes(lane)
    assert lim.max_message_size == cfg.smtp.max_message_size


@pytest.mark.parametrize("kwargs", [{"queue_max": 0}, {"queue_bytes": 0},
                                    {"max_message_size": 0}])
def test_limits_out_of_range(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        replace(FAST, **kwargs)


@pytest.mark.parametrize(("servable", "picked"), [
    # only the operator's worker has credit: the self-proven mail waits, the operator's goes
    ({Tier.OPERATOR, Tier.THIRD_PARTY}, ["allow:x"]),
    # only the dedicated self-proven worker has credit: its tier goes, past the operator's
    # head of the queue (which waits for its own worker, never for the dedicated one)
    ({Tier.SELF_PROVEN}, ["org:a.test", "org:b.test"]),
    (set(), []),
])
def test_pick_only_what_a_worker_with_credit_takes(servable: set[Tier],
                                                   picked: list[str]) -> None:
    g: LaneGate[int] = LaneGate(replace(FAST, queue_max=64), now=0.0)
    for i, identity in enumerate(["org:a.test", "allow:x", "org:b.test"]):
        assert g.admit(m(identity), i, 0.0, 8).ok
    got = []
    while (p := g.pick(8, servable.__contains__)) is not None:
        g.sent(str(p.item).encode(), p)
        got.append(p.key)
    assert got == picked
