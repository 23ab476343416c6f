"""The configuration tables of the evidence checks (ingress.edge.checks, and DMARC in the
workers): one table per check, and [checks] for what they share (the connect-stage deadline,
the DNS client's bounds).

API
    ChecksConfig       [checks]
    DmarcConfig        [dmarc]: DMARC (RFC 7489) results in the workers' Authentication-Results
    DnswlConfig        [dnswl]: DNS allow lists (promotion to the third-party tier at connect)
    DnsblConfig        [dnsbl]: DNS block lists (a bulk suspicion score; refusal above a second)
    IprevConfig        [iprev] (FCrDNS: ingress.edge.checks.iprev)
    (each check's own table is declared here beside it; Config holds them: ingress.core.schema)

Failure modes: none here (fieldspec.check_fields applies the rules; config.load raises).
Limits: none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ingress.core.fieldspec import bounded, documented


@dataclass(frozen=True)
class ChecksConfig:
    """What the evidence checks share: how long a banner may wait for them, and the bounds of
    their DNS client (ingress.core.dns_client; its nameservers and query timeout are
    classify.nameservers and classify.dns_timeout)."""
    connect_deadline: float = bounded(1.5, 0, 30, "seconds the banner of a bulk connection may "
                                      "wait for the connect checks that hold it (DNS lists); "
                                      "then it is sent and they count as timed out",
                                      gt=True)
    dns_per_key: int = bounded(8, 1, 65536, "DNS queries of the checks under way at once for "
                               "one key (a list zone, a client network), per acceptor; beyond: "
                               "busy (neutral) at once")
    dns_backlog: int = bounded(256, 1, 65536, "... in all, per acceptor (each may hold a DNS "
                               "socket: that many descriptors are kept from the slots)")
    dns_timeout_ttl: float = bounded(30.0, 0, 3600, "seconds a name whose query timed out "
                                     "answers timeout at once", note="0 = never")


@dataclass(frozen=True)
class DmarcConfig:
    """DMARC (RFC 7489) in the workers, from our own SPF and DKIM results: reported only
    (dmarc= in Authentication-Results), never enforced."""
    enabled: bool = documented(True, "look the From: domain's _dmarc policy up (1-2 TXT queries "
                               "through classify.nameservers, within classify.dkim_dns_budget) "
                               "and report dmarc=; nothing is refused for it. Only where DNS is "
                               "configured (classify.nameservers named, or SPF on)")
    timeout_ttl: float = bounded(60.0, 0, 300, "seconds a policy domain that did not answer is "
                                 "not asked again (dmarc=temperror at once)", note="0 = off")


def _shared_list_keys() -> dict[str, Any]:
    """The keys both DNS list tables have (ingress.edge.checks._dnslist): the display names,
    the zones' health tests and the answer cache; each table declares them (after its own)."""
    return {
        "reply_map": documented((), '"listed-zone=public-name" entries: a zone queried with an '
                                "access key in its name is shown by its public name in "
                                "replies, logs and Authentication-Results "
                                "(postscreen_dnsbl_reply_map)"),
        "health_interval": bounded(300.0, 10, 86400, "seconds between a zone's RFC 5782 health "
                                   "tests (127.0.0.2 listed, 127.0.0.1 not); a zone failing "
                                   "one, or answering an error code (127.255.255.0/24, outside "
                                   "127/8), is switched off until a test passes"),
        "cache_entries": bounded(20000, 1, 1000000, "answers cached per acceptor (one per zone "
                                 "and client address; about 1 KiB each at most)"),
        "min_ttl": bounded(60.0, 0, 86400, "seconds an answer is cached at least (a zone's TTL "
                           "below it is raised; NXDOMAIN included)"),
        "max_ttl": bounded(3600.0, 1, 604800, "seconds an answer is cached at most (a zone's "
                           "TTL above it is cut); >= min_ttl"),
    }


_LIST = _shared_list_keys


@dataclass(frozen=True)
class DnswlConfig:
    """DNS allow lists (RFC 8904's dnswl): a listed client is promoted at connect, before it
    says a word, to the third-party tier with the identity dnswl:<zone>."""
    sites: tuple[str, ...] = documented((), '"zone=filter*weight" entries (postscreen syntax; '
                                        'e.g. "list.dnswl.org=127.0.[2..15].[0..3]"); '
                                        "empty = off")
    threshold: float = bounded(1.0, 0, 1000, "summed weight of the matching sites at which a "
                               "client is promoted", gt=True)
    trust_levels: tuple[str, ...] = documented(("none", "low", "medium", "high"),
                                               "names of the trust levels by the last octet "
                                               "of an answer (DNSWL.org: 127.0.x.y, y = 0..3); "
                                               "an answer whose last octet has no name here is "
                                               "no listing (e.g. 127.0.0.255); empty = no "
                                               "levels (the filters alone decide)")
    min_trust: str = documented("low", "the lowest trust level that promotes (one of "
                                "trust_levels; DNSWL.org's none means \"only avoid outright "
                                "blocking\")")
    reply_map: tuple[str, ...] = _LIST()["reply_map"]
    health_interval: float = _LIST()["health_interval"]
    cache_entries: int = _LIST()["cache_entries"]
    min_ttl: float = _LIST()["min_ttl"]
    max_ttl: float = _LIST()["max_ttl"]
    steer: bool = documented(True, "Linux, with fast acceptors and listen.steer_operator: a "
                             "listed client's next connections are steered by the kernel to a "
                             "fast acceptor's socket, as the allow list's networks are, so "
                             "they never wait in port 25's accept queue behind a flood "
                             "(ingress.core.steer_table)")
    steer_ttl: float = bounded(600.0, 1, 86400, "seconds an address stays steered after its "
                               "listing was last seen")
    steer_max: int = bounded(64, 1, 1000, "addresses steered per acceptor (the kernel's "
                             "program holds at most 250 per address family, the allow list's "
                             "networks first)")


@dataclass(frozen=True)
class DnsblConfig:
    """DNS block lists (postscreen_dnsbl_sites): a score that only shapes bulk (ingress.policy.
    shaping: a listed client is evicted first, gets no retry bypass and is held to
    listed_per_ip_max bulk sessions per IP), and a refusal (554 5.7.1 at the banner) above
    reject_threshold."""
    sites: tuple[str, ...] = documented((), '"zone=filter*weight" entries (postscreen syntax; '
                                        'e.g. "zen.spamhaus.org=127.0.0.[2..11]*2"; weights '
                                        "positive); empty = off")
    threshold: float = bounded(1.0, 0, 10000, "score (summed weights of matching sites) at "
                               "which a client is listed: its bulk seat is shaped", gt=True)
    reject_threshold: float = bounded(0.0, 0, 10000, "score at which a bulk client is refused at "
                                      "the banner (554 5.7.1 naming the zones); >= threshold",
                                      note="0 = never")
    listed_per_ip_max: int = bounded(1, 0, 65536, "concurrent bulk sessions per IPv4 address / "
                                     "IPv6 /admission.ipv6_prefix of a listed client (below "
                                     "admission.per_ip_bulk_max: one is enough for a real MTA "
                                     "listed by mistake to deliver its queue in turn; a bot "
                                     "loses its parallelism); a verdict over it closes the "
                                     "newest listed session (421, the per-IP line)",
                                     note="0 = admission.per_ip_bulk_max alone")
    listed_ttl: float = bounded(300.0, 0, 86400, "seconds an IP key is remembered listed, so "
                                "that its connections over listed_per_ip_max are refused at "
                                "admission without waiting for DNS (at most 65536 "
                                "keys per acceptor, as many as admission's rate buckets)",
                                note="0 = not remembered: only verdicts close")
    reply_map: tuple[str, ...] = _LIST()["reply_map"]
    health_interval: float = _LIST()["health_interval"]
    cache_entries: int = _LIST()["cache_entries"]
    min_ttl: float = _LIST()["min_ttl"]
    max_ttl: float = _LIST()["max_ttl"]


@dataclass(frozen=True)
class IprevConfig:
    """FCrDNS (iprev, RFC 8601 2.7.3: ingress.edge.checks.iprev): the client's PTR name
    confirmed forward at connect, without holding the banner; its result goes into
    Authentication-Results, and a verified name's organisational domain is a provider
    identity that learned entries cover (a provider's pool instead of one address)."""
    enabled: bool = documented(True, "look up and confirm the client's PTR name at connect "
                               "(on wherever DNS is configured; without DNS no check runs)")
    deadline: float = bounded(3.0, 0, 30, "seconds the PTR and forward lookups of one "
                              "connection may take in all; then iprev=temperror", gt=True)
    max_names: int = bounded(3, 1, 10, "PTR names confirmed at most (sorted; Postfix and "
                             "Sendmail confirm one; RFC 7208 bounds SPF's ptr walk at 10)")
