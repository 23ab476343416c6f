"""Address normalisation: the one parser of client IP addresses, the per-prefix key, the one
canonical form of a domain name.

Purpose
    Every place that turns a peer, PROXY-header or configured address into something to
    compare (allow lists, the learned cache, admission accounting, trusted proxies) uses
    these functions, so "::ffff:192.0.2.1", "192.0.2.1" and " 192.0.2.1%eth0" are one client.
    Every domain that becomes a key (the domain SPF is evaluated for, identities, domain
    rates, learned entries, deferral records, metrics labels, DKIM alignment, the listed SPF
    domains) goes through normalize_domain first, so that every spelling of one DNS name
    (a fullwidth "spam.test", one with the ideographic full stop U+3002, "SPAM.test.",
    one with a soft hyphen) is one key: the one name DNS resolves them all to. A spammer
    gets nothing from spelling his domain eight ways.

API
    parse_ip(value) -> IPv4Address | IPv6Address
        str or ipaddress object; surrounding whitespace, one pair of [brackets] and a zone
        index (%eth0) are dropped; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes IPv4.
    try_parse_ip(value) -> address | None       the same, None instead of ValueError
    normalize_ip(ip) -> str                     canonical text of parse_ip (cached)
    ip_key(ip, ipv6_prefix=64, ipv4_prefix=32) -> str   the IPv4 address (or its
                                                /ipv4_prefix network), or the IPv6 /ipv6_prefix
                                                network; a non-address is its own key
    net_key(ip, ipv6_prefix=64) -> str          a client *network*: IPv4 /NET_V4 (24), IPv6
                                                /ipv6_prefix (what SPF checks and deferral
                                                records are bounded per)
    site_key(ip, ipv6_prefix=64) -> str         a client *site*, the wider aggregate of its
                                                networks: IPv4 /24, IPv6 /SITE_V6 (48, or
                                                /ipv6_prefix when shorter) (learned entries and
                                                deferral records are bounded per site)
    normalize_domain(domain) -> str             the canonical name: UTS-46 mapping (IDNA 2008,
                                                the `idna` package: width and case folding, the
                                                ideographic and fullwidth full stops as dots,
                                                ignorable characters dropped), NFC, lower case,
                                                A-labels ("xn--..."), no trailing dot; "" for
                                                anything that is not a valid domain name
    split_address(address) -> (local, domain)   an envelope address (<> and blanks stripped) at
                                                its last "@"; domain as written

Rules of normalize_domain (IDNA 2008, RFC 5890-5893, UTS #46 non-transitional)
    Valid: labels of letters, digits and hyphens (no hyphen first or last, none in the 3rd and
    4th positions unless an A-label that decodes), or U-labels IDNA 2008 permits (bidi and
    joiner rules included); at most 63 octets a label and 253 for the name in A-label form.
    Invalid (""): empty, ".", an empty label ("a..b"), an address literal ("[192.0.2.1]"),
    "_", "*", spaces, emoji, an A-label that does not decode to a valid U-label, and input
    over MAX_DOMAIN_INPUT characters. "" is never a key: callers treat it as "no domain"
    (SPF is then not evaluated, RFC 7208 4.3: none; nothing promotes, nothing is learned).
    "ß.test" and "ss.test" stay distinct (IDNA 2008: distinct DNS names, two domains to own).

Failure modes
    parse_ip / normalize_ip raise ValueError for anything that is not an IP address;
    try_parse_ip, ip_key and normalize_domain never raise.

Limits
    normalize_ip and ip_key are lru-cached (65,536 entries each): a flood repeats addresses.
    normalize_domain is lru-cached for names up to 255 characters (DOMAIN_CACHE entries: at
    most ~4 MB even of 4-byte characters); a longer input (up to MAX_DOMAIN_INPUT) is worked
    out each time (~0.1 ms), a still longer one is "" at once. Cost uncached: ~4 us for an
    ASCII name, ~15 us for an IDN.
"""

from __future__ import annotations

import functools
import ipaddress
import unicodedata
from typing import Any

import idna

__all__ = ["DOMAIN_CACHE", "MAX_DOMAIN_INPUT", "NET_V4", "SITE_V6", "Address", "ip_key",
           "net_key", "normalize_domain", "normalize_ip", "parse_ip", "site_key",
           "split_address", "try_parse_ip"]

NET_V4 = 24                # an IPv4 client network, and site
SITE_V6 = 48               # an IPv6 site: the aggregate of its networks

MAX_DOMAIN_INPUT = 1024    # characters: beyond it not a domain name (idna's own input limit)
DOMAIN_CACHE = 4096        # canonical names cached (inputs of up to _CACHED_INPUT characters)
_CACHED_INPUT = 255

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(value: Any) -> Address:
    """The address in `value` (see module docstring). Raises ValueError if there is none."""
    if isinstance(value, ipaddress.IPv4Address):
        return value
    if isinstance(value, ipaddress.IPv6Address):
        addr: Address = value
        if value.scope_id is not None:
            addr = ipaddress.IPv6Address(value.packed)
    else:
        text = str(value).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        addr = ipaddress.ip_address(text.split("%", 1)[0].strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def try_parse_ip(value: Any) -> Address | None:
    try:
        return parse_ip(value)
    except ValueError:
        return None


@functools.lru_cache(maxsize=65536)
def normalize_ip(ip: str) -> str:
    """Canonical text form of an IP address; IPv4-mapped IPv6 becomes plain IPv4.

    Raises ValueError for something that is not an IP address. A zone index (%eth0) is dropped.
    """
    return str(parse_ip(ip))


@functools.lru_cache(maxsize=65536)
def ip_key(ip: str, ipv6_prefix: int = 64, ipv4_prefix: int = 32) -> str:
    """Accounting key: IPv4 address (IPv4-mapped IPv6 counts as IPv4), or its /ipv4_prefix
    network when that is shorter than 32, or the IPv6 /ipv6_prefix network."""
    addr = try_parse_ip(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    if ipv4_prefix < 32:
        return str(ipaddress.IPv4Network((addr, ipv4_prefix), strict=False))
    return str(addr)


def net_key(ip: str, ipv6_prefix: int = 64) -> str:
    return ip_key(ip, ipv6_prefix, NET_V4)


def site_key(ip: str, ipv6_prefix: int = 64) -> str:
    return ip_key(ip, min(SITE_V6, ipv6_prefix), NET_V4)


def normalize_domain(domain: str) -> str:
    """The canonical name of `domain` (A-labels, lower case, no trailing dot), or "" when it
    is not a valid domain name (see the module docstring)."""
    if not domain or len(domain) > MAX_DOMAIN_INPUT:
        return ""
    if len(domain) <= _CACHED_INPUT:
        return _canonical_cached(domain)
    return _canonical(domain)


def _canonical(domain: str) -> str:
    d = unicodedata.normalize("NFC", domain.strip())
    try:
        a = idna.encode(d, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return ""
    a = a[:-1] if a.endswith(".") else a      # the root: "a.test." is "a.test" ("." is "")
    return a if a and len(a) <= 253 else ""


_canonical_cached = functools.lru_cache(maxsize=DOMAIN_CACHE)(_canonical)


def split_address(address: str) -> tuple[str, str]:
    """("local", "domain as written") of an envelope address; ("", "") for the null sender;
    (address, "") without an "@"."""
    a = address.strip().strip("<>").strip()
    local, at, domain = a.rpartition("@")
    return (local, domain) if at else (a, "")
