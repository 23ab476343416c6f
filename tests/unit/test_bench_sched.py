"""bench.sched's per-role rows and bench.flood's stage breakdown (pure parts)."""

from __future__ import annotations

import os

from bench import sched
from bench.flood.stats import stage_breakdown


def test_role_of_titles() -> None:
    assert sched.role_of(["smtp-ingress: worker-fast-0"]) == "worker-fast"
    assert sched.role_of(["smtp-ingress: fast-acceptor-12"]) == "fast-acceptor"
    assert sched.role_of(["smtp-ingress: supervisor"]) == "supervisor"
    # setproctitle pads /proc/PID/cmdline with empty arguments
    assert sched.role_of(["smtp-ingress: acceptor-1", "", "", ""]) == "acceptor"
    assert sched.role_of(["/usr/bin/python3", "-m", "bench.flood", "--x"]) == "bench.flood"
    assert sched.role_of(["/usr/sbin/haproxy", "-f", "x"]) == "haproxy"
    assert sched.role_of([]) == "?"


def test_delta_per_role() -> None:
    s = sched.Sample
    before = {1: s("acceptor", 0, 0, 0), 2: s("acceptor", 10, 0, 5), 3: s("gone", 0, 0, 0),
              4: s("old-role", 0, 0, 0)}
    after = {1: s("acceptor", 500_000_000, 100_000_000, 100),
             2: s("acceptor", 500_000_010, 300_000_000, 105),
             4: s("new-role", 9, 9, 9),           # the pid was reused: left out
             5: s("born", 9, 9, 9)}               # not in both snapshots: left out
    rows = sched.delta(before, after, wall_s=2.0)
    assert rows == [{"role": "acceptor", "processes": 2, "cpu_pct": 50.0, "wait_pct": 20.0,
                     "slices": 200, "wait_per_slice_us": 2000.0}]


def test_snapshot_of_this_process() -> None:
    snap = sched.snapshot(os.getpid())
    me = snap[os.getpid()]
    assert me.run_ns > 0 and me.slices > 0


def test_stage_breakdown_names_the_stage_of_the_tail() -> None:
    fast = {"connect": 1.0, "banner": 1.0, "DOT": 5.0}
    slow = {"connect": 1.0, "banner": 40.0, "DOT": 5.0}
    out = stage_breakdown([fast] * 99 + [slow])
    assert out["banner"]["tail_mean"] == 40.0 and out["DOT"]["tail_mean"] == 5.0
    assert out["banner"]["p50"] == 1.0 and out["connect"]["p99"] == 1.0
    assert stage_breakdown([]) == {}
    # a stage only some transactions have (TLS: STARTTLS) counts 0 for the others
    assert stage_breakdown([{"TLS": 2.0}, {"DOT": 1.0}])["TLS"]["p50"] == 0.0


def test_startup_waits_for_child_processes_only() -> None:
    from bench.flood import BotConfig, FloodConfig, Target

    t = Target("127.0.0.1", 2525)
    assert FloodConfig(target=t, duration_s=1.0).startup_s == 0.05
    assert FloodConfig(target=t, duration_s=1.0, bots=BotConfig(spammers=2)).startup_s == 1.5
    inline = FloodConfig(target=t, duration_s=1.0, bots=BotConfig(stallers=3), bot_procs=0)
    assert inline.startup_s == 0.05                   # bots in the measuring process
