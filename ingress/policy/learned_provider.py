"""Learned providers: verified provider identities remembered for the domain they proved (pure;
no I/O, the clock as an argument).

Purpose
    A client whose mail passed SPF and an aligned DKIM check is learned by network
    (ingress.policy.learned); when its PTR name was also confirmed forward and gives a provider
    identity (ingress.policy.iprev.provider_of: the organisational domain of a verified,
    non-generic name), the provider is learned too, for the same domain: "provider P learned
    for domain D". Any address of P's pool whose PTR name confirms forward under P is then
    promoted at connect to learned:<D> (ingress.edge.checks.iprev), held to D by
    classify.learned_vouches once the transaction names its sender, and unlearned like a
    network entry when mail riding it disowns it (classify.should_unlearn).

API
    ProviderLearned.of(ttl, max_size, per_domain)   the same operations as LearnedAllow
        (learn(provider, now, domain), contains, domain, unlearn, key, purge, take_evicted,
        per_domain_count), keyed by the provider's organisational domain instead of a network

Attacker: a provider identity needs the forward zone of the name (its A/AAAA records), i.e. the
provider's own domain; a spammer's own domain as "provider" gains only what its learning gave:
it must first have delivered SPF- and DKIM-aligned mail for D, and D's identity is self-proven,
held to D's shares and rates.

Failure modes: learn() raises ValueError for a name that is not a registrable domain; the
other operations answer "not stored" for one. Limits: LearnedAllow's quotas (per_domain
providers per domain, max_size in all, each expiring after ttl; one provider holds one domain,
the latest learned: an ESP sending for many domains vouches for the latest, the others are
judged afresh at MAIL FROM). Not persisted, not copied to Redis (learned again from traffic).
"""

from __future__ import annotations

from ingress.policy.identity import registrable
from ingress.policy.learned import LEARNED_PER_DOMAIN, LearnedAllow

__all__ = ["ProviderLearned"]


class ProviderLearned(LearnedAllow):
    """LearnedAllow keyed by provider (each its own network group, of one entry)."""

    @classmethod
    def of(cls, ttl: float, max_size: int,
           per_domain: int = LEARNED_PER_DOMAIN) -> ProviderLearned:
        return cls(ttl=ttl, max_size=max_size, per_domain=per_domain, per_net=1)

    def _keys(self, ip: str) -> tuple[str, str]:
        org = registrable(ip)
        if not org:
            raise ValueError(f"not a provider identity: {ip[:60]!r}")
        return org, org
