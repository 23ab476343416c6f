"""The connect stage's timing with real processes: a client promoted by a DNS allow list skips
the rest of the greet pause (it is for bulk clients), an unlisted one still waits it out, and a
bulk client's FCrDNS waits for it to speak (a silent bot costs no lookup)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, eventually

PAUSE = 3.0                    # admission.greet_pause: long, so that skipping it shows
WL_IP = "127.0.0.91"           # listed in wl.test
PLAIN_IP = "127.0.0.92"        # listed nowhere
SILENT_IP = "127.0.0.93"       # says nothing after the banner, then EHLO


def rev(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer({
        "2.0.0.127.wl.test": {"A": ["127.0.0.2"]},
        f"{rev(WL_IP)}.wl.test": {"A": ["127.0.10.2"]},
        f"{rev(SILENT_IP)}.in-addr.arpa": {"PTR": ["mx.silent.test."]},
        "mx.silent.test": {"A": [SILENT_IP]},
    }) as server:
        yield server


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer) -> Iterator[Ingress]:
    with Ingress(tmp_path_factory.mktemp("connect-checks"), {
        "classify": {"nameservers": [dns.address], "dns_timeout": 1.0},
        "admission": {"greet_pause": PAUSE},
        "dnswl": {"sites": ["wl.test=127.0.[2..15].[0..3]"]},
    }) as ing:
        yield ing


async def banner_after(port: int, source: str) -> float:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        line = await asyncio.wait_for(reader.readline(), PAUSE + 10)
        assert line.startswith(b"220"), line
        return time.monotonic() - t0
    finally:
        writer.close()


def test_a_client_promoted_at_connect_skips_the_greet_pause(ingress: Ingress) -> None:
    assert asyncio.run(banner_after(ingress.port, WL_IP)) < PAUSE - 1.0
    assert asyncio.run(banner_after(ingress.port, PLAIN_IP)) >= PAUSE - 0.2


def test_a_silent_bulk_client_costs_no_fcrdns_lookup(ingress: Ingress, dns: DNSServer) -> None:
    ptr = f"{rev(SILENT_IP)}.in-addr.arpa"

    async def silent_then_ehlo() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", ingress.port,
                                                       local_addr=(SILENT_IP, 0))
        try:
            banner = await asyncio.wait_for(reader.readline(), PAUSE + 10)
            assert banner.startswith(b"220"), banner
            await asyncio.sleep(1.0)           # silent after the banner: no PTR query yet
            assert not [q for q in dns.queries if q[0] == ptr], dns.queries
            writer.write(b"EHLO silent.test\r\n")
            await writer.drain()
            while not (await asyncio.wait_for(reader.readline(), 10)).startswith(b"250 "):
                pass
            assert await asyncio.to_thread(
                eventually, lambda: any(q[0] == ptr for q in dns.queries)), dns.queries
        finally:
            writer.close()

    asyncio.run(silent_then_ehlo())
