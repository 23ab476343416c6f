"""The label values of the acceptor's counters, as StrEnums: what a session's end is called.

Purpose: session code (ingress.edge) and pure policy (ingress.policy.session_rules) name how a
connection, transaction or RCPT TO ended with these values; ingress.core.metrics counts them
(connection(), message(), recipient(), deferred(), retry()). Kept apart from the declarations so
that naming an outcome needs no prometheus_client (nothing here does I/O or keeps state).

API:
    Outcome, Result, RcptResult     connection(), message(), recipient() labels; OUTCOMES,
                                    RESULTS, RCPT_RESULTS: their values (for tables and tests)
    DeferReason, RetryResult        deferred() and retry() labels
    LANES                           the `lane` label's values (wire.Lane's)

Failure modes: none here; ingress.core.metrics raises ValueError at the first use of a label
that is not one of these (an undeclared label is never emitted).

Limits: a value is part of the contract with dashboards and docs/reference.md: add with care,
rename never.
"""

from __future__ import annotations

from enum import StrEnum

LANES = ("fast", "bulk")

class Outcome(StrEnum):
    """connection()'s labels: how a connection ended its admission. The refusals are
    ingress.policy.admission.Refusal's values."""

    ADMITTED = "admitted"               # passed admission (Refusal.ADMITTED)
    SLOTS = "slots"                     # 421 before the banner: slots (or the bulk share) full
    PER_IP = "per-ip"                   # per-IP (/64) bulk concurrency cap
    RATE = "rate"                       # per-IP connection rate
    PENALISED = "penalised"             # refused during an early-talker penalty
    EARLY_TALKER = "early_talker"       # admitted, then spoke before the banner (554)
    DRAINING = "draining"               # 421 because this acceptor is draining
    PROXY_REJECTED = "proxy_rejected"   # PROXY header invalid or from an untrusted peer
    NOT_FAST = "not_fast"               # a bulk client on the fast port (554)
    TLS_FAILED = "tls_failed"           # the mutual-TLS handshake failed after its slot
    TLS_BUSY = "tls_busy"               # mutual-TLS port: refused by the handshake gate (an
                                        # alert, no handshake: ingress.edge.mtls)
    EVICTED_SILENT = "evicted_silent"   # silent since its banner, evicted to make room (421)
    HANDED_OFF = "handed_off"           # classified fast at connect, passed to a fast acceptor
    EVICTED = "evicted"                 # an idle lower-tier session closed (421) to make room
                                        # for an operator-tier client (ingress.policy.tiers)
    HANDED_BACK = "handed_back"         # a fast acceptor could not admit a handed connection:
                                        # given back to the acceptor it came from, served there
    CHECK_REFUSED = "check_refused"     # admitted, then refused before the banner by a connect
                                        # check (a DNS block list over its reject threshold)
    LISTED_PER_IP = "listed-per-ip"     # 421 (the per-IP line): a DNS-block-listed IP key
                                        # over dnsbl.listed_per_ip_max, at admission (a key
                                        # remembered listed) or when its verdict arrived


class Result(StrEnum):
    """message()'s labels: how a transaction ended."""

    ACCEPTED = "accepted"
    TEMPFAILED = "tempfailed"
    REJECTED = "rejected"
    SHED = "shed"                       # bulk over its cap at its first RCPT (451 / 421)
    BAD_COMMAND = "bad_command"         # HELO/EHLO/MAIL refused: bad argument (501), 553 5.6.7
    CUT_OFF = "cut_off"                 # 421 4.7.0: too many errors, or MAILs without a message


class RcptResult(StrEnum):
    """recipient()'s labels: a RCPT TO answer."""

    ACCEPTED = "accepted"
    RELAY_DENIED = "relay_denied"
    UNKNOWN_USER = "unknown_user"
    TOO_MANY = "too_many"
    BAD_ADDRESS = "bad_address"         # 501 bad argument, 553 5.6.7 non-ASCII without SMTPUTF8
    UNVERIFIED = "unverified"           # 450 4.1.1: recipient verification was not sure
    DEFERRED = "deferred"               # 451 4.7.1: its transaction deferred for the bulk cap


class DeferReason(StrEnum):
    """deferred()'s labels: why we deferred a transaction (a retry of it is evidence)."""

    RCPT_CAP = "rcpt_cap"               # shed at its first RCPT TO (451 4.7.1): this
                                        # acceptor's share of the bulk cap was spent
    DATA_RATE = "data_rate"             # the lane broker NACKed it for the rate cap after DATA


class RetryResult(StrEnum):
    """retry()'s labels: what a retry of a deferred transaction got at its first RCPT TO."""

    BYPASSED = "bypassed"               # took a token of the retry share instead of the cap
    TOO_EARLY = "too_early"             # before admission.retry_min_delay: the cap applies
    HAMMERED = "hammered"               # its site is shed more than admission.retry_hammer_
                                        # sheds a minute (or was, when deferred): no evidence
    OVER_SHARE = "over_share"           # the retry share, or its site's part of it, was
                                        # spent: the cap applies
    LISTED = "listed"                   # the client is DNS-block-listed: no retry bypass
                                        # (its record is left alone; the cap applies)


OUTCOMES = tuple(o.value for o in Outcome)
RESULTS = tuple(r.value for r in Result)
RCPT_RESULTS = tuple(r.value for r in RcptResult)
