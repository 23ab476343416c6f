"""The spool's gauges at scrape time: counts, bytes and the relay backlog by age, from the disk.

Purpose: the spool and the relay backlog as Prometheus gauges, computed where they live (the
spool directories) rather than counted by the processes that move files, so that they are right
after any crash or restart. The supervisor's scrape endpoint (ingress.core.metrics_server.serve)
registers one SpoolCollector; the directory names are the store's own (workers.spool.store).

API:
    SpoolCollector(spool_dir)       a prometheus_client Collector; collect() yields
                                    smtp_ingress_spool_messages{dir=new|tmp|failed|hold|
                                    journal} (journal: acknowledged, not yet in new/),
                                    smtp_ingress_spool_bytes (spool/new), the relay backlog
                                    (smtp_ingress_relay_backlog_messages, _oldest_seconds,
                                    _age_messages{age}: BACKLOG_AGES buckets), the filesystem's
                                    smtp_ingress_spool_fs_free_bytes / _fs_size_bytes, and
                                    smtp_ingress_spool_scan_truncated
    BACKLOG_AGES                    the age buckets: (label, upper bound in seconds), the last
                                    open-ended (`smtp-ingress status` reads them by label)
    SCAN_MAX, SCAN_CACHE            entries counted per directory; seconds a scan is reused

Failure modes: a missing or unreadable directory counts 0; a file that goes away between the
listing and its stat is skipped; a failed statvfs leaves the filesystem gauges out. Nothing
raises to the scrape.

Limits: the scan stops after SCAN_MAX entries per directory (and says so in
smtp_ingress_spool_scan_truncated: the counts are then lower bounds) and is cached for
SCAN_CACHE seconds, so a scrape costs at most a bounded directory listing (one stat per entry of
new/), one statvfs and a read of the lane workers' journals (each at most spool.journal_size;
a few records, as a journal starts a new epoch whenever its messages are all in new/). Dot
files (hidden: the store's temporary names) are not counted. Ages
come from the files' mtimes (the time of the durable write).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.spool import journal
from workers.spool.store import FAILED_DIR, HOLD_DIR, NEW_DIR, TMP_DIR

JOURNAL = "journal"          # the dir label of what the lane workers' journals hold
SCAN_MAX = 100_000
SCAN_CACHE = 1.0
# Relay backlog age buckets (upper bounds in seconds; the last is open-ended).
BACKLOG_AGES = (("lt_1m", 60.0), ("1m_10m", 600.0), ("10m_1h", 3600.0), ("1h_1d", 86400.0),
                ("gt_1d", float("inf")))


@dataclass
class SpoolStats:
    at: float = 0.0
    counts: dict[str, int] | None = None
    new_bytes: int = 0
    oldest_age: float = 0.0
    truncated: bool = False
    ages: dict[str, int] | None = None         # relay backlog by BACKLOG_AGES bucket
    fs_free: int = -1                          # bytes available to the service (statvfs)
    fs_size: int = -1


class SpoolCollector(Collector):
    """Counts spool files at scrape time: bounded (SCAN_MAX) and cached (SCAN_CACHE)."""

    DIRS = (NEW_DIR, TMP_DIR, FAILED_DIR, HOLD_DIR)

    def __init__(self, spool_dir: Path | str) -> None:
        self.root = Path(spool_dir)
        self.stats = SpoolStats()
        self.lock = threading.Lock()

    def _scan(self) -> SpoolStats:
        st = SpoolStats(at=time.monotonic(), counts={}, ages=dict.fromkeys(
            (b for b, _ in BACKLOG_AGES), 0))
        assert st.counts is not None and st.ages is not None
        now = time.time()
        oldest = now
        for name in self.DIRS:
            n = 0
            with contextlib.suppress(OSError), os.scandir(self.root / name) as it:
                for e in it:
                    if n >= SCAN_MAX:
                        st.truncated = True
                        break
                    if e.name.startswith("."):
                        continue
                    n += 1
                    if name == NEW_DIR:
                        with contextlib.suppress(OSError):
                            s = e.stat()
                            st.new_bytes += s.st_size
                            oldest = min(oldest, s.st_mtime)
                            age = now - s.st_mtime
                            st.ages[next(b for b, top in BACKLOG_AGES if age < top)] += 1
            st.counts[name] = n
        # acknowledged by a lane worker's journal, not yet in new/ (milliseconds, or a disk
        # that refuses the files: then it grows)
        st.counts[JOURNAL] = journal.outstanding(self.root)
        st.oldest_age = max(0.0, now - oldest)
        with contextlib.suppress(OSError):
            vfs = os.statvfs(self.root)
            st.fs_free, st.fs_size = vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize
        return st

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.lock:
            if self.stats.counts is None or time.monotonic() - self.stats.at >= SCAN_CACHE:
                self.stats = self._scan()
            st = self.stats
        assert st.counts is not None
        g = GaugeMetricFamily("smtp_ingress_spool_messages", "Messages in the spool by directory",
                              labels=["dir"])
        for name, n in st.counts.items():
            g.add_metric([name], n)
        yield g
        yield GaugeMetricFamily("smtp_ingress_spool_bytes", "Bytes of the messages in spool/new",
                                value=st.new_bytes)
        yield GaugeMetricFamily("smtp_ingress_relay_backlog_messages",
                                "Messages waiting for the relay (spool/new)",
                                value=st.counts.get(NEW_DIR, 0))
        yield GaugeMetricFamily("smtp_ingress_relay_backlog_oldest_seconds",
                                "Age of the oldest message waiting for the relay",
                                value=st.oldest_age)
        a = GaugeMetricFamily("smtp_ingress_relay_backlog_age_messages",
                              "Messages waiting for the relay by age bucket (spool file mtime)",
                              labels=["age"])
        for bucket, n in (st.ages or {}).items():
            a.add_metric([bucket], n)
        yield a
        if st.fs_free >= 0:
            yield GaugeMetricFamily("smtp_ingress_spool_fs_free_bytes",
                                    "Bytes available to the service on the spool's filesystem",
                                    value=st.fs_free)
            yield GaugeMetricFamily("smtp_ingress_spool_fs_size_bytes",
                                    "Size of the spool's filesystem", value=st.fs_size)
        yield GaugeMetricFamily("smtp_ingress_spool_scan_truncated",
                                f"1 if a spool directory held more than {SCAN_MAX} entries "
                                "(the counts are then lower bounds)", value=int(st.truncated))
