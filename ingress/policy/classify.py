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
    domain_matches(domain, listed) -> bool    (exact or subdomain, case-insensitive)
    normalize_ip(ip) -> str                   (canonical text; IPv4-mapped IPv6 -> IPv4)
    StaticAllow.from_cidrs(cidrs).contains(ip)
    LearnedAllow(ttl, max_size): learn(ip, now) / add(ip, expires_at) / contains(ip, now)
                               / purge(now) / to_json() / LearnedAllow.from_json(data, ...)
    should_learn(spf, dkim_aligned_pass) -> bool

Rules encoded here
    * static allow always promotes (it is explicit configuration);
    * learned allow promotes iff policy.learned_promotes;
    * a VERIFIED or PINNED client certificate promotes iff policy.cert_promotes; UNTRUSTED and
      NONE never promote;
    * SPF PASS promotes per policy.spf_promote: "any" domain, "listed" (spf_domain equal to or
      a subdomain of a listed domain), or "off";
    * every other SPF result (fail, softfail, neutral, none, permerror, temperror) neither
      promotes nor rejects: decide() only chooses a lane; it never produces a rejection.
      In particular TEMPERROR yields exactly the same decision as NONE.

Failure modes
    None at decide() time: all inputs are enums/bools validated at construction
    (ClassifyPolicy.__post_init__ raises ValueError on a bad spf_promote or an SPF "listed"
    policy with no domains). LearnedAllow.from_json raises ValueError on a document that is
    not a LearnedAllow document; individual malformed entries are skipped.

Limits
    * `now` for LearnedAllow is wall-clock epoch seconds (time.time()) because the cache is
      persisted across restarts; do not feed it time.monotonic().
    * LearnedAllow is bounded by max_size; when full, the entry expiring soonest is evicted
      (O(log n) amortised, lazy-deletion heap).
    * Learned entries are per exact IP address (IPv6 included); no prefix aggregation.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from ingress.core.wire import AuthResult, Lane

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
    "normalize_domain",
    "normalize_ip",
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


def normalize_domain(domain: str) -> str:
    """Lower-case, strip surrounding whitespace and one trailing dot."""
    d = domain.strip().lower()
    return d[:-1] if d.endswith(".") else d


def domain_matches(domain: str, listed: Iterable[str]) -> bool:
    """True if `domain` equals a listed domain or is a subdomain of one (case-insensitive)."""
    d = normalize_domain(domain)
    if not d:
        return False
    for entry in listed:
        e = normalize_domain(entry)
        if e and (d == e or d.endswith("." + e)):
            return True
    return False


@functools.lru_cache(maxsize=65536)
def normalize_ip(ip: str) -> str:
    """Canonical text form of an IP address; IPv4-mapped IPv6 becomes plain IPv4.

    Raises ValueError for something that is not an IP address. A zone index (%eth0) is dropped.
    Cached (bounded): every connection parses its peer's address several times, and a flood
    repeats the same addresses.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0].strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything known about a session so far. Defaults = nothing known (a fresh connect)."""

    static_allow: bool = False
    learned_allow: bool = False
    cert: CertResult = CertResult.NONE
    spf: AuthResult = AuthResult.NONE
    spf_domain: str | None = None  # domain SPF was evaluated for (MAIL FROM domain or HELO)

    def with_cert(self, cert: CertResult) -> Evidence:
        return Evidence(self.static_allow, self.learned_allow, cert, self.spf, self.spf_domain)

    def with_spf(self, spf: AuthResult, domain: str | None) -> Evidence:
        return Evidence(self.static_allow, self.learned_allow, self.cert, spf, domain)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form (for the wire envelope and log lines)."""
        return {
            "static_allow": self.static_allow,
            "learned_allow": self.learned_allow,
            "cert": str(self.cert),
            "spf": str(self.spf),
            "spf_domain": self.spf_domain,
        }


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
        object.__setattr__(self, "spf_domains", domains)
        if mode is SpfPromote.LISTED and not domains:
            raise ValueError("spf_promote = 'listed' needs at least one entry in spf_domains")


@dataclass(frozen=True, slots=True)
class Decision:
    lane: Lane
    reasons: tuple[str, ...]


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
        if (policy.spf_promote is SpfPromote.ANY and dom) or (
            policy.spf_promote is SpfPromote.LISTED
            and dom
            and domain_matches(dom, policy.spf_domains)
        ):
            promoting.append(tag)
        else:
            noted.append(tag)
    elif spf is not AuthResult.NONE:
        # fail/softfail/neutral/permerror/temperror: recorded, never promote, never reject.
        noted.append(tag)

    if promoting:
        return Decision(Lane.FAST, tuple(promoting))
    return Decision(Lane.BULK, tuple(noted) or ("no-evidence",))


def promote(current_lane: Lane, decision: Decision) -> Lane:
    """Stage transition for a live session: FAST is sticky; a decision can only raise the lane."""
    if current_lane == Lane.FAST or decision.lane == Lane.FAST:
        return Lane.FAST
    return Lane.BULK


def should_learn(spf: AuthResult, dkim_aligned_pass: bool) -> bool:
    """A client is remembered only when SPF passed AND a DKIM signature aligned with From passed."""
    return spf is AuthResult.PASS and bool(dkim_aligned_pass)


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
        if not self.v4 and not self.v6:
            return False
        return _in_networks(ip, self.v4, self.v6)


@functools.lru_cache(maxsize=65536)
def _in_networks(ip: str, v4: tuple[ipaddress.IPv4Network, ...],
                 v6: tuple[ipaddress.IPv6Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(normalize_ip(ip))
    except ValueError:
        return False
    nets = v4 if isinstance(addr, ipaddress.IPv4Address) else v6
    return any(addr in n for n in nets)


# --------------------------------------------------------------------------- learned allow

_LEARNED_FORMAT = "smtp-ingress/learned-allow"
_LEARNED_VERSION = 1


@dataclass(slots=True)
class LearnedAllow:
    """IP -> expiry (epoch seconds), TTL'd and bounded. Mutable, single-threaded, no I/O.

    learn(ip, now)          remember ip until now + ttl (refreshes; never shortens).
    add(ip, expires_at)     merge an entry learned elsewhere (pub/sub, persisted state).
    contains(ip, now)       True while not expired.
    purge(now)              drop expired entries; returns how many.
    to_json() / from_json() persistence (state directory); expired entries are dropped on load.
    """

    ttl: float
    max_size: int
    _expiry: dict[str, float] = field(default_factory=dict)
    _heap: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ttl > 0:
            raise ValueError("LearnedAllow ttl must be > 0")
        if self.max_size < 1:
            raise ValueError("LearnedAllow max_size must be >= 1")

    def __len__(self) -> int:
        return len(self._expiry)

    def learn(self, ip: str, now: float) -> float:
        """Remember `ip` until now + ttl; returns the expiry (to publish to other acceptors).

        Raises ValueError if `ip` is not an IP address.
        """
        key = normalize_ip(ip)  # ValueError for a non-IP
        expires_at = now + self.ttl
        self.add(key, expires_at, now=now)
        return self._expiry.get(key, expires_at)

    def add(self, ip: str, expires_at: float, now: float | None = None) -> bool:
        """Merge an entry; keeps the later expiry. Returns False if ignored (expired/bad ip)."""
        try:
            key = normalize_ip(ip)
        except ValueError:
            return False
        if now is not None and expires_at <= now:
            return False
        old = self._expiry.get(key)
        if old is not None and old >= expires_at:
            return True
        if old is None and len(self._expiry) >= self.max_size:
            if now is not None:
                self.purge(now)
            if len(self._expiry) >= self.max_size:
                victim_exp = self._peek_soonest()
                if victim_exp is not None and victim_exp > expires_at:
                    return False  # the newcomer expires sooner than anything held: drop it
                self._evict_soonest()
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        self._compact_heap()
        return True

    def contains(self, ip: str, now: float) -> bool:
        try:
            key = normalize_ip(ip)
        except ValueError:
            return False
        exp = self._expiry.get(key)
        if exp is None:
            return False
        if exp <= now:
            del self._expiry[key]
            return False
        return True

    def expiry(self, ip: str) -> float | None:
        try:
            return self._expiry.get(normalize_ip(ip))
        except ValueError:
            return None

    def purge(self, now: float) -> int:
        removed = 0
        while self._heap and self._heap[0][0] <= now:
            exp, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == exp:
                del self._expiry[key]
                removed += 1
        # entries deleted lazily by contains() have stale heap items; they pop harmlessly.
        return removed

    def items(self) -> list[tuple[str, float]]:
        return sorted(self._expiry.items())

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _LEARNED_FORMAT,
                "version": _LEARNED_VERSION,
                "ttl": self.ttl,
                "entries": dict(self.items()),
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
        if doc.get("version") != _LEARNED_VERSION:
            raise ValueError(f"unsupported learned-allow version {doc.get('version')!r}")
        cache = cls(ttl=ttl, max_size=max_size)
        for ip, exp in doc["entries"].items():
            if not isinstance(ip, str) or isinstance(exp, bool) or not isinstance(exp, int | float):
                continue
            cache.add(ip, min(float(exp), now + ttl), now=now)
        return cache

    # -- internals

    def _peek_soonest(self) -> float | None:
        while self._heap:
            exp, key = self._heap[0]
            if self._expiry.get(key) == exp:
                return exp
            heapq.heappop(self._heap)  # stale
        return None

    def _evict_soonest(self) -> None:
        while self._heap:
            exp, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == exp:
                del self._expiry[key]
                return

    def _compact_heap(self) -> None:
        # Refreshes leave stale heap items; rebuild when they dominate so memory stays bounded.
        if len(self._heap) > 2 * len(self._expiry) + 64:
            self._heap = [(e, k) for k, e in self._expiry.items()]
            heapq.heapify(self._heap)
