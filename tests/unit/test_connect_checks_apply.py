"""ingress.edge.connect_checks.apply: what a connect-stage verdict changes."""

from __future__ import annotations

from types import SimpleNamespace

from ingress.edge import connect_checks
from ingress.edge.connection import Connection
from ingress.policy.checks import Judgement, combine
from ingress.policy.conn_state import ConnState


def test_a_verdict_that_decides_nothing_only_adds_its_facts() -> None:
    """ingress.edge.connect_checks.apply: FCrDNS's neutral verdict arrives for every
    connection, often mid-transaction; it joins the evidence and decides nothing again (a
    second decision logged a second over_share and could undo a transaction's demotion)."""
    conn = Connection()
    conn.state = ConnState.SESSION
    decided: list[object] = []
    ctx = SimpleNamespace(decide=lambda *a, **k: decided.append(a))
    neutral = combine([Judgement.neutral("iprev", "iprev:pass", (("iprev", "pass"),))])
    assert connect_checks.apply(conn, ctx, neutral) == ""   # type: ignore[arg-type]
    assert dict(conn.evidence.facts) == {"iprev": "pass"} and not decided
