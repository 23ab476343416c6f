"""Shared admission state in Redis: one acceptor's connection, its health and its loop.

Purpose
    The Redis half of ingress.edge.cluster_state that knows nothing of penalties, learned
    entries or buckets: the client, whether Redis is up (the circuit), the one wrapper every
    call on the session path goes through, bounded fire-and-forget calls, the background loop
    (connect, load, subscribe, heartbeat, watch), the heartbeat that counts the edges, and the
    seam (generic, bounded records for state built elsewhere). ClusterState subclasses RedisLink
    and fills in its hooks; the encoding (keys, scripts, reply checks) is ingress.edge.
    cluster_redis.

API
    RedisLink(cfg, ident)           the client (from cluster.redis; nothing connects yet)
    up, since                       Redis reachable (False at start), and since when (monotonic)
    node                            this edge: a hash of the host name and spool.state_dir
    key(*parts) -> str              prefix:part:...
    run()                           background task: connect, subscribe to channels(), _load(),
                                    up, then each turn (at most TICK apart): heartbeat every
                                    cluster.redis_retry, _tick(), a pub/sub message to
                                    _fact(channel, data); on any failure: down, retry at
                                    every multiple of cluster.redis_retry of the wall clock
                                    (all acceptors of all edges at the same instants)
    retry_delay(now, retry) -> float  seconds to that next multiple
    _call(make, shape) -> (ok, res) one call on the session path (below)
    _spawn(coro)                    fire and forget, at most MAX_INFLIGHT in flight
    edges() -> int                  edges sharing the cap: max(cluster.edges, edges seen alive
                                    by their heartbeats)
    record(kind, key, ttl, value="1") -> bool       SET prefix:kind:key value EX ttl
    lookup(kind, key) -> str | None                 GET (None: absent, or Redis down)
    incr(kind, key, ttl) -> int | None              INCR, EXPIRE on first use (None: down)
    close()                         cancels the calls in flight, closes the connections
    Hooks for the subclass: channels(), _load(), _tick(), _fact() (each a no-op here).

Failure modes
    No Redis error, timeout or malformed reply is ever raised to a session: any exception from
    a call, BadReply included, is Redis being down, on the session path (_call) as in the
    background loop (run(), which never dies of one: it goes down and retries). A bad reply
    while connecting is logged as cluster_state_bad_reply (at most once a minute per acceptor).
    A failed or late call (over cluster.redis_timeout) marks Redis down: cluster_state_down is
    logged once, the smtp_ingress_cluster_state_up gauge drops to 0, until run() reconnects
    (cluster_state_up logged, the subclass's _load() run again). While down, calls return at
    once (no connect attempt on the session path). A fire-and-forget call beyond MAX_INFLIGHT
    is dropped and counted in smtp_ingress_cluster_state_fallbacks.

Limits
    One client of at most 64 connections per acceptor; no retries inside redis-py (the loop is
    the retry). Every wait of the loop has a deadline (20 x cluster.redis_timeout, at least
    1 s). The heartbeat set holds at most MAX_EDGE_ENTRIES acceptors; a seam kind or key is at
    most MAX_KEY bytes, a value 1024.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ingress.core import log, metrics
from ingress.core.config import Config
from ingress.edge.cluster_redis import (
    MAX_KEY,
    RESERVED,
    BadReply,
    reply_int,
    reply_list,
    reply_str_or_none,
    reply_strs,
    want,
)

TICK = 0.1                # seconds: the longest wait for a pub/sub message, one turn of run()
MAX_EDGE_ENTRIES = 4096   # acceptors (of all edges) in the heartbeat set
MAX_INFLIGHT = 1024       # fire-and-forget records (penalties, learned) in flight at once
BAD_REPLY_LOG_EVERY = 60.0  # seconds between two cluster_state_bad_reply lines (connecting)


def retry_delay(now: float, retry: float) -> float:
    """Seconds from `now` (wall clock) to the next multiple of `retry`, at most `retry`: every
    acceptor of every edge (their clocks kept by NTP) tries Redis again at the same instants,
    so after an outage they rejoin the shared bucket together. Retrying `retry` after its own
    failure, one would stay on its local share for up to `retry` beside others already back on
    the shared bucket, and their sum is over the cap."""
    return retry - (now % retry) if retry > 0 else 0.0


class RedisLink:
    """One acceptor's connection to the shared Redis; single-threaded (the acceptor's loop)."""

    def __init__(self, cfg: Config, ident: str) -> None:
        c = cfg.cluster
        self.cfg, self.ident = cfg, ident
        self.timeout, self.retry, self.prefix = c.redis_timeout, c.redis_retry, c.redis_prefix
        self.client = aioredis.Redis.from_url(
            c.redis, socket_timeout=c.redis_timeout, socket_connect_timeout=c.redis_timeout,
            retry_on_timeout=False, retry=Retry(NoBackoff(), 0), health_check_interval=0,
            max_connections=64, decode_responses=True)
        self.up = False
        self.since = time.monotonic()
        metrics.cluster_state(False)
        self._edges = 1
        # this edge: its host and state dir (two edges on one machine are two nodes)
        self.node = hashlib.sha256(
            f"{socket.gethostname()}/{cfg.spool.state_dir}".encode()).hexdigest()[:12]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bad_log = log.Throttle(BAD_REPLY_LOG_EVERY, 4)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- what a subclass adds -----------------------------------------------------------------

    def channels(self) -> list[str]:
        """The pub/sub channels run() subscribes to."""
        return []

    async def _load(self) -> None:
        """On every (re)connect, before Redis counts as up: read the shared state."""

    async def _tick(self) -> None:
        """Once a turn of the loop (at most TICK apart) while up."""

    def _fact(self, channel: str, data: str) -> None:
        """One pub/sub message (both strings, checked)."""

    # --- health -------------------------------------------------------------------------------

    def _down(self, why: str) -> None:
        if self.up:
            self.up = False
            self.since = time.monotonic()
            log.event("cluster_state_down", "warning", acceptor=self.ident, error=why[:200],
                      fallback="local limits: this edge's share of the bulk cap, local "
                               "penalties and learned cache")
            metrics.cluster_state(False)

    def _up(self) -> None:
        if not self.up:
            self.up = True
            log.event("cluster_state_up", acceptor=self.ident,
                      down_s=round(time.monotonic() - self.since, 2))
            self.since = time.monotonic()
            metrics.cluster_state(True)

    def _failed(self, e: Exception) -> None:
        """Any exception from Redis or from checking its reply: Redis is down."""
        why = f"{type(e).__name__}: {e}"
        if not self.up and isinstance(e, BadReply):
            quiet = self._bad_log.due("bad", time.monotonic())
            if quiet is not None:
                log.event("cluster_state_bad_reply", "warning", acceptor=self.ident,
                          error=why[:200], suppressed=quiet)
        self._down(why)

    async def _call(self, make: Callable[[], Awaitable[Any]],
                    shape: Callable[[Any], Any] = lambda res: res) -> tuple[bool, Any]:
        """(True, shape(result)), or (False, None) when Redis is down (at once) or the call
        fails, overruns cluster.redis_timeout or answers what `shape` refuses (then it is
        marked down). Every call on the session path goes through here."""
        if not self.up:
            return False, None
        try:
            async with asyncio.timeout(self.timeout):
                res = await make()
            return True, shape(res)
        except Exception as e:          # whatever it is, Redis is down
            self._failed(e)
            return False, None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire and forget, bounded: beyond MAX_INFLIGHT calls in flight (Redis slow under a
        flood of facts) a new one is dropped (the fact stays local) and counted."""
        if len(self._tasks) >= MAX_INFLIGHT:
            coro.close()
            metrics.cluster_fallback()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- edges --------------------------------------------------------------------------------

    def edges(self) -> int:
        """Edges sharing the cap: cluster.edges, or more if the heartbeats counted more."""
        return max(self.cfg.cluster.edges, self._edges)

    async def _heartbeat(self) -> None:
        """Say this acceptor is alive; count the edges (distinct nodes) alive: one sorted set
        of "node/acceptor" by last heartbeat, entries older than 3 x redis_retry dropped."""
        now = time.time()
        key = self.key("edges")
        async with self.client.pipeline(transaction=True) as p:
            p.zadd(key, {f"{self.node}/{self.ident}": now})
            p.zremrangebyscore(key, "-inf", now - 3 * self.retry)
            p.zremrangebyrank(key, 0, -(MAX_EDGE_ENTRIES + 1))
            p.expire(key, max(1, int(6 * self.retry)))
            p.zrange(key, 0, -1)
            res = reply_list(await p.execute(), "heartbeat", 5)
        alive = reply_strs(res[-1], "edges (ZRANGE)")
        self._edges = max(1, len({m.split("/", 1)[0] for m in alive}))

    # --- the connection loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe, load, heartbeat once, and only then count as up (a Redis that
        fails any step of the join never flaps up); then watch: pub/sub messages and a
        heartbeat every cluster.redis_retry. Any failure: down, try again at the next multiple
        of cluster.redis_retry of the wall clock (retry_delay)."""
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(max(1.0, 20 * self.timeout)):
                    await self.client.ping()
                    await pubsub.subscribe(*self.channels())
                await self._load()
                async with asyncio.timeout(max(1.0, 20 * self.timeout)):
                    await self._heartbeat()
                self._up()
                await self._watch(pubsub, time.monotonic() + self.retry)
            except asyncio.CancelledError:
                raise
            except Exception as e:      # any failure: down, and try again
                self._failed(e)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout):
                        await pubsub.aclose()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # a stop order that a library under us turned into an error (a cancelled
                # close reported as ConnectionError): we were told to stop, not to retry
                raise asyncio.CancelledError
            await asyncio.sleep(retry_delay(time.time(), self.retry))

    async def _watch(self, pubsub: Any, next_beat: float) -> None:
        while self.up:
            now = time.monotonic()
            if now >= next_beat:
                async with asyncio.timeout(max(1.0, 20 * self.timeout)):
                    await self._heartbeat()
                next_beat = now + self.retry
            async with asyncio.timeout(max(1.0, 20 * self.timeout)):
                await self._tick()
            async with asyncio.timeout(TICK + 1.0):
                msg = await pubsub.get_message(timeout=TICK)
            if msg is None:
                continue
            want(isinstance(msg, dict), "pub/sub message", msg)
            if msg.get("type") == "message":
                channel, data = msg.get("channel"), msg.get("data")
                want(isinstance(channel, str) and isinstance(data, str), "pub/sub message",
                     msg)
                self._fact(str(channel), str(data))

    # --- the seam: generic, bounded records for state built elsewhere ---------------------------

    def _seam_key(self, kind: str, key: str) -> str | None:
        if not kind or not key or len(kind) > MAX_KEY or len(key) > MAX_KEY or ":" in kind \
                or kind in RESERVED:
            return None
        return self.key(kind, key)

    async def record(self, kind: str, key: str, ttl: float, value: str = "1") -> bool:
        """Remember `key` of `kind` for ttl seconds (e.g. kind "deferral", key the triplet
        hash). False: not recorded (Redis down, or the key is out of bounds)."""
        k = self._seam_key(kind, key)
        if k is None or ttl <= 0 or len(value) > 1024:
            return False
        ok, _ = await self._call(lambda: self.client.set(k, value, px=int(ttl * 1000)),
                                 lambda res: want(res is True, "SET", res))
        return bool(ok)

    async def lookup(self, kind: str, key: str) -> str | None:
        """The value recorded for `key` of `kind`, or None (absent, expired, or Redis down: a
        caller treats None as "unknown" and decides locally)."""
        k = self._seam_key(kind, key)
        if k is None:
            return None
        ok, res = await self._call(lambda: self.client.get(k),
                                   lambda res: reply_str_or_none(res, "GET"))
        return res if ok else None

    async def incr(self, kind: str, key: str, ttl: float) -> int | None:
        """Count `key` of `kind` in a window of ttl seconds starting at its first count (e.g.
        an identity's fast-lane messages, or one IP's connections). None: Redis down."""
        k = self._seam_key(kind, key)
        if k is None or ttl <= 0:
            return None

        async def go() -> int:
            async with self.client.pipeline(transaction=True) as p:
                p.incr(k)
                p.pexpire(k, int(ttl * 1000), nx=True)
                res = reply_list(await p.execute(), "INCR", 2)
            return reply_int(res[0], "INCR")

        ok, res = await self._call(go)
        return res if ok else None

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await self.client.aclose()
