"""What an idle connection costs, summed over every ingress process (issue 8; not a test).

    .venv/bin/python -m bench.idle [N ...]        default: 1000 10000 20000

For each N: start the real ingress (tests.kit.harness.Ingress, the harness's two acceptors,
default slots: smtp.max_connections = 0, auto), read RSS and USS (psutil) of the supervisor and
every child at rest; open N connections that read the banner and then say nothing (lobby seats),
each from its own loopback address (127.64.0.0/10), split over client processes of at most
PER_PROC connections (the hard fd limit per process here is 20000); read the memory again after
it settles; print the difference per connection, for the supervisor + acceptors and for all
processes. Then everything is closed and stopped.

Bounded: every connect and banner read has a timeout; a client process that does not report
within CLIENT_DEADLINE is killed (by its PID). All traffic is on loopback. Figures, not
assertions: the target (issue 8) is <= 5 KB per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import psutil

from tests.kit.harness import Ingress

PER_PROC = 9000            # connections per client process (fds: one each, far below 20000)
CONNECT_TIMEOUT = 10.0
CLIENT_DEADLINE = 180.0    # a client process reports within this, or it is killed
SETTLE = 2.0


def source(i: int) -> str:
    """The i-th distinct loopback source address (127.64.0.1 ...)."""
    return f"127.{64 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


async def _hold(port: int, first: int, count: int, conn: Connection) -> None:
    sem = asyncio.Semaphore(200)
    writers: list[asyncio.StreamWriter] = []
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source(i), 0)), CONNECT_TIMEOUT)
                line = await asyncio.wait_for(r.readline(), CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                failed += 1
                return
            if line.startswith(b"220"):
                writers.append(w)
            else:
                failed += 1
                w.close()

    await asyncio.gather(*(one(i) for i in range(first, first + count)))
    conn.send((len(writers), failed))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, conn.recv)       # the parent's "done"
    for w in writers:
        w.close()


def _client(port: int, first: int, count: int, conn: Connection) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_hold(port, first, count, conn))


def memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, USS) in bytes summed over `pids` (gone ones left out)."""
    rss = uss = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            m = psutil.Process(pid).memory_full_info()
            rss += m.rss
            uss += m.uss
    return rss, uss


def measure(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, Ingress(Path(tmp)) as ing:
        acceptors = ing.children("acceptor")
        front = [ing.pid, *acceptors]
        everyone = [ing.pid, *ing.children()]
        time.sleep(SETTLE)
        rest_front, rest_all = memory(front), memory(everyone)
        procs, pipes = [], []
        for first in range(0, n, PER_PROC):
            parent, child = mp.Pipe()
            p = mp.Process(target=_client, args=(ing.port, first, min(PER_PROC, n - first), child))
            p.start()
            procs.append(p)
            pipes.append(parent)
        held = failed = 0
        try:
            deadline = time.monotonic() + CLIENT_DEADLINE
            for pipe in pipes:
                if pipe.poll(max(0.0, deadline - time.monotonic())):
                    h, f = pipe.recv()
                    held, failed = held + h, failed + f
            time.sleep(SETTLE)
            busy_front, busy_all = memory(front), memory(everyone)
        finally:
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send("done")
            for p in procs:
                p.join(30)
                if p.is_alive() and p.pid is not None:
                    p.kill()
                    p.join(5)
    per = max(1, held)
    return {
        "n": n, "held": held, "failed": failed,
        "front_rss": (busy_front[0] - rest_front[0]) / per,
        "front_uss": (busy_front[1] - rest_front[1]) / per,
        "all_rss": (busy_all[0] - rest_all[0]) / per,
        "all_uss": (busy_all[1] - rest_all[1]) / per,
        "rest_all_rss": rest_all[0],
    }


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv[1:]] or [1000, 10000, 20000]
    print("idle connections | held | failed | per connection: supervisor+acceptors RSS / USS"
          " | all processes RSS / USS  (bytes)")
    for n in sizes:
        r = measure(n)
        print(f"{r['n']:>16} | {r['held']:>5} | {r['failed']:>6} | "
              f"{r['front_rss']:>9.0f} / {r['front_uss']:>9.0f} | "
              f"{r['all_rss']:>9.0f} / {r['all_uss']:>9.0f}   "
              f"(all processes at rest: {r['rest_all_rss'] / (1 << 20):.0f} MiB RSS)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
