"""The lane's admission policy: what a lane broker queues, refuses, and hands to a worker next
(pure: no I/O, the clock and the workers' credit are arguments).

Purpose
    workers/lane/broker.py is the ZeroMQ guide's load-balancing broker (sockets, routing, credit,
    heartbeats, replies); every decision about a message is taken here, one LaneGate per lane:

    * the bounded queue: at most `queue_max` messages and `queue_bytes` bytes of bodies
      (Config.queue_bytes); a message beyond either is refused queue_full at once;
    * for a capped lane, the token bucket (lanes.<lane>.rate and burst, derived.broker_bucket:
      an empty bucket is a refusal for rate); an envelope the acceptor marked a retry of a
      transaction we deferred (ingress.policy.deferrals) takes a token of the retry bucket
      (admission.retry_share of the cap, the bulk lane only) first, and the lane's only when
      that is empty;
    * for the fast lane, trust tiers and fairness between identities (the envelope's
      evidence.identity, by its ingress.policy.identity.share_key, and its tier,
      ingress.policy.tiers.fast_tier): the queue is an ingress.policy.fairqueue.TieredQueue, one
      deficit round robin queue (DRR_QUANTUM bytes) per tier served in strict priority, so the
      operator tier's work is dispatched before any lower tier's. The third-party and
      self-proven tiers each hold at most their cap (tiers.*_share) of queue_max and
      queue_bytes queued, and of the workers' total credit in flight, so some credit is always
      free for the operator tier (tiers.operator_floor); and one total rate each
      (tiers.self_proven_rate: a bucket one second deep, at least one edge's burst, shared
      max-min fairly between client sites, ingress.core.addr.site_key). Inside that, one
      identity holds at most classify.identity_share of queue_max and queue_bytes (but always
      room for one message of smtp.max_message_size) and of the credit in flight (its queue
      waits; others go first); a domain identity ("org:", "learned:") at most
      classify.domain_rate messages a second (one second deep, at least one edge's burst; the
      acceptors hold each their part of it first). Beyond a cap or a rate: a refusal for share,
      and the acceptor serves the message as bulk. A fast envelope without an identity has key
      "" (no per-key bound) and counts as self-proven; the bulk lane is one FIFO (key "", tier
      UNKNOWN).
    * the over-rate list: a domain refused for its rate (its share key) and a client site
      refused for its tier's rate (tiers.rate_key(tier, site)) are named for OVER_RATE_HOLD
      seconds after their last refusal; the broker publishes them in its status, and the
      acceptors keep those sessions bulk at MAIL FROM, where the bulk cap sheds them before DATA.

    Checked in this order, so a message refused for one check spends no token of the rates
    after it: queue count, queue bytes, rate (retry, then lane bucket), tier's cap (queue or
    credit), identity's share of the queue, domain rate, tier rate.

API
    LaneLimits(fast, queue_max, queue_bytes, max_message_size, rate=0, burst=0, retry=None,
               identity_share=1.0, shares=TierShares(), domain=(0, 1), tier_rates={},
               ipv6_prefix=64)              frozen; LaneLimits.of(cfg, lane) from the config
    Request(size, identity="", peer_ip="", retry=False)   one submitted message's facts
    Check                                   what refused a message (StrEnum): queue_full,
                                            queue_bytes, rate, tier_share, key_share,
                                            domain_rate, tier_rate
    Decision(check, tier, key)              .ok, .reason (ingress.core.wire.NackReason),
                                            .text (the NACK's detail)
    Pick(tier, key, item, size)             a message handed out by pick()
    LaneGate[T](limits, now)                T: the caller's queued item
        admit(request, item, now, credit) -> Decision   queues `item` when .ok; `credit` is
                                            the workers' total credit (free + in flight)
        pick(credit, servable=None) -> Pick | None    the next item a worker may take: None
                                            when the queue is empty or every tier / identity
                                            with work is at its share of `credit` in flight (or
                                            its tier is not `servable` now: no worker that
                                            takes it has credit, tiers.worker_takes)
        sent(qid, pick)                     the picked item went to a worker (in flight)
        requeue(pick)                       it could not be sent: back at the head of its queue
        release(qid)                        it left the worker (ACK, NACK, worker lost)
        drain() -> list[T]                  everything queued, emptied (shutdown)
        over_rate_now(now) -> list[str]     named over their rate, most recent first
        near_full() -> bool                 queue at SATURATED_AT of its count or bytes
        facts(now) -> dict                  the status's policy part: "over_rate" (if a rate
                                            names anything), "tiers" (fast: depth, in flight)
        queue, bucket, inflight_by_tier, inflight_by_key, tokens(now)

Failure modes
    None raised for any request (keys and sites are total functions of strings); LaneLimits
    raises ValueError for queue bounds below 1, TierShares for shares out of range.

Limits
    The queue holds at most queue_max items; in-flight records one per item a worker holds
    (bounded by the workers' credit); the domain buckets, the tier buckets' sites and the
    over-rate list at most identity.RATE_TRACKED keys each (least recently used dropped: a
    fresh bucket is a full one); a status names at most OVER_RATE_LISTED keys. In memory only,
    per lane broker process: a restart forgets the queue, the buckets and the list.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, NamedTuple, TypeVar

from ingress.core.addr import site_key
from ingress.core.config import Config
from ingress.core.derived import broker_bucket, domain_buckets, retry_buckets, tier_buckets
from ingress.core.ratelimit import FairBucket, KeyedBuckets, TokenBucket
from ingress.core.wire import Lane, NackReason
from ingress.policy.fairqueue import TieredQueue
from ingress.policy.identity import (
    RATE_TRACKED,
    rate_bounded,
    share_bound,
    share_key,
)
from ingress.policy.tiers import (
    CAPPED,
    FAST_TIERS,
    Tier,
    TierShares,
    cap,
    fast_tier,
    rate_key,
    tier_rates,
)

__all__ = ["DRR_QUANTUM", "OVER_RATE_HOLD", "OVER_RATE_LISTED", "SATURATED_AT", "Check",
           "Decision", "LaneGate", "LaneLimits", "Pick", "Request"]

OVER_RATE_HOLD = 1.0    # seconds a key stays listed over its rate after its last refusal
OVER_RATE_LISTED = 256  # keys over their rate named in one status (the most recent first)
DRR_QUANTUM = 65536     # bytes an identity is served per round of the fast lane's DRR
SATURATED_AT = 0.8      # the queue's part (count or bytes) at which the lane says "saturated"

T = TypeVar("T")


@dataclass(frozen=True)
class LaneLimits:
    """One lane's numbers; buckets as (rate, burst) at the broker (rate <= 0: none)."""
    fast: bool
    queue_max: int
    queue_bytes: int
    max_message_size: int                      # an identity's byte share admits one of these
    rate: float = 0.0                          # the lane's bucket
    burst: float = 0.0
    retry: tuple[float, float] | None = None   # the retry share's bucket (bulk lane)
    identity_share: float = 1.0
    shares: TierShares = field(default_factory=TierShares)
    domain: tuple[float, float] = (0.0, 1.0)   # a domain identity's bucket (fast lane)
    tier_rates: Mapping[Tier, tuple[float, float]] = field(default_factory=dict)
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        if self.queue_max < 1 or self.queue_bytes < 1 or self.max_message_size < 1:
            raise ValueError("queue_max, queue_bytes and max_message_size must be >= 1")

    @classmethod
    def of(cls, cfg: Config, lane: str) -> LaneLimits:
        """The limits of lanes.<lane> (the fast lane's tiers and identities; the bulk lane's
        retry share), buckets derived as the acceptors' are (ingress.core.derived:
        broker_bucket, retry_buckets, domain_buckets, tier_buckets)."""
        fast = lane == Lane.FAST
        rate, burst = broker_bucket(cfg, lane)
        retry = retry_buckets(cfg) if lane == Lane.BULK else None
        domain_rate = cfg.classify.domain_rate if fast else 0.0
        return cls(
            fast=fast, queue_max=getattr(cfg.lanes, lane).queue_max,
            queue_bytes=cfg.queue_bytes(lane), max_message_size=cfg.smtp.max_message_size,
            rate=rate, burst=burst, retry=retry[1] if retry is not None else None,
            identity_share=cfg.classify.identity_share if fast else 1.0,
            shares=TierShares.of(cfg),
            domain=domain_buckets(domain_rate, cfg.classify.domain_burst, 1)[1],
            tier_rates={t: tier_buckets(r, b, 1)[1] for t, (r, b) in tier_rates(cfg).items()}
            if fast else {},
            ipv6_prefix=cfg.admission.ipv6_prefix)


@dataclass(frozen=True)
class Request:
    """A submitted message: its body's size and the envelope facts the policy reads."""
    size: int
    identity: str = ""        # evidence.identity (read in the fast lane only)
    peer_ip: str = ""         # the client's address (its site shares a tier's rate)
    retry: bool = False       # evidence.retry: a retry of a deferred transaction


class Check(StrEnum):
    """The check that refused a message."""
    QUEUE_FULL = "queue_full"       # the lane's queue at queue_max messages
    QUEUE_BYTES = "queue_bytes"     # ... or at queue_bytes of bodies
    RATE = "rate"                   # the lane's bucket (and the retry share's) empty
    TIER_SHARE = "tier_share"       # its tier at its cap of the queue or of the credit
    KEY_SHARE = "key_share"         # its identity at its share of the queue
    DOMAIN_RATE = "domain_rate"     # its domain over classify.domain_rate
    TIER_RATE = "tier_rate"         # its client site over its part of the tier's rate


_REFUSAL: dict[Check, tuple[NackReason, str]] = {
    Check.QUEUE_FULL: (NackReason.QUEUE_FULL, "lane queue full"),
    Check.QUEUE_BYTES: (NackReason.QUEUE_FULL, "lane queue full (bytes)"),
    Check.RATE: (NackReason.RATE, "lane rate cap"),
    Check.TIER_SHARE: (NackReason.SHARE, "tier over its share of the lane"),
    Check.KEY_SHARE: (NackReason.SHARE, "identity over its share of the lane"),
    Check.DOMAIN_RATE: (NackReason.SHARE, "identity over its share of the lane"),
    Check.TIER_RATE: (NackReason.SHARE, "tier over its rate"),
}


@dataclass(frozen=True)
class Decision:
    check: Check | None       # None: admitted (queued)
    tier: Tier
    key: str

    @property
    def ok(self) -> bool:
        return self.check is None

    @property
    def reason(self) -> NackReason | None:
        return None if self.check is None else _REFUSAL[self.check][0]

    @property
    def text(self) -> str:
        return "" if self.check is None else _REFUSAL[self.check][1]


class Pick(NamedTuple, Generic[T]):
    tier: Tier
    key: str
    item: T
    size: int


class LaneGate(Generic[T]):
    def __init__(self, limits: LaneLimits, now: float) -> None:
        lim = self.limits = limits
        self.fast = lim.fast
        self.bucket = TokenBucket(lim.rate, lim.burst, now=now)
        self.retry_bucket = TokenBucket(*lim.retry, now=now) if lim.retry is not None else None
        caps = {t: (cap(t, lim.queue_max, lim.shares), cap(t, lim.queue_bytes, lim.shares))
                for t in CAPPED} if lim.fast else {}
        share = lim.identity_share
        self.queue: TieredQueue[T] = TieredQueue(
            DRR_QUANTUM, share_bound(lim.queue_max, share),
            max(share_bound(lim.queue_bytes, share), lim.max_message_size), caps)
        self.tier_buckets = {t: FairBucket(rate, burst, now=now, max_keys=RATE_TRACKED)
                             for t, (rate, burst) in lim.tier_rates.items()}
        self.domain_rate = lim.domain[0] if lim.fast else 0.0
        self.domain_buckets = KeyedBuckets(*lim.domain, RATE_TRACKED)
        self.over_rate: OrderedDict[str, float] = OrderedDict()   # key -> last refused
        self.inflight: dict[bytes, tuple[Tier, str]] = {}         # qid -> (tier, share key)
        self.inflight_by_tier: dict[Tier, int] = dict.fromkeys(Tier, 0)
        self.inflight_by_key: dict[str, int] = {}

    # --- admission ----------------------------------------------------------------------------

    def admit(self, req: Request, item: T, now: float, credit: int) -> Decision:
        """Queue `item` (the message of `req`), or say which check refused it."""
        tier = fast_tier(req.identity) if self.fast else Tier.UNKNOWN
        key = share_key(req.identity) if self.fast else ""
        check = self._check(req, tier, key, now, credit)
        if check is None:      # room checked: the queue's own bounds are not applied again
            self.queue.push(tier, key, item, req.size, bounded=False)
        return Decision(check, tier, key)

    def _check(self, req: Request, tier: Tier, key: str, now: float, credit: int
               ) -> Check | None:
        lim = self.limits
        if len(self.queue) >= lim.queue_max:
            return Check.QUEUE_FULL
        if self.queue.bytes + req.size > lim.queue_bytes:
            return Check.QUEUE_BYTES
        if not (self._retry_token(req, now) or self.bucket.take(now)):
            return Check.RATE
        if not self.queue.tier_room(tier, req.size) or not self._tier_credit(tier, credit):
            return Check.TIER_SHARE
        if key and not self.queue.key_room(tier, key, req.size):
            return Check.KEY_SHARE
        if not self._domain_token(key, now):
            return Check.DOMAIN_RATE
        if not self._tier_token(tier, req.peer_ip, now):
            return Check.TIER_RATE
        return None

    def _retry_token(self, req: Request, now: float) -> bool:
        """A token of the retry share for a message marked a retry (never for others)."""
        return req.retry and self.retry_bucket is not None and self.retry_bucket.take(now)

    def _tier_credit(self, tier: Tier, credit: int) -> bool:
        """May this tier hold any of the workers' credit now? A capped tier whose cap of the
        current credit is 0 would never be dispatched: served as bulk instead of waiting to
        expire. With no worker connected (credit 0) it waits, as every tier does."""
        return tier not in CAPPED or not credit or cap(tier, credit, self.limits.shares) > 0

    def _domain_token(self, key: str, now: float) -> bool:
        """A domain identity (share key "org:...") within classify.domain_rate? Others: yes.
        Refused, the domain is named over its rate."""
        if self.domain_rate <= 0 or not rate_bounded(key):
            return True
        if self.domain_buckets.take(key, now):
            return True
        self._name_over_rate(key, now)
        return False

    def _tier_token(self, tier: Tier, peer_ip: str, now: float) -> bool:
        """Within the client site's fair part of its tier's total rate? A token is taken;
        refused, that site is named over the tier's rate (rate_key(tier, site)), not the whole
        tier: another site's sessions of the tier stay fast. Tiers without a rate: yes."""
        bucket = self.tier_buckets.get(tier)
        if bucket is None:
            return True
        site = site_key(peer_ip, self.limits.ipv6_prefix)
        if bucket.take(site, now):
            return True
        self._name_over_rate(rate_key(tier, site), now)
        return False

    def _name_over_rate(self, key: str, now: float) -> None:
        self.over_rate[key] = now
        self.over_rate.move_to_end(key)
        if len(self.over_rate) > RATE_TRACKED:
            self.over_rate.popitem(last=False)

    def over_rate_now(self, now: float) -> list[str]:
        """The keys refused for a rate within OVER_RATE_HOLD, most recent first (at most
        OVER_RATE_LISTED); older ones are forgotten."""
        while self.over_rate:
            key, at = next(iter(self.over_rate.items()))
            if at >= now - OVER_RATE_HOLD:
                break
            del self.over_rate[key]
        return list(itertools.islice(reversed(self.over_rate), OVER_RATE_LISTED))

    # --- dispatch -----------------------------------------------------------------------------

    def pick(self, credit: int, servable: Callable[[Tier], bool] | None = None
             ) -> Pick[T] | None:
        """The next item for a worker, in strict tier priority and DRR order, among the capped
        tiers below their cap of `credit` in flight and the identities below their share, of
        the tiers a worker with credit takes now (`servable`; None: every tier)."""
        tier_ok, key_ok = self._eligible(credit)
        if servable is not None:
            within = tier_ok
            tier_ok = servable if within is None else (lambda t: within(t) and servable(t))
        got = self.queue.pop(tier_ok, key_ok)
        return None if got is None else Pick(*got)

    def _eligible(self, credit: int) -> tuple[Callable[[Tier], bool] | None,
                                              Callable[[str], bool] | None]:
        if not self.fast:
            return None, None
        caps = {t: cap(t, credit, self.limits.shares) for t in FAST_TIERS}

        def tier_ok(tier: Tier) -> bool:
            return self.inflight_by_tier[tier] < caps.get(tier, credit)

        if self.limits.identity_share >= 1.0:
            return tier_ok, None
        bound = share_bound(credit, self.limits.identity_share)
        return tier_ok, lambda key: self.inflight_by_key.get(key, 0) < bound

    def sent(self, qid: bytes, pick: Pick[T]) -> None:
        """`pick` is with a worker now: its tier's and its identity's in-flight counts rise."""
        self.inflight[qid] = (pick.tier, pick.key)
        self.inflight_by_key[pick.key] = self.inflight_by_key.get(pick.key, 0) + 1
        self.inflight_by_tier[pick.tier] += 1

    def requeue(self, pick: Pick[T]) -> None:
        self.queue.push_front(pick.tier, pick.key, pick.item, pick.size)

    def release(self, qid: bytes) -> None:
        """Work `qid` left its worker (ACK, NACK or lost): the in-flight counts drop."""
        held = self.inflight.pop(qid, None)
        if held is None:
            return
        tier, key = held
        self.inflight_by_tier[tier] -= 1
        left = self.inflight_by_key[key] - 1
        if left > 0:
            self.inflight_by_key[key] = left
        else:
            del self.inflight_by_key[key]

    def drain(self) -> list[T]:
        return [item for _, _, item, _ in self.queue.drain()]

    # --- status -------------------------------------------------------------------------------

    def tokens(self, now: float) -> float:
        return self.bucket.tokens(now)

    def near_full(self) -> bool:
        lim = self.limits
        return (len(self.queue) >= lim.queue_max * SATURATED_AT
                or self.queue.bytes >= lim.queue_bytes * SATURATED_AT)

    def facts(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.domain_rate > 0 or self.tier_buckets:
            out["over_rate"] = self.over_rate_now(now)
        if self.fast:
            out["tiers"] = {t.label: {"depth": self.queue.tier_len(t),
                                      "inflight": self.inflight_by_tier[t]}
                            for t in FAST_TIERS}
        return out
