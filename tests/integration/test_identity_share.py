"""Nobody can capture the reserve (issue 8): every promoted session carries an identity, and no
identity holds more than classify.identity_share of an acceptor's fast reserve; beyond it the
session is served as bulk (not refused). Real supervisor, acceptor, brokers and workers on
loopback; SPF and DKIM against the real DNS server of tests/kit/dnsserver.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import dkim
import pytest
import zmq

from ingress.core import config
from ingress.core.wire import Envelope, Lane, WireEvidence, decode_reply, new_qid, submit
from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, send_one, short_message, split_trace
from tests.kit.session import HeldSession

ALLOWED_IP = "127.0.0.20"
GOOD_IP = "127.0.2.5"
SPAM_IPS = [f"127.0.1.{i}" for i in range(1, 51)]   # the spammer's 50 addresses


@pytest.fixture(scope="module")
def dns(dkim_key: tuple[bytes, str]):
    with DNSServer({
        "spammer.test": {"TXT": ["v=spf1 ip4:127.0.1.0/24 -all"]},
        "good.test": {"TXT": ["v=spf1 ip4:127.0.2.0/24 -all"]},
        "sel._domainkey.spammer.test": {"TXT": [dkim_key[1]]},
        "sel._domainkey.good.test": {"TXT": [dkim_key[1]]},
    }) as server:
        yield server


def signed(domain: str, subject: str, pem: bytes) -> bytes:
    msg = short_message(subject, f"a@{domain}", msgid_domain=domain)
    return dkim.sign(msg, b"sel", domain.encode(), pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


def tables(dns: DNSServer, **smtp: object) -> dict[str, dict[str, object]]:
    return {"classify": {"allow_cidrs": [f"{ALLOWED_IP}/32"], "spf_promote": "any",
                         "identity_share": 0.25, "nameservers": [dns.address],
                         "dns_timeout": 1.0, "spf_deadline": 2.0},
            "smtp": dict(smtp), "supervisor": {"acceptors": 1}}


def lanes_by_subject(ing: Ingress) -> dict[str, tuple[str, bytes]]:
    out = {}
    for entry in ing.spooled().values():
        trace, body = split_trace(entry.message)
        subject = body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        out[subject] = (str(entry.envelope["lane"]), trace.get("Authentication-Results", b""))
    return out


def test_one_identity_cannot_exceed_its_share(tmp_path: Path, dns: DNSServer,
                                              dkim_key: tuple[bytes, str]) -> None:
    """fast_reserve 12 x 0.25: 3 fast sessions of org:spammer.test; its 4th..6th are bulk,
    and their mail is still accepted (served as bulk, not refused)."""
    with Ingress(tmp_path, tables(dns, max_connections=40, fast_reserve=12)) as ing:
        async def run() -> list[str]:
            held = [(await HeldSession.open(ing.port, ip))[0] for ip in SPAM_IPS[:6]]
            for s in held:
                assert (await s.cmd("EHLO spam.test")).startswith("250")
            replies = [await s.message("x@spammer.test",
                                       signed("spammer.test", f"spam{i}", dkim_key[0]))
                       for i, s in enumerate(held)]
            for s in held:
                s.close()
            return replies

        replies = asyncio.run(run())
        assert all(r.startswith("250") for r in replies), replies
        lanes = lanes_by_subject(ing)
        assert sorted(lanes[f"spam{i}"][0] for i in range(6)) == ["bulk"] * 3 + ["fast"] * 3
        promoted = [e for e in ing.events("promoted") if e.get("identity")]
        assert [e["identity"] for e in promoted] == ["org:spammer.test"] * 3
        over = ing.events("over_share")
        assert len(over) == 3 and all("over-share:org:spammer.test" in e["reasons"]
                                      for e in over)


def test_spammer_with_spf_and_dkim_from_50_ips_leaves_others_at_100(
        tmp_path: Path, dns: DNSServer, dkim_key: tuple[bytes, str]) -> None:
    """A spammer domain with valid SPF and DKIM holds sessions from 50 addresses; an
    allow-listed sender and a second authenticated domain still get every message in, in the
    fast lane."""
    with Ingress(tmp_path, tables(dns, max_connections=40, fast_reserve=12)) as ing:
        async def run() -> tuple[list[str], list[int], list[str]]:
            good, banner = await HeldSession.open(ing.port, GOOD_IP)
            assert banner.startswith("220") and (await good.cmd("EHLO good.test"))[:3] == "250"
            spam, spam_replies = [], []
            for ip in SPAM_IPS:
                s, banner = await HeldSession.open(ing.port, ip)
                if not banner.startswith("220"):
                    spam_replies.append(banner)
                    s.close()
                    continue
                await s.cmd("EHLO spam.test")
                spam_replies.append(await s.cmd("MAIL FROM:<x@spammer.test>"))
                spam.append(s)
            allowed = [(await send_one(ing.port, signed("allowed.test", f"allowed{i}", dkim_key[0]),
                                       source=ALLOWED_IP, sender="a@allowed.test"))[0]
                       for i in range(5)]
            good_replies = [await good.message("a@good.test",
                                               signed("good.test", f"good{i}", dkim_key[0]))
                            for i in range(5)]
            for s in (good, *spam):
                s.close()
            return spam_replies, allowed, good_replies

        spam_replies, allowed, good_replies = asyncio.run(run())
        assert allowed == [250] * 5, allowed
        assert all(r.startswith("250") for r in good_replies), good_replies
        lanes = lanes_by_subject(ing)
        assert all(lanes[f"allowed{i}"][0] == "fast" for i in range(5))
        assert all(lanes[f"good{i}"][0] == "fast" for i in range(5))
        assert b"dkim=pass" in lanes["good0"][1]
        # the spammer held no more than its share of the reserve
        promoted = [e["identity"] for e in ing.events("promoted") if e.get("identity")]
        assert promoted.count("org:spammer.test") == 3, promoted
        assert any(r.startswith("421") for r in spam_replies)     # its bulk excess was refused


def test_over_share_on_the_fast_port_is_served_as_bulk(tmp_path: Path, dns: DNSServer,
                                                       dkim_key: tuple[bytes, str]) -> None:
    """listen.fast_port admits fast-lane clients only; an allow-listed relay over its share
    (fast_reserve 4 x 0.25 = 1 session) is served as bulk there too: never a 554."""
    t = tables(dns, max_connections=20, fast_reserve=4)
    t["listen"] = {"fast_port": 0}
    with Ingress(tmp_path, t) as ing:
        fport = int(ing.events("ready")[-1]["fast_port"])

        async def run() -> list[str]:
            first, banner = await HeldSession.open(fport, ALLOWED_IP)      # holds the share
            assert banner.startswith("220")
            second, banner = await HeldSession.open(fport, ALLOWED_IP)
            assert banner.startswith("220"), banner
            await second.cmd("EHLO relay.test")
            reply = await second.message("a@allowed.test",
                                         signed("allowed.test", "second", dkim_key[0]))
            first.close()
            second.close()
            return [reply]

        replies = asyncio.run(run())
        assert replies[0].startswith("250"), replies
        assert lanes_by_subject(ing)["second"][0] == "bulk"
        assert any("over-share:allow:127.0.0.20/32" in e["reasons"]
                   for e in ing.events("over_share"))


def plain(domain: str, subject: str) -> bytes:
    """Unsigned (no aligned DKIM: nothing is learned, each session decides at MAIL FROM)."""
    return short_message(subject, f"a@{domain}", msgid_domain=domain)


def over_rate_lines(ing: Ingress, key: str) -> list[dict[str, object]]:
    """The message log lines of the messages kept bulk for this domain's rate."""
    return [e for e in ing.events("message") if f"over-rate:{key}" in str(e.get("reasons", ""))]


def test_a_domain_is_held_to_its_rate_at_mail_from(tmp_path: Path, dns: DNSServer) -> None:
    """classify.domain_rate and domain_burst, held by the acceptors at MAIL FROM: burst 2 over
    this edge's two acceptors (one on port 25, one fast acceptor) is 1 each, so the domain's
    first transaction is fast and the next ones are served as bulk from MAIL FROM on (reason
    over-rate:, where the bulk cap sheds before DATA): a fast session is demoted, a new one
    stays bulk. The fast broker never had to refuse it (its bucket is never the first to
    bite on one edge). Another domain and the allow-listed sender stay fast; every message is
    accepted (served, not refused)."""
    t = tables(dns, max_connections=40, fast_reserve=12)
    t["classify"].update(identity_share=1.0, domain_rate=0.001, domain_burst=2)
    with Ingress(tmp_path, t) as ing:
        async def run() -> list[str]:
            a, _ = await HeldSession.open(ing.port, SPAM_IPS[0])
            await a.cmd("EHLO spam.test")
            out = [await a.message("x@spammer.test", plain("spammer.test", "a1")),   # fast
                   await a.message("x@spammer.test", plain("spammer.test", "a2")),   # demoted
                   await a.message("x@spammer.test", plain("spammer.test", "a3"))]
            b, _ = await HeldSession.open(ing.port, SPAM_IPS[1])
            await b.cmd("EHLO spam.test")
            out.append(await b.message("x@spammer.test", plain("spammer.test", "b1")))
            good, _ = await HeldSession.open(ing.port, GOOD_IP)
            await good.cmd("EHLO good.test")
            out.append(await good.message("a@good.test", plain("good.test", "good1")))
            code, _ = await send_one(ing.port, plain("allowed.test", "allowed1"),
                                     source=ALLOWED_IP, sender="a@allowed.test")
            out.append(str(code))
            for s in (a, b, good):
                s.close()
            return out

        out = asyncio.run(run())
        assert all(r.startswith("250") for r in out), out
        lanes = {k: v[0] for k, v in lanes_by_subject(ing).items()}
        assert lanes == {"a1": "fast", "a2": "bulk", "a3": "bulk", "b1": "bulk",
                         "good1": "fast", "allowed1": "fast"}, lanes
        demoted = ing.events("demoted")
        assert [e["identity"] for e in demoted] == ["org:spammer.test"], demoted
        over = ing.events("over_rate")       # one line per domain per 10 s (not per MAIL)
        assert len(over) == 1 and "over-rate:org:spammer.test" in over[0]["reasons"], over
        assert len(over_rate_lines(ing, "org:spammer.test")) == 3, ing.events("message")
        # the fast broker never refused it (no NACK share, resubmitted as bulk)
        assert not [e for e in ing.events("over_share") if e.get("qid")], \
            ing.events("over_share")


def drain_domain_at_the_broker(ing: Ingress, identity: str, n: int) -> list[str]:
    """Submit `n` envelopes of this identity to the fast broker, as another edge would: its
    replies (the broker's bucket for the domain is then spent)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(config.load(ing.config).ipc("fast-front"))
    replies = []
    try:
        for i in range(n):
            now = time.time()
            env = Envelope(qid=new_qid(now), lane=Lane.FAST, peer_ip="127.0.1.99",
                           peer_port=1, helo="other-edge.test", mail_from="x@spammer.test",
                           rcpts=("bob@example.test",), received_at=now, deadline=now + 30,
                           evidence=WireEvidence(identity=identity))
            sock.send_multipart(submit(env, plain("spammer.test", f"other-edge{i}")))
            assert sock.poll(10_000), "no reply from the fast broker"
            r = decode_reply(sock.recv_multipart())
            replies.append("ok" if r.ok else str(r.reason))
    finally:
        sock.close()
    return replies


def test_a_domain_the_fast_broker_names_over_its_rate_is_kept_bulk(tmp_path: Path,
                                                                     dns: DNSServer) -> None:
    """Several edges share a lanes node: each holds a domain to classify.domain_rate, and the
    fast broker's bucket (one second of rate, at least domain_burst) bounds their sum. Here
    another edge (this test, on the fast broker's front socket) has spent the domain's bucket:
    the broker NACKs it share and names it over its rate in its status, and this edge then
    keeps the domain's sessions bulk at MAIL FROM although its own buckets still have
    tokens: a fast session is demoted at its next MAIL, a new one stays bulk."""
    t = tables(dns, max_connections=40, fast_reserve=12)
    t["classify"].update(identity_share=1.0, domain_rate=0.001, domain_burst=4)
    with Ingress(tmp_path, t) as ing:
        async def before() -> tuple[HeldSession, str]:
            a, _ = await HeldSession.open(ing.port, SPAM_IPS[0])
            await a.cmd("EHLO spam.test")
            return a, await a.message("x@spammer.test", plain("spammer.test", "a1"))

        async def after(a: HeldSession) -> list[str]:
            out = [await a.message("x@spammer.test", plain("spammer.test", "a2"))]
            b, _ = await HeldSession.open(ing.port, SPAM_IPS[1])
            await b.cmd("EHLO spam.test")
            out.append(await b.message("x@spammer.test", plain("spammer.test", "b1")))
            for s in (a, b):
                s.close()
            return out

        async def run() -> list[str]:
            a, first = await before()
            # the broker's bucket is 4 deep; this edge took 1 (a1): 3 left, then refused
            assert drain_domain_at_the_broker(ing, "org:spammer.test", 4) == \
                ["ok", "ok", "ok", "share"]
            await asyncio.sleep(0.3)          # a status or three (STATUS_INTERVAL 0.1 s)
            return [first, *await after(a)]

        out = asyncio.run(run())
        assert all(r.startswith("250") for r in out), out
        lanes = {k: v[0] for k, v in lanes_by_subject(ing).items()}
        assert {k: lanes[k] for k in ("a1", "a2", "b1")} == \
            {"a1": "fast", "a2": "bulk", "b1": "bulk"}, lanes
        assert [e["identity"] for e in ing.events("demoted")] == ["org:spammer.test"]
        assert len(over_rate_lines(ing, "org:spammer.test")) == 2, ing.events("message")
