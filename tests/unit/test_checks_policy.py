"""ingress.policy.checks: how a stage's judgements fold into one verdict, and how a verdict
joins the classify evidence (table-driven, pure)."""

from __future__ import annotations

import pytest

from ingress.core.wire import AuthResult, Lane
from ingress.policy.checks import NO_VERDICT, Judgement, Outcome, combine
from ingress.policy.classify import ClassifyPolicy, Evidence, decide
from ingress.policy.tiers import Tier

J = Judgement
WL = J.promote("dnswl", "dnswl:list.test", "dnswl:list.test", (("dnswl", "list.test"),))
PROVIDER = J.promote("iprev", "learned:provider.test", "provider:provider.test")
BL2 = J.shape("dnsbl", 2.0, "dnsbl:bl.test", (("dnsbl_score", "2"),))
BL1 = J.shape("dnsbl2", 1.0, "dnsbl:other.test")
REF = J.refuse("dnsbl", "554 5.7.1 listed", "dnsbl-refused:bl.test")
TIMEOUT = J.neutral("iprev", "iprev:timeout")

CASES = [
    # judgements, promotion, identity, score, refusal, reasons
    ((), "", "", 0.0, "", ()),
    ((TIMEOUT,), "", "", 0.0, "", ("iprev:timeout",)),
    ((WL,), "dnswl:list.test", "dnswl:list.test", 0.0, "", ("dnswl:list.test",)),
    ((BL2, BL1), "", "", 3.0, "", ("dnsbl:bl.test", "dnsbl:other.test")),
    # a promotion wins over shaping and refusal: block lists only shape bulk
    ((BL2, WL, REF), "dnswl:list.test", "dnswl:list.test", 0.0, "",
     ("dnsbl:bl.test", "dnswl:list.test", "dnsbl-refused:bl.test")),
    ((BL2, REF), "", "", 2.0, "554 5.7.1 listed", ("dnsbl:bl.test", "dnsbl-refused:bl.test")),
    # the higher tier wins, whatever the order
    ((PROVIDER, WL), "dnswl:list.test", "dnswl:list.test", 0.0, "",
     ("provider:provider.test", "dnswl:list.test")),
    ((PROVIDER,), "provider:provider.test", "learned:provider.test", 0.0, "",
     ("provider:provider.test",)),
    # malformed judgements count for nothing
    ((J("x", Outcome.PROMOTE, "x:p"),), "", "", 0.0, "", ("x:p",)),
    ((J("x", Outcome.SHAPE, "x:s", score=-5.0),), "", "", 0.0, "", ("x:s",)),
    ((J("x", Outcome.REFUSE, "x:r"),), "", "", 0.0, "", ("x:r",)),
]


@pytest.mark.parametrize(("judged", "promotion", "identity", "score", "refusal", "reasons"),
                         CASES)
def test_combine(judged: tuple[Judgement, ...], promotion: str, identity: str, score: float,
                 refusal: str, reasons: tuple[str, ...]) -> None:
    v = combine(judged)
    assert (v.promotion, v.identity, v.score, v.refusal, v.reasons) == \
        (promotion, identity, score, refusal, reasons)


def test_combine_keeps_the_first_setting_of_a_fact() -> None:
    a = J.neutral("a", "a", (("iprev", "pass"),))
    b = J.neutral("b", "b", (("iprev", "fail"), ("provider", "p.test")))
    assert combine([a, b]).facts == (("iprev", "pass"), ("provider", "p.test"))


def test_no_verdict_is_the_empty_fold() -> None:
    assert combine([]) == NO_VERDICT
    assert NO_VERDICT.tier is Tier.UNKNOWN


POLICY = ClassifyPolicy(spf_promote="any")

EVIDENCE = [
    # (evidence, lane, identity, a reason that must be among the decision's)
    (Evidence().with_verdict(combine([WL])), Lane.FAST, "dnswl:list.test", "dnswl:list.test"),
    (Evidence().with_verdict(combine([BL2])), Lane.BULK, "", "dnsbl:bl.test"),
    # an operator entry outranks a DNS allow list, which outranks SPF and learned entries
    (Evidence(static_allow=True, allow_entry="10.0.0.0/8").with_verdict(combine([WL])),
     Lane.FAST, "allow:10.0.0.0/8", "dnswl:list.test"),
    (Evidence(learned_allow=True, learned_domain="l.test").with_verdict(combine([WL])),
     Lane.FAST, "dnswl:list.test", "learned-allow"),
    (Evidence().with_spf(AuthResult.PASS,
                         "s.test").with_verdict(combine([WL])),
     Lane.FAST, "dnswl:list.test", "spf-pass:s.test"),
    # a self-proven check identity (a provider) outranks nothing operator or third-party
    (Evidence().with_verdict(combine([PROVIDER])), Lane.FAST, "learned:provider.test",
     "provider:provider.test"),
]


@pytest.mark.parametrize(("evidence", "lane", "identity", "reason"), EVIDENCE)
def test_decide_with_checks(evidence: Evidence, lane: Lane, identity: str, reason: str) -> None:
    d = decide(evidence, POLICY)
    assert (d.lane, d.identity) == (lane, identity)
    assert reason in d.reasons


def test_verdicts_only_add() -> None:
    ev = Evidence().with_verdict(combine([WL])).with_verdict(combine([BL2]))
    ev = ev.with_verdict(NO_VERDICT)
    assert ev.checked == (("dnswl:list.test", "dnswl:list.test"),)
    assert ev.bulk_score == 2.0
    assert dict(ev.facts) == {"dnswl": "list.test", "dnsbl_score": "2"}
    assert decide(ev, POLICY).lane is Lane.FAST
