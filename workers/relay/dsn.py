"""Delivery status notifications (RFC 3464) for the relay's failed recipients.

API:
    build_dsn(reporting_mta=, sender=, qid=, arrival=, now=, failures=, original=,
              remote_mta="", dsn_id="", boundary="", authserv_id="") -> bytes
        a multipart/report; report-type=delivery-status message (CRLF) for the failures of one
        message, quoting only the trace and identifying header fields of the original
        (quoted_headers) as text/rfc822-headers (the RFC 6533 global types when the headers
        or an address are not ASCII). Pure.
    quoted_headers(message, authserv_id="") -> bytes
        what a DSN quotes of `message`, in the message's order, each field unfolded onto one
        line: our own Authentication-Results (only the top-most field, and only when its
        authserv-id is `authserv_id`: the worker prepends it; a client's A-R is never quoted),
        the top RECEIVED_MAX Received fields (ours first), and the first Message-ID, Date,
        From, To and Subject. Nothing else of the client's header section, never the body.

Whether a DSN is sent at all is ingress.policy.dsn's decision (relay.dsn): the relay spools
it to the envelope sender with MAIL FROM:<> as an ordinary spool file (so it is itself
relayed, retried and durable); never for the null sender.
Failure modes: none (everything is bytes built from strings; unprintable characters in what
is quoted are replaced).
Limits: each quoted field is cut to FIELD_MAX bytes (at a character boundary, marked "..."),
all of them together to HEADERS_MAX; only the first HEADER_SCAN bytes of the message are
looked at. So a DSN can never carry more than a few KiB of what a client wrote, whatever its
header section holds (the attacker's 64 KiB of headers stay in failed/).
"""

from __future__ import annotations

import email.utils
import re
import uuid
from collections.abc import Sequence

from ingress.core.fields import ar_authserv_id, field_value, header_fields
from workers.spool.state import Failure

RECEIVED_MAX = 3            # the top Received fields quoted (ours, then the client's)
FIELD_MAX = 400             # bytes of one quoted field at most (then cut, "...")
HEADERS_MAX = 4096          # bytes of the quoted header section at most
HEADER_SCAN = 256 * 1024    # bytes of the original looked at for them
_IDENTIFYING = (b"message-id", b"date", b"from", b"to", b"subject")   # the first of each
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")   # tab is kept


def _one_line(raw: bytes) -> bytes:
    """A header field unfolded onto one line, control characters and undecodable bytes
    replaced, cut to FIELD_MAX bytes; CRLF-terminated."""
    text = _FOLD.sub(b"", raw).rstrip(b"\r\n").decode("utf-8", "replace")
    out = _CONTROL.sub("?", text.replace("\ufffd", "?")).encode("utf-8")
    if len(out) > FIELD_MAX:
        out = out[:FIELD_MAX - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."
    return out + b"\r\n"


def quoted_headers(message: bytes, authserv_id: str = "") -> bytes:
    """The header fields a DSN quotes (see the module docstring), at most HEADERS_MAX bytes."""
    head = message[:HEADER_SCAN]
    ours = authserv_id.strip().lower()
    seen: set[bytes] = set()
    received = 0
    out: list[bytes] = []
    total = 0
    for i, (start, end, name) in enumerate(header_fields(head)):
        raw = head[start:end]
        if name == b"authentication-results":
            take = i == 0 and bool(ours) and ar_authserv_id(field_value(raw)) == ours
        elif name == b"received":
            take = received < RECEIVED_MAX
            received += 1
        elif name in _IDENTIFYING:
            take = name not in seen
            seen.add(name)
        else:
            take = False
        if not take:
            continue
        line = _one_line(raw)
        if total + len(line) > HEADERS_MAX:
            break
        out.append(line)
        total += len(line)
    return b"".join(out)


def build_dsn(*, reporting_mta: str, sender: str, qid: str, arrival: float, now: float,
              failures: Sequence[Failure], original: bytes, remote_mta: str = "",
              dsn_id: str = "", boundary: str = "", authserv_id: str = "") -> bytes:
    """An RFC 3464 delivery status notification (bytes, CRLF) for `failures` of one message.

    `original` is the relayed message (trace headers + client bytes); only quoted_headers()
    of it is quoted, as text/rfc822-headers (message/global-headers when it is not ASCII, and
    the RFC 6533 global types when an address is not ASCII). `authserv_id`: ours, so that our
    own Authentication-Results is quoted ("" = none is)."""
    headers = quoted_headers(original, authserv_id)
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

