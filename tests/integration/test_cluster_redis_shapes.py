"""[cluster] redis answering in shapes the client does not expect (issue 19 item 7).

A Redis (or something posing as one: a proxy, a different server on the port, a key of another
type set by hand) may answer any command with any RESP value. ClusterState validates the shape
of every reply: a wrong one is Redis down (logged, the local fallback), never a TypeError or
AttributeError out of the cluster state, and never the end of its reconnect loop. Timestamps
read back are clamped (a learned entry "learned" in the future does not outlive its TTL).

The Redis here is FakeRedis: a tiny asyncio RESP2 server in the test, answering what
ClusterState sends (PING, SUBSCRIBE, ZRANGEBYSCORE, EVALSHA, MULTI/EXEC, ...) correctly unless
a test overrides a command's answer. No redis-server needed. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingress.core import config
from ingress.edge.cluster_state import ClusterState
from tests.kit.harness import Ingress, send_one, write_config

pytestmark = pytest.mark.timeout(120)


class Simple(str):
    """A RESP simple string (+OK) rather than a bulk string."""


class Err(str):
    """A RESP error (-ERR ...)."""


def encode(v: Any) -> bytes:
    if isinstance(v, Simple):
        return b"+" + v.encode() + b"\r\n"
    if isinstance(v, Err):
        return b"-" + v.encode() + b"\r\n"
    if v is None:
        return b"$-1\r\n"
    if isinstance(v, bool):
        return b":" + (b"1" if v else b"0") + b"\r\n"
    if isinstance(v, int):
        return b":" + str(v).encode() + b"\r\n"
    if isinstance(v, str | bytes):
        b = v.encode() if isinstance(v, str) else v
        return b"$" + str(len(b)).encode() + b"\r\n" + b + b"\r\n"
    if isinstance(v, list | tuple):
        return b"*" + str(len(v)).encode() + b"\r\n" + b"".join(encode(x) for x in v)
    raise TypeError(v)


Answer = Any | Callable[[list[str]], Any]

DEFAULTS: dict[str, Answer] = {
    "PING": Simple("PONG"), "CLIENT": Simple("OK"), "SELECT": Simple("OK"),
    "ZRANGEBYSCORE": [], "ZRANGE": ["n0/t0"], "EVALSHA": [1, 5000],
    "SCRIPT": "0" * 40, "ZADD": 1, "ZREMRANGEBYSCORE": 0, "ZREMRANGEBYRANK": 0, "EXPIRE": 1,
    "PEXPIRE": 1, "INCRBY": 1, "INCR": 1, "SET": Simple("OK"), "GET": None, "PUBLISH": 0,
    "HGETALL": [],                  # the learned entries' domains: an empty hash
}


class FakeRedis:
    """RESP2 over TCP on 127.0.0.1; `answers` override DEFAULTS per command (a value, or a
    function of the arguments). MULTI/EXEC queue and answer as Redis does. .seen counts the
    commands received."""

    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        self.answers = {**DEFAULTS, **(answers or {})}
        self.seen: Counter[str] = Counter()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)

    def answer(self, args: list[str]) -> Any:
        name = args[0].upper()
        self.seen[name] += 1
        if name == "SUBSCRIBE":
            return [["subscribe", ch, i + 1] for i, ch in enumerate(args[1:])]
        a = self.answers.get(name, Err("ERR unknown command"))
        return a(args) if callable(a) else a

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        queued: list[list[str]] | None = None
        try:
            for _ in range(100_000):
                line = await r.readline()
                if not line.startswith(b"*"):
                    return
                args = []
                for _ in range(min(int(line[1:]), 1024)):
                    n = int((await r.readline())[1:])
                    args.append((await r.readexactly(n + 2))[:-2].decode())
                name = args[0].upper()
                if name == "MULTI":
                    queued, out = [], Simple("OK")
                elif name == "EXEC" and queued is not None:
                    if "EXEC" in self.answers:
                        self.seen["EXEC"] += 1
                        out = self.answers["EXEC"]
                    else:
                        out = [self.answer(a) for a in queued]
                    queued = None
                elif queued is not None:
                    queued.append(args)
                    out = Simple("QUEUED")
                else:
                    out = self.answer(args)
                if name == "SUBSCRIBE":
                    w.write(b"".join(encode(x) for x in out))
                else:
                    w.write(encode(out))
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            w.close()


def cfg_for(tmp: Path, port: int) -> config.Config:
    f = tmp / "c.toml"
    write_config(f, {"cluster": {"redis": f"redis://127.0.0.1:{port}/0", "redis_timeout": 0.3,
                                 "redis_retry": 0.3},
                     "lanes.bulk": {"rate": 5.0, "burst": 3},
                     "classify": {"learned_ttl": 3600.0},
                     "spool": {"path": str(tmp / "spool"), "state_dir": str(tmp / "st")},
                     "supervisor": {"acceptors": 1}})
    return config.load(f)


async def connected(tmp: Path, fake: FakeRedis,
                    learned: list[tuple[str, float, str]] | None = None,
                    wait_up: bool = True) -> tuple[ClusterState, asyncio.Task[None]]:
    """A ClusterState on `fake` and its run() task; with wait_up, once it is up (at most 5 s:
    a fake whose answers fail the connect never brings it up)."""
    cs = ClusterState(cfg_for(tmp, fake.port), "t0", lambda ip: None,
                      lambda ip, at, domain: (learned if learned is not None else []).append(
                          (ip, at, domain)))
    task = asyncio.create_task(cs.run())
    deadline = time.monotonic() + 5
    while wait_up and not cs.up and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.02)
    return cs, task


async def stop(cs: ClusterState, task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await cs.close()


# EVALSHA (the bulk bucket, on the session path at every bulk MAIL FROM) answered wrongly.
BUCKET_SHAPES = {
    "integer": 7, "nil": None, "short": [1], "strings": ["yes", "lots"], "nested": [[1], [2]],
    "long": [1, 2, 3], "error": Err("WRONGTYPE Operation against a key"),
    "simple": Simple("OK"), "not-0-or-1": [5, 1000],
}


@pytest.mark.parametrize("shape", list(BUCKET_SHAPES))
def test_bucket_reply_of_a_wrong_shape_is_redis_down(tmp_path: Path, shape: str) -> None:
    async def go() -> None:
        fake = FakeRedis({"EVALSHA": BUCKET_SHAPES[shape]})
        await fake.start()
        cs, task = await connected(tmp_path, fake)
        try:
            assert cs.up, "the fake should pass the connect and the load"
            assert await cs.bulk_take() is None      # never an exception: the local share
            assert not cs.up                         # and Redis is down until run() rejoins
            assert await cs.bulk_take() is None      # at once while down
            assert not task.done()                   # the reconnect loop goes on
        finally:
            await stop(cs, task)
            await fake.stop()
    asyncio.run(go())


# Replies on the background path (load, heartbeat, flush) and the seam, answered wrongly: the
# reconnect loop must survive (a dead loop leaves `up` stuck) and Redis be marked down.
BACKGROUND_SHAPES: dict[str, dict[str, Answer]] = {
    "zrangebyscore-integer": {"ZRANGEBYSCORE": 5},
    "zrangebyscore-nested": {"ZRANGEBYSCORE": [["a", "b"], ["c"]]},
    "learned-score-garbage": {"ZRANGEBYSCORE": lambda a: ["192.0.2.5", "soon"]
                              if "WITHSCORES" in [x.upper() for x in a] else []},
    "exec-integer": {"EXEC": 5},
    "exec-short": {"EXEC": [1]},
    "heartbeat-members-integer": {"ZRANGE": 3},
    "incrby-list": {"INCRBY": ["x"]},
}


@pytest.mark.parametrize("case", list(BACKGROUND_SHAPES))
def test_background_reply_of_a_wrong_shape_never_kills_the_loop(tmp_path: Path,
                                                                case: str) -> None:
    async def go() -> None:
        fake = FakeRedis(BACKGROUND_SHAPES[case])
        await fake.start()
        # only incrby-list comes up (its shape fails later, at the flush); the others fail at
        # every connect, so waiting for `up` would only wait out the 5 s
        cs, task = await connected(tmp_path, fake, wait_up=case == "incrby-list")
        try:
            if case == "incrby-list":
                assert cs.up
                cs.conn_over("192.0.2.1", time.monotonic())     # counted: the flush sends it
            await asyncio.sleep(1.5)             # several reconnect rounds (redis_retry 0.3)
            assert not task.done(), task.exception() if task.done() else None
            assert fake.seen["PING"] >= 2, "down, and run() reconnects"
            if case != "incrby-list":            # fails again at every (re)connect
                assert not cs.up
                assert await cs.bulk_take() is None
        finally:
            await stop(cs, task)
            await fake.stop()
    asyncio.run(go())


def test_a_stop_order_a_library_turns_into_an_error_still_stops_the_loop(tmp_path: Path) -> None:
    """The reconnect loop's cancellation (an acceptor stopping) that lands in the pub/sub
    close, which reports it as a ConnectionError (as a client library may): run() ends
    cancelled, it does not go on reconnecting (one way the test above can hang)."""
    async def go() -> None:
        fake = FakeRedis({"ZRANGEBYSCORE": 5})      # every connect fails at the load
        await fake.start()
        cs, task = await connected(tmp_path, fake, wait_up=False)
        closing = asyncio.Event()
        real = cs.client.pubsub

        def pubsub(**kw: Any) -> Any:
            ps = real(**kw)

            async def aclose() -> None:
                closing.set()
                try:
                    await asyncio.sleep(5)
                except asyncio.CancelledError:
                    raise ConnectionError("closed while cancelled") from None

            ps.aclose = aclose
            return ps

        cs.client.pubsub = pubsub  # type: ignore[method-assign]
        try:
            await asyncio.wait_for(closing.wait(), 5)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=3)
            assert task in done, "run() went on after its stop order"
            assert task.cancelled()
        finally:
            await stop(cs, task)
            await fake.stop()
    asyncio.run(go())


SEAM_SHAPES: list[tuple[str, dict[str, Answer]]] = [
    ("get-list", {"GET": ["a", "b"]}),
    ("get-integer", {"GET": 12}),
    ("incr-nested", {"EXEC": [[1], 1]}),
    ("incr-string", {"EXEC": ["many", 1]}),
]


@pytest.mark.parametrize(("case", "answers"), SEAM_SHAPES, ids=[c for c, _ in SEAM_SHAPES])
def test_seam_reply_of_a_wrong_shape_is_redis_down(tmp_path: Path, case: str,
                                                   answers: dict[str, Answer]) -> None:
    async def go() -> None:
        fake = FakeRedis({k: v for k, v in answers.items() if k != "EXEC"})
        await fake.start()
        cs, task = await connected(tmp_path, fake)
        try:
            assert cs.up
            fake.answers.update(answers)         # EXEC also serves the heartbeat: now only
            if case.startswith("get"):
                assert await cs.lookup("deferral", "k") is None
            else:
                assert await cs.incr("share", "id", 5.0) is None
            assert not cs.up and not task.done()
        finally:
            await stop(cs, task)
            await fake.stop()
    asyncio.run(go())


def test_learned_timestamps_are_clamped(tmp_path: Path) -> None:
    """A learned entry's time comes back from Redis: one in the future (a skewed edge, a
    hand-made entry) would keep the client fast forever; it is taken as "now", and one older
    than the TTL as the TTL's start (Redis's own filter normally drops those)."""
    now = time.time()
    entries = ["192.0.2.5", str(now + 10 * 86400), "192.0.2.6", "inf",
               "192.0.2.7", str(now - 100), "192.0.2.8", str(now - 10 * 86400)]

    async def go() -> list[tuple[str, float, str]]:
        fake = FakeRedis({"ZRANGEBYSCORE": lambda a: entries
                          if "WITHSCORES" in [x.upper() for x in a] else []})
        await fake.start()
        learned: list[tuple[str, float, str]] = []
        cs, task = await connected(tmp_path, fake, learned)
        try:
            assert cs.up
        finally:
            await stop(cs, task)
            await fake.stop()
        return learned
    learned = asyncio.run(go())
    after = time.time()
    at = {ip: t for ip, t, _ in learned}
    assert set(at) == {"192.0.2.5", "192.0.2.6", "192.0.2.7", "192.0.2.8"}
    assert now - 1 <= at["192.0.2.5"] <= after and now - 1 <= at["192.0.2.6"] <= after
    assert at["192.0.2.7"] == pytest.approx(now - 100)
    assert now - 3600 - 1 <= at["192.0.2.8"] <= after - 3600 + 1


@contextlib.contextmanager
def fake_in_thread(answers: dict[str, Answer]) -> Iterator[FakeRedis]:
    """FakeRedis on its own loop in a thread, for a real ingress process to talk to."""
    fake = FakeRedis(answers)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(fake.start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


def test_bulk_mail_served_when_redis_answers_garbage(tmp_path: Path) -> None:
    """End to end: an ingress whose Redis answers the bulk bucket with an integer. Every bulk
    MAIL is served on the local share (250), not 451 forever; the acceptor logs Redis down."""
    with fake_in_thread({"EVALSHA": 7}) as fake, Ingress(tmp_path, {
            "cluster": {"redis": f"redis://127.0.0.1:{fake.port}/0", "redis_timeout": 0.5,
                        "redis_retry": 0.5},
            "lanes.bulk": {"rate": 50.0, "burst": 20},
            "supervisor": {"acceptors": 1}}) as ing:
        deadline = time.monotonic() + 20
        while not ing.events("cluster_state_up") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ing.events("cluster_state_up"), ing.log_tail()

        async def go() -> list[int]:
            out = []
            for i in range(6):
                msg = (f"From: x@nowhere.test\r\nTo: bob@example.test\r\nSubject: s{i}\r\n"
                       f"Message-ID: <s{i}@nowhere.test>\r\n\r\nHello.\r\n").encode()
                out.append((await send_one(ing.port, msg, sender="x@nowhere.test"))[0])
                await asyncio.sleep(0.3)          # across a reconnect (redis_retry 0.5)
            return out
        assert asyncio.run(go()) == [250] * 6, ing.log_tail()
        assert fake.seen["EVALSHA"] >= 1
        down = ing.events("cluster_state_down")
        assert down and any("EVALSHA" in d["error"] or "bucket" in d["error"] for d in down), \
            down


def test_record_timestamps_are_clamped(tmp_path: Path) -> None:
    """A deferral record's first/last times come back from Redis too: held to
    [now - admission.retry_ttl, now] before the record reaches the acceptor."""
    import orjson
    now = time.time()
    member = orjson.dumps({"x": "defer", "n": "othernode", "k": "key1", "o": "t9",
                           "f": now - 10 * 86400, "t": now + 10 * 86400,
                           "r": ["bob@example.test"]}).decode()
    got: list[tuple[bytes, dict[str, object]]] = []

    async def go() -> None:
        fake = FakeRedis({"ZRANGEBYSCORE": lambda a: [member] if a[1].endswith(":records")
                          else []})
        await fake.start()
        cfg = cfg_for(tmp_path, fake.port)
        cs = ClusterState(cfg, "t0", lambda ip: None, lambda ip, at, domain: None,
                          lambda fact, rec: got.append((fact, rec)))
        task = asyncio.create_task(cs.run())
        try:
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            await stop(cs, task)
            await fake.stop()
    asyncio.run(go())
    after = time.time()
    ttl = config.load(tmp_path / "c.toml").admission.retry_ttl
    assert len(got) == 1 and got[0][0] == b"defer"
    rec = got[0][1]
    assert now - ttl - 1 <= float(rec["f"]) <= after - ttl + 1      # type: ignore[arg-type]
    assert now - 1 <= float(rec["t"]) <= after                       # type: ignore[arg-type]
