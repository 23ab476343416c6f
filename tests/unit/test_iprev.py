"""FCrDNS (ingress.policy.iprev) and learned providers (ingress.policy.learned_provider): the
pure judgements as tables; classify's rule for a provider's promotion; the A-R resinfo; the
learn fact's provider frame."""

from __future__ import annotations

import pytest

from ingress.core import wire
from ingress.core.dns_client import Answer, Status
from ingress.core.wire import Lane, WireError
from ingress.policy.checks import Outcome, combine
from ingress.policy.classify import ClassifyPolicy, Evidence, decide, rests_on_learned
from ingress.policy.iprev import (
    Iprev,
    forward_type,
    generic_name,
    iprev,
    judge,
    provider_of,
    ptr_names,
)
from ingress.policy.learned_provider import ProviderLearned
from workers.lane.headers import authentication_results

IP = "192.0.2.1"


def ok(*records: str) -> Answer:
    return Answer(Status.OK, records, 60)


NX, NODATA = Answer(Status.NXDOMAIN), Answer(Status.NODATA)
TIMEOUT, SERVFAIL, BUSY = Answer(Status.TIMEOUT), Answer(Status.ERROR), Answer(Status.BUSY)


@pytest.mark.parametrize(("ptr", "forwards", "expect"), [
    # pass: a name whose A records hold the address; the provider is its org domain
    (ok("mail.example.com."), {"mail.example.com": ok(IP)},
     (Iprev.PASS, "mail.example.com", "example.com")),
    (ok("MAIL.Example.COM"), {"mail.example.com": ok("192.0.2.9", IP)},
     (Iprev.PASS, "mail.example.com", "example.com")),
    # one of several names confirms; a generic confirmed name gives way to a provider's
    (ok("x.other.test", "mail.example.com"),
     {"mail.example.com": ok(IP), "x.other.test": NX},
     (Iprev.PASS, "mail.example.com", "example.com")),
    (ok("192-0-2-1.dyn.isp.test", "mail.example.com"),
     {"192-0-2-1.dyn.isp.test": ok(IP), "mail.example.com": ok(IP)},
     (Iprev.PASS, "mail.example.com", "example.com")),
    # generic only: pass, but no provider (the per-IP key stays)
    (ok("192-0-2-1.dyn.isp.test"), {"192-0-2-1.dyn.isp.test": ok(IP)},
     (Iprev.PASS, "192-0-2-1.dyn.isp.test", "")),
    # fail: forward completed and does not hold the address (other address, NXDOMAIN, no data)
    (ok("mail.example.com"), {"mail.example.com": ok("192.0.2.2")}, (Iprev.FAIL, "", "")),
    (ok("mail.example.com"), {"mail.example.com": NX}, (Iprev.FAIL, "", "")),
    (ok("mail.example.com"), {"mail.example.com": NODATA}, (Iprev.FAIL, "", "")),
    # temperror: the PTR, or a forward that could have confirmed, failed temporarily
    (TIMEOUT, {}, (Iprev.TEMPERROR, "", "")),
    (SERVFAIL, {}, (Iprev.TEMPERROR, "", "")),
    (BUSY, {}, (Iprev.TEMPERROR, "", "")),
    (ok("mail.example.com"), {"mail.example.com": TIMEOUT}, (Iprev.TEMPERROR, "", "")),
    (ok("a.example.com", "b.example.com"), {"a.example.com": NX},   # b unanswered in time
     (Iprev.TEMPERROR, "", "")),
    # permerror: no PTR data, or no valid name in it
    (NX, {}, (Iprev.PERMERROR, "", "")),
    (NODATA, {}, (Iprev.PERMERROR, "", "")),
    (ok("bad name!", "-"), {}, (Iprev.PERMERROR, "", "")),
    (ok("localhost"), {}, (Iprev.PERMERROR, "", "")),
])
def test_iprev_result(ptr: Answer, forwards: dict[str, Answer],
                      expect: tuple[Iprev, str, str]) -> None:
    out = iprev(IP, ptr, forwards)
    assert (out.result, out.name, out.provider) == expect


def test_iprev_ipv6_and_bad_address() -> None:
    v6 = "2001:db8::25"
    assert forward_type(v6) == "AAAA" and forward_type(IP) == "A"
    assert forward_type("::ffff:192.0.2.1") == "A"
    out = iprev(v6, ok("mx.example.org"), {"mx.example.org": ok("2001:DB8:0::25")})
    assert (out.result, out.provider) == (Iprev.PASS, "example.org")
    assert iprev("not-an-ip", ok("mx.example.org"), {}).result is Iprev.PERMERROR


def test_ptr_names_are_bounded_sorted_and_unique() -> None:
    names = [f"h{i:02d}.example.com." for i in range(40, 0, -1)]
    assert ptr_names(ok(*names, "H01.EXAMPLE.COM"), 3) == (
        "h01.example.com", "h02.example.com", "h03.example.com")
    # only the first names are confirmed: a 4th that would confirm is not looked at
    forwards = {n: NX for n in ptr_names(ok(*names), 3)} | {"h04.example.com": ok(IP)}
    assert iprev(IP, ok(*names), forwards, 3).result is Iprev.FAIL


@pytest.mark.parametrize(("name", "ip", "generic"), [
    ("192-0-2-1.dyn.example.net", IP, True),
    ("host-192.0.2.1.isp.example", IP, True),
    ("1.2.0.192.static.example.net", IP, True),           # reversed, dotted
    ("ip192_000_002_001.example.net", IP, True),           # zero-padded, underscores
    ("ip192000002001.example.net", IP, True),              # 12 digits, one token
    ("c0000201.example.net", IP, True),                    # hex
    ("C0000201.Example.NET", IP, True),
    ("3221225985.example.net", IP, True),                  # 32-bit decimal
    ("ec2-192-0-2-1.compute-1.amazonaws.com", IP, True),
    ("static.1.2.0.192.clients.your-server.de", IP, True),
    ("pool-0-2-1.example.net", IP, True),                  # the last three octets
    ("dyn-2-1.example.net", IP, True),                     # the last two and a generic word
    ("mail-2-1.example.net", IP, False),                   # the last two, no generic word
    ("mail.example.com", IP, False),
    ("mx1.example.com", IP, False),
    ("192-0-2-2.dyn.example.net", IP, False),              # another address's generic name
    ("o1.ptr2145.example.com", IP, False),
    ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.example",
     "2001:db8::1", True),                                 # nibbles, reversed
    ("20010db8000000000000000000000001.example", "2001:db8::1", True),
    ("2001-db8--1.example", "2001:db8::1", True),          # compressed, '-' for ':'
    ("host-2001-db8-0-0-0-0-0-1.example", "2001:db8::1", True),
    ("cust-a1b2-c3d4-e5f6-0708.example", "2001:db8:1:2:a1b2:c3d4:e5f6:708", True),
    ("mail.example.com", "2001:db8::1", False),
    ("mail.example.com", "not-an-ip", True),               # unparsable: no provider
])
def test_generic_names(name: str, ip: str, generic: bool) -> None:
    assert generic_name(name, ip) is generic


@pytest.mark.parametrize(("name", "ip", "provider"), [
    ("mail.example.com", IP, "example.com"),
    ("o1.mail.example.co.uk", IP, "example.co.uk"),
    ("mail.EXAMPLE.com.", IP, "example.com"),
    ("192-0-2-1.dyn.example.net", IP, ""),                 # generic: per-IP key
    ("co.uk", IP, ""),                                     # a public suffix
    ("github.io", IP, ""),
    ("localhost", IP, ""),                                 # single label
    ("1.2.0.192.in-addr.arpa", IP, ""),                    # the reverse zones
    ("mail.in-addr.arpa", IP, ""),
    ("x.ip6.arpa", IP, ""),
    ("", IP, ""),
])
def test_provider_of(name: str, ip: str, provider: str) -> None:
    assert provider_of(name, ip) == provider


def test_judgement_promotes_only_a_learned_provider() -> None:
    passed = iprev(IP, ok("mail.example.com"), {"mail.example.com": ok(IP)})
    j = judge(passed)
    assert j.outcome is Outcome.NEUTRAL and j.reason == "iprev:pass"
    assert dict(j.facts) == {"iprev": "pass", "iprev_name": "mail.example.com",
                             "provider": "example.com"}
    j = judge(passed, "shop.test")
    assert (j.outcome, j.identity, j.reason) == (Outcome.PROMOTE, "learned:shop.test",
                                                 "provider:example.com")
    # a name that does not confirm forward gives no provider: no promotion, however learned
    failed = iprev(IP, ok("mail.example.com"), {"mail.example.com": ok("192.0.2.99")})
    j = judge(failed, "shop.test")
    assert j.outcome is Outcome.NEUTRAL and dict(j.facts) == {"iprev": "fail"}


def test_provider_promotion_is_held_to_its_domain() -> None:
    """One rule with a learned entry: at connect provisionally fast; a MAIL FROM of the
    learned domain stays fast (learned:<D>, self-proven); of another domain it is judged
    afresh (bulk without other evidence)."""
    passed = iprev(IP, ok("mail.example.com"), {"mail.example.com": ok(IP)})
    ev = Evidence().with_verdict(combine([judge(passed, "shop.test")]))
    policy = ClassifyPolicy()
    d = decide(ev, policy)
    assert (d.lane, d.identity) == (Lane.FAST, "learned:shop.test")
    d = decide(ev.__class__(**{**_fields(ev), "mail_domain": "news.shop.test"}), policy)
    assert (d.lane, d.identity) == (Lane.FAST, "learned:shop.test")
    d = decide(ev.__class__(**{**_fields(ev), "mail_domain": "other.test"}), policy)
    assert d.lane is Lane.BULK
    assert "learned-mismatch:shop.test" in d.reasons and "provider:example.com" in d.reasons
    # learned entries off (classify.learned_ttl = 0): a learned provider promotes nothing
    assert decide(ev, ClassifyPolicy(learned_promotes=False)).lane is Lane.BULK
    # the acceptor judges a fast session's MAIL FROM again when it rests on one
    assert rests_on_learned(ev) and rests_on_learned(Evidence(learned_allow=True))
    assert not rests_on_learned(Evidence().with_verdict(combine([judge(passed)])))


def _fields(ev: Evidence) -> dict[str, object]:
    return {f: getattr(ev, f) for f in ev.__slots__}


def test_provider_learned_quotas() -> None:
    store = ProviderLearned.of(ttl=100.0, max_size=4, per_domain=2)
    store.learn("Mail.Example.COM", 0.0, "shop.test")       # keyed by the org domain
    assert store.contains("example.com", 1.0) and store.domain("x.example.com") == "shop.test"
    store.learn("b.test", 1.0, "shop.test")
    store.learn("c.test", 2.0, "shop.test")                 # over per_domain: the oldest goes
    assert not store.contains("example.com", 3.0) and store.per_domain_count("shop.test") == 2
    for i, p in enumerate(("d.test", "e.test", "f.test")):
        store.learn(p, 3.0 + i, f"dom{i}.test")
    assert len(store) <= 4
    assert not store.contains("c.test", 200.0)             # the same TTL as network entries
    with pytest.raises(ValueError):
        store.learn("co.uk", 0.0, "shop.test")              # a public suffix is nobody's
    assert store.unlearn("f.test") and not store.contains("f.test", 6.0)


def test_ar_iprev_resinfo() -> None:
    ar = authentication_results("mx.test", iprev="pass", iprev_ip=IP,
                                iprev_name="mail.example.com", dkim_checked=False)
    assert ar == b"Authentication-Results: mx.test;\r\n\tiprev=pass policy.iprev=192.0.2.1 " \
                 b"(mail.example.com)\r\n"
    ar = authentication_results("mx.test", iprev="permerror", iprev_ip="2001:db8::1",
                                dkim_checked=False)
    assert b'iprev=permerror policy.iprev="2001:db8::1"' in ar
    assert b"iprev" not in authentication_results("mx.test", spf="pass")


def test_learn_fact_names_the_provider() -> None:
    frames = wire.shared_publication(wire.share(wire.LEARN_TOPIC, IP, "shop.test",
                                                "example.com"))
    assert frames == [b"learn", b"SI2", IP.encode(), b"shop.test", b"example.com"]
    assert wire.decode_shared(frames) == (b"learn", IP, "shop.test")
    assert wire.shared_provider(frames) == "example.com"
    unlearn = wire.shared_publication(wire.share(wire.UNLEARN_TOPIC, IP, "", "example.com"))
    assert wire.decode_shared(unlearn) == (b"unlearn", IP, "")
    assert wire.shared_provider(unlearn) == "example.com"
    assert wire.shared_provider(wire.shared_publication(wire.share(wire.LEARN_TOPIC, IP))) == ""
    with pytest.raises(WireError):
        wire.shared_provider([b"learn", b"SI2", IP.encode(), b"d.test", b"bad name\r\n"])


def test_the_facts_go_on_the_wire() -> None:
    """WireEvidence.with_facts: the checks' facts fill the fields the acceptor left empty, by
    the one codec; a fact naming no field, or of the wrong type, is left out."""
    base = wire.WireEvidence(identity="org:shop.test")
    ev = base.with_facts((("iprev", "pass"), ("iprev_name", "mail.example.com"),
                          ("provider", "example.com"), ("identity", "learned:x.test"),
                          ("nonsense", "1"), ("dnsbl_score", "not a number"),
                          ("iprev", "fail")))
    assert (ev.iprev, ev.iprev_name, ev.provider) == ("pass", "mail.example.com",
                                                      "example.com")
    assert ev.identity == "org:shop.test" and ev.dnsbl_score == 0.0
    assert base.with_facts(()) is base
