"""Every SMTP reply the ingress itself chooses, as a named constant (RFC 5321 + RFC 3463 codes).

Policy: 250 only after a durable write; anything uncertain is 4xx; 5xx only
for real policy decisions. aiosmtpd's own syntax replies (500/501/503) are left as they are.
"""

from __future__ import annotations

# 2xx
QUEUED = "250 2.0.0 Ok: queued as {qid}"
CLOSING = "221 2.0.0 Bye"

# 4xx: try again later
TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 {host} Service shutting down, try again later"
IDLE_TIMEOUT = "421 4.4.2 {host} Error: timeout exceeded"
EVICTED_SILENT = "421 4.4.2 {host} Error: no command received, closing to make room"
SESSION_DEADLINE = "421 4.4.2 {host} Error: session time limit exceeded"
LANE_BUSY = "451 4.7.1 Service busy, try again later"
LANE_BUSY_CLOSING = "421 4.7.1 {host} Service busy, closing connection, try again later"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
NOT_QUEUED = "451 4.3.0 Message not queued ({why}), try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
TOO_MANY_ERRORS = "421 4.7.0 {host} Error: too many errors"
TOO_MANY_TRANSACTIONS = "421 4.7.0 {host} Error: too many transactions without a message"
UNVERIFIED_RECIPIENT = ("450 4.1.1 <{rcpt}>: Recipient address rejected: "
                        "unverified address, try again later")
DATA_NO_STORAGE = "452 4.3.1 Insufficient system storage, try again later"

# 5xx: policy
UNKNOWN_USER = "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
RELAY_DENIED = "550 5.7.1 <{rcpt}>: Relay access denied"
BARE_LINE_ENDING = "550 5.6.0 Message contains bare CR or LF, refused (RFC 5321 section 2.3.8)"
MESSAGE_TOO_BIG = "552 5.3.4 Error: message too big"
FAST_PORT_ONLY = "554 5.7.1 {host} This port serves allow-listed clients only; use port 25"
EARLY_TALKER = "554 5.5.0 Error: SMTP protocol synchronization"
ADDRESS_NOT_ASCII = ("553 5.6.7 <{addr}>: {what} address rejected: "
                     "non-ASCII address without SMTPUTF8")
BAD_ARGUMENT = "501 5.5.2 Syntax error: {why} in {command} argument"
AUTH_NOT_OFFERED = "502 5.5.1 Error: authentication not enabled"
