"""`smtp-ingress check-config` and `run` as a user calls them (a real `python -m ingress.cli`
process): exit codes and messages naming file and key, `--show` printing TOML that parses, and a
group-readable relay.auth_file refused. Moved from tests/unit (they start processes); the config
rules themselves are table-tested in tests/unit/test_config.py, test_configshow.py and
test_relay_tls.py."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.kit.harness import ROOT, write_config
from tests.unit.test_configshow import cfg_file


def test_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = -1\n")
    r = subprocess.run([sys.executable, "-m", "ingress.cli", "check-config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert str(bad) in r.stderr and "smtp.max_recipients" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ingress.cli", "run", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2 and "smtp.max_recipients" in r.stderr
    good = tmp_path / "good.toml"
    good.write_text("[smtp]\nmax_recipients = 5\n")
    r = subprocess.run([sys.executable, "-m", "ingress.cli", "check-config", str(good)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_cli_show(tmp_path: Path) -> None:
    f = cfg_file(tmp_path, **{"lanes.bulk": {"rate": 10.0}})
    r = subprocess.run([sys.executable, "-m", "ingress.cli", "check-config", str(f), "--show"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "[lanes.bulk]" in r.stdout and "# connections per acceptor:" in r.stdout
    assert "# bulk cap 10/s: each acceptor admits" in r.stdout
    tomllib.loads(r.stdout)
    r = subprocess.run([sys.executable, "-m", "ingress.cli", "check-config", str(f)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == f"{f}: ok"


def test_group_readable_auth_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "auth"
    f.write_text("u:p\n")
    os.chmod(f, 0o640)
    cfg = tmp_path / "c.toml"
    write_config(cfg, {"smtp": {"accepted_domains": ["example.test"]},
                       "relay": {"downstream": "smtp://127.0.0.1:25", "tls": "required",
                                 "auth_file": str(f)}})
    r = subprocess.run([sys.executable, "-m", "ingress.cli", "check-config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "relay.auth_file" in r.stderr and "chmod 600" in r.stderr, r
