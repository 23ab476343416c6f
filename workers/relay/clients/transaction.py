"""One mail transaction to the downstream, the same for SMTP and LMTP: what is sent (the plan),
MAIL FROM, one RCPT per recipient, then the protocol's own DATA; and how its failures are told.

API:
    Session                              the protocol the scheduler drives (both sessions):
        `await open()`, `await deliver(mail_from, rcpts, data, smtputf8, client=None) ->
        {rcpt: Reply}`, `await close()`, .connected, .messages, .last_used, .tls (a
        tls.TlsPolicy) and .forward (relay.forward_client), both set before open;
        .reusable_for(client)
    Transaction                          the base of smtp.SmtpSession and
                                         lmtp.LmtpSession: deliver() over the
                                         connection the subclass provides
    Unavailable(stage, why, partial)     connection-level trouble (see below)
    ForwardUnavailable                   relay.forward_client forces a method not offered

Sending: MAIL FROM / RCPT TO exactly as in the envelope (the commands are built here), the
message byte-exact (dot-stuffed on the wire); SMTPUTF8 when the envelope says so or an address
needs it and the downstream offers it; BODY=8BITMIME when the body has 8-bit bytes and the
downstream offers it. An address that cannot be sent (state.address_problem) is refused here
for its recipient alone (5.1.7 for the sender: then every recipient). For SMTP the DATA reply
applies to every accepted RCPT; for LMTP (RFC 2033) there is one reply per accepted RCPT.
A transaction that did not complete is RSET (checked) or the connection dropped: a session is
never reused dirty (a 421 or 503 drops it). The original client (forward.py) is given to the
downstream right before MAIL FROM, only when a transaction follows (Transaction._forward; SMTP
only: smtp.py).

Failure modes: Unavailable(stage="connect") when a session cannot be opened (refused, greeting
or EHLO/LHLO not 2xx, timeout, any TLS or AUTH refusal: tls.TlsFailure, an OSError) or a
session refuses MAIL with 421/503 -- nothing of the message was sent; stage "rcpt" / "data"
when the connection fails later, with `partial` holding the final replies received before that
(they stand). Anything else (a bug, a cancel) drops the connection and propagates.
Limits: the message is held in memory while it is sent.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, Protocol

from ingress.core import metrics
from workers.relay.forward import Client
from workers.spool.state import Reply, _oneline, address_problem


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


class Transaction:
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
