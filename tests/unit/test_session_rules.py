"""ingress.policy.session_rules: the pure per-command decisions, table by table; the new
smtp.* keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingress.core import metrics_labels
from ingress.core.config import ConfigError, load
from ingress.core.ratelimit import TokenBucket
from ingress.policy import session_rules
from ingress.policy.replies import Refusal, text
from ingress.policy.session_rules import Counters, ErrorPolicy, after_reply, error_delay

# --- check_argument -------------------------------------------------------------------------------


def surrogateescaped(raw: bytes) -> str:
    """What aiosmtpd hands us for argument bytes `raw` (enable_SMTPUTF8=True)."""
    return raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(("raw", "why"), [
    (b"<a@example.test>", None),
    (b"<a@example.test> SIZE=10 BODY=8BITMIME", None),
    (b"client.example.test", None),
    (b"[192.0.2.1]", None),
    (b"<\xc3\xbc@example.test> SMTPUTF8", None),          # valid UTF-8: not this rule's business
    (b"<\xe2\x82\xac@example.test>", None),               # U+20AC
    (b"<\xf0\x9f\x98\x80@example.test>", None),           # 4-byte sequence
    (b"<\xc2\xa0@example.test>", None),                   # U+00A0: not a C1 control
    (b"<a\x00b@example.test>", "nul"),
    (b"\x00", "nul"),
    (b"<a\xff@example.test>", "invalid_utf8"),
    (b"<a\x80@example.test>", "invalid_utf8"),
    (b"<a\xc0\xaf@example.test>", "invalid_utf8"),        # overlong "/"
    (b"<a\xed\xa0\x80@example.test>", "invalid_utf8"),    # an encoded surrogate
    (b"<a\xc3@example.test>", "invalid_utf8"),            # truncated sequence
    (b"<a\x01@example.test>", "control"),
    (b"<a\tb@example.test>", "control"),
    (b"<a\rb@example.test>", "control"),
    (b"<a\x1b[31m@example.test>", "control"),
    (b"<a\x7f@example.test>", "control"),
    (b"<a\xc2\x85@example.test>", "control"),             # U+0085 NEL (C1)
    (b"<a\xc2\x9f@example.test>", "control"),             # U+009F (C1)
])
def test_check_argument(raw: bytes, why: str | None) -> None:
    assert session_rules.check_argument(surrogateescaped(raw)) == why


@pytest.mark.parametrize(("command", "raw", "why"), [
    # RFC 6531 3.7.1: only LDH labels or A-labels in HELO/EHLO (SMTPUTF8 cannot be in force)
    ("EHLO", "\uff53pam.test".encode(), "non_ascii_helo"),       # fullwidth s
    ("EHLO", "spam\u3002test".encode(), "non_ascii_helo"),       # ideographic full stop
    ("HELO", "b\u00fccher.test".encode(), "non_ascii_helo"),     # a U-label
    ("HELO", b"\xc2\xa0", "non_ascii_helo"),                     # U+00A0 alone
    ("EHLO", b"xn--bcher-kva.test", None),                      # its A-label is fine
    ("EHLO", b"SPAM.test.", None),
    ("EHLO", b"[192.0.2.1]", None),
    ("EHLO", b"host\xff.test", "invalid_utf8"),                 # the byte rules come first
    ("EHLO", b"h\x01\xc3\xbc", "control"),
    ("MAIL", "<a@b\u00fccher.test> SMTPUTF8".encode(), None),  # addresses: mail_verdict's
    ("RCPT", "<b\u00fcb@example.test>".encode(), None),
])
def test_check_argument_helo_is_ascii(command: str, raw: bytes, why: str | None) -> None:
    assert session_rules.check_argument(surrogateescaped(raw), command) == why


def test_non_ascii_helo_refusal_names_it() -> None:
    r = session_rules.argument_refusal("non_ascii_helo", "EHLO")
    assert r.reply == ("501 5.5.2 Syntax error: non-ASCII domain name (send A-labels, "
                       "RFC 6531 3.7.1) in EHLO argument"), r.reply
    assert r.reply.isascii() and r.metric is metrics_labels.Result.BAD_COMMAND


def test_check_argument_empty() -> None:
    assert session_rules.check_argument(None) is None
    assert session_rules.check_argument("") is None


# --- mail_verdict / rcpt_verdict ------------------------------------------------------------------

DOMAINS = frozenset({"example.test", "other.test"})


@pytest.mark.parametrize(("address", "smtputf8", "code"), [
    ("a@sender.test", False, None),
    ("\u00f6@sender.test", False, "553 5.6.7"),
    ("\u00f6@sender.test", True, None),
    ("a@s\u00e9nder.test", False, "553 5.6.7"),
    ("a@\uff53pam.test", False, "553 5.6.7"),          # a fullwidth spelling of spam.test
    ("a@spam\u3002test", False, "553 5.6.7"),          # the ideographic full stop
    ("a@\uff53pam.test", True, None),                  # with SMTPUTF8: spam.test (canonical)
])
def test_mail_verdict(address: str, smtputf8: bool, code: str | None) -> None:
    r = session_rules.mail_verdict(address, smtputf8)
    assert (r.reply[:9] if r else None) == code
    if r is not None:
        assert r.reply.isascii(), "no 8-bit reply to a client that did not ask for SMTPUTF8"
        assert r.metric in metrics_labels.RESULTS


def rcpt(address: str, *, smtputf8: bool = False, recipients: frozenset[str] | None = None,
         accepted: int = 0, max_recipients: int = 100) -> session_rules.RcptVerdict:
    return session_rules.rcpt_verdict(address, smtputf8=smtputf8, domains=DOMAINS,
                                      primary_domain="example.test", recipients=recipients,
                                      accepted=accepted, max_recipients=max_recipients)


KNOWN = frozenset({"bob@example.test", "@other.test"})


@pytest.mark.parametrize(("address", "kw", "code", "stored", "verify"), [
    ("bob@example.test", {}, None, "bob@example.test", True),
    ("bob@EXAMPLE.test", {}, None, "bob@EXAMPLE.test", True),
    ("bob@example.test.", {}, None, "bob@example.test.", True),
    ("\u00fc@example.test", {}, "553 5.6.7", "\u00fc@example.test", False),
    ("\u00fc@example.test", {"smtputf8": True}, None, "\u00fc@example.test", True),
    ("x@elsewhere.test", {}, "550 5.7.1", "x@elsewhere.test", False),
    ("x@example.test.evil", {}, "550 5.7.1", "x@example.test.evil", False),
    ("x%y@example.test", {}, "550 5.7.1", "x%y@example.test", False),
    ("y!x@example.test", {}, "550 5.7.1", "y!x@example.test", False),
    ('"a@b"@example.test', {}, "550 5.7.1", '"a@b"@example.test', False),
    ("@example.test", {}, "550 5.7.1", "@example.test", False),
    ("nosuch", {}, "550 5.7.1", "nosuch", False),
    # RFC 5321 4.5.1: a bare postmaster, any case, is the primary domain's postmaster
    ("postmaster", {}, None, "postmaster@example.test", False),
    ("PostMaster", {}, None, "postmaster@example.test", False),
    ("postmaster", {"recipients": KNOWN}, None, "postmaster@example.test", False),
    ("Postmaster@other.test", {"recipients": frozenset()}, None, "Postmaster@other.test", False),
    # the recipient map
    ("bob@example.test", {"recipients": KNOWN}, None, "bob@example.test", True),
    ("Bob@Example.test", {"recipients": KNOWN}, None, "Bob@Example.test", True),
    ("eve@example.test", {"recipients": KNOWN}, "550 5.1.1", "eve@example.test", False),
    ("anyone@other.test", {"recipients": KNOWN}, None, "anyone@other.test", True),
    # the recipient limit: exactly max_recipients, checked before anything that tells
    ("bob@example.test", {"accepted": 99}, None, "bob@example.test", True),
    ("bob@example.test", {"accepted": 100}, "452 4.5.3", "bob@example.test", False),
    ("x@elsewhere.test", {"accepted": 100}, "452 4.5.3", "x@elsewhere.test", False),
    ("eve@example.test", {"accepted": 1, "max_recipients": 1, "recipients": KNOWN},
     "452 4.5.3", "eve@example.test", False),
    ("postmaster", {"accepted": 100}, "452 4.5.3", "postmaster@example.test", False),
])
def test_rcpt_verdict(address: str, kw: dict, code: str | None, stored: str,
                      verify: bool) -> None:
    v = rcpt(address, **kw)
    assert (v.refusal.reply[:9] if v.refusal else None) == code
    assert v.address == stored
    assert v.verify is verify
    if v.refusal is not None:
        assert v.refusal.metric in metrics_labels.RCPT_RESULTS
        assert v.refusal.reply.isascii()


@pytest.mark.parametrize(("answer", "code", "metric"), [
    ("ok", None, None),
    ("unknown", "550 5.1.1", "unknown_user"),
    ("tempfail", "450 4.1.1", "unverified"),
    ("anything else", "450 4.1.1", "unverified"),
])
def test_verify_verdict(answer: str, code: str | None, metric: str | None) -> None:
    r = session_rules.verify_verdict("bob@example.test", answer)
    assert (r.reply[:9] if r else None) == code
    assert (r.metric if r else None) == metric
    if metric:
        assert metric in metrics_labels.RCPT_RESULTS


def test_argument_refusal() -> None:
    for why in ("nul", "invalid_utf8", "control"):
        r = session_rules.argument_refusal(why, "RCPT")
        assert r.reply.startswith("501 5.5.2") and r.metric in metrics_labels.RCPT_RESULTS
        r = session_rules.argument_refusal(why, "HELO")
        assert r.reply.startswith("501 5.5.2") and r.metric in metrics_labels.RESULTS


# --- error accounting -----------------------------------------------------------------------------

P = ErrorPolicy(soft_error_limit=3, hard_error_limit=6, error_sleep=1.0, error_sleep_max=2.5,
                junk_command_limit=2, mail_without_data_limit=2, recipient_overshoot_limit=1)


@pytest.mark.parametrize(("errors", "delay"), [
    (0, 0.0), (1, 0.0), (3, 0.0), (4, 1.0), (5, 2.0), (6, 2.5), (100, 2.5)])
def test_error_delay(errors: int, delay: float) -> None:
    assert error_delay(errors, P) == delay


@pytest.mark.parametrize(("line", "error"), [
    ("250 2.1.5 Ok", False), ("220 mx", False), ("354 End data", False), ("221 Bye", False),
    ("252 Cannot VRFY", False),
    ("500 Error: bad syntax", True), ("501 5.5.2 Syntax", True), ("502 5.5.1 AUTH", True),
    ("503 Error: need MAIL", True), ("550 5.7.1 relay", True), ("550 5.1.1 unknown", True),
    ("553 5.6.7 ascii", True), ("552 5.3.4 too big", True), ("555 params", True),
    ("450 4.1.1 unverified", True),
    ("451 4.7.1 busy", False), ("451 4.3.0 not queued", False), ("421 4.7.1 busy", False),
    ("452 4.5.3 too many", False),
])
def test_is_error_reply(line: str, error: bool) -> None:
    assert session_rules.is_error_reply(line) is error


def run(replies_and_commands: list[tuple[str, str]], policy: ErrorPolicy = P
        ) -> list[session_rules.Step]:
    c, out = Counters(), []
    for line, cmd in replies_and_commands:
        step = after_reply(c, policy, line, cmd)
        c = step.counters
        out.append(step)
    return out


def test_errors_delay_then_cut_off() -> None:
    steps = run([("550 5.7.1 relay", "RCPT")] * 6)
    assert [s.counters.errors for s in steps] == [1, 2, 3, 4, 5, 6]
    assert [s.delay for s in steps] == [0, 0, 0, 1.0, 2.0, 2.5]
    assert [s.cut_off for s in steps] == [False] * 5 + [True]


def test_good_replies_are_delayed_too_past_the_soft_limit() -> None:
    steps = run([("550 x", "RCPT")] * 4 + [("250 ok", "RCPT")])
    assert steps[-1].delay == 1.0 and not steps[-1].cut_off
    assert steps[-1].counters.errors == 4


def test_junk_commands_count_after_the_limit() -> None:
    steps = run([("250 OK", "NOOP"), ("250 OK", "RSET"), ("252 x", "VRFY"), ("250 x", "HELP"),
                 ("250 OK", "MAIL")])
    assert [s.counters.junk for s in steps] == [1, 2, 3, 4, 4]
    assert [s.counters.errors for s in steps] == [0, 0, 1, 2, 2]


def test_recipient_overshoot_counts_after_the_limit() -> None:
    steps = run([("452 4.5.3 Error: too many recipients", "RCPT")] * 3)
    assert [s.counters.errors for s in steps] == [0, 1, 2]


def test_mail_without_data_limit() -> None:
    c = Counters()
    assert session_rules.before_mail(c, P, "mx") is None
    c = session_rules.mail_accepted(session_rules.mail_accepted(c))
    r = session_rules.before_mail(c, P, "mx.test")
    assert r is not None and r.close and r.reply.startswith("421 4.7.0 mx.test")
    assert r.metric in metrics_labels.RESULTS
    assert session_rules.before_mail(session_rules.delivered(c), P, "mx") is None


def test_a_transaction_deferred_for_the_cap_is_not_a_mail_without_data() -> None:
    """The bulk cap defers at the first RCPT (MAIL had its 250): the shed limit counts that
    transaction, not mail_without_data_limit."""
    c = Counters()
    for _ in range(5):
        c = session_rules.mail_deferred(session_rules.mail_accepted(c))
    assert c.mails == 0 and session_rules.before_mail(c, P, "mx") is None
    assert session_rules.mail_deferred(Counters()).mails == 0          # never below 0


def test_delivered_resets_everything() -> None:
    c = Counters(errors=5, junk=7, mails=3, overshoot=2)
    assert session_rules.delivered(c) == Counters()


def test_cut_off_refusal() -> None:
    r = session_rules.cut_off_refusal("mx.test")
    assert r.reply == text(Refusal.TOO_MANY_ERRORS, host="mx.test")
    assert r.reply.startswith("421 4.7.0") and r.close and r.metric in metrics_labels.RESULTS


def test_policy_defaults_match_config_defaults() -> None:
    s = load(None).smtp
    d = ErrorPolicy()
    assert (d.soft_error_limit, d.hard_error_limit, d.error_sleep, d.error_sleep_max,
            d.junk_command_limit, d.mail_without_data_limit, d.recipient_overshoot_limit) == (
        s.soft_error_limit, s.hard_error_limit, s.error_sleep, s.error_sleep_max,
        s.junk_command_limit, s.mail_without_data_limit, s.recipient_overshoot_limit)


# --- the new config keys --------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "key"), [
    ("soft_error_limit = 0", "smtp.soft_error_limit"),
    ("hard_error_limit = 10", "smtp.hard_error_limit"),          # not above the soft limit
    ("error_sleep = -1.0", "smtp.error_sleep"),
    ("error_sleep = 5.0\nerror_sleep_max = 2.0", "smtp.error_sleep_max"),
    ("error_sleep_max = 100.0", "smtp.error_sleep_max"),
    ("junk_command_limit = -1", "smtp.junk_command_limit"),
    ("mail_without_data_limit = 0", "smtp.mail_without_data_limit"),
    ("recipient_overshoot_limit = -1", "smtp.recipient_overshoot_limit"),
    ("verify_recipients = true", "smtp.verify_recipients"),      # no downstream
    ("verify_recipients = true\n[relay]\ndownstream = \"lmtp://127.0.0.1:24\"",
     "smtp.verify_recipients"),
    ("verify_recipients = true\nverify_timeout = 8.0\n[relay]\n"
     "downstream = \"smtp://127.0.0.1:25\"", "smtp.verify_timeout"),
    ("verify_negative_ttl = -1.0", "smtp.verify_negative_ttl"),
    ("verify_cache_size = 0", "smtp.verify_cache_size"),
    ("verify_concurrency = 0", "smtp.verify_concurrency"),
    ("verify_per_session = -1", "smtp.verify_per_session"),
    ("soft_error_limit = \"ten\"", "smtp.soft_error_limit"),
])
def test_new_keys_validated(tmp_path: Path, body: str, key: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f"[smtp]\n{body}\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert e.value.key == key and str(p) in str(e.value), str(e.value)


def test_verify_config_accepted(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[smtp]\nverify_recipients = true\n[relay]\ndownstream = "smtp://127.0.0.1:25"\n')
    assert load(p).smtp.verify_recipients is True


# --- rcpt_verify's cache (no I/O: the answers are put in by hand, the clock is ours) -------------

def test_verify_cache_ttls_per_answer() -> None:
    from ingress.edge.rcpt_verify import Answer, RecipientVerifier, cache_key
    now = [1000.0]
    v = RecipientVerifier("127.0.0.1", 1, helo="mx.test", timeout=1.0, positive_ttl=100.0,
                          negative_ttl=10.0, tempfail_ttl=1.0, cache_size=2,
                          concurrency=1, timer=lambda: now[0])
    assert v.remember(cache_key("a@Example.TEST"), Answer.OK)
    assert v.remember(cache_key("b@example.test"), Answer.UNKNOWN)
    assert v.cached("a@example.test") is Answer.OK          # the domain is case-folded
    assert v.cached("A@example.test") is None               # the local part is not
    now[0] += 11
    assert v.cached("a@example.test") is Answer.OK and v.cached("b@example.test") is None
    now[0] += 100
    assert v.cached("a@example.test") is None
    for i in range(5):                                      # bounded in count
        v.remember(cache_key(f"c{i}@example.test"), Answer.OK)
    assert len(v) == 2


def test_verify_backlog_full_is_tempfail_without_a_connection() -> None:
    import asyncio

    from ingress.edge.rcpt_verify import Answer, RecipientVerifier
    v = RecipientVerifier("127.0.0.1", 1, helo="mx.test", timeout=1.0, positive_ttl=1.0,
                          negative_ttl=1.0, tempfail_ttl=0.0, cache_size=10, concurrency=1,
                          backlog=0)
    assert asyncio.run(v.verify("a@example.test")) is Answer.TEMPFAIL
    assert v.callouts == 0


def test_refusal_metrics_name_one_counter() -> None:
    """smtp.py counts a refusal as a recipient if its label is a RCPT label, else as a
    transaction: every label session_rules uses is in exactly one of the two."""
    labels = {
        session_rules.mail_verdict("\u00f6@x.test", False).metric,            # type: ignore
        session_rules.argument_refusal("nul", "RCPT").metric,
        session_rules.argument_refusal("nul", "MAIL").metric,
        session_rules.cut_off_refusal("mx").metric,
        session_rules.before_mail(Counters(mails=99), P, "mx").metric,         # type: ignore
        session_rules.verify_verdict("a@b", "unknown").metric,                 # type: ignore
        session_rules.verify_verdict("a@b", "tempfail").metric,                # type: ignore
        *(v.refusal.metric for v in (rcpt("x@elsewhere.test"), rcpt("a@example.test",
                                                                    accepted=100),
                                     rcpt("e@example.test", recipients=KNOWN),
                                     rcpt("\u00fc@example.test")) if v.refusal),
    }
    for label in labels:
        assert (label in metrics_labels.RCPT_RESULTS) != (label in metrics_labels.RESULTS), label


# --- shed_verdict, data_verdict, pick_eviction ----------------------------------------------------


@pytest.mark.parametrize(("sheds", "limit", "delay", "code", "wait", "close"), [
    (0, 10, 0.1, "451 4.7.1", 0.1, False),
    (8, 10, 0.1, "451 4.7.1", 0.1, False),
    (9, 10, 0.1, "421 4.7.1", 0.0, True),         # the shed_limit-th: 421 at once, closed
    (0, 1, 0.5, "421 4.7.1", 0.0, True),
    (3, 10, 0.0, "451 4.7.1", 0.0, False),        # no tarpit configured
])
def test_shed_verdict(sheds: int, limit: int, delay: float, code: str, wait: float,
                      close: bool) -> None:
    v = session_rules.shed_verdict(sheds, shed_limit=limit, shed_delay=delay, host="mx.test")
    assert v.sheds == sheds + 1
    assert v.reply.startswith(code) and v.delay == wait and v.close is close
    if close:
        assert "mx.test" in v.reply and v.reply == text(Refusal.LANE_BUSY_CLOSING, host="mx.test")
    else:
        assert v.reply == text(Refusal.LANE_BUSY)


@pytest.mark.parametrize(("body", "refused"), [
    (b"", False),
    (b"Subject: x\r\n\r\nhello\r\n", False),
    (b"a\r\nb\r\n.\r\n", False),
    (b"a\nb\r\n", True),                 # bare LF
    (b"a\rb\r\n", True),                 # bare CR
    (b"a\r\r\nb\r\n", True),
    (b"a\r\n.\nMAIL FROM:<x@y>\r\n", True),   # the smuggling shape
    (b"a\n\rb", True),                   # LF CR: counts match, pairs do not
])
def test_data_verdict(body: bytes, refused: bool) -> None:
    r = session_rules.data_verdict(body)
    if not refused:
        assert r is None
        return
    assert r is not None and r.reply == text(Refusal.BARE_LINE_ENDING)
    assert r.reply.startswith("550 5.6.0")
    assert r.event == "bare_line_ending" and r.metric == "rejected" and not r.close


def bucket(rate: float) -> TokenBucket:
    return TokenBucket(rate, max(1.0, rate), now=0.0)


@pytest.mark.parametrize(("silent", "now", "after", "rate", "victim"), [
    ({}, 100.0, 5.0, 10.0, None),                              # nobody silent
    ({"a": 90.0, "b": 99.0}, 100.0, 5.0, 10.0, "a"),           # the longest-silent one
    ({"a": 97.0, "b": 99.0}, 100.0, 5.0, 10.0, None),          # not silent long enough
    ({"a": 95.0}, 100.0, 5.0, 10.0, "a"),                      # exactly silent_after
    ({"a": 0.0}, 100.0, 5.0, None, None),                      # evict_rate 0: never
])
def test_pick_eviction(silent: dict[str, float], now: float, after: float, rate: float | None,
                       victim: str | None) -> None:
    b = bucket(rate) if rate is not None else None
    assert session_rules.pick_eviction(silent.items(), now, silent_after=after,
                                        bucket=b) == victim


def test_pick_eviction_is_rate_limited() -> None:
    b = bucket(1.0)            # one eviction a second, burst 1
    silent = {"a": 0.0, "b": 0.0}
    assert session_rules.pick_eviction(silent.items(), 10.0, silent_after=5.0, bucket=b) == "a"
    assert session_rules.pick_eviction(silent.items(), 10.0, silent_after=5.0, bucket=b) is None
    assert session_rules.pick_eviction(silent.items(), 11.0, silent_after=5.0, bucket=b) == "a"


def test_pick_eviction_spends_no_token_when_nobody_qualifies() -> None:
    b = bucket(1.0)
    assert session_rules.pick_eviction({"a": 9.0}.items(), 10.0, silent_after=5.0, bucket=b) is None
    assert b.tokens(10.0) == 1.0
