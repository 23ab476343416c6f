"""The artifact users install: build the sdist and the wheel, install each into a clean venv, and
run the installed `smtp-ingress` on the example configuration.

Purpose
    `make run` and every other test use the editable install, which sees every file of the
    checkout; `pip install .` (the install of docs/operations.md and of the systemd unit) ships
    only what the packaging finds. A hand-kept package list once left `workers.relay` out, and
    the installed `check-config`, `run` and `queue` all died with "No module named
    'workers.relay'".

What it checks
    - `python -m build` on a copy of the checkout (no build/ or egg-info of ours to leak in)
      makes the sdist, then the wheel from the sdist; both carry every package under ingress/
      and workers/ (every directory with an __init__.py), and neither tests/ nor bench/.
    - Each artifact goes into its own fresh venv (`python -m venv`, `pip install ARTIFACT`: the
      dependencies come from the package index, the sdist is built by pip as `pip install .`
      does). Everything below runs the venv's bin/smtp-ingress from a scratch directory with
      PYTHONPATH, PYTHONHOME and VIRTUAL_ENV removed and PYTHONNOUSERSITE set, so nothing of the
      checkout can be imported in place of the installed package (checked: the venv's python
      finds `ingress` and `workers.relay` in its own site-packages).
    - `check-config etc/ingress.example.toml` passes as shipped.
    - (needs_postfix) The example with only these keys changed (the test asserts the written
      file equals the example apart from them): listen (127.0.0.1, port 0, not *:25),
      spool.path/state_dir (scratch), relay.downstream (a private Postfix, tests/kit/postfix.py),
      metrics.listen (127.0.0.1:0), classify.nameservers (a loopback DNSServer: the example's
      SPF lookups must not reach the host's resolver). `check-config` passes, `run` serves; a
      message over loopback reaches Postfix's Maildir; a second one Postfix defers (450 at end
      of DATA) is seen, shown and deleted with `queue`; the metrics endpoint answers; SIGTERM
      to the supervisor's PID drains it with exit status 0.

Cost
    Measured on the 2 shared cores (warm pip cache): build 4-7 s for both, each venv and
    install 8-30 s, each served run 3-12 s; the whole file 37-40 s idle, 74 s with the other
    helpers' load. pip work, not timing: it runs in the parallel phase of `make test`.

Failure modes
    No network and no cached wheels: the isolated build (setuptools) or the dependency install
    fails, and the test fails saying which command and why (it never skips: an install that
    cannot be tested is not known to work).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import ROOT, Ingress, send_one, wait_for
from tests.kit.postfix import PostfixInstance

pytestmark = pytest.mark.timeout(420)

EXAMPLE = ROOT / "etc" / "ingress.example.toml"
CMD_TIMEOUT = 300.0          # one build or one pip install (a cold cache downloads)
DEFER_SENDER = "deferred@sender.test"

# Not copied into the build tree: VCS, venvs, caches and earlier build output (a stale build/lib
# would put files into the wheel that the packaging itself does not find).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis", "var", "out")


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, check=False)
    return r


def _must(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    r = _run(cmd, cwd=cwd, env=env)
    assert r.returncode == 0, (f"{' '.join(cmd)} exited {r.returncode}\n"
                               f"--- stdout ---\n{r.stdout[-3000:]}\n"
                               f"--- stderr ---\n{r.stderr[-3000:]}")
    return r.stdout


def clean_env() -> dict[str, str]:
    """Our environment without anything that could put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def repo_packages() -> set[str]:
    """Every package of the product in the checkout, as a path ("workers/relay")."""
    return {str(p.parent.relative_to(ROOT)) for top in ("ingress", "workers")
            for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}


class Artifacts:
    def __init__(self, wheel: Path, sdist: Path, seconds: float) -> None:
        self.wheel, self.sdist, self.seconds = wheel, sdist, seconds


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """The sdist, and the wheel built from it, out of a copy of the checkout (isolated build:
    pyproject's build-system.requires, as `pip install .` does)."""
    work = tmp_path_factory.mktemp("artifact-build")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    t0 = time.monotonic()
    _must([sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(src)], cwd=work)
    wheels = list((work / "dist").glob("*.whl"))
    sdists = list((work / "dist").glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((work / "dist").iterdir())
    return Artifacts(wheels[0], sdists[0], time.monotonic() - t0)


class Installed:
    def __init__(self, kind: str, venv: Path, cwd: Path, seconds: float) -> None:
        self.kind, self.venv, self.cwd, self.seconds = kind, venv, cwd, seconds
        self.exe = venv / "bin" / "smtp-ingress"
        self.env = clean_env()

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """The installed smtp-ingress, from a directory that holds no source."""
        return _run([str(self.exe), *args], cwd=self.cwd, env=self.env, timeout=timeout)


@pytest.fixture(scope="module", params=["wheel", "sdist"])
def installed(request: pytest.FixtureRequest, artifacts: Artifacts,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A fresh venv with only the artifact (and its dependencies) installed; removed after
    (60 MB each)."""
    kind = str(request.param)
    work = tmp_path_factory.mktemp(f"installed-{kind}")
    venv, cwd = work / "venv", work / "cwd"
    cwd.mkdir()
    artifact = artifacts.wheel if kind == "wheel" else artifacts.sdist
    t0 = time.monotonic()
    env = clean_env()
    _must([sys.executable, "-m", "venv", str(venv)], cwd=cwd, env=env)
    _must([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(artifact)],
          cwd=cwd, env=env)
    inst = Installed(kind, venv, cwd, time.monotonic() - t0)
    print(f"\n[{kind}] build {artifacts.seconds:.1f} s (both artifacts), "
          f"venv + install {inst.seconds:.1f} s")
    try:
        yield inst
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def test_artifacts_carry_every_package(artifacts: Artifacts) -> None:
    want = repo_packages()
    assert {"ingress", "ingress/core", "ingress/policy", "workers", "workers/relay"} <= want
    in_wheel = {n.rsplit("/", 1)[0] for n in zipfile.ZipFile(artifacts.wheel).namelist()
                if n.endswith("/__init__.py")}
    with tarfile.open(artifacts.sdist) as t:
        in_sdist = {n.split("/", 1)[1].rsplit("/", 1)[0] for n in t.getnames()
                    if n.endswith("/__init__.py")}
    assert want - in_wheel == set(), f"packages missing from the wheel: {want - in_wheel}"
    assert want - in_sdist == set(), f"packages missing from the sdist: {want - in_sdist}"
    for shipped in (in_wheel, in_sdist):
        assert not {p for p in shipped if p.split("/")[0] in ("tests", "bench")}, shipped


def test_installed_check_config_on_the_example(installed: Installed) -> None:
    probe = _run([str(installed.venv / "bin" / "python"), "-c",
                  "import ingress.tools.cli, workers.relay.scheduler as s; print(s.__file__)"],
                 cwd=installed.cwd, env=installed.env)
    assert probe.returncode == 0, probe.stderr
    site = (installed.venv / "lib").resolve()
    assert Path(probe.stdout.strip()).resolve().is_relative_to(site), probe.stdout
    r = installed.cli("check-config", str(EXAMPLE))
    assert r.returncode == 0, f"[{installed.kind}] installed check-config failed:\n{r.stderr}"
    assert r.stdout.strip() == f"{EXAMPLE}: ok"


# ---------------------------------------------------------------- served, with a real Postfix

# The `postfix` fixture's Postfix (tests/integration/conftest.py): a message from DEFER_SENDER
# is deferred at the end of DATA (the relay keeps it queued).
POSTFIX = {"accept_domains": ("example.com", "sender.test"),
           "extra_main_cf": {"smtpd_end_of_data_restrictions":
                             f"check_sender_access inline:{{{{{DEFER_SENDER}"
                             "=450 4.7.1 try again later}}"}}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer({"sender.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]}}) as server:
        yield server


def derived_tables(pf: PostfixInstance, dns: DNSServer) -> tuple[dict[str, dict[str, Any]],
                                                                 dict[str, Any]]:
    """The example's tables (dotted names, for Ingress) with the loopback/scratch overrides,
    and the example itself (nested) to compare the written file with."""
    example = tomllib.loads(EXAMPLE.read_text())
    tables: dict[str, dict[str, Any]] = {}

    def flatten(prefix: str, node: dict[str, Any]) -> None:
        leaves = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if leaves or not prefix:
            tables[prefix] = dict(leaves)
        for k, v in node.items():
            if isinstance(v, dict):
                flatten(f"{prefix}.{k}" if prefix else k, v)

    flatten("", example)
    if not tables[""]:
        del tables[""]
    for key in ("path", "state_dir"):   # the harness's scratch spool and (short) state dir
        del tables["spool"][key]
    tables["listen"].update({"addresses": [], "host": "127.0.0.1", "port": 0})
    tables["relay"]["downstream"] = f"smtp://{pf.address}"
    tables["metrics"]["listen"] = "127.0.0.1:0"
    tables["classify"]["nameservers"] = [dns.address]
    return tables, example


def body(marker: str, sender: str) -> bytes:
    return (f"From: {sender}\r\nTo: bob@example.com\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@sender.test>\r\n\r\nartifact test {marker}\r\n").encode()


def queue_list(inst: Installed, config: Path) -> list[dict[str, Any]]:
    r = inst.cli("queue", "--config", str(config), "list", "--json")
    assert r.returncode == 0, r.stderr
    items: list[dict[str, Any]] = orjson.loads(r.stdout)
    return items


@pytest.mark.needs_postfix
def test_installed_serves_relays_and_stops(installed: Installed, postfix: PostfixInstance,
                                           dns: DNSServer, tmp_path: Path) -> None:
    tables, example = derived_tables(postfix, dns)
    state = Path(tempfile.mkdtemp(prefix="si-artifact-", dir="/tmp"))   # short: ipc sockets
    try:
        served(installed, postfix, Ingress(tmp_path / "ingress", tables, state=state,
                                           command=[str(installed.exe)], cwd=installed.cwd,
                                           env=installed.env), example)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def served(installed: Installed, postfix: PostfixInstance, ing: Ingress,
           example: dict[str, Any]) -> None:
    # The file run is the example with only the overrides above (the harness adds nothing).
    written = tomllib.loads(ing.config.read_text())
    changed = {(t, k) for t in set(written) | set(example)
               for k in set(written.get(t, {})) | set(example.get(t, {}))
               if written.get(t, {}).get(k) != example.get(t, {}).get(k)}
    assert changed == {("listen", "addresses"), ("listen", "host"), ("listen", "port"),
                       ("spool", "path"), ("spool", "state_dir"), ("relay", "downstream"),
                       ("metrics", "listen"), ("classify", "nameservers")}, changed

    r = installed.cli("check-config", str(ing.config))
    assert r.returncode == 0, f"[{installed.kind}] {r.stderr}"

    t0 = time.monotonic()
    try:
        ing.start()
        wait_for(lambda: ing.events("relay_start"), 30, "the relay process")
        marker = f"artifact-{installed.kind}-{time.time_ns()}"
        code, text = asyncio.run(send_one(ing.port, body(marker, "alice@sender.test"),
                                          rcpts=("bob@example.com",)))
        assert code == 250, (code, text, ing.log_tail())
        wait_for(lambda: [p for p in postfix.maildir_messages("example.com")
                          if marker.encode() in p.read_bytes()], 60,
                 "the message in Postfix's Maildir")

        held = marker + "-deferred"
        code, text = asyncio.run(send_one(ing.port, body(held, DEFER_SENDER),
                                          sender=DEFER_SENDER, rcpts=("bob@example.com",)))
        assert code == 250, (code, text)
        (item,) = wait_for(lambda: [i for i in queue_list(installed, ing.config)
                                    if i["attempts"] >= 1], 60,
                           "`queue list` to show the deferred message")
        assert item["sender"] == DEFER_SENDER and "450" in item["last_error"], item
        r = installed.cli("queue", "--config", str(ing.config), "show", item["qid"])
        assert r.returncode == 0 and held in r.stdout, r.stderr
        r = installed.cli("queue", "--config", str(ing.config), "delete", item["qid"])
        assert r.returncode == 0 and "deleted" in r.stdout, r.stderr
        r = installed.cli("queue", "--config", str(ing.config), "list")
        assert r.returncode == 0 and r.stdout.strip() == "queue is empty", (r.stdout, r.stderr)

        (ev,) = wait_for(lambda: ing.events("metrics_listening"), 10, "metrics_listening")
        mport = int(str(ev["listen"]).rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
            assert b"smtp_ingress_messages_total" in resp.read()
    except BaseException:
        ing.stop(graceful=False)
        raise
    code = ing.stop(timeout=60)    # SIGTERM to the supervisor's PID: the drain
    assert code == 0, (code, ing.log_tail())
    assert "Traceback" not in ing.logfile.read_text(errors="replace"), ing.log_tail(80)
    print(f"\n[{installed.kind}] served run {time.monotonic() - t0:.1f} s")
