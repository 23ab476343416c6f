"""Recipient verification at RCPT time against the downstream (issue 9 item 11, backscatter):
smtp.verify_recipients = true makes a cached callout to relay.downstream, as Postfix's
reject_unverified_recipient does.

Against a real Postfix that knows some recipients (virtual_mailbox_maps lists them; smtpd rejects
the others at RCPT with 550 5.1.1 "User unknown in virtual mailbox table", and one address gets a
450 from an access map): known -> 250 and delivered, unknown -> 550 5.1.1, downstream 4xx -> 450
4.1.1; answers are cached (one callout per address), concurrent RCPTs for one address share one
callout, a session may cause only verify_per_session callouts. Against a downstream that is down
(nothing listening) or silent (accepts TCP, never greets): 450 4.1.1, never 250, never 5xx.
Postfix parts skip when Postfix cannot run here (not root / not installed).
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import pytest

from ingress.edge import rcpt_verify
from ingress.edge.rcpt_verify import Answer, RecipientVerifier
from tests.kit.harness import Ingress, make_body, send_one, smtp_dialogue, wait_for
from tests.kit.postfix import (
    PostfixInstance,
    free_port,
)
from tests.kit.scripted_server import ScriptedServer

pytestmark = pytest.mark.timeout(120)

KNOWN = ("bob@example.test", "carol@example.test")
TEMP = "busy@example.test"
EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<alice@sender.test>\r\n"


# The `postfix` fixture's Postfix (tests/integration/conftest.py)
_BOXES = ", ".join(f"{a}=example.test/" for a in (*KNOWN, TEMP))
POSTFIX = {"accept_domains": ("example.test",), "extra_main_cf": {
    # only these mailboxes exist: every other recipient is 550 5.1.1 at RCPT
    "virtual_mailbox_maps": f"inline:{{{_BOXES}}}",
    "smtpd_recipient_restrictions":
        f"check_recipient_access inline:{{{{{TEMP}=450 4.2.1 mailbox busy}}}}"}}


def tables(downstream: str, **smtp: object) -> dict[str, dict[str, object]]:
    return {"smtp": {"verify_recipients": True, "verify_timeout": 2.0, **smtp},
            "relay": {"downstream": downstream, "retry_base": 0.5, "retry_max": 2.0,
                      "timeout": 10.0},
            # one acceptor: the answer cache is per acceptor process
            "supervisor": {"acceptors": 1}}


def rcpt_replies(port: int, rcpts: list[str]) -> list[str]:
    lines = [EHLO, MAIL] + [f"RCPT TO:<{r}>\r\n".encode() for r in rcpts] + [b"QUIT\r\n"]
    r = asyncio.run(smtp_dialogue(port, lines))
    return r[3:3 + len(rcpts)]


def callouts(ing: Ingress, rcpt: str) -> int:
    return sum(1 for d in ing.events("verify") if d.get("rcpt") == rcpt)


def test_verified_against_postfix(tmp_path: Path, postfix: PostfixInstance) -> None:
    with Ingress(tmp_path, tables(f"smtp://127.0.0.1:{postfix.port}")) as ing:
        r = rcpt_replies(ing.port, ["bob@example.test", "nosuch@example.test", TEMP,
                                    "Carol@example.test", "x@elsewhere.test"])
        assert r[0].startswith("250"), r
        assert r[1].startswith("550 5.1.1"), r
        assert r[2].startswith("450 4.1.1"), r           # the downstream's 4xx: not sure
        # local parts are the downstream's business: Postfix's table lookup folds case
        assert r[3].startswith("250"), r
        assert r[4].startswith("550 5.7.1"), r           # relay: never asked downstream
        assert not any(d.get("rcpt") == "x@elsewhere.test" for d in ing.events("verify"))
        # Cached: asking again makes no new callout, and gives the same answers.
        again = rcpt_replies(ing.port, ["bob@example.test", "nosuch@example.test"])
        assert again[0].startswith("250") and again[1].startswith("550 5.1.1"), again
        assert callouts(ing, "bob@example.test") == 1
        assert callouts(ing, "nosuch@example.test") == 1
        # A verified recipient's mail goes through the whole path to Postfix's Maildir.
        code, text = asyncio.run(send_one(ing.port, make_body(1), rcpts=("bob@example.test",)))
        assert code == 250, text
        refused = [d for d in ing.events("unknown_user") if d.get("command") == "RCPT"]
        assert refused and refused[0]["rcpt"] == "nosuch@example.test"
        unverified = ing.events("recipient_unverified")
        assert unverified and unverified[0]["rcpt"] == TEMP
    assert "Traceback" not in ing.log_tail(500)


def test_single_flight(tmp_path: Path, postfix: PostfixInstance) -> None:
    with Ingress(tmp_path, tables(f"smtp://127.0.0.1:{postfix.port}")) as ing:
        async def many() -> list[list[str]]:
            return await asyncio.gather(*(smtp_dialogue(ing.port, [
                EHLO, MAIL, b"RCPT TO:<carol@example.test>\r\n", b"QUIT\r\n"])
                for _ in range(10)))

        results = asyncio.run(many())
        assert all(r[3].startswith("250") for r in results), results
        assert callouts(ing, "carol@example.test") == 1


def test_callouts_capped_per_session(tmp_path: Path, postfix: PostfixInstance) -> None:
    with Ingress(tmp_path, tables(f"smtp://127.0.0.1:{postfix.port}",
                                  verify_per_session=3)) as ing:
        harvest = [f"guess{i}@example.test" for i in range(6)]
        r = rcpt_replies(ing.port, harvest)
        assert all(x.startswith("550 5.1.1") for x in r[:3]), r
        assert all(x.startswith("450 4.1.1") for x in r[3:]), r
        assert sum(callouts(ing, a) for a in harvest) == 3
        assert len(ing.events("verify_session_cap")) == 3
        # The cap is per session: a cached answer needs no callout, so it still counts as known.
        r = rcpt_replies(ing.port, ["guess0@example.test"])
        assert r[0].startswith("550 5.1.1"), r


def test_harvest_through_callouts_cut_off(tmp_path: Path, postfix: PostfixInstance) -> None:
    """Callout refusals are session errors: a pipelined harvest ends at the hard limit."""
    with Ingress(tmp_path, tables(f"smtp://127.0.0.1:{postfix.port}", soft_error_limit=2,
                                  hard_error_limit=4, error_sleep=0.01, error_sleep_max=0.02,
                                  verify_per_session=100)) as ing:
        harvest = [f"h{i}@example.test" for i in range(50)]
        r = asyncio.run(smtp_dialogue(ing.port, [EHLO, MAIL] + [
            f"RCPT TO:<{a}>\r\n".encode() for a in harvest]))
        assert [x[:9] for x in r[3:7]] == ["550 5.1.1"] * 4, r
        assert r[7].startswith("421 4.7.0"), r
        assert sum(callouts(ing, a) for a in harvest) == 4


def test_downstream_down_is_450(tmp_path: Path) -> None:
    port = free_port()                       # nothing listens there
    with Ingress(tmp_path, tables(f"smtp://127.0.0.1:{port}")) as ing:
        r = rcpt_replies(ing.port, ["bob@example.test", "nosuch@example.test"])
        assert all(x.startswith("450 4.1.1") for x in r), r
        assert ing.events("verify_uncertain")


def test_silent_downstream_is_450_within_the_deadline(tmp_path: Path) -> None:
    """A downstream that accepts the connection and never says a word: the callout's deadline
    (smtp.verify_timeout) ends it; the client gets 450, and the session goes on."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)                    # the kernel completes handshakes; nobody reads
        port = silent.getsockname()[1]
        with Ingress(tmp_path, tables(f"smtp://127.0.0.1:{port}")) as ing:
            r = asyncio.run(smtp_dialogue(ing.port, [
                EHLO, MAIL, b"RCPT TO:<bob@example.test>\r\n", b"NOOP\r\n"], read_timeout=8))
            assert r[3].startswith("450 4.1.1"), r
            assert r[4].startswith("250"), r
            assert ing.events("verify_timeout")
    finally:
        silent.close()


def test_smtputf8_address_verified(tmp_path: Path, postfix: PostfixInstance) -> None:
    """A UTF-8 recipient (the client said SMTPUTF8) is asked with MAIL FROM:<> SMTPUTF8."""
    with Ingress(tmp_path, tables(f"smtp://127.0.0.1:{postfix.port}")) as ing:
        r = asyncio.run(smtp_dialogue(ing.port, [
            EHLO, b"MAIL FROM:<alice@sender.test> SMTPUTF8\r\n",
            b"RCPT TO:<j\xc3\xbcrgen@example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n",
            b"QUIT\r\n"]))
        assert r[3].startswith("550 5.1.1"), r
        assert r[4].startswith("250"), r
        assert callouts(ing, "j\u00fcrgen@example.test") == 1


def saved_in_state(ing: Ingress, *rcpts: str) -> bool:
    """Every one of `rcpts` is in one of the acceptors' callout cache files."""
    data = b"".join(f.read_bytes() for f in ing.state.glob("rcpt-verify.*.json"))
    return all(r.encode() in data for r in rcpts)


def test_cache_survives_a_reload(tmp_path: Path, postfix: PostfixInstance) -> None:
    """issue 19 item 9: a reload (SIGHUP replaces the acceptors) used to empty the callout
    cache, so a reload during a downstream outage turned mail for known recipients into 450s.
    Two acceptors: each new one starts with the answers of both old ones."""
    known, unknown = list(KNOWN), "nosuch@example.test"
    try:
        with Ingress(tmp_path, {**tables(f"smtp://127.0.0.1:{postfix.port}"),
                                "supervisor": {"acceptors": 2}}) as ing:
            for rcpt in [*known, unknown]:       # one session each: either acceptor
                r = rcpt_replies(ing.port, [rcpt])
                assert r[0].startswith("550" if rcpt == unknown else "250"), r
            wait_for(lambda: saved_in_state(ing, *known, unknown), 10,
                     "the answers saved in the state dir")
            postfix.stop()                       # the downstream is down from here on
            ing.signal(signal.SIGHUP)
            wait_for(lambda: ing.events("reloaded"), 30, "the reload")
            loaded = ing.events("verify_cache_loaded")
            assert len(loaded) >= 2 and all(d["entries"] >= 3 for d in loaded[-2:]), loaded
            for _ in range(4):                   # new sessions, on either new acceptor
                r = rcpt_replies(ing.port, [*known, unknown, "dave@example.test"])
                assert [x[:3] for x in r] == ["250", "250", "550", "450"], r
        assert "Traceback" not in ing.log_tail(500)
    finally:
        postfix.start()                          # the module's other tests need it


def _verifier(port: int, concurrency: int) -> RecipientVerifier:
    return RecipientVerifier("127.0.0.1", port, helo="mx.test", timeout=20.0,
                             positive_ttl=100.0, negative_ttl=100.0, tempfail_ttl=0.0,
                             cache_size=100, concurrency=concurrency, backlog=100)


@pytest.mark.parametrize("script", ["slow 300ms at RSET", "slow 300ms at QUIT"])
def test_goodbye_holds_the_concurrency_slot(script: str) -> None:
    """Issue 19 item 5: RSET and QUIT after the answer used to run in unbounded background
    tasks, so a downstream slow to say goodbye saw 40 connections with verify_concurrency = 2.
    A downstream (tests.kit.scripted_server) that answers RSET / QUIT slowly counts the
    connections open at once: never more than the concurrency, every answer still OK, and
    every connection closed when the answers are in and the goodbyes done."""
    async def go() -> tuple[list[Answer], int, int]:
        async with ScriptedServer([script]) as srv:
            v = _verifier(srv.port, 2)
            answers = await asyncio.gather(
                *(v.verify(f"user{i}@example.test") for i in range(16)))
            for _ in range(200):                 # the last goodbyes (bounded: 2 x 300 ms)
                if srv.open == 0:
                    break
                await asyncio.sleep(0.05)
            return list(answers), srv.max_open, srv.open
    answers, max_open, still_open = asyncio.run(go())
    assert answers == [Answer.OK] * 16
    assert max_open <= 2, f"{max_open} downstream connections at once, verify_concurrency = 2"
    assert still_open == 0


def test_hung_goodbye_frees_the_slot_after_goodbye_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A downstream that never answers RSET holds a slot for GOODBYE_TIMEOUT, no longer: the
    callouts after it are still answered (well within their own deadline), and the connection
    is closed by us."""
    monkeypatch.setattr(rcpt_verify, "GOODBYE_TIMEOUT", 0.5)

    async def go() -> tuple[list[Answer], int, int, float]:
        async with ScriptedServer(["hang at RSET"]) as srv:
            v = _verifier(srv.port, 1)
            t0 = asyncio.get_running_loop().time()
            answers = await asyncio.gather(
                *(v.verify(f"user{i}@example.test") for i in range(4)))
            took = asyncio.get_running_loop().time() - t0
            for _ in range(200):
                if srv.open == 0:
                    break
                await asyncio.sleep(0.05)
            return list(answers), srv.max_open, srv.open, took
    answers, max_open, still_open, took = asyncio.run(go())
    assert answers == [Answer.OK] * 4 and max_open == 1 and still_open == 0
    assert took < 15, took          # 3 goodbyes of 0.5 s before the last answer; a margin
