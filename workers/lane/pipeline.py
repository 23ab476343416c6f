"""Per-message work done in a worker before the durable write: DKIM, DMARC and the trace
headers.

API:
    Pipeline(cfg).process(env, body, budget_s) -> Processed(trace, body, dkim, learn,
                                                            learn_domain, unlearn, dkim_pass,
                                                            dmarc)
    Pipeline(cfg).process_now(env, body, budget_s) -> Processed | None   the same, or None
                                                when it would wait on DNS
    Processed.spool_envelope(env) -> Envelope   what the worker stores: env with its evidence's
                                                dkim_pass (and dmarc, dmarc_policy) set

The trace prepended to the client's message, top first:
    Authentication-Results: <authserv-id> (lane=...); spf=...; dkim=...; dmarc=...; dnswl=...
        (RFC 8601; dnswl: RFC 8904, when a DNS allow list listed the client: the envelope's
        evidence dnswl, dnswl_ip, dnswl_txt, set by the acceptor's dnswl check)
    Received-SPF: ...            when the acceptor evaluated SPF (it builds this line)
    Received: from <helo> ([ip]) by <host> (smtp-ingress lane=...) with ESMTP[S] id <qid> ...
Inbound Authentication-Results headers that claim our authserv-id are removed from the client's
message (RFC 8601 section 5): nobody else may speak for us. Nothing else in it changes.

DKIM: the first dkim_check.MAX_SIGNATURES (5) signatures are verified (dkimpy, with the key and
header limits of workers.lane.dkim_check) with one cached resolver and a deadline of
min(classify.dkim_deadline, budget_s). The key lookups of one message (and then its DMARC policy
lookups) together wait at most classify.dkim_dns_budget, and signatures aligned with From: go
first (ingress.policy.dkim_budget). A signing domain whose key lookup got no answer is
remembered for classify.dkim_timeout_ttl in the worker's DeadKeyDomains, shared by its threads:
the next message naming it gets dkim=temperror at once. A temperror never promotes or rejects,
and the message is still stored and acknowledged. A message without a DKIM-Signature header
costs nothing. process() runs in its own worker pool thread, one message per call, never on the
worker's heartbeat loop; a slow one delays only itself. process_now() is the same work for a
message of at most NOW_MAX bytes (64 KiB) that cannot wait on DNS (no DKIM-Signature; DMARC
off, or its policy lookups answered by the resolver's cache): the worker runs it on its loop,
without a pool thread's two hand-offs (issue 20: 0.41 -> 0.31 ms of the bulk worker's CPU per
message under smtp-source); for any other message it answers None at once.
DMARC (RFC 7489; [dmarc] enabled, on by default wherever DNS is configured:
ingress.core.derived.dns_configured): after DKIM, the From: domain's policy is
looked up (workers.lane.dmarc_lookup: at most two TXT queries) within what is left of the same
DNS budget and deadline, and judged (ingress.policy.dmarc) with the acceptor's SPF verdict, for
the MAIL FROM identity only (the null sender's HELO check is never used: RFC 7489 3.1.2), and
the DKIM results. Rendered as "dmarc=<result> (p=.. sp=..) header.from=<domain>": reported,
never enforced. A policy domain that did not answer is remembered for dmarc.timeout_ttl.
`learn` is true when SPF passed (acceptor's verdict), a DKIM signature aligned with the From:
domain passed whose d= is of the SPF domain's organisation (classify.dkim_vouches: the two vouch
for one organisation, the one learned), and the promotion policy
(classify.spf_promote/spf_domains) would promote an SPF pass for that domain ("listed": listed
domains only; "off": nothing is learned): the client is then remembered in every acceptor's
learned allow cache, for `learn_domain` (the SPF domain, canonical: A-labels,
ingress.core.addr.normalize_domain; the learned entry counts against its organisational domain's
share of the fast lane). DKIM alignment compares canonical names through the Public Suffix List
(workers.lane.dkim_check.aligned).
`unlearn` (a reason, or "") when the client's network was learned (the envelope's
evidence.learned, set by the acceptor) and this message disowns it (classify.should_unlearn): SPF
fail or softfail, an aligned DKIM signature failing with none passing, or, for a message served
fast on the entry (identity learned:<domain>), no aligned DKIM signature at all; never on
temperror. The worker then tells every acceptor to forget the entry.
Providers (FCrDNS: ingress.policy.iprev): when the envelope's evidence names a verified
`provider`, a learned client is learned with it (`provider`: every acceptor learns "provider P
for domain D"); a message that rode the provider's entry (its reasons hold "provider:<P>", the
iprev check's promotion) is judged by should_unlearn like one from a learned network, and its
unlearn names the provider too. The A-R carries iprev (RFC 8601 2.7.3) when the acceptor's
check ran (evidence.iprev, evidence.iprev_name).

`dkim_pass` (stored in the spool file as the envelope's evidence.dkim_pass, for the relay): the
canonical d= (ingress.core.addr.normalize_domain) of every signature that passed (() when none
passed), so the relay can tell a sender whose return path is authenticated (ingress.policy.dsn:
DKIM aligned with the MAIL FROM domain) without parsing a header of the message. It replaces
any dkim_pass the envelope came with. Additive: an optional evidence field, so the spool format
stays version 1 (a spool file without it: nothing was proven by DKIM). With DMARC on, also
evidence.dmarc (its result) and evidence.dmarc_policy (the applied p or sp; "" without one).

Anything the client chose (HELO name, addresses) is sanitised to printable ASCII without CR/LF
before it goes into a header, so a client cannot inject header lines. Failure modes: DKIM
problems are results (temperror/permerror), never exceptions; process() does not raise for bad
input.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

from ingress.core.addr import normalize_domain
from ingress.core.config import Config
from ingress.core.derived import dns_configured
from ingress.core.headers import spf_identity
from ingress.core.wire import Envelope, Lane
from ingress.policy.classify import ClassifyPolicy, dkim_vouches, should_learn, should_unlearn
from ingress.policy.dkim_budget import DnsBudget
from ingress.policy.dmarc import DmarcVerdict
from ingress.policy.identity import warm
from workers.lane import dkim_check
from workers.lane.dkim_keys import NotCached
from workers.lane.dmarc_lookup import DmarcLookup
from workers.lane.headers import authentication_results, received_header, strip_forged_ar

DKIM_HEADER = re.compile(rb"(?im)^dkim-signature[ \t]*:")
# process_now's bound: its header work grows with the message (a 10 MB header section of a
# hostile client's took 157-237 ms, the caller's loop stopped meanwhile; 64 KiB, about 1 ms).
# Larger messages go to a pool thread, where the GIL's switch interval keeps the loop turning.
NOW_MAX = 64 * 1024


def has_dkim_signature(body: bytes) -> bool:
    """A DKIM-Signature header in the message's header block (not in its body)."""
    end = body.find(b"\r\n\r\n")
    return DKIM_HEADER.search(body if end < 0 else body[:end + 2]) is not None


@dataclass(frozen=True)
class Processed:
    trace: bytes
    body: bytes
    dkim: tuple[dkim_check.DkimSignatureResult, ...]
    learn: bool
    learn_domain: str = ""
    unlearn: str = ""        # why the client's learned network must be forgotten ("": keep)
    dkim_pass: tuple[str, ...] = ()   # canonical d= of the passing signatures: to the spool
    dmarc: DmarcVerdict | None = None   # None: DMARC is off
    provider: str = ""       # learn: the provider learned with it; unlearn: the provider entry
                             # to forget with it ("": none)

    def spool_envelope(self, env: Envelope) -> Envelope:
        """The envelope to store: env with this message's evidence (dkim_pass, dmarc) set."""
        ev = replace(env.evidence, dkim_pass=self.dkim_pass)
        if self.dmarc is not None:
            ev = replace(ev, dmarc=str(self.dmarc.result), dmarc_policy=self.dmarc.applied)
        return replace(env, evidence=ev)


class Pipeline:
    def __init__(self, cfg: Config) -> None:
        c = cfg.classify
        self.hostname = cfg.smtp.hostname
        self.authserv_id = c.authserv_id or cfg.smtp.hostname
        self.dkim_deadline = c.dkim_deadline
        self.dns_timeout = c.dns_timeout
        self.dns_budget = c.dkim_dns_budget
        self.resolver = dkim_check.make_resolver(c.nameservers, c.dns_timeout)
        # shared by the worker's pipeline threads (it locks): a key domain that did not answer
        # costs the next message naming it no wait
        self.dead = dkim_check.DeadKeyDomains(ttl=c.dkim_timeout_ttl)
        # learning obeys the acceptors' promotion policy (one rule: ClassifyPolicy.spf_promotes)
        self.policy = ClassifyPolicy(spf_promote=c.spf_promote,
                                     spf_domains=frozenset(c.spf_domains))
        self.dmarc = (DmarcLookup(self.resolver, c.dns_timeout, ttl=cfg.dmarc.timeout_ttl)
                      if cfg.dmarc.enabled and dns_configured(cfg) else None)
        # The PSL (DKIM alignment, DMARC, learning) before the worker's READY: a replacement
        # worker of a reload does not build it at its first message, on that message's time.
        warm()

    def process_now(self, env: Envelope, body: bytes, budget_s: float) -> Processed | None:
        """process() when it would neither wait nor take long: at most NOW_MAX bytes, no
        DKIM-Signature, and DMARC off or its policy in the resolver's cache; else None (call
        process() where it may)."""
        if len(body) > NOW_MAX or has_dkim_signature(body):
            return None
        try:
            return self._run(env, body, budget_s, offline=True)
        except NotCached:
            return None

    def process(self, env: Envelope, body: bytes, budget_s: float) -> Processed:
        return self._run(env, body, budget_s, offline=False)

    def _run(self, env: Envelope, body: bytes, budget_s: float, offline: bool) -> Processed:
        ev = env.evidence
        body = strip_forged_ar(body, self.authserv_id)
        # One DNS budget for the message's lookups: its DKIM keys first, then its DMARC policy.
        deadline_s = max(0.1, min(self.dkim_deadline, budget_s))
        deadline = time.monotonic() + deadline_s
        budget = DnsBudget(min(self.dns_timeout, self.resolver.lifetime), self.dns_budget)
        results: tuple[dkim_check.DkimSignatureResult, ...] = ()
        if has_dkim_signature(body):
            report = dkim_check.verify_dkim(
                body, resolver=self.resolver, timeout=self.dns_timeout, deadline_s=deadline_s,
                dead=self.dead, budget=budget)
            results = report.results
        spf = ev.spf
        domain = normalize_domain(ev.spf_domain)    # learned under its A-labels
        # DMARC aligns the MAIL FROM identity only: for the null sender SPF checked the HELO
        # name, which DMARC never uses (RFC 7489 3.1.2).
        mailfrom = domain if spf_identity(env.mail_from, env.helo)[0] == "mailfrom" else ""
        verdict = None if self.dmarc is None else self.dmarc.check(
            body, spf=spf, spf_domain=mailfrom, dkim=[(r.domain, r.result) for r in results],
            budget=budget, deadline=deadline, offline=offline)
        ar = authentication_results(
            self.authserv_id, spf=spf, spf_domain=ev.spf_domain or None,
            spf_helo=env.helo if spf and not ev.spf_domain else None,
            dkim_results=results, dmarc=verdict, comment=f"lane={env.lane.value}",
            dnswl=(ev.dnswl, ev.dnswl_ip, ev.dnswl_txt) if ev.dnswl else None,
            iprev=ev.iprev or None, iprev_ip=env.peer_ip, iprev_name=ev.iprev_name or None)
        received_spf = ev.received_spf.encode("ascii", "replace")
        trace = ar + received_spf + received_header(env, self.hostname)
        vouches = dkim_vouches(domain, (r.domain for r in results if r.aligned_pass))
        learn = should_learn(spf, vouches, domain, self.policy)
        rode = env.lane is Lane.FAST and ev.identity.startswith("learned:")
        rode_provider = bool(ev.provider) and f"provider:{ev.provider}" in ev.reasons
        unlearn = "" if learn else should_unlearn(
            bool(ev.learned) or rode_provider, rode, spf,
            (r.result for r in results if r.aligned))
        passed = dict.fromkeys(d for r in results if r.result is dkim_check.DkimResult.PASS
                               if (d := normalize_domain(r.domain)))
        return Processed(trace, body, results, learn=learn, learn_domain=domain if learn else "",
                         unlearn=unlearn, dkim_pass=tuple(passed), dmarc=verdict,
                         provider=ev.provider if learn or (unlearn and rode_provider) else "")
