"""Helpers for the tests of the relay, the spool and the queue commands.

API
    With a real Postfix downstream (tests/kit/postfix.py; the ``postfix`` fixture in
    tests/integration/conftest.py):
    REJECTED, TEMPFAIL                  recipients Postfix refuses at RCPT: 550 5.1.1, 450 4.2.0
    relay_postfix(prefix, extra)        for a module-scoped fixture: a started Postfix that
                                        refuses REJECTED and TEMPFAIL (`extra`: more main.cf)
    relay_tables(pf, retry_base=0.5)    the ingress's [relay] table for that Postfix
    delivered(pf, domain) -> {rcpt: [raw]}   what Postfix delivered, by Delivered-To, CRLF
    strip_trace(raw, sender, rcpt)      the delivered message without the trace headers Postfix
                                        and we added (asserts they are exactly those)
    send_all(port, {rcpt: body}, ...)   one message per recipient, `concurrency` at a time
    With a scripted downstream (workers.relay.scheduler.Relay in this process):
    make_cfg(tmp, downstream, **relay)  a Config for the relay alone (short retries)
    run_until(cfg, cond, timeout)       run a Relay until cond() (AssertionError on timeout)
    parse_dsn(raw) -> (msg, [parts])    a DSN, checked to be a 3-part delivery-status report
    xtext_decode(s)                     RFC 3461 xtext back to text (XCLIENT/XFORWARD values)
    A spool without an ingress (the queue commands):
    make_spool(tmp) -> (config file, spool dir)
    put(spool, sender, rcpts, body, lane, age) -> (qid, name)   one message, as the worker writes

Failure modes
    Helpers assert (AssertionError with what was seen); relay_postfix skips the test when Postfix
    cannot run here.

Limits
    Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.message
import email.policy
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ingress.core.config import Config, RelayConfig, SmtpConfig, SpoolConfig
from ingress.core.wire import Envelope, Lane, new_qid
from tests.kit.harness import send_one, write_config
from tests.kit.postfix import PostfixInstance, started_postfix
from workers.relay import scheduler
from workers.spool import store as spool_mod

REJECTED = "nosuchuser@example.test"
TEMPFAIL = "later@example.test"


def relay_postfix(prefix: str, extra: Mapping[str, str] | None = None) -> Iterator[PostfixInstance]:
    yield from started_postfix(prefix, extra_main_cf={
        "smtpd_recipient_restrictions":
            f"check_recipient_access inline:{{{{{REJECTED}=550 5.1.1 no such user}}, "
            f"{{{TEMPFAIL}=450 4.2.0 try later}}}}", **(extra or {})})


def relay_tables(pf: PostfixInstance, retry_base: float = 0.5) -> dict[str, dict[str, object]]:
    return {"relay": {"downstream": f"smtp://127.0.0.1:{pf.port}", "retry_base": retry_base,
                      "retry_max": max(retry_base, 2.0), "timeout": 10.0, "concurrency": 4}}


def delivered(pf: PostfixInstance, domain: str = "example.test") -> dict[str, list[bytes]]:
    """Delivered-To recipient -> the delivered files (CRLF restored: Maildir files use LF)."""
    out: dict[str, list[bytes]] = {}
    for p in pf.maildir_messages(domain):
        raw = p.read_bytes()
        assert b"\r" not in raw
        raw = raw.replace(b"\n", b"\r\n")
        m = re.search(rb"^Delivered-To: ([^\r]+)\r\n", raw, re.M)
        assert m, raw[:300]
        out.setdefault(m.group(1).decode(), []).append(raw)
    return out


_POSTFIX_HEAD = re.compile(
    rb"Return-Path: <(?P<rp>[^>]*)>\r\n"
    rb"X-Original-To: (?P<xot>[^\r]+)\r\n"
    rb"Delivered-To: (?P<dt>[^\r]+)\r\n"
    rb"Received: from mx\.test \(localhost \[127\.0\.0\.1\]\)\r\n"
    rb"\tby bench-postfix\.localdomain \(Postfix\) with E?SMTP id (?P<qid>[0-9A-F]+)\r\n"
    rb"\tfor <[^>]+>; [^\r]+\r\n"
    # ours: Authentication-Results with our authserv-id (the worker adds it), then Received
    rb"(?:Authentication-Results: mx\.test[ ;][^\r]*\r\n(?:\t[^\r]*\r\n)*)?"
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby mx\.test \(smtp-ingress lane=(?:fast|bulk)\) with ESMTP id [0-9A-F]+\r\n"
    rb"(?:\tfor <[^>]+>;\r\n)?"
    rb"\t[^\r]+\r\n")


def postfix_qid(raw: bytes) -> str:
    """The queue id Postfix's smtpd gave a delivered copy (its Received header): two copies
    with one id are one submission delivered twice by Postfix itself; two ids, two submissions."""
    m = _POSTFIX_HEAD.match(raw)
    assert m, raw[:600]
    return m["qid"].decode()


def strip_trace(raw: bytes, sender: str, rcpt: str) -> bytes:
    """Remove exactly the trace headers Postfix and we added; everything else must remain."""
    m = _POSTFIX_HEAD.match(raw)
    assert m, raw[:600]
    assert m["rp"].decode() == sender and m["xot"].decode() == rcpt and m["dt"].decode() == rcpt
    return raw[m.end():]


async def send_all(port: int, bodies: dict[str, bytes], sender: str = "alice@sender.test",
                   concurrency: int = 10) -> dict[str, tuple[int, str]]:
    sem = asyncio.Semaphore(concurrency)
    out: dict[str, tuple[int, str]] = {}

    async def one(rcpt: str) -> None:
        async with sem:
            out[rcpt] = await send_one(port, bodies[rcpt], sender=sender, rcpts=(rcpt,))

    await asyncio.gather(*(one(r) for r in bodies))
    return out


def make_cfg(tmp: Path, downstream: str, **relay_kw: float | str) -> Config:
    """`dsn="always"` in the tests about DSN mechanics: their senders carry no evidence, and
    relay.dsn's default ("authenticated") would send them none (test_dsn_policy_live.py)."""
    base = Config()
    kw: dict[str, float | str] = {"retry_base": 0.2, "retry_max": 0.5, "timeout": 5.0}
    kw.update(relay_kw)
    return dataclasses.replace(
        base, spool=SpoolConfig(path=tmp / "spool", state_dir=tmp / "state"),
        smtp=dataclasses.replace(SmtpConfig(), hostname="mx.test"),
        relay=RelayConfig(downstream=downstream, concurrency=2, **kw))  # type: ignore[arg-type]


async def run_until(cfg: Config, cond: Callable[[], bool],
                    timeout: float = 10.0) -> scheduler.Relay:
    r = scheduler.Relay(cfg)
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


def parse_dsn(raw: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    return msg, parts


def xtext_decode(s: str) -> str:
    out = bytearray()
    i = 0
    while i < len(s):
        if s[i] == "+":
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(s[i]))
            i += 1
    return out.decode("utf-8")


def make_spool(tmp_path: Path) -> tuple[Path, Path]:
    spool = tmp_path / "spool"
    cfg = tmp_path / "ingress.toml"
    write_config(cfg, {"smtp": {"hostname": "mx.test", "accepted_domains": ["example.test"]},
                       "spool": {"path": str(spool), "state_dir": str(tmp_path / "state")}})
    spool_mod.Spool(spool)
    (spool / "relay").mkdir()                 # as the relay makes it
    return cfg, spool


def put(spool: Path, sender: str, rcpts: tuple[str, ...], body: bytes = b"",
        lane: Lane = Lane.BULK, age: float = 0.0) -> tuple[str, str]:
    now = time.time() - age
    env = Envelope(qid=new_qid(now), lane=lane, peer_ip="127.0.0.1", peer_port=1, helo="c.test",
                   mail_from=sender, rcpts=rcpts, received_at=now, deadline=now + 5)
    body = body or f"Subject: {env.qid}\r\n\r\nhello\r\n".encode()
    (name,) = spool_mod.Spool(spool).write_batch([(env, b"Received: x\r\n", body)])
    assert isinstance(name, str)
    return env.qid, name
