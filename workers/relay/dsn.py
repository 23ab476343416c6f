"""Delivery status notifications (RFC 3464) for the relay's failed recipients.

API:
    build_dsn(reporting_mta=, sender=, qid=, arrival=, now=, failures=, original=,
              remote_mta="", dsn_id="", boundary="") -> bytes
        a multipart/report; report-type=delivery-status message (CRLF) for the failures of one
        message, quoting only the original's header section (text/rfc822-headers; the RFC 6533
        global types when the headers or an address are not ASCII). Pure.

The relay spools it to the envelope sender with MAIL FROM:<> as an ordinary spool file (so it
is itself relayed, retried and durable); never for the null sender.
Failure modes: none (everything is bytes built from strings; unprintable characters in what
is quoted are replaced).
Limits: at most HEADERS_MAX bytes of the original headers are quoted (cut at a line end).
"""

from __future__ import annotations

import email.utils
import re
import uuid
from collections.abc import Sequence

from workers.relay.state import Failure

HEADERS_MAX = 64 * 1024    # original headers quoted in a DSN at most
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


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

