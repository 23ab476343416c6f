"""DMARC (RFC 7489) from our own SPF and DKIM results: record parsing, policy discovery,
identifier alignment and the result (pure; the DNS answers come in through a function).

Purpose
    Say in Authentication-Results whether the author domain (the RFC5322.From domain) is
    authenticated by an aligned SPF or DKIM pass, and which policy its owner published. We
    only REPORT: nothing is rejected, quarantined or delayed for a DMARC result, so there is
    no disposition ("dis=" in some receivers' comments: that is for receivers who enforce).

API
    author_domain(from_fields, domains) -> (domain, None) | ("", AuthResult)
        the Author Domain (RFC 7489 6.6.1) from the number of From: fields and the domains
        of the addresses of the one From: field; or why there is none (see Rules).
    parse_record(txt) -> DmarcRecord | None       a record that starts with v=DMARC1, parsed;
                                                  None: ignore it (invalid, see Rules)
    is_dmarc(txt) -> bool                         does it start with the v=DMARC1 tag?
    discover(author, lookup) -> Discovery         policy discovery (RFC 7489 6.6.3), asking
        lookup(qname) -> tuple[str, ...] | None   (the TXT strings at qname; () for none;
                                                  None for a temporary failure)
    evaluate(author, discovery, *, spf, spf_domain, dkim) -> DmarcVerdict
        dkim: (d=, result) pairs; spf: the SPF result of the MAIL FROM identity, spf_domain
        its domain ("" for the null sender: see Rules)
    identifier_aligned(author, identifier, mode) -> bool   "r" relaxed, "s" strict
    DmarcRecord(p, sp, adkim, aspf, pct), Policy(domain, record, subdomain).applied,
    Discovery(policy, result, reason), DmarcVerdict(result, author, policy, reason)
        .comment ("p=reject sp=none") and .applied ("reject"; "" without a policy)
    Disposition (none | quarantine | reject), MAX_RECORD, MAX_RECORDS

Rules (RFC 7489)
    * Author Domain (6.6.1): no From: field -> none; more than one From: field -> permerror
      (RFC 5322 allows one); one field whose addresses name more than one domain -> permerror
      (6.6.1 lets a receiver evaluate each; that costs two lookups per domain a sender lists,
      so we do not); no valid domain -> none ("no aligned identifier could be extracted",
      11.2). Every name is canonical (ingress.core.addr.normalize_domain: UTS-46, A-labels).
    * Record (6.3, 6.4): TXT strings of one record are concatenated by the caller; a record is
      a DMARC record iff its first tag is exactly "v=DMARC1" (case-sensitive value, blanks
      around "=" allowed). Tag names and keyword values are case-insensitive; unknown tags and
      parts without "=" are ignored; the first of duplicate tags counts. adkim/aspf other
      than r|s and pct outside 0..100 fall back to their defaults (r, r, 100). sp defaults
      to p. A record without a valid p, or with an invalid sp, is treated as p=none when it
      has a syntactically valid rua URI, and is otherwise ignored (6.6.3 step 6). A record
      longer than MAX_RECORD characters is ignored.
    * Discovery (6.6.3): _dmarc.<author>; if no DMARC record is there (NXDOMAIN, no TXT, no
      TXT starting with v=DMARC1), _dmarc.<organisational domain> (ingress.policy.identity,
      the Public Suffix List) when it differs. More than one DMARC record at the name used
      -> none (step 5). An invalid record -> none. A temporary failure of a lookup that
      could decide -> temperror (never asked further: the org record must not stand in for
      a From-domain record we could not see). A record found at the organisational domain
      for a subdomain author applies sp (its "subdomain" policy), else p. Only the first
      MAX_RECORDS TXT strings at a name are looked at.
    * Alignment (3.1): DKIM: a pass whose d= aligns with the author domain under adkim;
      SPF: a pass of the MAIL FROM identity whose domain aligns under aspf. Relaxed: the same
      organisational domain (ingress.policy.identity.aligned: a public suffix is nobody's
      organisation, so From: co.uk never aligns with d=evil.co.uk); strict: the same
      canonical name. The HELO identity is never used (3.1.2: "the RFC5321.HELO identity is
      not used in the context of DMARC"): for the null sender SPF checked the HELO name, so
      only DKIM can align. (Section 4.1 points at RFC 7208 2.4, which names the null
      sender's MAIL FROM identity postmaster@<HELO>; we follow 3.1.2, the stricter reading:
      a HELO name is whatever the client says.)
    * Result: pass when either identifier aligns with a pass; fail otherwise (a temperror of
      DKIM or SPF is not a pass: fail, as OpenDMARC does; the dkim= and spf= results beside
      it say why). pct does not change the result: it only scales an enforcing receiver's
      disposition, and we enforce nothing.

Why not a library (issue 18 asked for one where it fits): authheaders 0.16.3 does its own DNS
(no deadline or cache of ours, a timeout escapes, SERVFAIL reads as "no record") and its own
PSL (publicsuffix2, read from a file per call); dmarc 1.2.1's relaxed alignment is by suffix
(From: co.uk aligns with d=evil.co.uk) and its parser drops a record for one bad pct=. The
details: workers.lane.dmarc_lookup.

Failure modes: none raised; anything malformed is a result (none/permerror) or an ignored tag.
Limits: parse_record looks at MAX_RECORD characters; discover asks at most two names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from ingress.core.addr import normalize_domain
from ingress.core.wire import AuthResult
from ingress.policy.identity import aligned, org_domain

__all__ = [
    "MAX_RECORD",
    "MAX_RECORDS",
    "Discovery",
    "Disposition",
    "DmarcRecord",
    "DmarcVerdict",
    "Lookup",
    "Policy",
    "author_domain",
    "discover",
    "evaluate",
    "identifier_aligned",
    "is_dmarc",
    "parse_record",
]

MAX_RECORD = 4096     # characters of one DMARC record; a longer one is ignored (real ones: < 300)
MAX_RECORDS = 16      # TXT records looked at per name (more: the rest are not read)

Lookup = Callable[[str], "tuple[str, ...] | None"]


class Disposition(StrEnum):
    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: Disposition
    sp: Disposition
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True, slots=True)
class Policy:
    domain: str            # the name whose _dmarc record was used
    record: DmarcRecord
    subdomain: bool        # the organisational domain's record for a subdomain author: sp

    @property
    def applied(self) -> Disposition:
        return self.record.sp if self.subdomain else self.record.p


@dataclass(frozen=True, slots=True)
class Discovery:
    policy: Policy | None
    result: AuthResult | None = None     # none | temperror when there is no policy
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcVerdict:
    result: AuthResult
    author: str = ""                     # canonical From domain ("" when there is none)
    policy: Policy | None = None
    reason: str = ""                     # a short note for the A-R comment and logs

    @property
    def applied(self) -> str:
        return str(self.policy.applied) if self.policy else ""

    @property
    def comment(self) -> str:
        if self.policy is None:
            return self.reason
        return f"p={self.policy.record.p} sp={self.policy.record.sp}"


# --------------------------------------------------------------------------- the author


def author_domain(from_fields: int, domains: Sequence[str]) -> tuple[str, AuthResult | None]:
    if from_fields == 0:
        return "", AuthResult.NONE
    if from_fields > 1:
        return "", AuthResult.PERMERROR
    canon = {normalize_domain(d) for d in domains}
    if len(canon) > 1:
        return "", AuthResult.PERMERROR
    only = next(iter(canon), "")
    return (only, None) if only else ("", AuthResult.NONE)


# --------------------------------------------------------------------------- the record

_VERSION = re.compile(r"^[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(;|$)")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s,!]+(![0-9]+[kmgtKMGT]?)?$")
_PCT = re.compile(r"^[0-9]{1,3}$")
_DISPOSITIONS = {d.value: d for d in Disposition}


def is_dmarc(txt: str) -> bool:
    return _VERSION.match(txt) is not None


def _tags(txt: str) -> dict[str, str]:
    """tag -> value, the first of each, names lower case; parts without "=" ignored."""
    out: dict[str, str] = {}
    for part in txt.split(";")[1:]:
        name, eq, value = part.partition("=")
        name = name.strip(" \t").lower()
        if eq and name and name not in out:
            out[name] = value.strip(" \t")
    return out


def parse_record(txt: str) -> DmarcRecord | None:
    if len(txt) > MAX_RECORD or not is_dmarc(txt):
        return None
    tags = _tags(txt)
    p = _DISPOSITIONS.get(tags.get("p", "").lower())
    sp_text = tags.get("sp")
    sp = _DISPOSITIONS.get(sp_text.lower()) if sp_text is not None else p
    if p is None or sp is None:
        if not any(_URI.match(u.strip(" \t")) for u in tags.get("rua", "").split(",")):
            return None
        p = sp = Disposition.NONE           # 6.6.3 step 6: act as if p=none
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if _PCT.match(pct_text) else 100
    return DmarcRecord(p=p, sp=sp, adkim=adkim if adkim in ("r", "s") else "r",
                       aspf=aspf if aspf in ("r", "s") else "r",
                       pct=pct if 0 <= pct <= 100 else 100)


# --------------------------------------------------------------------------- discovery


def _records_at(domain: str, lookup: Lookup) -> tuple[str, ...] | None:
    """The DMARC records at _dmarc.<domain> (TXT records not starting with v=DMARC1 dropped);
    None for a temporary failure."""
    answer = lookup(f"_dmarc.{domain}")
    if answer is None:
        return None
    return tuple(t for t in answer[:MAX_RECORDS] if is_dmarc(t))


def discover(author: str, lookup: Lookup) -> Discovery:
    found = _records_at(author, lookup)
    if found is None:
        return Discovery(None, AuthResult.TEMPERROR, f"_dmarc.{author} did not answer")
    where, subdomain = author, False
    org = org_domain(author)
    if not found and org and org != author:
        found = _records_at(org, lookup)
        if found is None:
            return Discovery(None, AuthResult.TEMPERROR, f"_dmarc.{org} did not answer")
        where, subdomain = org, True
    if not found:
        return Discovery(None, AuthResult.NONE, "no record")
    if len(found) > 1:
        return Discovery(None, AuthResult.NONE, "several records")
    record = parse_record(found[0])
    if record is None:
        return Discovery(None, AuthResult.NONE, "invalid record")
    return Discovery(Policy(where, record, subdomain))


# --------------------------------------------------------------------------- the result


def identifier_aligned(author: str, identifier: str, mode: str) -> bool:
    if mode == "s":
        a = normalize_domain(author)
        return bool(a) and a == normalize_domain(identifier)
    return aligned(identifier, author)


def evaluate(author: str, discovery: Discovery, *, spf: str | None, spf_domain: str,
             dkim: Iterable[tuple[str, str]]) -> DmarcVerdict:
    policy = discovery.policy
    if policy is None:
        return DmarcVerdict(discovery.result or AuthResult.NONE, author, None, discovery.reason)
    rec = policy.record
    if any(result == AuthResult.PASS and identifier_aligned(author, d, rec.adkim)
           for d, result in dkim):
        return DmarcVerdict(AuthResult.PASS, author, policy, "dkim")
    if spf == AuthResult.PASS and spf_domain and identifier_aligned(author, spf_domain, rec.aspf):
        return DmarcVerdict(AuthResult.PASS, author, policy, "spf")
    return DmarcVerdict(AuthResult.FAIL, author, policy, "")
