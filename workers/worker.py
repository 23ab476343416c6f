"""Lane worker process: DKIM, trace headers, durable spool write (group commit), then ACK.

API: run(cfg, lane, index, hb, slot)  the process entry point (spawned by the supervisor)

Protocol (see ingress.core.wire): a DEALER connected to the lane broker's backend. The worker
announces READY with `credit` (how many messages the broker may hand it at once), heartbeats every
LANE_HEARTBEAT seconds, and answers every WORK with exactly one ACK (after the spool write is
durable) or NACK. Messages that arrive together are committed together: one fsync per file, one
fsync of new/ for the batch, then all the ACKs. The work (pipeline per message, then the batch
write) runs in pool threads while this loop waits and keeps heartbeating, so neither slow DKIM
nor a slow disk makes the broker NACK a batch that is being stored (issue 9 item 6).

Failure modes: a broker that stops heartbeating for LANE_LIVENESS intervals is presumed dead: the
worker reconnects with a fresh socket and announces READY again (Paranoid Pirate), at once and
then after 1, 2, 4 ... 32 s while the broker stays silent (ingress.core.child.Reconnect; the loop
keeps heartbeating meanwhile; the first message from the broker resets it). A disk error is
a NACK with reason "error" for that message (the client gets 451). SIGUSR2 (the supervisor): stop
taking work (DISCONNECT), finish what was received, exit 0. The supervisor's heartbeat slot is
written from this loop, and only while the batch in hand is within its deadline (the latest
envelope deadline plus one liveness window): work that outlives it is presumed hung, the
heartbeats stop, the broker NACKs the batch and the supervisor restarts the worker if it stays
stuck (e.g. a hung disk). Limit: a single C call that holds the GIL longer than the liveness
window (1 s) would still silence the loop; DKIM key limits (workers.dkim_check) keep RSA well
under that.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from typing import Any

import orjson
import zmq

from ingress.core import child, log, metrics
from ingress.core.child import Heartbeat, Reconnect
from ingress.core.config import Config
from ingress.core.wire import (
    LANE_HEARTBEAT,
    LANE_LIVENESS,
    LEARN_TOPIC,
    Envelope,
    Kind,
    Lane,
    NackReason,
    WireError,
    disconnect,
    expect,
    heartbeat,
    kind_of,
    ready,
    share,
    worker_ack,
    worker_nack,
)
from workers.pipeline import Pipeline
from workers.spool import Spool

TMP_MAX_AGE = 60.0
STOP_POLL = 0.1       # seconds: the longest a stop waits for a poll to return


class Worker:
    def __init__(self, cfg: Config, lane: Lane, index: int, hb: Any = None, slot: int = 0) -> None:
        self.cfg, self.lane, self.index = cfg, lane, index
        self.heart = Heartbeat(hb, slot)
        self.reconnect = Reconnect()       # 1 -> 32 s between reconnects to a silent broker
        self.credit = getattr(cfg.lanes, lane.value).credit
        self.spool = Spool(cfg.spool.path)
        self.pipeline = Pipeline(cfg)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.credit,
                                                          thread_name_prefix="dkim")
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock: zmq.Socket[bytes] | None = None
        self.stopping = False
        self.ident = f"w-{lane.value}-{index}-{os.getpid()}".encode()

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        s: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, self.ident + b"-" + str(time.monotonic_ns()).encode())
        s.setsockopt(zmq.LINGER, 1000)
        s.setsockopt(zmq.SNDHWM, 10 * self.credit + 100)
        s.setsockopt(zmq.RCVHWM, 10 * self.credit + 100)
        s.connect(self.cfg.ipc(f"{self.lane.value}-back"))
        s.send_multipart(ready(self.credit))
        self.sock = s

    def _heartbeat(self) -> None:
        """To the broker (lane liveness) and to the supervisor (hang detection)."""
        assert self.sock is not None
        with contextlib.suppress(zmq.Again):
            self.sock.send_multipart(heartbeat(self.credit), zmq.NOBLOCK)
        self.heart.beat()

    def run(self) -> None:
        # A file lives in tmp/ for the milliseconds of its write; one older than a minute was
        # left by a worker killed mid-write and was never acknowledged.
        self.spool.clean_tmp(older_than=time.time() - TMP_MAX_AGE)
        self._connect()
        assert self.sock is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        broker_seen = time.monotonic()
        next_hb = 0.0
        while not self.stopping:
            now = time.monotonic()
            if self.heart.orphaned():
                break
            if now >= next_hb:
                self._heartbeat()
                next_hb = now + LANE_HEARTBEAT
            # Woken at least every STOP_POLL: a stop (a flag set by the signal handler, which
            # does not interrupt zmq's poll) is seen within it.
            if not dict(poller.poll(timeout=int(min(LANE_HEARTBEAT, STOP_POLL) * 1000))):
                now = time.monotonic()
                if (now - broker_seen > LANE_HEARTBEAT * LANE_LIVENESS
                        and self.reconnect.due(now)):
                    wait = self.reconnect.attempted(now)
                    log.event("broker_silent", "warning", lane=self.lane.value,
                              next_reconnect_s=wait)
                    poller.unregister(self.sock)
                    self._connect()
                    poller.register(self.sock, zmq.POLLIN)
                    broker_seen = time.monotonic()
                continue
            broker_seen = time.monotonic()
            self.reconnect.reset()
            self._handle(self._drain())
        self._shutdown()

    def _drain(self) -> list[list[bytes]]:
        """Everything already received, up to the credit: the group-commit batch."""
        assert self.sock is not None
        msgs: list[list[bytes]] = []
        while len(msgs) < self.credit:
            try:
                msgs.append(self.sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        return msgs

    def _handle(self, msgs: list[list[bytes]]) -> None:
        """One batch: decode the work, process it (DKIM, trace headers), spool what may still
        be accepted in one group commit, and ACK or NACK every job."""
        jobs = self._decode_jobs(msgs)
        if not jobs:
            return
        batch = self._spoolable(jobs, self._process(jobs))
        if not batch:
            return
        self._spool_batch(batch)

    def _decode_jobs(self, msgs: list[list[bytes]]) -> list[tuple[bytes, Envelope, bytes]]:
        """The WORK messages as (reply_to, envelope, body); a bad envelope is NACKed, any
        other malformed message is logged and dropped."""
        assert self.sock is not None
        jobs: list[tuple[bytes, Envelope, bytes]] = []
        for frames in msgs:
            try:
                kind = kind_of(frames)
                if kind is not Kind.WORK:
                    continue      # HEARTBEAT from the broker: liveness already noted
                reply_to, env_raw, body = expect(frames, 3)
            except WireError as e:
                log.event("wire_error", "warning", error=str(e))
                continue
            try:
                env = Envelope.decode(env_raw)
            except WireError as e:
                log.event("wire_error", "warning", error=str(e))
                self._send(worker_nack(reply_to, _qid_guess(env_raw), NackReason.ERROR,
                                       "bad envelope"))
                continue
            jobs.append((reply_to, env, body))
        return jobs

    def _spoolable(self, jobs: list[tuple[bytes, Envelope, bytes]],
                   processed: list[Any]) -> list[tuple[bytes, bytes, Envelope, Any]]:
        """The processed jobs to spool, as (reply_to, qid, envelope, processed); a failed or
        expired one is NACKed here."""
        batch = []
        wall = time.time()
        for (reply_to, env, _), done in zip(jobs, processed, strict=True):
            qid = env.qid.encode()
            if isinstance(done, BaseException):
                log.get().error("pipeline_error", exc_info=done,
                                extra={"fields": {"qid": env.qid}})
                self._send(worker_nack(reply_to, qid, NackReason.ERROR, "processing failed"))
            elif env.deadline <= wall:
                # The acceptor has already answered 451: writing it now would only make a
                # duplicate when the client retries.
                self._send(worker_nack(reply_to, qid, NackReason.EXPIRED, "too late"))
            else:
                batch.append((reply_to, qid, env, done))
        return batch

    def _spool_batch(self, batch: list[tuple[bytes, bytes, Envelope, Any]]) -> None:
        """One group commit for the batch, then the ACK (or the NACK) of each message."""
        t0 = time.monotonic()
        items = [(env, p.trace, p.body) for _, _, env, p in batch]
        write = self.pool.submit(self.spool.write_batch, items)
        self._wait_heartbeating([write], _vouch_until(env for _, _, env, _ in batch))
        try:
            results = write.result()
        except Exception as e:   # write_batch reports disk errors per item; anything else:
            results = [e] * len(batch)   # every item failed, nothing is acknowledged
        metrics.spooled(self.lane, sum(not isinstance(r, Exception) for r in results),
                        seconds=time.monotonic() - t0)
        dt = time.monotonic() - t0
        for (reply_to, qid, env, p), res in zip(batch, results, strict=True):
            if isinstance(res, Exception):
                log.event("spool_error", "error", qid=env.qid, error=str(res))
                self._send(worker_nack(reply_to, qid, NackReason.ERROR, "spool write failed"))
                continue
            self._send(worker_ack(reply_to, qid, res))
            if p.learn:
                self._send(share(LEARN_TOPIC, env.peer_ip, p.learn_domain))
            log.event("spooled", "debug", qid=env.qid, lane=env.lane.value, size=len(p.body),
                      rcpts=len(env.rcpts), batch=len(batch), write_ms=round(dt * 1000, 3),
                      dkim=",".join(f"{r.domain}:{r.result}" for r in p.dkim), learn=p.learn)

    def _process(self, jobs: list[tuple[bytes, Envelope, bytes]]) -> list[Any]:
        """DKIM and trace headers for a batch, each message in a pool thread (DNS waits overlap)
        while this loop keeps heartbeating: a slow DNS server, a big message or many
        signatures never make the broker or the supervisor think this worker is dead."""
        wall = time.time()
        futures = [self.pool.submit(self.pipeline.process, env, body, env.deadline - wall - 0.5)
                   for _, env, body in jobs]
        self._wait_heartbeating(futures, _vouch_until(env for _, env, _ in jobs))
        out: list[Any] = []
        for fut in futures:
            exc = fut.exception()   # never let one message take the worker down
            out.append(exc if exc is not None else fut.result())
        return out

    def _wait_heartbeating(self, futures: list[concurrent.futures.Future[Any]],
                           until: float) -> None:
        """Wait for `futures`, heartbeating every LANE_HEARTBEAT while time.monotonic() < until.

        The work runs in pool threads, so this loop is where the heartbeats come from. Past
        `until` (the batch's deadline) the work is presumed hung and the heartbeats stop: the
        broker NACKs the batch (worker_lost) and the supervisor restarts a worker that stays
        stuck, as it would if this loop itself hung."""
        pending = {f for f in futures if not f.done()}
        while pending:
            _, pending = concurrent.futures.wait(pending, timeout=LANE_HEARTBEAT)
            if time.monotonic() < until:
                self._heartbeat()

    def _send(self, frames: list[bytes]) -> None:
        assert self.sock is not None
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            # The broker is not reading; its heartbeat check will nack on the acceptor's side
            # anyway, and the acceptor's own deadline answers 451. The file is already durable:
            # the client may retry and a duplicate is possible (documented).
            log.event("ack_dropped", "warning", frames=len(frames))

    def _shutdown(self) -> None:
        """Leave cleanly: tell the broker, then finish what already arrived."""
        if self.sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send_multipart(disconnect(), zmq.NOBLOCK)
        # Work the broker sent before it read the DISCONNECT is already in our pipe: finish
        # it; a quiet STOP_POLL means there is none (anything later is the broker's to NACK
        # as worker_lost, so its client gets a 4xx: nothing is lost).
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if not self.sock.poll(timeout=int(STOP_POLL * 1000)):
                break
            self._handle(self._drain())
        self.sock.close(linger=1000)


def _vouch_until(envs: Any) -> float:
    """time.monotonic() until which a batch's work counts as progress: its latest envelope
    deadline (after which the acceptor has answered 451 anyway) plus one liveness window."""
    latest = max((e.deadline for e in envs), default=time.time())
    return time.monotonic() + (latest - time.time()) + LANE_HEARTBEAT * LANE_LIVENESS


def _qid_guess(env_raw: bytes) -> bytes:
    try:
        return str(orjson.loads(env_raw)["qid"]).encode()
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return b"?"


def run(cfg: Config, lane: str, index: int, hb: Any = None, slot: int = 0) -> None:
    # Only the supervisor stops us (SIGUSR2), after the acceptors have drained (LANE_SIGNALS).
    sig = child.start(cfg, f"worker-{lane}-{index}", child.LANE_SIGNALS,
                      nice=getattr(cfg.lanes, lane).nice,
                      policy=getattr(cfg.lanes, lane).sched_policy)
    w = Worker(cfg, Lane(lane), index, hb, slot)
    sig.on_stop(lambda: setattr(w, "stopping", True))
    log.event("worker_start", lane=lane, index=index)
    w.run()
    log.event("worker_stop", lane=lane, index=index)

