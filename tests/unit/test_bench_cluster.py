"""bench.cluster's pure parts: the Redis outage's phases and the cap each is held to."""

from __future__ import annotations

import pytest

from bench import cluster
from ingress.core.derived import BULK_SHARE


def test_phase_bounds_thirds() -> None:
    assert cluster.phase_bounds(100.0, 12.0) == (100.0, 104.0, 108.0, 112.0)


def test_phase_rows_count_each_message_once_and_judge_the_cap() -> None:
    bounds = (0.0, 4.0, 8.0, 12.0)
    # before: 100/s for 4 s + the burst (held); down: 1.1 x 100/s x 4 s + burst (held);
    # after: one message over rate x 4 s + burst
    before = [i * 4 / 405 for i in range(405)]
    down = [4.0 + i * 4 / 440 for i in range(440)]
    after = [8.0 + i * 4 / 406 for i in range(406)]
    rows = cluster.phase_rows([*before, *down, *after, 12.0, -0.1], bounds, 100.0, 5)
    assert [r["phase"] for r in rows] == list(cluster.PHASES)
    assert [r["accepted"] for r in rows] == [405, 440, 406]    # 12.0 and -0.1: outside
    assert [r["cap_per_s"] for r in rows] == [100.0, round(100 * BULK_SHARE, 1), 100.0]
    assert [r["limit"] for r in rows] == [405, 445, 405]
    assert [r["held"] for r in rows] == [True, True, False]
    assert rows[0]["per_s"] == pytest.approx(101.2, abs=0.1)


def test_phase_rows_on_real_bounds_are_half_open() -> None:
    rows = cluster.phase_rows([1.0, 2.0, 2.0, 3.0], (1.0, 2.0, 3.0, 4.0), 1.0, 0)
    assert [r["accepted"] for r in rows] == [1, 2, 1]
