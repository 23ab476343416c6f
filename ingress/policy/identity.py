"""Identities of promoted sessions and their shares of the fast lane (pure; no I/O).

Purpose
    Every session promoted to the fast lane carries an *identity*: who vouched for it. No
    identity may hold more than a configured share (classify.identity_share) of the fast lane's
    slots, queue or worker throughput; beyond it the session or message is served as bulk
    (never refused). A spammer who publishes SPF for its own domain, or gets its IPs learned,
    is then one identity among many instead of the owner of the reserve.

API
    org_domain(domain) -> str          organisational domain by the Public Suffix List
                                       ("mail.example.co.uk" -> "example.co.uk"); a name that is
                                       itself a public suffix or single label maps to itself.
                                       Of the canonical name (ingress.core.addr.normalize_domain:
                                       A-labels, so fullwidth "spam.test", "spam<U+3002>test"
                                       and "SPAM.test." are all "spam.test"; "bücher.test" is
                                       "xn--bcher-kva.test"): every identity, share, domain
                                       rate, learned entry and metrics label built from it is
                                       one key per DNS name, however it was spelled.
    registrable(domain) -> str         the organisational domain when there is one, else "" (a
                                       public suffix or a single label is nobody's: FCrDNS
                                       provider identities, ingress.policy.iprev)
    aligned(domain_a, domain_b) -> bool relaxed alignment (RFC 7489 3.1.1): both names valid and
                                       of the same organisational domain. The one rule for
                                       DKIM d= with From: (workers.lane.dkim_check, learning) and
                                       with the MAIL FROM domain (ingress.policy.dsn: which
                                       senders may get a DSN). d=github.io never aligns with
                                       x.github.io: a public suffix is nobody's organisation.
    allow_identity(entry) / cert_identity(fingerprint) / org_identity(domain)
    / learned_identity(domain) -> str  the identity strings: "allow:<CIDR entry>",
                                       "cert:<sha256 hex>", "org:<org domain>",
                                       "learned:<org domain>".
    share_key(identity) -> str         the budget an identity counts against: a learned entry
                                       shares its domain's budget ("learned:x" -> "org:x").
    identity_kind(identity) -> str     "allow" | "cert" | "org" | "learned" | "other" (a label)
    share_bound(total, share) -> int   how many of `total` units one identity may hold
                                       (at least 1: a share never locks an identity out).
    over_share(held, total, share) -> bool   would one more unit take it over its bound?
    fast_slots(max_connections, fast_reserve) -> int   the slots an identity's share is of:
                                       the fast reserve (what nobody may capture), or every
                                       slot when there is no reserve
    over_share_reason(identity) -> str "over-share:<share key>" (Decision.reasons / logs).
    rate_bounded(key) -> bool          is this share key held to classify.domain_rate? Only
                                       domain identities ("org:", which learned entries count
                                       against): they vouch for themselves with their own SPF.
                                       Allow entries and certificates are the operator's trust.
    over_rate_reason(identity) -> str  "over-rate:<share key>": its domain is over
                                       classify.domain_rate (served as bulk).
    (classify.domain_rate's split between acceptors and the fast broker: ingress.core.derived
    domain_buckets)
    RATE_TRACKED                       domains whose rate one process tracks at once (the
                                       acceptors' and the fast broker's buckets: LRU)
    served_over_share(reasons) -> bool left bulk for either of the two (served, not refused).
    warm()                             build the PSL now: every process that judges names calls
                                       it in its set-up (the acceptors' context, the workers'
                                       pipeline), before it serves and before its heap is
                                       frozen (ingress.core.child.settle_heap)

Failure modes: none; empty or malformed domains (not a valid domain name) map to ""
(org_identity("") is "org:"): never a distinct key, and never promoted (classify: an SPF
pass for "" does not promote).
Limits: org_domain caches 4096 names (an attacker controls the names: bounded LRU). The PSL
(publicsuffixlist, bundled data, I/O-free after import) is built once per process, by warm() at
set-up: about 55 ms of CPU idle, and measured at 200-240 ms on a loaded 2-core machine when a
replacement fast worker built it at its first message (a reload under a flood: every message it
took meanwhile waited for it).
"""

from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList

from ingress.core.addr import normalize_domain

__all__ = [
    "RATE_TRACKED",
    "aligned",
    "allow_identity",
    "cert_identity",
    "fast_slots",
    "identity_kind",
    "learned_identity",
    "org_domain",
    "org_identity",
    "over_rate_reason",
    "over_share",
    "over_share_reason",
    "rate_bounded",
    "registrable",
    "served_over_share",
    "share_bound",
    "share_key",
    "warm",
]

KINDS = ("allow", "cert", "org", "learned")
RATE_TRACKED = 4096


@functools.cache
def _psl() -> PublicSuffixList:
    """The Public Suffix List, parsed once per process (about 10k rules: not per session)."""
    return PublicSuffixList()


def warm() -> None:
    """Build what org_domain needs now, not at the first name a client sends."""
    _psl()


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    d = normalize_domain(domain)
    if not d:
        return ""
    org = _psl().privatesuffix(d)
    return str(org) if org else d


def registrable(domain: str) -> str:
    d = normalize_domain(domain)
    org = _psl().privatesuffix(d) if d else None
    return str(org) if org else ""


def aligned(domain_a: str, domain_b: str | None) -> bool:
    """Relaxed alignment (RFC 7489 3.1.1): the same organisational domain, of canonical names;
    an empty or invalid name aligns with nothing."""
    if not domain_a or not domain_b:
        return False
    org = org_domain(domain_a)
    return bool(org) and org == org_domain(domain_b)


def allow_identity(entry: str) -> str:
    return f"allow:{entry}"


def cert_identity(fingerprint: str) -> str:
    return f"cert:{fingerprint.lower()}"


def org_identity(domain: str) -> str:
    return f"org:{org_domain(domain)}"


def learned_identity(domain: str) -> str:
    return f"learned:{org_domain(domain)}"


def share_key(identity: str) -> str:
    if identity.startswith("learned:"):
        return "org:" + identity[len("learned:"):]
    return identity


def identity_kind(identity: str) -> str:
    kind = identity.partition(":")[0]
    return kind if kind in KINDS else "other"


def share_bound(total: int, share: float) -> int:
    return max(1, int(total * share))


def over_share(held: int, total: int, share: float) -> bool:
    return held + 1 > share_bound(total, share)


def fast_slots(max_connections: int, fast_reserve: int) -> int:
    return fast_reserve or max_connections


OVER_SHARE = "over-share:"
OVER_RATE = "over-rate:"


def over_share_reason(identity: str) -> str:
    return f"{OVER_SHARE}{share_key(identity)}"


def rate_bounded(key: str) -> bool:
    return key.startswith("org:")


def over_rate_reason(identity: str) -> str:
    return f"{OVER_RATE}{share_key(identity)}"


def served_over_share(reasons: tuple[str, ...]) -> bool:
    """Was this decision left bulk because its identity was over its share of the slots
    (over_share_reason) or its domain over its rate (over_rate_reason)? Such a client is
    served as bulk, never refused for it."""
    return any(r.startswith((OVER_SHARE, OVER_RATE)) for r in reasons)
