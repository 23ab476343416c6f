"""The child skeleton (ingress.core.child.main, main_loop) in a real process: the hooks run in
order around serve, a stop signal reaches the service's stop, the ignored signals are ignored, a
retire is told apart from a stop, the heartbeat slot is written from the event loop, and the
process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.kit.procs import ROOT, Processes

# A child whose service records what the skeleton did to it (one JSON line per step, flushed),
# with a heartbeat array in shared memory that the test reads back through a file.
CHILD = r'''
import asyncio, json, multiprocessing, sys, time
from ingress.core import child, config

cfg = config.load(None)
kind = sys.argv[1]

def say(**kw):
    print(json.dumps(kw), flush=True)

if kind == "blocking":
    def setup(sig):
        state = {"stop": False}
        def serve():
            deadline = time.monotonic() + 30
            while not state["stop"] and time.monotonic() < deadline:
                time.sleep(0.01)
            say(step="served", stopped=state["stop"])
        return child.Service(serve, lambda: state.update(stop=True),
                             lambda: say(step="started"), lambda: say(step="stopped"))
    child.main(cfg, child.Spec("test-blocking", child.LANE_SIGNALS), setup)
else:
    hb = multiprocessing.Array("d", 1, lock=False)
    async def setup(sig):
        stopped = asyncio.Event()
        async def serve():
            await asyncio.wait_for(stopped.wait(), 30)
            say(step="served", retire=sig.retire, beat=hb[0] > 0)
        return child.Service(serve, stopped.set, lambda: say(step="started"),
                             lambda: say(step="stopped"))
    child.main_loop(cfg, child.Spec("test-loop", child.ACCEPTOR_SIGNALS), setup, hb, 0)
'''


@pytest.fixture
def procs() -> Iterator[Processes]:
    with Processes() as registry:
        yield registry


def start(procs: Processes, kind: str) -> subprocess.Popen[bytes]:
    p = procs.spawn([sys.executable, "-c", CHILD, kind], stdout_pipe=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout is not None
    assert json.loads(p.stdout.readline()) == {"step": "started"}
    return p


def finish(p: subprocess.Popen[bytes]) -> list[dict[str, object]]:
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 0
    return [json.loads(line) for line in out.splitlines()]


def test_blocking_child_ignores_term_and_stops_on_usr2(procs: Processes) -> None:
    p = start(procs, "blocking")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        p.send_signal(signum)
    time.sleep(0.3)
    assert p.poll() is None, "a lane child must ignore TERM, INT and HUP"
    p.send_signal(signal.SIGUSR2)
    assert finish(p) == [{"step": "served", "stopped": True}, {"step": "stopped"}]


@pytest.mark.parametrize(("signum", "retire"), [(signal.SIGUSR2, False),
                                                (signal.SIGTERM, False),
                                                (signal.SIGUSR1, True)])
def test_loop_child_stops_or_retires_with_its_heartbeat_written(
        procs: Processes, signum: int, retire: bool) -> None:
    p = start(procs, "loop")
    p.send_signal(signal.SIGINT)          # ignored by an acceptor (only the supervisor acts)
    time.sleep(0.3)
    assert p.poll() is None
    p.send_signal(signum)
    assert finish(p) == [{"step": "served", "retire": retire, "beat": True},
                         {"step": "stopped"}]
