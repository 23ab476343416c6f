"""The relay's downstream clients: SMTP (aiosmtplib) and LMTP (asyncio streams), with
STARTTLS and AUTH PLAIN as relay.tls says, and the original client (XCLIENT / XFORWARD).

API:
    make_session(target, hostname, timeout) -> Session     SmtpSession or LmtpSession, by the
                                                           downstream's protocol

The clients, one job a module:
    transaction.py   Session (what the scheduler drives), one mail transaction shared by both
                     protocols (the plan, MAIL FROM, RCPT, the sending rules), Unavailable
    smtp.py          SmtpSession: aiosmtplib, XCLIENT / XFORWARD (relay/forward.py decides)
    lmtp.py          LmtpSession: a minimal RFC 2033 client, one reply per recipient
    tls.py           the TLS and AUTH policy: the SSL context, STARTTLS, AUTH PLAIN

Failure modes: none here (a session opens nothing until its open(); see transaction.py).
Limits: a TCP or a unix-socket downstream (target.path: LMTP only); see the modules above.
"""

from __future__ import annotations

from ingress.core.downstream import Target
from workers.relay.clients.lmtp import LmtpSession
from workers.relay.clients.smtp import SmtpSession
from workers.relay.clients.transaction import Session


def make_session(target: Target, hostname: str, timeout: float) -> Session:
    if target.proto == "lmtp":
        return LmtpSession(target, hostname, timeout)
    return SmtpSession(target, hostname, timeout)
