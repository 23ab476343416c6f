"""Deferral records: a retry after our own deferral is evidence, if it was earned (pure; no I/O,
clock as argument).

Purpose
    When a bulk transaction is deferred for the bulk cap (451 4.7.1 at its first RCPT TO, or a
    DATA NACK for the lane's rate cap), remember it; a later retry of the same transaction,
    after a minimum delay and within a TTL, may bypass the bulk cap through a separate, bounded
    retry share (admission.retry_share). A bot can shed as often as it likes: what it may not
    do is turn that into bypasses (issue 17, item 4: "retry evidence has to be earned").

Key
    client network (IPv4 /24, IPv6 /admission.ipv6_prefix) + envelope sender (local part
    lower-cased, domain canonical: ingress.core.addr.normalize_domain, so "a@spam.test" in
    fullwidth letters and "A@SPAM.test." are one record, and a domain that is not a valid
    name is "": "a@"), and the record holds the recipients of the deferred transaction (at
    most MAX_RCPTS, lower-cased): the deferral is made at the first RCPT TO, like
    Postfix-style greylisting, so the recipients are known (each later RCPT of that
    transaction is deferred too and added to the record).
    A record made for a client whose PTR name was confirmed forward under a provider identity
    (ingress.policy.iprev) holds that provider, and an index (provider, sender) -> its key
    finds it from another address of the same verified provider (provider_record): the claim
    is of the one record, under all of its guards (its network's wait, hammering and site).
    A client's *site* is the wider aggregate the bounds and fairness count: an IPv6 /48 (or
    the network itself when ipv6_prefix is shorter), an IPv4 /24 (its own site).

API
    DeferralLimits(min_delay, ttl, max_records, per_net_max, per_site_max=128, ipv6_prefix=64,
                   hammer_sheds=0, share_rate=0.0, share_burst=1.0)   frozen, validated
    deferral_limits(cfg) -> DeferralLimits    from admission.retry_* (and the retry share)
                                              (both: ingress.policy.deferral_limits)
    deferral_key(ip, sender, ipv6_prefix=64) -> str      the record key
    net_of(ip, ipv6_prefix=64) -> str; site_of(net) -> str
    Record                                    net, site, first, last (deferral times), count,
                                              rcpts, origin, void (earns nothing)
    Claim                                     first (time of the first deferral), rcpts, origin;
                                              covers(rcpts) -> bool
    ClaimResult                               StrEnum: claimed | none | too_early | hammered |
                                              over_share
    DeferralRecords                           typing.Protocol: the record store's interface
                                              (what the acceptor calls)
    DeferralStore(limits)                     the in-process record store
        key(ip, sender) -> str                deferral_key with the store's ipv6_prefix
        record(key, now, rcpts=(), first=None, origin="", sheds=1, hammered=False,
               provider="") -> bool
                                              a deferral (sheds: how many sheds it stands for,
                                              0 for another recipient of a transaction already
                                              deferred); False if not stored (a bound)
        lookup(key, now) -> Record | None     without changing it
        provider_record(provider, sender) -> key | None   the latest record of a verified
                                              provider's pool for this sender
        check(key, rcpts, now) -> ClaimResult would claim() succeed (without changing it)
        to_share(key, now) -> (Record, sheds) | None   tell the other processes about this
                                              deferral now? (new to us, recipients added, made
                                              void, or min_delay / 2 since we last did; sheds:
                                              those not told yet)
        claim(key, rcpts, now) -> (ClaimResult, Claim | None)   spend a ripe record
        consume(key, now, bypass=False) -> Claim | None   spend it, ripe or not (claimed
                                              elsewhere - bypass: charge the site's part - or
                                              the transaction came back on ordinary capacity)
        hammering(site, now) -> bool; sites(); per_net(net); per_site(site); len(store)

Rules
    * One record, one bypass: a record holds no credits; further deferrals of it only refresh
      `last` and add recipients. A claim (or consume) removes it.
    * A claim needs the same network, the same sender and recipients that were all in the
      deferred transaction (the retry may carry fewer, never others): Claim.covers, checked at
      each RCPT of the retry. A record with no recipient covers nothing.
    * The wait must look like a real MTA's: `min_delay` since the LAST deferral of the record
      (a bot that hammers refreshes `last` at every shed and never ripens: too_early), and
      within `ttl` of the FIRST (later deferrals never extend it).
    * A site shed more than `hammer_sheds` times in HAMMER_WINDOW (a sliding estimate over two
      fixed windows, ingress.core.ratelimit.SlidingCount) earns nothing: its records do not
      ripen while it hammers (hammered), and a record deferred while its site hammered is void
      for good (a bot cannot build records fast, then pause and cash them in).
    * The retry share is divided between sites: with `share_rate` / `share_burst` the edge's
      retry bucket and A the sites holding records now, one site may claim at most one in
      A / share_rate seconds, with a burst of max(1, share_burst / A) (GCRA: one theoretical
      arrival time per site), so a bot rotating senders in one network takes its part and
      leaves the rest (over_share). Claims made elsewhere (consume with bypass) count too.
    * Bounded: at most per_net_max records per network and per_site_max per site (a newcomer
      over either is not stored: one /48 of 2^16 /64s cannot flood the table); at most
      max_records in all, and when full the table makes room by quota, not by age: the oldest
      record of the site holding the most is dropped if that site holds at least two more
      than the newcomer's, else the newcomer is not stored. So records of a site are never
      pushed out by a site holding as few or fewer; expired records are purged first.
    * The per-site tables (shed counts, arrival times) hold at most max_records sites each
      (least recently used forgotten: a forgotten site counts as quiet and fresh).

Failure modes
    DeferralLimits raises ValueError for inconsistent limits; nothing else raises.

Limits
    Per process: every acceptor holds a copy, kept in step by the fan-out through the bulk
    broker (ingress.edge.lanes) or Redis (ingress.edge.cluster_state), both carrying the same
    facts; a claim on one acceptor and a claim of the same record on another within the fan-out
    latency can both succeed (at most one per acceptor), and a site's sheds on other
    acceptors arrive in batches (at least every min_delay / 2 per record). The retry share
    bounds what any number of claims buys. The site's part is computed from one edge's retry
    share (each edge's broker holds its own). Memory: about 1.1 KB per record at most, site
    tables included (measured with a recipient, a 40-character sender and every record its
    own site), so 20,000 records are ~22 MB per acceptor. Time: ~15 us a new record, ~1.3 us
    a check (measured on the 2-core test machine). An attacker holding more sites than
    max_records / per_site_max can fill the table: new records (anyone's) are then not stored
    until old ones expire or are used, but none already held is pushed out. Not thread-safe.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from ingress.core.addr import net_key, normalize_domain, site_key, split_address
from ingress.core.ratelimit import SlidingCount
from ingress.core.tally import Groups, decrement
from ingress.policy.deferral_limits import DeferralLimits, deferral_limits

__all__ = [
    "HAMMER_WINDOW",
    "MAX_RCPTS",
    "Claim",
    "ClaimResult",
    "DeferralLimits",
    "DeferralRecords",
    "DeferralStore",
    "Record",
    "deferral_key",
    "deferral_limits",
    "net_of",
    "site_of",
]

MAX_RCPTS = 8           # recipients a record remembers (a retry may carry only those)
MAX_ADDR = 254          # longest sender / recipient kept (RFC 5321 path limit)
HAMMER_WINDOW = 60.0    # seconds: "shed many times a minute"


class ClaimResult(StrEnum):
    CLAIMED = "claimed"
    NONE = "none"               # no record of this transaction (never deferred, expired, used
                                # up, or a recipient it did not have)
    TOO_EARLY = "too_early"     # deferred less than min_delay ago
    HAMMERED = "hammered"       # its site is (or was, when deferred) shed too often: no evidence
    OVER_SHARE = "over_share"   # its site has taken its part of the retry share


@dataclass(slots=True)
class Record:
    net: str
    site: str
    first: float
    last: float
    count: int = 1
    rcpts: frozenset[str] = field(default_factory=frozenset)
    origin: str = ""            # who recorded the first deferral (an acceptor's ident)
    void: bool = False          # deferred while its site hammered: never ripens
    provider: str = ""          # the client's verified provider identity ("" none)
    shared: float | None = None  # when this process last told the others (to_share)
    shared_rcpts: int = 0       # how many recipients they were told of
    shared_void: bool = False   # ... and whether they were told it is void
    unshared: int = 0           # sheds not told yet


@dataclass(frozen=True, slots=True)
class Claim:
    first: float
    rcpts: frozenset[str] = frozenset()
    origin: str = ""

    def covers(self, rcpts: Sequence[str]) -> bool:
        """The retry is of the deferred transaction: it names recipients, and every one of
        them was a recipient of the deferred transaction (it may name fewer)."""
        return bool(rcpts) and all(_addr(r) in self.rcpts for r in rcpts)


def net_of(ip: str, ipv6_prefix: int = 64) -> str:
    """The client network of `ip` (ingress.core.addr.net_key: IPv4 /24, IPv6 /ipv6_prefix;
    IPv4-mapped counts as IPv4); a non-address is itself (at most 64 characters)."""
    return net_key(ip, ipv6_prefix)[:64]


@functools.lru_cache(maxsize=65536)
def site_of(net: str) -> str:
    """The site of a network (net_of's text; ingress.core.addr.site_key): IPv6 /48 (the
    network itself if it is wider), an IPv4 /24 itself; anything else is itself."""
    try:
        n = ipaddress.ip_network(net, strict=False)
    except ValueError:
        return net[:64]
    return site_key(str(n.network_address), n.prefixlen if n.version == 6 else 128)


def _addr(a: str) -> str:
    return a.strip().lower()[:MAX_ADDR]


def _sender(sender: str) -> str:
    """local@domain: the local part lower-cased, the domain canonical (every spelling of a
    name is one record); a domain that is not a valid name is "" (never a key of its own)."""
    local, domain = split_address(sender)
    if not local and not domain:
        return ""
    return f"{local.lower()}@{normalize_domain(domain)}"[:MAX_ADDR]


def deferral_key(ip: str, sender: str, ipv6_prefix: int = 64) -> str:
    """network|sender: what a retry must repeat. The null sender <> is the empty string."""
    return f"{net_of(ip, ipv6_prefix)}|{_sender(sender)}"


class DeferralRecords(Protocol):
    """What the acceptor needs of a record store. Times are wall-clock seconds, passed in."""

    def __len__(self) -> int: ...

    def key(self, ip: str, sender: str) -> str: ...

    def record(self, key: str, now: float, rcpts: Sequence[str] = (),
               first: float | None = None, origin: str = "", sheds: int = 1,
               hammered: bool = False, provider: str = "") -> bool: ...

    def provider_record(self, provider: str, sender: str) -> str | None: ...

    def lookup(self, key: str, now: float) -> Record | None: ...

    def check(self, key: str, rcpts: Sequence[str], now: float) -> ClaimResult: ...

    def to_share(self, key: str, now: float) -> tuple[Record, int] | None: ...

    def claim(self, key: str, rcpts: Sequence[str],
              now: float) -> tuple[ClaimResult, Claim | None]: ...

    def consume(self, key: str, now: float, bypass: bool = False) -> Claim | None: ...


class DeferralStore:
    """The records of one process; see the module docstring."""

    def __init__(self, limits: DeferralLimits) -> None:
        self.limits = limits
        self._records: OrderedDict[str, Record] = OrderedDict()   # first-deferral order
        self._per_net: dict[str, int] = {}
        self._sites = Groups()                      # site -> its keys, oldest first
        self._sheds: OrderedDict[str, SlidingCount] = OrderedDict()   # site -> its sheds
        self._tat: OrderedDict[str, float] = OrderedDict()  # site -> theoretical arrival time
        self._providers: dict[tuple[str, str], str] = {}   # (provider, sender) -> its key

    def __len__(self) -> int:
        return len(self._records)

    def key(self, ip: str, sender: str) -> str:
        return deferral_key(ip, sender, self.limits.ipv6_prefix)

    def per_net(self, net: str) -> int:
        return self._per_net.get(net, 0)

    def per_site(self, site: str) -> int:
        return self._sites.count(site)

    def sites(self) -> int:
        """Sites holding records now."""
        return len(self._sites)

    # --- deferrals ----------------------------------------------------------------------------

    def record(self, key: str, now: float, rcpts: Sequence[str] = (),
               first: float | None = None, origin: str = "", sheds: int = 1,
               hammered: bool = False, provider: str = "") -> bool:
        """A deferral of `key` at `now` (first: when a shared record began elsewhere; origin:
        who recorded it first, for the log; sheds: the sheds it stands for; hammered: the
        process that made it found its site hammering; provider: the client's verified
        provider identity, under which provider_record finds it)."""
        self._purge(now)
        net = key.split("|", 1)[0]
        site = site_of(net)
        self._count_sheds(site, now, sheds)
        void = hammered or self.hammering(site, now)
        rec = self._records.get(key)
        if rec is not None:
            rec.last = max(rec.last, now)
            rec.count += 1
            rec.unshared += max(0, sheds)
            rec.void = rec.void or void
            rec.rcpts = _merge(rec.rcpts, rcpts)
            self._index(key, rec, provider)
            return True
        if self._per_net.get(net, 0) >= self.limits.per_net_max \
                or self.per_site(site) >= self.limits.per_site_max:
            return False
        start = now if first is None else min(first, now)
        if start + self.limits.ttl <= now:
            return False
        if len(self._records) >= self.limits.max_records and not self._make_room(site):
            return False
        self._records[key] = Record(net, site, start, now, rcpts=_merge(frozenset(), rcpts),
                                    origin=origin[:64], void=void, unshared=max(0, sheds))
        self._per_net[net] = self._per_net.get(net, 0) + 1
        self._sites.add(site, key)
        self._index(key, self._records[key], provider)
        return True

    def _index(self, key: str, rec: Record, provider: str) -> None:
        """(provider, sender) -> key: the latest record of the pool for this sender."""
        if provider:
            rec.provider = rec.provider or provider[:MAX_ADDR]
            self._providers[(rec.provider, key.split("|", 1)[1])] = key

    def provider_record(self, provider: str, sender: str) -> str | None:
        """The key of the latest record made for a client of the verified `provider` with
        this sender (deferral_key's sender form), or None."""
        return self._providers.get((provider, _sender(sender))) if provider else None

    def lookup(self, key: str, now: float) -> Record | None:
        rec = self._records.get(key)
        if rec is None:
            return None
        if rec.first + self.limits.ttl <= now:
            self._drop(key)
            return None
        return rec

    def to_share(self, key: str, now: float) -> tuple[Record, int] | None:
        """Share the deferral of `key` at `now`? When the others' copy lacks something that
        decides a claim (the record, a recipient, its voidness), and otherwise often enough
        that every copy's `last` lags by less than min_delay / 2 (so a bot hammering on one
        acceptor never ripens on another), rarely enough that a flood of sheds is not a flood
        of facts. Returns the record and the sheds not told yet (now told)."""
        rec = self.lookup(key, now)
        if rec is None:
            return None
        news = len(rec.rcpts) > rec.shared_rcpts or rec.void != rec.shared_void
        if not news and rec.shared is not None \
                and now - rec.shared < self.limits.min_delay / 2:
            return None
        sheds, rec.unshared = rec.unshared, 0
        rec.shared, rec.shared_rcpts, rec.shared_void = now, len(rec.rcpts), rec.void
        return rec, sheds

    # --- claims -------------------------------------------------------------------------------

    def check(self, key: str, rcpts: Sequence[str], now: float) -> ClaimResult:
        rec = self.lookup(key, now)
        if rec is None or not Claim(rec.first, rec.rcpts).covers(rcpts):
            return ClaimResult.NONE
        if rec.void or self.hammering(rec.site, now):
            return ClaimResult.HAMMERED
        if now - rec.last < self.limits.min_delay:
            return ClaimResult.TOO_EARLY
        if not self._site_may_claim(rec.site, now):
            return ClaimResult.OVER_SHARE
        return ClaimResult.CLAIMED

    def claim(self, key: str, rcpts: Sequence[str],
              now: float) -> tuple[ClaimResult, Claim | None]:
        result = self.check(key, rcpts, now)
        if result is not ClaimResult.CLAIMED:
            return result, None
        rec = self._records[key]
        self._charge(rec.site, now)
        self._drop(key)
        return result, Claim(rec.first, rec.rcpts, rec.origin)

    def consume(self, key: str, now: float, bypass: bool = False) -> Claim | None:
        if bypass:
            self._charge(site_of(key.split("|", 1)[0]), now)
        rec = self.lookup(key, now)
        if rec is None:
            return None
        self._drop(key)
        return Claim(rec.first, rec.rcpts, rec.origin)

    # --- sites: hammering and their part of the retry share ----------------------------------

    def hammering(self, site: str, now: float) -> bool:
        """Shed more than hammer_sheds times in the last HAMMER_WINDOW (estimated: this
        window's count and the previous one's, weighted by how much of it is still inside)?"""
        limit = self.limits.hammer_sheds
        sheds = self._sheds.get(site)
        return limit > 0 and sheds is not None and sheds.value(now) > limit

    def _count_sheds(self, site: str, at: float, n: int) -> None:
        if n <= 0 or self.limits.hammer_sheds <= 0:
            return
        sheds = self._sheds.get(site)
        if sheds is None:
            sheds = self._sheds[site] = SlidingCount(HAMMER_WINDOW)
            while len(self._sheds) > self.limits.max_records:
                self._sheds.popitem(last=False)
        else:
            self._sheds.move_to_end(site)
        sheds.add(at, n)          # a late fact of the window before still counts

    def _site_interval(self) -> tuple[float, float]:
        """(seconds between two claims of one site, how far ahead of now it may claim)."""
        active = max(1, len(self._sites))
        interval = active / self.limits.share_rate
        return interval, (max(1.0, self.limits.share_burst / active) - 1.0) * interval

    def _site_may_claim(self, site: str, now: float) -> bool:
        if self.limits.share_rate <= 0:
            return True
        _, ahead = self._site_interval()
        return self._tat.get(site, now) - now <= ahead + 1e-9

    def _charge(self, site: str, now: float) -> None:
        if self.limits.share_rate <= 0:
            return
        interval, _ = self._site_interval()
        self._tat[site] = max(self._tat.get(site, now), now) + interval
        self._tat.move_to_end(site)
        while len(self._tat) > self.limits.max_records:
            self._tat.popitem(last=False)

    # --- bookkeeping --------------------------------------------------------------------------

    def _make_room(self, site: str) -> bool:
        """The table is full: drop the oldest record of the site holding the most, if it holds
        at least two more than `site` (so the counts only ever get more even)."""
        largest, most = self._sites.largest()
        oldest = self._sites.oldest(largest)
        if oldest is None or most < self.per_site(site) + 2:
            return False
        self._drop(oldest)
        return True

    def _drop(self, key: str) -> None:
        rec = self._records.pop(key, None)
        if rec is None:
            return
        decrement(self._per_net, rec.net)
        self._sites.remove(rec.site, key)
        at = (rec.provider, key.split("|", 1)[1])
        if rec.provider and self._providers.get(at) == key:
            del self._providers[at]

    def _purge(self, now: float) -> None:
        ttl = self.limits.ttl
        while self._records:
            key, rec = next(iter(self._records.items()))
            if rec.first + ttl > now:
                return
            self._drop(key)


def _merge(have: frozenset[str], rcpts: Sequence[str]) -> frozenset[str]:
    """`have` and the recipients in `rcpts`, at most MAX_RCPTS in all (those first seen kept)."""
    if len(have) >= MAX_RCPTS or not rcpts:
        return have
    out = set(have)
    for r in list(rcpts)[:MAX_RCPTS]:
        out.add(_addr(r))
        if len(out) >= MAX_RCPTS:
            break
    return frozenset(out)
