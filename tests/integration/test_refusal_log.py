"""Every refusal and shed is logged, naming the client, and a flood of them cannot fill the disk
(issue 19, item 9: "nothing is logged for 451 sheds, per-IP 421s or penalty 421s").

A real ingress on loopback, the log throttle on (log.throttle_*: the harness turns it off for
the other tests, which count lines from one address), clients from several loopback addresses:
- an early talker (554), then its penalty (421 at connect), a per-IP limit (421 at connect),
  a bad argument (501), a relay attempt (550), an unknown command (500), a bulk transaction
  shed at its first RCPT (451), a lobby seat that never speaks (421 at the idle timeout): each
  gives a line with the client's address and port, the stage, the reply code and a reason;
- a flood of one refusal from one network gives at most log.throttle_lines lines a window,
  and the next line says how many were left out (none is lost from the count).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.harness import Ingress, make_body, send_one, smtp_dialogue

pytestmark = pytest.mark.timeout(120)

IDLE = 3.0


async def talk(port: int, source: str, lines: list[bytes], *, early: bool = False,
               timeout: float = 10.0) -> tuple[list[str], int]:
    """Connect from `source`; `early`: send the first line before the banner. Each line is
    sent after the previous reply. Returns (the replies, banner first; our source port)."""
    sport: list[int] = []
    out = await smtp_dialogue(port, lines, read_timeout=timeout, wait_banner=not early,
                              source=source, local_port=sport)
    return out, sport[0]


async def hold(port: int, source: str, n: int) -> list[tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter, int]]:
    """n connections from `source` that read their banner and stay silent."""
    out = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        assert (await asyncio.wait_for(r.readline(), 10)).startswith(b"220")
        out.append((r, w, w.get_extra_info("sockname")[1]))
    return out


def lines_of(ing: Ingress, event: str, **match: Any) -> list[dict[str, Any]]:
    return [d for d in ing.events(event) if all(d.get(k) == v for k, v in match.items())]


def one_line(ing: Ingress, event: str, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while not (found := lines_of(ing, event, **match)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found, (event, match, ing.log_tail(40))
    return found[-1]


THROTTLE_ON = {"throttle_interval": 60.0, "throttle_lines": 5, "throttle_total": 300}


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingress]:
    with Ingress(tmp_path_factory.mktemp("refusals"), {
            "supervisor": {"acceptors": 1},
            "smtp": {"idle_timeout": IDLE, "ack_timeout": 2.0},
            "classify": {"dkim_deadline": 1.0},
            "admission": {"greet_pause": 0.3, "per_ip_bulk_max": 2, "shed_delay": 0.0},
            "lanes.bulk": {"rate": 0.02, "burst": 1},
            "log": THROTTLE_ON}) as ing:
        yield ing


EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<alice@sender.test>\r\n"


def test_every_refusal_names_the_client(ingress: Ingress) -> None:
    port = ingress.port

    # an early talker: 554 at the greet pause; then its penalty: 421 at connect
    r, sport = asyncio.run(talk(port, "127.0.0.2", [EHLO], early=True))
    assert r[0].startswith("554 5.5.0"), r
    line = one_line(ingress, "early_talker", peer="127.0.0.2")
    assert (line["port"], line["stage"], line["code"], line["reason"]) == (
        sport, "greet", "554", "early_talker")
    r, sport = asyncio.run(talk(port, "127.0.0.2", []))
    assert r[0].startswith("421 4.7.0"), r
    line = one_line(ingress, "connection_refused", peer="127.0.0.2")
    assert (line["port"], line["stage"], line["code"], line["reason"]) == (
        sport, "connect", "421", "penalised")

    # the per-IP limit (admission.per_ip_bulk_max 2): the third connection gets 421
    async def per_ip() -> tuple[list[str], int, list[int]]:
        held = await hold(port, "127.0.0.3", 2)
        try:
            r, sport = await talk(port, "127.0.0.3", [])
        finally:
            await asyncio.sleep(IDLE + 1.0)      # the held seats reach the idle timeout
            for _, w, _ in held:
                w.close()
        return r, sport, [p for _, _, p in held]

    r, sport, held_ports = asyncio.run(per_ip())
    assert r[0].startswith("421 4.7.0"), r
    line = one_line(ingress, "connection_refused", peer="127.0.0.3")
    assert (line["port"], line["stage"], line["code"], line["reason"]) == (
        sport, "connect", "421", "per-ip")
    # ... and the seats that never spoke were cut at the idle timeout by the lobby
    idle = lines_of(ingress, "idle_timeout", peer="127.0.0.3")
    assert sorted(d["port"] for d in idle) == sorted(held_ports), ingress.log_tail(40)
    assert all((d["stage"], d["code"]) == ("banner", "421") for d in idle), idle

    # bad commands: a NUL in RCPT (501), a relay attempt (550), an unknown verb (500)
    r, sport = asyncio.run(talk(port, "127.0.0.4", [
        EHLO, MAIL, b"RCPT TO:<n\x00l@example.test>\r\n", b"RCPT TO:<x@elsewhere.test>\r\n",
        b"FOO\r\n", b"QUIT\r\n"]))
    assert r[3].startswith("501 5.5.2") and r[4].startswith("550 5.7.1"), r
    assert r[5].startswith("500"), r
    for event, stage, code, reason in (("bad_argument", "rcpt", "501", "nul"),
                                       ("relay_denied", "rcpt", "550", "relay_denied"),
                                       ("command_error", "command", "500", "protocol")):
        line = one_line(ingress, event, peer="127.0.0.4")
        assert (line["port"], line["stage"], line["code"], line["reason"]) == (
            sport, stage, code, reason), line

    # a bulk transaction over the bulk cap (lanes.bulk.rate, burst 1): 451 at its first RCPT
    code, _ = asyncio.run(send_one(port, make_body(1), source="127.0.0.5"))
    assert code == 250
    r, sport = asyncio.run(talk(port, "127.0.0.5", [
        EHLO, MAIL, b"RCPT TO:<bob@example.test>\r\n", b"QUIT\r\n"]))
    assert r[3].startswith("451 4.7.1"), r
    line = one_line(ingress, "shed", peer="127.0.0.5")
    assert (line["port"], line["stage"], line["code"], line["reason"]) == (
        sport, "rcpt", "451", "rcpt_cap"), line

    # one vocabulary: every refusal line has them all
    refusals = [d for d in ingress.log_lines() if "code" in d and "stage" in d]
    assert refusals
    for d in refusals:
        assert d["peer"].startswith("127.0.0.") and d["reason"] and "not_logged" in d, d


@pytest.fixture
def flooded(tmp_path: Path) -> Iterator[Ingress]:
    with Ingress(tmp_path, {
            "supervisor": {"acceptors": 1},
            "admission": {"per_ip_bulk_max": 1},
            "log": {"throttle_interval": 4.0, "throttle_lines": 3, "throttle_total": 300}}) as ing:
        yield ing


FLOOD = 60


def test_a_flood_of_one_refusal_is_bounded(flooded: Ingress) -> None:
    """60 connections over the per-IP limit from one /24 (two addresses in it): at most 3
    lines a 4 s window; the line after the window carries the count left out."""
    port = flooded.port

    async def flood() -> float:
        held = await hold(port, "127.0.0.7", 1) + await hold(port, "127.0.0.8", 1)
        t0 = time.monotonic()
        try:
            for i in range(FLOOD):
                r, _ = await talk(port, f"127.0.0.{7 + i % 2}", [])
                assert r[0].startswith("421 4.7.0"), r
            took = time.monotonic() - t0
            await asyncio.sleep(4.5)                 # the window ends: one more refusal
            r, _ = await talk(port, "127.0.0.7", [])
            assert r[0].startswith("421 4.7.0"), r
        finally:
            for _, w, _ in held:
                w.close()
        return took

    took = asyncio.run(flood())
    time.sleep(0.5)
    refused = lines_of(flooded, "connection_refused", reason="per-ip")
    windows = int(took // 4.0) + 1                  # the flood's windows, then the last line
    assert len(refused) <= 3 * windows + 1, (took, refused)
    assert len(refused) < FLOOD // 2, refused
    assert refused[-1]["not_logged"] > 0, refused[-1]
    # every refusal is either a line or counted in the next one
    assert len(refused) + sum(d["not_logged"] for d in refused) == FLOOD + 1, refused
