"""ingress.edge.proxy.proxy_peer: table-driven, on headers parsed by aiosmtpd's own PROXY parser."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import pytest
from aiosmtpd.proxy_protocol import V2_SIGNATURE, ProxyData, get_proxy

from ingress.edge.proxy import peer_trusted, proxy_peer, trusted_networks

TRUSTED = trusted_networks(["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"])
LB = ("10.1.2.3", 40000)           # a trusted load balancer
STRANGER = ("192.0.2.9", 40001)    # not a proxy we trust


class _Reader:
    """The AsyncReader aiosmtpd's get_proxy() wants, over a fixed byte string."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int = -1) -> bytes:
        n = len(self.data) if n < 0 else n
        out, self.data = self.data[:n], self.data[n:]
        return out

    async def readexactly(self, n: int) -> bytes:
        if len(self.data) < n:
            raise asyncio.IncompleteReadError(self.data, n)
        return await self.read(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        i = self.data.index(separator) + len(separator)
        return await self.read(i)


def parse(raw: bytes) -> ProxyData:
    return asyncio.run(get_proxy(_Reader(raw + b"EHLO x\r\n")))


def v2(cmd: int, fam: int, proto: int, addrs: bytes, tlv: bytes = b"") -> bytes:
    tail = addrs + tlv
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | cmd, (fam << 4) | proto, len(tail)) + tail


def v2_inet(src: str, sport: int, dst: str = "192.0.2.1", dport: int = 25, cmd: int = 1,
            proto: int = 1) -> bytes:
    return v2(cmd, 1, proto, socket.inet_aton(src) + socket.inet_aton(dst)
              + struct.pack("!HH", sport, dport))


def v2_inet6(src: str, sport: int, dst: str = "2001:db8::1", dport: int = 25) -> bytes:
    return v2(1, 2, 1, ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
              + struct.pack("!HH", sport, dport))


CASES = [
    # (name, TCP peer, raw header, expected)
    ("v1 tcp4 from trusted", LB, b"PROXY TCP4 198.51.100.7 192.0.2.1 51234 25\r\n",
     ("198.51.100.7", 51234)),
    ("v1 tcp6 from trusted", LB, b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 25\r\n",
     ("2001:db8::7", 51234)),
    ("v1 tcp4 from untrusted", STRANGER, b"PROXY TCP4 198.51.100.7 192.0.2.1 51234 25\r\n",
     None),
    ("v1 UNKNOWN keeps the peer", LB, b"PROXY UNKNOWN\r\n", LB),
    ("v1 UNKNOWN with junk keeps the peer", LB,
     b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", LB),
    ("v1 UNKNOWN from untrusted", STRANGER, b"PROXY UNKNOWN\r\n", None),
    ("v1 malformed address", LB, b"PROXY TCP4 198.51.100.x 192.0.2.1 51234 25\r\n", None),
    ("v1 family mismatch", LB, b"PROXY TCP4 2001:db8::7 192.0.2.1 51234 25\r\n", None),
    ("v1 port out of range", LB, b"PROXY TCP4 198.51.100.7 192.0.2.1 70000 25\r\n", None),
    ("v2 proxy inet", LB, v2_inet("198.51.100.8", 4242), ("198.51.100.8", 4242)),
    ("v2 proxy inet with TLV", LB,
     v2(1, 1, 1, socket.inet_aton("198.51.100.8") + socket.inet_aton("192.0.2.1")
        + struct.pack("!HH", 4242, 25), tlv=b"\x04\x00\x01\x00"), ("198.51.100.8", 4242)),
    ("v2 proxy inet6", LB, v2_inet6("2001:db8::8", 4243), ("2001:db8::8", 4243)),
    ("v2 proxy inet6 v4-mapped is unwrapped", LB, v2_inet6("::ffff:198.51.100.9", 4244),
     ("198.51.100.9", 4244)),
    ("v2 LOCAL keeps the peer", LB, v2(0, 0, 0, b""), LB),
    ("v2 LOCAL with addresses still keeps the peer", LB,
     v2_inet("198.51.100.8", 4242, cmd=0), LB),
    ("v2 UNSPEC keeps the peer", LB, v2(1, 0, 0, b""), LB),
    ("v2 AF_UNIX keeps the peer", LB, v2(1, 3, 1, b"/a".ljust(108, b"\0") * 2), LB),
    ("v2 UDP keeps the peer", LB, v2_inet("198.51.100.8", 4242, proto=2), LB),
    ("v2 from untrusted", STRANGER, v2_inet("198.51.100.8", 4242), None),
    ("v2 LOCAL from untrusted", STRANGER, v2(0, 0, 0, b""), None),
    ("v2 truncated address", LB, v2(1, 1, 1, b"\x01\x02\x03"), None),
    ("v2 bad version", LB, V2_SIGNATURE + b"\x31\x11\x00\x00", None),
    ("v2 bad command", LB, V2_SIGNATURE + b"\x25\x11\x00\x00", None),
    ("no header at all", LB, b"EHLO client.example\r\n", None),
    ("trusted peer over IPv6", ("fd00::5", 1), v2_inet("198.51.100.8", 4242),
     ("198.51.100.8", 4242)),
    ("v4-mapped trusted peer", ("::ffff:127.0.0.1", 1), v2_inet("198.51.100.8", 4242),
     ("198.51.100.8", 4242)),
    ("v4-mapped peer normalised when kept", ("::ffff:10.9.9.9", 7), v2(0, 0, 0, b""),
     ("10.9.9.9", 7)),
]


@pytest.mark.parametrize(("peer", "raw", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_proxy_peer(peer: tuple[str, int], raw: bytes, expected: object) -> None:
    assert proxy_peer(peer, parse(raw), TRUSTED) == expected


def test_nothing_trusted_rejects_everything() -> None:
    assert proxy_peer(LB, parse(v2_inet("198.51.100.8", 1)), ()) is None


def test_odd_inputs_reject() -> None:
    good = parse(v2_inet("198.51.100.8", 1))
    assert proxy_peer(None, good, TRUSTED) is None
    assert proxy_peer(("not-an-ip", 1), good, TRUSTED) is None
    assert proxy_peer(LB, None, TRUSTED) is None
    assert proxy_peer(LB, ProxyData(version=None), TRUSTED) is None
    assert proxy_peer(("10.0.0.1",), good, TRUSTED) == ("198.51.100.8", 1)   # no port: fine


def test_trusted_networks_and_peer_trusted() -> None:
    nets = trusted_networks(["10.1.2.3/8", " ::1/128 "])
    assert [str(n) for n in nets] == ["10.0.0.0/8", "::1/128"]
    assert peer_trusted("10.200.0.1", nets)
    assert peer_trusted("::ffff:10.0.0.1", nets)
    assert peer_trusted("::1", nets)
    assert not peer_trusted("11.0.0.1", nets)
    assert not peer_trusted("garbage", nets)
    with pytest.raises(ValueError):
        trusted_networks(["10.0.0.0/33"])
