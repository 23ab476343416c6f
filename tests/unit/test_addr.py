"""ingress.core.addr: the one address normaliser (table-driven)."""

from __future__ import annotations

import ipaddress

import pytest

from ingress.core.addr import (
    DOMAIN_CACHE,
    MAX_DOMAIN_INPUT,
    _canonical_cached,
    ip_key,
    net_key,
    normalize_domain,
    normalize_ip,
    parse_ip,
    site_key,
    split_address,
    try_parse_ip,
)

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
    ("example.com..", ""),          # an empty label: not a domain name (was "example.com.")
    ("", ""), (".", ""),
])
def test_normalize_domain(d: str, want: str) -> None:
    assert normalize_domain(d) == want


# Every spelling of one DNS name is one key; anything that is not a domain name is "".
CANONICAL = [
    # look-alike spellings of spam.test (issue 17, measured item 1)
    ("\uff53pam.test", "spam.test"),                  # fullwidth s
    ("\uff33\uff30\uff21\uff2d.test", "spam.test"),    # fullwidth capitals
    ("spam\u3002test", "spam.test"),                  # ideographic full stop
    ("spam\uff0etest", "spam.test"),                  # fullwidth full stop
    ("spam\uff61test", "spam.test"),                  # halfwidth ideographic full stop
    ("spam.test\u3002", "spam.test"),                 # ... as the root's dot
    ("SpAm.TeSt", "spam.test"),                       # mixed case
    ("spam.test.", "spam.test"),                      # trailing dot
    ("  spam.test  ", "spam.test"),
    ("spa\u00adm.test", "spam.test"),                 # soft hyphen: ignored by UTS-46
    ("spa\u200bm.test", "spam.test"),                 # zero-width space: ignored
    ("\ufb03.test", "ffi.test"),                      # a ligature is its letters
    # IDNs: one A-label, whatever the form
    ("b\u00fccher.test", "xn--bcher-kva.test"),       # NFC U-label
    ("bu\u0308cher.test", "xn--bcher-kva.test"),      # NFD
    ("B\u00dcCHER.TEST", "xn--bcher-kva.test"),       # upper case
    ("xn--bcher-kva.test", "xn--bcher-kva.test"),     # A-label input
    ("XN--BCHER-KVA.Test.", "xn--bcher-kva.test"),
    ("b\u00fccher\u3002test", "xn--bcher-kva.test"),
    ("\u00df.test", "xn--zca.test"),                  # IDNA 2008: "ss.test" is another name
    ("ss.test", "ss.test"),
    ("a-b.test", "a-b.test"),
    ("1.2.3.4", "1.2.3.4"),
    ("localhost", "localhost"),                       # one label is a name
    ("a" * 63 + ".test", "a" * 63 + ".test"),          # the longest label
    (".".join(["a" * 63] * 3) + "." + "a" * 61, ".".join(["a" * 63] * 3) + "." + "a" * 61),
    # not a domain name: never a key
    ("", ""), (".", ""), ("..", ""), ("\u3002", ""), (" ", ""),
    ("a..test", ""), (".a.test", ""), ("a.test..", ""),
    ("a" * 64 + ".test", ""),                         # a label over 63 octets
    (".".join(["a" * 63] * 4), ""),                   # a name over 253 octets
    ("x" * 2000, ""),                                 # over MAX_DOMAIN_INPUT
    ("-a.test", ""), ("a-.test", ""), ("ab--c.test", ""),
    ("xn--zz.test", ""),                              # an A-label that does not decode
    ("xn--pam-p96s.test", ""),                        # an A-label of "\uff53pam": not IDNA 2008
    ("my_host.test", ""), ("*.test", ""), ("a b.test", ""), ("a@b.test", ""),
    ("[192.0.2.1]", ""), ("[IPv6:::1]", ""),           # address literals
    ("\U0001f4a9.test", ""),                          # emoji
    ("\u200ca.test", ""),                             # a joiner out of context
    ("\u0661\u0662.test", ""),                        # bidi rule
    ("a\udcff.test", ""),                             # a lone surrogate (undecodable byte)
    ("a\x00.test", ""), ("a\r\n.test", ""),
]


@pytest.mark.parametrize("d,want", CANONICAL)
def test_canonical_domain(d: str, want: str) -> None:
    assert normalize_domain(d) == want
    if want:    # canonical is a fixed point, and every spelling of it maps there
        assert normalize_domain(want) == want
        assert want.isascii() and want == want.lower() and not want.endswith(".")
        assert len(want) <= 253


def test_canonical_domain_long_inputs_are_worked_out_uncached() -> None:
    """A name padded with ignorable characters past the cached length is still its name; the
    cache holds only short inputs (its bound: DOMAIN_CACHE entries of at most 255 chars)."""
    assert normalize_domain("\u00ad" * 600 + "spam.test") == "spam.test"
    assert normalize_domain("\u00ad" * MAX_DOMAIN_INPUT + "spam.test") == ""
    info = _canonical_cached.cache_info()
    assert info.maxsize == DOMAIN_CACHE
    normalize_domain("\u00ad" * 700 + "other.test")
    assert _canonical_cached.cache_info().currsize <= DOMAIN_CACHE


@pytest.mark.parametrize("address,want", [
    ("a@b.test", ("a", "b.test")), ("<a@b.test>", ("a", "b.test")),
    (" <A@B.test> ", ("A", "B.test")),
    ("<>", ("", "")), ("", ("", "")), ("postmaster", ("postmaster", "")),
    ('"a@b"@c.test', ('"a@b"', "c.test")), ("a@", ("a", "")),
])
def test_split_address(address: str, want: tuple[str, str]) -> None:
    assert split_address(address) == want


@pytest.mark.parametrize(("ip", "prefix", "net", "site"), [
    ("192.0.2.77", 64, "192.0.2.0/24", "192.0.2.0/24"),
    ("::ffff:192.0.2.77", 64, "192.0.2.0/24", "192.0.2.0/24"),
    ("2001:db8:1:2:3::4", 64, "2001:db8:1:2::/64", "2001:db8:1::/48"),
    ("2001:db8:1:2:3::4", 56, "2001:db8:1::/56", "2001:db8:1::/48"),
    ("2001:db8:1:2:3::4", 32, "2001:db8::/32", "2001:db8::/32"),     # wider than a site
    ("not-an-ip", 64, "not-an-ip", "not-an-ip"),
])
def test_network_and_site_keys(ip: str, prefix: int, net: str, site: str) -> None:
    assert net_key(ip, prefix) == net and site_key(ip, prefix) == site
