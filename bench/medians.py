"""Medians over several bench.run outputs: each scenario's judged senders, their p99 against the
same sender's no-flood p99 in the same run, then the median ratio over the runs.

CLI: python -m bench.medians RUN [RUN ...]   (each an output dir holding results.json, or a
     results JSON file such as bench/results/latest.json)
Prints a markdown table; exit 2 if a run has no results.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.run import issue8_rows

JUDGED = {"flood": ("trusted", "cert")}   # scenarios whose rows issue 8 quotes without senders=


def ratios(doc: dict[str, Any], target: str = "smtp-ingress") -> dict[tuple[str, str], float]:
    """(scenario, sender) -> p99 / no-flood p99 of one run (bench.run.issue8_rows; pure)."""
    return {(r["scenario"], r["sender"]): r["p99_ratio"]
            for r in issue8_rows(doc, target, judged=JUDGED)
            if r["measured"] and r.get("p99_ratio") is not None}


def main(argv: list[str]) -> int:
    runs = []
    for d in argv:
        f = Path(d) if Path(d).is_file() else Path(d) / "results.json"
        if not f.exists():
            print(f"bench.medians: no {f}", file=sys.stderr)
            return 2
        runs.append(ratios(orjson.loads(f.read_bytes())))
    keys = sorted({k for r in runs for k in r})
    print("| scenario | sender | p99 ratio per run | median |\n|---|---|---|---|")
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        print(f"| {k[0]} | {k[1]} | {', '.join(f'{v:.2f}x' for v in vals)} | "
              f"{statistics.median(vals):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
