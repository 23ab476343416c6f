"""Where the CPU goes during a scenario, and who waited for it: per process role, the CPU time
and the time spent runnable but not running (the scheduler's run-queue delay).

API
    snapshot(root_pid) -> {pid: Sample}      every process under root_pid (itself included),
                                             summed over its threads (/proc/PID/task/*/schedstat)
    delta(before, after, wall_s) -> [row]    per role (the process title, "smtp-ingress: fast
                                             worker 0" -> "fast worker"), sorted by CPU

A role's `wait_per_slice_us` is how long, on average, one of its wake-ups waited for a core:
on a saturated 2-core machine it is the latency the scheduler adds to each hop of a message.

Failure modes and limits: Linux only (/proc with schedstat, CONFIG_SCHEDSTATS not needed for
/proc/PID/schedstat); a process that ends between snapshots is left out; a thread that ends
between snapshots takes its counts with it (zmq's io threads live as long as the process).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

_DIGITS = re.compile(r"[-\s]\d+$")


@dataclass(frozen=True)
class Sample:
    role: str
    run_ns: int      # on a CPU
    wait_ns: int     # runnable, waiting for a CPU
    slices: int      # times it was scheduled in


def role_of(cmdline: list[str]) -> str:
    """ "smtp-ingress: fast worker 0" -> "fast worker"; anything else: its program's name."""
    title = " ".join(cmdline)
    if title.startswith("smtp-ingress: "):
        # setproctitle pads the command line with empty arguments: strip before the digits
        return _DIGITS.sub("", title[len("smtp-ingress: "):].split(" [")[0].strip()).strip()
    if not cmdline:
        return "?"
    if "-m" in cmdline[:-1]:
        return cmdline[cmdline.index("-m") + 1]
    return Path(cmdline[0]).name


def _threads(pid: int) -> tuple[int, int, int]:
    run = wait = slices = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            r, w, s = (int(x) for x in (task / "schedstat").read_text().split()[:3])
            run, wait, slices = run + r, wait + w, slices + s
    return run, wait, slices


def snapshot(root_pid: int) -> dict[int, Sample]:
    out: dict[int, Sample] = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        with contextlib.suppress(psutil.Error, OSError):
            out[p.pid] = Sample(role_of(p.cmdline()), *_threads(p.pid))
    return out


def delta(before: dict[int, Sample], after: dict[int, Sample], wall_s: float
          ) -> list[dict[str, Any]]:
    """Per role, over the processes present in both snapshots (pure)."""
    acc: dict[str, list[int]] = {}
    for pid, b in after.items():
        a = before.get(pid)
        if a is None or a.role != b.role:
            continue
        row = acc.setdefault(b.role, [0, 0, 0, 0])
        row[0] += 1
        row[1] += b.run_ns - a.run_ns
        row[2] += b.wait_ns - a.wait_ns
        row[3] += b.slices - a.slices
    rows = []
    for role, (n, run, wait, slices) in acc.items():
        rows.append({
            "role": role, "processes": n,
            "cpu_pct": round(100.0 * run / 1e9 / wall_s, 1) if wall_s > 0 else None,
            "wait_pct": round(100.0 * wait / 1e9 / wall_s, 1) if wall_s > 0 else None,
            "slices": slices,
            "wait_per_slice_us": round(wait / slices / 1e3, 1) if slices else None,
        })
    return sorted(rows, key=lambda r: -(r["cpu_pct"] or 0.0))
