"""Backscatter (issue 19 item 3), end to end: a real ingress (SPF through the loopback DNS
server, DKIM in the worker, recipient verification on) relaying to a real, private Postfix whose
header_checks REJECT the message's content at the end of DATA.

(a) Forged, unauthenticated senders (SPF fail; no SPF at all; a DKIM pass for the spammer's own
    domain, not aligned with the forged MAIL FROM; an Authentication-Results header of their own
    claiming a pass): no DSN leaves -- nothing spooled to them, nothing delivered to their
    domains' mailboxes, nothing to the recipient -- the messages are in failed/, each logged
    (relay_dsn_suppressed: qid, sender, why) and counted
    (smtp_ingress_relay_dsn_decisions_total{result="suppressed_unauthenticated"}).
(b) An authenticated sender (SPF pass for the MAIL FROM domain) still gets its DSN, and it
    quotes only the bounded trace and identifying headers of the 64 KiB of headers it sent.
(c) A sender whose SPF fails but whose message carries a DKIM pass aligned with the MAIL FROM
    domain gets its DSN: the worker's DKIM verdict reaches the relay through the spool file.
Skips when Postfix cannot run here (not root / not installed).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, relaying, send_one, spool_count, wait_for
from tests.kit.postfix import PostfixInstance
from tests.kit.scrape import metrics_port, scrape
from workers.spool import store as spool_mod

pytestmark = [pytest.mark.timeout(120), pytest.mark.needs_postfix]

MARK = "CONTENT-REJECT-ME"
RCPT = "user@example.test"
DOMAINS = ("example.test", "sender.test", "forged.test", "nospf.test", "dk.test", "spammer.test")


# The `postfix` fixture's Postfix (tests/integration/conftest.py): a content check at the end of
# DATA (what a milter, a size limit or a header check does): RCPT is accepted (the ingress's
# callout passes), the message is refused after DATA. Only the top-level header is checked: a
# DSN quoting the Subject must pass.
POSTFIX = {"accept_domains": DOMAINS, "extra_main_cf": {
    "header_checks": f"regexp:{{{{/^Subject:.*{MARK}/ REJECT 5.7.1 content rejected}}}}",
    "mime_header_checks": "", "nested_header_checks": ""}}


@pytest.fixture(scope="module")
def dns(dkim_key: tuple[bytes, str]) -> Iterator[DNSServer]:
    with DNSServer({
        "sender.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},      # the real sender: pass
        "forged.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},      # forged: fail
        "dk.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},          # SPF fails, DKIM signs
        "sel._domainkey.dk.test": {"TXT": [dkim_key[1]]},
        "sel._domainkey.spammer.test": {"TXT": [dkim_key[1]]},          # the spammer's own key
    }) as server:
        yield server


def tables(pf: PostfixInstance, dns: DNSServer) -> dict[str, dict[str, object]]:
    return {"relay": {"downstream": f"smtp://127.0.0.1:{pf.port}", "retry_base": 0.5,
                      "retry_max": 2.0, "timeout": 10.0},
            "smtp": {"verify_recipients": True},
            # SPF is evaluated (the example config's "any"; the embedded "off" looks up none)
            "classify": {"spf_promote": "any", "nameservers": [dns.address],
                         "dns_timeout": 1.0, "spf_deadline": 2.0},
            "metrics": {"listen": "127.0.0.1:0"}}


def message(sender: str, tag: str, extra: bytes = b"") -> bytes:
    return (f"From: {sender}\r\nTo: {RCPT}\r\nSubject: {MARK} {tag}\r\n"
            f"Message-ID: <{tag}@{sender.rpartition('@')[2]}>\r\n").encode() + extra + \
        b"\r\nhello\r\n"


def signed(sender: str, domain: str, pem: bytes, tag: str) -> bytes:
    msg = message(sender, tag)
    return dkim.sign(msg, b"sel", domain.encode(), pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


def hostile_headers() -> bytes:
    """64 KiB of headers of the sender's choosing: its own A-R claims, 60 Received, junk."""
    out = [b"Authentication-Results: other.example; spf=pass smtp.mailfrom=victim.test\r\n"]
    out += [f"Received: from hop{i}.evil.test by relay{i}.evil.test; Mon, 1 Jan 2024\r\n"
            .encode() for i in range(60)]
    out += [f"X-Junk-{i}: {'J' * 900}\r\n".encode() for i in range(70)]
    return b"".join(out)


def decisions(port: int, result: str) -> float:
    return scrape(port).get(("smtp_ingress_relay_dsn_decisions_total", (("result", result),)),
                            0.0)


def with_marker(pf: PostfixInstance, domain: str, marker: str) -> list[bytes]:
    return [raw for p in pf.maildir_messages(domain) if marker.encode() in (raw := p.read_bytes())]


def test_forged_senders_get_no_dsn(tmp_path: Path, postfix: PostfixInstance, dns: DNSServer,
                                   dkim_key: tuple[bytes, str]) -> None:
    tag = f"forged-{time.time_ns()}"
    forged = {
        "victim@forged.test": message("victim@forged.test", f"{tag}-spf-fail"),
        "victim@nospf.test": message("victim@nospf.test", f"{tag}-no-spf"),
        # the spammer signs with his own domain: DKIM passes, aligned with nothing forged
        "boss@forged.test": signed("boss@forged.test", "spammer.test", dkim_key[0],
                                   f"{tag}-dkim-unaligned"),
        # an A-R of his own claiming our authserv-id: the worker strips it, nobody reads it
        "ceo@forged.test": message("ceo@forged.test", f"{tag}-forged-ar", extra=(
            b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=forged.test;"
            b" dkim=pass header.d=forged.test\r\n")),
    }
    with Ingress(tmp_path, tables(postfix, dns)) as ing:
        relaying(ing)
        mport = metrics_port(ing)
        for sender, body in forged.items():
            code, text = asyncio.run(send_one(ing.port, body, sender=sender, rcpts=(RCPT,)))
            assert code == 250, (sender, code, text)
        wait_for(lambda: spool_count(ing, "failed") == len(forged)
                 and spool_count(ing, "new") == 0, 30, "every forged message in failed/")
        time.sleep(1.5)                   # would a DSN still be spooled, relayed, delivered?
        assert spool_count(ing, "new") == 0 and spool_count(ing, "failed") == len(forged)
        failed = [spool_mod.read(p).envelope for p in (ing.spool / "failed").iterdir()]
        suppressed = ing.events("relay_dsn_suppressed")
        bounced = ing.events("relay_bounced")
        dsns_total = scrape(mport).get(("smtp_ingress_relay_dsns_total", ()), 0.0)
        unauthenticated = decisions(mport, "suppressed_unauthenticated")
    # No DSN left: none in any sender's mailbox, none spooled; nothing reached the recipient.
    for domain in ("forged.test", "nospf.test", "spammer.test"):
        assert not with_marker(postfix, domain, tag), f"a DSN was delivered to {domain}"
    assert not with_marker(postfix, "example.test", tag), "the rejected content was delivered"
    assert sorted(e["mail_from"] for e in failed) == sorted(forged), failed
    assert all(e["mail_from"] for e in failed), "a DSN (null sender) was spooled"
    # The content was refused at the end of DATA, by Postfix.
    assert all("content rejected" in b["reply"][0] and b["dsn"] == "" for b in bounced), bounced
    # Logged: each one, with its queue id, sender and why; counted.
    assert sorted(s["sender"] for s in suppressed) == sorted(forged), suppressed
    assert {s["result"] for s in suppressed} == {"suppressed_unauthenticated"}
    assert {s["qid"] for s in suppressed} == {e["qid"] for e in failed}
    why = {s["sender"]: s["why"] for s in suppressed}
    assert "spf=fail" in why["victim@forged.test"]
    assert "spf=none" in why["victim@nospf.test"]
    assert "dkim pass only for spammer.test (not aligned)" in why["boss@forged.test"]
    assert "spf=fail" in why["ceo@forged.test"] and "no dkim pass" in why["ceo@forged.test"]
    assert unauthenticated == len(forged) and dsns_total == 0


def test_authenticated_sender_gets_a_bounded_dsn(tmp_path: Path, postfix: PostfixInstance,
                                                 dns: DNSServer,
                                                 dkim_key: tuple[bytes, str]) -> None:
    tag = f"auth-{time.time_ns()}"
    spf_body = message("alice@sender.test", f"{tag}-spf", extra=hostile_headers())
    assert len(spf_body) > 64 * 1024
    dkim_body = signed("bounce@dk.test", "dk.test", dkim_key[0], f"{tag}-dkim")
    with Ingress(tmp_path, tables(postfix, dns)) as ing:
        relaying(ing)
        mport = metrics_port(ing)
        for sender, body in (("alice@sender.test", spf_body), ("bounce@dk.test", dkim_body)):
            code, text = asyncio.run(send_one(ing.port, body, sender=sender, rcpts=(RCPT,)))
            assert code == 250, (sender, code, text)
        wait_for(lambda: with_marker(postfix, "sender.test", tag)
                 and with_marker(postfix, "dk.test", tag), 30, "both DSNs delivered")
        wait_for(lambda: spool_count(ing, "failed") == 2 and spool_count(ing, "new") == 0, 20,
                 "both originals in failed/, the DSNs relayed")
        sent = {e["sender"]: e["authenticated"] for e in ing.events("relay_dsn")}
        counted = (decisions(mport, "sent"),
                   scrape(mport).get(("smtp_ingress_relay_dsns_total", ()), 0.0))
    assert not with_marker(postfix, "example.test", tag)
    (raw,) = with_marker(postfix, "sender.test", tag)
    assert raw.startswith(b"Return-Path: <>\n"), "the DSN must come from the null sender"
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg["Delivered-To"] == "alice@sender.test"
    assert msg.get_content_type() == "multipart/report"
    _human, status, headers = msg.get_payload()
    per_rcpt = status.get_payload()[1]
    assert per_rcpt["Final-Recipient"] == f"rfc822; {RCPT}" and per_rcpt["Status"] == "5.7.1"
    assert "content rejected" in per_rcpt["Diagnostic-Code"]
    assert headers.get_content_type() == "text/rfc822-headers"
    quoted = headers.get_payload()
    assert len(quoted.encode()) <= 4096 + 8, len(quoted)
    names = [ln.split(":", 1)[0].lower() for ln in quoted.strip().splitlines()]
    # in the message's order: our A-R and Received (the trace on top), the client's fields,
    # then the client's top two Received (of 60)
    assert names == ["authentication-results", "received", "from", "to", "subject",
                     "message-id", "received", "received"], names
    assert quoted.startswith("Authentication-Results: mx.test (lane=")
    assert "spf=pass smtp.mailfrom=sender.test" in quoted
    assert f"Subject: {MARK} {tag}-spf" in quoted
    assert "by mx.test (smtp-ingress" in quoted
    assert "hop0.evil.test" in quoted and "hop1.evil.test" in quoted
    assert "hop2.evil.test" not in quoted      # ours + the client's top two Received only
    assert "X-Junk" not in raw.decode() and "victim.test" not in quoted
    assert len(raw) < 8 * 1024, len(raw)
    (dk,) = with_marker(postfix, "dk.test", tag)
    assert email.message_from_bytes(dk, policy=email.policy.compat32)["Delivered-To"] == \
        "bounce@dk.test"
    # how each was authenticated (logged), and counted
    assert sent == {"alice@sender.test": "spf", "bounce@dk.test": "dkim:dk.test"}
    assert counted == (2, 2)
