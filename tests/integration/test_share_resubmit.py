"""An acceptor serves a fast message as bulk when the fast broker NACKs it share (its identity
is at its share of the fast queue, issue 8): ingress.edge.lanes.Lanes resubmits it to the bulk lane,
whose cap applies, within the same ack deadline. The acceptor side is real (Lanes, its DEALERs);
the two brokers are stand-ins (ROUTER sockets on the lanes' ipc addresses) because the test is
about the acceptor's answer to a NACK, not the broker (test_broker_identity.py)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import orjson
import zmq
import zmq.asyncio

from ingress.core import config
from ingress.core.wire import (
    Envelope,
    Kind,
    Lane,
    NackReason,
    WireEvidence,
    ack_detail,
    expect,
    kind_of,
    nack_detail,
    new_qid,
    to_acceptor,
)
from ingress.edge.lanes import Lanes


def test_fast_message_over_its_share_is_served_as_bulk() -> None:
    state = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))
    try:
        f = state / "c.toml"
        f.write_text(f'[spool]\nstate_dir = "{state}"\npath = "{state / "spool"}"\n'
                     '[lanes.bulk]\nrate = 0.0\n')
        cfg = config.load(f)
        asyncio.run(scenario(cfg))
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def scenario(cfg: config.Config) -> None:
    lanes = Lanes(cfg, "a0")
    routers = {}
    for lane in Lane:
        r = lanes.zctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        Path(cfg.ipc(f"{lane.value}-front")[len("ipc://"):]).parent.mkdir(parents=True,
                                                                          exist_ok=True)
        r.bind(cfg.ipc(f"{lane.value}-front"))
        routers[lane] = r
    seen: dict[Lane, list[dict]] = {Lane.FAST: [], Lane.BULK: []}

    async def broker(lane: Lane) -> None:
        r = routers[lane]
        while True:
            to, *msg = await r.recv_multipart()
            assert kind_of(msg) is Kind.SUBMIT
            env_raw, _body = expect(msg, 2)
            env = orjson.loads(env_raw)
            seen[lane].append(env)
            qid = str(env["qid"]).encode()
            if lane is Lane.FAST:
                detail = nack_detail(NackReason.SHARE, "identity over its share")
                await r.send_multipart([to, *to_acceptor(Kind.NACK, qid, detail)])
            else:
                await r.send_multipart([to, *to_acceptor(Kind.ACK, qid, ack_detail("p"))])

    tasks = [asyncio.create_task(c) for c in (*lanes.tasks(), broker(Lane.FAST),
                                              broker(Lane.BULK))]
    try:
        await asyncio.sleep(0.3)      # DEALERs connected
        now = time.time()
        env = Envelope(qid=new_qid(now), lane=Lane.FAST, peer_ip="127.0.1.1", peer_port=1,
                       helo="h", mail_from="x@spammer.test", rcpts=("b@example.test",),
                       received_at=now, deadline=now + 5,
                       evidence=WireEvidence(identity="org:spammer.test",
                                             reasons=("spf-pass:x",)))
        reply, why = await lanes.submit(env, b"Subject: s\r\n\r\nx\r\n")
        assert reply is not None and reply.ok, why
        assert [e["lane"] for e in seen[Lane.FAST]] == ["fast"]
        assert len(seen[Lane.BULK]) == 1
        bulk = seen[Lane.BULK][0]
        assert bulk["lane"] == "bulk" and bulk["qid"] == env.qid
        assert "identity" not in bulk["evidence"]
        assert WireEvidence.from_wire(bulk["evidence"]) == WireEvidence(
            reasons=("spf-pass:x", "over-share:org:spammer.test"))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lanes.close()
