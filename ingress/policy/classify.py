"""Classification policy: evidence about a session -> lane (pure; no I/O, clock as an argument).

Purpose
    Decide whether a live SMTP session belongs in the fast lane (held capacity, never
    rate-capped) or the bulk lane, from evidence that arrives in stages, each only promoting:
    connect (static allow list, learned allow cache), TLS handshake (client certificate),
    MAIL FROM (SPF). Each stage can only *promote* a session, never demote it; the one
    transaction-level exception is a learned entry, which vouches only for the domain it was
    learned for (Evidence.mail_domain): a fast session that rests on it is judged afresh for a
    MAIL FROM of another domain (the acceptor demotes it for that transaction).

API
    AuthResult                 StrEnum pass|fail|softfail|neutral|none|temperror|permerror
                               (SPF and DKIM results, RFC 7208 / RFC 8601 spelling).
    CertResult                 StrEnum none|verified|pinned|untrusted.
    SpfPromote                 StrEnum any|listed|off.
    Evidence                   frozen dataclass; grow it with dataclasses.replace() or
                               the with_*() helpers as stages complete.
    ClassifyPolicy             frozen dataclass; the policy knobs (built from config).
    Decision(lane, reasons)    result of decide(); reasons are short stable tokens for logs
                               and trace headers ("static-allow", "spf-pass:example.com", ...).
    decide(evidence, policy) -> Decision
    promote(current_lane, decision) -> Lane   (FAST wins; never demotes)
    domain_matches(domain, listed) -> bool    (exact or subdomain, canonical names)
    StaticAllow.from_cidrs(cidrs).contains(ip) / .match(ip) -> the matching entry (CIDR) or None
    (The learned allow cache that feeds Evidence.learned_allow: ingress.policy.learned.)
    learned_vouches(evidence) -> bool   the learned entry vouches for this transaction's domain
    check_vouches(identity, evidence, policy) -> bool   a check's promotion holds (a learned
                               identity, e.g. a learned provider, by learned_vouches' rule)
    rests_on_learned(evidence) -> bool   a learned entry or a check's learned identity is part
                               of the evidence (a fast session's MAIL FROM must be judged again:
                               the acceptor's demotion for learned-mismatch)
    should_learn(spf, dkim_aligned_pass, spf_domain, policy) -> bool  (obeys spf_promote)
    dkim_vouches(spf_domain, aligned_passes) -> bool   learning's DKIM condition: a pass
                               aligned with From: whose d= is of the SPF domain's organisation
    should_unlearn(learned, rode, spf, aligned_dkim) -> reason | ""   (worker, after DKIM)
    Decision.identity          who vouched for a FAST decision (ingress.policy.identity):
                               allow entry > certificate > learned domain > SPF org domain.

Rules encoded here
    * static allow always promotes (it is explicit configuration);
    * learned allow promotes iff policy.learned_promotes, and, once a transaction has named
      its sender (Evidence.mail_domain: the SPF identity's domain), only if that domain's
      organisational domain is the one the entry was learned for; else it is noted
      ("learned-mismatch:<learned domain>") and the transaction is judged on its other evidence;
    * a VERIFIED or PINNED client certificate promotes iff policy.cert_promotes; UNTRUSTED and
      NONE never promote;
    * SPF PASS promotes per policy.spf_promote: "any" domain, "listed" (spf_domain equal to or
      a subdomain of a listed domain), or "off";
    * an evidence check's promotion (Evidence.checked: a DNS allow list, a provider identity;
      ingress.policy.checks) promotes; its other reason tokens are noted; one to a learned
      identity (a learned provider: learned:<domain>) is held to that domain like a learned
      entry (check_vouches; else noted "learned-mismatch:<domain>");
    * a FAST decision names its identity (ingress.policy.identity), from the strongest
      promoting evidence: the highest trust tier (ingress.policy.tiers), then the allow
      entry (Evidence.allow_entry), the certificate (Evidence.cert_fp), a check's identity,
      the learned entry's domain (Evidence.learned_domain), the SPF organisational domain;
      the shares of the fast lane are counted by it (the acceptor's session table, the fast
      broker), not here;
    * learning (should_learn) needs an SPF pass and a DKIM pass aligned with From: whose d= is
      of the SPF domain's organisation (dkim_vouches), and obeys the SPF promotion policy
      (ClassifyPolicy.spf_promotes);
      unlearning (should_unlearn): mail from a learned network with SPF fail/softfail, an
      aligned DKIM signature failing (fail, permerror) with none passing, or, when it rode the
      entry, no aligned DKIM signature at all; never on temperror;
    * every other SPF result (fail, softfail, neutral, none, permerror, temperror) neither
      promotes nor rejects: decide() only chooses a lane; it never produces a rejection.
      In particular TEMPERROR yields exactly the same decision as NONE.

Failure modes
    None at decide() time: all inputs are enums/bools validated at construction
    (ClassifyPolicy.__post_init__ raises ValueError on a bad spf_promote, an spf_domains
    entry that is not a valid domain name, or an SPF "listed" policy with no domains).
    Every domain is compared by its canonical name (ingress.core.addr.normalize_domain:
    UTS-46, A-labels); one that is not a valid name never promotes and is never learned.
    StaticAllow.from_cidrs raises ValueError naming an entry that is not a CIDR; match() and
    contains() answer None / False for anything that is not an address.

Limits
    * StaticAllow.match is O(entries of the client's family), cached per (address, list) for
      the last 65536 lookups (a flood repeats addresses).
    * The learned cache's bounds and clock: ingress.policy.learned.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from ingress.core.addr import normalize_domain, normalize_ip
from ingress.core.wire import AuthResult, Lane
from ingress.policy.checks import Verdict
from ingress.policy.identity import (
    aligned,
    allow_identity,
    cert_identity,
    learned_identity,
    org_domain,
    org_identity,
)
from ingress.policy.tiers import tier_of

__all__ = [
    "AuthResult",
    "CertResult",
    "ClassifyPolicy",
    "Decision",
    "Evidence",
    "SpfPromote",
    "StaticAllow",
    "decide",
    "dkim_vouches",
    "domain_matches",
    "promote",
    "should_learn",
]


class CertResult(StrEnum):
    """What the TLS layer knows about the client certificate."""

    NONE = "none"  # no certificate presented (or no TLS)
    VERIFIED = "verified"  # chain verified against the configured CA bundle
    PINNED = "pinned"  # SHA-256 fingerprint of the leaf is in the pinned set
    UNTRUSTED = "untrusted"  # presented, but neither verified nor pinned


class SpfPromote(StrEnum):
    ANY = "any"
    LISTED = "listed"
    OFF = "off"


def domain_matches(domain: str, listed: Iterable[str]) -> bool:
    """True if `domain` equals a listed domain or is a subdomain of one (canonical names:
    ingress.core.addr.normalize_domain; a name that is not a domain matches nothing)."""
    d = normalize_domain(domain)
    if not d:
        return False
    for entry in listed:
        e = normalize_domain(entry)
        if e and (d == e or d.endswith("." + e)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything known about a session so far. Defaults = nothing known (a fresh connect)."""

    static_allow: bool = False
    learned_allow: bool = False
    cert: CertResult = CertResult.NONE
    spf: AuthResult = AuthResult.NONE
    spf_domain: str | None = None  # domain SPF was evaluated for (MAIL FROM domain or HELO)
    allow_entry: str | None = None  # the static allow entry (CIDR) that matched, for identity
    cert_fp: str | None = None      # SHA-256 of the client certificate (hex), for identity
    learned_domain: str | None = None  # the domain the learned entry was learned for
    # The transaction's sender domain (the SPF identity: MAIL FROM domain, or the HELO name for
    # the null sender); None before MAIL FROM. A learned entry vouches only for its own domain.
    mail_domain: str | None = None
    # What the evidence checks concluded (ingress.policy.checks.Verdict, folded in by
    # with_verdict as each stage's checks end): the promotions (reason, identity), every
    # check's reason token, the bulk suspicion score, and their facts for the trace.
    checked: tuple[tuple[str, str], ...] = ()
    check_reasons: tuple[str, ...] = ()
    bulk_score: float = 0.0
    facts: tuple[tuple[str, str], ...] = ()

    def with_verdict(self, verdict: Verdict) -> Evidence:
        """This evidence and a stage's checks' verdict (evidence only adds: a later stage
        never removes an earlier promotion, score or fact)."""
        known = dict(self.facts)
        facts = (*self.facts, *((k, v) for k, v in verdict.facts if k not in known))
        checked = (*self.checked, (verdict.promotion, verdict.identity)) \
            if verdict.identity else self.checked
        return replace(self, checked=checked,
                       check_reasons=(*self.check_reasons, *verdict.reasons),
                       bulk_score=self.bulk_score + verdict.score, facts=facts)

    def with_cert(self, cert: CertResult, fingerprint: str | None = None) -> Evidence:
        return replace(self, cert=cert, cert_fp=fingerprint)

    def with_spf(self, spf: AuthResult, domain: str | None) -> Evidence:
        return replace(self, spf=spf, spf_domain=domain)


@dataclass(frozen=True, slots=True)
class ClassifyPolicy:
    spf_promote: SpfPromote | str = SpfPromote.ANY
    spf_domains: frozenset[str] = frozenset()
    cert_promotes: bool = True
    learned_promotes: bool = True

    def __post_init__(self) -> None:
        try:
            mode = SpfPromote(self.spf_promote)
        except ValueError:
            raise ValueError(
                f"spf_promote must be one of any|listed|off, not {self.spf_promote!r}"
            ) from None
        object.__setattr__(self, "spf_promote", mode)
        domains = frozenset(normalize_domain(d) for d in self.spf_domains if d.strip())
        if "" in domains:
            raise ValueError("spf_domains: an entry is not a valid domain name")
        object.__setattr__(self, "spf_domains", domains)
        if mode is SpfPromote.LISTED and not domains:
            raise ValueError("spf_promote = 'listed' needs at least one entry in spf_domains")

    def spf_promotes(self, domain: str) -> bool:
        """Does an SPF pass for `domain` promote (and may it be learned) under this policy?"""
        if not domain or self.spf_promote is SpfPromote.OFF:
            return False
        return self.spf_promote is SpfPromote.ANY or domain_matches(domain, self.spf_domains)


@dataclass(frozen=True, slots=True)
class Decision:
    lane: Lane
    reasons: tuple[str, ...]
    identity: str = ""   # who vouched for a FAST decision (ingress.policy.identity); "" for bulk


def decide(evidence: Evidence, policy: ClassifyPolicy) -> Decision:
    """Map evidence to a lane. Pure and total: every combination yields a Decision.

    reasons lists every piece of evidence that promoted (in a fixed order); for a bulk decision
    it lists why nothing promoted (notable non-promoting evidence, or "no-evidence").
    """
    promoting: list[str] = []
    noted: list[str] = []

    if evidence.static_allow:
        promoting.append("static-allow")
    if evidence.learned_allow:
        promotes = policy.learned_promotes and learned_vouches(evidence)
        (promoting if promotes else noted).append(
            "learned-allow" if promotes or not policy.learned_promotes
            else f"learned-mismatch:{evidence.learned_domain or '?'}")

    cert = evidence.cert
    if cert in (CertResult.VERIFIED, CertResult.PINNED):
        (promoting if policy.cert_promotes else noted).append(f"cert-{cert}")
    elif cert is CertResult.UNTRUSTED:
        noted.append("cert-untrusted")

    _checked(evidence, policy, promoting, noted)

    spf = evidence.spf
    dom = normalize_domain(evidence.spf_domain) if evidence.spf_domain else ""
    tag = f"spf-{spf}:{dom}" if dom else f"spf-{spf}"
    if spf is AuthResult.PASS:
        if policy.spf_promotes(dom):
            promoting.append(tag)
        else:
            noted.append(tag)
    elif spf is not AuthResult.NONE:
        # fail/softfail/neutral/permerror/temperror: recorded, never promote, never reject.
        noted.append(tag)

    if promoting:
        return Decision(Lane.FAST, tuple(promoting), _identity(evidence, policy, dom))
    return Decision(Lane.BULK, tuple(noted) or ("no-evidence",))


def _checked(evidence: Evidence, policy: ClassifyPolicy, promoting: list[str],
             noted: list[str]) -> None:
    """The checks' promotions (held by check_vouches) and their other reason tokens."""
    promoted = {reason for reason, _identity in evidence.checked}
    for reason, identity in evidence.checked:
        if check_vouches(identity, evidence, policy):
            promoting.append(reason)
        else:
            noted.extend((reason, f"learned-mismatch:{identity.partition(':')[2]}"))
    noted.extend(r for r in evidence.check_reasons if r not in promoted)


def _identity(evidence: Evidence, policy: ClassifyPolicy, spf_domain: str) -> str:
    """The strongest promoting evidence names the identity (called only for a FAST
    decision): the highest trust tier (ingress.policy.tiers), then in this order: the allow
    entry, the certificate, the checks' promotions (a DNS allow list, a provider), the learned
    domain, the SPF organisational domain."""
    candidates: list[str] = []
    if evidence.static_allow:
        candidates.append(allow_identity(evidence.allow_entry or "?"))
    if evidence.cert in (CertResult.VERIFIED, CertResult.PINNED) and policy.cert_promotes:
        candidates.append(cert_identity(evidence.cert_fp or "?"))
    candidates.extend(identity for _reason, identity in evidence.checked
                      if check_vouches(identity, evidence, policy))
    if evidence.learned_allow and policy.learned_promotes and learned_vouches(evidence):
        candidates.append(learned_identity(evidence.learned_domain or "?"))
    if spf_domain and evidence.spf is AuthResult.PASS and policy.spf_promotes(spf_domain):
        candidates.append(org_identity(spf_domain))
    return min(candidates, key=tier_of) if candidates else org_identity(spf_domain)


def learned_vouches(evidence: Evidence) -> bool:
    """Does the learned entry vouch for this session? At connect (no transaction yet:
    mail_domain None) provisionally yes; in a transaction only when the sender's organisational
    domain is the one the entry was learned for (an entry without a domain vouches for none)."""
    return _vouches(evidence.learned_domain, evidence.mail_domain)


def rests_on_learned(evidence: Evidence) -> bool:
    return evidence.learned_allow or any(
        identity.startswith("learned:") for _reason, identity in evidence.checked)


def check_vouches(identity: str, evidence: Evidence, policy: ClassifyPolicy) -> bool:
    """Does a check's promotion to `identity` hold for this session? A learned identity (a
    learned provider: ingress.policy.iprev) is held to its domain by the rule of a learned
    entry (learned_vouches), and promotes only where learned entries do; any other: yes."""
    kind, _, domain = identity.partition(":")
    return kind != "learned" or (policy.learned_promotes
                                 and _vouches(domain, evidence.mail_domain))


def _vouches(learned_domain: str | None, mail_domain: str | None) -> bool:
    if mail_domain is None:
        return True
    learned = org_domain(learned_domain or "")
    return bool(learned) and org_domain(mail_domain) == learned


def promote(current_lane: Lane, decision: Decision) -> Lane:
    """Stage transition for a live session: FAST is sticky; a decision can only raise the lane."""
    if current_lane == Lane.FAST or decision.lane == Lane.FAST:
        return Lane.FAST
    return Lane.BULK


def dkim_vouches(spf_domain: str | None, aligned_passes: Iterable[str]) -> bool:
    """Does one of these DKIM passes (the d= of signatures aligned with From:) vouch for the
    SPF domain, i.e. is of its organisation (ingress.policy.identity.aligned)? Learning's DKIM
    condition: the SPF pass and the signature then prove one organisation, the one learned (a
    signature of another domain proves nothing about it). In DMARC terms: From:, d= and the
    MAIL FROM domain all align (relaxed), whether or not the domain publishes a policy."""
    return bool(spf_domain) and any(aligned(d, spf_domain) for d in aligned_passes)


def should_learn(spf: AuthResult | str | None, dkim_aligned_pass: bool,
                 spf_domain: str | None, policy: ClassifyPolicy) -> bool:
    """A client is remembered only when SPF passed AND a DKIM signature aligned with From passed
    AND the promotion policy would promote an SPF pass for `spf_domain` (learning obeys the
    policy: "listed" learns listed domains only, "off" learns nothing). `spf` may be the wire's
    plain string (the envelope's evidence)."""
    return (spf == AuthResult.PASS and bool(dkim_aligned_pass)
            and policy.spf_promotes(normalize_domain(spf_domain or "")))


def _auth(result: AuthResult | str) -> AuthResult:
    try:
        return AuthResult(result)
    except ValueError:
        return AuthResult.NEUTRAL


_UNLEARN_SPF = frozenset({AuthResult.FAIL, AuthResult.SOFTFAIL})
_DKIM_BROKEN = frozenset({AuthResult.FAIL, AuthResult.PERMERROR})


def should_unlearn(learned: bool, rode: bool, spf: AuthResult | str | None,
                   aligned_dkim: Iterable[AuthResult | str]) -> str:
    """Why the learned entry of the client's network must go, or "" (keep it).

    `learned`: the client's network was learned when the session began; `rode`: this message
    was served fast on that entry (its identity learned:<domain>); `spf`: the transaction's SPF
    result (None: not evaluated); `aligned_dkim`: the results of the DKIM signatures aligned
    with the From: domain. Unlearned when:
      "spf-fail"      SPF says fail or softfail (the network sends mail its sender disowns);
      "dkim-fail"     an aligned signature fails or is broken (fail, permerror) and none passes;
      "dkim-missing"  the message rode the entry without an aligned signature at all: the entry
                      was learned with an aligned DKIM pass, and mail riding it must show one.
    Never on temperror (DNS trouble is nobody's evidence), neutral or none of SPF alone."""
    if not learned:
        return ""
    if spf in _UNLEARN_SPF:
        return "spf-fail"
    results = [_auth(r) for r in aligned_dkim]
    if AuthResult.PASS in results:
        return ""
    if any(r in _DKIM_BROKEN for r in results):
        return "dkim-fail"
    if rode and AuthResult.TEMPERROR not in results:
        return "dkim-missing"
    return ""


# --------------------------------------------------------------------------- static allow list


@dataclass(frozen=True, slots=True)
class StaticAllow:
    """A static allow list of CIDRs (IPv4 and IPv6). IPv4-mapped IPv6 clients match IPv4 nets."""

    v4: tuple[ipaddress.IPv4Network, ...] = ()
    v6: tuple[ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> StaticAllow:
        """Build from CIDR strings ("192.0.2.0/24", "2001:db8::/32", "198.51.100.7").

        Host bits set ("192.0.2.1/24") are accepted and masked. Raises ValueError naming the
        offending entry.
        """
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for c in cidrs:
            try:
                net = ipaddress.ip_network(c.strip(), strict=False)
            except ValueError as e:
                raise ValueError(f"invalid CIDR {c!r}: {e}") from None
            if isinstance(net, ipaddress.IPv4Network):
                v4.append(net)
            else:
                v6.append(net)
        return cls(tuple(v4), tuple(v6))

    def contains(self, ip: str) -> bool:
        return self.match(ip) is not None

    def match(self, ip: str) -> str | None:
        """The first entry (as a CIDR string) containing `ip`, or None."""
        if not self.v4 and not self.v6:
            return None
        return _in_networks(ip, self.v4, self.v6)


@functools.lru_cache(maxsize=65536)
def _in_networks(ip: str, v4: tuple[ipaddress.IPv4Network, ...],
                 v6: tuple[ipaddress.IPv6Network, ...]) -> str | None:
    try:
        addr = ipaddress.ip_address(normalize_ip(ip))
    except ValueError:
        return None
    nets: tuple[ipaddress.IPv4Network, ...] | tuple[ipaddress.IPv6Network, ...] = \
        v4 if isinstance(addr, ipaddress.IPv4Address) else v6
    return next((str(n) for n in nets if addr in n), None)
