"""The child skeleton freezes a child's start-up heap (child.settle_heap) before it serves, so a
full garbage collection never again scans the modules, the config and the tables made at setup
(issue 17: a fast worker's or fast acceptor's full collection stopped every session it served
for 26-48 ms under a flood). Each case runs the skeleton in its own interpreter (freezing this
test process's heap would change every later test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ingress.core import child

SETUP_OBJECTS = 20_000

BLOCKING = f"""
import gc, json
from ingress.core import child
from ingress.core.config import Config

def setup(sig):
    kept = [[i] for i in range({SETUP_OBJECTS})]     # what a service builds at setup
    def serve():
        print(json.dumps({{"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects()),
                          "kept": len(kept)}}))
    return child.Service(serve, lambda: None)

child.main(Config(), child.Spec("heap-test", child.LANE_SIGNALS), setup)
"""

ON_LOOP = f"""
import gc, json
from ingress.core import child
from ingress.core.config import Config

async def setup(sig):
    kept = [[i] for i in range({SETUP_OBJECTS})]
    async def serve():
        print(json.dumps({{"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects()),
                          "kept": len(kept)}}))
    return child.Service(serve, lambda: None)

child.main_loop(Config(), child.Spec("heap-test", child.ACCEPTOR_SIGNALS), setup,
                runner=child.run_asyncio)
"""


@pytest.mark.parametrize("program", [BLOCKING, ON_LOOP], ids=["main", "main_loop"])
def test_start_up_heap_is_frozen_before_serve(program: str) -> None:
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["kept"] == SETUP_OBJECTS
    # the setup's objects and the imports are frozen; what a full collection still scans is
    # what was made after, a small fraction
    assert got["frozen"] > SETUP_OBJECTS
    assert got["tracked"] < got["frozen"] // 10, got


LONG_LIVED = """
import gc, json
from ingress.core import child
from ingress.core.config import Config

async def setup(sig):
    async def serve():
        before = gc.get_stats()[2]["collections"]
        held = []
        for i in range(300_000):      # a population that grows as silent bots connect
            held.append([i])
            [[i]]                     # and the churn of the sessions that come and go
        print(json.dumps({"full": gc.get_stats()[2]["collections"] - before,
                          "threshold": gc.get_threshold()[2], "held": len(held)}))
    return child.Service(serve, lambda: None)

child.main_loop(Config(), child.Spec("heap-test", child.ACCEPTOR_SIGNALS), setup,
                runner=child.run_asyncio)
"""


def test_an_event_loop_child_runs_no_automatic_full_collection() -> None:
    """As its long-lived objects grow, CPython would collect all of them each time they grew
    by a quarter (an acceptor with 10,000 silent bots: 130-350 ms stopped, six times); an
    event-loop child leaves that to keep_heap."""
    out = subprocess.run([sys.executable, "-c", LONG_LIVED], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["held"] == 300_000
    assert got["full"] == 0, got


@pytest.mark.parametrize(("since", "connections", "due"), [
    (0.0, 0, False),                                       # just collected
    (child.FULL_QUIET - 1, 0, False),                      # quiet, but not yet
    (child.FULL_QUIET, child.QUIET_CONNECTIONS, True),     # quiet and due
    (child.FULL_QUIET, child.QUIET_CONNECTIONS + 1, False),  # busy: wait for a quiet moment
    (child.FULL_LATEST - 1, 20_000, False),                # a flood: not yet
    (child.FULL_LATEST, 20_000, True),                     # the latest: whatever holds it
])
def test_full_collection_due(since: float, connections: int, due: bool) -> None:
    assert child.full_collection_due(since, connections) is due
