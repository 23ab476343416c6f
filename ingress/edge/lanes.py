"""The acceptor's lane clients: one DEALER per lane broker, and the lane status and shared
facts the brokers publish.

API:
    LaneClient(zctx, cfg, lane, ident, node=None)   DEALER to one lane broker: the local one
                                         (ipc://), or a lanes node's (tcp:// + CURVE)
        try_send(frames) -> bool         hand off now, or False (no connected broker); every
                                         send to the broker (messages, shared facts)
        await_reply(qid, timeout) -> (Reply | None, why)   None: no ack in time
        read_replies() / watch_broker()   background tasks (acks; a lost broker fails its
                                          messages at once)
        stop_reading()                   unregister read_replies' reader (Lanes.close)
        fresh() / saturated() / cap_spent()   by the broker's fresh status (STATUS_STALE)
        over_rate                        the domains its last status named over their rate
    Lanes(cfg, ident)                    the clients of one acceptor, its share of the bulk cap;
                                         with cluster.role "edge", one client per lane and
                                         lanes node (cluster.lanes_nodes)
        submit(env, body) -> (Reply | None, why)      to the envelope's lane, smtp.ack_timeout;
                                         a fast message NACKed share (its identity, or its trust
                                         tier, is at its share of the fast queue, credit or
                                         rate) is served as bulk: resubmitted
                                         to the bulk lane (whose cap applies) within the same
                                         deadline
        order(lane) -> [LaneClient]      failover order: live, unsaturated, least loaded, in turn
        lane_saturated(lane) -> bool     stress: bulk broker saturated or the bulk cap spent
        over_rate(key) -> bool           every live fast broker names this domain identity over
                                         classify.domain_rate (keep its sessions bulk)
        bulk_mail_admitted() -> bool     may a bulk session start a transaction now (spends a
                                         token of this acceptor's share of the bulk cap)
        retry_mail_admitted() -> bool    may a claimed retry of a deferred transaction start
                                         now (spends a token of this acceptor's part of the
                                         retry share, admission.retry_share; not while the
                                         bulk broker(s) cannot take work)
        local_share(edges)               resize that share for `edges` edges (the fallback
                                         while Redis is down, [cluster] redis)
        share_penalty(ip)                tell every other acceptor (via the bulk broker(s))
        share_record(fact, doc)          a deferral record fact, likewise (wire.RECORD_FACTS)
        read_status(on_learn, on_penalty, on_record=None, on_unlearn=None)  background
                                         task: status and shared facts over SUB (one per lanes
                                         node; on_learn(ip, domain, provider): the domain it was
                                         learned for, the provider to learn with it ("" none);
                                         on_unlearn(ip, provider): forget the ip's learned
                                         entry, and the provider's when one is named)
        tasks() -> coroutines            the background tasks of the clients
        close()                          destroys the ZeroMQ context

Failover (several lanes nodes): a message goes to the first broker in order() that takes it
now (IMMEDIATE: a dead node's DEALER has no pipe, its send fails at once; a node whose status
is stale is tried last). Once handed off, it is never resent elsewhere: a broker lost
meanwhile (disconnect) or no ack within the deadline is a 451, never a loss and never a 250
without the worker's durable write.

Failure modes: a lanes node that refuses our CURVE handshake (our key not allowed there, or a
wrong public key for it in cluster.lanes_nodes) is logged once (lanes_handshake_failed) until
a handshake succeeds; no broker of the lane connected fails a send after HANDOFF_RETRY (the session
gets 451); a malformed reply, status or fact is logged (wire_error) and skipped; a penalty
or deferral record that cannot be shared (ZMQError) stays local; record facts ride the bulk
broker's PUB (SNDHWM 10), so under a flood some may be dropped: a record then stays local to the
acceptor that made it, and the retry share still bounds what that gives away.
Limits: SNDHWM 200 / RCVHWM 2000 per DEALER; status older than STATUS_STALE is ignored, so a
dead broker never makes us shed on old news.
With several lanes nodes each broker has its own bulk bucket: the bulk cap is per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ingress.core import child, cluster, log
from ingress.core.config import Config
from ingress.core.derived import bulk_share_bucket, retry_buckets
from ingress.core.ratelimit import TokenBucket
from ingress.core.wire import (
    LEARN_TOPIC,
    PENALTY_TOPIC,
    RECORD_FACTS,
    SHARED_FACTS,
    STATUS_STALE,
    STATUS_TOPIC,
    UNLEARN_TOPIC,
    Envelope,
    Lane,
    NackReason,
    Reply,
    WireError,
    decode_record,
    decode_reply,
    decode_shared,
    decode_status,
    recv_now,
    send_now,
    share,
    share_record,
    shared_provider,
    status_key,
    submit,
)
from ingress.policy.identity import over_share_reason
from ingress.policy.tiers import fast_tier, over_tier_reason

OVER_RATE_READ = 1024        # at most this many over-rate domains read from one status
HANDOFF_RETRY = 1.5          # seconds to keep trying to reach a broker that is not connected
# plain ints: zmq's constants are enum.Flag / IntEnum members, and `int & PollEvent` runs
# enum's Python operators (several times per message)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class LaneClient:
    """One DEALER to a lane broker (of one lanes node), with the futures of messages waiting
    for their ack."""

    def __init__(self, ctx: zmq.asyncio.Context, cfg: Config, lane: Lane, ident: str,
                 node: cluster.Node | None = None) -> None:
        self.lane = lane
        self.node = node
        self.where = node.base if node is not None else "local"
        # A plain socket, not a zmq.asyncio one: its future machinery cost a Future, a kwargs
        # copy and a loop callback per message. Sends never block (NOBLOCK, IMMEDIATE) and
        # the replies are read by read_replies' own reader of the socket's FD.
        s = cast("zmq.Socket[bytes]",
                 ctx.socket(zmq.DEALER, socket_class=zmq.Socket))  # type: ignore[arg-type]
        # Unique across hosts too: two edges' acceptors may share index and pid (containers),
        # and a lanes node's ROUTER refuses a second peer with a routing id it already has.
        s.setsockopt(zmq.ROUTING_ID, f"{ident}-{lane.value}-{os.urandom(6).hex()}".encode())
        s.setsockopt(zmq.IMMEDIATE, 1)     # no peer: fail the send now, never queue blindly
        s.setsockopt(zmq.SNDHWM, 200)
        s.setsockopt(zmq.RCVHWM, 2000)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        if node is None:
            s.connect(cfg.ipc(f"{lane.value}-front"))
        else:
            cluster.curve_client(s, cfg, node.public)
            s.connect(cluster.endpoint(node.base, lane.value, "front"))
        self.sock = s
        self.ctx = ctx
        self.reading: asyncio.AbstractEventLoop | None = None   # read_replies' loop, while on
        self.pending: dict[str, asyncio.Future[Reply]] = {}
        self.facts = status_key({})                    # what its last status said
        self.status_at = 0.0
        self.over_rate: frozenset[str] = frozenset()   # the status's over_rate domains

    def try_send(self, frames: list[bytes]) -> bool:
        """Hand the frames to the broker now, or False (no connected broker: IMMEDIATE; or
        its queue full: SNDHWM). Every send to the broker goes through here."""
        sock = self.sock
        try:
            send_now(sock, frames)
            sent = True
        except zmq.Again:
            sent = False
        # The socket's FD is edge-triggered and a send (done or not) may consume the edge of a
        # reply that arrived meanwhile: look now, and read it (next turn of the loop) if so.
        if self.reading is not None and cast(int, sock.get(_EVENTS)) & _POLLIN:
            self.reading.call_soon(self._read_ready)
        return sent

    async def await_reply(self, qid: str, timeout: float) -> tuple[Reply | None, str]:
        """After a hand-off: the broker's reply within `timeout`, or (None, "ack timeout")."""
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[qid] = fut
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows the session's
            # cancellation (client gone) when the ack arrives at the same moment, and the
            # session then reads on at EOF (IncompleteReadError, a traceback in the log).
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError:
            return None, "ack timeout"
        finally:
            self.pending.pop(qid, None)
        return reply, "" if reply.ok else (reply.reason or "nack")

    async def read_replies(self) -> None:
        """The broker's replies, until cancelled: read whenever the socket's FD fires (and
        after a send, try_send), each resolving the future of the message it answers."""
        loop = asyncio.get_running_loop()
        fd = self.sock.FD
        loop.add_reader(fd, self._read_ready)
        self.reading = loop
        try:
            self._read_ready()                      # what came before the reader was there
            await loop.create_future()              # never done: until cancelled
        finally:
            self.stop_reading()

    def stop_reading(self) -> None:
        """Unregister the reader (before the socket closes: Lanes.close)."""
        if self.reading is not None and not self.sock.closed:
            self.reading.remove_reader(self.sock.FD)
        self.reading = None

    def _read_ready(self) -> None:
        sock = self.sock
        while not sock.closed and cast(int, sock.get(_EVENTS)) & _POLLIN:
            frames = recv_now(sock)
            if frames is None:
                break
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
        them; a client retry then makes a duplicate, never a loss (docs/design.md: Duplicates)."""
        addr = f"inproc://monitor.lanes-{id(self)}"
        self.sock.monitor(addr, zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                          | cluster.HANDSHAKE_FAILURES)
        mon = self.ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.LINGER, 0)
        mon.connect(addr)
        refused = False         # the lanes node refuses our handshake: said once, not per retry
        while True:
            ev = await recv_monitor_message(mon)
            event = int(ev["event"])
            if event & cluster.HANDSHAKE_FAILURES:
                if not refused:
                    log.event("lanes_handshake_failed", "error", lane=self.lane.value,
                              node=self.where, code=ev.get("value"),
                              why="the lanes node refuses us, or its public key is not the one "
                                  "in cluster.lanes_nodes")
                refused = True
                continue
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                refused = False
                continue
            lost = [f for f in self.pending.values() if not f.done()]
            for fut in lost:
                fut.set_result(Reply(qid="", ok=False, reason=NackReason.WORKER_LOST,
                                     text="broker lost"))
            log.event("broker_disconnected", "warning", lane=self.lane.value,
                      node=self.where, failed=len(lost))

    def fresh(self) -> bool:
        """The broker published its status lately (a live lanes node)."""
        return time.monotonic() - self.status_at < STATUS_STALE

    def saturated(self) -> bool:
        """The broker cannot take work (queue nearly full, no workers), by fresh news."""
        return self.fresh() and self.facts.saturated

    def cap_spent(self) -> bool:
        """The broker's rate bucket was empty at its last publication."""
        return self.fresh() and self.facts.cap_spent


class Lanes:
    """The lane clients of one acceptor process: one per lane on one host (role all), one per
    lane and lanes node on an edge (cluster.lanes_nodes)."""

    def __init__(self, cfg: Config, ident: str) -> None:
        self.cfg = cfg
        self.zctx = child.quiet_io_threads(zmq.asyncio.Context())
        self.nodes: list[cluster.Node | None] = (
            list(cluster.nodes(cfg)) if cfg.cluster.role == "edge" else [None])
        self.clients = {lane: [LaneClient(self.zctx, cfg, lane, ident, node)
                               for node in self.nodes] for lane in Lane}
        self.turn = 0                 # round robin among equally loaded lanes nodes
        bulk_share = bulk_share_bucket(cfg)
        self.bulk_bucket = TokenBucket(*bulk_share, now=time.monotonic()) \
            if bulk_share is not None else None
        retry = retry_buckets(cfg)
        self.retry_bucket = TokenBucket(*retry[0], now=time.monotonic()) \
            if retry is not None else None

    def values(self) -> list[LaneClient]:
        return [lc for lcs in self.clients.values() for lc in lcs]

    def lane_saturated(self, lane: Lane) -> bool:
        """Stress: the bulk broker cannot take work, or the bulk cap (ours or the broker's) is
        spent (on every lanes node)."""
        if lane is not Lane.BULK:
            return False
        if self.bulk_bucket is not None and self.bulk_bucket.tokens(time.monotonic()) < 1.0:
            return True
        return all(lc.saturated() or lc.cap_spent() for lc in self.clients[lane])

    def over_rate(self, key: str) -> bool:
        """Is this domain identity (share key) over classify.domain_rate on every live fast
        broker? Then its sessions stay bulk (each lanes node holds its own bucket per domain,
        and a message goes to whichever is first in order()). No live fast broker: no."""
        live = [lc for lc in self.clients[Lane.FAST] if lc.fresh()]
        return bool(live) and all(key in lc.over_rate for lc in live)

    def local_share(self, edges: int) -> None:
        """Resize this acceptor's share of the bulk cap for `edges` edges sharing it (the
        fallback while the shared bucket in Redis is out of reach: ingress.edge.cluster_state)."""
        share = bulk_share_bucket(self.cfg, edges)
        if self.bulk_bucket is not None and share is not None:
            self.bulk_bucket.rate, self.bulk_bucket.burst = share

    def bulk_mail_admitted(self) -> bool:
        """May a bulk session start a transaction now? Each acceptor holds a share of the bulk
        cap (BULK_SHARE / acceptors of it) and spends it at a transaction's first RCPT TO, so
        the excess is shed before DATA without waiting for the broker's news; the broker's own
        bucket enforces the cap exactly after DATA."""
        if all(lc.saturated() for lc in self.clients[Lane.BULK]):
            return False
        return self.bulk_bucket is None or self.bulk_bucket.take(time.monotonic())

    def retry_mail_admitted(self) -> bool:
        """May a retry of a transaction we deferred start now, the bulk cap being spent? Only
        within this acceptor's part of the retry share (none when it is off or bulk uncapped),
        and never while no bulk broker can take work at all."""
        if self.retry_bucket is None or all(lc.saturated() for lc in self.clients[Lane.BULK]):
            return False
        return self.retry_bucket.take(time.monotonic())

    def order(self, lane: Lane) -> list[LaneClient]:
        """The lane's clients, best first: live (fresh status) before stale, unsaturated
        before saturated, fewest messages awaiting an ack first, ties taken in turn."""
        lcs = self.clients[lane]
        if len(lcs) == 1:
            return lcs
        self.turn = (self.turn + 1) % len(lcs)
        turned = lcs[self.turn:] + lcs[:self.turn]
        return sorted(turned, key=lambda lc: (not lc.fresh(), lc.saturated(), len(lc.pending)))

    async def submit(self, env: Envelope, body: bytes) -> tuple[Reply | None, str]:
        """Hand the message to one broker of its lane (the first of order() that is connected)
        and wait for its reply, within smtp.ack_timeout. No broker connected: try again
        briefly (one restarting), then (None, "lane unavailable"). A message is handed to one
        broker only: after the hand-off, a lost broker or no ack is a 4xx, never a resend
        (except a fast message NACKed share: nothing was queued; it is served as bulk)."""
        timeout = self.cfg.smtp.ack_timeout
        start = time.monotonic()
        reply, why = await self._submit_once(env, body, timeout)
        if env.lane is Lane.FAST and reply is not None and reply.reason is NackReason.SHARE:
            identity = env.evidence.identity
            log.throttled("over_share", env.peer_ip, qid=env.qid, identity=identity,
                          served="bulk")
            # the fast broker says which: the identity's share, or its whole tier's
            why = over_tier_reason(fast_tier(identity)) if reply.text.startswith("tier") \
                else over_share_reason(identity)
            evidence = replace(env.evidence, identity="", reasons=(*env.evidence.reasons, why))
            bulk = replace(env, lane=Lane.BULK, evidence=evidence)
            reply, why = await self._submit_once(
                bulk, body, max(0.1, timeout - (time.monotonic() - start)))
        return reply, why

    async def _submit_once(self, env: Envelope, body: bytes,
                           timeout: float) -> tuple[Reply | None, str]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        frames = submit(env, body)
        while True:
            for lc in self.order(env.lane):
                if lc.try_send(frames):
                    return await lc.await_reply(env.qid, timeout - (loop.time() - start))
            if loop.time() - start > min(HANDOFF_RETRY, timeout / 2):
                return None, "lane unavailable"
            await asyncio.sleep(0.05)

    def share_penalty(self, ip: str) -> None:
        for lc in self.clients[Lane.BULK]:
            with contextlib.suppress(zmq.ZMQError):
                lc.try_send(share(PENALTY_TOPIC, ip))

    def share_record(self, fact: bytes, doc: dict[str, object]) -> None:
        """To one bulk broker (the best live one): every acceptor of every edge subscribes to
        every lanes node, so one copy reaches all, and a record is not counted twice."""
        for lc in self.order(Lane.BULK):
            try:
                if lc.try_send(share_record(fact, doc)):
                    return
            except zmq.ZMQError:
                continue

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [*(lc.read_replies() for lc in self.values()),
                *(lc.watch_broker() for lc in self.values())]

    def close(self) -> None:
        for lc in self.values():
            lc.stop_reading()
        self.zctx.destroy(linger=0)

    async def read_status(self, on_learn: Callable[[str, str, str], None],
                          on_penalty: Callable[[str], None],
                          on_record: Callable[[bytes, dict[str, object]], None] | None = None,
                          on_unlearn: Callable[[str, str], None] | None = None,
                          ) -> None:
        """Status and shared facts from every lanes node (one SUB each), until cancelled."""
        await asyncio.gather(*(self._read_node_status(i, on_learn, on_penalty, on_record,
                                                      on_unlearn)
                               for i in range(len(self.nodes))))

    async def _read_node_status(self, i: int, on_learn: Callable[[str, str, str], None],
                                on_penalty: Callable[[str], None],
                                on_record: Callable[[bytes, dict[str, object]], None] | None,
                                on_unlearn: Callable[[str, str], None] | None = None,
                                ) -> None:
        node = self.nodes[i]
        sub = self.zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 10)
        sub.setsockopt(zmq.SUBSCRIBE, STATUS_TOPIC)
        for topic in SHARED_FACTS + (RECORD_FACTS if on_record is not None else ()):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        if node is not None:
            cluster.curve_client(sub, self.cfg, node.public)
        for lane in Lane:
            sub.connect(self.cfg.ipc(f"{lane.value}-status") if node is None
                        else cluster.endpoint(node.base, lane.value, "status"))
        while True:
            frames = await sub.recv_multipart()
            if on_record is not None and frames and frames[0] in RECORD_FACTS:
                _apply_record(frames, on_record)
                continue
            if frames and frames[0] in SHARED_FACTS:
                _apply_fact(frames, on_learn, on_penalty, on_unlearn)
                continue
            try:
                doc = decode_status(frames)
                lc = self.clients[Lane(str(doc["lane"]))][i]
            except (WireError, KeyError, ValueError) as e:
                log.event("wire_error", "warning", side="status", error=str(e))
                continue
            lc.facts, lc.status_at = status_key(doc), time.monotonic()
            lc.over_rate = frozenset(str(k) for k in lc.facts.over_rate[:OVER_RATE_READ])


def _apply_fact(frames: list[bytes], on_learn: Callable[[str, str, str], None],
                on_penalty: Callable[[str], None],
                on_unlearn: Callable[[str, str], None] | None) -> None:
    """A fact about a client from a lane broker: decoded and applied, or logged and skipped."""
    try:
        fact, ip, domain = decode_shared(frames)
        provider = shared_provider(frames)
    except WireError as e:
        log.event("wire_error", "warning", side="fact", error=str(e))
        return
    if fact == LEARN_TOPIC:
        on_learn(ip, domain, provider)
    elif fact == UNLEARN_TOPIC:
        if on_unlearn is not None:
            on_unlearn(ip, provider)
    else:
        on_penalty(ip)


def _apply_record(frames: list[bytes], on_record: Callable[[bytes, dict[str, object]], None],
                  ) -> None:
    """A deferral record fact from the bulk broker: decoded, or logged and skipped."""
    try:
        fact, doc = decode_record(frames)
    except WireError as e:
        log.event("wire_error", "warning", side="record", error=str(e))
        return
    on_record(fact, doc)
