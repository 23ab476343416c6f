"""Shared admission state in Redis ([cluster] redis): what every edge of a cluster must agree on.

Purpose
    Several edge hosts (each with its own acceptors) share one global bulk cap, the early-talker
    penalties and the learned allow cache through one Redis. Each acceptor process holds one
    ClusterState. Connect-time admission is synchronous and must stay cheap, so nothing there
    waits for Redis: penalties and learned entries are *mirrored* into the acceptor's own
    penalty box (ingress.edge.sessions) and learned store (ingress.edge.learned_store) over
    pub/sub, and loaded whole when the connection comes (back) up. The one call on the session path
    is the bulk bucket at a bulk transaction's first RCPT TO (one EVALSHA), which is async and
    bounded by cluster.redis_timeout.
    Without [cluster] redis nothing here exists (ClusterState.create returns None) and the
    acceptor is fully in-process, as on one host.

API
    ClusterState.create(cfg, ident, on_penalty, on_learn, on_record=None, on_unlearn=None)
        -> ClusterState | None
        on_penalty(ip) / on_learn(key, at, domain) / on_unlearn(key)   how a mirrored fact
                                    enters this acceptor (key: a learned entry's network,
                                    ingress.policy.classify.LearnedAllow.key; domain: what the
                                    entry was learned for, its identity)
    up                              bool: Redis reachable (health; False at start)
    run()                           background task: connect, load the mirrors, subscribe,
                                    heartbeat this edge; on any failure: down, retry every
                                    cluster.redis_retry seconds (the circuit)
    bulk_take() -> bool | None      the global bulk bucket (Lua, atomic): True a token was
                                    taken, False it is empty; None: Redis down or slow - the
                                    caller uses its local share (lanes.bulk_mail_admitted)
    bulk_spent(now) -> bool         the bucket was empty at its last use (< 1 s ago)
    share_penalty(ip)               record and publish an early-talker penalty (fire and forget)
    share_learned(key, domain)      record and publish a learned allow entry (fire and forget)
    share_unlearned(key)            remove a learned entry and publish that (fire and forget)
    forget_learned(keys)            remove entries the local quotas evicted (not published:
                                    every edge applies the same quotas)
    share_record(fact, doc) -> bool a deferral record fact (retry evidence) for every edge:
                                    kept in {prefix}:records, published; False: Redis down
    conn_over(key, now) -> bool     a bulk connection attempt from IP key `key`: counted for
                                    the cluster, and is that key over the cluster's per-IP
                                    rate (by the last flush; no Redis call; False when down)
    edges() -> int                  edges sharing the cap: max(cluster.edges, edges seen
                                    alive by their heartbeats)
    The seam for state others build (identity shares, deferral records), generic and bounded:
    record(kind, key, ttl, value="1") -> bool       SET prefix:kind:key value EX ttl
    lookup(kind, key) -> str | None                 GET (None: absent, or Redis down)
    incr(kind, key, ttl) -> int | None              INCR, EXPIRE on first use (None: down)
    close()                         closes the connections
    BadReply                        a reply of a shape its command never returns (RedisError)
    clamp_time(t, now, ttl)         a time read back, held to [now - ttl, now]

Keys (prefix = cluster.redis_prefix; all bounded):
    {prefix}:bulk                   hash {tokens, ts}: the global bulk bucket (lanes.bulk.rate,
                                    lanes.bulk.burst), refilled by Redis's own clock (TIME)
    {prefix}:penalty                sorted set ip -> until (unix s); trimmed to
                                    MAX_MIRRORED entries, expired entries purged on write
    {prefix}:learned                sorted set key -> learned at (unix s); trimmed to
                                    classify.learned_max, entries older than learned_ttl purged
                                    (a member "ip domain" of an older version still loads)
    {prefix}:learned:domains        hash key -> the domain it was learned for (kept with the set)
    {prefix}:conn:{window}:{ipkey}  attempts from one IP key in one CONN_WINDOW, all edges
                                    (INCRBY from each acceptor every CONN_FLUSH; EX 3 s)
    {prefix}:edges                  sorted set "node/acceptor" -> last heartbeat (unix s),
                                    older than 3 x redis_retry dropped; node: a hash of the
                                    host name and spool.state_dir
    {prefix}:{kind}:{key}           the seam's keys (kind and key length-checked; the kinds
                                    above are RESERVED)
    channels {prefix}:chan:penalty, {prefix}:chan:learn, {prefix}:chan:unlearn
                                    "ident ip" (learn: "ident key domain") of a new fact

Failure modes
    No Redis error, timeout or malformed fact is ever raised to a session. Every reply is
    checked for the shape its command returns (a reply validator per call, BadReply when it does
    not fit: a proxy or another server on the port, a key of another type, a Redis that is not
    ours); any exception from a call, BadReply included, is Redis being down, on the session
    path (_call) as in the background loop (run(), which never dies of one: it goes down and
    retries). Timestamps read back (a learned entry's time, a record's f/t) are clamped to
    [now - ttl, now], so a skewed or forged one cannot outlive its TTL. A bad reply while connecting
    is logged as cluster_state_bad_reply (at most once a minute per acceptor). A failed or late
    call (over cluster.redis_timeout) marks Redis down: cluster_state_down is logged once, the
    smtp_ingress_cluster_state_up gauge drops to 0, and every decision goes local (each bulk
    transaction so decided is counted in smtp_ingress_cluster_state_fallbacks) until run()
    reconnects (cluster_state_up logged, mirrors reloaded). While down, calls return at once (no
    connect attempt on the session path). Facts published while an edge was down reach it when
    it reloads the sets; a fact this edge finds while its own Redis is down stays local (this
    host's acceptors still get it over the bulk broker's fan-out).

Trust
    Whoever can write to this Redis can put any IP in the fast lane (a learned entry) or
    refuse it (a penalty): Redis must be reachable by the edges only, with a password or ACL
    user in the URL (redis://user:password@host:6379/0) and TLS (rediss://) off the host.
    What comes back is still checked (IP syntax, sizes), never trusted to be well-formed.

Limits
    A mirrored penalty runs its full admission.penalty from when it arrives (the local box has
    no "until" argument), so a reload can lengthen one by up to a penalty. The bucket is exact
    while Redis is up; while down each acceptor holds its share (admission.bulk_share_bucket:
    rate x BULK_SHARE / (acceptors x cluster.edges)). The shared per-IP rate is mirrored: the
    counts of the other acceptors arrive at most CONN_FLUSH (plus a Redis round trip) late, so
    in that lag each acceptor's local bucket (admission.per_ip_rate) is what holds; at most
    MAX_PENDING keys are counted per flush. Wall clocks of the edges must agree to
    within a penalty or a learned TTL (NTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import math
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ingress.core import log, metrics
from ingress.core.addr import normalize_domain
from ingress.core.config import Config
from ingress.core.wire import RECORD_FACTS, VERSION, WireError, decode_record

MAX_MIRRORED = 65536      # penalties kept in Redis (as the local box: admission.max_penalised)
MAX_KEY = 200             # bytes of a seam key or kind
# not seam kinds:
RESERVED = frozenset({"bulk", "penalty", "learned", "conn", "edges", "chan", "records"})
CONN_WINDOW = 1           # seconds: one window of the shared per-IP connection counts
CONN_FLUSH = 0.1          # seconds between two flushes of this acceptor's counts
MAX_PENDING = 4096        # IP keys counted between two flushes (more: not counted until then)
MAX_OVER = 65536          # IP keys marked over the shared rate at once
MAX_EDGE_ENTRIES = 4096   # acceptors (of all edges) in the heartbeat set
MAX_INFLIGHT = 1024       # fire-and-forget records (penalties, learned) in flight at once
BAD_REPLY_LOG_EVERY = 60.0  # seconds between two cluster_state_bad_reply lines (connecting)

# The global bulk bucket: refill by elapsed time at `rate` up to `burst`, take one token.
# Redis's clock (TIME: scripts replicate their effects since 7.0), so every edge agrees.
# Returns {1|0 taken, tokens left x 1000}.
BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then tokens = burst; ts = now end
if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate); ts = now end
local ok = 0
if tokens >= 1 then tokens = tokens - 1; ok = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 60000)
return {ok, math.floor(tokens * 1000)}
"""

# A learned entry: member KEYS[1] ARGV[1] scored ARGV[2] with its domain ARGV[7] in the hash
# KEYS[3]; members scored below ARGV[3] purged and the ARGV[4] highest kept, set and hash alike.
LEARN_LUA = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[7])
else redis.call('HDEL', KEYS[3], ARGV[1]) end
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3], 'LIMIT', 0, 1000)
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))) do
  table.insert(gone, m)
end
for _, m in ipairs(gone) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('HDEL', KEYS[3], m)
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('PUBLISH', KEYS[2], ARGV[6])
return 1
"""

# Learned entries gone (unlearned, or evicted by a quota): members ARGV[2..] out of the set
# KEYS[1] and the hash KEYS[3]; ARGV[1], if not empty, published on KEYS[2].
FORGET_LUA = """
for i = 2, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
if ARGV[1] ~= '' then redis.call('PUBLISH', KEYS[2], ARGV[1]) end
return 1
"""

# Add a member scored `score`, purge members scored below `floor`, keep the `keep` highest.
ZADD_LUA = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', KEYS[2], ARGV[6])
return 1
"""


class BadReply(RedisError):
    """A Redis reply of a shape its command never returns: treated as Redis down."""


def _want(ok: bool, what: str, res: object) -> None:
    if not ok:
        raise BadReply(f"{what}: unexpected reply {type(res).__name__} {repr(res)[:60]}")


def _is_int(v: object) -> bool:
    return type(v) is int            # not bool, not a float, not a numeric string


def _reply_list(res: object, what: str, n: int | None = None) -> list[Any]:
    _want(isinstance(res, list) and (n is None or len(res) == n), what, res)
    assert isinstance(res, list)
    return res


def _reply_strs(res: object, what: str) -> list[str]:
    out = _reply_list(res, what)
    _want(all(isinstance(m, str) for m in out), what, res)
    return out


def _reply_int(res: object, what: str) -> int:
    _want(_is_int(res), what, res)
    assert isinstance(res, int)
    return res


def _reply_str_or_none(res: object, what: str) -> str | None:
    _want(res is None or isinstance(res, str), what, res)
    return res if isinstance(res, str) else None


def _reply_str_map(res: object, what: str) -> dict[str, str]:
    """HGETALL: {field: value}, strings only."""
    _want(isinstance(res, dict) and all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in res.items()), what, res)
    assert isinstance(res, dict)
    return res


def _reply_scored(res: object, what: str) -> list[tuple[str, float]]:
    """ZRANGE... WITHSCORES: [(member, score), ...] (redis-py pairs them); a NaN is refused."""
    out = []
    for pair in _reply_list(res, what):
        _want(isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)
              and isinstance(pair[1], float | int) and not isinstance(pair[1], bool)
              and not math.isnan(pair[1]), what, res)
        out.append((pair[0], float(pair[1])))
    return out


def clamp_time(t: float, now: float, ttl: float) -> float:
    """A wall-clock time read back from Redis, held to [now - ttl, now]: a time in the future
    (a skewed edge, a hand-made entry) is taken as now, one older than the TTL as its start."""
    return min(max(t, now - ttl), now)


def valid_domain(s: str) -> bool:
    """A domain name as a learned entry carries it: canonical (ingress.core.addr.
    normalize_domain, A-labels; checked: it comes back from Redis)."""
    return bool(s) and normalize_domain(s) == s


def valid_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def valid_key(s: str) -> bool:
    """A learned entry's key: an address, or a network in CIDR form (an IPv6 /prefix)."""
    if len(s) > 64:
        return False
    try:
        ipaddress.ip_network(s, strict=True)
    except ValueError:
        return False
    return True


class ClusterState:
    """One acceptor's view of the shared state; single-threaded (the acceptor's loop)."""

    def __init__(self, cfg: Config, ident: str, on_penalty: Callable[[str], None],
                 on_learn: Callable[[str, float, str], None],
                 on_record: Callable[[bytes, dict[str, object]], None] | None = None,
                 on_unlearn: Callable[[str], object] | None = None) -> None:
        c = cfg.cluster
        self.cfg, self.ident = cfg, ident
        self.on_penalty, self.on_learn, self.on_unlearn = on_penalty, on_learn, on_unlearn
        self.on_record = on_record
        self.timeout, self.retry, self.prefix = c.redis_timeout, c.redis_retry, c.redis_prefix
        self.client = aioredis.Redis.from_url(
            c.redis, socket_timeout=c.redis_timeout, socket_connect_timeout=c.redis_timeout,
            retry_on_timeout=False, retry=Retry(NoBackoff(), 0), health_check_interval=0,
            max_connections=64, decode_responses=True)
        lb = cfg.lanes.bulk
        self.bulk_rate = lb.rate
        self.bulk_burst = float(lb.burst) if lb.burst > 0 else max(1.0, lb.rate)
        self._bucket = self.client.register_script(BUCKET_LUA)
        self._zadd = self.client.register_script(ZADD_LUA)
        self._learn = self.client.register_script(LEARN_LUA)
        self._forget = self.client.register_script(FORGET_LUA)
        self.up = False
        self.since = time.monotonic()
        metrics.cluster_state(False)
        self._edges = 1
        self._bucket_tokens, self._bucket_at = float("inf"), float("-inf")
        # this edge: its host and state dir (two edges on one machine are two nodes)
        self.node = hashlib.sha256(
            f"{socket.gethostname()}/{cfg.spool.state_dir}".encode()).hexdigest()[:12]
        self._tasks: set[asyncio.Task[Any]] = set()
        # shared per-IP connection rates: attempts since the last flush, and the keys the last
        # flushes found over the cluster's limit (key -> monotonic until)
        a = cfg.admission
        self.conn_limit = max(a.per_ip_burst, math.ceil(
            cfg.acceptor_count * a.per_ip_rate * CONN_WINDOW)) if a.per_ip_rate > 0 else 0
        self._pending: Counter[str] = Counter()
        self._over: dict[str, float] = {}
        self._bad_log = log.Throttle(BAD_REPLY_LOG_EVERY, 4)

    @classmethod
    def create(cls, cfg: Config, ident: str, on_penalty: Callable[[str], None],
               on_learn: Callable[[str, float, str], None],
               on_record: Callable[[bytes, dict[str, object]], None] | None = None,
               on_unlearn: Callable[[str], object] | None = None,
               ) -> ClusterState | None:
        return cls(cfg, ident, on_penalty, on_learn, on_record, on_unlearn) \
            if cfg.cluster.redis else None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

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

    # --- the global bulk cap ------------------------------------------------------------------

    async def bulk_take(self) -> bool | None:
        if self.bulk_rate <= 0:
            return True
        ok, res = await self._call(lambda: self._bucket(
            keys=[self.key("bulk")], args=[self.bulk_rate, self.bulk_burst]),
            self._bucket_reply)
        if not ok:
            metrics.cluster_fallback()
            return None
        taken, tokens = res
        self._bucket_tokens, self._bucket_at = tokens, time.monotonic()
        return bool(taken)

    def _bucket_reply(self, res: object) -> tuple[int, float]:
        """BUCKET_LUA's {1|0, tokens x 1000}; the tokens held to [0, burst]."""
        taken, tokens = _reply_list(res, "bulk bucket (EVALSHA)", 2)
        _want(_is_int(taken) and taken in (0, 1) and _is_int(tokens), "bulk bucket (EVALSHA)",
              res)
        return taken, min(max(tokens / 1000, 0.0), self.bulk_burst)

    def bulk_spent(self, now: float) -> bool:
        """The shared bucket was empty at its last use, less than a second ago (stress mode:
        shorter bulk idle timeouts, as the local share's empty bucket says on one host)."""
        return self.up and now - self._bucket_at < 1.0 and self._bucket_tokens < 1.0

    # --- penalties and learned entries: record, publish, mirror --------------------------------

    def share_penalty(self, ip: str) -> None:
        now = time.time()
        until = now + self.cfg.admission.penalty
        self._spawn(self._call(lambda: self._zadd(
            keys=[self.key("penalty"), self.key("chan", "penalty")],
            args=[ip, until, now, MAX_MIRRORED, int(self.cfg.admission.penalty) + 60,
                  f"{self.node}/{self.ident} {ip}"])))

    def _learned_keys(self, channel: str) -> list[str]:
        return [self.key("learned"), self.key("chan", channel), self.key("learned", "domains")]

    def share_learned(self, key: str, domain: str = "") -> None:
        """Member `key` (a network: one member per learned entry), its domain in the hash: the
        domain travels with the entry, so a client learned on one edge counts against its
        domain's fast-lane share, and vouches for that domain only, on every edge."""
        c = self.cfg.classify
        if c.learned_ttl <= 0 or not valid_key(key):
            return
        now = time.time()
        domain = domain if valid_domain(domain) else ""
        msg = f"{self.node}/{self.ident} {key} {domain}".rstrip()
        self._spawn(self._call(lambda: self._learn(
            keys=self._learned_keys("learn"),
            args=[key, now, now - c.learned_ttl, c.learned_max, int(c.learned_ttl) + 60,
                  msg, domain])))

    def share_unlearned(self, key: str) -> None:
        """The entry `key` is unlearned (mail from it failed SPF or DKIM): out of Redis, and
        every other edge told."""
        if not valid_key(key):
            return
        self._spawn(self._call(lambda: self._forget(
            keys=self._learned_keys("unlearn"),
            args=[f"{self.node}/{self.ident} {key}", key])))

    def forget_learned(self, keys: list[str]) -> None:
        """Entries this edge's quotas evicted: out of Redis too (unpublished), so that what an
        edge loads from Redis is what the quotas kept, not merely the newest."""
        keys = [k for k in keys if valid_key(k)][:1000]
        if keys:
            self._spawn(self._call(lambda: self._forget(
                keys=self._learned_keys("unlearn"), args=["", *keys])))

    def share_record(self, fact: bytes, doc: dict[str, object]) -> bool:
        """A deferral record fact (wire.DEFER_TOPIC / CLAIM_TOPIC, ingress.policy.deferrals)
        for every acceptor of every edge: kept in the sorted set {prefix}:records (by time,
        trimmed to admission.retry_ttl and retry_max_records, so an edge that starts later
        replays them) and published. False (Redis down): the caller shares it on this host
        only (the bulk broker's fan-out), never both ways (a fact counted twice would count
        its sheds twice). The fact carries all the store's rules need (recipients, the sheds
        it stands for, voidness, a bypass to charge to its site): every acceptor's
        DeferralStore applies the same rules to it, whichever way it came."""
        if not self.up or self.on_record is None:
            return False
        a = self.cfg.admission
        now = time.time()
        member = orjson.dumps({"x": fact.decode(), "n": self.node, **doc}).decode()
        if len(member) > 4096:
            return False
        self._spawn(self._call(lambda: self._zadd(
            keys=[self.key("records"), self.key("chan", "record")],
            args=[member, now, now - a.retry_ttl, a.retry_max_records, int(a.retry_ttl) + 60,
                  f"{self.node}/{self.ident} {member}"])))
        return True

    def _record(self, member: str) -> None:
        """One record fact from Redis, checked (wire.decode_record's shape) and applied; its
        origin is made cluster-wide (node/acceptor), so it is never taken for our own."""
        try:
            doc = orjson.loads(member)
            fact = str(doc.pop("x")).encode()
            node = str(doc.pop("n"))
            if fact not in RECORD_FACTS:
                raise WireError("not a record fact")
            fact, rec = decode_record([fact, VERSION, orjson.dumps(doc)])
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, WireError) as e:
            log.event("cluster_fact_invalid", "warning", channel="record", error=str(e)[:80])
            return
        if node == self.node and rec["o"] == self.ident:
            return                  # our own (the other acceptors of this node apply it)
        now = time.time()
        for t in ("f", "t"):        # times read back: never in the future, nor beyond the TTL
            v = rec.get(t)
            if isinstance(v, int | float):
                rec[t] = clamp_time(float(v), now, self.cfg.admission.retry_ttl)
        rec["o"] = f"{node}/{rec['o']}"
        assert self.on_record is not None
        self.on_record(fact, rec)

    async def _load(self) -> None:
        """The whole shared sets into this acceptor's mirrors (at start and on rejoin)."""
        now = time.time()
        c = self.cfg.classify
        async with asyncio.timeout(max(1.0, 20 * self.timeout)):
            pens = _reply_strs(await self.client.zrangebyscore(
                self.key("penalty"), now, "+inf", start=0, num=MAX_MIRRORED), "penalties")
            learned = _reply_scored(await self.client.zrangebyscore(
                self.key("learned"), now - c.learned_ttl, "+inf", start=0,
                num=c.learned_max, withscores=True), "learned") if c.learned_ttl > 0 else []
        records = _reply_strs(await self.client.zrangebyscore(
            self.key("records"), now - self.cfg.admission.retry_ttl, "+inf", start=0,
            num=self.cfg.admission.retry_max_records), "records") \
            if self.on_record is not None else []
        for member in records:          # in time order: deferrals before their claims
            self._record(member)
        for ip in pens:
            if valid_ip(ip):
                self.on_penalty(ip)
        domains = _reply_str_map(await self.client.hgetall(self.key("learned", "domains")),
                                 "learned domains") if learned else {}
        for member, at in learned:      # oldest first: the quotas keep the newest
            key, _, domain = member.partition(" ")
            domain = domain or domains.get(member, "")
            if valid_key(key):
                self.on_learn(key, clamp_time(at, now, c.learned_ttl),
                              domain if valid_domain(domain) else "")
        log.event("cluster_state_loaded", acceptor=self.ident, penalties=len(pens),
                  learned=len(learned))

    def _fact(self, channel: str, data: str) -> None:
        if channel == self.key("chan", "record"):
            origin, _, member = data.partition(" ")
            if origin != f"{self.node}/{self.ident}" and self.on_record is not None:
                self._record(member)
            return
        origin, _, rest = data.partition(" ")
        ip, _, domain = rest.partition(" ")
        if origin in (self.ident, f"{self.node}/{self.ident}"):
            return
        penalty = channel == self.key("chan", "penalty")
        if not (valid_ip(ip) if penalty else valid_key(ip)):
            log.event("cluster_fact_invalid", "warning", channel=channel[:80], data=data[:80])
            return
        if penalty:
            self.on_penalty(ip)
        elif channel == self.key("chan", "learn"):
            self.on_learn(ip, time.time(), domain if valid_domain(domain) else "")
        elif channel == self.key("chan", "unlearn") and self.on_unlearn is not None:
            self.on_unlearn(ip)

    # --- per-IP connection rates, shared ---------------------------------------------------------

    def conn_over(self, key: str, now: float) -> bool:
        """A bulk connection attempt from IP key `key` (admission.ip_key): count it for the
        next flush, and say whether the cluster's last known count for the key is over
        conn_limit (ceil(acceptors x admission.per_ip_rate + per_ip_burst) attempts a window:
        the cluster together allows one IP what one host allows it). Synchronous and local:
        no Redis call. False while Redis is down (the local per-acceptor bucket still holds)."""
        if not self.up or self.conn_limit <= 0:
            return False
        if key in self._pending or len(self._pending) < MAX_PENDING:
            self._pending[key] += 1
        until = self._over.get(key)
        if until is None:
            return False
        if now >= until:
            del self._over[key]
            return False
        return True

    async def _flush_conns(self) -> None:
        """Add this acceptor's attempts to the window's shared counts (one pipeline) and mark
        the keys now over the limit until the end of the next window. Attempts count, refused
        or not (as with the local bucket, and Postfix's anvil): a client that keeps hammering
        goes over again in that next window and stays out; one that slows down is back after
        it."""
        if not self._pending:
            return
        pending, self._pending = self._pending, Counter()
        window = int(time.time()) // CONN_WINDOW
        keys = list(pending)
        async with self.client.pipeline(transaction=False) as p:
            for k in keys:
                rk = self.key("conn", str(window), k)
                p.incrby(rk, pending[k])
                p.expire(rk, 2 * CONN_WINDOW + 1)
            res = _reply_list(await p.execute(), "connection counts", 2 * len(keys))
        totals = [_reply_int(t, "connection count (INCRBY)") for t in res[0::2]]
        now, wall = time.monotonic(), time.time()
        until = now + (window + 1) * CONN_WINDOW - wall + CONN_WINDOW
        for k, total in zip(keys, totals, strict=True):
            if total > self.conn_limit and (k in self._over or len(self._over) < MAX_OVER):
                self._over[k] = until
        if len(self._over) > MAX_OVER // 2:
            for k in [k for k, u in self._over.items() if u <= now]:
                del self._over[k]

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
            res = _reply_list(await p.execute(), "heartbeat", 5)
        alive = _reply_strs(res[-1], "edges (ZRANGE)")
        self._edges = max(1, len({m.split("/", 1)[0] for m in alive}))

    # --- the connection loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, load, subscribe, then watch: pub/sub messages and a heartbeat every
        cluster.redis_retry. Any failure: down, wait cluster.redis_retry, try again."""
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(max(1.0, 20 * self.timeout)):
                    await self.client.ping()
                    await pubsub.subscribe(self.key("chan", "penalty"), self.key("chan", "learn"),
                                           self.key("chan", "unlearn"), self.key("chan", "record"))
                await self._load()
                self._up()
                await self._watch(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as e:      # any failure: down, and try again
                self._failed(e)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout):
                        await pubsub.aclose()
            await asyncio.sleep(self.retry)

    async def _watch(self, pubsub: Any) -> None:
        next_beat = 0.0
        while self.up:
            now = time.monotonic()
            if now >= next_beat:
                async with asyncio.timeout(max(1.0, 20 * self.timeout)):
                    await self._heartbeat()
                next_beat = now + self.retry
            async with asyncio.timeout(max(1.0, 20 * self.timeout)):
                await self._flush_conns()
            async with asyncio.timeout(CONN_FLUSH + 1.0):
                msg = await pubsub.get_message(timeout=CONN_FLUSH)
            if msg is None:
                continue
            _want(isinstance(msg, dict), "pub/sub message", msg)
            if msg.get("type") == "message":
                channel, data = msg.get("channel"), msg.get("data")
                _want(isinstance(channel, str) and isinstance(data, str), "pub/sub message",
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
                                 lambda res: _want(res is True, "SET", res))
        return bool(ok)

    async def lookup(self, kind: str, key: str) -> str | None:
        """The value recorded for `key` of `kind`, or None (absent, expired, or Redis down: a
        caller treats None as "unknown" and decides locally)."""
        k = self._seam_key(kind, key)
        if k is None:
            return None
        ok, res = await self._call(lambda: self.client.get(k),
                                   lambda res: _reply_str_or_none(res, "GET"))
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
                res = _reply_list(await p.execute(), "INCR", 2)
            return _reply_int(res[0], "INCR")

        ok, res = await self._call(go)
        return res if ok else None

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await self.client.aclose()
