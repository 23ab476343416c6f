"""The worked config for several hosts (etc/examples/: edge-a.toml, edge-b.toml, lanes1.toml;
issue 19 item 9: the README's "Several hosts" config had no [smtp] on the edge, so real mail
got "550 relay access denied", and recipient verification on an edge needed a setting nobody
named).

Each file, with its /etc/smtp-ingress/ paths moved into a temp dir that holds what the files
say should be there (CURVE keys made by the installed `smtp-ingress keygen`, as the comments
tell the operator; the edges' public keys copied into the lanes node's allowed_keys directory;
a TLS certificate), passes the installed `smtp-ingress check-config`. Beyond that: the files
agree on what must be the same on every host (the site's bulk cap, message size, Redis
holding the cap, the number of edges, the lanes node's address and key), the edges accept the
site's domains and verify recipients against the downstream the lanes node relays to, and the
two edges differ only where two hosts must.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ingress.core import config as config_mod
from tests.kit.harness import ROOT
from tests.kit.pki import write_pki

EXAMPLES = ROOT / "etc" / "examples"
EDGES = ("edge-a", "edge-b")
FILES = (*EDGES, "lanes1")
EXE = Path(sys.executable).parent / "smtp-ingress"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    if not EXE.exists():
        pytest.skip(f"{EXE} missing: run `make` (pip install -e .) first")
    env = {k: v for k, v in os.environ.items() if k != "SMTP_INGRESS_CONFIG"}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three files with /etc/smtp-ingress/ moved to a temp dir holding the keys (made as
    the files' comments say) and a TLS certificate; name -> the rewritten file."""
    root = tmp_path_factory.mktemp("site")
    etc = root / "etc"
    etc.mkdir()
    for name in ("lanes1", "edge-a", "edge-b"):
        r = cli("keygen", str(etc / "keys"), name)
        assert r.returncode == 0, r.stderr
    (etc / "edges").mkdir(mode=0o700)
    for edge in EDGES:                       # "copy edge-a.key and edge-b.key into .../edges/"
        shutil.copy(etc / "keys" / f"{edge}.key", etc / "edges" / f"{edge}.key")
    (etc / "tls").mkdir()
    pki = write_pki(etc / "tls")
    shutil.copy(pki["cert"], etc / "tls" / "fullchain.pem")
    shutil.copy(pki["key"], etc / "tls" / "privkey.pem")
    out = {}
    for name in FILES:
        text = (EXAMPLES / f"{name}.toml").read_text()
        assert "/etc/smtp-ingress/" in text
        out[name] = root / f"{name}.toml"
        out[name].write_text(text.replace("/etc/smtp-ingress/", f"{etc}/"))
    return out


@pytest.mark.parametrize("name", FILES)
def test_check_config_accepts_each_file(site: dict[str, Path], name: str) -> None:
    r = cli("check-config", str(site[name]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{site[name]}: ok"


def loaded(site: dict[str, Path]) -> dict[str, config_mod.Config]:
    return {name: config_mod.load(path) for name, path in site.items()}


def test_the_hosts_agree(site: dict[str, Path]) -> None:
    cfg = loaded(site)
    lanes = cfg["lanes1"]
    assert lanes.cluster.role == "lanes"
    for edge in EDGES:
        c = cfg[edge]
        assert c.cluster.role == "edge"
        # the site's domains, not the default: real mail is not "relay access denied"
        assert c.smtp.accepted_domains == lanes.smtp.accepted_domains
        assert "example.test" not in c.smtp.accepted_domains
        # recipient verification asks the downstream the lanes node relays to
        assert c.smtp.verify_recipients and c.relay.downstream == lanes.relay.downstream
        # it reaches the lanes node at its lanes_bind, with the lanes node's own public key
        (node,) = c.cluster.lanes_nodes
        base, key = node.split()
        assert base == lanes.cluster.lanes_bind
        assert Path(key).read_text() == Path(lanes.cluster.secret_key).with_suffix(".key") \
            .read_text()
        # and its own public key is one the lanes node admits
        own = Path(c.cluster.secret_key).with_suffix(".key").read_text()
        assert own in {p.read_text() for p in Path(lanes.cluster.allowed_keys).glob("*.key")}
        # what must be the same on every host
        assert (c.lanes.bulk.rate, c.lanes.bulk.burst) == (lanes.lanes.bulk.rate,
                                                          lanes.lanes.bulk.burst)
        assert c.smtp.max_message_size == lanes.smtp.max_message_size
        assert c.cluster.edges == lanes.cluster.edges == len(EDGES)
        assert c.cluster.redis and lanes.cluster.redis
        assert c.tls.cert and c.tls.key                 # STARTTLS on port 25
        assert not c.listen.proxy_protocol
    assert cfg["edge-a"].cluster.redis == cfg["edge-b"].cluster.redis


def flat(path: Path) -> dict[str, Any]:
    out = {}
    for table, kv in tomllib.loads(path.read_text()).items():
        for k, v in kv.items():
            out[f"{table}.{k}"] = v
    return out


def test_the_edges_differ_only_where_two_hosts_must() -> None:
    a, b = (flat(EXAMPLES / f"{e}.toml") for e in EDGES)
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"listen.addresses", "smtp.hostname", "metrics.listen",
                      "cluster.secret_key"}, differ
