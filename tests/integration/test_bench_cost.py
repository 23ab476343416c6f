"""bench.cost's short path end to end against a real smtp-ingress (no Postfix): a few spam
senders refused at connect by the per-IP connection rate, the CPU of every process of the
target over their window, the report row. A smoke test of the wiring, not a measurement: the
figures are only checked to exist."""

from __future__ import annotations

import contextlib
from pathlib import Path

from bench.cost import markdown, run_cost
from bench.targets import Processes


def test_refused_phase_short(tmp_path: Path) -> None:
    with Processes() as procs, contextlib.ExitStack() as stack:
        doc = run_cost(procs, stack, tmp_path, phases=("refused",), runs=1, seconds=1.0,
                       spammers=4, postfix=False, warmup=0.5, idle=0.5)
    e = doc["phases"]["refused"]["targets"]["smtp-ingress"]
    assert e["status"] == "ok" and "postfix" not in doc["phases"]["refused"]["targets"]
    run = e["runs"][0]
    assert run["units"] > 0 and run["spam"]["banner_codes"].get("220", 0) == 0
    # measured (CPU times come in 10 ms ticks: a second of a few senders may show none)
    assert run["cpu_s"] is not None and e["per_unit_ms"] is not None
    assert e["per_unit_ms"]["all"] >= 0 and e["idle_cpu_ms_per_s"] >= 0
    assert "| refused connection | smtp-ingress |" in markdown(doc)
