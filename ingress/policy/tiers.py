"""Trust tiers: who vouches for an identity, and what each tier may hold of the fast lane (pure).

Purpose
    Every promoted session carries an identity (ingress.policy.identity), and identities are
    ranked by who vouches for them: the operator (an allow-list entry, a client certificate),
    a third party (a DNS allow list, DNSWL-style: room for it, nothing promotes into it yet),
    the sender itself (SPF, DKIM, learned entries: anyone can mint these for the price of a
    domain), or nobody (bulk). A higher tier may take room from a lower one, never the
    reverse. This module is the one place that says which tier an identity is in and how much
    of a fast resource each tier may hold; the acceptors' slots (ingress.policy.admission),
    DATA bytes (ingress.edge.dataread), and the fast broker's queue and worker credit
    (workers.lane.broker, ingress.policy.fairqueue.TieredQueue) all apply it.

Rules (one for every fast resource: slots, queue count and bytes, worker credit, DATA bytes)
    * Worker processes: the self-proven tier's messages go to the fast workers dedicated to it
      (tiers.self_proven_workers, at tiers.self_proven_nice), which take nothing else; the
      other fast workers take every other tier, and the self-proven tier's only while no
      dedicated worker is up. So a spammer's self-proven mail (its DKIM checks, its commits)
      never runs in the process, under the interpreter lock, that holds the operator's mail
      (worker_takes; measured in docs/benchmarks.md, 2026-12-07).
    * The third-party and self-proven tiers are each capped as a whole: cap(tier, reserve) =
      floor(reserve x share) (tiers.third_party_share, tiers.self_proven_share), however many
      identities (domains) they hold. Beyond its cap a tier's session or message is served as
      bulk, never refused for it. Per-identity shares (classify.identity_share) and rates
      (classify.domain_rate) apply inside that cap (both bounds hold).
    * The operator tier is never capped, and holds a floor no lower tier can use:
      operator_floor = reserve - cap(third-party) - cap(self-proven) >= 1 whenever reserve >= 1
      (the shares sum to less than 1). Likewise third-party and operator together hold
      reserve - cap(self-proven) that self-proven and bulk can never use, and the whole
      reserve is the fast lane's (bulk never uses it: the rule admission had before tiers).
    * admits(): one rule for every tier of a resource of `capacity` units of which `reserve`
      is the fast lane's: a tier's units must fit its cap, and after taking them the unused
      floors of every higher tier must still be free. Since every lower tier obeys the same
      rule, a higher tier always finds its unused floor free (see docs/design.md, "Trust
      tiers").
    * The self-proven tier has one total rate (tiers.self_proven_rate msgs/s per lanes node,
      burst tiers.self_proven_burst), split over the acceptors that hold its sessions as
      classify.domain_rate is (ingress.core.derived.tier_buckets); beyond it: bulk. The
      third-party tier may have one.
      A tier's rate is shared max-min fairly between client sites (IPv4 /24, IPv6 /48:
      ingress.core.addr.site_key), not between identities: identities are free to mint,
      networks are not. A sender from its own network keeps its fair part however many
      domains an attacker's networks mint; an attacker spread over many networks dilutes
      everyone's part, and the tier's total still bounds what they all get.
    * Promoted sessions of the capped tiers have a per-IP (per-prefix) cap
      (admission.per_ip_fast_max; the operator tier is exempt).
    * Only the operator and third-party tiers are handed to the fast acceptors
      (ingress.edge.handoff): a tier anyone can mint does not share their event loop. Only they
      may evict (may_evict / pick_victim): when the slots are full, an operator client takes
      the room of an idle session of a lower tier (bulk first, then self-proven, then
      third-party), never the reverse.

API
    Tier                              IntEnum, in priority order: OPERATOR, THIRD_PARTY,
                                      SELF_PROVEN, UNKNOWN; .label ("operator", "third-party",
                                      "self-proven", "unknown")
    FAST_TIERS, CAPPED                (OPERATOR, THIRD_PARTY, SELF_PROVEN); (THIRD_PARTY,
                                      SELF_PROVEN)
    PRIORITY_TIERS, commit_slots(tiers, free) -> [[i...], [i...]]   a lane worker's two
                                      committers: the second is (OPERATOR, THIRD_PARTY)'s only
    journals(lane, dedicated, tiers) -> bool    does a worker's group commit of messages of
                                      these tiers go into its journal (workers.spool.journal)
    DEDICATED, dedicated_tier(label) -> Tier    the tiers a fast worker may be dedicated to
                                      (SELF_PROVEN: tiers.self_proven_workers); WireError-free:
                                      ValueError for any other label
    worker_takes(tier, serves, dedicated_up) -> bool    may a worker (serves: its dedicated
                                      tier, None: any) take a message of `tier`
    tier_of(identity) -> Tier         "allow:", "cert:" -> OPERATOR; "dnswl:" -> THIRD_PARTY;
                                      "org:", "learned:" (and any other kind: fail closed)
                                      -> SELF_PROVEN; "" -> UNKNOWN
    fast_tier(identity) -> Tier       tier_of, but a fast message without an identity counts
                                      as SELF_PROVEN (capped: fail closed)
    session_tier(lane, identity) -> Tier   a session's or message's tier now: fast_tier in the
                                      fast lane, UNKNOWN in the bulk lane
    dnswl_identity(zone) -> str       "dnswl:<zone>" (for the evidence-sources issue)
    TierShares(third_party, self_proven)   frozen, validated; .share(tier) (None: uncapped);
                                      TierShares.of(cfg)
    cap(tier, total, shares) -> int   what one tier may hold of `total` units
    caps(total, shares) -> {Tier: int}     the capped tiers' caps
    operator_floor(total, shares) -> int
    floor_above(tier, reserve, shares) -> int   what the tiers above `tier` are guaranteed
    admits(tier, n, held, used, capacity, reserve, shares) -> bool    the admission rule
    hands_off(tier) / may_evict(tier) / per_ip_capped(tier) -> bool
    pick_victim(evictor, seats) -> key | None   seats: (key, tier, busy, since)
    rate_key(tier, site="") -> "tier:<label>[@<site>]"  the key of a tier's total rate, or of
                                      one client site's fair part of it (brokers' over_rate
                                      list)
    over_tier_reason(tier) / over_tier_rate_reason(tier) / over_ip_reason(ip_key) -> str
                                      "over-share:tier:<label>", "over-rate:tier:<label>",
                                      "over-share:ip:<key>" (Decision.reasons; served as bulk:
                                      identity.served_over_share knows both prefixes)
    tier_rates(cfg) -> {Tier: (rate, burst)}    the tiers with a total rate (rate > 0)
    (a tier's total rate split between acceptors and the fast broker: ingress.core.derived
    tier_buckets, rate_parts)

Failure modes: TierShares raises ValueError for shares outside [0, 1) or summing to 1 or more.
Everything else is total. Limits: none (no state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from ingress.core.config import Config
from ingress.core.wire import Lane
from ingress.policy.identity import OVER_RATE, OVER_SHARE

__all__ = [
    "CAPPED",
    "DEDICATED",
    "FAST_TIERS",
    "Tier",
    "TierShares",
    "admits",
    "cap",
    "caps",
    "dedicated_tier",
    "dnswl_identity",
    "fast_tier",
    "floor_above",
    "hands_off",
    "may_evict",
    "operator_floor",
    "over_ip_reason",
    "over_tier_rate_reason",
    "over_tier_reason",
    "per_ip_capped",
    "pick_victim",
    "rate_key",
    "session_tier",
    "tier_of",
    "tier_rates",
    "worker_takes",
]


class Tier(IntEnum):
    """Ranked by who vouches: a lower value is a higher tier (and is served first)."""

    OPERATOR = 0
    THIRD_PARTY = 1
    SELF_PROVEN = 2
    UNKNOWN = 3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


FAST_TIERS = (Tier.OPERATOR, Tier.THIRD_PARTY, Tier.SELF_PROVEN)
CAPPED = (Tier.THIRD_PARTY, Tier.SELF_PROVEN)
PRIORITY_TIERS = (Tier.OPERATOR, Tier.THIRD_PARTY)    # a worker's second committer is theirs

_BY_KIND = {"allow": Tier.OPERATOR, "cert": Tier.OPERATOR, "dnswl": Tier.THIRD_PARTY,
            "org": Tier.SELF_PROVEN, "learned": Tier.SELF_PROVEN}


def tier_of(identity: str) -> Tier:
    if not identity:
        return Tier.UNKNOWN
    return _BY_KIND.get(identity.partition(":")[0], Tier.SELF_PROVEN)


def fast_tier(identity: str) -> Tier:
    tier = tier_of(identity)
    return Tier.SELF_PROVEN if tier is Tier.UNKNOWN else tier


def session_tier(lane: Lane, identity: str) -> Tier:
    return fast_tier(identity) if lane is Lane.FAST else Tier.UNKNOWN


def dnswl_identity(zone: str) -> str:
    return f"dnswl:{zone.lower().rstrip('.')}"


@dataclass(frozen=True, slots=True)
class TierShares:
    """The capped tiers' shares of every fast resource (tiers.third_party_share and
    tiers.self_proven_share); the operator tier holds the rest."""

    third_party: float = 0.25
    self_proven: float = 0.5

    def __post_init__(self) -> None:
        for name in ("third_party", "self_proven"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"{name} share must be in [0, 1)")
        if self.third_party + self.self_proven >= 1:
            raise ValueError("the third-party and self-proven shares must sum to less than 1 "
                             "(the rest is the operator tier's floor)")

    def share(self, tier: Tier) -> float | None:
        if tier is Tier.THIRD_PARTY:
            return self.third_party
        if tier is Tier.SELF_PROVEN:
            return self.self_proven
        if tier is Tier.UNKNOWN:
            return 0.0
        return None

    @classmethod
    def of(cls, cfg: Config) -> TierShares:
        t = cfg.tiers
        return cls(third_party=t.third_party_share, self_proven=t.self_proven_share)


def cap(tier: Tier, total: int, shares: TierShares) -> int:
    """Units of `total` one tier may hold: all of it for the operator, none for bulk (of a
    fast resource), floor(total x share) for a capped tier."""
    share = shares.share(tier)
    if share is None:
        return max(0, total)
    return max(0, math.floor(total * share + 1e-9))


def caps(total: int, shares: TierShares) -> dict[Tier, int]:
    return {t: cap(t, total, shares) for t in CAPPED}


def operator_floor(total: int, shares: TierShares) -> int:
    """Units of `total` no lower tier can ever hold."""
    return max(0, total - sum(caps(total, shares).values()))


def floor_above(tier: Tier, reserve: int, shares: TierShares) -> int:
    """The part of the fast `reserve` that the tiers above `tier` are guaranteed: the reserve
    less the caps of `tier` and of every capped tier below it (bulk: the whole reserve)."""
    if tier is Tier.OPERATOR:
        return 0
    return max(0, reserve - sum(cap(t, reserve, shares) for t in CAPPED if t >= tier))


def admits(tier: Tier, n: int, held: Mapping[Tier, int], used: int, capacity: int,
           reserve: int, shares: TierShares) -> bool:
    """May `tier` take `n` more units of a resource of `capacity` units (of which `reserve` are
    the fast lane's), `used` in all, `held[t]` by each fast tier t? Within its cap (capped
    tiers), and leaving the unused floors of the tiers above it free."""
    if tier in CAPPED and held.get(tier, 0) + n > cap(tier, reserve, shares):
        return False
    above = sum(held.get(t, 0) for t in FAST_TIERS if t < tier)
    unused = max(0, floor_above(tier, reserve, shares) - above)
    return used + n + unused <= capacity


def hands_off(tier: Tier) -> bool:
    """Is a client of this tier, known at connect, served by a fast acceptor?"""
    return tier in (Tier.OPERATOR, Tier.THIRD_PARTY)


def may_evict(tier: Tier) -> bool:
    """May a newcomer of this tier take an idle lower-tier session's slot when none is free?"""
    return tier in (Tier.OPERATOR, Tier.THIRD_PARTY)


def per_ip_capped(tier: Tier) -> bool:
    """Do this tier's promoted sessions count against admission.per_ip_fast_max?"""
    return tier in CAPPED


K = TypeVar("K")


def pick_victim(evictor: Tier, seats: Iterable[tuple[K, Tier, bool, float]]) -> K | None:
    """The seat whose slot a newcomer of tier `evictor` takes: not busy (inside DATA or
    waiting for its ack), of a strictly lower tier, the lowest tier first, then the one
    connected longest (`since`: its start). None: nobody may be evicted for it."""
    if not may_evict(evictor):
        return None
    best: tuple[int, float] | None = None
    victim: K | None = None
    for key, tier, busy, since in seats:
        if busy or tier <= evictor:
            continue
        rank = (-int(tier), since)
        if best is None or rank < best:
            best, victim = rank, key
    return victim


TIER_KEY = "tier:"


def rate_key(tier: Tier, site: str = "") -> str:
    """The key of a tier's total rate ("tier:<label>"), or of one client site's part of it
    ("tier:<label>@<site>", site = ingress.core.addr.site_key)."""
    return f"{TIER_KEY}{tier.label}@{site}" if site else f"{TIER_KEY}{tier.label}"


def over_tier_reason(tier: Tier) -> str:
    return f"{OVER_SHARE}{rate_key(tier)}"


def over_tier_rate_reason(tier: Tier) -> str:
    return f"{OVER_RATE}{rate_key(tier)}"


def over_ip_reason(ip_key: str) -> str:
    return f"{OVER_SHARE}ip:{ip_key}"


def tier_rates(cfg: Config) -> dict[Tier, tuple[float, float]]:
    t = cfg.tiers
    out = {}
    if t.self_proven_rate > 0:
        out[Tier.SELF_PROVEN] = (t.self_proven_rate, t.self_proven_burst)
    if t.third_party_rate > 0:
        out[Tier.THIRD_PARTY] = (t.third_party_rate, t.third_party_burst)
    return out


DEDICATED = (Tier.SELF_PROVEN,)


def dedicated_tier(label: str) -> Tier:
    """The tier a worker's READY names (`serves`), or ValueError."""
    for t in DEDICATED:
        if t.label == label:
            return t
    raise ValueError(f"no worker is dedicated to {label!r}")


def worker_takes(tier: Tier, serves: Tier | None, dedicated_up: bool) -> bool:
    """May a worker take a message of `tier`? A dedicated worker (serves: its tier) only its
    own tier's; any other worker every tier, but a dedicated tier's only while no worker
    dedicated to it is up (dedicated_up False: it is restarting, or there is none)."""
    if serves is not None:
        return tier is serves
    return tier not in DEDICATED or not dedicated_up


def commit_slots(tiers: Sequence[Tier], free: Sequence[bool]) -> list[list[int]]:
    """A lane worker's two committers (workers.lane.worker): which of the ready messages (their
    tiers, in order) each takes now. `free`: committer 0 (anyone's) and committer 1 (the
    PRIORITY_TIERS') are not writing a commit. Committer 1, when free, takes every ready
    message of PRIORITY_TIERS and never another's: the operator's mail never waits behind a
    commit of the self-proven tier's (or bulk's). Committer 0, when free, takes the rest, and
    the priority ones too while committer 1 is busy (whichever is free first). Indexes in
    order; nothing for a busy committer."""
    prio = [i for i, t in enumerate(tiers) if t in PRIORITY_TIERS]
    rest = [i for i, t in enumerate(tiers) if t not in PRIORITY_TIERS]
    out: list[list[int]] = [[], []]
    if free[1] and prio:
        out[1], prio = prio, []
    if free[0]:
        out[0] = sorted(rest + prio)
    return out


def journals(lane: Lane, dedicated: bool, tiers: Sequence[Tier]) -> bool:
    """Does a lane worker's group commit of messages of these `tiers` go into its journal (one
    fdatasync; the files in new/ after the 250), or is it written the usual way? Every worker
    has a journal of its own, and it holds the mail the worker is for: a bulk worker's and a
    worker dedicated to a tier (tiers.self_proven_workers) all of theirs; the operator's fast
    workers' journal is the operator's reserve, so a commit goes there only when every message
    of it is of PRIORITY_TIERS (the self-proven mail such a worker takes while the dedicated one
    is down is written the usual way: identities anyone can mint never fill it)."""
    if lane is Lane.BULK or dedicated:
        return True
    return all(t in PRIORITY_TIERS for t in tiers)
