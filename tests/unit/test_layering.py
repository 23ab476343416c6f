"""The import-linter contract covers every module: each module directly in ingress/ is named as
acceptor side or as a tool in pyproject.toml's contracts (a new module nobody classified would
otherwise be checked by no contract)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_ingress_module_is_in_the_contract() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = {c["name"]: c for c in doc["tool"]["importlinter"]["contracts"]}
    acceptor = set(contracts["the acceptor side never imports the lane side"]["source_modules"])
    tools = set(contracts["the acceptor side never imports the lane side"]["forbidden_modules"])
    tools.discard("workers")
    modules = {f"ingress.{p.stem}" for p in (ROOT / "ingress").glob("*.py")
               if p.stem != "__init__"}
    assert modules - acceptor - tools == set(), "classify these in pyproject.toml's contracts"
    assert not acceptor & tools
    assert (acceptor | tools) - modules == set(), "the contract names modules that do not exist"
