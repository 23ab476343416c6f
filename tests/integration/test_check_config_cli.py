"""`smtp-ingress check-config` and `run` as a user calls them (a real `python -m ingress`
process): exit codes and messages naming file and key, `--show` printing TOML that parses, a
group-readable relay.auth_file refused, and `run` refusing a state dir that others can change.
Moved from tests/unit (they start processes); the config rules themselves are table-tested in
tests/unit/test_config.py, test_configshow.py and test_relay_tls.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.kit.configkit import cfg_file
from tests.kit.harness import ROOT, write_config


def test_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = -1\n")
    r = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert str(bad) in r.stderr and "smtp.max_recipients" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ingress", "run", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2 and "smtp.max_recipients" in r.stderr
    good = tmp_path / "good.toml"
    good.write_text("[smtp]\nmax_recipients = 5\n")
    r = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(good)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_cli_show(tmp_path: Path) -> None:
    f = cfg_file(tmp_path, **{"lanes.bulk": {"rate": 10.0}})
    r = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(f), "--show"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "[lanes.bulk]" in r.stdout and "# connections per acceptor:" in r.stdout
    assert "# bulk cap 10/s: each acceptor admits" in r.stdout
    tomllib.loads(r.stdout)
    r = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(f)],
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
    r = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "relay.auth_file" in r.stderr and "chmod 600" in r.stderr, r


def run_briefly(cfg: Path) -> tuple[int | None, str]:
    """`smtp-ingress run`: (exit status, stderr) when it stops by itself within 30 s; (None,
    stderr) when it was still running then (it was stopped: SIGTERM, then SIGKILL)."""
    with subprocess.Popen([sys.executable, "-m", "ingress", "run", "--config", str(cfg)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as p:
        try:
            _, err = p.communicate(timeout=30)
            return p.returncode, err
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                _, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                _, err = p.communicate()
            return None, err


STATE_DIR_CASES = [
    ("world-writable", 0o777, "", None, "writable by group or others (mode 0777)"),
    ("group-writable", 0o770, "", None, "writable by group or others (mode 0770)"),
    ("run-writable", 0o700, "run", None, "writable by group or others (mode 0777)"),
    ("foreign-owner", 0o700, "", 65534, "owned by uid 65534"),
]


@pytest.mark.parametrize(("case", "mode", "sub", "owner", "why"), STATE_DIR_CASES,
                         ids=[c[0] for c in STATE_DIR_CASES])
def test_run_refuses_a_state_dir_others_can_change(tmp_path: Path, case: str, mode: int,
                                                   sub: str, owner: int | None,
                                                   why: str) -> None:
    """Issue 19 item 6: spool.state_dir holds the hand-off socket that receives every fast
    client's connection (and the lanes' ipc sockets): whoever can write there can plant a
    socket of their own. `run` refuses it unless it is owned by the service user (the running
    euid) and not writable by group or others: exit 1, one line naming the dir and why."""
    if owner is not None and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    if sub:
        (state / sub).mkdir()
        (state / sub).chmod(0o777)
    if owner is not None:
        os.chown(state, owner, -1)
    cfg = tmp_path / "c.toml"
    write_config(cfg, {"listen": {"host": "127.0.0.1", "port": 0},
                       "smtp": {"accepted_domains": ["example.test"]},
                       "lanes.fast": {"workers": 1}, "lanes.bulk": {"workers": 1},
                       "spool": {"path": str(tmp_path / "spool"), "state_dir": str(state)},
                       "supervisor": {"acceptors": 1}, "metrics": {"listen": ""}})
    code, err = run_briefly(cfg)
    assert code == 1, (code, err)
    checked = state / sub if sub else state
    assert "spool.state_dir" in err and str(checked) in err and why in err, err
    assert not list(state.rglob("*.sock")), "refused before any socket was made"


def test_run_names_why_a_listener_cannot_be_bound(tmp_path: Path) -> None:
    """Issue 19 item 9: an address this host does not have (192.0.2.1, TEST-NET-1: the bind
    fails locally, nothing is sent) is named as such, not as "already in use"."""
    cfg = tmp_path / "c.toml"
    write_config(cfg, {"listen": {"host": "192.0.2.1", "port": 2525},
                       "smtp": {"accepted_domains": ["example.test"]},
                       "spool": {"path": str(tmp_path / "spool"),
                                 "state_dir": str(tmp_path / "state")},
                       "supervisor": {"acceptors": 1}, "metrics": {"listen": ""}})
    code, err = run_briefly(cfg)
    assert code == 1, (code, err)
    assert "192.0.2.1:2525" in err and "not on this host" in err, err
    assert "already in use" not in err, err


# --- the shipped example's [listen]: one way of saying it (issue 19 item 9) --------------------

EXAMPLE = ROOT / "etc" / "ingress.example.toml"


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingress", "check-config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def example_with(tmp_path: Path, edit: Any) -> Path:
    """The shipped example with its [listen] table edited as an operator would (text)."""
    text = EXAMPLE.read_text()
    head, sep, rest = text.partition("[listen]\n")
    table, nxt, tail = rest.partition("\n[")
    out = tmp_path / "ingress.toml"
    out.write_text(head + sep + edit(table) + nxt + tail)
    return out


def test_example_listen_says_it_one_way() -> None:
    """The example sets listen.addresses and not listen.host / listen.port: it names them only
    as the commented alternative, so editing either one cannot contradict the other."""
    raw = tomllib.loads(EXAMPLE.read_text())["listen"]
    assert "addresses" in raw and "host" not in raw and "port" not in raw, raw


def test_editing_the_example_listen_address_as_its_comment_says(tmp_path: Path) -> None:
    from ingress.core import config as config_mod
    # 1. edit the addresses line
    edited = example_with(tmp_path, lambda t: re.sub(
        r'(?m)^addresses = \[.*\](?=\s+#)',
        'addresses = ["192.0.2.25:25", "[2001:db8::25]:25"]', t))
    r = check(edited)
    assert r.returncode == 0, r.stderr
    assert config_mod.load(edited).listen.addresses == ("192.0.2.25:25", "[2001:db8::25]:25")
    # 2. the single-address form the comment offers instead: addresses out, host/port in
    edited = example_with(tmp_path, lambda t: re.sub(
        r'(?m)^# (host|port) = ', r'\1 = ', re.sub(r'(?m)^addresses = .*$', '', t)))
    r = check(edited)
    assert r.returncode == 0, r.stderr
    lst = config_mod.load(edited).listen
    assert (lst.host, lst.port, lst.addresses) == ("0.0.0.0", 25, ("0.0.0.0:25",))
    # 3. both forms, disagreeing: the error says how to fix it
    edited = example_with(tmp_path, lambda t: re.sub(r'(?m)^# (host|port) = ', r'\1 = ', t)
                          .replace('host = "0.0.0.0"', 'host = "192.0.2.25"'))
    r = check(edited)
    assert r.returncode == 2, r
    assert "listen.addresses" in r.stderr and "remove listen.host and listen.port" in r.stderr, \
        r.stderr
