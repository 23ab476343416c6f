"""Issue 18's provider-pool row: was the provider's mail served fast from its second address on?

Purpose
    The provider pool (bench.flood.pool) sends one message from its first address, which the
    ingress learns the provider from (SPF pass + aligned DKIM), then rotates over its other
    addresses. Every message of it passes SPF, and an SPF pass promotes at MAIL FROM
    (classify.spf_promote), so "lane fast" alone would not show the provider identity at work.
    The measure is the ingress's own record of each message: its JSON log's one accept line
    per message (event "message", ingress/edge/handler.py: peer, lane, identity, reasons). A
    message counts as fast from the provider when its lane is fast *and* its reasons carry
    ``provider:<provider>`` (ingress.policy.iprev.judge's promotion at connect: the verified
    name's provider was learned); the first address, learned itself, may instead ride its
    own learned entry (``learned-allow``) when the rotation comes back to it. Read from the
    log written during the scenario only (the file offset before it); the pool's addresses
    are used by no other scenario.

API
    read_log(path, offset) -> list[dict]             the JSON objects after `offset`
    served_fast(doc, provider, first=False) -> bool  one accept line (pure)
    pool_verdict(docs, addresses, provider) -> dict  per address after the first: messages and
                                                     how many fast; the learned message; all_fast
    issue18_rows(doc, target) -> list[dict]          the pool rows of a run document (pure)
    issue18_markdown(rows) -> str

Failure modes: a missing log or unparsable lines are skipped (the row then says 0 messages, not
ok). Limits: reads at most MAX_LOG bytes of log per scenario.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from bench import report

MAX_LOG = 256 * 1024 * 1024
MIN_ACCEPTED_PCT = 99.0


def read_log(path: Path, offset: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(offset)
        for line in f.read(MAX_LOG).splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
    return out


def served_fast(doc: dict[str, Any], provider: str, first: bool = False) -> bool:
    """Fast lane, promoted on the learned provider (not only on the message's SPF pass); the
    first address (`first`), which was learned itself, may also ride its own learned entry."""
    reasons = str(doc.get("reasons") or "").split(",")
    return doc.get("lane") == "fast" and (
        f"provider:{provider}" in reasons or (first and "learned-allow" in reasons))


def pool_verdict(docs: Iterable[dict[str, Any]], addresses: list[str],
                 provider: str) -> dict[str, Any]:
    """The pool's accept lines in log order: the first from addresses[0] is the learned
    message; every later one (its own address again included) must be served fast."""
    pool = set(addresses)
    lines = [d for d in docs if d.get("event") == "message" and d.get("peer") in pool]
    first = next((i for i, d in enumerate(lines) if d.get("peer") == addresses[0]), None)
    learned = lines[first] if first is not None else None
    later = [d for i, d in enumerate(lines) if i != first]
    per: dict[str, dict[str, int]] = {}
    for d in later:
        row = per.setdefault(str(d["peer"]), {"messages": 0, "fast": 0})
        row["messages"] += 1
        row["fast"] += served_fast(d, provider, d.get("peer") == addresses[0])
    fast = sum(r["fast"] for r in per.values())
    return {
        "provider": provider,
        "learned": None if learned is None else {k: learned.get(k) for k in (
            "peer", "lane", "identity", "reasons")},
        "after_first": len(later), "fast_after_first": fast,
        "addresses_seen": len([a for a in addresses[1:] if a in per]),
        "addresses": {a: per[a] for a in addresses if a in per},
        "slow": [{k: d.get(k) for k in ("peer", "lane", "identity", "reasons")}
                 for d in later
                 if not served_fast(d, provider, d.get("peer") == addresses[0])][:20],
        "all_fast": learned is not None and bool(later) and fast == len(later),
    }


def issue18_rows(doc: dict[str, Any], target: str = "smtp-ingress") -> list[dict[str, Any]]:
    """One row per scenario whose entry has a pool verdict (pure): ok when the learned message
    was accepted, every later pool message was served fast, and >= 99 % were accepted (a
    message not accepted was not served). The no-flood reference is shown, not judged."""
    rows = []
    for name, sc in (doc.get("scenarios") or {}).items():
        e = report._find(doc, name, target)
        v = (e or {}).get("pool")
        if v is None:
            continue
        legit = report._summary(e or {})["legit"].get("pool") or {}
        pct = legit.get("accepted_pct")
        judged = bool(sc.get("judged"))
        rows.append({"scenario": name, "label": sc.get("label", name), "judged": judged,
                     "accepted_pct": pct, "attempts": legit.get("attempts"),
                     "after_first": v["after_first"], "fast": v["fast_after_first"],
                     "addresses_seen": v["addresses_seen"], "addresses": len(v["addresses"]),
                     "ok": (v["all_fast"] and (pct or 0) >= MIN_ACCEPTED_PCT) if judged
                     else None})
    return rows


def issue18_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = report.section("Issue 18: the provider pool, fast from its second address on "
                         "(smtp-ingress; from its log: lane fast with reason "
                         "provider:<provider>)",
                         ("scenario", "accepted", "messages after the learned one",
                          "served fast", "addresses seen (of the others)", "ok"))
    for r in rows:
        out.append(f"| {r['label']} | {report._fmt_pct(r['accepted_pct'])} | "
                   f"{r['after_first']} | {r['fast']} | {r['addresses_seen']} | "
                   f"{report.verdict(r['ok'])} |")
    return "\n".join(out) + "\n"
