"""The Prometheus endpoint of a real ingress, scraped while mail flows.

The ingress runs with metrics.listen = "127.0.0.1:0"; the port comes from the supervisor's
`metrics_listening` log line (ingress.core.metrics_server.serve logs it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.kit.harness import Ingress, make_body, send_one
from tests.kit.scrape import scrape
from workers.spool import collector

N = 20


def test_scrape_while_mail_flows(tmp_path: Path) -> None:
    with Ingress(tmp_path, {"metrics": {"listen": "127.0.0.1:0"}}) as ing:
        deadline = time.monotonic() + 10
        while not ing.events("metrics_listening") and time.monotonic() < deadline:
            time.sleep(0.05)
        ev = ing.events("metrics_listening")
        assert ev, ing.log_tail()
        mport = int(str(ev[0]["listen"]).rsplit(":", 1)[1])

        async def flow() -> tuple[list[tuple[int, str]], int]:
            loop = asyncio.get_running_loop()
            sends = [asyncio.create_task(send_one(ing.port, make_body(i))) for i in range(N)]
            scrapes = 0
            while not all(t.done() for t in sends):      # scrape while the mail is in flight
                await loop.run_in_executor(None, scrape, mport)
                scrapes += 1
            return [t.result() for t in sends], scrapes

        results, scrapes = asyncio.run(flow())
        assert [c for c, _ in results] == [250] * N, results
        assert scrapes >= 1

        s = scrape(mport)
        bulk = (("lane", "bulk"),)
        assert s[("smtp_ingress_messages_total", (*bulk, ("result", "accepted")))] == N
        assert s[("smtp_ingress_connections_total", (*bulk, ("outcome", "admitted")))] >= N
        assert s[("smtp_ingress_banner_seconds_count", bulk)] >= N
        assert s[("smtp_ingress_data_ack_seconds_count", bulk)] == N
        for lane in ("fast", "bulk"):
            assert ("smtp_ingress_lane_queue_depth", (("lane", lane),)) in s, lane
            assert ("smtp_ingress_lane_saturated", (("lane", lane),)) in s, lane
        # The spool gauges are computed at scrape time and cached for collector.SCAN_CACHE.
        time.sleep(collector.SCAN_CACHE + 0.1)
        s = scrape(mport)
        assert s[("smtp_ingress_spool_messages", (("dir", "new"),))] == N
        assert s[("smtp_ingress_relay_backlog_messages", ())] == N
        assert s[("smtp_ingress_spool_bytes", ())] > N * 1024
