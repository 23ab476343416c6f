"""bench/report.py and the pure parts of bench/run.py on fixed inputs: no servers, no sockets."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.flood import probe
from bench.run import build_scenarios, netstat_delta, parse_settings


def legit(kind: str, attempts: int, accepted: int, p99: float, *, p50: float = 5.0,
          tempfails: dict[str, int] | None = None, unfinished: int = 0,
          timeouts: dict[str, int] | None = None) -> dict[str, Any]:
    timeline = [{"t": i * 0.1, "latency_ms": p50, "outcome": "accepted", "code": 250,
                 "stage": "DOT"} for i in range(accepted)]
    timeline += [{"t": 9.0, "latency_ms": None, "outcome": "tempfail", "code": 451,
                  "stage": "MAIL"}] * sum((tempfails or {}).values())
    return {
        "name": kind, "kind": kind, "attempts": attempts, "accepted": accepted,
        "accepted_pct": 100.0 * accepted / max(1, attempts - unfinished),
        "unfinished": unfinished,
        "latency_ms": {"n": accepted, "min": 1.0, "p50": p50, "p95": p99, "p99": p99,
                       "max": p99, "mean": p50},
        "tempfails": tempfails or {}, "tempfails_by_stage": {}, "permfails": {},
        "permfails_by_stage": {}, "timeouts": timeouts or {}, "conn_errors": {}, "refused": 0,
        "timeline": timeline,
    }


def flood_result(trusted: dict[str, Any], *, spam_accepted: int = 0, active_s: float = 30.0,
                 stallers: int = 0, banner_421: int = 0) -> dict[str, Any]:
    spam_bots = 50 if spam_accepted else 0
    return {
        "version": 1, "target": "127.0.0.1:2525", "duration_s": active_s,
        "legit": [trusted, legit("spf", 10, 10, 9.0)],
        "bots": {
            "stall": {"bots": stallers, "connections": stallers + banner_421,
                      "connected": stallers + banner_421, "refused": 0, "connect_timeouts": 0,
                      "banner_codes": {"220": stallers, "421": banner_421},
                      "first_replies": {}, "open_at_end": stallers, "no_banner_at_end": 0,
                      "closed_by_server": banner_421},
            "trickle": {"bots": 0}, "early": {"bots": 0},
            "spam": {"bots": spam_bots, "sent": spam_accepted * 5, "accepted": spam_accepted,
                     "accepted_per_s": round(spam_accepted / active_s, 2) if spam_bots else None,
                     "sent_per_s": round(spam_accepted * 5 / active_s, 2) if spam_bots else None,
                     "shed": {"451": spam_accepted * 4} if spam_bots else {},
                     "shed_by_stage": {}, "rejected": {}, "refused": 0, "timeouts": {},
                     "conn_errors": {}, "active_s": active_s},
        },
    }


def make_doc(*, flood_p99: float = 30.0, base_p99: float = 20.0, spam_accepted: int = 6000,
             large_accepted: int = 250) -> dict[str, Any]:
    entries = [
        ("noflood", "smtp-ingress", flood_result(legit("trusted", 150, 150, base_p99))),
        ("flood", "smtp-ingress", flood_result(legit("trusted", 300, 300, flood_p99),
                                               spam_accepted=spam_accepted, stallers=300)),
        ("large", "smtp-ingress", flood_result(
            legit("trusted", 250, large_accepted, 25.0,
                  tempfails={"421": 250 - large_accepted} if large_accepted < 250 else None),
            stallers=5000, banner_421=3200)),
        ("flood", "postfix", flood_result(legit("trusted", 300, 40, 9000.0, unfinished=10,
                                                timeouts={"banner": 250}),
                                          spam_accepted=18000, stallers=300)),
    ]
    return {
        "version": 1, "mode": "full", "started": "2026-01-01T00:00:00+00:00",
        "command": "python -m bench.run --full", "elapsed_s": 800.0,
        "machine": {"nproc": 2, "cpu_model": "test cpu", "mem_total_mb": 4096, "kernel": "6.1",
                    "python": "3.11.7", "loadavg_start": "1.00", "loadavg_end": "2.00"},
        "versions": {"postfix": "3.7.11"},
        "params": {"bulk_rate_cap": 200.0, "bulk_rate_tolerance_pct": 5.0, "p99_max_ratio": 2.0,
                   "legit_interval_s": 0.1},
        "scenarios": {"noflood": {"label": "no flood"}, "flood": {"label": "300 + 50"},
                      "large": {"label": "5,000 stalling bots"}},
        "targets": {"smtp-ingress": {"status": "ok", "role": "flood"},
                    "postfix": {"status": "ok", "role": "flood"},
                    "aiosmtpd": {"status": "failed", "reason": "port in use"}},
        "flood": [{"scenario": s, "target": t, "result": r, "netstat_delta":
                   {"ListenOverflows": 3, "ListenDrops": 4}} for s, t, r in entries],
        "throughput": {
            "params": {"messages": 20000, "sessions": 20, "size": 1024, "runs": 3},
            "targets": ["smtp-ingress", "postfix", "smtp-sink"], "modes": ["conn", "reuse"],
            "runs": [
                *[{"target": "postfix", "mode": "conn", "rate": r, "ok": True}
                  for r in (1000.0, 1100.0, 1200.0)],
                *[{"target": "smtp-ingress", "mode": "conn", "rate": r, "ok": ok}
                  for r, ok in ((550.0, True), (0.0, False), (450.0, True))],
                *[{"target": "smtp-sink", "mode": "conn", "rate": r, "ok": True}
                  for r in (9000.0, 8000.0, 10000.0)],
                *[{"target": "postfix", "mode": "reuse", "rate": r, "ok": True}
                  for r in (1500.0, 1400.0, 1600.0)],
                *[{"target": "smtp-ingress", "mode": "reuse", "rate": r, "ok": True}
                  for r in (700.0, 800.0, 750.0)],
                *[{"target": "smtp-sink", "mode": "reuse", "rate": r, "ok": True}
                  for r in (20000.0, 20000.0, 20000.0)],
            ],
            "notes": [],
        },
        "notes": ["noisy machine"],
    }


# ------------------------------------------------------------------------- numeric helpers


def test_median_and_ratio() -> None:
    assert report.median([]) is None
    assert report.median([None, None]) is None
    assert report.median([3.0, 1.0, 2.0]) == 2.0
    assert report.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert report.median([5.0, None, 1.0]) == 3.0
    assert report.ratio(300.0, 200.0) == 1.5
    assert report.ratio(None, 200.0) is None
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(1.0, None) is None
    assert report.pct_change(190.0, 200.0) == pytest.approx(-5.0)
    assert report.pct_change(210.0, 200.0) == pytest.approx(5.0)
    assert report.pct_change(None, 200.0) is None


# ------------------------------------------------------------------------- summaries


def test_summarise_flood_counts() -> None:
    r = flood_result(legit("trusted", 100, 97, 40.0, tempfails={"451": 2}, unfinished=1),
                     spam_accepted=6000, stallers=300, banner_421=12)
    s = report.summarise_flood(r)
    t = s["legit"]["trusted"]
    # Strict accepted %: the unfinished attempt counts against it.
    assert t["accepted_pct"] == pytest.approx(97.0)
    assert t["failures"] == {"451": 2, "unfinished": 1}
    assert t["p99"] == 40.0
    assert s["spam"]["accepted"] == 6000
    assert s["spam"]["accepted_per_s"] == 200.0
    assert s["spam"]["shed_total"] == 24000
    assert s["bots"]["bots"] == 300
    assert s["bots"]["refused_421"] == 12
    assert s["bots"]["connections"] == 312


def test_summarise_flood_no_bots() -> None:
    s = report.summarise_flood(flood_result(legit("trusted", 10, 10, 5.0)))
    assert s["spam"]["bots"] == 0 and s["spam"]["accepted_per_s"] is None
    assert s["bots"]["bots"] == 0
    assert set(s["legit"]) == {"trusted", "spf"}


# ------------------------------------------------------------------------- acceptance


def checks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    c = report.acceptance(doc)
    assert [x["check"].split(",")[0] for x in c] == [
        "trusted accepted", "trusted p99 during flood / no-flood p99",
        "bulk accepted rate vs cap", "trusted accepted"]
    return c


def test_acceptance_all_pass() -> None:
    c = checks(make_doc(flood_p99=40.0, base_p99=20.0, spam_accepted=6000 + 150))
    assert [x["ok"] for x in c] == [True, True, True, True]
    assert c[1]["measured"].startswith("2.00x")
    assert c[2]["measured"] == "205.0/s (+2.5%)"


def test_acceptance_failures_are_reported() -> None:
    c = checks(make_doc(flood_p99=41.0, base_p99=20.0, spam_accepted=5600, large_accepted=249))
    assert [x["ok"] for x in c] == [True, False, False, False]
    assert c[1]["measured"].startswith("2.05x")
    assert "-6.7%" in c[2]["measured"]
    assert c[3]["measured"] == "99.6% (249/250)"
    assert "421x1" in c[3]["detail"]


def test_acceptance_not_measured_is_not_a_pass() -> None:
    doc = make_doc()
    doc["flood"] = [e for e in doc["flood"] if e["scenario"] != "large"]
    doc["params"]["bulk_rate_cap"] = None
    c = checks(doc)
    assert c[2]["ok"] is None and c[2]["measured"] == "not measured"
    assert c[3]["ok"] is None


def test_acceptance_unfinished_trusted_fails() -> None:
    doc = make_doc()
    doc["flood"][1]["result"]["legit"][0] = legit("trusted", 300, 299, 30.0, unfinished=1)
    c = checks(doc)
    assert c[0]["ok"] is False
    assert "unfinished" in c[0]["detail"]


# ------------------------------------------------------------------------- throughput


def test_throughput_rows_medians_and_ratios() -> None:
    rows = {r["target"]: r for r in report.throughput_rows(make_doc()["throughput"])}
    ing = rows["smtp-ingress"]
    assert ing["conn"]["median"] == 500.0  # the failed run is left out
    assert ing["conn"]["ratio"] == pytest.approx(500.0 / 1100.0)
    assert ing["conn"]["runs"] == [550.0, None, 450.0]
    assert ing["reuse"]["median"] == 750.0
    assert ing["reuse"]["ratio"] == pytest.approx(0.5)
    assert rows["postfix"]["conn"]["ratio"] == 1.0
    assert rows["smtp-sink"]["reuse"]["ratio"] == pytest.approx(20000.0 / 1500.0)


def test_throughput_rows_without_baseline() -> None:
    tp = copy.deepcopy(make_doc()["throughput"])
    tp["runs"] = [r for r in tp["runs"] if r["target"] != "postfix"]
    tp["targets"].remove("postfix")
    for r in report.throughput_rows(tp):
        assert r["conn"]["ratio"] is None


# ------------------------------------------------------------------------- markdown


def test_render_markdown_tables() -> None:
    md = report.render_markdown(make_doc(flood_p99=50.0, base_p99=20.0))
    assert "### Issue 3 acceptance (smtp-ingress)" in md
    assert "| trusted p99 during flood / no-flood p99 | <= 2x | 2.50x (50.0 / 20.0 ms) |" \
        " **FAIL** |" in md
    assert "**aiosmtpd**: skipped — port in use" in md
    # postfix: 40 of 300 accepted (strict %), n/a for cert, failures listed.
    assert "| 300 + 50 | postfix | 13.3% · 5.0/9,000/9,000 | n/a |" in md
    assert "trusted: timeout@bannerx250" in md and "trusted: unfinishedx10" in md
    assert "| smtp-ingress | 500 | 0.45 | 550, fail, 450 | 750 | 0.50 | 700, 800, 750 |" in md
    assert "- noisy machine" in md
    # Every table row has the same number of cells as its header.
    for block in md.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        if rows:
            assert len({ln.count(" | ") for ln in rows}) == 1, block


def test_render_markdown_is_deterministic() -> None:
    doc = make_doc()
    assert report.render_markdown(doc) == report.render_markdown(copy.deepcopy(doc))


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = report.plot(make_doc(), tmp_path / "p.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = make_doc()
    empty["flood"] = []
    assert report.plot(empty, tmp_path / "none.png") is None


# ------------------------------------------------------------------------- py-spy, run helpers


def test_parse_pyspy_raw() -> None:
    raw = (
        "process 12:\"python -m ingress\";<module> (ingress/cli.py:10);run (uvloop/__init__.py:"
        "5);_handle_client (ingress/smtp.py:100) 30\n"
        "process 12:\"python -m ingress\";<module> (ingress/cli.py:10);run (uvloop/__init__.py:"
        "5);send (zmq/sugar/socket.py:7) 10\n"
        "garbage line\n"
    )
    p = report.parse_pyspy_raw(raw)
    assert p["samples"] == 40
    assert p["top_self"][0] == {"frame": "_handle_client (smtp.py)", "samples": 30, "pct": 75.0}
    assert p["top_self"][1]["frame"] == "send (socket.py)"
    total = {x["frame"]: x["samples"] for x in p["top_total"]}
    assert total["run (__init__.py)"] == 40


def test_build_scenarios() -> None:
    full = build_scenarios("full")
    assert list(full) == ["noflood", "stall", "spam", "mixed", "flood", "large", "silent2k",
                          "silent5k", "silent20k", "trickle2k", "silent20k_spam", "spfspam",
                          "spfmany", "spfmany_learned", "spfspam17", "dkimdead", "tlsflood",
                          "retryfarm", "reload", "noflood18", "dnswl20k", "dnsbl5k"]
    assert full["silent20k"].bots.stallers == 20000 and full["silent20k"].bot_procs == 3
    assert full["silent2k"].bots.reconnect_delay == 0.2 and full["silent2k"].senders == ("spf",)
    assert full["spfspam"].bots.spam_from == "spam@spf-bots.test"
    r = full["reload"]
    assert r.issue == "20" and r.bots.stallers == 300 and r.bots.spammers == 50
    assert len(r.reloads) == 2 and 0 < r.reloads[0] < r.reloads[1] < r.duration_s - r.warmup_s
    assert list(build_scenarios("quick", picked=frozenset({"silent2k"}))) == [
        "noflood", "flood", "large", "silent2k"]
    f = full["flood"]
    assert f.bots.stallers == 300 and f.bots.spammers == 50
    assert f.duration_s - f.warmup_s == 30.0
    assert full["large"].bots.stallers == 5000
    quick = build_scenarios("quick")
    assert "large" in quick and quick["large"].bots.stallers < 5000
    assert sum(s.duration_s for s in quick.values()) < 30
    assert build_scenarios("full", ramp=10.0)["large"].bots.ramp_s == 10.0
    with pytest.raises(ValueError):
        build_scenarios("medium")


def test_netstat_delta() -> None:
    d = netstat_delta({"ListenOverflows": 5, "ListenDrops": 5, "Other": 1},
                      {"ListenOverflows": 9, "ListenDrops": 12, "Other": 7})
    assert d == {"ListenOverflows": 4, "ListenDrops": 7}


def test_issue8_rows_against_noflood() -> None:
    from bench.run import issue8_rows

    def entry(scn: str, **legit: tuple[int, int, float, float]) -> dict[str, Any]:
        return {"scenario": scn, "target": "smtp-ingress", "result": {"x": 1}, "summary": {
            "legit": {k: {"accepted": a, "attempts": n, "accepted_pct": 100.0 * a / n,
                          "p50": p50, "p99": p99} for k, (a, n, p50, p99) in legit.items()},
            "spam": {}}}

    doc = {"scenarios": {"noflood": {"label": "no flood"},
                         "silent2k": {"label": "2k", "senders": ["spf"], "p99_max": 2.0,
                                      "min_accepted_pct": 99.0},
                         "spfspam": {"label": "spf spam", "senders": ["trusted"],
                                     "p99_max": 2.0, "min_accepted_pct": 100.0}},
           "flood": [entry("noflood", spf=(10, 10, 5.0, 10.0), trusted=(10, 10, 4.0, 8.0)),
                     entry("silent2k", spf=(250, 250, 6.0, 15.0)),
                     entry("spfspam", trusted=(99, 100, 4.0, 8.0))]}
    rows = {r["scenario"]: r for r in issue8_rows(doc)}
    assert rows["silent2k"]["p99_ratio"] == 1.5 and rows["silent2k"]["p50_ratio"] == 1.2
    assert rows["silent2k"]["ok"] is True
    assert rows["spfspam"]["ok"] is False            # 99% where 100% is required


def test_medians_ratios_per_run() -> None:
    from bench.medians import ratios

    def entry(scn: str, **p99: float) -> dict[str, Any]:
        return {"scenario": scn, "target": "smtp-ingress", "result": {"x": 1}, "summary": {
            "legit": {k: {"accepted": 1, "attempts": 1, "accepted_pct": 100.0, "p50": v,
                          "p99": v} for k, v in p99.items()}, "spam": {}}}

    doc = {"scenarios": {"noflood": {}, "flood": {}, "spfspam": {"senders": ["trusted"]}},
           "flood": [entry("noflood", trusted=10.0, cert=20.0),
                     entry("flood", trusted=15.0, cert=30.0),
                     entry("spfspam", trusted=25.0)]}
    assert ratios(doc) == {("flood", "trusted"): 1.5, ("flood", "cert"): 1.5,
                           ("spfspam", "trusted"): 2.5}


@pytest.mark.parametrize(("items", "want"), [
    (["supervisor.acceptor_nice=10"], {"supervisor": {"acceptor_nice": 10}}),
    (["lanes.bulk.rate=50.5", "lanes.bulk.nice=19"], {"lanes.bulk": {"rate": 50.5, "nice": 19}}),
    (["classify.spf_promote=off", 'log.level="debug"', "classify.allow_cidrs=[]"],
     {"classify": {"spf_promote": "off", "allow_cidrs": []}, "log": {"level": "debug"}}),
])
def test_parse_settings(items: list[str], want: dict[str, Any]) -> None:
    assert parse_settings(items) == want


@pytest.mark.parametrize("item", ["nice=10", "supervisor.acceptor_nice", ".x=1", "a.=1"])
def test_parse_settings_refuses(item: str) -> None:
    with pytest.raises(ValueError, match=r"TABLE\.KEY=VALUE"):
        parse_settings([item])


def test_render_where_the_time_goes() -> None:
    doc = make_doc()
    e = doc["flood"][1]                                       # flood @ smtp-ingress
    e["result"]["legit"][0]["stages_ms"] = {
        "connect": {"p50": 1.0, "p99": 2.0, "tail_mean": 1.5},
        "DOT": {"p50": 5.0, "p99": 20.0, "tail_mean": 18.25}}
    e["sched"] = [{"role": "acceptor", "processes": 2, "cpu_pct": 40.0, "wait_pct": 9.0,
                   "slices": 10, "wait_per_slice_us": 90.5},
                  {"role": "idle-one", "processes": 1, "cpu_pct": 0.0, "wait_pct": 0.0,
                   "slices": 0, "wait_per_slice_us": None}]
    md = report.render_markdown(doc)
    assert "| scenario | connect | DOT |" in md
    assert "| 300 + 50 | 1.0 / 1.5 | 5.0 / 18.2 |" in md        # stages only where measured
    assert "| 300 + 50 | acceptor 40% cpu, 90.5 µs wait/run |" in md
    assert "no flood |" not in md.split("Where the allow-listed")[1].split("###")[0]


def test_report_shows_the_probe_health() -> None:
    doc = make_doc()
    doc["flood"][1]["result"]["probe"] = {"priority": "fifo", "samples": 5000, "stalls": 3,
                                          "stall_ms": probe.STALL_MS, "max_ms": 14.2,
                                          "stalled_ms": 36.0}
    md = report.render_markdown(doc)
    assert "### The probe's own health" in md
    assert "| 300 + 50 | smtp-ingress | fifo | 3 (max 14.2 ms) |" in md
