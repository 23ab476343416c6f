"""Per-command session rules: what to answer to a HELO/EHLO/MAIL/RCPT argument, and how a session
that keeps erring is slowed down and cut off. Pure: plain values in, verdicts out; no I/O, no
clock (ingress/edge/smtp.py is the thin glue that calls these and sleeps, writes and closes).

API:
    check_argument(arg, command="") -> str | None
        None, or why the argument of HELO/EHLO/MAIL/RCPT is refused (501 5.5.2): "nul",
        "invalid_utf8" (aiosmtpd decodes arguments as UTF-8 with errors="surrogateescape", so
        undecodable bytes arrive as lone surrogates U+DC80..U+DCFF), "control" (C0 including TAB
        and CR, DEL, C1), "non_ascii_helo" (any non-ASCII in a HELO/EHLO name: RFC 6531
        section 3.7.1 has an SMTPUTF8 client send only LDH labels or A-labels in EHLO, because
        SMTPUTF8 cannot have been negotiated yet; and SMTPUTF8 is a MAIL parameter, so it never
        is at HELO time. A U-label or fullwidth spelling of a name there is refused, never
        mapped: the SPF HELO identity and its keys only ever see ASCII).
    mail_verdict(address, smtputf8) -> Refused | None
        A non-ASCII sender without the SMTPUTF8 parameter: 553 5.6.7 (RFC 6531 section 3.5).
    shed_verdict(sheds, shed_limit=, shed_delay=, host=) -> Shed
        The MAIL shed/tarpit decision for a bulk transaction over the cap (at MAIL FROM, and
        after DATA when the lane's rate cap refused it): `sheds` is this session's count so
        far; the answer is the new count, the reply, the delay before it (the tarpit:
        shed_delay) and whether the session closes after it (the shed_limit-th: 421, no delay).
        Separate from mail_verdict because SPF (which may promote the session out of the
        bulk lane) runs between the two.
    data_verdict(body) -> Refused | None
        End of DATA: a bare CR or LF (SMTP smuggling) is 550 5.6.0.
    pick_eviction(candidates, now, silent_after=, bucket=) -> key | None
        Slots are full: the session to evict. `candidates`: (key, since) of the unproven
        sessions that have not spoken, in eviction order, each class's longest-silent one
        (ingress.policy.shaping.SilentSeats.heads: the block-listed by score, highest first,
        then the unlisted; a plain mapping's items(), oldest first, is one class). The first
        that has been silent for silent_after seconds goes, if `bucket` (admission.evict_rate;
        None: evictions off) has a token, which it then spends.
    rcpt_verdict(address, smtputf8=, domains=, primary_domain=, recipients=, accepted=,
                 max_recipients=) -> RcptVerdict
        The RCPT decision before any callout: the address to store (a bare "postmaster" becomes
        postmaster@<primary_domain>, RFC 5321 section 4.5.1, as Postfix rewrites it to
        postmaster@$myorigin), a refusal, and whether recipient verification may apply.
        Order: non-ASCII (553 5.6.7), the recipient limit (452 4.5.3; checked before anything
        that would tell a harvester whether an address exists), relay (550 5.7.1; includes
        sender-specified routing % ! @ in the local part), the recipient map (550 5.1.1).
        postmaster at an accepted domain is always accepted (no map, no verification).
    verify_verdict(address, answer) -> Refused | None   a callout's answer -> the reply
    Refused(reply, event, metric, close=False)    a refusal: its line (from the one reply table,
                                                  ingress.policy.replies), log event, metric
                                                  label (metrics.Result / RcptResult), 421?
    is_error_reply(line) -> bool                  does this reply count as a client error?
    JUNK_COMMANDS                                 the commands the junk limit counts
    ErrorPolicy, Counters                         the limits and one session's counts
    after_reply(counters, policy, line, command) -> Step
        Accounting for one reply: the counters after it, the tarpit delay before it is written
        (error_delay), and whether the session is cut off after it (421 4.7.0 and a close).
    before_mail(counters, policy, host) -> Refused | None
        A MAIL beyond policy.mail_without_data_limit transactions without a delivered message:
        421 4.7.0 and a close (each MAIL of a bulk session costs an SPF check, and its first
        RCPT a bulk token; a transaction deferred for the bulk cap is not counted:
        mail_deferred).
    mail_accepted(counters) -> Counters           a MAIL got 250
    mail_deferred(counters) -> Counters           ... and its transaction was deferred for the
                                                  bulk cap (at its first RCPT): not a MAIL
                                                  without a message (the shed limit counts it)
    delivered(counters) -> Counters               a message was delivered: counts start afresh
    argument_refusal(why, command) -> Refused     the 501 5.5.2 for check_argument's answer
    cut_off_refusal(host) -> Refused              the 421 4.7.0 at the hard error limit
    error_delay(errors, policy) -> float          0 up to the soft limit, then error_sleep per
                                                  error beyond it, at most error_sleep_max

Postfix parallels: smtpd_soft_error_limit / smtpd_hard_error_limit / smtpd_error_sleep_time
(here the delay grows per error and is capped, instead of Postfix's constant sleep),
smtpd_junk_command_limit (NOOP, RSET, VRFY, HELP beyond it count as errors), and
smtpd_recipient_overshoot_limit (452 too-many-recipients answers beyond it count as errors).
Counts reset when a message is delivered ("errors without delivering mail").

Limits: the counts are per connection; a client that reconnects starts at zero (per-IP rates
and penalties are admission's business). Failure modes: none; every function is total.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

from ingress.core.metrics_labels import RcptResult, Result
from ingress.core.ratelimit import TokenBucket
from ingress.policy.replies import Refusal, text

K = TypeVar("K")

# aiosmtpd decodes an undecodable byte b as chr(0xDC00 + b), b >= 0x80.
_SURROGATES = range(0xD800, 0xE000)

JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "HELP"})
_WHY = {"nul": "NUL character", "invalid_utf8": "invalid UTF-8",
        "control": "control character",
        "non_ascii_helo": "non-ASCII domain name (send A-labels, RFC 6531 3.7.1)"}
_HELO = frozenset({"HELO", "EHLO"})


@dataclass(frozen=True)
class Refused:
    """A reply that refuses a command, with the log event and the metric label it gets."""

    reply: str
    event: str
    metric: Result | RcptResult   # the message() or recipient() label it counts under
    close: bool = False        # 421: the session ends after this reply


@dataclass(frozen=True)
class RcptVerdict:
    address: str               # the recipient to store (postmaster rewritten)
    refusal: Refused | None    # None: accepted (subject to verification when `verify`)
    verify: bool = False       # a callout to the downstream may decide


@dataclass(frozen=True)
class Shed:
    """shed_verdict's answer: the reply to a bulk transaction over the cap."""

    sheds: int                 # the session's shed count after this one
    reply: str
    delay: float               # seconds to wait before the reply (the tarpit)
    close: bool                # 421: the session ends after this reply


@dataclass(frozen=True)
class ErrorPolicy:
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep: float = 1.0
    error_sleep_max: float = 4.0
    junk_command_limit: int = 100
    mail_without_data_limit: int = 20
    recipient_overshoot_limit: int = 1000


@dataclass(frozen=True)
class Counters:
    errors: int = 0
    junk: int = 0
    mails: int = 0             # MAIL commands answered 250 since the last delivered message
    overshoot: int = 0         # 452 too-many-recipients answers


@dataclass(frozen=True)
class Step:
    counters: Counters
    delay: float               # seconds to wait before writing the reply
    cut_off: bool              # after the reply: 421 4.7.0 too many errors, close


def check_argument(arg: str | None, command: str = "") -> str | None:
    if not arg:
        return None
    if arg.isascii() and arg.isprintable():   # the common case: one C-level scan each
        return None
    for ch in arg:
        o = ord(ch)
        if o == 0:
            return "nul"
        if o in _SURROGATES:
            return "invalid_utf8"
        if o < 0x20 or 0x7F <= o <= 0x9F:
            return "control"
    if command in _HELO and not arg.isascii():
        return "non_ascii_helo"
    return None


def _not_ascii(address: str, what: str, metric: Result | RcptResult) -> Refused:
    shown = address[:200].encode("ascii", "backslashreplace").decode("ascii")
    return Refused(text(Refusal.ADDRESS_NOT_ASCII, addr=shown, what=what),
                   "address_not_ascii", metric)


def argument_refusal(why: str, command: str) -> Refused:
    """The 501 for check_argument's `why`; metric: a recipient label for RCPT, else a
    transaction label."""
    return Refused(text(Refusal.BAD_ARGUMENT, why=_WHY[why], command=command), "bad_argument",
                   RcptResult.BAD_ADDRESS if command == "RCPT" else Result.BAD_COMMAND)


def mail_verdict(address: str, smtputf8: bool) -> Refused | None:
    if not smtputf8 and not address.isascii():
        return _not_ascii(address, "Sender", Result.BAD_COMMAND)
    return None


def shed_verdict(sheds: int, *, shed_limit: int, shed_delay: float, host: str) -> Shed:
    sheds += 1
    if sheds >= shed_limit:
        return Shed(sheds, text(Refusal.LANE_BUSY_CLOSING, host=host), 0.0, True)
    return Shed(sheds, text(Refusal.LANE_BUSY), max(0.0, shed_delay), False)


def data_verdict(body: bytes) -> Refused | None:
    n_lf = body.count(b"\n")
    if n_lf != body.count(b"\r") or n_lf != body.count(b"\r\n"):
        return Refused(text(Refusal.BARE_LINE_ENDING), "bare_line_ending", Result.REJECTED)
    return None


def pick_eviction(candidates: Iterable[tuple[K, float]], now: float, *, silent_after: float,
                  bucket: TokenBucket | None) -> K | None:
    if bucket is None:
        return None
    for victim, since in candidates:
        if now - since >= silent_after:
            return victim if bucket.take(now) else None
    return None


def rcpt_verdict(address: str, *, smtputf8: bool, domains: frozenset[str], primary_domain: str,
                 recipients: frozenset[str] | None, accepted: int,
                 max_recipients: int) -> RcptVerdict:
    if not smtputf8 and not address.isascii():
        return RcptVerdict(address, _not_ascii(address, "Recipient", RcptResult.BAD_ADDRESS))
    if address.lower() == "postmaster":
        address = f"postmaster@{primary_domain}"
    if accepted >= max_recipients:
        return RcptVerdict(address, Refused(text(Refusal.TOO_MANY_RECIPIENTS),
                                            "too_many_recipients", RcptResult.TOO_MANY))
    local, _, domain = address.rpartition("@")
    domain = domain.lower().rstrip(".")
    # Sender-specified routing (user%other@us, other!user@us, "a@b"@us) would let a
    # downstream MTA relay on to `other`: refused like any other relay attempt.
    if not local or domain not in domains or any(c in local for c in "%!@"):
        return RcptVerdict(address, Refused(text(Refusal.RELAY_DENIED, rcpt=address[:200]),
                                            "relay_denied", RcptResult.RELAY_DENIED))
    if local.lower() == "postmaster":
        return RcptVerdict(address, None)
    if recipients is not None and address.lower() not in recipients \
            and "@" + domain not in recipients:
        return RcptVerdict(address, Refused(text(Refusal.UNKNOWN_USER, rcpt=address[:200]),
                                            "unknown_user", RcptResult.UNKNOWN_USER))
    return RcptVerdict(address, None, verify=True)


def verify_verdict(address: str, answer: str) -> Refused | None:
    """`answer` is rcpt_verify's: "ok" | "unknown" | anything else (uncertain)."""
    if answer == "ok":
        return None
    if answer == "unknown":
        return Refused(text(Refusal.UNKNOWN_USER, rcpt=address[:200]), "unknown_user",
                       RcptResult.UNKNOWN_USER)
    return Refused(text(Refusal.UNVERIFIED_RECIPIENT, rcpt=address[:200]),
                   "recipient_unverified", RcptResult.UNVERIFIED)


def is_error_reply(line: str) -> bool:
    """5xx, and the 4xx a client causes (450: a recipient we could not verify). Not: 421 (the
    session ends anyway), 451 (our own trouble: lane busy, not queued), 452 too many
    recipients (counted separately, see after_reply)."""
    return line[:1] == "5" or line[:3] == "450"


def error_delay(errors: int, policy: ErrorPolicy) -> float:
    beyond = errors - policy.soft_error_limit
    if beyond <= 0:
        return 0.0
    return min(policy.error_sleep * beyond, policy.error_sleep_max)


def after_reply(counters: Counters, policy: ErrorPolicy, line: str, command: str) -> Step:
    errors, junk, overshoot = counters.errors, counters.junk, counters.overshoot
    error = is_error_reply(line)
    if command in JUNK_COMMANDS:
        junk += 1
        if junk > policy.junk_command_limit:
            error = True
    if line.startswith("452 4.5.3"):
        overshoot += 1
        if overshoot > policy.recipient_overshoot_limit:
            error = True
    if error:
        errors += 1
    c = counters          # (a copy only when a count moved: this runs at every reply)
    if (errors, junk, overshoot) != (counters.errors, counters.junk, counters.overshoot):
        c = replace(counters, errors=errors, junk=junk, overshoot=overshoot)
    return Step(c, error_delay(errors, policy), errors >= policy.hard_error_limit)


def before_mail(counters: Counters, policy: ErrorPolicy, host: str) -> Refused | None:
    if counters.mails >= policy.mail_without_data_limit:
        return Refused(text(Refusal.TOO_MANY_TRANSACTIONS, host=host), "session_cut_off",
                       Result.CUT_OFF, close=True)
    return None


def mail_accepted(counters: Counters) -> Counters:
    return replace(counters, mails=counters.mails + 1)


def mail_deferred(counters: Counters) -> Counters:
    return replace(counters, mails=max(0, counters.mails - 1))


def delivered(counters: Counters) -> Counters:
    return Counters()


def cut_off_refusal(host: str) -> Refused:
    """The 421 at the hard error limit."""
    return Refused(text(Refusal.TOO_MANY_ERRORS, host=host), "session_cut_off", Result.CUT_OFF,
                   close=True)
