"""The relay's LMTP client (RFC 2033) over asyncio streams: LHLO, STARTTLS / AUTH (tls.py),
then one reply per accepted RCPT after DATA.

API:
    LmtpSession(target, hostname, timeout)   a transaction.Session over TCP or a unix socket
                                             (target.path); .tls is set before open()
        lhlo(fail) -> {keyword: parameters}  (tls.secure_lmtp sends it again after STARTTLS)

aiosmtplib has no LMTP; the protocol is small enough that a minimal client is clearer than
bending an SMTP client (DATA's per-recipient replies) or running smtplib.LMTP in threads.

Failure modes: a hang-up, a malformed reply line, a greeting or LHLO that is not 2xx at open ->
transaction.Unavailable("connect"); later the transaction's stages (transaction.py). A 421 or
503 among the per-recipient replies after DATA drops the connection.
Limits: every read and write waits at most `timeout`; a reply line up to 1 MiB (the stream
limit); the message is dot-stuffed in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import NoReturn

from ingress.core.downstream import Target
from workers.relay.clients.tls import PLAIN, TlsPolicy, secure_lmtp
from workers.relay.clients.transaction import Transaction, Unavailable
from workers.spool.state import Reply, _oneline

_DOT = re.compile(rb"(?m)^\.")


class LmtpSession(Transaction):
    """LMTP (RFC 2033) over asyncio streams: LHLO, then one reply per accepted RCPT after DATA.

    aiosmtplib has no LMTP; the protocol is small enough that a minimal client is clearer than
    bending an SMTP client (DATA's per-recipient replies) or running smtplib.LMTP in threads."""

    def __init__(self, target: Target, hostname: str, timeout: float) -> None:
        self.target, self.hostname, self.timeout = target, hostname, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.exts: set[str] = set()
        self.tls: TlsPolicy = PLAIN
        self.messages = 0
        self.last_used = time.monotonic()

    @property
    def connected(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    async def _reply(self) -> Reply:
        assert self.reader is not None
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not raw.endswith(b"\n"):
                raise ConnectionError("connection closed by the downstream")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit():
                raise ConnectionError(f"malformed reply {line[:80]!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), " ".join(lines).strip())

    async def _cmd(self, line: bytes) -> Reply:
        assert self.writer is not None
        self.writer.write(line + b"\r\n")
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        return await self._reply()

    async def _words(self, *words: bytes) -> Reply:
        return await self._cmd(b" ".join(words))

    async def lhlo(self, fail: type[Exception]) -> dict[str, str]:
        """Send LHLO; the extensions offered (lower-case keyword -> parameters). A hang-up or
        a refusal raises `fail` (ConnectionError; TlsFailure after STARTTLS)."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"LHLO {self.hostname}\r\n".encode())
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not raw.endswith(b"\n"):
                raise fail("connection closed during LHLO")
            lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
            if lines[-1][3:4] != "-":
                break
        if not lines[-1].startswith("250"):
            raise fail(f"LHLO refused: {lines[-1]}")
        exts: dict[str, str] = {}
        for ln in lines[1:]:
            word, _, rest = ln[4:].partition(" ")
            exts[word.lower()] = rest
        return exts

    async def open(self) -> None:
        await self.close()
        try:
            if self.target.path:
                conn = asyncio.open_unix_connection(self.target.path, limit=1 << 20)
            else:
                conn = asyncio.open_connection(self.target.host, self.target.port, limit=1 << 20)
            self.reader, self.writer = await asyncio.wait_for(conn, self.timeout)
            greet = await self._reply()
            if greet.code != 220:
                raise ConnectionError(f"greeting {greet.line()}")
            self.exts = set(await self.lhlo(ConnectionError))
            await secure_lmtp(self, self.tls)
        except (OSError, TimeoutError, ConnectionError) as e:
            self._drop()
            raise Unavailable("connect", _oneline(f"{type(e).__name__}: {e}", 300)) from None
        self.messages, self.last_used = 0, time.monotonic()

    def _drop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._cmd(b"QUIT"), min(self.timeout, 2.0))
        self._drop()

    ERRORS = (OSError, TimeoutError, ConnectionError, UnicodeError)

    def _exts(self) -> set[str]:
        return self.exts

    def _mail_refused(self, r: Reply) -> NoReturn:
        raise ConnectionError(f"session refused MAIL: {r.line()}")

    async def _data(self, accepted: list[str], data: bytes, results: dict[str, Reply]) -> None:
        r = await self._cmd(b"DATA")
        if r.code != 354:
            for rcpt in accepted:
                results[rcpt] = r
            await self._reset(r)
            return
        assert self.writer is not None
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        self.writer.write(_DOT.sub(b"..", data) + b".\r\n")
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        for rcpt in accepted:          # RFC 2033: one reply per accepted RCPT, in order
            results[rcpt] = await self._reply()
        if any(results[x].code in (421, 503) for x in accepted):
            self._drop()
        self.last_used = time.monotonic()

    async def _reset(self, after: Reply | None) -> None:
        """End a transaction that did not complete: RSET, checked; else drop the connection."""
        if not self.connected or (after is not None and after.code in (421, 503)):
            self._drop()
            return
        try:
            r = await self._cmd(b"RSET")
        except (OSError, TimeoutError, ConnectionError):
            self._drop()
            return
        if r.code != 250:
            self._drop()
