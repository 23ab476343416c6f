"""The scrape merges the children's mmap'd metric files; a file that a child has created but
not yet sized (or a child killed in between left behind) holds no value and must not fail the
whole scrape (prometheus/client_python#1199: a 500 for every metric)."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.mmap_dict import MmapedDict

from ingress.core.metrics_server import registry


def counter_file(d: Path, pid: int, value: float) -> None:
    m = MmapedDict(str(d / f"counter_{pid}.db"))
    key = json.dumps(("smtp_ingress_t", "smtp_ingress_t_total", {"lane": "fast"}, "t"))
    m.write_value(key, value, 0.0)
    m.close()


def test_an_empty_child_file_is_left_out_not_a_failed_scrape(tmp_path: Path) -> None:
    counter_file(tmp_path, 101, 3.0)
    (tmp_path / "counter_102.db").write_bytes(b"")            # created, not yet sized
    (tmp_path / "histogram_103.db").write_bytes(b"\0\0\0")    # shorter than the header
    text = generate_latest(registry(tmp_path)).decode()
    assert 'smtp_ingress_t_total{lane="fast"} 3.0' in text


def test_every_sized_file_is_merged(tmp_path: Path) -> None:
    counter_file(tmp_path, 101, 3.0)
    counter_file(tmp_path, 102, 4.0)
    text = generate_latest(registry(tmp_path)).decode()
    assert 'smtp_ingress_t_total{lane="fast"} 7.0' in text
