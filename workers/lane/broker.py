"""Lane broker process: load balancing with worker credit and heartbeats (Paranoid Pirate).

API: run(cfg, lane, hb, slot)   the process entry point (one broker per lane)

Sockets (addresses from Config.ipc; with cluster.role "lanes", front and status are tcp:// on
cluster.lanes_bind instead, CURVE servers admitting only the allowed edge keys (ingress.core.
cluster: the Gate, and a monitor per socket that logs every refused handshake)):
    {lane}-front  ROUTER  acceptors' DEALERs send SUBMIT, get ACK/NACK
    {lane}-back   ROUTER  workers' DEALERs send READY/HEARTBEAT/ACK/NACK/DISCONNECT, get WORK
    {lane}-status PUB     lane status every STATUS_INTERVAL: depth, free credit, saturation;
                          for the fast lane, "over_rate": the domains refused for
                          classify.domain_rate, and the tiers ("tier:self-proven") refused
                          for their total rate, within OVER_RATE_HOLD (acceptors keep them
                          bulk), and "tiers": each tier's depth and work in flight;
                          and the SHARE facts (learned and unlearned clients, penalties)
                          passed on to every acceptor

Policy, in one place per lane: the bounded queue (`queue_max` messages and `queue_bytes` bytes of
bodies, Config.queue_bytes; a SUBMIT beyond either is NACKed queue_full at once) and,
for the fast lane, trust tiers and fairness between identities (the envelope's
evidence["identity"], by its ingress.policy.identity.share_key, and its tier,
ingress.policy.tiers.fast_tier): the queue is an ingress.policy.fairqueue.TieredQueue, one
deficit round robin queue (DRR_QUANTUM bytes) per tier served in strict priority, so the
operator tier's work is dispatched before any lower tier's. The third-party and self-proven
tiers each hold at most their cap (tiers.*_share) of queue_max and queue_bytes queued, and of
the workers' total credit in flight, so some credit is always free for the operator tier
(tiers.operator_floor); and one total rate each (tiers.self_proven_rate: a bucket one second
deep, at least one edge's burst, like a domain's; the acceptors hold their parts at MAIL FROM).
Inside that, one identity holds at most classify.identity_share of queue_max and queue_bytes,
but always room for one message of smtp.max_message_size, and at most that share of the
workers' total credit in flight (its queue waits; others go first). Beyond a cap or a rate:
NACK share, and the acceptor serves the message as bulk. A fast envelope without an identity
(none is sent today) has key "" (no per-key bound) and counts as self-proven; the bulk lane is
one FIFO;
for a capped lane, the token bucket (`rate`, `burst`; an empty bucket is NACK rate); an envelope
the acceptor marked a retry of a transaction we deferred (evidence "retry": "1", see
ingress.policy.deferrals) takes a token of the retry bucket (admission.retry_share of the cap)
first, and the lane's bucket only when that is empty. Work goes only
to a worker with credit, the one with the most. A worker that misses LANE_LIVENESS heartbeats is
dropped and every message it held is NACKed at once (worker_lost), so acceptors answer 451 instead
of waiting. Work that waited past its envelope deadline is NACKed expired, never dispatched.

Failure modes: unroutable replies (the acceptor is gone) are dropped (ROUTER_MANDATORY raises, we
log). Malformed frames are logged and dropped. A broker crash loses only the queue; acceptors time
out those messages (451) and the supervisor restarts the broker; workers and acceptors reconnect by
themselves. SIGUSR2 (the supervisor): NACK everything queued (shutdown) and exit after in-flight
ACKs drain (bounded wait).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import zmq

from ingress.core import child, cluster, log, metrics
from ingress.core.addr import site_key
from ingress.core.child import Heartbeat
from ingress.core.config import Config
from ingress.core.ratelimit import FairBucket, KeyedBuckets, TokenBucket
from ingress.core.wire import (
    LANE_HEARTBEAT,
    LANE_LIVENESS,
    STATUS_INTERVAL,
    Kind,
    Lane,
    NackReason,
    WireError,
    expect,
    heartbeat,
    int_frame,
    kind_of,
    nack_detail,
    shared_publication,
    status,
    to_acceptor,
    work,
)
from ingress.policy.admission import broker_bucket
from ingress.policy.deferrals import retry_buckets
from ingress.policy.fairqueue import TieredQueue
from ingress.policy.identity import (
    RATE_TRACKED,
    domain_buckets,
    rate_bounded,
    share_bound,
    share_key,
)
from ingress.policy.tiers import (
    CAPPED,
    FAST_TIERS,
    Tier,
    TierShares,
    cap,
    fast_tier,
    rate_key,
    tier_buckets,
    tier_rates,
)

OVER_RATE_HOLD = 1.0    # seconds a domain stays listed over its rate after its last refusal
OVER_RATE_LISTED = 256  # domains over their rate named in one status (the most recent first)
DRR_QUANTUM = 65536     # bytes an identity is served per round of the fast lane's DRR


@dataclass
class WorkerState:
    ident: bytes
    credit: int
    expiry: float
    inflight: dict[bytes, bytes] = field(default_factory=dict)   # qid -> acceptor routing id


@dataclass
class Job:
    reply_to: bytes
    qid: bytes
    env_raw: bytes
    body: bytes
    deadline: float          # wall clock
    key: str = ""            # the identity's share key (fast lane); "" = one FIFO (bulk)
    tier: Tier = Tier.UNKNOWN    # its trust tier (fast lane); UNKNOWN: bulk


class Broker:
    def __init__(self, cfg: Config, lane: str, hb: Any = None, slot: int = 0) -> None:
        self.cfg, self.lane = cfg, lane
        lc = getattr(cfg.lanes, lane)
        self.queue_max: int = lc.queue_max
        self.queue_bytes: int = cfg.queue_bytes(lane)
        # lanes.<lane>.rate; with [cluster] redis the bulk cap is held at the first RCPT and this
        # is a guard with headroom (admission.broker_bucket says why)
        self.bucket = TokenBucket(*broker_bucket(cfg, lane), now=time.monotonic())
        retry = retry_buckets(cfg) if lane == "bulk" else None
        self.retry_bucket = TokenBucket(*retry[1], now=time.monotonic()) \
            if retry is not None else None
        # Fast lane: no identity holds more than classify.identity_share of the queue or of
        # the workers' credit, no capped tier more than its share (tiers.*_share); the bulk
        # lane is one FIFO (every job has key "" and tier UNKNOWN).
        self.fast = lane == Lane.FAST
        self.share = cfg.classify.identity_share if self.fast else 1.0
        self.shares = TierShares.of(cfg)
        limits = {t: (cap(t, self.queue_max, self.shares), cap(t, self.queue_bytes, self.shares))
                  for t in CAPPED} if self.fast else {}
        # An identity's share of the bytes admits at least one message of the largest size.
        self.queue: TieredQueue[Job] = TieredQueue(
            DRR_QUANTUM, share_bound(self.queue_max, self.share),
            max(share_bound(self.queue_bytes, self.share), cfg.smtp.max_message_size), limits)
        # tiers.self_proven_rate (third_party_rate): one bucket per tier, whatever the domains,
        # shared max-min fairly between client sites (addr.site_key), as in the acceptors
        self.tier_buckets = {
            t: FairBucket(*tier_buckets(rate, burst, 1)[1], now=time.monotonic(),
                          max_keys=RATE_TRACKED)
            for t, (rate, burst) in tier_rates(cfg).items()} if self.fast else {}
        self.ipv6_prefix = cfg.admission.ipv6_prefix
        self.inflight_by_tier: dict[Tier, int] = dict.fromkeys(Tier, 0)
        # classify.domain_rate: a domain identity's (org:, learned: -> org:) fast-lane rate
        # over every edge. The acceptors already hold each domain to its rate with a burst of
        # classify.domain_burst (ingress.edge.acceptor: smooth, per edge); this bucket, one second
        # deep (and at least one edge's burst), bounds the sum of several edges. Its buckets
        # are bounded (least recently used dropped: a fresh bucket is a full one).
        self.domain_rate = cfg.classify.domain_rate if lane == Lane.FAST else 0.0
        _, at_broker = domain_buckets(self.domain_rate, cfg.classify.domain_burst, 1)
        self.domain_buckets = KeyedBuckets(*at_broker, RATE_TRACKED)
        # share key -> when its bucket last refused (published as "over_rate" in the status:
        # the acceptors keep that domain's sessions bulk at MAIL FROM, where the bulk cap sheds
        # them before DATA; bounded like the buckets)
        self.over_rate: OrderedDict[str, float] = OrderedDict()
        self.inflight_keys: dict[bytes, tuple[Tier, str]] = {}   # qid -> (tier, share key)
        self.inflight_by_key: dict[str, int] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.heart = Heartbeat(hb, slot)
        self.stopping = False
        self.counters = {"submitted": 0, "acked": 0, "nack_rate": 0, "nack_queue_full": 0,
                         "nack_worker_lost": 0, "nack_expired": 0, "nack_worker": 0}
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
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
            self.front.send_multipart([to, *to_acceptor(kind, qid, detail)], zmq.NOBLOCK)
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
            env = orjson.loads(env_raw)
            qid, deadline = str(env["qid"]).encode(), float(env["deadline"])
            identity = str((env.get("evidence") or {}).get("identity", "")) if self.fast else ""
            key = share_key(identity)
            tier = fast_tier(identity) if self.fast else Tier.UNKNOWN
            site = site_key(str(env.get("peer_ip", "")), self.ipv6_prefix) \
                if tier in self.tier_buckets else ""
        except (WireError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            log.event("wire_error", "warning", lane=self.lane, side="front", error=str(e))
            return
        self.counters["submitted"] += 1
        if self.stopping:
            self._nack(reply_to, qid, NackReason.SHUTDOWN, "lane shutting down")
        elif len(self.queue) >= self.queue_max:
            self._nack(reply_to, qid, NackReason.QUEUE_FULL, "lane queue full")
        elif self.queued_bytes + len(body) > self.queue_bytes:
            self.counters["nack_queue_bytes"] = self.counters.get("nack_queue_bytes", 0) + 1
            self._nack(reply_to, qid, NackReason.QUEUE_FULL, "lane queue full (bytes)")
        elif not (self._retry_token(env) or self.bucket.take(time.monotonic())):
            self._nack(reply_to, qid, NackReason.RATE, "lane rate cap")
        elif (why := self._over_share(key, tier, len(body), site)) is not None:
            self._nack(reply_to, qid, NackReason.SHARE, why)
        else:
            self.queue.push(tier, key, Job(reply_to, qid, env_raw, body, deadline, key, tier),
                            len(body), bounded=False)     # room checked: _over_share

    def _over_share(self, key: str, tier: Tier, size: int, site: str = "") -> str | None:
        """Why a fast message is served as bulk (NACK share), or None: its tier at its cap of
        the queue or of the credit, its identity at its share of the queue ("": bulk, or no
        identity: no per-key bound), a domain over classify.domain_rate, its tier over its
        total rate. Checked in that order, so a message refused for one spends no token of
        the rates after it."""
        if not self.queue.tier_room(tier, size) or not self._tier_credit(tier):
            metrics.over_tier(tier.label, "message")
            return "tier over its share of the lane"
        if key and not self.queue.key_room(tier, key, size):
            metrics.over_share("message", key)
            return "identity over its share of the lane"
        if not self._domain_token(key):
            metrics.over_share("message", key)
            return "identity over its share of the lane"
        if not self._tier_token(tier, site):
            metrics.over_tier(tier.label, "rate")
            return "tier over its rate"
        return None

    def _domain_token(self, key: str) -> bool:
        """A domain identity (share key "org:...") within classify.domain_rate? Others: yes."""
        if self.domain_rate <= 0 or not rate_bounded(key):
            return True
        now = time.monotonic()
        if self.domain_buckets.take(key, now):
            return True
        self._name_over_rate(key, now)
        return False

    def _name_over_rate(self, key: str, now: float) -> None:
        """Name `key` over its rate in the status (the acceptors keep its sessions bulk at
        MAIL FROM); bounded: the least recently named is dropped."""
        self.over_rate[key] = now
        self.over_rate.move_to_end(key)
        if len(self.over_rate) > RATE_TRACKED:
            self.over_rate.popitem(last=False)

    def _tier_credit(self, tier: Tier) -> bool:
        """May this tier hold any of the workers' credit now? A capped tier whose cap of the
        current credit is 0 would never be dispatched: served as bulk instead of waiting to
        expire. With no worker connected (total 0) it waits, as every tier does."""
        total = self._total_credit()
        return tier not in CAPPED or not total or cap(tier, total, self.shares) > 0

    def _tier_token(self, tier: Tier, site: str) -> bool:
        """Within the client site's fair part of its tier's total rate
        (tiers.self_proven_rate)? A token is taken; refused, that site is named over the
        tier's rate in the status (rate_key(tier, site)), not the whole tier: another site's
        sessions of the tier stay fast. Tiers without a rate: yes."""
        bucket = self.tier_buckets.get(tier)
        if bucket is None:
            return True
        now = time.monotonic()
        if bucket.take(site, now):
            return True
        self._name_over_rate(rate_key(tier, site), now)
        return False

    def _total_credit(self) -> int:
        return sum(w.credit + len(w.inflight) for w in self.workers.values())

    def over_rate_now(self, now: float) -> list[str]:
        """The domains refused for classify.domain_rate within OVER_RATE_HOLD, most recent
        first (at most OVER_RATE_LISTED); older ones are forgotten."""
        while self.over_rate:
            key, at = next(iter(self.over_rate.items()))
            if at >= now - OVER_RATE_HOLD:
                break
            del self.over_rate[key]
        return list(itertools.islice(reversed(self.over_rate), OVER_RATE_LISTED))

    def _retry_token(self, env: Any) -> bool:
        """A token of the retry share for an envelope marked a retry (never for others)."""
        ev = env.get("evidence") if isinstance(env, dict) else None
        if self.retry_bucket is None or not isinstance(ev, dict) or ev.get("retry") != "1":
            return False
        return self.retry_bucket.take(time.monotonic())

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
                (credit,) = expect(msg, 1)
                self._register(ident, int_frame(credit), now)
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
        (free,) = expect(msg, 1)
        if w is None:   # we restarted, or it timed out here: take it back
            self._register(ident, int_frame(free), now)
        else:
            w.expiry = now + LANE_HEARTBEAT * LANE_LIVENESS

    def _on_worker_result(self, w: WorkerState | None, kind: Kind, msg: list[bytes],
                          now: float) -> None:
        """A worker's ACK or NACK: its credit back, the counter, the answer to the acceptor."""
        reply_to, qid, detail = expect(msg, 3)
        if w is not None:
            w.expiry = now + LANE_HEARTBEAT * LANE_LIVENESS
            if w.inflight.pop(qid, None) is not None:
                w.credit += 1
        self._done(qid)
        if kind is Kind.ACK:
            self.counters["acked"] += 1
        else:
            self.counters["nack_worker"] += 1
        self._reply(reply_to, kind, qid, detail)

    def _on_worker_disconnect(self, ident: bytes, w: WorkerState | None) -> None:
        if w is not None:
            w.credit = 0          # keep it until its in-flight ACKs are in
            if not w.inflight:
                del self.workers[ident]

    def _publish_fact(self, msg: list[bytes]) -> None:
        """Pass a worker's or an acceptor's fact about a client on to every acceptor."""
        with contextlib.suppress(zmq.ZMQError):
            self.pub.send_multipart(shared_publication(msg), zmq.NOBLOCK)

    def _register(self, ident: bytes, credit: int, now: float) -> None:
        old = self.workers.get(ident)
        if old is not None:
            self._fail_worker(old, "re-registered")
        self.workers[ident] = WorkerState(ident, credit, now + LANE_HEARTBEAT * LANE_LIVENESS)
        log.event("worker_ready", lane=self.lane, worker=ident.decode(errors="replace"),
                  credit=credit)

    def _fail_worker(self, w: WorkerState, why: str) -> None:
        for qid, reply_to in w.inflight.items():
            self._done(qid)
            self._nack(reply_to, qid, NackReason.WORKER_LOST, why)
        if w.inflight:
            log.event("worker_lost", "warning", lane=self.lane, worker=w.ident.decode("ascii",
                      "replace"), inflight=len(w.inflight), why=why)
        w.inflight.clear()

    # --- scheduling ---------------------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        """Bytes of the bodies in self.queue."""
        return self.queue.bytes

    def _done(self, qid: bytes) -> None:
        """Work `qid` left a worker (ACK, NACK or lost): its identity's and its tier's
        in-flight counts drop."""
        held = self.inflight_keys.pop(qid, None)
        if held is not None:
            tier, key = held
            self.inflight_by_tier[tier] -= 1
            left = self.inflight_by_key[key] - 1
            if left > 0:
                self.inflight_by_key[key] = left
            else:
                del self.inflight_by_key[key]

    def _eligible(self) -> tuple[Any, Any]:
        """(tier_ok, key_ok) for the queue's pop: None (everyone) for the bulk lane; else a
        capped tier below its cap of the workers' credit, an identity below its share."""
        if not self.fast:
            return None, None
        total = self._total_credit()
        caps = {t: cap(t, total, self.shares) for t in FAST_TIERS}

        def tier_ok(tier: Tier) -> bool:
            return self.inflight_by_tier[tier] < caps.get(tier, total)

        if self.share >= 1.0:
            return tier_ok, None
        bound = share_bound(total, self.share)
        return tier_ok, lambda key: self.inflight_by_key.get(key, 0) < bound

    def dispatch(self) -> None:
        wall = time.time()
        tier_ok, key_ok = self._eligible()
        while self.queue:
            best = max(self.workers.values(), key=lambda w: w.credit, default=None)
            if best is None or best.credit <= 0:
                return
            got = self.queue.pop(tier_ok, key_ok)
            if got is None:       # every tier / identity with work is at its in-flight share
                return
            _, key, job, size = got
            if job.deadline <= wall:
                self._nack(job.reply_to, job.qid, NackReason.EXPIRED, "waited too long")
                continue
            try:
                self.back.send_multipart([best.ident, *work(job.reply_to, job.env_raw, job.body)],
                                         zmq.NOBLOCK)
            except zmq.ZMQError as e:
                # Unroutable (worker gone) or its pipe full: treat it as lost, requeue the job.
                self.queue.push_front(job.tier, job.key, job, len(job.body))
                self._fail_worker(best, f"send failed: {e}")
                del self.workers[best.ident]
                tier_ok, key_ok = self._eligible()
                continue
            best.credit -= 1
            best.inflight[job.qid] = job.reply_to
            self.inflight_keys[job.qid] = (job.tier, job.key)
            self.inflight_by_key[job.key] = self.inflight_by_key.get(job.key, 0) + 1
            self.inflight_by_tier[job.tier] += 1
            if self.fast:
                metrics.fast_identity(key, size)

    def housekeeping(self, now: float) -> None:
        for ident, w in list(self.workers.items()):
            if w.expiry < now:
                self._fail_worker(w, "heartbeat timeout")
                del self.workers[ident]
                continue
            with contextlib.suppress(zmq.ZMQError):
                self.back.send_multipart([ident, *heartbeat()], zmq.NOBLOCK)

    def publish(self, now: float) -> None:
        free = sum(w.credit for w in self.workers.values())
        tokens = self.bucket.tokens(now)
        depth = len(self.queue)
        # The rate cap itself is applied at the first RCPT by the acceptors' shares of it (and here,
        # exactly, after DATA); "saturated" says the lane cannot take work at all.
        saturated = (depth >= self.queue_max * 0.8 or not self.workers
                     or self.queued_bytes >= self.queue_bytes * 0.8)
        doc: dict[str, Any] = {
               "lane": self.lane, "ts": time.time(), "depth": depth, "queue_max": self.queue_max,
               "queued_bytes": self.queued_bytes, "queue_bytes": self.queue_bytes,
               "free_credit": free, "workers": len(self.workers),
               "inflight": sum(len(w.inflight) for w in self.workers.values()),
               "tokens": None if tokens == float("inf") else round(tokens, 2),
               "rate": self.bucket.rate, "saturated": saturated, **self.counters}
        if self.domain_rate > 0 or self.tier_buckets:
            doc["over_rate"] = self.over_rate_now(now)
        if self.fast:
            doc["tiers"] = {t.label: {"depth": self.queue.tier_len(t),
                                      "inflight": self.inflight_by_tier[t]}
                            for t in FAST_TIERS}
        with contextlib.suppress(zmq.ZMQError):
            self.pub.send_multipart(status(doc), zmq.NOBLOCK)
        metrics.lane_status(self.lane, depth=depth, saturated=saturated, free_credit=free,
                            workers=len(self.workers), tokens=tokens)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        for mon, _ in self.monitors:
            poller.register(mon, zmq.POLLIN)
        next_hb = next_status = 0.0
        stop_deadline: float | None = None
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
        for _, _, job, _ in self.queue.drain():
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
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)


def run(cfg: Config, lane: str, hb: Any = None, slot: int = 0) -> None:
    # Only the supervisor stops us (SIGUSR2), after the acceptors have drained (LANE_SIGNALS).
    sig = child.start(cfg, f"broker-{lane}", child.LANE_SIGNALS,
                      nice=getattr(cfg.lanes, lane).nice,
                      policy=getattr(cfg.lanes, lane).sched_policy)
    b = Broker(cfg, lane, hb, slot)
    sig.on_stop(lambda: setattr(b, "stopping", True))
    log.event("broker_start", lane=lane, queue_max=b.queue_max, queue_bytes=b.queue_bytes,
              rate=b.bucket.rate)
    b.run()
    log.event("broker_stop", lane=lane, **b.counters)
