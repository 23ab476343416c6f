"""ingress.core.addr: the one address normaliser (table-driven)."""

from __future__ import annotations

import ipaddress

import pytest

from ingress.core.addr import ip_key, normalize_domain, normalize_ip, parse_ip, try_parse_ip

NORMALIZE = [
    ("192.0.2.1", "192.0.2.1"),
    (" 192.0.2.1 ", "192.0.2.1"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("::FFFF:10.1.2.3", "10.1.2.3"),
    ("2001:DB8::0:1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("[::1]", "::1"),
    ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("::1", "::1"),
]


@pytest.mark.parametrize("text,want", NORMALIZE)
def test_normalize_ip(text: str, want: str) -> None:
    assert normalize_ip(text) == want
    assert str(parse_ip(text)) == want


@pytest.mark.parametrize("bad", ["x", "", "999.1.1.1", "[::1", "192.0.2.1/24", "::ffff:"])
def test_not_an_address(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_ip(bad)
    assert try_parse_ip(bad) is None


@pytest.mark.parametrize("obj,want", [
    (ipaddress.ip_address("192.0.2.9"), "192.0.2.9"),
    (ipaddress.ip_address("::ffff:192.0.2.9"), "192.0.2.9"),
    (ipaddress.ip_address("fe80::2%3"), "fe80::2"),
    (ipaddress.ip_address("2001:db8::5"), "2001:db8::5"),
])
def test_parse_ip_objects(obj: object, want: str) -> None:
    assert str(parse_ip(obj)) == want


@pytest.mark.parametrize("ip,prefix,key", [
    ("192.0.2.1", 64, "192.0.2.1"),
    ("::ffff:192.0.2.1", 64, "192.0.2.1"),
    ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
    ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6/128"),
    ("fe80::1%eth0", 64, "fe80::/64"),
    ("not-an-ip", 64, "not-an-ip"),
    ("unix-socket", 64, "unix-socket"),
])
def test_ip_key(ip: str, prefix: int, key: str) -> None:
    assert ip_key(ip, prefix) == key


@pytest.mark.parametrize("d,want", [
    ("Example.COM", "example.com"), (" example.com. ", "example.com"),
    ("example.com..", "example.com."), ("", ""), (".", ""),
])
def test_normalize_domain(d: str, want: str) -> None:
    assert normalize_domain(d) == want
