"""Issue 20: the flood through HAProxy (PROXY v2), against the same HAProxy without a flood.

Purpose
    The bench row "the same flood (300 stalling bots + 50 spam connections) through HAProxy
    (PROXY v2): allow-listed p99 <= 2x its no-flood p99 through the same HAProxy". One
    smtp-ingress (bench/configs/flood.toml, with listen.proxy_protocol, a fast port that takes
    PROXY headers too, HAProxy's address as the trusted proxy) behind a real HAProxy whose config
    is etc/examples/haproxy.cfg, the one docs/operations.md recommends, with only its addresses
    made loopback ones (render()). Every client, bots and the allow-listed sender (127.0.0.10)
    alike, connects to HAProxy; the ingress sees them by their real addresses (PROXY v2).
    Per run: the allow-listed sender alone (the reference), and the flood; the order alternates
    run by run; the report gives medians of the p99s and their ratio, and where the time went
    (per SMTP stage: connect = HAProxy's accept, banner = HAProxy's connect to the ingress, the
    PROXY header and the ingress's accept).

    Variants (--variants), each its own HAProxy over the same ingress, so a fix shows as a
    before/after in one sitting:
      recommended   etc/examples/haproxy.cfg as it is: allow-listed sources to listen.fast_port
      one-backend   the same without the use_backend line: everything to listen.port (the
                    issue's harness: "everything through it")
      nbthread1     the recommended config with one HAProxy thread

API / CLI
    python -m bench.proxy [--runs 3] [--flood-s 12] [--variants recommended,one-backend]
                          [--out FILE]
    render(template, port, backend_port, fast_port, allow_file, host) -> str    (pure)
    VARIANTS: name -> (rendered config -> the variant's config)                  (pure)
    summarise(runs) -> dict    medians and ratio of a variant's runs              (pure)

Failure modes
    ValueError from render() when the example config lost a line the bench rewrites (the
    bench then measures nothing rather than a config that is not the documented one). A target
    that does not start raises TargetError; every process started is stopped by PID.

Limits
    Loopback only; a 2-core machine shared with the load generator and HAProxy itself, so the
    absolute figures are this machine's. Needs haproxy on PATH.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import flood
from bench.report import save_json
from bench.run import sched_window
from bench.scenarios import (
    NOFLOOD_WARMUP,
    RCPT,
    SPF_BOTS_DOMAIN,
    TRUSTED_IP,
    build_scenarios,
    primed,
)
from bench.targets import CONFIGS, ROOT, Running, start_dns, start_ingress
from tests.kit.haproxy import HAProxy, free_port
from tests.kit.procs import Processes

EXAMPLE = ROOT / "etc" / "examples" / "haproxy.cfg"
HAPROXY_HOST = "127.0.0.1"          # HAProxy's frontend, and its source towards the ingress
# The example's addresses, and what render() puts in their place.
TOKENS = ("bind :25\n", "10.0.0.20:25 ", "10.0.0.20:2526 ", "/etc/haproxy/smtp-allow.lst")
FAST_ROUTE = "    use_backend smtp_fast "    # the line that sends the allow list to the fast port


def render(template: str, port: int, backend_port: int, fast_port: int, allow_file: str,
           host: str = HAPROXY_HOST) -> str:
    """The example config with its frontend on host:port and its servers at host:backend_port
    (listen.port) and host:fast_port (listen.fast_port), the allow list file `allow_file`
    (pure). ValueError if one of the lines it rewrites is not in `template`."""
    missing = [t for t in TOKENS if t not in template]
    if missing:
        raise ValueError(f"the HAProxy example lacks {missing!r}: bench.proxy.render needs them")
    return (template.replace(TOKENS[0], f"bind {host}:{port}\n")
            .replace(TOKENS[1], f"{host}:{backend_port} ")
            .replace(TOKENS[2], f"{host}:{fast_port} ")
            .replace(TOKENS[3], allow_file))


def _without(prefix: str) -> Callable[[str], str]:
    """An edit that drops the config's lines starting with `prefix` (ValueError: none)."""
    def edit(text: str) -> str:
        lines = text.splitlines(keepends=True)
        kept = [ln for ln in lines if not ln.startswith(prefix)]
        if len(kept) == len(lines):
            raise ValueError(f"the HAProxy example has no line {prefix!r}...")
        return "".join(kept)
    return edit


VARIANTS: dict[str, Callable[[str], str]] = {
    "recommended": lambda text: text,
    "one-backend": _without(FAST_ROUTE),
    "nbthread1": lambda text: text.replace("global\n", "global\n    nbthread 1\n", 1),
}


def ingress_overrides(dns: str) -> dict[str, dict[str, Any]]:
    """flood.toml behind HAProxy: PROXY headers on both ports, HAProxy the trusted proxy."""
    return {"listen": {"proxy_protocol": True, "trusted_proxies": [f"{HAPROXY_HOST}/32"],
                       "fast_port": 0, "fast_port_proxy_protocol": True},
            "classify": {"nameservers": [dns]}}


def one_run(port: int, flooded: bool, seconds: float) -> dict[str, Any]:
    """The allow-listed sender through HAProxy for `seconds`, with the issue-3 flood or alone."""
    bots = build_scenarios("full")["flood"].bots if flooded else flood.BotConfig()
    warm = 2.0 if flooded else NOFLOOD_WARMUP     # the sender primes the target first
    cfg = flood.FloodConfig(
        target=flood.Target(HAPROXY_HOST, port), duration_s=seconds + warm, bots=bots,
        legit=(primed("trusted", TRUSTED_IP),),
        warmup_s=warm, grace_s=10.0, rcpt=RCPT, deadline_s=10.0)
    cpu: dict[str, Any] = {}
    window = sched_window(cfg.startup_s + warm, seconds, cpu)
    res = flood.run_flood_sync(cfg)
    window.join(30)
    legit = res["legit"][0]
    spam = res.get("bots", {}).get("spam", {})
    stages = legit.get("stages_ms") or {}
    return {"flood": flooded, "accepted_pct": legit["accepted_pct"],
            "latency_ms": legit["latency_ms"],
            "stages_p99_ms": {k: v.get("p99") for k, v in stages.items()},
            "spam_accepted": spam.get("accepted"), "seconds": seconds,
            "cpu": {r["role"]: {"cpu_pct": r["cpu_pct"], "wait_per_slice_us":
                                r["wait_per_slice_us"]} for r in cpu.get("rows") or []
                    if (r["cpu_pct"] or 0) >= 1.0}}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over a variant's runs: reference and flood p50/p99, accepted %, the p99 ratio
    (median flood p99 / median reference p99), each run's own ratio (pure)."""
    def med(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 2) if xs else None
    ref = [r for r in runs if not r["flood"]]
    fl = [r for r in runs if r["flood"]]
    out: dict[str, Any] = {}
    for name, rs in (("ref", ref), ("flood", fl)):
        out[name] = {k: med([r["latency_ms"][k] for r in rs if r["latency_ms"].get(k) is not None])
                     for k in ("p50", "p99")}
        out[name]["accepted_pct"] = med([r["accepted_pct"] for r in rs
                                         if r["accepted_pct"] is not None])
        stages = {s for r in rs for s in r["stages_p99_ms"]}
        out[name]["stages_p99_ms"] = {s: med([r["stages_p99_ms"][s] for r in rs
                                              if r["stages_p99_ms"].get(s) is not None])
                                      for s in sorted(stages)}
    rp, fp = out["ref"]["p99"], out["flood"]["p99"]
    out["ratio"] = round(fp / rp, 2) if rp and fp else None
    out["run_ratios"] = [round(f["latency_ms"]["p99"] / r["latency_ms"]["p99"], 2)
                         for r, f in zip(ref, fl, strict=False)
                         if r["latency_ms"].get("p99") and f["latency_ms"].get("p99")]
    out["median_run_ratio"] = med(out["run_ratios"])
    return out


def report(out: dict[str, Any]) -> str:
    lines = ["| HAProxy config | no flood p50 / p99 ms | flood p50 / p99 ms | accepted in flood | "
             "p99 ratio of the medians (per run; their median) | flood p99 by stage, ms |",
             "|---|---:|---:|---:|---:|---|"]
    for name, s in out["summary"].items():
        st = ", ".join(f"{k} {v}" for k, v in s["flood"]["stages_p99_ms"].items())
        lines.append(f"| {name} | {s['ref']['p50']} / {s['ref']['p99']} | {s['flood']['p50']} / "
                     f"{s['flood']['p99']} | {s['flood']['accepted_pct']}% | {s['ratio']}x "
                     f"({s['run_ratios']}; {s['median_run_ratio']}x) | {st} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--flood-s", type=float, default=12.0, help="measured seconds per run")
    ap.add_argument("--variants", default="recommended,one-backend")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if not 1 <= a.runs <= 10 or not 3 <= a.flood_s <= 120 or not variants or \
            any(v not in VARIANTS for v in variants):
        ap.error(f"runs 1..10, flood-s 3..120, variants among {sorted(VARIANTS)}")
    flood.ensure_fd_limit(2000, "bench.proxy")
    template = EXAMPLE.read_text()
    out: dict[str, Any] = {"params": vars(a) | {"out": str(a.out)}, "runs": {}, "summary": {}}
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, Processes() as procs:
        d = Path(tmp)
        dns, _ = start_dns(procs, d / "dns", {
            "example.org": {"TXT": ["v=spf1 ?all"]},
            SPF_BOTS_DOMAIN: {"TXT": ["v=spf1 ip4:127.4.0.0/16 -all"]}})
        ing: Running = start_ingress(procs, d / "ingress", CONFIGS / "flood.toml",
                                     ingress_overrides(dns), name="smtp-ingress")
        allow = d / "smtp-allow.lst"
        allow.write_text("".join(f"{c}\n" for c in
                                 ing.info["config_tables"]["classify"]["allow_cidrs"]))
        for v in variants:
            hdir = d / f"haproxy-{v}"
            hdir.mkdir()
            port = free_port()
            text = VARIANTS[v](render(template, port, ing.port, int(ing.info["fast_port"]),
                                      str(allow)))
            hap = HAProxy.with_config(hdir, text, port)
            runs: list[dict[str, Any]] = []
            try:
                for i in range(a.runs):
                    for flooded in (False, True) if i % 2 == 0 else (True, False):
                        r = one_run(port, flooded, a.flood_s)
                        runs.append(r)
                        print(f"{v} run {i + 1} {'flood' if flooded else 'ref  '}: "
                              f"{r['accepted_pct']}% p50 {r['latency_ms'].get('p50')} p99 "
                              f"{r['latency_ms'].get('p99')} ms stages p99 "
                              f"{r['stages_p99_ms']} cpu {r['cpu']}", flush=True)
            finally:
                hap.stop()
            out["runs"][v] = runs
            out["summary"][v] = summarise(runs)
        ing.stop()
    print(report(out))
    save_json(out, "proxy", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
