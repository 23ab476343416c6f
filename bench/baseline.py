"""Baseline target: plain single-process aiosmtpd on uvloop, the server a Python user would write.

Purpose
    The comparison point for the flood benchmark: one process, one event loop, aiosmtpd with its
    defaults (no connection cap, 300 s idle timeout, asyncio's default listen backlog of 100),
    accepting mail for the configured domain(s) and writing each message Maildir-style with an
    fsync before answering 250 — durable like smtp-ingress, but with no lanes, no admission, no
    reserve.

API
    python -m bench.baseline --port P --spool DIR [--host 127.0.0.1] [--domain example.com ...]
        [--hostname NAME] [--backlog 100] [--sync-fsync] [--max-seconds S]
    Prints "READY <port>" on stdout once listening (port 0 picks a free one). SIGTERM or SIGINT
    stops it cleanly (exit 0); so a harness can start it as a subprocess and stop it by PID.
    MaildirHandler(spool, domains, sync_fsync) and serve(...) are importable for tests.

Behaviour
    RCPT outside the accepted domains: 550 5.7.1 (no open relay; "*" accepts any domain).
    DATA: write tmp/<name>, fsync, rename into new/, fsync new/; then 250. The write runs in a
    worker thread (asyncio.to_thread), as a careful Python user would do; --sync-fsync does it on
    the event loop instead (the naive version).

Failure modes
    A spool write error answers 451 4.3.0 and logs to stderr; the server keeps running. A port in
    use exits 1 with the error on stderr.

Limits
    Loopback benchmark tool, not a mail server: no TLS, no SPF/DKIM, no queue runner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class MaildirHandler:
    """aiosmtpd handler: accept RCPTs in ``domains``; store DATA durably in ``spool``."""

    def __init__(self, spool: Path, domains: Sequence[str], sync_fsync: bool = False) -> None:
        self.spool = spool
        self.domains = {d.lower() for d in domains}
        self.sync_fsync = sync_fsync
        self.host = socket.gethostname().replace("/", "_").replace(":", "_")
        self.counter = itertools.count()
        for sub in ("tmp", "new", "cur"):
            (spool / sub).mkdir(parents=True, exist_ok=True)
        self.new_fd = os.open(spool / "new", os.O_RDONLY | os.O_DIRECTORY)
        self.stored = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if "*" not in self.domains and domain not in self.domains:
            return "550 5.7.1 Relaying denied"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    def _store(self, envelope: Envelope) -> str:
        name = f"{time.time_ns()}.{os.getpid()}_{next(self.counter)}.{self.host}"
        head = (
            f"Return-Path: <{envelope.mail_from}>\r\n"
            f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        content = envelope.original_content or b""
        tmp = self.spool / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, head + content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.spool / "new" / name)
        os.fsync(self.new_fd)
        return name

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            if self.sync_fsync:
                name = self._store(envelope)
            else:
                name = await asyncio.to_thread(self._store, envelope)
        except OSError as e:
            print(f"baseline: spool error: {e}", file=sys.stderr, flush=True)
            return "451 4.3.0 Local error in processing"
        self.stored += 1
        return f"250 2.0.0 OK queued as {name}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.new_fd)


async def serve(
    host: str, port: int, spool: Path, domains: Sequence[str], *, hostname: str,
    backlog: int = 100, sync_fsync: bool = False, max_seconds: float = 0.0,
    ready: Any = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``max_seconds`` when > 0)."""
    loop = asyncio.get_running_loop()
    handler = MaildirHandler(spool, domains, sync_fsync)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=hostname, loop=loop), host, port, backlog=backlog
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    try:
        if max_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max_seconds)
        else:
            await stop.wait()
    finally:
        server.close()
        handler.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port (see READY line)")
    p.add_argument("--spool", type=Path, required=True)
    p.add_argument("--domain", action="append", default=None,
                   help="accepted recipient domain, repeatable; '*' = any (default example.com)")
    p.add_argument("--hostname", default="baseline.localhost")
    p.add_argument("--backlog", type=int, default=100, help="listen backlog (asyncio default)")
    p.add_argument("--sync-fsync", action="store_true", help="write on the event loop (naive)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop after S s (0 = never)")
    p.add_argument("--no-uvloop", action="store_true")
    a = p.parse_args(argv)

    def ready(port: int) -> None:
        print(f"READY {port}", flush=True)

    coro = serve(a.host, a.port, a.spool, a.domain or ["example.com"], hostname=a.hostname,
                 backlog=a.backlog, sync_fsync=a.sync_fsync, max_seconds=a.max_seconds,
                 ready=ready)
    try:
        if a.no_uvloop:
            asyncio.run(coro)
        else:
            import uvloop

            uvloop.run(coro)
    except OSError as e:
        print(f"baseline: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
