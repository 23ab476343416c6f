"""DKIM verification for the workers (dkimpy 1.1.8, dnspython).

Purpose
    Verify every DKIM-Signature of a received message (RSA verify is ~1 ms of pure Python, so
    it runs here, not in the acceptors) and decide DMARC-style alignment with the From:
    domain, for workers.lane.headers to render into Authentication-Results. An aligned DKIM pass
    plus an SPF pass feeds the learned allow cache (ingress.policy.classify.should_learn).

API
    make_resolver(nameservers, timeout, cache_size=10000) -> dns.resolver.Resolver
        ingress.core.resolver's, the same factory the acceptors use for SPF.
    make_dnsfunc(resolver, timeout, trace=None, deadline=None, min_bits=1024, budget=None,
                 dead=None) -> dnsfunc(name: bytes, timeout=5) -> bytes|None
        dkimpy-compatible TXT lookup through our resolver; records outcomes in `trace`; a key
        record that key_record_problem() refuses is never handed to dkimpy; each wait bounded
        by the message's DnsBudget (ingress.policy.dkim_budget) and `deadline`; a domain in
        `dead` is a temperror at once, a conclusive unanswered lookup marks its domain there.
    DeadKeyDomains(ttl=60, maxsize=4096)  .mark(domain), .is_dead(domain), len()
        the negative cache of signing domains (by organisational domain) whose key lookups
        got no answer; thread-safe; one per worker process (workers.lane.pipeline).
    key_record_problem(txt, *, min_bits=1024, max_bits=4096) -> str | None
        why an RSA key record must not be used (size, exponent), judged before any RSA.
    verify_dkim(message, *, resolver, timeout=2.0, deadline_s=5.0, max_signatures=5,
                minkey=1024, dns_budget=None, dead=None) -> DkimReport
        signatures aligned with the From: domain are judged first; results in header order.
        DkimReport.results: tuple[DkimSignatureResult(domain, selector, result, aligned,
        b_prefix, reason)], .from_domain, .aligned_pass, .any_pass.
    header_from_domain(message) -> str | None     (exactly one From: with one address, the
                                                   field at most MAX_FROM_FIELD bytes; its
                                                   domain canonical, None if not a valid name)
    aligned(signing_domain, from_domain) -> bool  (relaxed, RFC 7489 3.1.1: the same
                                                   organisational domain by the PSL; the one
                                                   implementation is ingress.policy.identity's,
                                                   re-exported here)
    The Authentication-Results renderer and forged A-R stripping are in workers.lane.headers.
    Results are ingress.core.wire.AuthResult (DkimResult is the same enum).

Result mapping (RFC 6376 / RFC 8601)
    signature verifies -> pass; body hash or signature mismatch -> fail;
    malformed signature header / missing tags / bad c= -> permerror;
    no key record (NXDOMAIN, no TXT) / unparsable or revoked (p=) -> permerror;
    RSA key under 1024 or over 4096 bits (RFC 8301), public exponent not odd in 3..2^64, or a
    DER key over 4 KiB -> permerror, decided from the TXT record before any RSA operation;
    distinct h= names x header fields over MAX_HEADER_WORK -> permerror, before the lookup;
    DNS timeout or SERVFAIL for the key, the overall deadline or the message's DNS budget
    exhausted, or a key domain that did not answer recently (DeadKeyDomains) -> temperror;
    signatures beyond max_signatures -> neutral ("not checked: too many signatures");
    no DKIM-Signature at all -> an empty results tuple (rendered as dkim=none).

dkimpy traps handled here
    dkimpy's header parser (rfc822_parse) is quadratic in the continuation lines of a field:
    verification uses _rfc822_parse, the same rules in linear time (tests compare the two).
    Its header selection is quadratic in h= names x fields: bounded by MAX_HEADER_WORK. Its
    b= removal and h= split regexes backtrack quadratically over whitespace: signature headers
    over 16 KiB or with a blank run over 256 bytes are a permerror, before dkimpy parses them.
    Its relaxed body canonicalisation is quadratic in a run of blanks not followed by CRLF:
    importing this module replaces dkim.canonicalization.strip_trailing_whitespace with a
    linear regex that makes the same replacements (tests compare the two).
    DKIM.verify() swallows DnsTimeoutError and KeyFormatError and just returns False, so a
    timeout and a missing key look like a bad signature. We therefore verify in two steps
    (verify_headerprep, then verify_sig) and classify a False from the key lookup trace.
    dkimpy's own get_txt uses the system resolver with no shared cache: never used here.

Failure modes
    Never raises for message content or DNS trouble; an unparsable message header section
    that contains a DKIM-Signature yields one permerror result.

Limits
    DNS wait per message: at most dns_budget (classify.dkim_dns_budget) over all its lookups,
    each at most `timeout`. A dead signing domain costs one conclusive timeout per
    DEAD_KEY_TTL per worker process (then nothing), whatever selector or subdomain names it.
    DeadKeyDomains holds at most DEAD_KEY_MAX names of at most MAX_DOMAIN_KEY characters.
    CPU per message: at most MAX_SIGNATURES (5) signatures are evaluated, each with a key of at
    most 4096 bits and a 64-bit exponent (a verify is then a few ms) and a bounded header
    selection (MAX_HEADER_WORK), within deadline_s overall
    (checked before every signature and bounding every DNS wait). What remains per signature
    is dkimpy's canonicalisation and hashing, linear in the message size (relaxed body
    canonicalisation of 10 MB is ~0.5 s of regex work in short GIL-holding steps).
    Alignment: d= and the From: domain align when their organisational domains (the Public
    Suffix List, ingress.policy.identity.org_domain) are equal, compared by canonical name
    (ingress.core.addr.normalize_domain: UTS-46, A-labels), so "From: a@bücher.test" aligns
    with d=xn--bcher-kva.test, and a fullwidth "spam.test" is "spam.test"; a name that is
    not a valid domain aligns with nothing. d=github.io never aligns with From: x.github.io
    (a public suffix is nobody's organisational domain).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.utils
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.canonicalization
import dkim.crypto
import dkim.util
import dns.exception
import dns.resolver
from cachetools import TTLCache

from ingress.core.addr import normalize_domain
from ingress.core.fields import field_value, header_fields, unfold
from ingress.core.resolver import make_resolver
from ingress.core.wire import AuthResult
from ingress.policy.dkim_budget import DnsBudget, evaluation_order
from ingress.policy.identity import aligned, org_domain

__all__ = [
    "DeadKeyDomains",
    "DkimReport",
    "DkimResult",
    "DkimSignatureResult",
    "aligned",
    "header_from_domain",
    "key_record_problem",
    "make_dnsfunc",
    "make_resolver",
    "verify_dkim",
]


DkimResult = AuthResult      # the one result vocabulary (ingress.core.wire.AuthResult)

# CPU bounds, checked before dkimpy does any RSA operation (its pow() holds the GIL: an
# 8192-bit modulus with an 8192-bit exponent took ~1.1 s per signature, and the worker's
# heartbeats stopped). RFC 8301 3.1: verifiers must validate 1024..4096-bit keys and must not
# accept smaller ones; larger ones are allowed to be refused, and are. The exponent: RFC 8017
# requires 3 <= e < n, odd; real DKIM keys use 65537 (a few old ones 3); OpenSSL refuses
# exponents over 64 bits for moduli over 3072 bits (OPENSSL_RSA_MAX_PUBEXP_BITS), so nothing
# real is lost by the same rule here, and a verify costs at most ~2x the 65537 case.
MIN_KEY_BITS = 1024
MAX_KEY_BITS = 4096
MAX_EXPONENT_BITS = 64
# A DER key longer than this is refused without parsing (dkimpy's ASN.1 integer decoding is
# quadratic in the length; a TCP TXT answer can carry ~64 KiB). A 4096-bit SPKI is ~550 bytes;
# up to 4 KiB (16384 bits) a refused key is still parsed, so the reason names its size.
MAX_KEY_DER = 4096
MAX_SIGNATURES = 5           # signatures evaluated per message; later ones are "neutral"
# dkimpy finds each h= name by scanning the header fields backwards (dkim.select_headers):
# distinct names x fields steps, ~50 ns each. Real signatures: ~20 names x ~100 fields. A
# signature over this bound is a permerror, decided before the key is fetched.
MAX_HEADER_WORK = 1_000_000
# dkimpy removes b= from the signature header with a regex (RE_BTAG), and splits h= with
# another (\s*:\s*), that backtrack quadratically over whitespace. Real signature headers
# are a few KiB (a 4096-bit b= is 684 characters) with folds of a few blanks; longer ones, or
# longer blank runs, are a permerror before dkimpy parses them.
MAX_SIGNATURE_FIELD = 16 * 1024
MAX_SIGNATURE_WSP_RUN = 256
_WSP_RUN = re.compile(rb"\s{%d}" % (MAX_SIGNATURE_WSP_RUN + 1))


@dataclass(slots=True)
class _Trace:
    """What the last key lookup did (filled by the dnsfunc)."""

    name: str = ""
    outcome: str = ""  # "found" | "nokey" | "badkey" | "temperror"
    txt: bytes | None = None
    error: str = ""
    domain: str = ""   # d= of the signature being judged (set before its lookup)


DnsFunc = Callable[..., bytes | None]


def key_record_problem(txt: bytes, *, min_bits: int = MIN_KEY_BITS,
                       max_bits: int = MAX_KEY_BITS) -> str | None:
    """Why the RSA key in DKIM key record `txt` must not be used, or None.

    Only sizes are judged here (modulus bits, exponent range, DER length), before any RSA
    operation; a record that is not an RSA key we can parse (revoked p=, garbage, ed25519,
    unknown k=) is left to dkimpy, which reports it itself. Linear in len(txt)."""
    try:
        tags = dkim.util.parse_tag_value(txt)
    except Exception:  # InvalidTagValueList and friends: dkimpy says "bad key record"
        return None
    if tags.get(b"k", b"rsa").strip() != b"rsa" or not tags.get(b"p"):
        return None
    try:
        der = base64.b64decode(re.sub(rb"\s+", b"", tags[b"p"]))
    except (binascii.Error, ValueError):
        return None
    if len(der) > MAX_KEY_DER:
        return f"key too large: {len(der)} bytes (limit {max_bits} bits)"
    try:
        pk = dkim.crypto.parse_public_key(der)
        n, e = int(pk["modulus"]), int(pk["publicExponent"])
    except Exception:  # UnparsableKeyError, or a template mismatch
        return None
    bits = n.bit_length()
    if bits < min_bits:
        return f"key too small: {bits} bits (minimum {min_bits})"
    if bits > max_bits:
        return f"key too large: {bits} bits (limit {max_bits})"
    if not (3 <= e < n and e % 2 == 1 and e.bit_length() <= MAX_EXPONENT_BITS):
        return f"bad public exponent ({e.bit_length()} bits; odd, 3..2^{MAX_EXPONENT_BITS})"
    return None


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


def make_dnsfunc(
    resolver: dns.resolver.Resolver,
    timeout: float,
    trace: _Trace | None = None,
    deadline: float | None = None,
    min_bits: int = MIN_KEY_BITS,
    budget: DnsBudget | None = None,
    dead: DeadKeyDomains | None = None,
) -> DnsFunc:
    """A dkimpy dnsfunc backed by `resolver`; each lookup bounded by `timeout` seconds, by the
    message's DnsBudget if given (ingress.policy.dkim_budget) and by the absolute
    time.monotonic() `deadline` if given. A key record that key_record_problem() refuses is not
    handed to dkimpy (it sees no key, does no RSA): trace.outcome "badkey". With `dead`, a
    signing domain remembered as unresponsive is a temperror at once (no query), and a
    conclusive unanswered lookup remembers its domain."""
    per_lookup = min(timeout, resolver.lifetime)
    bud = budget if budget is not None else DnsBudget(per_lookup, math.inf)

    def dnsfunc(name: bytes | str, timeout: float = timeout) -> bytes | None:
        t = trace if trace is not None else _Trace()
        t.txt, t.error, t.outcome = None, "", ""
        try:
            qname = name.decode("ascii") if isinstance(name, bytes) else name
        except UnicodeDecodeError:
            t.outcome = "nokey"
            return None
        t.name = qname
        domain = t.domain or _key_domain(qname)
        if dead is not None and dead.is_dead(domain):
            t.outcome = "temperror"
            t.error = f"key domain {dead.key(domain)} did not answer recently (not asked again)"
            raise dkim.DnsTimeoutError(t.error)
        left = math.inf if deadline is None else deadline - time.monotonic()
        lifetime = min(bud.lifetime(left), timeout, per_lookup)
        if lifetime <= 0:
            t.outcome = "temperror"
            t.error = ("DKIM verification deadline exhausted" if left <= 0
                       else "DNS time of the message exhausted")
            raise dkim.DnsTimeoutError(t.error)
        t0 = time.monotonic()
        try:
            ans = resolver.resolve(
                qname, "TXT", lifetime=lifetime, search=False, raise_on_no_answer=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
            t.outcome = "nokey"
            return None
        except dns.exception.DNSException as e:
            # timeout, SERVFAIL from every server (NoNameservers), network errors
            if dead is not None and isinstance(e, _UNANSWERED) and bud.conclusive(lifetime):
                dead.mark(domain)
            t.outcome, t.error = "temperror", f"{type(e).__name__}: {e}"
            raise dkim.DnsTimeoutError(t.error) from None
        finally:
            bud.charge(time.monotonic() - t0)
        records = [b"".join(r.strings) for r in ans.rrset] if ans.rrset is not None else []
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


# A From: field longer than this has no usable domain (one address is well under 1 KiB; a
# From: with several addresses has none anyway): it is not parsed.
MAX_FROM_FIELD = 8 * 1024


def header_from_domain(message: bytes) -> str | None:
    """Canonical domain of the single From: address (ingress.core.addr.normalize_domain);
    None if absent, ambiguous or not a valid domain name."""
    froms = [message[s:e] for s, e, name in header_fields(message) if name == b"from"]
    if len(froms) != 1 or len(froms[0]) > MAX_FROM_FIELD:
        return None
    try:
        pairs = email.utils.getaddresses([unfold(field_value(froms[0]))])
    except (RecursionError, ValueError, IndexError):
        # the stdlib parser recurses once per nested comment: hostile input, no domain
        return None
    addrs = [a for _, a in pairs if a]
    if len(addrs) != 1 or "@" not in addrs[0]:
        return None
    return normalize_domain(addrs[0].rpartition("@")[2]) or None


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class DkimSignatureResult:
    domain: str  # d=
    selector: str  # s=
    result: DkimResult
    aligned: bool  # d= aligned with the From: domain (meaningful for any result)
    b_prefix: str = ""  # first 8 characters of b= (RFC 6008 header.b)
    reason: str = ""

    @property
    def aligned_pass(self) -> bool:
        return self.result is DkimResult.PASS and self.aligned


@dataclass(frozen=True, slots=True)
class DkimReport:
    results: tuple[DkimSignatureResult, ...]
    from_domain: str | None

    @property
    def aligned_pass(self) -> bool:
        return any(r.aligned_pass for r in self.results)

    @property
    def any_pass(self) -> bool:
        return any(r.result is DkimResult.PASS for r in self.results)


_LINE_END = re.compile(rb"\r?\n")
_DKIMPY_FIELD = re.compile(rb"([\x21-\x7e]+?):")


def _rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkim.rfc822_parse's result, in linear time.

    dkimpy appends every continuation line to its field's bytes (quadratic in the lines of one
    field: a header folded 100,000 times cost 1 s). Same rules, same output: lines split at
    CRLF or LF, an empty line ends the header section, a line starting with SP or HT continues
    the field, an mbox "From " line is skipped, anything else raises MessageFormatError."""
    headers: list[list[Any]] = []
    lines = _LINE_END.split(message)
    parts: list[bytes] | None = None
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line:
            i += 1
            break
        if line[0] in (0x09, 0x20):
            if parts is None:
                raise dkim.MessageFormatError("continuation line before any header field")
            parts.append(line)
            parts.append(b"\r\n")
        else:
            m = _DKIMPY_FIELD.match(line)
            if m is not None:
                parts = [line[m.end(0):], b"\r\n"]
                headers.append([m.group(1), parts])
            elif not line.startswith(b"From "):
                raise dkim.MessageFormatError(
                    f"Unexpected characters in RFC822 header: {line[:80]!r}")
        i += 1
    for h in headers:
        h[1] = b"".join(h[1])
    return headers, b"\r\n".join(lines[i:])


# dkimpy's relaxed body canonicalisation strips blanks before CRLF with re.sub(b"[\t ]+\r\n"),
# which retries from every blank of a run that is not followed by CRLF: quadratic in the run,
# in one GIL-holding call (8 MiB of 996-blank lines: ~11 s, and the worker was killed). The
# lookbehind makes only the first blank of a run a match start: the same matches, linear.
_TRAILING_WSP = re.compile(rb"(?<![\t ])[\t ]+\r\n")


def _strip_trailing_whitespace(content: bytes) -> bytes:
    return _TRAILING_WSP.sub(b"\r\n", content)


dkim.canonicalization.strip_trailing_whitespace = _strip_trailing_whitespace


class _DKIM(dkim.DKIM):
    """dkim.DKIM with the linear header parser (see _rfc822_parse); nothing else differs."""

    def set_message(self, message: bytes) -> None:
        super().set_message(b"")          # resets the per-message state, parses nothing
        if message:
            self.headers, self.body = _rfc822_parse(message)


def _tag(sig: dict, key: bytes) -> str:
    v = sig.get(key, b"")
    return re.sub(r"\s+", "", v.decode("ascii", "replace")) if isinstance(v, bytes) else ""


def _count_signatures(message: bytes) -> int:
    return sum(1 for _, _, name in header_fields(message) if name == b"dkim-signature")


def verify_dkim(
    message: bytes,
    *,
    resolver: dns.resolver.Resolver,
    timeout: float = 2.0,
    deadline_s: float = 5.0,
    max_signatures: int = MAX_SIGNATURES,
    minkey: int = MIN_KEY_BITS,
    dns_budget: float | None = None,
    dead: DeadKeyDomains | None = None,
) -> DkimReport:
    """Verify every DKIM-Signature (up to max_signatures) within deadline_s seconds overall,
    the key lookups together waiting at most dns_budget seconds (None: only the deadline);
    signatures aligned with the From: domain first (ingress.policy.dkim_budget). `dead`: the
    process's negative cache of unresponsive key domains (None: none)."""
    deadline = time.monotonic() + deadline_s
    from_domain = header_from_domain(message)
    try:
        d = _DKIM(message, minkey=minkey, timeout=timeout)
        raw_sigs = [v for name, v in d.headers if name.lower() == b"dkim-signature"]
        nsig = len(raw_sigs)
    except Exception as e:  # MessageFormatError and friends
        if _count_signatures(message):
            bad = DkimSignatureResult("", "", DkimResult.PERMERROR, False, "", f"{e}")
            return DkimReport((bad,), from_domain)
        return DkimReport((), from_domain)

    trace = _Trace()
    budget = DnsBudget(min(timeout, resolver.lifetime),
                       dns_budget if dns_budget is not None else deadline_s)
    dnsfunc = make_dnsfunc(resolver, timeout, trace, deadline, min_bits=minkey, budget=budget,
                           dead=dead)
    judged = min(nsig, max_signatures)
    preps = [_prepare(d, idx, raw_sigs[idx], from_domain) for idx in range(judged)]
    results: list[DkimSignatureResult] = [p if isinstance(p, DkimSignatureResult) else p.done
                                          for p in preps]
    order = evaluation_order([isinstance(p, _Prepared) and p.done.aligned for p in preps])
    for idx in order:
        p = preps[idx]
        if isinstance(p, _Prepared):
            result, reason = _judge_signature(d, idx, p.sig, p.include_headers, p.sigheaders,
                                              dnsfunc, trace, deadline)
            results[idx] = dataclasses.replace(p.done, result=result, reason=reason)
    results += [DkimSignatureResult("", "", DkimResult.NEUTRAL, False, "",
                                    "not checked: too many signatures")] * (nsig - judged)
    return DkimReport(tuple(results), from_domain)


@dataclass(slots=True)
class _Prepared:
    """A parsed signature waiting for its key: its result so far (identity, alignment) and
    what dkimpy's verify_sig needs."""

    done: DkimSignatureResult
    sig: dict
    include_headers: list
    sigheaders: list


def _signature_field_problem(raw: bytes) -> str | None:
    """Why a DKIM-Signature field value is refused unparsed (size, blank runs), or None."""
    if len(raw) > MAX_SIGNATURE_FIELD:
        return f"signature header too long: {len(raw)} bytes (limit {MAX_SIGNATURE_FIELD})"
    if _WSP_RUN.search(raw):
        return f"signature header: whitespace run over {MAX_SIGNATURE_WSP_RUN} bytes"
    return None


def _prepare(
    d: dkim.DKIM,
    idx: int,
    raw_sig: bytes,
    from_domain: str | None,
) -> DkimSignatureResult | _Prepared:
    """Signature `idx` parsed (no DNS, no RSA): its final result if it is malformed, else what
    its judgement needs."""
    problem = _signature_field_problem(raw_sig)
    if problem is not None:   # judged before dkimpy parses it (its regexes backtrack)
        return DkimSignatureResult("", "", DkimResult.PERMERROR, False, "", problem)
    try:
        prep = d.verify_headerprep(idx)
    except Exception as e:  # MessageFormatError / ValidationError: malformed signature
        return DkimSignatureResult("", "", DkimResult.PERMERROR, False, "", str(e))
    if not prep:
        return DkimSignatureResult("", "", DkimResult.PERMERROR, False, "", "no signature")
    sig, include_headers, sigheaders = prep
    domain = _tag(sig, b"d").lower()
    selector = _tag(sig, b"s")
    b_prefix = _tag(sig, b"b")[:8]
    al = aligned(domain, from_domain)
    # The result is a placeholder until _judge_signature replaces it.
    done = DkimSignatureResult(domain, selector, DkimResult.TEMPERROR, al, b_prefix, "")
    return _Prepared(done, sig, include_headers, sigheaders)


def _judge_signature(
    d: dkim.DKIM,
    idx: int,
    sig: dict,
    include_headers: list,
    sigheaders: list,
    dnsfunc: DnsFunc,
    trace: _Trace,
    deadline: float,
) -> tuple[DkimResult, str]:
    """The verdict and its reason for one parsed signature: the deadline and the header-work
    bound first, then dkimpy's verification (its exceptions mapped to FAIL / PERMERROR /
    TEMPERROR)."""
    if time.monotonic() >= deadline:
        return DkimResult.TEMPERROR, "DKIM verification deadline exhausted"
    work = len(set(include_headers)) * len(d.headers)
    if work > MAX_HEADER_WORK:
        return DkimResult.PERMERROR, (f"signature too costly: {len(set(include_headers))} "
                                      f"distinct h= names over {len(d.headers)} header fields")
    trace.outcome, trace.txt, trace.error = "", None, ""
    trace.domain = _tag(sig, b"d").lower()
    try:
        ok = d.verify_sig(sig, include_headers, sigheaders[idx], dnsfunc)
    except dkim.ValidationError as e:  # body hash mismatch, tlsrpt service mismatch
        msg = str(e)
        if "body hash" in msg:
            return DkimResult.FAIL, "body hash mismatch"
        return DkimResult.PERMERROR, msg
    except dkim.KeyFormatError as e:  # e.g. key too small (raised after a good verify)
        return DkimResult.PERMERROR, str(e)
    except dkim.DKIMException as e:
        return DkimResult.PERMERROR, str(e)
    except Exception as e:  # dkimpy bug on hostile input: uncertain
        return DkimResult.TEMPERROR, f"{type(e).__name__}: {e}"
    if ok:
        return DkimResult.PASS, ""
    return _unverified_verdict(trace)


def _unverified_verdict(trace: _Trace) -> tuple[DkimResult, str]:
    """Why a signature did not verify, from what the key lookup saw (the trace)."""
    if trace.outcome == "temperror":
        return DkimResult.TEMPERROR, trace.error or "key lookup failed"
    if trace.outcome == "nokey":
        return DkimResult.PERMERROR, "no key for signature"
    if trace.outcome == "badkey":
        return DkimResult.PERMERROR, trace.error
    if trace.outcome == "found" and trace.txt is not None:
        try:
            dkim.evaluate_pk(trace.name.encode(), trace.txt)
        except Exception as e:
            return DkimResult.PERMERROR, f"bad key record: {e}"
    return DkimResult.FAIL, "signature did not verify"
