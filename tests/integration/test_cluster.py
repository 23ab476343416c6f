"""Several hosts on one machine: edges and lanes nodes over tcp:// with CURVE (issue 11, item 2).

Each lanes node is a real `smtp-ingress run` with cluster.role = "lanes", bound on its own
loopback address (127.0.0.2, 127.0.0.3) with its own spool and state dir; the edge is another
one with cluster.role = "edge" and its own state dir. Keys come from `smtp-ingress keygen`.
Every wait is bounded; the 2 s of the failover test is the issue's deadline, not a speed target.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from ingress.core import cluster
from ingress.core.wire import Envelope, Lane, decode_reply, submit
from tests.kit.clusterkit import free_base, keygen
from tests.kit.harness import ROOT, Ingress, make_body, send_one, start_all
from workers.spool import journal
from workers.spool.store import Spool

LANES_ADDRS = ("127.0.0.2", "127.0.0.3")


class Cluster:
    """Keys, lanes nodes and one edge, all started here and stopped here."""

    def __init__(self, tmp: Path, n_lanes: int, allow_edge: bool = True) -> None:
        self.tmp = tmp
        keys = tmp / "keys"
        self.edge_pub, self.edge_sec = keygen(keys, "edge")
        self.allowed = tmp / "allowed"
        self.allowed.mkdir()
        if allow_edge:
            (self.allowed / "edge.key").write_bytes(self.edge_pub.read_bytes())
        self.lanes: list[Ingress] = []
        self.bases: list[str] = []
        self.lanes_pubs: list[Path] = []
        for i in range(n_lanes):
            pub, sec = keygen(keys, f"lanes{i}")
            base = f"tcp://{LANES_ADDRS[i]}:{free_base(LANES_ADDRS[i])}"
            self.bases.append(base)
            self.lanes_pubs.append(pub)
            # The lanes nodes' files say role "all": `run --role lanes` makes them lanes nodes.
            self.lanes.append(Ingress(tmp / f"lanes{i}", {
                "cluster": {"secret_key": str(sec), "lanes_bind": base,
                            "allowed_keys": str(self.allowed)},
                "lanes.fast": {"workers": 1}, "lanes.bulk": {"workers": 1, "rate": 0.0}},
                args=["--role", "lanes"]))
        self.edge = Ingress(tmp / "edge", {
            "cluster": {"role": "edge", "secret_key": str(self.edge_sec),
                        "lanes_nodes": [f"{b} {p}" for b, p in zip(self.bases, self.lanes_pubs,
                                                                    strict=True)]},
            "supervisor": {"acceptors": 1}})

    def __enter__(self) -> Cluster:
        # All at once, as a cluster boots: the edge's acceptors connect to the lanes nodes
        # whenever those bind (every test waits for the nodes to be live where it matters).
        start_all(*self.lanes, self.edge)
        return self

    def __exit__(self, *exc: object) -> None:
        for ing in (self.edge, *self.lanes):
            with contextlib.suppress(Exception):
                ing.stop()

    def status(self, ing: Ingress | None = None, text: bool = False) -> dict[str, Any]:
        """`smtp-ingress status` of the edge (or `ing`), bounded; text: its rendering too."""
        cmd = [sys.executable, "-m", "ingress", "status", "--config",
               str((ing or self.edge).config), *(ing.args if ing else [])]
        out = subprocess.run([*cmd, "--json"], cwd=ROOT, capture_output=True, timeout=30)
        doc: dict[str, Any] = orjson.loads(out.stdout)
        doc["exit"] = out.returncode
        if text:
            doc["text"] = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=30,
                                         text=True).stdout
        return doc


def spooled_tags(ing: Ingress) -> set[str]:
    tags = set()
    new = ing.spool / "new"
    if new.is_dir():
        for e in ing.spooled().values():
            for line in e.message.split(b"\r\n"):
                if line.startswith(b"X-Tag: "):
                    tags.add(line[7:].decode())
    return tags


def tagged(tag: str) -> bytes:
    return make_body(0, 256, extra=f"X-Tag: {tag}\r\n".encode())


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, 2) as c:
        yield c


def send_while_signalled(c: Cluster, prefix: str, sig: int, at: float, duration: float,
                         ) -> tuple[list[tuple[float, float, int, str]], float]:
    """Two senders through the edge, a message each every 20 ms (at most 400) for `duration`
    s, while `sig` goes to lanes node 1's process group `at` s in. Every message's (start,
    end, code, tag), tags "<prefix><sender>-<n>", and when the signal was sent."""
    results: list[tuple[float, float, int, str]] = []
    signalled: list[float] = []

    async def sender(k: int, stop_at: float) -> None:
        i = 0
        while time.monotonic() < stop_at and i < 400:
            tag = f"{prefix}{k}-{i}"
            t0 = time.monotonic()
            code, _ = await send_one(c.edge.port, tagged(tag), timeout=10)
            results.append((t0, time.monotonic(), code, tag))
            i += 1
            await asyncio.sleep(0.02)

    async def signaller() -> None:
        await asyncio.sleep(at)
        signalled.append(time.monotonic())
        os.killpg(c.lanes[1].pid, sig)

    async def go() -> None:
        stop_at = time.monotonic() + duration
        await asyncio.gather(sender(0, stop_at), sender(1, stop_at), signaller())
    asyncio.run(asyncio.wait_for(go(), 90))
    return results, signalled[0]


def wait_both_live(c: Cluster, deadline: float) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = c.status()
        if doc["nodes"] and all(n["live"] for n in doc["nodes"]):
            return doc
        time.sleep(0.2)
    raise AssertionError(f"lanes nodes not live: {doc}")


def test_edge_delivers_to_both_lanes_nodes_over_curve(two_nodes: Cluster) -> None:
    c = two_nodes
    doc = wait_both_live(c, time.monotonic() + 20)
    assert doc["exit"] == 0 and doc["role"] == "edge"
    assert [n["node"] for n in doc["nodes"]] == c.bases
    for ln, base in zip(c.lanes, c.bases, strict=True):   # a lanes node reads itself (own key)
        own = c.status(ln)
        assert own["exit"] == 0 and own["role"] == "lanes", own
        assert [n["node"] for n in own["nodes"]] == [base] and own["nodes"][0]["live"]

    async def go() -> list[tuple[int, str]]:
        return [await send_one(c.edge.port, tagged(f"m{i}")) for i in range(16)]
    replies = asyncio.run(asyncio.wait_for(go(), 120))
    assert [r[0] for r in replies] == [250] * 16, replies
    a, b = spooled_tags(c.lanes[0]), spooled_tags(c.lanes[1])
    assert a and b, (a, b)                      # both nodes took mail
    assert a | b == {f"m{i}" for i in range(16)} and not a & b
    assert not (c.edge.spool / "new").is_dir() or not list((c.edge.spool / "new").iterdir())


@pytest.mark.serial     # mail flows again within 2 s of the kill: a deadline
def test_kill_9_of_a_lanes_node_fails_over(two_nodes: Cluster) -> None:
    """kill -9 of a whole lanes node (its supervisor and children) while two are up: every
    client gets 250 or a 4xx, every 250 is in a spool (the dead node's: once the recovery its
    next start runs has written what its workers' journals acknowledged), and mail flows again
    within 2 s."""
    c = two_nodes
    wait_both_live(c, time.monotonic() + 20)
    # the host is gone, at once
    results, t_kill = send_while_signalled(c, "s", signal.SIGKILL, at=1.5, duration=6.0)
    c.lanes[1].proc.wait(10)  # type: ignore[union-attr]
    journal.recover(Spool(c.lanes[1].spool))     # as its next start does, before taking work
    codes = {code for _, _, code, _ in results}
    assert codes <= {250, 421, 451}, sorted(codes)
    ok = {tag for _, _, code, tag in results if code == 250}
    assert ok <= spooled_tags(c.lanes[0]) | spooled_tags(c.lanes[1])   # never 250 and lost
    before = [r for r in results if r[1] < t_kill]
    assert before and all(r[2] == 250 for r in before)
    # Mail flows again within 2 s: a message sent after the kill got 250 by then, and every
    # message started after that point got 250.
    flowing = [r for r in results if r[0] >= t_kill and r[2] == 250]
    assert flowing and flowing[0][1] <= t_kill + 2.0, [r for r in results if r[0] >= t_kill][:5]
    later = [r for r in results if r[0] >= t_kill + 2.0]
    assert later and all(r[2] == 250 for r in later), [r for r in later if r[2] != 250][:5]
    doc = c.status(text=True)
    assert [n["live"] for n in doc["nodes"]] == [True, False] and doc["exit"] == 1
    assert f"lanes node {c.bases[0]}: live" in doc["text"]
    assert f"lanes node {c.bases[1]}: DEAD" in doc["text"]


def _raw_submit(c: Cluster, node: int, curve: tuple[bytes, bytes] | None, server: bytes,
                tag: str, wait: float) -> list[list[bytes]]:
    """A raw DEALER towards lanes node `node`'s bulk front: one well-formed SUBMIT (CURVE
    with `curve` as its key pair, or none at all), and every reply within `wait`."""
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            s.setsockopt(zmq.CURVE_SERVERKEY, server)
            s.setsockopt(zmq.CURVE_PUBLICKEY, curve[0])
            s.setsockopt(zmq.CURVE_SECRETKEY, curve[1])
        s.connect(cluster.endpoint(c.bases[node], "bulk", "front"))
        now = time.time()
        env = Envelope(qid=f"raw{tag}", lane=Lane.BULK, peer_ip="192.0.2.1", peer_port=1,
                       helo="raw.test", mail_from="alice@sender.test",
                       rcpts=("bob@example.test",), received_at=now, deadline=now + 10)
        s.send_multipart(submit(env, tagged(tag)))    # queued until a pipe exists (never)
        out = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if s.poll(int(left * 1000) + 1):
                out.append(s.recv_multipart())
                if curve is not None:
                    break
        return out
    finally:
        ctx.destroy(linger=0)


def _refusals(ing: Ingress, deadline: float, n: int) -> list[dict[str, Any]]:
    while time.monotonic() < deadline:
        ev = ing.events("curve_refused")
        if len(ev) >= n:
            return ev
        time.sleep(0.1)
    return ing.events("curve_refused")


def test_peer_without_the_right_curve_key_cannot_submit(tmp_path: Path) -> None:
    with Cluster(tmp_path, 1) as c:
        ln = c.lanes[0]
        server = cluster.public_key(str(c.lanes_pubs[0]))
        # The positive control: the allowed edge key, the same raw frame, gets its ACK.
        allowed = cluster.key_pair(str(c.edge_sec))
        replies = _raw_submit(c, 0, allowed, server, "good", 15.0)
        assert replies and decode_reply(replies[0]).ok, replies
        deadline = time.monotonic() + 10
        while "good" not in spooled_tags(ln) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "good" in spooled_tags(ln)
        # A key the lanes node does not know: refused by ZAP, logged, nothing spooled.
        intruder = cluster.key_pair(str(keygen(tmp_path / "other", "intruder")[1]))
        assert _raw_submit(c, 0, intruder, server, "intruder", 2.0) == []
        ev = _refusals(ln, time.monotonic() + 5, 1)
        assert any(e.get("key") == intruder[0].decode() for e in ev), ev
        # No CURVE at all: the handshake fails, logged, nothing spooled.
        before = len(ln.events("curve_refused"))
        assert _raw_submit(c, 0, None, server, "plain", 2.0) == []
        ev = _refusals(ln, time.monotonic() + 5, before + 1)
        assert len(ev) > before, ev
        # A client with a key of its own but the wrong server key: likewise.
        before = len(ev)
        wrong_server = cluster.public_key(str(c.edge_pub))
        assert _raw_submit(c, 0, allowed, wrong_server, "wrongserver", 2.0) == []
        ev = _refusals(ln, time.monotonic() + 5, before + 1)
        assert len(ev) > before, ev
        time.sleep(1.0)       # anything that did get in would be spooled by now
        assert spooled_tags(ln) == {"good"}


def test_an_unknown_peer_reads_no_status_or_facts(tmp_path: Path) -> None:
    """The status PUB is CURVE too: a SUB with an unknown key (or none) receives nothing,
    while the allowed key does."""
    with Cluster(tmp_path, 1) as c:
        server = cluster.public_key(str(c.lanes_pubs[0]))
        intruder = cluster.key_pair(str(keygen(tmp_path / "other", "intruder")[1]))

        def listen(curve: tuple[bytes, bytes] | None, wait: float) -> int:
            ctx = zmq.Context()
            try:
                s = ctx.socket(zmq.SUB)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SUBSCRIBE, b"")
                if curve is not None:
                    s.setsockopt(zmq.CURVE_SERVERKEY, server)
                    s.setsockopt(zmq.CURVE_PUBLICKEY, curve[0])
                    s.setsockopt(zmq.CURVE_SECRETKEY, curve[1])
                s.connect(cluster.endpoint(c.bases[0], "bulk", "status"))
                return 1 if s.poll(int(wait * 1000)) else 0
            finally:
                ctx.destroy(linger=0)
        assert listen(cluster.key_pair(str(c.edge_sec)), 10.0) == 1
        assert listen(intruder, 2.0) == 0
        assert listen(None, 2.0) == 0


def test_an_edge_whose_key_is_not_allowed_gets_451_and_both_sides_log_it(tmp_path: Path) -> None:
    """The real edge, with a key the lanes node does not list: its clients get 451, nothing is
    spooled, the lanes node logs the refusal and the edge says once that it is refused."""
    with Cluster(tmp_path, 1, allow_edge=False) as c:
        code, text = asyncio.run(send_one(c.edge.port, tagged("x"), timeout=20))
        assert code == 451, (code, text)
        ln = c.lanes[0]
        ev = _refusals(ln, time.monotonic() + 5, 1)
        assert any(e.get("key") == cluster.public_key(str(c.edge_pub)).decode() for e in ev), ev
        assert spooled_tags(ln) == set()
        deadline = time.monotonic() + 5
        while not c.edge.events("lanes_handshake_failed") and time.monotonic() < deadline:
            time.sleep(0.1)
        said = c.edge.events("lanes_handshake_failed")
        # once per socket (2 lanes x (1 DEALER)) of each acceptor process (the fast acceptor
        # included), not once per reconnect attempt
        procs = {e["proc"] for e in said}
        assert 1 <= len(said) <= 2 * len(procs), said
        assert all(sum(e["proc"] == p for e in said) <= 2 for p in procs), said
        assert len(c.edge.events("broker_disconnected")) <= 2 * len(procs)
        doc = c.status()
        assert doc["exit"] == 1 and [n["live"] for n in doc["nodes"]] == [False]


@pytest.mark.serial     # every message 3 s after the SIGSTOP gets 250: a deadline
def test_a_silent_lanes_node_is_left_and_rejoins(two_nodes: Cluster) -> None:
    """A lanes node that stops answering without closing its connections (SIGSTOP of the whole
    node: a hung or vanished host): its stale status and the ZeroMQ heartbeats take it out of
    use, clients get 250 or 451, every 250 is spooled, mail flows on the other node within a
    deadline; after SIGCONT it serves again."""
    c = two_nodes
    wait_both_live(c, time.monotonic() + 20)
    try:
        results, t_stop = send_while_signalled(c, "q", signal.SIGSTOP, at=1.0, duration=7.0)
    finally:
        os.killpg(c.lanes[1].pid, signal.SIGCONT)
    assert {code for *_, code, _ in results} <= {250, 421, 451}
    ok = {tag for *_, code, tag in results if code == 250}
    later = [r for r in results if r[0] >= t_stop + 3.0]
    assert later and all(r[2] == 250 for r in later), [r for r in later if r[2] != 250][:5]
    # It rejoins: after SIGCONT (its supervisor may restart children it found silent), the
    # edge sends to it again.
    def rejoined() -> set[str]:
        return {t for t in spooled_tags(c.lanes[1]) if t.startswith("r")}
    deadline = time.monotonic() + 30
    n = 0
    while time.monotonic() < deadline and not rejoined():
        code, _ = asyncio.run(send_one(c.edge.port, tagged(f"r{n}"), timeout=10))
        if code == 250:
            ok.add(f"r{n}")
        n += 1
        time.sleep(0.05)
    assert rejoined(), "never rejoined"
    time.sleep(1.0)
    assert ok <= spooled_tags(c.lanes[0]) | spooled_tags(c.lanes[1])   # never 250 and lost


def test_run_role_is_checked_against_the_cluster_table(tmp_path: Path) -> None:
    """`run --role edge` with a file that names no lanes node: exit 2, naming the key; and a
    lanes node (--role lanes) listens for no SMTP client."""
    with Cluster(tmp_path, 1) as c:
        out = subprocess.run([sys.executable, "-m", "ingress", "run", "--role", "edge",
                              "--config", str(c.lanes[0].config)],
                             cwd=ROOT, capture_output=True, timeout=30, text=True)
        assert out.returncode == 2 and "cluster.lanes_nodes" in out.stderr, out.stderr
        ready = c.lanes[0].events("ready")[0]
        assert ready["role"] == "lanes" and ready["listen"] == c.bases[0]
        assert not c.lanes[0].children("acceptor") and c.edge.children("acceptor")
        assert not c.edge.children("broker") and c.lanes[0].children("broker")


def test_two_edges_share_one_lanes_node(tmp_path: Path) -> None:
    """The layout of docs/several-hosts.md: edges on two loopback addresses, each its own state
    dir, one lanes node: both deliver into its spool, and a second edge key must be listed too."""
    with Cluster(tmp_path, 1) as c:
        pub_b, sec_b = keygen(tmp_path / "keys", "edge-b")
        (c.allowed / "edge-b.key").write_bytes(pub_b.read_bytes())
        # allowed_keys is read at start: restart the lanes node to admit edge B
        c.lanes[0].stop()
        c.lanes[0].start()        # returns at the old "ready" line (the log is appended to)
        deadline = time.monotonic() + 60
        while len(c.lanes[0].events("ready")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        edge_b = Ingress(tmp_path / "edge-b", {
            "listen": {"host": "127.0.0.4", "port": 0},
            "cluster": {"role": "edge", "secret_key": str(sec_b),
                        "lanes_nodes": [f"{c.bases[0]} {c.lanes_pubs[0]}"]},
            "supervisor": {"acceptors": 1}})
        with edge_b:
            for edge in (c.edge, edge_b):
                deadline = time.monotonic() + 20
                while not all(n["live"] for n in c.status(edge)["nodes"]):
                    assert time.monotonic() < deadline, "lanes node not live for an edge"
                    time.sleep(0.2)

            async def go() -> list[int]:
                out = []
                for i in range(6):
                    out.append((await send_one(c.edge.port, tagged(f"a{i}")))[0])
                    out.append((await send_one(edge_b.port, tagged(f"b{i}"),
                                               host="127.0.0.4"))[0])
                return out
            assert asyncio.run(asyncio.wait_for(go(), 120)) == [250] * 12
        tags = spooled_tags(c.lanes[0])
        assert {f"a{i}" for i in range(6)} | {f"b{i}" for i in range(6)} <= tags


def test_kill_9_of_an_edge_under_load(tmp_path: Path) -> None:
    """Two edges and one lanes node, mail on both edges; kill -9 of edge A (its supervisor and
    every acceptor, as a host that vanishes): edge B goes on answering 250 to every message,
    A's clients see a 250, a 4xx or a dropped connection, and every message that got 250 on
    either edge is in the lanes node's spool."""
    c = Cluster(tmp_path, 1)
    pub_b, sec_b = keygen(tmp_path / "keys", "edge-b")
    (c.allowed / "edge-b.key").write_bytes(pub_b.read_bytes())
    edge_b = Ingress(tmp_path / "edge-b", {
        "listen": {"host": "127.0.0.4", "port": 0},
        "cluster": {"role": "edge", "secret_key": str(sec_b),
                    "lanes_nodes": [f"{c.bases[0]} {c.lanes_pubs[0]}"]},
        "supervisor": {"acceptors": 1}})
    with c, edge_b:
        for edge in (c.edge, edge_b):
            deadline = time.monotonic() + 20
            while not all(n["live"] for n in c.status(edge)["nodes"]):
                assert time.monotonic() < deadline, "lanes node not live for an edge"
                time.sleep(0.2)
        results: dict[str, list[tuple[float, int, str]]] = {"a": [], "b": []}
        killed_at: list[float] = []

        async def sender(name: str, port: int, host: str, stop_at: float) -> None:
            i = 0
            while time.monotonic() < stop_at and i < 300:
                tag = f"{name}{i}"
                code, _ = await send_one(port, tagged(tag), host=host, timeout=10)
                results[name].append((time.monotonic(), code, tag))
                i += 1
                await asyncio.sleep(0.02)

        async def killer() -> None:
            await asyncio.sleep(1.5)
            os.killpg(c.edge.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

        async def go() -> None:
            stop_at = time.monotonic() + 5.0
            await asyncio.gather(sender("a", c.edge.port, "127.0.0.1", stop_at),
                                 sender("b", edge_b.port, "127.0.0.4", stop_at), killer())
        asyncio.run(asyncio.wait_for(go(), 90))
        c.edge.proc.wait(10)  # type: ignore[union-attr]
        a, b = results["a"], results["b"]
        assert {code for _, code, _ in a} <= {250, 421, 451, 0}
        assert any(code == 250 for _, code, _ in a)                # it served before the kill
        assert [code for _, code, _ in b] == [250] * len(b)        # B never faltered
        assert any(t > killed_at[0] for t, _, _ in b)              # ... and served after it
        ok = {tag for _, code, tag in a + b if code == 250}
        deadline = time.monotonic() + 10
        while not ok <= spooled_tags(c.lanes[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ok <= spooled_tags(c.lanes[0])                      # never a 250 and lost
