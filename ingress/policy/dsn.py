"""Who may get a delivery status notification (pure; no I/O, the clock an argument).

Purpose
    A DSN goes to the envelope sender, which for spam is forged: every DSN to an address that
    did not send the message is backscatter from the operator's MTA. The relay asks this module,
    for each message with newly failed recipients, whether to spool a DSN, and why not.

API
    ReturnPath(spf, spf_domain, dkim_pass)  what the ingress proved about the message: the SPF
                                        result and the domain it was evaluated for (the
                                        acceptor's, in the spool envelope's evidence .spf,
                                        .spf_domain), the canonical d= of every DKIM signature
                                        that passed (the worker's, evidence .dkim_pass)
    return_path(evidence) -> ReturnPath the spool envelope's evidence (a WireEvidence, or the
                                        spool file's undecoded object: decoded here by its one
                                        codec, WireEvidence.from_wire); bounded (at most
                                        DKIM_PASS_MAX domains), never raises
    authenticated_by(sender_domain, rp) -> str
                                        "operator" (the client was the operator's own: the
                                        allow list or a certificate, which vouch for what it
                                        relays), "spf" (SPF pass for exactly the MAIL FROM domain),
                                        "dkim:<d>" (a DKIM pass whose d= is aligned with it,
                                        ingress.policy.identity.aligned: relaxed, by the Public
                                        Suffix List), or "" (not authenticated)
    DsnLimits(per_hour, max_keys=DSN_TRACKED)   the rate state: per destination organisational
                                        domain, at most per_hour DSNs at once, refilled at
                                        per_hour an hour (ingress.core.ratelimit.KeyedBuckets
                                        with keep_partial)
    decide(mode, sender, rp, limits, now, sendable=True) -> Decision(send, result, why, domain)
        mode: relay.dsn (ingress.core.config.DSN_MODES). In this order:
          null sender                      -> no DSN, NULL_SENDER (never bounce a bounce)
          mode "never"                     -> SUPPRESSED_NEVER
          not sendable (the relay's address check), or a MAIL FROM domain that is not a valid
          name (an address literal, garbage)                       -> UNSENDABLE
          mode "authenticated" and not authenticated_by(...)       -> SUPPRESSED_UNAUTHENTICATED
          the destination organisational domain over its rate      -> RATE_LIMITED
          the rate table full of domains still being limited        -> RATE_TABLE_FULL
          otherwise                                                -> SENT (why: "spf",
                                                                      "dkim:<d>" or "always")
        Only a decision that reaches the rate check spends a token, and only SENT does.
    RESULTS                             every Decision.result value (the metric's labels)

Rules and why
    * SPF must pass for the MAIL FROM domain itself (the envelope's spf_domain, compared by
      canonical name, ingress.core.addr.normalize_domain): a pass for the HELO name (the null
      sender's identity) or for another spelling never counts.
    * DKIM: a pass with d= aligned with the MAIL FROM domain (the DMARC relaxed rule), so the
      domain that the DSN goes to signed the message. A pass for an unrelated d= (a mailing
      list, a spammer's own domain) proves nothing about the return path.
    * The rate key is the organisational domain of the destination (canonical; every spelling
      and every subdomain of one registrable domain is one key): an attacker who can make DSNs
      at all (a replayed DKIM-signed message, relay.dsn = "always") gets at most per_hour of
      them to one victim an hour, however many subdomains or spellings he uses. The table
      holds DSN_TRACKED domains; a domain still being limited is never forgotten to make room
      (a thousand other domains cannot reset a victim's bucket): a newcomer is then refused
      (RATE_TABLE_FULL) until the oldest refills.

Failure modes: none raised; malformed evidence (WireEvidence.from_wire raised WireError: a
wrong type or an oversize value anywhere in it) reads as "nothing proven".
Limits: the rate state is per relay process and in memory (a restart forgets it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ingress.core.addr import normalize_domain
from ingress.core.headers import spf_identity
from ingress.core.ratelimit import KeyedBuckets
from ingress.core.wire import AuthResult, WireError, WireEvidence
from ingress.policy.identity import aligned, org_domain
from ingress.policy.tiers import Tier, fast_tier

__all__ = [
    "DKIM_PASS_MAX",
    "DSN_TRACKED",
    "RESULTS",
    "Decision",
    "DsnLimits",
    "Result",
    "ReturnPath",
    "authenticated_by",
    "decide",
    "return_path",
]

DSN_TRACKED = 4096          # destination domains whose DSN rate one relay tracks at once
DKIM_PASS_MAX = 8           # passing d= domains read from one envelope (the worker checks 5)


class Result(StrEnum):
    """Decision.result: the label of smtp_ingress_relay_dsn_decisions_total."""

    SENT = "sent"
    NULL_SENDER = "null_sender"
    SUPPRESSED_NEVER = "suppressed_never"
    UNSENDABLE = "unsendable"
    SUPPRESSED_UNAUTHENTICATED = "suppressed_unauthenticated"
    RATE_LIMITED = "rate_limited"
    RATE_TABLE_FULL = "rate_table_full"


RESULTS = tuple(r.value for r in Result)


@dataclass(frozen=True)
class ReturnPath:
    spf: str = ""                       # AuthResult value; "" = not evaluated
    spf_domain: str = ""                # canonical; "" = none (or the HELO identity)
    dkim_pass: tuple[str, ...] = ()     # canonical d= of the passing signatures
    operator: bool = False              # the client was the operator's (allow list,
                                        # certificate): its return paths are vouched for


@dataclass(frozen=True)
class Decision:
    send: bool
    result: Result
    why: str            # for the log: how the return path was authenticated, or why no DSN
    domain: str = ""    # the rate key: the destination's organisational domain ("" = none)


def return_path(evidence: object) -> ReturnPath:
    """The spool envelope's evidence (ingress.core.wire.Envelope.evidence, or its undecoded
    object read back from the spool file) as a ReturnPath; anything malformed: not proven."""
    if not isinstance(evidence, WireEvidence):
        try:
            evidence = WireEvidence.from_wire(evidence)
        except WireError:
            return ReturnPath()
    passes: list[str] = []
    for d in evidence.dkim_pass[:DKIM_PASS_MAX]:
        canon = normalize_domain(d)
        if canon and canon not in passes:
            passes.append(canon)
    identity = evidence.identity
    return ReturnPath(spf=evidence.spf.value if evidence.spf else "",
                      spf_domain=normalize_domain(evidence.spf_domain),
                      dkim_pass=tuple(passes),
                      operator=bool(identity) and fast_tier(identity) is Tier.OPERATOR)


def authenticated_by(sender_domain: str, rp: ReturnPath) -> str:
    """How the return path (canonical MAIL FROM domain) is authenticated: "spf", "dkim:<d>",
    or "" when it is not."""
    if not sender_domain:
        return ""
    if rp.operator:
        return "operator"
    if rp.spf == AuthResult.PASS and rp.spf_domain == sender_domain:
        return "spf"
    for d in rp.dkim_pass:
        if aligned(d, sender_domain):
            return f"dkim:{d}"
    return ""


def _unauthenticated_why(sender_domain: str, rp: ReturnPath) -> str:
    spf = rp.spf or "not evaluated"
    if rp.spf and rp.spf_domain != sender_domain:
        spf += f" for {rp.spf_domain or 'the HELO name'}"
    dkim = (f"dkim pass only for {','.join(rp.dkim_pass)} (not aligned)" if rp.dkim_pass
            else "no dkim pass")
    return f"return path not authenticated: spf={spf}, {dkim}"


class DsnLimits:
    """DSNs per destination organisational domain: per_hour at once, refilled at per_hour an
    hour; at most max_keys domains, none forgotten while it is being limited."""

    __slots__ = ("buckets", "per_hour")

    def __init__(self, per_hour: float, max_keys: int = DSN_TRACKED) -> None:
        self.per_hour = per_hour
        self.buckets = KeyedBuckets(per_hour / 3600.0, max(1.0, per_hour), max_keys,
                                    keep_partial=True)

    def take(self, domain: str, now: float) -> Result:
        """SENT when a DSN to `domain` (an organisational domain) may go now (a token spent),
        else RATE_LIMITED or RATE_TABLE_FULL."""
        known = domain in self.buckets
        if self.buckets.take(domain, now):
            return Result.SENT
        return Result.RATE_LIMITED if known else Result.RATE_TABLE_FULL

    def __len__(self) -> int:
        return len(self.buckets)


def decide(mode: str, sender: str, rp: ReturnPath, limits: DsnLimits, now: float,
           sendable: bool = True) -> Decision:
    """Send a DSN to `sender` (the envelope sender, "" = null) or not; see the module
    docstring for the order of the rules. `now`: a monotonic clock (the rate)."""
    if sender == "":
        return Decision(False, Result.NULL_SENDER, "null sender: never bounce a bounce")
    if mode == "never":
        return Decision(False, Result.SUPPRESSED_NEVER, 'relay.dsn = "never"')
    kind, domain = spf_identity(sender, "")
    if not sendable or kind != "mailfrom" or not domain:
        why = "address cannot be sent" if not sendable else "not a valid domain name"
        return Decision(False, Result.UNSENDABLE, why)
    org = org_domain(domain)
    if mode == "always":
        how = "always"
    else:
        how = authenticated_by(domain, rp)
        if not how:
            return Decision(False, Result.SUPPRESSED_UNAUTHENTICATED,
                            _unauthenticated_why(domain, rp), org)
    got = limits.take(org, now)
    if got is Result.RATE_LIMITED:
        return Decision(False, got, f"over relay.dsn_rate ({limits.per_hour:g}/h) for {org}",
                        org)
    if got is Result.RATE_TABLE_FULL:
        return Decision(False, got, f"rate table full ({len(limits)} domains being limited)",
                        org)
    return Decision(True, Result.SENT, how, org)
