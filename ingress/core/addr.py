"""Address normalisation: the one parser of client IP addresses, the per-prefix key, domains.

Purpose
    Every place that turns a peer, PROXY-header or configured address into something to
    compare (allow lists, the learned cache, admission accounting, trusted proxies) uses
    these functions, so "::ffff:192.0.2.1", "192.0.2.1" and " 192.0.2.1%eth0" are one client.

API
    parse_ip(value) -> IPv4Address | IPv6Address
        str or ipaddress object; surrounding whitespace, one pair of [brackets] and a zone
        index (%eth0) are dropped; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes IPv4.
    try_parse_ip(value) -> address | None       the same, None instead of ValueError
    normalize_ip(ip) -> str                     canonical text of parse_ip (cached)
    ip_key(ip, ipv6_prefix=64) -> str           IPv4 address, or the IPv6 /prefix network;
                                                a non-address is its own key
    normalize_domain(domain) -> str             lower-case, stripped, one trailing dot removed

Failure modes
    parse_ip / normalize_ip raise ValueError for anything that is not an IP address;
    try_parse_ip and ip_key never raise.

Limits
    normalize_ip and ip_key are lru-cached (65,536 entries each): a flood repeats addresses.
    No IDNA handling in normalize_domain (it compares what it is given).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

__all__ = ["Address", "ip_key", "normalize_domain", "normalize_ip", "parse_ip", "try_parse_ip"]

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
def ip_key(ip: str, ipv6_prefix: int = 64) -> str:
    """Accounting key: IPv4 address (IPv4-mapped IPv6 counts as IPv4) or IPv6 /prefix network."""
    addr = try_parse_ip(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


def normalize_domain(domain: str) -> str:
    """Lower-case, strip surrounding whitespace and one trailing dot."""
    d = domain.strip().lower()
    return d[:-1] if d.endswith(".") else d
