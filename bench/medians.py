"""Medians over several bench.run outputs: each scenario's judged senders, their p99 against the
same sender's no-flood p99 in the same run, then the median ratio over the runs.

CLI: python -m bench.medians RUN [RUN ...]   (each an output dir holding results.json, or a
     results JSON file such as bench/results/latest.json)
Prints a markdown table (the p99 ratios and the accepted share, per run and their median) and,
for issue 17's spfmany rows, the spam accepted per second against its bound; exit 2 if a run
has no results.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.run import issue8_rows, issue17_extra

JUDGED = {"flood": ("trusted", "cert")}   # scenarios whose rows issue 8 quotes without senders=


def ratios(doc: dict[str, Any], target: str = "smtp-ingress") -> dict[tuple[str, str], float]:
    """(scenario, sender) -> p99 / no-flood p99 of one run (bench.run.issue8_rows; pure)."""
    return {(r["scenario"], r["sender"]): r["p99_ratio"]
            for r in issue8_rows(doc, target, judged=JUDGED)
            if r["measured"] and r.get("p99_ratio") is not None}


def accepted(doc: dict[str, Any], target: str = "smtp-ingress") -> dict[tuple[str, str], float]:
    """(scenario, sender) -> accepted % of one run (pure)."""
    return {(r["scenario"], r["sender"]): r["accepted_pct"]
            for r in issue8_rows(doc, target, judged=JUDGED)
            if r["measured"] and r.get("accepted_pct") is not None}


def spam_rates(doc: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """spfmany* scenario -> (spam accepted msgs/s, its bound) of one run (pure)."""
    return {r["scenario"]: (r["value"], r["bound"]) for r in issue17_extra(doc)
            if r["scenario"].startswith("spfmany") and r["value"] is not None}


def main(argv: list[str]) -> int:
    docs = []
    for d in argv:
        f = Path(d) if Path(d).is_file() else Path(d) / "results.json"
        if not f.exists():
            print(f"bench.medians: no {f}", file=sys.stderr)
            return 2
        docs.append(orjson.loads(f.read_bytes()))
    runs, acc = [ratios(d) for d in docs], [accepted(d) for d in docs]
    keys = sorted({k for r in runs for k in r})
    print("| scenario | sender | p99 ratio per run | median | accepted % per run |\n"
          "|---|---|---|---|---|")
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        pcts = [a[k] for a in acc if k in a]
        print(f"| {k[0]} | {k[1]} | {', '.join(f'{v:.2f}x' for v in vals)} | "
              f"{statistics.median(vals):.2f}x | {', '.join(f'{p:g}' for p in pcts)} |")
    rates = [spam_rates(d) for d in docs]
    names = sorted({k for r in rates for k in r})
    if names:
        print("\n| scenario | spam accepted msgs/s per run | median | bound |\n|---|---|---|---|")
        for n in names:
            vals = [r[n][0] for r in rates if n in r]
            bound = next((r[n][1] for r in rates if n in r), None)
            print(f"| {n} | {', '.join(f'{v:g}' for v in vals)} | "
                  f"{statistics.median(vals):g} | {bound} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
