"""The relay's downstream clients: SMTP (aiosmtplib) and LMTP (asyncio streams), with
STARTTLS and AUTH PLAIN as relay.tls says.

API:
    make_session(target, hostname, timeout) -> Session     SmtpSession or LmtpSession
    Session: `await open()`, `await deliver(mail_from, rcpts, data, smtputf8, client=None) ->
        {rcpt: Reply}`, `await close()`, .connected, .messages, .last_used, .tls (a TlsPolicy)
        and .forward (relay.forward_client), both set before open; .reusable_for(client)
    Unavailable(stage, why, partial)     connection-level trouble (see below)
    policy(rc, target) -> TlsPolicy      built once by the relay (ssl context included)
    PLAIN                                the "none" policy (a session's default)
    secure_smtp(client, policy), secure_lmtp(session, policy)
                                         after EHLO / LHLO: STARTTLS, EHLO / LHLO, AUTH

Sending: MAIL FROM / RCPT TO exactly as in the envelope (the commands are built here), the
message byte-exact (dot-stuffed on the wire); SMTPUTF8 when the envelope says so or an address
needs it and the downstream offers it; BODY=8BITMIME when the body has 8-bit bytes and the
downstream offers it. An address that cannot be sent (state.address_problem) is refused here
for its recipient alone (5.1.7 for the sender: then every recipient). For SMTP the DATA reply
applies to every accepted RCPT; for LMTP (RFC 2033) there is one reply per accepted RCPT.
A transaction that did not complete is RSET (checked) or the connection dropped: a session is
never reused dirty (a 421 or 503 drops it).

The original client (forward.py decides and encodes; SMTP only): open() picks the method from
the EHLO after STARTTLS; a forced one the downstream does not offer fails the open
(ForwardUnavailable, a connection-level failure: the breaker backs off, the mail waits, the
relay_downstream_down line names why, smtp_ingress_relay_forward_missing_total counts it).
deliver() sends it right before MAIL FROM, only when a transaction follows: XFORWARD lines each
time (the downstream forgets them after the transaction); XCLIENT once per connection, then the
client's own HELO/EHLO (and AUTH again if used: XCLIENT resets it). After XCLIENT the
connection is that client session's: reusable_for() says no to any other (the scheduler then
opens a fresh one), and the relay's own messages (client None) never go on it. A refusal of
XCLIENT/XFORWARD or of the greeting after it is that message's 451 4.7.0 (never sent
unattributed or as someone else), and the connection is dropped.

TLS modes (relay.tls): none (plain; the default, a local MTA); opportunistic (STARTTLS whenever
offered, the certificate not verified, RFC 7435; plain text when not offered); required
(STARTTLS mandatory, the certificate verified against tls_ca_file or the system's CAs for
tls_verify_name or the downstream's host, TLS >= 1.2). AUTH PLAIN (relay.auth_file,
"user:password", read once at relay start) is sent only inside TLS whose certificate verified:
the configuration allows auth_file with tls = "required" only, so the password never goes in
clear nor to a server that merely answers STARTTLS.

Failure modes: Unavailable(stage="connect") when a session cannot be opened (refused, greeting
or EHLO/LHLO not 2xx, timeout, any TLS or AUTH refusal: TlsFailure, an OSError) or a session
refuses MAIL with 421/503 -- nothing of the message was sent; stage "rcpt" / "data" when the
connection fails later, with `partial` holding the final replies received before that (they
stand). Anything else (a bug, a cancel) drops the connection and propagates.
Limits: no client certificates, no DANE/MTA-STS, no SASL mechanism but PLAIN; the message is
held in memory while it is sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import aiosmtplib

from ingress.core import metrics
from ingress.core.config import RelayConfig, read_credentials
from ingress.core.downstream import Target
from workers.relay import forward
from workers.relay.forward import Client
from workers.spool.state import Reply, _oneline, address_problem

# --- TLS and AUTH ------------------------------------------------------------------------------

class TlsFailure(ConnectionError):
    """The downstream cannot be used under the configured TLS / AUTH policy."""


@dataclass(frozen=True)
class TlsPolicy:
    mode: str = "none"
    context: ssl.SSLContext | None = None
    server_name: str = ""
    credentials: tuple[str, str] | None = None


PLAIN = TlsPolicy()


def client_context(mode: str, ca_file: str = "") -> ssl.SSLContext | None:
    if mode == "none":
        return None
    if mode == "required":
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def policy(rc: RelayConfig, target: Target) -> TlsPolicy:
    if rc.tls == "none" or target.path:
        return PLAIN
    creds = read_credentials(rc.auth_file) if rc.auth_file else None
    return TlsPolicy(rc.tls, client_context(rc.tls, rc.tls_ca_file),
                     rc.tls_verify_name or target.host, creds)


def _handshake_error(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS handshake: certificate not accepted: {e.verify_message}"
    return f"TLS handshake: {e.reason or e}"


def _plain_token(creds: tuple[str, str]) -> str:
    user, password = creds
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()


def _offers_plain(auth_ext: str) -> bool:
    return "PLAIN" in auth_ext.upper().split()


async def secure_smtp(client: Any, p: TlsPolicy) -> None:
    """STARTTLS (and AUTH) on a connected aiosmtplib.SMTP after EHLO, as the policy says."""
    if p.mode == "none":
        return
    if not client.supports_extension("starttls"):
        if p.mode == "required":
            raise TlsFailure("downstream does not offer STARTTLS (relay.tls = required)")
        if p.credentials:
            raise TlsFailure("downstream does not offer STARTTLS: AUTH is not sent in clear")
        return
    try:
        await client.starttls(tls_context=p.context, server_hostname=p.server_name)
        await client.ehlo()
    except ssl.SSLError as e:
        raise TlsFailure(_handshake_error(e)) from None
    except aiosmtplib.SMTPException as e:
        raise TlsFailure(f"STARTTLS: {e}") from None
    await _auth_smtp(client, p)


async def _auth_smtp(client: Any, p: TlsPolicy) -> None:
    """AUTH PLAIN when the policy has credentials (inside the TLS secure_smtp verified; again
    after XCLIENT, which resets the downstream's SASL state)."""
    if p.credentials:
        if not _offers_plain(client.esmtp_extensions.get("auth", "")):
            raise TlsFailure("downstream does not offer AUTH PLAIN")
        try:
            await client.auth_plain(*p.credentials)
        except aiosmtplib.SMTPException as e:
            raise TlsFailure(f"AUTH PLAIN refused: {e}") from None


async def secure_lmtp(session: LmtpSession, p: TlsPolicy) -> None:
    """STARTTLS (and AUTH) on an LmtpSession right after its LHLO, as the policy says."""
    if p.mode == "none":
        return
    assert session.writer is not None
    if "starttls" not in session.exts:
        if p.mode == "required":
            raise TlsFailure("downstream does not offer STARTTLS (relay.tls = required)")
        if p.credentials:
            raise TlsFailure("downstream does not offer STARTTLS: AUTH is not sent in clear")
        return
    assert p.context is not None        # every mode but "none" has one (policy())
    r = await session._cmd(b"STARTTLS")
    if r.code != 220:
        raise TlsFailure(f"STARTTLS refused: {r.line()}")
    try:
        await asyncio.wait_for(session.writer.start_tls(p.context, server_hostname=p.server_name),
                               session.timeout)
    except ssl.SSLError as e:
        raise TlsFailure(_handshake_error(e)) from None
    exts = await session.lhlo(TlsFailure)
    session.exts = set(exts)
    if p.credentials:
        if not _offers_plain(exts.get("auth", "")):
            raise TlsFailure("downstream does not offer AUTH PLAIN")
        r = await session._cmd(b"AUTH PLAIN " + _plain_token(p.credentials).encode())
        if r.code != 235:
            raise TlsFailure(f"AUTH PLAIN refused: {r.line()}")


# --- sessions ---------------------------------------------------------------------------------

class Unavailable(Exception):
    """Connection-level trouble. stage='connect': nothing of this message was sent.
    `partial`: the final per-recipient replies already received (RCPT refusals, LMTP replies
    after DATA) -- they stand whatever happened to the connection after them."""

    def __init__(self, stage: str, why: str, partial: dict[str, Reply] | None = None) -> None:
        super().__init__(f"{stage}: {why}")
        self.stage, self.why = stage, why
        self.partial = dict(partial or {})


class ForwardUnavailable(ConnectionError):
    """relay.forward_client forces XCLIENT or XFORWARD and the downstream does not offer it."""


class Session(Protocol):
    messages: int
    last_used: float
    forward: str                    # relay.forward_client (set before open)

    @property
    def connected(self) -> bool: ...
    async def open(self) -> None: ...
    def reusable_for(self, client: Client | None) -> bool: ...
    async def deliver(self, mail_from: str, rcpts: Sequence[str], data: bytes,
                      smtputf8: bool, client: Client | None = None) -> dict[str, Reply]: ...
    async def close(self) -> None: ...


def _plan(mail_from: str, rcpts: Sequence[str], smtputf8: bool, eightbit: bool, exts: set[str]
          ) -> tuple[list[str], list[str], dict[str, Reply]]:
    """Before the transaction: (MAIL FROM parameters, recipients to send, recipients refused
    here with their Reply). A sender that cannot be sent refuses every recipient; a recipient
    that cannot be sent (address_problem) is refused alone. SMTPUTF8 is asked for when the
    envelope says so or an address needs it, and the downstream offers it."""
    utf8 = "smtputf8" in exts
    refused = address_problem(mail_from, sender=True, utf8=utf8)
    if refused is not None:
        return [], [], dict.fromkeys(rcpts, refused)
    results: dict[str, Reply] = {}
    send: list[str] = []
    for r in rcpts:
        problem = address_problem(r, sender=False, utf8=utf8)
        if problem is not None:
            results[r] = problem
        elif r not in send:
            send.append(r)
    params: list[str] = []
    if eightbit and "8bitmime" in exts:
        params.append("BODY=8BITMIME")
    if utf8 and (smtputf8 or not mail_from.isascii() or not all(r.isascii() for r in send)):
        params.append("SMTPUTF8")
    return params, send, results


def _mail_words(mail_from: str, params: list[str], enc: str) -> tuple[bytes, ...]:
    """MAIL FROM exactly as the envelope says (the commands are built here, not by aiosmtplib's
    mail()/rcpt(), which re-parse the address with email.utils and may send something else)."""
    return (b"MAIL", b"FROM:<" + mail_from.encode(enc) + b">",
            *(p.encode("ascii") for p in params))


async def _rcpt_each(cmd: Callable[..., Awaitable[Reply]], send: Sequence[str], enc: str,
                     results: dict[str, Reply]) -> list[str] | None:
    """One RCPT TO per recipient (`cmd(*words)` sends one command); a refusal is recorded in
    `results`. The accepted recipients, or None when a 421 or 503 (closing, or out of step)
    ended the session: then the rest and the accepted ones have that reply too (deferred)."""
    accepted: list[str] = []
    for i, rcpt in enumerate(send):
        r = await cmd(b"RCPT", b"TO:<" + rcpt.encode(enc) + b">")
        if r.kind == "ok":
            accepted.append(rcpt)
            continue
        results[rcpt] = r
        if r.code in (421, 503):
            for rest in [*send[i + 1:], *accepted]:
                results[rest] = r
            return None
    return accepted


class _Transaction:
    """One mail transaction on a connected session, the same for SMTP and LMTP: the plan, MAIL
    FROM, one RCPT per recipient, then the protocol's own DATA (`_data`). A subclass provides
    the connection (`connected`, `_words`, `_reset`, `_drop`, `_exts`, `_mail_refused`,
    `_data`) and ERRORS, the exceptions that mean the connection failed."""

    ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError)
    messages: int
    last_used: float
    forward: str = "off"

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def _exts(self) -> set[str]:
        raise NotImplementedError

    async def _words(self, *words: bytes) -> Reply:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError

    async def _reset(self, after: Reply | None) -> None:
        raise NotImplementedError

    def _mail_refused(self, r: Reply) -> NoReturn:
        raise NotImplementedError

    async def _data(self, accepted: list[str], data: bytes, results: dict[str, Reply]) -> None:
        raise NotImplementedError

    def reusable_for(self, client: Client | None) -> bool:
        """Can this connection carry a message from `client` (None: the relay's own)?"""
        return True

    async def _forward(self, client: Client | None) -> Reply | None:
        """Give the downstream the message's client (forward.py); a refusal as the Reply to
        record for every recipient (the connection is then dropped), else None."""
        metrics.relay_forwarded("none")
        return None

    async def deliver(self, mail_from: str, rcpts: Sequence[str], data: bytes,
                      smtputf8: bool, client: Client | None = None) -> dict[str, Reply]:
        if not self.connected:
            raise Unavailable("connect", "not connected")
        self.messages += 1
        self.last_used = time.monotonic()
        params, send, results = _plan(mail_from, rcpts, smtputf8, not data.isascii(),
                                      self._exts())
        if not send:
            return results
        enc = "utf-8" if "SMTPUTF8" in params else "ascii"
        stage = "connect"        # until the downstream answered MAIL FROM
        try:
            # Only when a transaction follows: XFORWARD attributes last until its end.
            refused = await self._forward(client)
            if refused is not None:
                self._drop()
                results.update(dict.fromkeys(send, refused))
                return results
            r = await self._words(*_mail_words(mail_from, params, enc))
            if r.code in (421, 503):  # closing, or out of step: the session's, not the message's
                self._mail_refused(r)
            if r.kind != "ok":
                await self._reset(r)
                results.update(dict.fromkeys(send, r))
                return results
            stage = "rcpt"
            accepted = await _rcpt_each(self._words, send, enc, results)
            if accepted is None:
                self._drop()
                return results
            if not accepted:
                await self._reset(None)
                return results
            stage = "data"
            await self._data(accepted, data, results)
            return results
        except self.ERRORS as e:
            self._drop()
            raise Unavailable(stage, _oneline(f"{type(e).__name__}: {e}", 300), results) from None
        except BaseException:
            self._drop()              # anything else (a bug, a cancel): never reuse it dirty
            raise


class SmtpSession(_Transaction):
    """SMTP to the downstream with aiosmtplib (one connection, reused across messages)."""

    def __init__(self, target: Target, hostname: str, timeout: float) -> None:
        self.target, self.hostname, self.timeout = target, hostname, timeout
        self.client: aiosmtplib.SMTP | None = None
        self.tls: TlsPolicy = PLAIN
        self.messages = 0
        self.last_used = time.monotonic()
        self.method = forward.Method()          # this connection's (its EHLO's offer)
        self.carries: tuple[str, int, str, str] | None = None   # the client XCLIENT gave it

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    async def open(self) -> None:
        await self.close()
        client = aiosmtplib.SMTP(hostname=self.target.host, port=self.target.port,
                                 timeout=self.timeout, start_tls=False, use_tls=False,
                                 local_hostname=self.hostname)
        try:
            await client.connect()
            await client.ehlo()
            await secure_smtp(client, self.tls)
            method = forward.select(self.forward, client.esmtp_extensions)
            if method.problem:
                metrics.relay_forward_missing(self.forward)
                raise ForwardUnavailable(method.problem)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            client.close()
            raise Unavailable("connect", _oneline(str(e), 300)) from None
        self.client, self.messages, self.last_used = client, 0, time.monotonic()
        self.method, self.carries = method, None

    def reusable_for(self, client: Client | None) -> bool:
        """After XCLIENT a connection is that client's for good (the downstream would refuse
        a second XCLIENT: it re-checks its authorisation against the new client): only that
        same client session's messages may follow on it; the relay's own never."""
        if self.method.command != "XCLIENT" or self.carries is None:
            return True
        return client is not None and client.session == self.carries

    async def _forward(self, client: Client | None) -> Reply | None:
        m, c = self.method, self.client
        assert c is not None
        if client is None or not m.command:
            metrics.relay_forwarded("none")
            return None
        if m.command == "XCLIENT" and self.carries is not None:
            if self.carries != client.session:     # the scheduler reopens first (reusable_for)
                return self._forward_refused(m.command, Reply(0, "carries another client"))
            metrics.relay_forwarded("xclient")
            return None
        p = forward.plan(m, client)
        for line in p.lines:
            r = await self._words(line)
            if not (r.code == 250 or (m.command == "XCLIENT" and r.code == 220)):
                return self._forward_refused(m.command, r)
        if p.greeting is not None:
            # XCLIENT restarted the session (a new 220): greet as the client did, then AUTH
            # again if we use it (XCLIENT resets the downstream's SASL state).
            self.carries = client.session
            verb, name = p.greeting
            try:
                if verb == "HELO":
                    await c.helo(hostname=name)
                else:
                    await c.ehlo(hostname=name)
            except aiosmtplib.SMTPHeloError as e:
                return self._forward_refused(verb, Reply(e.code, _oneline(e.message)))
            await _auth_smtp(c, self.tls)
        metrics.relay_forwarded(m.command.lower())
        return None

    def _forward_refused(self, what: str, r: Reply) -> Reply:
        """Never sent unattributed, never as another client: this message waits (4xx)."""
        return Reply(451, f"4.7.0 {self.target.mta_name}: {what} refused: "
                          f"{_oneline(r.line(), 300)}", local=True)

    async def close(self) -> None:
        c, self.client = self.client, None
        if c is None:
            return
        if c.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.quit(), min(self.timeout, 2.0))
        c.close()

    ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)

    def _exts(self) -> set[str]:
        assert self.client is not None
        return set(self.client.esmtp_extensions)

    def _mail_refused(self, r: Reply) -> NoReturn:
        self._drop()
        raise Unavailable("connect", f"session refused MAIL: {r.line()}")

    async def _data(self, accepted: list[str], data: bytes, results: dict[str, Reply]) -> None:
        assert self.client is not None
        try:
            resp = await self.client.data(data)
            reply = Reply(resp.code, _oneline(resp.message))
        except aiosmtplib.SMTPDataError as e:
            reply = Reply(e.code, _oneline(e.message))
            await self._reset(reply)
        for rc in accepted:
            results[rc] = reply
        self.last_used = time.monotonic()

    async def _words(self, *words: bytes) -> Reply:
        # The commands are built here, not by aiosmtplib's mail()/rcpt() (which re-parse the
        # address with email.utils and may send something else): exactly the envelope.
        assert self.client is not None
        resp = await self.client.execute_command(*words)
        return Reply(resp.code, _oneline(resp.message))

    def _drop(self) -> None:
        c, self.client = self.client, None
        if c is not None:
            c.close()

    async def _reset(self, after: Reply | None) -> None:
        """End a transaction that did not complete: RSET, checked; else drop the connection."""
        c = self.client
        if c is None or not c.is_connected or (after is not None and after.code in (421, 503)):
            self._drop()
            return
        try:
            r = await self._words(b"RSET")
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self._drop()
            return
        if r.code != 250:
            self._drop()


class LmtpSession(_Transaction):
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


_DOT = re.compile(rb"(?m)^\.")


def make_session(target: Target, hostname: str, timeout: float) -> Session:
    if target.proto == "lmtp":
        return LmtpSession(target, hostname, timeout)
    return SmtpSession(target, hostname, timeout)

