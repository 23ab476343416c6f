"""DMARC in the workers: the _dmarc TXT lookups of ingress.policy.dmarc through the worker's
resolver, within the message's DNS budget, and the negative cache of policy domains that do
not answer.

Purpose
    The I/O shell around the pure policy (ingress.policy.dmarc): find the author domain in
    the message, look its policy up (at most two TXT lookups: _dmarc.<From domain>, then
    _dmarc.<organisational domain>) and judge it with the message's own SPF (the acceptor's,
    in the envelope's evidence) and DKIM results (workers.lane.dkim_check). We only report:
    the verdict goes into Authentication-Results and the spooled envelope's evidence; no
    message is refused or delayed for it.

API
    DmarcLookup(resolver, timeout, ttl=DEAD_KEY_TTL)   one per worker process (the Pipeline);
                                                       its negative cache is thread-safe
        .check(message, *, spf, spf_domain, dkim, budget, deadline=None) -> DmarcVerdict
            dkim: (d=, result) of every judged signature; budget: the message's DnsBudget
            (ingress.policy.dkim_budget, shared with its DKIM key lookups); deadline: an
            absolute time.monotonic() after which nothing is asked; offline: the policy
            from the resolver's cache only, else NotCached (workers.lane.dkim_keys).
        .dead: DeadKeyDomains      policy domains that did not answer (by organisational
                                   domain, workers.lane.dkim_keys)
    Library decision (issue 18 item 5 asked for a maintained library where it fits):
        authheaders 0.16.3 does its own DNS (dnspython's module-level resolve(): the system
        resolver, no shared cache, no deadline of ours); its dnsfunc hook returns one string,
        so it cannot tell a timeout from no record (SERVFAIL is "none", a timeout escapes as
        an exception) nor see two records; its organisational domain comes from publicsuffix2
        reading a bundled list file on every call; an np= lookup asks TXT at the From domain.
        dmarc 1.2.1's pure part (Policy.parse_record, DMARC.get_result) needs no DNS, but
        its relaxed alignment is suffix-based: From: co.uk with d=evil.co.uk (or From:
        x.github.io with d=github.io) is a pass, which a domain owner could use; its strict
        parser rejects a whole record for one bad pct=, and its PSL hook expects
        publicsuffix2. What would remain to reuse is a tag split. So the rules are ours
        (ingress.policy.dmarc, about 150 lines), on our resolver, publicsuffixlist and
        canonical names.

Failure modes
    Never raises for message content or DNS trouble: a lookup timeout, SERVFAIL from every
    server, an exhausted budget or deadline, or a domain in the negative cache is
    dmarc=temperror (the lookup is not retried within the message).

Limits
    At most two lookups per message, each waiting at most min(timeout, what is left of the
    message's DNS budget and deadline). A conclusive unanswered lookup (budget.conclusive)
    marks its organisational domain for `ttl` seconds: a policy domain that never answers
    costs one timeout per ttl per worker process, whatever subdomain names it; the cache
    holds at most DEAD_KEY_MAX names (workers.lane.dkim_keys). A _dmarc name over 253
    characters is never asked (no record can be there: none).
"""

from __future__ import annotations

from collections.abc import Iterable

import dns.resolver

from ingress.policy import dmarc
from ingress.policy.dkim_budget import DnsBudget
from workers.lane.dkim_keys import DEAD_KEY_TTL, MAX_DOMAIN_KEY, DeadKeyDomains, lookup_txt
from workers.lane.dkim_parse import header_from_domains

__all__ = ["DmarcLookup"]


class DmarcLookup:
    def __init__(self, resolver: dns.resolver.Resolver, timeout: float,
                 ttl: float = DEAD_KEY_TTL) -> None:
        self.resolver = resolver
        self.timeout = timeout
        self.dead = DeadKeyDomains(ttl=ttl)

    def check(self, message: bytes, *, spf: str | None, spf_domain: str,
              dkim: Iterable[tuple[str, str]], budget: DnsBudget,
              deadline: float | None = None, offline: bool = False) -> dmarc.DmarcVerdict:
        fields, domains = header_from_domains(message)
        author, problem = dmarc.author_domain(fields, domains)
        if problem is not None:
            why = "multiple From" if problem == "permerror" else "no From domain"
            return dmarc.DmarcVerdict(problem, "", None, why)

        def lookup(qname: str) -> tuple[str, ...] | None:
            if len(qname) > MAX_DOMAIN_KEY:
                return ()
            domain = qname.removeprefix("_dmarc.")
            ans = lookup_txt(self.resolver, qname, budget=budget, timeout=self.timeout,
                             deadline=deadline, dead=self.dead, domain=domain,
                             what="DMARC policy", offline=offline)
            if ans.outcome == "temperror":
                return None
            return tuple(r.decode("utf-8", "replace") for r in ans.records[:dmarc.MAX_RECORDS])

        found = dmarc.discover(author, lookup)
        return dmarc.evaluate(author, found, spf=spf, spf_domain=spf_domain, dkim=dkim)
