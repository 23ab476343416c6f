"""One canonical name for every domain that becomes a key (issue 17, build item 2; measured
item 1): fullwidth letters and the ideographic full stop ("\uff53pam.test", "spam\u3002test")
passed SPF against the one record of spam.test, and each spelling was its own org: identity
with its own classify.identity_share and classify.domain_rate. Now SPF is evaluated for the
canonical name (UTS-46, A-labels: ingress.core.addr.normalize_domain) and every spelling is
the one identity org:spam.test: the second spelling finds its domain at its share or rate
exactly as the same spelling would. Non-ASCII in HELO/EHLO is 501 5.5.2 (RFC 6531 3.7.1); an
IDN sender still works and is identified and learned under its A-label.

Real supervisor, acceptors, brokers and workers on loopback; SPF and DKIM against the DNS
server of tests/kit/dnsserver.py, which publishes v=spf1 ip4:127.0.0.1 -all for spam.test
(and, for the IDN sender, for xn--bcher-kva.test) and nothing for any other spelling. What is
asserted is what a user sees: replies, the spool envelopes' evidence and the
Authentication-Results the ingress wrote, and its log lines."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, short_message, split_trace
from tests.kit.session import HeldSession

IP = "127.0.0.1"
IDN_A = "xn--bcher-kva.test"        # bücher.test
# Spellings of spam.test: (EHLO name, MAIL FROM argument); the null sender makes SPF check
# the HELO name (RFC 7208 2.3).
SPELLINGS = [
    ("client.test", "<x@\uff53pam.test> SMTPUTF8"),           # fullwidth s
    ("client.test", "<x@spam\u3002test> SMTPUTF8"),           # ideographic full stop
    ("client.test", "<x@SPAM\uff0eTEST> SMTPUTF8"),           # fullwidth full stop, case
    ("SPAM.test.", "<>"),                                     # HELO identity
    ("client.test", "<x@spam.test>"),                         # the same spelling again
]


@pytest.fixture(scope="module")
def dns(dkim_key: tuple[bytes, str]):
    with DNSServer({
        "spam.test": {"TXT": [f"v=spf1 ip4:{IP} -all"]},
        IDN_A: {"TXT": [f"v=spf1 ip4:{IP} -all"]},
        f"sel._domainkey.{IDN_A}": {"TXT": [dkim_key[1]]},
    }) as server:
        yield server


def tables(dns: DNSServer, **classify: object) -> dict[str, dict[str, object]]:
    return {"classify": {"spf_promote": "any", "nameservers": [dns.address],
                         "dns_timeout": 1.0, "spf_deadline": 2.0, **classify},
            "smtp": {"max_connections": 40, "fast_reserve": 4},
            "supervisor": {"acceptors": 1}}


async def open_session(port: int) -> HeldSession:
    """A held session from IP, its banner checked."""
    s, banner = await HeldSession.open(port, IP)
    assert banner.startswith("220"), banner
    return s


def plain(subject: str, sender: str = "a@spam.test") -> bytes:
    """Unsigned: nothing is learned, every session decides at MAIL FROM."""
    return short_message(subject, sender, msgid_domain="spam.test")


def by_subject(ing: Ingress) -> dict[str, dict[str, Any]]:
    """subject -> lane, evidence and Authentication-Results of each spooled message."""
    out = {}
    for entry in ing.spooled().values():
        trace, body = split_trace(entry.message)
        subject = body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        out[subject] = {"lane": str(entry.envelope["lane"]),
                        "evidence": dict(entry.envelope["evidence"]),
                        "ar": trace.get("Authentication-Results", b"").decode("ascii", "replace")}
    return out


async def spellings(ing: Ingress, hold_first: bool) -> list[str]:
    """The plain spelling first (it takes the domain's share or token), then every other
    spelling, each in its own session from the same address; replies of every message."""
    first = await open_session(ing.port)
    assert (await first.cmd("EHLO client.test")).startswith("250")
    out = [await first.transaction("<x@spam.test>", plain("s0"))]
    if not hold_first:
        first.close()
    for i, (helo, mail_arg) in enumerate(SPELLINGS, 1):
        s = await open_session(ing.port)
        assert (await s.cmd(f"EHLO {helo}")).startswith("250")
        out.append(await s.transaction(mail_arg, plain(f"s{i}")))
        s.close()
    first.close()
    return out


def assert_one_identity(ing: Ingress, reason: str) -> None:
    msgs = by_subject(ing)
    lanes = {k: v["lane"] for k, v in msgs.items()}
    assert lanes == {"s0": "fast", **{f"s{i}": "bulk" for i in range(1, len(SPELLINGS) + 1)}}, \
        (lanes, ing.events("promoted"))
    # every spelling passed SPF as the one canonical domain and met its share or rate,
    # exactly as the plain spelling (the last one) did
    for i in range(1, len(SPELLINGS) + 1):
        ev = msgs[f"s{i}"]["evidence"]
        assert ev.get("spf") == "pass" and ev.get("spf_domain") == "spam.test", ev
        assert reason in ",".join(ev.get("reasons", [])), ev   # a list of tokens on the wire
        assert "smtp.mailfrom=spam.test" in msgs[f"s{i}"]["ar"], msgs[f"s{i}"]["ar"]
    assert [e["identity"] for e in ing.events("promoted") if e.get("identity")] == \
        ["org:spam.test"], ing.events("promoted")


def test_spellings_of_one_domain_share_one_identity_share(tmp_path: Path,
                                                          dns: DNSServer) -> None:
    """fast_reserve 4 x identity_share 0.25 = one fast session of org:spam.test. While the
    plain spelling holds it, every other spelling (fullwidth, ideographic full stop, the HELO
    identity with MAIL FROM:<>) is over that one share: served as bulk (250, never refused),
    reason over-share:org:spam.test. Was: each spelling its own identity, all fast."""
    with Ingress(tmp_path, tables(dns, identity_share=0.25)) as ing:
        out = asyncio.run(spellings(ing, hold_first=True))
        assert all(r.startswith("250") for r in out), "\n".join(out)
        assert_one_identity(ing, "over-share:org:spam.test")
        over = [e for e in ing.events("over_share") if not e.get("qid")]
        assert len(over) == len(SPELLINGS) and all(
            "over-share:org:spam.test" in e["reasons"] for e in over), over


def test_spellings_of_one_domain_share_one_domain_rate(tmp_path: Path, dns: DNSServer) -> None:
    """classify.domain_rate 0.001/s, domain_burst 2 (1 token on this edge's port-25
    acceptor): the plain spelling spends the domain's token; every other spelling then finds
    its domain over its rate, as the plain spelling does: bulk, reason over-rate:org:spam.test.
    Was: every spelling its own bucket (8 spellings, 8 x the domain rate)."""
    t = tables(dns, identity_share=1.0, domain_rate=0.001, domain_burst=2)
    with Ingress(tmp_path, t) as ing:
        out = asyncio.run(spellings(ing, hold_first=False))
        assert all(r.startswith("250") for r in out), "\n".join(out)
        assert_one_identity(ing, "over-rate:org:spam.test")


def test_non_ascii_helo_and_sender_without_smtputf8_are_refused(tmp_path: Path,
                                                                dns: DNSServer) -> None:
    """RFC 6531 3.7.1: EHLO/HELO carry LDH labels or A-labels only (SMTPUTF8 cannot be in force
    yet): a fullwidth or U-label name is 501 5.5.2, naming why, and the session goes on. A
    non-ASCII sender without the SMTPUTF8 parameter is 553 5.6.7."""
    with Ingress(tmp_path, tables(dns)) as ing:
        async def run() -> list[str]:
            s = await open_session(ing.port)
            out = [await s.cmd("EHLO \uff53pam.test"), await s.cmd("HELO spam\u3002test"),
                   await s.cmd("EHLO b\u00fccher.test"), await s.cmd(f"EHLO {IDN_A}"),
                   await s.cmd("MAIL FROM:<x@\uff53pam.test>"),
                   await s.transaction("<>", plain("null"))]
            s.close()
            return out

        out = asyncio.run(run())
        for r in out[:3]:
            assert r.startswith("501 5.5.2") and "non-ASCII domain name" in r \
                and "A-labels" in r, out
        assert out[3].startswith("250"), out
        assert out[4].startswith("553 5.6.7"), out
        assert out[5].startswith("250"), out
        # the refused names never reached SPF: the HELO identity was the A-label one
        (msg,) = by_subject(ing).values()
        assert msg["evidence"].get("spf_domain") == IDN_A, msg
        assert len(ing.events("bad_argument")) == 3, ing.events("bad_argument")


def signed_idn(subject: str, pem: bytes) -> bytes:
    """From: a U-label address (SMTPUTF8 mail), signed by d= its A-label."""
    msg = (f"From: a@b\u00fccher.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject}@{IDN_A}>\r\n\r\nHello.\r\n").encode()
    return dkim.sign(msg, b"sel", IDN_A.encode(), pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


def test_idn_sender_is_identified_and_learned_under_its_a_label(
        tmp_path: Path, dns: DNSServer, dkim_key: tuple[bytes, str]) -> None:
    """MAIL FROM:<user@bücher.test> SMTPUTF8 with SPF published at xn--bcher-kva.test passes,
    is promoted as org:xn--bcher-kva.test, its DKIM signature (d= the A-label, From: the
    U-label) aligns, and the client is learned for xn--bcher-kva.test: its next message is
    identified learned:xn--bcher-kva.test. Was: org:bücher.test, and never learned (the
    alignment compared the U-label with the A-label)."""
    state = Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
    try:
        # learned.json (waited for below) saved every 0.5 s, not every 5 s
        with Ingress(tmp_path, tables(dns, learned_save_interval=0.5), state=state) as ing:
            async def send(subject: str) -> str:
                s = await open_session(ing.port)
                assert (await s.cmd("EHLO client.test")).startswith("250")
                r = await s.transaction("<user@b\u00fccher.test> SMTPUTF8",
                                    signed_idn(subject, dkim_key[0]))
                s.close()
                return r

            assert asyncio.run(send("idn1")).startswith("250")
            learned = state / "learned.json"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not learned.exists():
                time.sleep(0.2)
            assert learned.exists(), "the IDN sender was not learned"
            domains = {e.get("domain") for e in json.loads(learned.read_text())["entries"]
                       .values() if isinstance(e, dict)}
            assert domains == {IDN_A}, domains
            assert asyncio.run(send("idn2")).startswith("250")
            msgs = by_subject(ing)
            first = msgs["idn1"]
            assert first["lane"] == "fast", first
            assert first["evidence"].get("spf_domain") == IDN_A, first
            assert "spf=pass" in first["ar"] and f"smtp.mailfrom={IDN_A}" in first["ar"], first
            assert "dkim=pass" in first["ar"], first
            assert [e["identity"] for e in ing.events("promoted") if e.get("identity")][:1] == \
                [f"org:{IDN_A}"], ing.events("promoted")
            assert msgs["idn2"]["evidence"].get("identity") == f"learned:{IDN_A}", msgs["idn2"]
    finally:
        shutil.rmtree(state, ignore_errors=True)
