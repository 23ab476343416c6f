"""The child skeleton's pure parts: the reconnect back-off, what each signal does, the
heartbeat slot and the parent-death check, each lane process's scheduling policy (no process is
started here)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ingress.core import child
from ingress.core.child import ACCEPTOR_SIGNALS, LANE_SIGNALS, Heartbeat, Reconnect, Signals
from ingress.core.config import Config


def test_reconnect_backoff_is_paranoid_pirates_1_to_32_seconds() -> None:
    r = Reconnect()
    now = 100.0
    delays = []
    for _ in range(8):
        assert r.due(now)
        delays.append(r.attempted(now))
        assert not r.due(now + delays[-1] - 0.001)
        now += delays[-1]
    assert delays == [1, 2, 4, 8, 16, 32, 32, 32]


def test_reconnect_reset_starts_again_at_once_and_at_the_initial_delay() -> None:
    r = Reconnect(initial=0.5, maximum=4.0)
    for t in range(5):
        r.attempted(float(t))
    assert not r.due(4.5)
    r.reset()
    assert r.due(4.5)
    assert r.attempted(4.5) == 0.5


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 32.0)])
def test_reconnect_refuses_a_nonsense_range(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        Reconnect(initial, maximum)


# (table, signal, stop, retire)
SIGNAL_CASES = [
    (ACCEPTOR_SIGNALS, signal.SIGUSR2, True, False),
    (ACCEPTOR_SIGNALS, signal.SIGTERM, True, False),
    (ACCEPTOR_SIGNALS, signal.SIGUSR1, True, True),
    (ACCEPTOR_SIGNALS, signal.SIGINT, False, False),
    (ACCEPTOR_SIGNALS, signal.SIGHUP, False, False),
    (LANE_SIGNALS, signal.SIGUSR2, True, False),
    (LANE_SIGNALS, signal.SIGTERM, False, False),
    (LANE_SIGNALS, signal.SIGINT, False, False),
    (LANE_SIGNALS, signal.SIGHUP, False, False),
]


@pytest.mark.parametrize(("table", "signum", "stop", "retire"), SIGNAL_CASES)
def test_signal_sets_the_flags(table: dict[int, child.Action], signum: int, stop: bool,
                               retire: bool) -> None:
    s = Signals(table)
    called: list[int] = []
    s.on_stop(lambda: called.append(1))
    s.handle(signum)
    assert (s.stop, s.retire) == (stop, retire)
    assert called == ([1] if stop else [])


def test_on_stop_registered_late_is_called_at_once() -> None:
    s = Signals(LANE_SIGNALS)
    s.handle(signal.SIGUSR2)
    called: list[int] = []
    s.on_stop(lambda: called.append(1))
    assert called == [1]


def test_installed_handler_only_sets_the_flag() -> None:
    """A real SIGUSR2 to this process, through signal.signal, sets the flag and nothing else;
    SIGHUP is ignored (the default would end the process)."""
    saved = {n: signal.getsignal(n) for n in LANE_SIGNALS}
    try:
        s = Signals(LANE_SIGNALS)
        s.install()
        os.kill(os.getpid(), signal.SIGHUP)
        assert not s.stop
        os.kill(os.getpid(), signal.SIGUSR2)
        assert s.stop and not s.retire
    finally:
        for n, h in saved.items():
            signal.signal(n, h)


def test_heartbeat_writes_its_slot_only() -> None:
    hb = [0.0, 0.0, 0.0]
    Heartbeat(hb, 1).beat()
    assert hb[0] == hb[2] == 0.0 and hb[1] > 0
    Heartbeat(None, 0).beat()        # no array: nothing to write, no error


def test_orphaned_when_the_parent_pid_changed() -> None:
    assert not Heartbeat().orphaned()
    assert Heartbeat(parent=os.getppid() + 1).orphaned()


def test_heartbeat_task_beats_and_stops_an_orphan_once() -> None:
    hb = [0.0]
    stops: list[int] = []

    async def go() -> None:
        heart = Heartbeat(hb, 0, parent=os.getppid() + 1)
        task = asyncio.create_task(heart.run(0.01, lambda: stops.append(1)))
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(go())
    assert hb[0] > 0
    assert stops == [1]


@pytest.mark.parametrize(("policy", "fast_policy", "want"), [
    # the fast broker and the fast workers of the operator's tiers: SCHED_RR by default
    ("rr", "other", {"broker-fast": "rr", "worker-fast-0": "rr",
                     "worker-fast-self-proven-0": "other", "broker-bulk": "batch",
                     "worker-bulk-0": "batch"}),
    # "other": lanes.<lane>.sched_policy as before, for every lane process
    ("other", "batch", {"broker-fast": "batch", "worker-fast-0": "batch",
                        "worker-fast-self-proven-0": "batch", "broker-bulk": "batch",
                        "worker-bulk-0": "batch"}),
])
def test_lane_processes_of_the_operators_tiers_get_its_policy(
        policy: str, fast_policy: str, want: dict[str, str]) -> None:
    """tiers.operator_policy for the processes that serve the operator's tiers; never for the
    workers dedicated to the self-proven tier (anyone can mint its identities) or bulk."""
    cfg = dataclasses.replace(
        Config(), tiers=dataclasses.replace(Config().tiers, operator_policy=policy),
        lanes=dataclasses.replace(
            Config().lanes, fast=dataclasses.replace(Config().lanes.fast, sched_policy=fast_policy),
            bulk=dataclasses.replace(Config().lanes.bulk, sched_policy="batch")))
    got = {"broker-fast": child.lane_spec(cfg, "fast", "broker-fast").policy,
           "worker-fast-0": child.lane_spec(cfg, "fast", "worker-fast-0").policy,
           "worker-fast-self-proven-0": child.lane_spec(cfg, "fast", "worker-fast-self-proven-0",
                                                        dedicated=True).policy,
           "broker-bulk": child.lane_spec(cfg, "bulk", "broker-bulk").policy,
           "worker-bulk-0": child.lane_spec(cfg, "bulk", "worker-bulk-0").policy}
    assert got == want
    assert child.operator_policy(cfg) == ("rr" if policy == "rr" else "other")


_IO_POLICY = """
import json, os, sys, time
from pathlib import Path
import zmq
from ingress.core import child
os.nice(int(sys.argv[1]))
if sys.argv[2] != "other":
    os.sched_setscheduler(0, {"batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}[sys.argv[2]],
                          os.sched_param(0))
ctx = child.quiet_io_threads(zmq.Context())
sock = ctx.socket(zmq.PAIR)                     # the I/O threads start with the first socket
# each names itself once running, after it took its policy (libzmq's thread_routine)
deadline = time.monotonic() + 10
while True:
    zmq_threads = [t for t in Path("/proc/self/task").iterdir()
                   if (t / "comm").read_text().startswith("ZMQbg/")]
    if len(zmq_threads) >= 2 or time.monotonic() > deadline:     # I/O and reaper
        break
    time.sleep(0.01)
got = {os.sched_getscheduler(int(t.name)) for t in zmq_threads}
print(json.dumps(sorted(got)))
sock.close(0)
ctx.term()
"""


@pytest.mark.parametrize(("nice", "policy", "want"), [
    (5, "other", {os.SCHED_BATCH}),     # yields the cores: its zmq threads never preempt
    (0, "other", {os.SCHED_OTHER}),     # full priority: zmq's default
    (5, "idle", {os.SCHED_IDLE}),       # another policy already (lanes.bulk.sched_policy)
    (5, "batch", {os.SCHED_BATCH}),
])
def test_quiet_io_threads(nice: int, policy: str, want: set[int]) -> None:
    """A process's ZeroMQ I/O and reaper threads, made by a context it set up with
    child.quiet_io_threads (a real libzmq, in a process of its own)."""
    r = subprocess.run([sys.executable, "-c", _IO_POLICY, str(nice), policy],
                       capture_output=True, text=True, timeout=60, check=True,
                       cwd=Path(__file__).resolve().parents[2])
    assert set(json.loads(r.stdout)) == want, r.stdout + r.stderr
