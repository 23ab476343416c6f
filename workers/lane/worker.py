"""Lane worker process: DKIM, trace headers, durable spool write (group commit), then ACK,
each message on its own.

API: run(cfg, lane, index, hb, slot)  the process entry point (spawned by the supervisor)

Protocol (see ingress.core.wire): a DEALER connected to the lane broker's backend. The worker
announces READY with `credit` (how many messages the broker may hand it at once), heartbeats every
LANE_HEARTBEAT seconds, and answers every WORK with exactly one ACK (after the spool write is
durable) or NACK. Each ACK or NACK gives the broker back one unit of credit.

Per-message flow (issue 17: no lookup holds anyone else's mail). Each WORK starts its own
pipeline (workers.lane.pipeline: DKIM, trace headers) at once: on this loop when it would not
wait on DNS (Pipeline.process_now), else in a pool of `credit` threads, so a message never
waits for a thread, whatever the others wait on. A finished pipeline joins
`ready`; whenever a committer is free, what is ready goes into one group commit: the worker's
journal (one fdatasync; files in new/ after the ACK: workers.spool.journal) or, for mail it is
not for (tiers.journals) or full, Spool.write_batch (one syncfs, one fsync of new/); messages
that become ready during a commit form the next one. Two committers (tiers.commit_slots): the
first takes anyone's, the second only the operator's and third parties' mail, so theirs
never waits behind a running commit of a lower tier's (a spammer's self-proven domains' mail).
Each message is ACKed when its own commit is durable, never before. This loop only waits for the
broker or a finished thread (a socketpair wakes it), so it keeps receiving work and heartbeating
while a DKIM check waits on a key that never answers (dkim_deadline, classify.dkim_dns_budget).
That check holds its own unit of credit and nobody else's. Bounds: messages in hand <= credit
(pipelines + ready + the two commits); after a reconnect or a broker restart the new broker lends
full credit while old work is still in hand: that WORK waits for a unit (at most `credit` more;
beyond that it is NACKed "error", which only a broker that lost count could cause). After each
ACK, a SHARE fact when the pipeline says so: learn (SPF + aligned DKIM passed) or unlearn (mail
from a learned network failed SPF or DKIM: workers.lane.pipeline), logged as "unlearn".

Failure modes: a broker that stops heartbeating for LANE_LIVENESS intervals is presumed dead: the
worker reconnects with a fresh socket and announces READY again (Paranoid Pirate), at once and
then after 1, 2, 4 ... 32 s while the broker stays silent (ingress.core.child.Reconnect; the loop
keeps heartbeating meanwhile; the first message from the broker resets it). A disk error is
a NACK with reason "error" for that message (the client gets 451); so is a pipeline that raised.
A message whose envelope deadline passed before its commit is NACKed "expired" (the acceptor
has answered 451). SIGUSR2 (the supervisor): stop taking work (DISCONNECT), finish what was
received, exit 0. Hang detection, per message: the supervisor's heartbeat slot (and the
broker's heartbeats) are written from this loop, and only while every piece of work in hand is
within its deadline: each pipeline until its own message's envelope deadline plus one liveness
window, the commit until its latest message's. Work that outlives it is presumed hung. Then
the heartbeats stop, the broker NACKs everything this worker holds, and the supervisor
restarts it if it stays stuck (e.g. a hung disk). A message that is merely waiting (ready,
behind a running commit) vouches for nothing. Limit: a C call holding the GIL longer than the
liveness window (1 s) would silence the loop; DKIM key limits (dkim_check) keep RSA under it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
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
    UNLEARN_TOPIC,
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
    recv_now,
    send_now,
    share,
    worker_ack,
    worker_nack,
)
from ingress.policy.tiers import Tier, commit_slots, journals, tier_of
from workers.lane.pipeline import Pipeline, Processed
from workers.spool import journal
from workers.spool.store import Spool

TMP_MAX_AGE = 60.0
STOP_POLL = 0.1       # seconds: the longest a stop waits for a poll to return
BYE_WAIT = 2 * LANE_HEARTBEAT * LANE_LIVENESS   # s a stop waits for a DISCONNECT's answer
JOURNAL_CLOSE_WAIT = 5.0  # seconds a stop waits for the journal's files to reach new/ (the rest
                          # stays in the journal: the next worker to start writes it)
PIPELINE_MARGIN = 0.5  # a pipeline ends this long before its envelope deadline (DKIM budget)

Future = concurrent.futures.Future


@dataclass(slots=True)
class _Job:
    """One message in hand, from WORK to its ACK or NACK (it holds one unit of credit)."""

    reply_to: bytes
    env: Envelope
    body: bytes
    vouch: float = 0.0                              # time.monotonic(): see _vouch_until
    future: Future[Processed] | None = None         # its pipeline (done, or a pool thread's)
    done: Processed | None = None                   # the pipeline's result


@dataclass(slots=True)
class _Commit:
    """One group commit in the committer thread: every message whose pipeline was done."""

    jobs: list[_Job]
    future: Future[list[str | Exception]]
    vouch: float
    started: float


class Worker:
    def __init__(self, cfg: Config, lane: Lane, index: int, hb: Any = None, slot: int = 0,
                 serves: str = "") -> None:
        self.cfg, self.lane, self.index = cfg, lane, index
        self.serves = serves       # the one tier it takes ("": any; ingress.policy.tiers)
        self.heart = Heartbeat(hb, slot)
        self.reconnect = Reconnect()       # 1 -> 32 s between reconnects to a silent broker
        self.credit = getattr(cfg.lanes, lane.value).credit
        self.spool = Spool(cfg.spool.path, cfg.spool.batch_sync)
        self.journal: journal.Journal | None = None     # taken in run(): this worker's own
        self.pipeline = Pipeline(cfg)
        # One pipeline thread per unit of credit: a message never waits for a thread, whatever
        # the others wait on. One committer thread: while a commit runs, the messages that
        # become ready meanwhile gather for the next one (group commit).
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.credit,
                                                          thread_name_prefix="pipeline")
        # Two committers: the operator's and third parties' mail (PRIORITY_TIERS) never waits
        # behind a running commit of the self-proven tier's or anyone's: while one commit is
        # written, theirs starts on the other (a message goes to whichever is free first).
        self.committers = [concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"commit-{i}") for i in range(2)]
        self.ctx: zmq.Context[zmq.Socket[bytes]] = child.quiet_io_threads(zmq.Context.instance())
        self.sock: zmq.Socket[bytes] | None = None
        self.stopping = False
        self.answered = False     # the broker answered our DISCONNECT: no WORK follows
        self.ident = f"w-{lane.value}-{serves or 'any'}-{index}-{os.getpid()}".encode()
        self.running: list[_Job] = []                   # pipelines started
        self.ready: list[_Job] = []                     # pipelines done, for the next commit
        self.commits: list[_Commit | None] = [None, None]   # being written: any, priority
        # WORK beyond the credit: only after a reconnect or a broker restart (the new broker
        # lends full credit while we still hold the old work); started as units free up.
        self.waiting: collections.deque[_Job] = collections.deque()
        # A pool thread that finishes wakes the loop's poll (a socket object: sending on it
        # after close() raises, it never writes to a reused descriptor).
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        s: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, self.ident + b"-" + str(time.monotonic_ns()).encode())
        s.setsockopt(zmq.LINGER, 1000)
        s.setsockopt(zmq.SNDHWM, 10 * self.credit + 100)
        s.setsockopt(zmq.RCVHWM, 10 * self.credit + 100)
        s.connect(self.cfg.ipc(f"{self.lane.value}-back"))
        s.send_multipart(ready(self.credit, self.serves))
        self.sock = s

    # --- heartbeats ---------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """To the broker (lane liveness) and to the supervisor (hang detection)."""
        assert self.sock is not None
        with contextlib.suppress(zmq.Again):
            send_now(self.sock, heartbeat(self.credit, self.serves))
        self.heart.beat()

    def _vouched(self, now: float) -> bool:
        """Is every piece of work in hand within its deadline? Each pipeline until its own
        message's deadline, the commit until its latest message's (plus one liveness window
        each). Work that outlives it is presumed hung: no heartbeats then."""
        return all(c is None or now < c.vouch for c in self.commits) and all(
            now < job.vouch for job in self.running)

    def _tick(self, next_hb: float) -> float:
        """Heartbeat if one is due and the work in hand is vouched for; the next due time."""
        now = time.monotonic()
        if now < next_hb:
            return next_hb
        if self._vouched(now):
            self._heartbeat()
        return now + LANE_HEARTBEAT

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        # A file lives in tmp/ for the milliseconds of its write; one older than a minute was
        # left by a worker killed mid-write and was never acknowledged.
        self.spool.clean_tmp(older_than=time.time() - TMP_MAX_AGE)
        # A dead worker's journal into new/ first; then ours (tiers.journals: what it takes).
        journal.recover(self.spool)
        if self.cfg.spool.journal_size:
            try:
                self.journal = journal.Journal.take(self.spool, self.cfg.spool.journal_size)
            except OSError as e:      # e.g. no room for it: every message written as usual
                log.event("journal_off", "error", journal="", error=str(e))
        self._connect()
        assert self.sock is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        broker_seen = time.monotonic()
        next_hb = 0.0
        while not self.stopping:
            if self.heart.orphaned():
                break
            next_hb = self._tick(next_hb)
            if self._step(poller):
                broker_seen = time.monotonic()
                self.reconnect.reset()
                continue
            now = time.monotonic()
            if now - broker_seen > LANE_HEARTBEAT * LANE_LIVENESS and self.reconnect.due(now):
                wait = self.reconnect.attempted(now)
                log.event("broker_silent", "warning", lane=self.lane.value,
                          next_reconnect_s=wait)
                poller.unregister(self.sock)
                self._connect()
                poller.register(self.sock, zmq.POLLIN)
                broker_seen = time.monotonic()
        self._shutdown(poller)

    def _step(self, poller: zmq.Poller) -> bool:
        """One turn: wait (at most STOP_POLL, so a stop flag set by the signal handler is seen
        within it) for the broker or a finished thread, take what the broker sent, move every
        finished piece of work on. True if the broker sent anything."""
        events = dict(poller.poll(timeout=int(STOP_POLL * 1000)))
        if self._wake_r.fileno() in events:     # zmq.Poller names a plain socket by its fd
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self._wake_r.recv(4096)
        got = self.sock in events
        if got:
            self._receive()
        self._advance()
        return got

    def _wake(self, _: Future[Any]) -> None:
        """A pool thread's done callback: wake the loop's poll."""
        with contextlib.suppress(OSError):     # a wake is already pending, or we are gone
            self._wake_w.send(b"\0")

    # --- taking work --------------------------------------------------------------------------

    def _in_hand(self) -> int:
        """Messages holding a unit of credit: in a pipeline, ready, or being written."""
        return len(self.running) + len(self.ready) + sum(len(c.jobs) for c in self.commits if c)

    def _receive(self) -> None:
        """Everything the broker sent so far (bounded per turn): WORK starts its pipeline at
        once, whatever the other messages in hand are waiting on."""
        assert self.sock is not None
        for _ in range(self.credit + 64):
            frames = recv_now(self.sock)
            if frames is None:
                return
            job = self._decode(frames)
            if job is None:
                continue
            if self._in_hand() < self.credit:
                self._start(job)
            elif len(self.waiting) < self.credit:
                self.waiting.append(job)
            else:   # more than twice the credit: only a broker that lost count could send it
                log.event("worker_over_credit", "warning", lane=self.lane.value,
                          qid=job.env.qid, in_hand=self._in_hand(), waiting=len(self.waiting))
                self._send(worker_nack(job.reply_to, job.env.qid.encode(), NackReason.ERROR,
                                       "worker over credit"))

    def _decode(self, frames: list[bytes]) -> _Job | None:
        """A WORK message as a job; a bad envelope is NACKed, any other malformed message is
        logged and dropped, a broker HEARTBEAT is None (liveness already noted)."""
        try:
            kind = kind_of(frames)
            if kind is Kind.DISCONNECT:
                self.answered = True
            if kind is not Kind.WORK:
                return None
            reply_to, env_raw, body = expect(frames, 3)
        except WireError as e:
            log.event("wire_error", "warning", error=str(e))
            return None
        try:
            env = Envelope.decode(env_raw)
        except WireError as e:
            log.event("wire_error", "warning", error=str(e))
            self._send(worker_nack(reply_to, _qid_guess(env_raw), NackReason.ERROR,
                                   "bad envelope"))
            return None
        return _Job(reply_to, env, body)

    def _start(self, job: _Job) -> None:
        """The message's pipeline, here or in its own pool thread (the module docstring),
        bounded by its envelope deadline; progress until then (plus one liveness window)."""
        job.vouch = _vouch_until([job.env])
        budget_s = job.env.deadline - time.time() - PIPELINE_MARGIN
        job.future = Future()
        try:
            done = self.pipeline.process_now(job.env, job.body, budget_s)
        except Exception as e:     # as from a pool thread: NACKed and logged by _advance
            job.future.set_exception(e)
        else:
            if done is not None:
                job.future.set_result(done)
            else:
                job.future = self.pool.submit(self.pipeline.process, job.env, job.body, budget_s)
                job.future.add_done_callback(self._wake)
        self.running.append(job)

    # --- finishing work -----------------------------------------------------------------------

    def _advance(self) -> None:
        """Answer the finished commits; move finished pipelines to `ready` (a failed one is
        NACKed); start the next commits with what is ready, on the committers that are free
        (_commit); start waiting work as units of credit free up."""
        for i, commit in enumerate(self.commits):
            if commit is not None and commit.future.done():
                self.commits[i] = None
                self._answer(commit)
        still: list[_Job] = []
        for job in self.running:
            assert job.future is not None
            if not job.future.done():
                still.append(job)
                continue
            exc = job.future.exception()    # never let one message take the worker down
            if exc is not None:
                log.get().error("pipeline_error", exc_info=exc,
                                extra={"fields": {"qid": job.env.qid}})
                self._send(worker_nack(job.reply_to, job.env.qid.encode(), NackReason.ERROR,
                                       "processing failed"))
            else:
                job.done = job.future.result()
                self.ready.append(job)
        self.running = still
        if self.ready:
            self._commit()
        while self.waiting and self._in_hand() < self.credit:
            self._start(self.waiting.popleft())

    def _commit(self) -> None:
        """Group commits of the ready messages still within their deadline (an expired one is
        NACKed instead): on the first committer, when free, everything ready; on the second,
        when free, what is ready of PRIORITY_TIERS (commit_slots: ingress.policy.tiers)."""
        wall = time.time()
        ready: list[_Job] = []
        for job in self.ready:
            if job.env.deadline > wall:
                ready.append(job)
            else:
                # The acceptor has already answered 451: writing it now would only make a
                # duplicate when the client retries.
                self._send(worker_nack(job.reply_to, job.env.qid.encode(), NackReason.EXPIRED,
                                       "too late"))
        tiers = [tier_of(j.env.evidence.identity) for j in ready]
        batches = commit_slots(tiers, [c is None for c in self.commits])
        for slot, picked in enumerate(batches):
            if picked:
                self._start_commit(slot, [ready[i] for i in picked], [tiers[i] for i in picked])
        taken = {i for picked in batches for i in picked}
        self.ready = [j for i, j in enumerate(ready) if i not in taken]

    def _start_commit(self, slot: int, batch: list[_Job], tiers: list[Tier]) -> None:
        items = []
        for job in batch:
            assert job.done is not None
            items.append((job.done.spool_envelope(job.env), job.done.trace, job.done.body))
        write = self.committers[slot].submit(
            self._journaled if self.journal is not None
            and journals(self.lane, bool(self.serves), tiers) else self.spool.write_batch, items)
        self.commits[slot] = _Commit(batch, write, _vouch_until(j.env for j in batch),
                                     time.monotonic())
        write.add_done_callback(self._wake)

    def _journaled(self, items: list[tuple[Envelope, bytes, bytes]]) -> list[str | Exception]:
        """A commit for the journal (tiers.journals): durable in it (one fdatasync), the files
        in new/ after the 250; the usual write when they do not fit or the journal is off."""
        assert self.journal is not None
        if self.journal.broken is None:
            with contextlib.suppress(journal.JournalFull):
                return list(self.journal.append(items))
        return self.spool.write_batch(items)

    def _answer(self, commit: _Commit) -> None:
        """The ACK (or the NACK) of each message of a finished commit: only now is it durable."""
        try:
            results = commit.future.result()
        except Exception as e:   # write_batch reports disk errors per item; anything else:
            results = [e] * len(commit.jobs)   # every item failed, nothing is acknowledged
        dt = time.monotonic() - commit.started
        metrics.spooled(self.lane, sum(not isinstance(r, Exception) for r in results),
                        seconds=dt)
        for job, res in zip(commit.jobs, results, strict=True):
            env, p = job.env, job.done
            assert p is not None
            qid = env.qid.encode()
            if isinstance(res, Exception):
                log.event("spool_error", "error", qid=env.qid, error=str(res))
                self._send(worker_nack(job.reply_to, qid, NackReason.ERROR, "spool write failed"))
                continue
            self._send(worker_ack(job.reply_to, qid, res))
            if p.learn:
                self._send(share(LEARN_TOPIC, env.peer_ip, p.learn_domain, p.provider))
            elif p.unlearn:
                self._send(share(UNLEARN_TOPIC, env.peer_ip, "", p.provider))
                log.event("unlearn", qid=env.qid, peer=env.peer_ip, why=p.unlearn,
                          learned=env.evidence.learned, provider=p.provider)
            log.event("spooled", "debug", qid=env.qid, lane=env.lane.value, size=len(p.body),
                      rcpts=len(env.rcpts), batch=len(commit.jobs), write_ms=round(dt * 1000, 3),
                      dkim=",".join(f"{r.domain}:{r.result}" for r in p.dkim), learn=p.learn,
                      dmarc="" if p.dmarc is None else str(p.dmarc.result))

    def _send(self, frames: list[bytes]) -> None:
        assert self.sock is not None
        try:
            send_now(self.sock, frames)
        except zmq.Again:
            # The broker is not reading; its heartbeat check will nack on the acceptor's side
            # anyway, and the acceptor's own deadline answers 451. The file is already durable:
            # the client may retry and a duplicate is possible (documented).
            log.event("ack_dropped", "warning", frames=len(frames))

    def _shutdown(self, poller: zmq.Poller) -> None:
        """Leave cleanly: tell the broker, then finish what already arrived."""
        if self.sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            send_now(self.sock, disconnect())
        # Work the broker sent before it read the DISCONNECT is in our pipe, however long the
        # broker took to read it: finish it and everything in hand, heartbeating meanwhile (the
        # broker keeps us until our last ACK and ignores our beats once we have left). Done
        # when the broker has answered the DISCONNECT (nothing follows the answer) and nothing
        # is in hand; without an answer (the broker is gone) after BYE_WAIT; at the latest when
        # the work in hand is past its deadline (the broker NACKs it, its client gets a 4xx).
        start = time.monotonic()
        next_hb = 0.0
        while True:
            next_hb = self._tick(next_hb)
            self._step(poller)
            now = time.monotonic()
            if self._in_hand() or self.waiting:
                if not self._vouched(now):
                    break
            elif self.answered or now > start + BYE_WAIT:
                break
        self.sock.close(linger=1000)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for committer in self.committers:
            committer.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close(timeout=JOURNAL_CLOSE_WAIT)
        self._wake_r.close()
        self._wake_w.close()


def _vouch_until(envs: Iterable[Envelope]) -> float:
    """time.monotonic() until which work on these messages counts as progress: their latest
    envelope deadline (after which the acceptor has answered 451 anyway) plus one liveness
    window."""
    latest = max((e.deadline for e in envs), default=time.time())
    return time.monotonic() + (latest - time.time()) + LANE_HEARTBEAT * LANE_LIVENESS


def _qid_guess(env_raw: bytes) -> bytes:
    try:
        return str(orjson.loads(env_raw)["qid"]).encode()
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return b"?"


def run(cfg: Config, lane: str, index: int, hb: Any = None, slot: int = 0,
        serves: str = "") -> None:
    """`serves`: a fast worker dedicated to that tier (tiers.self_proven_workers), at
    tiers.self_proven_nice."""
    # Only the supervisor stops us (SIGUSR2), after the acceptors have drained (LANE_SIGNALS).
    def setup(_: child.Signals) -> child.Service[None]:
        w = Worker(cfg, Lane(lane), index, hb, slot, serves)
        return child.Service(w.run, lambda: setattr(w, "stopping", True),
                             lambda: log.event("worker_start", lane=lane, index=index,
                                               serves=serves),
                             lambda: log.event("worker_stop", lane=lane, index=index,
                                               serves=serves))
    name = f"worker-{lane}-{serves}-{index}" if serves else f"worker-{lane}-{index}"
    child.main(cfg, child.lane_spec(cfg, lane, name, dedicated=bool(serves)), setup)
