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
    LearnedAllow(ttl, max_size, per_domain, per_net, ipv6_prefix): learn(ip, now, domain)
                               / add(ip, expires_at, domain=) / contains(ip, now) / domain(ip)
                               / unlearn(ip) / key(ip) / take_evicted() / purge(now) / to_json()
                               / LearnedAllow.from_json(data, ...) (document versions 1 to 3)
    learned_vouches(evidence) -> bool   the learned entry vouches for this transaction's domain
    should_learn(spf, dkim_aligned_pass, spf_domain, policy) -> bool  (obeys spf_promote)
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
    * a FAST decision names its identity (ingress.policy.identity), from the strongest
      promoting evidence: the allow entry (Evidence.allow_entry), the certificate
      (Evidence.cert_fp), the learned entry's domain (Evidence.learned_domain), the SPF
      organisational domain; the shares of the fast lane are counted by it (the acceptor's
      session table, the fast broker), not here;
    * learning (should_learn) obeys the SPF promotion policy (ClassifyPolicy.spf_promotes);
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
    LearnedAllow.from_json raises ValueError on a document that is not a LearnedAllow
    document; individual malformed entries are skipped.

Limits
    * `now` for LearnedAllow is wall-clock epoch seconds (time.time()) because the cache is
      persisted across restarts; do not feed it time.monotonic().
    * LearnedAllow entries are per network: an IPv4 address, an IPv6 /ipv6_prefix
      (admission.ipv6_prefix). At most per_net of them per IPv4 /24 or IPv6 /48, per_domain
      per domain, max_size in all; eviction is by quota (whoever is over loses its oldest; when
      full, the domain with the most entries), never by global soonest expiry. O(per_domain +
      per_net) per new entry, O(1) per lookup. An attacker with more domains and /48s than
      max_size / per_domain can still turn the cache over, each entry costing it a delivered
      message with SPF and aligned DKIM passing. Entries without a domain (document version 1)
      share the quota of the domain "" and vouch for no transaction.
    * One entry holds one domain: a network learned for two domains (a shared IP of an ESP)
      holds the latest; the other domain's mail is judged afresh (its own SPF).
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from ingress.core.addr import (
    ip_key,
    normalize_domain,
    normalize_ip,
    parse_ip,
    site_key,
)
from ingress.core.expiry import ExpiryMap
from ingress.core.tally import Groups
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
    # The transaction's sender domain (the SPF identity: MAIL FROM domain, or the HELO name for
    # the null sender); None before MAIL FROM. A learned entry vouches only for its own domain.
    mail_domain: str | None = None

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
    if evidence.learned_allow and policy.learned_promotes and learned_vouches(evidence):
        return learned_identity(evidence.learned_domain or "?")
    return org_identity(spf_domain)


def learned_vouches(evidence: Evidence) -> bool:
    """Does the learned entry vouch for this session? At connect (no transaction yet:
    mail_domain None) provisionally yes; in a transaction only when the sender's organisational
    domain is the one the entry was learned for (an entry without a domain vouches for none)."""
    if evidence.mail_domain is None:
        return True
    learned = org_domain(evidence.learned_domain or "")
    return bool(learned) and org_domain(evidence.mail_domain) == learned


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


# --------------------------------------------------------------------------- learned allow

_LEARNED_FORMAT = "smtp-ingress/learned-allow"
_LEARNED_VERSION = 3   # 3: entries keyed by network (ip_key: IPv4 address, IPv6 /ipv6_prefix),
                       # {"exp": expiry, "domain": org domain}; 2 (the same keyed by address)
                       # and 1 (ip -> expiry, domain "") still load, re-keyed by network
LEARNED_PER_DOMAIN = 16   # default classify.learned_per_domain
LEARNED_PER_NET = 16      # default classify.learned_per_net
EVICTED_KEPT = 1024       # quota evictions remembered for take_evicted() (beyond: dropped)


@functools.lru_cache(maxsize=65536)
def _entry(ip: str, ipv6_prefix: int) -> tuple[str, str]:
    """(LearnedAllow.key, its network group) of an address or a key; ValueError for anything
    else. Cached: every connection asks, and a flood repeats addresses."""
    if "/" in ip:
        try:
            net = ipaddress.ip_network(ip.strip(), strict=False)
        except ValueError:
            raise ValueError(f"not an address or network: {ip[:60]!r}") from None
        if net.version == 4 and net.prefixlen != 32:
            raise ValueError(f"not an IPv4 address: {ip[:60]!r}")
        addr = parse_ip(net.network_address)
    else:
        addr = parse_ip(ip)
    text = str(addr)
    return ip_key(text, ipv6_prefix), site_key(text, ipv6_prefix)



@dataclass(slots=True)
class LearnedAllow:
    """Network -> (expiry (epoch seconds), org domain), TTL'd and bounded by quotas.

    An entry is keyed by the client's network (ingress.core.addr.ip_key: the IPv4 address, the
    IPv6 /ipv6_prefix network), so one IPv6 /64 is one entry however many addresses it uses.
    Bounds, each enforced when a new entry arrives by evicting the *oldest* (soonest-expiring)
    entry of whoever is over: the newcomer's network group (IPv4 /24, IPv6 /48) at per_net
    entries; its domain at per_domain entries; the whole cache at max_size, where the group
    (domain or network) that would hold the most entries loses (ties: the newcomer's own
    groups, then the one least recently learned or refreshed). A newcomer older than
    everything of whoever is over is itself dropped. So one attacker (one /48, one domain)
    turns over its own entries: it costs the others at most the one entry that a new network
    of a new domain costs them, however many it learns.

    learn(ip, now, domain)  remember ip's network until now + ttl (refreshes; never shortens)
                            for the organisational domain it was learned for (its identity and
                            share; a newer learn for another domain replaces it).
    add(ip, expires_at, now=None, domain="")  merge an entry learned elsewhere (pub/sub,
                            persisted state); `ip` may be an address or a key.
    contains(ip, now)       True while ip's network is learned and not expired.
    domain(ip)              the domain the entry was learned for ("" if unknown).
    unlearn(ip) -> bool     remove ip's network's entry (it sent mail failing SPF or DKIM).
    key(ip) -> str          the entry key of an address (ValueError for a non-address).
    per_domain_count(domain) / per_net_count(ip) -> int   what a domain / network group holds
    take_evicted() -> keys  entries evicted by quota since the last call (to drop them from a
                            shared copy, ingress.edge.cluster_state), at most EVICTED_KEPT.
    purge(now)              drop expired entries; returns how many.
    to_json() / from_json() persistence (state directory); expired entries are dropped on load.
    """

    ttl: float
    max_size: int
    per_domain: int = LEARNED_PER_DOMAIN
    per_net: int = LEARNED_PER_NET
    ipv6_prefix: int = 64
    _map: ExpiryMap = field(init=False)
    _domains: dict[str, str] = field(init=False)              # key -> org domain
    _nets: dict[str, str] = field(init=False)                 # key -> its /24 or /48
    _by_domain: Groups = field(init=False)
    _by_net: Groups = field(init=False)
    _evicted: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if not self.ttl > 0:
            raise ValueError("LearnedAllow ttl must be > 0")
        if self.max_size < 1:
            raise ValueError("LearnedAllow max_size must be >= 1")
        if self.per_domain < 1 or self.per_net < 1:
            raise ValueError("LearnedAllow per_domain and per_net must be >= 1")
        if not 16 <= self.ipv6_prefix <= 128:
            raise ValueError("LearnedAllow ipv6_prefix must be 16..128")
        self._map = ExpiryMap(self.max_size, on_drop=self._dropped)
        self._domains, self._nets = {}, {}
        self._by_domain, self._by_net = Groups(), Groups()
        self._evicted = []

    def __len__(self) -> int:
        return len(self._map)

    # --- keys -----------------------------------------------------------------------------

    def key(self, ip: str) -> str:
        """The entry key of an address, or of a key (a network, as persisted or shared):
        IPv4 address, or IPv6 /ipv6_prefix network. Raises ValueError for anything else."""
        return _entry(ip, self.ipv6_prefix)[0]

    # --- the public operations --------------------------------------------------------------

    def learn(self, ip: str, now: float, domain: str = "") -> float:
        """Remember `ip`'s network until now + ttl; returns the expiry held (to publish to
        other acceptors). Raises ValueError if `ip` is not an IP address."""
        key = self.key(ip)
        self.add(ip, now + self.ttl, now=now, domain=domain)
        held = self._map.peek(key)
        return now + self.ttl if held is None else held

    def add(self, ip: str, expires_at: float, now: float | None = None,
            domain: str = "") -> bool:
        """Merge an entry; keeps the later expiry, and with it a non-empty `domain` (reduced to
        its organisational domain). Returns False if not stored (expired, bad ip, or older
        than everything of the quota it falls under)."""
        try:
            key, net = _entry(ip, self.ipv6_prefix)
        except ValueError:
            return False
        if now is not None and expires_at <= now:
            return False
        dom = org_domain(domain) if domain else ""
        old = self._map.peek(key)
        if old is not None and now is not None and old <= now:
            self._map.pop(key)        # expired: a newcomer
            old = None
        if old is not None:
            if expires_at >= old:     # older news changes nothing
                self._refresh(key, expires_at, dom)
            return True
        return self._insert(key, net, expires_at, now, dom)

    def _refresh(self, key: str, expires_at: float, dom: str) -> None:
        """A held entry learned again: the later expiry, and a new domain if it has room."""
        self._map.put(key, expires_at)
        self._by_net.touch(self._nets[key])
        held = self._domains[key]
        if not dom or dom == held:
            self._by_domain.touch(held)
            return
        self._by_domain.remove(held, key)
        if self._room_in(self._by_domain.keys(dom), self.per_domain, expires_at):
            held = dom
        self._by_domain.add(held, key)     # its new domain, or (full of newer) the old one
        self._domains[key] = held

    def _insert(self, key: str, net: str, expires_at: float, now: float | None,
                dom: str) -> bool:
        """A new entry, within the quotas (see the class docstring)."""
        if now is not None and len(self._map) >= self.max_size:
            self._map.purge(now)
        if not self._room_in(self._by_net.keys(net), self.per_net, expires_at) \
                or not self._room_in(self._by_domain.keys(dom), self.per_domain, expires_at):
            return False
        if len(self._map) >= self.max_size and not self._room_in(
                self._victims(net, dom), 0, expires_at):
            return False
        self._map.put(key, expires_at)
        self._nets[key], self._domains[key] = net, dom
        self._by_net.add(net, key)
        self._by_domain.add(dom, key)
        return True

    def _victims(self, net: str, dom: str) -> dict[str, None] | None:
        """The cache is full: whose oldest entry goes for a newcomer of network group `net` and
        domain `dom`? The group holding the most once the newcomer is in: its own domain or
        network first when it is (at least) as large as any, else the largest domain or
        network (least recently touched of equals)."""
        dn, nn = self._by_domain.count(dom) + 1, self._by_net.count(net) + 1
        big_dom, dmax = self._by_domain.largest()
        big_net, nmax = self._by_net.largest()
        if dn > 1 and dn >= max(dmax, nmax, nn):
            return self._by_domain.keys(dom)
        if nn > 1 and nn >= max(dmax, nmax):
            return self._by_net.keys(net)
        return self._by_domain.keys(big_dom) if dmax >= nmax else self._by_net.keys(big_net)

    def unlearn(self, ip: str) -> bool:
        """Remove the entry of `ip`'s network (an address or a key); False if there was none."""
        try:
            key = self.key(ip)
        except ValueError:
            return False
        return self._map.pop(key) is not None

    def domain(self, ip: str) -> str:
        try:
            key = self.key(ip)
        except ValueError:
            return ""
        return self._domains.get(key, "") if self._map.peek(key) is not None else ""

    def contains(self, ip: str, now: float) -> bool:
        try:
            key = self.key(ip)
        except ValueError:
            return False
        return self._map.get(key, now) is not None

    def expiry(self, ip: str) -> float | None:
        try:
            return self._map.peek(self.key(ip))
        except ValueError:
            return None

    def purge(self, now: float) -> int:
        return self._map.purge(now)

    def items(self) -> list[tuple[str, float]]:
        return self._map.items()

    def per_domain_count(self, domain: str) -> int:
        return self._by_domain.count(org_domain(domain) if domain else "")

    def per_net_count(self, ip: str) -> int:
        try:
            return self._by_net.count(_entry(ip, self.ipv6_prefix)[1])
        except ValueError:
            return 0

    def take_evicted(self) -> list[str]:
        out, self._evicted = self._evicted, []
        return out

    @property
    def _heap(self) -> list[tuple[float, str]]:
        """The map's expiry heap (tests check that refreshes keep it bounded)."""
        return self._map._heap

    # --- quotas -----------------------------------------------------------------------------

    def _room_in(self, keys: dict[str, None] | None, quota: int, expires_at: float) -> bool:
        """Make room for one more entry in `keys` (a network's, a domain's) if it holds
        `quota` or more: evict its oldest, unless the newcomer (expiring at expires_at) is older
        still (then False: the newcomer is the one that does not fit)."""
        if not keys or len(keys) < quota:
            return True
        oldest = min(keys, key=lambda k: self._map.peek(k) or 0.0)
        if (self._map.peek(oldest) or 0.0) > expires_at:
            return False
        self._map.pop(oldest)
        if len(self._evicted) < EVICTED_KEPT:
            self._evicted.append(oldest)
        return True

    def _dropped(self, key: str) -> None:
        """The map let `key` go (expired, evicted, popped): its groups follow."""
        dom = self._domains.pop(key, None)
        if dom is not None:
            self._by_domain.remove(dom, key)
        net = self._nets.pop(key, None)
        if net is not None:
            self._by_net.remove(net, key)

    # --- persistence --------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _LEARNED_FORMAT,
                "version": _LEARNED_VERSION,
                "ttl": self.ttl,
                "ipv6_prefix": self.ipv6_prefix,
                "entries": {key: {"exp": exp, "domain": self._domains.get(key, "")}
                            for key, exp in self.items()},
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, data: str | bytes, *, ttl: float, max_size: int, now: float,
                  per_domain: int = LEARNED_PER_DOMAIN, per_net: int = LEARNED_PER_NET,
                  ipv6_prefix: int = 64) -> LearnedAllow:
        """Load a persisted cache. The configured bounds win over the stored ones.

        Entries are re-keyed at the configured ipv6_prefix (versions 1 and 2 were keyed by
        address: addresses of one network become one entry, the latest expiry's) and merged
        oldest first, so the quotas keep the newest. Expired and malformed entries are skipped;
        expiries further away than now + ttl are clamped (a shortened TTL in config takes
        effect at once). Raises ValueError if `data` is not a LearnedAllow document.
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
        if version not in (1, 2, _LEARNED_VERSION):
            raise ValueError(f"unsupported learned-allow version {version!r}")
        cache = cls(ttl=ttl, max_size=max_size, per_domain=per_domain, per_net=per_net,
                    ipv6_prefix=ipv6_prefix)
        rows: list[tuple[float, str, str]] = []
        for ip, entry in doc["entries"].items():
            exp, domain = (entry, "") if version == 1 or not isinstance(entry, dict) \
                else (entry.get("exp"), entry.get("domain"))
            if not isinstance(ip, str) or isinstance(exp, bool) or not isinstance(exp, int | float):
                continue
            rows.append((min(float(exp), now + ttl), ip,
                         domain if isinstance(domain, str) else ""))
        for exp, ip, domain in sorted(rows):
            cache.add(ip, exp, now=now, domain=domain)
        cache.take_evicted()
        return cache
