"""The mutual-TLS port's handshake gate: who gets a TLS handshake now, who waits, who is refused
(pure: no I/O, the clock is an argument).

Purpose
    A TLS server handshake with a client certificate costs about 1.2 ms of CPU here (RSA-2048
    or P-256 server key; 0.3-0.5 ms when it fails at the client's certificate, 0.5 ms for a
    resumed TLS 1.3 session), on the event loop of the fast acceptor that also serves the
    allow-listed clients handed over from port 25. Anyone can open connections and send
    ClientHellos, and before the handshake only the client's address is known. So the gate
    ranks a connection by its address, once its ClientHello is there:

      known     its network prefix completed a handshake with a verified certificate within
                known_ttl (a resumed TLS 1.3 session counts: it carries the certificate it
                was verified with). Started at once, within the prefix's own rate
                (known_rate a second, a burst of as many); beyond that rate, a stranger.
      stranger  anyone else. Takes a token of ONE bucket shared by every stranger
                (stranger_rate a second, stranger_burst), so handshakes for clients that have
                not shown a certificate never cost more than stranger_rate x ~1.2 ms of CPU a
                second, however many addresses send them. Without a token it waits, first in
                first out, at most `wait` seconds, in a queue of at most queue_max (the
                tokens of `wait` seconds: a longer queue would only time out); then refused.
      failed    a stranger whose address failed a handshake within failed_ttl (no
                certificate, a bad one, a stall, a connection lost mid-handshake). The same
                bucket, but only when no stranger waits, and a stranger arriving at a full
                queue takes the place of the newest failed waiter. A flood of bad handshakes
                from the same addresses thus spends only the tokens new clients leave.

    Steering: the addresses (not prefixes) that completed a verified handshake, while their
    prefix is known, at most STEER_PER_PREFIX per prefix and steer_max in all (the least
    recently verified go first), are what the caller has the kernel steer away from the process
    that does strangers' handshakes (steered(); ingress.edge.mtls). Exact addresses: a bot
    beside a certificate holder in its /24 or /64 is not steered with it.

    Keys: the known key is the IPv4 /known_ipv4_prefix or IPv6 /ipv6_prefix network (a sending
    cluster moves between nearby addresses; an attacker inside such a prefix gets at most its
    known_rate, and falls back to the stranger bucket beyond it); the failed key is the client's
    admission key (ingress.core.addr.ip_key: the IPv4 address, the IPv6 /ipv6_prefix), so a bot
    does not mark its neighbours.

API
    GateLimits(stranger_rate, stranger_burst, wait, known_ttl, known_max, known_rate,
               known_ipv4_prefix, ipv6_prefix, failed_ttl, failed_max, per_cert)  frozen
        .queue_max                     ceil(stranger_rate x wait)
    Tier                               known | stranger | failed (metrics labels)
    Verdict                            start | wait | refuse
    HandshakeGate[T](limits, now)      T: the caller's token for a waiting connection (hashable,
                                       unique among those waiting)
        arrive(ip, item, now, vouched=False) -> Arrival(verdict, tier, deadline, displaced)
                                       `vouched`: known whatever this table says (a process
                                       the kernel steers verified addresses to; still within
                                       the prefix's known_rate, a stranger beyond it)
                                       start: handshake now (a token is taken); wait: until
                                       due() names `item` (at most until `deadline`); refuse:
                                       the queue is full. `displaced`: a failed waiter pushed
                                       out of the queue by this stranger (refuse it now)
        refused_at_once(ip, now, vouched=False) -> Tier | None
                                       the tier of a client arrive() would refuse now (nothing
                                       taken), None if it could start or wait
        due(now) -> Due(started, expired)   waiters that got a token (start them), waiters
                                       whose wait is over (refuse them); call it at
                                       next_event()
        next_event(now) -> float | None  when due() next has something to say (None: nobody
                                       waits)
        leave(item) -> bool            a waiter went (closed, evicted): out of the queue
        verified(ip, cert, now)        a handshake completed with certificate `cert` (its
                                       SHA-256): the prefix is known for known_ttl from now
        failed(ip, now)                a handshake we started failed
        tier(ip, now) -> Tier          (without taking anything)
        waiting -> int; known_count -> int
        steered(now) -> [(address, until)]   the addresses to steer (least recently
                                       verified first), each until its prefix's entry expires;
                                       expired prefixes are forgotten first

Rules
    * stranger_rate <= 0: no gate (every connection starts at once; tiers are still named).
    * A certificate makes at most `per_cert` prefixes known (its least recently verified one
      is forgotten first): one leaked certificate cannot make a botnet's addresses known, nor
      push out everyone else's entries.
    * The known table holds at most known_max prefixes (the least recently verified is
      forgotten first: with one TTL that is also the soonest to expire); the failed table
      failed_max addresses (ingress.core.expiry.ExpiryMap); the per-prefix buckets known_max.
    * A known prefix is refreshed by every verified handshake, never by a failed one; a failed
      handshake from a known prefix marks its address failed (it matters once the prefix's
      rate is spent, or the entry expires).

Failure modes
    GateLimits raises ValueError for limits out of range. Nothing else raises; an `ip` that is
    not an address is its own key.

Limits
    Per acceptor process (the fast acceptors serve the mutual-TLS port with SO_REUSEPORT: a
    client is known to the processes it completed a handshake with). In memory only: after a
    restart every client is a stranger until its next handshake. Before the handshake a
    resumption cannot be told from a full handshake (the ticket is only opened inside it), so a
    resumed session is given priority through its prefix, like any certificate holder.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from ingress.core.addr import ip_key
from ingress.core.expiry import ExpiryMap
from ingress.core.ratelimit import KeyedBuckets, TokenBucket

__all__ = ["Arrival", "Due", "GateLimits", "HandshakeGate", "Tier", "Verdict"]

T = TypeVar("T", bound=Hashable)

PER_CERT = 16          # prefixes one certificate can make known at a time
STEER_PER_PREFIX = 4   # verified addresses steered per known prefix
STEER_MAX = 250        # verified addresses steered in all (one reuseport program's networks)
FAILED_MAX = 16384     # addresses remembered as failed (~150 bytes each)


class Tier(StrEnum):
    KNOWN = "known"
    STRANGER = "stranger"
    FAILED = "failed"


class Verdict(StrEnum):
    START = "start"
    WAIT = "wait"
    REFUSE = "refuse"


@dataclass(frozen=True)
class GateLimits:
    stranger_rate: float = 50.0      # handshakes a second for strangers (<= 0: no gate)
    stranger_burst: float = 10.0
    wait: float = 1.0                # seconds a stranger waits for a token at most
    known_ttl: float = 7 * 86400.0
    known_max: int = 4096
    known_rate: float = 20.0         # handshakes a second per known prefix (burst: as many)
    known_ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    failed_ttl: float = 600.0
    failed_max: int = FAILED_MAX
    per_cert: int = PER_CERT
    steer_max: int = STEER_MAX

    def __post_init__(self) -> None:
        if self.stranger_rate > 0 and self.stranger_burst < 1:
            raise ValueError("stranger_burst must be >= 1")
        if self.wait < 0 or self.known_ttl <= 0 or self.failed_ttl < 0 or self.known_rate <= 0:
            raise ValueError("wait, failed_ttl >= 0; known_ttl, known_rate > 0")
        if min(self.known_max, self.failed_max, self.per_cert, self.steer_max) < 1:
            raise ValueError("known_max, failed_max, per_cert, steer_max must be >= 1")
        if not (8 <= self.known_ipv4_prefix <= 32 and 16 <= self.ipv6_prefix <= 128):
            raise ValueError("known_ipv4_prefix in 8..32, ipv6_prefix in 16..128")

    @property
    def queue_max(self) -> int:
        return math.ceil(self.stranger_rate * self.wait) if self.stranger_rate > 0 else 0


@dataclass(frozen=True)
class Arrival(Generic[T]):
    verdict: Verdict
    tier: Tier
    deadline: float = 0.0            # Verdict.WAIT: refused by due() at this time
    displaced: T | None = None       # a failed waiter this arrival pushed out (refuse it)


@dataclass
class Due(Generic[T]):
    started: list[T] = field(default_factory=list)
    expired: list[T] = field(default_factory=list)


@dataclass(eq=False)
class _Waiter(Generic[T]):
    item: T
    tier: Tier
    deadline: float


class HandshakeGate(Generic[T]):
    """See the module docstring."""

    def __init__(self, limits: GateLimits, now: float) -> None:
        self.limits = limits
        self.bucket = TokenBucket(limits.stranger_rate, limits.stranger_burst, now=now)
        self.known_rates = KeyedBuckets(limits.known_rate, limits.known_rate, limits.known_max)
        # prefix -> (expires, cert), in order of last verification (= of expiry)
        self._known: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._by_cert: dict[str, OrderedDict[str, None]] = {}   # cert -> its known prefixes
        self._failed = ExpiryMap(limits.failed_max)
        self._queues: dict[Tier, deque[_Waiter[T]]] = {
            Tier.STRANGER: deque(), Tier.FAILED: deque()}
        self._waiters: dict[T, _Waiter[T]] = {}       # item -> its waiter
        self._expired: list[T] = []        # wait over, seen by arrive(): named by due()
        # verified addresses to steer: address -> its prefix, least recently verified first;
        # and per prefix its addresses (at most STEER_PER_PREFIX)
        self._steer: OrderedDict[str, str] = OrderedDict()
        self._steer_of: dict[str, OrderedDict[str, None]] = {}

    # --- who is it ------------------------------------------------------------------------

    def _known_key(self, ip: str) -> str:
        return ip_key(ip, self.limits.ipv6_prefix, self.limits.known_ipv4_prefix)

    def _is_known(self, prefix: str, now: float) -> bool:
        entry = self._known.get(prefix)
        if entry is None:
            return False
        if entry[0] <= now:
            self._forget(prefix)
            return False
        return True

    def tier(self, ip: str, now: float) -> Tier:
        if self._is_known(self._known_key(ip), now):
            return Tier.KNOWN
        return self._unknown_tier(ip, now)

    @property
    def known_count(self) -> int:
        return len(self._known)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # --- arrivals and the queue -------------------------------------------------------------

    def arrive(self, ip: str, item: T, now: float, vouched: bool = False) -> Arrival[T]:
        prefix = self._known_key(ip)
        if (vouched or self._is_known(prefix, now)) and self.known_rates.take(prefix, now):
            return Arrival(Verdict.START, Tier.KNOWN)
        tier = self._unknown_tier(ip, now)
        if self.limits.stranger_rate <= 0:
            return Arrival(Verdict.START, tier)
        self._expire(now, self._expired)   # the expired are named by the next due()
        if self._ahead(tier) == 0 and self.bucket.take(now):
            return Arrival(Verdict.START, tier)
        if self._no_room(tier, now):
            return Arrival(Verdict.REFUSE, tier)
        displaced: T | None = None
        failed = self._queues[Tier.FAILED]
        if len(self._waiters) >= self.limits.queue_max:
            out = failed.pop()             # a stranger goes before a failed waiter
            del self._waiters[out.item]
            displaced = out.item
        waiter = _Waiter(item, tier, now + self.limits.wait)
        self._queues[tier].append(waiter)
        self._waiters[item] = waiter
        return Arrival(Verdict.WAIT, tier, waiter.deadline, displaced)

    def refused_at_once(self, ip: str, now: float, vouched: bool = False) -> Tier | None:
        """The tier of a client whose arrival now would be refused (no token for it, no place
        in the queue), without taking anything; None if it could start or wait. Lets the
        caller turn such a client away before it builds a session for it."""
        if self.limits.stranger_rate <= 0 or vouched or self._is_known(self._known_key(ip), now):
            return None
        tier = self._unknown_tier(ip, now)
        self._expire(now, self._expired)
        return tier if self._no_room(tier, now) else None

    def _unknown_tier(self, ip: str, now: float) -> Tier:
        failed = self._failed.get(ip_key(ip, self.limits.ipv6_prefix), now) is not None
        return Tier.FAILED if failed else Tier.STRANGER

    def _ahead(self, tier: Tier) -> int:
        """Waiters an arrival of `tier` queues behind (a stranger: the strangers)."""
        ahead = len(self._queues[Tier.STRANGER])
        return ahead + len(self._queues[Tier.FAILED]) if tier is Tier.FAILED else ahead

    def _no_room(self, tier: Tier, now: float) -> bool:
        """An arrival of `tier` would be refused: no token it may take now, and the queue is
        full (of waiters it cannot push out: a stranger pushes out a failed one)."""
        if self._ahead(tier) == 0 and self.bucket.tokens(now) >= 1.0:
            return False
        return len(self._waiters) >= self.limits.queue_max and (
            tier is Tier.FAILED or not self._queues[Tier.FAILED])

    def _expire(self, now: float, into: list[T]) -> None:
        for q in self._queues.values():
            while q and q[0].deadline <= now:
                w = q.popleft()
                del self._waiters[w.item]
                into.append(w.item)

    def due(self, now: float) -> Due[T]:
        out: Due[T] = Due(expired=self._expired)
        self._expired = []
        self._expire(now, out.expired)
        for tier in (Tier.STRANGER, Tier.FAILED):
            q = self._queues[tier]
            while q and self.bucket.take(now):
                w = q.popleft()
                del self._waiters[w.item]
                out.started.append(w.item)
        return out

    def next_event(self, now: float) -> float | None:
        if self._expired:
            return now
        heads = [q[0].deadline for q in self._queues.values() if q]
        if not heads:
            return None
        tokens = self.bucket.tokens(now)
        token_at = now if tokens >= 1.0 else now + (1.0 - tokens) / self.limits.stranger_rate
        return min(*heads, token_at)

    def leave(self, item: T) -> bool:
        w = self._waiters.pop(item, None)
        if w is None:
            return False
        self._queues[w.tier].remove(w)
        return True

    # --- outcomes ---------------------------------------------------------------------------

    def verified(self, ip: str, cert: str, now: float) -> None:
        prefix = self._known_key(ip)
        old = self._known.pop(prefix, None)
        if old is not None:
            self._unlink(prefix, old[1])
        while self._known:                 # expired ones first (they are at the front)
            first, (expires, _) = next(iter(self._known.items()))
            if expires > now and len(self._known) < self.limits.known_max:
                break
            self._forget(first)
        mine = self._by_cert.get(cert)
        while mine and len(mine) >= self.limits.per_cert:
            self._forget(next(iter(mine)))     # (drops the cert's entry when it empties)
        self._known[prefix] = (now + self.limits.known_ttl, cert)
        self._by_cert.setdefault(cert, OrderedDict())[prefix] = None
        self._add_steered(ip, prefix)

    def _add_steered(self, ip: str, prefix: str) -> None:
        if next(reversed(self._steer), None) == ip:
            return                         # the most recent already: nothing changes
        self._steer.pop(ip, None)
        self._steer[ip] = prefix
        mine = self._steer_of.setdefault(prefix, OrderedDict())
        mine.pop(ip, None)
        mine[ip] = None
        while len(mine) > STEER_PER_PREFIX:
            self._steer.pop(mine.popitem(last=False)[0], None)
        while len(self._steer) > self.limits.steer_max:
            old, old_prefix = self._steer.popitem(last=False)
            theirs = self._steer_of.get(old_prefix)
            if theirs is not None:
                theirs.pop(old, None)
                if not theirs:
                    del self._steer_of[old_prefix]

    def steered(self, now: float) -> list[tuple[str, float]]:
        while self._known:                 # expired prefixes first (they are at the front)
            first, (expires, _) = next(iter(self._known.items()))
            if expires > now:
                break
            self._forget(first)
        return [(ip, self._known[prefix][0]) for ip, prefix in self._steer.items()]

    def failed(self, ip: str, now: float) -> None:
        if self.limits.failed_ttl > 0:
            self._failed.put(ip_key(ip, self.limits.ipv6_prefix), now + self.limits.failed_ttl,
                             now)

    def _forget(self, prefix: str) -> None:
        entry = self._known.pop(prefix, None)
        if entry is not None:
            self._unlink(prefix, entry[1])
        for ip in self._steer_of.pop(prefix, ()):
            self._steer.pop(ip, None)

    def _unlink(self, prefix: str, cert: str) -> None:
        mine = self._by_cert.get(cert)
        if mine is not None:
            mine.pop(prefix, None)
            if not mine:
                del self._by_cert[cert]
