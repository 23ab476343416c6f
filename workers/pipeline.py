"""Per-message work done in a worker before the durable write: the trace headers.

API: trace_headers(env, hostname) -> bytes     CRLF-terminated header lines to prepend

Pure apart from the wall clock's date string (taken from env.received_at). Anything the client
chose (HELO name, addresses) is sanitised to printable ASCII without CR/LF before it goes into
a header, so a client cannot inject header lines.
"""

from __future__ import annotations

import email.utils
import re

from ingress.wire import Envelope

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _safe(text: str, limit: int = 200) -> str:
    return _UNSAFE.sub("?", text)[:limit] or "unknown"


def received_header(env: Envelope, hostname: str) -> bytes:
    with_ = "ESMTPS" if env.tls else "ESMTP"
    if env.smtputf8:
        with_ = "UTF8SMTPS" if env.tls else "UTF8SMTP"
    tls = f" ({_safe(env.tls)})" if env.tls else ""
    for_ = f"\r\n\tfor <{_safe(env.rcpts[0])}>" if len(env.rcpts) == 1 else ""
    date = email.utils.formatdate(env.received_at, localtime=True)
    line = (f"Received: from {_safe(env.helo)} ([{_safe(env.peer_ip)}])\r\n"
            f"\tby {_safe(hostname)} (smtp-ingress lane={env.lane.value}) with {with_}{tls}"
            f" id {_safe(env.qid)}{for_};\r\n\t{date}\r\n")
    return line.encode("ascii")


def trace_headers(env: Envelope, hostname: str) -> bytes:
    return received_header(env, hostname)
