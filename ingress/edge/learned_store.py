"""The acceptor's learned store: the learned allow cache of one acceptor and its file.

API:
    learned_cache(cfg) -> LearnedAllow   an empty cache with the configured bounds
                                         (classify.learned_ttl, learned_max, learned_per_domain,
                                         learned_per_net; admission.ipv6_prefix)
    load_learned(path, cfg) -> LearnedAllow   the file's entries, or an empty cache
    LearnedStore(path, cfg)
        contains(ip, now) -> bool      is the client's network on the learned allow list?
        learn(ip, now, domain="")      remember it, for the domain it was learned for (its
                                       identity "learned:<org domain>"; marks the store dirty);
                                       returns the keys the quotas evicted for it (to drop
                                       them from Redis too, ingress.edge.cluster_state)
        unlearn(ip) -> str | None      forget the client's network (mail from it failed SPF or
                                       DKIM); its key, None if it was not learned
        learn_provider(provider, now, domain) / provider_domain(provider, now) -> str
        / unlearn_provider(provider) -> bool   the learned providers (FCrDNS provider
                                       identities: ingress.policy.learned_provider), the same
                                       TTL and per-domain quota, classify.learned_max in all;
                                       in memory only (not in the file, not in Redis)
        allow                          the LearnedAllow itself (len(), to_json())
        dirty                          changed since the last snapshot
        snapshot(now) -> bytes | None  the JSON to save (purged), None when unchanged; clears
                                       `dirty`. The caller writes it (acceptor 0 does, every
                                       classify.learned_save_interval; every acceptor learns and
                                       unlearns the same entries over pub/sub and reads the
                                       file at start).

Failure modes: a missing file is an empty cache; an unreadable or corrupt one is logged
(learned_load_failed) and the cache starts empty. Limits: LearnedAllow's (entries per network,
at most learned_per_domain per domain and learned_per_net per /24 or /48, learned_max in all,
each expiring after ttl seconds, at least one second).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ingress.core import log
from ingress.core.config import Config
from ingress.policy.learned import LearnedAllow
from ingress.policy.learned_provider import ProviderLearned


def _bounds(cfg: Config) -> dict[str, Any]:
    """LearnedAllow's bounds from the config (its keyword arguments)."""
    c = cfg.classify
    return {"ttl": max(c.learned_ttl, 1.0), "max_size": c.learned_max,
            "per_domain": c.learned_per_domain, "per_net": c.learned_per_net,
            "ipv6_prefix": cfg.admission.ipv6_prefix}


def learned_cache(cfg: Config) -> LearnedAllow:
    return LearnedAllow(**_bounds(cfg))


def load_learned(path: Path, cfg: Config) -> LearnedAllow:
    try:
        return LearnedAllow.from_json(path.read_bytes(), now=time.time(), **_bounds(cfg))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.event("learned_load_failed", "warning", path=str(path), error=str(e))
    return learned_cache(cfg)


class LearnedStore:
    def __init__(self, path: Path, cfg: Config) -> None:
        self.path = path
        self.allow = load_learned(path, cfg)
        b = _bounds(cfg)
        self.providers = ProviderLearned.of(b["ttl"], b["max_size"], b["per_domain"])
        self.dirty = False

    def contains(self, ip: str, now: float) -> bool:
        return self.allow.contains(ip, now)

    def learn(self, ip: str, now: float, domain: str = "") -> list[str]:
        self.allow.learn(ip, now, domain)
        self.dirty = True
        return self.allow.take_evicted()

    def unlearn(self, ip: str) -> str | None:
        try:
            key = self.allow.key(ip)
        except ValueError:
            return None
        if not self.allow.unlearn(key):
            return None
        self.dirty = True
        return key

    def learn_provider(self, provider: str, now: float, domain: str) -> None:
        try:
            self.providers.learn(provider, now, domain)
        except ValueError:
            return
        self.providers.take_evicted()

    def provider_domain(self, provider: str, now: float) -> str:
        return self.providers.domain(provider) if self.providers.contains(provider, now) else ""

    def unlearn_provider(self, provider: str) -> bool:
        return self.providers.unlearn(provider)

    def snapshot(self, now: float) -> bytes | None:
        if not self.dirty:
            return None
        self.dirty = False
        self.allow.purge(now)
        return self.allow.to_json().encode()
