"""The probe's own health: the legitimate senders' scheduling priority and their loop's stalls.

Purpose
    The legitimate senders (the probe) measure connect -> 250 from the flood generator's main
    process, on the same two cores as the target and the bots. A real client has its own CPU:
    time the probe itself spends waiting for a core is not the target's latency, yet it lands in
    the probe's figures. It did: with the kernel's autogroup scheduling (each session one
    group; the bench starts every target in its own session), a process that runs a little now
    and then gets a small share of a core where it has not run lately, and the probe's event
    loop stalled 20-150 ms at a time while a flood kept the cores busy. Its thread was not
    running then (its CPU time over such a stall: 0.5-4 ms), and the slowest transactions of
    the run were the ones in flight across those stalls (docs/benchmarks.md, "The probe's own
    stalls").

    So the probe's thread runs at SCHED_FIFO priority 1 for the flood (with
    SCHED_RESET_ON_FORK: the bot processes and any thread it starts run as before), and a
    sampler on its loop records how often the loop itself was late by more than STALL_MS. The
    target's processes, the bots and every peer are scheduled exactly as before; the peers are
    measured by the same probe.

API
    raise_priority() -> str          "fifo", or "normal (<why>)" where the kernel refused
    restore_priority()               the calling thread back to SCHED_OTHER
    StallWatch()                     .run() (a task on the probe's loop), .summary() -> dict

Limits
    The sampler wakes every SAMPLE_S; a stall shorter than STALL_MS is not counted. SCHED_FIFO
    needs CAP_SYS_NICE (root here); without it the probe runs at normal priority and says so
    in the result. The kernel's RT throttling (sched_rt_runtime_us) bounds what a runaway
    probe could take; the probe's loop is bounded in time like every load loop here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

SAMPLE_S = 0.005      # the sampler's sleep
STALL_MS = 10.0       # a wake-up later than this (beyond the sleep) is a stall


def raise_priority() -> str:
    """The calling thread to SCHED_FIFO 1, children and new threads reset to SCHED_OTHER."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    except (OSError, AttributeError) as e:
        return f"normal ({e})"
    return "fifo"


def restore_priority() -> None:
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


class StallWatch:
    """Counts the probe loop's late wake-ups (bounded: counters only)."""

    def __init__(self) -> None:
        self.samples = 0
        self.stalls = 0
        self.max_ms = 0.0
        self.total_ms = 0.0

    def note(self, late_ms: float) -> None:
        self.samples += 1
        if late_ms > STALL_MS:
            self.stalls += 1
            self.total_ms += late_ms
        self.max_ms = max(self.max_ms, late_ms)

    async def run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(SAMPLE_S)
            self.note((time.perf_counter() - t - SAMPLE_S) * 1000.0)

    def summary(self) -> dict[str, Any]:
        return {"samples": self.samples, "stalls": self.stalls, "stall_ms": STALL_MS,
                "max_ms": round(self.max_ms, 1), "stalled_ms": round(self.total_ms, 1)}
