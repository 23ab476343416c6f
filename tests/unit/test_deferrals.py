"""Deferral records (ingress.policy.deferrals): table-driven, the clock as an argument."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingress.core import config as config_mod
from ingress.core.config import ConfigError
from ingress.core.derived import retry_buckets
from ingress.policy.deferrals import (
    HAMMER_WINDOW,
    MAX_RCPTS,
    Claim,
    ClaimResult,
    DeferralLimits,
    DeferralStore,
    deferral_key,
    deferral_limits,
    net_of,
    site_of,
)

LIM = DeferralLimits(min_delay=60, ttl=3600, max_records=4, per_net_max=2)
A = deferral_key("192.0.2.10", "Alice@Sender.test")
B = deferral_key("192.0.2.10", "bob@sender.test")
C = deferral_key("198.51.100.1", "carol@other.test")
D = deferral_key("203.0.113.1", "dan@other.test")
E = deferral_key("2001:db8::1", "eve@other.test")
R = ("rcpt@example.test",)          # the recipient of the deferred transactions below


@pytest.mark.parametrize("ip,sender,key", [
    ("192.0.2.10", "Alice@Sender.test", "192.0.2.0/24|alice@sender.test"),
    ("192.0.2.200", "alice@sender.test", "192.0.2.0/24|alice@sender.test"),   # same /24
    ("::ffff:192.0.2.7", "a@b", "192.0.2.0/24|a@b"),                          # mapped = IPv4
    ("2001:db8:1:2:3::9", "a@b", "2001:db8:1:2::/64|a@b"),
    ("2001:db8:1:2:ffff::1", "a@b", "2001:db8:1:2::/64|a@b"),                 # same /64
    ("192.0.2.1", "<>", "192.0.2.0/24|"),                                     # null sender
    ("192.0.2.1", "", "192.0.2.0/24|"),
    ("not-an-ip", "a@b", "not-an-ip|a@b"),
    # the domain is canonical (every spelling one record), the local part lower-cased
    ("192.0.2.1", "A@\uff53pam.test", "192.0.2.0/24|a@spam.test"),
    ("192.0.2.1", "a@SPAM\u3002test.", "192.0.2.0/24|a@spam.test"),
    ("192.0.2.1", "<a@spam\uff0etest>", "192.0.2.0/24|a@spam.test"),
    ("192.0.2.1", "a@B\u00fccher.test", "192.0.2.0/24|a@xn--bcher-kva.test"),
    ("192.0.2.1", "a@xn--bcher-kva.test", "192.0.2.0/24|a@xn--bcher-kva.test"),
    ("192.0.2.1", "a@-not-a-name-", "192.0.2.0/24|a@"),    # never a key of its own
    ("192.0.2.1", "a@x..test", "192.0.2.0/24|a@"),
])
def test_key(ip: str, sender: str, key: str) -> None:
    assert deferral_key(ip, sender) == key


@pytest.mark.parametrize("prefix,ip,net,site", [
    (64, "2001:db8:1:2:3::9", "2001:db8:1:2::/64", "2001:db8:1::/48"),
    (56, "2001:db8:1:2ff:3::9", "2001:db8:1:200::/56", "2001:db8:1::/48"),   # ipv6_prefix
    (48, "2001:db8:1:2:3::9", "2001:db8:1::/48", "2001:db8:1::/48"),
    (40, "2001:db8:1:2:3::9", "2001:db8::/40", "2001:db8::/40"),           # wider: its own site
    (56, "192.0.2.7", "192.0.2.0/24", "192.0.2.0/24"),                     # IPv4: /24, its site
    (56, "::ffff:192.0.2.7", "192.0.2.0/24", "192.0.2.0/24"),
    (64, "not-an-ip", "not-an-ip", "not-an-ip"),
])
def test_network_and_site(prefix: int, ip: str, net: str, site: str) -> None:
    assert net_of(ip, prefix) == net and site_of(net) == site
    store = DeferralStore(DeferralLimits(60, 3600, 10, 2, ipv6_prefix=prefix))
    assert store.key(ip, "a@b") == f"{net}|a@b"


def test_net_and_long_sender_bounded() -> None:
    assert net_of("10.1.2.3") == "10.1.2.0/24"
    assert len(deferral_key("10.1.2.3", "x" * 5000)) < 300
    assert len(net_of("y" * 5000)) == 64
    assert len(site_of("y" * 5000)) == 64


# (name, [(op, key, now)], (op, key, now) -> expected result of the last op)
# ops: "rec" record (recipients R), "claim" claim of R (result), "check", "consume" (Claim)
CASES = [
    ("never deferred", [], ("claim", A, 100), ClaimResult.NONE),
    ("retry before min_delay", [("rec", A, 0)], ("claim", A, 59), ClaimResult.TOO_EARLY),
    ("retry at min_delay", [("rec", A, 0)], ("claim", A, 60), ClaimResult.CLAIMED),
    ("retry within ttl", [("rec", A, 0)], ("claim", A, 3599), ClaimResult.CLAIMED),
    ("retry after ttl", [("rec", A, 0)], ("claim", A, 3600), ClaimResult.NONE),
    ("hammering refreshes last: too early", [("rec", A, 0), ("rec", A, 50)],
     ("claim", A, 100), ClaimResult.TOO_EARLY),
    ("ttl from the first deferral, not extended", [("rec", A, 0), ("rec", A, 3000)],
     ("claim", A, 3600), ClaimResult.NONE),
    ("one deferral buys one bypass", [("rec", A, 0), ("claim", A, 60)],
     ("claim", A, 61), ClaimResult.NONE),
    # was: each deferral added a credit (issue 17, measured 7: free to manufacture)
    ("two deferrals buy one", [("rec", A, 0), ("rec", A, 1), ("claim", A, 61)],
     ("claim", A, 62), ClaimResult.NONE),
    ("consumed elsewhere", [("rec", A, 0), ("consume", A, 10)], ("claim", A, 61),
     ClaimResult.NONE),
    ("other sender, same net: no", [("rec", A, 0)], ("claim", B, 61), ClaimResult.NONE),
    ("check does not spend", [("rec", A, 0), ("check", A, 60)], ("claim", A, 61),
     ClaimResult.CLAIMED),
    ("per net full: newcomer not stored",
     [("rec", A, 0), ("rec", B, 0), ("rec", deferral_key("192.0.2.99", "x@y"), 0)],
     ("claim", deferral_key("192.0.2.99", "x@y"), 61), ClaimResult.NONE),
    ("per net full: held ones kept",
     [("rec", A, 0), ("rec", B, 0), ("rec", deferral_key("192.0.2.99", "x@y"), 0)],
     ("claim", A, 61), ClaimResult.CLAIMED),
    # was: full, the oldest was dropped (so a flood of newcomers pushed every record out);
    # now by quota: every site holds one, so the newcomer is not stored and nothing is lost
    ("full, one each: the newcomer not stored",
     [("rec", A, 0), ("rec", C, 1), ("rec", D, 2), ("rec", E, 3),
      ("rec", deferral_key("10.0.0.1", "f@g"), 4)],
     ("claim", deferral_key("10.0.0.1", "f@g"), 100), ClaimResult.NONE),
    ("full, one each: the oldest kept",
     [("rec", A, 0), ("rec", C, 1), ("rec", D, 2), ("rec", E, 3),
      ("rec", deferral_key("10.0.0.1", "f@g"), 4)],
     ("claim", A, 100), ClaimResult.CLAIMED),
    ("full: the site holding the most makes room",
     [("rec", A, 0), ("rec", B, 1), ("rec", C, 2), ("rec", D, 3), ("rec", E, 4)],
     ("claim", E, 100), ClaimResult.CLAIMED),
    ("full: ... its oldest record goes",
     [("rec", A, 0), ("rec", B, 1), ("rec", C, 2), ("rec", D, 3), ("rec", E, 4)],
     ("claim", A, 100), ClaimResult.NONE),
    ("expired records purged make room", [("rec", A, 0), ("rec", C, 1), ("rec", D, 2),
                                          ("rec", E, 3), ("rec", B, 3700)],
     ("claim", B, 3760), ClaimResult.CLAIMED),
]


def _run(store: DeferralStore, op: str, key: str, now: float) -> object:
    if op == "rec":
        return store.record(key, now, R)
    if op == "claim":
        return store.claim(key, R, now)[0]
    if op == "check":
        return store.check(key, R, now)
    return store.consume(key, now)


@pytest.mark.parametrize("name,ops,last,want", CASES, ids=[c[0] for c in CASES])
def test_store(name: str, ops: list, last: tuple, want: object) -> None:
    store = DeferralStore(LIM)
    for op in ops:
        _run(store, *op)
        assert len(store) <= LIM.max_records
    assert _run(store, *last) == want


def test_one_record_one_bypass_however_often_deferred() -> None:
    """Was: each shed added a credit (up to 8): a bot made its own evidence by being shed."""
    store = DeferralStore(DeferralLimits(0, 3600, 10, 10))
    for t in range(24):
        store.record(A, float(t), R)
    got = [store.claim(A, R, 1000.0)[0] for _ in range(24)]
    assert got.count(ClaimResult.CLAIMED) == 1


def test_per_net_counts_follow_drops() -> None:
    store = DeferralStore(LIM)
    store.record(A, 0, R)
    store.record(B, 0, R)
    assert store.per_net("192.0.2.0/24") == 2 and store.per_site("192.0.2.0/24") == 2
    assert store.claim(A, R, 60)[0] is ClaimResult.CLAIMED       # used up: removed
    assert store.per_net("192.0.2.0/24") == 1 and store.per_site("192.0.2.0/24") == 1
    assert store.record(deferral_key("192.0.2.5", "z@y"), 61, R)  # room again in that net
    assert store.lookup(B, 3600) is None                          # expired: removed
    assert store.per_net("192.0.2.0/24") == 1 and store.sites() == 1


def test_claim_carries_first_and_rcpts() -> None:
    store = DeferralStore(LIM)
    store.record(A, 10, R)
    store.record(A, 20, ["Bob@Example.test", *(f"r{i}@x" for i in range(20))])
    rec = store.lookup(A, 30)
    assert rec is not None and rec.first == 10 and rec.last == 20 and rec.count == 2
    assert len(rec.rcpts) == MAX_RCPTS and "bob@example.test" in rec.rcpts
    result, claim = store.claim(A, ["BOB@example.test"], 100)
    assert result is ClaimResult.CLAIMED and claim is not None and claim.first == 10
    assert claim.covers(["bob@example.test"]) and claim.covers(("BOB@example.test", R[0]))
    assert not claim.covers(["mallory@example.test"])
    assert not claim.covers(("bob@example.test", "mallory@example.test"))   # was: any one


def test_shared_record_keeps_its_first_time() -> None:
    store = DeferralStore(LIM)
    assert store.record(A, 500, R, first=100)
    rec = store.lookup(A, 500)
    assert rec is not None and rec.first == 100 and rec.last == 500
    assert not store.record(C, 4000, R, first=100)       # began elsewhere, already expired


@pytest.mark.parametrize("rcpts,asked,covered", [
    (frozenset(), ["anyone@x"], False),               # was True: no recipient covers nothing
    (frozenset({"a@x"}), ["a@x"], True),
    (frozenset({"a@x", "c@x"}), ["A@X"], True),       # fewer than deferred: yes
    (frozenset({"a@x", "c@x"}), ["a@x", "c@x"], True),
    (frozenset({"a@x"}), ["b@x", "A@X"], False),      # was True: another one rides along
    (frozenset({"a@x"}), ["b@x"], False),
    (frozenset({"a@x"}), [], False),
])
def test_covers(rcpts: frozenset[str], asked: list[str], covered: bool) -> None:
    assert Claim(0.0, rcpts).covers(asked) is covered


# --- issue 17, item 4: the claim needs the same recipients -------------------------------------

@pytest.mark.parametrize("deferred,retried,want", [
    (["a@x"], ["a@x"], ClaimResult.CLAIMED),
    (["a@x"], ["A@X "], ClaimResult.CLAIMED),
    (["a@x", "b@x"], ["b@x"], ClaimResult.CLAIMED),
    (["a@x"], ["b@x"], ClaimResult.NONE),              # the same sender, another message
    (["a@x"], ["a@x", "b@x"], ClaimResult.NONE),       # one not deferred rides along: no
    ([], ["a@x"], ClaimResult.NONE),                   # a record without recipients
])
def test_claim_needs_the_deferred_recipients(deferred: list[str], retried: list[str],
                                              want: ClaimResult) -> None:
    store = DeferralStore(LIM)
    store.record(A, 0, deferred)
    assert store.claim(A, retried, 60)[0] is want
    assert (store.lookup(A, 61) is None) is (want is ClaimResult.CLAIMED)


def test_recipients_added_by_later_deferrals() -> None:
    """The later RCPTs of a deferred transaction (sheds=0: not another shed) join its record."""
    store = DeferralStore(LIM)
    store.record(A, 0, ["a@x"])
    store.record(A, 0.1, ["b@x"], sheds=0)
    assert store.check(A, ["b@x"], 61) is ClaimResult.CLAIMED
    assert store.check(A, ["a@x", "b@x"], 61) is ClaimResult.CLAIMED


# --- issue 17, item 4: a site shed many times a minute earns nothing ---------------------------

HAM = DeferralLimits(min_delay=60, ttl=3600, max_records=100, per_net_max=40, hammer_sheds=5)
T0 = 10 * HAMMER_WINDOW          # the start of a window


def _senders(n: int, ip: str = "192.0.2.7") -> list[str]:
    return [deferral_key(ip, f"s{i}@bot.test") for i in range(n)]


def test_a_site_shed_slowly_earns() -> None:
    store = DeferralStore(HAM)
    keys = _senders(5)
    for i, k in enumerate(keys):                        # 5 a minute: not more than 5
        store.record(k, T0 + i * 11, R)
    assert not store.hammering(site_of("192.0.2.0/24"), T0 + 55)
    assert store.check(keys[0], R, T0 + 120) is ClaimResult.CLAIMED


def test_a_hammering_site_earns_nothing_and_never_will() -> None:
    """A bot sheds 20 senders within a minute: none of its records ripens, not while it
    hammers, and not later either (a record deferred while its site hammered is void); its
    quiet neighbour's records in another network are unaffected."""
    store = DeferralStore(HAM)
    keys = _senders(20)
    for i, k in enumerate(keys):
        store.record(k, T0 + i, R)
    honest = deferral_key("198.51.100.9", "mta@partner.test")
    store.record(honest, T0 + 20, R)
    site = site_of("192.0.2.0/24")
    assert store.hammering(site, T0 + 30)
    # the first five were made before it hammered, but it hammers now
    assert store.check(keys[0], R, T0 + 80) is ClaimResult.HAMMERED
    # long after, quiet: the early ones ripen, the ones made while hammering never do
    later = T0 + 3 * HAMMER_WINDOW
    assert not store.hammering(site, later)
    assert [store.check(k, R, later) for k in keys[:5]] == [ClaimResult.CLAIMED] * 5
    assert {store.check(k, R, later) for k in keys[6:]} == {ClaimResult.HAMMERED}
    assert store.check(honest, R, T0 + 80) is ClaimResult.CLAIMED


def test_refreshing_a_record_while_hammering_voids_it() -> None:
    store = DeferralStore(HAM)
    early = deferral_key("192.0.2.7", "early@bot.test")
    store.record(early, T0, R)
    for k in _senders(10):
        store.record(k, T0 + 1, R)
    store.record(early, T0 + 2, R)                     # deferred again while hammering
    assert store.check(early, R, T0 + 5 * HAMMER_WINDOW) is ClaimResult.HAMMERED


@pytest.mark.parametrize("offset,sheds_before,hammering", [
    (0.0, 6, True),                     # 6 in this window
    (0.5, 6, True),                     # the previous window's 6, half inside: 3 + 3 now
    (0.9, 6, False),                    # 6 x 0.1 + 3 = 3.6
    (2.0, 60, False),                   # two windows on: forgotten
])
def test_the_shed_window_slides(offset: float, sheds_before: int, hammering: bool) -> None:
    store = DeferralStore(HAM)
    site = site_of("192.0.2.0/24")
    store.record(A, T0, R, sheds=sheds_before)
    now = T0 + HAMMER_WINDOW * (1 + offset) if offset < 1 else T0 + HAMMER_WINDOW * offset
    if 0 < offset < 1:
        store.record(B, now, R, sheds=3)
    assert store.hammering(site, now) is hammering


def test_sheds_told_by_other_processes_count() -> None:
    """A shared fact stands for the sheds the other acceptor saw (n); hammered: it found the
    site hammering, so the copy is void too."""
    store = DeferralStore(HAM)
    store.record(A, T0, R, sheds=9, origin="a1")
    assert store.hammering(site_of("192.0.2.0/24"), T0 + 1)
    store.record(C, T0, R, hammered=True, origin="a1")
    assert store.check(C, R, T0 + 10 * HAMMER_WINDOW) is ClaimResult.HAMMERED
    quiet = DeferralStore(HAM)
    quiet.record(A, T0, R, sheds=0)
    assert not quiet.hammering(site_of("192.0.2.0/24"), T0 + 1)


def test_hammer_rule_off() -> None:
    store = DeferralStore(DeferralLimits(60, 3600, 100, 40))    # hammer_sheds 0
    for k in _senders(30):
        store.record(k, T0, R)
    assert store.check(_senders(1)[0], R, T0 + 60) is ClaimResult.CLAIMED


# --- issue 17, item 4: the retry share divided fairly between sites ---------------------------

FAIR = DeferralLimits(min_delay=60, ttl=36000, max_records=100, per_net_max=40,
                      share_rate=0.01, share_burst=4)


def test_a_site_takes_its_part_and_leaves_the_rest() -> None:
    """Two sites hold records, the share is 4 tokens and 0.01/s: each may take 2 at once,
    then one per 200 s (2 sites / 0.01)."""
    store = DeferralStore(FAIR)
    bot = _senders(8)
    for k in bot:
        store.record(k, 0, R)
    honest = deferral_key("198.51.100.9", "mta@partner.test")
    store.record(honest, 0, R)
    got = [store.claim(k, R, 100)[0] for k in bot]
    assert got == [ClaimResult.CLAIMED] * 2 + [ClaimResult.OVER_SHARE] * 6
    assert store.claim(honest, R, 100)[0] is ClaimResult.CLAIMED
    # one site left holding records: its part is the whole share again, paced
    assert store.sites() == 1
    # its two claims put its next slot 400 s on; alone, it may claim 300 s ahead
    assert store.check(bot[2], R, 150) is ClaimResult.OVER_SHARE
    assert store.claim(bot[2], R, 300)[0] is ClaimResult.CLAIMED


def test_a_site_alone_may_take_the_whole_burst() -> None:
    store = DeferralStore(FAIR)
    keys = _senders(6)
    for k in keys:
        store.record(k, 0, R)
    got = [store.claim(k, R, 100)[0] for k in keys]
    assert got.count(ClaimResult.CLAIMED) == 4


def test_claims_made_elsewhere_charge_the_site() -> None:
    store = DeferralStore(FAIR)
    keys = _senders(4)
    for k in keys:
        store.record(k, 0, R)
    store.record(deferral_key("198.51.100.9", "x@y"), 0, R)
    assert store.consume(keys[0], 100, bypass=True) is not None
    assert store.consume(keys[1], 100, bypass=True) is not None
    assert store.check(keys[2], R, 100) is ClaimResult.OVER_SHARE
    assert store.consume(keys[3], 100) is not None    # through ordinary capacity: no charge
    other = DeferralStore(FAIR)
    for k in keys:
        other.record(k, 0, R)
    other.consume(keys[3], 100)
    assert other.check(keys[2], R, 100) is ClaimResult.CLAIMED


def test_share_not_divided_when_off() -> None:
    store = DeferralStore(DeferralLimits(60, 3600, 100, 40))    # share_rate 0
    keys = _senders(10)
    for k in keys:
        store.record(k, 0, R)
    assert [store.claim(k, R, 100)[0] for k in keys] == [ClaimResult.CLAIMED] * 10


# --- issue 17, measured 8: records per configured prefix and per /48 ---------------------------

V6 = DeferralLimits(min_delay=60, ttl=3600, max_records=40, per_net_max=2, per_site_max=8,
                    ipv6_prefix=64)


def test_one_48_cannot_push_out_other_networks() -> None:
    """Was: records counted per fixed /64 and the oldest dropped when full, so one /48 (2^16
    /64s) pushed every legitimate record out. Now a /48 holds at most per_site_max, and a full
    table makes room by quota."""
    store = DeferralStore(V6)
    legit = [store.key("192.0.2.1", "a@x"), store.key("198.51.100.1", "b@x"),
             store.key("2001:db8:ffff::1", "c@x")]
    for k in legit:
        assert store.record(k, 0, R)
    stored = sum(store.record(store.key(f"2001:db8:1:{i:x}::1", f"s{i}@spam.test"), 1, R)
                 for i in range(5000))
    assert stored == V6.per_site_max and store.per_site("2001:db8:1::/48") == 8
    assert [store.check(k, R, 60) for k in legit] == [ClaimResult.CLAIMED] * 3


def test_many_48s_cannot_push_out_other_networks() -> None:
    """A thousand /48s fill the table: the legitimate records stay (the attacker's newcomers
    only even out its own sites); a newcomer is then not stored until records expire or are
    used (the documented limit: refused, never pushing out)."""
    store = DeferralStore(V6)
    legit = [store.key("192.0.2.1", "a@x"), store.key("2001:db8:ffff::1", "c@x")]
    for k in legit:
        assert store.record(k, 0, R)
    for s in range(1000):
        for i in range(8):
            store.record(store.key(f"2001:db8:{s:x}:{i:x}::1", f"s{i}@spam.test"), 1, R)
    assert len(store) == V6.max_records
    assert [store.check(k, R, 60) for k in legit] == [ClaimResult.CLAIMED] * 2
    assert not store.record(store.key("203.0.113.5", "n@x"), 2, R)
    assert len(store) == V6.max_records


def test_a_full_table_makes_room_by_quota() -> None:
    """Five /48s with 8 records each fill the table: a newcomer of another network takes the
    room of the oldest record of a largest site, never a smaller site's."""
    store = DeferralStore(V6)
    legit = store.key("192.0.2.1", "a@x")
    assert store.record(legit, 0, R)
    for s in range(5):
        for i in range(8):
            store.record(store.key(f"2001:db8:{s:x}:{i:x}::1", f"s{i}@spam.test"), 1 + s, R)
    assert len(store) == V6.max_records                   # 1 + 4 x 8 + 7
    sites = [site_of(net_of(f"2001:db8:{s:x}::1")) for s in range(5)]
    assert [store.per_site(site) for site in sites] == [8, 8, 8, 8, 7]
    newcomer = store.key("203.0.113.5", "n@x")
    assert store.record(newcomer, 10, R) and store.check(newcomer, R, 70) is ClaimResult.CLAIMED
    assert store.check(legit, R, 70) is ClaimResult.CLAIMED
    assert sorted(store.per_site(site) for site in sites) == [7, 7, 8, 8, 8]


def test_ipv6_prefix_is_the_network() -> None:
    """admission.ipv6_prefix 56: two /64s of one /56 are one network (per_net_max 2)."""
    store = DeferralStore(DeferralLimits(60, 3600, 40, 2, per_site_max=8, ipv6_prefix=56))
    keys = [store.key(f"2001:db8:1:{i:x}::1", f"s{i}@x") for i in range(4)]
    assert [store.record(k, 0, R) for k in keys] == [True, True, False, False]
    assert store.per_net("2001:db8:1::/56") == 2


# --- sharing ----------------------------------------------------------------------------------

def test_to_share_rate_limits_a_hammering_bot() -> None:
    store = DeferralStore(LIM)                        # min_delay 60: share every 30 s at most
    got = []
    for t in range(0, 100, 5):
        store.record(A, float(t), R)
        told = store.to_share(A, float(t))
        got.append((t, None if told is None else told[1]))
    assert [(t, n) for t, n in got if n is not None] == [(0, 1), (30, 6), (60, 6), (90, 6)]
    assert store.to_share(C, 0) is None               # no record: nothing to share


def test_to_share_tells_new_recipients_and_voidness_at_once() -> None:
    store = DeferralStore(HAM)
    store.record(A, T0, ["a@x"])
    assert store.to_share(A, T0) is not None
    store.record(A, T0 + 1, ["b@x"], sheds=0)
    told = store.to_share(A, T0 + 1)
    assert told is not None and told[0].rcpts == {"a@x", "b@x"} and told[1] == 0
    assert store.to_share(A, T0 + 2) is None
    for k in _senders(10, "192.0.2.99"):
        store.record(k, T0 + 3, R)
    store.record(A, T0 + 4, ["a@x"])                  # now void: told at once
    told = store.to_share(A, T0 + 4)
    assert told is not None and told[0].void


def test_deferral_limits_from_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "[lanes.bulk]\nrate = 100.0\n[admission]\nretry_share = 0.1\n"
               "retry_per_net = 4\nretry_per_site = 16\nretry_hammer_sheds = 7\n"
               "ipv6_prefix = 56\n[supervisor]\nacceptors = 2\n")
    lim = deferral_limits(cfg)
    assert (lim.per_net_max, lim.per_site_max, lim.hammer_sheds, lim.ipv6_prefix) == \
        (4, 16, 7, 56)
    assert (lim.share_rate, lim.share_burst) == (10.0, 10.0)       # the broker's: the edge's
    off = deferral_limits(_cfg(tmp_path, "[admission]\nretry_share = 0.0\n"))
    assert off.share_rate == 0.0 and off.hammer_sheds == 30 and off.per_site_max == 128


@pytest.mark.parametrize("kw", [
    {"min_delay": -1, "ttl": 10, "max_records": 1, "per_net_max": 1},
    {"min_delay": 10, "ttl": 10, "max_records": 1, "per_net_max": 1},
    {"min_delay": 0, "ttl": 10, "max_records": 0, "per_net_max": 1},
    {"min_delay": 0, "ttl": 10, "max_records": 1, "per_net_max": 0},
    {"min_delay": 0, "ttl": 10, "max_records": 1, "per_net_max": 4, "per_site_max": 2},
    {"min_delay": 0, "ttl": 10, "max_records": 1, "per_net_max": 1, "ipv6_prefix": 8},
    {"min_delay": 0, "ttl": 10, "max_records": 1, "per_net_max": 1, "hammer_sheds": -1},
    {"min_delay": 0, "ttl": 10, "max_records": 1, "per_net_max": 1, "share_burst": 0.5},
])
def test_limits_validated(kw: dict) -> None:
    with pytest.raises(ValueError):
        DeferralLimits(**kw)


def _cfg(tmp_path: Path, text: str) -> config_mod.Config:
    p = tmp_path / "c.toml"
    p.write_text('[smtp]\nhostname = "mx.test"\naccepted_domains = ["example.test"]\n'
                 f'[spool]\npath = "{tmp_path}/s"\nstate_dir = "{tmp_path}/st"\n' + text)
    return config_mod.load(p)


@pytest.mark.parametrize("toml,want", [
    ("[lanes.bulk]\nrate = 100.0\n[admission]\nretry_share = 0.1\n"
     "[supervisor]\nacceptors = 2\n", ((5.0, 5.0), (10.0, 10.0))),
    ("[lanes.bulk]\nrate = 10.0\nburst = 40\n[admission]\nretry_share = 0.5\n"
     "[supervisor]\nacceptors = 4\n", ((1.25, 5.0), (5.0, 20.0))),
    ("[lanes.bulk]\nrate = 0.001\nburst = 1\n[admission]\nretry_share = 0.5\n"
     "[supervisor]\nacceptors = 2\n", ((0.00025, 1.0), (0.0005, 1.0))),   # at least one token
    ("[lanes.bulk]\nrate = 0.0\n", None),                                  # uncapped
    ("[admission]\nretry_share = 0.0\n", None),                            # off
])
def test_retry_buckets(tmp_path: Path, toml: str, want: object) -> None:
    assert retry_buckets(_cfg(tmp_path, toml)) == want


@pytest.mark.parametrize("toml,key", [
    ("[admission]\nretry_share = 1.5\n", "admission.retry_share"),
    ("[admission]\nretry_share = -0.1\n", "admission.retry_share"),
    ("[admission]\nretry_min_delay = -1.0\n", "admission.retry_min_delay"),
    ("[admission]\nretry_min_delay = 100.0\nretry_ttl = 50.0\n", "admission.retry_ttl"),
    ("[admission]\nretry_max_records = 0\n", "admission.retry_max_records"),
    ("[admission]\nretry_per_net = 0\n", "admission.retry_per_net"),
    ("[admission]\nretry_per_net = 200\n", "admission.retry_per_site"),
    ("[admission]\nretry_hammer_sheds = -1\n", "admission.retry_hammer_sheds"),
])
def test_config_errors_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, toml)
    assert key in str(e.value)


def test_check_config_shows_the_retry_share(tmp_path: Path) -> None:
    from ingress.tools import configshow
    cfg = _cfg(tmp_path, "[lanes.bulk]\nrate = 100.0\n[admission]\nretry_share = 0.1\n"
               "[supervisor]\nacceptors = 2\n")
    d = configshow.derived(cfg, nofile=(65536, 65536))
    assert d["retry_share_per_acceptor"] == {"rate": 5.0, "burst": 5.0}
    assert d["retry_share_at_broker"] == {"rate": 10.0, "burst": 10.0}
    assert "# retries of deferred transactions: 10/s (burst 10) beyond the bulk cap, 5/s " \
        "(burst 5) per acceptor" in configshow.render(cfg, nofile=(65536, 65536))
    off = _cfg(tmp_path, "[admission]\nretry_share = 0.0\n")
    assert configshow.derived(off, nofile=(65536, 65536))["retry_share_at_broker"] is None
    assert "retries of deferred" not in configshow.render(off, nofile=(65536, 65536))
