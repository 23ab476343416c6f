"""The fast broker shares its queue and its workers fairly between identities (issue 8): one
identity holds at most classify.identity_share of the queue (beyond it: NACK share, which the
acceptor serves as bulk) and of the workers' credit, and dispatch is deficit round robin, so a
spammer's burst queued first does not hold back another identity. The Broker object runs in this
process on its own ipc sockets, with a DEALER for an acceptor and one for a worker."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from ingress.core import config
from ingress.core.wire import (
    Envelope,
    Kind,
    Lane,
    WireEvidence,
    decode_reply,
    decode_status,
    kind_of,
    new_qid,
    ready,
    submit,
    worker_ack,
)
from ingress.policy.tiers import Tier
from tests.kit.lanekit import broker_in, dealer
from workers.lane.broker import OVER_RATE_HOLD, Broker


def fast_broker(state: Path, classify: str, lanes_fast: str) -> Broker:
    """A fast-lane Broker in this process, its state and ipc sockets under `state`, with these
    [classify] and [lanes.fast] lines."""
    return broker_in(state, "fast", '[smtp]\nmax_message_size = 100000\n'
                     f'[lanes.fast]\n{lanes_fast}\n[classify]\n{classify}\n')


def ready_and_collect(b: Broker, worker: zmq.Socket, credit: int,
                      quiet_ms: int) -> list[tuple[bytes, dict]]:
    """The worker announces READY with `credit`; the broker dispatches; (reply_to, envelope)
    of every WORK it got, until it hears nothing for `quiet_ms`."""
    worker.send_multipart(ready(credit))
    assert b.back.poll(2000)
    b._drain(b.back, b.on_back)
    b.dispatch()
    got = []
    while worker.poll(quiet_ms):
        msg = worker.recv_multipart()
        assert kind_of(msg) is Kind.WORK
        got.append((msg[2], orjson.loads(msg[3])))
    return got


def status_sub(b: Broker) -> zmq.Socket:
    """A SUB socket on the fast broker's status (every topic)."""
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.LINGER, 0)
    s.connect(b.cfg.ipc("fast-status"))
    return s


@pytest.fixture
def broker():
    state = Path(tempfile.mkdtemp(prefix="bi-", dir="/tmp"))
    b = fast_broker(state, "identity_share = 0.25", "queue_max = 8\nqueue_bytes = 1000000")
    socks = [dealer(b, "fast-front", b"acc-1"), dealer(b, "fast-back", b"w1")]
    yield b, socks[0], socks[1]
    for s in (*socks, b.front, b.back, b.pub):
        s.close()
    shutil.rmtree(state, ignore_errors=True)


def send(b: Broker, dealer: zmq.Socket, identity: str, subject: str,
         peer_ip: str = "127.0.0.9") -> None:
    now = time.time()
    env = Envelope(qid=new_qid(now), lane=Lane.FAST, peer_ip=peer_ip, peer_port=1,
                   helo="h", mail_from=subject, rcpts=("c@example.test",), received_at=now,
                   deadline=now + 30, evidence=WireEvidence(identity=identity))
    want = b.counters["submitted"] + 1
    dealer.send_multipart(submit(env, b"x" * 40000))   # DRR_QUANTUM (64 KiB): one a turn
    deadline = time.monotonic() + 5
    while b.counters["submitted"] < want and time.monotonic() < deadline:
        if b.front.poll(100):
            b._drain(b.front, b.on_front)
    assert b.counters["submitted"] == want


def test_identity_share_of_queue_and_fair_dispatch(broker) -> None:
    b, acceptor, worker = broker
    for i in range(4):
        send(b, acceptor, "org:spammer.test", f"spam{i}")
    send(b, acceptor, "learned:spammer.test", "spam-learned")   # the same budget
    send(b, acceptor, "org:good.test", "good0")
    send(b, acceptor, "allow:127.0.0.20/32", "allow0")
    # queue_max 8 x 0.25 = 2 per identity: spam2, spam3 and the learned one are NACKed share
    assert len(b.queue) == 4
    nacks = []
    while acceptor.poll(500):
        r = decode_reply(acceptor.recv_multipart())
        assert not r.ok
        nacks.append(r.reason)
    assert [str(n) for n in nacks] == ["share"] * 3
    # a worker with credit 8: in-flight share 2 per identity; the operator tier (allow) first
    # (strict priority between trust tiers, issue 17), then DRR order between identities
    got = ready_and_collect(b, worker, 8, 500)
    assert [e["mail_from"] for _, e in got] == ["allow0", "spam0", "good0", "spam1"]
    assert not b.queue and b.inflight_by_key == {"org:spammer.test": 2, "org:good.test": 1,
                                                 "allow:127.0.0.20/32": 1}
    # at its in-flight share, a spammer's new message waits while others go
    send(b, acceptor, "org:spammer.test", "spam4")
    send(b, acceptor, "org:good.test", "good1")
    b.dispatch()
    assert worker.poll(500)
    assert orjson.loads(worker.recv_multipart()[3])["mail_from"] == "good1"
    assert not worker.poll(200)
    # an ACK gives the spammer's share back
    reply_to, e = next((r, e) for r, e in got if e["mail_from"] == "spam0")
    worker.send_multipart(worker_ack(reply_to, str(e["qid"]).encode(), "p"))
    assert b.back.poll(2000)
    b._drain(b.back, b.on_back)
    b.dispatch()
    assert worker.poll(500)
    assert orjson.loads(worker.recv_multipart()[3])["mail_from"] == "spam4"


def test_a_domain_identity_is_held_to_classify_domain_rate() -> None:
    """A domain that proves itself only by its own SPF/DKIM (org:, and learned: entries of
    it) gets at most classify.domain_rate messages/s of the fast lane; beyond it NACK share
    (the acceptor serves it as bulk, where the bulk cap applies). Allow-list entries are
    operator trust: not bounded by it."""
    state = Path(tempfile.mkdtemp(prefix="bd-", dir="/tmp"))
    b = fast_broker(state, "identity_share = 1.0\ndomain_rate = 0.001\ndomain_burst = 1",
                    "queue_max = 64\nqueue_bytes = 10000000")
    acceptor = dealer(b, "fast-front", b"acc-1")
    status = status_sub(b)
    try:
        for i in range(3):
            send(b, acceptor, "org:spf-bots.test", f"spam{i}")
        send(b, acceptor, "learned:spf-bots.test", "spam-learned")    # the same domain
        for i in range(3):
            send(b, acceptor, "allow:127.0.0.20/32", f"allow{i}")
        # burst 1 (one second of 0.001/s): one spam message queued, the other three NACKed
        assert len(b.queue) == 1 + 3
        nacks = []
        while acceptor.poll(500):
            nacks.append(decode_reply(acceptor.recv_multipart()))
        assert len(nacks) == 3
        assert all(r.reason is not None and r.reason.value == "share" for r in nacks), nacks
        # ... and its status names the domain over its rate (the acceptors then keep its
        # sessions bulk at MAIL FROM), never an allow entry; forgotten OVER_RATE_HOLD later
        doc = published(b, status)
        assert doc is not None and doc["over_rate"] == ["org:spf-bots.test"], doc
        assert b.over_rate_now(time.monotonic() + OVER_RATE_HOLD + 0.5) == []
    finally:
        for s in (acceptor, status, b.front, b.back, b.pub):
            s.close()
        shutil.rmtree(state, ignore_errors=True)


def published(b: Broker, status: zmq.Socket) -> dict[str, Any] | None:
    """The broker's next status document (it publishes now; at most 5 s), or None."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        b.publish(time.monotonic())
        if status.poll(100):
            return decode_status(status.recv_multipart())
    return None


def drain_nacks(acceptor: zmq.Socket) -> list[str]:
    out = []
    while acceptor.poll(300):
        r = decode_reply(acceptor.recv_multipart())
        assert not r.ok
        out.append(str(r.reason))
    return out


def test_trust_tiers_in_the_fast_broker() -> None:
    """Issue 17: the self-proven tier as a whole holds at most tiers.self_proven_share of the
    queue and of the workers' credit, however many domains it has (beyond it: NACK share,
    served as bulk); the operator tier's work is dispatched first (strict priority), and a
    share of the credit is always free for it."""
    state = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
    f = state / "c.toml"
    f.write_text(f'[spool]\nstate_dir = "{state}"\npath = "{state / "spool"}"\n'
                 '[smtp]\nmax_message_size = 100000\n'
                 '[classify]\nidentity_share = 1.0\ndomain_rate = 0.0\n'
                 '[tiers]\nself_proven_share = 0.5\nthird_party_share = 0.25\n'
                 'self_proven_rate = 0.0\n'
                 '[lanes.fast]\nqueue_max = 8\nqueue_bytes = 1000000\n')
    b = Broker(config.load(f), "fast")
    acceptor, worker = dealer(b, "fast-front", b"acc-1"), dealer(b, "fast-back", b"w1")
    try:
        # ten self-proven domains, one message each: the tier holds 8 x 0.5 = 4 queued
        for i in range(10):
            send(b, acceptor, f"org:d{i}.test", f"spam{i}")
        assert b.queue.tier_len(Tier.SELF_PROVEN) == 4
        assert drain_nacks(acceptor) == ["share"] * 6
        for i in range(3):
            send(b, acceptor, "allow:127.0.0.20/32", f"allow{i}")
        # a worker with credit 4: the operator's three first, then one self-proven message
        # (its cap: 4 x 0.5 = 2; and the operator always finds credit it cannot use)
        got = ready_and_collect(b, worker, 4, 300)
        assert [e["mail_from"] for _, e in got] == ["allow0", "allow1", "allow2", "spam0"]
        # ACK the operator's: the self-proven tier may take up to 2 of the 4 credits, no more
        for reply_to, e in got[:3]:
            worker.send_multipart(worker_ack(reply_to, str(e["qid"]).encode(), "p"))
        deadline = time.monotonic() + 5
        while b.inflight_by_tier[Tier.OPERATOR] and time.monotonic() < deadline:
            if b.back.poll(100):
                b._drain(b.back, b.on_back)
        b.dispatch()
        more = []
        while worker.poll(300):
            more.append(orjson.loads(worker.recv_multipart()[3])["mail_from"])
        assert more == ["spam1"], more
        assert b.inflight_by_tier[Tier.SELF_PROVEN] == 2
        send(b, acceptor, "allow:127.0.0.20/32", "allow3")          # free credit: at once
        b.dispatch()
        assert worker.poll(500)
        assert orjson.loads(worker.recv_multipart()[3])["mail_from"] == "allow3"
    finally:
        for s in (acceptor, worker, b.front, b.back, b.pub):
            s.close()
        shutil.rmtree(state, ignore_errors=True)


def test_the_self_proven_tier_has_one_total_rate() -> None:
    """tiers.self_proven_rate: one bucket for every self-proven identity (here 1 deep): the
    first message of ten domains is queued, the other nine NACKed share, and the status names
    the client's site over the tier's rate (the acceptors then keep that site's sessions of
    the tier bulk at MAIL FROM; another site is not named until it is refused itself: the
    rate is shared fairly between sites); a second site finds the total spent too; the
    operator tier is not bounded by it."""
    state = Path(tempfile.mkdtemp(prefix="br-", dir="/tmp"))
    b = fast_broker(state, "identity_share = 1.0\ndomain_rate = 0.0\n"
                    "[tiers]\nself_proven_rate = 0.001\nself_proven_burst = 1",
                    "queue_max = 64\nqueue_bytes = 10000000")
    acceptor = dealer(b, "fast-front", b"acc-1")
    status = status_sub(b)
    try:
        for i in range(10):
            send(b, acceptor, f"org:d{i}.test", f"spam{i}")
        for i in range(3):
            send(b, acceptor, "allow:127.0.0.20/32", f"allow{i}")
        assert (b.queue.tier_len(Tier.SELF_PROVEN), b.queue.tier_len(Tier.OPERATOR)) == (1, 3)
        assert drain_nacks(acceptor) == ["share"] * 9
        doc = published(b, status)
        assert doc is not None and doc["over_rate"] == ["tier:self-proven@127.0.0.0/24"], doc
        send(b, acceptor, "org:other.test", "other", peer_ip="127.0.5.9")
        assert drain_nacks(acceptor) == ["share"]
        doc = published(b, status)
        assert doc is not None and doc["over_rate"] == [
            "tier:self-proven@127.0.5.0/24", "tier:self-proven@127.0.0.0/24"], doc
        assert doc["tiers"]["self-proven"] == {"depth": 1, "inflight": 0}
    finally:
        for s in (acceptor, status, b.front, b.back, b.pub):
            s.close()
        shutil.rmtree(state, ignore_errors=True)
