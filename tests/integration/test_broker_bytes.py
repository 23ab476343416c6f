"""The lane broker bounds its queue in bytes as well as in count (lanes.<lane>.queue_bytes):
a SUBMIT that would pass the byte bound is NACKed queue_full at once (the acceptor answers 451).
The Broker object runs in this process on its own ipc sockets; no worker is connected, so what
is submitted stays queued."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import zmq

from ingress.core.wire import Envelope, Lane, WireEvidence, decode_reply, new_qid, ready, submit
from tests.kit.lanekit import broker_in, close_broker, dealer
from workers.lane.broker import Broker

_SENT = 0


@pytest.fixture
def broker_and_client():
    state = Path(tempfile.mkdtemp(prefix="bb-", dir="/tmp"))
    b = broker_in(state, "fast", '[smtp]\nmax_message_size = 100000\n'
                  '[lanes.fast]\nqueue_max = 100\nqueue_bytes = 250000\n')
    acceptor = dealer(b, "fast-front", b"acc-1")
    yield b, acceptor
    acceptor.close()
    close_broker(b)
    shutil.rmtree(state, ignore_errors=True)


def frames(size: int) -> list[bytes]:
    global _SENT
    _SENT += 1
    now = time.time()
    env = Envelope(qid=new_qid(now), lane=Lane.FAST, peer_ip="192.0.2.1", peer_port=1,
                   helo="h", mail_from="a@b.test", rcpts=("c@example.test",),
                   received_at=now, deadline=now + 30,
                   # each its own operator identity: what is bounded here is the lane's own
                   # queue_bytes, not a tier's or an identity's part of it (test_broker_identity)
                   evidence=WireEvidence(identity=f"allow:192.0.2.{_SENT % 250}/32"))
    return submit(env, b"x" * size)


def pump(b: Broker, dealer: zmq.Socket, n: int) -> None:
    want = b.counters["submitted"] + n
    for _ in range(n):
        dealer.send_multipart(frames(100000))
    deadline = time.monotonic() + 5
    while b.counters["submitted"] < want and time.monotonic() < deadline:
        if b.front.poll(100):
            b._drain(b.front, b.on_front)


def test_queue_bound_in_bytes(broker_and_client) -> None:
    b, acceptor = broker_and_client
    pump(b, acceptor, 3)
    assert len(b.queue) == 2 and b.queued_bytes == 200000     # the third would pass 250000
    assert b.counters["nack_queue_full"] == 1
    assert acceptor.poll(2000)
    reply = decode_reply(acceptor.recv_multipart())
    assert not reply.ok and reply.reason is not None and reply.reason.value == "queue_full"
    # A worker takes them: the bytes are given back, and the next SUBMIT fits again.
    worker = dealer(b, "fast-back", b"w1")
    try:
        worker.send_multipart(ready(8))
        assert b.back.poll(2000)
        b._drain(b.back, b.on_back)
        b.dispatch()
        assert not b.queue and b.queued_bytes == 0
        pump(b, acceptor, 1)
        assert len(b.queue) == 1 and b.queued_bytes == 100000
    finally:
        worker.close()
