"""Evidence I/O shell: one cached DNS resolver, SPF with a deadline, client-certificate facts.

Purpose
    Gather the facts that ingress.policy.classify.decide() consumes, without ever blocking the event
    loop and with a deadline on every lookup (pyspf is synchronous: it runs in an executor).

API
    make_resolver(nameservers, timeout, cache_size=10000) -> dns.resolver.Resolver
        nameservers: ["192.0.2.53", "192.0.2.53:5353", "192.0.2.53@5353", "::1",
        "[::1]:5353", "::1@5353"]; an empty list means the system's /etc/resolv.conf.
        `timeout` bounds each query (resolver.timeout and resolver.lifetime). Shared cache:
        dns.resolver.LRUCache (thread-safe). The resolver is not modified afterwards, so one
        instance may be shared by every executor thread.
    async check_spf(ip, mail_from, helo, *, resolver, deadline_s, executor=None,
                    receiver=None) -> (AuthResult, explanation)
        pyspf (spf.query(...).check()) in `executor` (default: the loop's default executor),
        with pyspf's own `querytime` budget slightly under `deadline_s` and an outer
        asyncio.wait_for(deadline_s). Exceeding either -> TEMPERROR.
    cert_evidence(peercert_der, verified, pinned_sha256) -> CertResult
    sha256_fingerprint(der) -> str;  normalize_fingerprint(text) -> str

How pyspf is pointed at our resolver
    pyspf 2.0.14 resolves through the module global `spf.DNSLookup(name, qtype, strict,
    timeout)`, looked up at call time from query.dns(). We replace it once (under a lock) with
    a dispatcher that reads the resolver from a threading.local set for the duration of our
    call in the executor thread; threads that did not set one fall through to pyspf's original
    function, so other users of pyspf in the process are unaffected. Concurrent checks with
    different resolvers do not interfere.

Failure modes
    * DNS timeout, SERVFAIL/no usable nameserver, any other resolver error -> TEMPERROR.
    * NXDOMAIN / no data -> empty answer (pyspf then decides none/permerror per RFC 7208).
    * pyspf raising instead of returning (e.g. PermError for an unparsable client IP from
      query.__init__) -> PERMERROR; any unexpected exception -> TEMPERROR (never promotes,
      never rejects).
    * The outer deadline cancels the await, not the executor thread: the thread finishes its
      current lookup (bounded by the resolver lifetime) and then its result is dropped. Give
      check_spf a dedicated, bounded ThreadPoolExecutor so a DNS outage cannot starve other
      users of the default executor.

Limits
    pyspf keeps a per-query cache only; cross-query caching is the resolver's LRUCache (which
    honours TTLs, and caches negative answers). RFC 7208 lookup limits (10 mechanisms, 2 void
    lookups) are pyspf's.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from concurrent.futures import Executor
from typing import Any

import dns.exception
import dns.nameserver
import dns.resolver
import spf

from ingress.core.resolver import make_resolver, parse_nameserver
from ingress.policy.classify import AuthResult, CertResult

__all__ = [
    "cert_evidence",
    "check_spf",
    "make_resolver",
    "normalize_fingerprint",
    "parse_nameserver",
    "sha256_fingerprint",
]


# --------------------------------------------------------------------------- pyspf glue

_tls = threading.local()
_install_lock = threading.Lock()
_original_lookup: Any = None


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20.0) -> list:
    """Replacement for spf.DNSLookup; same contract as spf.DNSLookup_dnspython."""
    resolver: dns.resolver.Resolver | None = getattr(_tls, "resolver", None)
    if resolver is None:
        return _original_lookup(name, qtype, strict, timeout)
    lifetime = max(0.001, min(float(timeout), float(resolver.lifetime)))
    try:
        answer = resolver.resolve(
            name, qtype, lifetime=lifetime, search=False, raise_on_no_answer=False
        )
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
        return []
    except dns.exception.Timeout as e:
        raise spf.TempError(f"DNS timeout: {name} {qtype}: {e}") from None
    except dns.exception.DNSException as e:
        raise spf.TempError(f"DNS error: {name} {qtype}: {e}") from None
    if answer.rrset is None:
        return []
    return _spf_records(name, qtype, answer.rrset)


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


def _spf_sync(
    ip: str,
    mail_from: str,
    helo: str,
    resolver: dns.resolver.Resolver,
    querytime: float,
    receiver: str | None,
) -> tuple[AuthResult, str]:
    _tls.resolver = resolver
    try:
        q = spf.query(
            i=ip,
            s=mail_from,
            h=helo,
            receiver=receiver,
            timeout=querytime,
            querytime=querytime,
        )
        res, _code, exp = q.check()
    except spf.TempError as e:
        return AuthResult.TEMPERROR, f"SPF temporary error: {e}"
    except spf.PermError as e:
        return AuthResult.PERMERROR, f"SPF permanent error: {e}"
    except Exception as e:  # pyspf bug or unexpected input: uncertain -> temperror
        return AuthResult.TEMPERROR, f"SPF internal error: {type(e).__name__}: {e}"
    finally:
        _tls.resolver = None
    try:
        return AuthResult(res), str(exp)
    except ValueError:
        return AuthResult.TEMPERROR, f"SPF unexpected result {res!r}: {exp}"


async def check_spf(
    ip: str,
    mail_from: str,
    helo: str,
    *,
    resolver: dns.resolver.Resolver,
    deadline_s: float,
    executor: Executor | None = None,
    receiver: str | None = None,
) -> tuple[AuthResult, str]:
    """Evaluate SPF for (ip, MAIL FROM, HELO) off the event loop, within `deadline_s` seconds.

    `mail_from` is the bare address ("" for the null sender, then the HELO identity is
    checked). Never raises for DNS or policy problems; returns (AuthResult, explanation).
    """
    _install()
    mf = mail_from.strip().strip("<>")
    if not mf and not helo.strip():
        return AuthResult.NONE, "no identity to check (null sender and empty HELO)"
    # pyspf's own budget a little under ours, so it normally reports the timeout itself;
    # querytime must be > 0 (0 disables pyspf's overall limit).
    querytime = max(0.01, deadline_s * 0.9)
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(
        executor, _spf_sync, ip, mf, helo.strip(), resolver, querytime, receiver
    )
    try:
        return await asyncio.wait_for(fut, timeout=deadline_s)
    except TimeoutError:
        return AuthResult.TEMPERROR, f"SPF check exceeded its {deadline_s:g}s deadline"


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
