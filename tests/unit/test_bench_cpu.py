"""bench.throughput's CPU accounting per role (issue 20: CPU per message of every process of a
target, Postfix's included, measured the same way): the snapshot of real processes, the delta
and the per-message median (pure)."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.throughput import (
    BenchResult,
    CpuSnapshot,
    SourceRun,
    cpu_snapshot,
    cpu_table,
    cpu_used,
    per_unit_ms,
)


def _run(target: str, cpu: dict[str, float] | None, messages: int = 1000) -> SourceRun:
    return SourceRun(target=target, mode="conn", messages=messages, sessions=20, size=1024,
                     seconds=1.0, rate=float(messages), ok=True, returncode=0, cpu_s=cpu)


def test_a_reaped_child_is_counted_under_exited() -> None:
    before = cpu_snapshot([os.getpid()])
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    d = cpu_used(before, cpu_snapshot([os.getpid()]))
    assert d.get("exited", 0) > 0.05          # the child's CPU, reaped by this process


def test_delta_keeps_what_grew() -> None:
    before = CpuSnapshot({1: ("a", 1.0), 2: ("b", 2.0)})
    after = CpuSnapshot({1: ("a", 1.5), 2: ("b", 2.0), 3: ("c", 0.25)})
    assert cpu_used(before, after) == {"a": 0.5, "c": 0.25}


def test_a_process_that_exits_in_the_window_counts_only_its_part_in_it() -> None:
    """Postfix's smtpd exits after max_use connections: pid 10 had used 1.0 s before the
    window and 1.5 s when its master reaped it; pid 11 was born in the window and used 0.2 s.
    The window's CPU is 0.5 + 0.2 (the old per-role delta dropped the shrunk "smtpd" role
    and charged the window with pid 10's whole life: 1.5)."""
    before = CpuSnapshot({1: ("master", 3.0), 10: ("smtpd", 1.0)}, reaped=4.0)
    after = CpuSnapshot({1: ("master", 3.1), 11: ("smtpd", 0.2)}, reaped=5.5)
    used = cpu_used(before, after)
    assert used == {"master": 0.1, "smtpd": 0.2, "exited": 0.5}
    assert round(sum(used.values()), 4) == 0.8


def test_per_unit_leaves_out_runs_with_no_units() -> None:
    assert per_unit_ms([({"a": 1.0}, 0)]) is None
    assert per_unit_ms([({"a": 1.0, "b": 0.5}, 1000), ({"a": 9.0}, 0)]) == {
        "a": 1.0, "b": 0.5, "all": 1.5}


def test_per_message_is_the_median_of_the_runs() -> None:
    r = BenchResult(params={}, targets=["x"], modes=["conn"],
                    runs=[_run("x", {"acceptor": 1.0, "worker": 0.5}),
                          _run("x", {"acceptor": 3.0, "worker": 0.5}),
                          _run("x", {"acceptor": 2.0})])
    cpu = r.cpu_per_message("x", "conn")
    assert cpu == {"acceptor": 2.0, "worker": 0.5, "all": 2.0}   # totals 1.5, 3.5, 2.0
    assert any(line.startswith("| x | 1 msg/conn | 2.000 | acceptor 2.000, worker 0.500")
               for line in cpu_table(r))
    assert BenchResult(params={}, targets=["y"], modes=["conn"],
                       runs=[_run("y", None)]).cpu_per_message("y", "conn") is None
