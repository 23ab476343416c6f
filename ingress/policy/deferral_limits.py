"""The limits of the deferral records (ingress.policy.deferrals), validated, and how the config
gives them (pure).

API
    DeferralLimits(min_delay, ttl, max_records, per_net_max, per_site_max=128, ipv6_prefix=64,
                   hammer_sheds=0, share_rate=0.0, share_burst=1.0)   frozen; the rules each
                   bound serves are ingress.policy.deferrals' (re-exported there)
    deferral_limits(cfg) -> DeferralLimits    from admission.retry_*, admission.ipv6_prefix
                   and the edge's retry share

Failure modes: DeferralLimits raises ValueError for inconsistent limits. Limits: none.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingress.core.config import Config
from ingress.core.derived import retry_buckets

__all__ = ["DeferralLimits", "deferral_limits"]


@dataclass(frozen=True, slots=True)
class DeferralLimits:
    min_delay: float
    ttl: float
    max_records: int
    per_net_max: int
    per_site_max: int = 128
    ipv6_prefix: int = 64
    hammer_sheds: int = 0       # sheds of a site per HAMMER_WINDOW beyond which it earns
                                # nothing (0: no such rule)
    share_rate: float = 0.0     # the retry share divided between sites (0: not divided)
    share_burst: float = 1.0

    def __post_init__(self) -> None:
        if self.min_delay < 0:
            raise ValueError("min_delay must be >= 0")
        if self.ttl <= self.min_delay:
            raise ValueError("ttl must be greater than min_delay")
        if self.max_records < 1 or self.per_net_max < 1:
            raise ValueError("max_records and per_net_max must be >= 1")
        if self.per_site_max < self.per_net_max:
            raise ValueError("per_site_max must be >= per_net_max")
        if not 16 <= self.ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be 16..128")
        if self.hammer_sheds < 0 or self.share_rate < 0 or self.share_burst < 1:
            raise ValueError("hammer_sheds, share_rate must be >= 0, share_burst >= 1")


def deferral_limits(cfg: Config) -> DeferralLimits:
    """The store's limits from admission.retry_*, admission.ipv6_prefix and the edge's retry
    share (ingress.core.derived.retry_buckets: what is divided between sites)."""
    a = cfg.admission
    retry = retry_buckets(cfg)
    rate, burst = retry[1] if retry is not None else (0.0, 1.0)
    return DeferralLimits(
        min_delay=a.retry_min_delay, ttl=a.retry_ttl, max_records=a.retry_max_records,
        per_net_max=a.retry_per_net, per_site_max=a.retry_per_site, ipv6_prefix=a.ipv6_prefix,
        hammer_sheds=a.retry_hammer_sheds, share_rate=rate, share_burst=burst)
