"""The wire format: golden bytes (a change here is a protocol change: bump VERSION) and decoding."""

from __future__ import annotations

import pytest
import zmq

from ingress.core import wire
from ingress.core.wire import AuthResult, Envelope, Kind, Lane, NackReason, WireError, WireEvidence

ENV = Envelope(qid="0000000000100001000A", lane=Lane.FAST, peer_ip="192.0.2.1", peer_port=4242,
               helo="mail.example", mail_from="a@example.org", rcpts=("b@example.test",),
               received_at=1700000000.5, deadline=1700000020.5, acceptor="a0-1",
               smtputf8=False, tls="TLSv1.3", evidence=WireEvidence(spf=AuthResult.PASS))

GOLDEN_ENVELOPE = (
    b'{"qid":"0000000000100001000A","lane":"fast","peer_ip":"192.0.2.1","peer_port":4242,'
    b'"helo":"mail.example","mail_from":"a@example.org","rcpts":["b@example.test"],'
    b'"received_at":1700000000.5,"deadline":1700000020.5,"acceptor":"a0-1","smtputf8":false,'
    b'"tls":"TLSv1.3","evidence":{"spf":"pass"}}')


def test_golden_envelope_proto() -> None:
    """Issue 19 item 2: "proto" is additive (written only when set; absent decodes as "")."""
    with_proto = Envelope(**{**ENV.__dict__, "proto": "ESMTP"})
    assert with_proto.encode() == GOLDEN_ENVELOPE[:-1] + b',"proto":"ESMTP"}'
    assert Envelope.decode(with_proto.encode()) == with_proto
    assert Envelope.decode(GOLDEN_ENVELOPE).proto == ""


def test_golden_frames() -> None:
    assert wire.VERSION == b"SI2"
    assert ENV.encode() == GOLDEN_ENVELOPE
    assert wire.submit(ENV, b"body") == [b"SI2", b"SUBMIT", GOLDEN_ENVELOPE, b"body"]
    assert wire.work(b"a0", b"E", b"B") == [b"SI2", b"WORK", b"a0", b"E", b"B"]
    assert wire.ready(8) == [b"SI2", b"READY", b"8"]
    assert wire.heartbeat(3) == [b"SI2", b"HEARTBEAT", b"3"]
    assert wire.disconnect() == [b"SI2", b"DISCONNECT"]
    assert wire.worker_ack(b"a0", b"Q1", "f") == [b"SI2", b"ACK", b"a0", b"Q1", b'{"path":"f"}']
    assert wire.worker_nack(b"a0", b"Q1", NackReason.RATE, "cap") == [
        b"SI2", b"NACK", b"a0", b"Q1", b'{"reason":"rate","text":"cap"}']
    assert wire.to_acceptor(Kind.ACK, b"Q1", b"{}") == [b"SI2", b"ACK", b"Q1", b"{}"]
    assert wire.status({"lane": "bulk"}) == [b"status", b"SI2", b'{"lane":"bulk"}']
    assert wire.share(wire.LEARN_TOPIC, "192.0.2.1") == [b"SI2", b"SHARE", b"learn",
                                                         b"192.0.2.1"]
    assert wire.shared_publication(wire.share(wire.PENALTY_TOPIC, "2001:db8::1")) == [
        b"penalty", b"SI2", b"2001:db8::1"]
    # a learned fact says for which domain (the learned entry counts against its share)
    assert wire.shared_publication(wire.share(wire.LEARN_TOPIC, "192.0.2.1", "good.test")) == [
        b"learn", b"SI2", b"192.0.2.1", b"good.test"]


@pytest.mark.parametrize(("frames", "ok"), [
    ([b"learn", b"SI2", b"192.0.2.1"], ("learn", "192.0.2.1", "")),
    ([b"learn", b"SI2", b"192.0.2.1", b"Example.COM"], ("learn", "192.0.2.1", "example.com")),
    ([b"learn", b"SI2", b"192.0.2.1", b"bad domain\r\n"], None),
    ([b"learn", b"SI2", b"192.0.2.1", b"x" * 254], None),
    ([b"penalty", b"SI2", b"2001:DB8::1"], ("penalty", "2001:db8::1", "")),
    ([b"learn", b"SI2", b"not-an-ip"], None),
    ([b"learn", b"SI1", b"192.0.2.1"], None),
    ([b"admin", b"SI2", b"192.0.2.1"], None),
    ([b"learn", b"SI2"], None),
])
def test_shared_facts(frames: list[bytes], ok: tuple[str, str, str] | None) -> None:
    if ok is None:
        with pytest.raises(WireError):
            wire.decode_shared(frames)
    else:
        fact, ip, domain = wire.decode_shared(frames)
        assert (fact.decode(), ip, domain) == ok
    with pytest.raises(WireError):
        wire.shared_publication([b"SI2", b"SHARE", b"admin", b"192.0.2.1"])


def test_roundtrip() -> None:
    assert Envelope.decode(ENV.encode()) == ENV
    r = wire.decode_reply(wire.to_acceptor(Kind.ACK, b"Q1", wire.ack_detail("f")))
    assert r.ok and r.qid == "Q1" and r.path == "f"
    r = wire.decode_reply(wire.to_acceptor(Kind.NACK, b"Q2",
                                           wire.nack_detail(NackReason.WORKER_LOST, "x")))
    assert not r.ok and r.reason is NackReason.WORKER_LOST and r.text == "x"
    assert wire.decode_status(wire.status({"lane": "bulk", "saturated": True}))["saturated"]


@pytest.mark.parametrize("frames", [
    [], [b"SI0", b"ACK", b"Q", b"{}"], [b"SI2", b"BOGUS"], [b"SI2", b"ACK", b"Q"],
    [b"SI2", b"ACK", b"Q", b"not json"], [b"SI2", b"NACK", b"Q", b'{"reason":"nope"}'],
    [b"SI2", b"SUBMIT", b"E", b"B"], [b"SI2", b"ACK", b"\xff", b'{"path":"x"}'],
])
def test_decode_reply_rejects(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        wire.decode_reply(frames)


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"qid":1}', GOLDEN_ENVELOPE[:-2],
                                 GOLDEN_ENVELOPE.replace(b'"fast"', b'"slow"')])
def test_decode_envelope_rejects(raw: bytes) -> None:
    with pytest.raises(WireError):
        Envelope.decode(raw)


def test_qids_unique_and_sortable() -> None:
    qids = [wire.new_qid(1700000000.0 + i / 1000) for i in range(2000)]
    assert len(set(qids)) == 2000
    assert qids == sorted(qids)
    assert all(len(q) == 23 and q.isalnum() for q in qids)


@pytest.mark.parametrize(("raw", "ok"), [(b"0", True), (b"1000000", True), (b"-1", False),
                                         (b"1000001", False), (b"x", False)])
def test_int_frame(raw: bytes, ok: bool) -> None:
    if ok:
        assert wire.int_frame(raw) == int(raw)
    else:
        with pytest.raises(WireError):
            wire.int_frame(raw)


def test_qid_keeps_the_whole_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes whose pids differ only above bit 20 (pid_max reaches 2**22) must not be
    able to produce the same qid in the same millisecond (issue 9 item 11)."""
    qids = set()
    for pid in (0x00001, 0x100001, 0x200001, 0x7FFFFFFF):
        monkeypatch.setattr(wire.os, "getpid", lambda pid=pid: pid)
        monkeypatch.setattr(wire, "_seq", __import__("itertools").count())
        qids.add(wire.new_qid(1700000000.0))
    assert len(qids) == 4
    assert all(len(q) == 23 and q.isalnum() for q in qids)


def test_worker_hello_carries_a_dedicated_tier() -> None:
    assert wire.worker_hello(wire.ready(8)) == (8, "")
    assert wire.worker_hello(wire.ready(8, "self-proven")) == (8, "self-proven")
    assert wire.worker_hello(wire.heartbeat(3, "self-proven")) == (3, "self-proven")
    assert wire.worker_hello(wire.heartbeat(3)) == (3, "")
    for bad in ([b"SI2", b"READY"], [b"SI2", b"READY", b"8", b"x", b"y"],
                [b"SI2", b"READY", b"-1"], [b"SI2", b"READY", b"lots"]):
        with pytest.raises(WireError):
            wire.worker_hello(bad)


def test_send_now_and_recv_now_carry_a_message_whole() -> None:
    """The processes' one way to send and take a message: every frame, in order, as one
    message; None when nothing waits; zmq.Again (nothing sent) when the peer's queue is full."""
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://wire-io")
        b.connect("inproc://wire-io")
        assert wire.recv_now(b) is None
        msgs = [wire.work(b"acceptor", b"{}", b"x" * 100_000), wire.disconnect(), [b"one"]]
        for m in msgs:
            wire.send_now(a, m)
        assert [wire.recv_now(b) for _ in msgs] == msgs
        assert wire.recv_now(b) is None
        lonely = ctx.socket(zmq.DEALER)      # no peer: nowhere to queue
        with pytest.raises(zmq.Again):
            wire.send_now(lonely, wire.disconnect())
        for s in (a, b, lonely):
            s.close(linger=0)
    finally:
        ctx.term()
