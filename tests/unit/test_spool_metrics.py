"""workers.spool.collector: the spool's gauges at scrape time, bounded and named by the store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ingress.core.wire import Envelope, Lane
from workers.spool import collector, journal, store
from workers.spool.collector import SpoolCollector


def test_spool_scan_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "new").mkdir()
    for i in range(12):
        (tmp_path / "new" / f"m{i}").write_bytes(b"")
    monkeypatch.setattr(collector, "SCAN_MAX", 5)
    col = SpoolCollector(tmp_path)
    got = {m.name: m.samples for m in col.collect()}
    assert got["smtp_ingress_spool_scan_truncated"][0].value == 1
    assert [s.value for s in got["smtp_ingress_spool_messages"] if s.labels["dir"] == "new"] == [5]


def test_counts_the_stores_own_directories(tmp_path: Path) -> None:
    """The directories counted are where the store puts files (one file in each, by the store's
    own paths), and the dir label keeps its documented values."""
    sp = store.Spool(tmp_path)
    sp.make_relay_dirs(held=True)
    for d in (sp.new, sp.tmp, sp.failed, sp.hold_dir):
        (d / "m0").write_bytes(b"x")
    got = {m.name: m.samples for m in SpoolCollector(tmp_path).collect()}
    assert {s.labels["dir"]: s.value for s in got["smtp_ingress_spool_messages"]} \
        == {"new": 1, "tmp": 1, "failed": 1, "hold": 1, "journal": 0}


def test_counts_what_the_journal_acknowledged_before_it_is_in_new(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = store.Spool(tmp_path)
    monkeypatch.setattr(journal, "LINGER_S", 60.0)      # the files wait for the close
    monkeypatch.setattr(collector, "SCAN_CACHE", 0.0)
    j = journal.Journal.take(sp, 1 << 20)
    now = time.time()
    j.append([(Envelope(qid=f"Q{i}", lane=Lane.FAST, peer_ip="192.0.2.9", peer_port=1,
                        helo="h.example", mail_from="a@example.org", rcpts=("b@example.test",),
                        received_at=now, deadline=now + 20), b"", b"x\r\n") for i in range(2)])

    def counts() -> dict[str, float]:
        got = {m.name: m.samples for m in SpoolCollector(tmp_path).collect()}
        return {s.labels["dir"]: s.value for s in got["smtp_ingress_spool_messages"]}

    assert counts()["journal"] == 2 and counts()["new"] == 0
    j.close()
    assert counts()["journal"] == 0 and counts()["new"] == 2
