"""Hostile input at the command level (issue 9 items 1 and 8), through a real ingress on loopback.

- non-ASCII addresses without SMTPUTF8 -> 553 5.6.7 at MAIL and RCPT; with SMTPUTF8 they pass;
- NUL, invalid UTF-8, C0/DEL/C1 control characters in HELO/EHLO/MAIL/RCPT arguments -> 501 5.5.2;
- RCPT TO:<postmaster> (any case) accepted and stored as postmaster@<first accepted domain>;
- max_recipients = 100: exactly 100 accepted, the 101st gets 452 4.5.3;
- per-session error counting: 3,000 pipelined rejected RCPTs are cut off at the hard limit with
  421 4.7.0 and a close; junk commands (NOOP/RSET/VRFY/HELP) past the junk limit count as errors;
  MAIL transactions without DATA are limited per session (421).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator

import pytest

from tests.kit.harness import Ingress, client_bytes, smtp_dialogue

pytestmark = pytest.mark.timeout(120)

SOFT, HARD, JUNK, MAILS = 3, 6, 5, 4
EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<alice@sender.test>\r\n"
QUEUED = re.compile(r"queued as ([0-9A-F]+)")


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingress]:
    tmp = tmp_path_factory.mktemp("input")
    with Ingress(tmp, {"smtp": {
            "max_recipients": 100, "soft_error_limit": SOFT, "hard_error_limit": HARD,
            "error_sleep": 0.01, "error_sleep_max": 0.05, "junk_command_limit": JUNK,
            "mail_without_data_limit": MAILS}}) as ing:
        yield ing


def dialogue(ing: Ingress, lines: list[bytes]) -> list[str]:
    """The replies, without the trailing EOF / reset of a connection the server closed."""
    r = asyncio.run(smtp_dialogue(ing.port, lines))
    while r and (r[-1] == "EOF" or r[-1].startswith("ERR ")):
        r.pop()
    return r


def stored_rcpts(ing: Ingress, reply: str) -> list[str]:
    m = QUEUED.search(reply)
    assert m, reply
    return list(ing.spooled()[m.group(1)].envelope["rcpts"])


# --- item 1: addresses and arguments ------------------------------------------------------------

@pytest.mark.parametrize("cmd", [
    b"RCPT TO:<\xc3\xbc@example.test>\r\n",                 # ü@example.test
    b"RCPT TO:<b\xc3\xb6b@example.test>\r\n",
])
def test_non_ascii_rcpt_without_smtputf8_is_553(ingress: Ingress, cmd: bytes) -> None:
    r = dialogue(ingress, [EHLO, MAIL, cmd, b"RCPT TO:<bob@example.test>\r\n"])
    assert r[3].startswith("553 5.6.7"), r
    assert r[4].startswith("250"), r


def test_non_ascii_mail_without_smtputf8_is_553(ingress: Ingress) -> None:
    r = dialogue(ingress, [EHLO, b"MAIL FROM:<\xc3\xb6@sender.test>\r\n", MAIL])
    assert r[2].startswith("553 5.6.7"), r
    assert r[3].startswith("250"), "the session goes on: " + str(r)


def test_non_ascii_with_smtputf8_is_accepted(ingress: Ingress) -> None:
    r = dialogue(ingress, [EHLO, b"MAIL FROM:<\xc3\xb6@sender.test> SMTPUTF8\r\n",
                           b"RCPT TO:<\xc3\xbc@example.test>\r\n", b"DATA\r\n",
                           b"Subject: x\r\n\r\nhi\r\n.\r\n"])
    assert r[2].startswith("250") and r[3].startswith("250"), r
    assert r[5].startswith("250 2.0.0"), r
    assert stored_rcpts(ingress, r[5]) == ["\u00fc@example.test"]


BAD_ARGS = {
    "nul": b"a\x00b",
    "invalid_utf8": b"a\xffb",
    "lone_continuation": b"a\x80b",
    "overlong": b"a\xc0\xafb",
    "c0": b"a\x01b",
    "tab": b"a\tb",
    "esc": b"a\x1bb",
    "del": b"a\x7fb",
    "c1": b"a\xc2\x85b",                   # U+0085 (NEL), valid UTF-8 but a control character
    "cr": b"a\rb",
}


@pytest.mark.parametrize("name", sorted(BAD_ARGS))
def test_bad_bytes_in_rcpt_are_501(ingress: Ingress, name: str) -> None:
    local = BAD_ARGS[name]
    r = dialogue(ingress, [EHLO, MAIL, b"RCPT TO:<" + local + b"@example.test>\r\n",
                           b"RCPT TO:<bob@example.test>\r\n"])
    assert r[3].startswith("501 5.5.2"), r
    assert r[4].startswith("250"), r


@pytest.mark.parametrize("name", sorted(BAD_ARGS))
def test_bad_bytes_in_mail_are_501(ingress: Ingress, name: str) -> None:
    local = BAD_ARGS[name]
    r = dialogue(ingress, [EHLO, b"MAIL FROM:<" + local + b"@sender.test> SMTPUTF8\r\n", MAIL])
    assert r[2].startswith("501 5.5.2"), r
    assert r[3].startswith("250"), r


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
@pytest.mark.parametrize("name", ["nul", "invalid_utf8", "c0", "del", "c1"])
def test_bad_bytes_in_helo_are_501(ingress: Ingress, verb: bytes, name: str) -> None:
    r = dialogue(ingress, [verb + b" host" + BAD_ARGS[name] + b".test\r\n", EHLO])
    assert r[1].startswith("501 5.5.2"), r
    assert r[2].startswith("250"), r


def test_invalid_utf8_is_never_stored(ingress: Ingress) -> None:
    """Was: 250 at RCPT, then 451 at the end of DATA (on every retry of the client)."""
    r = dialogue(ingress, [EHLO, b"MAIL FROM:<a\xff@sender.test>\r\n", MAIL,
                           b"RCPT TO:<x\xfe@example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n",
                           b"DATA\r\n", b"Subject: x\r\n\r\nok\r\n.\r\n"])
    assert r[2].startswith("501 5.5.2") and r[4].startswith("501 5.5.2"), r
    assert r[-1].startswith("250 2.0.0"), r
    assert stored_rcpts(ingress, r[-1]) == ["bob@example.test"]
    assert "Traceback" not in ingress.log_tail(300)


def test_refusals_are_logged(ingress: Ingress) -> None:
    dialogue(ingress, [EHLO, b"RCPT TO:<early@example.test>\r\n", MAIL,
                       b"RCPT TO:<\xc3\xa4@example.test>\r\n",
                       b"RCPT TO:<n\x00l@example.test>\r\n"])
    events = {d["event"] for d in ingress.log_lines()}
    assert {"address_not_ascii", "bad_argument"} <= events, events
    # aiosmtpd's own refusal (503 need MAIL) is logged too, once
    early = [d for d in ingress.events("command_error") if d["reply"].startswith("503")]
    assert len(early) == 1 and early[0]["command"] == "RCPT", early
    assert not [d for d in ingress.events("command_error") if d["reply"].startswith("553")]


# --- item 8: postmaster, the recipient limit ----------------------------------------------------

@pytest.mark.parametrize("rcpt", [b"postmaster", b"PostMaster", b"POSTMASTER"])
def test_bare_postmaster_is_accepted(ingress: Ingress, rcpt: bytes) -> None:
    r = dialogue(ingress, [EHLO, MAIL, b"RCPT TO:<" + rcpt + b">\r\n", b"DATA\r\n",
                           b"Subject: x\r\n\r\nfor the postmaster\r\n.\r\n"])
    assert r[3].startswith("250"), r
    assert r[5].startswith("250 2.0.0"), r
    assert stored_rcpts(ingress, r[5]) == ["postmaster@example.test"]


def test_exactly_max_recipients_accepted(ingress: Ingress) -> None:
    rcpts = [f"RCPT TO:<u{i}@example.test>\r\n".encode() for i in range(101)]
    r = dialogue(ingress, [EHLO, MAIL, *rcpts, b"DATA\r\n", b"Subject: x\r\n\r\nmany\r\n.\r\n"])
    answers = r[3:104]
    assert all(a.startswith("250") for a in answers[:100]), [a for a in answers if a[0] != "2"]
    assert answers[100].startswith("452 4.5.3"), answers[100]
    assert r[-1].startswith("250 2.0.0"), r[-1]
    assert stored_rcpts(ingress, r[-1]) == [f"u{i}@example.test" for i in range(100)]


# --- item 8: error counting, junk commands, transactions without DATA ---------------------------

async def pipelined(port: int, payload: bytes, timeout: float = 30.0) -> tuple[list[str], str]:
    """Send `payload` at once (a pipelining client) while reading every reply line; returns
    (reply lines, how it ended: "eof" | "reset" | "timeout")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines: list[str] = []

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await writer.drain()

    sender = asyncio.create_task(send())
    end = "timeout"
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = await reader.readline()
                if not line:
                    end = "eof"
                    break
                lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
    except TimeoutError:
        pass
    except ConnectionError:
        end = "reset"
    finally:
        sender.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return lines, end


def final_replies(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln[3:4] == " "]


def test_pipelined_rejected_rcpts_cut_off_at_hard_limit(ingress: Ingress) -> None:
    """Was: 3,000 rejected RCPTs answered at full speed, the connection kept open."""
    before = len(ingress.events("relay_denied"))
    payload = EHLO + MAIL + b"".join(
        f"RCPT TO:<harvest{i}@elsewhere.test>\r\n".encode() for i in range(3000))
    lines, end = asyncio.run(pipelined(ingress.port, payload))
    replies = final_replies(lines)
    assert end in ("eof", "reset"), f"connection kept open after {len(replies)} replies"
    denied = [r for r in replies if r.startswith("550 5.7.1")]
    assert len(denied) <= HARD, len(denied)
    # The server looked at no more than HARD of them (its own log, whatever reached us).
    assert len(ingress.events("relay_denied")) - before == HARD
    if end == "eof":
        assert replies[-1].startswith("421 4.7.0") and "too many errors" in replies[-1], replies
    assert any(d.get("why") == "errors" for d in ingress.events("session_cut_off"))


def test_errors_past_soft_limit_are_delayed(ingress: Ingress) -> None:
    lines = [EHLO, MAIL] + [f"RCPT TO:<x{i}@elsewhere.test>\r\n".encode() for i in range(HARD)]
    r = dialogue(ingress, [*lines, b"NOOP\r\n"])
    assert all(x.startswith("550 5.7.1") for x in r[3:3 + HARD]), r
    assert r[-1].startswith("421 4.7.0"), r
    delays = [d for d in ingress.events("error_delay")]
    assert delays and all(0 < d["delay_ms"] <= 50 for d in delays), delays


def test_errors_below_hard_limit_keep_the_session(ingress: Ingress) -> None:
    lines = [EHLO, MAIL] + [f"RCPT TO:<x{i}@elsewhere.test>\r\n".encode()
                            for i in range(HARD - 1)]
    r = dialogue(ingress, [*lines, b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n",
                           b"Subject: x\r\n\r\nok\r\n.\r\n",
                           # a delivered message resets the count (Postfix: "without delivering")
                           MAIL, b"RCPT TO:<y@elsewhere.test>\r\n",
                           b"RCPT TO:<z@elsewhere.test>\r\n", b"QUIT\r\n"])
    assert r[-5].startswith("250 2.0.0") and r[-4].startswith("250"), r
    assert r[-3].startswith("550 5.7.1") and r[-2].startswith("550 5.7.1"), r
    assert r[-1].startswith("221"), r


def test_junk_commands_limited(ingress: Ingress) -> None:
    junk = [b"NOOP\r\n", b"RSET\r\n", b"VRFY <a@example.test>\r\n", b"HELP\r\n"] * 10
    r = dialogue(ingress, [EHLO, *junk])
    # JUNK junk commands are free; each one after that is an error; at HARD errors: 421.
    assert r[-1].startswith("421 4.7.0"), r
    assert len(r) == 2 + JUNK + HARD + 1, r
    assert all(x[0] == "2" for x in r[2:-1]), r


def test_mail_rset_loop_limited(ingress: Ingress) -> None:
    """Each MAIL FROM of a bulk session spends a bulk token: a MAIL/RSET loop that never sends
    DATA gets 421 after MAILS transactions."""
    loop = [MAIL, b"RCPT TO:<bob@example.test>\r\n", b"RSET\r\n"] * 10
    r = dialogue(ingress, [EHLO, *loop])
    assert r[-1].startswith("421 4.7.0"), r
    mails = [x for x, cmd in zip(r[1:], [EHLO, *loop], strict=False) if cmd == MAIL]
    assert sum(1 for x in mails if x.startswith("250")) == MAILS, r
    assert any(d.get("why") == "mail_without_data" for d in ingress.events("session_cut_off"))


def test_innocent_session_after_abuse(ingress: Ingress) -> None:
    r = dialogue(ingress, [EHLO, MAIL, b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n",
                           b"Subject: x\r\n\r\ninnocent\r\n.\r\n", b"QUIT\r\n"])
    assert r[-2].startswith("250 2.0.0"), r
    m = QUEUED.search(r[-2])
    assert m is not None
    assert client_bytes(ingress.spooled()[m.group(1)]) == b"Subject: x\r\n\r\ninnocent\r\n"
    assert "Traceback" not in ingress.log_tail(1000)
