"""A lane broker passes its workers' facts on to every acceptor, but not a LEARN that repeats
one it passed on within the window (ingress.policy.learn_repeats): a learned network's steady
mail used to wake every acceptor, the fast acceptors included, once per message. The Broker
object runs in this process; a DEALER plays a worker, a SUB socket an acceptor."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import zmq

from ingress.core.wire import LEARN_TOPIC, UNLEARN_TOPIC, decode_shared, share
from tests.kit.lanekit import broker_in, close_broker, dealer


def test_a_repeated_learn_wakes_the_acceptors_once() -> None:
    state = Path(tempfile.mkdtemp(prefix="bf-", dir="/tmp"))
    b = broker_in(state, "fast")
    worker = dealer(b, "fast-back", b"w-1")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (LEARN_TOPIC, UNLEARN_TOPIC):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(b.cfg.ipc("fast-status"))

    def pump(*facts: list[bytes]) -> list[tuple[bytes, str, str]]:
        for f in facts:
            worker.send_multipart(f)
        deadline = time.monotonic() + 5.0
        got: list[tuple[bytes, str, str]] = []
        while time.monotonic() < deadline:
            if b.back.poll(50):
                b._drain(b.back, b.on_back)
            while sub.poll(50):
                got.append(decode_shared(sub.recv_multipart()))
            if len(got) >= 1 and not b.back.poll(0) and not sub.poll(200):
                break
        return got

    try:
        learn = share(LEARN_TOPIC, "192.0.2.1", "a.test")
        for _ in range(50):                       # PUB/SUB: until the SUB has joined
            if pump(share(LEARN_TOPIC, "192.0.2.9", "join.test")):
                break
        assert pump(learn, learn, learn, learn) == [(LEARN_TOPIC, "192.0.2.1", "a.test")]
        other = share(LEARN_TOPIC, "192.0.2.1", "b.test")    # domains rotated: once each
        assert pump(other, learn, other, share(UNLEARN_TOPIC, "192.0.2.1"), learn, learn) == [
            (LEARN_TOPIC, "192.0.2.1", "b.test"), (UNLEARN_TOPIC, "192.0.2.1", ""),
            (LEARN_TOPIC, "192.0.2.1", "a.test")]
    finally:
        for s in (sub, worker):
            s.close()
        close_broker(b)
        shutil.rmtree(state, ignore_errors=True)
