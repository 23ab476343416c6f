"""docs/reference.md cannot drift from the code: every Prometheus metric declared in ingress/ and
workers/ (prometheus_client's Counter, Gauge, Histogram, Summary and the *MetricFamily of custom
collectors) is on the page with its type and labels, and every log event the code can write
(log.event / log.refused / log.throttled names, log.get().<level>("name", extra=...), the event
names of session_rules.Refused) is on it with its level and fields; nothing is on the page that
the code no longer has.

The walk is over the source (ast), not a running process, so a line on a rare path counts too.
A log call whose event name the walk cannot read (not a literal) fails the test unless it is in
COMPUTED (where the names come from instead: Refused(...)).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reference.md"
SOURCES = ("ingress", "workers")

METRIC_TYPES = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram",
                "Summary": "summary", "CounterMetricFamily": "counter",
                "GaugeMetricFamily": "gauge", "HistogramMetricFamily": "histogram",
                "SummaryMetricFamily": "summary"}
LOG_CALLS = ("event", "refused", "throttled")
LEVELS = ("debug", "info", "warning", "error")
# Fields every line of log.refused / log.throttled carries besides its own.
REFUSAL_FIELDS = frozenset({"peer", "port", "stage", "code", "reason", "not_logged",
                            "not_logged_total"})
THROTTLED_FIELDS = frozenset({"peer", "not_logged", "not_logged_total"})
# Written by ingress.core.log's formatter for a record without fields (a library's logger).
GENERIC = {"log": {"warning", "error"}}
# log calls whose name is computed: (file, source of the name) -> where the names come from
COMPUTED = {("ingress/edge/smtp_commands.py", "refusal.event"): "Refused",
            ("ingress/edge/handler.py", "refusal.event"): "Refused"}


@dataclass
class Metric:
    kind: str
    labels: frozenset[str]
    where: str


@dataclass
class Event:
    levels: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    where: list[str] = field(default_factory=list)
    partial: bool = False       # some call passes **fields the walk cannot see


@functools.cache
def _sources() -> tuple[tuple[str, str, ast.Module], ...]:
    out = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel, text = path.relative_to(ROOT).as_posix(), path.read_text()
            out.append((rel, text, ast.parse(text, rel)))
    return tuple(out)


def _files() -> Iterator[tuple[str, ast.Module]]:
    for rel, _, tree in _sources():
        yield rel, tree


def _strings(node: ast.AST | None) -> list[str] | None:
    """A literal string, or both branches of `"a" if c else "b"`; None otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        a, b = _strings(node.body), _strings(node.orelse)
        return a + b if a is not None and b is not None else None
    return None


def _str_list(node: ast.AST | None) -> list[str]:
    if isinstance(node, ast.List | ast.Tuple):
        return [e.value for e in node.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


@functools.cache
def code_metrics() -> dict[str, Metric]:
    """Exposed name -> Metric (counters are scraped with _total)."""
    out: dict[str, Metric] = {}
    for rel, tree in _files():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or _callee(node) not in METRIC_TYPES:
                continue
            names = _strings(node.args[0]) if node.args else None
            if not names:
                continue                    # collections.Counter() and the like
            kind = METRIC_TYPES[_callee(node)]
            kw = {k.arg: k.value for k in node.keywords}
            if _callee(node).endswith("MetricFamily"):
                labels = _str_list(kw.get("labels"))
            else:
                labels = _str_list(node.args[2] if len(node.args) > 2
                                   else kw.get("labelnames"))
            name = names[0] + ("_total" if kind == "counter" else "")
            out[name] = Metric(kind, frozenset(labels), f"{rel}:{node.lineno}")
    return out


def _log_call(node: ast.Call) -> str | None:
    """'event' | 'refused' | 'throttled' for log.<that>(...), 'logger' for
    log.get().<level>(...), else None."""
    f = node.func
    if not isinstance(f, ast.Attribute):
        return None
    if isinstance(f.value, ast.Name) and f.value.id == "log" and f.attr in LOG_CALLS:
        return f.attr
    if isinstance(f.value, ast.Call) and isinstance(f.value.func, ast.Attribute) \
            and f.value.func.attr == "get" and isinstance(f.value.func.value, ast.Name) \
            and f.value.func.value.id == "log":
        return "logger"
    return None


@functools.cache
def code_events() -> tuple[dict[str, Event], list[str]]:
    """Event name -> Event; and the log calls whose name could not be read."""
    out: dict[str, Event] = {}
    unreadable: list[str] = []
    computed_from: set[str] = set()
    for rel, tree in _files():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if _callee(node) == "Refused" and len(node.args) >= 2:
                for name in _strings(node.args[1]) or ():
                    ev = out.setdefault(name, Event())
                    ev.levels.add("info")
                    ev.fields |= REFUSAL_FIELDS
                    ev.partial = True
                    ev.where.append(f"{rel}:{node.lineno} (Refused)")
                continue
            kind = _log_call(node)
            if kind is None or not node.args:
                continue
            where = f"{rel}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords if k.arg is not None}
            if kind == "logger":
                extra = kw.get("extra")
                names = _strings(node.args[0]) if extra is not None else ["log"]
                level = "error" if node.func.attr == "exception" else node.func.attr
                fields: set[str] = {"exc"}
                if isinstance(extra, ast.Dict):
                    for k, v in zip(extra.keys, extra.values, strict=True):
                        if isinstance(k, ast.Constant) and k.value == "fields" \
                                and isinstance(v, ast.Dict):
                            fields |= {x.value for x in v.keys if isinstance(x, ast.Constant)}
                levels = [level]
            else:
                names = _strings(node.args[0])
                level_node = kw.get("level") if kind == "refused" else (
                    node.args[1] if kind == "event" and len(node.args) > 1
                    else node.args[2] if kind == "throttled" and len(node.args) > 2 else None)
                levels = _strings(level_node) if level_node is not None else ["info"]
                fields = set(kw)
                if kind == "refused":
                    fields = fields - {"level"} | REFUSAL_FIELDS
                elif kind == "throttled":
                    fields |= THROTTLED_FIELDS
            if names is None:
                text = next(t for r, t, _ in _sources() if r == rel)
                source = ast.get_source_segment(text, node.args[0])
                if (rel, source) in COMPUTED:
                    computed_from.add(COMPUTED[(rel, source)])
                else:
                    unreadable.append(f"{where}: {source}")
                continue
            levels = levels or ["?"]
            paired = len(names) == len(levels) == 2     # "a" if ok else "b", "x" if ok else "y"
            for i, name in enumerate(names):
                ev = out.setdefault(name, Event())
                ev.levels |= {levels[i]} if paired else set(levels)
                ev.fields |= fields
                ev.partial |= any(k.arg is None for k in node.keywords)
                ev.where.append(where)
    assert computed_from <= {"Refused"}
    for name, levels in GENERIC.items():
        out.setdefault(name, Event(levels=set(levels), fields={"exc"}, where=["log.py"]))
    return out, unreadable


# --- the page -------------------------------------------------------------------------------

_ROW = re.compile(r"^\|\s*`([a-z0-9_]+)`\s*\|(.*)\|\s*$")
_TICKED = re.compile(r"`([a-z0-9_]+)`")


def page_sections() -> dict[str, list[list[str]]]:
    """'metrics' | 'events' -> the table rows (cells) under "## Metrics" / "## Log events"."""
    out: dict[str, list[list[str]]] = {"metrics": [], "events": []}
    section = ""
    for line in PAGE.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip().lower()
            section = "metrics" if title.startswith("metrics") else \
                "events" if title.startswith("log events") else ""
            continue
        m = _ROW.match(line)
        if section and m:
            out[section].append([m.group(1), *(c.strip() for c in m.group(2).split("|"))])
    return out


def page_fields(cell: str) -> set[str]:
    fields = set(_TICKED.findall(cell))
    if "refusal fields" in cell:
        fields |= REFUSAL_FIELDS
    if "throttled fields" in cell:
        fields |= THROTTLED_FIELDS
    return fields


@pytest.fixture(scope="module")
def page() -> dict[str, list[list[str]]]:
    assert PAGE.is_file(), "docs/reference.md is missing"
    return page_sections()


def test_every_metric_is_documented(page: dict[str, list[list[str]]]) -> None:
    code = code_metrics()
    assert code, "the walk found no metric: is it looking in the right place?"
    assert all(n.startswith("smtp_ingress_") for n in code), [n for n in code
                                                              if not n.startswith("smtp_")]
    rows = {r[0]: r for r in page["metrics"]}
    same_names(code, rows, "metrics")
    for name, m in code.items():
        _, kind, labels, meaning = rows[name][:4]
        assert kind == m.kind, f"{name}: documented as {kind}, declared {m.kind} ({m.where})"
        assert set(_TICKED.findall(labels)) == m.labels, \
            f"{name}: documented labels {labels!r}, declared {sorted(m.labels)} ({m.where})"
        assert len(meaning) > 10, f"{name}: say what it means"


def same_names(code: Mapping[str, object], rows: Mapping[str, object], what: str) -> None:
    """The page names exactly what the code has: nothing missing, nothing gone."""
    missing = sorted(set(code) - set(rows))
    gone = sorted(set(rows) - set(code))
    assert not missing, f"{what} not in docs/reference.md: {missing}"
    assert not gone, f"docs/reference.md lists {what} the code no longer has: {gone}"


def test_every_log_event_is_documented(page: dict[str, list[list[str]]]) -> None:
    code, unreadable = code_events()
    assert not unreadable, ("log calls whose event name is not a literal (make it one, or "
                            f"add the site to COMPUTED): {unreadable}")
    assert len(code) > 50, "the walk found too few events: is it looking in the right place?"
    rows: dict[str, list[str]] = {}
    for r in page["events"]:
        assert r[0] not in rows, f"{r[0]} is documented twice"
        rows[r[0]] = r
    same_names(code, rows, "log events")
    for name, ev in code.items():
        _, levels, fields, when = rows[name][:4]
        documented = {x.strip() for x in levels.split(",")}
        assert documented <= set(LEVELS), f"{name}: levels {levels!r}"
        assert ev.levels <= documented, \
            f"{name}: written at {sorted(ev.levels)}, documented {levels!r} ({ev.where})"
        undocumented = ev.fields - page_fields(fields)
        assert not undocumented, \
            f"{name}: fields {sorted(undocumented)} not documented ({ev.where})"
        stale = page_fields(fields) - ev.fields
        assert ev.partial or not stale, \
            f"{name}: documented fields {sorted(stale)} are no longer written ({ev.where})"
        assert len(when) > 10, f"{name}: say when it is written"


def test_the_walk_sees_what_it_must() -> None:
    """A guard on the walk itself: events of each kind of call are found."""
    events, _ = code_events()
    assert {"message", "relay", "connection_refused", "shed", "over_share", "relay_error",
            "pipeline_error", "relay_denied", "session_cut_off", "ready", "not_ready"} \
        <= set(events)
    assert "peer" in events["shed"].fields and "qid" in events["relay"].fields
    assert events["smtp_exception"].levels == {"error"}
    metrics = code_metrics()
    assert metrics["smtp_ingress_connections_total"].labels == {"lane", "outcome"}
    assert metrics["smtp_ingress_spool_messages"].kind == "gauge"
    assert metrics["smtp_ingress_child_exits_total"].kind == "counter"
