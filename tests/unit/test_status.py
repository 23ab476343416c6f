"""ingress.tools.status pure parts: histogram quantiles (as Prometheus' histogram_quantile) and the
relay's share of a scrape."""

from __future__ import annotations

import math

import pytest

from ingress.core import metrics
from ingress.tools import status

INF = math.inf


@pytest.mark.parametrize(("buckets", "q", "want"), [
    ([], 0.5, None),
    ([(0.1, 0.0), (INF, 0.0)], 0.5, None),
    ([(0.1, 10.0), (1.0, 10.0), (INF, 10.0)], 0.5, 0.05),        # all in the first bucket
    ([(0.1, 0.0), (1.0, 10.0), (INF, 10.0)], 0.5, 0.55),         # interpolated in (0.1, 1]
    ([(1.0, 5.0), (0.1, 0.0), (INF, 10.0)], 0.99, 1.0),          # unsorted; +Inf -> top bound
    ([(0.1, 4.0), (1.0, 8.0), (INF, 8.0)], 1.0, 1.0),
])
def test_quantile(buckets: list[tuple[float, float]], q: float, want: float | None) -> None:
    got = status.quantile(buckets, q)
    assert got == pytest.approx(want) if want is not None else got is None


@pytest.mark.parametrize(("code", "want"), [(250, "2xx"), (251, "2xx"), (451, "4xx"),
                                            (421, "4xx"), (550, "5xx"), (0, "error"),
                                            (354, "error")])
def test_relay_class(code: int, want: str) -> None:
    assert metrics.relay_class(code) == want


def test_relay_stats_from_scrape() -> None:
    m = {"smtp_ingress_relay_deliveries_total{result=2xx}": 7.0,
         "smtp_ingress_relay_deliveries_total{result=error}": 2.0,
         "smtp_ingress_relay_dsns_total{}": 1.0,
         "smtp_ingress_relay_breaker_state{}": 1.0,
         "smtp_ingress_relay_breaker_failures{}": 3.0,
         "smtp_ingress_relay_downstream_seconds_bucket{le=0.01}": 0.0,
         "smtp_ingress_relay_downstream_seconds_bucket{le=0.1}": 4.0,
         "smtp_ingress_relay_downstream_seconds_bucket{le=+Inf}": 4.0,
         "smtp_ingress_relay_backlog_age_messages{age=1h_1d}": 5.0,
         "smtp_ingress_spool_fs_free_bytes{}": 123.0}
    d = status.relay_stats(m)
    assert d["deliveries"] == {"2xx": 7.0, "4xx": 0.0, "5xx": 0.0, "error": 2.0}
    assert d["dsns"] == 1.0 and d["breaker"] == "open" and d["breaker_failures"] == 3.0
    assert d["latency_p50_s"] == pytest.approx(0.055)
    assert d["backlog_by_age"]["1h_1d"] == 5.0 and d["backlog_by_age"]["lt_1m"] == 0.0
    assert d["spool_fs_free_bytes"] == 123.0
    text = status.render({"listen": "x", "config": "c", "lanes": {}, "sessions": None,
                          "spool": {"new": 1, "failed": 0, "tmp": 0, "hold": 2},
                          "relay": "smtp://x:1", "metrics": "m", "relay_stats": d})
    assert "2 held" in text and "circuit breaker open (3 failures)" in text
    assert "p50 55.0 ms" in text and "error 2;" in text


@pytest.mark.parametrize(("pending", "said"), [(0, False), (3, True)])
def test_render_names_what_the_journal_holds_only_when_it_holds_something(pending: int,
                                                                          said: bool) -> None:
    text = status.render({"listen": "x", "config": "c", "lanes": {}, "sessions": None,
                          "spool": {"new": 1, "failed": 0, "tmp": 0, "hold": 0,
                                    "journal": pending},
                          "relay": "smtp://x:1", "metrics": "m", "relay_stats": None})
    assert ("3 acknowledged in the journals" in text) is said, text
