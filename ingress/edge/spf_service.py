"""The acceptor's SPF service: SPF at MAIL FROM, with a result cache, bounds per sender domain
and client network, a cache of timeouts, and one pool per lane.

API:
    SpfService(cfg, counters)      resolver is None when classify.spf_promote is "off"
        enabled -> bool            a resolver is configured (SPF may promote)
        check(peer_ip, lane, mail_from, helo) -> (AuthResult, why)   async; never raises
        shutdown()                 stops the pools (queued evaluations are cancelled)

check() takes canonical names (the handler passes ingress.core.headers.spf_request's: the
sender's domain and the HELO name as A-labels), so every spelling of a domain is one lookup, one
cache entry and one key of the gate.

One check, in order:
    1. Result cache: (client IP, sender domain, HELO) -> (result, why) for SPF_CACHE_TTL
       seconds, at most SPF_CACHE_SIZE entries (cachetools.TTLCache, least recently used
       evicted when full); a spam run repeats itself. A temperror is never cached here.
    2. The lane's gate (ingress.policy.spf_gate, pure): the sender's organisational domain
       timed out within classify.spf_timeout_ttl, or classify.spf_per_domain checks of it,
       classify.spf_per_network from the client's network (IPv4 /24, IPv6
       admission.ipv6_prefix), or classify.spf_backlog in all are under way -> temperror at
       once, no lookup (counted in smtp_ingress_spf_refused_total{reason}, and a log line
       spf_refused per reason per REFUSED_LOG_EVERY seconds).
    3. ingress.edge.evidence.check_spf within min(classify.spf_deadline, smtp.idle_timeout / 2):
       DNS on the event loop (concurrent checks share a query in flight), pyspf in the lane's
       pool of SPF_THREADS threads as pure CPU. The gate is told when it ends, and whether it
       stalled on the domain's own DNS (then the domain is temperror at once for
       spf_timeout_ttl: a dead domain costs one lookup per TTL, however many sessions use it).

Why no domain can take the capacity (the mechanism chosen, issue 17)
    Before, pyspf blocked a pool thread for each DNS wait: 36 sessions of a domain whose
    nameserver never answers held the 4 threads for most of a deadline each, and legitimate
    checks queued behind them ran out theirs. Now no DNS wait holds a thread (the pool runs
    CPU only, milliseconds a check, so it always has threads for every domain), a stalled
    domain is cached, and what stalling checks can hold (admission: per domain, per network,
    in all) is bounded; the numbers an attacker needs to hold it all are in the gate's
    docstring. The fast lane keeps its own pool and gate (today only bulk sessions look SPF
    up: SPF can only promote).

Failure modes: none raised; DNS and pyspf errors are evidence.check_spf's (temperror /
permerror). Limits: per acceptor process; the gate's bounds, the cache's size; each admitted
check has at most one query in flight (a UDP socket: classify.spf_backlog descriptors are
reserved for them, derived.configured_limit).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from cachetools import TTLCache

from ingress.core import log, metrics
from ingress.core.addr import net_key
from ingress.core.config import Config
from ingress.core.headers import spf_identity
from ingress.core.wire import Lane
from ingress.edge.evidence import SpfOutcome, check_spf, make_resolver
from ingress.policy.classify import AuthResult
from ingress.policy.identity import org_domain
from ingress.policy.spf_gate import SpfGate, SpfLimits, SpfVerdict

SPF_THREADS = 4              # per lane: pyspf evaluations (CPU only, never a DNS wait)
SPF_CACHE_TTL = 300.0        # seconds an SPF result for (ip, domain, helo) is reused
SPF_CACHE_SIZE = 10000
REFUSED_LOG_EVERY = 10.0     # one spf_refused line per reason per this many seconds

_WHY = {
    SpfVerdict.TIMEOUT: "SPF not checked: the DNS of {domain} timed out lately",
    SpfVerdict.DOMAIN: "SPF not checked: too many checks of {domain} under way",
    SpfVerdict.NETWORK: "SPF not checked: too many checks from {net} under way",
    SpfVerdict.BACKLOG: "SPF not checked: too many checks under way",
}


def spf_limits(cfg: Config) -> SpfLimits:
    c = cfg.classify
    return SpfLimits(per_domain=c.spf_per_domain, per_network=c.spf_per_network,
                     backlog=c.spf_backlog, timeout_ttl=c.spf_timeout_ttl)


class SpfService:
    def __init__(self, cfg: Config, counters: Counter[str]) -> None:
        c = cfg.classify
        self.cfg, self.counters = cfg, counters
        self.resolver = make_resolver(c.nameservers, c.dns_timeout) \
            if c.spf_promote != "off" else None
        self.pools = {lane: ThreadPoolExecutor(max_workers=SPF_THREADS,
                                               thread_name_prefix=f"spf-{lane}")
                      for lane in Lane}
        limits = spf_limits(cfg)
        self.gates = {lane: SpfGate(limits) for lane in Lane}
        self.deadline = min(c.spf_deadline, cfg.smtp.idle_timeout / 2)
        self.ipv6_prefix = cfg.admission.ipv6_prefix
        self.cache: TTLCache[tuple[str, str, str], tuple[AuthResult, str]] = TTLCache(
            maxsize=SPF_CACHE_SIZE, ttl=SPF_CACHE_TTL, timer=time.monotonic)
        self.refused_lines = log.Throttle(REFUSED_LOG_EVERY, len(SpfVerdict))

    @property
    def enabled(self) -> bool:
        return self.resolver is not None

    async def check(self, peer_ip: str, lane: Lane, mail_from: str,
                    helo: str) -> tuple[AuthResult, str]:
        """SPF for (client IP, sender domain, HELO): cached, refused by the gate, or looked up."""
        assert self.resolver is not None
        _, domain = spf_identity(mail_from, helo)       # canonical (normalize_domain)
        key = (peer_ip, domain, helo.strip().lower())
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        org, net = org_domain(domain), net_key(peer_ip, self.ipv6_prefix)
        gate = self.gates[lane]
        verdict = gate.admit(org, net, time.monotonic())
        if verdict is not SpfVerdict.ADMIT:
            return AuthResult.TEMPERROR, self._refused(verdict, org, net)
        outcome = SpfOutcome(AuthResult.TEMPERROR, "SPF check cancelled")
        try:
            outcome = await check_spf(peer_ip, mail_from, helo, resolver=self.resolver,
                                      deadline_s=self.deadline, executor=self.pools[lane],
                                      receiver=self.cfg.smtp.hostname)
        finally:
            gate.release(org, net, time.monotonic(), outcome.domain_stalled)
        if outcome.result is not AuthResult.TEMPERROR:
            self.cache[key] = (outcome.result, outcome.why)
        return outcome.result, outcome.why

    def _refused(self, verdict: SpfVerdict, org: str, net: str) -> str:
        self.counters[f"spf_refused_{verdict}"] += 1
        metrics.spf_refused(verdict.value)
        quiet = self.refused_lines.due(verdict.value, time.monotonic())
        if quiet is not None:
            log.event("spf_refused", reason=verdict.value, domain=org[:255], net=net,
                      not_logged=quiet)
        return _WHY[verdict].format(domain=org[:255], net=net)

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
