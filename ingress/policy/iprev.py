"""FCrDNS (iprev, RFC 8601 section 2.7.3) and the provider identity of a verified name (pure).

Purpose
    A client's reverse name (PTR) is the client's own claim: whoever holds the reverse zone of
    an address can point it at any name. Confirming the name forward (its A or AAAA records
    contain the client's address) needs the *name's* zone too, so a confirmed ("verified")
    name proves that the name's owner stands behind the address. Its organisational domain
    is then a *provider identity* (Haraka's greylist "hostid"): big senders rotate large
    pools of addresses, and learned entries can cover such a pool (ingress.policy.
    learned_provider) instead of one address. The I/O shell is ingress.edge.checks.iprev.

API
    Iprev                  the results (RFC 8601 2.7.3): ingress.core.wire's AuthResult, of
                           which iprev uses pass | fail | temperror | permerror
    Outcome(result, name="", provider="")   frozen; .facts (wire evidence: iprev,
                           iprev_name, provider; empty ones left out)
    MAX_NAMES              default iprev.max_names: PTR names confirmed at most (3)
    MAX_NAMES_LIMIT        its upper bound (10)
    ptr_names(ptr, limit) -> tuple[str, ...]   the PTR answer's valid names (canonical, A-labels,
                           sorted, unique), the first `limit`
    forward_type(ip) -> "A" | "AAAA"           the forward lookup for the client's family
    iprev(ip, ptr, forwards) -> Outcome        RFC 8601's result from the PTR answer and the
                           forward answers of ptr_names (a mapping name -> Answer; a name
                           missing from it was not answered in time: temporary)
    generic_name(name, ip) -> bool             the name embeds the client's address
    provider_of(name, ip) -> str               the provider identity of a verified name, or ""
    judge(outcome, learned_domain) -> Judgement   PROMOTE to learned:<D> with reason
                           "provider:<P>" when the provider is learned for D; else NEUTRAL
                           with reason "iprev:<result>"

Rules
    * pass: one of the names (at most `limit`) has forward records containing the client's
      address. fail: every name's forward lookup completed and none does (NXDOMAIN and no
      data are completed lookups: RFC 8601 says so). temperror: the PTR lookup, or a forward
      lookup that could have confirmed, failed temporarily (timeout, SERVFAIL, over a bound).
      permerror: no PTR data (NXDOMAIN, no data) or none of the PTR names is a valid name.
    * Up to MAX_NAMES names: Postfix and Sendmail confirm one name (what gethostbyaddr gives,
      the first of the answer: the result then depends on the order a server returns); three,
      sorted, are checked so that the result does not, at one forward query each (the
      client's address family only). RFC 7208 4.6.4 bounds SPF's similar "ptr" walk at 10:
      the upper bound of the setting.
    * The verified name reported is the first confirmed name (sorted) that yields a provider,
      else the first confirmed name.
    * No provider (the per-IP key is kept) for: a generic name that embeds the address (see
      generic_name), a name whose organisational domain is not registrable (a public suffix,
      a single label), a name under in-addr.arpa or ip6.arpa.
    * generic_name, IPv4 a.b.c.d: the name's decimal numbers hold a, b, c, d in a row, in
      order or reversed (any separators or none, zero-padded or not: 192-0-2-1, 1.2.0.192,
      ip192_000_002_001); the 12-digit zero-padded form, the 32-bit decimal or the 8-digit hex
      form as one token (192000002001, 3221225985, c0000201); b, c, d (or d, c, b) in a row;
      or c, d in a row with a generic word (dyn, pool, dsl, cable, static, host, ...).
      IPv6: the 32 nibbles (either order, separators dropped: ip6.arpa-style names, nibble
      runs), the compressed text with ':' as '-', '.' or nothing (2001-db8--1), the eight
      groups or the last four (the interface id) as hex numbers in a row.
    * A provider is self-proven (ingress.policy.tiers): judge promotes only to the identity of
      the domain the provider was learned for (learned:<D>), which classify holds to that
      domain once the transaction names its sender (learned_vouches).

Failure modes: none raised; a client address that does not parse gives permerror and no
provider. Limits: names are cut to 253 characters by normalize_domain; O(labels) per test.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ingress.core.addr import normalize_domain, try_parse_ip
from ingress.core.dns_client import Answer, Status
from ingress.core.wire import AuthResult
from ingress.policy.checks import Judgement
from ingress.policy.identity import learned_identity, org_domain, registrable

__all__ = ["MAX_NAMES", "MAX_NAMES_LIMIT", "Iprev", "Outcome", "forward_type", "generic_name",
           "iprev", "judge", "provider_of", "ptr_names"]

MAX_NAMES = 3
MAX_NAMES_LIMIT = 10
CHECK = "iprev"


Iprev = AuthResult       # RFC 8601's vocabulary: iprev uses pass, fail, temperror, permerror


@dataclass(frozen=True, slots=True)
class Outcome:
    result: Iprev
    name: str = ""          # the verified name (pass only)
    provider: str = ""      # its provider identity ("" = none: keep the per-IP key)

    @property
    def facts(self) -> tuple[tuple[str, str], ...]:
        pairs = (("iprev", self.result.value), ("iprev_name", self.name),
                 ("provider", self.provider))
        return tuple((k, v) for k, v in pairs if v)


def ptr_names(ptr: Answer, limit: int = MAX_NAMES) -> tuple[str, ...]:
    names = {n for r in ptr.records if (n := normalize_domain(r)) and "." in n}
    return tuple(sorted(names))[:max(1, limit)]


def forward_type(ip: str) -> str:
    addr = try_parse_ip(ip)
    return "AAAA" if addr is not None and addr.version == 6 else "A"


def _confirms(answer: Answer | None, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return answer is not None and answer.found and any(
        try_parse_ip(r) == addr for r in answer.records)


def iprev(ip: str, ptr: Answer, forwards: Mapping[str, Answer],
          limit: int = MAX_NAMES) -> Outcome:
    addr = try_parse_ip(ip)
    if addr is None:
        return Outcome(Iprev.PERMERROR)
    if ptr.temporary:
        return Outcome(Iprev.TEMPERROR)
    names = ptr_names(ptr, limit) if ptr.status is Status.OK else ()
    if not names:
        return Outcome(Iprev.PERMERROR)
    confirmed = [n for n in names if _confirms(forwards.get(n), addr)]
    if confirmed:
        text = str(addr)
        named = next(((n, p) for n in confirmed if (p := provider_of(n, text))),
                     (confirmed[0], ""))
        return Outcome(Iprev.PASS, *named)
    if any(n not in forwards or forwards[n].temporary for n in names):
        return Outcome(Iprev.TEMPERROR)
    return Outcome(Iprev.FAIL)


# --------------------------------------------------------------------------- generic names

GENERIC_WORDS = frozenset({
    "dyn", "dynamic", "dynip", "pool", "dhcp", "dsl", "adsl", "vdsl", "xdsl", "cable", "ppp",
    "pppoe", "dial", "dialup", "client", "clients", "cust", "customer", "static", "broadband",
    "bb", "host", "ip", "cpe", "user", "users", "res", "resident", "residential", "home",
    "ftth", "fttx", "fiber", "fibre", "mobile", "wireless", "wifi", "nat", "unassigned",
    "unknown", "generic", "addr", "node", "rev", "reverse", "ptr",
})
_DECIMAL = re.compile(r"[0-9]+")
_HEX = re.compile(r"[0-9a-f]+")
_WORD = re.compile(r"[a-z]+")
_SEPARATORS = re.compile(r"[.\-_]")


def _run(tokens: list[int], seq: list[int]) -> bool:
    """`seq` appears in `tokens` in a row, in order or reversed."""
    n = len(seq)
    rev = seq[::-1]
    return any(tokens[i:i + n] in (seq, rev) for i in range(len(tokens) - n + 1))


def _generic_v4(name: str, addr: ipaddress.IPv4Address) -> bool:
    octets = list(addr.packed)
    digits = _DECIMAL.findall(name)
    numbers = [int(d) for d in digits if len(d) <= 3]
    whole = {str(int(addr)), "".join(f"{o:03d}" for o in octets)}
    if _run(numbers, octets) or _run(numbers, octets[1:]) or whole & set(digits):
        return True
    if f"{int(addr):08x}" in _HEX.findall(name):
        return True
    return _run(numbers, octets[2:]) and bool(GENERIC_WORDS & set(_WORD.findall(name)))


def _generic_v6(name: str, addr: ipaddress.IPv6Address) -> bool:
    nibbles = addr.exploded.replace(":", "")
    flat = _SEPARATORS.sub("", name)
    if nibbles in flat or nibbles[::-1] in flat:
        return True
    if any(addr.compressed.replace(":", s) in name for s in ("-", ".")) \
            and addr.compressed.count(":") >= 3:
        return True
    groups = [int(g, 16) for g in addr.exploded.split(":")]
    numbers = [int(h, 16) for h in _HEX.findall(name) if len(h) <= 4]
    return _run(numbers, groups) or _run(numbers, groups[4:])


def generic_name(name: str, ip: str) -> bool:
    """Does `name` embed the address `ip` (a pool's generic reverse name)? See the module
    docstring for the forms; True for an address that does not parse (no provider)."""
    addr = try_parse_ip(ip)
    lowered = name.lower()
    if addr is None:
        return True
    if isinstance(addr, ipaddress.IPv4Address):
        return _generic_v4(lowered, addr)
    return _generic_v6(lowered, addr)


def provider_of(name: str, ip: str) -> str:
    """The provider identity (an organisational domain) of the verified name `name` of the
    client `ip`, or "" when the name gives none (generic, not registrable, reverse zones)."""
    canonical = normalize_domain(name)
    if not canonical or canonical.endswith((".in-addr.arpa", ".ip6.arpa")) \
            or canonical in ("in-addr.arpa", "ip6.arpa"):
        return ""
    if not registrable(canonical) or generic_name(canonical, ip):
        return ""
    return org_domain(canonical)


def judge(outcome: Outcome, learned_domain: str = "") -> Judgement:
    """The check's judgement: iprev alone promotes nothing; a verified provider learned for
    `learned_domain` promotes to that domain's learned identity (self-proven)."""
    if outcome.result is Iprev.PASS and outcome.provider and learned_domain:
        return Judgement.promote(CHECK, learned_identity(learned_domain),
                                 f"provider:{outcome.provider}", outcome.facts)
    return Judgement.neutral(CHECK, f"iprev:{outcome.result.value}", outcome.facts)
