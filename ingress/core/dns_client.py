"""The one asynchronous DNS client of the evidence checks: deadlines, shared queries, bounded
concurrency per key, and a negative cache of timeouts.

Purpose
    Every DNS lookup an evidence check makes on an acceptor's event loop (DNS allow and block
    lists, FCrDNS; the package ingress.edge.checks) goes through one DnsClient, so that no DNS
    work runs on the loop without a deadline, and no zone, domain or client can hold more of
    the lookups than its bound. It asks the process's resolver's nameservers (ingress.core.
    resolver: the same servers and query timeout) over a few long-lived UDP sockets
    (ingress.core.dns_udp: a botnet's every new address costs each list a query, so a query
    must be cheap), and keeps the answers for their TTL (at most MAX_TTL; NXDOMAIN and no data
    NEGATIVE_TTL; at most ANSWERS of them). A truncated reply is asked again through
    dnspython's asyncio resolver (the async twin of the process's resolver: TCP).

API
    Status                 StrEnum ok | nxdomain | nodata | timeout | error | busy
    Answer(status, records=(), ttl=0)   frozen; .records: A/AAAA addresses, PTR and CNAME
                           targets and MX exchanges as names (lower case, no trailing dot), TXT
                           as each record's strings joined; .temporary (timeout, error, busy:
                           nobody's evidence), .found (ok with records)
    DnsClient(resolver, *, per_key=8, backlog=256, timeout_ttl=30.0, timeouts_max=4096,
              clock=time.monotonic)
        await .query(name, qtype, *, timeout, key="") -> Answer     never raises (but
                           CancelledError): the answer, or why there is none, within `timeout`
                           seconds (and the resolver's lifetime, the shorter)
        .peek(name, qtype, key="") -> Answer | None   what query() would answer at once (a
                           kept answer, a remembered timeout, BUSY), or None: it would ask
        .in_flight(key) / .pending        queries running for a key / in all
        .timed_out(name, qtype) -> bool   a timeout of the name is remembered

Rules
    * Shared: a query for (name, qtype) already running is joined, not repeated; each waiter
      keeps its own deadline (a joiner that gives up leaves the query to the others).
    * Bounded: at most `per_key` queries run for one key (the caller's: a zone, an
      organisational domain, a client network) and at most `backlog` in all; beyond either,
      BUSY at once, with no query sent. A joined query counts once.
    * Negative cache: a name that timed out answers TIMEOUT at once for `timeout_ttl`
      seconds (at most `timeouts_max` names; the oldest go first): a dead zone or domain costs
      one query per name per TTL, however many connections ask.
    * A query is run by its first asker, within that asker's deadline (a later waiter with a
      longer deadline may see the creator's timeout; a creator cancelled, its connection gone,
      hands the others a timeout that is not remembered), so the queries in flight are
      bounded by the callers waiting, and no task is made per query.

Failure modes: none raised; every DNS failure is a Status. Limits: per_key, backlog,
timeouts_max as above; answers are not copied beyond MAX_RECORDS records of one RRset.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import cachetools
import dns.asyncresolver
import dns.exception
import dns.rcode
import dns.resolver

from ingress.core.dns_udp import MAX_RECORDS, Reply, UdpTransport, servers_of, text_of
from ingress.core.resolver import async_twin

__all__ = ["MAX_RECORDS", "Answer", "DnsClient", "Status"]



class Status(StrEnum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    TIMEOUT = "timeout"
    ERROR = "error"             # SERVFAIL, REFUSED, no usable nameserver, a resolver error
    BUSY = "busy"               # over a bound: no query was sent


@dataclass(frozen=True, slots=True)
class Answer:
    status: Status
    records: tuple[str, ...] = ()
    ttl: int = 0

    @property
    def temporary(self) -> bool:
        return self.status in (Status.TIMEOUT, Status.ERROR, Status.BUSY)

    @property
    def found(self) -> bool:
        return self.status is Status.OK and bool(self.records)


BUSY = Answer(Status.BUSY)
TIMED_OUT = Answer(Status.TIMEOUT)


ANSWERS = 20000             # answers the client keeps (each for its TTL)
NEGATIVE_TTL = 60.0         # seconds an NXDOMAIN or no-data answer is kept
MAX_TTL = 3600.0            # ... and the longest any answer is


def _ttu(_key: tuple[str, str], answer: Answer, now: float) -> float:
    ttl = answer.ttl if answer.status is Status.OK else NEGATIVE_TTL
    return now + max(0.0, min(float(ttl), MAX_TTL))


def _answer(reply: Reply) -> Answer:
    if reply.rcode == dns.rcode.NXDOMAIN:
        return Answer(Status.NXDOMAIN)
    if reply.rcode != dns.rcode.NOERROR:
        return Answer(Status.ERROR)
    if not reply.records:
        return Answer(Status.NODATA)
    return Answer(Status.OK, reply.records, reply.ttl)


class DnsClient:
    """Queries with deadlines, joined when shared, bounded per key (see the module docstring).
    One per event loop: its state is the loop's (no locks)."""

    def __init__(self, resolver: dns.resolver.Resolver, *, per_key: int = 8,
                 backlog: int = 256, timeout_ttl: float = 30.0, timeouts_max: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_key < 1 or backlog < 1:
            raise ValueError("per_key and backlog must be at least 1")
        self.resolver = async_twin(resolver)
        self.per_key, self.backlog = per_key, backlog
        self._timeouts: cachetools.TTLCache[tuple[str, str], bool] = cachetools.TTLCache(
            timeouts_max, timeout_ttl, timer=clock) if timeout_ttl > 0 else \
            cachetools.TTLCache(1, 1e-9, timer=clock)
        self._flights: dict[tuple[str, str], asyncio.Future[Answer]] = {}
        # queries over a few long-lived UDP sockets (ingress.core.dns_udp: ~5x cheaper than
        # dnspython's resolver, which the client falls back to for a truncated reply), and the
        # answers they got, each for its TTL (NXDOMAIN and no data: NEGATIVE_TTL), at most
        # ANSWERS of them
        self.udp = UdpTransport(servers_of(resolver))
        self._answers: cachetools.TLRUCache[tuple[str, str], Answer] = cachetools.TLRUCache(
            ANSWERS, _ttu, timer=clock)
        self._by_key: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        return len(self._flights)

    def in_flight(self, key: str) -> int:
        return self._by_key[key]

    def timed_out(self, name: str, qtype: str) -> bool:
        return (name.lower().rstrip("."), qtype.upper()) in self._timeouts

    def peek(self, name: str, qtype: str, key: str = "") -> Answer | None:
        """What query() would answer at once, without waiting: a kept answer, a remembered
        timeout, or BUSY (a new query over its bounds); None when it would have to ask (or
        join a query under way)."""
        return self._now((name.lower().rstrip("."), qtype.upper()), key)

    def _now(self, fkey: tuple[str, str], key: str) -> Answer | None:
        cached = self._answers.get(fkey)
        if cached is not None:
            return cached           # no query, no bound spent
        if fkey in self._timeouts:
            return TIMED_OUT
        if fkey not in self._flights and (
                len(self._flights) >= self.backlog or (key and self._by_key[key] >= self.per_key)):
            return BUSY
        return None

    async def query(self, name: str, qtype: str, *, timeout: float, key: str = "") -> Answer:
        fkey = (name.lower().rstrip("."), qtype.upper())
        ready = self._now(fkey, key)
        if ready is not None:
            return ready
        flight = self._flights.get(fkey)
        if flight is not None:          # join the query under way, within our own deadline
            try:
                async with asyncio.timeout(max(0.0, timeout)):
                    return await asyncio.shield(flight)
            except TimeoutError:
                return TIMED_OUT
        # The first asker runs the query itself (no task: a new client's lookups are the
        # acceptor's cost per bot), within its deadline; the others wait on its future.
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._flights[fkey] = fut
        self._by_key[key] += 1
        answer = TIMED_OUT
        try:
            answer = await self._resolve(*fkey, max(0.001, min(float(self.resolver.lifetime),
                                                              timeout)))
            if answer.status is Status.TIMEOUT:
                self._timeouts[fkey] = True
            return answer
        finally:                        # (cancelled: the others get a timeout, uncached)
            self._flights.pop(fkey, None)
            self._by_key[key] -= 1
            if self._by_key[key] <= 0:
                del self._by_key[key]
            if not fut.done():
                fut.set_result(answer)

    async def _resolve(self, name: str, qtype: str, lifetime: float) -> Answer:
        reply = await self.udp.query(name, qtype, lifetime)
        if reply is None:
            return TIMED_OUT
        if not reply.truncated:
            answer = _answer(reply)
            if answer.status in (Status.OK, Status.NXDOMAIN, Status.NODATA):
                self._answers[(name, qtype)] = answer
            return answer
        return await self._resolve_tcp(name, qtype, lifetime)   # a big answer: TC set

    async def _resolve_tcp(self, name: str, qtype: str, lifetime: float) -> Answer:
        try:
            ans = await self.resolver.resolve(name, qtype, search=False, lifetime=lifetime,
                                              raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Answer(Status.NXDOMAIN)
        except (dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return Answer(Status.NODATA)
        except dns.exception.Timeout:
            return TIMED_OUT
        except dns.exception.DNSException:
            return Answer(Status.ERROR)
        except Exception:  # a resolver bug is an error answer, not a crash of the caller
            return Answer(Status.ERROR)
        rrset = ans.rrset
        if rrset is None:
            return Answer(Status.NODATA)
        records = tuple(text_of(r) for r in list(rrset)[:MAX_RECORDS])
        return Answer(Status.OK, records, int(rrset.ttl))
