"""A lane broker's status publications (every acceptor wakes for each one): at once when what
the acceptors act on changes (ingress.core.wire.status_key: saturated, the cap spent, the
domains over their rate), otherwise only every STATUS_KEEPALIVE, so an idle broker does not wake
every acceptor ten times a second. The Broker object runs in this process; a SUB socket plays
an acceptor; `now` is passed explicitly."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import zmq

from ingress.core.wire import (
    STATUS_INTERVAL,
    STATUS_KEEPALIVE,
    STATUS_STALE,
    STATUS_TOPIC,
    decode_status,
    status_key,
)
from tests.kit.lanekit import broker_in, close_broker


@pytest.mark.parametrize(("doc", "key"), [
    ({}, (False, False, ())),
    ({"saturated": True, "tokens": None}, (True, False, ())),
    ({"tokens": 0.4}, (False, True, ())),
    ({"tokens": 1.0}, (False, False, ())),
    ({"tokens": "0"}, (False, False, ())),
    ({"over_rate": ["org:a.test"]}, (False, False, ("org:a.test",))),
    ({"over_rate": "org:a.test"}, (False, False, ())),
    ({"depth": 7, "free_credit": 3, "submitted": 99}, (False, False, ())),  # not acted on
])
def test_status_key(doc: dict[str, object], key: tuple[object, ...]) -> None:
    assert status_key(doc) == key


def test_keepalive_keeps_status_fresh() -> None:
    assert STATUS_INTERVAL < STATUS_KEEPALIVE and 3 * STATUS_KEEPALIVE <= STATUS_STALE


def received(sub: zmq.Socket) -> list[dict[str, object]]:
    out = []
    while sub.poll(200):
        out.append(decode_status(sub.recv_multipart()))
    return out


@pytest.mark.parametrize("lane", ["fast", "bulk"])
def test_published_on_change_else_on_keepalive(lane: str) -> None:
    state = Path(tempfile.mkdtemp(prefix="bs-", dir="/tmp"))
    b = broker_in(state, lane)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, STATUS_TOPIC)
    sub.connect(b.cfg.ipc(f"{lane}-status"))
    try:
        t = time.monotonic() + 10_000.0
        for k in range(25):                       # PUB/SUB: until the SUB has joined (each
            b.publish(t - 1000.0 + k)             # try a keepalive later than the last)
            if received(sub):
                break
        b.publish(t)
        assert len(received(sub)) == 1
        for k in (1, 2):                          # nothing changed, within the keepalive
            b.publish(t + k * STATUS_INTERVAL)
        assert received(sub) == []
        b.publish(t + STATUS_KEEPALIVE + 0.01)   # the keepalive
        assert len(received(sub)) == 1
        b.lane_gate.tokens = lambda now: 0.0      # type: ignore[method-assign]
        b.publish(t + STATUS_KEEPALIVE + 0.02)   # a change (the cap spent): at once
        got = received(sub)
        assert len(got) == 1 and got[0]["tokens"] == 0.0
    finally:
        sub.close()
        close_broker(b)
        shutil.rmtree(state, ignore_errors=True)
