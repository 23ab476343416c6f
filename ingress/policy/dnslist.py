"""DNS lists (pure): query names, what an answer means, scores, zone health, and the judgements of
the DNS allow list (dnswl) and the DNS block lists (dnsbl).

Purpose
    The I/O shells (ingress.edge.checks.dnswl and .dnsbl, through ingress.edge.checks._dnslist)
    ask the DNS; this module decides what the answers mean, so every rule below has a table
    test (tests/unit/test_dnslist.py). The site syntax `zone[=filter][*weight]` is
    ingress.core.dnslist_sites' (config.load validates with it; re-exported here).

Rules
    * Query names (RFC 5782 2.1, 2.4): an IPv4 client 192.0.2.1 is 1.2.0.192.<zone>; an IPv6
      client is its 32 nibbles, least significant first; an IPv4-mapped IPv6 address is asked
      as IPv4.
    * Error codes are never listings (RFC 5782 2.1 and 5): an answer in 127.255.255.0/24, or
      any answer outside 127.0.0.0/8 (or not an IPv4 address), says the zone is broken or is
      refusing us. A zone that answers one is switched off (ZoneHealth), for every client.
    * A site matches when the zone listed the client with an answer its filter admits (no
      filter: any answer that is not an error code). A client's score is the sum of the weights
      of the matching sites (postscreen: a zone named twice with two filters can count twice).
    * Health (RFC 5782 5): the test point 127.0.0.2 must be listed and 127.0.0.1 must not be.
      A zone failing that (or answering an error code) is off: not asked, not counted, logged
      once; it is checked again every `interval` seconds and comes back when it passes. A test
      whose queries timed out or failed changes nothing (asked again at the next interval).
    * Display: a zone is shown by its public name (reply_map: a zone with an access key in its
      name must not leak it in replies, logs or Authentication-Results).
    * Trust (dnswl): the last octet of a DNSWL.org-style answer 127.0.x.y is its trust level y
      (0 none, 1 low, 2 medium, 3 high); `trust_levels` names the levels by that octet (an
      octet beyond it is no level: e.g. DNSWL.org's 127.0.0.255 "over the query limit") and a
      listing counts when its level is at least `min_trust`.
    * dnsbl judgement: score >= reject_threshold: REFUSE with 554 5.7.1 naming the public
      zones; score >= threshold: SHAPE with the score; else neutral. Facts dnsbl_score and
      dnsbl_zones (public names). A timed-out or failed zone is neutral for that client
      ("dnsbl:<zone>:timeout"); its reason is kept, the other zones still count.
    * dnswl judgement: the summed weight of matching sites (with a trust level >= min_trust)
      >= threshold: PROMOTE to dnswl:<public zone> (ingress.policy.tiers.dnswl_identity) of the
      heaviest matching zone; facts dnswl, dnswl_ip, dnswl_txt (RFC 8904's dns.zone,
      policy.ip, policy.txt for Authentication-Results).
    * TTLs: a cached answer lives clamp(ttl, min_ttl, max_ttl) seconds (a zone's TTL of 0 or
      of a week is the zone owner's choice, not ours).

API
    query_name(ip, zone) -> str                       ValueError for a non-address
    is_error_code(address) -> bool
    ZoneResult(zone, state, records=(), txt="")     state: listed | clean | error_code | temp
    zone_result(zone, status, records) -> ZoneResult  from a DNS answer's status and records
    matching(sites, results, trust_levels=(), min_trust=0) -> (score, [(site, record)])
    ZoneHealth(interval)  .usable(zone, now), .due(zone, now), .begin(zone, now),
                          .tested(zone, listed2, listed1, now) -> change | None,
                          .error_code(zone, now) -> change | None     change: "off:<why>"|"on"
    health_of(status2, records2, status1, records1) -> (ok: bool | None, why)
    trust_of(address, levels) -> int | None
    dnsbl_judgement(results, sites, threshold, reject_threshold, names) -> Judgement
    dnswl_judgement(results, sites, threshold, names, levels, min_trust) -> Judgement
    public(zone, names) -> str;  clamp_ttl(ttl, lo, hi) -> float
    DNSWL_TRUST_LEVELS    ("none", "low", "medium", "high"): DNSWL.org's y of 127.0.x.y

Failure modes: none raised but by query_name (ValueError). Limits: ZoneHealth holds one entry
per configured zone (the caller's zones only).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from ingress.core.dnslist_sites import Filter, Site, parse_filter, parse_reply_map, parse_site
from ingress.policy.checks import Judgement
from ingress.policy.shaping import listed
from ingress.policy.tiers import dnswl_identity

__all__ = ["DNSWL_TRUST_LEVELS", "Filter", "Site", "State", "ZoneHealth", "ZoneResult",
           "clamp_ttl", "dnsbl_judgement", "dnswl_judgement", "health_of", "is_error_code",
           "matching", "parse_filter", "parse_reply_map", "parse_site", "public", "query_name",
           "trust_of", "zone_result"]

DNSWL_TRUST_LEVELS = ("none", "low", "medium", "high")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_ERRORS = ipaddress.ip_network("127.255.255.0/24")


def query_name(ip: str, zone: str) -> str:
    """The name to ask `zone` about `ip` (RFC 5782 2.1 IPv4, 2.4 IPv6 nibbles)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split("."))) + "." + zone
    return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + zone


def is_error_code(address: str) -> bool:
    """An answer that is never a listing: 127.255.255.0/24, outside 127/8, or not IPv4."""
    try:
        a = ipaddress.IPv4Address(address)
    except ValueError:
        return True
    return a not in _LOOPBACK or a in _ERRORS


class State(StrEnum):
    LISTED = "listed"
    CLEAN = "clean"             # NXDOMAIN or no address: not listed
    ERROR_CODE = "error_code"   # an RFC 5782 error code (or garbage): the zone is broken
    TEMP = "temp"               # timeout, SERVFAIL, busy, zone switched off: nobody's evidence


@dataclass(frozen=True, slots=True)
class ZoneResult:
    zone: str
    state: State
    records: tuple[str, ...] = ()      # LISTED: the answers (error codes removed)
    txt: str = ""                      # LISTED (dnswl): the zone's TXT for the client
    why: str = ""                      # TEMP: timeout | error | busy | off


def zone_result(zone: str, status: str, records: Sequence[str] = ()) -> ZoneResult:
    """A DNS answer (ingress.core.dns_client Status values) as a ZoneResult. Any error code in
    the answer makes it ERROR_CODE: a zone that mixes one into a listing is not trusted."""
    if status == "ok" and records:
        if any(is_error_code(r) for r in records):
            return ZoneResult(zone, State.ERROR_CODE, tuple(records))
        return ZoneResult(zone, State.LISTED, tuple(records))
    if status in ("ok", "nxdomain", "nodata"):
        return ZoneResult(zone, State.CLEAN)
    return ZoneResult(zone, State.TEMP, why=status)


def trust_of(address: str, levels: Sequence[str]) -> int | None:
    """The trust level (index into `levels`) of a DNSWL.org-style answer 127.0.x.y: y, when y
    names a level; None otherwise (and for anything that is not an IPv4 address)."""
    try:
        y = int(ipaddress.IPv4Address(address)) & 0xFF
    except ValueError:
        return None
    return y if y < len(levels) else None


Hits = list[tuple[Site, str]]


def matching(sites: Iterable[Site], results: Mapping[str, ZoneResult],
             levels: Sequence[str] = (), min_trust: int = 0) -> tuple[float, Hits]:
    """(score, [(site, the answer it matched)]) over the LISTED results. With `levels`, an
    answer counts only when its trust level (trust_of) is at least min_trust."""
    score = 0.0
    hits: Hits = []
    for site in sites:
        r = results.get(site.zone)
        if r is None or r.state is not State.LISTED:
            continue
        for rec in r.records:
            if site.filter is not None and not site.filter.matches(rec):
                continue
            if levels and ((t := trust_of(rec, levels)) is None or t < min_trust):
                continue
            score += site.weight
            hits.append((site, rec))
            break
    return score, hits


def public(zone: str, names: Mapping[str, str]) -> str:
    return names.get(zone, zone)


def clamp_ttl(ttl: float, lo: float, hi: float) -> float:
    return min(max(float(ttl), lo), hi)


# --- health (RFC 5782 section 5) ---------------------------------------------------------------

def health_of(status2: str, records2: Sequence[str], status1: str,
              records1: Sequence[str]) -> tuple[bool | None, str]:
    """The test points' answers -> (True: healthy, False: broken, None: unknown), why.
    127.0.0.2 must be listed (no error code), 127.0.0.1 must not be."""
    r2, r1 = zone_result("", status2, records2), zone_result("", status1, records1)
    if State.ERROR_CODE in (r2.state, r1.state):
        return False, "error_code"
    if r1.state is State.LISTED:
        return False, "lists_127.0.0.1"
    if r2.state is State.CLEAN:
        return False, "does_not_list_127.0.0.2"
    if State.TEMP in (r1.state, r2.state):
        return None, "no_answer"
    return True, "ok"


@dataclass(slots=True)
class _Zone:
    up: bool = True
    next_check: float = 0.0     # when the test points are asked next (0: at first use)
    checking: bool = False


class ZoneHealth:
    """Each zone's health: on until a test fails or an error code is answered; then off (not
    asked) and tested again every `interval` seconds. The caller logs each change it returns."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._zones: dict[str, _Zone] = {}

    def _z(self, zone: str) -> _Zone:
        z = self._zones.get(zone)
        if z is None:
            z = self._zones[zone] = _Zone()
        return z

    def usable(self, zone: str) -> bool:
        return self._z(zone).up

    def due(self, zone: str, now: float) -> bool:
        """Is a test of the zone due (and none under way)?"""
        z = self._z(zone)
        return not z.checking and now >= z.next_check

    def begin(self, zone: str, now: float) -> None:
        z = self._z(zone)
        z.checking, z.next_check = True, now + self.interval

    def tested(self, zone: str, ok: bool | None, why: str, now: float) -> str | None:
        """A test's outcome (health_of); the change ("off:<why>" or "on") or None."""
        z = self._z(zone)
        z.checking, z.next_check = False, now + self.interval
        if ok is None or ok == z.up:
            return None
        z.up = ok
        return "on" if ok else f"off:{why}"

    def error_code(self, zone: str, now: float) -> str | None:
        """A real query answered an error code: the zone goes off (tested again later)."""
        z = self._z(zone)
        if not z.up:
            return None
        z.up, z.next_check = False, now + self.interval
        return "off:error_code"


# --- judgements ----------------------------------------------------------------------------------

def _temp_reasons(check: str, results: Iterable[ZoneResult], names: Mapping[str, str]) -> list[str]:
    return [f"{check}:{public(r.zone, names)}:{r.why or 'error'}" for r in results
            if r.state is State.TEMP and r.why != "off"]


def dnsbl_judgement(results: Mapping[str, ZoneResult], sites: Sequence[Site], threshold: float,
                    reject_threshold: float, names: Mapping[str, str]) -> Judgement:
    """The block lists' judgement of one client (module docstring: shape or refuse bulk)."""
    score, hits = matching(sites, results)
    zones = list(dict.fromkeys(public(site.zone, names) for site, _ in hits))
    temp = _temp_reasons("dnsbl", results.values(), names)
    if not listed(score, threshold):       # the one "listed" rule (policy.shaping)
        return Judgement.neutral("dnsbl", temp[0] if temp else "")
    facts = (("dnsbl_score", f"{score:g}"), ("dnsbl_zones", ",".join(zones)))
    if reject_threshold > 0 and score >= reject_threshold:
        reply = (f"554 5.7.1 Service unavailable; client listed by {', '.join(zones)}"
                 )[:400]
        return Judgement.refuse("dnsbl", reply, f"dnsbl:reject:{score:g}", facts)
    return Judgement.shape("dnsbl", score, f"dnsbl:{score:g}", facts)


def dnswl_judgement(results: Mapping[str, ZoneResult], sites: Sequence[Site], threshold: float,
                    names: Mapping[str, str], levels: Sequence[str] = DNSWL_TRUST_LEVELS,
                    min_trust: int = 1) -> Judgement:
    """The allow lists' judgement of one client (module docstring: promote or neutral)."""
    score, hits = matching(sites, results, levels, min_trust)
    temp = _temp_reasons("dnswl", results.values(), names)
    if not hits or score < threshold:
        return Judgement.neutral("dnswl", temp[0] if temp else "")
    best, answer = max(hits, key=lambda h: h[0].weight)     # max keeps the first of equals
    zone = public(best.zone, names)
    level = trust_of(answer, levels) if levels else None
    txt = results[best.zone].txt
    facts = (("dnswl", zone), ("dnswl_ip", answer)) + ((("dnswl_txt", txt),) if txt else ())
    reason = f"dnswl:{zone}" + (f":{levels[level]}" if level is not None else "")
    return Judgement.promote("dnswl", dnswl_identity(zone), reason, facts)
