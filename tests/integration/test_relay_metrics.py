"""The relay in metrics and in `smtp-ingress status`: a real ingress relaying to a real Postfix.

Deliveries by result (2xx / 4xx / 5xx / error, per recipient), the downstream latency
histogram, DSNs sent, the circuit breaker (closed while Postfix answers, open once it is
stopped), the backlog by age and the spool filesystem's free bytes, all from a live scrape of
the supervisor's endpoint, and the same numbers in `smtp-ingress status`.
Skips when Postfix cannot run here.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import orjson

from ingress.core import metrics
from tests.kit.harness import ROOT, Ingress, make_body, relaying, send_one, wait_for
from tests.kit.postfix import free_port
from tests.kit.relaykit import REJECTED, TEMPFAIL, relay_tables
from tests.kit.scrape import metrics_port, scrape
from workers.spool import collector


def status(ing: Ingress, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingress", "status", "--config",
                           str(ing.config), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


def test_relay_metrics_and_status(tmp_path: Path, postfix) -> None:
    t = relay_tables(postfix)
    t["relay"]["dsn"] = "always"      # a DSN for an unauthenticated sender is counted here
    # a real port: `status` finds the endpoint through metrics.listen
    t["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    with Ingress(tmp_path, t) as ing:
        relaying(ing)
        mport = metrics_port(ing)
        for i in range(5):
            assert asyncio.run(send_one(ing.port, make_body(i)))[0] == 250
        assert asyncio.run(send_one(ing.port, make_body(9), rcpts=(REJECTED,)))[0] == 250
        assert asyncio.run(send_one(ing.port, make_body(8), rcpts=(TEMPFAIL,)))[0] == 250
        # 5 delivered + the DSN for REJECTED (to alice@sender.test, which Postfix takes)
        key = ("smtp_ingress_relay_deliveries_total", (("result", "2xx"),))
        wait_for(lambda: scrape(mport).get(key, 0) >= 6, 20, "six 2xx deliveries")
        wait_for(lambda: scrape(mport).get(
            ("smtp_ingress_relay_deliveries_total", (("result", "4xx"),)), 0) >= 1, 20, "a 4xx")
        s = scrape(mport)
        assert s[key] == 6
        assert s[("smtp_ingress_relay_deliveries_total", (("result", "5xx"),))] == 1
        assert s[("smtp_ingress_relay_dsns_total", ())] == 1
        assert s[("smtp_ingress_relay_downstream_seconds_count", ())] >= 8
        assert s[("smtp_ingress_relay_breaker_state", ())] == metrics.BREAKER_CLOSED
        time.sleep(collector.SCAN_CACHE + 0.1)
        s = scrape(mport)
        assert s[("smtp_ingress_relay_backlog_age_messages", (("age", "lt_1m"),))] == 1
        assert s[("smtp_ingress_relay_backlog_age_messages", (("age", "gt_1d"),))] == 0
        assert s[("smtp_ingress_spool_fs_free_bytes", ())] > 0
        r = status(ing, "--json")
        doc = orjson.loads(r.stdout)["relay_stats"]
        assert doc["deliveries"]["2xx"] == 6 and doc["deliveries"]["5xx"] == 1
        assert doc["dsns"] == 1 and doc["breaker"] == "closed"
        assert 0 < doc["latency_p50_s"] <= doc["latency_p99_s"] <= 10
        text = status(ing).stdout
        assert "deliveries (per recipient): 2xx 6," in text and "DSNs sent 1" in text, text
        assert "circuit breaker closed" in text and "lt_1m 1" in text, text

        postfix.stop()                       # the deferred message's retries now hit a dead port
        wait_for(lambda: scrape(mport).get(("smtp_ingress_relay_breaker_state", ()), 0)
                 != metrics.BREAKER_CLOSED, 20, "the breaker to open")
        s = scrape(mport)
        assert s[("smtp_ingress_relay_deliveries_total", (("result", "error"),))] >= 1
        assert s[("smtp_ingress_relay_breaker_failures", ())] >= 1
        assert "circuit breaker open" in status(ing).stdout or \
            "circuit breaker half-open" in status(ing).stdout
