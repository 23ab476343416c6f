"""Reading the ingress's Prometheus endpoint in a test.

API
    scrape(port) -> {(name, labels): value}   one GET of http://127.0.0.1:port/metrics, parsed;
                                              labels: sorted (key, value) pairs without "pid"
    value(samples, name, **labels) -> float   one sample, 0.0 when absent
    metrics_port(ing) -> int                  the port from the ingress's "metrics_listening"
                                              line (metrics.listen = "127.0.0.1:0")

Failure modes
    scrape raises what urllib raises (5 s timeout); metrics_port raises AssertionError with the
    log's tail when no "metrics_listening" line came within 10 s.

Limits
    The "pid" label is dropped: two samples that differ only in it (a gauge in multiprocess mode
    "all") collapse into one; the tests read counters and aggregated gauges only.
"""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.kit.harness import Ingress

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            out[(s.name, key)] = s.value
    return out


def value(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_port(ing: Ingress) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ev = ing.events("metrics_listening")
        if ev:
            return int(str(ev[0]["listen"]).rsplit(":", 1)[1])
        time.sleep(0.05)
    raise AssertionError(f"no metrics_listening: {ing.log_tail()}")
