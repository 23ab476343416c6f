"""Deferral records (ingress.policy.deferrals): table-driven, the clock as an argument."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingress.core import config as config_mod
from ingress.core.config import ConfigError
from ingress.policy.deferrals import (
    MAX_CREDITS,
    MAX_RCPTS,
    Claim,
    ClaimResult,
    DeferralLimits,
    DeferralStore,
    deferral_key,
    net_of,
    retry_buckets,
)

LIM = DeferralLimits(min_delay=60, ttl=3600, max_records=4, per_net_max=2)
A = deferral_key("192.0.2.10", "Alice@Sender.test")
B = deferral_key("192.0.2.10", "bob@sender.test")
C = deferral_key("198.51.100.1", "carol@other.test")
D = deferral_key("203.0.113.1", "dan@other.test")
E = deferral_key("2001:db8::1", "eve@other.test")


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


def test_net_and_long_sender_bounded() -> None:
    assert net_of("10.1.2.3") == "10.1.2.0/24"
    assert len(deferral_key("10.1.2.3", "x" * 5000)) < 300
    assert len(net_of("y" * 5000)) == 64


# (name, [(op, key, now)], (op, key, now) -> expected result of the last op)
# ops: "rec" record, "claim" claim (result), "check", "consume" (Claim or None)
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
    ("two deferrals buy two", [("rec", A, 0), ("rec", A, 1), ("claim", A, 61)],
     ("claim", A, 62), ClaimResult.CLAIMED),
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
    ("full: the oldest dropped", [("rec", A, 0), ("rec", C, 1), ("rec", D, 2), ("rec", E, 3),
                                  ("rec", deferral_key("10.0.0.1", "f@g"), 4)],
     ("claim", A, 100), ClaimResult.NONE),
    ("full: the rest kept", [("rec", A, 0), ("rec", C, 1), ("rec", D, 2), ("rec", E, 3),
                             ("rec", deferral_key("10.0.0.1", "f@g"), 4)],
     ("claim", C, 100), ClaimResult.CLAIMED),
    ("expired records purged make room", [("rec", A, 0), ("rec", C, 1), ("rec", D, 2),
                                          ("rec", E, 3), ("rec", B, 3700)],
     ("claim", B, 3760), ClaimResult.CLAIMED),
]


def _run(store: DeferralStore, op: str, key: str, now: float) -> object:
    if op == "rec":
        return store.record(key, now)
    if op == "claim":
        return store.claim(key, now)[0]
    if op == "check":
        return store.check(key, now)
    return store.consume(key, now)


@pytest.mark.parametrize("name,ops,last,want", CASES, ids=[c[0] for c in CASES])
def test_store(name: str, ops: list, last: tuple, want: object) -> None:
    store = DeferralStore(LIM)
    for op in ops:
        _run(store, *op)
        assert len(store) <= LIM.max_records
    assert _run(store, *last) == want


def test_credits_capped() -> None:
    store = DeferralStore(DeferralLimits(0, 3600, 10, 10))
    for t in range(3 * MAX_CREDITS):
        store.record(A, float(t))
    got = [store.claim(A, 1000.0)[0] for _ in range(3 * MAX_CREDITS)]
    assert got.count(ClaimResult.CLAIMED) == MAX_CREDITS


def test_per_net_counts_follow_drops() -> None:
    store = DeferralStore(LIM)
    store.record(A, 0)
    store.record(B, 0)
    assert store.per_net("192.0.2.0/24") == 2
    assert store.claim(A, 60)[0] is ClaimResult.CLAIMED       # used up: removed
    assert store.per_net("192.0.2.0/24") == 1
    assert store.record(deferral_key("192.0.2.5", "z@y"), 61)  # room again in that net
    assert store.lookup(B, 3600) is None                       # expired: removed
    assert store.per_net("192.0.2.0/24") == 1


def test_claim_carries_first_and_rcpts() -> None:
    store = DeferralStore(LIM)
    store.record(A, 10)
    store.record(A, 20, ["Bob@Example.test", *(f"r{i}@x" for i in range(20))])
    rec = store.lookup(A, 30)
    assert rec is not None and rec.first == 10 and rec.last == 20 and rec.count == 2
    assert len(rec.rcpts) <= MAX_RCPTS
    result, claim = store.claim(A, 100)
    assert result is ClaimResult.CLAIMED and claim is not None and claim.first == 10
    assert claim.covers(["bob@example.test"]) and claim.covers(("BOB@example.test", "q@x"))
    assert not claim.covers(["mallory@example.test"])


def test_shared_record_keeps_its_first_time() -> None:
    store = DeferralStore(LIM)
    assert store.record(A, 500, first=100)
    rec = store.lookup(A, 500)
    assert rec is not None and rec.first == 100 and rec.last == 500
    assert not store.record(C, 4000, first=100)       # began elsewhere, already expired


@pytest.mark.parametrize("rcpts,asked,covered", [
    (frozenset(), ["anyone@x"], True),                # deferred at MAIL FROM: no recipients
    (frozenset({"a@x"}), ["a@x"], True),
    (frozenset({"a@x"}), ["b@x", "A@X"], True),
    (frozenset({"a@x"}), ["b@x"], False),
    (frozenset({"a@x"}), [], False),
])
def test_covers(rcpts: frozenset[str], asked: list[str], covered: bool) -> None:
    assert Claim(0.0, rcpts).covers(asked) is covered


@pytest.mark.parametrize("kw", [
    {"min_delay": -1, "ttl": 10, "max_records": 1, "per_net_max": 1},
    {"min_delay": 10, "ttl": 10, "max_records": 1, "per_net_max": 1},
    {"min_delay": 0, "ttl": 10, "max_records": 0, "per_net_max": 1},
    {"min_delay": 0, "ttl": 10, "max_records": 1, "per_net_max": 0},
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
])
def test_config_errors_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, toml)
    assert key in str(e.value)


def test_should_share_rate_limits_a_hammering_bot() -> None:
    store = DeferralStore(LIM)                        # min_delay 60: share every 30 s at most
    got = []
    for t in range(0, 100, 5):
        store.record(A, float(t))
        got.append((t, store.should_share(A, float(t))))
    assert [t for t, shared in got if shared] == [0, 30, 60, 90]
    assert not store.should_share(C, 0)               # no record: nothing to share


def test_check_config_shows_the_retry_share(tmp_path: Path) -> None:
    from ingress import configshow
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
