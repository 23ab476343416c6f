"""ingress.policy.identity and the identity of classify.decide (issue 8: nobody captures the
reserve): identities, org domains by the Public Suffix List, shares, learned domains."""

from __future__ import annotations

import json

import pytest

from ingress.core.wire import AuthResult, Lane
from ingress.policy.classify import (
    CertResult,
    ClassifyPolicy,
    Evidence,
    StaticAllow,
    decide,
)
from ingress.policy.identity import (
    fast_slots,
    identity_kind,
    org_domain,
    over_rate_reason,
    over_share,
    over_share_reason,
    rate_bounded,
    served_over_share,
    share_bound,
    share_key,
)
from ingress.policy.learned import LearnedAllow


@pytest.mark.parametrize("domain, org", [
    ("example.com", "example.com"),
    ("Mail.Example.COM.", "example.com"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),              # a public suffix is its own (and nobody's) org domain
    ("x.y.spammer.test", "spammer.test"),
    ("user.github.io", "user.github.io"),   # PSL private section
    ("localhost", "localhost"),
    ("", ""),
    # every spelling of a name is one organisational domain: the canonical A-label name
    ("\uff53pam.test", "spam.test"),
    ("x.spam\u3002test", "spam.test"),
    ("SPAM\uff0eTEST.", "spam.test"),
    ("mail.b\u00fccher.test", "xn--bcher-kva.test"),
    ("mail.xn--bcher-kva.test", "xn--bcher-kva.test"),
    ("b\u00fccher.\u0440\u0444", "xn--bcher-kva.xn--p1ai"),   # an IDN public suffix (.rf)
    ("a.xn--85x722f.xn--55qx5d.cn", "xn--85x722f.xn--55qx5d.cn"),   # under 公司.cn
    # not a domain name: "" (never its own identity)
    ("a..spam.test", ""),
    ("[192.0.2.1]", ""),
    ("-spam.test", ""),
])
def test_org_domain(domain: str, org: str) -> None:
    assert org_domain(domain) == org


ANY = ClassifyPolicy(spf_promote="any")
FP = "ab" * 32


@pytest.mark.parametrize("ev, pol, identity", [
    (Evidence(static_allow=True, allow_entry="192.0.2.0/24"), ANY, "allow:192.0.2.0/24"),
    # the allow entry wins over weaker evidence
    (Evidence(static_allow=True, allow_entry="192.0.2.0/24", spf=AuthResult.PASS,
              spf_domain="example.com"), ANY, "allow:192.0.2.0/24"),
    (Evidence(cert=CertResult.PINNED, cert_fp=FP), ANY, f"cert:{FP}"),
    (Evidence(cert=CertResult.VERIFIED, cert_fp=FP, learned_allow=True,
              learned_domain="example.com"), ANY, f"cert:{FP}"),
    (Evidence(learned_allow=True, learned_domain="mail.example.com"), ANY,
     "learned:example.com"),
    (Evidence(spf=AuthResult.PASS, spf_domain="bounce.mail.example.co.uk"), ANY,
     "org:example.co.uk"),
    # certificate not promoting: SPF names the identity
    (Evidence(cert=CertResult.VERIFIED, cert_fp=FP, spf=AuthResult.PASS,
              spf_domain="example.com"), ClassifyPolicy(spf_promote="any", cert_promotes=False),
     "org:example.com"),
    # bulk: no identity
    (Evidence(spf=AuthResult.PASS, spf_domain="spammer.test"),
     ClassifyPolicy(spf_promote="listed", spf_domains=frozenset({"example.com"})), ""),
    (Evidence(cert=CertResult.UNTRUSTED, cert_fp=FP), ANY, ""),
    # look-alike spellings are the one identity of the name they spell
    (Evidence(spf=AuthResult.PASS, spf_domain="\uff53pam.test"), ANY, "org:spam.test"),
    (Evidence(spf=AuthResult.PASS, spf_domain="spam\u3002test"), ANY, "org:spam.test"),
    (Evidence(spf=AuthResult.PASS, spf_domain="b\u00fccher.test"), ANY,
     "org:xn--bcher-kva.test"),
    (Evidence(learned_allow=True, learned_domain="mail.\uff53pam.test"), ANY,
     "learned:spam.test"),
    # an SPF pass for something that is not a domain name promotes nothing
    (Evidence(spf=AuthResult.PASS, spf_domain="a..spam.test"), ANY, ""),
    (Evidence(spf=AuthResult.PASS, spf_domain="[127.0.0.1]"), ANY, ""),
])
def test_decision_identity(ev: Evidence, pol: ClassifyPolicy, identity: str) -> None:
    d = decide(ev, pol)
    assert d.identity == identity
    assert (d.lane is Lane.FAST) is bool(identity)


@pytest.mark.parametrize("identity, key, kind, bounded", [
    ("learned:example.com", "org:example.com", "learned", True),   # one budget with its SPF
    ("org:example.com", "org:example.com", "org", True),
    ("allow:192.0.2.0/24", "allow:192.0.2.0/24", "allow", False),  # the operator's trust
    (f"cert:{FP}", f"cert:{FP}", "cert", False),
    ("weird", "weird", "other", False),
])
def test_share_key_and_kind(identity: str, key: str, kind: str, bounded: bool) -> None:
    assert share_key(identity) == key
    assert identity_kind(identity) == kind
    assert over_share_reason(identity) == f"over-share:{key}"
    assert over_rate_reason(identity) == f"over-rate:{key}"
    assert rate_bounded(share_key(identity)) is bounded


@pytest.mark.parametrize("reasons, served", [
    (("spf-pass", "over-share:org:example.com"), True),
    (("spf-pass", "over-rate:org:example.com"), True),
    (("spf-pass",), False),
    ((), False),
    (("share:org:x",), False),
])
def test_served_over_share(reasons: tuple[str, ...], served: bool) -> None:
    assert served_over_share(reasons) is served


@pytest.mark.parametrize("held, total, share, over", [
    (0, 100, 0.25, False),
    (24, 100, 0.25, False),
    (25, 100, 0.25, True),      # the 26th of 100 at 25 %
    (0, 2, 0.25, False),        # at least one: a share never locks an identity out
    (1, 2, 0.25, True),
    (99, 100, 1.0, False),
    (100, 100, 1.0, True),
])
def test_over_share(held: int, total: int, share: float, over: bool) -> None:
    assert over_share(held, total, share) is over
    assert share_bound(total, share) >= 1


def test_static_allow_match_names_the_entry() -> None:
    sa = StaticAllow.from_cidrs(["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"])
    assert sa.match("192.0.2.9") == "192.0.2.0/24"
    assert sa.match("::ffff:192.0.2.9") == "192.0.2.0/24"
    assert sa.match("198.51.100.7") == "198.51.100.7/32"
    assert sa.match("2001:db8::1") == "2001:db8::/32"
    assert sa.match("203.0.113.1") is None


def test_learned_entry_records_its_domain_and_persists() -> None:
    la = LearnedAllow(ttl=100, max_size=10)
    la.learn("192.0.2.1", now=0, domain="mail.example.com")
    la.learn("192.0.2.2", now=0)
    assert la.domain("192.0.2.1") == "example.com"
    assert la.domain("192.0.2.2") == ""
    doc = json.loads(la.to_json())
    assert doc["version"] == 3      # 3: keyed by network (issue 17)
    back = LearnedAllow.from_json(la.to_json(), ttl=100, max_size=10, now=1)
    assert back.domain("192.0.2.1") == "example.com"
    assert back.contains("192.0.2.2", 1)


def test_learned_loads_version_1() -> None:
    old = json.dumps({"format": "smtp-ingress/learned-allow", "version": 1, "ttl": 100,
                      "entries": {"192.0.2.1": 50.0}})
    la = LearnedAllow.from_json(old, ttl=100, max_size=10, now=0)
    assert la.contains("192.0.2.1", 10)
    assert la.domain("192.0.2.1") == ""


def test_learned_domains_stay_bounded() -> None:
    la = LearnedAllow(ttl=100, max_size=3)
    for i in range(50):
        la.learn(f"192.0.2.{i}", now=i, domain=f"d{i}.test")
    assert len(la) == 3
    assert len(la._domains) <= 6
    assert la.domain("192.0.2.49") == "d49.test"


@pytest.mark.parametrize("max_connections, fast_reserve, slots", [
    (1000, 100, 100),    # the reserve is what nobody may capture
    (1000, 0, 1000),     # no reserve: a share of every slot
])
def test_fast_slots(max_connections: int, fast_reserve: int, slots: int) -> None:
    assert fast_slots(max_connections, fast_reserve) == slots
