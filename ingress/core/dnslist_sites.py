"""The syntax of DNS list sites (postscreen's `zone[=filter][*weight]`) and of reply maps: parsed
and validated here, so that config.load refuses a bad entry naming its key.

Purpose
    [dnsbl] sites and [dnswl] sites (ingress.core.schema_evidence) name DNS list zones as
    Postfix's postscreen_dnsbl_sites does: `zone[=filter][*weight]`. The filter is Postfix's
    IPv4 address pattern (util/ip_match.c):

        v4pattern    = v4field "." v4field "." v4field "." v4field
        v4field      = v4octet | "[" v4sequence "]"
        v4sequence   = v4seq_member | v4sequence ";" v4seq_member
        v4seq_member = v4octet | v4octet ".." v4octet          (low <= high)
        v4octet      = a decimal number 0..255 (at most three digits)

    e.g. `127.0.0.2`, `127.0.0.[2..11]`, `127.0.[0;1].[4..6]`. A site without a filter
    matches any answer that is not an error code (ingress.policy.dnslist); without a weight it
    weighs 1. Stricter than postscreen: a filter must lie in 127.0.0.0/8 (an answer outside it
    is an RFC 5782 error code, never a listing), and a weight is a positive number (postscreen's
    negative weights are allow lists: here they have their own table, [dnswl]). A reply map
    entry is `listed-zone=public-name` (postscreen_dnsbl_reply_map): a zone queried with an
    access key in its name is shown by its public name in replies, logs and the trace.

    This is the syntax only; what an answer means (error codes, scores, health) is
    ingress.policy.dnslist's. It lives in ingress.core because config.load validates with it.

API
    Filter(fields)              four tuples of (low, high) ranges; .matches(address) -> bool
    Site(zone, filter, weight)  frozen; filter None: any answer that is not an error code
    parse_filter(text) -> Filter            ValueError naming what is wrong
    parse_site(text) -> Site                ValueError naming what is wrong
    parse_reply_map(entries) -> dict[str, str]   listed zone -> public name; ValueError
    check_zone(name) -> str                 the zone, lower case without the final dot;
                                            ValueError unless a plain host name that leaves
                                            room for an IPv6 query (MAX_ZONE characters)
    MAX_ZONE, MAX_WEIGHT

Failure modes: ValueError with a message for the operator (config.load names the key).
Limits: zone names of at most MAX_ZONE characters; weights at most MAX_WEIGHT.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

__all__ = ["MAX_WEIGHT", "MAX_ZONE", "Filter", "Site", "check_zone", "parse_filter",
           "parse_reply_map", "parse_site"]

# A query name is the reversed address and the zone: an IPv6 one has 32 nibbles and 32 dots
# (64 characters) in front, and a name is at most 253 characters.
MAX_ZONE = 253 - 64
MAX_WEIGHT = 1000.0

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_OCTET = re.compile(r"^[0-9]{1,3}$")
_WEIGHT = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Filter:
    """A postscreen answer filter: per octet, the (low, high) ranges it admits."""

    fields: tuple[Ranges, Ranges, Ranges, Ranges]
    text: str = ""

    def matches(self, address: str) -> bool:
        """Does the IPv4 address (dotted quad text) match? Anything else: False."""
        parts = address.split(".")
        if len(parts) != 4 or not all(_OCTET.match(p) for p in parts):
            return False
        return all(any(lo <= int(p) <= hi for lo, hi in f) for p, f in zip(parts, self.fields,
                                                                             strict=True))


@dataclass(frozen=True, slots=True)
class Site:
    """One `zone[=filter][*weight]` entry."""

    zone: str
    filter: Filter | None = None
    weight: float = 1.0

    @property
    def text(self) -> str:
        f = f"={self.filter.text}" if self.filter else ""
        return f"{self.zone}{f}*{self.weight:g}"


def _octet(text: str, where: str) -> int:
    if not _OCTET.match(text) or int(text) > 255:
        raise ValueError(f"{where}: {text!r} is not a number 0..255")
    return int(text)


def _field(text: str, where: str) -> Ranges:
    if not text.startswith("["):
        n = _octet(text, where)
        return ((n, n),)
    if not text.endswith("]") or len(text) < 3:
        raise ValueError(f"{where}: {text!r} needs a closing ']' around numbers and ranges")
    ranges: list[tuple[int, int]] = []
    for member in text[1:-1].split(";"):
        lo_text, dots, hi_text = member.partition("..")
        lo = _octet(lo_text, where)
        hi = _octet(hi_text, where) if dots else lo
        if hi < lo:
            raise ValueError(f"{where}: range {member!r} runs backwards")
        ranges.append((lo, hi))
    return tuple(ranges)


def _split_fields(text: str) -> list[str]:
    """The four '.'-separated fields; a '[...]' field may hold '..' (ranges), never a field
    separator."""
    out, depth, cur = [], 0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"filter {text!r}: '[' inside '[...]'")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"filter {text!r}: ']' without '['")
        if ch == "." and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    if depth:
        raise ValueError(f"filter {text!r}: missing ']'")
    out.append(cur)
    return out


def parse_filter(text: str) -> Filter:
    """Postfix's IPv4 address pattern (module docstring), restricted to 127.0.0.0/8."""
    fields = _split_fields(text)
    if len(fields) != 4:
        raise ValueError(f"filter {text!r}: want four fields (d.d.d.d, a field may be "
                         "[n;n..m])")
    where = f"filter {text!r}"
    parsed = (_field(fields[0], where), _field(fields[1], where), _field(fields[2], where),
              _field(fields[3], where))
    if parsed[0] != ((127, 127),):
        raise ValueError(f"filter {text!r}: a listing is an address in 127.0.0.0/8 (RFC 5782); "
                         "the filter must start with 127.")
    return Filter(parsed, text)


def check_zone(name: str) -> str:
    """A zone name: host name labels (letters, digits, '-', '_'), at least two of them."""
    zone = name.strip().lower().rstrip(".")
    labels = zone.split(".")
    if not zone or len(zone) > MAX_ZONE or len(labels) < 2 or \
            not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{name!r} is not a zone name (ASCII labels, at least two, at most "
                         f"{MAX_ZONE} characters)")
    try:                                # "127.0.0.2" looks like labels: it is not a zone
        ipaddress.ip_address(zone)
    except ValueError:
        return zone
    raise ValueError(f"{name!r} is an address, not a zone name")


def parse_site(text: str) -> Site:
    """`zone[=filter][*weight]` (module docstring)."""
    if not isinstance(text, str) or not text.strip() or any(c.isspace() for c in text.strip()):
        raise ValueError(f"{text!r} is not zone[=filter][*weight] (no spaces)")
    body, star, weight_text = text.strip().partition("*")
    weight = 1.0
    if star:
        if not _WEIGHT.match(weight_text):
            raise ValueError(f"{text!r}: the weight after '*' must be a positive number "
                             "(an allow list is a [dnswl] site, not a negative weight)")
        weight = float(weight_text)
        if not (0 < weight <= MAX_WEIGHT) or not math.isfinite(weight):
            raise ValueError(f"{text!r}: the weight must be in (0, {MAX_WEIGHT:g}]")
    zone_text, eq, filter_text = body.partition("=")
    zone = check_zone(zone_text)
    return Site(zone, parse_filter(filter_text) if eq else None, weight)


def parse_reply_map(entries: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`listed-zone=public-name` entries: the listed zone (as in the sites, e.g. with an access
    key) -> the name shown in replies, logs and the trace."""
    out: dict[str, str] = {}
    for entry in entries:
        listed, eq, public = str(entry).partition("=")
        if not eq:
            raise ValueError(f"{entry!r} is not listed-zone=public-name")
        zone = check_zone(listed)
        if zone in out:
            raise ValueError(f"{entry!r}: {zone} is mapped twice")
        out[zone] = check_zone(public)
    return out
