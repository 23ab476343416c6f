"""ingress.policy.dmarc (issue 18 item 5): every rule of RFC 7489 we implement, as tables."""

from __future__ import annotations

import pytest

from ingress.core.wire import AuthResult
from ingress.policy.classify import dkim_vouches
from ingress.policy.dmarc import (
    MAX_RECORD,
    Discovery,
    Disposition,
    DmarcRecord,
    Policy,
    author_domain,
    discover,
    evaluate,
    identifier_aligned,
    is_dmarc,
    parse_record,
)

R, S = "r", "s"
NONE, QUAR, REJ = Disposition.NONE, Disposition.QUARANTINE, Disposition.REJECT


@pytest.mark.parametrize("fields, domains, expected", [
    (0, [], ("", AuthResult.NONE)),                                  # no From: at all
    (2, ["a.test"], ("", AuthResult.PERMERROR)),                     # two From: fields
    (1, ["a.test", "b.test"], ("", AuthResult.PERMERROR)),           # two domains in one
    (1, ["a.test", "A.TEST."], ("a.test", None)),                    # one domain, two spellings
    (1, ["a.test", "not a domain"], ("", AuthResult.PERMERROR)),     # one of them invalid
    (1, [], ("", AuthResult.NONE)),                                  # no address
    (1, ["not a domain"], ("", AuthResult.NONE)),                    # no valid domain
    (1, ["B\u00fccher.test"], ("xn--bcher-kva.test", None)),          # canonical A-labels
    (1, ["\uff53\uff50\uff41\uff4d.test"], ("spam.test", None)),      # fullwidth spelling
])
def test_author_domain(fields: int, domains: list[str],
                       expected: tuple[str, AuthResult | None]) -> None:
    assert author_domain(fields, domains) == expected


@pytest.mark.parametrize("txt, record", [
    ("v=DMARC1; p=reject", DmarcRecord(REJ, REJ)),
    ("v=DMARC1;p=quarantine;sp=none", DmarcRecord(QUAR, NONE)),
    ("v = DMARC1 ; P = Reject ; SP = None", DmarcRecord(REJ, NONE)),   # blanks, case of tags
    ("v=DMARC1; p=none; adkim=s; aspf=s; pct=20", DmarcRecord(NONE, NONE, S, S, 20)),
    ("v=DMARC1; p=none; adkim=x; aspf=; pct=101", DmarcRecord(NONE, NONE)),   # defaults
    ("v=DMARC1; p=none; pct=\u00b2", DmarcRecord(NONE, NONE)),          # not an ASCII number
    ("v=DMARC1; p=reject; p=none", DmarcRecord(REJ, REJ)),             # the first tag counts
    ("v=DMARC1; p=reject; foo; x=y;;", DmarcRecord(REJ, REJ)),          # unknown and bare: ignored
    ("v=DMARC1; p=reject;", DmarcRecord(REJ, REJ)),
    # 6.6.3 step 6: no valid p (or a bad sp) is p=none with a valid rua, else ignored
    ("v=DMARC1; p=bogus; rua=mailto:d@a.test", DmarcRecord(NONE, NONE)),
    ("v=DMARC1; rua=mailto:d@a.test!10m", DmarcRecord(NONE, NONE)),
    ("v=DMARC1; p=reject; sp=bogus; rua=bad uri, mailto:d@a.test", DmarcRecord(NONE, NONE)),
    ("v=DMARC1; p=bogus", None),
    ("v=DMARC1; p=reject; sp=bogus", None),
    ("v=DMARC1; p=bogus; rua=not a uri", None),
    ("v=DMARC1", None),
    # not DMARC records at all
    ("v=dmarc1; p=reject", None),                                      # the value is exact
    ("p=reject; v=DMARC1", None),                                      # v= must come first
    ("v=DMARC10; p=reject", None),
    ("v=spf1 -all", None),
    ("", None),
    ("v=DMARC1; p=reject; x=" + "a" * MAX_RECORD, None),               # too long: ignored
])
def test_parse_record(txt: str, record: DmarcRecord | None) -> None:
    assert parse_record(txt) == record


def test_is_dmarc() -> None:
    assert is_dmarc("v=DMARC1") and is_dmarc("v=DMARC1;p=none") and is_dmarc("v =DMARC1 ;")
    assert not is_dmarc("v=DMARC1x") and not is_dmarc("xv=DMARC1")


def lookup_from(table: dict[str, tuple[str, ...] | None]):
    asked: list[str] = []

    def lookup(qname: str) -> tuple[str, ...] | None:
        asked.append(qname)
        return table.get(qname, ())
    return lookup, asked


REC = "v=DMARC1; p=reject; sp=quarantine"


@pytest.mark.parametrize("author, table, policy, result, asked", [
    # the author's own record: p
    ("a.test", {"_dmarc.a.test": (REC,)}, Policy("a.test", DmarcRecord(REJ, QUAR), False),
     None, ["_dmarc.a.test"]),
    # none at a subdomain: the organisational domain's, with sp
    ("x.y.a.test", {"_dmarc.a.test": (REC,)}, Policy("a.test", DmarcRecord(REJ, QUAR), True),
     None, ["_dmarc.x.y.a.test", "_dmarc.a.test"]),
    # the subdomain's own record wins; the org is not asked
    ("x.a.test", {"_dmarc.x.a.test": ("v=DMARC1; p=none",), "_dmarc.a.test": (REC,)},
     Policy("x.a.test", DmarcRecord(NONE, NONE), False), None, ["_dmarc.x.a.test"]),
    # TXT records that are not DMARC records are discarded first
    ("x.a.test", {"_dmarc.x.a.test": ("hello", "v=spf1 -all"), "_dmarc.a.test": (REC,)},
     Policy("a.test", DmarcRecord(REJ, QUAR), True), None,
     ["_dmarc.x.a.test", "_dmarc.a.test"]),
    # nothing anywhere: none; an org domain is asked once
    ("a.test", {}, None, AuthResult.NONE, ["_dmarc.a.test"]),
    ("x.a.test", {}, None, AuthResult.NONE, ["_dmarc.x.a.test", "_dmarc.a.test"]),
    # two DMARC records: none (step 5), and the org is not asked instead
    ("x.a.test", {"_dmarc.x.a.test": (REC, "v=DMARC1; p=none"), "_dmarc.a.test": (REC,)},
     None, AuthResult.NONE, ["_dmarc.x.a.test"]),
    # an invalid record: ignored (none)
    ("a.test", {"_dmarc.a.test": ("v=DMARC1; p=bogus",)}, None, AuthResult.NONE,
     ["_dmarc.a.test"]),
    # a temporary failure: temperror, and never the org's record in its place
    ("x.a.test", {"_dmarc.x.a.test": None, "_dmarc.a.test": (REC,)}, None,
     AuthResult.TEMPERROR, ["_dmarc.x.a.test"]),
    ("x.a.test", {"_dmarc.a.test": None}, None, AuthResult.TEMPERROR,
     ["_dmarc.x.a.test", "_dmarc.a.test"]),
    # a public suffix is its own org domain: asked once; x.github.io is its own org
    ("co.uk", {"_dmarc.co.uk": (REC,)}, Policy("co.uk", DmarcRecord(REJ, QUAR), False), None,
     ["_dmarc.co.uk"]),
    ("m.x.github.io", {"_dmarc.github.io": (REC,)}, None, AuthResult.NONE,
     ["_dmarc.m.x.github.io", "_dmarc.x.github.io"]),
])
def test_discover(author: str, table: dict, policy: Policy | None, result: AuthResult | None,
                  asked: list[str]) -> None:
    lookup, seen = lookup_from(table)
    d = discover(author, lookup)
    assert (d.policy, d.result) == (policy, result)
    assert seen == asked


def test_applied_policy() -> None:
    rec = DmarcRecord(REJ, NONE)
    assert Policy("a.test", rec, False).applied is REJ
    assert Policy("a.test", rec, True).applied is NONE


@pytest.mark.parametrize("author, ident, mode, ok", [
    ("a.test", "a.test", R, True),
    ("a.test", "mail.a.test", R, True),
    ("x.a.test", "y.a.test", R, True),
    ("a.test", "mail.a.test", S, False),
    ("A.Test.", "a.test", S, True),                       # strict compares canonical names
    ("xn--bcher-kva.test", "B\u00fccher.test", S, True),
    ("a.test", "b.test", R, False),
    ("co.uk", "evil.co.uk", R, False),                    # a public suffix is nobody's org
    ("x.github.io", "github.io", R, False),
    ("x.github.io", "y.github.io", R, False),
    ("a.test", "", R, False),
    ("", "", S, False),
])
def test_identifier_aligned(author: str, ident: str, mode: str, ok: bool) -> None:
    assert identifier_aligned(author, ident, mode) is ok


RELAXED = Discovery(Policy("a.test", DmarcRecord(REJ, NONE), False))
STRICT = Discovery(Policy("a.test", DmarcRecord(REJ, NONE, S, S), False))
SUB = Discovery(Policy("a.test", DmarcRecord(REJ, NONE), True))
P, F, T = AuthResult.PASS, AuthResult.FAIL, AuthResult.TEMPERROR


@pytest.mark.parametrize("author, disc, spf, spf_domain, dkim, result, reason", [
    ("a.test", RELAXED, None, "", [("a.test", P)], P, "dkim"),
    ("a.test", RELAXED, None, "", [("mail.a.test", P)], P, "dkim"),      # relaxed
    ("a.test", STRICT, None, "", [("mail.a.test", P)], F, ""),           # strict
    ("a.test", RELAXED, "pass", "bounce.a.test", [], P, "spf"),
    ("a.test", STRICT, "pass", "bounce.a.test", [], F, ""),
    ("a.test", STRICT, "pass", "a.test", [], P, "spf"),
    ("a.test", RELAXED, "pass", "", [], F, ""),             # null sender: HELO is not used
    ("a.test", RELAXED, "softfail", "a.test", [], F, ""),
    ("a.test", RELAXED, "pass", "evil.test", [("evil.test", P)], F, ""),  # unaligned passes
    ("a.test", RELAXED, None, "", [("a.test", F), ("a.test", T)], F, ""),  # not a pass
    ("a.test", RELAXED, None, "", [("evil.test", P), ("a.test", P)], P, "dkim"),
    ("x.a.test", SUB, None, "", [], F, ""),
    ("a.test", Discovery(None, AuthResult.NONE, "no record"), "pass", "a.test",
     [("a.test", P)], AuthResult.NONE, "no record"),
    ("a.test", Discovery(None, T, "x"), "pass", "a.test", [("a.test", P)], T, "x"),
])
def test_evaluate(author: str, disc: Discovery, spf: str | None, spf_domain: str,
                  dkim: list[tuple[str, str]], result: AuthResult, reason: str) -> None:
    v = evaluate(author, disc, spf=spf, spf_domain=spf_domain, dkim=dkim)
    assert (v.result, v.reason, v.author) == (result, reason, author)
    assert v.policy is disc.policy


def test_verdict_comment_and_applied() -> None:
    v = evaluate("x.a.test", SUB, spf=None, spf_domain="", dkim=[])
    assert (v.comment, v.applied) == ("p=reject sp=none", "none")
    v = evaluate("a.test", RELAXED, spf=None, spf_domain="", dkim=[])
    assert (v.comment, v.applied) == ("p=reject sp=none", "reject")
    v = evaluate("a.test", Discovery(None, AuthResult.NONE, "no record"), spf=None,
                 spf_domain="", dkim=[])
    assert (v.comment, v.applied) == ("no record", "")


# --------------------------------------------------------------------------- learning's rule

@pytest.mark.parametrize("spf_domain, passes, ok", [
    ("example.com", ["example.com"], True),
    ("bounce.example.com", ["mail.example.com"], True),     # one organisation
    ("esp.test", ["brand.test"], False),       # SPF and the signature prove different domains
    ("esp.test", ["brand.test", "esp.test"], True),
    ("example.com", [], False),
    ("", ["example.com"], False),
    (None, ["example.com"], False),
    ("evil.co.uk", ["co.uk"], False),          # a public suffix is nobody's organisation
    ("B\u00fccher.test", ["xn--bcher-kva.test"], True),
])
def test_dkim_vouches_for_the_spf_domain(spf_domain: str | None, passes: list[str],
                                         ok: bool) -> None:
    assert dkim_vouches(spf_domain, passes) is ok
