"""Throughput with Postfix's own load generator, smtp-source, against SMTP targets on loopback.

Purpose
    Measure how many messages per second a target accepts from ``smtp-source -s 20 -l 1024
    -m 20000`` (one message per connection) and the same with ``-d`` (many messages per
    connection), the way issue 2 and issue 4 ask: medians of N runs, side by side with a private
    Postfix instance (tests/kit/postfix.py, delivery="discard", default limits) and ``smtp-sink``
    (the C ceiling: it accepts and forgets), with the ratio of every target against Postfix.

API
    ``Target(name, host, port, drain=None)``: an SMTP listener; ``drain(timeout) -> bool`` is
        called after each run (the private Postfix waits for its queue to empty there, smtp-ingress
        until its journals' files are in new/, so a run never competes with the previous run's
        deliveries or files, and its CPU counts them).
    ``run_smtp_source(host, port, *, messages=20000, sessions=20, size=1024, reuse=False, ...)
        -> SourceRun``: one timed smtp-source run (``reuse=True`` adds ``-d``).
    ``SmtpSink(port, host="127.0.0.1", backlog=256, user="nobody")``: start()/stop()/context
        manager, ``.pid``; started and stopped by PID.
    ``benchmark(targets, *, modes, runs, messages, sessions, size, idle_below, progress)
        -> BenchResult``: interleaved runs (mode -> run -> target), medians and ratios; each
        SourceRun also records ``busy_before`` (machine CPU busy just before; with
        ``idle_below`` it first waits, bounded, for a quiet machine) and ``foreign_cpu`` (share
        of the CPUs used by unrelated processes during the run, see ``ForeignCpu``).
    ``render_markdown(result, baseline="postfix") -> str``, ``BenchResult.to_dict()`` (JSON).
    ``builtin_targets(stack, names, workdir) -> list[Target]``: starts ``postfix`` and/or
        ``smtp-sink`` on free loopback ports; the ExitStack stops them.
    ``raise_nofile_limit() -> int``: soft RLIMIT_NOFILE := hard limit.
    ``cpu_snapshot(pids) -> CpuSnapshot``, ``cpu_used(before, after) -> {role: s}`` (pure):
        the CPU of every process of a target over a window, per role, with what the processes
        that exited in it used there ("exited"); ``per_unit_ms([(cpu_s, units)]) -> {role: ms}``
        (pure): the median CPU per message (or per shed transaction, refused connection: bench.
        cost) over runs.
    ``main(argv)``: ``python -m bench.throughput [--quick] [-m N] [--runs N] [--modes ...]
        [--no-postfix] [--no-sink] [--wait-idle PCT] [--json FILE] [name=host:port ...]``;
        raises RLIMIT_NOFILE, starts the built-ins, prints progress on stderr and a Markdown
        table on stdout; exit 0 if every target/mode has a median, 1 otherwise, 2 if no tool.

Failure modes
    A run whose smtp-source exits non-zero (it aborts on any non-2xx reply unless ``-A``), prints
    anything on stderr, or exceeds its timeout (it is then killed by PID) is recorded as failed
    with its stderr lines; medians use only the runs that succeeded, and a target with none shows
    "failed". An external target that does not answer 220 is skipped with a note. If the private
    Postfix cannot start (``PostfixUnavailable``: not root or not installed) it is left out with a
    note and ratios are then computed against the first target that has a number. Missing
    smtp-source raises ``ToolMissing``.

Limits
    Loopback targets only (127.0.0.0/8 or ::1). messages <= 1,000,000, runs <= 20,
    sessions <= 1,000, size <= 10 MB; every subprocess has a timeout (default 30 s + 10 ms per
    message). Numbers are for this machine only; smtp-source itself uses CPU on the same cores,
    and on a shared 2-core box other work skews them (hence busy_before / foreign_cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil

from bench.sched import role_of
from ingress.core import procs
from tests.kit.postfix import smtp_banner

__all__ = [
    "MODES",
    "BenchResult",
    "SmtpSink",
    "SourceRun",
    "Target",
    "ToolMissing",
    "benchmark",
    "builtin_targets",
    "main",
    "raise_nofile_limit",
    "render_markdown",
    "run_smtp_source",
]

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
MODES = {"conn": "1 msg/conn", "reuse": "-d (many/conn)"}
MAX_MESSAGES = 1_000_000
MAX_RUNS = 20
MAX_SESSIONS = 1_000
MAX_SIZE = 10 * 1024 * 1024


class ToolMissing(RuntimeError):
    """smtp-source / smtp-sink is not installed (Debian package postfix)."""


def _tool(path: str) -> str:
    found = path if os.access(path, os.X_OK) else shutil.which(Path(path).name)
    if not found:
        raise ToolMissing(f"{Path(path).name} not found; apt-get install postfix")
    return found


def _check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"only loopback targets are allowed, not {host!r}")


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    return procs.raise_nofile()[0]


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat; (0, 0) where unavailable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def cpu_busy(window: float = 1.0) -> float | None:
    """Fraction (0..1) of all CPUs busy during the next ``window`` seconds; None if unknown."""
    b0, t0 = _cpu_times()
    time.sleep(window)
    b1, t1 = _cpu_times()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else None


def wait_for_idle(max_busy: float, timeout: float, window: float = 1.0) -> float | None:
    """Wait (at most ``timeout`` s) until the machine is at most ``max_busy`` busy; return the
    last measured busy fraction. Other processes on a small box skew every number."""
    deadline = time.monotonic() + timeout
    while True:
        busy = cpu_busy(window)
        if busy is None or busy <= max_busy or time.monotonic() >= deadline:
            return busy
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, own CPU ticks utime+stime, reaped children's ticks cutime+cstime)."""
    hz = os.sysconf("SC_CLK_TCK")
    return {pid: (ppid, round(own * hz), round(kids * hz))
            for pid, (ppid, own, kids) in procs.cpu_table().items()}


def _listener_pids(port: int) -> set[int]:
    """PIDs holding a listening TCP socket on ``port``."""
    return procs.listeners(port)


class ForeignCpu:
    """Share of the machine's CPU used during a run by everything else: all CPU time the kernel
    counted as busy (/proc/stat) minus the time of our side -- this process and its children
    (smtp-source, smtp-sink), and the target: the processes holding its listening socket, their
    parent unless that is init, and all their descendants, including reaped children. A small
    2-core box shared with other work skews every number; this says by how much. Approximate:
    kernel work done on behalf of the benchmark outside its processes counts as foreign."""

    def __init__(self, port: int) -> None:
        roots = {os.getpid()}
        table = _proc_table()
        for pid in _listener_pids(port):
            roots.add(pid)
            ppid = table[pid][0] if pid in table else 0
            if ppid > 1:
                roots.add(ppid)
        self._roots = roots
        self._before = table
        self._busy0, self._total0 = _cpu_times()

    def _ours(self, table: dict[int, tuple[int, int, int]]) -> set[int]:
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        ours: set[int] = set()
        stack = list(self._roots)
        while stack:
            pid = stack.pop()
            if pid not in ours:
                ours.add(pid)
                stack.extend(children.get(pid, ()))
        return ours

    def stop(self) -> float | None:
        after = _proc_table()
        busy1, total1 = _cpu_times()
        if total1 <= self._total0:
            return None
        ours = self._ours(after) | self._ours(self._before)
        our_ticks = 0
        for pid in ours:
            if pid in after:
                b = self._before.get(pid, (0, 0, 0))
                our_ticks += (after[pid][1] - b[1]) + (after[pid][2] - b[2])
        foreign = (busy1 - self._busy0) - our_ticks
        return min(1.0, max(0.0, foreign / (total1 - self._total0)))


# ---------------------------------------------------------------------------------- smtp-source


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    drain: Callable[[float], bool] | None = field(default=None, compare=False, repr=False)
    # Its processes, the one that reaps the others first (the supervisor, Postfix's master):
    # the CPU of each role is measured over a run (cpu_snapshot, cpu_used). None: not
    # measured.
    pids: Callable[[], list[int]] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class CpuSnapshot:
    """The CPU seconds (user + system) used so far by each process of a target -- pid -> (role,
    seconds), role: bench.sched.role_of of its command line ("acceptor", "fast worker",
    "smtpd", "cleanup") -- and ``reaped``: the CPU of the children its first pid (the
    supervisor, Postfix's master) has reaped."""

    procs: dict[int, tuple[str, float]]
    reaped: float = 0.0


def cpu_snapshot(pids: Sequence[int]) -> CpuSnapshot:
    """The CPU so far of ``pids`` (the one that reaps the others first); a process that is
    gone is left out."""
    procs: dict[int, tuple[str, float]] = {}
    reaped = 0.0
    for i, pid in enumerate(pids):
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                t = p.cpu_times()
                role = role_of(p.cmdline())
        except (psutil.Error, OSError):
            continue
        procs[pid] = (role, t.user + t.system)
        if i == 0:
            reaped = t.children_user + t.children_system
    return CpuSnapshot(procs, reaped)


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Per role, the CPU seconds used between two snapshots (pure). A process alive at both
    counts its growth; one born since, all of it; "exited": what the processes reaped since
    used within the window -- the reaped CPU's growth less what those that were alive in
    ``before`` had used by then (Postfix's smtpd and cleanup exit after max_use connections:
    counting their whole life would charge the window with work done before it)."""
    out: dict[str, float] = {}
    for pid, (role, secs) in after.procs.items():
        out[role] = out.get(role, 0.0) + secs - before.procs.get(pid, (role, 0.0))[1]
    earlier = sum(secs for pid, (_, secs) in before.procs.items() if pid not in after.procs)
    out["exited"] = after.reaped - before.reaped - earlier
    return {role: round(v, 4) for role, v in out.items() if abs(v) >= 0.00005}


def per_unit_ms(samples: Sequence[tuple[dict[str, float], int]]) -> dict[str, float] | None:
    """Median over runs of CPU milliseconds per unit (message, shed transaction, refused
    connection), per role and in "all" (the sum of the roles), from (CPU seconds per role,
    units) pairs; runs with no units are left out, None when none is left (pure)."""
    runs = [(cpu, n) for cpu, n in samples if n > 0]
    if not runs:
        return None
    roles = sorted({k for cpu, _ in runs for k in cpu})
    out = {role: statistics.median(cpu.get(role, 0.0) * 1000 / n for cpu, n in runs)
           for role in roles}
    out["all"] = statistics.median(sum(cpu.values()) * 1000 / n for cpu, n in runs)
    return {k: round(v, 4) for k, v in out.items()}


@dataclass(frozen=True)
class SourceRun:
    target: str
    mode: str  # "conn" or "reuse"
    messages: int
    sessions: int
    size: int
    seconds: float
    rate: float  # messages / seconds when ok, else 0.0
    ok: bool
    returncode: int | None
    errors: tuple[str, ...] = ()
    timed_out: bool = False
    drain_seconds: float | None = None  # time the target needed afterwards to empty its queue
    busy_before: float | None = None  # whole-machine CPU busy fraction just before the run
    foreign_cpu: float | None = None  # share of all CPUs used by unrelated processes during it
    cpu_s: dict[str, float] | None = None  # the target's CPU seconds per role, run + drain


def smtp_source_argv(
    host: str, port: int, *, messages: int, sessions: int, size: int, reuse: bool,
    sender: str, recipient: str, helo: str,
) -> list[str]:
    argv = [_tool(SMTP_SOURCE), "-s", str(sessions), "-l", str(size), "-m", str(messages)]
    if reuse:
        argv.append("-d")
    argv += ["-M", helo, "-f", sender, "-t", recipient]
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return [*argv, addr]


def parse_errors(stderr: str) -> tuple[str, ...]:
    """smtp-source is silent on success; every non-empty stderr line is an error or warning."""
    return tuple(line.strip() for line in stderr.splitlines() if line.strip())


def run_smtp_source(
    host: str,
    port: int,
    *,
    messages: int = 20_000,
    sessions: int = 20,
    size: int = 1024,
    reuse: bool = False,
    sender: str = "bench@source.test",
    recipient: str = "rcpt@example.test",
    helo: str = "bench-source.test",
    timeout: float | None = None,
    target: str = "",
) -> SourceRun:
    """One timed smtp-source run; killed by PID if it exceeds ``timeout`` seconds."""
    _check_loopback(host)
    if not (1 <= messages <= MAX_MESSAGES and 1 <= sessions <= MAX_SESSIONS
            and 0 <= size <= MAX_SIZE):
        raise ValueError(f"out of bounds: messages={messages} sessions={sessions} size={size}")
    if timeout is None:
        timeout = 30.0 + messages * 0.010
    argv = smtp_source_argv(host, port, messages=messages, sessions=sessions, size=size,
                            reuse=reuse, sender=sender, recipient=recipient, helo=helo)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    timed_out = False
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        try:
            _out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            err = ""
    seconds = time.perf_counter() - t0
    errors = parse_errors(err or "")
    if timed_out:
        errors = (f"timed out after {timeout:g}s (killed pid {proc.pid})", *errors)
    ok = not timed_out and proc.returncode == 0 and not errors
    return SourceRun(
        target=target or f"{host}:{port}", mode="reuse" if reuse else "conn",
        messages=messages, sessions=sessions, size=size, seconds=seconds,
        rate=messages / seconds if ok and seconds > 0 else 0.0, ok=ok,
        returncode=proc.returncode, errors=errors[:20], timed_out=timed_out,
    )


# ---------------------------------------------------------------------------------- smtp-sink


class SmtpSink:
    """``smtp-sink host:port backlog``: Postfix's accept-and-forget SMTP server (the C ceiling)."""

    def __init__(self, port: int, host: str = "127.0.0.1", backlog: int = 256,
                 user: str = "nobody", start_timeout: float = 10.0,
                 extra_args: Sequence[str] = ()) -> None:
        _check_loopback(host)
        self.host, self.port, self.backlog, self.user = host, int(port), int(backlog), user
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def pids(self) -> list[int]:
        return [self._proc.pid] if self._proc is not None else []

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-2000:]

    def start(self) -> SmtpSink:
        if self._proc is not None:
            return self
        if smtp_banner(self.host, self.port, timeout=0.5) is not None:
            raise RuntimeError(f"{self.host}:{self.port} is already in use")
        argv = [_tool(SMTP_SINK)]
        if os.geteuid() == 0:
            argv += ["-u", self.user]  # required when started as root
        addr = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        argv += [*self.extra_args, addr, str(self.backlog)]
        self._log = tempfile.TemporaryFile(prefix="smtp-sink-")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._stderr()
                self.stop()
                raise RuntimeError(f"smtp-sink exited at start: {err.strip()}")
            banner = smtp_banner(self.host, self.port, timeout=1.0)
            if banner and banner.startswith("220"):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"smtp-sink did not answer within {self.start_timeout:g}s")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---------------------------------------------------------------------------------- orchestration


@dataclass
class BenchResult:
    params: dict[str, object]
    targets: list[str]
    modes: list[str]
    runs: list[SourceRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rates(self, target: str, mode: str) -> list[float]:
        return [r.rate for r in self.runs if r.target == target and r.mode == mode and r.ok]

    def median(self, target: str, mode: str) -> float | None:
        rates = self.rates(target, mode)
        return statistics.median(rates) if rates else None

    def cpu_per_message(self, target: str, mode: str) -> dict[str, float] | None:
        """Median over the successful runs of CPU milliseconds per message, per role and in
        "all" (every process of the target, the reaped ones included): per_unit_ms."""
        return per_unit_ms([(r.cpu_s, r.messages) for r in self.runs
                            if r.target == target and r.mode == mode and r.ok
                            and r.cpu_s is not None])

    def ratio(self, target: str, mode: str, baseline: str) -> float | None:
        value, base = self.median(target, mode), self.median(baseline, mode)
        return value / base if value is not None and base else None

    def to_dict(self, baseline: str = "postfix") -> dict[str, object]:
        summary = {
            t: {
                m: {"median_msgs_per_s": self.median(t, m),
                    "ratio_vs_" + baseline: self.ratio(t, m, baseline),
                    "runs_ok": len(self.rates(t, m)),
                    "cpu_ms_per_msg": self.cpu_per_message(t, m),
                    "runs": sum(1 for r in self.runs if r.target == t and r.mode == m)}
                for m in self.modes
            }
            for t in self.targets
        }
        return {"params": self.params, "targets": self.targets, "modes": self.modes,
                "summary": summary, "runs": [asdict(r) for r in self.runs], "notes": self.notes}


def benchmark(
    targets: Sequence[Target],
    *,
    modes: Iterable[str] = ("conn", "reuse"),
    runs: int = 3,
    messages: int = 20_000,
    sessions: int = 20,
    size: int = 1024,
    recipient: str = "rcpt@example.test",
    sender: str = "bench@source.test",
    timeout: float | None = None,
    drain_timeout: float = 120.0,
    settle: float = 1.0,
    idle_below: float | None = None,
    idle_timeout: float = 30.0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Interleave runs (for each mode, for each run, for each target) and collect SourceRuns.

    With ``idle_below`` (a fraction, e.g. 0.25), each run first waits up to ``idle_timeout`` s
    for the machine's CPU to be at most that busy; the busy fraction is recorded either way."""
    modes = list(modes)
    if not 1 <= runs <= MAX_RUNS:
        raise ValueError(f"runs must be 1..{MAX_RUNS}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    result = BenchResult(
        params={"messages": messages, "sessions": sessions, "size": size, "runs": runs,
                "recipient": recipient, "sender": sender},
        targets=[t.name for t in targets], modes=modes,
    )
    total = len(modes) * runs * len(targets)
    done = 0
    for mode in modes:
        for i in range(runs):
            for t in targets:
                done += 1
                busy = (wait_for_idle(idle_below, idle_timeout) if idle_below is not None
                        else cpu_busy(0.5))
                watch = ForeignCpu(t.port)
                cpu0 = cpu_snapshot(t.pids()) if t.pids is not None else None
                run = run_smtp_source(t.host, t.port, messages=messages, sessions=sessions,
                                      size=size, reuse=(mode == "reuse"), sender=sender,
                                      recipient=recipient, timeout=timeout, target=t.name)
                foreign = watch.stop()
                drained: float | None = None
                if t.drain is not None:
                    d0 = time.monotonic()
                    if t.drain(drain_timeout):
                        drained = time.monotonic() - d0
                    else:
                        result.notes.append(f"{t.name}: queue not empty {drain_timeout:g}s "
                                            f"after {mode} run {i + 1}")
                cpu = (cpu_used(cpu0, cpu_snapshot(t.pids()))
                       if t.pids is not None and cpu0 is not None else None)
                run = dataclasses.replace(run, drain_seconds=drained, busy_before=busy,
                                          foreign_cpu=foreign, cpu_s=cpu)
                result.runs.append(run)
                if progress:
                    state = f"{run.rate:,.0f} msgs/s" if run.ok else "FAILED: " + (
                        run.errors[0] if run.errors else f"rc={run.returncode}")
                    load = "" if busy is None else f"; cpu {busy:.0%} busy before"
                    load += "" if foreign is None else f", {foreign:.0%} used by others during"
                    progress(f"[{done}/{total}] {t.name:<14} {MODES[mode]:<15} run {i + 1}: "
                             f"{run.messages} msgs in {run.seconds:.2f}s, {state}{load}")
                if settle > 0:
                    time.sleep(settle)
    return result


def cpu_table(result: BenchResult) -> list[str]:
    """Markdown lines: per target and mode, the CPU milliseconds per message of all its
    processes and of its busiest roles (median of the runs); none when nothing was measured."""
    rows = []
    for t in result.targets:
        for m in result.modes:
            cpu = result.cpu_per_message(t, m)
            if not cpu:
                continue
            roles = sorted(((v, k) for k, v in cpu.items() if k != "all"), reverse=True)
            rows.append(f"| {t} | {MODES[m]} | {cpu['all']:.3f} | "
                        + ", ".join(f"{k} {v:.3f}" for v, k in roles[:6]) + " |")
    if not rows:
        return []
    return ["", "CPU per message (ms; every process of the target, over the run and its queue "
            "drain; median of the runs):", "",
            "| target | mode | all | by role |", "|---|---|---:|---|", *rows]


def render_markdown(result: BenchResult, baseline: str = "postfix") -> str:
    """A Markdown table: median msgs/s per mode and the ratio against ``baseline``."""
    if baseline not in result.targets or all(
            result.median(baseline, m) is None for m in result.modes):
        baseline = next((t for t in result.targets
                         if any(result.median(t, m) for m in result.modes)), baseline)
    p = result.params
    head = ["target"]
    for m in result.modes:
        head += [f"{MODES[m]} msgs/s", f"vs {baseline}"]
    head.append("runs (msgs/s)")
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (2 * len(result.modes)) + ["---"]) + "|"]
    for t in result.targets:
        cells = [t]
        per_run = []
        for m in result.modes:
            med, ratio = result.median(t, m), result.ratio(t, m, baseline)
            cells += ["failed" if med is None else f"{med:,.0f}",
                      "-" if ratio is None else f"{ratio:.2f}"]
            rs = [r for r in result.runs if r.target == t and r.mode == m]
            per_run.append(("-d: " if m == "reuse" else "") + ", ".join(
                f"{r.rate:,.0f}" if r.ok else "fail" for r in rs))
        cells.append("; ".join(per_run))
        lines.append("| " + " | ".join(cells) + " |")
    caption = (f"smtp-source -s {p['sessions']} -l {p['size']} -m {p['messages']} "
               f"(and -d), median of {p['runs']}; {os.cpu_count()} cores, "
               f"{platform.system()} {platform.release()}")
    out = "\n".join([caption, "", *lines, *cpu_table(result)])
    notes = list(result.notes)
    busy = [r.busy_before for r in result.runs if r.busy_before is not None]
    if busy and max(busy) > 0.15:
        notes.append(f"machine was not idle before some runs (CPU busy up to "
                     f"{max(busy):.0%}, median {statistics.median(busy):.0%}); "
                     "other processes skew these numbers")
    foreign = [r.foreign_cpu for r in result.runs if r.foreign_cpu is not None]
    if foreign and max(foreign) > 0.05:
        notes.append(f"unrelated processes used up to {max(foreign):.0%} of the CPUs during runs "
                     f"(median {statistics.median(foreign):.0%}); see foreign_cpu per run")
    failures = [r for r in result.runs if not r.ok]
    if failures or notes:
        out += "\n"
        for r in failures:
            out += f"\n- {r.target} {MODES[r.mode]}: {'; '.join(r.errors[:3]) or r.returncode}"
        for n in notes:
            out += f"\n- {n}"
    return out + "\n"


def builtin_targets(stack: contextlib.ExitStack, names: Iterable[str], workdir: Path,
                    notes: list[str] | None = None) -> list[Target]:
    """Start the built-in targets (``postfix``, ``smtp-sink``); ``stack`` stops them."""
    from tests.kit.postfix import PostfixError, PostfixInstance, PostfixUnavailable, free_port

    targets: list[Target] = []
    for name in names:
        if name == "postfix":
            pf = PostfixInstance(workdir / "postfix", free_port(), delivery="discard",
                                 accept_domains=("example.test",))
            try:
                stack.enter_context(pf)
            except (PostfixUnavailable, PostfixError, ValueError) as exc:
                if notes is not None:
                    notes.append(f"postfix left out: {str(exc).splitlines()[0]}")
                continue
            targets.append(Target("postfix", pf.host, pf.port, drain=pf.wait_queue_empty,
                                  pids=pf.pids))
        elif name == "smtp-sink":
            sink = SmtpSink(free_port())
            try:
                stack.enter_context(sink)
            except (RuntimeError, OSError) as exc:
                if notes is not None:
                    notes.append(f"smtp-sink left out: {exc}")
                continue
            targets.append(Target("smtp-sink", sink.host, sink.port, pids=sink.pids))
        else:
            raise ValueError(f"unknown built-in target {name!r}")
    return targets


def _parse_target(spec: str) -> Target:
    name, sep, addr = spec.partition("=")
    host, sep2, port = addr.rpartition(":")
    if not sep or not sep2 or not name or not port.isdigit():
        raise argparse.ArgumentTypeError(f"target must be name=host:port, not {spec!r}")
    host = host.strip("[]")
    try:
        _check_loopback(host)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return Target(name, host, int(port))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", type=_parse_target, metavar="name=host:port",
                    help="extra SMTP targets on loopback (e.g. smtp-ingress=127.0.0.1:2525)")
    ap.add_argument("-m", "--messages", type=int, default=None,
                    help="messages per run (default 20000; 2000 with --quick)")
    ap.add_argument("--runs", type=int, default=None, help="runs per target and mode "
                    "(default 3; 1 with --quick); the table shows medians")
    ap.add_argument("-s", "--sessions", type=int, default=20)
    ap.add_argument("-l", "--size", type=int, default=1024)
    ap.add_argument("--modes", default="conn,reuse",
                    help="comma list: conn (one message per connection), reuse (-d)")
    ap.add_argument("--quick", action="store_true", help="small and fast: -m 2000, 1 run")
    ap.add_argument("--no-postfix", action="store_true", help="do not start a private Postfix")
    ap.add_argument("--no-sink", action="store_true", help="do not start smtp-sink")
    ap.add_argument("--recipient", default="rcpt@example.test")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-run limit in seconds (default 30 + 0.01 per message)")
    ap.add_argument("--settle", type=float, default=1.0, help="pause between runs, seconds")
    ap.add_argument("--wait-idle", type=float, default=25.0, metavar="PCT",
                    help="before each run wait until CPU busy <= PCT%% (0 = do not wait)")
    ap.add_argument("--idle-timeout", type=float, default=30.0,
                    help="longest wait for idle before a run, seconds")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the private Postfix lives (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write results as JSON here")
    args = ap.parse_args(argv)

    messages = args.messages or (2_000 if args.quick else 20_000)
    runs = args.runs or (1 if args.quick else 3)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not 1 <= messages <= MAX_MESSAGES or not 1 <= runs <= MAX_RUNS:
        ap.error(f"need 1 <= messages <= {MAX_MESSAGES} and 1 <= runs <= {MAX_RUNS}")
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    try:
        _tool(SMTP_SOURCE)
    except ToolMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nofile = raise_nofile_limit()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
            workdir.chmod(0o711)  # the postfix user must traverse it to reach data_directory
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            workdir = args.workdir
        # Stop the built-ins on SIGTERM too (ExitStack unwinds on the SystemExit).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        names = [n for n, off in (("postfix", args.no_postfix), ("smtp-sink", args.no_sink))
                 if not off]
        targets = builtin_targets(stack, names, workdir, notes)
        for t in args.targets:
            banner = smtp_banner(t.host, t.port)
            if banner and banner.startswith("220"):
                targets.append(t)
            else:
                notes.append(f"{t.name} ({t.host}:{t.port}) skipped: no 220 banner ({banner!r})")
        if not targets:
            print("error: no target to measure\n" + "\n".join(notes), file=sys.stderr)
            return 1
        progress(f"targets: {', '.join(f'{t.name}={t.host}:{t.port}' for t in targets)}; "
                 f"RLIMIT_NOFILE {nofile}")
        result = benchmark(targets, modes=modes, runs=runs, messages=messages,
                           sessions=args.sessions, size=args.size, recipient=args.recipient,
                           timeout=args.timeout, settle=args.settle, progress=progress,
                           idle_below=args.wait_idle / 100 if args.wait_idle > 0 else None,
                           idle_timeout=args.idle_timeout)
        result.notes[:0] = notes
    print(render_markdown(result))
    if args.json is not None:
        data = result.to_dict()
        data["machine"] = {"cores": os.cpu_count(), "system": platform.platform(),
                           "python": platform.python_version()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if all(result.median(t, m) is not None
                    for t in result.targets for m in result.modes) else 1


if __name__ == "__main__":
    sys.exit(main())
