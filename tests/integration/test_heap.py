"""An acceptor's connections end without reference cycles, so its heap needs no full collection
(ingress.core.child.settle_heap, keep_heap).

Every aiosmtpd session used to end in a cycle of about 50 objects (the session, its writer, its
command tables bound to it, the cancelled task whose traceback holds the session's frames), so
only the cyclic collector could free it. With 10,000 silent bots an acceptor held 250,000
objects, and each automatic full collection stopped it for 130-350 ms. Here real clients of
every shape go through a real ingress: whole transactions, clients that leave mid-dialogue or
mid-DATA, clients that close in the lobby, early talkers, clients cut off with 421 after too
many errors. At its exit each acceptor says what its collector found ("heap"): nearly nothing,
and no automatic full collection ran."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.kit.harness import Ingress, make_body, send_one
from tests.kit.session import HeldSession

WHOLE = 60          # transactions
SHAPES = 15         # of each other shape


async def _partial(port: int, i: int, shape: str) -> None:
    """A client that does not finish: it leaves at `shape`."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.8.{i + 1}", 0))
    s = HeldSession(r, w)
    try:
        if shape == "early":                       # talks before the banner
            w.write(b"EHLO early.test\r\n")
            await w.drain()
        await s.reply()
        if shape in ("dialogue", "data"):
            for line in ("EHLO c.test", "MAIL FROM:<a@sender.test>", "RCPT TO:<b@example.test>"):
                await s.cmd(line)
        if shape == "errors":                      # cut off: 421 after the hard limit
            for _ in range(4):
                if (await s.cmd("RCPT TO:<nobody@example.test>")).startswith("421"):
                    break
        if shape == "data":
            await s.cmd("DATA")
            w.write(b"Subject: cut\r\n\r\nhalf a messa")
            await w.drain()
            await asyncio.sleep(0.05)
    finally:
        s.close()


def test_connections_leave_no_reference_cycles(tmp_path: Path) -> None:
    with Ingress(tmp_path, {"admission": {"greet_pause": 0.2, "per_ip_rate": 0.0,
                                          "per_ip_bulk_max": 10000},
                            "smtp": {"soft_error_limit": 1, "hard_error_limit": 2,
                                     "error_sleep": 0.0}}) as ing:
        async def run() -> list[tuple[int, str]]:
            sent = []
            for i in range(WHOLE):
                sent.append(await send_one(ing.port, make_body(i)))
            await asyncio.gather(*(_partial(ing.port, i + n * SHAPES, shape)
                                   for n, shape in enumerate(("lobby", "early", "dialogue",
                                                              "data", "errors"))
                                   for i in range(SHAPES)))
            return sent

        sent = asyncio.run(run())
        assert [code for code, _ in sent] == [250] * WHOLE, sent
        assert ing.stop() == 0
        heaps = [e for e in ing.events("heap") if "acceptor" in str(e["proc"])]
    assert len(heaps) >= 3, heaps        # the port-25 acceptors and the fast one
    assert all(e["collections"][2] == 0 for e in heaps), heaps
    # before: about 50 objects a session; now what is left is the odd object of a rare path
    found = sum(e["found"] for e in heaps)
    assert found <= (WHOLE + 5 * SHAPES) // 4, heaps
