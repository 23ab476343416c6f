"""Evidence checks: what a check may conclude, and how a stage's conclusions combine (pure).

Purpose
    Evidence is pluggable (docs/design.md, "Evidence checks"). A check belongs to a stage
    (connect, TLS, HELO, MAIL, DATA), does an asynchronous lookup with a deadline (its I/O
    shell: a module of the package ingress.edge.checks), and hands a Judgement to this module:
    promote (to an identity, whose trust tier ingress.policy.tiers names), neutral, shape (the
    bulk lane only: a suspicion score) or refuse (bulk only: a reply), each with a reason
    token. This module folds a stage's judgements into one Verdict the session applies, and
    keeps the rules every check obeys in one place.

Rules
    * Evidence only promotes. A promotion names an identity; of several, the highest trust
      tier wins (ingress.policy.tiers.tier_of: operator, third-party, self-proven), then the
      first in check order.
    * A promoted connection is never shaped or refused by a check: a block-list listing only
      ever shapes or refuses *bulk* (an operator-allowed client listed somewhere keeps its
      lane; so does a DNS-allow-listed one: the operator chose to trust that list).
    * Refusals win over shaping; the first refusal in check order is the reply.
    * Shape scores add up (postscreen's weights: a listing in two zones counts twice).
    * A check that timed out, failed or was skipped is NEUTRAL: DNS trouble is nobody's
      evidence (it never promotes, never refuses); its reason token says what happened.
    * facts: what a check records for the trace (Authentication-Results) and for the
      workers, as (field, value) pairs of ingress.core.wire's evidence record; later checks
      of a stage do not overwrite earlier ones' facts.

API
    Stage                    StrEnum connect | tls | helo | mail | data
    Outcome                  StrEnum promote | neutral | shape | refuse
    Judgement(check, outcome=NEUTRAL, reason="", identity="", score=0.0, reply="", facts=())
        frozen; Judgement.neutral(check, reason) / .promote(check, identity, reason, facts)
        / .shape(check, score, reason, facts) / .refuse(check, reply, reason, facts)
    Verdict(promotion, identity, score, refusal, reasons, facts)   combine()'s result
    combine(judgements) -> Verdict
    NO_VERDICT                the Verdict of no judgements

Failure modes: none (total functions; a Judgement of PROMOTE without an identity is neutral).
Limits: none (no state).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from ingress.policy.tiers import Tier, tier_of

__all__ = ["NO_VERDICT", "Judgement", "Outcome", "Stage", "Verdict", "combine"]

Facts = tuple[tuple[str, str], ...]


class Stage(StrEnum):
    CONNECT = "connect"
    TLS = "tls"
    HELO = "helo"
    MAIL = "mail"
    DATA = "data"


class Outcome(StrEnum):
    PROMOTE = "promote"
    NEUTRAL = "neutral"
    SHAPE = "shape"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Judgement:
    """One check's conclusion about one connection (or transaction)."""

    check: str                      # the check's name ("dnswl", "dnsbl", "iprev")
    outcome: Outcome = Outcome.NEUTRAL
    reason: str = ""                # a short stable token for logs, metrics and the trace
    identity: str = ""              # PROMOTE: who vouches (ingress.policy.identity kinds)
    score: float = 0.0              # SHAPE: how suspicious (weights add up)
    reply: str = ""                 # REFUSE: the SMTP reply line
    facts: Facts = ()               # wire evidence fields this check sets (field, value)

    @classmethod
    def neutral(cls, check: str, reason: str = "", facts: Facts = ()) -> Judgement:
        return cls(check, Outcome.NEUTRAL, reason, facts=facts)

    @classmethod
    def promote(cls, check: str, identity: str, reason: str, facts: Facts = ()) -> Judgement:
        return cls(check, Outcome.PROMOTE, reason, identity=identity, facts=facts)

    @classmethod
    def shape(cls, check: str, score: float, reason: str, facts: Facts = ()) -> Judgement:
        return cls(check, Outcome.SHAPE, reason, score=score, facts=facts)

    @classmethod
    def refuse(cls, check: str, reply: str, reason: str, facts: Facts = ()) -> Judgement:
        return cls(check, Outcome.REFUSE, reason, reply=reply, facts=facts)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A stage's judgements, folded: at most one of promotion / refusal applies."""

    promotion: str = ""             # the winning promotion's reason token ("" = none)
    identity: str = ""              # and its identity
    score: float = 0.0              # bulk suspicion (0 when promoted)
    refusal: str = ""               # the reply of a refused bulk connection ("" = none)
    reasons: tuple[str, ...] = ()   # every judgement's reason token, in check order
    facts: Facts = ()               # every check's facts (the first setting of a field wins)

    @property
    def tier(self) -> Tier:
        return tier_of(self.identity)


NO_VERDICT = Verdict()


def combine(judgements: Iterable[Judgement]) -> Verdict:
    """Fold one stage's judgements (in check order) by the rules of the module docstring."""
    best: Judgement | None = None
    refusal: Judgement | None = None
    score = 0.0
    reasons: list[str] = []
    facts: dict[str, str] = {}
    for j in judgements:
        if j.reason:
            reasons.append(j.reason)
        for field, value in j.facts:
            facts.setdefault(field, value)
        if j.outcome is Outcome.PROMOTE and j.identity:
            if best is None or tier_of(j.identity) < tier_of(best.identity):
                best = j
        elif j.outcome is Outcome.REFUSE and j.reply and refusal is None:
            refusal = j
        elif j.outcome is Outcome.SHAPE and j.score > 0:
            score += j.score
    fact_pairs = tuple(facts.items())
    if best is not None:
        return Verdict(best.reason, best.identity, 0.0, "", tuple(reasons), fact_pairs)
    return Verdict("", "", score, refusal.reply if refusal else "", tuple(reasons), fact_pairs)
