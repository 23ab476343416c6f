"""Benchmark report: summaries, the issue-3 acceptance checks, Markdown tables and the latency plot.

Purpose
    Turn the run document that bench/run.py writes (one JSON per run) into what a reader needs:
    per-scenario, per-target rows (legitimate mail accepted %, latency percentiles, tempfails by
    code, spam accepted and shed, connections refused), the acceptance checks of issue 3 (trusted
    100% during the flood, trusted p99 <= 2x its no-flood p99, bulk accepted rate within 5% of
    the configured cap, trusted 100% with 5,000 bots), the smtp-source throughput table (medians
    and ratios against Postfix), and a PNG of legitimate-mail latency over time during the floods,
    the targets side by side. Everything except ``plot`` is pure (no I/O) and unit-tested on fixed
    inputs (tests/unit/test_bench_report.py).

API
    median(values) -> float | None                 statistics.median, None for no values
    ratio(value, base) -> float | None             value / base; None when either is missing/0
    pct_change(value, base) -> float | None        100 * (value - base) / base
    summarise_flood(result) -> dict                one flood result (bench.flood) -> a table row
    acceptance(doc) -> list[dict]                  issue-3 checks: {check, required, measured,
                                                   ok (True/False/None = not measured), detail}
    throughput_rows(tp, baseline="postfix") -> list[dict]
    render_markdown(doc) -> str                    the whole report (tables, notes)
    plot(doc, path, scenarios=("flood", "large")) -> Path | None   matplotlib; None if no data
    section(title, columns) -> list[str]           a report section's heading and table header
    verdict(ok) -> str                             "yes", "NO", or "-" (not judged)
    save_json(doc, name, path=None) -> Path        write a run document (without a path:
                                                   bench/out/<name>-<time>.json), say where
    python -m bench.report RUN.json [--md OUT.md] [--png OUT.png]  re-render a stored run

Conventions
    Percentiles are the flood generator's nearest-rank values (no interpolation). Accepted % is
    strict: accepted / every scheduled attempt; an attempt still unanswered when the run ended
    (plus its grace) counts as not accepted ("unfinished" in the failures), unlike
    bench.flood's own accepted_pct, which leaves those out.
    "n/a" means the target has no such sender (no mutual-TLS port). A check that
    could not be measured (target or scenario missing) is reported as "not measured", never as
    passed.

Limits
    The document layout is bench/run.py's (``version`` 1); unknown keys are ignored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.flood.probe import STALL_MS

KINDS = ("trusted", "cert", "spf")
EXTRA_KINDS = ("dnswl", "pool")     # issue 18: a column only where one ran
TARGET_ORDER = ("smtp-ingress", "postfix", "aiosmtpd")
BOT_ROLES = ("stall", "trickle", "early")

# --------------------------------------------------------------------------------------------
# Small numeric helpers


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def pct_change(value: float | None, base: float | None) -> float | None:
    r = ratio(value, base)
    return None if r is None else 100.0 * (r - 1.0)


def _fmt_num(x: float | None, nd: int = 0, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:,.{nd}f}{unit}"


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _fmt_pct(x: float | None) -> str:
    if x is None:
        return "-"
    return "100%" if x == 100 else f"{x:.1f}%"


def _codes(d: dict[str, int] | None) -> str:
    if not d:
        return ""
    return ", ".join(f"{k}x{v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------------------------
# Flood summaries


def _legit_summary(s: dict[str, Any]) -> dict[str, Any]:
    lat = s.get("latency_ms") or {}
    failures: dict[str, int] = {}
    for code, n in (s.get("tempfails") or {}).items():
        failures[str(code)] = failures.get(str(code), 0) + n
    for code, n in (s.get("permfails") or {}).items():
        failures[str(code)] = failures.get(str(code), 0) + n
    for stage, n in (s.get("timeouts") or {}).items():
        failures[f"timeout@{stage}"] = failures.get(f"timeout@{stage}", 0) + n
    for what, n in (s.get("conn_errors") or {}).items():
        failures[what] = failures.get(what, 0) + n
    if s.get("refused"):
        failures["refused"] = failures.get("refused", 0) + int(s["refused"])
    if s.get("unfinished"):
        failures["unfinished"] = failures.get("unfinished", 0) + int(s["unfinished"])
    attempts, accepted = int(s.get("attempts", 0) or 0), int(s.get("accepted", 0) or 0)
    return {
        "name": s.get("name"), "kind": s.get("kind"), "attempts": attempts,
        "accepted": accepted,
        # Strict: over every scheduled attempt; one still unanswered at the end is not accepted
        # (bench.flood's own accepted_pct leaves those out of the denominator).
        "accepted_pct": round(100.0 * accepted / attempts, 3) if attempts else None,
        "unfinished": s.get("unfinished", 0),
        "p50": lat.get("p50"), "p95": lat.get("p95"), "p99": lat.get("p99"),
        "max": lat.get("max"), "n": lat.get("n", 0),
        "tempfails": dict(s.get("tempfails") or {}), "failures": failures,
        "stages_ms": dict(s.get("stages_ms") or {}),
    }


def summarise_flood(result: dict[str, Any]) -> dict[str, Any]:
    """One bench.flood result -> {legit: {kind: ...}, spam: {...}, bots: {...}}."""
    legit: dict[str, Any] = {}
    for s in result.get("legit") or []:
        legit[str(s.get("kind"))] = _legit_summary(s)
    bots = result.get("bots") or {}
    sp = bots.get("spam") or {}
    spam = {
        "bots": sp.get("bots", 0), "sent": sp.get("sent", 0), "accepted": sp.get("accepted", 0),
        "accepted_per_s": sp.get("accepted_per_s"), "sent_per_s": sp.get("sent_per_s"),
        "shed": dict(sp.get("shed") or {}), "shed_total": sum((sp.get("shed") or {}).values()),
        "shed_by_stage": dict(sp.get("shed_by_stage") or {}),
        "rejected": dict(sp.get("rejected") or {}), "refused": sp.get("refused", 0),
        "timeouts": sum((sp.get("timeouts") or {}).values()),
        "conn_errors": sum((sp.get("conn_errors") or {}).values()),
        "active_s": sp.get("active_s"),
    }
    idle: dict[str, Any] = {"bots": 0, "connections": 0, "connected": 0, "refused": 0,
                            "connect_timeouts": 0, "banner_codes": {}, "open_at_end": 0,
                            "no_banner_at_end": 0, "closed_by_server": 0, "early_first": {}}
    for role in BOT_ROLES:
        b = bots.get(role) or {}
        for k in ("bots", "connections", "connected", "refused", "connect_timeouts",
                  "open_at_end", "no_banner_at_end", "closed_by_server"):
            idle[k] += int(b.get(k, 0) or 0)
        for code, n in (b.get("banner_codes") or {}).items():
            idle["banner_codes"][code] = idle["banner_codes"].get(code, 0) + n
        if role == "early":
            idle["early_first"] = dict(b.get("first_replies") or {})
    idle["refused_421"] = idle["banner_codes"].get("421", 0)
    return {"legit": legit, "spam": spam, "bots": idle,
            "duration_s": result.get("duration_s"), "target": result.get("target")}


def _probe_health(doc: dict[str, Any], scen: dict[str, Any], targets: list[str]) -> list[str]:
    """The probe's own stalls per run (bench.flood.probe): a figure measured across them is
    the probe's, not the target's."""
    rows = []
    for label, t, e in _entries(doc, scen, targets):
        p = (e.get("result") or {}).get("probe")
        if p:
            rows.append([label, t, str(p.get("priority")),
                         f"{p.get('stalls', 0):,} (max {_fmt_num(p.get('max_ms'), 1)} ms)"])
    if not rows:
        return []
    return ["### The probe's own health", "",
            "The legitimate senders' event loop: its scheduling priority, and how often it woke "
            f"more than {STALL_MS:g} ms late (a stall of the measuring process itself, not of "
            "the target; bench.flood.probe).", "",
            *_table(["scenario", "target", "probe priority", "probe stalls"], rows), ""]


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    if "summary" in entry:
        return entry["summary"]
    return summarise_flood(entry.get("result") or {})


def flood_targets(doc: dict[str, Any]) -> list[str]:
    """Targets that ran the floods, smtp-ingress first, then Postfix and aiosmtpd."""
    names = [t for t, v in (doc.get("targets") or {}).items()
             if v.get("status") == "ok" and v.get("role", "flood") == "flood"]
    rank = {t: i for i, t in enumerate(TARGET_ORDER)}
    return sorted(names, key=lambda t: (rank.get(t, len(rank)), t))


def _entries(doc: dict[str, Any], scen: dict[str, Any],
             targets: list[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(scenario label, target, flood result) for every result, in table order."""
    for name, sc in scen.items():
        for t in targets:
            e = _find(doc, name, t)
            if e is not None:
                yield sc.get("label", name), t, e


def _find(doc: dict[str, Any], scenario: str, target: str) -> dict[str, Any] | None:
    for e in doc.get("flood") or []:
        if e.get("scenario") == scenario and e.get("target") == target and e.get("result"):
            return e
    return None


# --------------------------------------------------------------------------------------------
# Issue-3 acceptance


def acceptance(doc: dict[str, Any], target: str = "smtp-ingress") -> list[dict[str, Any]]:
    """The issue-3 figures for ``target``, from scenarios noflood, flood and large."""
    params = doc.get("params") or {}
    cap = params.get("bulk_rate_cap")
    tol = params.get("bulk_rate_tolerance_pct", 5.0)
    p99_max = params.get("p99_max_ratio", 2.0)
    out: list[dict[str, Any]] = []

    def trusted(scn: str) -> dict[str, Any] | None:
        e = _find(doc, scn, target)
        return None if e is None else _summary(e)["legit"].get("trusted")

    flood, base, large = trusted("flood"), trusted("noflood"), trusted("large")
    fe = _find(doc, "flood", target)
    label = (doc.get("scenarios") or {}).get("flood", {}).get("label", "flood")
    label_l = (doc.get("scenarios") or {}).get("large", {}).get("label", "large")

    def acc_check(t: dict[str, Any] | None, what: str) -> dict[str, Any]:
        if t is None:
            return {"check": f"trusted accepted, {what}", "required": "100%",
                    "measured": "not measured", "ok": None, "detail": ""}
        ok = t["attempts"] > 0 and t["accepted"] == t["attempts"]
        return {"check": f"trusted accepted, {what}", "required": "100%",
                "measured": f"{_fmt_pct(t['accepted_pct'])} ({t['accepted']}/{t['attempts']})",
                "ok": ok, "detail": _codes(t["failures"])}

    out.append(acc_check(flood, label))
    if flood is None or base is None or flood["p99"] is None or base["p99"] is None:
        out.append({"check": "trusted p99 during flood / no-flood p99",
                    "required": f"<= {p99_max:g}x", "measured": "not measured", "ok": None,
                    "detail": ""})
    else:
        r = ratio(flood["p99"], base["p99"])
        assert r is not None
        out.append({"check": "trusted p99 during flood / no-flood p99",
                    "required": f"<= {p99_max:g}x",
                    "measured": f"{r:.2f}x ({_fmt_ms(flood['p99'])} / {_fmt_ms(base['p99'])} ms)",
                    "ok": r <= p99_max,
                    "detail": f"p50 {_fmt_ms(flood['p50'])} vs {_fmt_ms(base['p50'])} ms"})
    rate = None if fe is None else _summary(fe)["spam"].get("accepted_per_s")
    if cap is None or rate is None:
        out.append({"check": "bulk accepted rate vs cap", "required": f"cap ± {tol:g}%",
                    "measured": "not measured", "ok": None, "detail": ""})
    else:
        dev = pct_change(rate, cap)
        assert dev is not None
        sp = _summary(fe)["spam"] if fe else {}
        out.append({"check": "bulk accepted rate vs cap",
                    "required": f"{cap:g}/s ± {tol:g}%",
                    "measured": f"{rate:,.1f}/s ({dev:+.1f}%)", "ok": abs(dev) <= tol,
                    "detail": f"spam sent {sp.get('sent', 0):,}, accepted "
                              f"{sp.get('accepted', 0):,}, shed {_codes(sp.get('shed'))}"})
    out.append(acc_check(large, label_l))
    return out


# --------------------------------------------------------------------------------------------
# Throughput


def throughput_rows(tp: dict[str, Any], baseline: str = "postfix") -> list[dict[str, Any]]:
    """Median msgs/s per target and mode, with the ratio against ``baseline`` (same run)."""
    runs = tp.get("runs") or []
    targets = tp.get("targets") or sorted({r["target"] for r in runs})
    modes = tp.get("modes") or ["conn", "reuse"]
    rows = []
    for t in targets:
        row: dict[str, Any] = {"target": t}
        for m in modes:
            rates = [r["rate"] for r in runs if r["target"] == t and r["mode"] == m and r["ok"]]
            base = [r["rate"] for r in runs if r["target"] == baseline and r["mode"] == m
                    and r["ok"]]
            med = median(rates)
            row[m] = {"median": med, "ratio": ratio(med, median(base)),
                      "runs": [round(r["rate"], 1) if r["ok"] else None for r in runs
                               if r["target"] == t and r["mode"] == m]}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Markdown


def _legit_cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "n/a"
    return (f"{_fmt_pct(s['accepted_pct'])} · {_fmt_ms(s['p50'])}/{_fmt_ms(s['p95'])}/"
            f"{_fmt_ms(s['p99'])}")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    align = align or "l" * len(head)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def _machine_line(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    mem = m.get("mem_total_mb")
    pf = (doc.get("versions") or {}).get("postfix")
    return (f"{m.get('nproc', '?')} cores ({m.get('cpu_model', '?')}), "
            f"{_fmt_num(mem / 1024 if mem else None, 1)} GB RAM, Linux {m.get('kernel', '?')}, "
            f"Python {m.get('python', '?')}" + (f", Postfix {pf}" if pf else "") +
            f"; load average at start {m.get('loadavg_start', '?')}, "
            f"at end {m.get('loadavg_end', '?')}")


STAGES = ("connect", "banner", "EHLO", "TLS", "MAIL", "RCPT", "DATA", "DOT")


def _where_the_time_goes(doc: dict[str, Any], scen: dict[str, Any]) -> list[str]:
    """smtp-ingress, per scenario: the allow-listed sender's stages (p50, and the mean over its
    slowest 1%), and CPU / run-queue wait per process role over the measured window."""
    out: list[str] = []
    entries = list(_entries(doc, scen, ["smtp-ingress"]))

    def stages(e: dict[str, Any]) -> dict[str, Any]:
        return dict((_summary(e)["legit"].get("trusted") or {}).get("stages_ms") or {})

    keys = [k for k in STAGES if any(k in stages(e) for _l, _t, e in entries)]
    stage_rows = [[label] + [f"{st[k]['p50']:.1f} / {st[k]['tail_mean']:.1f}" if k in st
                             else "-" for k in keys]
                  for label, _t, e in entries if (st := stages(e))]
    sched_rows = [[label, "; ".join(
        f"{r['role']} {r['cpu_pct']:g}% cpu, {r['wait_per_slice_us']:g} µs wait/run"
        for r in (e.get("sched") or [])[:8]
        if r.get("cpu_pct") and r.get("wait_per_slice_us") is not None)]
        for label, _t, e in entries if e.get("sched")]
    if stage_rows:
        out += ["### Where the allow-listed sender's time goes (smtp-ingress)", "",
                "ms per SMTP stage: p50 / mean over its slowest 1% of transactions.", ""]
        out += _table(["scenario", *keys], stage_rows, "l" + "r" * len(keys))
        out.append("")
    if sched_rows:
        out += ["### CPU per process role over the measured window (bench/sched.py)", "",
                "% of one core, and the mean time a wake-up of that role waited for a core.",
                ""]
        out += _table(["scenario", "roles (most CPU first)"], sched_rows)
        out.append("")
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    """The whole report as Markdown (deterministic for a given document)."""
    params = doc.get("params") or {}
    out: list[str] = []
    out.append(f"Run `{doc.get('command', 'python -m bench.run')}` ({doc.get('mode', '?')}), "
               f"started {doc.get('started', '?')}, took {_fmt_num(doc.get('elapsed_s'), 0)} s.")
    out.append("")
    out.append(f"Machine: {_machine_line(doc)}.")
    g = doc.get("git") or {}
    if g.get("commit"):
        out.append("")
        out.append(f"Code: commit {g['commit'][:10]}" +
                   (" (ingress/ or workers/ modified)" if g.get("dirty") else "") + ".")
    out.append("")
    tnotes = []
    for name, t in (doc.get("targets") or {}).items():
        if t.get("status") != "ok":
            tnotes.append(f"- **{name}**: skipped — {t.get('reason', 'unknown reason')}")
    if tnotes:
        out += ["Targets left out:", "", *tnotes, ""]

    checks = acceptance(doc)
    out += ["### Issue 3 acceptance (smtp-ingress)", ""]
    rows = [[c["check"], c["required"], c["measured"],
             "not measured" if c["ok"] is None else ("pass" if c["ok"] else "**FAIL**"),
             c["detail"] or ""] for c in checks]
    out += _table(["check", "required", "measured", "result", "detail"], rows)
    out.append("")

    scen = doc.get("scenarios") or {}
    targets = flood_targets(doc)
    out += ["### Legitimate mail during the floods", "",
            "Each legitimate sender sends one message every "
            f"{_fmt_num(params.get('legit_interval_s'), 2)} s on a fresh connection; latency "
            "is connect → 250 after DATA. Cells: accepted % · p50/p95/p99 ms (nearest rank). "
            "cert = client certificate on the mutual-TLS port (n/a: the target has none); "
            "spf = SPF-pass domain; dnswl = on a DNS allow list (issue 18); pool = a "
            "provider's pool of addresses (issue 18).", ""]
    rows = []
    entries = list(_entries(doc, scen, targets))
    kinds = (*KINDS, *(k for k in EXTRA_KINDS        # issue 18's senders, where they ran
                       if any(k in _summary(e)["legit"] for _, _, e in entries)))
    for label, t, e in entries:
        s = _summary(e)
        fails = {}
        for k in kinds:
            ls = s["legit"].get(k)
            if ls:
                for code, n in ls["failures"].items():
                    fails[f"{k}: {code}"] = n
        rows.append([label, t,
                     *[_legit_cell(s["legit"].get(k)) for k in kinds],
                     _codes(fails) or "—"])
    out += _table(["scenario", "target", *kinds, "failures (sender: code x count)"], rows)
    out.append("")

    out += ["### What the bots got", "",
            "spam: messages sent (reached MAIL FROM) and accepted per second over the scenario, "
            "shed = 4xx replies by code; idle bots (stall/trickle/early): connections made, "
            "421 before the banner, refused/timed-out connects, still open at the end. "
            "listen drops: kernel TcpExt ListenOverflows+ListenDrops during the scenario "
            "(whole network namespace).", ""]
    rows = []
    for label, t, e in _entries(doc, scen, targets):
        s = _summary(e)
        sp, b = s["spam"], s["bots"]
        spam_cell = "—" if not sp["bots"] else (
            f"{sp['sent']:,} sent ({_fmt_num(sp['sent_per_s'], 0)}/s), "
            f"{sp['accepted']:,} accepted ({_fmt_num(sp['accepted_per_s'], 1)}/s)")
        shed = _codes(sp["shed"]) if sp["bots"] else ""
        rej = _codes(sp["rejected"]) if sp["bots"] else ""
        idle_cell = "—" if not b["bots"] else (
            f"{b['bots']:,} bots: {b['connections']:,} conns, 421x{b['refused_421']:,}, "
            f"refused {b['refused']:,}, connect timeouts {b['connect_timeouts']:,}, "
            f"open at end {b['open_at_end']:,} (no banner {b['no_banner_at_end']:,})")
        if b.get("early_first"):
            idle_cell += f"; early talkers' first reply {_codes(b['early_first'])}"
        ns = e.get("netstat_delta") or {}
        drops = (ns.get("ListenOverflows", 0) or 0) + (ns.get("ListenDrops", 0) or 0)
        rows.append([label, t, spam_cell, shed or "—", rej or "—",
                     idle_cell, f"{drops:,}" if ns else "-"])
    out += _table(["scenario", "target", "spam", "spam shed (4xx)", "spam rejected (5xx)",
                   "idle bots", "listen drops"], rows)
    out.append("")
    out += _probe_health(doc, scen, targets)

    out += _where_the_time_goes(doc, scen)

    tp = doc.get("throughput") or {}
    if tp.get("skipped"):
        out += ["### Throughput (smtp-source)", "", f"Skipped: {tp['skipped']}", ""]
    elif tp.get("runs"):
        p = tp.get("params") or {}
        out += ["### Throughput (smtp-source)", "",
                f"`smtp-source -s {p.get('sessions')} -l {p.get('size')} -m {p.get('messages')}`"
                f" (one message per connection) and the same with `-d` (many per connection); "
                f"median of {p.get('runs')} runs, interleaved; ratio against Postfix measured in "
                f"the same run. smtp-ingress: bench/configs/throughput.toml (bulk lane, "
                f"uncapped, per-IP limits off, durable spool).", ""]
        rows = []
        for r in throughput_rows(tp):
            cells = [r["target"]]
            for m in ("conn", "reuse"):
                if m in r:
                    cells += [_fmt_num(r[m]["median"], 0),
                              "-" if r[m]["ratio"] is None else f"{r[m]['ratio']:.2f}",
                              ", ".join("fail" if x is None else f"{x:,.0f}"
                                        for x in r[m]["runs"])]
            rows.append(cells)
        out += _table(["target", "1 msg/conn msgs/s", "vs postfix", "runs",
                       "-d msgs/s", "vs postfix", "runs"], rows, "lrrlrrl")
        for n in tp.get("notes") or []:
            out.append(f"\n- {n}")
        out.append("")

    prof = doc.get("profile")
    if prof and prof.get("top_self"):
        out += [f"### Profile of one acceptor ({prof.get('scenario')}, py-spy "
                f"{prof.get('seconds')} s, {prof.get('samples'):,} samples)", ""]
        rows = [[f"{x['pct']:.1f}%", f"`{x['frame']}`"] for x in prof["top_self"][:12]]
        out += _table(["self", "function"], rows, "rl")
        out.append("")

    notes = list(doc.get("notes") or [])
    if notes:
        out += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# Plot


def plot(doc: dict[str, Any], path: Path,
         scenarios: Sequence[str] = ("flood", "large")) -> Path | None:
    """Legit latency over time during the floods: one row per scenario, one column per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = doc.get("scenarios") or {}
    targets = flood_targets(doc)
    rows = [s for s in scenarios if any(_find(doc, s, t) for t in targets)]
    if not rows or not targets:
        return None
    colors = {"trusted": "tab:blue", "cert": "tab:green", "spf": "tab:orange"}
    fig, axes = plt.subplots(len(rows), len(targets), figsize=(4.6 * len(targets),
                             3.4 * len(rows)), sharey=True, squeeze=False)
    ymax = 1.0
    for e in doc.get("flood") or []:
        for s in (e.get("result") or {}).get("legit") or []:
            for a in s.get("timeline") or []:
                if a.get("latency_ms"):
                    ymax = max(ymax, a["latency_ms"])
    fail_y = ymax * 1.6
    for i, sname in enumerate(rows):
        for j, t in enumerate(targets):
            ax = axes[i][j]
            e = _find(doc, sname, t)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.25)
            if e is None:
                ax.set_title(f"{t}: not run", fontsize=9)
                continue
            res = e["result"]
            fails = 0
            for s in res.get("legit") or []:
                kind = s.get("kind", "?")
                tl = s.get("timeline") or []
                ok = [(a["t"], a["latency_ms"]) for a in tl if a["outcome"] == "accepted"]
                bad = [a["t"] for a in tl if a["outcome"] != "accepted"]
                fails += len(bad)
                if ok:
                    ax.scatter([x for x, _ in ok], [y for _, y in ok], s=4,
                               color=colors.get(kind, "gray"), label=kind, alpha=0.7)
                if bad:
                    ax.scatter(bad, [fail_y] * len(bad), marker="x", s=14,
                               color=colors.get(kind, "gray"))
            summ = _summary(e)["legit"].get("trusted")
            acc = "-" if summ is None else _fmt_pct(summ["accepted_pct"])
            p99 = "-" if summ is None else _fmt_ms(summ["p99"])
            ax.set_title(f"{t} — {scen.get(sname, {}).get('label', sname)}\n"
                         f"trusted {acc} accepted, p99 {p99} ms; failures x{fails} (top)",
                         fontsize=8)
            ax.axhline(fail_y, color="red", lw=0.5, alpha=0.4)
            if i == len(rows) - 1:
                ax.set_xlabel("seconds into the scenario")
            if j == 0:
                ax.set_ylabel("connect → 250 (ms, log)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    handles.append(Line2D([], [], marker="x", ls="", color="black", label="not accepted"))
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles))
    fig.suptitle("Legitimate mail latency during the flood: connect → 250, one point per "
                 "message", fontsize=10, x=0.35)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path




def section(title: str, columns: Sequence[str]) -> list[str]:
    """The first lines of a report section: its heading and its Markdown table's header."""
    return ["", f"### {title}", "", "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns)]


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def save_json(doc: dict[str, Any], name: str, path: Path | None = None) -> Path:
    """Write a run document: `path`, or bench/out/<name>-<time>.json; print where."""
    out = path or (Path(__file__).resolve().parent / "out"
                   / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report",
                                 description="Re-render the tables and plot of a stored run.")
    ap.add_argument("json", type=Path)
    ap.add_argument("--md", type=Path, help="write Markdown here (default: stdout)")
    ap.add_argument("--png", type=Path, help="write the latency plot here")
    a = ap.parse_args(argv)
    doc = json.loads(a.json.read_text())
    md = render_markdown(doc)
    if a.md:
        a.md.write_text(md)
    else:
        sys.stdout.write(md)
    if a.png:
        plot(doc, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------------
# py-spy


def parse_pyspy_raw(text: str, top: int = 15) -> dict[str, Any]:
    """Summarise ``py-spy record -f raw`` output (collapsed stacks: "a;b;c COUNT" per line).

    Returns {samples, top_self: [{frame, samples, pct}], top_total: [...]}; a frame is the
    function name with its file's basename, line numbers dropped ("handle_DATA (smtp.py)").
    ``top_total`` counts a function once per sample even if it recurses.
    """
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            total_n[f] = total_n.get(f, 0) + n

    def ranked(d: dict[str, int]) -> list[dict[str, Any]]:
        items = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        return [{"frame": k, "samples": v, "pct": round(100.0 * v / samples, 2) if samples
                 else 0.0} for k, v in items]

    return {"samples": samples, "top_self": ranked(self_n), "top_total": ranked(total_n)}


def _frame_name(frame: str) -> str:
    name, sep, loc = frame.partition(" (")
    if not sep:
        return frame.strip()
    file = loc.rstrip(")").rsplit(":", 1)[0]
    return f"{name.strip()} ({Path(file).name})"
