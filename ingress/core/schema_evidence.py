"""The configuration tables of the evidence checks (ingress.edge.checks): one table per check,
and [checks] for what they share (the connect-stage deadline, the DNS client's bounds).

API
    ChecksConfig       [checks]
    (each check's own table is declared here beside it; Config holds them: ingress.core.schema)

Failure modes: none here (fieldspec.check_fields applies the rules; config.load raises).
Limits: none.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingress.core.fieldspec import bounded


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
