"""The acceptor's lane clients: one DEALER per lane broker, and the lane status and shared
facts the brokers publish.

API:
    LaneClient(zctx, cfg, lane, ident)   DEALER to one lane broker
        submit(env, body, timeout) -> (Reply | None, why)   None: not handed off or no ack in time
        read_replies() / watch_broker()   background tasks (acks; a lost broker fails its
                                          messages at once)
        saturated() / cap_spent()         by the broker's fresh status (STATUS_STALE)
    Lanes(cfg, ident)                    the clients of one acceptor, its share of the bulk cap
        submit(env, body) -> (Reply | None, why)      to the envelope's lane, smtp.ack_timeout;
                                         a fast message NACKed share (its identity is at its
                                         share of the fast queue) is served as bulk: resubmitted
                                         to the bulk lane (whose cap applies) within the same
                                         deadline
        lane_saturated(lane) -> bool     stress: bulk broker saturated or the bulk cap spent
        bulk_mail_admitted() -> bool     may a bulk session start a transaction now (spends a
                                         token of this acceptor's share of the bulk cap)
        share_penalty(ip)                tell every other acceptor (via the bulk broker)
        read_status(on_learn, on_penalty)  background task: status and shared facts over SUB
                                         (on_learn(ip, domain): the domain it was learned for)
        tasks() -> coroutines            the background tasks of the clients
        close()                          destroys the ZeroMQ context

Failure modes: a broker that is not connected fails a send after HANDOFF_RETRY (the session
gets 451); a malformed reply, status or fact is logged (wire_error) and skipped; a penalty
that cannot be shared (ZMQError) stays local. Limits: SNDHWM 200 / RCVHWM 2000 per DEALER;
status older than STATUS_STALE is ignored, so a dead broker never makes us shed on old news.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ingress.core import log
from ingress.core.config import Config
from ingress.core.ratelimit import TokenBucket
from ingress.core.wire import (
    LEARN_TOPIC,
    PENALTY_TOPIC,
    SHARED_FACTS,
    STATUS_STALE,
    STATUS_TOPIC,
    Envelope,
    Lane,
    NackReason,
    Reply,
    WireError,
    decode_reply,
    decode_shared,
    decode_status,
    share,
    submit,
)
from ingress.policy.admission import bulk_share_bucket
from ingress.policy.identity import over_share_reason

HANDOFF_RETRY = 1.5          # seconds to keep trying to reach a broker that is not connected


class LaneClient:
    """One DEALER to a lane broker, with the futures of messages waiting for their ack."""

    def __init__(self, ctx: zmq.asyncio.Context, cfg: Config, lane: Lane, ident: str) -> None:
        self.lane = lane
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, f"{ident}-{lane.value}".encode())
        s.setsockopt(zmq.IMMEDIATE, 1)     # no peer: fail the send now, never queue blindly
        s.setsockopt(zmq.SNDHWM, 200)
        s.setsockopt(zmq.RCVHWM, 2000)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.connect(cfg.ipc(f"{lane.value}-front"))
        self.sock = s
        self.pending: dict[str, asyncio.Future[Reply]] = {}
        self.status: dict[str, Any] = {}
        self.status_at = 0.0

    async def submit(self, env: Envelope, body: bytes, timeout: float) -> tuple[Reply | None, str]:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[env.qid] = fut
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            frames = submit(env, body)
            while True:      # no broker connected (e.g. restarting): retry the hand-off briefly
                try:
                    await self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    if loop.time() - start > min(HANDOFF_RETRY, timeout / 2):
                        return None, "lane unavailable"
                    await asyncio.sleep(0.05)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows the session's
                # cancellation (client gone) when the ack arrives at the same moment, and the
                # session then reads on at EOF (IncompleteReadError, a traceback in the log).
                async with asyncio.timeout(timeout - (loop.time() - start)):
                    reply = await fut
            except TimeoutError:
                return None, "ack timeout"
            return reply, "" if reply.ok else (reply.reason or "nack")
        finally:
            self.pending.pop(env.qid, None)

    async def read_replies(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                reply = decode_reply(frames)
            except WireError as e:
                log.event("wire_error", "warning", lane=self.lane.value, error=str(e))
                continue
            fut = self.pending.get(reply.qid)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def watch_broker(self) -> None:
        """A broker that dies takes the messages it held with it: answer their sessions now
        (451) instead of at the ack deadline. Some may still be spooled by a worker that had
        them; a client retry then makes a duplicate, never a loss (README: duplicates)."""
        mon = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        while True:
            await recv_monitor_message(mon)
            lost = [f for f in self.pending.values() if not f.done()]
            for fut in lost:
                fut.set_result(Reply(qid="", ok=False, reason=NackReason.WORKER_LOST,
                                     text="broker lost"))
            log.event("broker_disconnected", "warning", lane=self.lane.value, failed=len(lost))

    def saturated(self) -> bool:
        """The broker cannot take work (queue nearly full, no workers), by fresh news."""
        fresh = time.monotonic() - self.status_at < STATUS_STALE
        return fresh and bool(self.status.get("saturated"))

    def cap_spent(self) -> bool:
        """The broker's rate bucket was empty at its last publication."""
        tokens = self.status.get("tokens")
        fresh = time.monotonic() - self.status_at < STATUS_STALE
        return fresh and isinstance(tokens, int | float) and tokens < 1.0


class Lanes:
    """The lane clients of one acceptor process."""

    def __init__(self, cfg: Config, ident: str) -> None:
        self.cfg = cfg
        self.zctx = zmq.asyncio.Context()
        self.clients = {lane: LaneClient(self.zctx, cfg, lane, ident) for lane in Lane}
        bulk_share = bulk_share_bucket(cfg)
        self.bulk_bucket = TokenBucket(*bulk_share, now=time.monotonic()) \
            if bulk_share is not None else None

    def __getitem__(self, lane: Lane) -> LaneClient:
        return self.clients[lane]

    def values(self) -> list[LaneClient]:
        return list(self.clients.values())

    def lane_saturated(self, lane: Lane) -> bool:
        """Stress: the bulk broker cannot take work, or the bulk cap (ours or the broker's) is
        spent."""
        if lane is not Lane.BULK:
            return False
        if self.bulk_bucket is not None and self.bulk_bucket.tokens(time.monotonic()) < 1.0:
            return True
        return self.clients[lane].saturated() or self.clients[lane].cap_spent()

    def bulk_mail_admitted(self) -> bool:
        """May a bulk session start a transaction now? Each acceptor holds a share of the bulk
        cap (BULK_SHARE / acceptors of it) and spends it at MAIL FROM, so the excess is shed
        before DATA without waiting for the broker's news; the broker's own bucket enforces
        the cap exactly after DATA."""
        if self.clients[Lane.BULK].saturated():
            return False
        return self.bulk_bucket is None or self.bulk_bucket.take(time.monotonic())

    async def submit(self, env: Envelope, body: bytes) -> tuple[Reply | None, str]:
        timeout = self.cfg.smtp.ack_timeout
        start = time.monotonic()
        reply, why = await self.clients[env.lane].submit(env, body, timeout)
        if env.lane is Lane.FAST and reply is not None and reply.reason is NackReason.SHARE:
            identity = env.evidence.get("identity", "")
            log.event("over_share", qid=env.qid, peer=env.peer_ip, identity=identity,
                      served="bulk")
            evidence = {k: v for k, v in env.evidence.items() if k != "identity"}
            evidence["reasons"] = ",".join(
                filter(None, (evidence.get("reasons", ""), over_share_reason(identity))))
            bulk = replace(env, lane=Lane.BULK, evidence=evidence)
            reply, why = await self.clients[Lane.BULK].submit(
                bulk, body, max(0.1, timeout - (time.monotonic() - start)))
        return reply, why

    def share_penalty(self, ip: str) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.clients[Lane.BULK].sock.send_multipart(share(PENALTY_TOPIC, ip), zmq.NOBLOCK)

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [*(lc.read_replies() for lc in self.clients.values()),
                *(lc.watch_broker() for lc in self.clients.values())]

    def close(self) -> None:
        self.zctx.destroy(linger=0)

    async def read_status(self, on_learn: Callable[[str, str], None],
                          on_penalty: Callable[[str], None]) -> None:
        sub = self.zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 10)
        sub.setsockopt(zmq.SUBSCRIBE, STATUS_TOPIC)
        for topic in SHARED_FACTS:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        for lane in Lane:
            sub.connect(self.cfg.ipc(f"{lane.value}-status"))
        while True:
            frames = await sub.recv_multipart()
            if frames and frames[0] in SHARED_FACTS:
                try:
                    fact, ip, domain = decode_shared(frames)
                except WireError as e:
                    log.event("wire_error", "warning", side="fact", error=str(e))
                    continue
                if fact == LEARN_TOPIC:
                    on_learn(ip, domain)
                else:
                    on_penalty(ip)
                continue
            try:
                doc = decode_status(frames)
                lc = self.clients[Lane(str(doc["lane"]))]
            except (WireError, KeyError, ValueError) as e:
                log.event("wire_error", "warning", side="status", error=str(e))
                continue
            lc.status, lc.status_at = doc, time.monotonic()
