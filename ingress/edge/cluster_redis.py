"""Shared admission state in Redis: the encoding (keys, Lua scripts, reply shapes, checks).

Purpose
    What ingress.edge.cluster_state writes to and reads from Redis, and how anything read back
    is checked before it is believed: pure code, no connection and no clock of its own. The
    connection and its loop are ingress.edge.cluster_link; the mirrors and the shared limits
    are ingress.edge.cluster_state.

API
    BUCKET_LUA, LEARN_LUA, FORGET_LUA, ZADD_LUA     the scripts (below: what each does)
    BadReply                        a reply of a shape its command never returns (RedisError:
                                    whoever catches Redis errors treats it as Redis down)
    want(ok, what, res)             BadReply unless ok
    reply_list / reply_strs / reply_int / reply_str_or_none / reply_str_map / reply_scored
                                    (res, what) -> the reply as its command's shape, or BadReply
    is_int(v)                       an int, not a bool, float or numeric string
    clamp_time(t, now, ttl)         a time read back, held to [now - ttl, now]
    valid_domain(s) / valid_ip(s) / valid_key(s)    a domain, IP or learned key read back

Keys (prefix = cluster.redis_prefix; all bounded):
    {prefix}:bulk                   hash {tokens, ts}: the global bulk bucket (lanes.bulk.rate,
                                    lanes.bulk.burst), refilled by Redis's own clock (TIME)
    {prefix}:penalty                sorted set ip -> until (unix s); trimmed to
                                    MAX_MIRRORED entries, expired entries purged on write
    {prefix}:learned                sorted set key -> learned at (unix s); trimmed to
                                    classify.learned_max, entries older than learned_ttl purged
                                    (a member "ip domain" of an older version still loads)
    {prefix}:learned:domains        hash key -> the domain it was learned for (kept with the set)
    {prefix}:records                sorted set of deferral record facts by time (admission.
                                    retry_ttl, retry_max_records)
    {prefix}:conn:{window}:{ipkey}  attempts from one IP key in one CONN_WINDOW, all edges
                                    (INCRBY from each acceptor every CONN_FLUSH; EX 3 s)
    {prefix}:edges                  sorted set "node/acceptor" -> last heartbeat (unix s),
                                    older than 3 x redis_retry dropped; node: a hash of the
                                    host name and spool.state_dir
    {prefix}:{kind}:{key}           the seam's keys (kind and key length-checked to MAX_KEY; the
                                    kinds above are RESERVED)
    channels {prefix}:chan:penalty, {prefix}:chan:learn, {prefix}:chan:unlearn,
             {prefix}:chan:record   "ident ip" (learn: "ident key domain"; record: "ident
                                    member") of a new fact

Failure modes
    Every check raises BadReply (a RedisError) or answers False; nothing here raises anything
    else for any input. A NaN score, a bool for an int, a bytes for a str are refused.

Limits
    valid_key takes at most 64 characters; MAX_KEY bounds a seam kind or key; MAX_MIRRORED the
    shared penalties. The scripts trim what they add (counts and TTLs) in the same call.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from redis.exceptions import RedisError

from ingress.core.addr import normalize_domain

MAX_MIRRORED = 65536      # penalties kept in Redis (as the local box: admission.max_penalised)
MAX_KEY = 200             # bytes of a seam key or kind
# not seam kinds:
RESERVED = frozenset({"bulk", "penalty", "learned", "conn", "edges", "chan", "records"})

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


def want(ok: bool, what: str, res: object) -> None:
    if not ok:
        raise BadReply(f"{what}: unexpected reply {type(res).__name__} {repr(res)[:60]}")


def is_int(v: object) -> bool:
    return type(v) is int            # not bool, not a float, not a numeric string


def reply_list(res: object, what: str, n: int | None = None) -> list[Any]:
    want(isinstance(res, list) and (n is None or len(res) == n), what, res)
    assert isinstance(res, list)
    return res


def reply_strs(res: object, what: str) -> list[str]:
    out = reply_list(res, what)
    want(all(isinstance(m, str) for m in out), what, res)
    return out


def reply_int(res: object, what: str) -> int:
    want(is_int(res), what, res)
    assert isinstance(res, int)
    return res


def reply_str_or_none(res: object, what: str) -> str | None:
    want(res is None or isinstance(res, str), what, res)
    return res if isinstance(res, str) else None


def reply_str_map(res: object, what: str) -> dict[str, str]:
    """HGETALL: {field: value}, strings only."""
    want(isinstance(res, dict) and all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in res.items()), what, res)
    assert isinstance(res, dict)
    return res


def reply_scored(res: object, what: str) -> list[tuple[str, float]]:
    """ZRANGE... WITHSCORES: [(member, score), ...] (redis-py pairs them); a NaN is refused."""
    out = []
    for pair in reply_list(res, what):
        want(isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)
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
