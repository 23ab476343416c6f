"""The relay's downstream MTA address: `relay.downstream` parsed, for the relay and the callout.

API: parse_downstream(url) -> Target   'smtp://host:port' | 'lmtp://host:port' | 'lmtp:/socket'
     Target(proto, host, port, path)  str() gives the URL back; .mta_name names it in replies
Failure modes: ValueError naming the URL for anything else (config validation turns it into a
ConfigError naming relay.downstream). Pure; imports nothing else of ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Target:
    proto: Literal["smtp", "lmtp"]
    host: str = ""
    port: int = 0
    path: str = ""              # unix socket (LMTP only)

    def __str__(self) -> str:
        return f"{self.proto}:{self.path}" if self.path else f"{self.proto}://{self.host}:{self.port}"

    @property
    def mta_name(self) -> str:
        return self.path or self.host


def parse_downstream(url: str) -> Target:
    """'smtp://host:port' | 'lmtp://host:port' | 'lmtp:/path/socket' -> Target (ValueError)."""
    m = re.fullmatch(r"(smtp|lmtp)://\[?([^\]/]+?)\]?:(\d{1,5})", url)
    if m:
        port = int(m.group(3))
        if not 0 < port < 65536:
            raise ValueError(f"bad port in {url!r}")
        return Target(m.group(1), m.group(2), port)  # type: ignore[arg-type]
    if url.startswith("lmtp:/") and not url.startswith("lmtp://"):
        return Target("lmtp", path=url[len("lmtp:"):])
    raise ValueError(f"relay.downstream {url!r}: want smtp://host:port, lmtp://host:port or "
                     "lmtp:/path/socket")
