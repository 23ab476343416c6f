"""Deferral records: a retry after our own deferral is evidence (pure; no I/O, clock as argument).

Purpose
    When a bulk transaction is deferred for the bulk cap (451 4.7.1 at MAIL FROM, or a DATA
    NACK for the lane's rate cap), remember it; a later retry of the same transaction, after
    a minimum delay (bots that hammer at once are not MTAs retrying) and within a TTL, may
    bypass the bulk cap through a separate, bounded retry share (admission.retry_share).

Key
    client network (IPv4 /24, IPv6 /64) + envelope sender (local part lower-cased, domain
    canonical: ingress.core.addr.normalize_domain, so "a@spam.test" in fullwidth letters
    and "A@SPAM.test." are one record, and a domain that is not a valid name is "": "a@").
    At MAIL FROM the
    recipients are not known yet, so the record is keyed without them and the claim is made
    at MAIL FROM by network + sender. A deferral at DATA time also stores the recipients
    (at most MAX_RCPTS); a claim of such a record covers a transaction only if it shares a
    recipient with it (Claim.covers), checked at DATA before the envelope is marked a retry.

API
    DeferralLimits(min_delay, ttl, max_records, per_net_max)    frozen, validated
    deferral_key(ip, sender) -> str           the record key; net_of(ip) -> str
    Record                                    first, last (deferral times), count, credits, rcpts
    Claim                                     first (time of the first deferral), rcpts,
                                              origin;
                                              covers(rcpts) -> bool
    ClaimResult                               StrEnum: claimed | none | too_early
    DeferralRecords                           typing.Protocol: the record store's interface
                                              (what the acceptor calls; a shared backend,
                                              e.g. Redis, implements the same)
    DeferralStore(limits)                     the in-process record store
        record(key, now, rcpts=(), first=None, origin="") -> bool
                                              a deferral; False if not stored (net full)
        lookup(key, now) -> Record | None     without changing it
        check(key, now) -> ClaimResult        would claim() succeed (without changing it)
        should_share(key, now) -> bool        tell the other processes about this deferral now?
                                              (new to us, or min_delay / 2 since we last did:
                                              a hammering bot costs one fact per half delay)
        claim(key, now) -> (ClaimResult, Claim | None)   spend one credit of a ripe record
        consume(key, now) -> Claim | None     spend one credit, ripe or not (the record was
                                              claimed elsewhere, or the sender got through
                                              on ordinary capacity)
        len(store)
    retry_buckets(cfg) -> ((rate, burst) per acceptor, (rate, burst) at the broker) | None

Rules
    * A record lives `ttl` from its FIRST deferral; later deferrals never extend it.
    * Each deferral adds one credit (at most MAX_CREDITS); a claim spends one, and a record
      with no credit left is removed: one deferral buys at most one bypass.
    * A claim needs `min_delay` since the LAST deferral of the record: a bot that hammers
      refreshes `last` with every shed attempt and never ripens (too_early).
    * Bounded: at most max_records records (when full, the oldest is dropped: records are
      kept in arrival order, which is expiry order but for records shared late by another
      process; lookups check the TTL of each record exactly) and at most per_net_max per
      network (a newcomer for a full network is not stored: one /24 cannot flush the table
      or hold a record per sender it invents).

Failure modes
    DeferralLimits raises ValueError for inconsistent limits; nothing else raises.

Limits
    Per process: every acceptor holds a copy, kept in step by the fan-out through the bulk
    broker (ingress.lanes); a claim on one acceptor and a claim of the same record on another
    within the fan-out latency can both succeed (at most one per acceptor). The retry share
    bounds what any number of claims buys. Memory: about 0.8 KB per record at most (measured
    with a recipient and a 40-character sender), so 20,000 records are ~16 MB per acceptor.
    An attacker with many /24s can still fill max_records and push legitimate records out
    (oldest first). Not thread-safe.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from ingress.core.addr import normalize_domain, split_address, try_parse_ip
from ingress.core.config import Config

__all__ = [
    "MAX_CREDITS",
    "MAX_RCPTS",
    "Claim",
    "ClaimResult",
    "DeferralLimits",
    "DeferralRecords",
    "DeferralStore",
    "Record",
    "deferral_key",
    "net_of",
    "retry_buckets",
]

MAX_CREDITS = 8         # bypasses one record can hold, however often it was deferred
MAX_RCPTS = 8           # recipients a DATA-time deferral remembers
MAX_ADDR = 254          # longest sender / recipient kept (RFC 5321 path limit)


class ClaimResult(StrEnum):
    CLAIMED = "claimed"
    NONE = "none"               # no record (never deferred, expired or used up)
    TOO_EARLY = "too_early"     # deferred less than min_delay ago


@dataclass(frozen=True, slots=True)
class DeferralLimits:
    min_delay: float
    ttl: float
    max_records: int
    per_net_max: int

    def __post_init__(self) -> None:
        if self.min_delay < 0:
            raise ValueError("min_delay must be >= 0")
        if self.ttl <= self.min_delay:
            raise ValueError("ttl must be greater than min_delay")
        if self.max_records < 1 or self.per_net_max < 1:
            raise ValueError("max_records and per_net_max must be >= 1")


@dataclass(slots=True)
class Record:
    net: str
    first: float
    last: float
    count: int = 1
    credits: int = 1
    rcpts: frozenset[str] = field(default_factory=frozenset)
    origin: str = ""            # who recorded the first deferral (an acceptor's ident)
    shared: float | None = None  # when this process last told the others (should_share)


@dataclass(frozen=True, slots=True)
class Claim:
    first: float
    rcpts: frozenset[str] = frozenset()
    origin: str = ""

    def covers(self, rcpts: tuple[str, ...] | list[str]) -> bool:
        """The retry is of the deferred transaction: no recipients were known when it was
        deferred (at MAIL FROM), or it shares one with the deferred one."""
        return not self.rcpts or any(_addr(r) in self.rcpts for r in rcpts)


@functools.lru_cache(maxsize=65536)
def net_of(ip: str) -> str:
    """IPv4 /24 or IPv6 /64 of `ip` (IPv4-mapped counts as IPv4); a non-address is itself."""
    addr = try_parse_ip(ip)
    if addr is None:
        return ip[:64]
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network((addr, prefix), strict=False))


def _addr(a: str) -> str:
    return a.strip().lower()[:MAX_ADDR]


def _sender(sender: str) -> str:
    """local@domain: the local part lower-cased, the domain canonical (every spelling of a
    name is one record); a domain that is not a valid name is "" (never a key of its own)."""
    local, domain = split_address(sender)
    if not local and not domain:
        return ""
    return f"{local.lower()}@{normalize_domain(domain)}"[:MAX_ADDR]


def deferral_key(ip: str, sender: str) -> str:
    """network|sender: what a retry must repeat. The null sender <> is the empty string."""
    return f"{net_of(ip)}|{_sender(sender)}"


class DeferralRecords(Protocol):
    """What the acceptor needs of a record store (DeferralStore here; a shared backend
    later). Times are wall-clock seconds, passed in."""

    def __len__(self) -> int: ...

    def record(self, key: str, now: float, rcpts: tuple[str, ...] | list[str] = (),
               first: float | None = None, origin: str = "") -> bool: ...

    def lookup(self, key: str, now: float) -> Record | None: ...

    def check(self, key: str, now: float) -> ClaimResult: ...

    def should_share(self, key: str, now: float) -> bool: ...

    def claim(self, key: str, now: float) -> tuple[ClaimResult, Claim | None]: ...

    def consume(self, key: str, now: float) -> Claim | None: ...


class DeferralStore:
    """The records of one process; see the module docstring."""

    def __init__(self, limits: DeferralLimits) -> None:
        self.limits = limits
        self._records: OrderedDict[str, Record] = OrderedDict()   # first-deferral order
        self._per_net: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def per_net(self, net: str) -> int:
        return self._per_net.get(net, 0)

    def record(self, key: str, now: float, rcpts: tuple[str, ...] | list[str] = (),
               first: float | None = None, origin: str = "") -> bool:
        """A deferral of `key` at `now` (first: when a shared record began elsewhere; origin:
        who recorded it first, for the log)."""
        self._purge(now)
        new_rcpts = frozenset(_addr(r) for r in list(rcpts)[:MAX_RCPTS])
        rec = self._records.get(key)
        if rec is not None:
            rec.last = max(rec.last, now)
            rec.count += 1
            rec.credits = min(MAX_CREDITS, rec.credits + 1)
            if new_rcpts and len(rec.rcpts) < MAX_RCPTS:
                rec.rcpts = frozenset(list(rec.rcpts | new_rcpts)[:MAX_RCPTS])
            return True
        net = key.split("|", 1)[0]
        if self._per_net.get(net, 0) >= self.limits.per_net_max:
            return False
        start = now if first is None else min(first, now)
        if start + self.limits.ttl <= now:
            return False
        if len(self._records) >= self.limits.max_records:
            self._drop(next(iter(self._records)))
        self._records[key] = Record(net, start, now, rcpts=new_rcpts, origin=origin[:64])
        self._per_net[net] = self._per_net.get(net, 0) + 1
        return True

    def lookup(self, key: str, now: float) -> Record | None:
        rec = self._records.get(key)
        if rec is None:
            return None
        if rec.first + self.limits.ttl <= now:
            self._drop(key)
            return None
        return rec

    def check(self, key: str, now: float) -> ClaimResult:
        rec = self.lookup(key, now)
        if rec is None:
            return ClaimResult.NONE
        if now - rec.last < self.limits.min_delay:
            return ClaimResult.TOO_EARLY
        return ClaimResult.CLAIMED

    def should_share(self, key: str, now: float) -> bool:
        """Share the deferral of `key` at `now`? Often enough that every copy's `last` lags by
        less than min_delay / 2 (so a bot hammering on one acceptor never ripens on another),
        rarely enough that a flood of sheds is not a flood of facts."""
        rec = self.lookup(key, now)
        if rec is None:
            return False
        if rec.shared is not None and now - rec.shared < self.limits.min_delay / 2:
            return False
        rec.shared = now
        return True

    def claim(self, key: str, now: float) -> tuple[ClaimResult, Claim | None]:
        result = self.check(key, now)
        if result is not ClaimResult.CLAIMED:
            return result, None
        return result, self._spend(key, self._records[key])

    def consume(self, key: str, now: float) -> Claim | None:
        rec = self.lookup(key, now)
        return None if rec is None else self._spend(key, rec)

    def _spend(self, key: str, rec: Record) -> Claim:
        rec.credits -= 1
        if rec.credits <= 0:
            self._drop(key)
        return Claim(rec.first, rec.rcpts, rec.origin)

    def _drop(self, key: str) -> None:
        rec = self._records.pop(key, None)
        if rec is None:
            return
        n = self._per_net.get(rec.net, 0) - 1
        if n > 0:
            self._per_net[rec.net] = n
        else:
            self._per_net.pop(rec.net, None)

    def _purge(self, now: float) -> None:
        ttl = self.limits.ttl
        while self._records:
            key, rec = next(iter(self._records.items()))
            if rec.first + ttl > now:
                return
            self._drop(key)


def retry_buckets(cfg: Config) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(rate, burst) of one acceptor's retry bucket and of the bulk broker's: the
    admission.retry_share of lanes.bulk.rate (and of its burst, at least 1 token), the
    acceptors' parts summing to the broker's. None: the bulk lane is uncapped or the share 0."""
    lb, share = cfg.lanes.bulk, cfg.admission.retry_share
    if lb.rate <= 0 or share <= 0:
        return None
    rate = lb.rate * share
    burst = max(1.0, (lb.burst or lb.rate) * share)
    n = cfg.acceptor_count
    return (rate / n, max(1.0, burst / n)), (rate, burst)
