"""The mutual-TLS port's handshake gate (ingress.policy.handshake_gate): table-driven, the clock
as an argument."""

from __future__ import annotations

import pytest

from ingress.core.addr import ip_key
from ingress.policy.handshake_gate import GateLimits, HandshakeGate, Tier, Verdict

CERT, OTHER = "aa" * 32, "bb" * 32
# (binary fractions of a second: the token arithmetic is exact)
LIM = GateLimits(stranger_rate=8.0, stranger_burst=2.0, wait=0.625, known_ttl=100.0,
                 known_max=8, known_rate=5.0, known_ipv4_prefix=24, ipv6_prefix=64,
                 failed_ttl=60.0, per_cert=3)


def gate(lim: GateLimits = LIM) -> HandshakeGate[str]:
    return HandshakeGate(lim, now=0.0)


@pytest.mark.parametrize("ip,v6,v4,key", [
    ("192.0.2.7", 64, 32, "192.0.2.7"),
    ("192.0.2.7", 64, 24, "192.0.2.0/24"),
    ("::ffff:192.0.2.7", 64, 24, "192.0.2.0/24"),
    ("2001:db8:1:2::9", 48, 24, "2001:db8:1::/48"),
    ("not-an-ip", 64, 24, "not-an-ip"),
])
def test_ip_key_with_an_ipv4_prefix(ip: str, v6: int, v4: int, key: str) -> None:
    assert ip_key(ip, v6, v4) == key


def test_queue_max_is_the_tokens_of_one_wait() -> None:
    assert LIM.queue_max == 5
    assert GateLimits(stranger_rate=0.0).queue_max == 0
    assert GateLimits(stranger_rate=50.0, wait=1.0).queue_max == 50


@pytest.mark.parametrize("kwargs", [
    {"stranger_burst": 0.5}, {"wait": -1.0}, {"known_ttl": 0.0}, {"known_rate": 0.0},
    {"known_max": 0}, {"per_cert": 0}, {"known_ipv4_prefix": 33}, {"ipv6_prefix": 8},
])
def test_limits_out_of_range(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GateLimits(**kwargs)          # type: ignore[arg-type]


def test_strangers_share_one_bucket_then_wait_then_are_refused() -> None:
    """Burst 2, 8/s, wait 0.625 s, queue 5: 2 start at once, 5 wait, the 8th is refused; the
    waiters start one per token (FIFO), and those still waiting after 0.625 s are refused."""
    g = gate()
    verdicts = [g.arrive(f"198.51.100.{i}", f"c{i}", 0.0).verdict for i in range(8)]
    assert verdicts == [Verdict.START] * 2 + [Verdict.WAIT] * 5 + [Verdict.REFUSE]
    assert g.waiting == 5
    assert g.next_event(0.0) == 0.125       # the next token
    d = g.due(0.125)
    assert (d.started, d.expired) == (["c2"], [])
    d = g.due(0.375)
    assert (d.started, d.expired) == (["c3", "c4"], [])
    d = g.due(0.625)                  # c5 and c6 waited their 0.625 s
    assert (d.started, d.expired) == ([], ["c5", "c6"])
    assert g.waiting == 0 and g.next_event(0.625) is None


def test_handshakes_started_for_strangers_stay_within_rate_times_time_plus_burst() -> None:
    """A flood of 1000 arrivals a second from distinct addresses for 5 s: the strangers that
    get a handshake are at most rate x 5 s + burst, whatever the arrival rate."""
    g, started, t = gate(), 0, 0.0
    for i in range(5000):
        t = i / 1000
        started += len(g.due(t).started)
        if g.arrive(f"10.{i // 250}.{i % 250}.1", f"c{i}", t).verdict is Verdict.START:
            started += 1
    started += len(g.due(t + 1.0).started)     # the queue drains or times out
    assert started <= LIM.stranger_rate * (t + LIM.wait) + LIM.stranger_burst + 1


def test_a_known_prefix_starts_at_once_while_strangers_wait() -> None:
    g = gate()
    g.verified("192.0.2.10", CERT, 0.0)
    for i in range(7):                              # the stranger bucket and queue are full
        g.arrive(f"198.51.100.{i}", f"c{i}", 1.0)
    for ip in ("192.0.2.10", "192.0.2.99"):         # the same /24
        a = g.arrive(ip, "k", 1.0)
        assert (a.verdict, a.tier) == (Verdict.START, Tier.KNOWN)
    assert g.tier("192.0.3.10", 1.0) is Tier.STRANGER


def test_a_known_prefix_has_its_own_rate_then_is_a_stranger() -> None:
    """An attacker inside a known /24 gets at most known_rate (burst as many) at once."""
    g = gate()
    g.verified("192.0.2.10", CERT, 0.0)
    tiers = [g.arrive("192.0.2.66", f"a{i}", 0.0).tier for i in range(8)]
    assert tiers == [Tier.KNOWN] * 5 + [Tier.STRANGER] * 3
    assert g.arrive("192.0.2.66", "later", 0.25).tier is Tier.KNOWN     # one token back


@pytest.mark.parametrize("now,tier", [(50.0, Tier.KNOWN), (99.9, Tier.KNOWN),
                                      (100.0, Tier.STRANGER), (500.0, Tier.STRANGER)])
def test_known_expires_after_its_ttl(now: float, tier: Tier) -> None:
    g = gate()
    g.verified("2001:db8:1:2::1", CERT, 0.0)
    assert g.tier("2001:db8:1:2:ffff::7", now) is tier        # the same /64


def test_a_verified_handshake_refreshes_the_ttl() -> None:
    g = gate()
    g.verified("192.0.2.10", CERT, 0.0)
    g.verified("192.0.2.11", CERT, 90.0)
    assert g.tier("192.0.2.10", 150.0) is Tier.KNOWN


def test_one_certificate_makes_at_most_per_cert_prefixes_known() -> None:
    """A leaked certificate used from a botnet: its least recently verified prefix goes first,
    and other certificates' entries stay."""
    g = gate()
    g.verified("203.0.113.1", OTHER, 0.0)
    for i in range(10):
        g.verified(f"10.0.{i}.1", CERT, float(i))
    assert [g.tier(f"10.0.{i}.1", 10.0) for i in range(10)] == \
        [Tier.STRANGER] * 7 + [Tier.KNOWN] * 3
    assert g.tier("203.0.113.1", 10.0) is Tier.KNOWN
    assert g.known_count == 4


def test_a_prefix_verified_by_another_certificate_moves_to_it() -> None:
    g = gate(GateLimits(**{**LIM.__dict__, "per_cert": 1}))
    g.verified("192.0.2.1", CERT, 0.0)
    g.verified("192.0.2.1", OTHER, 1.0)
    g.verified("198.51.100.1", CERT, 2.0)      # CERT's one entry: this one
    assert g.tier("192.0.2.1", 3.0) is Tier.KNOWN
    assert g.tier("198.51.100.1", 3.0) is Tier.KNOWN


def test_the_known_table_is_bounded_least_recently_verified_first() -> None:
    g = gate(GateLimits(**{**LIM.__dict__, "per_cert": 100}))
    for i in range(20):
        g.verified(f"10.{i}.0.1", f"{i:064x}", float(i))
    assert g.known_count == LIM.known_max
    assert g.tier("10.11.0.1", 20.0) is Tier.STRANGER
    assert g.tier("10.12.0.1", 20.0) is Tier.KNOWN


def test_failed_addresses_wait_behind_strangers() -> None:
    """Bots that failed a handshake go after new clients: a stranger arriving at a full queue
    takes the newest failed waiter's place; failed waiters get only the tokens left."""
    g = gate()
    for i in range(6):
        g.failed(f"198.51.100.{i}", 0.0)
    arrivals = [g.arrive(f"198.51.100.{i}", f"bot{i}", 1.0) for i in range(6)]
    assert all(a.tier is Tier.FAILED for a in arrivals)
    assert [a.verdict for a in arrivals] == [Verdict.START] * 2 + [Verdict.WAIT] * 4
    new = g.arrive("203.0.113.5", "new", 1.0)
    assert (new.verdict, new.tier, new.displaced) == (Verdict.WAIT, Tier.STRANGER, None)
    new2 = g.arrive("203.0.113.6", "new2", 1.0)        # the queue (5) is full now
    assert (new2.verdict, new2.displaced) == (Verdict.WAIT, "bot5")
    assert g.arrive("198.51.100.9", "bot9", 1.0).verdict is Verdict.WAIT   # a new stranger
    g.failed("198.51.100.9", 1.0)
    assert g.due(1.125).started == ["new"]
    assert g.due(1.25).started == ["new2"]
    assert g.due(1.375).started == ["bot9"]    # the stranger queued before it failed
    assert g.due(1.5).started == ["bot2"]


def test_a_failed_address_is_not_a_failed_prefix() -> None:
    g = gate()
    g.failed("192.0.2.10", 0.0)
    assert g.tier("192.0.2.10", 1.0) is Tier.FAILED
    assert g.tier("192.0.2.11", 1.0) is Tier.STRANGER
    assert g.tier("192.0.2.10", 60.0) is Tier.STRANGER          # failed_ttl


def test_a_failed_arrival_at_a_full_queue_is_refused() -> None:
    g = gate()
    for i in range(7):
        g.arrive(f"203.0.113.{i}", f"s{i}", 0.0)
    g.failed("198.51.100.1", 0.0)
    a = g.arrive("198.51.100.1", "bot", 0.0)
    assert (a.verdict, a.tier, a.displaced) == (Verdict.REFUSE, Tier.FAILED, None)


def test_a_waiter_that_leaves_is_out_of_the_queue() -> None:
    g = gate()
    for i in range(5):
        g.arrive(f"203.0.113.{i}", f"s{i}", 0.0)
    assert g.leave("s3") and not g.leave("s3") and not g.leave("nobody")
    assert g.due(0.25).started == ["s2", "s4"]


def test_expired_waiters_seen_by_an_arrival_are_named_by_the_next_due() -> None:
    g = gate()
    for i in range(7):
        g.arrive(f"203.0.113.{i}", f"s{i}", 0.0)
    a = g.arrive("203.0.113.99", "late", 0.75)      # the five waiters' time is over
    assert a.verdict is Verdict.START                # ... and a token is there
    assert g.next_event(0.75) == 0.75
    assert g.due(0.75).expired == ["s2", "s3", "s4", "s5", "s6"]


def test_no_gate_when_the_stranger_rate_is_zero() -> None:
    g = gate(GateLimits(stranger_rate=0.0))
    g.failed("198.51.100.1", 0.0)
    arrivals = [g.arrive("198.51.100.1", f"c{i}", 0.0) for i in range(1000)]
    assert {a.verdict for a in arrivals} == {Verdict.START}
    assert arrivals[0].tier is Tier.FAILED and g.next_event(0.0) is None


def test_a_failed_ttl_of_zero_remembers_nothing() -> None:
    g = gate(GateLimits(**{**LIM.__dict__, "failed_ttl": 0.0}))
    g.failed("198.51.100.1", 0.0)
    assert g.tier("198.51.100.1", 0.0) is Tier.STRANGER


def test_refused_at_once_agrees_with_arrive_and_takes_nothing() -> None:
    g = gate()
    g.verified("192.0.2.10", CERT, 0.0)
    for i in range(6):
        g.failed(f"198.51.100.{i}", 0.0)
    seen = []
    for i in range(6):          # 2 start, 4 wait: one place left
        ip = f"198.51.100.{i}"
        assert g.refused_at_once(ip, 0.0) is None
        seen.append(g.arrive(ip, f"bot{i}", 0.0).verdict)
    assert seen == [Verdict.START] * 2 + [Verdict.WAIT] * 4
    assert g.refused_at_once("198.51.100.9", 0.0) is None          # a stranger: one place
    g.arrive("203.0.113.1", "s1", 0.0)                              # queue full now
    assert g.refused_at_once("198.51.100.1", 0.0) is Tier.FAILED
    assert g.arrive("198.51.100.1", "bot-again", 0.0).verdict is Verdict.REFUSE
    assert g.refused_at_once("203.0.113.2", 0.0) is None            # pushes out a failed one
    assert g.refused_at_once("192.0.2.77", 0.0) is None             # known
    assert g.waiting == 5
    assert g.due(0.125).started == ["s1"]                           # no token was taken


# --- steering: the verified addresses the kernel sends to the fast acceptors ---------------

def test_steered_lists_verified_addresses_not_their_neighbours() -> None:
    g = gate()
    g.verified("192.0.2.7", CERT, 1.0)
    g.verified("2001:db8::7", CERT, 2.0)
    assert g.steered(3.0) == [("192.0.2.7", 101.0), ("2001:db8::7", 102.0)]   # known_ttl 100
    assert g.tier("192.0.2.8", 3.0) is Tier.KNOWN          # known by prefix, not steered


def test_steered_is_bounded_per_prefix_and_in_all_least_recent_first() -> None:
    g = HandshakeGate(GateLimits(known_ttl=100.0, steer_max=6), now=0.0)
    for i in range(6):                          # one /24: the last 4 only
        g.verified(f"192.0.2.{i}", CERT, float(i))
    assert [ip for ip, _ in g.steered(10.0)] == [f"192.0.2.{i}" for i in range(2, 6)]
    for i in range(3):                          # another /24 and certificate: 6 in all
        g.verified(f"198.51.100.{i}", OTHER, 10.0 + i)
    assert [ip for ip, _ in g.steered(20.0)] == ["192.0.2.3", "192.0.2.4", "192.0.2.5",
                               "198.51.100.0", "198.51.100.1", "198.51.100.2"]


@pytest.mark.parametrize("why", ["expiry", "per_cert", "known_max"])
def test_a_forgotten_prefix_is_no_longer_steered(why: str) -> None:
    g = gate()                                  # known_ttl 100, per_cert 3, known_max 8
    g.verified("192.0.2.7", CERT, 0.0)
    if why == "expiry":
        now = 100.0
    elif why == "per_cert":                     # 3 more prefixes for the same certificate
        for i in range(3):
            g.verified(f"198.51.{i}.1", CERT, 1.0 + i)
        now = 5.0
    else:                                       # 8 more prefixes, another certificate each
        for i in range(8):
            g.verified(f"198.51.{i}.1", f"{i:064x}", 1.0 + i)
        now = 10.0
    assert "192.0.2.7" not in dict(g.steered(now))


def test_a_vouched_arrival_is_known_within_its_prefix_rate() -> None:
    """A process the kernel steers verified addresses to: known without its own entry, at the
    prefix's known_rate (5, burst 5); beyond it a stranger (burst 2), then refused."""
    g = gate()
    verdicts = [(a.verdict, a.tier) for a in
                (g.arrive(f"192.0.2.{i}", f"c{i}", 0.0, vouched=True) for i in range(8))]
    assert verdicts[:5] == [(Verdict.START, Tier.KNOWN)] * 5
    assert verdicts[5:7] == [(Verdict.START, Tier.STRANGER)] * 2
    assert g.refused_at_once("192.0.2.99", 0.0, vouched=True) is None
