"""A message's header section as fields: find them, read their values, read an A-R authserv-id.

Purpose
    The one parser of a header section, shared by the lane (DKIM, forged A-R stripping, trace
    headers) and the relay (the headers a DSN quotes). Pure: bytes in, spans and text out.

API
    header_fields(message) -> list[(start, end, lower-cased name)]   the header section's fields
    field_value(raw) -> bytes       the value of one field's raw bytes (after the first colon)
    unfold(value) -> str            continuation lines joined, decoded, stripped
    ar_authserv_id(value) -> str    the authserv-id of an Authentication-Results value,
                                    lower-cased; "" when there is none

Failure modes
    None raised for message content: a header section that does not parse ends where the
    parse stops (as Postfix does: that line starts the body).

Limits
    header_fields looks only at the header section (up to the first empty line or the first
    line that is neither a field nor a continuation). ar_authserv_id is linear in the value's
    length (CFWS with nested comments and quoted-pairs).
"""

from __future__ import annotations

import re

__all__ = ["ar_authserv_id", "field_value", "header_fields", "unfold"]


_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def header_fields(message: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, lower-cased name) byte spans of each header field, continuations included.

    Stops at the first empty line or at the first line that is neither a field nor a
    continuation (as Postfix does: that line starts the body).
    """
    fields: list[tuple[int, int, bytes]] = []
    pos = 0
    n = len(message)
    start, name = -1, b""              # the field being read (start -1: none yet)
    while pos < n:
        nl = message.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        line = message[pos:end]
        if line in (b"\r\n", b"\n"):
            break
        if not (line[:1] in (b" ", b"\t") and start >= 0):
            m = _FIELD.match(line)
            if not m:
                break
            if start >= 0:
                fields.append((start, pos, name))
            start, name = pos, m.group(1).lower()
        pos = end
    if start >= 0:
        fields.append((start, pos, name))
    return fields


def field_value(raw: bytes) -> bytes:
    return raw.split(b":", 1)[1]


def unfold(value: bytes) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value.decode("utf-8", "replace")).strip()


_WSP = re.compile(r"[ \t\r\n]*")
_COMMENT_PART = re.compile(r"\\.|[()]", re.S)       # a quoted-pair, or a parenthesis
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_ID_END = re.compile(r"[\s;]")
# RFC 2045 token: no SPACE, CTLs or tspecials (non-ASCII is let through, RFC 6532).
_TOKEN = re.compile(r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+')


def _skip_cfws(text: str, i: int) -> int:
    """Index after the CFWS at text[i] (RFC 5322 3.2.2: nested comments, quoted-pairs).

    One left-to-right pass; an unterminated comment runs to the end of the text."""
    n = len(text)
    while i < n:
        i = _WSP.match(text, i).end()  # type: ignore[union-attr]
        if i >= n or text[i] != "(":
            return i
        depth = 0
        for m in _COMMENT_PART.finditer(text, i):
            c = m.group()
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    i = m.end()
                    break
        else:
            return n
    return i


def ar_authserv_id(value: bytes) -> str:
    """The authserv-id of an A-R field value (RFC 8601: [CFWS] value, value being an RFC 2045
    token or quoted-string), lower-cased; "" when there is none. Linear in len(value)."""
    text = value.decode("utf-8", "replace")
    i = _skip_cfws(text, 0)
    m = _QUOTED.match(text, i)
    if m:
        return _QUOTED_PAIR.sub(r"\1", _FOLD.sub("", m.group(1))).strip().lower()
    if text.startswith('"', i):       # unterminated quoted-string: not a valid id
        end = _ID_END.search(text, i)
        return text[i:end.start() if end else len(text)].lower()
    m = _TOKEN.match(text, i)
    return m.group().lower() if m else ""
