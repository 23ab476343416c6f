"""Relay process: drains spool/new to the downstream MTA (SMTP or LMTP) with retries and DSNs.

API:
    run(cfg, hb=None, slot=0)       the process entry point (spawned by the supervisor only when
                                    relay.downstream is set; with "" the spool is the destination)
    Pure parts (unit-tested): parse_downstream(url) -> Target, backoff(attempt, base, maximum),
    Reply (code, text, .status), RelayState (per-message state, JSON), settle(state, results,
    rcpts=...) -> Outcome, failure_for(rcpt, reply, expired) -> Failure, build_dsn(...) -> bytes,
    address_problem(addr, sender=, utf8=) -> Reply | None (can this address be sent at all).
    Sessions: SmtpSession (aiosmtplib), LmtpSession (asyncio streams; TCP or unix socket), both
    `await open()`, `await deliver(mail_from, rcpts, data, smtputf8) -> {rcpt: Reply}`, `close()`;
    they raise Unavailable for connection-level trouble.

What it does, per spool file in new/ (oldest first, at most relay.concurrency at once, each
worker task keeping its own downstream connection for reuse and closing it after IDLE_CLOSE):
  - sends the stored message minus our X-Ingress-Envelope line (trace headers kept), byte-exact
    (CRLF, dot-stuffed on the wire), MAIL FROM / RCPT TO exactly as in the envelope; SMTPUTF8
    when the envelope says so or an address needs it, and the downstream offers it;
    BODY=8BITMIME when the body has 8-bit bytes and the downstream offers it;
  - an address that cannot be sent is refused here, before the transaction, for its recipient
    alone (the others still go): NUL, CR, LF, any control character, space, <>, a path over
    254 octets (5.1.3; 5.1.7 for the sender: then every recipient), non-ASCII when the
    downstream has no SMTPUTF8 (5.6.7, RFC 6531). Old spool files, DSNs and acceptor bugs
    can carry such addresses; the relay does not rely on the acceptor's checks;
  - per recipient (RCPT replies; for LMTP one reply per recipient after DATA; for SMTP the DATA
    reply applies to every accepted RCPT): 2xx -> delivered, recorded and never sent again;
    5xx -> failed; 4xx -> deferred;
  - failed recipients get one RFC 3464 DSN (multipart/report; report-type=delivery-status) to the
    envelope sender with MAIL FROM:<>, written into spool/new as an ordinary spool file (so it is
    itself relayed, retried and durable); never for the null sender (logged only);
  - deferred recipients are retried after backoff(attempt) = retry_base * 2**(attempt-1), capped
    at retry_max; once the message is older than max_age a tempfail becomes failed with status
    4.4.7 (Action: failed) and is bounced;
  - the file is unlinked once every recipient is delivered, moved to failed/ once every recipient
    is settled and at least one failed.

Durable retry state: one small JSON file per message that has been tried, spool/relay/<name>,
written tmp + fsync + rename + fsync(dir): attempts, next_at (wall clock), delivered, failed,
last_error. Every recipient of the message without a result stays pending (the file is never
finished while one has none). A file rather than the file name (name changes would race the scan
and break the name the acceptor logged) or the spool file itself (rewriting a 10 MB message to
record one recipient is wasteful, and spool.py owns that format). Missing state = never tried.
State files without a spool file (a crash between finishing a message and removing its state) are
removed at start, and tmp leftovers too unless another relay (a reload overlap) holds that spool
file's lock: it writes state files only under it. The spool file is flock()ed while it is being
delivered, so two relays (a reload overlap) never deliver one file at once; a file unlinked under
us is noticed (st_nlink == 0) and skipped.
Operator tools (workers/queue_ops.py, `smtp-ingress queue`) take the same flock; the relay
keeps a failed message's final state in spool/relay.failed/<name> (for requeue-failed) and
reschedules a known message at once when spool/retry/<name> appears (queue retry).

Downstream down: only a failure to open a session (connect refused, greeting/EHLO not 2xx, timeout)
is connection-level: it opens a circuit breaker (nothing is sent until backoff(consecutive
failures) has passed, then one delivery at a time probes until a session opens) and does not count
against the message (put back unchanged). A stale reused session (or one that answers MAIL with 421
or 503) is retried once on a fresh one. Anything after a session opened -- a reply, a hang-up, a
timeout, any exception (an encoding error, a bug) -- is that message's: a 4xx for its pending
recipients (attempt, backoff, 4.4.7 at max_age; final replies already received, such as a RCPT's
550 or LMTP's per-recipient replies, stand), and the session is RSET (checked) or dropped, never
reused dirty. So a message that makes the downstream hang up backs off on its own and can never be
the breaker's eternal probe, and a half-open transaction can never give the next message a 503 (a
503 is never a bounce anyway: bad sequence is our state, not the message). Errors while recording a
result (disk) back off in memory. Mail waits and drains once the downstream is back, without a busy
loop. The breaker is in memory: after a restart the first delivery is the probe.

Duplicates are possible exactly when the downstream has taken responsibility and we did not
record it: (1) the process dies (kill -9, power loss) after the downstream's 2xx and before the
state write / unlink; (2) the reply to the final "." is lost (timeout, dropped connection, or a
stop that cancels a delivery waiting for it) although the downstream accepted the message (RFC
1047); a lost reply is logged as relay_unsure with the qid; (3) a DSN was spooled and the process
died before the failure was recorded, so the recipient is tried again and a second DSN may be
spooled. Mail is never lost to these windows:
the spool file is removed only after the reply is recorded.

Signals: SIGUSR2 (the supervisor) stops taking new work, lets in-flight deliveries finish for up
to STOP_GRACE seconds, then cancels the rest (no file whose delivery did not finish is touched),
exits 0. SIGTERM/SIGINT/SIGHUP are ignored (the supervisor drains us in order). Orphaned (the
parent changed) -> the same stop. The heartbeat slot is written by a task of the event loop
(signals, heartbeat and parent check: ingress.core.child).

Limits: one relay process; the new/ scan is O(files) and runs at most every SCAN_MIN seconds,
stretched to 10x its own duration for huge spools; state writes and fsyncs are done on the event
loop (this process has nothing latency-critical; it keeps the bookkeeping after a reply
atomic with respect to cancellation). STARTTLS and AUTH PLAIN to a TCP downstream as relay.tls
says (workers/relay_tls.py; a refusal is a connection-level failure). The message is held in
memory while it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import heapq
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import aiosmtplib
import orjson

from ingress.core import child, log, metrics
from ingress.core.config import Config, RelayConfig
from ingress.core.downstream import Target, parse_downstream
from ingress.core.wire import Envelope, Lane, new_qid
from workers import relay_tls
from workers import spool as spool_mod

SCAN_MIN = 0.25            # seconds between two scans of new/ (at least)
IDLE_CLOSE = 5.0           # a downstream connection idle this long is closed (QUIT)
MAX_PER_CONNECTION = 500   # messages per downstream connection, then a fresh one
STOP_GRACE = 3.0           # SIGUSR2: in-flight deliveries may finish within this
HEADERS_MAX = 64 * 1024    # original headers quoted in a DSN at most
KEPT_STATE_DIR = "relay.failed"  # spool/relay.failed/<name>: a failed message's state (requeue)
RETRY_REQUEST_DIR = "retry"  # spool/retry/<name>: `smtp-ingress queue retry` asks for it now


# --- pure parts ----------------------------------------------------------------------------------

def backoff(attempt: int, base: float, maximum: float) -> float:
    """Delay before retry number `attempt` (1 = the first retry): base doubling, capped."""
    if attempt <= 0:
        return 0.0
    return min(base * 2.0 ** min(attempt - 1, 64), maximum)


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Reply:
    """One downstream reply for one recipient. local=True: made up here (connection trouble)."""
    code: int
    text: str
    local: bool = False

    @property
    def kind(self) -> Literal["ok", "temp", "perm"]:
        if 200 <= self.code < 300:
            return "ok"
        if self.code == 503:
            # Bad sequence of commands: our session is out of step (a half-open transaction),
            # never a verdict on the message. Retried; at max_age it fails as 4.4.7.
            return "temp"
        return "perm" if 500 <= self.code < 600 else "temp"

    @property
    def status(self) -> str:
        """The RFC 3463 status: the enhanced code in the text, else derived from the class."""
        m = _ENHANCED.match(self.text.strip())
        if m and m.group(1) == str(self.code // 100):
            return ".".join(m.groups())
        return {"ok": "2.0.0", "temp": "4.0.0", "perm": "5.0.0"}[self.kind]

    def line(self) -> str:
        return f"{self.code} {self.text}".strip()


ADDRESS_MAX = 254     # octets in a path without its <> (RFC 5321 4.5.3.1.3: 256 with them)


def _unsafe_char(c: str) -> bool:
    o = ord(c)
    return (o <= 0x20 or o == 0x7f or 0x80 <= o <= 0x9f or 0xd800 <= o <= 0xdfff
            or c in "<>\u2028\u2029")


def address_problem(addr: str, *, sender: bool, utf8: bool) -> Reply | None:
    """Why `addr` cannot go into MAIL FROM (sender=True) or RCPT TO, as the local permanent
    Reply to record for it; None if it can. Pure. `utf8`: the downstream offers SMTPUTF8.

    Refused: NUL, CR, LF and every other control character (C0, DEL, C1, U+2028/9), space,
    angle brackets, lone surrogates (command or parameter injection, or not encodable at all)
    -> 5.1.3 (5.1.7 for the sender); a path over ADDRESS_MAX octets -> the same; a non-ASCII
    address when the downstream has no SMTPUTF8 -> 5.6.7 (RFC 6531 3.2). The null sender is
    fine; an empty recipient is not."""
    bad = "5.1.7 bad sender address syntax" if sender else "5.1.3 bad recipient address syntax"
    if addr == "":
        return None if sender else Reply(553, bad + ": empty", local=True)
    if len(addr) > ADDRESS_MAX:
        return Reply(553, f"{bad}: longer than {ADDRESS_MAX} octets", local=True)
    if any(map(_unsafe_char, addr)):
        return Reply(553, f"{bad}: control character, space or angle bracket", local=True)
    if len(addr.encode("utf-8")) > ADDRESS_MAX:
        return Reply(553, f"{bad}: longer than {ADDRESS_MAX} octets", local=True)
    if not utf8 and not addr.isascii():
        return Reply(553, "5.6.7 non-ASCII address and the downstream does not offer SMTPUTF8",
                     local=True)
    return None


def envelope_sender(env: dict[str, Any]) -> str:
    """MAIL FROM of a spool envelope; the null sender is "" (the acceptor may store "<>")."""
    sender = str(env["mail_from"]).strip()
    return "" if sender in ("", "<>") else sender


def _oneline(text: str, limit: int = 900) -> str:
    return " ".join(text.split())[:limit]


@dataclass
class RelayState:
    """What is durably known about one message's relaying (spool/relay/<name>)."""
    attempts: int = 0                  # deliveries that ended with something deferred
    next_at: float = 0.0               # wall clock: not before this
    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    last_error: str = ""

    def pending(self, rcpts: Sequence[str]) -> list[str]:
        settled = set(self.delivered) | set(self.failed)
        out: list[str] = []
        for r in rcpts:
            if r not in settled and r not in out:
                out.append(r)
        return out

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, "attempts": self.attempts, "next_at": self.next_at,
                             "delivered": self.delivered, "failed": self.failed,
                             "last_error": self.last_error})

    @classmethod
    def decode(cls, raw: bytes) -> RelayState:
        d = orjson.loads(raw)
        return cls(attempts=int(d.get("attempts", 0)), next_at=float(d.get("next_at", 0.0)),
                   delivered=[str(x) for x in d.get("delivered", [])],
                   failed=[str(x) for x in d.get("failed", [])],
                   last_error=str(d.get("last_error", "")))


@dataclass(frozen=True)
class Failure:
    """One recipient to report in a DSN."""
    rcpt: str
    status: str                 # RFC 3463, e.g. "5.1.1" or "4.4.7"
    diagnostic: str             # "smtp; 550 5.1.1 ..." or "X-Ingress; ..." ("" = none)
    reply: str                  # human-readable reason


def failure_for(rcpt: str, reply: Reply, expired: bool = False) -> Failure:
    line = _oneline(reply.line())
    diag = f"X-Ingress; {line}" if reply.local else f"smtp; {line}"
    if expired:
        return Failure(rcpt, "4.4.7", diag, f"delivery time expired; last error: {line}")
    return Failure(rcpt, reply.status, diag, line)


@dataclass(frozen=True)
class Outcome:
    state: RelayState
    bounce: tuple[Failure, ...]          # newly failed recipients: report them now
    disposition: Literal["done", "failed", "retry"]
    delivered_now: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()


_NO_RESULT = Reply(451, "4.3.0 no result for this recipient", local=True)


def settle(state: RelayState, results: dict[str, Reply], *, rcpts: Sequence[str], now: float,
           received_at: float, cfg: RelayConfig) -> Outcome:
    """Fold one delivery attempt's per-recipient results into the state. Pure.

    Every recipient of the message (`rcpts`) not settled in `state` is pending. A pending
    recipient missing from `results` (or with a 4xx) is deferred, so the message is never
    finished while a recipient has no result; once the message is older than cfg.max_age a
    deferral is a failure with status 4.4.7. Results for recipients that are not pending
    (not in the message, or already settled) are ignored."""
    pending = state.pending(rcpts)
    new = RelayState(state.attempts, state.next_at, list(state.delivered), list(state.failed),
                     state.last_error)
    bounce: list[Failure] = []
    delivered: list[str] = []
    deferred: list[str] = []
    expired = now - received_at >= cfg.max_age
    for rcpt in pending:
        reply = results.get(rcpt, _NO_RESULT)
        if reply.kind == "ok":
            new.delivered.append(rcpt)
            delivered.append(rcpt)
        elif reply.kind == "perm":
            new.failed.append(rcpt)
            bounce.append(failure_for(rcpt, reply))
        elif expired:
            new.failed.append(rcpt)
            bounce.append(failure_for(rcpt, reply, expired=True))
        else:
            deferred.append(rcpt)
            new.last_error = _oneline(reply.line(), 300)
    if deferred:
        new.attempts += 1
        new.next_at = now + backoff(new.attempts, cfg.retry_base, cfg.retry_max)
        disp: Literal["done", "failed", "retry"] = "retry"
    else:
        disp = "failed" if new.failed else "done"
    return Outcome(new, tuple(bounce), disp, tuple(delivered), tuple(deferred))


def _headers_of(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    if len(head) > HEADERS_MAX:
        cut = head.rfind(b"\r\n", 0, HEADERS_MAX)
        head = head[:cut + 2] if cut > 0 else head[:HEADERS_MAX] + b"\r\n"
    if not head.endswith(b"\r\n"):
        head += b"\r\n"
    return head


def build_dsn(*, reporting_mta: str, sender: str, qid: str, arrival: float, now: float,
              failures: Sequence[Failure], original: bytes, remote_mta: str = "",
              dsn_id: str = "", boundary: str = "") -> bytes:
    """An RFC 3464 delivery status notification (bytes, CRLF) for `failures` of one message.

    `original` is the relayed message (trace headers + client bytes); only its header section
    is quoted, as text/rfc822-headers (message/global-headers when it is not ASCII, and the
    RFC 6533 global types when an address is not ASCII)."""
    headers = _headers_of(original)
    utf8_addr = not sender.isascii() or any(not f.rcpt.isascii() for f in failures)
    status_type = "message/global-delivery-status" if utf8_addr else "message/delivery-status"
    headers_type = ("message/global-headers" if utf8_addr or not headers.isascii()
                    else "text/rfc822-headers")
    addr_type = "utf-8" if utf8_addr else "rfc822"
    boundary = boundary or f"{qid}.{uuid.uuid4().hex}/{reporting_mta}"
    mta = _UNPRINTABLE.sub("?", reporting_mta)

    def clean(s: str) -> str:
        return _UNPRINTABLE.sub("?", s) if not utf8_addr else "".join(
            c for c in s if c.isprintable())

    human = [
        f"This is the mail system at host {mta}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients.",
        "",
    ]
    for f in failures:
        via = f" (via {clean(remote_mta)})" if remote_mta else ""
        human.append(f"<{clean(f.rcpt)}>{via}: {clean(f.reply)}")
    human.append("")
    per_msg = [f"Reporting-MTA: dns; {mta}",
               f"X-Ingress-Queue-ID: {clean(qid)}",
               f"Arrival-Date: {email.utils.formatdate(arrival)}"]
    per_rcpt: list[str] = []
    for f in failures:
        per_rcpt += ["", f"Final-Recipient: {addr_type}; {clean(f.rcpt)}", "Action: failed",
                     f"Status: {f.status}"]
        if remote_mta:
            per_rcpt.append(f"Remote-MTA: dns; {clean(remote_mta)}")
        if f.diagnostic:
            per_rcpt.append(f"Diagnostic-Code: {clean(f.diagnostic)}")
        per_rcpt.append(f"Last-Attempt-Date: {email.utils.formatdate(now)}")
    to = clean(sender)
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{to}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: <{clean(dsn_id or qid + '.dsn')}@{mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={'utf-8' if utf8_addr else 'us-ascii'}",
        "",
        *human,
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: {status_type}",
        "",
        *per_msg,
        *per_rcpt,
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        f"Content-Type: {headers_type}",
        "",
    ]
    text = "\r\n".join(head).encode("utf-8") + b"\r\n"
    return text + headers + f"\r\n--{boundary}--\r\n".encode()


# --- downstream sessions ----------------------------------------------------------------------

class Unavailable(Exception):
    """Connection-level trouble. stage='connect': nothing of this message was sent.
    `partial`: the final per-recipient replies already received (RCPT refusals, LMTP replies
    after DATA) -- they stand whatever happened to the connection after them."""

    def __init__(self, stage: str, why: str, partial: dict[str, Reply] | None = None) -> None:
        super().__init__(f"{stage}: {why}")
        self.stage, self.why = stage, why
        self.partial = dict(partial or {})


class Session(Protocol):
    messages: int
    last_used: float

    @property
    def connected(self) -> bool: ...
    async def open(self) -> None: ...
    async def deliver(self, mail_from: str, rcpts: Sequence[str], data: bytes,
                      smtputf8: bool) -> dict[str, Reply]: ...
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


class SmtpSession:
    """SMTP to the downstream with aiosmtplib (one connection, reused across messages)."""

    def __init__(self, target: Target, hostname: str, timeout: float) -> None:
        self.target, self.hostname, self.timeout = target, hostname, timeout
        self.client: aiosmtplib.SMTP | None = None
        self.tls: relay_tls.TlsPolicy = relay_tls.PLAIN
        self.messages = 0
        self.last_used = time.monotonic()

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
            await relay_tls.secure_smtp(client, self.tls)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            client.close()
            raise Unavailable("connect", _oneline(str(e), 300)) from None
        self.client, self.messages, self.last_used = client, 0, time.monotonic()

    async def close(self) -> None:
        c, self.client = self.client, None
        if c is None:
            return
        if c.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.quit(), min(self.timeout, 2.0))
        c.close()

    async def deliver(self, mail_from: str, rcpts: Sequence[str], data: bytes,
                      smtputf8: bool) -> dict[str, Reply]:
        c = self.client
        if c is None or not c.is_connected:
            raise Unavailable("connect", "not connected")
        self.messages += 1
        self.last_used = time.monotonic()
        params, send, results = _plan(mail_from, rcpts, smtputf8, not data.isascii(),
                                      set(c.esmtp_extensions))
        if not send:
            return results
        enc = "utf-8" if "SMTPUTF8" in params else "ascii"
        stage = "connect"        # until the downstream answered MAIL FROM
        try:
            # The commands are built here, not by aiosmtplib's mail()/rcpt() (which re-parse
            # the address with email.utils and may send something else): exactly the envelope.
            r = await self._cmd(b"MAIL", b"FROM:<" + mail_from.encode(enc) + b">",
                                *(p.encode("ascii") for p in params))
            if r.code in (421, 503):  # closing, or out of step: the session's, not the message's
                self._abort()
                raise Unavailable("connect", f"session refused MAIL: {r.line()}")
            if r.kind != "ok":
                await self._reset(r)
                results.update(dict.fromkeys(send, r))
                return results
            stage = "rcpt"
            accepted: list[str] = []
            for i, rc in enumerate(send):
                r = await self._cmd(b"RCPT", b"TO:<" + rc.encode(enc) + b">")
                if r.kind == "ok":
                    accepted.append(rc)
                    continue
                results[rc] = r
                if r.code in (421, 503):   # closing, or out of step: the rest are deferred too
                    for rest in send[i + 1:]:
                        results[rest] = r
                    self._abort()
                    for a in accepted:
                        results[a] = r
                    return results
            if not accepted:
                await self._reset(None)
                return results
            stage = "data"
            try:
                resp = await c.data(data)
                reply = Reply(resp.code, _oneline(resp.message))
            except aiosmtplib.SMTPDataError as e:
                reply = Reply(e.code, _oneline(e.message))
                await self._reset(reply)
            for rc in accepted:
                results[rc] = reply
            self.last_used = time.monotonic()
            return results
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            self._abort()
            raise Unavailable(stage, _oneline(f"{type(e).__name__}: {e}", 300), results) from None
        except BaseException:
            self._abort()             # anything else (a bug, a cancel): never reuse it dirty
            raise

    async def _cmd(self, *args: bytes) -> Reply:
        assert self.client is not None
        resp = await self.client.execute_command(*args)
        return Reply(resp.code, _oneline(resp.message))

    def _abort(self) -> None:
        c, self.client = self.client, None
        if c is not None:
            c.close()

    async def _reset(self, after: Reply | None) -> None:
        """End a transaction that did not complete: RSET, checked; else drop the connection."""
        c = self.client
        if c is None or not c.is_connected or (after is not None and after.code in (421, 503)):
            self._abort()
            return
        try:
            r = await self._cmd(b"RSET")
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self._abort()
            return
        if r.code != 250:
            self._abort()


class LmtpSession:
    """LMTP (RFC 2033) over asyncio streams: LHLO, then one reply per accepted RCPT after DATA.

    aiosmtplib has no LMTP; the protocol is small enough that a minimal client is clearer than
    bending an SMTP client (DATA's per-recipient replies) or running smtplib.LMTP in threads."""

    def __init__(self, target: Target, hostname: str, timeout: float) -> None:
        self.target, self.hostname, self.timeout = target, hostname, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.exts: set[str] = set()
        self.tls: relay_tls.TlsPolicy = relay_tls.PLAIN
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
            assert self.reader is not None
            self.writer.write(f"LHLO {self.hostname}\r\n".encode())
            await asyncio.wait_for(self.writer.drain(), self.timeout)
            lines: list[str] = []
            while True:
                raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
                if not raw.endswith(b"\n"):
                    raise ConnectionError("connection closed during LHLO")
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line)
                if line[3:4] != "-":
                    break
            if not lines[-1].startswith("250"):
                raise ConnectionError(f"LHLO refused: {lines[-1]}")
            self.exts = {ln[4:].split(" ")[0].lower() for ln in lines[1:]}
            await relay_tls.secure_lmtp(self, self.tls)
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

    async def deliver(self, mail_from: str, rcpts: Sequence[str], data: bytes,
                      smtputf8: bool) -> dict[str, Reply]:
        if not self.connected:
            raise Unavailable("connect", "not connected")
        self.messages += 1
        self.last_used = time.monotonic()
        params, send, results = _plan(mail_from, rcpts, smtputf8, not data.isascii(), self.exts)
        if not send:
            return results
        enc = "utf-8" if "SMTPUTF8" in params else "ascii"
        tail = b"".join(b" " + p.encode() for p in params)
        stage = "connect"
        try:
            r = await self._cmd(b"MAIL FROM:<" + mail_from.encode(enc) + b">" + tail)
            if r.code in (421, 503):  # closing, or out of step: the session's, not the message's
                raise ConnectionError(f"session refused MAIL: {r.line()}")
            if r.kind != "ok":
                await self._reset(r)
                results.update(dict.fromkeys(send, r))
                return results
            stage = "rcpt"
            accepted: list[str] = []
            for i, rcpt in enumerate(send):
                r = await self._cmd(b"RCPT TO:<" + rcpt.encode(enc) + b">")
                if r.kind == "ok":
                    accepted.append(rcpt)
                    continue
                results[rcpt] = r
                if r.code in (421, 503):   # closing, or out of step: the rest are deferred too
                    for rest in [*send[i + 1:], *accepted]:
                        results[rest] = r
                    self._drop()
                    return results
            if not accepted:
                await self._reset(None)
                return results
            stage = "data"
            r = await self._cmd(b"DATA")
            if r.code != 354:
                for rcpt in accepted:
                    results[rcpt] = r
                await self._reset(r)
                return results
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
            return results
        except (OSError, TimeoutError, ConnectionError, UnicodeError) as e:
            self._drop()
            raise Unavailable(stage, _oneline(f"{type(e).__name__}: {e}", 300), results) from None
        except BaseException:
            self._drop()              # anything else (a bug, a cancel): never reuse it dirty
            raise

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


# --- spool-side I/O ---------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(state_dir: Path, name: str, state: RelayState) -> None:
    """Atomically and durably replace spool/relay/<name>."""
    tmp = state_dir / f".tmp.{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, state.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, state_dir / name)
    _fsync_dir(state_dir)


def read_state(state_dir: Path, name: str) -> RelayState:
    try:
        return RelayState.decode((state_dir / name).read_bytes())
    except FileNotFoundError:
        return RelayState()
    except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
        # A torn state file cannot happen (rename is atomic); a corrupt one is treated as "never
        # tried": that may resend to delivered recipients, which beats losing the message.
        log.event("relay_state_corrupt", "error", name=name, error=str(e))
        return RelayState()


# --- the relay ---------------------------------------------------------------------------------

class Relay:
    def __init__(self, cfg: Config, hb: Any = None, slot: int = 0) -> None:
        self.cfg, self.rc = cfg, cfg.relay
        self.target = parse_downstream(cfg.relay.downstream)
        self.heart = child.Heartbeat(hb, slot)
        self.spool = spool_mod.Spool(cfg.spool.path)
        self.state_dir = self.spool.root / "relay"
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.kept_dir = self.spool.root / KEPT_STATE_DIR            # see workers/queue_ops.py
        self.kept_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.retry_dir = self.spool.root / RETRY_REQUEST_DIR
        self.retry_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.hostname = cfg.smtp.hostname
        self.tls = relay_tls.policy(cfg.relay, self.target)
        self.known: dict[str, float] = {}          # name -> next_at (wall), not in flight
        self.heap: list[tuple[float, str]] = []
        self.inflight: set[str] = set()
        self.stopping = False
        self.wake = asyncio.Event()
        self.down_failures = 0                     # consecutive connection-level failures
        self.down_until = 0.0                      # monotonic; breaker open until then
        self.probe: str | None = None              # the one delivery allowed while half-open
        self.errors: dict[str, int] = {}           # name -> consecutive unexpected errors
        self.counters = {"sent": 0, "rcpt_delivered": 0, "deferred": 0, "bounced": 0,
                         "dsn_spooled": 0, "null_sender_failed": 0, "down": 0, "corrupt": 0}

    # --- scheduling ------------------------------------------------------------------------

    def cleanup_states(self) -> int:
        """Remove state files whose spool file is gone, and tmp leftovers nobody is writing.
        At start only. During a reload the old relay is still delivering: it writes a
        message's state (tmp + rename) while holding that spool file's flock, so a tmp file
        is removed only under the lock taken here, and never while another relay holds it."""
        n = 0
        for p in self.state_dir.iterdir():
            tmp = p.name.startswith(".tmp.")
            name = p.name[len(".tmp."):] if tmp else p.name
            try:
                fd = os.open(self.spool.new / name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1                          # finished: its state is stale
            except OSError:
                continue
            try:
                if fd >= 0:
                    if not tmp:
                        continue                 # still waiting: keep its schedule
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue                 # another relay is writing it right now
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
            finally:
                if fd >= 0:
                    os.close(fd)
        return n

    def scan(self) -> int:
        """Pick up files in new/ we do not know yet; forget the ones that are gone."""
        self.take_retry_requests()
        try:
            names = {e.name for e in os.scandir(self.spool.new) if not e.name.startswith(".")}
        except FileNotFoundError:
            return 0
        for gone in [n for n in self.known if n not in names]:
            del self.known[gone]
        fresh = [n for n in names if n not in self.known and n not in self.inflight]
        if not fresh:
            return 0
        with_state = {e.name for e in os.scandir(self.state_dir)}
        for name in fresh:
            at = read_state(self.state_dir, name).next_at if name in with_state else 0.0
            self._schedule(name, at)
        return len(fresh)

    def take_retry_requests(self) -> None:
        """spool/retry/<name> (written by `smtp-ingress queue retry` after it set the state's
        next_at to 0 under the file's lock): a known message is due now."""
        try:
            names = [e.name for e in os.scandir(self.retry_dir) if not e.name.startswith(".")]
        except FileNotFoundError:
            return
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.retry_dir / name).unlink()
            if name in self.known:
                self._schedule(name, 0.0)

    def _schedule(self, name: str, at: float) -> None:
        self.known[name] = at
        heapq.heappush(self.heap, (at, name))
        self.wake.set()

    def _pop_due(self) -> str | None:
        if self.stopping:
            return None
        if self.down_failures and (time.monotonic() < self.down_until or self.probe is not None):
            return None
        now = time.time()
        while self.heap:
            at, name = self.heap[0]
            if self.known.get(name) != at:
                heapq.heappop(self.heap)          # stale entry
                continue
            if at > now:
                return None
            heapq.heappop(self.heap)
            del self.known[name]
            self.inflight.add(name)
            if self.down_failures:
                self.probe = name
                metrics.relay_breaker(metrics.BREAKER_HALF_OPEN, self.down_failures)
            return name
        return None

    def _wait_hint(self) -> float:
        t = SCAN_MIN
        if self.down_failures and self.probe is None:
            t = min(t, max(0.01, self.down_until - time.monotonic()))
        while self.heap and self.known.get(self.heap[0][1]) != self.heap[0][0]:
            heapq.heappop(self.heap)
        if self.heap:
            t = min(t, max(0.01, self.heap[0][0] - time.time()))
        return t

    def _downstream_failed(self, why: str) -> None:
        self.down_failures += 1
        delay = backoff(self.down_failures, self.rc.retry_base, self.rc.retry_max)
        self.down_until = time.monotonic() + delay
        self.counters["down"] += 1
        metrics.relay_breaker(metrics.BREAKER_OPEN, self.down_failures)
        log.event("relay_downstream_down", "warning", downstream=str(self.target), error=why,
                  failures=self.down_failures, retry_in_s=round(delay, 3))

    def _downstream_ok(self) -> None:
        if self.down_failures:
            log.event("relay_downstream_up", downstream=str(self.target),
                      after_failures=self.down_failures)
        self.down_failures = 0
        metrics.relay_breaker(metrics.BREAKER_CLOSED)

    # --- one message -------------------------------------------------------------------------

    async def worker(self, index: int) -> None:
        session = make_session(self.target, self.hostname, self.rc.timeout)
        session.tls = self.tls  # type: ignore[attr-defined]
        try:
            while not self.stopping:
                name = self._pop_due()
                if name is None:
                    if session.connected and time.monotonic() - session.last_used > IDLE_CLOSE:
                        await session.close()
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), self._wait_hint())
                    continue
                try:
                    await self.process(name, session)
                    self.errors.pop(name, None)
                except Exception:
                    # A disk error while recording (the downstream may have accepted: a
                    # duplicate is possible on the retry) or a bug: log it, retry later with
                    # backoff (in memory: recording is what failed), and a clean session.
                    n = self.errors[name] = self.errors.get(name, 0) + 1
                    delay = backoff(n, self.rc.retry_base, self.rc.retry_max)
                    log.get().exception("relay_error name=%s errors=%d retry_in_s=%.3f",
                                        name, n, delay)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(session.close(), 1.0)
                    self._schedule(name, time.time() + delay)
                finally:
                    self.inflight.discard(name)
                    if self.probe == name:
                        self.probe = None
                    self.wake.set()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), 1.0)

    async def process(self, name: str, session: Session) -> None:
        path = self.spool.new / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:           # another relay (reload overlap) has it
                self._schedule(name, time.time() + SCAN_MIN)
                return
            if os.fstat(fd).st_nlink == 0:     # finished by someone else meanwhile
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
            try:
                entry = spool_mod.parse(raw)
                env = entry.envelope
                mail_from = envelope_sender(env)
                rcpts = [str(r) for r in env["rcpts"]]
                received_at = float(env["received_at"])
            except (ValueError, KeyError, TypeError) as e:
                self.counters["corrupt"] += 1
                log.event("relay_corrupt", "error", name=name, error=str(e))
                self._finish(name, "failed")
                return
            del raw
            state = read_state(self.state_dir, name)
            now = time.time()
            if state.next_at > now:            # rescheduled by another relay meanwhile
                self._schedule(name, state.next_at)
                return
            pending = state.pending(rcpts)
            qid = str(env.get("qid", name))
            if pending:
                results = await self._attempt(session, qid, mail_from, pending, entry.message,
                                              bool(env.get("smtputf8")), received_at)
                if results is None:             # downstream unreachable; message not charged
                    self._schedule(name, 0.0)
                    return
            else:
                results = {}
            # From here on nothing awaits: the reply is recorded before anything can cancel us.
            self._record(name, qid, env, state, results, received_at, entry.message)
        finally:
            os.close(fd)

    async def _attempt(self, session: Session, qid: str, mail_from: str, pending: list[str],
                       message: bytes, smtputf8: bool,
                       received_at: float) -> dict[str, Reply] | None:
        """Deliver to `pending`; the per-recipient results, or None when the downstream could
        not be reached (connection-level: the breaker counts it, the message is not charged).

        Only a failure to open a session counts against the downstream. Anything after that
        (a reply, a hang-up, a timeout, any exception) is this message's: a result for each
        recipient, so it is charged an attempt with backoff, and expires at max_age. The
        session is dropped after anything unexpected, so the next message gets a clean one."""
        # Syntax first (no connection needed); SMTPUTF8 once the downstream's EHLO is known.
        refused = address_problem(mail_from, sender=True, utf8=True)
        if refused is not None:
            return dict.fromkeys(pending, refused)
        results: dict[str, Reply] = {}
        for r in pending:
            problem = address_problem(r, sender=False, utf8=True)
            if problem is not None:
                results[r] = problem
        good = [r for r in pending if r not in results]
        if not good:
            return results
        t0 = time.monotonic()
        mta = self.target.mta_name
        for tries in (1, 2):
            reused = session.connected
            if not session.connected or session.messages >= MAX_PER_CONNECTION:
                reused = False
                try:
                    await session.open()
                except Exception as e:          # Unavailable, or a bug: not this message's
                    why = e.why if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"
                    self._downstream_failed(_oneline(why, 300))
                    metrics.relay_error(len(good))
                    if time.time() - received_at < self.rc.max_age:
                        return None
                    results.update(dict.fromkeys(
                        good, Reply(451, f"4.4.1 {mta}: {_oneline(why, 300)}", local=True)))
                    return results
                self._downstream_ok()
            try:
                got = await session.deliver(mail_from, good, message, smtputf8)
            except Unavailable as e:
                if e.stage == "connect" and reused and tries == 1:
                    continue                    # a stale reused connection: once more, fresh
                metrics.relay_error(len(good))
                if e.stage == "data":
                    # The message went out and its reply was lost: the downstream may have it.
                    log.event("relay_unsure", "warning", qid=qid, error=e.why,
                              rcpts=[r for r in good if r not in e.partial],
                              note="downstream may have accepted; the retry may duplicate")
                # The downstream greeted us and then failed on this message: its failure. The
                # final replies received before that stand (a 550 for a RCPT, LMTP's replies).
                results.update(dict.fromkeys(
                    good, Reply(451, f"4.4.2 {mta}: {e.why}", local=True)))
                results.update({r: x for r, x in e.partial.items() if r in good})
                return results
            except Exception as e:
                # Not expected from a session (a bug, an encoding error): this message's
                # failure, never a fixed-interval retry or a dirty session for the next one.
                why = _oneline(f"{type(e).__name__}: {e}", 300)
                log.event("relay_attempt_error", "error", qid=qid, rcpts=good, error=why)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(session.close(), 1.0)
                metrics.relay_error(len(good))
                results.update(dict.fromkeys(
                    good, Reply(451, f"4.3.0 local error: {why}", local=True)))
                return results
            metrics.relay_replies([r.code for r in got.values()], time.monotonic() - t0)
            self._downstream_ok()
            results.update(got)
            log.event("relay_attempt", "debug", qid=qid, rcpts=len(good),
                      ms=round((time.monotonic() - t0) * 1000, 2))
            return results
        return None  # pragma: no cover

    def _record(self, name: str, qid: str, env: dict[str, Any], state: RelayState,
                results: dict[str, Reply], received_at: float, message: bytes) -> None:
        now = time.time()
        out = settle(state, results, rcpts=[str(r) for r in env["rcpts"]], now=now,
                     received_at=received_at, cfg=self.rc)
        mail_from = envelope_sender(env)
        if out.delivered_now:
            self.counters["rcpt_delivered"] += len(out.delivered_now)
        if out.bounce:
            self.counters["bounced"] += len(out.bounce)
            dsn_qid = self._bounce(qid, env, out.bounce, received_at, now, message)
            log.event("relay_bounced", "warning", qid=qid, rcpts=[f.rcpt for f in out.bounce],
                      status=[f.status for f in out.bounce],
                      reply=[f.diagnostic for f in out.bounce], dsn=dsn_qid,
                      null_sender=mail_from == "")
        if out.disposition == "retry":
            self.counters["deferred"] += 1
            write_state(self.state_dir, name, out.state)
            self._schedule(name, out.state.next_at)
            log.event("relay_deferred", qid=qid, deferred=list(out.deferred),
                      delivered=list(out.delivered_now), attempts=out.state.attempts,
                      retry_in_s=round(out.state.next_at - now, 3), reply=out.state.last_error)
            return
        if out.disposition == "failed":   # kept so `queue requeue-failed` skips the delivered
            try:
                write_state(self.kept_dir, name, out.state)
            except OSError as e:             # only requeue-failed needs it: not worth a retry
                log.event("relay_state_keep_failed", "warning", name=name, error=str(e))
        self._finish(name, out.disposition)
        if out.disposition == "done":
            self.counters["sent"] += 1
        first = next(iter(results.values()), None)
        log.event("relay_sent" if out.disposition == "done" else "relay_failed", qid=qid,
                  rcpts=len(out.state.delivered), failed=len(out.state.failed),
                  reply=first.line()[:200] if first else "",
                  delay_s=round(now - received_at, 3))

    def _bounce(self, qid: str, env: dict[str, Any], failures: Sequence[Failure],
                received_at: float, now: float, message: bytes) -> str:
        sender = envelope_sender(env)
        if sender == "":
            self.counters["null_sender_failed"] += 1
            return ""                           # never bounce a bounce
        problem = address_problem(sender, sender=False, utf8=True)
        if problem is not None:                 # a DSN to it could never be sent either
            log.event("relay_dsn_unsendable", "warning", qid=qid, why=problem.line())
            return ""
        dsn_qid = new_qid(now)
        body = build_dsn(reporting_mta=self.hostname, sender=sender, qid=qid, arrival=received_at,
                         now=now, failures=failures, original=message,
                         remote_mta=self.target.mta_name, dsn_id=f"{dsn_qid}.dsn")
        try:
            lane = Lane(str(env.get("lane", "bulk")))
        except ValueError:
            lane = Lane.BULK
        denv = Envelope(qid=dsn_qid, lane=lane, peer_ip="127.0.0.1", peer_port=0,
                        helo=self.hostname, mail_from="", rcpts=(sender,), received_at=now,
                        deadline=now, acceptor="relay", smtputf8=not sender.isascii(),
                        evidence={"dsn_for": qid})
        (res,) = self.spool.write_batch([(denv, b"", body)])
        if isinstance(res, Exception):
            raise res                           # nothing recorded: the message is retried
        self.counters["dsn_spooled"] += 1
        metrics.relay_dsn()
        self._schedule(res, 0.0)
        return dsn_qid

    def _finish(self, name: str, disposition: str) -> None:
        src = self.spool.new / name
        if disposition == "done":
            src.unlink()
            _fsync_dir(self.spool.new)
        else:
            os.rename(src, self.spool.failed / name)
            _fsync_dir(self.spool.failed)
            _fsync_dir(self.spool.new)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / name).unlink()

    # --- process loop ------------------------------------------------------------------------

    async def scanner(self) -> None:
        interval = SCAN_MIN
        while not self.stopping:
            t0 = time.monotonic()
            try:
                if self.scan():
                    self.wake.set()
            except OSError as e:
                log.event("relay_scan_error", "error", error=str(e))
            interval = max(SCAN_MIN, 10 * (time.monotonic() - t0))
            await asyncio.sleep(interval)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    async def main(self, sig: child.Signals | None = None) -> None:
        if sig is not None:                 # the process entry point's: SIGUSR2 stops us
            sig.install_loop(asyncio.get_running_loop())
            sig.on_stop(self.stop)
        hb = asyncio.create_task(self.heart.run(child.heartbeat_period(self.cfg), self.stop))
        removed = self.cleanup_states()
        self.scan()
        metrics.relay_breaker(metrics.BREAKER_CLOSED)
        log.event("relay_start", downstream=str(self.target), concurrency=self.rc.concurrency,
                  backlog=len(self.known), stale_state_removed=removed)
        scanner = asyncio.create_task(self.scanner())
        workers = [asyncio.create_task(self.worker(i)) for i in range(self.rc.concurrency)]
        while not self.stopping:
            await asyncio.sleep(0.1)
        scanner.cancel()
        _done, busy = await asyncio.wait(workers, timeout=STOP_GRACE)
        for t in busy:
            t.cancel()                 # waiting for a reply: the file stays, retried later
        await asyncio.gather(*workers, scanner, return_exceptions=True)
        hb.cancel()
        log.event("relay_stop", cancelled=len(busy), backlog=len(self.known) + len(self.inflight),
                  **self.counters)


def run(cfg: Config, hb: Any = None, slot: int = 0) -> None:
    sig = child.start(cfg, "relay", child.LANE_SIGNALS)     # SIGUSR2 stops; TERM/INT/HUP ignored
    if not cfg.relay.downstream:
        # Not meant to be started (the spool is the destination); idle rather than crash-loop.
        log.event("relay_disabled", "warning", why="relay.downstream is empty")
        heart = child.Heartbeat(hb, slot)
        while not sig.stop and not heart.orphaned():
            heart.beat()
            time.sleep(0.2)
        return
    asyncio.run(Relay(cfg, hb, slot).main(sig))
