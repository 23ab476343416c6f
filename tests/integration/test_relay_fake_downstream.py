"""Relay loop against a scripted fake downstream on loopback: LMTP per-recipient replies over
a unix socket, SMTP 4xx then 2xx with the retry schedule surviving a restart, downstream down
then up, null sender, expiry, reload overlap, and poison messages (unsendable addresses, any
exception, replies before a hang-up) never failing an innocent message. Moved from
tests/unit/test_relay_unit.py (these start servers); the pure parts stay there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from ingress.core.addr import normalize_domain
from ingress.core.config import Config
from ingress.core.wire import Envelope, Lane, WireEvidence, new_qid
from tests.kit.relaykit import make_cfg, parse_dsn, run_until
from workers.relay import scheduler
from workers.relay.clients import lmtp as lmtp_client
from workers.spool import store as spool_mod
from workers.spool.state import RelayState, Reply

pytestmark = pytest.mark.timeout(30)


# --- a scripted fake downstream ------------------------------------------------------------------

Decide = Callable[[str, int], str]      # (recipient, attempt number for it) -> reply line


class FakeMTA:
    """SMTP or LMTP server on loopback (TCP or unix socket) whose per-recipient answers are
    scripted; records every delivered message (dot-unstuffed) per recipient."""

    def __init__(self, lmtp: bool, decide: Decide, exts: tuple[str, ...] = ("8BITMIME",),
                 drop: Callable[[str, bytes], bool] | None = None) -> None:
        """`drop(stage, what)`: hang up without a reply (stage "mail": the MAIL FROM address,
        "rcpt": the recipient, "data": the message)."""
        self.lmtp, self.decide, self.exts = lmtp, decide, exts
        self.drop = drop or (lambda stage, what: False)
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
        mail_from, rcpts, in_txn = "", [], False
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
                elif verb == "MAIL" and in_txn:
                    say("503 5.5.1 Error: nested MAIL command")      # as Postfix says it
                elif verb == "MAIL":
                    in_txn = True
                    mail_from = cmd[cmd.index("<") + 1:cmd.index(">")]
                    if self.drop("mail", mail_from.encode()):
                        break
                    self.mail_params.append(cmd[cmd.index(">") + 1:].strip())
                    rcpts = []
                    say("250 2.1.0 ok")
                elif verb == "RCPT":
                    rcpt = cmd[cmd.index("<") + 1:cmd.index(">")]
                    if self.drop("rcpt", rcpt.encode()):
                        break
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
                    if self.drop("data", data):
                        break
                    answers = ([self._answer(x) for x in rcpts] if self.lmtp
                               else ["250 2.0.0 queued"] * len(rcpts))
                    for x, a in zip(rcpts, answers, strict=True):
                        if a.startswith("2"):
                            self.delivered.append((mail_from, x, data))
                    for a in answers if self.lmtp else answers[:1]:
                        say(a)
                    in_txn = False
                elif verb == "RSET":
                    rcpts, in_txn = [], False
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

    cfg = make_cfg(tmp_path, f"lmtp:{sock}", dsn="always")

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
        r = scheduler.Relay(cfg)
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
    cfg = make_cfg(tmp_path, "smtp://127.0.0.1:1", max_age=60.0, dsn="always")

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
        r1, r2 = scheduler.Relay(c), scheduler.Relay(c)
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




@pytest.mark.parametrize(("spool_file", "locked", "tmp", "kept"), [
    (False, False, False, False),     # spool file gone: a stale state file
    (True, False, False, True),       # message still waiting: its retry schedule stays
    (True, True, False, True),
    (True, True, True, True),         # another relay is writing this state right now
    (True, False, True, False),       # a tmp file nobody is writing
    (False, False, True, False),
])
def test_cleanup_states_spares_a_locked_message(tmp_path: Path, spool_file: bool, locked: bool,
                                                tmp: bool, kept: bool) -> None:
    """A new relay starting during a reload (the old one still delivering) must not remove the
    old one's state file, even half-written."""
    import fcntl
    import os
    cfg = make_cfg(tmp_path, "smtp://127.0.0.1:1")
    name, _ = spool_msg(cfg, BODY, ("a@example.test",))
    path = cfg.spool.path / "new" / name
    if not spool_file:
        path.unlink()
    state_dir = cfg.spool.path / "relay"
    state_dir.mkdir(exist_ok=True)
    st = state_dir / (f".tmp.{name}" if tmp else name)
    st.write_bytes(RelayState(attempts=1).encode())
    fd = os.open(path, os.O_RDONLY) if locked else -1
    try:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the "old relay"
        removed = scheduler.Relay(cfg).cleanup_states()
        assert st.exists() == kept
        assert removed == (0 if kept else 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if spool_file:
        # The cleanup must not leave the spool file locked itself.
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def spool_utf8(cfg: Config, body: bytes, rcpts: tuple[str, ...], sender: str,
               smtputf8: bool = False) -> str:
    now = time.time()
    env = Envelope(qid=new_qid(now), lane=Lane.BULK, peer_ip="127.0.0.1", peer_port=1,
                   helo="c.test", mail_from=sender, rcpts=rcpts, received_at=now,
                   deadline=now + 5, smtputf8=smtputf8)
    (name,) = spool_mod.Spool(cfg.spool.path).write_batch([(env, b"", body)])
    assert isinstance(name, str)
    return name


def innocent_and_poison(cfg: Config) -> tuple[list[str], dict[str, str]]:
    """Spool innocent messages (i0..i5@example.test) interleaved with poison ones; returns the
    innocent recipients and poison name -> what it is."""
    innocent: list[str] = []
    poison: dict[str, str] = {}
    bad = [
        ("rcpt-utf8", ("ü@example.test", "p1ok@example.test"), "alice@example.test"),
        ("sender-utf8", ("p2@example.test",), "ö@example.test"),
        ("rcpt-nul", ("a\x00b@example.test", "p3ok@example.test"), "alice@example.test"),
        ("rcpt-crlf", ("x@example.test\r\nRSET", "p4ok@example.test"), "alice@example.test"),
        ("sender-long", ("p5@example.test",), "s" * 300 + "@example.test"),
    ]
    for i in range(6):
        rc = f"i{i}@example.test"
        innocent.append(rc)
        spool_utf8(cfg, BODY, (rc,), "alice@example.test")
        if i < len(bad):
            what, rcpts, sender = bad[i]
            poison[spool_utf8(cfg, BODY, rcpts, sender)] = what
    return innocent, poison


@pytest.mark.parametrize("lmtp", [False, True])
def test_unsendable_address_never_poisons_the_session(tmp_path: Path, lmtp: bool) -> None:
    """Issue 9 item 1: a non-ASCII address without SMTPUTF8 (and NUL, CR LF, over-long) made
    aiosmtplib raise mid-transaction, the session stayed half-open and the next innocent
    message got 503 nested MAIL and was bounced; over LMTP a bad MAIL FROM became the
    breaker's eternal probe. Now each bad address fails for its recipient alone (5.6.7 /
    5.1.3, DSN), every innocent message is delivered on the shared session."""
    sock = str(tmp_path / "lmtp.sock")

    async def go() -> None:
        mta = FakeMTA(lmtp=lmtp, decide=lambda r, n: "250 2.0.0 ok", exts=("8BITMIME",))
        if lmtp:
            await mta.start_unix(sock)
            ds = f"lmtp:{sock}"
        else:
            ds = f"smtp://127.0.0.1:{await mta.start_tcp()}"
        cfg = dataclasses.replace(make_cfg(tmp_path, ds), relay=dataclasses.replace(
            make_cfg(tmp_path, ds, dsn="always").relay, concurrency=1))   # one shared session
        innocent, poison = innocent_and_poison(cfg)
        want_ok = set(innocent) | {"p1ok@example.test", "p3ok@example.test",
                                   "p4ok@example.test"}
        try:
            await run_until(cfg, lambda: want_ok <= {r for f, r, _ in mta.delivered if f}
                            and set(poison) <= set(listing(cfg, "failed"))
                            and not listing(cfg, "new"), timeout=15)
        finally:
            await mta.stop()
        got = Counter(r for f, r, _ in mta.delivered if f)
        assert {r: got[r] for r in want_ok} == dict.fromkeys(want_ok, 1)
        # failed/: the poison, and the DSN to the non-ASCII sender (it cannot be sent either;
        # from the null sender, so it is not bounced again).
        failed = {n: spool_mod.read(cfg.spool.path / "failed" / n).envelope
                  for n in listing(cfg, "failed")}
        extra = {n: e for n, e in failed.items() if n not in poison}
        assert [(e["mail_from"], e["rcpts"]) for e in extra.values()] == [
            ("", ["ö@example.test"])], failed
        dsns = [d for f, r, d in mta.delivered if f == ""]
        statuses = []
        for d in dsns:
            parse_dsn(d)
            statuses += re.findall(r"^Final-Recipient: ([^\r]+)\r\nAction: failed\r\n"
                                   r"Status: ([0-9.]+)\r\n", d.decode(), re.M)
        # One DSN per poison message with a sendable sender; none mention an innocent rcpt.
        assert sorted(statuses) == sorted([
            ("rfc822; a?b@example.test", "5.1.3"),
            ("rfc822; x@example.test??RSET", "5.1.3"),
            ("utf-8; ü@example.test", "5.6.7"),
        ]), statuses

    asyncio.run(go())


@pytest.mark.parametrize("lmtp", [False, True])
def test_any_exception_is_one_message_failure(tmp_path: Path, lmtp: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception mid-transaction (here injected after MAIL FROM, for one recipient) is that
    message's failure: attempts with backoff, then 4.4.7 and a DSN at max_age; the session is
    dropped, never reused dirty, so the innocent messages around it are delivered."""
    sock = str(tmp_path / "lmtp.sock")
    if lmtp:
        orig = lmtp_client.LmtpSession._cmd

        async def cmd(self: lmtp_client.LmtpSession, line: bytes) -> Reply:
            if line.startswith(b"RCPT") and b"boom@" in line:
                raise RuntimeError("injected")
            return await orig(self, line)
        monkeypatch.setattr(lmtp_client.LmtpSession, "_cmd", cmd)
    else:
        import aiosmtplib
        orig_ex = aiosmtplib.SMTP.execute_command

        async def ex(self: aiosmtplib.SMTP, *args: bytes, **kw: object) -> object:
            if args[0] == b"RCPT" and b"boom@" in args[1]:
                raise RuntimeError("injected")
            return await orig_ex(self, *args, **kw)
        monkeypatch.setattr(aiosmtplib.SMTP, "execute_command", ex)

    async def go() -> None:
        mta = FakeMTA(lmtp=lmtp, decide=lambda r, n: "250 2.0.0 ok")
        if lmtp:
            await mta.start_unix(sock)
            ds = f"lmtp:{sock}"
        else:
            ds = f"smtp://127.0.0.1:{await mta.start_tcp()}"
        cfg = make_cfg(tmp_path, ds, retry_base=0.3, retry_max=5.0, max_age=2.0, dsn="always")
        cfg = dataclasses.replace(cfg, relay=dataclasses.replace(cfg.relay, concurrency=1))
        innocent = [f"i{i}@example.test" for i in range(4)]
        spool_msg(cfg, BODY, (innocent[0],))
        bad, _ = spool_msg(cfg, BODY, ("boom@example.test",))
        for r in innocent[1:]:
            spool_msg(cfg, BODY, (r,))
        state = cfg.spool.path / "relay" / bad
        seen: list[RelayState] = []

        def cond() -> bool:
            if state.exists():
                with contextlib.suppress(Exception):
                    st = RelayState.decode(state.read_bytes())
                    if not seen or seen[-1] != st:
                        seen.append(st)
            return listing(cfg, "failed") == [bad] and not listing(cfg, "new") and any(
                f == "" for f, _, _ in mta.delivered)

        try:
            await run_until(cfg, cond, timeout=15)
        finally:
            await mta.stop()
        got = Counter(r for f, r, _ in mta.delivered if f)
        assert got == dict.fromkeys(innocent, 1)
        attempts = [s.attempts for s in seen]
        assert attempts and attempts == sorted(attempts) and attempts[-1] <= 4, attempts
        assert "RuntimeError" in seen[-1].last_error
        (dsn,) = [d for f, _, d in mta.delivered if f == ""]
        _, (_, status, _) = parse_dsn(dsn)
        blk = status.get_payload()[1]
        assert (blk["Final-Recipient"], blk["Status"]) == ("rfc822; boom@example.test", "4.4.7")

    asyncio.run(go())


@pytest.mark.parametrize(("lmtp", "stage"), [(True, "mail"), (False, "mail"), (True, "data"),
                                              (False, "data")])
def test_poison_is_not_the_eternal_probe(tmp_path: Path, lmtp: bool, stage: str) -> None:
    """A message that makes the downstream hang up (at its MAIL FROM, or after its DATA) is a
    failure of that message, not of the downstream: it backs off and expires on its own and
    the innocent messages keep flowing (before: 0 of 6 delivered over LMTP until max_age)."""
    sock = str(tmp_path / "lmtp.sock")

    def drop(st: str, what: bytes) -> bool:
        if st != stage:
            return False
        return b"poison@" in what if st == "mail" else b"\r\nPOISON-DROP\r\n" in what

    async def go() -> None:
        mta = FakeMTA(lmtp=lmtp, decide=lambda r, n: "250 2.0.0 ok", drop=drop)
        if lmtp:
            await mta.start_unix(sock)
            ds = f"lmtp:{sock}"
        else:
            ds = f"smtp://127.0.0.1:{await mta.start_tcp()}"
        cfg = make_cfg(tmp_path, ds, retry_base=0.3, retry_max=5.0, max_age=2.5)
        bad, _ = spool_msg(cfg, BODY + b"POISON-DROP\r\n", ("victim@example.test",),
                           sender="poison@example.test")
        innocent = [f"i{i}@example.test" for i in range(6)]
        for r in innocent:
            spool_msg(cfg, BODY, (r,))
        r = await run_until(cfg, lambda: listing(cfg, "failed") == [bad] and not listing(
            cfg, "new"), timeout=15)
        await mta.stop()
        got = Counter(x for f, x, _ in mta.delivered if f)
        assert got == dict.fromkeys(innocent, 1)
        assert r.counters["down"] == 0, "a message-level failure opened the breaker"
        assert r.counters["bounced"] == 1

    asyncio.run(go())


def test_replies_before_a_hang_up_stand(tmp_path: Path) -> None:
    """A RCPT refused with 550 before the downstream hung up (Postfix does, with 421, after
    smtpd_hard_error_limit) is failed and bounced then; only the recipients without a reply
    are retried. Before, the whole attempt was thrown away and retried unchanged forever."""
    hung: list[str] = []

    def drop(stage: str, what: bytes) -> bool:
        if stage == "rcpt" and what.startswith(b"hang@") and not hung:
            hung.append("once")
            return True
        return False

    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=lambda r, n: "550 5.1.1 unknown" if r.startswith(
            "gone@") else "250 2.1.5 ok", drop=drop)
        port = await mta.start_tcp()
        cfg = make_cfg(tmp_path, f"smtp://127.0.0.1:{port}", retry_base=0.2, retry_max=0.5,
                       dsn="always")
        name, _ = spool_msg(cfg, BODY, ("gone@example.test", "hang@example.test",
                                        "ok@example.test"))
        try:
            await run_until(cfg, lambda: listing(cfg, "failed") == [name] and not listing(
                cfg, "new") and any(f == "" for f, _, _ in mta.delivered))
        finally:
            await mta.stop()
        assert mta.tries["gone@example.test"] == 1, "a 550 already received was retried"
        got = Counter(r for f, r, _ in mta.delivered if f)
        assert got == {"hang@example.test": 1, "ok@example.test": 1}
        (dsn,) = [d for f, _, d in mta.delivered if f == ""]
        _, (_, status, _) = parse_dsn(dsn)
        assert [b["Final-Recipient"] for b in status.get_payload()[1:]] == [
            "rfc822; gone@example.test"]

    asyncio.run(go())


def test_recording_error_backs_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after the attempt (here the state write fails: a full disk) is retried with
    backoff, not every retry_base forever."""
    times: list[float] = []

    def decide(rcpt: str, n: int) -> str:
        times.append(time.monotonic())
        return "451 4.3.0 later"

    def broken(*a: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_mod.Spool, "write_state", broken)

    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=decide)
        port = await mta.start_tcp()
        cfg = make_cfg(tmp_path, f"smtp://127.0.0.1:{port}", retry_base=0.2, retry_max=10.0)
        spool_msg(cfg, BODY, ("a@example.test",))
        t0 = time.monotonic()
        try:
            await run_until(cfg, lambda: time.monotonic() - t0 > 3.5, timeout=10)
        finally:
            await mta.stop()

    asyncio.run(go())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.2, 0.4, 0.8, 1.6 s: at most 5 attempts in 3.5 s (a fixed 0.2 s gives about 17); load
    # only stretches the gaps.
    assert 2 <= len(times) <= 5, times
    assert max(gaps) >= 0.75, gaps


def test_bounce_never_replaces_a_file_in_failed(tmp_path: Path) -> None:
    """A message moved to failed/ whose name is already taken there (a requeued message that
    fails again while its earlier copy is back, a second relay's file of that name) gets a
    numbered name: the file already in failed/ and its kept state stay as they were (a rename
    replaced them: that message was lost)."""
    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=lambda r, n: "550 5.1.1 no such user"
                      if r.startswith("gone") else "250 2.0.0 ok")
        cfg = make_cfg(tmp_path, f"smtp://127.0.0.1:{await mta.start_tcp()}")
        name, _ = spool_msg(cfg, BODY, ("gone@example.test",))
        earlier = b"X-Ingress-Envelope: the earlier message\r\n"
        (cfg.spool.path / "failed" / name).write_bytes(earlier)
        kept = cfg.spool.path / "relay.failed"
        kept.mkdir()
        (kept / name).write_bytes(RelayState(failed=["x@example.test"]).encode())
        try:
            await run_until(cfg, lambda: not listing(cfg, "new")
                            and len(listing(cfg, "failed")) == 2)
        finally:
            await mta.stop()
        assert (cfg.spool.path / "failed" / name).read_bytes() == earlier
        moved = spool_mod.read(cfg.spool.path / "failed" / f"{name}.1")
        assert moved.envelope["rcpts"] == ["gone@example.test"]
        assert RelayState.decode((kept / name).read_bytes()).failed == ["x@example.test"]
        assert RelayState.decode((kept / f"{name}.1").read_bytes()).failed == [
            "gone@example.test"]

    asyncio.run(go())


def test_corrupt_spool_and_state_files_are_settled(tmp_path: Path) -> None:
    """A spool file that cannot be parsed goes to failed/ and a corrupt state file reads as
    "never tried" (the message is delivered), each with its log line. Logging them raised
    TypeError (a field called `name` clashed with log.event's own argument), so the corrupt
    file was retried forever and the message with a corrupt state was never delivered."""
    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=lambda r, n: "250 2.0.0 ok")
        cfg = make_cfg(tmp_path, f"smtp://127.0.0.1:{await mta.start_tcp()}")
        spool_mod.Spool(cfg.spool.path)
        (cfg.spool.path / "new" / "1.CORRUPT.host").write_bytes(b"not a spool file\r\n")
        name, _ = spool_msg(cfg, BODY, ("a@example.test",))
        (cfg.spool.path / "relay").mkdir()
        (cfg.spool.path / "relay" / name).write_bytes(b"{not json")
        try:
            r = await run_until(cfg, lambda: not listing(cfg, "new"))
        finally:
            await mta.stop()
        assert listing(cfg, "failed") == ["1.CORRUPT.host"]
        assert [rc for f, rc, _ in mta.delivered if f] == ["a@example.test"]
        assert r.counters["corrupt"] == 1 and r.counters["sent"] == 1

    asyncio.run(go())


# --- issue 19: who gets a DSN (ingress.policy.dsn), through the relay ----------------------------

def spool_with_evidence(cfg: Config, sender: str, rcpt: str, evidence: dict[str, object]) -> str:
    now = time.time()
    env = Envelope(qid=new_qid(now), lane=Lane.BULK, peer_ip="127.0.0.1", peer_port=1,
                   helo="c.test", mail_from=sender, rcpts=(rcpt,), received_at=now,
                   deadline=now + 5, evidence=WireEvidence.from_wire(evidence))
    (name,) = spool_mod.Spool(cfg.spool.path).write_batch([(env, b"", BODY)])
    assert isinstance(name, str)
    return name


def reject_rcpt(rcpt: str, n: int) -> str:
    """The downstream refuses the original's recipient and takes the DSNs."""
    return "550 5.7.1 content rejected" if rcpt == "rcpt@example.test" else "250 2.1.5 ok"


def dsn_decisions() -> dict[str, float]:
    from ingress.core import metrics
    return {r: metrics.RELAY_DSN_DECISIONS.labels(result=r)._value.get()
            for r in metrics.DSN_RESULTS}


def test_default_dsn_only_to_an_authenticated_return_path(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """relay.dsn at its default: of four senders whose message fails (550), only the two whose
    return path the ingress authenticated (SPF pass for the MAIL FROM domain; a DKIM pass
    aligned with it) get a DSN. The forged ones (SPF fail; a DKIM pass for the spammer's own,
    unaligned domain) get none: their messages are in failed/, each logged and counted."""
    cfg = make_cfg(tmp_path, "smtp://127.0.0.1:1")
    assert cfg.relay.dsn == "authenticated"
    senders = {
        "spf@sender.test": {"spf": "pass", "spf_domain": "sender.test"},
        "dkim@bounce.signer.test": {"spf": "fail", "spf_domain": "bounce.signer.test",
                                    "dkim_pass": "mail.signer.test"},
        "victim@forged.test": {"spf": "fail", "spf_domain": "forged.test"},
        "victim@victim.test": {"spf": "none", "spf_domain": "victim.test",
                               "dkim_pass": "spammer.test"},
    }
    before = dsn_decisions()

    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=reject_rcpt, exts=("8BITMIME", "SMTPUTF8"))
        c = make_cfg(tmp_path, f"smtp://127.0.0.1:{await mta.start_tcp()}")
        names = {s: spool_with_evidence(c, s, "rcpt@example.test", ev)
                 for s, ev in senders.items()}
        try:
            await run_until(c, lambda: len(listing(c, "failed")) == 4 and not listing(c, "new")
                            and sum(f == "" for f, _, _ in mta.delivered) >= 2)
            await asyncio.sleep(0.3)                    # would a third DSN show up?
        finally:
            await mta.stop()
        assert sorted(listing(c, "failed")) == sorted(names.values())
        assert sorted(r for f, r, _ in mta.delivered if f == "") == [
            "dkim@bounce.signer.test", "spf@sender.test"]

    asyncio.run(go())
    out = capfd.readouterr().err
    docs = [orjson.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    suppressed = [d for d in docs if d.get("event") == "relay_dsn_suppressed"]
    assert sorted(d["sender"] for d in suppressed) == ["victim@forged.test",
                                                       "victim@victim.test"]
    assert {d["result"] for d in suppressed} == {"suppressed_unauthenticated"}
    assert all(d["qid"] and "not authenticated" in d["why"] for d in suppressed)
    sent = {d["sender"]: d["authenticated"] for d in docs if d.get("event") == "relay_dsn"}
    assert sent == {"spf@sender.test": "spf", "dkim@bounce.signer.test": "dkim:mail.signer.test"}
    after = dsn_decisions()
    assert after["sent"] - before["sent"] == 2
    assert after["suppressed_unauthenticated"] - before["suppressed_unauthenticated"] == 2


def test_dsn_rate_per_domain_is_throttled_and_counted(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """relay.dsn_rate = 2: eight authenticated senders of one organisational domain (its
    spellings and subdomains) fail; two DSNs go, six do not (failed/, counted), and the log
    says so once (throttled), with how many it left out afterwards. Another domain still gets
    its own."""
    before = dsn_decisions()
    spellings = ["sender.test", "SENDER.test", "\uff53\uff45\uff4e\uff44\uff45\uff52.test",
                 "a.sender.test", "b.sender.test", "sender.test.", "c.d.sender.test",
                 "sender\u3002test"]

    async def go() -> None:
        mta = FakeMTA(lmtp=False, decide=reject_rcpt, exts=("8BITMIME", "SMTPUTF8"))
        c = make_cfg(tmp_path, f"smtp://127.0.0.1:{await mta.start_tcp()}", dsn_rate=2.0)
        for i, d in enumerate(spellings):
            spool_with_evidence(c, f"u{i}@{d}", "rcpt@example.test",
                                {"spf": "pass", "spf_domain": normalize_domain(d)})
        spool_with_evidence(c, "u@other.test", "rcpt@example.test",
                            {"spf": "pass", "spf_domain": "other.test"})
        try:
            await run_until(c, lambda: len(listing(c, "failed")) == 9 and not listing(c, "new")
                            and sum(f == "" for f, _, _ in mta.delivered) >= 3)
            await asyncio.sleep(0.3)
        finally:
            await mta.stop()
        dsns = [r for f, r, _ in mta.delivered if f == ""]
        assert len(dsns) == 3 and "u@other.test" in dsns, dsns

    asyncio.run(go())
    docs = [orjson.loads(ln) for ln in capfd.readouterr().err.splitlines()
            if ln.startswith("{")]
    limited = [d for d in docs if d.get("event") == "relay_dsn_suppressed"]
    assert len(limited) == 1 and limited[0]["result"] == "rate_limited", limited
    assert "sender.test" in limited[0]["why"] and limited[0]["left_out"] == 0
    bounced = [d for d in docs if d.get("event") == "relay_bounced"]
    assert sorted(d["dsn_result"] for d in bounced) == ["rate_limited"] * 6 + ["sent"] * 3
    after = dsn_decisions()
    assert after["rate_limited"] - before["rate_limited"] == 6
    assert after["sent"] - before["sent"] == 3
