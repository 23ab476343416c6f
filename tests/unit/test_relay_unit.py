"""Relay: pure parts (backoff, downstream URLs, reply status, settle, DSN, address problems,
failure texts). The relay loop against a scripted fake downstream on loopback is in
tests/integration/test_relay_fake_downstream.py; the real-Postfix tests are in
tests/integration/test_relay.py."""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils

import pytest

from ingress.core import downstream
from ingress.core.config import RelayConfig
from tests.kit.relaykit import parse_dsn
from workers.relay.dsn import build_dsn, quoted_headers
from workers.spool import state as relay_state
from workers.spool.state import RelayState, Reply, backoff, failure_for, settle

pytestmark = pytest.mark.timeout(30)

# --- pure ------------------------------------------------------------------------------------


def test_backoff_schedule() -> None:
    assert [backoff(a, 30, 3600) for a in range(0, 10)] == [
        0, 30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert [backoff(a, 0.5, 2) for a in range(1, 6)] == [0.5, 1, 2, 2, 2]
    assert backoff(10_000, 1, 5) == 5            # no overflow


@pytest.mark.parametrize(("url", "want"), [
    ("smtp://127.0.0.1:25", downstream.Target("smtp", "127.0.0.1", 25)),
    ("lmtp://localhost:24", downstream.Target("lmtp", "localhost", 24)),
    ("smtp://[::1]:10025", downstream.Target("smtp", "::1", 10025)),
    ("lmtp:/var/run/dovecot/lmtp", downstream.Target("lmtp", path="/var/run/dovecot/lmtp")),
])
def test_parse_downstream(url: str, want: downstream.Target) -> None:
    assert downstream.parse_downstream(url) == want


@pytest.mark.parametrize("url", ["", "smtp://host", "smtp:/sock", "http://x:1", "smtp://h:0",
                                 "smtp://h:99999"])
def test_parse_downstream_bad(url: str) -> None:
    with pytest.raises(ValueError):
        downstream.parse_downstream(url)


@pytest.mark.parametrize(("code", "text", "kind", "status"), [
    (250, "2.0.0 Ok: queued as X", "ok", "2.0.0"),
    (550, "5.1.1 <x@y>: Recipient address rejected", "perm", "5.1.1"),
    (550, "no such user", "perm", "5.0.0"),
    (450, "4.2.0 busy", "temp", "4.2.0"),
    (451, "5.1.1 mismatched class", "temp", "4.0.0"),
    (421, "4.4.2 closing", "temp", "4.4.2"),
])
def test_reply_status(code: int, text: str, kind: str, status: str) -> None:
    r = Reply(code, text)
    assert (r.kind, r.status) == (kind, status)


RC = RelayConfig(downstream="smtp://127.0.0.1:1", retry_base=10, retry_max=40, max_age=1000)


ABC = ["a@x", "b@x", "c@x"]


def test_settle_mixed_results() -> None:
    st = RelayState()
    out = settle(st, {"a@x": Reply(250, "ok"), "b@x": Reply(451, "4.3.0 later"),
                      "c@x": Reply(550, "5.1.1 unknown")}, rcpts=ABC, now=100, received_at=50,
                 cfg=RC)
    assert out.disposition == "retry"
    assert out.state.delivered == ["a@x"] and out.state.failed == ["c@x"]
    assert out.deferred == ("b@x",) and out.delivered_now == ("a@x",)
    assert [f.rcpt for f in out.bounce] == ["c@x"] and out.bounce[0].status == "5.1.1"
    assert out.state.attempts == 1 and out.state.next_at == 110
    assert st == RelayState(), "settle must not mutate its input"
    # Only b is pending now; the next tempfail doubles the delay, then it is delivered.
    assert out.state.pending(["a@x", "b@x", "c@x"]) == ["b@x"]
    out2 = settle(out.state, {"b@x": Reply(452, "4.2.2 full")}, rcpts=ABC, now=110,
                  received_at=50, cfg=RC)
    assert out2.disposition == "retry" and out2.state.next_at == 130
    out3 = settle(out2.state, {"b@x": Reply(250, "ok")}, rcpts=ABC, now=130, received_at=50,
                  cfg=RC)
    assert out3.disposition == "failed"        # c failed: the file goes to failed/
    assert out3.state.delivered == ["a@x", "b@x"] and not out3.bounce


def test_settle_done_expired_and_recovery() -> None:
    ok = settle(RelayState(), {"a@x": Reply(250, "ok")}, rcpts=["a@x"], now=1, received_at=0,
                cfg=RC)
    assert ok.disposition == "done" and not ok.bounce
    old = settle(RelayState(attempts=5), {"a@x": Reply(451, "4.4.1 refused", local=True)},
                 rcpts=["a@x"], now=2000, received_at=0, cfg=RC)
    assert old.disposition == "failed"
    (f,) = old.bounce
    assert f.status == "4.4.7" and f.diagnostic.startswith("X-Ingress; 451 4.4.1")
    # Crash after everything was recorded but before the unlink: nothing pending, no resend.
    rec = RelayState(delivered=["a@x"], failed=["b@x"])
    assert rec.pending(["a@x", "b@x"]) == []
    assert settle(rec, {}, rcpts=["a@x", "b@x"], now=1, received_at=0,
                  cfg=RC).disposition == "failed"
    assert RelayState.decode(rec.encode()) == rec


ORIGINAL = (b"Received: from c.test ([127.0.0.1])\r\n\tby mx.test (smtp-ingress lane=bulk) with "
            b"ESMTP id 1;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: hi\r\n"
            b"Message-ID: <1@sender.test>\r\n\r\nsecret body\r\n")


def test_build_dsn_structure() -> None:
    fails = [failure_for("bob@example.test", Reply(550, "5.1.1 <bob@example.test>: unknown")),
             failure_for("eve@example.test", Reply(451, "4.4.1 refused", local=True), True)]
    raw = build_dsn(reporting_mta="mx.test", sender="alice@sender.test", qid="Q1",
                    arrival=1_700_000_000, now=1_700_000_100, failures=fails, original=ORIGINAL,
                    remote_mta="127.0.0.1", dsn_id="D1.dsn")
    assert raw.isascii() and b"\n" not in raw.replace(b"\r\n", b"")
    msg, (human, status, headers) = parse_dsn(raw)
    assert msg["To"] == "<alice@sender.test>"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == "<D1.dsn@mx.test>"
    assert human.get_content_type() == "text/plain"
    assert "bob@example.test" in human.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert len(blocks) == 3                       # per-message + 2 per-recipient
    assert blocks[0]["Reporting-MTA"] == "dns; mx.test"
    assert blocks[0]["Arrival-Date"] == email.utils.formatdate(1_700_000_000)
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.test"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.test>: unknown"
    assert blocks[1]["Remote-MTA"] == "dns; 127.0.0.1"
    assert blocks[2]["Action"] == "failed" and blocks[2]["Status"] == "4.4.7"
    assert headers.get_content_type() == "text/rfc822-headers"
    quoted = headers.get_payload()
    assert "Subject: hi" in quoted and "Message-ID: <1@sender.test>" in quoted
    assert "secret body" not in raw.decode()      # headers only, never the body


def test_build_dsn_utf8_uses_global_types() -> None:
    fails = [failure_for("jürgen@example.test", Reply(550, "5.1.1 unknown"))]
    raw = build_dsn(reporting_mta="mx.test", sender="zoë@sender.test", qid="Q", arrival=0,
                    now=0, failures=fails, original=ORIGINAL)
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global-headers"]
    assert "Final-Recipient: utf-8; jürgen@example.test" in raw.decode()


# --- issue 19: a DSN quotes only the bounded trace and identifying headers ----------------

def hostile_original() -> bytes:
    """What an attacker's message looks like in the spool: our trace on top, then 64 KiB of
    headers of his choosing (his own A-R claiming our id, 60 Received, long junk fields, a
    folded 5 KiB Subject, duplicates of everything)."""
    ours = (b"Authentication-Results: mx.test (lane=bulk);\r\n\tspf=pass "
            b"smtp.mailfrom=sender.test;\r\n\tdkim=none\r\n"
            b"Received-SPF: pass (mx.test: domain of a@sender.test designates 127.0.0.1)\r\n"
            b"Received: from c.test ([127.0.0.1])\r\n\tby mx.test (smtp-ingress lane=bulk) "
            b"with ESMTP id Q1;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n")
    client = [b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=victim.test\r\n"]
    client += [f"Received: from hop{i}.evil.test by relay{i}.evil.test; Mon, 1 Jan 2024\r\n"
               .encode() for i in range(60)]
    client += [b"From: alice@sender.test\r\n", b"To: " + b", ".join(
        f"u{i}@example.test".encode() for i in range(400)) + b"\r\n",
        b"Subject: " + b"\r\n\t".join([b"S" * 70] * 70) + b"\r\n",
        b"Message-ID: <1@sender.test>\r\n", b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n",
        b"Subject: second subject\r\n", b"X-Ctl: a\x00b\x1bc\r\n"]
    client += [f"X-Junk-{i}: {'J' * 900}\r\n".encode() for i in range(70)]
    client += [b"From: mallory@evil.test\r\n"]
    return ours + b"".join(client) + b"\r\nsecret body\r\n"


def quoted_part(raw: bytes) -> bytes:
    """The raw bytes of the DSN's third part (the quoted header section)."""
    boundary = email.message_from_bytes(raw, policy=email.policy.compat32).get_boundary()
    assert boundary
    parts = raw.split(f"--{boundary}".encode())
    assert len(parts) == 5 and parts[4].startswith(b"--")       # 3 parts, then the end
    head, _, body = parts[3].partition(b"\r\n\r\n")
    assert b"rfc822-headers" in head
    return body


def test_dsn_quotes_only_bounded_trace_and_identifying_headers() -> None:
    original = hostile_original()
    assert len(original) > 64 * 1024
    fails = [failure_for("bob@example.test", Reply(554, "5.7.1 content rejected"))]
    raw = build_dsn(reporting_mta="mx.test", sender="alice@sender.test", qid="Q1",
                    arrival=0, now=0, failures=fails, original=original, authserv_id="mx.test")
    assert len(raw) < 8 * 1024, len(raw)
    quoted = quoted_part(raw)
    assert len(quoted) <= 4096 + 4, len(quoted)
    lines = quoted.rstrip(b"\r\n").split(b"\r\n")
    names = [ln.split(b":", 1)[0].lower() for ln in lines]
    # our A-R (top-most, our id) and Received; the client's top two Received; the first
    # From/To/Subject/Message-ID/Date; nothing else, and never the client's A-R
    assert names == [b"authentication-results", b"received", b"received", b"received",
                     b"from", b"to", b"subject", b"message-id", b"date"], names
    assert lines[0].startswith(b"Authentication-Results: mx.test (lane=bulk);")
    assert b"victim.test" not in quoted and b"X-Junk" not in raw and b"X-Ctl" not in quoted
    assert b"hop0.evil.test" in quoted and b"hop1.evil.test" in quoted
    assert b"hop2.evil.test" not in quoted
    assert b"mallory" not in quoted and b"second subject" not in quoted
    assert b"secret body" not in raw
    assert all(len(ln) <= 400 for ln in lines), [len(ln) for ln in lines]
    assert lines[5].endswith(b"...") and lines[6].endswith(b"...")     # To, Subject: cut
    assert b"Message-ID: <1@sender.test>" in lines


def test_dsn_quoted_headers_never_a_forged_ar_or_control_characters() -> None:
    """An A-R with our id that is not the top-most field is the client's: never quoted (the
    worker strips those; an old spool file may not have been). Control characters, C1 and
    Unicode line separators in a quoted field are replaced; a non-UTF-8 byte too."""
    original = (b"Received: from c.test by mx.test; Mon, 1 Jan 2024\r\n"
                b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=victim.test\r\n"
                b"Subject: a\x00b\x1bc \xc2\x85d \xe2\x80\xa8e \xffz \xc3\xa9t\xc3\xa9\r\n"
                b"\r\nbody\r\n")
    quoted = quoted_headers(original, "mx.test")
    assert b"victim.test" not in quoted
    assert quoted.endswith(b"Subject: a?b?c ?d ?e ?z \xc3\xa9t\xc3\xa9\r\n"), quoted
    assert quoted.count(b"\r\n") == 2 and b"\n" not in quoted.replace(b"\r\n", b"")
    # no authserv-id given: no A-R at all
    top = b"Authentication-Results: mx.test; none\r\n" + original
    assert b"Authentication-Results" not in quoted_headers(top, "")
    assert quoted_headers(top, "MX.test").startswith(b"Authentication-Results: mx.test; none")


# --- issue 9: hostile addresses, poison messages, settle, reload overlap ----------------------

LONG_LOCAL = "x" * 250


@pytest.mark.parametrize(("addr", "sender", "utf8", "want"), [
    ("a@example.test", False, False, None),
    ("a@example.test", True, False, None),
    ("", True, False, None),                              # the null sender
    ("", False, False, "553 5.1.3"),                      # an empty recipient
    ("ü@example.test", False, False, "553 5.6.7"),        # non-ASCII, no SMTPUTF8 downstream
    ("ü@example.test", True, False, "553 5.6.7"),
    ("ü@example.test", False, True, None),                # downstream offers SMTPUTF8
    ("a@bücher.test", False, True, None),
    ("a\x00b@example.test", False, True, "553 5.1.3"),    # NUL
    ("a\x00b@example.test", True, True, "553 5.1.7"),
    ("a@x\r\nRSET", False, True, "553 5.1.3"),            # CR LF: command injection
    ("a\n@example.test", False, True, "553 5.1.3"),
    ("a\tb@example.test", False, True, "553 5.1.3"),
    ("a b@example.test", False, True, "553 5.1.3"),
    ("a@x> SIZE=1", False, True, "553 5.1.3"),            # parameter injection
    ("<a@example.test>", False, True, "553 5.1.3"),
    ("a\x7f@example.test", False, True, "553 5.1.3"),     # DEL
    ("a\x85@example.test", False, True, "553 5.1.3"),     # C1 control (NEL)
    ("a\u2028@example.test", False, True, "553 5.1.3"),   # line separator
    ("\ud800@example.test", False, True, "553 5.1.3"),    # a lone surrogate: not encodable
    (f"{LONG_LOCAL}@example.test", False, True, "553 5.1.3"),   # path over 254 octets
    (f"{LONG_LOCAL}@example.test", True, True, "553 5.1.7"),
    ("x" * 241 + "@example.test", False, True, None),     # 254 octets: the longest allowed
    ("ü" * 121 + "@example.test", False, True, "553 5.1.3"),    # 255 octets in UTF-8
])
def test_address_problem(addr: str, sender: bool, utf8: bool, want: str | None) -> None:
    got = relay_state.address_problem(addr, sender=sender, utf8=utf8)
    if want is None:
        assert got is None
    else:
        assert got is not None and got.line().startswith(want) and got.local, got
        assert got.kind == "perm"


@pytest.mark.parametrize(("state", "results", "expired", "disp", "delivered", "deferred"), [
    # b has no result: the message must not be finished, b stays pending
    (RelayState(), {"a@x": Reply(250, "ok")}, False, "retry", ["a@x"], ("b@x",)),
    (RelayState(), {}, False, "retry", [], ("a@x", "b@x")),
    # a result for a recipient the message does not have is ignored, not recorded
    (RelayState(), {"z@x": Reply(250, "ok"), "a@x": Reply(250, "ok")}, False, "retry",
     ["a@x"], ("b@x",)),
    # a delivered recipient reported again is not recorded twice
    (RelayState(delivered=["a@x"]), {"a@x": Reply(250, "ok"), "b@x": Reply(250, "ok")}, False,
     "done", ["a@x", "b@x"], ()),
    (RelayState(delivered=["a@x"]), {"b@x": Reply(250, "ok")}, False, "done",
     ["a@x", "b@x"], ()),
    # expired: a recipient without a result fails with 4.4.7 like any deferral
    (RelayState(), {"a@x": Reply(250, "ok")}, True, "failed", ["a@x"], ()),
])
def test_settle_recipient_without_result(state: RelayState, results: dict[str, Reply],
                                         expired: bool, disp: str, delivered: list[str],
                                         deferred: tuple[str, ...]) -> None:
    now = 2000.0 if expired else 100.0
    out = settle(state, results, rcpts=["a@x", "b@x"], now=now, received_at=50, cfg=RC)
    assert out.disposition == disp
    assert out.state.delivered == delivered
    assert out.deferred == deferred
    assert "z@x" not in out.state.delivered + out.state.failed
    if expired:
        (f,) = out.bounce
        assert f.rcpt == "b@x" and f.status == "4.4.7"
    if disp == "retry":
        assert out.state.attempts == state.attempts + 1 and out.state.next_at > now


@pytest.mark.parametrize(("reply", "expired", "status", "diag"), [
    ("ü@x.test", False, "5.6.7", "X-Ingress; 553 5.6.7"),
    ("a\x00@x.test", False, "5.1.3", "X-Ingress; 553 5.1.3"),
    (Reply(451, "4.3.0 local error: RuntimeError: boom", local=True), True, "4.4.7",
     "X-Ingress; 451 4.3.0"),
    (Reply(550, "5.1.1 unknown"), False, "5.1.1", "smtp; 550 5.1.1"),
])
def test_failure_for(reply: Reply | str, expired: bool, status: str, diag: str) -> None:
    if isinstance(reply, str):                    # an address: the relay's own verdict on it
        got = relay_state.address_problem(reply, sender=False, utf8=False)
        assert got is not None
        reply = got
    f = failure_for("r@x.test", reply, expired)
    assert f.status == status and f.diagnostic.startswith(diag)


def test_503_is_never_a_bounce() -> None:
    """503 (bad sequence) is our session out of step, not the message: retried, never 5xx."""
    r = Reply(503, "5.5.1 Error: nested MAIL command")
    assert r.kind == "temp"
    out = settle(RelayState(), {"a@x": r}, rcpts=["a@x"], now=100, received_at=50, cfg=RC)
    assert out.disposition == "retry" and not out.bounce
