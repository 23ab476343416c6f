"""ingress.core.cluster and the [cluster] table: addresses, keys, roles, failover order."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ingress.core import cluster, config
from ingress.core.config import ConfigError
from ingress.core.wire import Lane
from ingress.lanes import Lanes
from ingress.supervisor import Supervisor

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
    assert {kind for kind, _ in sup._wanted(sup.cfg)} == kinds


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

    from ingress.lanes import LaneClient
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
    from ingress.cluster_state import valid_domain
    assert valid_domain(domain) is ok
