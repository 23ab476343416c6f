"""How long one message's DKIM key lookups may wait on DNS (pure; no I/O, the caller measures).

Purpose
    A spammer who owns a domain can sign with d= names whose nameservers never answer. Each
    such key lookup waits out its timeout. The worker acknowledges each message as soon as its
    own pipeline is done, so that wait holds nobody else's mail. This rule bounds how long
    the message itself waits (an allow-listed forwarder may carry such signatures). A
    timeout that says something about the domain is remembered per signing domain
    (workers.lane.dkim_check.DeadKeyDomains), so the next message that names it waits for nothing.

The rule (per message)
    * Every key lookup waits at most `per_lookup` (classify.dns_timeout), and all the lookups
      of one message together at most `total` (classify.dkim_dns_budget), within the
      message's DKIM deadline. A lookup with no time left is a temperror at once. The
      message's DMARC policy lookups (workers.lane.dmarc_lookup) come after its key lookups
      and share the same budget.
    * Signatures whose d= aligns with the From: domain are judged first (header order
      otherwise). Only an aligned pass feeds learning. So a dead third-party signature
      added to a message cannot use up the time of the one that matters.
    * A lookup that was given at least CONCLUSIVE_SHARE (3/4) of a full lookup's time,
      min(per_lookup, total), and still got no answer (timeout, SERVFAIL or refusal from
      every server) is *conclusive*: it marks its signing domain as unresponsive. A lookup
      cut shorter, because earlier lookups of the same message used the budget or because
      the deadline was near, marks nothing. Otherwise a sender could spend a message's budget
      on dead keys, then name a slow but working domain and get it marked. (Why not require
      the full time: a healthy lookup of a few ms before a dead one would then keep the
      dead domain from ever being marked.) To be marked, a domain must fail to answer for
      1.5 s at the defaults. A domain that slow is broken for its own mail anyway, and being
      marked costs it only dkim=temperror for the TTL.
    What it costs a spammer: one conclusive timeout per registered domain it owns, per
    DeadKeyDomains TTL. Its messages hold only their own credit units. The fast broker already
    keeps one identity to classify.identity_share of the worker credit.

API
    DnsBudget(per_lookup, total)             one per message; mutable, one thread
        .allowance -> float                  min(per_lookup, total): a full lookup
        .lifetime(deadline_left) -> float    the wait the next lookup may have (0: none)
        .charge(seconds)                     a lookup waited this long (answered or not)
        .conclusive(lifetime) -> bool        would a timeout in this lifetime mark the domain?
    CONCLUSIVE_SHARE                         0.75
        .spent -> float
    evaluation_order(aligned) -> list[int]   indices: aligned signatures first, each group in
                                             header order

Failure modes: DnsBudget raises ValueError for a per_lookup or total that is not > 0.
Limits: none of its own (the caller's deadline bounds everything).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CONCLUSIVE_SHARE", "DnsBudget", "evaluation_order"]

CONCLUSIVE_SHARE = 0.75     # of a full lookup's time: a timeout after that much marks a domain


@dataclass
class DnsBudget:
    per_lookup: float
    total: float
    spent: float = 0.0

    def __post_init__(self) -> None:
        if not (self.per_lookup > 0 and self.total > 0):
            raise ValueError("DnsBudget: per_lookup and total must be > 0")

    @property
    def allowance(self) -> float:
        return min(self.per_lookup, self.total)

    def lifetime(self, deadline_left: float) -> float:
        return max(0.0, min(self.per_lookup, self.total - self.spent, deadline_left))

    def charge(self, seconds: float) -> None:
        self.spent += max(0.0, seconds)

    def conclusive(self, lifetime: float) -> bool:
        return lifetime >= CONCLUSIVE_SHARE * self.allowance


def evaluation_order(aligned: Sequence[bool]) -> list[int]:
    first = [i for i, a in enumerate(aligned) if a]
    return first + [i for i, a in enumerate(aligned) if not a]
