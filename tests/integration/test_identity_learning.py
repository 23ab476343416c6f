"""Learning obeys the promotion policy (issue 8): a worker's Pipeline, with real DKIM signatures
verified against the real DNS server of tests/kit/dnsserver.py, learns an SPF-pass + aligned-DKIM
client only when classify.spf_promote would promote that domain, and says for which domain."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import dkim
import pytest

from ingress.core.config import ClassifyConfig, Config
from ingress.core.wire import Envelope, Lane
from tests.kit.dkimkeys import signing_record
from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, send_one
from workers.pipeline import Pipeline


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, str]:
    return signing_record()


@pytest.fixture(scope="module")
def dns(keys: tuple[bytes, str]):
    with DNSServer({"sel._domainkey.good.test": {"TXT": [keys[1]]},
                    "sel._domainkey.spammer.test": {"TXT": [keys[1]]}}) as server:
        yield server


def signed(domain: str, pem: bytes) -> bytes:
    msg = (f"From: a@{domain}\r\nTo: b@example.test\r\nSubject: s\r\n"
           f"Message-ID: <1@{domain}>\r\n\r\nHello.\r\n").encode()
    return dkim.sign(msg, b"sel", domain.encode(), pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


def envelope(domain: str) -> Envelope:
    now = time.time()
    return Envelope(qid="Q1", lane=Lane.BULK, peer_ip="127.0.0.50", peer_port=1, helo="h",
                    mail_from=f"a@{domain}", rcpts=("b@example.test",), received_at=now,
                    deadline=now + 30, evidence={"spf": "pass", "spf_domain": domain})


def pipeline(dns: DNSServer, **classify: object) -> Pipeline:
    c = dataclasses.replace(ClassifyConfig(), nameservers=(dns.address,), dns_timeout=1.0,
                            **classify)
    return Pipeline(dataclasses.replace(Config(), classify=c))


@pytest.mark.parametrize("classify, domain, learn", [
    ({"spf_promote": "listed", "spf_domains": ("good.test",)}, "good.test", True),
    ({"spf_promote": "listed", "spf_domains": ("good.test",)}, "spammer.test", False),
    ({"spf_promote": "off"}, "good.test", False),
    ({"spf_promote": "any"}, "spammer.test", True),
])
def test_listed_learns_only_listed_domains(dns: DNSServer, keys: tuple[bytes, str],
                                           classify: dict, domain: str, learn: bool) -> None:
    p = pipeline(dns, **classify).process(envelope(domain), signed(domain, keys[0]), 5.0)
    assert any(r.aligned and r.result == "pass" for r in p.dkim), p.dkim   # real evidence
    assert p.learn is learn
    assert p.learn_domain == (domain if learn else "")


def test_idn_is_learned_under_its_a_label(dns: DNSServer, keys: tuple[bytes, str]) -> None:
    """From: the U-label address, d= the A-label: aligned (canonical names), and learned for
    the A-label, whichever form the envelope's SPF domain came in (issue 17 build item 2)."""
    a_label = "xn--bcher-kva.test"
    dns.set(f"sel._domainkey.{a_label}", "TXT", [keys[1]])
    msg = (f"From: a@B\u00fccher.test\r\nTo: b@example.test\r\nSubject: s\r\n"
           f"Message-ID: <1@{a_label}>\r\n\r\nHello.\r\n").encode()
    body = dkim.sign(msg, b"sel", a_label.encode(), keys[0],
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg
    for spf_domain in (a_label, "b\u00fccher.test"):
        env = dataclasses.replace(envelope(a_label), evidence={"spf": "pass",
                                                               "spf_domain": spf_domain})
        p = pipeline(dns, spf_promote="listed", spf_domains=("b\u00fccher.test",)).process(
            env, body, 5.0)
        assert [(r.domain, r.result, r.aligned) for r in p.dkim] == [(a_label, "pass", True)]
        assert (p.learn, p.learn_domain) == (True, a_label)


def test_listed_learns_only_listed_domains_live(tmp_path: Path, keys: tuple[bytes, str]) -> None:
    """The whole path: worker -> bulk broker's fan-out -> every acceptor -> learned.json. With
    spf_promote = "listed", a listed domain's client is learned (with its domain: the next
    connection's identity is learned:<domain>); a spammer with valid SPF and DKIM is not."""
    good_ip, spam_ip = "127.0.2.7", "127.0.1.7"
    with DNSServer({"good.test": {"TXT": [f"v=spf1 ip4:{good_ip} -all"]},
                    "spammer.test": {"TXT": [f"v=spf1 ip4:{spam_ip} -all"]},
                    "sel._domainkey.good.test": {"TXT": [keys[1]]},
                    "sel._domainkey.spammer.test": {"TXT": [keys[1]]}}) as dns:
        state = Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
        tables = {"classify": {"spf_promote": "listed", "spf_domains": ["good.test"],
                               "nameservers": [dns.address], "dns_timeout": 1.0,
                               "spf_deadline": 2.0}}
        try:
            with Ingress(tmp_path, tables, state=state) as ing:
                for ip, domain in ((spam_ip, "spammer.test"), (good_ip, "good.test")):
                    code, text = asyncio.run(send_one(ing.port, signed(domain, keys[0]),
                                                      source=ip, sender=f"a@{domain}"))
                    assert code == 250, text
                learned = state / "learned.json"
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not learned.exists():
                    time.sleep(0.2)
                time.sleep(1.0)     # the spammer's learn fact (if any) had time to arrive too
                entries = json.loads(learned.read_text())["entries"]
                assert good_ip in entries and entries[good_ip]["domain"] == "good.test"
                assert spam_ip not in entries
                # the learned client is fast at connect, as identity learned:good.test
                code, text = asyncio.run(send_one(ing.port, signed("good.test", keys[0]),
                                                  source=good_ip, sender="other@elsewhere.test"))
                assert code == 250, text
                idents = [e.envelope["evidence"].get("identity")
                          for e in ing.spooled().values() if e.envelope["peer_ip"] == good_ip]
                assert "learned:good.test" in idents, idents
        finally:
            shutil.rmtree(state, ignore_errors=True)
