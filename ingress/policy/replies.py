"""Every SMTP reply the ingress itself chooses: one table, keyed by Refusal (RFC 5321 + RFC 3463
codes).

API:
    Refusal                 StrEnum: every refusal the ingress chooses; the admission ones have
                            the values admission.Refusal uses as metric labels
    REPLIES                 Refusal -> reply line (no CRLF), some with {fields} to format
    text(refusal, **fields) -> str   the reply line, formatted
    QUEUED                  the 250 after a durable write ({qid})
    clean(line) -> str      a reply line made safe to send, whoever chose it: C0 controls but
                            HT, DEL and C1 controls become \\xNN, a byte that was not UTF-8
                            (a surrogateescape) \\xNN, any other lone surrogate "?"; cut to
                            MAX_REPLY_LINE octets with the CRLF (RFC 5321 4.5.3.1.5), never
                            inside a UTF-8 sequence. aiosmtpd echoes client input in replies
                            (500 Error: command "X\\x00Y" not recognized; 502 Could not VRFY)

Policy: 250 only after a durable write; anything uncertain is 4xx; 5xx only for real policy
decisions. aiosmtpd's own syntax replies (500/501/503) are left as they are (but clean()ed).
Failure modes: text() raises KeyError for a missing {field} (a bug, caught by the tests).
"""

from __future__ import annotations

import re
from enum import StrEnum

QUEUED = "250 2.0.0 Ok: queued as {qid}"


class Refusal(StrEnum):
    SLOTS = "slots"
    PER_IP = "per-ip"
    RATE = "rate"
    PENALISED = "penalised"
    SHUTTING_DOWN = "shutting_down"
    IDLE_TIMEOUT = "idle_timeout"
    EVICTED_SILENT = "evicted_silent"
    EVICTED = "evicted"
    SESSION_DEADLINE = "session_deadline"
    LANE_BUSY = "lane_busy"
    LANE_BUSY_CLOSING = "lane_busy_closing"
    INTERNAL_ERROR = "internal_error"
    NOT_QUEUED = "not_queued"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    TOO_MANY_ERRORS = "too_many_errors"
    TOO_MANY_TRANSACTIONS = "too_many_transactions"
    UNVERIFIED_RECIPIENT = "unverified_recipient"
    DATA_NO_STORAGE = "data_no_storage"
    UNKNOWN_USER = "unknown_user"
    RELAY_DENIED = "relay_denied"
    BARE_LINE_ENDING = "bare_line_ending"
    FAST_PORT_ONLY = "fast_port_only"
    EARLY_TALKER = "early_talker"
    ADDRESS_NOT_ASCII = "address_not_ascii"
    BAD_ARGUMENT = "bad_argument"
    AUTH_NOT_OFFERED = "auth_not_offered"


REPLIES: dict[Refusal, str] = {
    # 4xx: try again later
    Refusal.SLOTS: "421 4.7.0 Too many connections, try again later",
    Refusal.PER_IP: "421 4.7.0 Too many connections from your address, try again later",
    Refusal.RATE: "421 4.7.0 Connection rate limit exceeded, try again later",
    Refusal.PENALISED: "421 4.7.0 Temporarily refused after a protocol violation, try again later",
    Refusal.SHUTTING_DOWN: "421 4.3.2 {host} Service shutting down, try again later",
    Refusal.IDLE_TIMEOUT: "421 4.4.2 {host} Error: timeout exceeded",
    Refusal.EVICTED_SILENT: "421 4.4.2 {host} Error: no command received, closing to make room",
    Refusal.EVICTED: "421 4.7.0 {host} Too busy, closing to make room, try again later",
    Refusal.SESSION_DEADLINE: "421 4.4.2 {host} Error: session time limit exceeded",
    Refusal.LANE_BUSY: "451 4.7.1 Service busy, try again later",
    Refusal.LANE_BUSY_CLOSING: "421 4.7.1 {host} Service busy, closing connection, try again later",
    Refusal.INTERNAL_ERROR: "451 4.3.0 Internal error, try again later",
    Refusal.NOT_QUEUED: "451 4.3.0 Message not queued ({why}), try again later",
    Refusal.TOO_MANY_RECIPIENTS: "452 4.5.3 Error: too many recipients",
    Refusal.TOO_MANY_ERRORS: "421 4.7.0 {host} Error: too many errors",
    Refusal.TOO_MANY_TRANSACTIONS: "421 4.7.0 {host} Error: too many transactions without a "
                                   "message",
    Refusal.UNVERIFIED_RECIPIENT: "450 4.1.1 <{rcpt}>: Recipient address rejected: unverified "
                                  "address, try again later",
    Refusal.DATA_NO_STORAGE: "452 4.3.1 Insufficient system storage, try again later",
    # 5xx: policy
    Refusal.UNKNOWN_USER: "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown",
    Refusal.RELAY_DENIED: "550 5.7.1 <{rcpt}>: Relay access denied",
    Refusal.BARE_LINE_ENDING: "550 5.6.0 Message contains bare CR or LF, refused (RFC 5321 "
                              "section 2.3.8)",
    Refusal.FAST_PORT_ONLY: "554 5.7.1 {host} This port serves allow-listed clients only; use "
                            "port 25",
    Refusal.EARLY_TALKER: "554 5.5.0 Error: SMTP protocol synchronization",
    Refusal.ADDRESS_NOT_ASCII: "553 5.6.7 <{addr}>: {what} address rejected: non-ASCII address "
                               "without SMTPUTF8",
    Refusal.BAD_ARGUMENT: "501 5.5.2 Syntax error: {why} in {command} argument",
    Refusal.AUTH_NOT_OFFERED: "502 5.5.1 Error: authentication not enabled",
}


def text(refusal: Refusal, **fields: object) -> str:
    line = REPLIES[refusal]
    return line.format(**fields) if fields else line


MAX_REPLY_LINE = 512          # octets, the CRLF included (RFC 5321 4.5.3.1.5)
_MAX_TEXT = MAX_REPLY_LINE - 2
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    if c < 0xa0:
        return f"\\x{c:02x}"
    return f"\\x{c - 0xdc00:02x}" if 0xdc80 <= c <= 0xdcff else "?"


def clean(line: str) -> str:
    if _UNSAFE.search(line) is not None:
        line = _UNSAFE.sub(_escape, line)
    if len(line) > _MAX_TEXT // 4:          # shorter cannot be over the limit, even in UTF-8
        raw = line.encode("utf-8")
        if len(raw) > _MAX_TEXT:
            line = raw[:_MAX_TEXT].decode("utf-8", "ignore")
    return line
