"""Chaos for the relay (issue 9): kill -9 of the relay child mid-delivery, twice, with a real
ingress (tests/kit/harness.py Ingress: supervisor and children) relaying to a real Postfix.

Nothing is lost: every message the acceptor answered 250 for arrives in Postfix's Maildir at
least once, the supervisor restarts the relay and the restarted relay drains the spool. A
duplicate is allowed only in the documented windows (the relay's docstring): a message in
flight when the process died (the downstream's 2xx came, the unlink did not: at most
relay.concurrency per kill), or one logged relay_unsure. Never more than two copies.
Skips when Postfix cannot run here (not root / not installed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.kit.harness import Ingress, make_body, relaying, spool_count, wait_for
from tests.kit.postfix import PostfixInstance
from tests.kit.relaykit import delivered, send_all, strip_trace

pytestmark = pytest.mark.timeout(150)

CONCURRENCY = 2
KILLS = 2


def delivered_lines(ing: Ingress) -> int:
    return sum(e["outcome"] == "delivered" for e in ing.events("relay"))


def relay_pids(ing: Ingress) -> list[int]:
    return ing.children("relay")


def test_kill_relay_mid_delivery(tmp_path: Path, postfix: PostfixInstance) -> None:
    tables = {"relay": {"downstream": f"smtp://127.0.0.1:{postfix.port}", "retry_base": 0.5,
                        "retry_max": 2.0, "timeout": 10.0, "concurrency": CONCURRENCY},
              "supervisor": {"restart_backoff": 0.1}}
    bodies = {f"k{i}-{time.time_ns()}@example.test": make_body(i, size=100_000)
              for i in range(100)}
    with Ingress(tmp_path, tables) as ing:
        relaying(ing)
        results: dict[str, tuple[int, str]] = {}
        # The mail goes in while the relay drains it: each kill lands mid-stream, with
        # deliveries in flight and more mail arriving.
        sender = threading.Thread(
            target=lambda: results.update(asyncio.run(send_all(ing.port, bodies,
                                                               concurrency=4))))
        sender.start()
        killed: list[int] = []
        try:
            for _ in range(KILLS):
                wait_for(lambda: len(relay_pids(ing)) == 1, 20, "a (restarted) relay child")
                (pid,) = relay_pids(ing)
                sent_before = delivered_lines(ing)
                wait_for(lambda: delivered_lines(ing) >= sent_before + 3,  # noqa: B023
                         60, "the relay delivering")
                assert sender.is_alive() or spool_count(ing, "new") > 0, \
                    "nothing left to deliver at the kill: not mid-delivery"
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                wait_for(lambda: pid not in relay_pids(ing), 10, "the killed relay gone")  # noqa: B023
        finally:
            sender.join(120)
        assert len(results) == len(bodies)
        assert all(code == 250 for code, _ in results.values()), results
        wait_for(lambda: spool_count(ing, "new") == 0, 60, "the restarted relay to drain")
        wait_for(lambda: len(delivered(postfix).keys() & bodies.keys()) == len(bodies), 30,
                 "every message in the Maildir")
        starts = ing.events("relay_start")
        child_starts = [e for e in ing.events("child_start") if e.get("kind") == "relay"]
        unsure = {r for e in ing.events("relay_unsure") for r in e["rcpts"]}
        assert spool_count(ing, "failed") == 0
        assert not [p for p in (ing.spool / "relay").iterdir()], "state files left behind"
        assert not set(relay_pids(ing)) & set(killed)
    assert len(starts) == KILLS + 1 and len(child_starts) == KILLS + 1, (starts, child_starts)
    got = delivered(postfix)
    dups = {r: len(got[r]) for r in bodies if len(got[r]) > 1}
    assert all(n == 2 for n in dups.values()), f"more than two copies: {dups}"
    outside = set(dups) - unsure
    assert len(outside) <= CONCURRENCY * KILLS, f"duplicates beyond the in-flight window: {dups}"
    for rcpt, body in bodies.items():
        for raw in got[rcpt]:
            assert strip_trace(raw, "alice@sender.test", rcpt) == body, f"{rcpt} altered"
