"""A worker that leaves (SIGUSR2 on a reload or a stop: it sends DISCONNECT) is never given work
again, and the broker says so (it answers DISCONNECT: nothing follows on that pipe), so the
worker leaves only once everything the broker sent it is done. Before this, a leaving worker's
next HEARTBEAT re-registered it with full credit, the broker sent it WORK as it exited, and the
acceptor answered 451 worker_lost one liveness window later (issue 20: a reload costs the fast
lane nothing). The Broker object runs in this process on its own ipc sockets; the worker is a
DEALER driven by the test."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingress.core.wire import (
    Envelope,
    Kind,
    Lane,
    disconnect,
    heartbeat,
    kind_of,
    new_qid,
    ready,
    submit,
)
from tests.kit.lanekit import broker_in, close_broker, dealer
from workers.lane.broker import Broker


@pytest.fixture
def lane() -> Iterator[tuple[Broker, Any, Any]]:
    state = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    b = broker_in(state, "bulk")
    acceptor, worker = dealer(b, "bulk-front", b"acc-1"), dealer(b, "bulk-back", b"w-bulk-0-1-1")
    yield b, acceptor, worker
    acceptor.close()
    worker.close()
    close_broker(b)
    shutil.rmtree(state, ignore_errors=True)


def _turn(b: Broker) -> None:
    """One broker turn over whatever arrived (bounded wait)."""
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        if b.back.poll(20):
            b._drain(b.back, b.on_back)
        if b.front.poll(20):
            b._drain(b.front, b.on_front)
    b.dispatch()


def _submit(acceptor: Any) -> None:
    now = time.time()
    env = Envelope(qid=new_qid(now), lane=Lane.BULK, peer_ip="192.0.2.1", peer_port=1, helo="h",
                   mail_from="a@b.test", rcpts=("c@example.test",), received_at=now,
                   deadline=now + 30)
    acceptor.send_multipart(submit(env, b"Subject: x\r\n\r\nbody\r\n"))


def _kinds(sock: Any) -> list[Kind]:
    out = []
    while sock.poll(100):
        out.append(kind_of(sock.recv_multipart()))
    return out


def test_a_leaving_worker_gets_no_work_and_is_told_so(lane: tuple[Broker, Any, Any]) -> None:
    b, acceptor, worker = lane
    worker.send_multipart(ready(4))
    _turn(b)
    worker.send_multipart(disconnect())
    _turn(b)
    assert _kinds(worker) == [Kind.DISCONNECT], "the broker answers the worker's DISCONNECT"
    # The leaving worker still heartbeats while it finishes (the supervisor watches it too);
    # a heartbeat must not take it back.
    worker.send_multipart(heartbeat(4))
    _submit(acceptor)
    _turn(b)
    assert Kind.WORK not in _kinds(worker)
    assert len(b.queue) == 1, "the message waits for a worker that stays"


def test_work_sent_before_the_disconnect_was_read_is_waited_for(
        lane: tuple[Broker, Any, Any]) -> None:
    """The worker's DISCONNECT and the broker's WORK cross: the WORK arrives before the
    broker's answer, so the worker (which leaves only after the answer) does it."""
    b, acceptor, worker = lane
    worker.send_multipart(ready(4))
    _turn(b)
    _submit(acceptor)
    _turn(b)                                  # WORK is on its way to the worker
    worker.send_multipart(disconnect())
    _turn(b)
    assert _kinds(worker) == [Kind.WORK, Kind.DISCONNECT]
    assert b.workers, "kept until its in-flight ACK is in"
