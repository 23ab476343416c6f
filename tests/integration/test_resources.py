"""Resources and configuration (issue 9, items 5, 7, 9, 10) through the real processes.

- PROXY protocol: per listener; the greet pause starts after the PROXY header, and only talk
  after the header and before our banner makes an early talker.
- The stress idle timer does not cut a session waiting for its worker's ack.
- DATA costs about the message size; bulk DATA is bounded per acceptor (452 4.3.1).
- The mutual-TLS port counts a connection against max_connections before its handshake.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.harness import Ingress

PROXY_V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"


async def raw_banner(port: int, first: bytes = b"", *, wait: float = 5.0,
                     then: bytes = b"") -> str:
    """Connect, send `first` at once (e.g. a PROXY header), optionally `then` right after,
    and return the first reply line (or 'EOF')."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if first:
            writer.write(first)
        if then:
            writer.write(then)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), wait)
        return line.decode(errors="replace").rstrip("\r\n") or "EOF"
    except (ConnectionError, TimeoutError) as e:
        return f"ERR {type(e).__name__}"
    finally:
        writer.close()


def test_proxy_header_is_not_early_talk(tmp_path: Path) -> None:
    """Behind a balancer with greet_pause: the PROXY header is not the client talking; the
    client that waits gets our banner, the one that talks right after the header is an early
    talker (554), judged from the header on."""
    with Ingress(tmp_path, {
        "listen": {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]},
        "admission": {"greet_pause": 0.5, "penalty": 60.0},
    }) as ing:
        patient = asyncio.run(raw_banner(ing.port, PROXY_V1))
        header2 = PROXY_V1.replace(b"192.0.2.7", b"192.0.2.8")
        talker = asyncio.run(raw_banner(ing.port, header2, then=b"EHLO bot.test\r\n"))
        again = asyncio.run(raw_banner(ing.port, PROXY_V1))       # not penalised
    assert patient.startswith("220 "), patient
    assert talker.startswith("554 "), talker
    assert again.startswith("220 "), again


def test_proxy_protocol_is_per_listener(tmp_path: Path) -> None:
    """listen.proxy_protocol is for listen.port only: the fast port serves direct clients
    unless listen.fast_port_proxy_protocol says it is behind the balancer too."""
    with Ingress(tmp_path, {
        "listen": {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"], "fast_port": 0},
        "classify": {"allow_cidrs": ["127.0.0.1/32"]},
    }) as ing:
        fast_port = int(ing.events("ready")[-1]["fast_port"])
        direct_fast = asyncio.run(raw_banner(fast_port))
        behind = asyncio.run(raw_banner(ing.port, PROXY_V1))
    assert direct_fast.startswith("220 "), direct_fast
    assert behind.startswith("220 "), behind


def test_fast_port_proxy_protocol_key(tmp_path: Path) -> None:
    with Ingress(tmp_path, {
        "listen": {"trusted_proxies": ["127.0.0.1/32"], "fast_port": 0,
                   "fast_port_proxy_protocol": True},
        "classify": {"allow_cidrs": ["127.0.0.1/32", "192.0.2.9/32"]},
    }) as ing:
        fast_port = int(ing.events("ready")[-1]["fast_port"])
        plain = asyncio.run(raw_banner(ing.port))
        via = asyncio.run(raw_banner(fast_port, PROXY_V1.replace(b"192.0.2.7", b"192.0.2.9")))
        not_fast = asyncio.run(raw_banner(fast_port, PROXY_V1))   # 192.0.2.7: not allow-listed
    assert plain.startswith("220 "), plain
    assert via.startswith("220 "), via
    assert not_fast.startswith("554 5.7.1"), not_fast
