"""ingress.core.headers: the one header-text sanitiser and its quoting helpers (table-driven)."""

from __future__ import annotations

import re

import pytest

from ingress.core.headers import comment_text, quoted_value, sanitise

TOKEN = re.compile(r"^[A-Za-z0-9.\-]+$")


@pytest.mark.parametrize("text,repl,printable,want", [
    ("plain", " ", False, "plain"),
    (" a\r\nX-Evil: 1 ", " ", False, "a  X-Evil: 1"),
    ("a\x00b\x7fc", "", False, "abc"),
    ("a b\tc", "?", True, "a?b?c"),
    ("h\u00e9lo", "?", True, "h?lo"),
    ("\r\n", " ", False, ""),
    ("caf\u00e9", " ", False, "caf\u00e9"),
])
def test_sanitise(text: str, repl: str, printable: bool, want: str) -> None:
    assert sanitise(text, repl, printable=printable) == want


@pytest.mark.parametrize("text,repl,want", [
    ("mx.example", "", "mx.example"),
    ("a b", "", '"a b"'),
    ('a"b\\c', "", '"a\\"b\\\\c"'),
    ("x\r\ny", "", "xy"),
    ("x\r\ny", " ", '"x  y"'),
    ("", "", '""'),
])
def test_quoted_value(text: str, repl: str, want: str) -> None:
    assert quoted_value(text, TOKEN, repl) == want


@pytest.mark.parametrize("text,want", [
    ("ok", "ok"),
    ("a (b) c\\", "a \\(b\\) c\\\\"),
    ("x\r\n(y", "x  \\(y"),
])
def test_comment_text(text: str, want: str) -> None:
    assert comment_text(text) == want
