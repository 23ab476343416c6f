"""bench.throughput's CPU accounting per role (issue 20: CPU per message of every process of a
target, Postfix's included, measured the same way): the snapshot of real processes, the delta
and the per-message median (pure)."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.throughput import BenchResult, SourceRun, cpu_by_role, cpu_delta, cpu_table


def _run(target: str, cpu: dict[str, float] | None, messages: int = 1000) -> SourceRun:
    return SourceRun(target=target, mode="conn", messages=messages, sessions=20, size=1024,
                     seconds=1.0, rate=float(messages), ok=True, returncode=0, cpu_s=cpu)


def test_a_reaped_child_is_counted_under_exited() -> None:
    before = cpu_by_role([os.getpid()])
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    d = cpu_delta(before, cpu_by_role([os.getpid()]))
    assert d.get("exited", 0) > 0.05          # the child's CPU, reaped by this process


def test_delta_keeps_what_grew() -> None:
    assert cpu_delta({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 2.0, "c": 0.25}) == {"a": 0.5,
                                                                                "c": 0.25}


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
