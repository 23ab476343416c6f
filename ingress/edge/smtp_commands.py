"""The commands of a session: aiosmtpd's, each checked and accounted, and every reply cleaned.

API:
    CommandPhase    the base class of ingress.edge.smtp.IngressSMTP (below it:
                    ingress.edge.smtp_data's DataPhase, an aiosmtpd SMTP) that provides push()
                    and the smtp_* overrides; it uses the session's ctx
                    (ingress.edge.host.SessionHost), its Connection's views (lane, peer_ip,
                    peer_port, started: ingress.edge.connection.ConnView) and the accounting
                    state IngressSMTP sets up

What it changes of aiosmtpd's commands:
- 501 5.5.2 for NUL / invalid UTF-8 / control characters in HELO, EHLO, MAIL, RCPT, VRFY (aiosmtpd
  decodes them with surrogateescape whether or not the client said SMTPUTF8), and for any
  non-ASCII in a HELO/EHLO name (RFC 6531 3.7.1: A-labels only there); the decisions are
  ingress/policy/session_rules.py (pure);
- per-session error accounting in push() (every final reply passes there): the tarpit delay
  past smtp.soft_error_limit, 421 4.7.0 and a close at smtp.hard_error_limit, junk commands
  (NOOP/RSET/VRFY/HELP) and MAILs without a delivered message limited; after a 421 that closes
  the session, pipelined commands are not parsed (the handler task is cancelled, as on QUIT);
- every reply line replies.clean()ed in push() (no client control bytes echoed, 512 octets);
  multi-line replies leave in one write;
- STARTTLS inside TLS refused (503 5.5.1, RFC 3207); an address the stdlib parser chokes on
  ("a@": IndexError) is malformed (553 5.1.3), and the common <dot-atom@domain> form is parsed
  without the email package's full parser; AUTH is never offered (502 5.5.1).

Failure modes: bad input gets an SMTP reply and a log line, never a traceback (handle_exception:
the handler's 451 4.3.0). Limits: smtp.soft_error_limit, hard_error_limit and the other
session_rules limits (ingress.edge.context's ErrorPolicy).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiosmtpd.smtp import SMTP, syntax

from ingress.core import log, metrics
from ingress.core.metrics_labels import RcptResult
from ingress.edge.smtp_data import DataPhase
from ingress.policy import session_rules
from ingress.policy.replies import Refusal, clean, text
from ingress.policy.session_rules import Counters, Refused

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ADDRESS = re.compile(
    rf"\s*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>\s*(.*)\Z",
    re.DOTALL)



def _checked_command(name: str, check_arg: bool = True) -> Callable[..., Awaitable[None]]:
    """smtp_<name>: CommandPhase._checked (accounting; 501 5.5.2 for a bad argument), then
    aiosmtpd's own implementation of the command."""
    base = getattr(SMTP, "smtp_" + name)

    async def command(self: CommandPhase, arg: str | None) -> None:
        if await self._checked(name, arg if check_arg else None):
            await base(self, arg)

    command.__name__ = command.__qualname__ = "smtp_" + name
    return command




class CommandPhase(DataPhase):
    messages: int                  # messages delivered in this session
    last_reply: str
    handed_off: bool               # built by a lobby seat, which wrote the banner
    banner_due: bool               # the next push is aiosmtpd's banner
    close_after_reply: bool
    cut_off: bool                  # 421 written: nothing more is read or answered
    counters: Counters             # errors, junk commands, MAILs (session_rules)
    _counted_messages: int         # self.messages when the counters last started afresh
    _command: str                  # the command the next final reply answers
    _logged: bool                  # the next final reply's refusal is logged already
    _continuation: list[bytes]     # the lines of a multi-line reply so far

    async def push(self, status: str | bytes) -> None:
        """As aiosmtpd's, but every line replies.clean()ed (aiosmtpd echoes client bytes), and
        the lines of a multi-line reply (EHLO) go out in one write: one system call, not seven."""
        if self.banner_due:
            self.banner_due = False
            if self.handed_off:            # the lobby seat wrote it (and observed it)
                return
            metrics.observe_banner(self.lane, time.monotonic() - self.started)
        if isinstance(status, bytes):
            status = status.decode("utf-8", "surrogateescape")
        line = clean(status).encode("utf-8" if self.enable_SMTPUTF8 else "ascii", "replace")
        if line[3:4] == b"-":
            self._continuation.append(line + b"\r\n")
            return
        if self.cut_off:                   # pipelined commands after our 421: not answered
            await self._stop_reading()
            return
        self.last_reply = line[:3].decode("ascii", "replace")
        line += b"\r\n" + await self._account(line)
        transport = self._writer.transport
        if transport is None or transport.is_closing():
            # Closed meanwhile (aiosmtpd's own "502 ... goodbye", a deadline, the client): a
            # closed TLS transport raises on write, so nothing more is written or read.
            self._continuation.clear()
            await self._stop_reading()
            return
        if self._continuation:
            self._continuation.append(line)
            self._writer.write(b"".join(self._continuation))
            self._continuation.clear()
        else:
            self._writer.write(line)
        if self.close_after_reply and self.transport is not None:
            self.transport.close()         # after the reply: close() flushes what is written
            await self._stop_reading()
            return
        await self._writer.drain()

    async def _account(self, line: bytes) -> bytes:
        """Per-session error accounting for one final reply (session_rules.after_reply): the
        tarpit delay before it, and at the hard limit the 421 line to send after it (returned;
        the session is then closed). Counts start afresh once a message was delivered."""
        if self.messages != self._counted_messages:
            self._counted_messages = self.messages
            self.counters = session_rules.delivered(self.counters)
        command, self._command = self._command, ""
        logged, self._logged = self._logged, False
        text = line[:9].decode("ascii", "replace")
        step = session_rules.after_reply(self.counters, self.ctx.error_policy, text, command)
        if not logged and session_rules.is_error_reply(text):
            # aiosmtpd's own refusals (500, 501 syntax, 503 sequence, 555 ...) get a line too
            log.refused("command_error", self.peer_ip, stage=command.lower() or "command",
                        code=text[:3], reason="protocol", port=self.peer_port,
                        lane=self.lane.value, command=command,
                        reply=line[:80].decode("utf-8", "replace"), errors=step.counters.errors)
        self.counters = step.counters
        if step.delay > 0:
            log.throttled("error_delay", self.peer_ip, port=self.peer_port,
                          errors=step.counters.errors, delay_ms=round(step.delay * 1000, 1))
            await asyncio.sleep(step.delay)
        if not step.cut_off:
            return b""
        refusal = session_rules.cut_off_refusal(self.hostname)
        self._refused(refusal, command, why="errors", errors=step.counters.errors)
        self._logged = False
        self.close_after_reply = True
        self.last_reply = refusal.reply[:3]
        return refusal.reply.encode() + b"\r\n"

    async def _stop_reading(self) -> None:
        """After a 421 and close(): aiosmtpd would go on parsing what the client pipelined
        (already buffered, so without yielding) until connection_lost runs; stop it here, as
        its own QUIT does."""
        self.cut_off = True
        task = self._handler_coroutine
        if task is asyncio.current_task() and task is not None:
            task.cancel()
            # No local may hold the task across the await: the CancelledError's traceback
            # keeps this frame and the task keeps the error, a cycle only a full collection
            # would free (ingress.core.child.settle_heap).
            del task
            await asyncio.sleep(0)         # the CancelledError is raised here

    def _refused(self, refusal: Refused, command: str, **fields: Any) -> str:
        """Log line, metric and close flag for one of session_rules' refusals; the reply.
        The reason token is the `why` field when there is one, else the event."""
        log.refused(refusal.event, self.peer_ip, stage=command.lower() or "command",
                    code=refusal.reply[:3],
                    reason=str(fields.get("why") or refusal.event), port=self.peer_port,
                    lane=self.lane.value, command=command, **fields)
        self._logged = True
        if isinstance(refusal.metric, RcptResult):
            metrics.recipient(self.lane, refusal.metric)
        else:
            metrics.message(self.lane, refusal.metric)
        if refusal.close:
            self.close_after_reply = True
        return refusal.reply

    async def _checked(self, command: str, arg: str | None) -> bool:
        """Every command we parse passes here first: it names the command for the accounting
        and refuses NUL, invalid UTF-8 and control characters in its argument (501 5.5.2)."""
        self._command = command
        if self.cut_off:
            await self._stop_reading()
            return False
        why = session_rules.check_argument(arg, command)
        if why is None:
            return True
        await self.push(self._refused(session_rules.argument_refusal(why, command), command,
                                      why=why, arg=repr(arg)[:200]))
        return False

    smtp_HELO = _checked_command("HELO")
    smtp_EHLO = _checked_command("EHLO")
    smtp_MAIL = _checked_command("MAIL")
    smtp_RCPT = _checked_command("RCPT")
    smtp_NOOP = _checked_command("NOOP", check_arg=False)
    smtp_RSET = _checked_command("RSET", check_arg=False)
    smtp_VRFY = _checked_command("VRFY")
    smtp_HELP = _checked_command("HELP", check_arg=False)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207 4.2: no STARTTLS inside TLS (aiosmtpd would start TLS inside TLS)."""
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common case, <dot-atom@domain> [params], without the email package's full
        RFC 5322 parser (5% of a session's CPU); anything else goes the long way, where what
        the parser raises besides HeaderParseError ("a@": IndexError) is a malformed address."""
        m = _SIMPLE_ADDRESS.match(arg) if arg else None
        if m is not None and not self.local_part_limit:
            return m.group(1), m.group(2)
        try:
            return super()._getaddr(arg)
        except (IndexError, ValueError):   # the stdlib parser on "a@": a malformed address
            return None, None               # (553 5.1.3 for MAIL/RCPT, 502 for VRFY)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an exception in a command: the handler's 451 4.3.0, told whose
        session it was (its line names the client)."""
        return cast(str, await self.ctx.handler.handle_exception(error, self))

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(text(Refusal.AUTH_NOT_OFFERED))
