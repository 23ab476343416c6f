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
from workers.relay import state as relay_state
from workers.relay.dsn import build_dsn
from workers.relay.state import RelayState, Reply, backoff, failure_for, settle

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


def parse_dsn(raw: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    return msg, parts


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
