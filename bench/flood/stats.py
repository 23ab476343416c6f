"""The flood generator's counters: legitimate senders, idle bots and spam senders.

API
    LegitStats.record(attempt) / .summary(); BotStats, SpamStats (counters, summary());
    merge_into(dst, src) adds a child process's stats into the parent's

Failure modes and limits: those of the whole generator, in the package docstring
(bench/flood/__init__.py), with the accounting definitions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.flood.client import Attempt
from bench.flood.common import bump, percentile_nearest_rank

# --------------------------------------------------------------------------------------------
# Stats


def merge_into(dst: Any, src: Any) -> None:
    """Merge a dataclass of counters: ints/floats add, dicts add per key, lists concatenate."""
    for f in dataclasses.fields(dst):
        a, b = getattr(dst, f.name), getattr(src, f.name)
        if isinstance(a, bool | str) or a is None:
            continue
        if isinstance(a, int | float):
            setattr(dst, f.name, a + b)
        elif isinstance(a, dict):
            for k, v in b.items():
                a[k] = a.get(k, 0) + v
        elif isinstance(a, list):
            a.extend(b)


def _pcts(values: Sequence[float], scale: float = 1.0, nd: int = 3) -> dict[str, float | None]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x * scale, nd)

    return {
        "n": len(values),
        "min": r(min(values)) if values else None,
        "p50": r(percentile_nearest_rank(values, 50)),
        "p95": r(percentile_nearest_rank(values, 95)),
        "p99": r(percentile_nearest_rank(values, 99)),
        "max": r(max(values)) if values else None,
        "mean": r(sum(values) / len(values)) if values else None,
    }


def stage_breakdown(samples: Sequence[dict[str, float]], tail_pct: float = 99.0
                    ) -> dict[str, dict[str, float | None]]:
    """Where the time of accepted transactions goes: per stage (connect, banner, EHLO, MAIL,
    RCPT, DATA, DOT; TLS for STARTTLS), its p50 and p99 over all of them, and its mean over the
    tail (the slowest 100 - ``tail_pct`` per cent of the transactions by total, at least one),
    so that a p99 regression is pinned to the stage that grew."""
    if not samples:
        return {}
    n_tail = max(1, math.ceil(len(samples) * (100.0 - tail_pct) / 100.0))
    tail = sorted(samples, key=lambda s: sum(s.values()))[-n_tail:]
    out: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(k for s in samples for k in s):
        vals = [s.get(name, 0.0) for s in samples]
        p = _pcts(vals)
        out[name] = {"p50": p["p50"], "p99": p["p99"],
                     "tail_mean": round(sum(s.get(name, 0.0) for s in tail) / len(tail), 3)}
    return out


@dataclass
class LegitStats:
    """Per legitimate sender (or merged). ``summary()`` is the JSON shape documented in main()."""

    name: str = ""
    kind: str = ""
    source: str | None = None
    interval_s: float = 0.0
    attempts: int = 0
    accepted: int = 0
    unfinished: int = 0
    refused: int = 0
    tempfails: dict[str, int] = field(default_factory=dict)  # code -> n
    tempfails_by_stage: dict[str, int] = field(default_factory=dict)  # "MAIL 451" -> n
    permfails: dict[str, int] = field(default_factory=dict)
    permfails_by_stage: dict[str, int] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)  # stage -> n
    conn_errors: dict[str, int] = field(default_factory=dict)  # "closed at MAIL" -> n
    latencies_ms: list[float] = field(default_factory=list)
    stages_ms: list[dict[str, float]] = field(default_factory=list)  # per accepted attempt
    timeline: list[Attempt] = field(default_factory=list)
    tries: list[int] = field(default_factory=list)  # retrying MTAs: the try that got 250 (0: none)
    primed: list[str] = field(default_factory=list)  # outcomes before the window (spec.prime)

    def record(self, a: Attempt) -> None:
        self.attempts += 1
        self.timeline.append(a)
        if a.outcome == "accepted":
            self.accepted += 1
            assert a.latency_ms is not None
            self.latencies_ms.append(a.latency_ms)
            if a.stages_ms is not None:
                self.stages_ms.append(a.stages_ms)
        elif a.outcome == "tempfail":
            bump(self.tempfails, str(a.code))
            bump(self.tempfails_by_stage, f"{a.stage} {a.code}")
        elif a.outcome == "permfail":
            bump(self.permfails, str(a.code))
            bump(self.permfails_by_stage, f"{a.stage} {a.code}")
        elif a.outcome == "timeout":
            bump(self.timeouts, str(a.stage))
        elif a.outcome == "refused":
            self.refused += 1
        elif a.outcome == "unfinished":
            self.unfinished += 1
        else:
            bump(self.conn_errors, f"{a.detail or 'error'} at {a.stage}")

    @property
    def accepted_pct(self) -> float | None:
        done = self.attempts - self.unfinished
        return round(100.0 * self.accepted / done, 3) if done else None

    def summary(self, timeline: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "interval_s": self.interval_s,
            "attempts": self.attempts,
            "accepted": self.accepted,
            "accepted_pct": self.accepted_pct,
            "unfinished": self.unfinished,
            **({"primed": list(self.primed)} if self.primed else {}),
            "latency_ms": _pcts(self.latencies_ms),
            "stages_ms": stage_breakdown(self.stages_ms),
            "tempfails": dict(self.tempfails),
            "tempfails_by_stage": dict(self.tempfails_by_stage),
            "permfails": dict(self.permfails),
            "permfails_by_stage": dict(self.permfails_by_stage),
            "timeouts": dict(self.timeouts),
            "conn_errors": dict(self.conn_errors),
            "refused": self.refused,
        }
        if self.tries:
            out["tries"] = sorted(self.tries)
        if timeline:
            out["timeline"] = [
                {
                    "t": round(a.t, 4),
                    "latency_ms": None if a.latency_ms is None else round(a.latency_ms, 3),
                    "outcome": a.outcome,
                    "code": a.code,
                    "stage": a.stage,
                }
                for a in sorted(self.timeline, key=lambda a: a.t)
            ]
        return out

    @classmethod
    def merged(cls, name: str, parts: Sequence[LegitStats]) -> LegitStats:
        total = cls(name=name, kind="all")
        for p in parts:
            merge_into(total, p)
        return total


@dataclass
class BotStats:
    """Stalling / trickle / early-talker bots of one role (merged over bots and processes)."""

    role: str = ""
    bots: int = 0
    connections: int = 0  # connect attempts
    connected: int = 0
    refused: int = 0
    connect_timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    banner_codes: dict[str, int] = field(default_factory=dict)
    first_replies: dict[str, int] = field(default_factory=dict)  # early talker: first reply code
    later_replies: dict[str, int] = field(default_factory=dict)  # e.g. 421 on idle timeout
    closed_by_server: int = 0
    open_at_end: int = 0
    no_banner_at_end: int = 0  # of open_at_end: connected (TCP) but never got a first reply
    open_now: int = 0
    bytes_sent: int = 0
    held_s: list[float] = field(default_factory=list)  # connect -> close (server's or run end)

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["held_s"] = _pcts(self.held_s, nd=3)
        d.pop("open_now")
        return d


@dataclass
class SpamStats:
    """Spam senders (merged over bots and processes)."""

    bots: int = 0
    connections: int = 0
    connected: int = 0
    refused: int = 0
    timeouts: dict[str, int] = field(default_factory=dict)
    conn_errors: dict[str, int] = field(default_factory=dict)
    banner_codes: dict[str, int] = field(default_factory=dict)
    sent: int = 0  # transactions that reached MAIL FROM
    cut: int = 0  # of those, still in progress when the run ended (excluded from accepted_pct)
    accepted: int = 0
    shed: dict[str, int] = field(default_factory=dict)  # 4xx code -> n
    shed_by_stage: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # 5xx code -> n
    rejected_by_stage: dict[str, int] = field(default_factory=dict)
    open_now: int = 0
    active_s: float = 0.0  # the spam phase's length (per process; max when merged)

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("open_now")
        done = self.sent - self.cut
        d["accepted_pct"] = round(100.0 * self.accepted / done, 3) if done else None
        d["accepted_per_s"] = round(self.accepted / self.active_s, 2) if self.active_s else None
        d["sent_per_s"] = round(self.sent / self.active_s, 2) if self.active_s else None
        return d
