"""admission.fd_capped (slots the fd limit allows) and replies.clean (reply lines): tables."""

from __future__ import annotations

import pytest

from ingress.policy.admission import FD_SPARE, fd_capped
from ingress.policy.replies import MAX_REPLY_LINE, clean


@pytest.mark.parametrize(("max_c", "reserve", "nofile", "want"), [
    (1000, 100, 0, (1000, 100)),                   # unknown limit: no cap
    (1000, 100, 1000 + FD_SPARE, (1000, 100)),     # exactly enough
    (1000, 100, 1 << 20, (1000, 100)),
    (1000, 100, 160, (96, 9)),                     # the chaos test's prlimit
    (1000, 100, FD_SPARE + 1, (1, 0)),
    (1000, 100, 10, (1, 0)),                       # below the spare: still one slot
    (10, 9, 20 + FD_SPARE - 10, (10, 9)),
    (100, 99, FD_SPARE + 50, (50, 49)),            # the reserve never takes every slot
])
def test_fd_capped(max_c: int, reserve: int, nofile: int, want: tuple[int, int]) -> None:
    assert fd_capped(max_c, reserve, nofile) == want


@pytest.mark.parametrize(("line", "want"), [
    ("250 OK", "250 OK"),
    ('500 Error: command "X\x00Y" not recognized', '500 Error: command "X\\x00Y" not recognized'),
    ('500 Error: command "\x1b[2J" not recognized', '500 Error: command "\\x1b[2J" not recognized'),
    ("500 \r\x00", "500 \\x0d\\x00"),
    ("500 a\nb\x7f\x85", "500 a\\x0ab\\x7f\\x85"),
    ("502 Could not VRFY [\udcff", "502 Could not VRFY [\\xff"),     # surrogateescape byte
    ("502 x\ud800y", "502 x?y"),                                      # other lone surrogate
    ("250 tab\tand ü", "250 tab\tand ü"),
])
def test_clean(line: str, want: str) -> None:
    assert clean(line) == want


@pytest.mark.parametrize("line", ["250 " + "a" * 600, "250 " + "ü" * 300, "250 " + "日" * 200])
def test_clean_caps_at_512_octets_without_splitting_utf8(line: str) -> None:
    out = clean(line).encode("utf-8")      # would raise on a split sequence (no surrogates)
    assert len(out) + 2 <= MAX_REPLY_LINE and len(out) >= MAX_REPLY_LINE - 2 - 3
    assert line.encode().startswith(out)
