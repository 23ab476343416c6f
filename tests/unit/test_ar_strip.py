"""Forged Authentication-Results removal (workers.lane.headers.strip_forged_ar, RFC 8601 section 5):
the authserv-id parser (RFC 5322 CFWS with nested comments and quoted-pairs, RFC 2045 value) and
its bounds. Issue 9 item 3: the old parser stripped one level of nesting per pass (quadratic:
1 MiB of nested parentheses took about 40 minutes)."""

from __future__ import annotations

import pytest

from ingress.core.fields import ar_authserv_id as _authserv_id
from workers.lane.headers import MAX_AR_FIELD, strip_forged_ar

OURS = "mx.example.net"
MESSAGE = b"From: a@example.test\r\nSubject: s\r\n\r\nbody (((\r\n"


@pytest.mark.parametrize(("value", "expected"), [
    (b" mx.example.net; spf=pass", "mx.example.net"),
    (b"mx.example.net;spf=pass", "mx.example.net"),
    (b" MX.Example.NET 1; none", "mx.example.net"),
    (b" mx.example.net", "mx.example.net"),
    (b"\r\n\tmx.example.net;\r\n\tspf=pass", "mx.example.net"),          # folded
    (b" (c) mx.example.net; none", "mx.example.net"),
    (b" (a (b (c) b) a) mx.example.net; none", "mx.example.net"),          # nested
    (b" (a) (b)\r\n (c)mx.example.net; none", "mx.example.net"),          # several, folded
    (b" (a \\) still comment) mx.example.net; none", "mx.example.net"),   # quoted-pair
    (b" (a \\( not nested) mx.example.net; none", "mx.example.net"),
    (b" (a \\\\) mx.example.net; none", "mx.example.net"),                # escaped backslash
    (b" mx.example.net(trailing comment); none", "mx.example.net"),
    (b" mx.example.net (x); none", "mx.example.net"),
    (b' "mx.example.net"; none', "mx.example.net"),
    (b' "MX.example.net" ; none', "mx.example.net"),
    (b' (c) "mx.ex\\ample.net"; none', "mx.example.net"),                # quoted-pair in q-s
    (b' "mx.example.net; spf=pass', '"mx.example.net'),                   # unterminated q-s
    (b" mx.example.net.evil; spf=pass", "mx.example.net.evil"),
    (b" evil.mx.example.net; spf=pass", "evil.mx.example.net"),
    (b" other.example; spf=pass", "other.example"),
    (b" (mx.example.net) other.example; none", "other.example"),          # ours only in comment
    (b" (unterminated mx.example.net; none", ""),                         # all comment
    (b" (a (b) mx.example.net; none", ""),                                # unbalanced: comment
    (b" (a)) mx.example.net; none", ""),                                  # stray ')' ends it
    (b"", ""),
    (b"   ", ""),
    (b" ;spf=pass", ""),
])
def test_authserv_id(value: bytes, expected: str) -> None:
    assert _authserv_id(value) == expected


def field(value: bytes) -> bytes:
    return b"Authentication-Results:" + value + b"\r\n"


@pytest.mark.parametrize(("headers", "kept"), [
    (field(b" (x) mx.example.net; dkim=pass"), b""),
    (field(b" (" * 50 + b"x" + b")" * 50 + b" mx.example.net; dkim=pass"), b""),
    (field(b" (" * 50 + b"x" + b")" * 50 + b" other.example; dkim=pass"),) * 2,
    (field(b" (mx.example.net) other.example; none"),) * 2,
    # Longer than any real A-R field: removed without parsing (RFC 8601 section 5 allows
    # removing any A-R; one this big could only be hiding something).
    (field(b" other.example; dkim=pass (" + b"x" * MAX_AR_FIELD + b")"), b""),
    (b"X-Other: " + b"x" * MAX_AR_FIELD + b"\r\n",) * 2,                  # other fields: kept
])
def test_strip_table(headers: bytes, kept: bytes) -> None:
    assert strip_forged_ar(headers + MESSAGE, OURS) == kept + MESSAGE


@pytest.mark.timeout(20)
def test_megabyte_of_nested_parentheses_is_parsed_linearly() -> None:
    """1 MiB of nested comments hiding our id: the old parser needed ~40 minutes (a hang guard,
    not a speed target; bench/ measures speed)."""
    depth = 512 * 1024
    value = b" " + b"(" * depth + b")" * depth + b" mx.example.net; dkim=pass"
    assert _authserv_id(value) == OURS
    assert _authserv_id(b" " + b"(" * depth + b" mx.example.net; dkim=pass") == ""
    escaped = b" (" + b"\\(" * depth + b") mx.example.net; none"
    assert _authserv_id(escaped) == OURS


@pytest.mark.timeout(20)
def test_many_big_forged_fields_are_all_removed() -> None:
    """Every forged field goes, however many and however deeply nested (each one just under
    the field bound, about 1 MiB in all)."""
    half = (MAX_AR_FIELD - 100) // 2
    forged = field(b" " + b"(" * half + b")" * half + b" mx.example.net; dkim=pass")
    other = field(b" other.example; dkim=pass")
    msg = (forged + other) * 64 + MESSAGE
    assert len(forged) <= MAX_AR_FIELD + 30
    assert strip_forged_ar(msg, OURS) == other * 64 + MESSAGE
