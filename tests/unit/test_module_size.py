"""Every production module stays under 500 lines (docs/development.md): a module that grows past
it has more than one job and is split by job, as issue 21 did for the config, the metrics, the
acceptor, the broker, the supervisor and the relay."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 500


def test_no_production_module_reaches_500_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for top in ("ingress", "workers") for p in (ROOT / top).rglob("*.py")}
    assert len(sizes) > 50
    assert {p: n for p, n in sizes.items() if n >= LIMIT} == {}
