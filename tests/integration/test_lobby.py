"""The unproven pool: slots are not the scarce resource (issue 8, item 1).

- With the bulk slots full of silent sessions (each from its own loopback address), a newcomer
  that speaks within a second gets in (the longest-silent session is closed with 421 4.4.2, with
  the example defaults: no minimum silence, no eviction rate) and completes a transaction.
"""

from __future__ import annotations

import asyncio
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
