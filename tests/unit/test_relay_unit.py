"""Relay: pure parts (backoff, downstream URLs, reply status, settle, DSN) and the relay loop
against a scripted fake downstream on loopback (LMTP per-recipient replies over a unix socket,
SMTP 4xx then 2xx with the retry schedule surviving a restart, downstream down then up, null
sender, expiry, 8BITMIME). The real-Postfix tests are in tests/integration/test_relay.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.message
import email.policy
import email.utils
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ingress.config import Config, RelayConfig, SmtpConfig, SpoolConfig
from ingress.wire import Envelope, Lane, new_qid
from workers import relay
from workers import spool as spool_mod
from workers.relay import RelayState, Reply, backoff, build_dsn, failure_for, settle

pytestmark = pytest.mark.timeout(30)

# --- pure ------------------------------------------------------------------------------------


def test_backoff_schedule() -> None:
    assert [backoff(a, 30, 3600) for a in range(0, 10)] == [
        0, 30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert [backoff(a, 0.5, 2) for a in range(1, 6)] == [0.5, 1, 2, 2, 2]
    assert backoff(10_000, 1, 5) == 5            # no overflow


@pytest.mark.parametrize(("url", "want"), [
    ("smtp://127.0.0.1:25", relay.Target("smtp", "127.0.0.1", 25)),
    ("lmtp://localhost:24", relay.Target("lmtp", "localhost", 24)),
    ("smtp://[::1]:10025", relay.Target("smtp", "::1", 10025)),
    ("lmtp:/var/run/dovecot/lmtp", relay.Target("lmtp", path="/var/run/dovecot/lmtp")),
])
def test_parse_downstream(url: str, want: relay.Target) -> None:
    assert relay.parse_downstream(url) == want


@pytest.mark.parametrize("url", ["", "smtp://host", "smtp:/sock", "http://x:1", "smtp://h:0",
                                 "smtp://h:99999"])
def test_parse_downstream_bad(url: str) -> None:
    with pytest.raises(ValueError):
        relay.parse_downstream(url)


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


def test_settle_mixed_results() -> None:
    st = RelayState()
    out = settle(st, {"a@x": Reply(250, "ok"), "b@x": Reply(451, "4.3.0 later"),
                      "c@x": Reply(550, "5.1.1 unknown")}, now=100, received_at=50, cfg=RC)
    assert out.disposition == "retry"
    assert out.state.delivered == ["a@x"] and out.state.failed == ["c@x"]
    assert out.deferred == ("b@x",) and out.delivered_now == ("a@x",)
    assert [f.rcpt for f in out.bounce] == ["c@x"] and out.bounce[0].status == "5.1.1"
    assert out.state.attempts == 1 and out.state.next_at == 110
    assert st == RelayState(), "settle must not mutate its input"
    # Only b is pending now; the next tempfail doubles the delay, then it is delivered.
    assert out.state.pending(["a@x", "b@x", "c@x"]) == ["b@x"]
    out2 = settle(out.state, {"b@x": Reply(452, "4.2.2 full")}, now=110, received_at=50, cfg=RC)
    assert out2.disposition == "retry" and out2.state.next_at == 130
    out3 = settle(out2.state, {"b@x": Reply(250, "ok")}, now=130, received_at=50, cfg=RC)
    assert out3.disposition == "failed"        # c failed: the file goes to failed/
    assert out3.state.delivered == ["a@x", "b@x"] and not out3.bounce


def test_settle_done_expired_and_recovery() -> None:
    ok = settle(RelayState(), {"a@x": Reply(250, "ok")}, now=1, received_at=0, cfg=RC)
    assert ok.disposition == "done" and not ok.bounce
    old = settle(RelayState(attempts=5), {"a@x": Reply(451, "4.4.1 refused", local=True)},
                 now=2000, received_at=0, cfg=RC)
    assert old.disposition == "failed"
    (f,) = old.bounce
    assert f.status == "4.4.7" and f.diagnostic.startswith("X-Ingress; 451 4.4.1")
    # Crash after everything was recorded but before the unlink: nothing pending, no resend.
    rec = RelayState(delivered=["a@x"], failed=["b@x"])
    assert rec.pending(["a@x", "b@x"]) == []
    assert settle(rec, {}, now=1, received_at=0, cfg=RC).disposition == "failed"
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


# --- a scripted fake downstream ------------------------------------------------------------------

Decide = Callable[[str, int], str]      # (recipient, attempt number for it) -> reply line


class FakeMTA:
    """SMTP or LMTP server on loopback (TCP or unix socket) whose per-recipient answers are
    scripted; records every delivered message (dot-unstuffed) per recipient."""

    def __init__(self, lmtp: bool, decide: Decide, exts: tuple[str, ...] = ("8BITMIME",)) -> None:
        self.lmtp, self.decide, self.exts = lmtp, decide, exts
        self.tries: Counter[str] = Counter()
        self.delivered: list[tuple[str, str, bytes]] = []     # (mail_from, rcpt, data)
        self.mail_params: list[str] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start_tcp(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def start_unix(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self.handle, path)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _answer(self, rcpt: str) -> str:
        self.tries[rcpt] += 1
        return self.decide(rcpt, self.tries[rcpt])

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1

        def say(line: str) -> None:
            w.write(line.encode() + b"\r\n")

        say("220 fake ESMTP")
        mail_from, rcpts = "", []
        try:
            while line := await r.readline():
                cmd = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb in ("EHLO", "LHLO"):
                    assert (verb == "LHLO") == self.lmtp
                    say("250-fake.test")
                    for e in self.exts:
                        say(f"250-{e}")
                    say("250 PIPELINING")
                elif verb == "MAIL":
                    mail_from = cmd[cmd.index("<") + 1:cmd.index(">")]
                    self.mail_params.append(cmd[cmd.index(">") + 1:].strip())
                    rcpts = []
                    say("250 2.1.0 ok")
                elif verb == "RCPT":
                    rcpt = cmd[cmd.index("<") + 1:cmd.index(">")]
                    answer = "250 2.1.5 ok" if self.lmtp else self._answer(rcpt)
                    if answer.startswith("2"):
                        rcpts.append(rcpt)
                    say(answer)
                elif verb == "DATA":
                    say("354 go")
                    await w.drain()
                    data = b""
                    while (chunk := await r.readline()) != b".\r\n":
                        data += chunk[1:] if chunk.startswith(b".") else chunk
                    answers = ([self._answer(x) for x in rcpts] if self.lmtp
                               else ["250 2.0.0 queued"] * len(rcpts))
                    for x, a in zip(rcpts, answers, strict=True):
                        if a.startswith("2"):
                            self.delivered.append((mail_from, x, data))
                    for a in answers if self.lmtp else answers[:1]:
                        say(a)
                elif verb == "RSET":
                    rcpts = []
                    say("250 ok")
                elif verb == "QUIT":
                    say("221 bye")
                    await w.drain()
                    break
                else:
                    say("502 what")
                await w.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            w.close()


def make_cfg(tmp: Path, downstream: str, **relay_kw: float) -> Config:
    base = Config()
    kw: dict[str, float] = {"retry_base": 0.2, "retry_max": 0.5, "timeout": 5.0}
    kw.update(relay_kw)
    return dataclasses.replace(
        base, spool=SpoolConfig(path=tmp / "spool", state_dir=tmp / "state"),
        smtp=dataclasses.replace(SmtpConfig(), hostname="mx.test"),
        relay=RelayConfig(downstream=downstream, concurrency=2, **kw))  # type: ignore[arg-type]


def spool_msg(cfg: Config, body: bytes, rcpts: tuple[str, ...], sender: str = "alice@example.test",
              age: float = 0.0) -> tuple[str, bytes]:
    now = time.time() - age
    env = Envelope(qid=new_qid(now), lane=Lane.BULK, peer_ip="127.0.0.1", peer_port=1,
                   helo="c.test", mail_from=sender, rcpts=rcpts, received_at=now,
                   deadline=now + 5)
    trace = f"Received: from c.test by mx.test id {env.qid}\r\n".encode()
    (name,) = spool_mod.Spool(cfg.spool.path).write_batch([(env, trace, body)])
    assert isinstance(name, str)
    return name, trace + body


async def run_until(cfg: Config, cond: Callable[[], bool], timeout: float = 10.0) -> relay.Relay:
    r = relay.Relay(cfg)
    task = asyncio.create_task(r.main())
    deadline = time.monotonic() + timeout
    try:
        while not cond():
            assert time.monotonic() < deadline, f"timed out; counters {r.counters}"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
    finally:
        r.stop()
        await asyncio.wait_for(task, 10)
    return r


BODY = (b"From: alice@example.test\r\nTo: a@example.test\r\nSubject: t\r\n\r\n"
        b".leading dot\r\n..two\r\nplain\r\n")


def listing(cfg: Config, sub: str) -> list[str]:
    return sorted(p.name for p in (cfg.spool.path / sub).iterdir())


def test_lmtp_unix_per_recipient(tmp_path: Path) -> None:
    sock = str(tmp_path / "lmtp.sock")

    def decide(rcpt: str, n: int) -> str:
        if rcpt.startswith("b@"):
            return "452 4.2.2 mailbox full" if n == 1 else "250 2.0.0 ok"
        if rcpt.startswith("c@"):
            return "550 5.1.1 no such user"
        return "250 2.0.0 ok"

    cfg = make_cfg(tmp_path, f"lmtp:{sock}")

    async def go() -> None:
        mta = FakeMTA(lmtp=True, decide=decide)
        await mta.start_unix(sock)
        name, sent = spool_msg(cfg, BODY, ("a@example.test", "b@example.test", "c@example.test"))
        try:
            await run_until(cfg, lambda: listing(cfg, "failed") == [name] and not listing(
                cfg, "new") and any(m[0] == "" for m in mta.delivered))
        finally:
            await mta.stop()
        got = Counter(rcpt for frm, rcpt, _ in mta.delivered if frm)
        assert got == {"a@example.test": 1, "b@example.test": 1}, "resent a delivered rcpt"
        assert mta.tries["b@example.test"] == 2 and mta.tries["a@example.test"] == 1
        for frm, _, data in mta.delivered:
            if frm:
                assert data == sent, "not byte-exact (or the envelope line leaked)"
        (dsn,) = [(r, d) for f, r, d in mta.delivered if f == ""]
        assert dsn[0] == "alice@example.test"
        _, (_, status, _) = parse_dsn(dsn[1])
        blocks = status.get_payload()
        assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; c@example.test"]
        assert blocks[1]["Status"] == "5.1.1"
        assert not list((cfg.spool.path / "relay").iterdir()), "state file left behind"

    asyncio.run(go())


def test_smtp_tempfail_schedule_survives_restart(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "smtp://127.0.0.1:1", retry_base=1.5, retry_max=3.0)

    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=lambda r, n: "451 4.3.0 try later" if n == 1 else
                      "250 2.1.5 ok")
        port = await mta.start_tcp()
        c = dataclasses.replace(cfg, relay=dataclasses.replace(
            cfg.relay, downstream=f"smtp://127.0.0.1:{port}"))
        name, sent = spool_msg(c, BODY + b"\xc3\xa9 8-bit\r\n", ("a@example.test",))
        state = c.spool.path / "relay" / name
        try:
            t0 = time.time()
            await run_until(c, state.exists)          # first attempt: 451, state written
            st = RelayState.decode(state.read_bytes())
            assert st.attempts == 1 and 1.0 < st.next_at - t0 < 2.5
            assert "451 4.3.0" in st.last_error
            # A fresh relay (a restart) honours the stored schedule: not before next_at.
            r = await run_until(c, lambda: not (c.spool.path / "new" / name).exists())
            assert time.time() >= st.next_at - 0.01
            assert r.counters["sent"] == 1
        finally:
            await mta.stop()
        assert mta.tries["a@example.test"] == 2
        assert [d for _, _, d in mta.delivered] == [sent]
        assert mta.mail_params[-1] == "BODY=8BITMIME"
        assert not state.exists()

    asyncio.run(go())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_downstream_down_then_up(tmp_path: Path) -> None:
    port = free_port()
    cfg = make_cfg(tmp_path, f"smtp://127.0.0.1:{port}", retry_base=0.1, retry_max=0.4)

    async def go() -> None:
        names = [spool_msg(cfg, BODY, (f"u{i}@example.test",))[0] for i in range(10)]
        r = relay.Relay(cfg)
        task = asyncio.create_task(r.main())
        await asyncio.sleep(2.0)                      # nothing listens
        assert sorted(listing(cfg, "new")) == sorted(names)
        # Backing off: 0.1, 0.2, 0.4, 0.4... -> at most ~7 probes in 2 s, not a busy loop.
        assert 2 <= r.counters["down"] <= 8, r.counters
        assert not list((cfg.spool.path / "relay").iterdir()), "refused connects charged"
        mta = FakeMTA(lmtp=False, decide=lambda rc, n: "250 ok")
        await mta.start_tcp(port)
        try:
            deadline = time.monotonic() + 5
            while listing(cfg, "new") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            r.stop()
            await asyncio.wait_for(task, 10)
            await mta.stop()
        assert not listing(cfg, "new")
        assert sorted(rc for _, rc, _ in mta.delivered) == sorted(
            f"u{i}@example.test" for i in range(10))
        assert mta.connections <= 3, "connections are reused"

    asyncio.run(go())


def test_null_sender_and_expiry(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "smtp://127.0.0.1:1", max_age=60.0)

    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=lambda r, n: "550 5.1.1 unknown" if r.startswith(
            "gone") else ("451 4.7.1 greylisted" if r.startswith("grey") else "250 ok"))
        port = await mta.start_tcp()
        c = dataclasses.replace(cfg, relay=dataclasses.replace(
            cfg.relay, downstream=f"smtp://127.0.0.1:{port}"))
        bounce, _ = spool_msg(c, BODY, ("gone@example.test",), sender="<>")  # as aiosmtpd has it
        old, _ = spool_msg(c, BODY, ("grey@example.test",), age=120.0)
        try:
            await run_until(c, lambda: len(listing(c, "failed")) == 2 and not listing(c, "new"))
        finally:
            await mta.stop()
        assert listing(c, "failed") == sorted([bounce, old])
        dsns = [(r, d) for f, r, d in mta.delivered if f == ""]
        assert len(dsns) == 1, "exactly one DSN: for the expired message, none for <>"
        assert dsns[0][0] == "alice@example.test"
        _, (_, status, _) = parse_dsn(dsns[0][1])
        blk = status.get_payload()[1]
        assert (blk["Action"], blk["Status"]) == ("failed", "4.4.7")
        assert "451 4.7.1 greylisted" in blk["Diagnostic-Code"]

    asyncio.run(go())


def test_reload_overlap_never_delivers_twice(tmp_path: Path) -> None:
    """Two relays on one spool (a reload overlap): the flock keeps every file single."""
    cfg = make_cfg(tmp_path, "smtp://127.0.0.1:1")

    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=lambda r, n: "250 ok")
        port = await mta.start_tcp()
        c = dataclasses.replace(cfg, relay=dataclasses.replace(
            cfg.relay, downstream=f"smtp://127.0.0.1:{port}", concurrency=4))
        for i in range(60):
            spool_msg(c, BODY, (f"u{i}@example.test",))
        r1, r2 = relay.Relay(c), relay.Relay(c)
        tasks = [asyncio.create_task(r1.main()), asyncio.create_task(r2.main())]
        deadline = time.monotonic() + 10
        while listing(c, "new") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for r in (r1, r2):
            r.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await mta.stop()
        assert not listing(c, "new")
        assert Counter(rc for _, rc, _ in mta.delivered) == {
            f"u{i}@example.test": 1 for i in range(60)}

    asyncio.run(go())
