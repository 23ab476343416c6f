"""The pure half of XCLIENT / XFORWARD (workers/relay/forward.py) and relay.forward_client's
validation: table-driven, no network. The command lines are checked the way an attacker who
controls the HELO (and an edited spool file) would try to break them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingress.core import config
from ingress.core.wire import Envelope, Lane
from tests.kit.configkit import load_relay
from tests.kit.relaykit import xtext_decode
from workers.relay import forward as fw

POSTFIX_XCLIENT = "NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
POSTFIX_XFORWARD = "NAME ADDR PROTO HELO SOURCE PORT IDENT"
BOTH = {"xclient": POSTFIX_XCLIENT, "xforward": POSTFIX_XFORWARD, "8bitmime": ""}


def attributes(lines: tuple[bytes, ...]) -> dict[str, str]:
    """Every attribute of the command lines, xtext-decoded (each name at most once)."""
    got: dict[str, str] = {}
    for line in lines:
        verb, *tokens = line.decode("ascii").split(" ")
        assert verb in ("XCLIENT", "XFORWARD") and tokens
        for tok in tokens:
            name, eq, value = tok.partition("=")
            assert eq and name not in got and len(value) <= fw.VALUE_MAX, tok
            got[name] = xtext_decode(value)
    return got


def well_formed(lines: tuple[bytes, ...]) -> None:
    for line in lines:
        assert len(line) <= fw.LINE_MAX, len(line)
        assert re.fullmatch(rb"[\x21-\x7e]+(?: [\x21-\x7e]+)*", line), line


# --- xtext and safe text ---------------------------------------------------------------------

@pytest.mark.parametrize(("value", "want"), [
    ("mx.example.org", "mx.example.org"),
    ("a+b=c", "a+2Bb+3Dc"),
    ("a b", "a+20b"),
    ("\r\n", "+0D+0A"),
    ("é", "+C3+A9"),
    ("[UNAVAILABLE]", "[UNAVAILABLE]"),
    ("~!", "~!"),
    ("\x00\x7f", "+00+7F"),
])
def test_xtext(value: str, want: str) -> None:
    assert fw.xtext(value) == want
    assert xtext_decode(fw.xtext(value)) == value


@pytest.mark.parametrize(("text", "want"), [
    ("mail.example.org", "mail.example.org"),
    ("[192.0.2.1]", "[192.0.2.1]"),
    ("  padded  ", "padded"),
    ("two words", "two?words"),
    ('<a@b> (c) "q";\\', "?a?b???c???q???"),         # Postfix's NEUTER_CHARACTERS
    ("x=y+z", "x=y+z"),                               # kept; xtext takes care of them
    ("h\u00e9llo", "h?llo"),
    ("a\r\nXCLIENT ADDR=6.6.6.6", "a??XCLIENT?ADDR=6.6.6.6"),
    ("\x00nul", "?nul"),
    ("", ""),
    ("A" * 300, "A" * 255),
    ("=" * 100, "=" * 85),                            # 85 x "+3D" = 255 octets of xtext
])
def test_safe_text(text: str, want: str) -> None:
    got = fw.safe_text(text)
    assert got == want
    assert len(fw.xtext(got)) <= fw.VALUE_MAX


# --- client_of ---------------------------------------------------------------------------------

def env(**kw: Any) -> dict[str, Any]:
    base = Envelope(qid="1A2B3C", lane=Lane.BULK, peer_ip="192.0.2.1", peer_port=4242,
                    helo="mail.example.org", mail_from="a@example.org", rcpts=("b@example.test",),
                    received_at=0.0, deadline=0.0, acceptor="a0-1", proto="ESMTP").as_dict()
    base.update(kw)
    return base


@pytest.mark.parametrize(("kw", "want"), [
    ({}, fw.Client("192.0.2.1", 4242, "mail.example.org", "ESMTP", "1A2B3C")),
    ({"peer_ip": "::ffff:192.0.2.9"}, fw.Client("192.0.2.9", 4242, "mail.example.org",
                                                "ESMTP", "1A2B3C")),
    ({"peer_ip": "2001:DB8::1"}, fw.Client("2001:db8::1", 4242, "mail.example.org", "ESMTP",
                                           "1A2B3C")),
    ({"proto": "smtp"}, fw.Client("192.0.2.1", 4242, "mail.example.org", "SMTP", "1A2B3C")),
    ({"proto": "UTF8SMTPS"}, fw.Client("192.0.2.1", 4242, "mail.example.org", "", "1A2B3C")),
    ({"proto": None, "peer_port": "x"}, fw.Client("192.0.2.1", 0, "mail.example.org", "",
                                                  "1A2B3C")),
    ({"peer_port": 70000, "helo": ""}, fw.Client("192.0.2.1", 0, "", "ESMTP", "1A2B3C")),
    ({"helo": "bad helo\r\n"}, fw.Client("192.0.2.1", 4242, "bad?helo", "ESMTP", "1A2B3C")),
    ({"qid": "Q Q\nXFORWARD " + "x" * 99}, fw.Client("192.0.2.1", 4242, "mail.example.org",
                                                     "ESMTP", ("Q?Q?XFORWARD?" + "x" * 99)[:64])),
    ({"acceptor": fw.OWN}, None),                   # the relay's own DSN
    ({"peer_ip": "not-an-ip"}, None),
    ({"peer_ip": ""}, None),
])
def test_client_of(kw: dict[str, Any], want: fw.Client | None) -> None:
    assert fw.client_of(env(**kw)) == want


def test_client_of_envelope_without_proto() -> None:
    """A spool file written before the envelope had "proto" (the key is additive)."""
    old = env()
    del old["proto"]
    assert Envelope.decode(orjson.dumps(old)).proto == ""
    c = fw.client_of(old)
    assert c is not None and c.proto == ""


# --- select ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "exts", "command", "problem"), [
    ("auto", BOTH, "XCLIENT", ""),
    ("auto", {"xforward": POSTFIX_XFORWARD}, "XFORWARD", ""),
    ("auto", {"xclient": "NAME ADDR PROTO HELO", "xforward": "NAME ADDR PROTO HELO"},
     "XCLIENT", ""),
    ("auto", {"xclient": "ADDR PORT TTL TIMEOUT"}, "", ""),     # not Postfix's semantics
    ("auto", {"xclient": "ADDR", "xforward": POSTFIX_XFORWARD}, "XFORWARD", ""),
    ("auto", {"xclient": "name addr proto helo"}, "XCLIENT", ""),   # case-insensitive
    ("auto", {}, "", ""),
    ("xclient", BOTH, "XCLIENT", ""),
    ("xforward", BOTH, "XFORWARD", ""),
    ("xclient", {"xforward": POSTFIX_XFORWARD}, "", "does not offer XCLIENT"),
    ("xforward", {"xclient": POSTFIX_XCLIENT}, "", "does not offer XFORWARD"),
    ("xclient", {"xclient": "ADDR LOGIN"}, "", "offers XCLIENT without HELO NAME PROTO"),
    ("xforward", {}, "", "smtpd_authorized_xforward_hosts"),
    ("off", BOTH, "", ""),
])
def test_select(mode: str, exts: dict[str, str], command: str, problem: str) -> None:
    m = fw.select(mode, exts)
    assert m.command == command
    assert (problem in m.problem) if problem else not m.problem
    if command:
        assert m.attrs >= fw.NEEDED


# --- plan ---------------------------------------------------------------------------------------

CLIENT = fw.Client("192.0.2.1", 4242, "mail.example.org", "ESMTP", "1A2B3C")


@pytest.mark.parametrize(("exts", "client", "want", "greeting"), [
    ({"xclient": POSTFIX_XCLIENT}, CLIENT,
     {"ADDR": "192.0.2.1", "NAME": "[UNAVAILABLE]", "PORT": "4242", "PROTO": "ESMTP",
      "HELO": "mail.example.org"}, ("EHLO", "mail.example.org")),
    ({"xclient": "NAME ADDR PROTO HELO"}, CLIENT,        # only what is listed
     {"ADDR": "192.0.2.1", "NAME": "[UNAVAILABLE]", "PROTO": "ESMTP",
      "HELO": "mail.example.org"}, ("EHLO", "mail.example.org")),
    ({"xclient": POSTFIX_XCLIENT}, fw.Client("2001:db8::1", 0, "", "SMTP", ""),
     {"ADDR": "IPV6:2001:db8::1", "NAME": "[UNAVAILABLE]", "PORT": "[UNAVAILABLE]",
      "PROTO": "SMTP", "HELO": "[UNAVAILABLE]"}, ("HELO", "[IPv6:2001:db8::1]")),
    ({"xclient": POSTFIX_XCLIENT}, fw.Client("192.0.2.1", 25, "h", "", ""),   # proto unknown
     {"ADDR": "192.0.2.1", "NAME": "[UNAVAILABLE]", "PORT": "25", "HELO": "h"}, ("EHLO", "h")),
    ({"xforward": POSTFIX_XFORWARD}, CLIENT,
     {"NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.1", "PORT": "4242", "PROTO": "ESMTP",
      "HELO": "mail.example.org", "IDENT": "1A2B3C", "SOURCE": "REMOTE"}, None),
    ({"xforward": POSTFIX_XFORWARD}, fw.Client("2001:db8::1"),
     {"NAME": "[UNAVAILABLE]", "ADDR": "IPV6:2001:db8::1", "PORT": "[UNAVAILABLE]",
      "PROTO": "[UNAVAILABLE]", "HELO": "[UNAVAILABLE]", "IDENT": "[UNAVAILABLE]",
      "SOURCE": "REMOTE"}, None),
    ({"xforward": "NAME ADDR PROTO HELO"}, CLIENT,       # Postfix 2.1: no IDENT, SOURCE, PORT
     {"NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.1", "PROTO": "ESMTP",
      "HELO": "mail.example.org"}, None),
])
def test_plan(exts: dict[str, str], client: fw.Client, want: dict[str, str],
              greeting: tuple[str, str] | None) -> None:
    p = fw.plan(fw.select("auto", exts), client)
    well_formed(p.lines)
    assert attributes(p.lines) == want
    assert p.greeting == greeting
    if greeting is not None:
        assert len(p.lines) == 1                # one XCLIENT: a second would be refused


EVIL = [
    "evil host=x+y <a@b> (c) \"q\";\\ " + "A" * 440,
    "=" * 500,
    "+" * 500,
    "\u00e9" * 500,
    "a\r\nMAIL FROM:<x@y>\r\nXCLIENT ADDR=6.6.6.6",
    " ",
    "\x00\x01\x02",
    "[UNAVAILABLE]",
]


@pytest.mark.parametrize("helo", EVIL)
@pytest.mark.parametrize("command", ["xclient", "xforward"])
def test_attacker_helo(helo: str, command: str) -> None:
    """Whatever the HELO: well-formed lines (printable ASCII, one space between tokens, at most
    LINE_MAX octets, each value's xtext at most VALUE_MAX), the client's address untouched, the
    HELO the same in the command and the greeting, and nothing Postfix would refuse or neuter
    further."""
    c = fw.client_of(env(helo=helo, peer_ip="2001:db8:ffff:ffff:ffff:ffff:ffff:fff1",
                         peer_port=65535, qid="Q" * 200))
    assert c is not None
    p = fw.plan(fw.select(command, BOTH), c)
    well_formed(p.lines)
    got = attributes(p.lines)
    assert got["ADDR"] == "IPV6:2001:db8:ffff:ffff:ffff:ffff:ffff:fff1"
    sent_helo = got["HELO"]
    assert 0 < len(sent_helo) <= 255 and not set(sent_helo) & fw.NEUTER
    assert re.fullmatch(r"[\x21-\x7e]+", sent_helo)
    if command == "xclient":
        assert len(p.lines) == 1 and p.greeting is not None
        verb, name = p.greeting
        assert verb == "EHLO" and re.fullmatch(r"[\x21-\x7e]+", name)
        assert name == (sent_helo if c.helo else "[IPv6:2001:db8:ffff:ffff:ffff:ffff:ffff:fff1]")


def test_xforward_splits_long_lines() -> None:
    """A long HELO and IDENT: XFORWARD in several lines (as Postfix's smtp client sends it),
    every attribute once, none over the limit."""
    c = fw.Client("2001:db8::1", 4242, "=" * 85, "ESMTP", "+" * 64)
    p = fw.plan(fw.select("xforward", BOTH), c)
    assert len(p.lines) >= 2
    well_formed(p.lines)
    assert set(attributes(p.lines)) == set(fw.XFORWARD_ATTRS)


def test_plan_of_nothing_is_a_bug() -> None:
    with pytest.raises(ValueError):
        fw.plan(fw.Method(), CLIENT)


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize(("relay", "text"), [
    ({"downstream": "smtp://127.0.0.1:25", "forward_client": "yes"}, "must be one of"),
    ({"downstream": "smtp://127.0.0.1:25", "forward_client": "XCLIENT"}, "must be one of"),
    ({"downstream": "lmtp:/run/lmtp.sock", "forward_client": "xclient"}, "needs an smtp://"),
    ({"downstream": "lmtp://127.0.0.1:24", "forward_client": "xforward"}, "needs an smtp://"),
])
def test_config_errors(tmp_path: Path, relay: dict[str, object], text: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        load_relay(tmp_path, **relay)
    assert e.value.key == "relay.forward_client" and text in e.value.message


@pytest.mark.parametrize(("relay", "want"), [
    ({"downstream": "smtp://127.0.0.1:25"}, "auto"),
    ({"downstream": "lmtp:/run/lmtp.sock"}, "auto"),
    ({"downstream": "lmtp:/run/lmtp.sock", "forward_client": "off"}, "off"),
    ({"downstream": "smtp://127.0.0.1:25", "forward_client": "xforward"}, "xforward"),
    ({"forward_client": "xclient"}, "xclient"),               # no relay at all: inert
])
def test_config_ok(tmp_path: Path, relay: dict[str, object], want: str) -> None:
    assert load_relay(tmp_path, **relay).relay.forward_client == want
