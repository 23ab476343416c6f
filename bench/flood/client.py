"""The flood generator's SMTP client: one timed transaction on a fresh connection.

API
    open_conn(...) -> (reader, writer); read_reply(reader) -> (code, text); dot_stuff(body);
    make_message(mail_from, rcpt, size, tag); smtp_attempt(...) -> Attempt (never raises for a
    server's behaviour: refusals, timeouts and resets are outcomes); ServerClosed, ProtocolError

Failure modes and limits: those of the whole generator, in the package docstring
(bench/flood/__init__.py), with the accounting definitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass

from bench.flood.common import IP_BIND_ADDRESS_NO_PORT, MAX_LINE, MAX_REPLY_LINES, Target

# --------------------------------------------------------------------------------------------
# A small SMTP client


class ServerClosed(ConnectionError):
    """The server closed the connection where a reply was expected."""


class ProtocolError(ConnectionError):
    """The server sent something that is not an SMTP reply."""


async def open_conn(
    target: Target,
    source: str | None,
    ssl_ctx: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect from ``source`` (bound before connect) to ``target``; implicit TLS if ``ssl_ctx``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            if target.family == socket.AF_INET:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        await loop.sock_connect(sock, (target.host, target.port))
        if ssl_ctx is None:
            return await asyncio.open_connection(sock=sock, limit=MAX_LINE * 4)
        return await asyncio.open_connection(
            sock=sock, ssl=ssl_ctx, server_hostname=server_hostname, limit=MAX_LINE * 4
        )
    except BaseException:
        sock.close()
        raise


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read one (possibly multi-line) SMTP reply; returns (code, text of the last line)."""
    for _ in range(MAX_REPLY_LINES):
        line = await reader.readline()
        if not line or not line.endswith(b"\n"):
            raise ServerClosed("connection closed by server")
        if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            raise ProtocolError(f"not an SMTP reply: {line[:60]!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line[4:].decode("latin-1").strip()
    raise ProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")


def dot_stuff(body: bytes) -> bytes:
    """CRLF-normalise, dot-stuff and terminate a message body for DATA."""
    lines = body.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
    return out + b"\r\n.\r\n"


def make_message(mail_from: str, rcpt: str, size: int, tag: str) -> bytes:
    """A plain RFC 5322 message of about ``size`` bytes, dot-stuffed and terminated."""
    head = (
        f"From: <{mail_from}>\r\nTo: <{rcpt}>\r\nSubject: flood {tag}\r\n"
        f"Message-ID: <{tag}.{time.time_ns()}@flood.invalid>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n"
    ).encode()
    filler = max(0, size - len(head))
    line = b"x" * 76 + b"\r\n"
    body = (line * (filler // len(line) + 1))[:filler]
    if body.endswith(b"\r"):       # cut between CR and LF: a bare CR (refused, 550 5.6.0)
        body = body[:-1] + b"x"
    return dot_stuff(head + body)


@dataclass
class Attempt:
    """One legitimate transaction. ``t`` is seconds since the run started."""

    t: float
    latency_ms: float | None
    outcome: str  # accepted | tempfail | permfail | refused | timeout | error | unfinished
    code: int | None = None
    stage: str | None = None
    detail: str | None = None
    stages_ms: dict[str, float] | None = None  # accepted: ms per stage, connect to DOT


class _Reply(Exception):
    def __init__(self, code: int, stage: str, text: str) -> None:
        super().__init__(f"{code} at {stage}: {text}")
        self.code, self.stage, self.text = code, stage, text


async def smtp_attempt(
    target: Target,
    source: str | None,
    *,
    helo: str,
    mail_from: str,
    rcpt: str,
    message: bytes,
    deadline_s: float,
    tls: str = "none",
    ssl_ctx: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    t_run0: float = 0.0,
) -> Attempt:
    """One SMTP transaction on a fresh connection, timed from connect to the 250 after DATA.

    ``tls``: "none", "implicit" (TLS from the first byte) or "starttls". Never raises for
    network/SMTP trouble: the outcome is in the returned Attempt (CancelledError propagates).
    """
    stage = "connect"
    writer: asyncio.StreamWriter | None = None
    t0 = time.perf_counter()
    t_rel = time.monotonic() - t_run0
    stages: dict[str, float] = {}
    mark = t0

    def lap(name: str) -> None:
        # the time since the previous stage ended (a second EHLO after STARTTLS adds to EHLO)
        nonlocal mark
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + (now - mark) * 1000.0
        mark = now

    try:
        async with asyncio.timeout(deadline_s):
            reader, writer = await open_conn(
                target, source, ssl_ctx if tls == "implicit" else None, server_hostname
            )
            lap("connect")

            async def cmd(line: bytes | None, want: int, name: str) -> None:
                nonlocal stage
                stage = name
                if line is not None:
                    writer.write(line)
                code, text = await read_reply(reader)
                if code != want:
                    raise _Reply(code, name, text)
                lap(name)

            await cmd(None, 220, "banner")
            await cmd(b"EHLO %s\r\n" % helo.encode(), 250, "EHLO")
            if tls == "starttls":
                await cmd(b"STARTTLS\r\n", 220, "STARTTLS")
                stage = "TLS"
                await writer.start_tls(ssl_ctx, server_hostname=server_hostname)
                lap("TLS")
                await cmd(b"EHLO %s\r\n" % helo.encode(), 250, "EHLO")
            await cmd(b"MAIL FROM:<%s>\r\n" % mail_from.encode(), 250, "MAIL")
            await cmd(b"RCPT TO:<%s>\r\n" % rcpt.encode(), 250, "RCPT")
            await cmd(b"DATA\r\n", 354, "DATA")
            await cmd(message, 250, "DOT")
            latency = (time.perf_counter() - t0) * 1000.0
        # QUIT outside the timed part, best effort.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                writer.write(b"QUIT\r\n")
                await read_reply(reader)
        return Attempt(t_rel, latency, "accepted", 250, "DOT", stages_ms=stages)
    except _Reply as r:
        kind = "tempfail" if 400 <= r.code < 500 else "permfail" if r.code >= 500 else "error"
        return Attempt(t_rel, None, kind, r.code, r.stage, r.text[:120])
    except TimeoutError:
        return Attempt(t_rel, None, "timeout", None, stage)
    except ConnectionRefusedError:
        return Attempt(t_rel, None, "refused", None, "connect")
    except ServerClosed:
        return Attempt(t_rel, None, "error", None, stage, "closed")
    except (OSError, ssl.SSLError, ProtocolError, EOFError) as e:
        return Attempt(t_rel, None, "error", None, stage, type(e).__name__)
    finally:
        if writer is not None:
            writer.close()
