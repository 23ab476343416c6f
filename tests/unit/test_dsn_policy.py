"""ingress.policy.dsn: table of (mode, sender, evidence, sendable) -> (send, result, why), the
reading of the spool envelope's evidence, and the per-domain rate as an attacker tries it
(many spellings, many subdomains, a thousand other domains)."""

from __future__ import annotations

import pytest

from ingress.core import metrics
from ingress.core.config import DSN_MODES
from ingress.core.wire import WireEvidence
from ingress.policy.dsn import (
    DSN_TRACKED,
    RESULTS,
    DsnLimits,
    Result,
    ReturnPath,
    authenticated_by,
    decide,
    return_path,
)

SPF_PASS = {"spf": "pass", "spf_domain": "sender.test"}

DECISIONS = [
    # mode, sender, evidence, sendable -> send, result, why (a substring)
    ("authenticated", "a@sender.test", SPF_PASS, True, True, Result.SENT, "spf"),
    ("authenticated", "a@SENDER.test.", SPF_PASS, True, True, Result.SENT, "spf"),
    ("authenticated", "a@\uff53\uff45\uff4e\uff44\uff45\uff52.test", SPF_PASS, True, True,
     Result.SENT, "spf"),                                     # fullwidth "sender.test"
    # SPF pass for another domain (the HELO name, a parent) never counts
    ("authenticated", "a@sub.sender.test", SPF_PASS, True, False,
     Result.SUPPRESSED_UNAUTHENTICATED, "spf=pass for sender.test"),
    ("authenticated", "a@victim.test", {"spf": "pass", "spf_domain": ""}, True, False,
     Result.SUPPRESSED_UNAUTHENTICATED, "for the HELO name"),
    ("authenticated", "a@sender.test", {"spf": "softfail", "spf_domain": "sender.test"}, True,
     False, Result.SUPPRESSED_UNAUTHENTICATED, "spf=softfail"),
    ("authenticated", "a@sender.test", {"spf": "fail", "spf_domain": "sender.test"}, True,
     False, Result.SUPPRESSED_UNAUTHENTICATED, "no dkim pass"),
    ("authenticated", "a@sender.test", {"spf": "temperror", "spf_domain": "sender.test"}, True,
     False, Result.SUPPRESSED_UNAUTHENTICATED, "spf=temperror"),
    ("authenticated", "a@sender.test", {}, True, False,
     Result.SUPPRESSED_UNAUTHENTICATED, "spf=not evaluated"),
    # DKIM: a pass aligned (relaxed, organisational domain) with the MAIL FROM domain
    ("authenticated", "a@sender.test", {"dkim_pass": "sender.test"}, True, True, Result.SENT,
     "dkim:sender.test"),
    ("authenticated", "a@bounces.sender.test", {"dkim_pass": "mail.sender.test"}, True, True,
     Result.SENT, "dkim:mail.sender.test"),
    ("authenticated", "a@sender.test", {"dkim_pass": "list.test spam.test"}, True, False,
     Result.SUPPRESSED_UNAUTHENTICATED, "not aligned"),
    ("authenticated", "a@x.github.io", {"dkim_pass": "github.io"}, True, False,
     Result.SUPPRESSED_UNAUTHENTICATED, "not aligned"),      # a public suffix is nobody's
    ("authenticated", "a@x.github.io", {"dkim_pass": "y.github.io"}, True, False,
     Result.SUPPRESSED_UNAUTHENTICATED, "not aligned"),      # two PSL-private customers
    ("authenticated", "a@bücher.test", {"dkim_pass": "xn--bcher-kva.test"}, True, True,
     Result.SENT, "dkim:xn--bcher-kva.test"),
    # malformed evidence proves nothing
    ("authenticated", "a@sender.test", {"spf": ["pass"], "spf_domain": 3, "dkim_pass": 7},
     True, False, Result.SUPPRESSED_UNAUTHENTICATED, "not evaluated"),
    ("authenticated", "a@sender.test", "garbage", True, False,
     Result.SUPPRESSED_UNAUTHENTICATED, ""),
    # the null sender, "never", what cannot be sent
    ("authenticated", "", SPF_PASS, True, False, Result.NULL_SENDER, "null sender"),
    ("always", "", {}, True, False, Result.NULL_SENDER, "null sender"),
    ("never", "a@sender.test", SPF_PASS, True, False, Result.SUPPRESSED_NEVER, "never"),
    ("authenticated", "a@sender.test", SPF_PASS, False, False, Result.UNSENDABLE, "cannot"),
    ("always", "a@[192.0.2.1]", {}, True, False, Result.UNSENDABLE, "not a valid domain"),
    ("always", "nodomain", {}, True, False, Result.UNSENDABLE, "not a valid domain"),
    # "always": the old behaviour, rate-limited still
    ("always", "a@forged.test", {"spf": "fail", "spf_domain": "forged.test"}, True, True,
     Result.SENT, "always"),
]


@pytest.mark.parametrize(("mode", "sender", "evidence", "sendable", "send", "result", "why"),
                         DECISIONS)
def test_decide(mode: str, sender: str, evidence: object, sendable: bool, send: bool,
                result: Result, why: str) -> None:
    limits = DsnLimits(10.0)
    d = decide(mode, sender, return_path(evidence), limits, 0.0, sendable=sendable)
    assert (d.send, d.result) == (send, result), d
    assert why in d.why, d
    # only a DSN that is sent spends a token
    assert len(limits) == (1 if send else 0)


def test_modes_and_results_are_declared() -> None:
    """The config's modes and the metric's declared labels are the policy's."""
    assert DSN_MODES == ("authenticated", "never", "always")
    assert set(RESULTS) == {r.value for r in Result} == set(metrics.DSN_RESULTS)


def test_return_path_is_bounded() -> None:
    rp = return_path({"dkim_pass": " ".join(f"d{i}.test" for i in range(100))})
    assert len(rp.dkim_pass) <= 8       # over the codec's item bound: nothing proven at all
    rp = return_path(WireEvidence(dkim_pass=tuple(f"d{i}.test" for i in range(60))))
    assert len(rp.dkim_pass) == 8
    assert return_path({"dkim_pass": "A.test a.test xn--bcher-kva.test bücher.test"}
                       ).dkim_pass == ("a.test", "xn--bcher-kva.test")


@pytest.mark.parametrize(("domain", "rp", "want"), [
    ("sender.test", ReturnPath("pass", "sender.test"), "spf"),
    ("sender.test", ReturnPath("pass", "sender.test", ("sender.test",)), "spf"),
    ("sender.test", ReturnPath("fail", "sender.test", ("x.sender.test",)), "dkim:x.sender.test"),
    ("", ReturnPath("pass", ""), ""),
    ("sender.test", ReturnPath("fail", "sender.test", operator=True), "operator"),
    ("sender.test", ReturnPath(), ""),
])
def test_authenticated_by(domain: str, rp: ReturnPath, want: str) -> None:
    assert authenticated_by(domain, rp) == want


def test_rate_one_domain_many_spellings_and_subdomains() -> None:
    """Every spelling and every subdomain of one registrable domain is one key: at most
    per_hour DSNs at once, then one per 3600/per_hour seconds."""
    limits = DsnLimits(5.0)
    spellings = ["victim.test", "VICTIM.test", "\uff56\uff49\uff43\uff54\uff49\uff4d.test",
                 "victim.test.", "a.victim.test", "b.c.victim.test", "victim\u3002test"]
    sent = [decide("always", f"x{i}@{spellings[i % len(spellings)]}", ReturnPath(), limits,
                   float(i)).result for i in range(50)]
    assert sent.count(Result.SENT) == 5 and set(sent[5:]) == {Result.RATE_LIMITED}
    assert len(limits) == 1
    # refilled at 5 an hour: one more after 720 s
    assert decide("always", "x@victim.test", ReturnPath(), limits, 49 + 720.0).send
    assert not decide("always", "x@victim.test", ReturnPath(), limits, 49 + 721.0).send
    # another domain has its own budget
    assert decide("always", "x@other.test", ReturnPath(), limits, 50.0).send


def test_rate_a_thousand_domains_cannot_reset_a_victim() -> None:
    """An attacker who drained victim.test's budget then names DSN_TRACKED other domains:
    the victim's bucket is never forgotten; the newcomers are refused once the table is full,
    and the victim stays limited."""
    limits = DsnLimits(2.0, max_keys=100)
    assert [decide("always", "a@victim.test", ReturnPath(), limits, 0.0).send
            for _ in range(3)] == [True, True, False]
    results = [decide("always", f"a@d{i}.test", ReturnPath(), limits, 1.0).result
               for i in range(1000)]
    assert results.count(Result.SENT) == 99            # the rest of the table
    assert set(results[99:]) == {Result.RATE_TABLE_FULL}
    assert len(limits) == 100
    assert decide("always", "a@victim.test", ReturnPath(), limits, 2.0).result \
        is Result.RATE_LIMITED
    # an hour later every bucket has refilled: the oldest (the victim) makes room
    later = decide("always", "a@new.test", ReturnPath(), limits, 3600.0 * 2)
    assert later.send and len(limits) == 100
    assert DSN_TRACKED >= 1000


def test_unauthenticated_flood_spends_nothing() -> None:
    """A flood of forged senders, all failing downstream: no DSN, no token, no table entry,
    so a legitimate sender of the same domain keeps its budget."""
    limits = DsnLimits(3.0)
    for i in range(10_000):
        d = decide("authenticated", f"u{i}@victim.test",
                   return_path({"spf": "fail", "spf_domain": "victim.test"}), limits, 0.0)
        assert d.result is Result.SUPPRESSED_UNAUTHENTICATED
    assert len(limits) == 0
    assert decide("authenticated", "real@victim.test", return_path(
        {"spf": "pass", "spf_domain": "victim.test"}), limits, 0.0).send


@pytest.mark.parametrize(("identity", "operator"), [
    ("allow:127.0.0.20/32", True), ("cert:ab12", True), ("org:spf.test", False),
    ("learned:127.0.0.0/24", False), ("", False), (7, False)])
def test_the_operators_clients_are_vouched_for(identity: object, operator: bool) -> None:
    """A client on the operator's allow list or with a certificate: its DSNs go out (the
    operator's own relays), whatever SPF says; a self-proven identity proves nothing more."""
    assert return_path({"identity": identity, "spf": "fail"}).operator is operator
