"""The durable write of one fast-lane message: a spool file of its own against the fast lane's
journal, idle and beside a bulk lane's group commits.

Purpose
    Measure what the operator's 250 waits for on the disk: ``Spool.write_batch`` of one message
    (create in tmp/, write, fsync, link into new/, fsync of new/) against ``Journal.append`` of
    one (one pwrite and one fdatasync of a preallocated file; workers.spool.journal), alternated
    in rounds, first on an idle spool and then while ``--spam-procs`` processes write batches of
    8 messages at ``--spam-rate`` messages a second in all (the bulk lane's group commits, with
    syncfs, and the relay's unlinks) on the same file system.

API
    ``python -m bench.commit [-n N] [--rounds R] [--spam-rate R] [--spam-procs P] [--dir D]``:
    prints one Markdown row per (load, way): p50, p99 and max in ms over every round.
    ``measure(write, n, gap) -> list[float]``; ``summary(ms) -> dict`` (pure).

Failure modes and limits: the directory (default: a new one under /var/tmp, removed at the end)
must be on the file system whose behaviour is wanted (the spool's); each spam process stops by
itself after its deadline and is joined; figures are for this machine only and, on a shared
one, noisy: compare the two ways within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.flood.common import percentile_nearest_rank
from ingress.core.wire import Envelope, Lane, new_qid
from workers.spool import journal, store

BODY = b"Subject: bench\r\n\r\n" + b"y" * 3000


def item() -> tuple[Envelope, bytes, bytes]:
    now = time.time()
    env = Envelope(qid=new_qid(), lane=Lane.FAST, peer_ip="192.0.2.9", peer_port=1,
                   helo="h.example", mail_from="a@example.org", rcpts=("b@example.test",),
                   received_at=now, deadline=now + 20)
    return env, b"Received: bench\r\n", BODY


def spam(root: str, rate: float, until: float) -> None:
    """Group commits of 8 at `rate` messages a second, each file removed again (the relay's
    unlink) once 50 are waiting, until `until` (time.monotonic())."""
    s = store.Spool(root)
    due = time.monotonic()
    while time.monotonic() < until:
        s.write_batch([item() for _ in range(8)])
        for p in sorted((Path(root) / store.NEW_DIR).iterdir())[:-50]:
            p.unlink()
        due += 8 / rate
        time.sleep(max(0.0, due - time.monotonic()))


def measure(write: Callable[[list[tuple[Envelope, bytes, bytes]]], Any], n: int,
            gap: float) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        write([item()])
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(gap)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    """n, p50, p99, max of a non-empty sample (the bench's nearest-rank percentiles)."""
    p50, p99 = (percentile_nearest_rank(ms, p) for p in (50, 99))
    assert p50 is not None and p99 is not None, "an empty sample"
    return {"n": len(ms), "p50": round(p50, 2), "p99": round(p99, 2), "max": round(max(ms), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.commit", description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200, help="writes per way per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap", type=float, default=0.01, help="seconds between two writes")
    ap.add_argument("--spam-rate", type=float, default=400.0)
    ap.add_argument("--spam-procs", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-commit-", dir=a.dir or "/var/tmp"))
    per_round = 2 * a.n * (a.gap + 0.002)
    print("| load | way | writes | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|")
    try:
        for load in (0.0, a.spam_rate):
            procs = []
            if load:
                until = time.monotonic() + 1 + a.rounds * per_round * 3 + 10
                procs = [mp.Process(target=spam, args=(str(base / f"spam{k}"),
                                                       load / a.spam_procs, until))
                         for k in range(a.spam_procs)]
                for p in procs:
                    p.start()
                time.sleep(1)
            direct = store.Spool(base / f"direct{int(load)}")
            jnl = journal.Journal.take(store.Spool(base / f"journal{int(load)}"), 4 << 20)
            got: dict[str, list[float]] = {"spool file": [], "journal": []}
            for _ in range(a.rounds):
                got["spool file"] += measure(direct.write_batch, a.n, a.gap)
                got["journal"] += measure(jnl.append, a.n, a.gap)
            jnl.close()
            for p in procs:
                p.join(timeout=a.rounds * per_round * 3 + 30)
                if p.is_alive():
                    p.kill()
                    p.join()
            what = f"bulk commits, {load:g} msgs/s" if load else "idle"
            for way, ms in got.items():
                s = summary(ms)
                print(f"| {what} | {way} | {s['n']} | {s['p50']} | {s['p99']} | {s['max']} |",
                      flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
