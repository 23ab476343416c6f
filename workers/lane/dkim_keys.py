"""DKIM key lookups for workers.lane.dkim_check: dkimpy's dnsfunc on our resolver, within the
message's deadlines, and the negative cache of signing domains that do not answer.

Purpose
    dkimpy asks for a key record through a `dnsfunc`; ours resolves through the worker's
    cached resolver (ingress.core.resolver), waits at most the message's DNS budget
    (ingress.policy.dkim_budget) and its verification deadline, records what it saw in a
    KeyTrace (so dkim_check can tell a timeout or a missing key from a bad signature: dkimpy
    swallows both), never hands dkimpy a key record that key_record_problem refuses, and
    answers at once for a signing domain that did not answer recently (DeadKeyDomains).

API
    make_dnsfunc(resolver, timeout, trace=None, deadline=None, min_bits=1024, budget=None,
                 dead=None) -> dnsfunc(name: bytes, timeout=5) -> bytes|None
        dkimpy-compatible TXT lookup; records outcomes in `trace`; each wait bounded by the
        message's DnsBudget and `deadline`; a domain in `dead` is a temperror at once, a
        conclusive unanswered lookup marks its domain there.
    lookup_txt(resolver, qname, *, budget, timeout, deadline=None, dead=None, domain="",
               what="key") -> TxtAnswer(outcome "found" | "none" | "temperror", records,
        error)    the one bounded TXT lookup of the workers (the dnsfunc's, and the DMARC
        policy lookups' of workers.lane.dmarc_lookup): budget, deadline and negative cache.
    KeyTrace                 what the last lookup did: name, outcome ("found" | "nokey" |
                             "badkey" | "temperror"), txt, error, domain (d= being judged)
    DeadKeyDomains(ttl=60, maxsize=4096, timer=time.monotonic)  .mark(domain),
        .is_dead(domain), len(): the negative cache of signing domains (by organisational
        domain) whose key lookups got no answer; thread-safe; one per worker process
        (workers.lane.pipeline).
    DEAD_KEY_TTL, DEAD_KEY_MAX, MAX_DOMAIN_KEY

Failure modes
    dnsfunc raises dkim.DnsTimeoutError for a timeout, SERVFAIL, an exhausted deadline or
    budget, or a dead domain (dkimpy turns it into a failed verify; the trace says why); a
    missing or refused key is None. Nothing else raises.

Limits
    One lookup waits at most min(timeout, the resolver's lifetime, what is left of the budget
    and of the deadline). DeadKeyDomains holds at most DEAD_KEY_MAX names of at most
    MAX_DOMAIN_KEY characters (about 2 MB), each for DEAD_KEY_TTL seconds; a dead signing
    domain costs one conclusive timeout per DEAD_KEY_TTL per worker process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import dkim
import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from cachetools import TTLCache

from ingress.policy.dkim_budget import DnsBudget
from ingress.policy.identity import org_domain
from workers.lane.dkim_parse import MIN_KEY_BITS, key_record_problem

__all__ = ["DEAD_KEY_MAX", "DEAD_KEY_TTL", "MAX_DOMAIN_KEY", "DeadKeyDomains", "DnsFunc",
           "KeyTrace", "NotCached", "TxtAnswer", "lookup_txt", "make_dnsfunc"]


class NotCached(Exception):
    """An offline lookup (lookup_txt(offline=True)) whose answer is not in the resolver's
    cache: the caller must ask again where it may wait."""


@dataclass(slots=True)
class KeyTrace:
    """What the last key lookup did (filled by the dnsfunc)."""

    name: str = ""
    outcome: str = ""  # "found" | "nokey" | "badkey" | "temperror"
    txt: bytes | None = None
    error: str = ""
    domain: str = ""   # d= of the signature being judged (set before its lookup)


DnsFunc = Callable[..., bytes | None]


# The negative cache of key domains whose lookups timed out: RFC 2308 section 7 allows a
# server failure to be remembered for up to five minutes; a minute keeps a real outage short
# (its mail is only dkim=temperror meanwhile: never rejected, just not learned from).
DEAD_KEY_TTL = 60.0
DEAD_KEY_MAX = 4096          # domains remembered per worker process (least recently used go)
MAX_DOMAIN_KEY = 253         # a longer name is never resolved (dnspython refuses it at once)


class DeadKeyDomains:
    """Signing domains whose key lookups recently got no answer: a bounded negative cache with
    a TTL, shared by the pipeline threads of one worker process.

    Keyed by the organisational domain of d= (ingress.policy.identity.org_domain: canonical,
    lower case). A sender who delegates sub.evil.example to a silent server must then register
    a new domain for every conclusive timeout, rather than make up a new subdomain. A
    provider that hands out subdomains is on the PSL's private section, so each customer is
    its own key. Bounded: at most `maxsize` names of at most MAX_DOMAIN_KEY characters
    (about 2 MB). ttl <= 0 disables it."""

    def __init__(self, ttl: float = DEAD_KEY_TTL, maxsize: int = DEAD_KEY_MAX,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._cache: TTLCache[str, bool] = TTLCache(maxsize, max(ttl, 1e-9), timer=timer)
        self._lock = threading.Lock()      # cachetools caches are not thread-safe

    @staticmethod
    def key(domain: str) -> str:
        return org_domain(domain)

    def mark(self, domain: str) -> None:
        k = self.key(domain)
        if self.ttl <= 0 or not k or len(k) > MAX_DOMAIN_KEY:
            return
        with self._lock:
            self._cache[k] = True

    def is_dead(self, domain: str) -> bool:
        if self.ttl <= 0:
            return False
        k = self.key(domain)
        with self._lock:
            return self._cache.get(k, False)

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)


def _key_domain(qname: str) -> str:
    """d= of a key name "<selector>._domainkey.<d>" (when the caller did not say)."""
    return qname.rstrip(".").partition("._domainkey.")[2]


# The DNS failures that say the key's domain does not answer (a malformed name, say, does not).
_UNANSWERED = (dns.exception.Timeout, dns.resolver.NoNameservers)


@dataclass(frozen=True, slots=True)
class TxtAnswer:
    """What one bounded TXT lookup saw: outcome "found" (records: each record's strings
    joined) | "none" (NXDOMAIN, no TXT) | "temperror" (error says why)."""

    outcome: str
    records: tuple[bytes, ...] = ()
    error: str = ""


def lookup_txt(resolver: dns.resolver.Resolver, qname: str, *, budget: DnsBudget,
               timeout: float, deadline: float | None = None,
               dead: DeadKeyDomains | None = None, domain: str = "",
               what: str = "key", offline: bool = False) -> TxtAnswer:
    """The TXT records at `qname`, waiting at most min(timeout, the resolver's lifetime,
    what is left of `budget` and of the time.monotonic() `deadline`); the wait is charged to
    the budget. With `dead`: a `domain` remembered as unresponsive is a temperror at once (no
    query), and a conclusive unanswered lookup (budget.conclusive) remembers it. The one
    bounded TXT lookup of the workers: DKIM keys (make_dnsfunc) and DMARC policies
    (workers.lane.dmarc_lookup); `what` names them in an error ("key", "DMARC policy").
    `offline`: never a query: what the resolver's cache holds (as the query would have found
    it there first), or NotCached."""
    if dead is not None and dead.is_dead(domain):
        return TxtAnswer("temperror", error=f"{what} domain {dead.key(domain)} did not answer "
                                            "recently (not asked again)")
    if offline:
        return _cached_txt(resolver, qname)
    left = math.inf if deadline is None else deadline - time.monotonic()
    lifetime = min(budget.lifetime(left), timeout, resolver.lifetime)
    if lifetime <= 0:
        return TxtAnswer("temperror", error=f"{what} lookup deadline exhausted" if left <= 0
                         else "DNS time of the message exhausted")
    t0 = time.monotonic()
    try:
        ans = resolver.resolve(qname, "TXT", lifetime=lifetime, search=False,
                               raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
        return TxtAnswer("none")
    except dns.exception.DNSException as e:
        # timeout, SERVFAIL from every server (NoNameservers), network errors
        if dead is not None and isinstance(e, _UNANSWERED) and budget.conclusive(lifetime):
            dead.mark(domain)
        return TxtAnswer("temperror", error=f"{type(e).__name__}: {e}")
    finally:
        budget.charge(time.monotonic() - t0)
    return _found(ans)


def _found(ans: dns.resolver.Answer) -> TxtAnswer:
    records = tuple(b"".join(r.strings) for r in ans.rrset) if ans.rrset is not None else ()
    return TxtAnswer("found" if records else "none", records)


def _cached_txt(resolver: dns.resolver.Resolver, qname: str) -> TxtAnswer:
    """lookup_txt's answer from the cache alone, looked up as dnspython's resolve() does first
    (the TXT answer, a NODATA answer, then a cached NXDOMAIN), or NotCached."""
    cache = resolver.cache
    if cache is None:
        raise NotCached(qname)
    try:
        name = dns.name.from_text(qname)
    except dns.exception.DNSException:
        raise NotCached(qname) from None
    ans = cache.get((name, dns.rdatatype.TXT, dns.rdataclass.IN))
    if ans is not None:
        return _found(ans)
    nx = cache.get((name, dns.rdatatype.ANY, dns.rdataclass.IN))
    if nx is not None and nx.response.rcode() == dns.rcode.NXDOMAIN:
        return TxtAnswer("none")
    raise NotCached(qname)


def make_dnsfunc(
    resolver: dns.resolver.Resolver,
    timeout: float,
    trace: KeyTrace | None = None,
    deadline: float | None = None,
    min_bits: int = MIN_KEY_BITS,
    budget: DnsBudget | None = None,
    dead: DeadKeyDomains | None = None,
) -> DnsFunc:
    """A dkimpy dnsfunc backed by `resolver`; each lookup bounded by `timeout` seconds, by the
    message's DnsBudget if given (ingress.policy.dkim_budget) and by the absolute
    time.monotonic() `deadline` if given (lookup_txt). A key record that key_record_problem()
    refuses is not handed to dkimpy (it sees no key, does no RSA): trace.outcome "badkey".
    With `dead`, a signing domain remembered as unresponsive is a temperror at once (no
    query), and a conclusive unanswered lookup remembers its domain."""
    per_lookup = min(timeout, resolver.lifetime)
    bud = budget if budget is not None else DnsBudget(per_lookup, math.inf)

    def dnsfunc(name: bytes | str, timeout: float = timeout) -> bytes | None:
        t = trace if trace is not None else KeyTrace()
        t.txt, t.error, t.outcome = None, "", ""
        try:
            qname = name.decode("ascii") if isinstance(name, bytes) else name
        except UnicodeDecodeError:
            t.outcome = "nokey"
            return None
        t.name = qname
        domain = t.domain or _key_domain(qname)
        ans = lookup_txt(resolver, qname, budget=bud, timeout=min(timeout, per_lookup),
                         deadline=deadline, dead=dead, domain=domain)
        if ans.outcome == "temperror":
            t.outcome, t.error = "temperror", ans.error
            raise dkim.DnsTimeoutError(t.error)
        records = list(ans.records)
        if not records:
            t.outcome = "nokey"
            return None
        # Several TXT records at a key name: prefer one that looks like a key record.
        chosen = next((r for r in records if b"p=" in r), records[0])
        problem = key_record_problem(chosen, min_bits=min_bits)
        if problem is not None:
            t.outcome, t.error = "badkey", problem
            return None
        t.outcome, t.txt = "found", chosen
        return chosen

    return dnsfunc
