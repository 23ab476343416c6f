"""bench/flood/probe.py: the probe's priority (only its own thread, never its children) and
its stall counter; the report's table of it. bench/flood/orchestrate.py: the legitimate
senders' ticks spread over their interval, so that the probe's one thread never runs two of
their transactions at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from bench.flood.bots import LegitSpec
from bench.flood.orchestrate import sender_phases
from bench.flood.probe import STALL_MS, StallWatch, raise_priority, restore_priority


@pytest.mark.parametrize(("kinds", "want"), [
    (["trusted"], [0.0]),
    (["trusted", "cert", "spf"], [0.0, 0.1 / 3, 0.2 / 3]),
    # the retrying MTAs keep their own schedule; the periodic senders share the interval
    (["trusted", "mta", "spf", "mta"], [0.0, 0.0, 0.05, 0.0]),
    ([], []),
])
def test_sender_phases_spread_the_senders_over_their_interval(kinds: list[str],
                                                              want: list[float]) -> None:
    specs = [LegitSpec(k, f"127.0.0.{10 + i}", 0.1) for i, k in enumerate(kinds)]
    assert sender_phases(specs) == pytest.approx(want)


def test_stall_watch_counts_only_late_wakeups() -> None:
    w = StallWatch()
    for late in (0.1, 2.0, STALL_MS, STALL_MS + 0.5, 60.0):
        w.note(late)
    s = w.summary()
    assert s["samples"] == 5 and s["stalls"] == 2
    assert s["max_ms"] == 60.0 and s["stalled_ms"] == pytest.approx(STALL_MS + 60.5, abs=0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs CAP_SYS_NICE")
def test_priority_is_the_threads_own_and_children_start_normal() -> None:
    seen: dict[str, object] = {}

    def probe() -> None:
        seen["priority"] = raise_priority()
        seen["policy"] = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
            capture_output=True, text=True, timeout=30, check=True)
        seen["child"] = int(child.stdout)
        restore_priority()
        seen["after"] = os.sched_getscheduler(0)

    t = threading.Thread(target=probe)
    t.start()
    t.join(60)
    assert seen["priority"] == "fifo" and seen["policy"] == os.SCHED_FIFO
    assert seen["child"] == os.SCHED_OTHER          # the bots are scheduled as before
    assert seen["after"] == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER   # the test's own thread never moved


def test_the_no_flood_reference_is_measured_warm() -> None:
    """Every legitimate sender primes the target before its measured window, and the no-flood
    references leave room for it: their first transaction was a cold one (90-160 ms), and
    with 120 samples a second cold one set the p99 the flood rows are divided by."""
    from pathlib import Path

    from bench.run import legit_specs
    from bench.scenarios import LEGIT_PRIME, NOFLOOD_WARMUP, build_scenarios
    from bench.targets import Pki, Running

    p = Path("/nonexistent")
    specs = legit_specs(Running("t", "127.0.0.1", 25, 2465), Pki(p, p, p, p))
    assert {s.kind for s in specs} == {"trusted", "cert", "spf"}
    assert all(s.prime == LEGIT_PRIME >= 2 for s in specs)
    full = build_scenarios("full")
    for name in ("noflood", "noflood18"):
        sc = full[name]
        assert sc.warmup_s == NOFLOOD_WARMUP > 0          # priming runs before the window
        assert sc.duration_s - sc.warmup_s == 12.0         # still 120 measured samples
