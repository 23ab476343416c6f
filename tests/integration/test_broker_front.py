"""A lane broker survives a SUBMIT whose envelope's evidence is not a table: the message counts as
one without an identity (the fast lane: self-proven, no per-key bound), never a traceback out of
the broker's loop. The Broker object runs in this process on its own ipc sockets; its front
handler is fed the frames an acceptor would send."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import orjson
import pytest

from ingress.core import config
from ingress.core.wire import VERSION, Kind
from ingress.policy.tiers import Tier
from workers.lane.broker import Broker


@pytest.mark.parametrize("lane", ["fast", "bulk"])
@pytest.mark.parametrize("evidence", [["identity", "allow:x"], "allow:x", 7])
def test_evidence_that_is_not_a_table(lane: str, evidence: object) -> None:
    state = Path(tempfile.mkdtemp(prefix="bf-", dir="/tmp"))
    f = state / "c.toml"
    f.write_text(f'[spool]\nstate_dir = "{state}"\npath = "{state / "spool"}"\n')
    b = Broker(config.load(f), lane)
    try:
        now = time.time()
        env = {"qid": "q1", "lane": lane, "peer_ip": "192.0.2.1", "deadline": now + 30,
               "evidence": evidence}
        b.on_front([b"acc-1", VERSION, Kind.SUBMIT.value, orjson.dumps(env), b"body"])
        assert b.counters["submitted"] == 1 and len(b.queue) == 1
        if lane == "fast":
            assert b.queue.tier_len(Tier.SELF_PROVEN) == 1
    finally:
        for s in (b.front, b.back, b.pub):
            s.close()
        shutil.rmtree(state, ignore_errors=True)
