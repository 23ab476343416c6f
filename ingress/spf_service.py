"""The acceptor's SPF service: SPF at MAIL FROM, with a result cache and bounded thread pools.

API:
    SpfService(cfg, counters)      resolver is None when classify.spf_promote is "off"
        enabled -> bool            a resolver is configured (SPF may promote)
        check(peer_ip, lane, mail_from, helo) -> (AuthResult, why)   async
        shutdown()                 stops the pools (queued lookups are cancelled)

check() takes canonical names (the handler passes ingress.core.headers.spf_request's: the
sender's domain and the HELO name as A-labels), so every spelling of a domain is one lookup and
one cache entry.

Cache: (client IP, sender domain, HELO) -> (result, why) for SPF_CACHE_TTL seconds, at most
SPF_CACHE_SIZE entries (cachetools.TTLCache: least recently used evicted when full); a spam run
repeats itself. A temperror is never cached.

Failure modes: pyspf blocks, so lookups run in one small pool per lane (a flood of bulk lookups
never delays the fast lane's), each with a deadline (min(classify.spf_deadline,
smtp.idle_timeout / 2)); when SPF_BACKLOG checks of a lane are already waiting (a slow DNS
server under a flood) the answer is temperror at once (counted as spf_backlog), so the pool's
queue never grows without bound. Errors of the lookup itself are evidence.check_spf's
(temperror / permerror), never an exception here.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from cachetools import TTLCache

from ingress.core.config import Config
from ingress.core.wire import Lane
from ingress.evidence import check_spf, make_resolver
from ingress.policy.classify import AuthResult

SPF_BACKLOG = 64             # SPF checks waiting per lane before new ones get temperror
SPF_CACHE_TTL = 300.0        # seconds an SPF result for (ip, domain, helo) is reused
SPF_CACHE_SIZE = 10000


class SpfService:
    def __init__(self, cfg: Config, counters: Counter[str]) -> None:
        c = cfg.classify
        self.cfg, self.counters = cfg, counters
        self.resolver = make_resolver(c.nameservers, c.dns_timeout) \
            if c.spf_promote != "off" else None
        self.pools = {lane: ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"spf-{lane}")
                      for lane in Lane}
        self.inflight: Counter[Lane] = Counter()
        self.cache: TTLCache[tuple[str, str, str], tuple[AuthResult, str]] = TTLCache(
            maxsize=SPF_CACHE_SIZE, ttl=SPF_CACHE_TTL, timer=time.monotonic)

    @property
    def enabled(self) -> bool:
        return self.resolver is not None

    async def check(self, peer_ip: str, lane: Lane, mail_from: str,
                    helo: str) -> tuple[AuthResult, str]:
        """SPF for (client IP, sender domain, HELO): cached, else a lookup in the lane's pool."""
        assert self.resolver is not None
        key = (peer_ip, mail_from.rpartition("@")[2].lower(), helo.lower())
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        result, why = await self._lookup(peer_ip, lane, mail_from, helo)
        if result is not AuthResult.TEMPERROR:
            self.cache[key] = (result, why)
        return result, why

    async def _lookup(self, peer_ip: str, lane: Lane, mail_from: str,
                      helo: str) -> tuple[AuthResult, str]:
        assert self.resolver is not None
        if self.inflight[lane] >= SPF_BACKLOG:
            self.counters["spf_backlog"] += 1
            return AuthResult.TEMPERROR, "SPF backlog full"
        self.inflight[lane] += 1
        try:
            return await check_spf(peer_ip, mail_from, helo, resolver=self.resolver,
                                   deadline_s=min(self.cfg.classify.spf_deadline,
                                                  self.cfg.smtp.idle_timeout / 2),
                                   executor=self.pools[lane], receiver=self.cfg.smtp.hostname)
        finally:
            self.inflight[lane] -= 1

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
