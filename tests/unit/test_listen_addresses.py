"""Several listen addresses (listen.addresses, listen.fast_addresses, tls.mtls_addresses;
ingress.core.listen): parsing, validation (errors name file and key), the single-address keys
kept working, the --show and status output; and the IPv6 address-literal in the Received
header (RFC 5321)."""

from __future__ import annotations

import errno
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ingress.core import config, listen
from ingress.core.wire import Envelope, Lane
from ingress.tools import configshow, listeners, status
from tests.kit.configkit import cfg_file
from workers.lane import headers


@pytest.mark.parametrize(("text", "want"), [
    ("0.0.0.0:25", ("0.0.0.0", 25)),
    ("[::]:25", ("::", 25)),
    ("[::1]:0", ("::1", 0)),
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    ("[2001:DB8::1]:587", ("2001:db8::1", 587)),
])
def test_parse_listen_address(text: str, want: tuple[str, int]) -> None:
    assert listen.parse_listen_address(text) == want
    assert listen.parse_listen_address(listen.format_listen_address(*want)) == want


@pytest.mark.parametrize("text", [
    "", "127.0.0.1", "::1:25", "[127.0.0.1]:25", "localhost:25", "127.0.0.1:70000",
    "[::1]", "[::1]:x", "127.0.0.1:-1", "[fe80::1%eth0]:25", ":25",
])
def test_parse_listen_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        listen.parse_listen_address(text)


def load(tmp_path: Path, tables: dict[str, dict[str, Any]]) -> config.Config:
    return config.load(cfg_file(tmp_path, **tables))


@pytest.mark.parametrize(("tables", "main", "fast", "mtls"), [
    # The old single-address keys mean one address.
    ({}, ("127.0.0.1:2525",), (), ()),
    ({"listen": {"host": "::1", "port": 25, "fast_port": 26}}, ("[::1]:25",), ("[::1]:26",), ()),
    # Dual stack; the fast port on every host of listen.addresses.
    ({"listen": {"addresses": ["0.0.0.0:25", "[::]:25"], "fast_port": 26}},
     ("0.0.0.0:25", "[::]:25"), ("0.0.0.0:26", "[::]:26"), ()),
    ({"listen": {"addresses": ["127.0.0.1:25", "[::1]:25"], "fast_addresses": ["[::1]:26"]}},
     ("127.0.0.1:25", "[::1]:25"), ("[::1]:26",), ()),
    ({"listen": {"addresses": ["127.0.0.1:0", "[::1]:0"]}}, ("127.0.0.1:0", "[::1]:0"), (), ()),
])
def test_listen_sets(tmp_path: Path, tables: dict[str, dict[str, Any]], main: tuple[str, ...],
                     fast: tuple[str, ...], mtls: tuple[str, ...]) -> None:
    cfg = load(tmp_path, tables)
    assert cfg.listen.addresses == main
    assert cfg.listen.fast_addresses == fast
    assert cfg.tls.mtls_addresses == mtls
    host, port = listen.parse_listen_address(main[0])
    assert (cfg.listen.host, cfg.listen.port) == (host, port)     # mirror the first entry
    assert cfg.listen.fast_port == (listen.parse_listen_address(fast[0])[1] if fast else -1)


def test_mtls_addresses(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    tls = {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem"),
           "client_ca": str(tmp_path / "ca.pem")}
    cfg = load(tmp_path, {"listen": {"addresses": ["127.0.0.1:25", "[::1]:25"]},
                          "tls": {**tls, "mtls_port": 465}})
    assert cfg.tls.mtls_addresses == ("127.0.0.1:465", "[::1]:465")
    cfg = load(tmp_path, {"tls": {**tls, "mtls_addresses": ["[::1]:465"]}})
    assert cfg.tls.mtls_addresses == ("[::1]:465",) and cfg.tls.mtls_port == 465
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, {"tls": {"mtls_addresses": ["[::1]:465"]}})
    assert e.value.key == "tls.mtls_port"        # needs tls.cert, like mtls_port
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, {"tls": {**tls, "mtls_addresses": ["[::1]:x"]}})
    assert e.value.key == "tls.mtls_addresses" and "[v6]:port" in e.value.message


@pytest.mark.parametrize(("tables", "key", "words"), [
    ({"listen": {"addresses": ["::1:25"]}}, "listen.addresses", "brackets"),
    ({"listen": {"addresses": ["localhost:25"]}}, "listen.addresses", "not an IP address"),
    ({"listen": {"addresses": ["127.0.0.1:99999"]}}, "listen.addresses", "0..65535"),
    ({"listen": {"addresses": ["127.0.0.1"]}}, "listen.addresses", "[v6]:port"),
    ({"listen": {"addresses": "127.0.0.1:25"}}, "listen.addresses", "list of strings"),
    ({"listen": {"addresses": ["0.0.0.0:25", "127.0.0.1:25"]}}, "listen.addresses", "overlaps"),
    ({"listen": {"addresses": ["[::]:25", "[::1]:25"]}}, "listen.addresses", "overlaps"),
    ({"listen": {"addresses": ["[::1]:25", "[::1]:25"]}}, "listen.addresses", "twice"),
    ({"listen": {"addresses": ["[::1]:0", "[::1]:0"]}}, "listen.addresses", "twice"),
    ({"listen": {"addresses": ["127.0.0.1:25"], "port": 26}}, "listen.addresses", "not both"),
    ({"listen": {"addresses": ["bad"], "port": 26}}, "listen.addresses", "[v6]:port"),
    ({"listen": {"fast_addresses": ["bad"], "fast_port": 26}}, "listen.fast_addresses", "v4:port"),
    ({"listen": {"addresses": ["127.0.0.1:25"], "fast_addresses": ["0.0.0.0:25"]}},
     "listen.fast_addresses", "overlaps"),
    ({"listen": {"fast_addresses": ["127.0.0.1:26"], "fast_port": 27}}, "listen.fast_port",
     "not both"),
    ({"admission": {"ipv6_prefix": 8}}, "admission.ipv6_prefix", "16..128"),
])
def test_listen_errors_name_file_and_key(tmp_path: Path, tables: dict[str, dict[str, Any]],
                                         key: str, words: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, tables)
    assert e.value.key == key and words in e.value.message
    assert str(e.value).startswith(str(tmp_path / "c.toml"))


def test_v4_and_v6_wildcards_coexist(tmp_path: Path) -> None:
    """0.0.0.0 and [::] on one port do not overlap: the IPv6 socket is V6ONLY."""
    cfg = load(tmp_path, {"listen": {"addresses": ["0.0.0.0:25", "[::]:25"]}})
    assert cfg.listen.addresses == ("0.0.0.0:25", "[::]:25")


def test_show_lists_every_address_and_round_trips(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"listen": {"addresses": ["0.0.0.0:25", "[::]:25"], "fast_port": 26},
                          "supervisor": {"acceptors": 2}})
    text = configshow.render(cfg, nofile=(4096, 4096))
    assert "# listening on smtp 0.0.0.0:25, [::]:25; fast 0.0.0.0:26, [::]:26: 8 " in text
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert config.load(again).listen == cfg.listen
    assert tomllib.loads(text)["listen"]["addresses"] == ["0.0.0.0:25", "[::]:25"]


def test_status_shows_every_address(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"listen": {"addresses": ["127.0.0.1:25", "[::1]:25"],
                                     "fast_addresses": ["[::1]:26"]},
                          "metrics": {"listen": ""},
                          "spool": {"path": str(tmp_path / "sp"),
                                    "state_dir": str(tmp_path / "st")}})
    doc = status.collect(cfg, timeout=0.05)
    assert doc["listen"] == "127.0.0.1:25, [::1]:25"
    text = status.render(doc)
    assert text.startswith("smtp-ingress on 127.0.0.1:25, [::1]:25 ")
    assert "also listening: fast port [::1]:26" in text


def env(ip: str) -> Envelope:
    return Envelope(qid="Q1", lane=Lane.BULK, peer_ip=ip, peer_port=1, helo="h.example",
                    mail_from="a@example.org", rcpts=("b@example.test",),
                    received_at=1700000000.0, deadline=1700000020.0)


@pytest.mark.parametrize(("ip", "literal"), [
    ("192.0.2.1", b"([192.0.2.1])"),
    ("::1", b"([IPv6:::1])"),
    ("2001:db8::5", b"([IPv6:2001:db8::5])"),
    ("::ffff:192.0.2.7", b"([192.0.2.7])"),
    ("not-an-ip\r\nX: y", b"([not-an-ip??X:?y])"),
])
def test_received_address_literal(ip: str, literal: bytes) -> None:
    """RFC 5321 4.4 TCP-info: an address-literal, "[IPv6:...]" for IPv6 (4.1.3)."""
    h = headers.received_header(env(ip), "mx.example")
    assert h.startswith(b"Received: from h.example " + literal + b"\r\n")


@pytest.mark.parametrize("prefix", [48, 64, 128])
def test_ipv6_prefix_reaches_admission(tmp_path: Path, prefix: int) -> None:
    """admission.ipv6_prefix is what the acceptor's admission counts IPv6 clients by."""
    from collections import Counter

    from ingress.edge.sessions import SessionTable
    cfg = load(tmp_path, {"admission": {"ipv6_prefix": prefix}})
    table = SessionTable(cfg, Counter(), now=0.0)
    assert table.admission.limits.ipv6_prefix == prefix
    assert configshow.derived(cfg, nofile=(4096, 4096))["listen_sockets"] >= 1


# --- issue 19 item 9: a failed bind names its cause (it used to say "already in use" for all) --

@pytest.mark.parametrize(("err", "want", "not_want"), [
    (errno.EADDRINUSE, "already in use", "CAP_NET_BIND_SERVICE"),
    (errno.EACCES, "CAP_NET_BIND_SERVICE", "already in use"),
    (errno.EPERM, "port >= 1024", "already in use"),
    (errno.EADDRNOTAVAIL, "not on this host", "already in use"),
    (errno.EINVAL, "cannot bind: Invalid argument", "already in use"),
])
def test_bind_error_message(err: int, want: str, not_want: str) -> None:
    text = listeners.bind_error_message("192.0.2.1:25", err, os.strerror(err))
    assert text.startswith("192.0.2.1:25") and want in text and not_want not in text, text


def test_bind_listener_names_the_cause() -> None:
    """Binding fails locally: nothing is sent. A port in use on 127.0.0.1, and 192.0.2.1
    (TEST-NET-1: no interface of this host has it)."""
    cfg = config.load(None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as e:
            listeners.bind_listener(cfg, "127.0.0.1", port, first=True)
        assert e.value.errno == errno.EADDRINUSE
        assert str(e.value) == f"127.0.0.1:{port} is already in use (another smtp-ingress or MTA?)"
    with pytest.raises(OSError) as e:
        listeners.bind_listener(cfg, "192.0.2.1", 2525, first=True)
    assert e.value.errno == errno.EADDRNOTAVAIL
    assert "192.0.2.1:2525" in str(e.value) and "not on this host" in str(e.value)
    assert "already in use" not in str(e.value)
