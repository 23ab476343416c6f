"""The DNS allow lists ([dnswl]): a connect check that promotes a listed client to the
third-party tier before it says a word.

Purpose
    A "web of trusted servers" (issue 18): each site `zone[=filter][*weight]` is asked about the
    client (ingress.edge.checks._dnslist: cached, health-tested zones through the acceptor's
    one DNS client); a listing counts when its filter admits the answer and the answer's trust
    level (its last octet named by dnswl.trust_levels, DNSWL.org's 127.0.x.y) is at least
    dnswl.min_trust. When the counted weights reach dnswl.threshold the client is PROMOTED with
    the identity dnswl:<zone> (ingress.policy.tiers: the third-party tier, capped, with
    per-identity shares), the zone being the heaviest listing one by its public name. The
    zone's TXT for the client is asked for a listing only, within the budget left. Facts:
    dnswl (zone), dnswl_ip (the answer), dnswl_txt (the TXT): the workers render them as RFC
    8904's `dnswl=pass dns.zone=... policy.ip=... policy.txt="..."` (workers.lane.headers).
    holds_banner: a bulk banner waits for it (up to checks.connect_deadline).

API
    build(cfg, dns, host) -> DnswlCheck | None     None while dnswl.sites is empty
    DnswlCheck(cfg, dns)   name "dnswl", stage connect, holds_banner (a _dnslist.ListCheck);
                           await judge(client)

Failure modes: none raised; a zone that times out, fails or is switched off is neutral for the
client ("dnswl:<zone>:timeout"): no promotion, nothing else. Limits: the lookup's.
"""

from __future__ import annotations

from typing import Any

from ingress.core.config import Config
from ingress.core.dns_client import DnsClient
from ingress.edge.checks import Client
from ingress.edge.checks._dnslist import ListCheck
from ingress.policy.checks import Judgement
from ingress.policy.dnslist import ZoneResult, dnswl_judgement

__all__ = ["DnswlCheck", "build"]


class DnswlCheck(ListCheck):
    def __init__(self, cfg: Config, dns: DnsClient) -> None:
        super().__init__("dnswl", cfg.dnswl, cfg, dns, want_txt=True)
        w = cfg.dnswl
        self.threshold, self.levels = w.threshold, tuple(w.trust_levels)
        self.min_trust = self.levels.index(w.min_trust) if self.levels else 0

    def judgement(self, results: dict[str, ZoneResult], client: Client) -> Judgement:
        return dnswl_judgement(results, self.sites, self.threshold, self.names, self.levels,
                               self.min_trust)


def build(cfg: Config, dns: DnsClient, host: Any) -> DnswlCheck | None:
    return DnswlCheck(cfg, dns) if cfg.dnswl.sites else None
