"""`smtp-ingress check-config FILE --show`: the effective configuration and what follows from it.

API:
    effective_toml(cfg) -> str       every key after defaults, as TOML; a value that differs from
                                     the default says the default in a comment
    derived(cfg, nofile=None) -> dict    the limits the processes compute from the config and the
                                     machine: acceptors and workers per core, connection slots
                                     per acceptor (and what the fd limit allows), bulk shares,
                                     the retry share (deferrals.retry_buckets);
                                     every listen address and the sockets they take
    render(cfg) -> str               both, for a terminal (derived values as TOML comments, so
                                     the output is itself a valid config file)

The derived numbers come from the functions the processes use (Config.acceptor_count,
Config.worker_count, AdmissionLimits.bulk_share, admission.bulk_share_bucket, admission.FD_SPARE);
the fd limit is this process's RLIMIT_NOFILE (the service's may differ: LimitNOFILE= in the unit).
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ingress.core import config
from ingress.policy.admission import (
    BULK_SHARE,
    FD_SPARE,
    AdmissionLimits,
    broker_bucket,
    bulk_share_bucket,
    configured_limit,
    spf_fds,
)
from ingress.policy.deferrals import retry_buckets
from ingress.policy.identity import domain_buckets, fast_slots, share_bound


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
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
        line = f"{f.name} = {_toml(_masked(prefix + f.name, v))}"
        if v != d:
            line = f"{line:<40} # default {_toml(d)}"
        rows.append(line)
    out = [(prefix.rstrip("."), rows)] if rows else []
    return out + subs


def effective_toml(cfg: config.Config) -> str:
    parts = []
    for name, rows in _tables(cfg, config.Config(), ""):
        parts.append(f"[{name}]\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def derived(cfg: config.Config, nofile: tuple[int, int] | None = None) -> dict[str, Any]:
    soft, hard = nofile or resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft if hard == resource.RLIM_INFINITY else max(soft, hard)   # raised to hard
    s = cfg.smtp
    fd_sessions = max(0, limit - FD_SPARE - spf_fds(cfg))
    conn = configured_limit(cfg, limit)          # what the acceptor runs
    slots, reserve = conn.max_connections, conn.fast_reserve
    lim = AdmissionLimits(max_connections=slots, fast_reserve=reserve,
                          per_ip_bulk_max=cfg.admission.per_ip_bulk_max,
                          per_ip_rate=cfg.admission.per_ip_rate,
                          per_ip_burst=cfg.admission.per_ip_burst,
                          ipv6_prefix=cfg.admission.ipv6_prefix)
    cores = config.cores()
    acceptors = cfg.acceptor_count
    workers = {lane: cfg.worker_count(lane) for lane in ("fast", "bulk")}
    share = bulk_share_bucket(cfg)
    retry = retry_buckets(cfg)
    domains = domain_buckets(cfg.classify.domain_rate, cfg.classify.domain_burst,
                             cfg.acceptor_processes)
    return {
        "cores": cores,
        "acceptors": acceptors,
        "workers": workers,
        "workers_per_core": {k: round(v / cores, 2) for k, v in workers.items()},
        "fd_limit": limit,
        "connections_fd_allows_per_acceptor": fd_sessions,
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
        "listen_sockets": acceptors * (len(cfg.listen.addresses) + len(cfg.listen.fast_addresses)
                                       + len(cfg.tls.mtls_addresses)),
        "bulk_share_per_acceptor": None if share is None else
            {"rate": round(share[0], 4), "burst": round(share[1], 4)},
        "bulk_admitted_at_mail_from": None if share is None else
            round(cfg.lanes.bulk.rate * BULK_SHARE / cfg.cluster.edges, 4),
        "broker_bucket_bulk": broker_bucket(cfg, "bulk"),
        "retry_share_per_acceptor": None if retry is None else
            {"rate": round(retry[0][0], 4), "burst": round(retry[0][1], 4)},
        "retry_share_at_broker": None if retry is None else
            {"rate": round(retry[1][0], 4), "burst": round(retry[1][1], 4)},
        "domain_rate_per_acceptor": None if not cfg.classify.domain_rate else
            {"rate": round(domains[0][0], 4), "burst": round(domains[0][1], 4)},
        "domain_rate_at_broker": None if not cfg.classify.domain_rate else
            {"rate": round(domains[1][0], 4), "burst": round(domains[1][1], 4)},
    }


def render(cfg: config.Config, nofile: tuple[int, int] | None = None) -> str:
    d = derived(cfg, nofile)
    w, wpc = d["workers"], d["workers_per_core"]
    lines = [f"# {cfg.source}: ok. Effective configuration (every value after defaults).", ""]
    lines.append(effective_toml(cfg))
    lines += [
        "# --- derived limits ---------------------------------------------------------------",
        f"# cores: {d['cores']}; acceptors: {d['acceptors']}"
        + (" (supervisor.acceptors = 0: one per core)" if not cfg.supervisor.acceptors else ""),
        f"# workers: fast {w['fast']} ({wpc['fast']} per core), bulk {w['bulk']} "
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
