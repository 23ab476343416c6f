"""ingress.core.reuseport against the real kernel: SO_REUSEPORT groups on loopback with the
steering program attached; which socket accepts each connection, by its source address."""

from __future__ import annotations

import collections
import ipaddress
import select
import socket
from collections.abc import Iterator

import pytest

from ingress.core.reuseport import MAX_NETWORKS, attach, program


def group(family: int, host: str, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    port = 0
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        port = s.getsockname()[1]
        s.listen(64)
        socks.append(s)
    return socks


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def accepted_by(socks: list[socket.socket], family: int, host: str, sources: list[str],
                rounds: int) -> collections.Counter[tuple[str, int]]:
    port = socks[0].getsockname()[1]
    got: collections.Counter[tuple[str, int]] = collections.Counter()
    for _ in range(rounds):
        for src in sources:
            with socket.socket(family, socket.SOCK_STREAM) as c:
                c.bind((src, 0))
                c.connect((host, port))
                ready, _, _ = select.select(socks, [], [], 2)
                assert len(ready) == 1, ready
                conn, _ = ready[0].accept()
                conn.close()
                got[(src, socks.index(ready[0]))] += 1
    return got


NETS = [ipaddress.ip_network(n) for n in ("127.0.0.10/32", "127.0.3.0/24", "10.0.0.0/8")]


def test_operator_networks_go_to_the_fast_sockets_others_to_port_25(
        closing: list[socket.socket]) -> None:
    """Two port-25 sockets, two fast ones: the allow-listed sources (one /32, one /24) land
    on the fast sockets only, both used; a stranger (and a neighbour of the /32) on the
    port-25 ones only, both used."""
    socks = group(socket.AF_INET, "127.0.0.1", 4)
    closing += socks
    prog = program(NETS, 2, 2)
    assert prog is not None
    attach(socks[0], prog)
    got = accepted_by(socks, socket.AF_INET, "127.0.0.1",
                      ["127.0.0.10", "127.0.3.77", "127.0.0.11", "127.0.4.1"], 24)
    for src in ("127.0.0.10", "127.0.3.77"):
        assert {i for (s, i) in got if s == src} == {2, 3}, got
    for src in ("127.0.0.11", "127.0.4.1"):
        assert {i for (s, i) in got if s == src} == {0, 1}, got


def test_ipv6(closing: list[socket.socket]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    socks = group(socket.AF_INET6, "::1", 2)
    closing += socks
    prog = program([ipaddress.ip_network("::1/128")], 1, 1)
    assert prog is not None
    attach(socks[0], prog)
    assert set(accepted_by(socks, socket.AF_INET6, "::1", ["::1"], 5)) == {("::1", 1)}
    prog = program([ipaddress.ip_network("2001:db8:ffff::/48"),
                    ipaddress.ip_network("::/1")], 1, 1)         # ::1 is in ::/1
    assert prog is not None
    attach(socks[0], prog)
    assert set(accepted_by(socks, socket.AF_INET6, "::1", ["::1"], 5)) == {("::1", 1)}
    prog = program([ipaddress.ip_network("2001:db8::/32")], 1, 1)
    assert prog is not None
    attach(socks[0], prog)
    assert set(accepted_by(socks, socket.AF_INET6, "::1", ["::1"], 5)) == {("::1", 0)}


def test_no_networks_every_client_to_port_25(closing: list[socket.socket]) -> None:
    socks = group(socket.AF_INET, "127.0.0.1", 3)
    closing += socks
    prog = program([], 2, 1)
    assert prog is not None
    attach(socks[0], prog)
    got = accepted_by(socks, socket.AF_INET, "127.0.0.1", ["127.0.0.10", "127.0.0.11"], 12)
    assert {i for (_, i) in got} == {0, 1}, got


@pytest.mark.parametrize(("nets", "acceptors", "fast"), [
    (NETS, 2, 0), (NETS, 0, 1),
    ([ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(MAX_NETWORKS + 1)],
     2, 1)])
def test_nothing_to_steer(nets: list[ipaddress.IPv4Network], acceptors: int, fast: int) -> None:
    assert program(nets, acceptors, fast) is None


def test_the_largest_program_is_accepted(closing: list[socket.socket]) -> None:
    socks = group(socket.AF_INET6, "::1", 2) if socket.has_ipv6 else []
    closing += socks
    nets = [ipaddress.ip_network(f"2001:db8:{i:x}::/48") for i in range(MAX_NETWORKS)]
    prog = program(nets, 1, 1)
    assert prog is not None and len(prog) // 8 <= 4096
    if socks:
        attach(socks[0], prog)
