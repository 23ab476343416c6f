"""check-config --show: the effective config round-trips as TOML; the derived limits."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ingress.core import config
from ingress.tools import configshow
from tests.kit.configkit import cfg_file


def test_effective_config_round_trips(tmp_path: Path) -> None:
    cfg = config.load(cfg_file(tmp_path, **{"lanes.bulk": {"rate": 50.0},
                                            "relay": {"downstream": "smtp://127.0.0.1:25"}}))
    text = configshow.render(cfg, nofile=(4096, 4096))
    again = tmp_path / "again.toml"
    again.write_text(text)
    back = config.load(again)
    assert dataclass_eq(back, cfg)
    raw = tomllib.loads(text)
    assert raw["lanes"]["bulk"]["rate"] == 50.0 and raw["relay"]["concurrency"] == 4
    assert 'downstream = "smtp://127.0.0.1:25"' in text and '# default ""' in text
    default_rate = config.Config().lanes.bulk.rate
    assert f"# default {default_rate!r}" in text.split("rate = 50.0", 1)[1].split("\n", 1)[0]
    assert "\nconcurrency = 4\n" in text, "a default value is shown without a comment"


def dataclass_eq(a: config.Config, b: config.Config) -> bool:
    import dataclasses
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    da.pop("source"), db.pop("source")
    return da == db


@pytest.mark.parametrize(("tables", "nofile", "want"), [
    ({"smtp": {"max_connections": 1000, "fast_reserve": 100},
      "supervisor": {"acceptors": 4}, "lanes.bulk": {"rate": 100.0, "workers": 3},
      "lanes.fast": {"workers": 2}},
     (1024, 1024),
     {"acceptors": 4, "connections_fd_allows_per_acceptor": 960, "connections_per_acceptor": 960,
      "fd_limit_too_low": True, "bulk_slots_per_acceptor": 864, "connections_total": 3840,
      "workers": {"fast": 2, "bulk": 3},
      "bulk_share_per_acceptor": {"rate": 27.5, "burst": 25.0},
      "bulk_admitted_at_mail_from": 110.0,
      # fast reserve 100 cut to 96 by the fd limit, x classify.identity_share 0.25
      "fast_sessions_per_identity_per_acceptor": 24,
      # domain_rate 50/s and domain_burst 10 over 4 acceptors + 1 fast acceptor
      "domain_rate_per_acceptor": {"rate": 10.0, "burst": 2.0},
      "domain_rate_at_broker": {"rate": 50.0, "burst": 50.0}}),
    ({"smtp": {"max_connections": 500, "fast_reserve": 50},
      "supervisor": {"acceptors": 2}, "lanes.bulk": {"rate": 0.0}},
     (1024, 65536),
     {"fd_limit": 65536, "connections_per_acceptor": 500, "fd_limit_too_low": False,
      "bulk_slots_per_acceptor": 450, "connections_total": 1000,
      "bulk_share_per_acceptor": None}),
    ({"classify": {"domain_rate": 4.0, "domain_burst": 30.0}, "supervisor": {"acceptors": 2,
                                                                             "fast_acceptors": 0}},
     (1024, 65536),
     {"domain_rate_per_acceptor": {"rate": 2.0, "burst": 15.0},
      "domain_rate_at_broker": {"rate": 4.0, "burst": 30.0}}),   # at least one edge's burst
    ({"classify": {"domain_rate": 0.0}}, (1024, 65536),
     {"domain_rate_per_acceptor": None, "domain_rate_at_broker": None}),
])
def test_derived(tmp_path: Path, tables: dict[str, dict[str, object]], nofile: tuple[int, int],
                 want: dict[str, object]) -> None:
    d = configshow.derived(config.load(cfg_file(tmp_path, **tables)), nofile=nofile)
    for k, v in want.items():
        assert d[k] == v, (k, d[k])


def test_derived_tiers(tmp_path: Path) -> None:
    """check-config --show prints what each trust tier may hold (issue 17)."""
    cfg = config.load(cfg_file(tmp_path, smtp={"max_connections": 1000, "fast_reserve": 100,
                                               "max_message_size": 1 << 20,
                                               "data_memory_budget": 8 << 20,
                                               "data_fast_reserve": 4 << 20},
                               supervisor={"acceptors": 2, "fast_acceptors": 1},
                               **{"lanes.fast": {"workers": 2, "credit": 8, "queue_max": 256,
                                                 "queue_bytes": 64 << 20}}))
    t = configshow.derived(cfg, nofile=(65536, 65536))["tiers"]
    # 2 fast workers and the one dedicated to the self-proven tier (tiers.self_proven_workers):
    # the broker's total credit is all three's
    assert t["of"] == {"slots_per_acceptor": 100, "data_bytes_per_acceptor": 4 << 20,
                       "fast_queue_messages": 256, "fast_queue_bytes": 64 << 20,
                       "fast_worker_credit": 24}
    assert t["self-proven"]["at_most"] == {
        "slots_per_acceptor": 50, "data_bytes_per_acceptor": 2 << 20,
        "fast_queue_messages": 128, "fast_queue_bytes": 32 << 20, "fast_worker_credit": 12}
    assert t["operator"]["at_least"] == {
        "slots_per_acceptor": 25, "data_bytes_per_acceptor": 1 << 20,
        "fast_queue_messages": 64, "fast_queue_bytes": 16 << 20, "fast_worker_credit": 6}
    # 200/s over the two port-25 acceptors (no fast port: learned clients are not handed off)
    assert t["self-proven"]["rate_per_acceptor"] == {"rate": 100.0, "burst": 10.0}
    assert t["self-proven"]["rate_at_broker"] == {"rate": 200.0, "burst": 200.0}
    assert "rate_per_acceptor" not in t["third-party"] and t["per_ip_fast_max"] == 4
    text = configshow.render(cfg, nofile=(65536, 65536))
    assert "# trust tiers" in text and "self-proven: one total rate" in text


@pytest.mark.parametrize("smtp", [{"max_connections": 1000, "fast_reserve": 100}, {}])
def test_show_prints_the_slots_the_processes_run(tmp_path: Path,
                                                 smtp: dict[str, object]) -> None:
    """The slots --show prints are the ones an acceptor's session table takes and the
    supervisor's metrics report, under the same fd limit (ingress.core.derived, one rule)."""
    import resource
    from collections import Counter

    from ingress.edge.sessions import SessionTable
    from ingress.tools import supervisor

    cfg = config.load(cfg_file(tmp_path, smtp={"accepted_domains": ["example.test"], **smtp},
                               classify={"spf_promote": "any"}))
    for nofile in ((1024, 1024), (300, 300), (1 << 16, 1 << 16)):
        d = configshow.derived(cfg, nofile=nofile)
        lim = SessionTable(cfg, Counter(), now=0.0, nofile=nofile[1]).limit
        assert (d["connections_per_acceptor"], d["fast_reserve_per_acceptor"],
                d["connections_limited_by"]) == (lim.max_connections, lim.fast_reserve,
                                                 lim.limited_by)
    d = configshow.derived(cfg)         # this process's own RLIMIT_NOFILE, as the supervisor's
    assert supervisor.acceptor_slots(cfg) == (d["connections_per_acceptor"],
                                              d["fast_reserve_per_acceptor"])
    assert d["fd_limit"] >= resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.mark.parametrize(("dedicated", "want", "absent"), [
    (1, "and 1 for the self-proven tier only", "none for one tier only"),
    (0, "none for one tier only", "and 0 for"),
])
def test_show_names_the_dedicated_fast_workers_only_when_there_are_some(
        tmp_path: Path, dedicated: int, want: str, absent: str) -> None:
    cfg = config.load(cfg_file(tmp_path, tiers={"self_proven_workers": dedicated}))
    workers = next(line for line in configshow.render(cfg, nofile=(65536, 65536)).splitlines()
                   if line.startswith("# workers:"))
    assert want in workers and absent not in workers
