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
    - redis (issue 20): the same cluster with a shared Redis ([cluster] redis, edges = 2; a
      redis-server on a unix socket, tests.kit.redisserver); per run, the allow-listed sender
      alone through edge A (the reference) and the flood, during which Redis is killed (SIGKILL
      by PID) at a third of the measured window and started again (empty) at two thirds; the
      allow-listed p99 against the reference's (and its p99 in each phase), and the spam
      accepted over both edges (their "message" log lines, lane bulk) in each phase against
      the cap: lanes.bulk.rate x seconds + one burst, with Redis down its local shares'
      BULK_SHARE (1.1) x rate.
    Runs alternate (single, cluster, single, ...; reference, flood, flood, reference, ...) and
    the report gives medians.

Usage
    python -m bench.cluster [--runs 3] [--messages 4000] [--flood-s 12]
                            [--phases tp,flood,redis] [--out DIR]
    phase_bounds(start, seconds) -> (start, kill, restart, end)                  (pure)
    phase_rows(times, bounds, rate, burst) -> one row per phase against the cap  (pure)

Everything runs on loopback; every process started is stopped by PID (tests.kit.procs); every
load is bounded in count and time. This is a 2-core machine shared with the load generator:
the two layouts have the same cores, so the cluster figures show the cost of the extra hop
(tcp + CURVE between edge and lanes), not a capacity gain.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import flood
from bench import throughput as tp
from bench.report import save_json
from bench.scenarios import primed
from bench.targets import CONFIGS, Running, _log_docs, start_ingress
from ingress.core.derived import BULK_SHARE
from tests.kit.clusterkit import free_base, keygen
from tests.kit.procs import Processes
from tests.kit.redisserver import RedisServer

LANES_HOST, EDGE_A, EDGE_B = "127.0.0.2", "127.0.0.1", "127.0.0.5"
TRUSTED = "127.0.0.10"
BULK_RATE = 200.0
REDIS_BURST = 20        # the redis phase's bucket depth (0.1 s of rate, as flood.toml): a phase
                        # of a few seconds measures the cap, not one second's burst
PHASES = ("before kill", "Redis down", "after restart")
RCPT = "user@example.test"


def common(capped: bool, redis: str = "") -> dict[str, dict[str, Any]]:
    """The throughput runs measure the ingress, not the bulk cap (uncapped, as bench/run.py's
    throughput.toml); the flood runs have the cap; with `redis`, the cap is shared in it."""
    out: dict[str, dict[str, Any]] = {
        "classify": {"allow_cidrs": [f"{TRUSTED}/32"]},
        "lanes.bulk": {"rate": BULK_RATE if capped else 0.0}}
    if redis:
        out["lanes.bulk"]["burst"] = REDIS_BURST
    return out


def phase_bounds(start: float, seconds: float) -> tuple[float, float, float, float]:
    """(start, kill, restart, end) of a measured window: Redis killed at a third, started
    again at two thirds (pure)."""
    return start, start + seconds / 3, start + 2 * seconds / 3, start + seconds


def phase_rows(times: list[float], bounds: tuple[float, ...], rate: float, burst: float,
               down: int = 1) -> list[dict[str, Any]]:
    """Per phase [bounds[i], bounds[i+1]): the messages accepted (`times`, wall clock), their
    rate, and the cap they are held to: rate x seconds + one burst, BULK_SHARE x rate in the
    phase `down` (Redis down: each acceptor holds its local share, 1.1 x its part) (pure)."""
    rows = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        n = sum(1 for t in times if a <= t < b)
        secs = max(b - a, 1e-9)
        cap = rate * (BULK_SHARE if i == down else 1.0)
        limit = cap * secs + burst
        rows.append({"phase": PHASES[i] if i < len(PHASES) else str(i), "seconds": round(secs, 2),
                     "accepted": n, "per_s": round(n / secs, 1), "cap_per_s": round(cap, 1),
                     "limit": round(limit), "held": n <= limit})
    return rows


def start_single(procs: Processes, d: Path, capped: bool) -> Running:
    return start_ingress(procs, d / "single", CONFIGS / "throughput.toml", common(capped),
                         name="single")


def start_cluster(procs: Processes, d: Path, capped: bool, redis: str = "") -> list[Running]:
    d.mkdir(parents=True, exist_ok=True)
    keys = d / "keys"
    allowed = d / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    lanes_pub, lanes_sec = keygen(keys, "lanes")
    edge_keys = [keygen(keys, f"edge{i}") for i in range(2)]
    for i, (pub, _) in enumerate(edge_keys):
        (allowed / f"edge{i}.key").write_bytes(pub.read_bytes())
    base = f"tcp://{LANES_HOST}:{free_base(LANES_HOST)}"
    shared = {"redis": redis, "edges": 2} if redis else {}
    lanes = start_ingress(procs, d / "lanes", CONFIGS / "throughput.toml", {
        **common(capped, redis), "cluster": {"role": "lanes", "secret_key": str(lanes_sec),
                                       "lanes_bind": base, "allowed_keys": str(allowed),
                                       **shared}},
        name="lanes")
    edges = []
    for i, host in enumerate((EDGE_A, EDGE_B)):
        edges.append(start_ingress(procs, d / f"edge{i}", CONFIGS / "throughput.toml", {
            **common(capped, redis), "listen": {"host": host, "port": 0},
            "cluster": {"role": "edge", "secret_key": str(edge_keys[i][1]),
                        "lanes_nodes": [f"{base} {lanes_pub}"], **shared}}, name=f"edge{i}"))
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


def flood_config(host: str, port: int, seconds: float, bots: bool = True) -> flood.FloodConfig:
    """300 stalling bots + 50 spam connections (or none: the reference) and the allow-listed
    sender, `seconds` in all, the sender from 2 s on."""
    return flood.FloodConfig(
        target=flood.Target(host, port), duration_s=seconds,
        bots=flood.BotConfig(stallers=300, spammers=50, spam_per_conn=100, spam_rcpt=RCPT,
                             spam_from="spam@bots.invalid", ramp_s=1.0) if bots
        else flood.BotConfig(),
        legit=(primed("trusted", TRUSTED),),
        warmup_s=2.0, grace_s=10.0, rcpt=RCPT, deadline_s=10.0)


def flood_run(host: str, port: int, seconds: float, bots: bool = True,
              cfg: flood.FloodConfig | None = None) -> dict[str, Any]:
    cfg = cfg or flood_config(host, port, seconds, bots)
    res = flood.run_flood_sync(cfg)
    legit = res["legit"][0]
    timeline = [(a["t"] - cfg.warmup_s, a["latency_ms"]) for a in legit.get("timeline") or []
                if a["outcome"] == "accepted"]
    spam = res["bots"]["spam"] if "bots" in res else {}
    return {"accepted_pct": legit["accepted_pct"], "latency_ms": legit["latency_ms"],
            "spam_accepted": spam.get("accepted"), "spam_sent": spam.get("sent"),
            "seconds": seconds, "timeline": timeline,
            "stages_p99_ms": {k: v.get("p99") for k, v in (legit.get("stages_ms") or {}).items()}}


def redis_run(edges: list[Running], redis: RedisServer, seconds: float) -> dict[str, Any]:
    """The flood through edge A (`seconds` measured, after 2 s of warm-up), Redis killed at a
    third of the measured window and started again at two thirds; the phases' spam against
    the cap, from both edges' logs."""
    edge = edges[0]
    cfg = flood_config(edge.host, edge.port, seconds + 2.0)
    start = time.time() + cfg.startup_s + cfg.warmup_s
    planned = phase_bounds(start, seconds)
    done: list[float] = [start]

    def outage() -> None:
        for at, act in ((planned[1], redis.kill), (planned[2], redis.start)):
            time.sleep(max(0.0, at - time.time()))
            act()
            done.append(time.time())
    t = threading.Thread(target=outage, daemon=True)
    t.start()
    r = flood_run(edge.host, edge.port, seconds, cfg=cfg)
    t.join(30)
    if redis.proc is None:      # the restart failed or never ran: the next run needs it
        redis.start()
    bounds = (*done[:3], planned[3]) if len(done) == 3 else planned
    docs = [doc for e in edges for doc in _log_docs(Path(e.info["log"]))]
    times = [float(doc["ts"]) for doc in docs
             if doc.get("event") == "message" and doc.get("lane") == "bulk"]
    r["phases"] = phase_rows(times, bounds, BULK_RATE, REDIS_BURST)
    for row, a, b in zip(r["phases"], bounds, bounds[1:], strict=False):   # the sender's p99
        row["trusted_p99_ms"] = flood.percentile_nearest_rank(
            [ms for t, ms in r["timeline"] if a - start <= t < b - start], 99)
    r["state_events"] = [(doc["event"], doc.get("acceptor"), round(float(doc["ts"]) - start, 2))
                         for doc in docs if str(doc.get("event")).startswith("cluster_state_")
                         and start - 5 <= float(doc["ts"])]
    # how long after the kill / the restart every acceptor had noticed (each one's first
    # down after the kill, first up after the restart; the last of them), and how many
    for key, event, at in (("down_s", "cluster_state_down", bounds[1]),
                           ("rejoin_s", "cluster_state_up", bounds[2])):
        first: dict[str, float] = {}
        for doc in docs:
            dt = float(doc["ts"]) - at
            if doc.get("event") == event and 0 <= dt < 10:
                who = str(doc.get("acceptor"))
                first[who] = min(dt, first.get(who, dt))
        r[key] = round(max(first.values()), 2) if first else None
        r[key.replace("_s", "_events")] = len(first)
    return r


def redis_phase(procs: Processes, d: Path, runs: int, seconds: float) -> dict[str, Any]:
    """The cluster with Redis: per run, the reference and the flood with the outage, alternated."""
    redis = RedisServer()
    out: dict[str, Any] = {"ref": [], "flood": []}
    try:
        redis.start()
        lanes, edge_a, edge_b = start_cluster(procs, d, True, redis.url)
        for i in range(runs):
            for name in ("ref", "flood") if i % 2 == 0 else ("flood", "ref"):
                if name == "ref":
                    r = flood_run(edge_a.host, edge_a.port, seconds + 2.0, bots=False)
                else:
                    r = redis_run([edge_a, edge_b], redis, seconds)
                out[name].append(r)
                print(f"run {i + 1} redis {name}: trusted {r['accepted_pct']}% p99 "
                      f"{r['latency_ms'].get('p99')} ms {r['stages_p99_ms']} " + " | ".join(
                          f"{p['phase']} {p['per_s']}/s (cap {p['cap_per_s']}) "
                          f"{'held' if p['held'] else 'OVER'} trusted p99 {p['trusted_p99_ms']}"
                          for p in r.get("phases", []))
                      + (f" | down noticed {r['down_s']} s ({r['down_events']}), rejoined "
                         f"{r['rejoin_s']} s ({r['rejoin_events']})" if "phases" in r else ""),
                      flush=True)
        for node in (edge_a, edge_b, lanes):
            node.stop()
    finally:
        redis.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--flood-s", type=float, default=12.0)
    ap.add_argument("--phases", default="tp,flood,redis")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    phases = [p for p in a.phases.split(",") if p]
    if not 1 <= a.runs <= 10 or not 100 <= a.messages <= 50_000 or not 4 <= a.flood_s <= 120 \
            or not phases or any(p not in ("tp", "flood", "redis") for p in phases):
        ap.error("runs 1..10, messages 100..50000, flood-s 4..120, phases among tp,flood,redis")
    flood.ensure_fd_limit(2000, "bench.cluster")
    out: dict[str, Any] = {"single": {"tp": [], "flood": []}, "cluster": {"tp": [], "flood": []},
                           "params": vars(a) | {"out": str(a.out)}}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, Processes() as procs:
        d = Path(tmp)
        for phase, capped in (("tp", False), ("flood", True)):
            if phase not in phases:
                continue
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
        if "redis" in phases:
            out["redis"] = redis_phase(procs, d / "redis", a.runs, a.flood_s)
    print(report(out))
    save_json(out, "cluster", a.out)
    return 0


def report(out: dict[str, Any]) -> str:
    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else 0.0
    lines = []
    if out["single"]["tp"] or out["single"]["flood"]:
        lines += ["| layout | smtp-source 1 msg/conn, msgs/s | trusted accepted in flood | "
                  "trusted p50 / p99 ms | spam accepted |", "|---|---:|---:|---:|---:|"]
    for name, label in (("single", "one host (role all)"),
                        ("cluster", "two edges + one lanes node (tcp + CURVE)")):
        if not (out[name]["tp"] or out[name]["flood"]):
            continue
        fl = out[name]["flood"]
        p50 = med([f["latency_ms"].get("p50") or 0 for f in fl])
        p99 = med([f["latency_ms"].get("p99") or 0 for f in fl])
        acc = med([f["accepted_pct"] or 0 for f in fl])
        spam = med([(f["spam_accepted"] or 0) / f["seconds"] for f in fl])
        lines.append(f"| {label} | {med(out[name]['tp']):.0f} {out[name]['tp']} | {acc:g}% | "
                     f"{p50:.1f} / {p99:.1f} | {spam:.0f}/s (cap {BULK_RATE:g}) |")
    if "redis" in out:
        lines += ["", redis_report(out["redis"])]
    return "\n".join(lines)


def redis_report(rd: dict[str, Any]) -> str:
    """The redis phase's row: medians of the p99s, their ratio, each run's own ratio, the spam
    accepted per phase (median msgs/s over the runs) and whether every run held the cap."""
    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 2) if xs else 0.0
    ref, fl = rd["ref"], rd["flood"]
    rp = med([r["latency_ms"].get("p99") or 0 for r in ref])
    fp = med([r["latency_ms"].get("p99") or 0 for r in fl])
    runs = [round(f["latency_ms"]["p99"] / r["latency_ms"]["p99"], 2) for r, f in
            zip(ref, fl, strict=False) if r["latency_ms"].get("p99") and f["latency_ms"].get("p99")]
    phases = " / ".join(
        f"{med([r['phases'][i]['per_s'] for r in fl])} (cap {fl[0]['phases'][i]['cap_per_s']})"
        for i in range(len(PHASES))) if fl else "-"
    held = all(p["held"] for r in fl for p in r["phases"])
    return "\n".join([
        "| two edges + one lanes node, shared Redis killed and restarted | no flood p50 / p99 ms "
        "| flood p50 / p99 ms | accepted in flood | p99 ratio of the medians (per run) | "
        "spam/s before kill / "
        "Redis down / after restart | cap held in every phase |",
        "|---|---:|---:|---:|---:|---|---|",
        f"| allow-listed 127.0.0.10 via edge A | "
        f"{med([r['latency_ms'].get('p50') or 0 for r in ref])} / {rp} | "
        f"{med([r['latency_ms'].get('p50') or 0 for r in fl])} / {fp} | "
        f"{med([r['accepted_pct'] or 0 for r in fl])}% | "
        f"{round(fp / rp, 2) if rp else '-'}x {runs}, median {med(runs)}x | {phases} | "
        f"{'yes' if held else 'NO'} ({len(fl)} runs) |"])


if __name__ == "__main__":
    sys.exit(main())
