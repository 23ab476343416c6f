"""`smtp-ingress check-config FILE --show`: the effective configuration and what follows from it.

API:
    effective_toml(cfg) -> str       every key after defaults, as TOML; a value that differs from
                                     the default says the default in a comment
    derived(cfg, nofile=None) -> dict    the limits the processes compute from the config and the
                                     machine: acceptors and workers per core, connection slots
                                     per acceptor (and what the fd limit allows), bulk shares,
                                     the retry share; the trust tiers' part of every fast
                                     resource (tiers.cap, tiers.operator_floor) and the
                                     self-proven total rate; every listen address and the
                                     sockets they take
    toml_value(v) -> str             one value as TOML
    render(cfg) -> str               both, for a terminal (derived values as TOML comments, so
                                     the output is itself a valid config file)

This module only prints: every number comes from the functions the processes use, most from
ingress.core.derived (process counts, slots under the fd limit, each rate cap's split), the
rest from the policy that applies them (AdmissionLimits.bulk_share, the tiers' caps and floors,
identity.share_bound); the fd limit is this process's RLIMIT_NOFILE (the service's may differ:
LimitNOFILE= in the unit).
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ingress.core import config
from ingress.core import derived as dv
from ingress.policy.admission import AdmissionLimits
from ingress.policy.identity import fast_slots, share_bound
from ingress.policy.tiers import Tier, TierShares, cap, operator_floor, tier_rates


def toml_value(v: Any) -> str:
    """A config value as TOML (also the defaults in docs/configuration.md: configdoc)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, tuple | list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


SECRET_URLS = ("cluster.redis",)     # URLs that may carry a password: shown as ***


def _masked(key: str, v: Any) -> Any:
    if key in SECRET_URLS and isinstance(v, str):
        password = urlsplit(v).password
        if password:
            return v.replace(f":{password}@", ":***@", 1)
    return v


def _tables(obj: Any, default: Any, prefix: str) -> list[tuple[str, list[str]]]:
    rows: list[str] = []
    subs: list[tuple[str, list[str]]] = []
    for f in dataclasses.fields(obj):
        if f.name == "source":
            continue
        v, d = getattr(obj, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(v):
            subs += _tables(v, d, f"{prefix}{f.name}.")
            continue
        line = f"{f.name} = {toml_value(_masked(prefix + f.name, v))}"
        if v != d:
            line = f"{line:<40} # default {toml_value(d)}"
        rows.append(line)
    out = [(prefix.rstrip("."), rows)] if rows else []
    return out + subs


def effective_toml(cfg: config.Config) -> str:
    parts = []
    for name, rows in _tables(cfg, config.Config(), ""):
        parts.append(f"[{name}]\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def derived(cfg: config.Config, nofile: tuple[int, int] | None = None) -> dict[str, Any]:
    limit = dv.raised_nofile(*(nofile or resource.getrlimit(resource.RLIMIT_NOFILE)))
    s = cfg.smtp
    conn = dv.configured_limit(cfg, limit)          # what the acceptor runs
    slots, reserve = conn.max_connections, conn.fast_reserve
    lim = AdmissionLimits(max_connections=slots, fast_reserve=reserve,
                          per_ip_bulk_max=cfg.admission.per_ip_bulk_max,
                          per_ip_rate=cfg.admission.per_ip_rate,
                          per_ip_burst=cfg.admission.per_ip_burst,
                          ipv6_prefix=cfg.admission.ipv6_prefix)
    cores = dv.cores()
    acceptors = dv.acceptor_count(cfg)
    workers = {lane: dv.worker_count(cfg, lane) for lane in ("fast", "bulk")}
    share = dv.bulk_share_bucket(cfg)
    retry = dv.retry_buckets(cfg)
    domains = dv.domain_buckets(cfg.classify.domain_rate, cfg.classify.domain_burst,
                                dv.acceptor_processes(cfg))
    return {
        "tiers": tier_limits(cfg, reserve),
        "cores": cores,
        "acceptors": acceptors,
        "workers": workers,
        "workers_per_core": {k: round(v / cores, 2) for k, v in workers.items()},
        "fd_limit": limit,
        "connections_fd_allows_per_acceptor": dv.fd_sessions(cfg, limit),
        "connections_per_acceptor": slots,
        "fd_limit_too_low": conn.limited_by == "fd" and s.max_connections > 0,
        "connections_limited_by": conn.limited_by,
        "fast_reserve_per_acceptor": reserve,
        "bulk_slots_per_acceptor": lim.bulk_share,
        "fast_sessions_per_identity_per_acceptor": share_bound(
            fast_slots(slots, reserve), cfg.classify.identity_share),
        "connections_total": slots * acceptors,
        "bulk_rate": cfg.lanes.bulk.rate,
        "listen_addresses": {"smtp": cfg.listen.addresses, "fast": cfg.listen.fast_addresses,
                             "mtls": cfg.tls.mtls_addresses},
        "listen_sockets": dv.listen_sockets(cfg),
        "bulk_share_per_acceptor": None if share is None else
            {"rate": round(share[0], 4), "burst": round(share[1], 4)},
        "bulk_admitted_at_mail_from": None if share is None else
            round(share[0] * acceptors, 4),
        "broker_bucket_bulk": dv.broker_bucket(cfg, "bulk"),
        "retry_share_per_acceptor": None if retry is None else
            {"rate": round(retry[0][0], 4), "burst": round(retry[0][1], 4)},
        "retry_share_at_broker": None if retry is None else
            {"rate": round(retry[1][0], 4), "burst": round(retry[1][1], 4)},
        "domain_rate_per_acceptor": None if not cfg.classify.domain_rate else
            {"rate": round(domains[0][0], 4), "burst": round(domains[0][1], 4)},
        "domain_rate_at_broker": None if not cfg.classify.domain_rate else
            {"rate": round(domains[1][0], 4), "burst": round(domains[1][1], 4)},
    }


def tier_limits(cfg: config.Config, reserve: int) -> dict[str, Any]:
    """What each trust tier may hold of every fast resource (per acceptor: slots of the fast
    reserve, DATA bytes of smtp.data_fast_reserve; per lanes node: the fast queue's messages and
    bytes, the fast workers' credit): "at_most" for the capped tiers, "at_least" (its floor,
    which no lower tier can use) for the operator; the tiers' total rates."""
    shares = TierShares.of(cfg)
    resources = {
        "slots_per_acceptor": reserve,
        "data_bytes_per_acceptor": dv.data_budget(cfg)[1],
        "fast_queue_messages": cfg.lanes.fast.queue_max,
        "fast_queue_bytes": dv.queue_bytes(cfg, "fast"),
        # the dedicated self-proven workers' credit counts in the broker's total too
        "fast_worker_credit": dv.lane_workers(cfg, "fast") * cfg.lanes.fast.credit,
    }
    out: dict[str, Any] = {
        "operator": {"at_least": {k: operator_floor(v, shares) for k, v in resources.items()}},
        **{t.label: {"at_most": {k: cap(t, v, shares) for k, v in resources.items()}}
           for t in (Tier.THIRD_PARTY, Tier.SELF_PROVEN)},
        "of": resources,
        "per_ip_fast_max": cfg.admission.per_ip_fast_max,
    }
    parts = dv.rate_parts(cfg)
    for tier, (rate, burst) in tier_rates(cfg).items():
        mine, broker = dv.tier_buckets(rate, burst, parts)
        out[tier.label]["rate_per_acceptor"] = {"rate": round(mine[0], 4),
                                                "burst": round(mine[1], 4)}
        out[tier.label]["rate_at_broker"] = {"rate": round(broker[0], 4),
                                             "burst": round(broker[1], 4)}
    return out


def _tier_lines(cfg: config.Config, t: dict[str, Any]) -> list[str]:
    names = {"slots_per_acceptor": "slots per acceptor (of smtp.fast_reserve)",
             "data_bytes_per_acceptor": "DATA bytes per acceptor (of smtp.data_fast_reserve)",
             "fast_queue_messages": "fast queue, messages (of lanes.fast.queue_max)",
             "fast_queue_bytes": "fast queue, bytes",
             "fast_worker_credit": "fast worker credit (workers x lanes.fast.credit)"}
    lines = [f"# trust tiers (tiers.self_proven_share {cfg.tiers.self_proven_share:g}, "
             f"third_party_share {cfg.tiers.third_party_share:g}): of each fast resource, "
             "the operator tier always holds its floor, no lower tier can use it"]
    for key, name in names.items():
        lines.append(f"#   {name}: {t['of'][key]}: operator at least "
                     f"{t['operator']['at_least'][key]}, third-party at most "
                     f"{t['third-party']['at_most'][key]}, self-proven at most "
                     f"{t['self-proven']['at_most'][key]}")
    for label in ("self-proven", "third-party"):
        r, b = t[label].get("rate_per_acceptor"), t[label].get("rate_at_broker")
        if r is None:
            lines.append(f"#   {label}: no total rate")
        else:
            lines.append(f"#   {label}: one total rate for all its identities, {b['rate']:g}/s "
                         f"(burst {b['burst']:g}) at the fast broker, {r['rate']:g}/s "
                         f"(burst {r['burst']:g}) per acceptor at MAIL FROM")
    lines.append(f"#   promoted sessions per IP per acceptor (self-proven, third-party): at most "
                 f"{t['per_ip_fast_max']} (admission.per_ip_fast_max); beyond every cap: bulk")
    return lines


def dedicated_note(cfg: config.Config) -> str:
    """The fast workers beside the per-core ones that take only the self-proven tier's mail
    (tiers.self_proven_workers), or that there are none."""
    n = dv.dedicated_workers(cfg, "fast")
    return f"and {n} for the self-proven tier only" if n else "none for one tier only"


def render(cfg: config.Config, nofile: tuple[int, int] | None = None) -> str:
    d = derived(cfg, nofile)
    w, wpc = d["workers"], d["workers_per_core"]
    lines = [f"# {cfg.source}: ok. Effective configuration (every value after defaults).", ""]
    lines.append(effective_toml(cfg))
    lines += [
        "# --- derived limits ---------------------------------------------------------------",
        f"# cores: {d['cores']}; acceptors: {d['acceptors']}"
        + (" (supervisor.acceptors = 0: one per core)" if not cfg.supervisor.acceptors else ""),
        f"# workers: fast {w['fast']} ({wpc['fast']} per core; {dedicated_note(cfg)}), "
        f"bulk {w['bulk']} "
        f"({wpc['bulk']} per core)" + ("" if cfg.lanes.fast.workers and cfg.lanes.bulk.workers
                                       else "; lanes.<lane>.workers = 0: half the cores"),
        f"# fd limit: {d['fd_limit']} -> at most {d['connections_fd_allows_per_acceptor']} "
        "sessions per acceptor (this process's RLIMIT_NOFILE; the unit's LimitNOFILE= rules)",
        f"# connections per acceptor: {d['connections_per_acceptor']} "
        f"(smtp.max_connections {cfg.smtp.max_connections or 'auto'}, "
        f"limited by {d['connections_limited_by']}"
        + (", CUT BY THE FD LIMIT: raise LimitNOFILE" if d["fd_limit_too_low"] else "")
        + f"), of which fast-lane only {d['fast_reserve_per_acceptor']}, "
        f"bulk at most {d['bulk_slots_per_acceptor']}; all acceptors: {d['connections_total']}",
        f"# one identity (classify.identity_share {cfg.classify.identity_share:g}): at most "
        f"{d['fast_sessions_per_identity_per_acceptor']} fast sessions per acceptor, the same "
        "share of the fast queue and workers; beyond it, bulk",
    ]
    lines += _tier_lines(cfg, d["tiers"])
    la = d["listen_addresses"]
    lines.append("# listening on " + "; ".join(
        f"{name} {', '.join(addrs)}" for name, addrs in la.items() if addrs)
        + f": {d['listen_sockets']} SO_REUSEPORT sockets (one per address per acceptor)")
    if d["bulk_share_per_acceptor"] is None:
        lines.append("# bulk: uncapped (lanes.bulk.rate = 0)")
    else:
        sh = d["bulk_share_per_acceptor"]
        lines.append(f"# bulk cap {d['bulk_rate']:g}/s: each acceptor admits {sh['rate']:g}/s "
                     f"(burst {sh['burst']:g}) at MAIL FROM, {d['bulk_admitted_at_mail_from']:g}/s"
                     " together" + ("" if cfg.cluster.redis else
                                    "; the bulk broker enforces the cap exactly after DATA"))
    if d["retry_share_at_broker"] is not None:
        r, b = d["retry_share_per_acceptor"], d["retry_share_at_broker"]
        lines.append(f"# retries of deferred transactions: {b['rate']:g}/s (burst {b['burst']:g})"
                     f" beyond the bulk cap, {r['rate']:g}/s (burst {r['burst']:g}) per acceptor"
                     " (admission.retry_share)")
    if d["domain_rate_per_acceptor"] is not None:
        r, b = d["domain_rate_per_acceptor"], d["domain_rate_at_broker"]
        lines.append(f"# a domain proven only by itself (classify.domain_rate): {r['rate']:g}/s "
                     f"(burst {r['burst']:g}) of the fast lane per acceptor at MAIL FROM; the "
                     f"fast broker bounds all edges to {b['rate']:g}/s (burst {b['burst']:g})")
    if cfg.cluster.redis and d["bulk_share_per_acceptor"] is not None:
        rate, burst = d["broker_bucket_bulk"]
        lines.append(f"# [cluster] redis: the cap is one shared bucket for all edges at MAIL FROM; "
                     f"the shares above hold only while Redis is down (1/{cfg.cluster.edges} "
                     f"of the cap per edge); the bulk broker guards at {rate:g}/s "
                     f"(burst {burst:g})")
    return "\n".join(lines) + "\n"
