"""The innocent-mail invariant of the relay (issue 9): poison messages interleaved with innocent
ones, relayed by a real ingress to a real downstream, over SMTP (a private Postfix,
tests/kit/postfix.py) and over LMTP (aiosmtpd's LMTP server in its own process, on a loopback
socket). Every innocent message arrives exactly once and none bounces; every poison message
ends in failed/ with a DSN to its sender (never to the null sender; none at all to a sender
that cannot be sent), or is delivered where the downstream takes it.

The poison is written straight into the spool with workers.spool.store (as old spool files, DSNs or
an acceptor bug would leave it), so the acceptor's own address checks cannot stop it:
  - a non-ASCII recipient without SMTPUTF8 next to a good one (the downstream offers no
    SMTPUTF8: 5.6.7 for that recipient, the other delivered);
  - a non-ASCII sender (5.6.7 for all; the DSN to it cannot be sent either: failed/);
  - NUL and CR LF in a recipient (5.1.3) and CR LF in the sender (5.1.7, no DSN);
  - a recipient the downstream rejects (550 5.1.1);
  - a 5,000-byte line (Postfix takes it; aiosmtpd refuses it with 500);
  - one that makes the downstream hang up: Postfix after smtpd_hard_error_limit rejected
    recipients (421, then it closes), the LMTP server after the message's DATA (no reply).
Innocent mail goes through the acceptor (send_one), one between each two poison files, on a
relay with concurrency 1 so every message shares the downstream session with the poison.
Skips when Postfix cannot run here (not root / not installed).
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from ingress.core.wire import Envelope, Lane, new_qid
from tests.kit.harness import Ingress, make_body, send_one, wait_for
from tests.kit.postfix import (
    PostfixInstance,
    free_port,
)
from workers.spool import store as spool_mod

pytestmark = pytest.mark.timeout(150)

SENDER = "alice@sender.test"
REJECTED = [f"nosuch{i}@example.test" for i in range(4)]
HARD_ERRORS = 3            # Postfix's smtpd_hard_error_limit here: the 4th rejected RCPT -> 421
DROP_MARK = b"POISON-DROP-THE-CONNECTION"

# --- the LMTP downstream: aiosmtpd's LMTP class in a subprocess -----------------------------

LMTP_SERVER = r'''
import asyncio, base64, os, sys, orjson
from aiosmtpd.lmtp import LMTP

port, out = int(sys.argv[1]), sys.argv[2]
rejected, drop = set(sys.argv[3].split(",")), sys.argv[4].encode()

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in rejected:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content
        if drop in data:
            server.transport.abort()            # hang up: no reply to the final dot
            return "250 2.0.0 never seen"
        with open(out, "ab") as f:
            for r in envelope.rcpt_tos:
                f.write(orjson.dumps({"from": envelope.mail_from, "rcpt": r,
                                      "data": base64.b64encode(data).decode()}) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return "\r\n".join("250 2.0.0 delivered" for _ in envelope.rcpt_tos)

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: LMTP(Handler(), enable_SMTPUTF8=False, hostname="lmtp.test",
                     decode_data=False), "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''


class LmtpDownstream:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.out = work / "lmtp-delivered.jsonl"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LMTP_SERVER, str(self.port), str(self.out),
             ",".join(REJECTED[:1]), DROP_MARK.decode()],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()          # blocks until ready or exit
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError("LMTP server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def delivered(self) -> list[tuple[str, str, bytes]]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_bytes().splitlines():
            d = orjson.loads(line)
            frm = "" if d["from"] == "<>" else d["from"]        # aiosmtpd keeps the <>
            out.append((frm, d["rcpt"], base64.b64decode(d["data"])))
        return out


# The `postfix` fixture's Postfix (tests/integration/conftest.py)
_REFUSALS = ", ".join("{" + f"{r}=550 5.1.1 no such user" + "}" for r in REJECTED)
POSTFIX = {"extra_main_cf": {
    "smtpd_recipient_restrictions": f"check_recipient_access inline:{{{_REFUSALS}}}",
    "smtputf8_enable": "no",
    "smtpd_hard_error_limit": str(HARD_ERRORS),
    "smtpd_error_sleep_time": "0"}}


def postfix_delivered(pf: PostfixInstance) -> list[tuple[str, str, bytes]]:
    """(Return-Path, Delivered-To, raw) for every message in Postfix's Maildirs."""
    out = []
    for p in pf.maildir_messages():
        raw = p.read_bytes()
        rp = re.search(rb"^Return-Path: <([^>]*)>", raw, re.M)
        dt = re.search(rb"^Delivered-To: (\S+)", raw, re.M)
        assert rp and dt, raw[:300]
        out.append((rp.group(1).decode(), dt.group(1).decode(), raw))
    return out


# --- poison, written straight into the spool --------------------------------------------------

def spool_poison(spool: Path, sender: str, rcpts: tuple[str, ...], body: bytes) -> str:
    now = time.time()
    env = Envelope(qid=new_qid(now), lane=Lane.BULK, peer_ip="127.0.0.1", peer_port=1,
                   helo="poison.test", mail_from=sender, rcpts=rcpts, received_at=now,
                   deadline=now + 5, smtputf8=False)
    (name,) = spool_mod.Spool(spool).write_batch([(env, b"", body)])
    assert isinstance(name, str)
    return name


def poison_set(lmtp: bool) -> list[tuple[str, str, tuple[str, ...], bytes]]:
    """(what, sender, rcpts, body). The hang-up depends on the downstream."""
    def body(tag: str, extra: bytes = b"") -> bytes:
        return (f"From: {SENDER}\r\nTo: x@example.test\r\nSubject: poison {tag}\r\n"
                f"Message-ID: <{tag}.{time.time_ns()}@sender.test>\r\n\r\n").encode() + extra + \
            b"poison body\r\n"
    hangup = (("hangup", SENDER, ("victim@example.test",), body("hangup", DROP_MARK + b"\r\n"))
              if lmtp else
              ("hangup", SENDER, (*REJECTED, "victim@example.test"), body("hangup")))
    return [
        ("rcpt-utf8", SENDER, ("ü@example.test", "p-utf8-ok@example.test"), body("rcpt-utf8")),
        ("rcpt-nul", SENDER, ("a\x00b@example.test", "p-nul-ok@example.test"), body("rcpt-nul")),
        hangup,
        ("rejected", SENDER, (REJECTED[0],), body("rejected")),
        ("sender-utf8", "ö@sender.test", ("p-sutf8@example.test",), body("sender-utf8")),
        ("long-line", SENDER, ("p-long@example.test",), body("long-line", b"y" * 5000 + b"\r\n")),
        ("rcpt-crlf", SENDER, ("c@example.test\r\nRSET", "p-crlf-ok@example.test"),
         body("rcpt-crlf")),
        ("sender-crlf", "s@sender.test\r\nRSET", ("p-scrlf@example.test",), body("sender-crlf")),
    ]


def run_invariant(tmp_path: Path, downstream: str, lmtp: bool,
                  delivered: Callable[[], list[tuple[str, str, bytes]]]) -> None:
    # relay.dsn = "always": the poison's DSNs are part of the invariant (their senders carry no
    # evidence, and the default would send them none)
    tables = {"relay": {"downstream": downstream, "retry_base": 0.3, "retry_max": 1.0,
                        "max_age": 8.0, "timeout": 5.0, "concurrency": 1, "dsn": "always"}}
    poison = poison_set(lmtp)
    innocent = {f"inno{i}-{time.time_ns()}@example.test": make_body(i)
                for i in range(len(poison) + 1)}
    names: dict[str, str] = {}
    with Ingress(tmp_path, tables) as ing:
        wait_for(lambda: ing.events("relay_start"), 20, "the relay")
        for (rcpt, b), p in zip(innocent.items(), [*poison, None], strict=True):
            code, text = asyncio.run(send_one(ing.port, b, sender=SENDER, rcpts=(rcpt,)))
            assert code == 250, (code, text)
            if p is not None:
                what, sender, rcpts, pbody = p
                names[what] = spool_poison(ing.spool, sender, rcpts, pbody)

        def settled() -> bool:
            return (not any((ing.spool / "new").iterdir())
                    and set(innocent) <= {r for _, r, _ in delivered()})

        wait_for(settled, 60, "every innocent message delivered and the spool empty")
        failed = {p.name: spool_mod.read(p).envelope for p in (ing.spool / "failed").iterdir()}
        bounced = ing.events("relay_bounced")
        unsure = {r for e in ing.events("relay_unsure") for r in e["rcpts"]}
    got = delivered()
    count = Counter(r for f, r, _ in got if f)
    # 1. Every innocent message arrived exactly once, and none bounced.
    for rcpt, b in innocent.items():
        assert count[rcpt] == 1, (rcpt, count[rcpt])
        (raw,) = [d for f, r, d in got if r == rcpt]
        assert raw.replace(b"\r\n", b"\n").endswith(b.replace(b"\r\n", b"\n")), rcpt
    assert not any(r in innocent for e in bounced for r in e["rcpts"]), bounced
    dsns = [(r, d) for f, r, d in got if f == ""]
    for _, d in dsns:
        assert not any(r.encode() in d for r in innocent), "a DSN about an innocent message"
    # 2. Only poison (and DSNs that cannot be delivered either) in failed/.
    poison_names = set(names.values())
    for name, env in failed.items():
        if name not in poison_names:
            assert env["mail_from"] == "" and env["rcpts"] == ["ö@sender.test"], env
    # 3. Each poison message: failed with a DSN to its sender, or delivered where possible.
    dsn_for: dict[str, list[str]] = {}
    for r, d in dsns:
        assert r == SENDER, f"a DSN to {r!r}"
        subj = re.search(rb"Subject: poison ([a-z0-9-]+)", d)
        assert subj, d[:500]
        dsn_for.setdefault(subj.group(1).decode(), []).append(
            " ".join(re.findall(r"^Status: ([0-9.]+)", d.decode("utf-8", "replace"), re.M)))
    good_parts = {"rcpt-utf8": "p-utf8-ok@example.test", "rcpt-nul": "p-nul-ok@example.test",
                  "rcpt-crlf": "p-crlf-ok@example.test"}
    for what, rcpt in good_parts.items():
        assert count[rcpt] == 1, f"{what}: its good recipient not delivered"
        assert names[what] in failed and dsn_for[what] == [
            "5.6.7" if what == "rcpt-utf8" else "5.1.3"], (what, dsn_for.get(what))
    assert names["rejected"] in failed and dsn_for["rejected"] == ["5.1.1"]
    assert names["sender-utf8"] in failed and "sender-utf8" not in dsn_for  # its DSN: failed/
    assert names["sender-crlf"] in failed and "sender-crlf" not in dsn_for  # unsendable sender
    if lmtp:
        assert names["long-line"] in failed and dsn_for["long-line"] == ["5.0.0"]
        # The hang-up after DATA: retried with backoff, then 4.4.7 at max_age.
        assert names["hangup"] in failed and dsn_for["hangup"] == ["4.4.7"]
        assert count["victim@example.test"] == 0
    else:
        assert count["p-long@example.test"] == 1 and names["long-line"] not in failed
        # HARD_ERRORS rejections, then 421 and a hang-up; the rest retried on a new session.
        assert names["hangup"] in failed
        assert sorted(" ".join(dsn_for["hangup"]).split()) == ["5.1.1"] * len(REJECTED)
        assert count["victim@example.test"] == 1 or "victim@example.test" in unsure


def test_innocent_mail_invariant_smtp(tmp_path: Path, postfix: PostfixInstance) -> None:
    run_invariant(tmp_path, f"smtp://127.0.0.1:{postfix.port}", False,
                  lambda: postfix_delivered(postfix))


def test_innocent_mail_invariant_lmtp(tmp_path: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="relay-poison-lmtp-"))
    down = LmtpDownstream(work)
    try:
        run_invariant(tmp_path, f"lmtp://127.0.0.1:{down.port}", True, down.delivered)
    finally:
        down.stop()
        shutil.rmtree(work, ignore_errors=True)

