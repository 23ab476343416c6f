"""The worker keeps heartbeating while it works (issue 9 item 6: a batch write over 1 s was
NACKed as worker_lost although it was stored), and stops vouching for itself once a commit, or
one message's pipeline, is past its deadline (so a wedged disk is still detected and the worker
restarted). Each message is ACKed when its own pipeline is done and it is durable (issue 17
item 5): a slow one holds nobody else's ACK.

What is real here: the Worker object and its run loop, its DEALER socket, a ROUTER bound where
the lane broker's backend would be (this test plays the broker), the spool. What is replaced:
the spool's batch write (or the per-message pipeline) by the real one behind a sleep, standing
in for a slow disk (fsync, like sleep, releases the GIL) or a slow message. A filesystem that is
really slow on demand is not available to an unprivileged test; the loop's behaviour does not
depend on why the call is slow.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from ingress.core import config
from ingress.core.wire import (
    LANE_HEARTBEAT,
    LANE_LIVENESS,
    Envelope,
    Kind,
    Lane,
    disconnect,
    kind_of,
    new_qid,
    work,
)
from ingress.core.wire_evidence import WireEvidence
from workers.lane.worker import Worker

WINDOW = LANE_HEARTBEAT * LANE_LIVENESS          # the broker's liveness window (1 s)
BODY = b"From: a@example.org\r\nSubject: slow\r\n\r\nbody\r\n"
# A message whose pipeline may wait on DNS (a DKIM key lookup): the only kind a pool thread
# runs; the others are prepared on the worker's loop (Pipeline.process_now).
SIGNED = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=AAAA; b=AAAA\r\n"
          + BODY)


class Lane_:
    def __init__(self, root: Path, which: Lane = Lane.BULK, serves: str = "") -> None:
        self.which = which
        self.state = Path(tempfile.mkdtemp(prefix="si-hb-", dir="/tmp"))   # short ipc paths
        (self.state / "run").mkdir()
        toml = root / "ingress.toml"
        # DNS on loopback only: a nameserver that is not there (the DKIM-signed messages'
        # key lookups fail at once); DMARC off, so unsigned mail never waits on DNS.
        toml.write_text(f'[spool]\npath = "{root / "spool"}"\nstate_dir = "{self.state}"\n'
                        f'[lanes.{which.value}]\ncredit = 4\n'
                        '[classify]\nnameservers = ["127.0.0.1@9"]\n[dmarc]\nenabled = false\n')
        self.cfg = config.load(toml)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(self.cfg.ipc(f"{which.value}-back"))
        self.hb: list[float] = [0.0]
        self.answered: list[tuple[bytes, Kind]] = []     # (qid, ACK | NACK) in arrival order
        self.worker = Worker(self.cfg, which, 0, hb=self.hb, slot=0, serves=serves)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        assert self.router.poll(5000), "no READY from the worker"
        self.ident, *frames = self.router.recv_multipart()
        assert kind_of(frames) is Kind.READY

    def send(self, n: int, deadline_s: float, body: bytes = BODY,
             identity: str = "") -> list[bytes]:
        """`n` WORK messages (vouched for by `identity`: its tier); their qids."""
        now = time.time()
        qids = []
        for _ in range(n):
            env = Envelope(qid=new_qid(), lane=self.which, peer_ip="192.0.2.1", peer_port=1,
                           helo="h.example", mail_from="a@example.org",
                           rcpts=("b@example.test",), received_at=now,
                           deadline=now + deadline_s,
                           evidence=WireEvidence(identity=identity))
            self.router.send_multipart([self.ident, *work(b"acceptor", env.encode(), body)])
            qids.append(env.qid.encode())
        return qids

    def collect(self, replies: int, limit: float) -> tuple[list[tuple[float, Kind]], float]:
        """(time, kind) of everything the worker sends until `replies` ACK/NACKs arrived, and
        the longest time the supervisor's heartbeat slot went without an update meanwhile.
        The qid of each ACK/NACK is in self.answered, in order."""
        got: list[tuple[float, Kind]] = []
        t_end = time.monotonic() + limit
        stale = 0.0
        def done() -> bool:
            return sum(k in (Kind.ACK, Kind.NACK) for _, k in got) >= replies

        while time.monotonic() < t_end and not done():
            # Until the worker's first beat the slot holds its initial 0.0, which says nothing
            # about a gap (on a loaded machine the thread may not have started yet).
            if self.hb[0] > 0:
                stale = max(stale, time.monotonic() - self.hb[0])
            if self.router.poll(50):
                _, *frames = self.router.recv_multipart()
                got.append((time.monotonic(), kind_of(frames)))
                if got[-1][1] in (Kind.ACK, Kind.NACK):
                    self.answered.append((frames[3], got[-1][1]))
        return got, stale

    def in_new(self, n: int, limit: float = 10.0) -> int:
        """How many files new/ holds once it holds `n` (what a journal ACKed follows the ACK),
        or after `limit` seconds."""
        t_end = time.monotonic() + limit
        while (have := len(list(self.worker.spool.new.iterdir()))) < n \
                and time.monotonic() < t_end:
            time.sleep(0.02)
        return have

    def close(self) -> None:
        self.worker.stopping = True
        self.thread.join(10)
        self.router.close(0)
        self.ctx.term()
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture
def lane(tmp_path: Path) -> Iterator[Lane_]:
    ln = Lane_(tmp_path)
    yield ln
    ln.close()


def slow(fn: Any, seconds: float) -> Any:
    def wrapper(*args: Any, **kw: Any) -> Any:
        time.sleep(seconds)
        return fn(*args, **kw)
    return wrapper


def slow_writes(lane: Lane_, seconds: float, when: Any = lambda items: True) -> None:
    """The worker's durable writes (its journal's records, the spool's files of their own)
    behind a sleep for a commit of `items` that `when` picks: a busy disk."""
    def behind_a_sleep(fn: Any) -> Any:
        def wrapper(items: list[Any]) -> Any:
            if when(items):
                time.sleep(seconds)
            return fn(items)
        return wrapper

    for owner, name in ((lane.worker.spool, "write_batch"), (lane.worker.journal, "append")):
        if owner is not None:
            setattr(owner, name, behind_a_sleep(getattr(owner, name)))


def max_gap(events: list[tuple[float, Kind]], start: float) -> float:
    times = [start] + [t for t, _ in events]
    return max(b - a for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("stage", ["write", "process"])
def test_heartbeats_continue_during_slow_work(lane: Lane_, stage: str) -> None:
    if stage == "write":
        slow_writes(lane, 3 * WINDOW)
    else:   # a message whose pipeline waits (a DKIM key lookup)
        lane.worker.pipeline.process = slow(lane.worker.pipeline.process, 3 * WINDOW)
    start = time.monotonic()
    lane.send(3, deadline_s=20.0, body=SIGNED)
    events, stale = lane.collect(replies=3, limit=20.0)
    kinds = [k for _, k in events]
    assert kinds.count(Kind.ACK) == 3, kinds
    assert Kind.HEARTBEAT in kinds
    assert max_gap(events, start) < WINDOW, events      # the broker never saw it go silent
    assert lane.hb[0] > 0, "the supervisor's slot was never written"
    assert stale < WINDOW                               # nor did the supervisor
    assert lane.in_new(3) == 3


def test_heartbeats_stop_once_the_batch_is_past_its_deadline(lane: Lane_) -> None:
    """A write that outlives the batch's deadline looks like a hang: the worker stops
    heartbeating (the broker NACKs its batch, the supervisor may restart it), and resumes when
    the write returns."""
    slow_writes(lane, 4 * WINDOW)
    start = time.monotonic()
    lane.send(1, deadline_s=WINDOW)
    events, _ = lane.collect(replies=1, limit=20.0)
    assert [k for _, k in events].count(Kind.ACK) == 1
    assert max_gap(events, start) >= WINDOW
    # and it heartbeats again afterwards
    more, _ = lane.collect(replies=1, limit=2 * WINDOW)
    assert Kind.HEARTBEAT in [k for _, k in more]


def slow_for(fn: Any, marker: bytes, seconds: float) -> Any:
    """`fn` (Pipeline.process) behind a sleep for the messages whose body holds `marker`."""
    def wrapper(env: Any, body: bytes, *args: Any) -> Any:
        if marker in body:
            time.sleep(seconds)
        return fn(env, body, *args)
    return wrapper


SLOW = SIGNED.replace(b"Subject: slow", b"Subject: slow DKIM")


def test_each_message_is_acked_when_its_own_pipeline_is_done(lane: Lane_) -> None:
    """Issue 17 item 5: a message whose pipeline is slow (a DKIM key that never answers) holds
    nobody else's ACK: the messages sent after it are stored and ACKed at once, while the
    worker keeps heartbeating; the slow one is ACKed when it is done."""
    lane.worker.pipeline.process = slow_for(lane.worker.pipeline.process, b"slow DKIM",
                                            3 * WINDOW)
    start = time.monotonic()
    (slow_qid,) = lane.send(1, deadline_s=20.0, body=SLOW)
    time.sleep(0.2)                            # it is in its pipeline
    quick = lane.send(3, deadline_s=20.0)
    events, stale = lane.collect(replies=3, limit=20.0)
    quick_done = time.monotonic() - start
    assert sorted(q for q, _ in lane.answered) == sorted(quick), lane.answered
    assert all(k is Kind.ACK for _, k in lane.answered)
    assert quick_done < 2 * WINDOW, quick_done          # not after the slow one (3 windows)
    more, stale2 = lane.collect(replies=1, limit=20.0)
    assert lane.answered[-1] == (slow_qid, Kind.ACK)
    assert max_gap(events + more, start) < WINDOW and max(stale, stale2) < WINDOW
    assert lane.in_new(4) == 4


def test_heartbeats_stop_once_a_message_is_past_its_own_deadline(lane: Lane_) -> None:
    """Hang detection is per message: a pipeline that outlives its own message's deadline
    stops the heartbeats even though another message in hand has a later deadline; the
    late message is NACKed expired, and the heartbeats resume."""
    lane.worker.pipeline.process = slow_for(lane.worker.pipeline.process, b"slow DKIM",
                                            4 * WINDOW)
    start = time.monotonic()
    (hung,) = lane.send(1, deadline_s=WINDOW, body=SLOW)
    (fine,) = lane.send(1, deadline_s=20.0)
    events, _ = lane.collect(replies=2, limit=20.0)
    assert lane.answered == [(fine, Kind.ACK), (hung, Kind.NACK)], lane.answered
    assert max_gap(events, start) >= WINDOW, events
    more, _ = lane.collect(replies=1, limit=2 * WINDOW)
    assert Kind.HEARTBEAT in [k for _, k in more]


def test_the_wake_is_drained_so_an_idle_worker_sleeps_in_its_poll(lane: Lane_) -> None:
    """A finished pipeline or commit wakes the loop's poll through a socket pair; the loop must
    read the wake, or the poll returns at once forever and the idle worker spins a whole core
    (zmq.Poller names a plain socket by its descriptor: it was looked up by the object)."""
    lane.send(1, deadline_s=10)
    got, _ = lane.collect(1, 10)
    assert [k for _, k in got if k in (Kind.ACK, Kind.NACK)] == [Kind.ACK]
    time.sleep(0.5)                     # a few turns of the loop, with nothing to do
    with pytest.raises(BlockingIOError):
        lane.worker._wake_r.recv(16)    # nothing left unread


def test_a_leaving_worker_does_the_work_that_crossed_its_disconnect(lane: Lane_) -> None:
    """A stopping worker (SIGUSR2: a reload replaces it) says DISCONNECT and leaves only once
    the broker has answered it (nothing follows the answer on the pipe) and nothing is in hand.
    A broker slow to read the DISCONNECT (a reload starts processes: the CPU is contended) sent
    WORK after it; the worker used to leave after 0.1 s of quiet, and that message was NACKed
    worker_lost a liveness window later (issue 20: 451 on a reload)."""
    lane.worker.stopping = True
    t_end = time.monotonic() + 5
    kinds: list[Kind] = []
    while Kind.DISCONNECT not in kinds and time.monotonic() < t_end:
        if lane.router.poll(50):
            kinds.append(kind_of(lane.router.recv_multipart()[1:]))
    assert Kind.DISCONNECT in kinds
    time.sleep(0.8)                                # the broker is busy elsewhere
    (qid,) = lane.send(1, deadline_s=30)
    lane.router.send_multipart([lane.ident, *disconnect()])
    got, _ = lane.collect(1, limit=10)
    assert (qid, Kind.ACK) in lane.answered, got
    lane.thread.join(5)
    assert not lane.thread.is_alive(), "it leaves once answered and done"


def slow_for_spam(lane: Lane_) -> None:
    """The worker's durable writes behind a sleep for a commit holding a "spam" message."""
    slow_writes(lane, 3 * WINDOW, lambda items: any(b"spam" in body for _, _, body in items))


SPAM = BODY.replace(b"slow", b"spam")


def test_the_operators_mail_never_waits_behind_a_lower_tiers_commit(lane: Lane_) -> None:
    """Issue 17 (the fast lane carries the self-proven tier's mail too): while a commit of a
    self-proven domain's messages is being written (slow here: a busy disk), the operator's
    message is committed by the second committer and ACKed at once, not after it."""
    slow_for_spam(lane)
    spam = lane.send(3, deadline_s=20.0, body=SPAM, identity="org:spam.test")
    time.sleep(0.3)                                  # their commit is being written
    start = time.monotonic()
    (ours,) = lane.send(1, deadline_s=20.0, identity="allow:192.0.2.0/24")
    lane.collect(replies=1, limit=20.0)
    assert lane.answered == [(ours, Kind.ACK)], lane.answered
    assert time.monotonic() - start < 2 * WINDOW
    lane.collect(replies=3, limit=20.0)
    assert sorted(q for q, _ in lane.answered[1:]) == sorted(spam)


def test_a_lower_tiers_mail_never_takes_the_operators_committer(lane: Lane_) -> None:
    """Sent while a self-proven commit is being written, another self-proven domain's message
    waits for the first committer (the second stays free for the operator's)."""
    slow_for_spam(lane)
    lane.send(2, deadline_s=20.0, body=SPAM, identity="org:spam.test")
    time.sleep(0.3)
    (late,) = lane.send(1, deadline_s=20.0, identity="org:other.test")
    lane.collect(replies=1, limit=2 * WINDOW)
    assert lane.answered == [], lane.answered        # behind the running commit
    lane.collect(replies=3, limit=20.0)
    assert late in {q for q, _ in lane.answered}, lane.answered


@pytest.mark.parametrize(("which", "serves", "identity"), [
    (Lane.FAST, "", "allow:192.0.2.0/24"),          # the operator's fast worker: the operator's
    (Lane.FAST, "self-proven", "org:spam.test"),   # the self-proven tier's worker: its tier's
    (Lane.BULK, "", ""),                           # a bulk worker: bulk mail (issue 20)
])
def test_a_worker_acks_the_mail_it_is_for_from_its_journal(tmp_path: Path, which: Lane,
                                                            serves: str, identity: str) -> None:
    """A worker's mail is ACKed once it is in its journal (the spool's own write is not used:
    it fails here) and reaches new/ after the ACK; the operator's fast worker writes a
    self-proven domain's mail the usual way (its journal is the operator's reserve)."""
    ln = Lane_(tmp_path, which, serves)
    try:
        ln.worker.spool.write_batch = lambda items: [OSError("not this way")] * len(items)
        (ours,) = ln.send(1, deadline_s=20.0, identity=identity)
        ln.collect(replies=1, limit=10.0)
        assert ln.answered == [(ours, Kind.ACK)], ln.answered
        assert ln.in_new(1) == 1
        (name,) = [p.name for p in ln.worker.spool.new.iterdir()]
        assert ours.decode() in name
        if which is Lane.BULK or serves:
            return
        (spam,) = ln.send(1, deadline_s=20.0, body=SPAM, identity="org:spam.test")
        ln.collect(replies=1, limit=10.0)
        assert ln.answered[1] == (spam, Kind.NACK), ln.answered
    finally:
        ln.close()


def test_mail_that_cannot_wait_on_dns_is_prepared_without_a_pool_thread(lane: Lane_) -> None:
    """Issue 20: a message without a DKIM-Signature (DMARC off here) is prepared on the loop
    (Pipeline.process_now): two thread hand-offs less. A signed one still goes to the pool,
    where its key lookups may wait without holding the loop, and so does a large one (its
    header work grows with it: a hostile client's 10 MB of header fields would stop the loop
    for 0.2 s)."""
    submitted: list[bytes] = []
    submit = lane.worker.pool.submit

    def counting(fn: Any, env: Any, body: bytes, *args: Any) -> Any:
        submitted.append(body)
        return submit(fn, env, body, *args)

    lane.worker.pool.submit = counting  # type: ignore[method-assign]
    plain = lane.send(3, deadline_s=20.0)
    lane.collect(replies=3, limit=20.0)
    assert lane.answered == [(q, Kind.ACK) for q in plain] and submitted == []
    big = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 990) for i in range(70)) + BODY
    (large,) = lane.send(1, deadline_s=20.0, body=big)
    lane.collect(replies=1, limit=20.0)
    assert lane.answered[-1] == (large, Kind.ACK) and submitted == [big]
    # last: its key lookup waits out the resolver's timeout (nothing answers on port 9), and
    # this test, playing the broker, sends no heartbeats meanwhile (the worker reconnects)
    (signed,) = lane.send(1, deadline_s=20.0, body=SIGNED)
    lane.collect(replies=1, limit=20.0)
    assert lane.answered[-1] == (signed, Kind.ACK) and submitted == [big, SIGNED]
    assert lane.in_new(5) == 5
