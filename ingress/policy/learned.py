"""The learned allow cache: client networks remembered for the domain they proved (pure; no I/O,
the clock as an argument).

Purpose
    A client whose mail passed SPF and an aligned DKIM check (ingress.policy.classify.
    should_learn) is remembered for a while, so that its next sessions are fast from connect
    (Evidence.learned_allow) instead of from MAIL FROM. The entry vouches only for the
    organisational domain it was learned for (classify.learned_vouches). The acceptor's I/O
    shell (ingress.edge.learned_store) learns, persists, shares and loads it; the worker's
    verdict (classify.should_unlearn) removes it.

API
    LearnedAllow(ttl, max_size, per_domain, per_net, ipv6_prefix): learn(ip, now, domain)
                               / add(ip, expires_at, domain=) / contains(ip, now) / domain(ip)
                               / unlearn(ip) / key(ip) / take_evicted() / purge(now) / to_json()
                               / LearnedAllow.from_json(data, ...) (document versions 1 to 3)
    LEARNED_PER_DOMAIN, LEARNED_PER_NET   the defaults of classify.learned_per_domain / _per_net
    EVICTED_KEPT                          quota evictions remembered for take_evicted()

Failure modes
    The constructor raises ValueError on a bound out of range (ttl, max_size, per_domain,
    per_net, ipv6_prefix). learn() raises ValueError for something that is not an IP address;
    add(), contains(), domain(), unlearn() answer "not stored" / "not held" for one.
    LearnedAllow.from_json raises ValueError on a document that is not a LearnedAllow
    document; individual malformed entries are skipped.

Limits
    * `now` is wall-clock epoch seconds (time.time()) because the cache is persisted across
      restarts; do not feed it time.monotonic().
    * Entries are per network: an IPv4 address, an IPv6 /ipv6_prefix (admission.ipv6_prefix).
      At most per_net of them per IPv4 /24 or IPv6 /48, per_domain per domain, max_size in all;
      eviction is by quota (whoever is over loses its oldest; when full, the domain with the
      most entries), never by global soonest expiry. O(per_domain + per_net) per new entry,
      O(1) per lookup. An attacker with more domains and /48s than max_size / per_domain can
      still turn the cache over, each entry costing it a delivered message with SPF and aligned
      DKIM passing. Entries without a domain (document version 1) share the quota of the
      domain "" and vouch for no transaction.
    * One entry holds one domain: a network learned for two domains (a shared IP of an ESP)
      holds the latest it was told of (a broker passes each (address, domain) on once a
      window: ingress.policy.learn_repeats); the other domain's mail is judged afresh.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from dataclasses import dataclass, field

from ingress.core.addr import ip_key, parse_ip, site_key
from ingress.core.expiry import ExpiryMap
from ingress.core.tally import Groups
from ingress.policy.identity import org_domain

__all__ = ["EVICTED_KEPT", "LEARNED_PER_DOMAIN", "LEARNED_PER_NET", "LearnedAllow"]

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
        return self._keys(ip)[0]

    def _keys(self, ip: str) -> tuple[str, str]:
        """(entry key, its network group) of an address or a key; ValueError for anything
        else (a subclass keys its entries otherwise: ingress.policy.learned_provider)."""
        return _entry(ip, self.ipv6_prefix)

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
            key, net = self._keys(ip)
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
            return self._by_net.count(self._keys(ip)[1])
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
