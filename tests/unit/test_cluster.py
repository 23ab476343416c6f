"""ingress.core.cluster and the [cluster] table: addresses, keys, roles, failover order."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingress.core import cluster, config
from ingress.core.config import ConfigError
from ingress.core.wire import Lane
from ingress.edge.cluster_link import retry_delay
from ingress.edge.lanes import Lanes
from ingress.tools.children import wanted
from ingress.tools.supervisor import Supervisor

BASES = [
    ("tcp://127.0.0.2:7100", ("127.0.0.2", 7100)),
    ("tcp://[::1]:7100", ("[::1]", 7100)),
    ("tcp://lanes1.example.net:65532", ("lanes1.example.net", 65532)),
]
BAD_BASES = ["127.0.0.2:7100", "ipc:///tmp/x", "tcp://127.0.0.2", "tcp://:7100",
             "tcp://127.0.0.2:65533", "tcp://127.0.0.2:0", "tcp://[zz]:7100", "tcp://h:x"]


@pytest.mark.parametrize(("base", "want"), BASES)
def test_parse_base(base: str, want: tuple[str, int]) -> None:
    assert cluster.parse_base(base) == want


@pytest.mark.parametrize("base", BAD_BASES)
def test_parse_base_refuses(base: str) -> None:
    with pytest.raises(ValueError):
        cluster.parse_base(base)


@pytest.mark.parametrize(("lane", "kind", "port"), [
    ("fast", "front", 7100), ("fast", "status", 7101), ("bulk", "front", 7102),
    ("bulk", "status", 7103)])
def test_endpoints_are_four_consecutive_ports(lane: str, kind: str, port: int) -> None:
    assert cluster.endpoint("tcp://10.0.0.5:7100", lane, kind) == f"tcp://10.0.0.5:{port}"


@pytest.mark.parametrize(("base", "local"), [
    ("tcp://*:7100", "tcp://127.0.0.1:7100"), ("tcp://0.0.0.0:7100", "tcp://127.0.0.1:7100"),
    ("tcp://[::]:7100", "tcp://[::1]:7100"), ("tcp://10.0.0.5:7100", "tcp://10.0.0.5:7100")])
def test_local_base_for_a_wildcard_bind(base: str, local: str) -> None:
    assert cluster.local_base(base) == local


@pytest.mark.parametrize(("spec", "ok"), [
    ("tcp://10.0.0.5:7100 /etc/k/lanes1.key", True),
    ("tcp://10.0.0.5:7100   /etc/k/lanes1.key", True),
    ("tcp://10.0.0.5:7100", False),
    ("/etc/k/lanes1.key tcp://10.0.0.5:7100", False),
    ("tcp://10.0.0.5:7100 /a /b", False),
    ("tcp://*:7100 /etc/k/lanes1.key", False),
    ("tcp://0.0.0.0:7100 /etc/k/lanes1.key", False)])
def test_parse_node(spec: str, ok: bool) -> None:
    if ok:
        assert cluster.parse_node(spec) == ("tcp://10.0.0.5:7100", "/etc/k/lanes1.key")
    else:
        with pytest.raises(ValueError):
            cluster.parse_node(spec)


def test_keygen_writes_a_pair_and_keeps_the_secret_private(tmp_path: Path) -> None:
    pub, sec = cluster.keygen(tmp_path / "keys", "edge1")
    assert (pub.name, sec.name) == ("edge1.key", "edge1.key_secret")
    assert os.stat(sec).st_mode & 0o077 == 0
    public, secret = cluster.key_pair(str(sec))
    assert cluster.public_key(str(pub)) == public and len(secret) == 40
    with pytest.raises(ValueError):
        cluster.key_pair(str(pub))          # a public key file is not a secret key
    with pytest.raises(ValueError):
        cluster.public_key(str(tmp_path / "missing.key"))
    with pytest.raises(ValueError):
        cluster.keygen(tmp_path, "../x")
    assert cluster.allowed_keys(str(tmp_path / "keys")) == {public}


# --- issue 19 item 6: keygen writes the secret private from the start, never follows a
# --- symlink, never overwrites a pair without --force; loading refuses a secret others can read

@pytest.fixture
def umask0() -> Iterator[None]:
    """umask 0: whatever keygen does not ask for explicitly shows up as 0666 / 0777."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_keygen_secret_is_private_from_creation(tmp_path: Path, umask0: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret is created O_CREAT|O_EXCL|O_NOFOLLOW with mode 0600 -- never written with the
    umask's mode and chmod'ed afterwards (a window in which anyone could open it)."""
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        opened.append((os.fsdecode(path), flags, mode))
        return real_open(path, flags, mode, **kw)

    def no_chmod(*a: Any, **kw: Any) -> None:
        raise AssertionError(f"chmod after the fact: {a}")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    pub, sec = cluster.keygen(tmp_path / "keys", "edge1")
    monkeypatch.undo()
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    want = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    secret_opens = [(f, m) for p, f, m in opened if p.endswith("key_secret")]
    assert secret_opens and all(f & want == want and m == 0o600 for f, m in secret_opens), \
        opened
    cluster.key_pair(str(sec))


def test_keygen_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "keys").symlink_to(real)
    with pytest.raises(ValueError, match="symbolic link"):
        cluster.keygen(tmp_path / "keys", "edge1")
    assert list(real.iterdir()) == []


def test_keygen_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(ValueError, match="writable by group or others"):
        cluster.keygen(d, "edge1")
    assert list(d.iterdir()) == []


@pytest.mark.parametrize("force", [False, True])
def test_keygen_never_follows_a_symlink_at_the_key_path(tmp_path: Path, force: bool) -> None:
    """A symlink planted where the secret goes (to a file the attacker can read, or one to
    clobber) is never written through, with --force neither (that replaces the link itself)."""
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (d / "edge1.key_secret").symlink_to(victim)
    if force:
        _, sec = cluster.keygen(d, "edge1", force=True)
        assert not sec.is_symlink() and stat.S_IMODE(os.lstat(sec).st_mode) == 0o600
    else:
        with pytest.raises(ValueError, match="--force"):
            cluster.keygen(d, "edge1")
    assert victim.read_text() == "precious\n"


def test_keygen_refuses_to_overwrite_a_pair_without_force(tmp_path: Path) -> None:
    """Overwriting a pair locks out every peer that knows its public key: --force only."""
    d = tmp_path / "keys"
    pub, sec = cluster.keygen(d, "lanes1")
    before = (pub.read_bytes(), sec.read_bytes())
    with pytest.raises(ValueError, match=r"lanes1\.key' exists.*--force"):
        cluster.keygen(d, "lanes1")
    assert (pub.read_bytes(), sec.read_bytes()) == before
    pub.unlink()                         # either half of a pair is enough to refuse
    with pytest.raises(ValueError, match=r"lanes1\.key_secret' exists.*--force"):
        cluster.keygen(d, "lanes1")
    assert sec.read_bytes() == before[1] and not pub.exists()
    pub2, sec2 = cluster.keygen(d, "lanes1", force=True)
    assert (pub2, sec2) == (pub, sec) and sec.read_bytes() != before[1]
    assert cluster.public_key(str(pub)) == cluster.key_pair(str(sec))[0]
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert sorted(p.name for p in d.iterdir()) == ["lanes1.key", "lanes1.key_secret"]


def test_keygen_cli_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ingress.tools import cli
    d = tmp_path / "keys"
    assert cli.main(["keygen", str(d), "edge1"]) == 0
    first = (d / "edge1.key_secret").read_bytes()
    assert cli.main(["keygen", str(d), "edge1"]) == 1
    err = capsys.readouterr().err
    assert "edge1.key" in err and "--force" in err, err
    assert (d / "edge1.key_secret").read_bytes() == first
    assert cli.main(["keygen", "--force", str(d), "edge1"]) == 0
    assert (d / "edge1.key_secret").read_bytes() != first


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o620, 0o660], ids=oct)
def test_key_pair_refuses_a_secret_others_can_read(tmp_path: Path, mode: int) -> None:
    _, sec = cluster.keygen(tmp_path / "keys", "edge1")
    sec.chmod(mode)
    with pytest.raises(ValueError) as e:
        cluster.key_pair(str(sec))
    assert str(sec) in str(e.value) and f"{mode:04o}" in str(e.value), str(e.value)
    sec.chmod(0o400)
    assert len(cluster.key_pair(str(sec))[1]) == 40


def test_config_refuses_a_secret_others_can_read(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    _, sec = cluster.keygen(d, "edge")
    l_pub, _ = cluster.keygen(d, "lanes")
    sec.chmod(0o644)
    f = tmp_path / "edge.toml"
    f.write_text(f'[cluster]\nrole = "edge"\nsecret_key = "{sec}"\n'
                 f'lanes_nodes = ["tcp://127.0.0.2:7100 {l_pub}"]\n')
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert e.value.key == "cluster.secret_key" and "0644" in str(e.value)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "keys"
    e_pub, e_sec = cluster.keygen(d, "edge")
    l_pub, l_sec = cluster.keygen(d, "lanes")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "edge.key").write_bytes(e_pub.read_bytes())
    return {"edge_pub": e_pub, "edge_sec": e_sec, "lanes_pub": l_pub, "lanes_sec": l_sec,
            "allowed": allowed, "tmp": tmp_path}


def _cluster_toml(k: dict[str, Path], **kv: Any) -> str:
    def val(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return f'"{str(v).format(**k)}"'
    return "[cluster]\n" + "".join(f"{key} = {val(v)}\n" for key, v in kv.items())


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"role": "both"}, "cluster.role"),
    ({"role": "edge"}, "cluster.secret_key"),
    ({"role": "edge", "secret_key": "{edge_pub}", "lanes_nodes": []}, "cluster.secret_key"),
    ({"role": "edge", "secret_key": "{edge_sec}"}, "cluster.lanes_nodes"),
    ({"role": "edge", "secret_key": "{edge_sec}", "lanes_nodes": ["tcp://h:1"]},
     "cluster.lanes_nodes"),
    ({"role": "edge", "secret_key": "{edge_sec}", "lanes_nodes": ["tcp://h:1 {tmp}/nokey"]},
     "cluster.lanes_nodes"),
    ({"role": "edge", "secret_key": "{edge_sec}",
      "lanes_nodes": ["tcp://h:1 {lanes_pub}", "tcp://h:1 {lanes_pub}"]}, "cluster.lanes_nodes"),
    ({"role": "lanes", "secret_key": "{lanes_sec}", "allowed_keys": "{allowed}"},
     "cluster.lanes_bind"),
    ({"role": "lanes", "secret_key": "{lanes_sec}", "lanes_bind": "127.0.0.2:7100",
      "allowed_keys": "{allowed}"}, "cluster.lanes_bind"),
    ({"role": "lanes", "secret_key": "{lanes_sec}", "lanes_bind": "tcp://127.0.0.2:7100"},
     "cluster.allowed_keys"),
    ({"role": "lanes", "secret_key": "{lanes_sec}", "lanes_bind": "tcp://127.0.0.2:7100",
      "allowed_keys": "{tmp}/none"}, "cluster.allowed_keys"),
]


@pytest.mark.parametrize(("kv", "key"), INVALID)
def test_cluster_table_invalid(keys: dict[str, Path], kv: dict[str, Any], key: str) -> None:
    f = keys["tmp"] / "bad.toml"
    f.write_text(_cluster_toml(keys, **kv))
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert e.value.key == key and str(f) in str(e.value)


def test_cluster_table_valid_and_role_override(keys: dict[str, Path]) -> None:
    f = keys["tmp"] / "edge.toml"
    f.write_text(_cluster_toml(keys, role="edge", secret_key="{edge_sec}",
                               lanes_nodes=["tcp://127.0.0.2:7100 {lanes_pub}"]))
    cfg = config.load(f)
    assert cfg.cluster.role == "edge"
    assert cluster.nodes(cfg) == [cluster.Node("tcp://127.0.0.2:7100",
                                               cluster.public_key(str(keys["lanes_pub"])))]
    assert config.with_role(cfg, "all").cluster.role == "all"
    with pytest.raises(ConfigError) as e:     # --role lanes without the lanes node's keys
        config.with_role(cfg, "lanes")
    assert e.value.key == "cluster.lanes_bind"
    assert config.load(None).cluster.role == "all"


@pytest.mark.parametrize(("role", "kinds"), [
    ("all", {"broker", "worker", "acceptor"}), ("edge", {"acceptor"}),
    ("lanes", {"broker", "worker"})])
def test_supervisor_starts_only_the_children_of_its_role(keys: dict[str, Path], role: str,
                                                         kinds: set[str]) -> None:
    f = keys["tmp"] / "r.toml"
    f.write_text(_cluster_toml(keys, secret_key="{lanes_sec}", lanes_bind="tcp://127.0.0.2:7100",
                               allowed_keys="{allowed}",
                               lanes_nodes=["tcp://127.0.0.2:7100 {lanes_pub}"]))
    sup = Supervisor(config.load(f), f, role=role)
    assert sup.cfg.cluster.role == role
    assert {kind for kind, _ in wanted(sup.cfg)} == kinds


class _Client:
    def __init__(self, name: str, fresh: bool, saturated: bool, pending: int) -> None:
        self.name, self._fresh, self._sat = name, fresh, saturated
        self.pending = dict.fromkeys(range(pending))

    def fresh(self) -> bool:
        return self._fresh

    def saturated(self) -> bool:
        return self._sat


@pytest.mark.parametrize(("clients", "first"), [
    ([("a", True, False, 3), ("b", True, False, 1)], "b"),     # least loaded
    ([("a", False, False, 0), ("b", True, False, 5)], "b"),    # stale status goes last
    ([("a", True, True, 0), ("b", True, False, 5)], "b"),      # saturated after unsaturated
    ([("a", False, False, 0), ("b", False, True, 0)], "a"),    # all stale: still tried
])
def test_failover_order(clients: list[tuple[str, bool, bool, int]], first: str) -> None:
    lanes = Lanes.__new__(Lanes)
    lanes.turn = 0
    lanes.clients = {Lane.BULK: [_Client(*c) for c in clients]}   # type: ignore[dict-item]
    for _ in range(4):       # whatever the turn
        order = lanes.order(Lane.BULK)
        assert order[0].name == first and len(order) == len(clients)   # type: ignore[attr-defined]


def test_failover_order_takes_equals_in_turn() -> None:
    lanes = Lanes.__new__(Lanes)
    lanes.turn = 0
    lanes.clients = {Lane.BULK: [_Client(n, True, False, 0)   # type: ignore[dict-item]
                                 for n in "abc"]}
    firsts = [lanes.order(Lane.BULK)[0].name for _ in range(6)]   # type: ignore[attr-defined]
    assert sorted(firsts) == ["a", "a", "b", "b", "c", "c"]


def test_refusal_log_is_rate_limited(capfd: pytest.CaptureFixture[str]) -> None:
    rl = cluster._RefusalLog()
    for i in range(200):
        rl("handshake", why="test", n=i)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "curve_refused" in ln]
    assert rl.total == 200
    assert cluster.REFUSAL_LOG_BURST <= len(lines) < 200
    assert rl.suppressed == 200 - len(lines)


def test_lane_clients_of_two_edges_never_share_a_routing_id() -> None:
    """Two edges' acceptors may have the same index and pid (containers): the lanes node's
    ROUTER would refuse the second one's connection if their routing ids were equal."""
    import zmq
    import zmq.asyncio

    from ingress.edge.lanes import LaneClient
    ctx = zmq.asyncio.Context()
    try:
        cfg = config.load(None)
        a = LaneClient(ctx, cfg, Lane.BULK, "a0-100")
        b = LaneClient(ctx, cfg, Lane.BULK, "a0-100")
        ra, rb = a.sock.getsockopt(zmq.ROUTING_ID), b.sock.getsockopt(zmq.ROUTING_ID)
        assert ra != rb and ra.startswith(b"a0-100-bulk")   # type: ignore[union-attr]
    finally:
        ctx.destroy(linger=0)


def test_refusals_are_counted_with_bounded_labels() -> None:
    from ingress.core import metrics
    before = metrics.CURVE_REFUSED.labels(why="unknown_key")._value.get()
    cluster.refused("unknown_key", why="test")
    assert metrics.CURVE_REFUSED.labels(why="unknown_key")._value.get() == before + 1
    with pytest.raises(ValueError):
        metrics.curve_refused("a key an attacker chose")


def _curve_pair(keys: dict[str, Path], gate: bool, client_key: Path, wait: float) -> bool:
    """A CURVE server ROUTER (the lanes node's settings, with or without its Gate) and a
    DEALER with `client_key`: does a message get through within `wait` seconds?"""
    import zmq
    f = keys["tmp"] / "l.toml"
    f.write_text(_cluster_toml(keys, role="lanes", secret_key="{lanes_sec}",
                               lanes_bind="tcp://127.0.0.1:7100", allowed_keys="{allowed}"))
    cfg = config.load(f)
    ctx: zmq.Context[Any] = zmq.Context()
    g = cluster.Gate(ctx, cfg) if gate else None
    try:
        srv = ctx.socket(zmq.ROUTER)
        srv.setsockopt(zmq.LINGER, 0)
        cluster.curve_server(srv, cfg)
        port = srv.bind_to_random_port("tcp://127.0.0.1")
        cli = ctx.socket(zmq.DEALER)
        cli.setsockopt(zmq.LINGER, 0)
        pub, sec = cluster.key_pair(str(client_key))
        cli.setsockopt(zmq.CURVE_SERVERKEY, cluster.public_key(str(keys["lanes_pub"])))
        cli.setsockopt(zmq.CURVE_PUBLICKEY, pub)
        cli.setsockopt(zmq.CURVE_SECRETKEY, sec)
        cli.connect(f"tcp://127.0.0.1:{port}")
        cli.send(b"hello")
        return bool(srv.poll(int(wait * 1000)))
    finally:
        if g is not None:
            g.stop()
        ctx.destroy(linger=0)


@pytest.mark.parametrize(("gate", "who", "passes"), [
    (True, "edge_sec", True),        # an allowed key
    (True, "lanes_sec", True),       # the node's own (its status command)
    (False, "edge_sec", False),      # no ZAP handler at all: refused, never "allow all"
])
def test_curve_server_admits_only_through_its_gate(keys: dict[str, Path], gate: bool, who: str,
                                                   passes: bool) -> None:
    assert _curve_pair(keys, gate, keys[who], 5.0 if passes else 1.0) is passes


def test_curve_server_refuses_an_unknown_key(keys: dict[str, Path]) -> None:
    _, intruder = cluster.keygen(keys["tmp"] / "other", "intruder")
    assert _curve_pair(keys, True, intruder, 1.0) is False


@pytest.mark.parametrize(("domain", "ok"), [
    ("example.test", True), ("xn--bcher-kva.test", True),
    # what a learned entry never carries (it is canonical): refused when it comes back
    ("", False), ("Example.test", False), ("example.test.", False), ("b\u00fccher.test", False),
    ("\uff53pam.test", False), ("a..test", False), ("my_host.test", False), ("x" * 300, False),
])
def test_a_learned_domain_from_redis_is_canonical(domain: str, ok: bool) -> None:
    from ingress.edge.cluster_redis import valid_domain
    assert valid_domain(domain) is ok


def test_retry_delay_falls_on_the_wall_clock_multiples() -> None:
    """Every acceptor retries Redis at the same instants (ingress.edge.cluster_link)."""
    for now, retry, want in ((100.0, 2.0, 2.0), (100.5, 2.0, 1.5), (101.999, 2.0, 0.001),
                             (7.25, 0.5, 0.25), (5.0, 0.0, 0.0)):
        assert retry_delay(now, retry) == pytest.approx(want), (now, retry)
    # two acceptors that failed at different moments try again at the same instant
    assert 100.3 + retry_delay(100.3, 2.0) == pytest.approx(101.7 + retry_delay(101.7, 2.0))
