"""Several hosts on one machine: two edges and one lanes node beside a single host (issue 11).

Purpose
    The figures of the "several hosts" layout next to the single host's, measured in the same run
    on the same machine: a lanes node (cluster.role = "lanes", on 127.0.0.2, tcp:// + CURVE) with
    two edges (cluster.role = "edge", on 127.0.0.1 and 127.0.0.5, each its own state dir), and
    a single host (role "all") with the same settings.
    - throughput: smtp-source against the single host (-s 20), and two smtp-source at once, one
      per edge (-s 10 each, half the messages each); msgs/s = all messages / the slower run;
    - flood: 300 stalling bots and 50 spam connections against one edge (and against the single
      host), an allow-listed sender (127.0.0.10) measured through that edge; accepted % and
      latency percentiles, and the spam accepted against the bulk cap (over the whole run,
      so the bucket's burst of one second is in it: cap x (1 + 1/seconds)).
    Runs alternate (single, cluster, single, ...) and the report gives medians.

Usage
    python -m bench.cluster [--runs 3] [--messages 4000] [--flood-s 12] [--out DIR]

Everything runs on loopback; every process started is stopped by PID (tests.kit.procs); every
load is bounded in count and time. This is a 2-core machine shared with the load generator:
the two layouts have the same cores, so the cluster figures show the cost of the extra hop
(tcp + CURVE between edge and lanes), not a capacity gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import flood
from bench import throughput as tp
from bench.targets import CONFIGS, ROOT, Running, start_ingress
from tests.kit.clusterkit import free_base, keygen
from tests.kit.procs import Processes

LANES_HOST, EDGE_A, EDGE_B = "127.0.0.2", "127.0.0.1", "127.0.0.5"
TRUSTED = "127.0.0.10"
BULK_RATE = 200.0
RCPT = "user@example.test"


def common(capped: bool) -> dict[str, dict[str, Any]]:
    """The throughput runs measure the ingress, not the bulk cap (uncapped, as bench/run.py's
    throughput.toml); the flood runs have the cap."""
    return {"classify": {"allow_cidrs": [f"{TRUSTED}/32"]},
            "lanes.bulk": {"rate": BULK_RATE if capped else 0.0}}


def start_single(procs: Processes, d: Path, capped: bool) -> Running:
    return start_ingress(procs, d / "single", CONFIGS / "throughput.toml", common(capped),
                         name="single")


def start_cluster(procs: Processes, d: Path, capped: bool) -> list[Running]:
    d.mkdir(parents=True, exist_ok=True)
    keys = d / "keys"
    allowed = d / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    lanes_pub, lanes_sec = keygen(keys, "lanes")
    edge_keys = [keygen(keys, f"edge{i}") for i in range(2)]
    for i, (pub, _) in enumerate(edge_keys):
        (allowed / f"edge{i}.key").write_bytes(pub.read_bytes())
    base = f"tcp://{LANES_HOST}:{free_base(LANES_HOST)}"
    lanes = start_ingress(procs, d / "lanes", CONFIGS / "throughput.toml", {
        **common(capped), "cluster": {"role": "lanes", "secret_key": str(lanes_sec),
                                "lanes_bind": base, "allowed_keys": str(allowed)}},
        name="lanes")
    edges = []
    for i, host in enumerate((EDGE_A, EDGE_B)):
        edges.append(start_ingress(procs, d / f"edge{i}", CONFIGS / "throughput.toml", {
            **common(capped), "listen": {"host": host, "port": 0},
            "cluster": {"role": "edge", "secret_key": str(edge_keys[i][1]),
                        "lanes_nodes": [f"{base} {lanes_pub}"]}}, name=f"edge{i}"))
        edges[-1].host = host
    time.sleep(2.0)      # the edges' CURVE handshakes and first status
    return [lanes, *edges]


def throughput(targets: list[tuple[str, int]], messages: int) -> float:
    """All `targets` at once, the messages split evenly; msgs/s over the slowest."""
    runs: list[tp.SourceRun] = []
    each = messages // len(targets)

    def one(host: str, port: int) -> None:
        runs.append(tp.run_smtp_source(host, port, messages=each, sessions=20 // len(targets),
                                       size=1024, recipient=RCPT))
    threads = [threading.Thread(target=one, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not all(r.ok for r in runs):
        return 0.0
    return each * len(targets) / max(r.seconds for r in runs)


def flood_run(host: str, port: int, seconds: float) -> dict[str, Any]:
    cfg = flood.FloodConfig(
        target=flood.Target(host, port), duration_s=seconds,
        bots=flood.BotConfig(stallers=300, spammers=50, spam_per_conn=100, spam_rcpt=RCPT,
                             spam_from="spam@bots.invalid", ramp_s=1.0),
        legit=(flood.LegitSpec("trusted", TRUSTED, 0.1, name="trusted"),),
        warmup_s=2.0, grace_s=10.0, rcpt=RCPT, deadline_s=10.0)
    res = flood.run_flood_sync(cfg)
    legit = res["legit"][0]
    spam = res["bots"]["spam"] if "bots" in res else {}
    return {"accepted_pct": legit["accepted_pct"], "latency_ms": legit["latency_ms"],
            "spam_accepted": spam.get("accepted"), "spam_sent": spam.get("sent"),
            "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--flood-s", type=float, default=12.0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if not 1 <= a.runs <= 10 or not 100 <= a.messages <= 50_000 or not 4 <= a.flood_s <= 120:
        ap.error("runs 1..10, messages 100..50000, flood-s 4..120")
    flood.ensure_fd_limit(2000, "bench.cluster")
    out: dict[str, Any] = {"single": {"tp": [], "flood": []}, "cluster": {"tp": [], "flood": []},
                           "params": vars(a) | {"out": str(a.out)}}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, Processes() as procs:
        d = Path(tmp)
        for phase, capped in (("tp", False), ("flood", True)):
            single = start_single(procs, d / phase, capped)
            lanes, edge_a, edge_b = start_cluster(procs, d / phase / "cluster", capped)
            for i in range(a.runs):
                for name in ("single", "cluster") if i % 2 == 0 else ("cluster", "single"):
                    if phase == "tp":
                        tgts = [(single.host, single.port)] if name == "single" else \
                            [(edge_a.host, edge_a.port), (edge_b.host, edge_b.port)]
                        rate = throughput(tgts, a.messages)
                        out[name]["tp"].append(round(rate, 1))
                        print(f"run {i + 1} {name}: throughput {rate:.0f} msgs/s", flush=True)
                        continue
                    host, port = (single.host, single.port) if name == "single" else \
                        (edge_a.host, edge_a.port)
                    r = flood_run(host, port, a.flood_s)
                    out[name]["flood"].append(r)
                    print(f"run {i + 1} {name}: flood trusted {r['accepted_pct']}% p99 "
                          f"{r['latency_ms'].get('p99')} ms", flush=True)
            for r in (edge_a, edge_b, lanes, single):
                r.stop()
    print(report(out))
    path = a.out or (ROOT / "bench" / "out" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


def report(out: dict[str, Any]) -> str:
    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else 0.0
    lines = ["| layout | smtp-source 1 msg/conn, msgs/s | trusted accepted in flood | "
             "trusted p50 / p99 ms | spam accepted |", "|---|---:|---:|---:|---:|"]
    for name, label in (("single", "one host (role all)"),
                        ("cluster", "two edges + one lanes node (tcp + CURVE)")):
        fl = out[name]["flood"]
        p50 = med([f["latency_ms"].get("p50") or 0 for f in fl])
        p99 = med([f["latency_ms"].get("p99") or 0 for f in fl])
        acc = med([f["accepted_pct"] or 0 for f in fl])
        spam = med([(f["spam_accepted"] or 0) / f["seconds"] for f in fl])
        lines.append(f"| {label} | {med(out[name]['tp']):.0f} {out[name]['tp']} | {acc:g}% | "
                     f"{p50:.1f} / {p99:.1f} | {spam:.0f}/s (cap {BULK_RATE:g}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
