"""The configuration tables of the evidence checks (ingress.edge.checks, and DMARC in the
workers): one table per check, and [checks] for what they share (the connect-stage deadline,
the DNS client's bounds).

API
    ChecksConfig       [checks]
    DmarcConfig        [dmarc]: DMARC (RFC 7489) results in the workers' Authentication-Results
    (each check's own table is declared here beside it; Config holds them: ingress.core.schema)

Failure modes: none here (fieldspec.check_fields applies the rules; config.load raises).
Limits: none.
"""

from __future__ import annotations

from dataclasses import dataclass

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
