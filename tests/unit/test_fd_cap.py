"""derived.fd_capped and connection_limit (slots the fd limit and memory allow) and replies.clean
(reply lines): tables."""

from __future__ import annotations

import dataclasses

import pytest

from ingress.core import derived
from ingress.core.config import Config
from ingress.core.derived import FD_SPARE, connection_limit, fd_capped
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


# connection_limit: smtp.max_connections (0 = auto), the fd limit, smtp.connection_memory.
@pytest.mark.parametrize(("max_c", "reserve", "nofile", "memory", "want"), [
    (1000, 100, 0, 0, (1000, 100, "config")),                  # explicit, fd unknown
    (1000, 100, 160, 0, (96, 9, "fd")),                        # explicit, cut by the fd limit
    (1000, 0, 0, 0, (1000, 100, "config")),                    # reserve 0: a tenth
    (0, 0, 20000, 256 << 20, (20000 - FD_SPARE, 1993, "fd")),  # auto, fd below memory
    (0, 0, 1 << 20, 256 << 20, (32768, 3276, "memory")),       # auto, memory below fd
    (0, 0, 0, 256 << 20, (32768, 3276, "memory")),             # auto, fd unknown
    (0, 500, 1 << 20, 256 << 20, (32768, 500, "memory")),      # auto, explicit reserve kept
    (0, 0, 10, 256 << 20, (1, 0, "fd")),                       # below the spare: one slot
    (0, 0, 1 << 20, 1, (1, 0, "memory")),                      # tiny budget: one slot
    (0, 5000, 0, 8 * 1024 * 100, (100, 99, "memory")),         # reserve below the limit
])
def test_connection_limit(max_c: int, reserve: int, nofile: int, memory: int,
                          want: tuple[int, int, str]) -> None:
    lim = connection_limit(max_c, reserve, nofile, memory)
    assert (lim.max_connections, lim.fast_reserve, lim.limited_by) == want


def test_mtls_parking_fits_in_the_fd_limit() -> None:
    """Clients parked before their ClientHello (ingress.edge.mtls) hold descriptors but no
    slot: an acceptor asks for PARK_FDS more per mTLS address, keeps them out of the slots the
    fd limit allows (so an fd-limited acceptor still parks), and parks only what its fd limit
    leaves beside its slots, FD_SPARE and the DNS sockets."""
    base = Config()
    plain = dataclasses.replace(base, smtp=dataclasses.replace(base.smtp, max_connections=1000))
    cfg = dataclasses.replace(plain, tls=dataclasses.replace(
        plain.tls, mtls_addresses=("127.0.0.1:0", "[::1]:0")))
    assert derived.fds_needed(cfg) == derived.fds_needed(plain) + 2 * derived.PARK_FDS
    dns = derived.dns_fds(cfg)
    assert derived.park_fds(cfg, 0, 1000) == derived.PARK_FDS               # unknown limit
    assert derived.park_fds(cfg, 1000 + derived.FD_SPARE + dns + 100, 1000) == 50
    assert derived.park_fds(cfg, 1000 + derived.FD_SPARE + dns, 1000) == 0
    assert derived.park_fds(cfg, 10**6, 1000) == derived.PARK_FDS
    auto = dataclasses.replace(cfg, smtp=dataclasses.replace(cfg.smtp, max_connections=0))
    limit = derived.configured_limit(auto, 20000)          # limited by the fd limit
    assert limit.limited_by == "fd"
    assert derived.park_fds(auto, 20000, limit.max_connections) == derived.PARK_FDS
