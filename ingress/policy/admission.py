"""Connection admission for one acceptor: slots, fast reserve, per-IP caps, rate, penalties (pure).

Purpose
    Decide in microseconds, before the banner, whether a new connection gets a slot
    (pure: no I/O). Capacity is held for the fast lane: `fast_reserve` of the
    `max_connections` slots can only ever be used by fast sessions, so a bulk flood cannot take
    them. Bulk is additionally limited per client IP (IPv4 address or IPv6 /64 by default):
    a concurrency cap and a connection-rate token bucket. Early talkers are penalised.
    No I/O and no clock reads: every method takes `now` (any monotonic seconds source).

API
    AdmissionLimits(max_connections, fast_reserve, per_ip_bulk_max, per_ip_rate,
                    per_ip_burst, ipv6_prefix=64, penalty_s=300.0,
                    max_tracked_ips=65536, max_penalised=65536, per_ip_fast_max=0,
                    shares=TierShares(), listed_per_ip_max=0, listed_ttl=0.0)
                                                                    frozen, validated
    Admission(limits)
        try_admit(ip, lane, now, tier=Tier.OPERATOR) -> Verdict   Verdict.admitted / .ticket /
                                                 .reason / .reply; `tier`: a fast session's
                                                 trust tier (ingress.policy.tiers)
        fast_refusal(ip, tier) -> "tier" | "per-ip" | None   would one more fast session of
                                                 this tier from this IP be over its tier's cap
                                                 of the reserve, or over per_ip_fast_max?
        release(ticket) -> None                  idempotent
        promote(ticket, tier=Tier.OPERATOR) -> None   bulk -> fast slot accounting; never fails
        demote(ticket) -> None                   fast -> bulk slot accounting; never fails
        mark_listed(ticket, now) -> bool         a DNS block list listed this bulk session
                                                 (ingress.policy.shaping.listed): it counts
                                                 against its IP key's listed_per_ip_max, and
                                                 the key is remembered listed for listed_ttl;
                                                 True: the key now holds more listed sessions
                                                 than that (the caller closes this one, 421)
        is_listed(ip, now) -> bool               the key is remembered listed
        penalise(ip, now) / is_penalised(ip, now)  early-talker penalty box (bounded)
        in_use / fast_in_use / bulk_in_use / bulk_for(ip) / held(tier) / fast_for(ip)
                                                 listed_for(ip): counters for metrics, tests
    Refusal                  StrEnum: why a connection was refused (metric label)
    ip_key(ip, ipv6_prefix) -> str               the per-IP accounting key (ingress.core.addr's)
    stress_timeouts(normal_idle, saturated, stress_idle=10.0) -> float
    Verdict.reply                                the refusal's line (ingress.policy.replies)
    (The slots per acceptor, and each acceptor's share of the bulk cap, are derived from the
    config by ingress.core.derived: connection_limit, configured_limit, bulk_share_bucket.)

Rules
    * Slots follow ingress.policy.tiers.admits, the one rule for every fast resource: the
      fast reserve (`fast_reserve` of the `max_connections` slots) is the fast lane's; of it
      the third-party and self-proven tiers each hold at most their cap (tiers.*_share), and
      every admission leaves the unused floors of the tiers above it free. So bulk never uses
      a reserved slot, self-proven sessions never the third-party's and operator's part, and
      an operator client always finds its floor free.
    * operator (fast): admitted while any slot is free; never rate-capped, never per-IP
      capped, not subject to penalties.
    * third-party and self-proven (fast): within the tier's cap and, per IP key,
      per_ip_fast_max (0: no cap) sessions; the caller (ingress.edge.sessions) asks fast_refusal
      first and serves a session over either as bulk.
    * bulk: admitted only if, after admission, the unused part of the fast reserve is still
      free: in_use + max(0, fast_reserve - fast_in_use) < max_connections.
    * bulk, per IP key, checked in this order: penalty box (421), connection-rate token bucket
      (421; every bulk attempt that reaches it spends a token, refused or not - it measures
      attempts, like Postfix anvil), concurrency cap (421), the listed cap (below), slots.
    * listed (issue 18 item 3: a DNS block-list score only shapes bulk): a key remembered
      listed (mark_listed, within listed_ttl) is held to listed_per_ip_max concurrent bulk
      sessions, all of them counted (a pending verdict is most likely another listing: a
      burst of connections is refused here, before any DNS): "listed-per-ip", the per-IP
      421's line. When a verdict lists a session, mark_listed counts the key's listed bulk
      sessions; over the cap, the caller closes the one just listed (the newest listing).
      A listed session that is promoted stops counting (evidence only promotes); demoted,
      it counts again. listed_per_ip_max 0: no listed cap (per_ip_bulk_max alone).
    * promote(ticket, tier): a session admitted as bulk and later classified fast moves its
      slot from the bulk count to its tier's count and frees its per-IP bulk count. The total
      is unchanged, so promotion can never fail or evict anyone (fast may exceed its reserve);
      the caller checks fast_refusal before it.
    * demote(ticket): the reverse, for a fast session whose domain (or tier) went over its
      rate. It keeps its slot (it is never closed for it) and counts as bulk and against its
      IP again, so bulk may exceed its share for a while: new bulk sessions wait for room, and
      the fast reserve is never what pays for it (the higher tiers' floors are untouched).

Failure modes
    AdmissionLimits raises ValueError for inconsistent limits. try_admit never raises: an ip
    that is not an IP address is accounted under its own string. Double release is ignored.

Limits
    * Per acceptor: the pool's capacity is the sum over acceptors; SO_REUSEPORT spreads one
      client's connections across acceptors, so per-IP limits are per acceptor too.
    * Per-IP rate state is bounded (max_tracked_ips, least-recently-used evicted: an evicted
      IP starts again with a full bucket). The penalty box is bounded (max_penalised,
      soonest-expiring evicted), and so are the keys remembered listed (max_tracked_ips,
      soonest-expiring forgotten: a forgotten key waits for its DNS verdict again).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum

from ingress.core.addr import ip_key
from ingress.core.expiry import ExpiryMap
from ingress.core.ratelimit import TokenBucket
from ingress.core.tally import decrement
from ingress.core.wire import Lane
from ingress.policy import replies
from ingress.policy.tiers import FAST_TIERS, Tier, TierShares, admits, cap, per_ip_capped

__all__ = [
    "Admission",
    "AdmissionLimits",
    "Refusal",
    "Ticket",
    "Verdict",
    "ip_key",
    "stress_timeouts",
]

class Refusal(StrEnum):
    ADMITTED = "admitted"
    SLOTS = "slots"
    PER_IP = "per-ip"
    RATE = "rate"
    PENALISED = "penalised"
    LISTED_PER_IP = "listed-per-ip"   # a key remembered listed, at listed_per_ip_max


# The reply lines are ingress.policy.replies' table (same values: the metric labels).
# A listed key's refusal is the per-IP one's line: a client learns nothing of the listing.
_REPLY_OF = {Refusal.LISTED_PER_IP: Refusal.PER_IP}
_REPLIES: dict[Refusal, str | None] = {
    r: None if r is Refusal.ADMITTED else replies.text(replies.Refusal(_REPLY_OF.get(r, r).value))
    for r in Refusal}


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_connections: int
    fast_reserve: int
    per_ip_bulk_max: int
    per_ip_rate: float  # bulk connections per second per IP key; <= 0 disables the bucket
    per_ip_burst: int
    ipv6_prefix: int = 64
    penalty_s: float = 300.0
    max_tracked_ips: int = 65536
    max_penalised: int = 65536
    per_ip_fast_max: int = 0   # fast sessions of the capped tiers per IP key; 0 = no cap
    shares: TierShares = field(default_factory=TierShares)
    listed_per_ip_max: int = 0  # bulk sessions per listed IP key; 0 = no listed cap
    listed_ttl: float = 0.0     # seconds a key is remembered listed; 0 = not remembered

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not 0 <= self.fast_reserve <= self.max_connections:
            raise ValueError("fast_reserve must be between 0 and max_connections")
        if self.per_ip_bulk_max < 1:
            raise ValueError("per_ip_bulk_max must be >= 1")
        if self.per_ip_rate > 0 and self.per_ip_burst < 1:
            raise ValueError("per_ip_burst must be >= 1 when per_ip_rate is set")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 0 and 128")
        if self.penalty_s < 0:
            raise ValueError("penalty_s must be >= 0")
        if self.max_tracked_ips < 1 or self.max_penalised < 1:
            raise ValueError("max_tracked_ips and max_penalised must be >= 1")
        if self.per_ip_fast_max < 0 or self.listed_per_ip_max < 0 or self.listed_ttl < 0:
            raise ValueError("per_ip_fast_max, listed_per_ip_max and listed_ttl must be >= 0")

    @property
    def bulk_share(self) -> int:
        """Slots bulk may use when no fast session is connected."""
        return self.max_connections - self.fast_reserve


def stress_timeouts(normal_idle: float, saturated: bool, stress_idle: float = 10.0) -> float:
    """Idle timeout for bulk sessions: shrunk to `stress_idle` while bulk is saturated.

    Postfix-style stress adaptation (smtpd_timeout = ${stress?10}${stress:300}); it comes back
    to `normal_idle` as soon as `saturated` is False. Never lengthens a timeout.
    """
    return min(normal_idle, stress_idle) if saturated else normal_idle


class Ticket:
    """A held slot. Hand it back with Admission.release(); promote with Admission.promote()."""

    __slots__ = ("id", "ip", "key", "lane", "listed", "released", "tier")

    def __init__(self, id: int, ip: str, key: str, lane: Lane,
                 tier: Tier = Tier.UNKNOWN) -> None:
        self.id = id
        self.ip = ip
        self.key = key
        self.lane = lane
        self.tier = tier          # its fast tier (UNKNOWN while bulk)
        self.listed = False       # a DNS block list listed it (mark_listed)
        self.released = False

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"Ticket({self.id}, {self.ip!r}, {self.lane}, {self.tier.label}, {state})"


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    lane: Lane
    reason: Refusal
    reply: str | None  # the SMTP reply line to send before closing (None when admitted)
    ticket: Ticket | None


class _PenaltyBox:
    """key -> until, bounded (ingress.core.expiry.ExpiryMap); soonest-expiring evicted when full."""

    __slots__ = ("_map", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._map = ExpiryMap(max_size)

    def __len__(self) -> int:
        return len(self._map)

    def add(self, key: str, until: float, now: float) -> None:
        self._map.put(key, until, now)

    def active(self, key: str, now: float) -> bool:
        return self._map.get(key, now) is not None


class Admission:
    """Slot accounting for one acceptor. Single-threaded (the acceptor's event loop)."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.bulk_in_use = 0
        self._held: dict[Tier, int] = dict.fromkeys(FAST_TIERS, 0)   # fast sessions per tier
        self._per_ip_bulk: dict[str, int] = {}
        self._per_ip_fast: dict[str, int] = {}    # capped tiers' fast sessions per IP key
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()   # per-IP connection rate
        self._penalties = _PenaltyBox(limits.max_penalised)
        self._per_ip_listed: dict[str, int] = {}   # listed bulk sessions per IP key
        self._listed_keys = ExpiryMap(limits.max_tracked_ips)   # key -> remembered until
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ counters

    @property
    def fast_in_use(self) -> int:
        return sum(self._held.values())

    @property
    def in_use(self) -> int:
        return self.fast_in_use + self.bulk_in_use

    def held(self, tier: Tier) -> int:
        return self._held.get(tier, 0)

    def bulk_for(self, ip: str) -> int:
        return self._per_ip_bulk.get(ip_key(ip, self.limits.ipv6_prefix), 0)

    def listed_for(self, ip: str) -> int:
        """Listed bulk sessions from this IP key."""
        return self._per_ip_listed.get(ip_key(ip, self.limits.ipv6_prefix), 0)

    def fast_for(self, ip: str) -> int:
        """Fast sessions of the capped tiers from this IP key."""
        return self._per_ip_fast.get(ip_key(ip, self.limits.ipv6_prefix), 0)

    @property
    def tracked_ips(self) -> int:
        return len(self._buckets)

    @property
    def penalised_count(self) -> int:
        return len(self._penalties)

    # ------------------------------------------------------------------ admission

    def _admits(self, tier: Tier) -> bool:
        lim = self.limits
        return admits(tier, 1, self._held, self.in_use, lim.max_connections, lim.fast_reserve,
                      lim.shares)

    def fast_refusal(self, ip: str, tier: Tier) -> str | None:
        """Would one more fast session of `tier` from `ip` be over its tier's cap of the
        reserve ("tier") or over per_ip_fast_max ("per-ip")? None: it fits (the operator
        tier always does)."""
        lim = self.limits
        if tier is Tier.OPERATOR:
            return None
        if self.held(tier) + 1 > cap(tier, lim.fast_reserve, lim.shares):
            return "tier"
        if lim.per_ip_fast_max and per_ip_capped(tier) \
                and self.fast_for(ip) + 1 > lim.per_ip_fast_max:
            return "per-ip"
        return None

    def try_admit(self, ip: str, lane: Lane, now: float, tier: Tier = Tier.OPERATOR) -> Verdict:
        lim = self.limits
        key = ip_key(ip, lim.ipv6_prefix)
        if lane == Lane.FAST:
            tier = Tier.SELF_PROVEN if tier is Tier.UNKNOWN else tier   # fail closed
            why = self.fast_refusal(ip, tier)
            if why is not None:      # the caller serves it as bulk instead (fast_refusal)
                return self._refuse(Lane.FAST, Refusal.PER_IP if why == "per-ip"
                                    else Refusal.SLOTS)
            if not self._admits(tier):
                return self._refuse(Lane.FAST, Refusal.SLOTS)
            self._take_fast(key, tier)
            return self._admit(ip, key, Lane.FAST, tier)

        if self._penalties.active(key, now):
            return self._refuse(Lane.BULK, Refusal.PENALISED)
        if lim.per_ip_rate > 0 and not self._take_token(key, now):
            return self._refuse(Lane.BULK, Refusal.RATE)
        if self._per_ip_bulk.get(key, 0) >= lim.per_ip_bulk_max:
            return self._refuse(Lane.BULK, Refusal.PER_IP)
        if lim.listed_per_ip_max and self._per_ip_bulk.get(key, 0) >= lim.listed_per_ip_max \
                and self._listed_keys.get(key, now) is not None:
            return self._refuse(Lane.BULK, Refusal.LISTED_PER_IP)
        if not self._admits(Tier.UNKNOWN):
            return self._refuse(Lane.BULK, Refusal.SLOTS)
        self.bulk_in_use += 1
        self._per_ip_bulk[key] = self._per_ip_bulk.get(key, 0) + 1
        return self._admit(ip, key, Lane.BULK)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        if ticket.lane == Lane.FAST:
            self._drop_fast(ticket)
        else:
            self.bulk_in_use -= 1
            decrement(self._per_ip_bulk, ticket.key)
            if ticket.listed:
                decrement(self._per_ip_listed, ticket.key)

    def promote(self, ticket: Ticket, tier: Tier = Tier.OPERATOR) -> None:
        """Move a held bulk slot to the fast lane, to `tier`. No-op if already fast or
        released."""
        if ticket.released or ticket.lane == Lane.FAST:
            return
        tier = Tier.SELF_PROVEN if tier is Tier.UNKNOWN else tier
        ticket.lane = Lane.FAST
        self.bulk_in_use -= 1
        decrement(self._per_ip_bulk, ticket.key)
        if ticket.listed:
            decrement(self._per_ip_listed, ticket.key)
        self._take_fast(ticket.key, tier)
        ticket.tier = tier

    def demote(self, ticket: Ticket) -> None:
        """Move a held fast slot back to the bulk lane. No-op if already bulk or released."""
        if ticket.released or ticket.lane == Lane.BULK:
            return
        self._drop_fast(ticket)
        ticket.lane = Lane.BULK
        self.bulk_in_use += 1
        self._per_ip_bulk[ticket.key] = self._per_ip_bulk.get(ticket.key, 0) + 1
        if ticket.listed:
            self._per_ip_listed[ticket.key] = self._per_ip_listed.get(ticket.key, 0) + 1

    # ------------------------------------------------------------------ block-listed clients

    def mark_listed(self, ticket: Ticket, now: float) -> bool:
        """A verdict listed this session (ingress.policy.shaping.listed). True: its key now
        holds more listed bulk sessions than listed_per_ip_max (close this one: the newest)."""
        lim = self.limits
        if ticket.released or ticket.lane is not Lane.BULK:
            return False
        if lim.listed_ttl > 0:
            self._listed_keys.put(ticket.key, now + lim.listed_ttl, now)
        if not ticket.listed:
            ticket.listed = True
            self._per_ip_listed[ticket.key] = self._per_ip_listed.get(ticket.key, 0) + 1
        return bool(lim.listed_per_ip_max) \
            and self._per_ip_listed[ticket.key] > lim.listed_per_ip_max

    def is_listed(self, ip: str, now: float) -> bool:
        return self._listed_keys.get(ip_key(ip, self.limits.ipv6_prefix), now) is not None

    # ------------------------------------------------------------------ early talkers

    def penalise(self, ip: str, now: float) -> None:
        key = ip_key(ip, self.limits.ipv6_prefix)
        self._penalties.add(key, now + self.limits.penalty_s, now)

    def is_penalised(self, ip: str, now: float) -> bool:
        return self._penalties.active(ip_key(ip, self.limits.ipv6_prefix), now)

    # ------------------------------------------------------------------ internals

    def _admit(self, ip: str, key: str, lane: Lane, tier: Tier = Tier.UNKNOWN) -> Verdict:
        ticket = Ticket(next(self._ids), ip, key, lane, tier)
        return Verdict(True, lane, Refusal.ADMITTED, None, ticket)

    @staticmethod
    def _refuse(lane: Lane, reason: Refusal) -> Verdict:
        return Verdict(False, lane, reason, _REPLIES[reason], None)

    def _take_fast(self, key: str, tier: Tier) -> None:
        self._held[tier] += 1
        if per_ip_capped(tier):
            self._per_ip_fast[key] = self._per_ip_fast.get(key, 0) + 1

    def _drop_fast(self, ticket: Ticket) -> None:
        self._held[ticket.tier] -= 1
        if per_ip_capped(ticket.tier):
            decrement(self._per_ip_fast, ticket.key)
        ticket.tier = Tier.UNKNOWN

    def _take_token(self, key: str, now: float) -> bool:
        lim = self.limits
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= lim.max_tracked_ips:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(lim.per_ip_rate, lim.per_ip_burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)
