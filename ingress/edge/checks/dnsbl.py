"""The DNS block lists ([dnsbl]): a connect check whose score only shapes bulk, and refuses it
above dnsbl.reject_threshold.

Purpose
    postscreen_dnsbl_sites in this ingress: each site `zone[=filter][*weight]` is asked about
    the client (ingress.edge.checks._dnslist: cached, health-tested zones through the
    acceptor's one DNS client); the matching sites' weights add up (ingress.policy.dnslist).
    A score at dnsbl.threshold SHAPES the bulk seat ("dnsbl:<score>"; facts dnsbl_score and
    dnsbl_zones; what shaping does: ingress.policy.shaping, applied by
    ingress.edge.connect_checks); at dnsbl.reject_threshold it is REFUSED at the banner with
    554 5.7.1 naming the zones by their public names (reply_map), and a `dnsbl_reject` line is
    logged. A
    promoted client (allow list, certificate, DNS allow list) is never shaped or refused
    (ingress.policy.checks.combine). holds_banner: a bulk banner waits for it (up to
    checks.connect_deadline).

API
    build(cfg, dns, host) -> DnsblCheck | None     None while dnsbl.sites is empty
    DnsblCheck(cfg, dns)   name "dnsbl", stage connect, holds_banner (a _dnslist.ListCheck);
                           await judge(client)

Failure modes: none raised; a zone that times out, fails or is switched off is neutral for the
client ("dnsbl:<zone>:timeout"); error codes are never listings. Limits: the lookup's.
"""

from __future__ import annotations

from typing import Any

from ingress.core import log
from ingress.core.config import Config
from ingress.core.dns_client import DnsClient
from ingress.edge.checks import Client
from ingress.edge.checks._dnslist import ListCheck
from ingress.policy.checks import Judgement, Outcome
from ingress.policy.dnslist import ZoneResult, dnsbl_judgement

__all__ = ["DnsblCheck", "build"]


class DnsblCheck(ListCheck):
    def __init__(self, cfg: Config, dns: DnsClient) -> None:
        super().__init__("dnsbl", cfg.dnsbl, cfg, dns)
        self.threshold, self.reject_threshold = cfg.dnsbl.threshold, cfg.dnsbl.reject_threshold

    def judgement(self, results: dict[str, ZoneResult], client: Client) -> Judgement:
        j = dnsbl_judgement(results, self.sites, self.threshold, self.reject_threshold,
                            self.names)
        if j.outcome is Outcome.REFUSE:
            facts = dict(j.facts)
            log.refused("dnsbl_reject", client.ip, stage="connect", code=554, port=client.port,
                        reason="dnsbl", score=facts.get("dnsbl_score", ""),
                        zones=facts.get("dnsbl_zones", ""))
        return j


def build(cfg: Config, dns: DnsClient, host: Any) -> DnsblCheck | None:
    return DnsblCheck(cfg, dns) if cfg.dnsbl.sites else None
