"""Table-driven tests of the classification policy (ingress.policy.classify): every combination."""

from __future__ import annotations

import itertools

import pytest

from ingress.core.addr import normalize_ip
from ingress.core.wire import Lane
from ingress.policy.classify import (
    AuthResult,
    CertResult,
    ClassifyPolicy,
    Decision,
    Evidence,
    SpfPromote,
    StaticAllow,
    decide,
    domain_matches,
    promote,
    should_learn,
)

BOOLS = (False, True)
SPF_DOMAINS = (None, "example.com", "mail.example.com", "other.org")
POLICIES = [
    ClassifyPolicy(spf_promote=mode, spf_domains=doms, cert_promotes=cp, learned_promotes=lp)
    for mode, doms in (
        (SpfPromote.ANY, frozenset()),
        (SpfPromote.LISTED, frozenset({"Example.COM."})),
        (SpfPromote.OFF, frozenset()),
    )
    for cp, lp in itertools.product(BOOLS, BOOLS)
]
ALL_EVIDENCE = [
    Evidence(static_allow=s, learned_allow=la, cert=c, spf=r, spf_domain=d)
    for s, la, c, r, d in itertools.product(BOOLS, BOOLS, CertResult, AuthResult, SPF_DOMAINS)
]


def oracle(ev: Evidence, pol: ClassifyPolicy) -> Lane:
    """The specification, written independently of decide()."""
    if ev.static_allow:
        return Lane.FAST
    if ev.learned_allow and pol.learned_promotes:
        return Lane.FAST
    if ev.cert in (CertResult.VERIFIED, CertResult.PINNED) and pol.cert_promotes:
        return Lane.FAST
    if ev.spf == AuthResult.PASS and ev.spf_domain:
        if pol.spf_promote == SpfPromote.ANY:
            return Lane.FAST
        if pol.spf_promote == SpfPromote.LISTED and ev.spf_domain in (
            "example.com",
            "mail.example.com",
        ):
            return Lane.FAST
    return Lane.BULK


@pytest.mark.parametrize("pol", POLICIES, ids=repr)
def test_every_evidence_combination_matches_the_oracle(pol: ClassifyPolicy) -> None:
    assert len(ALL_EVIDENCE) == 2 * 2 * len(CertResult) * len(AuthResult) * len(SPF_DOMAINS)
    for ev in ALL_EVIDENCE:
        d = decide(ev, pol)
        assert isinstance(d, Decision)
        assert d.lane == oracle(ev, pol), (ev, pol, d)
        assert d.reasons, "a decision always says why"
        if d.lane == Lane.FAST:
            assert all(not r.startswith("spf-") or r.startswith("spf-pass") for r in d.reasons)


@pytest.mark.parametrize("pol", POLICIES, ids=repr)
@pytest.mark.parametrize(
    "result",
    [r for r in AuthResult if r != AuthResult.PASS],
)
def test_non_pass_spf_decides_like_none(pol: ClassifyPolicy, result: AuthResult) -> None:
    """temperror (and every non-pass) never promotes and never changes the outcome."""
    for ev in ALL_EVIDENCE:
        base = Evidence(ev.static_allow, ev.learned_allow, ev.cert, AuthResult.NONE, ev.spf_domain)
        other = base.with_spf(result, ev.spf_domain)
        assert decide(other, pol).lane == decide(base, pol).lane


@pytest.mark.parametrize("pol", POLICIES, ids=repr)
def test_evidence_is_monotone(pol: ClassifyPolicy) -> None:
    """Adding promoting evidence never moves a decision from fast to bulk."""
    for ev in ALL_EVIDENCE:
        lane = decide(ev, pol).lane
        stronger = [
            Evidence(True, ev.learned_allow, ev.cert, ev.spf, ev.spf_domain),
            Evidence(ev.static_allow, True, ev.cert, ev.spf, ev.spf_domain),
            ev.with_cert(CertResult.VERIFIED),
            ev.with_cert(CertResult.PINNED),
        ]
        if lane == Lane.FAST:
            for s in stronger:
                assert decide(s, pol).lane == Lane.FAST


@pytest.mark.parametrize(
    "ev, pol, lane, reasons",
    [
        (Evidence(), ClassifyPolicy(), Lane.BULK, ("no-evidence",)),
        (Evidence(static_allow=True), ClassifyPolicy(), Lane.FAST, ("static-allow",)),
        (
            Evidence(learned_allow=True),
            ClassifyPolicy(learned_promotes=False),
            Lane.BULK,
            ("learned-allow",),
        ),
        (Evidence(cert=CertResult.PINNED), ClassifyPolicy(), Lane.FAST, ("cert-pinned",)),
        (Evidence(cert=CertResult.UNTRUSTED), ClassifyPolicy(), Lane.BULK, ("cert-untrusted",)),
        (
            Evidence(spf=AuthResult.PASS, spf_domain="Example.com."),
            ClassifyPolicy(),
            Lane.FAST,
            ("spf-pass:example.com",),
        ),
        (
            Evidence(spf=AuthResult.PASS, spf_domain="notexample.com"),
            ClassifyPolicy(spf_promote="listed", spf_domains=frozenset({"example.com"})),
            Lane.BULK,
            ("spf-pass:notexample.com",),
        ),
        (
            Evidence(spf=AuthResult.TEMPERROR, spf_domain="example.com"),
            ClassifyPolicy(),
            Lane.BULK,
            ("spf-temperror:example.com",),
        ),
        (Evidence(spf=AuthResult.PASS), ClassifyPolicy(), Lane.BULK, ("spf-pass",)),
        (
            Evidence(True, True, CertResult.VERIFIED, AuthResult.PASS, "a.example"),
            ClassifyPolicy(),
            Lane.FAST,
            ("static-allow", "learned-allow", "cert-verified", "spf-pass:a.example"),
        ),
    ],
)
def test_reasons(ev: Evidence, pol: ClassifyPolicy, lane: Lane, reasons: tuple[str, ...]) -> None:
    d = decide(ev, pol)
    assert Decision(d.lane, d.reasons) == Decision(lane, reasons)
    assert bool(d.identity) is (lane is Lane.FAST)   # identity: tests/unit/test_identity.py


def test_promote_never_demotes() -> None:
    for cur, new in itertools.product(Lane, Lane):
        got = promote(cur, Decision(new, ("x",)))
        assert got == (Lane.FAST if Lane.FAST in (cur, new) else Lane.BULK)


def test_staged_session_only_promotes() -> None:
    """connect -> TLS -> MAIL FROM: the lane of a live session is the max over stages."""
    pol = ClassifyPolicy()
    for ev in ALL_EVIDENCE:
        stages = [
            Evidence(ev.static_allow, ev.learned_allow),
            Evidence(ev.static_allow, ev.learned_allow, ev.cert),
            ev,
        ]
        lane = Lane.BULK
        for st in stages:
            new = promote(lane, decide(st, pol))
            assert not (lane == Lane.FAST and new == Lane.BULK)
            lane = new
        assert lane == decide(ev, pol).lane


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spf_promote": "sometimes"},
        {"spf_promote": "listed"},
        {"spf_promote": "listed", "spf_domains": frozenset({"  "})},
        {"spf_promote": "listed", "spf_domains": frozenset({"example..com"})},
        {"spf_promote": "any", "spf_domains": frozenset({"[192.0.2.1]"})},
    ],
)
def test_bad_policy(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ClassifyPolicy(**kwargs)


def test_policy_normalises() -> None:
    p = ClassifyPolicy(spf_promote="listed", spf_domains=frozenset({"Example.COM."}))
    assert p.spf_promote is SpfPromote.LISTED
    assert p.spf_domains == frozenset({"example.com"})
    p = ClassifyPolicy(spf_promote="listed", spf_domains=frozenset({"B\u00fccher.test"}))
    assert p.spf_domains == frozenset({"xn--bcher-kva.test"})


def test_look_alike_spellings_decide_as_the_name() -> None:
    """The SPF reason names the canonical domain, and "listed" matches every spelling."""
    for spelled in ("\uff53pam.test", "spam\u3002test", "SPAM.test."):
        d = decide(Evidence(spf=AuthResult.PASS, spf_domain=spelled), ClassifyPolicy(
            spf_promote="listed", spf_domains=frozenset({"spam.test"})))
        assert (d.lane, d.reasons, d.identity) == \
            (Lane.FAST, ("spf-pass:spam.test",), "org:spam.test")
    assert not should_learn(AuthResult.PASS, True, "a..b", ClassifyPolicy())
    assert should_learn(AuthResult.PASS, True, "\uff53pam.test", ClassifyPolicy(
        spf_promote="listed", spf_domains=frozenset({"spam.test"})))


@pytest.mark.parametrize(
    "domain, listed, ok",
    [
        ("example.com", ["example.com"], True),
        ("EXAMPLE.com.", ["example.com"], True),
        ("mail.example.com", ["example.com"], True),
        ("badexample.com", ["example.com"], False),
        ("example.com", ["mail.example.com"], False),
        ("", ["example.com"], False),
        ("example.com", [], False),
        # canonical names: every spelling of the name, IDNs in either form
        ("\uff45xample.com", ["example.com"], True),
        ("mail.example\u3002com", ["example.com"], True),
        ("b\u00fccher.test", ["xn--bcher-kva.test"], True),
        ("mail.xn--bcher-kva.test", ["B\u00dcCHER.test"], True),
        ("bucher.test", ["b\u00fccher.test"], False),
        ("a..example.com", ["example.com"], False),     # not a domain name: matches nothing
        ("example.com", ["a..example.com"], False),
    ],
)
def test_domain_matches(domain: str, listed: list[str], ok: bool) -> None:
    assert domain_matches(domain, listed) is ok


@pytest.mark.parametrize(
    "spf, dkim, learn",
    [(r, d, r == AuthResult.PASS and d) for r, d in itertools.product(AuthResult, BOOLS)],
)
def test_should_learn(spf: AuthResult, dkim: bool, learn: bool) -> None:
    assert should_learn(spf, dkim, "example.com", ClassifyPolicy()) is learn


_LISTED = ClassifyPolicy(spf_promote="listed", spf_domains=frozenset({"example.com"}))


@pytest.mark.parametrize(
    "policy, domain, learn",
    [
        # learning obeys the promotion policy (issue 8): "listed" learns listed domains only
        (_LISTED, "example.com", True),
        (_LISTED, "mail.example.com", True),
        (_LISTED, "spammer.test", False),
        (_LISTED, "badexample.com", False),
        (_LISTED, None, False),
        (ClassifyPolicy(spf_promote="off"), "example.com", False),
        (ClassifyPolicy(spf_promote="any"), "spammer.test", True),
        (ClassifyPolicy(spf_promote="any"), None, False),
    ],
)
def test_should_learn_obeys_policy(policy: ClassifyPolicy, domain: str | None,
                                   learn: bool) -> None:
    assert should_learn(AuthResult.PASS, True, domain, policy) is learn


# --------------------------------------------------------------------------- static allow


@pytest.mark.parametrize(
    "ip, ok",
    [
        ("192.0.2.1", True),
        ("192.0.2.255", True),
        ("192.0.3.1", False),
        ("198.51.100.7", True),
        ("198.51.100.8", False),
        ("::ffff:192.0.2.9", True),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("fe80::1%eth0", False),
        ("not-an-ip", False),
    ],
)
def test_static_allow(ip: str, ok: bool) -> None:
    sa = StaticAllow.from_cidrs(["192.0.2.0/24", "198.51.100.7", "2001:db8::/32"])
    assert sa.contains(ip) is ok


def test_static_allow_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="bogus"):
        StaticAllow.from_cidrs(["192.0.2.0/24", "bogus"])


def test_normalize_ip() -> None:
    assert normalize_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert normalize_ip("2001:DB8::0:1") == "2001:db8::1"
    with pytest.raises(ValueError):
        normalize_ip("x")
