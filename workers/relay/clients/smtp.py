"""The relay's SMTP client: one aiosmtplib connection to the downstream, reused across
messages, with STARTTLS / AUTH (tls.py) and the original client (XCLIENT / XFORWARD).

API:
    SmtpSession(target, hostname, timeout)   a transaction.Session: open(), deliver(),
                                             close(), reusable_for(client); .tls and .forward
                                             are set before open()

The original client (workers/relay/forward.py decides and encodes): open() picks the method
from the EHLO after STARTTLS; a forced one the downstream does not offer fails the open
(ForwardUnavailable, a connection-level failure: the breaker backs off, the mail waits, the
relay_downstream_down line names why, smtp_ingress_relay_forward_missing_total counts it).
deliver() sends it right before MAIL FROM, only when a transaction follows: XFORWARD lines each
time (the downstream forgets them after the transaction); XCLIENT once per connection, then the
client's own HELO/EHLO (and AUTH again if used: XCLIENT resets it). After XCLIENT the
connection is that client session's: reusable_for() says no to any other (the scheduler then
opens a fresh one), and the relay's own messages (client None) never go on it. A refusal of
XCLIENT/XFORWARD or of the greeting after it is that message's 451 4.7.0 (never sent
unattributed or as someone else), and the connection is dropped.

Failure modes: as transaction.py says (Unavailable at open for anything aiosmtplib, the socket
or tls.py raises; the transaction's own stages after that). The commands MAIL and RCPT are
built by the transaction, not by aiosmtplib's mail()/rcpt().
Limits: one connection per session; a QUIT waits at most min(timeout, 2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import NoReturn

import aiosmtplib

from ingress.core import metrics
from ingress.core.downstream import Target
from workers.relay import forward
from workers.relay.clients.tls import PLAIN, TlsPolicy, auth_smtp, secure_smtp
from workers.relay.clients.transaction import ForwardUnavailable, Transaction, Unavailable
from workers.relay.forward import Client
from workers.spool.state import Reply, _oneline


class SmtpSession(Transaction):
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
            await auth_smtp(c, self.tls)
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
