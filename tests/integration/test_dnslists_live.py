"""The DNS lists end to end: a real ingress asks the loopback DNS server about its clients
(loopback source addresses are different clients). A DNS-allow-listed sender is fast from
connect, before MAIL FROM, and its message carries RFC 8904's dnswl=pass; a block-listed bot
above dnsbl.reject_threshold gets 554 at connect; a zone answering 127.255.255.254 changes
nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, send_one, short_message, smtp_dialogue, split_trace
from tests.kit.scrape import metrics_port, scrape, value

WL_IP = "127.0.0.81"           # wl.test lists it (trust medium); no other evidence
BOT_IP = "127.0.0.82"          # bl.test and two.test list it: above reject_threshold
ERR_IP = "127.0.0.83"          # err.test answers 127.255.255.254 for it (an error code)
PLAIN_IP = "127.0.0.84"        # listed nowhere


def rev(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    records = {f"2.0.0.127.{z}": {"A": ["127.0.0.2"]}
               for z in ("wl.test", "bl.test", "two.test", "err.test")}
    records.update({
        f"{rev(WL_IP)}.wl.test": {"A": ["127.0.10.2"], "TXT": ["https://wl.test/q?ip=81"]},
        f"{rev(BOT_IP)}.bl.test": {"A": ["127.0.0.2"]},
        f"{rev(BOT_IP)}.two.test": {"A": ["127.0.0.2"]},
        f"{rev(ERR_IP)}.err.test": {"A": ["127.255.255.254"]},
    })
    with DNSServer(records) as server:
        yield server


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer) -> Iterator[Ingress]:
    with Ingress(tmp_path_factory.mktemp("dnslists"), {
        "classify": {"nameservers": [dns.address], "dns_timeout": 1.0},
        "metrics": {"listen": "127.0.0.1:0"},
        "dnswl": {"sites": ["wl.test=127.0.[2..15].[0..3]"]},
        "dnsbl": {"sites": ["bl.test*2", "two.test*2", "err.test*9"], "threshold": 2,
                  "reject_threshold": 4},
    }) as ing:
        yield ing


def lane_and_trace(ing: Ingress, subject: str) -> tuple[str, str, bytes]:
    for entry in ing.spooled().values():
        trace, body = split_trace(entry.message)
        if f"Subject: {subject}\r\n".encode() in body:
            ev = entry.envelope.get("evidence") or {}
            return str(entry.envelope["lane"]), str(ev.get("identity", "")), \
                trace.get("Authentication-Results", b"")
    raise AssertionError(f"{subject!r} not spooled")


def test_an_allow_listed_sender_is_fast_from_connect(ingress: Ingress) -> None:
    mport = metrics_port(ingress)

    async def before_mail_from() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", ingress.port,
                                                       local_addr=(WL_IP, 0))
        try:
            banner = await asyncio.wait_for(reader.readline(), 10)
            assert banner.startswith(b"220"), banner
            m = await asyncio.to_thread(scrape, mport)
            return value(m, "smtp_ingress_check_results_total", check="dnswl",
                         outcome="promote")
        finally:
            writer.close()

    assert asyncio.run(before_mail_from()) >= 1        # promoted before it said a word
    promoted = [e for e in ingress.events("promoted") if e.get("peer") == WL_IP]
    assert promoted and (promoted[0]["stage"], promoted[0]["identity"]) == (
        "connect", "dnswl:wl.test")
    code, _ = asyncio.run(send_one(ingress.port, short_message("wl", sender="x@nowhere.test"),
                                   sender="x@nowhere.test", source=WL_IP))
    assert code == 250
    lane, identity, ar = lane_and_trace(ingress, "wl")
    assert (lane, identity) == ("fast", "dnswl:wl.test")
    assert b"dnswl=pass dns.zone=wl.test policy.ip=127.0.10.2" in ar
    assert b'policy.txt="https://wl.test/q?ip=81"' in ar


def test_a_block_listed_bot_is_refused_at_connect(ingress: Ingress) -> None:
    replies = asyncio.run(smtp_dialogue(ingress.port, [b"EHLO bot.test\r\n"], source=BOT_IP))
    assert replies[0].startswith("554 5.7.1"), replies
    assert "bl.test" in replies[0] and "two.test" in replies[0]
    lines = [e for e in ingress.events("dnsbl_reject") if e.get("peer") == BOT_IP]
    assert lines and lines[0]["zones"] == "bl.test,two.test"


def test_an_error_code_changes_nothing(ingress: Ingress) -> None:
    for ip, subject in ((ERR_IP, "err"), (PLAIN_IP, "plain")):
        code, _ = asyncio.run(send_one(ingress.port, short_message(subject,
                                                                   sender="x@nowhere.test"),
                                       sender="x@nowhere.test", source=ip))
        assert code == 250
        lane, identity, ar = lane_and_trace(ingress, subject)
        assert (lane, identity) == ("bulk", "") and b"dnswl" not in ar
    off = [e for e in ingress.events("dnslist_zone") if e.get("zone") == "err.test"]
    assert off and off[0]["state"] == "off" and off[0]["why"] == "error_code"
