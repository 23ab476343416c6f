"""The Prometheus scrape endpoint: every process's metrics merged, served by the supervisor.

Purpose: one scrape endpoint on the supervisor shows what the acceptors, brokers and workers
count (ingress.core.metrics and metrics_relay declare it). Each child writes its values to its
own mmap'd files in PROMETHEUS_MULTIPROC_DIR; the supervisor's HTTP thread merges them at scrape
time (MultiProcessCollector) and adds what the supervisor knows itself (SupervisorCollector:
child exits, connection slots) and the collectors the caller passes (the supervisor passes the
spool's, workers.spool.collector.SpoolCollector: core does not know the spool's layout).

API (supervisor):
    setup_dir(state_dir) -> Path    before spawning any child: empties <state_dir>/metrics,
                                    sets os.environ[ENV] (children inherit it through spawn and
                                    must import prometheus_client after)
    serve(listen, state_dir, *collectors) -> MetricsServer | None
                                    HTTP on "host:port" ("" = off; port 0 = any, see .port);
                                    a daemon thread. None (and a log line) if it cannot bind.
    registry(metrics_dir, *collectors) -> CollectorRegistry     what serve() exposes
    child_dead(pid)                 after reaping a child: drops its live gauges
    configured(cfg, slots)          at start and reload: the connection slots the config gives
                                    (smtp_ingress_connection_slots{kind=total|fast_reserved|bulk},
                                    over all acceptors), for "sessions vs slots" on a dashboard
    child_exited(kind)              a child died unexpectedly (it will be restarted): counted in
                                    smtp_ingress_child_exits_total{kind} (this process's memory,
                                    exported by SupervisorCollector; always present, 0 per kind)
    MetricsServer.port / .close()   the bound port; stop serving (reload with a new
                                    metrics.listen, drain)

Failure modes: serve() never raises for a busy port: it logs metrics_listen_failed and returns
None (mail flows on). The first use of a label set in a child opens that process's .db file: it
raises OSError if ENV names a missing or unwritable directory, which setup_dir() rules out by
creating it before any child exists. child_dead() ignores a directory that went away. A
child's file that is still shorter than its header (being created, or its child killed while
creating it) is left out of the scrape (ChildFilesCollector), never a 500.

Limits: one .db file per process and metric type; a restarted child starts new files, and the
dead child's counters stay (counters must not go backwards), so the directory grows with restarts
until the next start clears it (a crash loop of 10k restarts is ~10k small files; the scrape cost
grows with it). Gauges use "live" modes: a dead child's gauges vanish once child_dead(pid) is
called.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

ENV = "PROMETHEUS_MULTIPROC_DIR"
SUBDIR = "metrics"


def setup_dir(state_dir: Path | str) -> Path:
    """Empty <state_dir>/metrics and point PROMETHEUS_MULTIPROC_DIR at it (call before spawn)."""
    d = Path(state_dir) / SUBDIR
    if d.is_dir():
        for f in d.iterdir():
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                f.unlink()
    else:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(d)
    return d


def child_dead(pid: int) -> None:
    """A child is gone: its live gauges must stop counting (its counters stay)."""
    path = os.environ.get(ENV)
    if path:
        with contextlib.suppress(OSError):
            mark_process_dead(pid, path)


CHILD_KINDS = ("acceptor", "broker", "worker", "relay")
_child_exits: dict[str, int] = dict.fromkeys(CHILD_KINDS, 0)


_slots: dict[str, int] = {}


def configured(cfg: Any, slots: tuple[int, int] | None = None) -> None:
    """Supervisor: the slot capacity of the running config (an ingress.core.config.Config);
    `slots`: (max_connections, fast_reserve) per acceptor as derived (derived.connection_limit;
    default: the configured values)."""
    n, s = cfg.acceptor_count, cfg.smtp
    total, reserve = slots if slots is not None else (s.max_connections, s.fast_reserve)
    _slots.update(total=total * n, fast_reserved=reserve * n, bulk=(total - reserve) * n)


def child_exited(kind: str) -> None:
    """Supervisor only (its scrape thread reads the dict; an int add under the GIL)."""
    _child_exits[kind] = _child_exits.get(kind, 0) + 1


class SupervisorCollector(Collector):
    """What the supervisor itself knows: unexpected child exits (restart loops), slot capacity."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = CounterMetricFamily("smtp_ingress_child_exits",
                                "Children that exited or hung unexpectedly (then restarted)",
                                labels=["kind"])
        for kind, n in list(_child_exits.items()):
            c.add_metric([kind], n)
        yield c
        if _slots:
            g = GaugeMetricFamily("smtp_ingress_connection_slots",
                                  "Connection slots the config gives, over all acceptors: total, "
                                  "reserved for the fast lane, usable by bulk", labels=["kind"])
            for kind, n in list(_slots.items()):
                g.add_metric([kind], n)
            yield g


class MetricsServer:
    def __init__(self, httpd: Any, thread: threading.Thread, registry: CollectorRegistry) -> None:
        self.httpd, self.thread, self.registry = httpd, thread, registry

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(2.0)


MMAP_HEADER = 8        # bytes: a child's metrics file's header (prometheus_client.mmap_dict)


class ChildFilesCollector(MultiProcessCollector):
    """prometheus_client's merge of the children's files, leaving out a file shorter than its
    header: a child creates its file and sizes it afterwards, and a scrape in between (or
    after that child was killed in between, for good) failed the whole scrape with a 500
    (prometheus/client_python#1199). Such a file holds no value yet."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for f in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(OSError):
                if os.path.getsize(f) >= MMAP_HEADER:
                    files.append(f)
        merge: Callable[..., Iterable[Metric]] = self.merge     # (untyped upstream)
        return merge(files, accumulate=True)


def registry(metrics_dir: Path | str, *collectors: Collector) -> CollectorRegistry:
    """The scrape registry: every child's files merged, the supervisor's own values, and
    `collectors` (the spool's gauges)."""
    reg = CollectorRegistry()
    children: Callable[..., object] = ChildFilesCollector      # (its __init__ is untyped)
    children(reg, path=str(metrics_dir))
    for c in collectors:
        reg.register(c)
    reg.register(SupervisorCollector())
    return reg


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def serve(listen: str, state_dir: Path | str, *collectors: Collector) -> MetricsServer | None:
    """Start the endpoint in a daemon thread; None when off ("") or when it cannot bind."""
    if not listen:
        return None
    from prometheus_client import start_http_server

    from ingress.core import log
    host, port = parse_listen(listen)
    reg = registry(Path(state_dir) / SUBDIR, *collectors)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=reg)
    except OSError as e:
        log.event("metrics_listen_failed", "error", listen=listen, error=str(e))
        return None
    srv = MetricsServer(httpd, thread, reg)
    log.event("metrics_listening", listen=f"{host}:{srv.port}")
    return srv
