"""FCrDNS end to end (issue 18 item 4, Show): real processes (tests/kit/harness.py Ingress) from
loopback sources, against the loopback DNS server. A provider's pool learned from one address
is fast at connect on another address of the same verified provider (from its second address
on); an address whose PTR names the provider's host without forward confirmation is not; iprev
is in the spooled message's Authentication-Results."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import dkim
import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, eventually

FIRST, SECOND, FORGED, HASTY = "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"
PAUSE = 0.5         # seconds a client waits after the banner (see send_after)


@pytest.fixture()
def dns(dkim_key: tuple[bytes, str]) -> Iterator[DNSServer]:
    with DNSServer({
        "shop.test": {"TXT": ["v=spf1 ip4:127.0.0.0/24 -all"]},
        "sel._domainkey.shop.test": {"TXT": [dkim_key[1]]},
        "5.0.0.127.in-addr.arpa": {"PTR": ["mta1.mail.provider.test."]},
        "6.0.0.127.in-addr.arpa": {"PTR": ["mta2.mail.provider.test."]},
        "7.0.0.127.in-addr.arpa": {"PTR": ["mta1.mail.provider.test."]},   # not confirmed
        "mta1.mail.provider.test": {"A": [FIRST]},
        "mta2.mail.provider.test": {"A": [SECOND]},
        "8.0.0.127.in-addr.arpa": {"PTR": ["mta3.mail.provider.test."]},
        "mta3.mail.provider.test": {"A": [HASTY]},
    }) as server:
        yield server


def signed(pem: bytes, subject: str) -> bytes:
    msg = (f"From: a@shop.test\r\nTo: b@example.test\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject}@shop.test>\r\n\r\nHello.\r\n").encode()
    return dkim.sign(msg, b"sel", b"shop.test", pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


def spooled(ing: Ingress, subject: str) -> tuple[dict, bytes]:
    for entry in ing.spooled().values():
        if f"Subject: {subject}\r\n".encode() in entry.message:
            return dict(entry.envelope), entry.message
    raise AssertionError(f"{subject!r} not spooled")


async def send_after(port: int, source: str, body: bytes, pause: float = PAUSE) -> int:
    """One message, sent `pause` seconds after the banner: FCrDNS does not hold the banner, and
    its verdict is applied whenever it arrives (and a bulk MAIL FROM waits for it)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=15, start_tls=False,
                             local_hostname="client.test", source_address=(source, 0))
    await client.connect()
    try:
        await asyncio.sleep(pause)
        errors, _ = await client.sendmail("a@shop.test", ["b@example.test"], body)
        return 0 if errors else 250
    finally:
        client.close()


def send(ing: Ingress, source: str, pem: bytes, subject: str, pause: float = PAUSE) -> None:
    assert asyncio.run(send_after(ing.port, source, signed(pem, subject), pause)) == 250


def test_a_learned_providers_pool_is_fast_on_its_other_addresses(
        tmp_path: Path, dns: DNSServer, dkim_key: tuple[bytes, str]) -> None:
    state = Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
    tables = {"classify": {"spf_promote": "any", "nameservers": [dns.address],
                           "dns_timeout": 1.0, "spf_deadline": 2.0,
                           "learned_save_interval": 0.5}}
    try:
        with Ingress(tmp_path, tables, state=state) as ing:
            send(ing, FIRST, dkim_key[0], "learn")
            env, msg = spooled(ing, "learn")
            assert env["evidence"].get("provider") == "provider.test", env
            assert b"iprev=pass policy.iprev=127.0.0.5 (mta1.mail.provider.test)" in msg
            learned = state / "learned.json"
            assert eventually(lambda: learned.exists() and FIRST in json.loads(
                learned.read_text())["entries"]), ing.log_tail()
            # the second address: fast at connect on the provider, as the learned domain
            send(ing, SECOND, dkim_key[0], "pool")
            env, msg = spooled(ing, "pool")
            assert env["lane"] == "fast", env
            assert env["evidence"]["identity"] == "learned:shop.test", env
            assert "provider:provider.test" in env["evidence"]["reasons"], env
            assert b"iprev=pass policy.iprev=127.0.0.6 (mta2.mail.provider.test)" in msg
            assert any(e.get("peer") == SECOND and e.get("stage") == "connect"
                       and e.get("identity") == "learned:shop.test"
                       for e in ing.events("promoted")), ing.events("promoted")
            # a client that sends at once, before its PTR is answered: its MAIL FROM waits for
            # the connect checks under way, so the transaction is fast and its A-R has iprev
            send(ing, HASTY, dkim_key[0], "hasty", pause=0.0)
            env, msg = spooled(ing, "hasty")
            assert env["lane"] == "fast", env
            assert env["evidence"]["identity"] == "learned:shop.test", env
            assert b"iprev=pass policy.iprev=127.0.0.8 (mta3.mail.provider.test)" in msg
            # a PTR naming the provider's host, not confirmed forward: no provider promotion
            send(ing, FORGED, dkim_key[0], "forged")
            env, msg = spooled(ing, "forged")
            assert "provider:provider.test" not in env["evidence"].get("reasons", []), env
            assert env["evidence"].get("identity") != "learned:shop.test", env
            assert b"iprev=fail policy.iprev=127.0.0.7" in msg
    finally:
        shutil.rmtree(state, ignore_errors=True)
