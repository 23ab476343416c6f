"""The downstream keeps the client's identity (issue 19 item 2): a real ingress relaying to a
real, private Postfix (tests/kit/postfix.py) with XCLIENT and/or XFORWARD authorised for the
relay's address only (127.0.0.1: as in production, the forwarded clients are *not* authorised
themselves, so a second XCLIENT on a connection that already carries one client would be
refused, exactly as it would be for a real client).

Clients talk to the ingress from 127.0.0.77 and 127.0.0.78, interleaved, several messages per
relay connection (relay.concurrency = 1). For every relayed message, Postfix's own record
shows the original client: with XCLIENT its Received header and its maillog `client=` line;
with XFORWARD its maillog `orig_client=` (and `orig_queue_id=` our queue id). `off` shows
127.0.0.1. A message the relay made itself (a DSN: null sender, acceptor "relay") carries no
client's identity, even right after a forwarded one on the same connection. A forced method
the downstream does not offer sends nothing: the mail waits in the spool, the relay says why.
An attacker's HELO (spaces, '=', '+', specials, overlong; non-ASCII written straight into the
spool) is relayed, its commands well-formed.
Skips when Postfix cannot run here (not root / not installed).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingress.core.wire import Envelope, Lane, WireEvidence, new_qid
from tests.kit.harness import (
    Ingress,
    make_body,
    relaying,
    send_one,
    smtp_dialogue,
    spool_count,
    wait_for,
)
from tests.kit.postfix import PostfixInstance, started_postfix
from workers.spool import store as spool_mod

pytestmark = [pytest.mark.timeout(120), pytest.mark.needs_postfix]

CLIENTS = ("127.0.0.77", "127.0.0.78")
RELAY_ADDR = "127.0.0.1"      # where the relay connects from (the ingress host)


@pytest.fixture(scope="module")
def pf_both() -> Iterator[PostfixInstance]:
    """XCLIENT and XFORWARD authorised for the relay's address; IPv6 on (Postfix refuses an
    IPv6 client address in XCLIENT/XFORWARD when inet_protocols has no ipv6)."""
    yield from started_postfix("fwd-both-", extra_main_cf={
        "inet_protocols": "all",
        "smtpd_authorized_xclient_hosts": RELAY_ADDR,
        "smtpd_authorized_xforward_hosts": RELAY_ADDR})


@pytest.fixture(scope="module")
def pf_xforward() -> Iterator[PostfixInstance]:
    """XFORWARD only (no XCLIENT offered)."""
    yield from started_postfix("fwd-xf-", extra_main_cf={
        "smtpd_authorized_xforward_hosts": RELAY_ADDR})


def tables(pf: PostfixInstance, mode: str | None) -> dict[str, dict[str, Any]]:
    relay: dict[str, Any] = {"downstream": f"smtp://127.0.0.1:{pf.port}", "retry_base": 0.5,
                             "retry_max": 2.0, "timeout": 10.0, "concurrency": 1}
    if mode is not None:                   # None: the default (auto)
        relay["forward_client"] = mode
    return {"relay": relay}


@dataclass(frozen=True)
class Seen:
    """One delivered message as Postfix recorded it."""
    marker: str                 # our Subject marker
    our_qid: str                # from our Received header
    pf_qid: str                 # from Postfix's Received header
    helo: str                   # Postfix's Received: from <helo>
    received_addr: str          # Postfix's Received: (name [addr])
    proto: str                  # Postfix's Received: with <proto>
    client: str                 # maillog "<pf_qid>: client=..."
    orig_client: str            # maillog ", orig_client=..." ("" when absent)
    orig_queue_id: str          # maillog ", orig_queue_id=..." ("" when absent)


_PF_RECEIVED = re.compile(
    r"^Received: from (?P<helo>\S+) \((?P<name>\S+) \[(?P<addr>[^\]]+)\]\)\n"
    r"\tby bench-postfix\.localdomain \(Postfix\) with (?P<proto>\S+) id (?P<qid>[0-9A-F]+)",
    re.M)
_OUR_ID = re.compile(r"\(smtp-ingress lane=\w+\) with \S+ id (?P<qid>[0-9A-F]+)")
_SUBJECT = re.compile(r"^Subject: (?P<s>\S+)", re.M)


def maillog_clients(pf: PostfixInstance) -> dict[str, tuple[str, str, str]]:
    """Postfix queue id -> (client, orig_client, orig_queue_id) from smtpd's `client=` lines."""
    out: dict[str, tuple[str, str, str]] = {}
    text = pf.maillog.read_text("utf-8", "replace") if pf.maillog.exists() else ""
    for m in re.finditer(r"postfix/smtpd\[\d+\]: (?P<q>[0-9A-F]+): client=(?P<c>[^,\s]+)"
                         r"(?P<rest>[^\n]*)", text):
        rest = m["rest"]
        oc = re.search(r"orig_client=(\S+)", rest)
        oq = re.search(r"orig_queue_id=([^,\s]+)", rest)
        out[m["q"]] = (m["c"], oc[1] if oc else "", oq[1] if oq else "")
    return out


def seen(pf: PostfixInstance, markers: set[str], domain: str = "example.test") -> dict[str, Seen]:
    """Marker -> what Postfix recorded, for the delivered messages carrying one of `markers`."""
    log = maillog_clients(pf)
    out: dict[str, Seen] = {}
    for p in pf.maildir_messages(domain):
        raw = p.read_bytes().decode("utf-8", "replace")
        subj = _SUBJECT.search(raw)
        if subj is None or subj["s"] not in markers:
            continue
        pfr = _PF_RECEIVED.search(raw)
        ours = _OUR_ID.search(raw)
        assert pfr is not None, raw[:800]
        client, orig_client, orig_qid = log.get(pfr["qid"], ("", "", ""))
        out[subj["s"]] = Seen(subj["s"], ours["qid"] if ours else "", pfr["qid"], pfr["helo"],
                              pfr["addr"], pfr["proto"], client, orig_client, orig_qid)
    return out


def body_for(marker: str, i: int) -> bytes:
    return make_body(i, size=200).replace(f"Subject: test {i}".encode(),
                                          f"Subject: {marker}".encode())


def send_interleaved(ing: Ingress, tag: str, n: int) -> dict[str, str]:
    """n messages, one per connection, alternating the client address; marker -> source."""
    sources: dict[str, str] = {}
    for i in range(n):
        marker = f"{tag}-{i}-{time.time_ns()}"
        src = CLIENTS[i % 2]
        code, text = asyncio.run(send_one(ing.port, body_for(marker, i), source=src,
                                          rcpts=(f"{marker}@example.test",)))
        assert code == 250, (code, text)
        sources[marker] = src
    return sources


def spool_own_message(ing: Ingress, marker: str) -> None:
    """A message the relay made itself (as its DSNs are: null sender, acceptor "relay")."""
    now = time.time()
    env = Envelope(qid=new_qid(now), lane=Lane.BULK, peer_ip="127.0.0.1", peer_port=0,
                   helo="mx.test", mail_from="", rcpts=(f"{marker}@example.test",),
                   received_at=now, deadline=now, acceptor="relay",
                   evidence=WireEvidence(dsn_for="TEST"))
    body = (f"From: MAILER-DAEMON@mx.test\r\nSubject: {marker}\r\n\r\nown\r\n").encode()
    (res,) = spool_mod.Spool(ing.spool).write_batch([(env, b"", body)])
    assert isinstance(res, str), res


def relay_all(pf: PostfixInstance, mode: str | None, tmp_path: Path, n: int = 6,
              own: bool = False) -> tuple[dict[str, str], dict[str, Seen], Ingress]:
    with Ingress(tmp_path, tables(pf, mode)) as ing:
        relaying(ing)
        sources = send_interleaved(ing, f"m{mode}", n)
        markers = set(sources)
        if own:
            own_marker = f"own{mode}-{time.time_ns()}"
            spool_own_message(ing, own_marker)
            markers.add(own_marker)
            sources[own_marker] = RELAY_ADDR
        wait_for(lambda: spool_count(ing, "new") == 0, 30, "the spool to drain")
        assert spool_count(ing, "failed") == 0
        wait_for(lambda: len(got := seen(pf, markers)) == len(markers)
                 and all(s.client for s in got.values()), 30,
                 "Postfix to deliver and log every message")
        return sources, seen(pf, markers), ing


@pytest.mark.parametrize("mode", [None, "auto", "xclient"])
def test_xclient_shows_the_original_client(tmp_path: Path, pf_both: PostfixInstance,
                                           mode: str | None) -> None:
    """auto (the default) and xclient with a downstream that offers XCLIENT: Postfix's
    Received header and maillog name each message's own client, across one relay connection
    carrying messages from two clients in turn; the relay's own message names nobody else."""
    sources, got, ing = relay_all(pf_both, mode, tmp_path, own=True)
    for marker, src in sources.items():
        s = got[marker]
        if src == RELAY_ADDR:                       # the relay's own message
            assert s.received_addr == RELAY_ADDR and s.client.endswith(f"[{RELAY_ADDR}]"), s
            assert not s.orig_client, s
            continue
        assert s.received_addr == src, s
        assert s.client == f"unknown[{src}]", s
        assert s.helo == "client.test" and s.proto == "ESMTP", s
        assert not s.orig_client, s
    assert not ing.events("relay_downstream_down")


def test_xforward_shows_the_original_client(tmp_path: Path, pf_both: PostfixInstance) -> None:
    """xforward (forced, although XCLIENT is offered too): the connection stays the relay's
    (Received header, client=), and the maillog names the original client and our queue id
    for every message."""
    sources, got, _ing = relay_all(pf_both, "xforward", tmp_path, own=True)
    for marker, src in sources.items():
        s = got[marker]
        assert s.received_addr == RELAY_ADDR and s.client.endswith(f"[{RELAY_ADDR}]"), s
        if src == RELAY_ADDR:
            assert not s.orig_client and not s.orig_queue_id, s
            continue
        assert s.orig_client == f"unknown[{src}]", s
        assert s.orig_queue_id == s.our_qid and s.our_qid, s


def test_auto_uses_xforward_when_only_it_is_offered(tmp_path: Path,
                                                   pf_xforward: PostfixInstance) -> None:
    sources, got, _ing = relay_all(pf_xforward, "auto", tmp_path, n=4)
    for marker, src in sources.items():
        s = got[marker]
        assert s.client.endswith(f"[{RELAY_ADDR}]") and s.orig_client == f"unknown[{src}]", s
        assert s.orig_queue_id == s.our_qid, s


def test_off_shows_the_relay(tmp_path: Path, pf_both: PostfixInstance) -> None:
    sources, got, _ing = relay_all(pf_both, "off", tmp_path, n=4)
    for marker in sources:
        s = got[marker]
        assert s.received_addr == RELAY_ADDR and s.client.endswith(f"[{RELAY_ADDR}]"), s
        assert not s.orig_client and not s.orig_queue_id, s


def test_forced_xclient_not_offered_waits(tmp_path: Path, pf_xforward: PostfixInstance) -> None:
    """relay.forward_client = "xclient" and the downstream does not offer it: nothing is sent
    unattributed; the mail waits in the spool and the relay says why (the breaker's log line,
    one per probe)."""
    with Ingress(tmp_path, tables(pf_xforward, "xclient")) as ing:
        relaying(ing)
        marker = f"forced-{time.time_ns()}"
        assert asyncio.run(send_one(ing.port, body_for(marker, 1), source=CLIENTS[0],
                                    rcpts=(f"{marker}@example.test",)))[0] == 250
        wait_for(lambda: ing.events("relay_downstream_down"), 15, "the relay to give up")
        time.sleep(1.0)
        assert spool_count(ing, "new") == 1 and spool_count(ing, "failed") == 0
        down = ing.events("relay_downstream_down")
        assert "XCLIENT" in down[0]["error"], down[0]
        assert not ing.events("relay_sent")
    assert not seen(pf_xforward, {marker})


EVIL_HELO = ("evil host=x+y <a@b> (c) \"q\";\\ " + "A" * 440)[:480]


@pytest.mark.parametrize("mode", ["xclient", "xforward"])
def test_attacker_helo_is_relayed_well_formed(tmp_path: Path, pf_both: PostfixInstance,
                                              mode: str) -> None:
    """An attacker's HELO (spaces, '=', '+', header specials, 480 characters) through the real
    acceptor, and a non-ASCII one written straight into the spool (the acceptor refuses those,
    an old spool file might not): both messages are relayed with the client's address, and
    Postfix shows a neutered, bounded HELO (no command was split or refused)."""
    marker = f"evil{mode}-{time.time_ns()}"
    marker2 = marker + "-utf8"
    with Ingress(tmp_path, tables(pf_both, mode)) as ing:
        relaying(ing)
        body = body_for(marker, 3)
        replies = asyncio.run(smtp_dialogue(ing.port, [
            f"HELO {EVIL_HELO}\r\n".encode(), b"MAIL FROM:<alice@sender.test>\r\n",
            f"RCPT TO:<{marker}@example.test>\r\n".encode(), b"DATA\r\n",
            body + b".\r\n", b"QUIT\r\n"], source=CLIENTS[0]))
        assert replies[-2].startswith("250"), replies
        now = time.time()
        env = Envelope(qid=new_qid(now), lane=Lane.BULK, peer_ip="2001:db8::77", peer_port=4242,
                       helo="h\u00e9llo w\u00f6rld\r\nXCLIENT ADDR=6.6.6.6 " + "\u00e9" * 300,
                       mail_from="alice@sender.test", rcpts=(f"{marker2}@example.test",),
                       received_at=now, deadline=now, acceptor="a0-test")
        (res,) = spool_mod.Spool(ing.spool).write_batch([(env, b"", body_for(marker2, 4))])
        assert isinstance(res, str)
        wait_for(lambda: spool_count(ing, "new") == 0, 30, "the spool to drain")
        assert spool_count(ing, "failed") == 0 and not ing.events("relay_deferred"), \
            ing.log_tail()
        wait_for(lambda: len(seen(pf_both, {marker, marker2})) == 2, 30, "both delivered")
    got = seen(pf_both, {marker, marker2})
    s, s2 = got[marker], got[marker2]
    if mode == "xclient":
        assert s.received_addr == CLIENTS[0] and s.proto == "SMTP", s
        assert s.received_addr == CLIENTS[0]
        assert s2.received_addr == "IPv6:2001:db8::77", s2
        for x in (s, s2):
            assert 0 < len(x.helo) <= 255 and x.helo.isascii() and x.helo.isprintable(), x
            assert not set(x.helo) & set(" <>()\";@\\"), x
        assert s.helo.startswith("evil?host=x+y?"), s
        assert "6.6.6.6" not in s2.client and s2.client == "unknown[2001:db8::77]", s2
    else:
        assert s.orig_client == f"unknown[{CLIENTS[0]}]", s
        assert s2.orig_client == "unknown[2001:db8::77]", s2
