"""Every subcommand finds the config the same way, and takes --config before or after its name
(issue 19 item 9: `smtp-ingress status` without --config read the embedded default and
reported both lanes down on a production host; `queue list --config F` was refused, only
`queue --config F list` worked).

Through the installed entry point (this venv's bin/smtp-ingress, a subprocess): `status` on a
running instance with --config in every position, and found through $SMTP_INGRESS_CONFIG with
no option at all; `queue` subcommands with --config (and --wait) in every position;
`check-config` without a file; a file named nowhere falls back to the embedded default only
when the default path does not exist. The lookup itself (ingress.tools.cli.config_path) is checked
against the systemd unit's path, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ingress.tools import cli
from tests.kit.harness import ROOT, Ingress
from tests.kit.relaykit import make_spool, put

pytestmark = pytest.mark.timeout(120)

EXE = Path(sys.executable).parent / "smtp-ingress"


def run(*args: str, env: dict[str, str] | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if not EXE.exists():
        pytest.skip(f"{EXE} missing: run `make` (pip install -e .) first")
    full = {k: v for k, v in os.environ.items() if k != cli.CONFIG_ENV}
    full.update(env or {})
    return subprocess.run([str(EXE), *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=60)


def test_status_finds_the_config_in_every_position(tmp_path: Path) -> None:
    with Ingress(tmp_path) as ing:
        cfg = str(ing.config)
        for args, env in ((["status", "--config", cfg, "--json"], None),
                          (["--config", cfg, "status", "--json"], None),
                          (["status", "--json"], {cli.CONFIG_ENV: cfg})):
            r = run(*args, env=env, cwd=tmp_path)
            assert r.returncode == 0, (args, r.stdout, r.stderr)
            doc = orjson.loads(r.stdout)
            assert doc["config"] == cfg, args
            assert all(doc["lanes"][lane] is not None for lane in ("fast", "bulk")), doc


def test_queue_takes_its_options_before_or_after_the_subcommand(tmp_path: Path) -> None:
    cfg, spool = make_spool(tmp_path)
    qid, _ = put(spool, "alice@sender.test", ("bob@example.test",))
    for args in (["queue", "--config", str(cfg), "list", "--json"],
                 ["queue", "list", "--json", "--config", str(cfg)],
                 ["--config", str(cfg), "queue", "list", "--json"],
                 ["queue", "list", "--config", str(cfg), "--wait", "1", "--json"],
                 ["queue", "--wait", "1", "list", "--config", str(cfg), "--json"]):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)
        assert [d["qid"] for d in orjson.loads(r.stdout)] == [qid], args
    r = run("queue", "show", qid, "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0 and qid in r.stdout, r.stderr
    r = run("queue", "retry", "--all", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0 and "1 message(s) due now" in r.stdout, r.stderr
    r = run("queue", "list", cwd=tmp_path, env={cli.CONFIG_ENV: str(cfg)})
    assert r.returncode == 0 and qid in r.stdout, r.stderr


def test_check_config_without_a_file_checks_the_one_found(tmp_path: Path) -> None:
    cfg, _ = make_spool(tmp_path)
    r = run("check-config", cwd=tmp_path, env={cli.CONFIG_ENV: str(cfg)})
    assert r.returncode == 0 and r.stdout.strip() == f"{cfg}: ok", r
    r = run("check-config", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"{cfg}: ok", r
    missing = tmp_path / "nowhere.toml"
    r = run("check-config", cwd=tmp_path, env={cli.CONFIG_ENV: str(missing)})
    assert r.returncode == 2 and str(missing) in r.stderr and cli.CONFIG_ENV in r.stderr, r


def test_config_path_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config, else $SMTP_INGRESS_CONFIG, else the default path when it exists, else the
    embedded default (None)."""
    default = tmp_path / "ingress.toml"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", default)
    given, env = tmp_path / "given.toml", tmp_path / "env.toml"
    assert cli.config_path(given, {}) == given
    assert cli.config_path(given, {cli.CONFIG_ENV: str(env)}) == given
    assert cli.config_path(None, {cli.CONFIG_ENV: str(env)}) == env
    assert cli.config_path(None, {}) is None                  # no file at the default path
    default.write_text("")
    assert cli.config_path(None, {}) == default
    assert cli.config_path(None, {cli.CONFIG_ENV: ""}) == default


def test_default_path_is_the_systemd_units() -> None:
    unit = (ROOT / "systemd" / "smtp-ingress.service").read_text()
    paths = set(re.findall(r"^Exec\w+=\S*smtp-ingress \S+(?: --config)? (\S+\.toml)$", unit,
                           re.M))
    assert paths == {str(cli.DEFAULT_CONFIG)}, paths
