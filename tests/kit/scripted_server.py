"""A tiny asyncio SMTP server whose answers are scripted, to test the flood generator's accounting.

Purpose
    Give tests a server whose behaviour per connection is known in advance, so counts, reply-code
    buckets, timeouts and latency percentiles computed by bench.flood can be checked exactly.

API
    parse_outcome(text) -> Outcome       one script entry (grammar below); ValueError if malformed
    ScriptedServer(script, host="127.0.0.1", port=0, cycle=False)
        await start() -> port;  await stop();  ``async with`` does both
        .connections, .accepted (messages answered 250 at end of DATA), .peers (source addresses),
        .served (the Outcome text used for each connection, in order), .open (connections
        open now), .max_open (the most open at once)
    CLI: python -m tests.kit.scripted_server --port 2526 250 "451 at MAIL" "slow 200ms"

Script grammar (one entry per connection, in connect order; after the last entry the last one
repeats, or the script restarts with ``cycle=True``):
    "250"                 normal dialogue, message accepted
    "CODE at STAGE"       reply CODE (4xx/5xx) at STAGE instead of the normal reply; STAGE is one of
                          banner, EHLO, MAIL, RCPT, DATA, DOT, RSET, QUIT. At banner, or for
                          421 anywhere, the server closes the connection after the reply.
    "slow Nms [at STAGE]" wait N ms before the reply at STAGE (default DOT), otherwise normal
    "close [at STAGE]"    close without replying at STAGE (default banner)
    "hang [at STAGE]"     never reply at STAGE (default banner); the client must time out (the
                          connection ends when the client closes it)

Failure modes
    A malformed entry raises ValueError at construction. Unknown commands get 502; STARTTLS gets
    454 (no TLS here). Client errors (reset, garbage) end that connection only.

Limits
    Loopback test tool: no TLS, no pipelining guarantees, DATA body kept only as a byte count,
    lines longer than 64 KiB end the connection. Every loop is bounded (commands per connection).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

STAGES = ("banner", "EHLO", "MAIL", "RCPT", "DATA", "DOT", "RSET", "QUIT")
MAX_COMMANDS = 10_000
_RE = re.compile(
    r"^\s*(?:(?P<code>[2-5]\d\d)(?:\s+at\s+(?P<cstage>\w+))?"
    r"|slow\s+(?P<ms>\d+(?:\.\d+)?)\s*ms(?:\s+at\s+(?P<sstage>\w+))?"
    r"|(?P<verb>close|hang)(?:\s+at\s+(?P<vstage>\w+))?)\s*$"
)


@dataclass(frozen=True)
class Outcome:
    """A parsed script entry. kind: ok | reply | slow | close | hang."""

    text: str
    kind: str
    stage: str = "DOT"
    code: int = 250
    delay_s: float = 0.0


def _stage(name: str | None, default: str) -> str:
    if name is None:
        return default
    for s in STAGES:
        if s.lower() == name.lower():
            return s
    raise ValueError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")


def parse_outcome(text: str) -> Outcome:
    """Parse one script entry (see module docstring)."""
    m = _RE.match(text)
    if not m:
        raise ValueError(f"bad script entry {text!r}")
    if m["code"]:
        code = int(m["code"])
        if code == 250 and not m["cstage"]:
            return Outcome(text, "ok")
        if code < 400:
            raise ValueError(f"script entry {text!r}: only 4xx/5xx can replace a reply")
        return Outcome(text, "reply", _stage(m["cstage"], "DOT"), code)
    if m["ms"]:
        return Outcome(text, "slow", _stage(m["sstage"], "DOT"), delay_s=float(m["ms"]) / 1000)
    return Outcome(text, m["verb"], _stage(m["vstage"], "banner"))


class _Close(Exception):
    pass


class ScriptedServer:
    """SMTP server answering each connection according to the next script entry."""

    def __init__(
        self, script: Sequence[str], host: str = "127.0.0.1", port: int = 0, cycle: bool = False
    ) -> None:
        if not script:
            raise ValueError("empty script")
        self.script = [parse_outcome(s) for s in script]
        self.host, self.port, self.cycle = host, port, cycle
        self.connections = 0
        self.accepted = 0
        self.peers: list[str] = []
        self.served: list[str] = []
        self.open = 0
        self.max_open = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _next(self) -> Outcome:
        i = self.connections
        self.connections += 1
        if self.cycle:
            return self.script[i % len(self.script)]
        return self.script[min(i, len(self.script) - 1)]

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def __aenter__(self) -> ScriptedServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        outcome = self._next()
        self.served.append(outcome.text)
        peer = writer.get_extra_info("peername")
        self.peers.append(peer[0] if peer else "?")
        try:
            await self._dialogue(outcome, reader, writer)
        except (_Close, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            self.open -= 1
            writer.close()

    async def _reply(self, o: Outcome, stage: str, normal: bytes, w: asyncio.StreamWriter,
                     r: asyncio.StreamReader) -> bool:
        """Send the scripted or the normal reply at ``stage``; False if the session must end."""
        if o.stage == stage:
            if o.kind == "close":
                raise _Close
            if o.kind == "hang":        # never answer; notice the client leaving (EOF)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(3600):
                        while await r.read(65536):
                            pass
                raise _Close
            if o.kind == "slow":
                await asyncio.sleep(o.delay_s)
            if o.kind == "reply":
                w.write(f"{o.code} {o.code // 100}.0.0 scripted at {stage}\r\n".encode())
                await w.drain()
                if stage == "banner" or o.code == 421:
                    raise _Close
                return False
        w.write(normal)
        await w.drain()
        return True

    async def _dialogue(
        self, o: Outcome, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await self._reply(o, "banner", b"220 scripted.invalid ESMTP\r\n", w, reader)
        for _ in range(MAX_COMMANDS):
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                await self._reply(o, "EHLO", b"250-scripted.invalid\r\n250 8BITMIME\r\n", w, reader)
            elif verb == b"MAIL":
                await self._reply(o, "MAIL", b"250 2.1.0 OK\r\n", w, reader)
            elif verb == b"RCPT":
                await self._reply(o, "RCPT", b"250 2.1.5 OK\r\n", w, reader)
            elif verb == b"DATA":
                if not await self._reply(o, "DATA", b"354 end with .\r\n", w, reader):
                    continue
                for _ in range(10_000_000):
                    body = await reader.readline()
                    if not body:
                        return
                    if body in (b".\r\n", b".\n"):
                        break
                if await self._reply(o, "DOT", b"250 2.0.0 queued\r\n", w, reader):
                    self.accepted += 1
            elif verb == b"RSET":
                await self._reply(o, "RSET", b"250 2.0.0 OK\r\n", w, reader)
            elif verb == b"NOOP":
                w.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                await self._reply(o, "QUIT", b"221 2.0.0 bye\r\n", w, reader)
                return
            elif verb == b"STAR":
                w.write(b"454 4.7.0 TLS not available\r\n")
            else:
                w.write(b"502 5.5.2 unknown command\r\n")


async def _serve(args: argparse.Namespace) -> None:
    srv = ScriptedServer(args.script, args.host, args.port, args.cycle)
    port = await srv.start()
    print(f"READY {port}", flush=True)
    try:
        await asyncio.sleep(args.max_seconds)
    finally:
        await srv.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.kit.scripted_server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cycle", action="store_true")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself after S s")
    p.add_argument("script", nargs="+")
    args = p.parse_args(argv)
    try:
        for s in args.script:
            parse_outcome(s)
    except ValueError as e:
        print(f"scripted_server: {e}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
