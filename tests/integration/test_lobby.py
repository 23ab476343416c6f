"""The unproven pool: slots are not the scarce resource (issue 8, item 1).

- With the bulk slots full of silent sessions (each from its own loopback address), a newcomer
  that speaks within a second gets in (the longest-silent session is closed with 421 4.4.2, with
  the example defaults: no minimum silence, no eviction rate) and completes a transaction.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.kit.harness import Ingress, make_body, send_one


def test_full_silent_pool_lets_a_speaking_newcomer_in(tmp_path: Path) -> None:
    n_silent = 10            # max_connections 12, fast_reserve 2: the whole bulk share
    with Ingress(tmp_path, {"smtp": {"max_connections": 12, "fast_reserve": 2},
                            "supervisor": {"acceptors": 1}}) as ing:
        async def run() -> tuple[list[bytes], tuple[int, str], bytes]:
            conns = []
            for i in range(n_silent):
                r, w = await asyncio.open_connection("127.0.0.1", ing.port,
                                                     local_addr=(f"127.0.9.{i + 1}", 0))
                conns.append((r, w, await asyncio.wait_for(r.readline(), 10)))
            banners = [b for _, _, b in conns]
            sent = await send_one(ing.port, make_body(1), source="127.0.9.200", timeout=10)
            try:                                     # the longest-silent one makes room
                evicted = await asyncio.wait_for(conns[0][0].readline(), 5)
            except TimeoutError:
                evicted = b"(open)"
            for _, w, _ in conns:
                w.close()
            return banners, sent, evicted

        banners, sent, evicted = asyncio.run(run())
        assert all(b.startswith(b"220") for b in banners), banners
        assert sent[0] == 250, sent
        assert evicted.startswith(b"421 4.4.2"), evicted
        assert ing.events("evicted")


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        out += line
        if not line or line[3:4] != b"-":
            return out


def test_pipelined_first_packet_is_handed_to_the_session(tmp_path: Path) -> None:
    """EHLO, MAIL, RCPT and DATA in the client's first packet: the lobby hands all of it to the
    session, which answers each command once, after exactly one banner."""
    with Ingress(tmp_path, {"supervisor": {"acceptors": 1}}) as ing:
        async def run() -> list[bytes]:
            r, w = await asyncio.open_connection("127.0.0.1", ing.port,
                                                 local_addr=("127.0.9.50", 0))
            got = [await _read_reply(r)]
            w.write(b"EHLO pipe.test\r\nMAIL FROM:<a@sender.test>\r\n"
                    b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
            for _ in range(4):
                got.append(await _read_reply(r))
            w.write(b"Subject: lobby pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            got.append(await _read_reply(r))
            got.append(await _read_reply(r))
            w.close()
            return got

        got = asyncio.run(run())
        codes = [g[:3] for g in got]
        assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"], got
        assert got[0].count(b"220") == 1, got[0]
        assert b"250-" in got[1] and b"PIPELINING" in got[1], got[1]
        assert any(b"lobby pipelined" in e.message for e in ing.spooled().values())


def test_silent_seat_times_out_and_is_drained(tmp_path: Path) -> None:
    """A seat that never speaks gets 421 4.4.2 at smtp.idle_timeout and is logged as a session;
    at SIGTERM a silent seat is closed with 421 4.3.2 at once (close_if_idle)."""
    with Ingress(tmp_path, {"smtp": {"idle_timeout": 1.5, "ack_timeout": 1.2,
                                     "session_deadline": 30.0},
                            "classify": {"dkim_deadline": 1.0, "spf_deadline": 1.0,
                                         "dns_timeout": 0.5},
                            "supervisor": {"acceptors": 1}}) as ing:
        async def run() -> tuple[bytes, bytes, bytes]:
            r, w = await asyncio.open_connection("127.0.0.1", ing.port)
            banner = await asyncio.wait_for(r.readline(), 10)
            timed_out = await asyncio.wait_for(r.readline(), 10)
            w.close()
            r2, w2 = await asyncio.open_connection("127.0.0.1", ing.port)
            await asyncio.wait_for(r2.readline(), 10)
            ing.signal(signal.SIGTERM)
            drained = await asyncio.wait_for(r2.readline(), 10)
            w2.close()
            return banner, timed_out, drained

        banner, timed_out, drained = asyncio.run(run())
        assert banner.startswith(b"220"), banner
        assert timed_out.startswith(b"421 4.4.2"), timed_out
        assert drained.startswith(b"421 4.3.2"), drained
        assert ing.events("session")
