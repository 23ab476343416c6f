"""The flood generator's loopback targets, source addresses, descriptor limit and percentiles.

API
    Target.parse(text) -> Target (loopback only); check_source(addr, target); bot_address(role, i);
    ensure_fd_limit(needed, what) -> (soft, hard), FdLimitError; percentile_nearest_rank(values, p);
    bump(counter, key, n)

Failure modes and limits: those of the whole generator, in the package docstring
(bench/flood/__init__.py), with the accounting definitions.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ingress.core import procs

FD_MARGIN = 64  # descriptors kept for the interpreter, pipes, logs
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MAX_REPLY_LINES = 100
MAX_LINE = 4096
CHILD_LINE_LIMIT = 256 * 1024 * 1024  # a child's result line holds every bot's held_s sample

# --------------------------------------------------------------------------------------------
# Targets, addresses, limits


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.version == 4:
        return ip in ipaddress.ip_network("127.0.0.0/8")
    return ip == ipaddress.ip_address("::1")


@dataclass(frozen=True)
class Target:
    """A loopback SMTP endpoint. ``parse`` accepts ``HOST:PORT`` or ``[::1]:PORT``."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not _is_loopback(self.host):
            raise ValueError(f"refusing target {self.host!r}: loopback only (127.0.0.0/8, ::1)")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @classmethod
    def parse(cls, text: str) -> Target:
        text = text.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = text.rpartition(":")
        if host == "localhost":
            host = "127.0.0.1"
        if not host or not port.isdigit():
            raise ValueError(f"bad target {text!r}: expected HOST:PORT")
        return cls(host, int(port))

    def with_port(self, port: int | None) -> Target:
        return self if not port else Target(self.host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def check_source(addr: str | None, target: Target) -> None:
    """Refuse a source address that is not loopback or not of the target's family."""
    if addr is None:
        return
    if not _is_loopback(addr):
        raise ValueError(f"refusing source address {addr!r}: loopback only")
    if (":" in addr) != (":" in target.host):
        raise ValueError(f"source {addr!r} and target {target.host!r} differ in address family")


def bot_address(role_octet: int, index: int) -> str:
    """Distinct source address number ``index`` of a role: 127.<role>.<x>.<y>, y in 1..254."""
    if not 0 <= index < 256 * 254:
        raise ValueError(f"bot index {index} out of range for 127.{role_octet}.0.0/16")
    return f"127.{role_octet}.{index // 254}.{index % 254 + 1}"


class FdLimitError(RuntimeError):
    """The configured sockets cannot fit in the file-descriptor limits."""


def ensure_fd_limit(needed: int, what: str = "") -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; raise FdLimitError if ``needed`` won't fit.

    ``needed`` is the number of descriptors this process will hold at once (sockets + margin).
    Also checks the system-wide table (/proc/sys/fs/file-max minus allocated). Returns the
    (soft, hard) pair in force afterwards.
    """
    soft, hard = procs.raise_nofile(needed)
    detail = f" ({what})" if what else ""
    if needed > soft:
        raise FdLimitError(
            f"refusing to start: need {needed} file descriptors{detail} but RLIMIT_NOFILE is "
            f"soft={soft} hard={hard} after raising soft to hard; raise the hard limit "
            f"(ulimit -Hn, systemd LimitNOFILE=) or configure fewer sockets"
        )
    try:
        allocated, _, file_max = (int(x) for x in Path("/proc/sys/fs/file-nr").read_text().split())
    except (OSError, ValueError):
        return soft, hard
    if needed > file_max - allocated:
        raise FdLimitError(
            f"refusing to start: need {needed} file descriptors{detail} but the system has only "
            f"{file_max - allocated} free (fs.file-max={file_max}, allocated={allocated})"
        )
    return soft, hard


def percentile_nearest_rank(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: sorted(values)[ceil(p/100*N) - 1]; p=0 gives the minimum.

    Returns None for an empty sample. Always an observed value, never interpolated.
    """
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(round(p / 100 * len(ordered), 9)))  # round: 99.9% of 1000 is 999
    return ordered[rank - 1]


def bump(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n
