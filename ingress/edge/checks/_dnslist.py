"""The DNS lists' I/O shell, shared by the dnswl and dnsbl checks: ask each zone about a client,
through the acceptor's one DNS client, with a cache, the zones' health tests and their logs.

Purpose
    ingress.policy.dnslist decides what answers mean; this asks for them. One ZoneLookup per
    check (its zones, its cache, its zones' health), on the acceptor's event loop.

API
    ListCheck(name, table, cfg, dns, want_txt=False)   what both list checks are: stage
                               connect, holds_banner; judge(client) and judge_now(client)
                               (None: it would wait) over the subclass's judgement(results,
                               client); .sites, .names (reply_map), .budget
                               (checks.connect_deadline x BUDGET_SHARE), .lookup, from the
                               check's table ([dnswl] or [dnsbl]: sites, reply_map, the cache's
                               and health's keys) and classify.dns_timeout
    ZoneLookup(check, sites, dns, *, timeout, interval, cache_entries, min_ttl, max_ttl,
               names, want_txt=False, clock=time.monotonic)
        await .lookup(ip, budget) -> dict[zone, ZoneResult]   every zone's answer for the
                               client, within `budget` seconds (each query: at most `timeout`)
        .lookup_now(ip) -> dict | None   the same when no zone needs a wait, else None
        .zones                the zones asked (each once, in site order)

Rules
    * Every query goes through ingress.core.dns_client with the zone as its key (bounded per
      zone; a zone that never answers costs one query per name per dns_timeout_ttl).
    * Cached per (zone, IP): listings and clean answers, for the answer's TTL clamped to
      [min_ttl, max_ttl]; at most cache_entries entries (about 1 KiB each at most: 32 answers
      and a TXT of at most TXT_MAX characters). Timeouts and errors are not cached here.
    * Health (ingress.policy.dnslist.ZoneHealth): when a zone's test is due, the client that
      finds it due asks the test points 2.0.0.127.<zone> and 1.0.0.127.<zone> beside its own
      query, and the outcome applies before its answer is judged; a zone that answers any
      query with an error code goes off at once. Each change is one `dnslist_zone` log line
      (zone by its public name). A zone that is off is not asked (TEMP "off").
    * TXT (want_txt, dnswl): asked only for a listing, within what is left of the budget (at
      least TXT_MIN_WAIT seconds left, else not asked): its absence never costs the listing.

Failure modes: none raised (DNS failures are TEMP results); a bad client address is CLEAN for
every zone (there is nothing to ask). Limits: cache_entries; TXT_MAX characters of a TXT.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import cachetools

from ingress.core import log
from ingress.core.config import Config
from ingress.core.dns_client import DnsClient
from ingress.core.schema_evidence import DnsblConfig, DnswlConfig
from ingress.edge.checks import Client
from ingress.policy.checks import Judgement, Stage
from ingress.policy.dnslist import (
    Site,
    State,
    ZoneHealth,
    ZoneResult,
    clamp_ttl,
    health_of,
    parse_reply_map,
    parse_site,
    public,
    query_name,
    zone_result,
)

__all__ = ["BUDGET_SHARE", "TXT_MAX", "TXT_MIN_WAIT", "ListCheck", "ZoneLookup"]

BUDGET_SHARE = 0.9            # of checks.connect_deadline a list's lookup may use: it answers
                              # (with what it has) before the runner gives it up as timed out

TXT_MAX = 512                 # characters of a zone's TXT kept (policy.txt in the trace)
TXT_MIN_WAIT = 0.05           # seconds: less left than this and the TXT is not asked


class ZoneLookup:
    def __init__(self, check: str, sites: Sequence[Site], dns: DnsClient, *, timeout: float,
                 interval: float, cache_entries: int, min_ttl: float, max_ttl: float,
                 names: Mapping[str, str], want_txt: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.check, self.dns, self.timeout = check, dns, timeout
        self.zones = tuple(dict.fromkeys(s.zone for s in sites))
        self.names, self.want_txt, self.clock = dict(names), want_txt, clock
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self.health = ZoneHealth(interval)
        self._tests: set[asyncio.Future[None]] = set()     # under way (held: not collected)
        self._cache: cachetools.TLRUCache[tuple[str, str], tuple[ZoneResult, float]] = \
            cachetools.TLRUCache(max(1, cache_entries), self._expiry, timer=clock)

    @staticmethod
    def _expiry(_key: object, value: tuple[ZoneResult, float], now: float) -> float:
        return now + value[1]

    async def lookup(self, ip: str, budget: float) -> dict[str, ZoneResult]:
        start = self.clock()
        try:
            names = {z: query_name(ip, z) for z in self.zones}
        except ValueError:
            return {z: ZoneResult(z, State.CLEAN) for z in self.zones}
        if len(self.zones) == 1:        # the common case: no gather, no task
            zone = self.zones[0]
            return {zone: await self._zone(zone, ip, names[zone], start, budget)}
        results = await asyncio.gather(*(self._zone(z, ip, names[z], start, budget)
                                         for z in self.zones))
        return dict(zip(self.zones, results, strict=True))

    def lookup_now(self, ip: str) -> dict[str, ZoneResult] | None:
        """Every zone's answer for the client when none needs a wait (cached, the zone off, or
        the DNS client busy or remembering a timeout: ingress.core.dns_client.peek), or None
        (then lookup() asks). The common case of a flood of new addresses: the zones' query
        bounds are full, so the bots are judged (neutral) without a task or a query."""
        try:
            names = {z: query_name(ip, z) for z in self.zones}
        except ValueError:
            return {z: ZoneResult(z, State.CLEAN) for z in self.zones}
        now, out = self.clock(), {}
        for zone in self.zones:
            if self.health.due(zone, now):
                return None
            if not self.health.usable(zone):
                out[zone] = ZoneResult(zone, State.TEMP, why="off")
                continue
            hit = self._cache.get((zone, ip))
            if hit is not None:
                out[zone] = hit[0]
                continue
            ans = self.dns.peek(names[zone], "A", key=zone)
            result = None if ans is None else zone_result(zone, ans.status.value, ans.records)
            if result is None or result.state is not State.TEMP:
                return None     # an answer to read (its TXT, an error code, the cache): ask
            out[zone] = result
        return out

    async def _zone(self, zone: str, ip: str, qname: str, start: float,
                    budget: float) -> ZoneResult:
        now = start
        test = None
        if self.health.due(zone, now):
            self.health.begin(zone, now)
            test = asyncio.ensure_future(self._test(zone))
            self._tests.add(test)
            test.add_done_callback(self._tests.discard)
        if test is None and not self.health.usable(zone):
            return ZoneResult(zone, State.TEMP, why="off")
        hit = self._cache.get((zone, ip))
        result = hit[0] if hit is not None else await self._ask(zone, ip, qname, start, budget)
        if test is not None:
            try:
                async with asyncio.timeout(max(0.0, start + budget - self.clock())):
                    await asyncio.shield(test)
            except TimeoutError:
                pass        # the test goes on for the next clients; this one is judged as is
        if not self.health.usable(zone) and result.state is not State.TEMP:
            return ZoneResult(zone, State.TEMP, why="off")
        return result

    async def _ask(self, zone: str, ip: str, qname: str, start: float,
                   budget: float) -> ZoneResult:
        left = start + budget - self.clock()
        ans = await self.dns.query(qname, "A", timeout=max(0.0, min(self.timeout, left)),
                                   key=zone)
        result = zone_result(zone, ans.status.value, ans.records)
        if result.state is State.ERROR_CODE:
            self._changed(zone, self.health.error_code(zone, self.clock()),
                          answer=",".join(result.records[:4]))
            return ZoneResult(zone, State.TEMP, why="error_code")
        if result.state is State.LISTED and self.want_txt:
            left = start + budget - self.clock()
            if left >= TXT_MIN_WAIT:
                txt = await self.dns.query(qname, "TXT", timeout=min(self.timeout, left),
                                           key=zone)
                if txt.found:
                    result = ZoneResult(zone, State.LISTED, result.records,
                                        txt=txt.records[0][:TXT_MAX])
        if result.state is not State.TEMP:
            self._cache[(zone, ip)] = (result, clamp_ttl(ans.ttl, self.min_ttl, self.max_ttl))
        return result

    async def _test(self, zone: str) -> None:
        """RFC 5782 section 5: 127.0.0.2 listed, 127.0.0.1 not; the change is logged."""
        ok: bool | None = None
        why = "cancelled"
        try:
            two, one = await asyncio.gather(
                self.dns.query(f"2.0.0.127.{zone}", "A", timeout=self.timeout, key=zone),
                self.dns.query(f"1.0.0.127.{zone}", "A", timeout=self.timeout, key=zone))
            ok, why = health_of(two.status.value, two.records, one.status.value, one.records)
        except Exception as e:  # a bug in a test is no verdict on the zone
            why = type(e).__name__
        finally:                # whatever happened, the zone is not left "being tested"
            self._changed(zone, self.health.tested(zone, ok, why, self.clock()))

    def _changed(self, zone: str, change: str | None, **fields: str) -> None:
        if change is None:
            return
        state, _, why = change.partition(":")
        if state == "off":
            self._cache.clear()         # its cached answers go with it (they may be garbage)
        log.event("dnslist_zone", "warning" if state == "off" else "info", check=self.check,
                  zone=public(zone, self.names), state=state, why=why or "passed",
                  retest_s=self.health.interval, **fields)


class ListCheck:
    """What the dnswl and dnsbl checks share: built from their table (see API)."""

    stage = Stage.CONNECT
    holds_banner = True

    def __init__(self, name: str, table: DnswlConfig | DnsblConfig, cfg: Config,
                 dns: DnsClient, want_txt: bool = False) -> None:
        self.name = name
        self.sites = tuple(parse_site(s) for s in table.sites)
        self.names = parse_reply_map(table.reply_map)
        self.budget = cfg.checks.connect_deadline * BUDGET_SHARE
        self.lookup = ZoneLookup(name, self.sites, dns, timeout=cfg.classify.dns_timeout,
                                 interval=table.health_interval,
                                 cache_entries=table.cache_entries, min_ttl=table.min_ttl,
                                 max_ttl=table.max_ttl, names=self.names, want_txt=want_txt)

    async def judge(self, client: Client) -> Judgement:
        return self.judgement(await self.lookup.lookup(client.ip, self.budget), client)

    def judge_now(self, client: Client) -> Judgement | None:
        results = self.lookup.lookup_now(client.ip)
        return None if results is None else self.judgement(results, client)

    def judgement(self, results: dict[str, ZoneResult], client: Client) -> Judgement:
        raise NotImplementedError
