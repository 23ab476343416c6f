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
