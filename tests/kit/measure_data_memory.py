"""Measure what sessions cost an acceptor in memory (for docs/benchmarks.md's figures; not a test).

    .venv/bin/python -m tests.kit.measure_data_memory [sessions] [bytes_each] [idle]

Starts the real ingress (one acceptor, tests.kit.harness.Ingress) and reads the acceptor's VmRSS
from /proc: at rest; with `idle` connections open after the banner; with `sessions` sessions
each holding `bytes_each` bytes of 3-byte lines in DATA (the worst case for a per-line buffer);
and after those messages are finished. Bounded: everything is closed and stopped at the end.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from tests.kit.harness import Ingress


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def settle(pid: int, seconds: float = 1.0) -> int:
    await asyncio.sleep(seconds)
    return rss_kib(pid)


async def measure(port: int, pid: int, sessions: int, each: int, idle: int) -> dict[str, int]:
    out = {"rest": await settle(pid)}
    idles = [await asyncio.open_connection("127.0.0.1", port) for _ in range(idle)]
    for r, _ in idles:
        await r.readline()
    out["idle"] = await settle(pid)
    conns = []
    for _ in range(sessions):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readline()
        for line in (b"EHLO m.test\r\n", b"MAIL FROM:<a@sender.test>\r\n",
                     b"RCPT TO:<b@example.test>\r\n", b"DATA\r\n"):
            w.write(line)
            await w.drain()
            while (await r.readline())[3:4] == b"-":
                pass
        conns.append((r, w))
    payload = b"a\r\n" * (each // 3)
    for _, w in conns:
        w.write(payload)
        await w.drain()
    out["in_data"] = await settle(pid, 2.0)
    replies = []
    for r, w in conns:
        w.write(b".\r\n")
        await w.drain()
        replies.append((await r.readline())[:3])
    out["after"] = await settle(pid)
    out["accepted"] = sum(1 for x in replies if x == b"250")
    for _, w in conns + idles:
        w.close()
    return out


def main(argv: list[str]) -> int:
    sessions = int(argv[1]) if len(argv) > 1 else 40
    each = int(argv[2]) if len(argv) > 2 else 1 << 20
    idle = int(argv[3]) if len(argv) > 3 else 1000
    with tempfile.TemporaryDirectory() as tmp, Ingress(Path(tmp), {
            "supervisor": {"acceptors": 1},
            "smtp": {"max_message_size": 4 * each,
                     "data_memory_budget": 2 * sessions * each + (16 << 20),
                     "max_connections": idle + sessions + 200,
                     "fast_reserve": 100}}) as ing:
        (pid,) = ing.children("acceptor")
        t0 = time.monotonic()
        r = asyncio.run(measure(ing.port, pid, sessions, each, idle))
    kib = 1024
    print(f"acceptor RSS at rest:                 {r['rest'] / kib:8.1f} MiB")
    print(f"+ {idle} idle sessions after banner:   {(r['idle'] - r['rest']) / kib:8.1f} MiB "
          f"({(r['idle'] - r['rest']) / max(1, idle):.1f} KiB each)")
    held = sessions * each / (1 << 20)
    print(f"+ {sessions} sessions in DATA ({held:.0f} MiB of 3-byte lines): "
          f"{(r['in_data'] - r['idle']) / kib:8.1f} MiB")
    after = (r["after"] - r["rest"]) / kib
    print(f"after those messages ({r['accepted']} accepted):  {after:8.1f} MiB above rest; "
          f"{time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
