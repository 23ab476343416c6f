"""Accounting of the flood generator (bench.flood), checked against tests.kit.scripted_server.

Each test runs a short flood (well under a second of load) against a server whose answer to each
connection is scripted, and checks the counts, reply-code buckets, timeouts, refused connections
and nearest-rank percentiles that bench.flood reports; plus the loopback-only rule and the
file-descriptor-limit refusal. Real sockets on loopback, no mocks.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import flood
from tests.kit.postfix import free_port
from tests.kit.scripted_server import ScriptedServer, parse_outcome

ROOT = Path(__file__).resolve().parents[2]
SRC = "127.0.0.10"


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _flood_against(
    script: Sequence[str], *, duration: float, interval: float, cycle: bool = True,
    deadline: float = 2.0, grace: float = 1.0, bots: flood.BotConfig | None = None,
    spam_procs: int = 1, legit: bool = True,
) -> tuple[dict[str, Any], ScriptedServer]:
    async with ScriptedServer(script, cycle=cycle) as srv:
        cfg = flood.FloodConfig(
            target=flood.Target("127.0.0.1", srv.port), duration_s=duration,
            legit=(flood.LegitSpec("trusted", SRC, interval),) if legit else (),
            deadline_s=deadline, grace_s=grace, bot_procs=0, spam_procs=spam_procs,
            bots=bots or flood.BotConfig(),
        )
        result = await flood.run_flood(cfg)
    orjson.dumps(result)  # JSON-serialisable
    return result, srv


# ---- percentiles ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([15, 20, 35, 40, 50], 5, 15),
        ([15, 20, 35, 40, 50], 30, 20),
        ([15, 20, 35, 40, 50], 40, 20),
        ([15, 20, 35, 40, 50], 50, 35),
        ([15, 20, 35, 40, 50], 100, 50),
        ([50, 15, 40, 20, 35], 0, 15),
        ([3, 6, 7, 8, 8, 10, 13, 15, 16, 20], 25, 7),
        ([3, 6, 7, 8, 8, 10, 13, 15, 16, 20], 50, 8),
        ([3, 6, 7, 8, 8, 10, 13, 15, 16, 20], 75, 15),
        (list(range(1, 101)), 50, 50),
        (list(range(1, 101)), 95, 95),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 1001)), 99.9, 999),
        ([42.0], 99, 42.0),
    ],
)
def test_percentile_nearest_rank(values: list[float], p: float, expected: float) -> None:
    assert flood.percentile_nearest_rank(values, p) == expected


def test_percentile_empty_and_bounds() -> None:
    assert flood.percentile_nearest_rank([], 50) is None
    with pytest.raises(ValueError):
        flood.percentile_nearest_rank([1.0], 101)


def test_stats_summary_uses_nearest_rank() -> None:
    st = flood.LegitStats(name="x")
    for i, lat in enumerate([5.0, 1.0, 4.0, 2.0, 3.0]):
        st.record(flood.Attempt(i * 0.1, lat, "accepted", 250, "DOT"))
    st.record(flood.Attempt(0.6, None, "tempfail", 451, "MAIL"))
    st.record(flood.Attempt(0.7, None, "unfinished"))
    s = st.summary()
    assert s["latency_ms"] == {"n": 5, "min": 1.0, "p50": 3.0, "p95": 5.0, "p99": 5.0,
                               "max": 5.0, "mean": 3.0}
    assert s["attempts"] == 7 and s["accepted"] == 5 and s["unfinished"] == 1
    assert s["accepted_pct"] == pytest.approx(100 * 5 / 6, abs=1e-3)  # unfinished excluded
    assert [e["t"] for e in s["timeline"]] == sorted(e["t"] for e in s["timeline"])


def test_script_grammar() -> None:
    assert parse_outcome("250").kind == "ok"
    o = parse_outcome("451 at MAIL")
    assert (o.kind, o.code, o.stage) == ("reply", 451, "MAIL")
    o = parse_outcome("slow 200ms")
    assert (o.kind, o.stage, o.delay_s) == ("slow", "DOT", 0.2)
    assert parse_outcome("close").stage == "banner"
    assert parse_outcome("hang at data").stage == "DATA"
    for bad in ("250 at nowhere", "abc", "220 at MAIL"):
        with pytest.raises(ValueError):
            parse_outcome(bad)


# ---- legitimate senders against the scripted server ----------------------------------------

def test_counts_and_reply_code_buckets() -> None:
    script = ["250", "451 at MAIL", "421 at banner", "550 at RCPT", "452 at DOT",
              "close at DATA", "250"]
    # attempts at k*0.05 for k*0.05 < 0.68: k = 0..13 -> 14 attempts, the script twice over
    result, srv = _run(_flood_against(script, duration=0.68, interval=0.05))
    legit = result["legit"][0]
    assert legit["attempts"] == 14
    assert legit["accepted"] == 4
    assert legit["accepted_pct"] == pytest.approx(100 * 4 / 14, abs=1e-3)
    assert legit["tempfails"] == {"451": 2, "421": 2, "452": 2}
    assert legit["tempfails_by_stage"] == {"MAIL 451": 2, "banner 421": 2, "DOT 452": 2}
    assert legit["permfails"] == {"550": 2}
    assert legit["permfails_by_stage"] == {"RCPT 550": 2}
    assert legit["conn_errors"] == {"closed at DATA": 2}
    assert legit["refused"] == 0 and legit["timeouts"] == {} and legit["unfinished"] == 0
    assert legit["latency_ms"]["n"] == 4
    outcomes = [e["outcome"] for e in legit["timeline"]]
    assert outcomes == ["accepted", "tempfail", "tempfail", "permfail", "tempfail", "error",
                        "accepted"] * 2
    assert srv.accepted == 4 and srv.connections == 14
    assert set(srv.peers) == {SRC}  # the sender bound its source address
    assert result["legit_total"]["accepted"] == 4


def test_latency_percentiles_on_known_delays() -> None:
    delays_ms = [i * 40 for i in range(10)]  # 0, 40, ..., 360 ms before the final 250
    script = [f"slow {d}ms" for d in delays_ms]
    result, _ = _run(_flood_against(script, duration=0.48, interval=0.05, cycle=False))
    legit = result["legit"][0]
    assert legit["attempts"] == 10 and legit["accepted"] == 10
    measured = [e["latency_ms"] for e in legit["timeline"]]
    for d, m in zip(delays_ms, measured, strict=True):
        # the scripted delay plus loopback overhead (generous: CI machines get busy)
        assert d <= m < d + 250, (d, m)
    lat = legit["latency_ms"]
    # nearest-rank over 10 values: p50 = 5th smallest, p95 = p99 = 10th
    assert lat["p50"] == pytest.approx(sorted(measured)[4], abs=1e-3)
    assert lat["p95"] == lat["p99"] == lat["max"] == pytest.approx(max(measured), abs=1e-3)
    # at most 4 samples can lie below 160 ms (each is >= its delay), so p50 >= 160
    assert 160 <= lat["p50"] < 410 and 360 <= lat["p99"] < 610


def test_timeouts_by_stage() -> None:
    result, _ = _run(_flood_against(["hang at MAIL", "hang"], duration=0.35, interval=0.1,
                                     deadline=0.2))
    legit = result["legit"][0]
    assert legit["attempts"] == 4 and legit["accepted"] == 0
    assert legit["timeouts"] == {"MAIL": 2, "banner": 2}
    assert legit["accepted_pct"] == 0.0


def test_unfinished_at_end_of_run() -> None:
    result, _ = _run(_flood_against(["hang at DOT"], duration=0.25, interval=0.1,
                                     deadline=10.0, grace=0.2))
    legit = result["legit"][0]
    assert legit["attempts"] == 3 and legit["unfinished"] == 3
    assert legit["accepted_pct"] is None and legit["timeouts"] == {}


def test_refused_connections() -> None:
    port = free_port()
    cfg = flood.FloodConfig(target=flood.Target("127.0.0.1", port), duration_s=0.25,
                            legit=(flood.LegitSpec("spf", SRC, 0.05),), bot_procs=0)
    result = _run(flood.run_flood(cfg))
    legit = result["legit"][0]
    assert legit["attempts"] == 5 and legit["refused"] == 5 and legit["accepted"] == 0
    assert [e["outcome"] for e in legit["timeline"]] == ["refused"] * 5


# ---- bots ----------------------------------------------------------------------------------

def test_stalling_bots_inline() -> None:
    bots = flood.BotConfig(stallers=6, ramp_s=0.05, reconnect_delay=0.05)
    result, srv = _run(_flood_against(["250", "421 at banner"], cycle=True, duration=0.5,
                                      interval=1.0, legit=False, bots=bots))
    stall = result["bots"]["stall"]
    assert stall["bots"] == 6 and stall["refused"] == 0
    # a bot closed with 421 reconnects and, the script cycling, gets a 220 and holds it
    assert stall["banner_codes"]["220"] == 6
    assert stall["open_at_end"] == 6 and stall["no_banner_at_end"] == 0
    assert stall["closed_by_server"] == stall["banner_codes"]["421"] >= 3
    assert stall["connections"] == stall["connected"] == srv.connections
    assert len(set(srv.peers)) == 6 and all(p.startswith("127.1.0.") for p in srv.peers)


def test_silent_server_trickle_and_early_talkers() -> None:
    bots = flood.BotConfig(stallers=2, tricklers=2, early=2, trickle_interval=0.1, ramp_s=0.05,
                           reconnect_delay=0.1)
    result, _ = _run(_flood_against(["hang"], duration=0.6, interval=1.0, legit=False,
                                    bots=bots))
    b = result["bots"]
    for role in ("stall", "trickle"):
        assert b[role]["connected"] == 2 and b[role]["banner_codes"] == {}
        assert b[role]["open_at_end"] == b[role]["no_banner_at_end"] == 2
    assert b["trickle"]["bytes_sent"] == 0  # a trickler waits for the banner first
    assert b["early"]["bytes_sent"] >= 2 * 20 and b["early"]["first_replies"] == {}


def test_spam_senders_in_their_own_process() -> None:
    bots = flood.BotConfig(spammers=3, spam_per_conn=1, reconnect_delay=0.01)
    script = ["250", "451 at MAIL", "421 at banner", "554 at RCPT"]
    result, srv = _run(_flood_against(script, cycle=True, duration=0.8, interval=0.2,
                                      bots=bots))
    procs = {p["role"]: p for p in result["processes"]}
    assert procs["spam"]["rc"] == 0 and procs["spam"]["pid"] != procs["main"]["pid"]
    spam = result["bots"]["spam"]
    assert spam["bots"] == 3 and spam["accepted"] > 0
    assert spam["shed"].get("451", 0) > 0 and spam["shed_by_stage"].get("banner 421", 0) > 0
    assert spam["rejected"].get("554", 0) > 0
    # every transaction that reached MAIL ended accepted, shed at MAIL, rejected, or cut
    ended = (spam["accepted"] + spam["shed_by_stage"].get("MAIL 451", 0)
             + spam["rejected_by_stage"].get("RCPT 554", 0) + spam["cut"])
    assert ended == spam["sent"]
    # at most one connect per bot can be cut by the end of the run
    assert 0 <= spam["connections"] - spam["connected"] <= 3 and spam["refused"] == 0
    assert srv.accepted >= spam["accepted"]
    # the legit sender in the measuring process was still served
    assert result["legit"][0]["attempts"] == 4


def test_spam_senders_alone() -> None:
    """Spam senders and nothing else (no legitimate sender, no idle bot: bench.cost's shape,
    `python -m bench.flood --spammers N`): the run waits for its spam process (it used to
    raise ValueError from asyncio.wait on no task of its own)."""
    bots = flood.BotConfig(spammers=2, spam_per_conn=1)
    result, _ = _run(_flood_against(["421 at banner"], duration=0.6, interval=1.0, bots=bots,
                                    legit=False))
    spam = result["bots"]["spam"]
    assert spam["bots"] == 2 and spam["shed_by_stage"].get("banner 421", 0) >= 2
    assert result["legit"] == [] and spam["sent"] == 0


# ---- refusals --------------------------------------------------------------------------------

def test_loopback_only() -> None:
    for bad in ("10.0.0.1:25", "192.168.1.2:2525", "[2001:db8::1]:25", "example.com:25"):
        with pytest.raises(ValueError):
            flood.Target.parse(bad)
    assert flood.Target.parse("127.9.9.9:25").host == "127.9.9.9"
    assert flood.Target.parse("[::1]:25").family == socket.AF_INET6
    with pytest.raises(ValueError, match="loopback"):
        flood.FloodConfig(target=flood.Target("127.0.0.1", 25), duration_s=1,
                          legit=(flood.LegitSpec("trusted", "10.1.2.3", 0.1),))
    assert flood.main(["--target", "8.8.8.8:25", "--duration", "1"]) == 2


def test_fd_limit_refusal_in_process() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard RLIMIT_NOFILE")
    with pytest.raises(flood.FdLimitError) as e:
        flood.ensure_fd_limit(hard + 1, "test")
    assert str(hard + 1) in str(e.value) and f"hard={hard}" in str(e.value)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard  # the soft limit was raised to the hard one


def test_fd_limit_refusal_cli() -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run(
        [sys.executable, "-m", "bench.flood", "--target", "127.0.0.1:9", "--duration", "1",
         "--stallers", "500", "--quiet"],
        cwd=ROOT, preexec_fn=low_limit, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "refusing to start" in proc.stderr
    assert "need 564" in proc.stderr and "hard=256" in proc.stderr
    assert proc.stdout == ""
