"""FCrDNS (iprev) at connect: the client's PTR name, confirmed forward (the I/O shell of
ingress.policy.iprev).

Purpose
    At CONNECT, without holding the banner (holds_banner False: the verdict is applied
    whenever it arrives), look up the client's PTR records, then the forward records (A for
    an IPv4 client, AAAA for IPv6) of at most iprev.max_names of its names, all through the
    acceptor's one DNS client within iprev.deadline seconds. The pure module gives the RFC
    8601 result and the provider identity; its facts (iprev, iprev_name, provider) go into the
    wire evidence and Authentication-Results. The judgement is neutral ("iprev:<result>")
    unless the verified provider is learned (the acceptor's learned store: "provider P
    learned for domain D"): then PROMOTE to learned:<D>, reason "provider:<P>" (self-proven;
    classify holds it to D once the transaction names its sender).

API
    build(cfg, dns, host) -> IprevCheck | None     None when iprev.enabled is false
    IprevCheck.name "iprev", .stage CONNECT, .holds_banner False, .deadline (the runner's
        limit for it, as it holds no banner: iprev.deadline, the lookups' budget, and
        MARGIN, so that a timed-out lookup still reports iprev=temperror), await .judge(client)

Keys (the DNS client's per-key bound, checks.dns_per_key): the PTR query counts against the
client's network (IPv4 /24, IPv6 /admission.ipv6_prefix), a forward query against the PTR
name's organisational domain: one attacker's reverse zone that never answers holds at most
dns_per_key queries of its own network, and PTR names pointing into one slow forward zone hold
that zone's, not everyone's checks.

Failure modes: DNS trouble is temperror (neutral); a client address that does not parse is
permerror; never raises for DNS. Limits: 1 + max_names queries per connection, the deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import dns.reversename

from ingress.core.addr import net_key, normalize_ip
from ingress.core.config import Config
from ingress.core.dns_client import Answer, DnsClient, Status
from ingress.edge.checks import Client
from ingress.policy import iprev as policy
from ingress.policy.checks import Judgement, Stage
from ingress.policy.identity import org_domain

__all__ = ["MARGIN", "IprevCheck", "build"]

MARGIN = 0.25       # seconds the runner's limit exceeds the lookups' budget


def build(cfg: Config, dns: DnsClient, host: Any) -> IprevCheck | None:
    if not cfg.iprev.enabled:
        return None
    return IprevCheck(dns, host, cfg.iprev.deadline, cfg.iprev.max_names,
                      cfg.admission.ipv6_prefix)


class IprevCheck:
    name = policy.CHECK
    stage = Stage.CONNECT
    holds_banner = False

    def __init__(self, dns: DnsClient, host: Any, deadline: float, max_names: int,
                 ipv6_prefix: int = 64) -> None:
        self.dns, self.host = dns, host
        self.budget, self.max_names, self.ipv6_prefix = deadline, max_names, ipv6_prefix
        self.deadline = deadline + MARGIN

    async def judge(self, client: Client) -> Judgement:
        try:
            ip = normalize_ip(client.ip)
        except ValueError:
            return policy.judge(policy.Outcome(policy.Iprev.PERMERROR))
        outcome = await self.lookup(ip)
        return policy.judge(outcome, self.learned_domain(outcome.provider))

    async def lookup(self, ip: str) -> policy.Outcome:
        """The RFC 8601 outcome for `ip` (canonical), within the deadline."""
        end = time.monotonic() + self.budget
        ptr_name = dns.reversename.from_address(ip).to_text(omit_final_dot=True)
        ptr = await self.dns.query(ptr_name, "PTR", timeout=self.budget,
                                   key=f"iprev-net:{net_key(ip, self.ipv6_prefix)}")
        names = policy.ptr_names(ptr, self.max_names) if ptr.status is Status.OK else ()
        qtype = policy.forward_type(ip)
        left = end - time.monotonic()
        answers = await asyncio.gather(*(
            self.dns.query(n, qtype, timeout=left, key=f"iprev-org:{org_domain(n)}")
            for n in names)) if names and left > 0 else []
        forwards: dict[str, Answer] = dict(zip(names, answers, strict=False))
        return policy.iprev(ip, ptr, forwards, self.max_names)

    def learned_domain(self, provider: str) -> str:
        """The domain `provider` was learned for ("" when it is not learned, or no store)."""
        store = getattr(self.host, "learned_store", None)
        if not provider or store is None:
            return ""
        return str(store.provider_domain(provider, time.time()))
