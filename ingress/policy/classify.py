"""Classification policy: evidence about a session -> lane (pure; no I/O, clock as an argument).

Purpose
    Decide whether a live SMTP session belongs in the fast lane (held capacity, never
    rate-capped) or the bulk lane, from evidence that arrives in stages, each only promoting:
    connect (static allow list, learned allow cache), TLS handshake (client certificate),
    MAIL FROM (SPF). Each stage can only *promote* a session, never demote it.

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
    LearnedAllow(ttl, max_size): learn(ip, now, domain) / add(ip, expires_at, domain=)
                               / contains(ip, now) / domain(ip) / purge(now) / to_json()
                               / LearnedAllow.from_json(data, ...) (document versions 1 and 2)
    should_learn(spf, dkim_aligned_pass, spf_domain, policy) -> bool  (obeys spf_promote)
    Decision.identity          who vouched for a FAST decision (ingress.policy.identity):
                               allow entry > certificate > learned domain > SPF org domain.

Rules encoded here
    * static allow always promotes (it is explicit configuration);
    * learned allow promotes iff policy.learned_promotes;
    * a VERIFIED or PINNED client certificate promotes iff policy.cert_promotes; UNTRUSTED and
      NONE never promote;
    * SPF PASS promotes per policy.spf_promote: "any" domain, "listed" (spf_domain equal to or
      a subdomain of a listed domain), or "off";
    * a FAST decision names its identity (ingress.policy.identity), from the strongest
      promoting evidence: the allow entry (Evidence.allow_entry), the certificate
      (Evidence.cert_fp), the learned entry's domain (Evidence.learned_domain), the SPF
      organisational domain; the shares of the fast lane are counted by it (the acceptor's
      session table, the fast broker), not here;
    * learning (should_learn) obeys the SPF promotion policy (ClassifyPolicy.spf_promotes);
    * every other SPF result (fail, softfail, neutral, none, permerror, temperror) neither
      promotes nor rejects: decide() only chooses a lane; it never produces a rejection.
      In particular TEMPERROR yields exactly the same decision as NONE.

Failure modes
    None at decide() time: all inputs are enums/bools validated at construction
    (ClassifyPolicy.__post_init__ raises ValueError on a bad spf_promote, an spf_domains
    entry that is not a valid domain name, or an SPF "listed" policy with no domains).
    Every domain is compared by its canonical name (ingress.core.addr.normalize_domain:
    UTS-46, A-labels); one that is not a valid name never promotes and is never learned.
    LearnedAllow.from_json raises ValueError on a document that is not a LearnedAllow
    document; individual malformed entries are skipped.

Limits
    * `now` for LearnedAllow is wall-clock epoch seconds (time.time()) because the cache is
      persisted across restarts; do not feed it time.monotonic().
    * LearnedAllow is bounded by max_size; when full, the entry expiring soonest is evicted
      (O(log n) amortised, lazy-deletion heap).
    * Learned entries are per exact IP address (IPv6 included); no prefix aggregation.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from ingress.core.addr import normalize_domain, normalize_ip
from ingress.core.expiry import ExpiryMap
from ingress.core.wire import AuthResult, Lane
from ingress.policy.identity import (
    allow_identity,
    cert_identity,
    learned_identity,
    org_domain,
    org_identity,
)

__all__ = [
    "AuthResult",
    "CertResult",
    "ClassifyPolicy",
    "Decision",
    "Evidence",
    "LearnedAllow",
    "SpfPromote",
    "StaticAllow",
    "decide",
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
        (promoting if policy.learned_promotes else noted).append("learned-allow")

    cert = evidence.cert
    if cert in (CertResult.VERIFIED, CertResult.PINNED):
        (promoting if policy.cert_promotes else noted).append(f"cert-{cert}")
    elif cert is CertResult.UNTRUSTED:
        noted.append("cert-untrusted")

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


def _identity(evidence: Evidence, policy: ClassifyPolicy, spf_domain: str) -> str:
    """The strongest promoting evidence names the identity: allow entry, certificate, learned
    domain, SPF organisational domain (called only for a FAST decision)."""
    if evidence.static_allow:
        return allow_identity(evidence.allow_entry or "?")
    if evidence.cert in (CertResult.VERIFIED, CertResult.PINNED) and policy.cert_promotes:
        return cert_identity(evidence.cert_fp or "?")
    if evidence.learned_allow and policy.learned_promotes:
        return learned_identity(evidence.learned_domain or "?")
    return org_identity(spf_domain)


def promote(current_lane: Lane, decision: Decision) -> Lane:
    """Stage transition for a live session: FAST is sticky; a decision can only raise the lane."""
    if current_lane == Lane.FAST or decision.lane == Lane.FAST:
        return Lane.FAST
    return Lane.BULK


def should_learn(spf: AuthResult | str | None, dkim_aligned_pass: bool,
                 spf_domain: str | None, policy: ClassifyPolicy) -> bool:
    """A client is remembered only when SPF passed AND a DKIM signature aligned with From passed
    AND the promotion policy would promote an SPF pass for `spf_domain` (learning obeys the
    policy: "listed" learns listed domains only, "off" learns nothing). `spf` may be the wire's
    plain string (the envelope's evidence)."""
    return (spf == AuthResult.PASS and bool(dkim_aligned_pass)
            and policy.spf_promotes(normalize_domain(spf_domain or "")))


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


# --------------------------------------------------------------------------- learned allow

_LEARNED_FORMAT = "smtp-ingress/learned-allow"
_LEARNED_VERSION = 2   # 2: entries are {"exp": expiry, "domain": org domain}; 1 (ip -> expiry)
                       # still loads, its entries with domain "" (identity "learned:")


@dataclass(slots=True)
class LearnedAllow:
    """IP -> expiry (epoch seconds), TTL'd and bounded (ingress.core.expiry.ExpiryMap).

    learn(ip, now, domain)  remember ip until now + ttl (refreshes; never shortens), for the
                            organisational domain it was learned for (its identity and share).
    add(ip, expires_at, domain=...)  merge an entry learned elsewhere (pub/sub, persisted state).
    contains(ip, now)       True while not expired.
    domain(ip)              the domain the entry was learned for ("" if unknown).
    purge(now)              drop expired entries; returns how many.
    to_json() / from_json() persistence (state directory); expired entries are dropped on load.
    """

    ttl: float
    max_size: int
    _map: ExpiryMap = field(init=False)
    _domains: dict[str, str] = field(init=False)   # ip -> org domain (pruned with the map)

    def __post_init__(self) -> None:
        if not self.ttl > 0:
            raise ValueError("LearnedAllow ttl must be > 0")
        if self.max_size < 1:
            raise ValueError("LearnedAllow max_size must be >= 1")
        self._map = ExpiryMap(self.max_size)
        self._domains = {}

    def __len__(self) -> int:
        return len(self._map)

    def learn(self, ip: str, now: float, domain: str = "") -> float:
        """Remember `ip` until now + ttl; returns the expiry (to publish to other acceptors).

        Raises ValueError if `ip` is not an IP address.
        """
        key = normalize_ip(ip)  # ValueError for a non-IP
        expires_at = now + self.ttl
        self.add(key, expires_at, now=now, domain=domain)
        held = self._map.peek(key)
        return expires_at if held is None else held

    def add(self, ip: str, expires_at: float, now: float | None = None,
            domain: str = "") -> bool:
        """Merge an entry; keeps the later expiry. Returns False if ignored (expired/bad ip).
        A non-empty `domain` (reduced to its organisational domain) replaces the recorded one."""
        try:
            key = normalize_ip(ip)
        except ValueError:
            return False
        ok = self._map.put(key, expires_at, now)
        if ok and domain:
            self._domains[key] = org_domain(domain)
            if len(self._domains) > 2 * self.max_size:   # evicted entries' domains: prune
                held = {k for k, _ in self._map.items()}
                self._domains = {k: v for k, v in self._domains.items() if k in held}
        return ok

    def domain(self, ip: str) -> str:
        try:
            key = normalize_ip(ip)
        except ValueError:
            return ""
        return self._domains.get(key, "") if self._map.peek(key) is not None else ""

    def contains(self, ip: str, now: float) -> bool:
        try:
            key = normalize_ip(ip)
        except ValueError:
            return False
        return self._map.get(key, now) is not None

    def expiry(self, ip: str) -> float | None:
        try:
            return self._map.peek(normalize_ip(ip))
        except ValueError:
            return None

    def purge(self, now: float) -> int:
        return self._map.purge(now)

    def items(self) -> list[tuple[str, float]]:
        return self._map.items()

    @property
    def _heap(self) -> list[tuple[float, str]]:
        """The map's expiry heap (tests check that refreshes keep it bounded)."""
        return self._map._heap

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _LEARNED_FORMAT,
                "version": _LEARNED_VERSION,
                "ttl": self.ttl,
                "entries": {ip: {"exp": exp, "domain": self._domains.get(ip, "")}
                            for ip, exp in self.items()},
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, data: str | bytes, *, ttl: float, max_size: int, now: float) -> LearnedAllow:
        """Load a persisted cache. The configured ttl/max_size win over the stored ones.

        Expired and malformed entries are skipped; expiries further away than now + ttl are
        clamped (a shortened TTL in config takes effect at once). Raises ValueError if `data`
        is not a LearnedAllow document.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"learned-allow state is not JSON: {e}") from None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != _LEARNED_FORMAT
            or not isinstance(doc.get("entries"), dict)
        ):
            raise ValueError("not a learned-allow state document")
        version = doc.get("version")
        if version not in (1, _LEARNED_VERSION):
            raise ValueError(f"unsupported learned-allow version {version!r}")
        cache = cls(ttl=ttl, max_size=max_size)
        for ip, entry in doc["entries"].items():
            exp, domain = (entry, "") if version == 1 or not isinstance(entry, dict) \
                else (entry.get("exp"), entry.get("domain"))
            if not isinstance(ip, str) or isinstance(exp, bool) or not isinstance(exp, int | float):
                continue
            cache.add(ip, min(float(exp), now + ttl), now=now,
                      domain=domain if isinstance(domain, str) else "")
        return cache
