"""Benchmark suite: botnet floods against legitimate mail, side by side; smtp-source throughput.

Purpose
    One command (``make bench`` = ``python -m bench.run --full``, ``make bench-quick`` =
    ``--quick``) that starts its own targets -- smtp-ingress (bench/configs/flood.toml), plain
    aiosmtpd (bench/baseline.py), a private Postfix with default limits (tests/kit/postfix.py) and
    smtp-sink --, runs every scenario against them, stops every process it started, and writes
    bench/out/<timestamp>/{results.json, results.md, latency.png}. A --full run that completes is
    also copied to bench/results/ (latest.json, latest.md, latency.png).

Scenarios (bench.flood does the load; all bounded in time and count, each stops by itself)
    noflood   the legitimate senders alone (the latency reference)
    stall     300 stalling bots (distinct 127.1.x.y addresses)
    spam      50 spam connections pushing messages as fast as they can (127.4.x.y)
    mixed     stalling + trickling + early-talking bots + spam
    flood     issue 3: 300 stalling bots + 50 spam connections (30 s of measurement in --full)
    large     5,000 stalling bots (--quick: 1,000), connects spread over --ramp seconds
    silent2k, silent5k, silent20k, trickle2k   issue 8: silent (trickling) bots each from its
              own address, reconnecting 0.2 s after a drop; judged: the SPF-pass sender
    silent20k_spam   20,000 silent bots + 50 spam connections; judged: allow-listed, certificate
    spfspam   50 spam connections whose MAIL FROM domain (spf-bots.test) has SPF pass for the
              bots' addresses; judged: the allow-listed sender
    noflood18, dnswl20k, dnsbl5k   issue 18 (bench.scenarios.evidence_scenarios; each on its
              own fresh smtp-ingress with [dnswl] and [dnsbl] zones served by the bench's DNS):
              20,000 silent bots + 50 spam, judged: a DNS-allow-listed sender (127.0.0.13, not
              in allow_cidrs); 5,000 silent bots (80% block-listed) + 50 listed spam, judged:
              the SPF sender, and a provider pool over 50 addresses (127.8.0.1-50, verified
              PTRs), fast from its second address on (bench.evidence: the ingress's log);
              noflood18 is their no-flood reference, run with any of them
    reload    issue 20: the flood scenario, the target reloaded twice in the measured window
              (smtp-ingress SIGHUP, Postfix `postfix reload`); judged: allow-listed, certificate
              (issue-8 rows: --full, or --quick --scenarios NAME,...; the report's issue-8 table
              gives accepted, p50 and p99 against the same sender's no-flood run, and the ratio)
    throughput  smtp-source -s 20 -l 1024 -m 20000, with and without -d, against smtp-ingress
              (bench/configs/throughput.toml), Postfix and smtp-sink; medians of 3, ratios
              against Postfix from the same run (--quick: -m 1000, 1 run)
    cost      issue 20: CPU per shed transaction and per refused connection, per role, of
              smtp-ingress and a private Postfix, each with the phase's settings (bench.cost:
              100 spam senders, medians of 3 alternated runs of 8 s; --quick: 1 run of 2 s)
    Legitimate senders in every flood scenario, each one message every 100 ms on a fresh
    connection, timed connect -> 250: trusted IP 127.0.0.10 (allow-listed), a client certificate
    on the mutual-TLS port from 127.0.0.11 (n/a for targets without one), and an SPF-pass domain
    from 127.0.0.12 (the bench's loopback DNS server serves its record).

API / CLI
    python -m bench.run (--quick | --full) [--targets smtp-ingress,postfix,aiosmtpd]
        [--scenarios noflood,flood,...] [--no-throughput] [--no-cost] [--ramp S]
        [--large-bots N]
        [--profile] [--out DIR] [--no-publish] [--keep]
    build_scenarios(mode, ramp, large_bots) -> dict[str, Scenario]   (pure; bench.scenarios: the
        scenario tables and the DNS records they need; bench.evidence: the provider-pool row)
    Exit status: 0 run completed (whatever the targets did; the acceptance verdicts are in the
    report), 2 refused to start (file descriptors, bad arguments), 130 interrupted.

Failure modes
    Refuses to start (exit 2, nothing started) when the largest scenario's sockets do not fit
    RLIMIT_NOFILE after raising the soft limit to the hard one (bench.flood.ensure_fd_limit).
    Postfix or smtp-sink that cannot run here is reported as skipped with the reason. A target
    that fails to start is reported as failed, and the run goes on with the others. ^C / SIGTERM:
    every started process is stopped by PID (targets, DNS server, py-spy; bench.flood stops its
    bot processes), then exit 130.

Limits
    Loopback only. The machine is shared (numbers are noisy on a 2-core box; the JSON records
    the load average before and after and smtp-source's foreign-CPU share). Each target keeps
    running across its scenarios (in the order above); the early-talker penalty and per-IP
    state of one scenario use bot address ranges no later scenario reuses.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench import cost, evidence, report, sched, unbound
from bench.flood import (
    FdLimitError,
    FloodConfig,
    LegitSpec,
    Target,
    ensure_fd_limit,
    format_progress,
    run_flood_sync,
)
from bench.scenarios import (
    BULK_TOLERANCE_PCT,
    CERT_IP,
    DNSWL_IP,
    LEGIT_DEADLINE,
    LEGIT_INTERVAL,
    P99_MAX_RATIO,
    PROVIDER,
    RCPT,
    SPF_BOTS_DOMAIN,
    SPF_DOMAIN,
    SPF_IP,
    TRUSTED_IP,
    Scenario,
    adversary_dns,
    build_scenarios,
    evidence_dns,
    evidence_specs,
    pool_addresses,
    primed,
    with_settings,
)
from bench.targets import (
    CONFIGS,
    Pki,
    Processes,
    Running,
    TargetError,
    acceptor_pids,
    make_pki,
    postfix_version,
    start_baseline,
    start_dns,
    start_ingress,
    start_postfix,
    start_sink,
)

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
RESULTS = BENCH / "results"
FLOOD_TARGETS = ("smtp-ingress", "postfix", "aiosmtpd")


def issue8_rows(doc: dict[str, Any], target: str = "smtp-ingress",
                judged: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    """Issue 8's bench rows for `target`: per scenario with senders (or, for a scenario named in
    `judged`, those senders), per judged sender, the accepted share, p50 (the median) and p99
    against the same sender's no-flood run (pure)."""
    scenarios = doc.get("scenarios") or {}
    rows = []
    for name, sc in scenarios.items():
        base_e = report._find(doc, sc.get("base") or "noflood", target)   # issue 18: its own
        base = report._summary(base_e)["legit"] if base_e else {}
        limits = {w: (pct, p99) for w, pct, p99 in sc.get("judged") or ()}
        for who in list(limits) or sc.get("senders") or (judged or {}).get(name, ()):
            min_pct, p99_max = limits.get(who, (sc.get("min_accepted_pct", 99.0),
                                                sc.get("p99_max", P99_MAX_RATIO)))
            e = report._find(doc, name, target)
            t = report._summary(e)["legit"].get(who) if e else None
            b = base.get(who)
            row: dict[str, Any] = {"scenario": name, "label": sc.get("label", name),
                                   "sender": who, "measured": t is not None,
                                   "issue": sc.get("issue", "8"), "p99_max": p99_max,
                                   "min_accepted_pct": min_pct}
            if t is not None:
                r99 = report.ratio(t["p99"], b["p99"] if b else None)
                r50 = report.ratio(t["p50"], b["p50"] if b else None)
                row.update(accepted=t["accepted"], attempts=t["attempts"],
                           accepted_pct=t["accepted_pct"], p50=t["p50"], p99=t["p99"],
                           base_p50=b["p50"] if b else None, base_p99=b["p99"] if b else None,
                           p50_ratio=r50, p99_ratio=r99,
                           ok=(t["accepted_pct"] or 0) >= min_pct
                           and r99 is not None and r99 <= p99_max)
            rows.append(row)
    return rows


def issue8_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = report.section("Judged senders: issue 8 (late-proving senders under silent floods) "
                         "and issue 17 (trust tiers) rows (smtp-ingress)",
                         ("scenario", "sender", "accepted", "p50 ms (no flood)",
                          "p99 ms (no flood)", "p99 ratio", "ok"))
    for r in rows:
        if not r["measured"]:
            out.append(f"| {r['label']} | {r['sender']} | not measured | | | | |")
            continue
        ratio = "-" if r["p99_ratio"] is None else f"{r['p99_ratio']:.2f}x"
        out.append(
            f"| {r['label']} | {r['sender']} | {report._fmt_pct(r['accepted_pct'])} "
            f"({r['accepted']}/{r['attempts']}) | {report._fmt_ms(r['p50'])} "
            f"({report._fmt_ms(r['base_p50'])}) | {report._fmt_ms(r['p99'])} "
            f"({report._fmt_ms(r['base_p99'])}) | {ratio} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(out) + "\n"


def self_proven_rate(tables: dict[str, Any]) -> float:
    """The self-proven tier's total fast-lane rate in the measured config (its default when
    the config does not name it)."""
    from ingress.core.config import TiersConfig

    v = (tables.get("tiers") or {}).get("self_proven_rate")
    return float(v) if isinstance(v, int | float) else TiersConfig().self_proven_rate


def issue17_extra(doc: dict[str, Any], target: str = "smtp-ingress") -> list[dict[str, Any]]:
    """Issue 17's rows that are not a sender's latency (pure): the spam accepted against the
    bulk cap + the self-proven tier's total rate (spfmany*), and the try at which each retrying
    MTA's message was accepted (retryfarm: by its third retry, i.e. within 4 tries)."""
    params = doc.get("params") or {}
    cap = params.get("bulk_rate_cap")
    tier = self_proven_rate(params.get("ingress_config") or {})
    rows: list[dict[str, Any]] = []
    for name, sc in (doc.get("scenarios") or {}).items():
        e = report._find(doc, name, target)
        res = (e or {}).get("result") or {}
        if name.startswith("spfmany") and res:
            rate = ((res.get("bots") or {}).get("spam") or {}).get("accepted_per_s")
            bound = None if cap is None else cap + tier
            rows.append({"scenario": name, "what": "spam accepted msgs/s", "value": rate,
                         "bound": bound, "ok": None if rate is None or bound is None
                         else rate <= bound * (1 + BULK_TOLERANCE_PCT / 100)})
        if sc.get("mtas") and res:
            tries = [t for s in res.get("legit") or [] if s.get("kind") == "mta"
                     for t in s.get("tries") or [0]]
            rows.append({"scenario": name, "what": "retrying MTAs: try that got 250",
                         "value": tries, "bound": 4,
                         "ok": bool(tries) and all(0 < t <= 4 for t in tries)})
    return rows


def issue17_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = report.section("Issue 17: what the attacker gets (smtp-ingress)",
                         ("scenario", "measure", "value", "bound", "ok"))
    for r in rows:
        out.append(f"| {r['scenario']} | {r['what']} | {r['value']} | {r['bound']} | "
                   f"{report.verdict(r['ok'])} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Machine facts


def _read(path: str) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text().strip()
    return ""


def netstat() -> dict[str, int]:
    """TcpExt counters of this network namespace (ListenOverflows, ListenDrops, ...)."""
    lines = _read("/proc/net/netstat").splitlines()
    out: dict[str, int] = {}
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            for k, v in zip(head.split()[1:], vals.split()[1:], strict=False):
                with contextlib.suppress(ValueError):
                    out[k] = int(v)
    return out


NETSTAT_KEYS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies",
                "TCPTimeouts", "TCPSynRetrans")


def netstat_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in NETSTAT_KEYS if k in a or k in b}


def machine() -> dict[str, Any]:
    mem = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu, "mem_total_mb": mem,
        "kernel": platform.release(), "platform": platform.platform(),
        "python": platform.python_version(), "loadavg_start": _read("/proc/loadavg")[:14],
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "tcp_max_syn_backlog": _read("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        "tcp_syncookies": _read("/proc/sys/net/ipv4/tcp_syncookies"),
        "ip_local_port_range": _read("/proc/sys/net/ipv4/ip_local_port_range"),
        "rlimit_nofile": [soft, hard],
    }


def git_state() -> dict[str, Any]:
    """The commit the ingress code was measured at, and whether ingress/ or workers/ differ."""
    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", *args], cwd=BENCH.parent, capture_output=True,
                                  text=True, timeout=10, check=False).stdout.strip()
        return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--", "ingress", "workers"))}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("smtp-ingress", "aiosmtpd", "uvloop", "pyzmq", "orjson", "pyspf", "dkimpy",
                "dnspython", "aiosmtplib", "trustme", "matplotlib"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["postfix"] = postfix_version()
    return out


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One progress line: rewritten in place on a terminal, else a line every few seconds."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self.prefix = ""

    def step(self, what: str) -> None:
        self.done += 1
        self.prefix = f"[{self.done}/{self.total} {time.monotonic() - self.t0:4.0f}s] {what}"
        self.line(self.prefix, force=True)

    def line(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text[:200])
        elif force or now - self._last >= 5.0:
            sys.stderr.write(text + "\n")
            self._last = now
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def flood(self, p: dict[str, Any]) -> None:
        self.line(f"{self.prefix} | {format_progress(p)}")


# --------------------------------------------------------------------------------------------
# Floods


def legit_specs(target: Running, pki: Pki) -> list[LegitSpec]:
    """The allow-listed, certificate and SPF senders, each priming the target with LEGIT_PRIME
    unmeasured messages at the run's start (scenarios.NOFLOOD_WARMUP)."""
    specs = [primed("trusted", TRUSTED_IP)]
    if target.mtls_port:
        specs.append(primed("cert", CERT_IP, tls="implicit", port=target.mtls_port,
                            cert=str(pki.client_pem), key=str(pki.client_pem), ca=str(pki.ca),
                            servername="localhost"))
    specs.append(primed("spf", SPF_IP, mail_from=f"legit@{SPF_DOMAIN}"))
    return specs


def flood_config(target: Running, pki: Pki, sc: Scenario, grace: float,
                 dkim_key: str = "", probe_rt: bool = True) -> FloodConfig:
    """The flood of scenario `sc` against `target`: issue 17's TLS bots aim at its mutual-TLS
    port, its spam is signed with `dkim_key` (a PEM file), its MTAs come from 127.7.<k>.1;
    the probe at SCHED_FIFO unless probe_rt is False (bench.flood.probe)."""
    bots, adv = sc.bots, sc.bots.adversary
    if adv.tls_sockets:
        adv = dataclasses.replace(adv, tls_port=target.mtls_port or 0)
    if adv.dkim_key:
        adv = dataclasses.replace(adv, dkim_key=dkim_key)
    if adv.tls_sockets and not adv.tls_port:
        adv = dataclasses.replace(adv, handshakers=0, tls_stallers=0)   # no such port: n/a
    bots = dataclasses.replace(bots, adversary=adv)
    mtas = [LegitSpec("mta", f"127.7.{k}.1", sc.mta_retry_s, name=f"mta{k}",
                      mail_from=f"mta{k}@example.org", retry_s=sc.mta_retry_s)
            for k in range(sc.mtas)]
    return FloodConfig(
        target=Target(target.host, target.port), duration_s=sc.duration_s, bots=bots,
        legit=(*legit_specs(target, pki), *evidence_specs(sc.extra, LEGIT_INTERVAL, dkim_key),
               *mtas), warmup_s=sc.warmup_s, grace_s=grace,
        spam_procs=1, bot_procs=sc.bot_procs, mail_from="legit@example.org", rcpt=RCPT,
        helo="legit.example.org", deadline_s=LEGIT_DEADLINE, servername="localhost",
        probe_rt=probe_rt)


def fd_preflight(scenarios: dict[str, Scenario], pki_stub: Pki) -> dict[str, int]:
    """Raise FdLimitError unless the largest scenario fits (soft limit raised to hard)."""
    dummy = Running("preflight", "127.0.0.1", 25, 26)
    need: dict[str, int] = {}
    for sc in scenarios.values():
        for proc, n in flood_config(dummy, pki_stub, sc, 2.0).fd_budget().items():
            need[proc] = max(need.get(proc, 0), n)
    for proc, n in need.items():
        ensure_fd_limit(n, f"{proc} of the largest scenario")
    # The aiosmtpd baseline (one process) holds every bot connection it accepts; beyond one
    # process's fd limit (the 20,000-bot rows) it runs out of descriptors, which is its result.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    biggest = max((sc.bots.sockets for sc in scenarios.values()), default=0)
    ensure_fd_limit(min(biggest + 256, hard), "the single-process aiosmtpd target")
    return need


def _in_background(work: Callable[[], None]) -> threading.Thread:
    """`work` in a daemon thread, started (the caller joins it with a deadline)."""
    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def profile_acceptor(procs: Processes, target: Running, directory: Path, delay: float,
                     seconds: int, out: dict[str, Any]) -> threading.Thread:
    """After ``delay`` s, py-spy one acceptor for ``seconds`` s (thread; result into ``out``)."""

    def work() -> None:
        time.sleep(delay)
        pids = acceptor_pids(Path(target.info["log"]), target.info["supervisor_pid"])
        # py-spy is a bench dependency: in the venv, which need not be on PATH
        beside = Path(sys.executable).with_name("py-spy")
        pyspy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
        if not pids or pyspy is None:
            out["error"] = "no acceptor pid" if not pids else "py-spy not installed"
            return
        raw = directory / f"pyspy-acceptor-{pids[0]}.txt"
        proc = procs.spawn([pyspy, "record", "-p", str(pids[0]), "-d", str(seconds),
                            "-f", "raw", "-o", str(raw), "--nonblocking", "-r", "100"],
                           log=directory / "pyspy.log")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(seconds + 30)
        procs.stop(proc, timeout=5.0)
        if raw.exists():
            out.update(report.parse_pyspy_raw(raw.read_text()))
            out.update({"pid": pids[0], "seconds": seconds, "raw": str(raw)})
        else:
            out["error"] = f"py-spy wrote nothing (see {directory / 'pyspy.log'})"

    return _in_background(work)


def sched_window(delay: float, seconds: float, out: dict[str, Any]) -> threading.Thread:
    """CPU and run-queue wait per process role (bench.sched) over [delay, delay + seconds] from
    now: the flood's measured part (FloodConfig.startup_s + warmup_s after run_flood's call)."""

    def work() -> None:
        time.sleep(delay)
        before, t0 = sched.snapshot(os.getpid()), time.monotonic()
        time.sleep(max(0.5, seconds))
        out["rows"] = sched.delta(before, sched.snapshot(os.getpid()), time.monotonic() - t0)

    return _in_background(work)


def reload_at(target: Running, delay: float, offsets: tuple[float, ...],
              out: list[float]) -> threading.Thread | None:
    """Reload `target` at each offset (s) after `delay` s from now (thread); the monotonic
    times of the reloads done go into `out`. None: the target has no reload."""
    if target.reload is None or not offsets:
        return None
    reload = target.reload

    def work() -> None:
        start = time.monotonic() + delay
        for off in sorted(offsets):
            time.sleep(max(0.0, start + off - time.monotonic()))
            reload()
            out.append(round(time.monotonic() - start, 2))

    return _in_background(work)


def run_scenarios(procs: Processes, target: Running, pki: Pki,
                  scenarios: dict[str, Scenario], prog: Progress, grace: float,
                  workdir: Path, profile: dict[str, Any] | None,
                  probe_rt: bool = True) -> list[dict[str, Any]]:
    entries = []
    for sc in scenarios.values():
        prog.step(f"{sc.name} @ {target.name}")
        if sc.bots.adversary.tls_sockets and not target.mtls_port:
            continue   # the stranger-handshake flood needs a mutual-TLS port
        cfg = flood_config(target, pki, sc, grace, str(workdir / "dkim.pem"), probe_rt)
        log = Path(target.info["log"]) if "log" in target.info else None
        log_at = log.stat().st_size if log is not None and log.exists() else 0
        ns0 = netstat()
        t0 = time.monotonic()
        prof_thread = None
        sched_out: dict[str, Any] = {}
        measured_at = cfg.startup_s + sc.warmup_s     # from now, when the senders start
        sched_thread = sched_window(measured_at, sc.duration_s - sc.warmup_s, sched_out)
        reloaded: list[float] = []
        reload_thread = reload_at(target, measured_at, sc.reloads, reloaded)
        if profile is not None and sc.name == "flood" and target.name == "smtp-ingress":
            profile["scenario"] = sc.label
            prof_thread = profile_acceptor(procs, target, workdir, measured_at + 1.5,
                                           min(5, max(1, int(sc.duration_s - sc.warmup_s - 4))),
                                           profile)
        try:
            result = run_flood_sync(cfg, prog.flood)
            err = None
        except (FdLimitError, ValueError, OSError) as e:
            result, err = None, f"{type(e).__name__}: {e}"
        if prof_thread is not None:
            prof_thread.join(60)
        sched_thread.join(10)
        if reload_thread is not None:
            reload_thread.join(30)
        entry: dict[str, Any] = {
            "scenario": sc.name, "target": target.name, "wall_s": round(time.monotonic() - t0, 2),
            "netstat_delta": netstat_delta(ns0, netstat()), "result": result, "error": err,
            "sched": sched_out.get("rows"), "reloaded_at_s": reloaded,
        }
        if log is not None and "pool" in sc.extra:    # issue 18: the ingress's own record
            entry["pool"] = evidence.pool_verdict(evidence.read_log(log, log_at),
                                                  pool_addresses(), PROVIDER)
        if result is not None:
            entry["summary"] = report.summarise_flood(result)
            tr = entry["summary"]["legit"].get("trusted") or {}
            prog.note(f"{prog.prefix}: trusted {tr.get('accepted')}/{tr.get('attempts')} "
                      f"p99 {tr.get('p99')} ms; spam accepted "
                      f"{entry['summary']['spam'].get('accepted_per_s')}/s")
        else:
            prog.note(f"{prog.prefix}: FAILED {err}")
        entries.append(entry)
        time.sleep(0.5)  # let the target settle (closed sessions, TIME_WAIT)
    return entries


# --------------------------------------------------------------------------------------------
# Throughput


def run_throughput(procs: Processes, ingress_dir: Path, postfix: Running | None,
                   sink: Running | None, mode: str, prog: Progress,
                   notes: list[str]) -> dict[str, Any]:
    from bench import throughput as tp

    try:
        tp._tool(tp.SMTP_SOURCE)
    except tp.ToolMissing as e:
        return {"skipped": str(e)}
    targets: list[tp.Target] = []
    ing: Running | None = None
    try:
        ing = start_ingress(procs, ingress_dir, CONFIGS / "throughput.toml", {},
                            name="smtp-ingress")
        targets.append(tp.Target("smtp-ingress", ing.host, ing.port, drain=ing.drain,
                                 pids=ing.pids))
    except TargetError as e:
        notes.append(f"throughput: smtp-ingress did not start: {e}")
    if postfix is not None:
        targets.append(tp.Target("postfix", postfix.host, postfix.port, drain=postfix.drain,
                                 pids=postfix.pids))
    if sink is not None:
        targets.append(tp.Target("smtp-sink", sink.host, sink.port, pids=sink.pids))
    full = mode == "full"
    messages, runs = (20_000, 3) if full else (1_000, 1)
    prog.step(f"throughput smtp-source -m {messages} x{runs} ({len(targets)} targets)")
    try:
        res = tp.benchmark(targets, modes=("conn", "reuse"), runs=runs, messages=messages,
                           sessions=20, size=1024, recipient=RCPT, settle=0.5,
                           progress=lambda s: prog.note(f"  {s}"))
    finally:
        if ing is not None:
            code = ing.stop()
            if code not in (0, None):
                notes.append(f"throughput smtp-ingress exited {code} on SIGTERM")
    d = res.to_dict()
    d["markdown"] = tp.render_markdown(res)
    return d


# --------------------------------------------------------------------------------------------
# Main


def _publish(out_dir: Path) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = json.loads((out_dir / "results.json").read_text())
    # The committed copy keeps the timelines only for the plotted scenarios (size).
    for e in doc.get("flood") or []:
        if e.get("scenario") not in ("flood", "large") and e.get("result"):
            for s in e["result"].get("legit") or []:
                s.pop("timeline", None)
    (RESULTS / "latest.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    shutil.copyfile(out_dir / "results.md", RESULTS / "latest.md")
    if (out_dir / "latency.png").exists():
        shutil.copyfile(out_dir / "latency.png", RESULTS / "latency.png")


def parse_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """["supervisor.acceptor_nice=10", 'classify.spf_promote="off"'] -> {table: {key: value}}
    (the value is TOML; a bare word is taken as a string). Pure; ValueError names the item."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, eq, raw = item.partition("=")
        table, dot, key = name.strip().rpartition(".")
        if not eq or not dot or not table or not key:
            raise ValueError(f"--set {item!r}: want TABLE.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(table, {})[key] = value
    return out


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--quick", action="store_true", help="short scenarios (< 2 min in total)")
    g.add_argument("--full", action="store_true", help="the 30 s runs (< 15 min in total)")
    ap.add_argument("--targets", default=",".join(FLOOD_TARGETS),
                    help=f"flood targets, comma list of {', '.join(FLOOD_TARGETS)}")
    ap.add_argument("--scenarios", default="", help="only these flood scenarios (comma list)")
    ap.add_argument("--no-throughput", action="store_true", help="skip the smtp-source runs")
    ap.add_argument("--no-cost", action="store_true", help="skip the CPU per shed transaction "
                    "and per refused connection (bench.cost)")
    ap.add_argument("--ramp", type=float, default=None,
                    help="large scenario: spread the bots' connects over S s (full: 5, quick: 1)"
                         "; thousands of simultaneous SYNs overflow the kernel's SYN/accept "
                         "queues (somaxconn, tcp_max_syn_backlog) and turn into retransmits")
    ap.add_argument("--large-bots", type=int, default=None, help="full: 5000, quick: 1000")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy one smtp-ingress acceptor during the flood scenario")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default bench/out/TS)")
    ap.add_argument("--no-publish", action="store_true",
                    help="--full: do not copy the results into bench/results/")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, spools)")
    ap.add_argument("--probe-normal", action="store_true",
                    help="the legitimate senders at normal priority instead of SCHED_FIFO "
                         "(bench.flood.probe: the probe's own stalls then count as latency)")
    ap.add_argument("--dns", choices=("auto", "unbound", "python"), default="auto",
                    help="the DNS server every target asks: unbound (local data; what an MX "
                         "runs), the test kit's dnspython server (~2,000 queries/s here, drops "
                         "beyond), or auto: unbound when installed")
    ap.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                    help="smtp-ingress flood config: set this key (a TOML value, e.g. "
                         "supervisor.acceptor_nice=10); repeatable; recorded in the results")
    a = ap.parse_args(argv)
    try:
        settings = parse_settings(a.set)
    except ValueError as e:
        ap.error(str(e))
    mode = "full" if a.full else "quick"
    dns_server = a.dns if a.dns != "auto" else ("unbound" if unbound.available() else "python")
    names = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in names if t not in FLOOD_TARGETS]
    if bad:
        ap.error(f"unknown target(s) {bad}; choose from {FLOOD_TARGETS}")
    if a.ramp is not None and not 0 <= a.ramp <= 60:
        ap.error("--ramp must be within 0..60 s")
    if a.large_bots is not None and not 1 <= a.large_bots <= 60_000:
        ap.error("--large-bots must be within 1..60000")
    wanted = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    scenarios = build_scenarios(mode, a.ramp, a.large_bots, frozenset(wanted))
    if a.scenarios:
        unknown = [s for s in wanted if s not in scenarios]
        if unknown:
            ap.error(f"unknown scenario(s) {unknown}; {mode} has {list(scenarios)}")
        keep = set(wanted) | {scenarios[w].base for w in wanted}   # and their references
        scenarios = {k: v for k, v in scenarios.items() if k in keep}

    stub = Pki(Path("ca"), Path("c"), Path("k"), Path("cl"))
    try:
        fds = fd_preflight(scenarios, stub)
    except FdLimitError as e:
        print(f"bench.run: {e}", file=sys.stderr)
        return 2

    started = dt.datetime.now(dt.UTC)
    out_dir = a.out or OUT / started.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    t_start = time.monotonic()
    notes: list[str] = [
        "Shared 2-core machine: other engineers' test runs were using CPU during this run "
        "(see the load averages); every figure is noisy. Throughput numbers are medians.",
        "Everything (targets, bots, legitimate senders, DNS server) runs on the same cores, so "
        "the flood generator competes with the server it floods.",
        "DNS (SPF, DKIM, the DNS lists, PTR) is answered by "
        + ("unbound on loopback, from local data (bench.unbound)" if dns_server == "unbound"
           else "the test kit's dnspython server (tests/kit/dnsserver.py), which drops queries "
                "beyond about 2,000 a second on this machine"),
    ]
    notes += list(dict.fromkeys(sc.note for sc in scenarios.values() if sc.note))
    doc: dict[str, Any] = {
        "version": 1, "mode": mode, "started": started.isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "versions": versions(), "git": git_state(),
        "params": {
            "legit_interval_s": LEGIT_INTERVAL, "legit": {
                "trusted": TRUSTED_IP, "cert": CERT_IP, "spf": f"{SPF_IP} ({SPF_DOMAIN})",
                "dnswl": DNSWL_IP, "pool": f"127.8.0.1-50 ({PROVIDER})"},
            "bulk_rate_cap": None, "bulk_rate_tolerance_pct": BULK_TOLERANCE_PCT,
            "p99_max_ratio": P99_MAX_RATIO, "fd_budget": fds,
            "percentiles": "nearest-rank (bench.flood.percentile_nearest_rank)",
            "dns_server": dns_server,
            "probe_rt": not a.probe_normal,     # bench.flood.probe
        },
        "scenarios": {k: v.as_dict() for k, v in scenarios.items()},
        "targets": {}, "flood": [], "throughput": {}, "cost": {}, "notes": notes,
    }
    n_steps = (len(names) * len(scenarios) + (0 if a.no_throughput else 1)
               + (0 if a.no_cost else 1))
    prog = Progress(n_steps)
    prog.note(f"bench.run --{mode}: {len(scenarios)} scenarios x {len(names)} targets"
              f"{'' if a.no_throughput else ' + throughput'}; output {out_dir}")
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    work.chmod(0o711)  # the postfix user must traverse it
    interrupted = False
    profile: dict[str, Any] | None = {} if a.profile else None
    try:
        with Processes() as procs, contextlib.ExitStack() as stack:
            pki = make_pki(work / "pki")
            from tests.kit.dkimkeys import signing_record

            dkim_pem, dkim_txt = signing_record()
            (out_dir / "dkim.pem").write_bytes(dkim_pem)
            more, silent = adversary_dns(dkim_txt)
            more.update(evidence_dns(dkim_txt))
            dns_addr, _dns = start_dns(procs, work / "dns", {
                SPF_DOMAIN: {"TXT": [f"v=spf1 ip4:{SPF_IP} -all"]},
                SPF_BOTS_DOMAIN: {"TXT": ["v=spf1 ip4:127.4.0.0/16 -all"]},
                "example.org": {"TXT": ["v=spf1 ?all"]},
                "bots.invalid": {"TXT": ["v=spf1 ?all"]},
                **more, "$silent": silent,
            }, server=dns_server)
            postfix: Running | None = None
            pf = start_postfix(stack, work / "postfix") if (
                "postfix" in names or not a.no_throughput) else "not requested"
            if isinstance(pf, str):
                doc["targets"]["postfix"] = {"status": "skipped", "reason": pf}
                prog.note(f"postfix skipped: {pf}")
            else:
                postfix = pf
                doc["targets"]["postfix"] = {"status": "ok", "info": pf.info,
                                             "role": "flood" if "postfix" in names else "tp"}
            if not a.no_throughput:
                sk = start_sink(stack)
                sink = None if isinstance(sk, str) else sk
                if isinstance(sk, str):
                    notes.append(f"smtp-sink skipped: {sk}")
                doc["throughput"] = run_throughput(procs, work / "ingress-tp", postfix, sink,
                                                   mode, prog, notes)
                if sink is not None:
                    sink.stop()
            if not a.no_cost:
                prog.step("cost: CPU per shed transaction and per refused connection")
                doc["cost"] = cost.run_cost(procs, stack, work / "cost",
                                            runs=3 if mode == "full" else 1,
                                            seconds=8.0 if mode == "full" else 2.0,
                                            progress=lambda s: prog.note(f"  {s}"))
            flood_tables: dict[str, dict[str, Any]] = {
                "classify": {"nameservers": [dns_addr]},
                "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key),
                        "mtls_port": 0, "client_ca": str(pki.ca)},
            }
            for table, kv in settings.items():
                flood_tables.setdefault(table, {}).update(kv)
            for name in names:
                # issue 18: a scenario with its own settings gets its own fresh smtp-ingress
                # (after the shared one stopped); other targets run every scenario as one
                groups = [({}, scenarios)] if name != "smtp-ingress" else [
                    ({}, {k: v for k, v in scenarios.items() if not v.settings}),
                    *(({**v.settings}, {k: v}) for k, v in scenarios.items() if v.settings)]
                for over, group in groups:
                    if group:
                        doc["flood"] += run_target(procs, name, postfix, work, pki,
                                                   with_settings(flood_tables, over), over,
                                                   group, prog, out_dir, doc, notes, profile)
            if postfix is not None:
                postfix.stop()
    except KeyboardInterrupt:
        interrupted = True
        prog.note("interrupted: every started process has been stopped")
    finally:
        if a.keep:
            prog.note(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if profile:
        doc["profile"] = profile
    doc["machine"]["loadavg_end"] = _read("/proc/loadavg")[:14]
    end_git = git_state()
    if end_git != doc["git"]:
        notes.append(f"the ingress code changed during the run (git {doc['git']} at start, "
                     f"{end_git} at the end): the figures mix versions")
    doc["git_end"] = end_git
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    doc["interrupted"] = interrupted
    _write(out_dir, doc, prog)
    if mode == "full" and not interrupted and not a.no_publish and not a.scenarios:
        _publish(out_dir)
        prog.note(f"published to {RESULTS}")
    return 130 if interrupted else 0


def run_target(procs: Processes, name: str, postfix: Running | None, work: Path, pki: Pki,
               tables: dict[str, dict[str, Any]], over: dict[str, Any],
               scenarios: dict[str, Scenario], prog: Progress, out_dir: Path,
               doc: dict[str, Any], notes: list[str],
               profile: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Run `scenarios` on target `name` (smtp-ingress: started with `tables`, its overrides
    `over` from a scenario's settings; aiosmtpd: started; Postfix: the running one), then stop
    what was started here. The flood entries."""
    target: Running | None = None
    if name == "postfix":
        target = postfix
        if target is None:
            prog.done += len(scenarios)
            return []
    else:
        try:
            if name == "smtp-ingress":
                sub = "ingress" + "".join(f"-{k}" for k in scenarios) if over else "ingress"
                target = start_ingress(procs, work / sub, CONFIGS / "flood.toml", tables)
                if over:
                    doc["scenarios"][next(iter(scenarios))]["ingress_config"] = \
                        target.info["config_tables"]
                else:
                    _ingress_started(target, doc, notes)
            else:
                target = start_baseline(procs, work / "aiosmtpd")
            if not over or name not in doc["targets"]:
                doc["targets"][name] = {"status": "ok", "role": "flood",
                                        "info": {k: v for k, v in target.info.items()
                                                 if k != "config_tables"}}
        except TargetError as e:
            if over:    # a scenario's own instance: the shared target's status stays
                notes.append(f"{name} for {', '.join(scenarios)} failed to start: {e}")
            else:
                doc["targets"][name] = {"status": "failed", "reason": str(e)}
            prog.note(f"{name} failed to start: {e}")
            prog.done += len(scenarios)
            return []
    try:
        return run_scenarios(procs, target, pki, scenarios, prog, LEGIT_DEADLINE, out_dir,
                             profile if name == "smtp-ingress" else None,
                             doc["params"].get("probe_rt", True))
    finally:
        if name != "postfix":
            code = target.stop()
            where = doc["scenarios"][next(iter(scenarios))] if over else doc["targets"][name]
            where["exit_code"] = code
            if name == "smtp-ingress" and code != 0:
                notes.append(f"smtp-ingress exited {code} on SIGTERM (expected 0)")


def _ingress_started(target: Running, doc: dict[str, Any], notes: list[str]) -> None:
    tables = target.info["config_tables"]
    doc["params"]["bulk_rate_cap"] = tables["lanes.bulk"]["rate"]
    doc["params"]["ingress_config"] = tables
    gp = tables.get("admission", {}).get("greet_pause", 0)
    if gp:
        notes.append(f"smtp-ingress: the SPF sender's latency includes the {gp:g} s greet pause "
                     f"(early-talker test): it is a bulk client until its MAIL FROM passes SPF.")


def _write(out_dir: Path, doc: dict[str, Any], prog: Progress) -> None:
    (out_dir / "results.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    doc["issue8"] = issue8_rows(doc)
    doc["issue17"] = issue17_extra(doc)
    doc["issue18"] = evidence.issue18_rows(doc)
    md = (report.render_markdown(doc) + cost.markdown(doc.get("cost"))
          + issue8_markdown(doc["issue8"])
          + issue17_markdown(doc["issue17"]) + evidence.issue18_markdown(doc["issue18"]))
    (out_dir / "results.md").write_text(md)
    png: Path | None = None
    try:
        png = report.plot(doc, out_dir / "latency.png")
    except ImportError as e:
        prog.note(f"no plot: {e} (pip install matplotlib)")
    prog.note(md)
    prog.note(f"wrote {out_dir / 'results.json'}, results.md" + (", latency.png" if png else ""))


if __name__ == "__main__":
    sys.exit(main())
