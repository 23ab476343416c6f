"""Admission of SPF checks: bounds per sender domain, per client network and in all, and a
short cache of domains whose DNS timed out (pure; no I/O, clock as an argument).

Purpose
    An SPF check waits on DNS that the sender chooses. One domain whose nameserver never
    answers, a thousand of them, or one client network sending them, must not hold the checks
    of anyone else. The acceptor's SPF service (ingress.edge.spf_service) asks this gate before
    each check and tells it when the check ends; what the gate refuses is a `temperror` at
    once (never promotes, never rejects: the session stays bulk).

Keys
    domain: the sender's *organisational* domain (ingress.policy.identity.org_domain of the
    canonical domain SPF is evaluated for), so a wildcard zone's thousand subdomains are one
    key, as they are one identity for the fast lane's shares. net: the client's network
    (ingress.core.addr.ip_key with IPv4 /24, IPv6 admission.ipv6_prefix).

API
    SpfLimits(per_domain, per_network, backlog, timeout_ttl, timeouts_max=TIMEOUTS_MAX)
                                               frozen, validated (ValueError)
    SpfVerdict                                 StrEnum: admit | timeout | domain | network |
                                               backlog (the refusals are metric labels)
    SpfGate(limits)
        admit(domain, net, now) -> SpfVerdict  ADMIT counts the check in (until release)
        release(domain, net, now, stalled)     the check ended; stalled: it was a temperror
                                               because the domain's DNS did not answer in
                                               time (ingress.edge.evidence's SpfOutcome.
                                               domain_stalled): remember the domain
        timed_out(domain, now) -> bool         a timeout of the domain is remembered
        held(domain) / held_net(net) / len(gate)   checks admitted and not released

Rules (in this order)
    * timeout: the domain's DNS timed out within the last timeout_ttl seconds (only a stall of
      the domain's own names counts, never one of the client's reverse DNS: evidence decides),
      so its checks are temperror at once, without a lookup: a dead domain costs one lookup
      per timeout_ttl, however many sessions use it.
    * domain: per_domain checks of the domain are admitted already (evaluating or waiting).
    * network: per_network checks from the client's network are admitted already.
    * backlog: backlog checks are admitted already, of any domain from any network.
    A refused check is not counted and changes nothing (a flood of refusals cannot poison the
    cache of timeouts: only a lookup that ran and timed out can).

Capacity nobody can exhaust (why these bounds, with the service's design)
    The service resolves DNS on the event loop and evaluates in its pool with pure CPU
    (ingress.edge.evidence): no DNS wait holds a thread, so the pool always has threads for every
    domain, and concurrent checks share one query per name. What a stalling domain holds is
    admission: at most per_domain checks, for one DNS timeout (at most one deadline), and then
    nothing for timeout_ttl. One network holds at most per_network. To hold the whole backlog
    an attacker needs backlog / per_network networks and, every DNS timeout, backlog /
    per_domain organisational domains that have not stalled in the last timeout_ttl seconds:
    with the defaults (256, 8, 16, 15 s; classify.dns_timeout 2 s) 32 networks and 8 fresh
    registered domains a second, some 140 in rotation. Legitimate checks of other domains are
    then refused "backlog" (they stay bulk; nothing is rejected), which the metric shows.
    Subdomains do not help (one organisational domain); nor do a legitimate domain's names
    (only a stall of the domain's own DNS is cached, and a refusal caches nothing).
    Residual: a client that controls its reverse DNS (or the names its PTR records give) can
    make slow the checks, from its networks, of domains whose record uses the ptr mechanism
    (deprecated: RFC 7208 5.5); with per_domain / per_network such networks it can hold such
    a domain's bound, and that domain's senders are refused "domain" meanwhile (bulk).

Failure modes: SpfLimits raises ValueError for inconsistent limits; nothing else raises. A
release() without its admit() is ignored (counts never go below zero).

Limits: the counts hold at most `backlog` domains and networks (an entry is dropped at zero);
the cache of timeouts at most timeouts_max domains (ingress.core.expiry.ExpiryMap: the
soonest-expiring goes first, which with one constant TTL is the oldest), ~150 bytes each. Per
process (each acceptor has its own gate). Not thread-safe (the event loop's).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ingress.core.expiry import ExpiryMap
from ingress.core.tally import decrement

__all__ = ["TIMEOUTS_MAX", "SpfGate", "SpfLimits", "SpfVerdict"]

TIMEOUTS_MAX = 10000


class SpfVerdict(StrEnum):
    ADMIT = "admit"
    TIMEOUT = "timeout"         # the domain's DNS timed out lately: temperror at once
    DOMAIN = "domain"           # the domain is at its bound
    NETWORK = "network"         # the client's network is at its bound
    BACKLOG = "backlog"         # the process is at its bound


@dataclass(frozen=True)
class SpfLimits:
    per_domain: int = 16
    per_network: int = 8
    backlog: int = 256
    timeout_ttl: float = 15.0   # 0: no cache of timeouts
    timeouts_max: int = TIMEOUTS_MAX

    def __post_init__(self) -> None:
        if not 1 <= self.per_domain <= self.backlog:
            raise ValueError("per_domain must be 1..backlog")
        if not 1 <= self.per_network <= self.backlog:
            raise ValueError("per_network must be 1..backlog")
        if not self.timeout_ttl >= 0:
            raise ValueError("timeout_ttl must be >= 0")
        if self.timeouts_max < 1:
            raise ValueError("timeouts_max must be >= 1")


class SpfGate:
    def __init__(self, limits: SpfLimits) -> None:
        self.limits = limits
        self._domains: dict[str, int] = {}
        self._nets: dict[str, int] = {}
        self._total = 0
        self._timeouts = ExpiryMap(limits.timeouts_max)       # domain -> until

    def __len__(self) -> int:
        return self._total

    def held(self, domain: str) -> int:
        return self._domains.get(domain, 0)

    def held_net(self, net: str) -> int:
        return self._nets.get(net, 0)

    def timed_out(self, domain: str, now: float) -> bool:
        return self._timeouts.get(domain, now) is not None

    def admit(self, domain: str, net: str, now: float) -> SpfVerdict:
        lim = self.limits
        if self.timed_out(domain, now):
            return SpfVerdict.TIMEOUT
        if self._domains.get(domain, 0) >= lim.per_domain:
            return SpfVerdict.DOMAIN
        if self._nets.get(net, 0) >= lim.per_network:
            return SpfVerdict.NETWORK
        if self._total >= lim.backlog:
            return SpfVerdict.BACKLOG
        self._domains[domain] = self._domains.get(domain, 0) + 1
        self._nets[net] = self._nets.get(net, 0) + 1
        self._total += 1
        return SpfVerdict.ADMIT

    def release(self, domain: str, net: str, now: float, stalled: bool = False) -> None:
        if self._domains.get(domain, 0) <= 0 or self._nets.get(net, 0) <= 0:
            return
        decrement(self._domains, domain)
        decrement(self._nets, net)
        self._total -= 1
        if stalled and self.limits.timeout_ttl > 0:
            self._timeouts.put(domain, now + self.limits.timeout_ttl, now)
