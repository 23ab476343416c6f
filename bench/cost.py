"""What the flood the ingress does NOT accept costs: CPU per shed transaction and per refused
connection, per process role, smtp-ingress and a private Postfix in the same sitting (issue 20).

Purpose
    bench.throughput gives the CPU per accepted message. A flood is mostly what is not accepted,
    so how big a flood one machine absorbs is decided by these two figures. Each phase drives
    one target at a time with bench.flood's spam senders (127.4.0.1.., one transaction per
    connection, as fast as they go: a spammer does not wait) for a fixed window, measures the
    CPU (user + system) of EVERY process of the target over the senders' window (bench.
    throughput.cpu_snapshot / cpu_used: the supervisor or Postfix's master and all their
    children, those that exited in the window included), and divides by what the clients
    counted. Runs alternate the targets (ingress, Postfix, ingress, ...); per target the median
    over the runs (bench.throughput.per_unit_ms), per role and in all.

Phases (PHASES; each target started afresh for a phase with the phase's settings)
    shed     connect, banner, EHLO, MAIL FROM, RCPT TO -> 4xx, RSET, QUIT. smtp-ingress:
             bench/configs/throughput.toml (per-IP limits off) with lanes.bulk.rate 1/s, burst
             1: all but about one a second shed with 451 4.7.1 at the first RCPT (after
             admission.shed_delay, default 0.1 s). Postfix: smtpd_recipient_restrictions =
             defer: 450 at RCPT, the same dialogue. Unit: transactions answered 4xx at
             MAIL/RCPT/DATA, as the clients counted them.
    refused  connect -> 421 in place of the banner, closed. smtp-ingress: admission.per_ip_rate
             0.001/s, per_ip_burst 1 (the per-IP connection-rate bucket, checked at connect before
             any banner); Postfix: anvil's smtpd_client_connection_rate_limit = 1 per
             anvil_rate_time_unit = 3600s, smtpd_client_event_limit_exceptions empty (the
             default exempts mynetworks, which is loopback here): "421 4.7.0 Error: too many
             connections from ...". A warm-up flood (unmeasured) first spends each address's
             token (per acceptor for the ingress). Unit: connections answered 4xx as banner.
    Postfix's smtpd_peername_lookup is off in both (the ingress here makes no DNS lookup at
    all). Before the runs, each target's idle CPU over IDLE_S is recorded (ms/s); the report
    gives the figure per unit with it ("all") and without it ("less idle": the idle rate times
    the window taken off).

API
    PHASES: {name: Phase}                 the two phases (ingress overrides, Postfix main.cf)
    units(phase, spam) -> int             the unit count of a run from bench.flood's spam
                                          summary (pure)
    measure(target, seconds, spammers) -> dict   one run: cpu_s per role, spam summary, wall_s
    run_cost(procs, stack, work, *, phases, runs, seconds, spammers, postfix, warmup, idle,
             progress) -> dict            the document bench.run keeps under "cost"
    less_idle(runs, idle_ms_per_s) -> ms  the median per unit less the idle CPU (pure)
    markdown(doc) -> str                  its report section (pure; "" without data)
    main(argv)                            python -m bench.cost [--short] [--runs N] [--seconds S]
                                          [--spammers N] [--phases shed,refused] [--no-postfix]
                                          [--json FILE]; exit 0 when every target measured

Failure modes
    A target that does not start is recorded with the reason and its phase goes on with the
    other; Postfix that cannot run here (not root, not installed) is "skipped". A run whose
    clients counted no unit has no per-unit figure (left out of the median). ^C / SIGTERM: every
    process started is stopped by PID (bench.targets.Processes, the ExitStack).

Limits
    Loopback only; every flood is bounded (its duration; bench.flood stops its own processes).
    The load generator shares the 2 cores: its CPU is not counted, but it competes. Spam
    senders reconnect 0.05 s after a refusal (bench.flood.SpamSender), so the refused phase
    offers at most 20 connections a second per sender.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.flood import BotConfig, FloodConfig, ensure_fd_limit, run_flood_sync
from bench.flood import Target as FloodTarget
from bench.scenarios import RCPT
from bench.targets import CONFIGS, Processes, Running, TargetError, start_ingress, start_postfix
from bench.throughput import cpu_snapshot, cpu_used, per_unit_ms

SPAMMERS = 100
WARMUP_S = 2.0
IDLE_S = 3.0
TXN_STAGES = ("MAIL", "RCPT", "DATA", "DOT")


@dataclass(frozen=True)
class Phase:
    name: str
    unit: str                                   # what is counted
    ingress: dict[str, dict[str, Any]]          # over bench/configs/throughput.toml
    postfix: dict[str, str]                     # main.cf over the private instance's


_BULK_CAPPED = {"lanes.bulk": {"rate": 1.0, "burst": 1}}
# The ingress of throughput.toml makes no DNS lookup (no nameservers, SPF off: derived.
# dns_configured); Postfix's smtpd would look up every client's PTR name at connect, and on
# this machine's resolver some of those wait 5 s (measured): off, as on the ingress.
_NO_DNS = {"smtpd_peername_lookup": "no"}
PHASES = {
    "shed": Phase("shed", "shed transaction", _BULK_CAPPED,
                  {**_NO_DNS, "smtpd_recipient_restrictions": "defer"}),
    "refused": Phase("refused", "refused connection",
                     {**_BULK_CAPPED, "admission": {"per_ip_rate": 0.001, "per_ip_burst": 1}},
                     {**_NO_DNS, "smtpd_client_connection_rate_limit": "1",
                      "anvil_rate_time_unit": "3600s",
                      "smtpd_client_event_limit_exceptions": ""}),
}


def units(phase: str, spam: dict[str, Any]) -> int:
    """Shed transactions (4xx at MAIL/RCPT/DATA/end of data) or refused connections (4xx as
    the banner) in bench.flood's spam summary (pure)."""
    by_stage: dict[str, int] = spam.get("shed_by_stage") or {}
    stages = TXN_STAGES if phase == "shed" else ("banner",)
    return sum(n for key, n in by_stage.items() if key.split(" ", 1)[0] in stages)


def less_idle(runs: Sequence[dict[str, Any]], idle_ms_per_s: float) -> float | None:
    """Median over runs of CPU ms per unit, all roles, less the target's idle CPU over the
    run's window (pure); None without a run that counted units."""
    per = [(sum(r["cpu_s"].values()) * 1000 - idle_ms_per_s * r["wall_s"]) / r["units"]
           for r in runs if r.get("cpu_s") is not None and r["units"]]
    return round(report.median(per), 4) if per else None  # type: ignore[arg-type]


def _flood(target: Running, seconds: float, spammers: int) -> FloodConfig:
    return FloodConfig(target=FloodTarget(target.host, target.port), duration_s=seconds,
                       bots=BotConfig(spammers=spammers, spam_per_conn=1, spam_rcpt=RCPT),
                       spam_procs=1,
                       bot_procs=0, grace_s=0.5)


def measure(target: Running, seconds: float, spammers: int) -> dict[str, Any]:
    """One run: the senders for `seconds`, the target's CPU per role over their window."""
    cfg = _flood(target, seconds, spammers)
    snaps: dict[str, Any] = {}

    def window() -> None:           # the senders start cfg.startup_s after run_flood's call
        time.sleep(cfg.startup_s)
        snaps["before"], t0 = cpu_snapshot(target.pids()), time.monotonic()
        time.sleep(seconds)
        snaps["after"], snaps["wall"] = cpu_snapshot(target.pids()), time.monotonic() - t0

    watch = threading.Thread(target=window, daemon=True)
    watch.start()
    result = run_flood_sync(cfg)
    watch.join(seconds + 10)
    spam = result["bots"]["spam"]
    keep = ("connections", "connected", "refused", "banner_codes", "sent", "accepted",
            "shed_by_stage", "rejected_by_stage", "timeouts", "conn_errors", "active_s")
    return {"cpu_s": cpu_used(snaps["before"], snaps["after"]) if "after" in snaps else None,
            "wall_s": round(snaps.get("wall", 0.0), 2),
            "spam": {k: spam.get(k) for k in keep}}


def _idle_ms_per_s(target: Running, seconds: float) -> float:
    time.sleep(min(1.0, seconds))   # what the warm-up left (closing sessions, acks)
    before = cpu_snapshot(target.pids())
    time.sleep(seconds)
    return round(sum(cpu_used(before, cpu_snapshot(target.pids())).values()) * 1000 / seconds,
                 2)


def _start(procs: Processes, stack: contextlib.ExitStack, work: Path, name: str,
           phase: Phase) -> Running | str:
    """The target for a phase, or why not."""
    if name == "postfix":
        return start_postfix(stack, work / f"postfix-{phase.name}", extra_main_cf=phase.postfix)
    try:
        return start_ingress(procs, work / f"ingress-{phase.name}", CONFIGS / "throughput.toml",
                             phase.ingress)
    except TargetError as e:
        return str(e).splitlines()[0]


def run_cost(procs: Processes, stack: contextlib.ExitStack, work: Path, *,
             phases: Sequence[str] = tuple(PHASES), runs: int = 3, seconds: float = 8.0,
             spammers: int = SPAMMERS, postfix: bool = True, warmup: float = WARMUP_S,
             idle: float = IDLE_S,
             progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every phase: start the targets, warm up (`warmup` s of the same flood, unmeasured), idle
    CPU (over `idle` s), then `runs` alternated runs; stop them. The document bench.run keeps
    under "cost"."""
    ensure_fd_limit(spammers + 256, "bench.cost's spam process")
    names = ["smtp-ingress", *(["postfix"] if postfix else [])]
    doc: dict[str, Any] = {"params": {"runs": runs, "seconds": seconds, "spammers": spammers,
                                      "warmup_s": warmup, "idle_s": idle,
                                      "spam_per_conn": 1}, "phases": {}}
    for pname in phases:
        phase = PHASES[pname]
        entry: dict[str, Any] = {"unit": phase.unit, "targets": {}}
        doc["phases"][pname] = entry
        running: dict[str, Running] = {}
        for name in names:
            t = _start(procs, stack, work, name, phase)
            if isinstance(t, str):
                entry["targets"][name] = {"status": "skipped", "reason": t}
                progress(f"cost {pname}: {name} skipped: {t}")
                continue
            running[name] = t
            entry["targets"][name] = {
                "status": "ok", "runs": [],
                "settings": phase.postfix if name == "postfix" else phase.ingress}
        try:
            for name, t in running.items():
                run_flood_sync(_flood(t, warmup, spammers))       # unmeasured
                entry["targets"][name]["idle_cpu_ms_per_s"] = _idle_ms_per_s(t, idle)
            for i in range(runs):
                for name, t in running.items():
                    r = measure(t, seconds, spammers)
                    r["units"] = units(pname, r["spam"])
                    entry["targets"][name]["runs"].append(r)
                    all_s = sum((r["cpu_s"] or {}).values())
                    progress(f"cost {pname} run {i + 1}/{runs} {name}: {r['units']} "
                             f"{phase.unit}s, CPU {all_s:.2f} s"
                             + (f", {all_s * 1000 / r['units']:.3f} ms each" if r["units"]
                                else ""))
        finally:
            for t in running.values():
                t.stop()
        for e in entry["targets"].values():
            if e["status"] == "ok":
                e["per_unit_ms"] = per_unit_ms([(r["cpu_s"], r["units"]) for r in e["runs"]
                                                if r["cpu_s"] is not None])
                e["units_per_s"] = report.median(r["units"] / seconds for r in e["runs"])
                e["less_idle_ms"] = less_idle(e["runs"], e.get("idle_cpu_ms_per_s") or 0.0)
    return doc


def markdown(doc: dict[str, Any] | None) -> str:
    """The report's section: per phase and target, the median CPU per unit (pure)."""
    phases = (doc or {}).get("phases") or {}
    if not phases:
        return ""
    p = doc["params"] if doc else {}
    out = report.section(
        "CPU per shed transaction and per refused connection (issue 20; every process of the "
        f"target; median of {p.get('runs')} runs of {p.get('seconds')} s, "
        f"{p.get('spammers')} spam senders)",
        ("unit", "target", "ms CPU each, all", "less idle", "by role (ms)", "units/s",
         "idle CPU ms/s"))
    for entry in phases.values():
        for name, e in entry["targets"].items():
            if e["status"] != "ok" or not e.get("per_unit_ms"):
                why = e.get("reason") or "no unit counted"
                out.append(f"| {entry['unit']} | {name} | no equivalent measured: {why} "
                           "| | | | |")
                continue
            cpu = e["per_unit_ms"]
            roles = sorted(((v, k) for k, v in cpu.items() if k != "all"), reverse=True)
            by_role = ", ".join(f"{k} {v:.3f}" for v, k in roles[:6])
            li = e.get("less_idle_ms")
            out.append(f"| {entry['unit']} | {name} | {cpu['all']:.3f} | "
                       f"{'-' if li is None else f'{li:.3f}'} | {by_role} | "
                       f"{report._fmt_num(e.get('units_per_s'))} | "
                       f"{report._fmt_num(e.get('idle_cpu_ms_per_s'), 1)} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cost",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="1 run of 2 s per phase and target")
    ap.add_argument("--runs", type=int, default=None, help="runs per target (default 3)")
    ap.add_argument("--seconds", type=float, default=None, help="one run's window (default 8)")
    ap.add_argument("--spammers", type=int, default=SPAMMERS)
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list: shed, refused")
    ap.add_argument("--no-postfix", action="store_true", help="smtp-ingress alone")
    ap.add_argument("--json", type=Path, default=None, help="also write the document here")
    a = ap.parse_args(argv)
    runs = a.runs or (1 if a.short else 3)
    seconds = a.seconds or (2.0 if a.short else 8.0)
    phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    if any(x not in PHASES for x in phases) or not phases:
        ap.error(f"--phases: choose from {', '.join(PHASES)}")
    if not (1 <= runs <= 20 and 0.5 <= seconds <= 60 and 1 <= a.spammers <= 2000):
        ap.error("need 1 <= runs <= 20, 0.5 <= seconds <= 60, 1 <= spammers <= 2000")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    work.chmod(0o711)           # the postfix user must traverse it
    try:
        with Processes() as procs, contextlib.ExitStack() as stack:
            doc = run_cost(procs, stack, work, phases=phases, runs=runs, seconds=seconds,
                           spammers=a.spammers, postfix=not a.no_postfix,
                           progress=lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(doc))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(e.get("per_unit_ms") for ph in doc["phases"].values()
                    for e in ph["targets"].values() if e["status"] == "ok") else 1


if __name__ == "__main__":
    sys.exit(main())
