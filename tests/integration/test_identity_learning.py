"""Learning obeys the promotion policy (issue 8): a worker's Pipeline, with real DKIM signatures
verified against the real DNS server of tests/kit/dnsserver.py, learns an SPF-pass + aligned-DKIM
client only when classify.spf_promote would promote that domain, and says for which domain."""

from __future__ import annotations

import base64
import dataclasses
import time

import dkim
import pytest

from ingress.core.config import ClassifyConfig, Config
from ingress.core.wire import Envelope, Lane
from tests.kit.dkimkeys import signing_key
from tests.kit.dnsserver import DNSServer
from workers.pipeline import Pipeline


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, str]:
    pem, pub = signing_key()
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(pub).decode()


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
