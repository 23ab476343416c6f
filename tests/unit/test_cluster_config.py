"""[cluster] redis keys, and the bucket sizes derived from them (pure: admission's functions).

- every invalid Redis key is refused naming the file and the key;
- the local share of the bulk cap divides by acceptors x edges (the fallback while Redis is down);
- the broker's bucket: exact on one host, a guard with headroom when Redis holds the cap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ingress.core import config
from ingress.core.config import ClusterConfig
from ingress.core.derived import BULK_SHARE, broker_bucket, bulk_share_bucket
from ingress.tools import configshow
from tests.kit.configkit import check_invalid

INVALID = [
    ('[cluster]\nredis = "http://127.0.0.1:6379"\n', "cluster.redis"),
    ('[cluster]\nredis = "redis://"\n', "cluster.redis"),
    ('[cluster]\nredis = "unix://"\n', "cluster.redis"),
    ('[cluster]\nredis = "127.0.0.1:6379"\n', "cluster.redis"),
    ("[cluster]\nredis_timeout = 0.0\n", "cluster.redis_timeout"),
    ("[cluster]\nredis_timeout = 10.0\n", "cluster.redis_timeout"),
    ("[cluster]\nredis_timeout = 1.0\nredis_retry = 0.5\n", "cluster.redis_retry"),
    ('[cluster]\nredis_prefix = ""\n', "cluster.redis_prefix"),
    ('[cluster]\nredis_prefix = "a b"\n', "cluster.redis_prefix"),
    ("[cluster]\nedges = 0\n", "cluster.edges"),
    ("[cluster]\nredis_timout = 0.1\n", "cluster.redis_timout"),
]


@pytest.mark.parametrize(("text", "key"), INVALID)
def test_invalid(tmp_path: Path, text: str, key: str) -> None:
    check_invalid(tmp_path, text, key)


VALID = [
    ('redis = "redis://127.0.0.1:6379/0"', "redis://127.0.0.1:6379/0"),
    ('redis = "rediss://redis.example:6380/1"', "rediss://redis.example:6380/1"),
    ('redis = "unix:///run/redis/redis.sock"', "unix:///run/redis/redis.sock"),
    ("", ""),
]


@pytest.mark.parametrize(("line", "url"), VALID)
def test_valid(tmp_path: Path, line: str, url: str) -> None:
    f = tmp_path / "ok.toml"
    f.write_text(f"[cluster]\n{line}\n")
    assert config.load(f).cluster.redis == url


def cfg(rate: float, burst: int, acceptors: int, edges: int = 1,
        redis: str = "") -> config.Config:
    base = config.load(None)
    lanes = dataclasses.replace(base.lanes, bulk=dataclasses.replace(
        base.lanes.bulk, rate=rate, burst=burst))
    return dataclasses.replace(
        base, lanes=lanes, supervisor=dataclasses.replace(base.supervisor, acceptors=acceptors),
        cluster=ClusterConfig(redis=redis, edges=edges))


SHARES = [
    # rate, burst, acceptors, edges (config), edges (argument), (rate, burst) of one share
    (100.0, 0, 4, 1, 0, (100 * BULK_SHARE / 4, 25.0)),
    (100.0, 40, 4, 2, 0, (100 * BULK_SHARE / 8, 5.0)),
    (100.0, 40, 4, 1, 2, (100 * BULK_SHARE / 8, 5.0)),      # edges counted by heartbeats
    (10.0, 0, 8, 4, 0, (10 * BULK_SHARE / 32, 1.0)),        # burst never below one token
]


@pytest.mark.parametrize(("rate", "burst", "acceptors", "edges", "arg", "want"), SHARES)
def test_local_share(rate: float, burst: int, acceptors: int, edges: int, arg: int,
                     want: tuple[float, float]) -> None:
    got = bulk_share_bucket(cfg(rate, burst, acceptors, edges), arg)
    assert got is not None
    assert got == pytest.approx(want)


def test_uncapped_has_no_share() -> None:
    assert bulk_share_bucket(cfg(0.0, 0, 4, 2)) is None


BROKER = [
    # lane, rate, burst, redis, (rate, burst) of the broker's bucket
    ("bulk", 100.0, 0, "", (100.0, 0.0)),                       # one host: exact, as today
    ("bulk", 100.0, 50, "", (100.0, 50.0)),
    ("bulk", 100.0, 0, "redis://r:6379/0", (100 * BULK_SHARE, 200.0)),   # guard: headroom
    ("bulk", 100.0, 50, "unix:///r.sock", (100 * BULK_SHARE, 100.0)),
    ("bulk", 0.0, 0, "redis://r:6379/0", (0.0, 0.0)),           # uncapped stays uncapped
    ("fast", 0.0, 0, "redis://r:6379/0", (0.0, 0.0)),
]


@pytest.mark.parametrize(("lane", "rate", "burst", "redis", "want"), BROKER)
def test_broker_bucket(lane: str, rate: float, burst: int, redis: str,
                       want: tuple[float, float]) -> None:
    assert broker_bucket(cfg(rate, burst, 2, redis=redis), lane) == pytest.approx(want)


def test_check_config_show_explains_the_shared_cap() -> None:
    one = configshow.render(cfg(500.0, 0, 2), nofile=(100000, 100000))
    two = configshow.render(cfg(500.0, 0, 2, edges=2, redis="redis://r:6379/0"),
                            nofile=(100000, 100000))
    assert "550/s together; the bulk broker enforces the cap exactly after DATA" in one
    assert "[cluster] redis" not in one
    assert "275/s together\n" in two
    assert "the shares above hold only while Redis is down (1/2 of the cap per edge)" in two
    assert "the bulk broker guards at 550/s (burst 1000)" in two


def test_check_config_show_hides_the_redis_password() -> None:
    out = configshow.render(cfg(500.0, 0, 2, redis="redis://edge:s3cret@10.0.0.5:6379/0"),
                            nofile=(100000, 100000))
    assert "s3cret" not in out
    assert 'redis = "redis://edge:***@10.0.0.5:6379/0"' in out
