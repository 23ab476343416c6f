"""The queue listing's pure parts: qid_of, per-recipient states, the mailq-like rendering."""

from __future__ import annotations

import pytest

from ingress.tools.queuecmd import render_list
from workers.spool.queue_ops import Item, qid_of
from workers.spool.state import RelayState

NOW = 1_800_000_000.0


def item(where: str = "new", state: RelayState | None = None, env: bool = True,
         age: float = 90.0) -> Item:
    envelope = {"qid": "Q1", "mail_from": "a@sender.test", "lane": "fast",
                "rcpts": ["x@example.test", "y@example.test", "z@example.test"],
                "received_at": NOW - age} if env else None
    return Item(f"{int(NOW - age)}.Q1.host", "Q1", where, 1234, NOW - age, envelope, state,
                "" if env else "malformed spool file: no envelope line")


@pytest.mark.parametrize(("name", "want"), [("1700000000.ABC.host", "ABC"),
                                            ("1700000000.ABC.host.with.dots", "ABC"),
                                            ("weird", "weird")])
def test_qid_of(name: str, want: str) -> None:
    assert qid_of(name) == want


@pytest.mark.parametrize(("state", "want"), [
    (None, {"x@example.test": "pending", "y@example.test": "pending",
            "z@example.test": "pending"}),
    (RelayState(attempts=2, delivered=["x@example.test"], failed=["y@example.test"]),
     {"x@example.test": "delivered", "y@example.test": "failed", "z@example.test": "deferred"}),
])
def test_rcpt_states(state: RelayState | None, want: dict[str, str]) -> None:
    assert item(state=state).rcpt_states() == want


def test_render() -> None:
    assert render_list([], NOW) == "queue is empty"
    deferred = item(state=RelayState(attempts=3, next_at=NOW + 600, last_error="451 4.3.0 x"))
    text = render_list([deferred, item("hold", age=7200), item("failed"), item(env=False)], NOW)
    lines = text.splitlines()
    assert lines[0].startswith("Q1  ") and "<a@sender.test>" in lines[0]
    assert "lane=fast" in lines[0] and "next retry in 10m" in lines[0] and "attempts=3" in lines[0]
    assert lines[1] == "    (451 4.3.0 x)" and lines[2] == "    x@example.test  deferred"
    assert any(ln.startswith("Q1!") and "held" in ln and " 2h " in ln for ln in lines)
    assert any(ln.startswith("Q1#") and "failed" in ln for ln in lines)
    assert any("MALFORMED: malformed spool file" in ln for ln in lines)
    assert lines[-1] == "-- 4 message(s), 4936 bytes (! held, # failed)"
    due = render_list([item(state=RelayState(attempts=1, next_at=NOW - 1))], NOW)
    assert "due now" in due.splitlines()[0]
