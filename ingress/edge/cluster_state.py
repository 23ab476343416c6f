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
    The module's parts: this one (the mirrors, the global bulk bucket, the shared per-IP
    rates), ingress.edge.cluster_link (RedisLink, which ClusterState is: the connection, its
    health, the loop, the heartbeat, the seam) and ingress.edge.cluster_redis (the keys, the
    Lua scripts, the checks of what comes back).

API
    ClusterState.create(cfg, ident, on_penalty, on_learn, on_record=None, on_unlearn=None)
        -> ClusterState | None
        on_penalty(ip) / on_learn(key, at, domain) / on_unlearn(key)   how a mirrored fact
                                    enters this acceptor (key: a learned entry's network,
                                    ingress.policy.learned.LearnedAllow.key; domain: what the
                                    entry was learned for, its identity)
        on_record(fact, rec)        a deferral record fact from another acceptor of any edge
    up                              bool: Redis reachable (health; False at start)
    run()                           background task: connect, subscribe, load the mirrors,
                                    heartbeat this edge; on any failure: down, retry every
                                    cluster.redis_retry seconds (the circuit; RedisLink.run)
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

Failure modes
    As RedisLink's (ingress.edge.cluster_link): no Redis error, timeout or malformed reply
    reaches a session, and any of them is Redis down. Every reply is checked for the shape its
    command returns (ingress.edge.cluster_redis: a proxy or another server on the port, a key of
    another type, a Redis that is not ours). Timestamps read back (a learned entry's time, a
    record's f/t) are clamped to [now - ttl, now], so a skewed or forged one cannot outlive its
    TTL; a malformed fact is logged (cluster_fact_invalid) and dropped. While Redis is down
    every decision goes local (each bulk transaction so decided is counted in
    smtp_ingress_cluster_state_fallbacks) until run() reconnects and the mirrors are reloaded.
    Facts published while an edge was down reach it when it reloads the sets; a fact this edge
    finds while its own Redis is down stays local (this host's acceptors still get it over the
    bulk broker's fan-out).

Trust
    Whoever can write to this Redis can put any IP in the fast lane (a learned entry) or
    refuse it (a penalty): Redis must be reachable by the edges only, with a password or ACL
    user in the URL (redis://user:password@host:6379/0) and TLS (rediss://) off the host.
    What comes back is still checked (IP syntax, sizes), never trusted to be well-formed.

Limits
    A mirrored penalty runs its full admission.penalty from when it arrives (the local box has
    no "until" argument), so a reload can lengthen one by up to a penalty. The bucket is exact
    while Redis is up; while down each acceptor holds its share (derived.bulk_share_bucket:
    rate x BULK_SHARE / (acceptors x cluster.edges)). The shared per-IP rate is mirrored: the
    counts of the other acceptors arrive at most CONN_FLUSH (plus a Redis round trip) late, so
    in that lag each acceptor's local bucket (admission.per_ip_rate) is what holds; at most
    MAX_PENDING keys are counted per flush. Wall clocks of the edges must agree to
    within a penalty or a learned TTL (NTP).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable

import orjson

from ingress.core import log, metrics
from ingress.core.config import Config
from ingress.core.wire import RECORD_FACTS, VERSION, WireError, decode_record
from ingress.edge.cluster_link import TICK, RedisLink
from ingress.edge.cluster_redis import (
    BUCKET_LUA,
    FORGET_LUA,
    LEARN_LUA,
    MAX_MIRRORED,
    ZADD_LUA,
    clamp_time,
    is_int,
    reply_int,
    reply_list,
    reply_scored,
    reply_str_map,
    reply_strs,
    valid_domain,
    valid_ip,
    valid_key,
    want,
)

CONN_WINDOW = 1           # seconds: one window of the shared per-IP connection counts
CONN_FLUSH = TICK         # seconds between two flushes of this acceptor's counts (one a turn)
MAX_PENDING = 4096        # IP keys counted between two flushes (more: not counted until then)
MAX_OVER = 65536          # IP keys marked over the shared rate at once


class ClusterState(RedisLink):
    """One acceptor's view of the shared state; single-threaded (the acceptor's loop)."""

    def __init__(self, cfg: Config, ident: str, on_penalty: Callable[[str], None],
                 on_learn: Callable[[str, float, str], object],
                 on_record: Callable[[bytes, dict[str, object]], None] | None = None,
                 on_unlearn: Callable[[str], object] | None = None) -> None:
        super().__init__(cfg, ident)
        self.on_penalty, self.on_learn, self.on_unlearn = on_penalty, on_learn, on_unlearn
        self.on_record = on_record
        lb = cfg.lanes.bulk
        self.bulk_rate = lb.rate
        self.bulk_burst = float(lb.burst) if lb.burst > 0 else max(1.0, lb.rate)
        self._bucket = self.client.register_script(BUCKET_LUA)
        self._zadd = self.client.register_script(ZADD_LUA)
        self._learn = self.client.register_script(LEARN_LUA)
        self._forget = self.client.register_script(FORGET_LUA)
        self._bucket_tokens, self._bucket_at = float("inf"), float("-inf")
        # shared per-IP connection rates: attempts since the last flush, and the keys the last
        # flushes found over the cluster's limit (key -> monotonic until)
        a = cfg.admission
        self.conn_limit = max(a.per_ip_burst, math.ceil(
            cfg.acceptor_count * a.per_ip_rate * CONN_WINDOW)) if a.per_ip_rate > 0 else 0
        self._pending: Counter[str] = Counter()
        self._over: dict[str, float] = {}

    @classmethod
    def create(cls, cfg: Config, ident: str, on_penalty: Callable[[str], None],
               on_learn: Callable[[str, float, str], object],
               on_record: Callable[[bytes, dict[str, object]], None] | None = None,
               on_unlearn: Callable[[str], object] | None = None,
               ) -> ClusterState | None:
        return cls(cfg, ident, on_penalty, on_learn, on_record, on_unlearn) \
            if cfg.cluster.redis else None


    # --- RedisLink's hooks -----------------------------------------------------------------------

    def channels(self) -> list[str]:
        return [self.key("chan", "penalty"), self.key("chan", "learn"),
                self.key("chan", "unlearn"), self.key("chan", "record")]

    async def _tick(self) -> None:
        await self._flush_conns()

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
        taken, tokens = reply_list(res, "bulk bucket (EVALSHA)", 2)
        want(is_int(taken) and taken in (0, 1) and is_int(tokens), "bulk bucket (EVALSHA)",
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
            pens = reply_strs(await self.client.zrangebyscore(
                self.key("penalty"), now, "+inf", start=0, num=MAX_MIRRORED), "penalties")
            learned = reply_scored(await self.client.zrangebyscore(
                self.key("learned"), now - c.learned_ttl, "+inf", start=0,
                num=c.learned_max, withscores=True), "learned") if c.learned_ttl > 0 else []
        records = reply_strs(await self.client.zrangebyscore(
            self.key("records"), now - self.cfg.admission.retry_ttl, "+inf", start=0,
            num=self.cfg.admission.retry_max_records), "records") \
            if self.on_record is not None else []
        for member in records:          # in time order: deferrals before their claims
            self._record(member)
        for ip in pens:
            if valid_ip(ip):
                self.on_penalty(ip)
        domains = reply_str_map(await self.client.hgetall(self.key("learned", "domains")),
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
            res = reply_list(await p.execute(), "connection counts", 2 * len(keys))
        totals = [reply_int(t, "connection count (INCRBY)") for t in res[0::2]]
        now, wall = time.monotonic(), time.time()
        until = now + (window + 1) * CONN_WINDOW - wall + CONN_WINDOW
        for k, total in zip(keys, totals, strict=True):
            if total > self.conn_limit and (k in self._over or len(self._over) < MAX_OVER):
                self._over[k] = until
        if len(self._over) > MAX_OVER // 2:
            for k in [k for k, u in self._over.items() if u <= now]:
                del self._over[k]
