"""`smtp-ingress status`: what the running instance is doing, read from the instance itself.

API: collect(cfg, timeout) -> dict;  render(doc) -> str;  healthy(doc) -> bool (exit 0);
     quantile(buckets, q) -> float | None

Sources, all local and read-only:
- the config: every listen address (listen.addresses, listen.fast_addresses,
  tls.mtls_addresses; "port 0" as written, since the real port is the running instance's);
- each lane broker's status publication (ZeroMQ SUB on the state dir's ipc sockets): queue
  depth and bound, workers, free credit, the bulk cap's tokens and saturation, counters;
- the Prometheus endpoint (metrics.listen), when enabled: live sessions per lane (summed over
  the acceptor processes), the spool/relay gauges, and the relay's own metrics: deliveries by
  result (2xx / 4xx / 5xx / error), downstream latency (p50 / p99 from the histogram), the
  circuit breaker, DSNs sent, the backlog by age, the spool filesystem's free bytes;
- the spool directories themselves (counted with os.scandir, bounded) when metrics are off,
  and what the lane workers' journals acknowledged that is not yet in new/ (journal.outstanding).

- on an edge (cluster.role "edge"), every lanes node of cluster.lanes_nodes (tcp:// + CURVE,
  the edge's own key): live or dead, and its lanes' last status ("nodes"); on a lanes node,
  itself over its tcp address with its own key (the node's Gate admits it).

Failure modes: a lane whose broker does not publish within `timeout` is shown as "down";
a lanes node with a lane that does not publish within `timeout` as "DEAD";
an unreachable metrics endpoint as "unavailable". Exit status 0 when every lane answered,
1 otherwise (so scripts and monitoring can use it).
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq
from prometheus_client.parser import text_string_to_metric_families

from ingress.core import cluster, metrics
from ingress.core.config import Config
from ingress.core.wire import STATUS_TOPIC, WireError, decode_status
from workers.spool import journal
from workers.spool.collector import BACKLOG_AGES

SCAN_LIMIT = 1_000_000


def lane_status(cfg: Config, timeout: float, node: cluster.Node | None = None
                ) -> dict[str, dict[str, Any] | None]:
    """Each lane's status publication: from this host's brokers (ipc://), or from lanes node
    `node` (tcp:// + CURVE, with this node's own key), within `timeout`; None: none came."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, STATUS_TOPIC)
    out: dict[str, dict[str, Any] | None] = {"fast": None, "bulk": None}
    try:
        if node is not None:
            cluster.curve_client(sub, cfg, node.public)
        for lane in out:
            sub.connect(cfg.ipc(f"{lane}-status") if node is None
                        else cluster.endpoint(node.base, lane, "status"))
        deadline = time.monotonic() + timeout
        while any(v is None for v in out.values()) and time.monotonic() < deadline:
            if not sub.poll(timeout=max(1, int((deadline - time.monotonic()) * 1000))):
                break
            with contextlib.suppress(WireError):
                doc = decode_status(sub.recv_multipart())
                if doc.get("lane") in out:
                    out[str(doc["lane"])] = doc
    finally:
        sub.close()
        ctx.term()
    return out


def scrape(listen: str, timeout: float) -> dict[str, float] | None:
    """Samples summed over labels we do not show (pid), keyed 'name{label=value}'."""
    if not listen:
        return None
    try:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "pid")
            key = f"{s.name}{{{labels}}}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def count_files(d: Path) -> int:
    n = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(d) as it:
        for _ in it:
            n += 1
            if n >= SCAN_LIMIT:
                break
    return n


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs. Pure.

    Linear interpolation inside the bucket holding the q-th observation; the +Inf bucket
    answers with the highest finite bound; None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


BREAKER_NAMES = {metrics.BREAKER_CLOSED: "closed", metrics.BREAKER_OPEN: "open",
                 metrics.BREAKER_HALF_OPEN: "half-open"}


def relay_stats(m: dict[str, float]) -> dict[str, Any]:
    """The relay's part of a scrape (see scrape()): what `status` shows. Pure."""
    hist = [(float(k.split("le=", 1)[1].rstrip("}")), v) for k, v in m.items()
            if k.startswith("smtp_ingress_relay_downstream_seconds_bucket{")]
    breaker = m.get("smtp_ingress_relay_breaker_state{}")
    p50, p99 = quantile(hist, 0.5), quantile(hist, 0.99)
    return {
        "deliveries": {r: m.get(f"smtp_ingress_relay_deliveries_total{{result={r}}}", 0.0)
                       for r in metrics.RELAY_RESULTS},
        "dsns": m.get("smtp_ingress_relay_dsns_total{}", 0.0),
        "breaker": None if breaker is None else BREAKER_NAMES.get(int(breaker), str(breaker)),
        "breaker_failures": m.get("smtp_ingress_relay_breaker_failures{}", 0.0),
        "latency_p50_s": p50, "latency_p99_s": p99,
        "backlog_by_age": {b: m.get(f"smtp_ingress_relay_backlog_age_messages{{age={b}}}", 0.0)
                           for b, _ in BACKLOG_AGES},
        "spool_fs_free_bytes": m.get("smtp_ingress_spool_fs_free_bytes{}"),
    }


def node_status(cfg: Config, timeout: float) -> list[dict[str, Any]] | None:
    """Every lanes node this instance reaches over tcp (an edge: cluster.lanes_nodes; a lanes
    node: itself), polled side by side, each within `timeout`; None on role all."""
    role = cfg.cluster.role
    if role == "all":
        return None
    if role == "lanes":
        own = cluster.key_pair(cfg.cluster.secret_key)[0]
        targets = [cluster.Node(cluster.local_base(cfg.cluster.lanes_bind), own)]
    else:
        targets = cluster.nodes(cfg)
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        found = list(pool.map(lambda n: lane_status(cfg, timeout, n), targets))
    return [{"node": n.base, "live": all(v is not None for v in lanes.values()),
             "lanes": lanes} for n, lanes in zip(targets, found, strict=True)]


def healthy(doc: dict[str, Any]) -> bool:
    """Exit status 0: every lane answered (and, on an edge, every lanes node)."""
    nodes = doc.get("nodes")
    if nodes is not None:
        return all(n["live"] for n in nodes)
    return all(v is not None for v in doc["lanes"].values())


def collect(cfg: Config, timeout: float = 1.5) -> dict[str, Any]:
    nodes = node_status(cfg, timeout)
    if nodes is None:
        lanes = lane_status(cfg, timeout)
    else:   # the lanes as the first live node reports them (each node's own: doc["nodes"])
        live = [n for n in nodes if n["live"]] or nodes
        lanes = live[0]["lanes"]
    m = scrape(cfg.metrics.listen, timeout)
    spool = cfg.spool.path
    doc: dict[str, Any] = {
        "config": cfg.source, "listen": ", ".join(cfg.listen.addresses),
        "listen_addresses": {"smtp": list(cfg.listen.addresses),
                             "fast": list(cfg.listen.fast_addresses),
                             "mtls": list(cfg.tls.mtls_addresses)},
        "role": cfg.cluster.role, "lanes": lanes, "nodes": nodes,
        "sessions": None if m is None else {
            lane: m.get(f"smtp_ingress_sessions{{lane={lane}}}", 0.0) for lane in lanes},
        "spool": {"new": count_files(spool / "new"), "failed": count_files(spool / "failed"),
                  "tmp": count_files(spool / "tmp"), "hold": count_files(spool / "hold"),
                  "journal": journal.outstanding(spool)},
        "relay": (cfg.relay.downstream + ("" if cfg.relay.tls == "none" else
                                          f" (TLS {cfg.relay.tls})")
                  if cfg.relay.downstream else "(none: the spool is the destination)"),
        "metrics": cfg.metrics.listen or "(disabled)",
        "relay_stats": None if m is None or not cfg.relay.downstream else relay_stats(m),
    }
    return doc


def render(doc: dict[str, Any]) -> str:
    lines = [f"smtp-ingress on {doc['listen']} (config {doc['config']})"]
    extra = {k: v for k, v in doc.get("listen_addresses", {}).items() if k != "smtp" and v}
    if extra:
        lines.append("  also listening: " + "; ".join(
            f"{k} port {', '.join(v)}" for k, v in extra.items()))
    sessions = doc["sessions"]
    for lane, st in doc["lanes"].items():
        live = "?" if sessions is None else f"{sessions[lane]:.0f}"
        if st is None:
            lines.append(f"  {lane:4} lane: DOWN (no status from its broker)   sessions {live}")
            continue
        cap = "uncapped" if not st.get("rate") else (
            f"cap {st['rate']:g}/s, tokens {st.get('tokens')}")
        lines.append(
            f"  {lane:4} lane: sessions {live}, queue {st['depth']}/{st['queue_max']}, "
            f"in flight {st.get('inflight', 0)}, workers {st['workers']} "
            f"(free credit {st['free_credit']}), {cap}"
            f"{', SATURATED' if st.get('saturated') else ''}; accepted {st.get('acked', 0)}, "
            f"shed {st.get('nack_rate', 0) + st.get('nack_queue_full', 0)}")
    for n in doc.get("nodes") or ():
        if not n["live"]:
            lines.append(f"  lanes node {n['node']}: DEAD (no status within the deadline)")
            continue
        parts = [f"{lane} queue {st['depth']}/{st['queue_max']}, workers {st['workers']}, "
                 f"accepted {st.get('acked', 0)}" for lane, st in n["lanes"].items() if st]
        lines.append(f"  lanes node {n['node']}: live; " + "; ".join(parts))
    sp = doc["spool"]
    lines.append(f"  spool: {sp['new']} waiting in new/ (relay backlog), {sp['failed']} in "
                 f"failed/, {sp['tmp']} in tmp/, {sp.get('hold', 0)} held"
                 + (f", {sp['journal']} acknowledged in the journals, not yet in new/"
                    if sp.get("journal") else ""))
    lines.append(f"  relay: {doc['relay']}")
    rs = doc.get("relay_stats")
    if rs:
        d = rs["deliveries"]

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.1f} ms"
        lines.append(f"    deliveries (per recipient): 2xx {d['2xx']:.0f}, 4xx {d['4xx']:.0f}, "
                     f"5xx {d['5xx']:.0f}, error {d['error']:.0f}; DSNs sent {rs['dsns']:.0f}")
        lines.append(f"    downstream latency p50 {ms(rs['latency_p50_s'])}, p99 "
                     f"{ms(rs['latency_p99_s'])}; circuit breaker {rs['breaker'] or '?'}"
                     + (f" ({rs['breaker_failures']:.0f} failures)"
                        if rs["breaker_failures"] else ""))
        lines.append("    backlog by age: " + ", ".join(
            f"{b} {n:.0f}" for b, n in rs["backlog_by_age"].items()))
        if rs["spool_fs_free_bytes"] is not None:
            lines.append(f"    spool filesystem: {rs['spool_fs_free_bytes'] / 2**30:.2f} GiB free")
    lines.append(f"  metrics: {doc['metrics']}")
    return "\n".join(lines)
