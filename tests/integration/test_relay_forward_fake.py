"""XCLIENT / XFORWARD on the wire, per message: the relay (in process) against a fake downstream
on loopback that behaves as Postfix does where it matters -- XCLIENT answers a new 220 and
re-checks its authorisation against the forwarded client (so a second XCLIENT on a connection
is refused 550), XFORWARD attributes last until the end of the transaction -- and records every
command line. Real Postfix: tests/integration/test_relay_forward_client.py.

Shown: every command line is printable ASCII of at most 510 octets whatever the HELO; each
message's MAIL FROM is sent under its own client (one connection per client session with
XCLIENT, the relay's own message on a connection of its own; each transaction its own XFORWARD,
the own message none); an XCLIENT the downstream refuses defers that message (4.7.0), nothing
of it is sent, the others go; a forced method the downstream does not offer sends nothing and
is counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ingress.core import metrics
from ingress.core.config import Config
from ingress.core.wire import Envelope, Lane, WireEvidence, new_qid
from tests.kit.relaykit import make_cfg, run_until, xtext_decode
from workers.relay import forward
from workers.spool import store as spool_mod

pytestmark = pytest.mark.timeout(60)

XCLIENT_EXT = "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
XFORWARD_EXT = "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT"


@dataclass
class Conn:
    lines: list[bytes] = field(default_factory=list)
    xclient: dict[str, str] = field(default_factory=dict)
    xforward: dict[str, str] = field(default_factory=dict)
    xclient_allowed: bool = True
    # (MAIL's sender, the XCLIENT attributes then, the XFORWARD attributes then)
    mails: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)


def attrs(tokens: list[str]) -> dict[str, str]:
    out = {}
    for t in tokens:
        k, _, v = t.partition("=")
        out[k.upper()] = xtext_decode(v)
    return out


class PostfixLike:
    def __init__(self, exts: tuple[str, ...],
                 refuse: Callable[[dict[str, str]], str | None] = lambda a: None) -> None:
        self.exts, self.refuse = exts, refuse
        self.conns: list[Conn] = []
        self.delivered: list[str] = []          # senders, in order
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = Conn()
        self.conns.append(conn)

        def say(line: str) -> None:
            w.write(line.encode() + b"\r\n")

        say("220 fake ESMTP")
        sender, in_txn = "", False
        try:
            while raw := await r.readline():
                conn.lines.append(raw)
                words = raw.decode("ascii", "replace").rstrip("\r\n").split(" ")
                verb = words[0].upper()
                if verb == "EHLO":
                    say("250-fake.test")
                    for e in self.exts:
                        say(f"250-{e}")
                    say("250 8BITMIME")
                elif verb == "HELO":
                    say("250 fake.test")
                elif verb == "XCLIENT":
                    a = attrs(words[1:])
                    why = self.refuse(a)
                    if not conn.xclient_allowed:
                        say("550 5.7.0 Error: insufficient authorization")
                    elif why:
                        say(why)
                    else:
                        conn.xclient.update(a)
                        conn.xclient_allowed = False     # the forwarded client is not authorised
                        in_txn = False
                        say("220 fake ESMTP")
                elif verb == "XFORWARD":
                    if in_txn:
                        say("503 5.5.1 Error: MAIL transaction in progress")
                    else:
                        conn.xforward.update(attrs(words[1:]))
                        say("250 2.0.0 Ok")
                elif verb == "MAIL":
                    in_txn = True
                    sender = words[1][6:-1]
                    conn.mails.append((sender, dict(conn.xclient), dict(conn.xforward)))
                    say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    say("250 2.1.5 Ok")
                elif verb == "DATA":
                    say("354 go")
                    await w.drain()
                    while await r.readline() not in (b".\r\n", b""):
                        pass
                    self.delivered.append(sender)
                    conn.xforward.clear()
                    in_txn = False
                    say("250 2.0.0 Ok: queued")
                elif verb == "RSET":
                    conn.xforward.clear()
                    in_txn = False
                    say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    say("221 2.0.0 Bye")
                    await w.drain()
                    break
                else:
                    say("502 5.5.2 Error: command not recognized")
                await w.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            w.close()


@dataclass(frozen=True)
class Msg:
    sender: str
    ip: str
    port: int
    helo: str
    proto: str = "ESMTP"
    own: bool = False


def spool(cfg: Config, msgs: list[Msg]) -> dict[str, str]:
    """Spool each message (in order); sender -> qid."""
    qids = {}
    for m in msgs:
        now = time.time()
        env = Envelope(qid=new_qid(now), lane=Lane.BULK, peer_ip=m.ip, peer_port=m.port,
                       helo=m.helo, mail_from="" if m.own else m.sender,
                       rcpts=(f"to-{m.sender}",), received_at=now, deadline=now,
                       acceptor=forward.OWN if m.own else "a0-1", proto=m.proto,
                       evidence=WireEvidence(dsn_for="X" if m.own else ""))
        body = f"Subject: {m.sender}\r\n\r\nhi\r\n".encode()
        (name,) = spool_mod.Spool(cfg.spool.path).write_batch([(env, b"", body)])
        assert isinstance(name, str)
        qids[m.sender] = env.qid
        time.sleep(0.002)                  # distinct, ordered names: delivered oldest first
    return qids


A1 = Msg("a1@x.test", "192.0.2.1", 1000, "a.test")
A2 = Msg("a2@x.test", "192.0.2.1", 1000, "a.test")             # A's session, second message
B = Msg("b@x.test", "2001:db8::2", 2000, "b.test", proto="SMTP")
OWN = Msg("own@x.test", "127.0.0.1", 0, "mx.test", own=True)
A3 = Msg("a3@x.test", "192.0.2.1", 1000, "a.test")
EVIL = Msg("evil@x.test", "192.0.2.9", 9, "\u00e9vil\r\nXCLIENT ADDR=6.6.6.6 " + "=" * 400)
MSGS = [A1, A2, B, OWN, A3, EVIL]


def expected_addr(m: Msg) -> str:
    return f"IPV6:{m.ip}" if ":" in m.ip else m.ip


def well_formed(mta: PostfixLike) -> None:
    for c in mta.conns:
        for raw in c.lines:
            if raw.startswith((b"XCLIENT", b"XFORWARD", b"EHLO", b"HELO")):
                assert raw.endswith(b"\r\n") and len(raw) <= 512, raw
                body = raw[:-2]
                assert all(0x20 <= b <= 0x7E for b in body) and b"  " not in body, raw


def sample(counter: object, label: str) -> float:
    return float(counter.labels(label)._value.get())  # type: ignore[attr-defined]


def with_mta(tmp_path: Path, mode: str, exts: tuple[str, ...], msgs: list[Msg],
             until: Callable[[PostfixLike, Config], bool],
             refuse: Callable[[dict[str, str]], str | None] = lambda a: None,
             ) -> tuple[PostfixLike, Config, dict[str, str]]:
    mta = PostfixLike(exts, refuse)

    async def go() -> tuple[Config, dict[str, str]]:
        port = await mta.start()
        try:
            cfg = make_cfg(tmp_path, f"smtp://127.0.0.1:{port}")
            cfg = dataclasses.replace(cfg, relay=dataclasses.replace(
                cfg.relay, forward_client=mode, concurrency=1))
            qids = spool(cfg, msgs)
            await run_until(cfg, lambda: until(mta, cfg), timeout=20)
            return cfg, qids
        finally:
            await mta.stop()

    cfg, qids = asyncio.run(go())
    return mta, cfg, qids


def mails(mta: PostfixLike) -> list[tuple[int, str, dict[str, str], dict[str, str]]]:
    return [(i, s, xc, xf) for i, c in enumerate(mta.conns) for s, xc, xf in c.mails]


@pytest.mark.parametrize("mode", ["auto", "xclient"])
def test_xclient_per_client_session(tmp_path: Path, mode: str) -> None:
    before = {m: sample(metrics.RELAY_FORWARDED, m) for m in ("xclient", "none")}
    mta, _cfg, _q = with_mta(tmp_path, mode, (XCLIENT_EXT, XFORWARD_EXT), MSGS,
                             lambda mta, cfg: len(mta.delivered) == len(MSGS))
    well_formed(mta)
    by_sender = {m.sender if not m.own else "": m for m in MSGS}
    seen = mails(mta)
    assert [s for _, s, _, _ in seen] == [m.sender if not m.own else "" for m in MSGS]
    conns = [i for i, *_ in seen]
    # A1 and A2 (one client session) share a connection; B needs a fresh one, and so does
    # the relay's own message after B's; A3 follows OWN on its connection (still the relay's:
    # XCLIENT is allowed there), EVIL needs a fresh one again
    assert conns == [0, 0, 1, 2, 2, 3], conns
    for _i, s, xc, xf in seen:
        m = by_sender[s]
        assert not xf
        if m.own:
            assert xc == {}, xc                    # never under a client's identity
            continue
        assert xc["ADDR"] == expected_addr(m) and xc["NAME"] == "[UNAVAILABLE]", xc
        assert xc["PORT"] == str(m.port) and xc["PROTO"] == m.proto, xc
    evil = next(xc for _, s, xc, _ in seen if s == EVIL.sender)
    assert evil["ADDR"] == "192.0.2.9" and evil["HELO"].startswith("?vil??XCLIENT?ADDR=6.6.6.6?")
    assert len(forward.xtext(evil["HELO"])) <= 255
    # the greeting after each XCLIENT is the client's own: EHLO, or HELO for B
    for c in mta.conns:
        if any(raw.startswith(b"XCLIENT") for raw in c.lines):
            i = next(n for n, raw in enumerate(c.lines) if raw.startswith(b"XCLIENT"))
            after = c.lines[i + 1].decode()
            assert after.split(" ")[1].strip() == c.xclient["HELO"], (after, c.xclient)
            assert after.startswith("HELO " if c.xclient["PROTO"] == "SMTP" else "EHLO ")
    assert not any(b"550" in raw for c in mta.conns for raw in c.lines)
    assert sample(metrics.RELAY_FORWARDED, "xclient") - before["xclient"] == len(MSGS) - 1
    assert sample(metrics.RELAY_FORWARDED, "none") - before["none"] == 1


def test_xforward_per_transaction(tmp_path: Path) -> None:
    mta, _cfg, qids = with_mta(tmp_path, "xforward", (XCLIENT_EXT, XFORWARD_EXT), MSGS,
                               lambda mta, cfg: len(mta.delivered) == len(MSGS))
    well_formed(mta)
    seen = mails(mta)
    assert len({i for i, *_ in seen}) == 1           # one connection carries them all
    for _i, s, xc, xf in seen:
        assert not xc
        m = next(x for x in MSGS if (x.sender if not x.own else "") == s)
        if m.own:
            assert xf == {}, xf                     # the previous message's were reset
            continue
        assert xf["ADDR"] == expected_addr(m) and xf["IDENT"] == qids[m.sender], xf
        assert xf["SOURCE"] == "REMOTE" and xf["PROTO"] == m.proto, xf


def test_refused_xclient_defers_that_message(tmp_path: Path) -> None:
    """The downstream refuses XCLIENT for B (Postfix: an IPv6 ADDR with inet_protocols = ipv4):
    B waits with a 4.7.0 naming the refusal, nothing of it is sent, the others go."""
    def refuse(a: dict[str, str]) -> str | None:
        return "501 5.5.4 Bad ADDR syntax: " + a["ADDR"] if a["ADDR"].startswith("IPV6:") else None

    msgs = [A1, B, A3]
    mta, cfg, _q = with_mta(
        tmp_path, "auto", (XCLIENT_EXT,), msgs,
        lambda mta, cfg: len(mta.delivered) == 2 and bool(
            spool_mod.Spool(cfg.spool.path).state_names()), refuse=refuse)
    well_formed(mta)
    assert sorted(mta.delivered) == sorted([A1.sender, A3.sender])
    assert B.sender not in [s for _, s, _, _ in mails(mta)]
    sp = spool_mod.Spool(cfg.spool.path)
    (name,) = sp.state_names()
    st = sp.read_state(name)
    assert st.attempts == 1 and "4.7.0" in st.last_error and "XCLIENT refused: 501" in \
        st.last_error, st
    assert len(list((cfg.spool.path / "failed").iterdir())) == 0


def test_forced_method_not_offered_sends_nothing(tmp_path: Path) -> None:
    before = sample(metrics.RELAY_FORWARD_MISSING, "xforward")
    mta, cfg, _q = with_mta(
        tmp_path, "xforward", (XCLIENT_EXT,), [A1],
        lambda mta, cfg: sample(metrics.RELAY_FORWARD_MISSING, "xforward") - before >= 2)
    assert mta.delivered == [] and not mails(mta)
    assert len(list((cfg.spool.path / "new").iterdir())) == 1
