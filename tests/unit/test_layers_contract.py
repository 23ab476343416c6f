"""The one import-linter layers contract (pyproject.toml) is kept by the tree, and it is broken by
an arrow that runs back up: lint-imports runs on a copy of the two packages, as they are and
with one upward import added per case."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"


def _tree(tmp: Path) -> Path:
    for pkg in ("ingress", "workers"):
        shutil.copytree(ROOT / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed in this venv")
def test_the_tree_keeps_the_layers(tmp_path: Path) -> None:
    r = _lint(_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the layers KEPT" in r.stdout


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed in this venv")
@pytest.mark.parametrize(("module", "imports"), [
    ("ingress/core/upward.py", "ingress.policy.tiers"),      # the core imports nothing of ours
    ("ingress/policy/upward.py", "ingress.edge.proxy"),      # the policy is pure
    ("ingress/policy/sideways.py", "workers.spool.state"),   # policy and spool are independent
    ("workers/spool/upward.py", "workers.lane.headers"),     # the spool imports only the core
    ("workers/relay/sideways.py", "workers.lane.headers"),   # the relay never imports the lane
    ("workers/lane/sideways.py", "ingress.edge.proxy"),      # the lane never imports the edge
    ("ingress/edge/upward.py", "ingress.tools.status"),      # nothing imports the tools
    ("ingress/tools/supervisor.py", None),                   # the supervisor imports no child,
    ("ingress/tools/children.py", None),                     # nor do its parts (the contract
    ("ingress/tools/listeners.py", None),                    # follows indirect imports)
])
def test_an_arrow_back_up_breaks_the_contract(tmp_path: Path, module: str,
                                              imports: str | None) -> None:
    tree = _tree(tmp_path)
    if imports is None:
        target = tree / module
        target.write_text(target.read_text() + "\nimport workers.lane.broker  # noqa\n")
    else:
        (tree / module).write_text(f"import {imports}  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout
