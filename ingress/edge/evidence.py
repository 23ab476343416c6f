"""Evidence I/O shell: one cached DNS resolver, SPF with a deadline, client-certificate facts.

Purpose
    Gather the facts that ingress.policy.classify.decide() consumes, without ever blocking the
    event loop, with a deadline on every lookup, and without a DNS wait ever holding a thread.

API
    make_resolver(nameservers, timeout, cache_size=10000) -> dns.resolver.Resolver
        nameservers: ["192.0.2.53", "192.0.2.53:5353", "192.0.2.53@5353", "::1",
        "[::1]:5353", "::1@5353"]; an empty list means the system's /etc/resolv.conf.
        `timeout` bounds each query (resolver.timeout and resolver.lifetime). Shared cache:
        dns.resolver.LRUCache (thread-safe). The resolver is not modified afterwards, so one
        instance may be shared by every executor thread.
    async check_spf(ip, mail_from, helo, *, resolver, deadline_s, executor=None,
                    receiver=None) -> SpfOutcome(result, why, domain_stalled)
        SPF for (ip, MAIL FROM, HELO) within `deadline_s` seconds (asyncio.timeout around all
        of it; exceeding it is TEMPERROR). `domain_stalled`: the result is a temperror because a
        name the sender's domain serves did not answer in time (what the caller's cache of
        timeouts, ingress.policy.spf_gate, keys on; see "Stalls" below).
    SpfOutcome                         NamedTuple (result: AuthResult, why: str,
                                       domain_stalled: bool = False)
    cert_evidence(peercert_der, verified, pinned_sha256) -> CertResult
    sha256_fingerprint(der) -> str;  normalize_fingerprint(text) -> str

How SPF runs: pyspf evaluates, the event loop waits for DNS
    pyspf is synchronous and resolves through the module global `spf.DNSLookup(name, qtype,
    strict, timeout)`, looked up at call time from query.dns(). We replace it once (under a
    lock) with a function that answers only from a dict of answers handed to the executor
    thread (threading.local); a name not in it raises _NeedLookup through pyspf. check_spf
    then runs a loop: evaluate in `executor` (pure CPU: a fresh spf.query over the answers
    so far), and on _NeedLookup resolve that one name on the event loop with the asynchronous
    twin of `resolver` (ingress.core.resolver.async_twin: same nameservers, deadlines and
    LRU cache), add it to the answers and evaluate again. When an MX or PTR answer arrives,
    the address records of its (first MAX_PREFETCH) names are fetched next, before
    evaluating again: pyspf asks for each of them next, and this spares a step per name. A
    check has at most one query in flight. Concurrent checks on one loop share the query in
    flight for a name (one query for a dead domain, not one per session; each waiter keeps
    its own deadline). So a thread never waits on the network: a sender domain whose
    nameserver never answers costs a pending query on the loop, not a pool thread, and the
    pool stays free for everyone else's evaluations (the measured starvation of issue 17 was
    4 threads each blocked for most of a deadline). Threads that did not set answers fall
    through to pyspf's original function, so other users of pyspf are unaffected.

Stalls (SpfOutcome.domain_stalled)
    True when the result is a temperror and a lookup that timed out (the resolver's lifetime,
    or the deadline while it was pending) was for a name the sender's domain serves: its
    record, includes, redirects, a/mx/exists targets. A name in the reverse tree (in-addr.arpa,
    ip6.arpa: the ptr mechanism and the %{p} macro) or a name a PTR answer pointed to is
    the *client's*: a client controlling its reverse DNS could otherwise make any domain
    whose record uses ptr look dead. A deadline spent waiting for the executor is not a stall.

Failure modes
    * DNS timeout, SERVFAIL/no usable nameserver, any other resolver error -> TEMPERROR.
    * NXDOMAIN / no data -> empty answer (pyspf then decides none/permerror per RFC 7208).
    * pyspf raising instead of returning (e.g. PermError for an unparsable client IP from
      query.__init__) -> PERMERROR; any unexpected exception -> TEMPERROR (never promotes,
      never rejects).
    * More than MAX_LOOKUPS distinct lookups in one evaluation -> TEMPERROR (RFC 7208's limits
      stop a valid record at about 120: 10 terms, 10 MX or PTR names each, their includes).
    * The deadline cancels the await, not an evaluation already running in the executor: it
      ends within its CPU time (it never waits on DNS) and its result is dropped.

Limits
    Each evaluation step repeats pyspf from the start over the answers so far (CPU, no I/O):
    O(steps x lookups) work, bounded by MAX_LOOKUPS and cut short by MX/PTR prefetching
    (measured: a record of 10 mx terms of 10 hosts each, 111 lookups, takes 12 steps and
    ~8 ms of CPU; a provider's record with a redirect and 3 includes 6 steps and ~2 ms). The
    "exp=" explanation is never fetched (pyspf swallows the _NeedLookup it raises: one lookup
    fewer an attacker's record can ask for); the default explanation is used. Cross-query
    caching is the resolver's LRUCache (honours TTLs, caches negative answers); within one
    check the answers dict. RFC 7208 lookup limits (10 mechanisms, 2 void lookups) are pyspf's.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import weakref
from concurrent.futures import Executor
from typing import Any, NamedTuple

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import spf

from ingress.core.addr import try_parse_ip
from ingress.core.resolver import async_twin, make_resolver, parse_nameserver
from ingress.policy.classify import AuthResult, CertResult

__all__ = [
    "MAX_LOOKUPS",
    "MAX_PREFETCH",
    "SpfOutcome",
    "cert_evidence",
    "check_spf",
    "make_resolver",
    "normalize_fingerprint",
    "parse_nameserver",
    "sha256_fingerprint",
]

MAX_LOOKUPS = 128       # distinct DNS lookups one SPF evaluation may make (then temperror)
MAX_PREFETCH = 10       # address lookups fetched after an MX or PTR answer before evaluating
                        # again (pyspf's MAX_MX and MAX_PTR: it looks up no more)
_REVERSE = (".in-addr.arpa", ".ip6.arpa")


class SpfOutcome(NamedTuple):
    result: AuthResult
    why: str
    domain_stalled: bool = False    # temperror: a name of the sender's domain did not answer


# --------------------------------------------------------------------------- pyspf glue

Key = tuple[str, str]               # (name: lower case, no trailing dot; qtype)
Answer = list[Any] | str            # pyspf's records, or the message of a temperror

_tls = threading.local()
_install_lock = threading.Lock()
_original_lookup: Any = None


class _NeedLookup(Exception):
    """pyspf asked for a name we have no answer for yet (raised through pyspf)."""

    def __init__(self, key: Key) -> None:
        super().__init__(key)
        self.key = key


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20.0) -> list:
    """Replacement for spf.DNSLookup: the answers of this thread's check, never the network."""
    answers: dict[Key, Answer] | None = getattr(_tls, "answers", None)
    if answers is None:
        return _original_lookup(name, qtype, strict, timeout)
    key = (name.lower().rstrip("."), qtype)
    hit = answers.get(key)
    if hit is None:
        raise _NeedLookup(key)
    if isinstance(hit, str):
        raise spf.TempError(hit)
    return hit


def _spf_records(name: str, qtype: str, rrset: Any) -> list:
    """The answer's records in pyspf's shape: ((name, qtype), value), value by record type
    (an address; (preference, exchange); a PTR target; a TXT's list of strings)."""
    out: list = []
    for rdata in rrset:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange.to_text(True))))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), list(rdata.strings)))
    return out


def _install() -> None:
    global _original_lookup
    with _install_lock:
        if spf.DNSLookup is not _spf_lookup:
            _original_lookup = spf.DNSLookup
            spf.DNSLookup = _spf_lookup


def _spf_step(ip: str, mail_from: str, helo: str, answers: dict[Key, Answer],
              receiver: str | None) -> SpfOutcome | Key:
    """One evaluation over `answers` (in the executor): the outcome, or the next name needed."""
    _tls.answers = answers
    try:
        q = spf.query(i=ip, s=mail_from, h=helo, receiver=receiver)
        res, _code, exp = q.check()
    except _NeedLookup as e:
        return e.key
    except spf.TempError as e:
        return SpfOutcome(AuthResult.TEMPERROR, f"SPF temporary error: {e}")
    except spf.PermError as e:
        return SpfOutcome(AuthResult.PERMERROR, f"SPF permanent error: {e}")
    except Exception as e:  # pyspf bug or unexpected input: uncertain -> temperror
        return SpfOutcome(AuthResult.TEMPERROR,
                          f"SPF internal error: {type(e).__name__}: {e}")
    finally:
        _tls.answers = None
    try:
        return SpfOutcome(AuthResult(res), str(exp))
    except ValueError:
        return SpfOutcome(AuthResult.TEMPERROR, f"SPF unexpected result {res!r}: {exp}")


class _Lookups:
    """The DNS side of one check: answers so far, what timed out, what the client named."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, addr_type: str,
                 deadline: float) -> None:
        self.resolver, self.addr_type = resolver, addr_type
        self.deadline = deadline              # loop.time() at which the check gives up
        self.answers: dict[Key, Answer] = {}
        self.pending: set[str] = set()        # names being resolved right now
        self.timed_out: set[str] = set()
        self.clients: set[str] = set()        # names a PTR answer gave (the client's)

    def domain_stalled(self, names: set[str]) -> bool:
        return any(not n.endswith(_REVERSE) and n not in self.clients for n in names)

    async def fetch(self, key: Key) -> None:
        """Resolve `key` into self.answers, then prefetch what an MX or PTR answer names."""
        await self._resolve(key)
        got = self.answers.get(key)
        if not isinstance(got, list) or key[1] not in ("MX", "PTR"):
            return
        if key[1] == "MX":
            names = [str(v[1]) for _k, v in sorted(got, key=lambda r: r[1])]
        else:
            names = [str(v) for _k, v in got]
            self.clients.update(n.lower().rstrip(".") for n in names)
        # One at a time (one query, one socket, in flight per check), until one fails: pyspf
        # stops at that one. The point is fewer evaluation steps, not parallel queries.
        for n in names[:MAX_PREFETCH]:
            more = (n.lower().rstrip("."), self.addr_type)
            if more not in self.answers:
                await self._resolve(more)
                if not isinstance(self.answers[more], list):
                    return

    async def _resolve(self, key: Key) -> None:
        """One name into self.answers: the pending query for it if there is one (any check
        on this loop with this resolver), else a new one, whose lifetime is the resolver's or
        what is left of this check's deadline, the shorter. Each waiter keeps its own
        deadline (a waiter that joined later may get the creator's timeout: a stall)."""
        name, qtype = key
        flights = _flights.setdefault(asyncio.get_running_loop(), {})
        fkey = (self.resolver, name, qtype)
        flight = flights.get(fkey)
        if flight is None:
            # Never longer than this check's deadline: a query outlives no check, so the
            # queries in flight (sockets) are at most the checks under way.
            lifetime = min(float(self.resolver.lifetime),
                           self.deadline - asyncio.get_running_loop().time())
            flight = asyncio.ensure_future(_query(self.resolver, name, qtype,
                                                  max(0.001, lifetime)))
            flights[fkey] = flight
            flight.add_done_callback(lambda f: flights.pop(fkey, None) if
                                     flights.get(fkey) is f else None)
        self.pending.add(name)          # stays if the deadline cancels us: what we waited for
        answer, timed_out = await asyncio.shield(flight)
        self.pending.discard(name)
        if timed_out:
            self.timed_out.add(name)
        self.answers[key] = answer


# Queries in flight, per event loop: (resolver, name, qtype) -> the query's task. Entries go
# when their query ends (at most the resolver's lifetime).
_flights: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop,
    dict[tuple[dns.asyncresolver.Resolver, str, str], asyncio.Future[tuple[Answer, bool]]],
] = weakref.WeakKeyDictionary()


async def _query(resolver: dns.asyncresolver.Resolver, name: str, qtype: str,
                 lifetime: float) -> tuple[Answer, bool]:
    """(pyspf's records or a temperror message, whether it timed out); never raises."""
    try:
        answer = await resolver.resolve(name, qtype, search=False, raise_on_no_answer=False,
                                        lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
        return [], False
    except dns.exception.Timeout as e:
        return f"DNS timeout: {name} {qtype}: {e}", True
    except dns.exception.DNSException as e:
        return f"DNS error: {name} {qtype}: {e}", False
    except Exception as e:  # a resolver bug is a temperror, not a crash
        return f"DNS error: {name} {qtype}: {type(e).__name__}: {e}", False
    return ([] if answer.rrset is None else _spf_records(name, qtype, answer.rrset)), False


async def check_spf(
    ip: str,
    mail_from: str,
    helo: str,
    *,
    resolver: dns.resolver.Resolver,
    deadline_s: float,
    executor: Executor | None = None,
    receiver: str | None = None,
) -> SpfOutcome:
    """Evaluate SPF for (ip, MAIL FROM, HELO) within `deadline_s` seconds (see the module
    docstring: pyspf in `executor`, its DNS on the event loop).

    `mail_from` is the bare address ("" for the null sender, then the HELO identity is
    checked). Never raises for DNS or policy problems.
    """
    _install()
    mf = mail_from.strip().strip("<>")
    helo = helo.strip()
    if not mf and not helo:
        return SpfOutcome(AuthResult.NONE, "no identity to check (null sender and empty HELO)")
    addr = try_parse_ip(ip)
    loop = asyncio.get_running_loop()
    dns_side = _Lookups(async_twin(resolver), "AAAA" if addr is not None and addr.version == 6
                        else "A", loop.time() + deadline_s)
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                step = await loop.run_in_executor(executor, _spf_step, ip, mf, helo,
                                                  dict(dns_side.answers), receiver)
                if isinstance(step, SpfOutcome):
                    stalled = step.result is AuthResult.TEMPERROR and \
                        dns_side.domain_stalled(dns_side.timed_out)
                    return step._replace(domain_stalled=stalled)
                if step in dns_side.answers:    # cannot happen: pyspf asks only for a miss
                    return SpfOutcome(AuthResult.TEMPERROR, f"SPF lookup loop on {step}")
                if len(dns_side.answers) >= MAX_LOOKUPS:
                    return SpfOutcome(AuthResult.TEMPERROR,
                                      f"SPF evaluation needs more than {MAX_LOOKUPS} lookups")
                await dns_side.fetch(step)
    except TimeoutError:
        return SpfOutcome(AuthResult.TEMPERROR,
                          f"SPF check exceeded its {deadline_s:g}s deadline",
                          domain_stalled=dns_side.domain_stalled(dns_side.pending))


# --------------------------------------------------------------------------- certificates


def sha256_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """ "AB:CD:..." / "ab cd ..." / "abcd..." -> "abcd..." (lower-case hex, no separators)."""
    return re.sub(r"[\s:]", "", text).lower()


def cert_evidence(
    peercert_der: bytes | None, verified: bool, pinned_sha256: frozenset[str]
) -> CertResult:
    """Classify the client certificate.

    peercert_der: the leaf in DER (ssl_object.getpeercert(binary_form=True)), None if absent.
    verified: the TLS stack verified the chain against the configured CA bundle.
    pinned_sha256: fingerprints from config (colons/whitespace/case tolerated).
    A pinned match is reported as PINNED even when it also verified.
    """
    if not peercert_der:
        return CertResult.NONE
    pins = {normalize_fingerprint(p) for p in pinned_sha256}
    if sha256_fingerprint(peercert_der) in pins:
        return CertResult.PINNED
    if verified:
        return CertResult.VERIFIED
    return CertResult.UNTRUSTED
