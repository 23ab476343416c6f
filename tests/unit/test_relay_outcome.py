"""workers.spool.state.outcome_fields: one attempt's settle() outcome -> the `relay` line's
outcome and the reply that decided it (table-driven, pure)."""

from __future__ import annotations

import pytest

from ingress.core.config import RelayConfig
from workers.spool.state import RelayState, Reply, outcome_fields, settle

OK = Reply(250, "2.0.0 Ok: queued as ABC")
TEMP = Reply(450, "4.2.0 mailbox busy")
PERM = Reply(550, "5.1.1 no such user")
LOST = Reply(451, "4.4.2 mx: connection lost", local=True)
CFG = RelayConfig(retry_base=60.0, retry_max=3600.0, max_age=86400.0)

CASES = [
    # results, state before, dsn, expected (outcome, code, delivered, deferred, failed)
    ({"a": OK, "b": OK}, RelayState(), "", ("delivered", 250, 2, 0, 0)),
    ({"a": OK, "b": TEMP}, RelayState(), "", ("deferred", 450, 1, 1, 0)),
    ({"a": PERM, "b": TEMP}, RelayState(), "D1", ("deferred", 450, 0, 1, 1)),
    ({"a": PERM, "b": OK}, RelayState(), "D1", ("bounced", 550, 1, 0, 1)),
    ({"a": PERM, "b": OK}, RelayState(), "", ("failed", 550, 1, 0, 1)),       # null sender
    ({"b": OK}, RelayState(attempts=2, failed=["a"]), "", ("failed", 250, 1, 0, 0)),
    ({"a": LOST, "b": LOST}, RelayState(attempts=1), "", ("deferred", 451, 0, 2, 0)),
    ({}, RelayState(delivered=["a", "b"]), "", ("delivered", 0, 0, 0, 0)),    # nothing left
]


@pytest.mark.parametrize(("results", "before", "dsn", "expected"), CASES)
def test_outcome(results: dict[str, Reply], before: RelayState, dsn: str,
                 expected: tuple[str, int, int, int, int]) -> None:
    out = settle(before, results, rcpts=["a", "b"], now=1000.0, received_at=900.0, cfg=CFG)
    f = outcome_fields(out, results, attempt=before.attempts + 1, now=1000.0,
                       received_at=900.0, dsn=dsn)
    assert (f["outcome"], f["code"], f["delivered"], f["deferred"], f["failed"]) == expected
    assert f["attempts"] == before.attempts + 1 and f["delay_s"] == 100.0
    assert ("retry_in_s" in f) == (f["outcome"] == "deferred")
    assert f.get("dsn", "") == dsn
    if results:
        code = f["code"]
        assert isinstance(code, int)
        assert str(f["reply"]).startswith(str(code))
        assert f["local"] == (code == 451)


def test_expired_is_failed_with_the_last_reply() -> None:
    """Past relay.max_age a 4xx fails (4.4.7): the line shows the 4xx that ended it."""
    out = settle(RelayState(attempts=9), {"a": TEMP}, rcpts=["a"], now=100_000.0,
                 received_at=0.0, cfg=CFG)
    f = outcome_fields(out, {"a": TEMP}, attempt=10, now=100_000.0, received_at=0.0, dsn="D")
    assert (f["outcome"], f["code"], f["failed"], f["dsn"]) == ("bounced", 450, 1, "D")


def test_reply_is_one_short_line() -> None:
    long = Reply(550, "5.7.1 " + "x" * 900 + "\r\n\tsecond line")
    out = settle(RelayState(), {"a": long}, rcpts=["a"], now=1.0, received_at=0.0, cfg=CFG)
    f = outcome_fields(out, {"a": long}, attempt=1, now=1.0, received_at=0.0)
    assert len(str(f["reply"])) <= 200 and "\n" not in str(f["reply"])
