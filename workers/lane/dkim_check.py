"""DKIM verification for the workers (dkimpy 1.1.8, dnspython): every signature judged, within
the message's deadlines.

Purpose
    Verify every DKIM-Signature of a received message (RSA verify is ~1 ms of pure Python, so
    it runs here, not in the acceptors) and decide DMARC-style alignment with the From:
    domain, for workers.lane.headers to render into Authentication-Results. An aligned DKIM pass
    of the SPF domain's organisation plus an SPF pass feeds the learned allow cache
    (ingress.policy.classify.should_learn, dkim_vouches); the results feed DMARC
    (workers.lane.dmarc_lookup).

API
    The lane's DKIM in three modules, by job; this one is the door the pipeline and the
    tests use, and re-exports the others' API:
        workers.lane.dkim_parse  bounds and parsing before dkimpy: key_record_problem,
                                 header_from_domain, the linear header parser and body
                                 canonicalisation (the dkimpy traps handled)
        workers.lane.dkim_keys   the key lookups: make_dnsfunc, DeadKeyDomains
        workers.lane.dkim_check  the verification: verify_dkim, its results
    make_resolver(nameservers, timeout, cache_size=10000) -> dns.resolver.Resolver
        ingress.core.resolver's, the same factory the acceptors use for SPF.
    make_dnsfunc, DeadKeyDomains      (workers.lane.dkim_keys)
    key_record_problem, header_from_domain   (workers.lane.dkim_parse)
    verify_dkim(message, *, resolver, timeout=2.0, deadline_s=5.0, max_signatures=5,
                minkey=1024, dns_budget=None, dead=None, budget=None) -> DkimReport
        signatures aligned with the From: domain are judged first; results in header order.
        DkimReport.results: tuple[DkimSignatureResult(domain, selector, result, aligned,
        b_prefix, reason)], .from_domain, .aligned_pass, .any_pass.
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

dkimpy's verify
    DKIM.verify() swallows DnsTimeoutError and KeyFormatError and just returns False, so a
    timeout and a missing key look like a bad signature. We therefore verify in two steps
    (verify_headerprep, then verify_sig) and classify a False from the key lookup trace
    (workers.lane.dkim_keys.KeyTrace). dkimpy's own get_txt uses the system resolver with no
    shared cache: never used here. Its other traps: workers.lane.dkim_parse.

Failure modes
    Never raises for message content or DNS trouble; an unparsable message header section
    that contains a DKIM-Signature yields one permerror result.

Limits
    DNS wait per message: at most dns_budget (classify.dkim_dns_budget) over all its lookups,
    each at most `timeout`. A dead signing domain costs one conclusive timeout per
    DEAD_KEY_TTL per worker process (then nothing), whatever selector or subdomain names it.
    DeadKeyDomains holds at most DEAD_KEY_MAX names of at most MAX_DOMAIN_KEY characters
    (workers.lane.dkim_keys).
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

import dataclasses
import time
from dataclasses import dataclass

import dkim
import dns.resolver

from ingress.core.resolver import make_resolver
from ingress.core.wire import AuthResult
from ingress.policy.dkim_budget import DnsBudget, evaluation_order
from ingress.policy.identity import aligned
from workers.lane.dkim_keys import DeadKeyDomains, DnsFunc, KeyTrace, make_dnsfunc
from workers.lane.dkim_parse import (
    MAX_HEADER_WORK,
    MAX_SIGNATURES,
    MIN_KEY_BITS,
    LinearDKIM,
    count_signatures,
    header_from_domain,
    key_record_problem,
    sig_tag,
    signature_field_problem,
)

__all__ = [
    "MAX_SIGNATURES",
    "MIN_KEY_BITS",
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
    budget: DnsBudget | None = None,
) -> DkimReport:
    """Verify every DKIM-Signature (up to max_signatures) within deadline_s seconds overall,
    the key lookups together waiting at most dns_budget seconds (None: only the deadline), or
    what is left of `budget` (the message's, shared with its DMARC lookups) when given;
    signatures aligned with the From: domain first (ingress.policy.dkim_budget). `dead`: the
    process's negative cache of unresponsive key domains (None: none)."""
    deadline = time.monotonic() + deadline_s
    from_domain = header_from_domain(message)
    try:
        d = LinearDKIM(message, minkey=minkey, timeout=timeout)
        raw_sigs = [v for name, v in d.headers if name.lower() == b"dkim-signature"]
        nsig = len(raw_sigs)
    except Exception as e:  # MessageFormatError and friends
        if count_signatures(message):
            bad = DkimSignatureResult("", "", DkimResult.PERMERROR, False, "", f"{e}")
            return DkimReport((bad,), from_domain)
        return DkimReport((), from_domain)

    trace = KeyTrace()
    if budget is None:
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


def _prepare(
    d: dkim.DKIM,
    idx: int,
    raw_sig: bytes,
    from_domain: str | None,
) -> DkimSignatureResult | _Prepared:
    """Signature `idx` parsed (no DNS, no RSA): its final result if it is malformed, else what
    its judgement needs."""
    problem = signature_field_problem(raw_sig)
    if problem is not None:   # judged before dkimpy parses it (its regexes backtrack)
        return DkimSignatureResult("", "", DkimResult.PERMERROR, False, "", problem)
    try:
        prep = d.verify_headerprep(idx)
    except Exception as e:  # MessageFormatError / ValidationError: malformed signature
        return DkimSignatureResult("", "", DkimResult.PERMERROR, False, "", str(e))
    if not prep:
        return DkimSignatureResult("", "", DkimResult.PERMERROR, False, "", "no signature")
    sig, include_headers, sigheaders = prep
    domain = sig_tag(sig, b"d").lower()
    selector = sig_tag(sig, b"s")
    b_prefix = sig_tag(sig, b"b")[:8]
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
    trace: KeyTrace,
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
    trace.domain = sig_tag(sig, b"d").lower()
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


def _unverified_verdict(trace: KeyTrace) -> tuple[DkimResult, str]:
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
