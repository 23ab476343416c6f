"""A held SMTP session for live tests: open it from a chosen loopback source, drive it a command
at a time, send whole messages on it.

API
    HeldSession.open(port, source="127.0.0.1") -> (session, banner)    async
    .reply(timeout=10) -> str       one reply, every line of it; "EOF" when the server closed
                                    (or a read timed out): a test then sees it in its assertion
    .cmd(line) -> str               a command (str, CRLF added), its reply
    .message(sender, body) -> str   MAIL FROM:<sender>, RCPT TO:<bob@example.test>, DATA, the
                                    dot-stuffed body: the first reply that is not a go-ahead, or
                                    the reply to the final dot. A 4xx at RCPT (the bulk cap
                                    answers there) is followed by RSET, so the session can go on
    .transaction(mail_arg, body) -> str   the same with MAIL FROM's whole argument as written
                                    ("<x@spam.test> SMTPUTF8", "<>")
    .close()

Failure modes: connection errors become "EOF" replies, never exceptions. Limits: loopback only;
every read has a deadline.
"""

from __future__ import annotations

import asyncio

RCPT = "bob@example.test"


class HeldSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> tuple[HeldSession, str]:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        s = cls(r, w)
        return s, await s.reply()

    async def reply(self, timeout: float = 10.0) -> str:
        lines: list[str] = []
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), timeout)
            except (ConnectionError, TimeoutError):
                return "EOF"
            if not line:
                return "EOF" if not lines else "".join(lines)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return "".join(lines)

    async def cmd(self, line: str) -> str:
        try:
            self.writer.write(line.encode() + b"\r\n")
            await self.writer.drain()
        except ConnectionError:
            return "EOF"
        return await self.reply()

    async def message(self, sender: str, body: bytes) -> str:
        return await self.transaction(f"<{sender}>", body)

    async def transaction(self, mail_arg: str, body: bytes) -> str:
        for line in (f"MAIL FROM:{mail_arg}", f"RCPT TO:<{RCPT}>"):
            r = await self.cmd(line)
            if not r.startswith("250"):
                if line.startswith("RCPT") and r.startswith("4") and not r.startswith("421"):
                    await self.cmd("RSET")        # the bulk cap answers at the first RCPT
                return r
        r = await self.cmd("DATA")
        if not r.startswith("354"):
            return r
        try:
            self.writer.write(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            await self.writer.drain()
        except ConnectionError:
            return "EOF"
        return await self.reply()

    def close(self) -> None:
        self.writer.close()
