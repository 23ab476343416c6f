"""Lane broker process: load balancing with worker credit and heartbeats (Paranoid Pirate).

API: run(cfg, lane, hb, slot)   the process entry point (one broker per lane)

Sockets (addresses from Config.ipc; with cluster.role "lanes", front and status are tcp:// on
cluster.lanes_bind instead, CURVE servers admitting only the allowed edge keys (ingress.core.
cluster: the Gate, and a monitor per socket that logs every refused handshake)):
    {lane}-front  ROUTER  acceptors' DEALERs send SUBMIT, get ACK/NACK
    {lane}-back   ROUTER  workers' DEALERs send READY/HEARTBEAT/ACK/NACK/DISCONNECT, get WORK
    {lane}-status PUB     lane status, looked at every STATUS_INTERVAL, published when
                          wire.status_key changed, else every STATUS_KEEPALIVE: depth,
                          free credit, saturation;
                          for the fast lane, "over_rate": the domains refused for
                          classify.domain_rate, and the tiers ("tier:self-proven") refused
                          for their total rate, within OVER_RATE_HOLD (acceptors keep them
                          bulk), and "tiers": each tier's depth and work in flight;
                          and the SHARE facts passed on to every acceptor (not a LEARN
                          that repeats a recent one: ingress.policy.learn_repeats)

Policy: ingress.policy.lane_gate.LaneGate, one per lane, decides; this module only carries
out. A SUBMIT is admitted into the gate's queue or NACKed with the gate's reason (queue_full,
rate, share: the acceptor serves a fast message refused for share as bulk); the gate names
what to dispatch next within the tiers' and identities' shares of the workers' credit, and what
the status says of the rates and tiers. Mechanism here: work goes only to a worker with credit
that takes its tier (tiers.worker_takes: a dedicated worker, only its own), the most credit
first. A worker that misses LANE_LIVENESS heartbeats is dropped and every message it held is
NACKed at once (worker_lost), so acceptors answer 451 instead of waiting.
Work that waited past its envelope deadline is NACKed expired, never dispatched. SIGUSR2 or
the supervisor gone: every SUBMIT is NACKed shutdown.

Failure modes: unroutable replies (the acceptor is gone) are dropped (ROUTER_MANDATORY raises, we
log). Malformed frames are logged and dropped. A broker crash loses only the queue; acceptors time
out those messages (451) and the supervisor restarts the broker; workers and acceptors reconnect by
themselves. SIGUSR2 (the supervisor): NACK everything queued (shutdown) and exit after in-flight
ACKs drain (bounded wait).
Limits: the queue, the rates' tables and the over-rate list are the gate's (see its bounds);
high-water marks of 1000 messages per ROUTER, 10 on the status PUB; a drain reads at most 256
messages a socket per poll, so neither side starves the other.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from cachetools import TTLCache

from ingress.core import child, cluster, log, metrics
from ingress.core.child import Heartbeat
from ingress.core.config import Config
from ingress.core.ratelimit import TokenBucket
from ingress.core.wire import (
    LANE_HEARTBEAT,
    LANE_LIVENESS,
    STATUS_INTERVAL,
    STATUS_KEEPALIVE,
    Kind,
    NackReason,
    StatusKey,
    WireError,
    disconnect,
    expect,
    head,
    heartbeat,
    kind_of,
    nack_detail,
    recv_now,
    send_now,
    shared_publication,
    status,
    status_key,
    to_acceptor,
    work,
    worker_hello,
)
from ingress.policy.fairqueue import TieredQueue
from ingress.policy.lane_gate import OVER_RATE_HOLD, Check, Decision, LaneGate, LaneLimits, Request
from ingress.policy.learn_repeats import LearnRepeats, repeat_window
from ingress.policy.tiers import Tier, dedicated_tier, worker_takes

__all__ = ["OVER_RATE_HOLD", "Broker", "run"]

LEFT_TTL = 60.0      # seconds a worker that said DISCONNECT is remembered (its heartbeats ignored)
LEFT_MAX = 4096      # and how many such workers at most


@dataclass
class WorkerState:
    ident: bytes
    credit: int
    expiry: float
    inflight: dict[bytes, bytes] = field(default_factory=dict)   # qid -> acceptor routing id
    serves: Tier | None = None      # dedicated to this tier's work only (tiers.worker_takes)


@dataclass
class Job:
    reply_to: bytes
    qid: bytes
    env_raw: bytes
    body: bytes
    deadline: float          # wall clock


class Broker:
    def __init__(self, cfg: Config, lane: str, hb: Any = None, slot: int = 0) -> None:
        self.cfg, self.lane = cfg, lane
        self._status_key: StatusKey | None = None      # what was last published (publish)
        self._status_at = float("-inf")
        self.lane_gate: LaneGate[Job] = LaneGate(LaneLimits.of(cfg, lane), now=time.monotonic())
        self.fast = self.lane_gate.fast
        self.workers: dict[bytes, WorkerState] = {}
        # Workers that said DISCONNECT: their heartbeats (they keep beating while they finish)
        # never take them back. A routing id is never reused (pid + start time), so a worker
        # forgotten here after LEFT_TTL is long gone; bounded in count as well.
        self.left: TTLCache[bytes, bool] = TTLCache(maxsize=LEFT_MAX, ttl=LEFT_TTL)
        self.repeats = LearnRepeats(repeat_window(cfg.classify.learned_ttl))
        self.heart, self.stopping = Heartbeat(hb, slot), False
        self.counters = {"submitted": 0, "acked": 0, "nack_rate": 0, "nack_queue_full": 0,
                         "nack_worker_lost": 0, "nack_expired": 0, "nack_worker": 0}
        ctx: zmq.Context[zmq.Socket[bytes]] = child.quiet_io_threads(zmq.Context.instance())
        Path(cfg.ipc("x")[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
        # Role lanes: the edges' sockets are tcp:// with CURVE, admitted by the Gate (ZAP);
        # the workers' stays ipc:// (they run on this host).
        self.remote = cfg.cluster.role == "lanes"
        self.gate = cluster.Gate(ctx, cfg) if self.remote else None
        self.monitors: list[tuple[zmq.Socket[bytes], str]] = []
        self.front = self._router(ctx, f"{lane}-front", remote=self.remote)
        self.back = self._router(ctx, f"{lane}-back")
        self.pub: zmq.Socket[bytes] = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 10)
        self.pub.setsockopt(zmq.LINGER, 0)
        if self.remote:
            self._bind_remote(self.pub, "status")
        else:
            self.pub.bind(cfg.ipc(f"{lane}-status"))

    # The gate's state, by the names the status and the tests read.
    @property
    def queue(self) -> TieredQueue[Job]:
        return self.lane_gate.queue

    @property
    def queued_bytes(self) -> int:
        """Bytes of the bodies in self.queue."""
        return self.lane_gate.queue.bytes

    @property
    def queue_max(self) -> int:
        return self.lane_gate.limits.queue_max

    @property
    def queue_bytes(self) -> int:
        return self.lane_gate.limits.queue_bytes

    @property
    def bucket(self) -> TokenBucket:
        return self.lane_gate.bucket

    @property
    def inflight_by_tier(self) -> dict[Tier, int]:
        return self.lane_gate.inflight_by_tier

    @property
    def inflight_by_key(self) -> dict[str, int]:
        return self.lane_gate.inflight_by_key

    def over_rate_now(self, now: float) -> list[str]:
        return self.lane_gate.over_rate_now(now)

    def _bind_remote(self, s: zmq.Socket[bytes], kind: str) -> None:
        """A CURVE server socket on this lanes node's tcp port for (lane, kind), watched by a
        monitor that logs every refused handshake (cluster.log_handshake_event)."""
        cluster.curve_server(s, self.cfg)
        self.monitors.append((s.get_monitor_socket(cluster.HANDSHAKE_FAILURES),
                              f"{self.lane}-{kind}"))
        s.bind(cluster.endpoint(self.cfg.cluster.lanes_bind, self.lane, kind))

    def _router(self, ctx: zmq.Context[Any], name: str, remote: bool = False
                ) -> zmq.Socket[bytes]:
        s: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.setsockopt(zmq.RCVHWM, 1000)
        if remote:
            self._bind_remote(s, name.rsplit("-", 1)[1])
            return s
        addr = self.cfg.ipc(name)
        with contextlib.suppress(FileNotFoundError):   # a stale socket file from a dead broker
            Path(addr[len("ipc://"):]).unlink()
        s.bind(addr)
        return s

    # --- replies to acceptors ---------------------------------------------------------------

    def _reply(self, to: bytes, kind: Kind, qid: bytes, detail: bytes) -> None:
        try:
            send_now(self.front, [to, *to_acceptor(kind, qid, detail)])
        except zmq.ZMQError as e:    # EHOSTUNREACH (acceptor gone) or EAGAIN (not reading)
            log.event("reply_dropped", "warning", lane=self.lane, qid=qid.decode(errors="replace"),
                      error=str(e))

    def _nack(self, to: bytes, qid: bytes, reason: NackReason, text: str = "") -> None:
        self.counters[f"nack_{reason.value}"] = self.counters.get(f"nack_{reason.value}", 0) + 1
        metrics.lane_nack(self.lane, reason)
        self._reply(to, Kind.NACK, qid, nack_detail(reason, text))

    # --- frontend -----------------------------------------------------------------------------

    def on_front(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        reply_to, msg = frames[0], frames[1:]
        try:
            kind = kind_of(msg)
            if kind is Kind.SHARE:
                self._publish_fact(msg)
                return
            if kind is not Kind.SUBMIT:
                raise WireError(f"acceptor sent {msg[1]!r}")
            env_raw, body = expect(msg, 2)
            h = head(env_raw)
            qid, deadline = h.qid.encode(), h.deadline
            req = Request(len(body), h.identity, h.peer_ip, h.retry)
        except WireError as e:
            log.event("wire_error", "warning", lane=self.lane, side="front", error=str(e))
            return
        self.counters["submitted"] += 1
        if self.stopping:
            self._nack(reply_to, qid, NackReason.SHUTDOWN, "lane shutting down")
            return
        job = Job(reply_to, qid, env_raw, body, deadline)
        d = self.lane_gate.admit(req, job, time.monotonic(), self._total_credit())
        if d.reason is not None:
            self._refused(reply_to, qid, d, d.reason)

    def _refused(self, reply_to: bytes, qid: bytes, d: Decision, reason: NackReason) -> None:
        """NACK a message the gate refused, counted by the check that refused it."""
        if d.check is Check.QUEUE_BYTES:
            self.counters["nack_queue_bytes"] = self.counters.get("nack_queue_bytes", 0) + 1
        elif d.check is Check.TIER_SHARE:
            metrics.over_tier(d.tier.label, "message")
        elif d.check in (Check.KEY_SHARE, Check.DOMAIN_RATE):
            metrics.over_share("message", d.key)
        elif d.check is Check.TIER_RATE:
            metrics.over_tier(d.tier.label, "rate")
        self._nack(reply_to, qid, reason, d.text)

    def _total_credit(self) -> int:
        return sum(w.credit + len(w.inflight) for w in self.workers.values())

    # --- backend ------------------------------------------------------------------------------

    def on_back(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        ident, msg = frames[0], frames[1:]
        now = time.monotonic()
        try:
            kind = kind_of(msg)
            w = self.workers.get(ident)
            if kind is Kind.READY:
                self._register(ident, *_hello(msg), now)
            elif kind is Kind.HEARTBEAT:
                self._on_worker_heartbeat(ident, w, msg, now)
            elif kind in (Kind.ACK, Kind.NACK):
                self._on_worker_result(w, kind, msg, now)
            elif kind is Kind.SHARE:
                self._publish_fact(msg)
            elif kind is Kind.DISCONNECT:
                self._on_worker_disconnect(ident, w)
            else:
                raise WireError(f"worker sent {kind.name}")
        except WireError as e:
            log.event("wire_error", "warning", lane=self.lane, side="back", error=str(e))

    def _on_worker_heartbeat(self, ident: bytes, w: WorkerState | None, msg: list[bytes],
                             now: float) -> None:
        free, serves = _hello(msg)
        if w is not None:
            w.expiry = now + LANE_HEARTBEAT * LANE_LIVENESS
        elif ident not in self.left:   # we restarted, or it timed out here: take it back
            self._register(ident, free, serves, now)

    def _on_worker_result(self, w: WorkerState | None, kind: Kind, msg: list[bytes],
                          now: float) -> None:
        """A worker's ACK or NACK: its credit back, the counter, the answer to the acceptor."""
        reply_to, qid, detail = expect(msg, 3)
        if w is not None:
            w.expiry = now + LANE_HEARTBEAT * LANE_LIVENESS
            if w.inflight.pop(qid, None) is not None:
                w.credit += 1
        self.lane_gate.release(qid)
        if kind is Kind.ACK:
            self.counters["acked"] += 1
        else:
            self.counters["nack_worker"] += 1
        self._reply(reply_to, kind, qid, detail)

    def _on_worker_disconnect(self, ident: bytes, w: WorkerState | None) -> None:
        """The worker leaves: no more work for it (kept until its in-flight ACKs are in), and
        the answer DISCONNECT, after which nothing follows on its pipe: the worker leaves once
        it has that answer and nothing in hand (work sent before it crossed the worker's
        DISCONNECT is done, not lost)."""
        self.left[ident] = True
        if w is not None:
            w.credit = 0
            if not w.inflight:
                del self.workers[ident]
        with contextlib.suppress(zmq.ZMQError):
            send_now(self.back, [ident, *disconnect()])

    def _publish_fact(self, msg: list[bytes]) -> None:
        """Pass a worker's or an acceptor's fact about a client on to every acceptor."""
        if len(msg) > 2 and not self.repeats.passes(msg[2], msg[3:], time.monotonic()):
            return
        with contextlib.suppress(zmq.ZMQError):
            send_now(self.pub, shared_publication(msg))

    def _register(self, ident: bytes, credit: int, serves: Tier | None, now: float) -> None:
        old = self.workers.get(ident)
        if old is not None:
            self._fail_worker(old, "re-registered")
        self.workers[ident] = WorkerState(ident, credit, now + LANE_HEARTBEAT * LANE_LIVENESS,
                                          serves=serves)
        log.event("worker_ready", lane=self.lane, worker=ident.decode(errors="replace"),
                  credit=credit, serves="" if serves is None else serves.label)

    def _fail_worker(self, w: WorkerState, why: str) -> None:
        for qid, reply_to in w.inflight.items():
            self.lane_gate.release(qid)
            self._nack(reply_to, qid, NackReason.WORKER_LOST, why)
        if w.inflight:
            log.event("worker_lost", "warning", lane=self.lane, worker=w.ident.decode("ascii",
                      "replace"), inflight=len(w.inflight), why=why)
        w.inflight.clear()

    # --- scheduling ---------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued work, while the gate names some, to the worker with the most credit among
        those that take its tier (tiers.worker_takes: a dedicated worker only its tier's)."""
        wall = time.time()
        credit = self._total_credit()      # unchanged by a dispatch: credit moves to in flight
        up = {w.serves for w in self.workers.values()      # dedicated workers not leaving
              if w.serves is not None and w.ident not in self.left}
        while self.queue:
            free = [w for w in self.workers.values() if w.credit > 0]
            if not free:
                return
            got = self.lane_gate.pick(credit, functools.partial(_servable, free, up))
            if got is None:       # every tier / identity with work is at its in-flight share,
                return            # or no worker that takes it has credit
            best = max((w for w in free if worker_takes(got.tier, w.serves, got.tier in up)),
                       key=lambda w: w.credit)
            job = got.item
            if job.deadline <= wall:
                self._nack(job.reply_to, job.qid, NackReason.EXPIRED, "waited too long")
                continue
            try:
                send_now(self.back, [best.ident, *work(job.reply_to, job.env_raw, job.body)])
            except zmq.ZMQError as e:
                # Unroutable (worker gone) or its pipe full: treat it as lost, requeue the job.
                self.lane_gate.requeue(got)
                self._fail_worker(best, f"send failed: {e}")
                del self.workers[best.ident]
                credit = self._total_credit()
                continue
            best.credit -= 1
            best.inflight[job.qid] = job.reply_to
            self.lane_gate.sent(job.qid, got)
            if self.fast:
                metrics.fast_identity(got.key, got.size)

    def housekeeping(self, now: float) -> None:
        for ident, w in list(self.workers.items()):
            if w.expiry < now:
                self._fail_worker(w, "heartbeat timeout")
                del self.workers[ident]
                continue
            with contextlib.suppress(zmq.ZMQError):
                send_now(self.back, [ident, *heartbeat()])

    def publish(self, now: float) -> None:
        free = sum(w.credit for w in self.workers.values())
        tokens = self.lane_gate.tokens(now)
        depth = len(self.queue)
        # The rate cap itself is applied at the first RCPT by the acceptors' shares of it (and here,
        # exactly, after DATA); "saturated" says the lane cannot take work at all.
        saturated = self.lane_gate.near_full() or not self.workers
        doc: dict[str, Any] = {
               "lane": self.lane, "ts": time.time(), "depth": depth, "queue_max": self.queue_max,
               "queued_bytes": self.queued_bytes, "queue_bytes": self.queue_bytes,
               "free_credit": free, "workers": len(self.workers),
               "inflight": sum(len(w.inflight) for w in self.workers.values()),
               "tokens": None if tokens == float("inf") else round(tokens, 2),
               "rate": self.bucket.rate, "saturated": saturated, **self.counters,
               **self.lane_gate.facts(now)}
        metrics.lane_status(self.lane, depth=depth, saturated=saturated, free_credit=free,
                            workers=len(self.workers), tokens=tokens)
        # Every acceptor wakes for every publication: at once when what they act on changed,
        # else only often enough to stay fresh (STATUS_KEEPALIVE).
        key = status_key(doc)
        if key == self._status_key and now - self._status_at < STATUS_KEEPALIVE:
            return
        self._status_key, self._status_at = key, now
        with contextlib.suppress(zmq.ZMQError):
            send_now(self.pub, status(doc))

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        for mon, _ in self.monitors:
            poller.register(mon, zmq.POLLIN)
        next_hb, next_status, stop_deadline = 0.0, 0.0, None
        while True:
            now = time.monotonic()
            self.heart.beat()
            if self.heart.orphaned():
                self.stopping = True
            if self.stopping and stop_deadline is None:
                stop_deadline = now + 2.0
                self._refuse_queued()
            if stop_deadline is not None and (
                    now > stop_deadline or not any(w.inflight for w in self.workers.values())):
                break
            if now >= next_hb:
                self.housekeeping(now)
                next_hb = now + LANE_HEARTBEAT
            if now >= next_status:
                self.publish(now)
                next_status = now + STATUS_INTERVAL
            self._poll_once(poller, min(next_hb, next_status))
        for w in self.workers.values():
            self._fail_worker(w, "broker shutting down")
        if self.gate is not None:
            self.gate.stop()

    def _refuse_queued(self) -> None:
        """Shutting down: every queued job is NACKed (the acceptors answer 4xx) and dropped."""
        for job in self.lane_gate.drain():
            self._nack(job.reply_to, job.qid, NackReason.SHUTDOWN, "lane shutting down")

    def _poll_once(self, poller: zmq.Poller, wake_at: float) -> None:
        """Wait for traffic until `wake_at` (monotonic), drain both sockets, hand out work."""
        timeout = max(0.0, wake_at - time.monotonic())
        events = dict(poller.poll(timeout=int(timeout * 1000) + 1))
        # Workers first: their ACKs free credit for the work that follows.
        if self.back in events:
            self._drain(self.back, self.on_back)
        if self.front in events:
            self._drain(self.front, self.on_front)
        for mon, where in self.monitors:
            if mon in events:
                self._drain(mon, lambda frames, w=where: cluster.log_handshake_event(frames, w))
        self.dispatch()

    @staticmethod
    def _drain(sock: zmq.Socket[bytes], handle: Any, limit: int = 256) -> None:
        for _ in range(limit):
            frames = recv_now(sock)
            if frames is None:
                return
            handle(frames)


def _servable(free: list[WorkerState], up: set[Tier], tier: Tier) -> bool:
    """A worker with credit takes `tier` now."""
    return any(worker_takes(tier, w.serves, tier in up) for w in free)


def _hello(msg: list[bytes]) -> tuple[int, Tier | None]:
    """A worker's READY or HEARTBEAT: its credit (or free credit) and its dedicated tier."""
    credit, serves = worker_hello(msg)
    if not serves:
        return credit, None
    try:
        return credit, dedicated_tier(serves)
    except ValueError as e:
        raise WireError(str(e)) from None


def run(cfg: Config, lane: str, hb: Any = None, slot: int = 0) -> None:
    # Only the supervisor stops us (SIGUSR2), after the acceptors have drained (LANE_SIGNALS).
    def setup(_: child.Signals) -> child.Service[None]:
        b = Broker(cfg, lane, hb, slot)
        return child.Service(
            b.run, lambda: setattr(b, "stopping", True),
            lambda: log.event("broker_start", lane=lane, queue_max=b.queue_max,
                              queue_bytes=b.queue_bytes, rate=b.bucket.rate),
            lambda: log.event("broker_stop", lane=lane, **b.counters))
    child.main(cfg, child.lane_spec(cfg, lane, f"broker-{lane}"), setup)
