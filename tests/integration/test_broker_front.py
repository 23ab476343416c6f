"""A lane broker survives a SUBMIT whose envelope's evidence is malformed (not a table, or a field
of the wrong type: ingress.core.wire.head decodes it with the evidence codec): the message is a
wire error (logged, dropped: the acceptor's own deadline answers 451), never a traceback out of
the broker's loop, and the next good message is served (without evidence, in the fast lane: as
one without an identity, self-proven). The Broker object runs in this process on its own ipc
sockets; its front handler is fed the frames an acceptor would send."""

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
@pytest.mark.parametrize("evidence", [["identity", "allow:x"], "allow:x", 7,
                                      {"identity": ["allow:x"]}, {"retry": "yes"}])
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
        assert b.counters["submitted"] == 0 and len(b.queue) == 0     # a wire error: dropped
        del env["evidence"]
        b.on_front([b"acc-1", VERSION, Kind.SUBMIT.value, orjson.dumps(env), b"body"])
        assert b.counters["submitted"] == 1 and len(b.queue) == 1
        if lane == "fast":
            assert b.queue.tier_len(Tier.SELF_PROVEN) == 1
    finally:
        for s in (b.front, b.back, b.pub):
            s.close()
        shutil.rmtree(state, ignore_errors=True)
