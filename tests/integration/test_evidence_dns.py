"""SPF (ingress.edge.evidence) and DKIM (workers.lane.dkim_check) against a real DNS server on
loopback.

The DNS server is tests/kit/dnsserver.py (dnspython, UDP + TCP on 127.0.0.1). Timeouts are
provoked with a UDP socket that is bound but never read, and with names the server ignores.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dkim
import pytest
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ingress.core.headers import received_spf_header, spf_identity, spf_request
from ingress.edge import evidence
from ingress.edge.evidence import (
    cert_evidence,
    check_spf,
    make_resolver,
    normalize_fingerprint,
    parse_nameserver,
    sha256_fingerprint,
)
from ingress.policy.classify import AuthResult, CertResult
from tests.kit.dnsserver import DNSServer
from workers.lane import dkim_check
from workers.lane.dkim_check import (
    DkimResult,
    DkimSignatureResult,
    aligned,
    header_from_domain,
    verify_dkim,
)
from workers.lane.headers import authentication_results, strip_forged_ar

SPF_RECORDS = {
    "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all", "google-site-verification=xyz"]},
    "fail.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "softfail.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "norecord.test": {"A": ["127.0.0.1"]},
    "permerror.test": {"TXT": ["v=spf1 frobnicate -all"]},
    "twice.test": {"TXT": ["v=spf1 -all", "v=spf1 +all"]},
    "mx.test": {"TXT": ["v=spf1 mx -all"], "MX": ["10 mail.mx.test."]},
    "mail.mx.test": {"A": ["127.0.0.2"]},
    "a.test": {"TXT": ["v=spf1 a:host.a.test -all"]},
    "host.a.test": {"A": ["127.0.0.3"]},
    "include.test": {"TXT": ["v=spf1 include:pass.test -all"]},
    "v6.test": {"TXT": ["v=spf1 ip6:2001:db8::/32 -all"]},
    "helo.test": {"TXT": ["v=spf1 ip4:127.0.0.4 -all"]},
    "timeout.test": {"TXT": ["v=spf1 include:silent.test -all"]},
    "servfail-inc.test": {"TXT": ["v=spf1 include:servfail.test -all"]},
    "long.test": {
        "TXT": [
            "v=spf1 " + " ".join(f"ip4:10.{i}.0.0/16" for i in range(40)) + " ip4:127.0.0.1 -all"
        ]
    },
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    server = DNSServer(SPF_RECORDS)
    server.silent.update({"silent.test", "sel-silent._domainkey.example.test"})
    server.servfail.update({"servfail.test", "sel-servfail._domainkey.example.test"})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def resolver(dns_server: DNSServer):
    return make_resolver([dns_server.address], timeout=0.5)


@pytest.fixture(scope="module")
def blackhole() -> Iterator[str]:
    """A UDP port that is held open and never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def run(coro):
    return asyncio.run(coro)


# =========================================================================== resolver


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        ("192.0.2.53@5353", ("192.0.2.53", 5353)),
        ("::1", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("::1@5353", ("::1", 5353)),
    ],
)
def test_parse_nameserver(spec: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(spec) == expected


@pytest.mark.parametrize("spec", ["ns.example.com", "192.0.2.1:0", "192.0.2.1:99999", "[::1"])
def test_parse_nameserver_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(spec)


def test_make_resolver_settings(dns_server: DNSServer) -> None:
    assert dkim_check.make_resolver is make_resolver      # one factory for SPF and DKIM
    for make in (make_resolver,):
        r = make([dns_server.address, "[::1]:5300"], timeout=0.7)
        assert [(ns.address, ns.port) for ns in r.nameservers] == [
            ("127.0.0.1", dns_server.port),
            ("::1", 5300),
        ]
        assert r.timeout == r.lifetime == 0.7
        assert r.cache is not None
    with pytest.raises(ValueError):
        make_resolver(["127.0.0.1"], timeout=0)


# =========================================================================== SPF


@pytest.mark.parametrize(
    "ip, mail_from, helo, expected",
    [
        ("127.0.0.1", "alice@pass.test", "client.test", AuthResult.PASS),
        ("127.0.0.1", "<alice@PASS.test>", "client.test", AuthResult.PASS),
        ("::ffff:127.0.0.1", "alice@pass.test", "client.test", AuthResult.PASS),
        ("127.0.0.9", "alice@pass.test", "client.test", AuthResult.FAIL),
        ("127.0.0.1", "bob@fail.test", "client.test", AuthResult.FAIL),
        ("127.0.0.1", "bob@softfail.test", "client.test", AuthResult.SOFTFAIL),
        ("192.0.2.7", "bob@softfail.test", "client.test", AuthResult.PASS),
        ("127.0.0.1", "bob@neutral.test", "client.test", AuthResult.NEUTRAL),
        ("127.0.0.1", "bob@norecord.test", "client.test", AuthResult.NONE),
        ("127.0.0.1", "bob@nxdomain.test", "client.test", AuthResult.NONE),
        ("127.0.0.1", "bob@permerror.test", "client.test", AuthResult.PERMERROR),
        ("127.0.0.1", "bob@twice.test", "client.test", AuthResult.PERMERROR),
        ("127.0.0.2", "bob@mx.test", "client.test", AuthResult.PASS),
        ("127.0.0.3", "bob@mx.test", "client.test", AuthResult.FAIL),
        ("127.0.0.3", "bob@a.test", "client.test", AuthResult.PASS),
        ("127.0.0.1", "bob@include.test", "client.test", AuthResult.PASS),
        ("2001:db8::25", "bob@v6.test", "client.test", AuthResult.PASS),
        ("2001:db9::25", "bob@v6.test", "client.test", AuthResult.FAIL),
        # null sender: the HELO identity is checked
        ("127.0.0.4", "", "helo.test", AuthResult.PASS),
        ("127.0.0.5", "<>", "helo.test", AuthResult.FAIL),
        ("127.0.0.5", "", "", AuthResult.NONE),
        # a record longer than 255 bytes (several strings) and 512 bytes (TCP fallback)
        ("127.0.0.1", "bob@long.test", "client.test", AuthResult.PASS),
        ("10.39.1.1", "bob@long.test", "client.test", AuthResult.PASS),
        ("10.40.1.1", "bob@long.test", "client.test", AuthResult.FAIL),
        # unparsable client address: pyspf raises PermError from query.__init__
        ("not-an-ip", "bob@pass.test", "client.test", AuthResult.PERMERROR),
        # SERVFAIL on an include and a timeout on an include are temperrors
        ("127.0.0.1", "bob@servfail-inc.test", "client.test", AuthResult.TEMPERROR),
        ("127.0.0.1", "bob@timeout.test", "client.test", AuthResult.TEMPERROR),
    ],
)
def test_spf_results(resolver, ip: str, mail_from: str, helo: str, expected: AuthResult) -> None:
    result, explanation, _ = run(check_spf(ip, mail_from, helo, resolver=resolver, deadline_s=2.0))
    assert result is expected, explanation
    assert isinstance(explanation, str)


def test_spf_uses_our_resolver(dns_server: DNSServer) -> None:
    fresh = make_resolver([dns_server.address], timeout=0.5)  # empty cache
    before = len(dns_server.queries)
    res, *_ = run(check_spf("127.0.0.2", "x@mx.test", "c.test", resolver=fresh, deadline_s=2.0))
    assert res is AuthResult.PASS
    assert dns_server.queries[before:] == [
        ("mx.test", "TXT", "udp"),
        ("mx.test", "MX", "udp"),
        ("mail.mx.test", "A", "udp"),
    ]
    assert spf.DNSLookup is evidence._spf_lookup


def test_spf_tcp_fallback_for_big_record(dns_server: DNSServer) -> None:
    fresh = make_resolver([dns_server.address], timeout=0.5)  # empty cache
    before = len(dns_server.queries)
    res, *_ = run(check_spf("127.0.0.1", "x@long.test", "c", resolver=fresh, deadline_s=2.0))
    assert res is AuthResult.PASS
    assert dns_server.queries[before:] == [
        ("long.test", "TXT", "udp"),
        ("long.test", "TXT", "tcp"),
    ]


def test_spf_cache_avoids_repeat_queries(dns_server: DNSServer) -> None:
    fresh = make_resolver([dns_server.address], timeout=0.5)
    before = len(dns_server.queries)
    for _ in range(5):
        res, *_ = run(check_spf("127.0.0.2", "x@mx.test", "c", resolver=fresh, deadline_s=2.0))
        assert res is AuthResult.PASS
    names = [q[:2] for q in dns_server.queries[before:]]
    assert names == [("mx.test", "TXT"), ("mx.test", "MX"), ("mail.mx.test", "A")]


def test_spf_temperror_when_nameserver_never_answers(blackhole: str) -> None:
    dead = make_resolver([blackhole], timeout=0.3)
    t0 = time.monotonic()
    res, explanation, _ = run(
        check_spf("127.0.0.1", "a@pass.test", "c.test", resolver=dead, deadline_s=1.0)
    )
    elapsed = time.monotonic() - t0
    assert res is AuthResult.TEMPERROR, explanation
    assert elapsed < 1.2


def test_spf_outer_deadline(resolver) -> None:
    """The outer asyncio deadline holds even when the executor cannot even start the check."""
    busy = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    busy.submit(gate.wait, 5)
    try:
        t0 = time.monotonic()
        res, explanation, _ = run(
            check_spf(
                "127.0.0.1", "a@pass.test", "c", resolver=resolver, deadline_s=0.2, executor=busy
            )
        )
        assert res is AuthResult.TEMPERROR
        assert "deadline" in explanation
        assert time.monotonic() - t0 < 1.0
    finally:
        gate.set()
        busy.shutdown(wait=True)


def test_spf_concurrent_checks_use_their_own_resolver(resolver, blackhole: str) -> None:
    """The per-thread resolver hand-off to pyspf does not leak between concurrent checks."""
    dead = make_resolver([blackhole], timeout=0.3)
    pool = ThreadPoolExecutor(max_workers=8)

    async def main() -> list[evidence.SpfOutcome]:
        jobs = []
        for i in range(24):
            r = dead if i % 3 == 0 else resolver
            jobs.append(
                check_spf(
                    "127.0.0.1", f"u{i}@pass.test", "c", resolver=r, deadline_s=1.5, executor=pool
                )
            )
        return await asyncio.gather(*jobs)

    try:
        results = run(main())
    finally:
        pool.shutdown(wait=True)
    for i, (res, exp, _) in enumerate(results):
        assert res is (AuthResult.TEMPERROR if i % 3 == 0 else AuthResult.PASS), (i, exp)
    assert getattr(evidence._tls, "answers", None) is None


def test_spf_event_loop_not_blocked(blackhole: str) -> None:
    dead = make_resolver([blackhole], timeout=0.4)

    async def main() -> int:
        ticks = 0
        task = asyncio.create_task(
            check_spf("127.0.0.1", "a@pass.test", "c", resolver=dead, deadline_s=0.5)
        )
        while not task.done():
            await asyncio.sleep(0.01)
            ticks += 1
        assert task.result()[0] is AuthResult.TEMPERROR
        return ticks

    assert run(main()) >= 10


@pytest.mark.parametrize(
    "mail_from, helo, expected",
    [
        ("a@Example.COM", "h.test", ("mailfrom", "example.com")),
        ("<a@example.com.>", "h.test", ("mailfrom", "example.com")),
        ("", "H.test", ("helo", "h.test")),
        ("<>", "h.test", ("helo", "h.test")),
        ("a@\uff53pam.test", "h.test", ("mailfrom", "spam.test")),     # canonical
        ("a@spam\u3002test", "h.test", ("mailfrom", "spam.test")),
        ("a@b\u00fccher.test", "h.test", ("mailfrom", "xn--bcher-kva.test")),
        ("<>", "SPAM.test.", ("helo", "spam.test")),
        ("<>", "[127.0.0.1]", ("helo", "")),                            # not a domain name
        ("a@x..test", "h.test", ("mailfrom", "")),
    ],
)
def test_spf_identity(mail_from: str, helo: str, expected: tuple[str, str]) -> None:
    assert spf_identity(mail_from, helo) == expected


@pytest.mark.parametrize(
    "mail_from, helo, expected",
    [
        ("a@example.com", "h.test", ("example.com", "a@example.com", "h.test")),
        ("User@\uff53pam.test", "H.test.", ("spam.test", "User@spam.test", "h.test")),
        ("<a@b\u00fccher.test>", "h.test",
         ("xn--bcher-kva.test", "a@xn--bcher-kva.test", "h.test")),
        ("<>", "SPAM.test.", ("spam.test", "", "spam.test")),
        ("", "mail.spam.test", ("mail.spam.test", "", "mail.spam.test")),
        # a HELO that is not a name only feeds %{h}, as sent (lower case)
        ("a@spam.test", "[127.0.0.1]", ("spam.test", "a@spam.test", "[127.0.0.1]")),
        # no valid domain to evaluate: no lookup at all (RFC 7208 4.3: none)
        ("a@x..test", "h.test", None),
        ("<>", "[127.0.0.1]", None),
        ("a@", "h.test", None),
    ],
)
def test_spf_request(mail_from: str, helo: str, expected: object) -> None:
    assert spf_request(mail_from, helo) == expected


def test_received_spf_header() -> None:
    h = received_spf_header(
        AuthResult.PASS,
        client_ip="192.0.2.1",
        mail_from="a@example.com",
        helo="mail.example.com",
        receiver="mx.example.net",
    )
    assert h.startswith(b"Received-SPF: pass (mx.example.net: domain of a@example.com ")
    assert h.endswith(b"\r\n")
    text = h.decode()
    for part in (
        "receiver=mx.example.net;",
        "client-ip=192.0.2.1;",
        'envelope-from="a@example.com";',
        "helo=mail.example.com;",
        "identity=mailfrom",
    ):
        assert part in text
    assert all(len(line) <= 100 for line in text.split("\r\n"))
    assert all(line.startswith("\t") for line in text.split("\r\n")[1:-1])
    # hostile input cannot inject header lines
    evil = received_spf_header(
        AuthResult.TEMPERROR,
        client_ip="192.0.2.1",
        mail_from="",
        helo="x\r\nX-Injected: yes",
        receiver="mx",
        explanation="oops (nested) \\",
    ).decode()
    assert "\r\nX-Injected" not in evil
    assert evil.count("\r\n") == evil.count("\r\n\t") + 1
    assert "identity=helo" in evil
    assert 'envelope-from="";' in evil
    v6 = received_spf_header(
        AuthResult.NONE, client_ip="2001:db8::1", mail_from="a@b.test", helo="h", receiver="mx"
    )
    assert b'client-ip="2001:db8::1";' in v6


# =========================================================================== certificates


def test_cert_evidence() -> None:
    der = b"\x30\x82fake-certificate-bytes"
    fp = sha256_fingerprint(der)
    colon_upper = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(colon_upper) == fp
    table = [
        (None, False, frozenset(), CertResult.NONE),
        (None, True, frozenset({fp}), CertResult.NONE),
        (b"", True, frozenset(), CertResult.NONE),
        (der, False, frozenset(), CertResult.UNTRUSTED),
        (der, True, frozenset(), CertResult.VERIFIED),
        (der, False, frozenset({fp}), CertResult.PINNED),
        (der, False, frozenset({colon_upper}), CertResult.PINNED),
        (der, True, frozenset({colon_upper}), CertResult.PINNED),
        (der, False, frozenset({"00" * 32}), CertResult.UNTRUSTED),
    ]
    for peer, verified, pins, expected in table:
        assert cert_evidence(peer, verified, pins) is expected, (peer, verified, pins)


# =========================================================================== DKIM


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[bytes, str]]:
    """selector -> (private PEM, public TXT record)."""
    out = {}
    for sel in ("sel2048", "other"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        out[sel] = (pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(pub).decode())
    return out


@pytest.fixture(scope="module")
def dkim_dns(dns_server: DNSServer, keys) -> DNSServer:
    dns_server.set("sel2048._domainkey.example.test", "TXT", [keys["sel2048"][1]])
    dns_server.set("other._domainkey.other.test", "TXT", [keys["other"][1]])
    dns_server.set("revoked._domainkey.example.test", "TXT", ["v=DKIM1; k=rsa; p="])
    dns_server.set("garbage._domainkey.example.test", "TXT", ["v=DKIM1; k=rsa; p=AAAA!!"])
    return dns_server


MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@dest.test\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b"Second line.\r\n"
)


def sign(msg: bytes, keys, sel: str = "sel2048", domain: str = "example.test") -> bytes:
    pem = keys["sel2048" if sel not in keys else sel][0]
    sig = dkim.sign(
        msg,
        sel.encode(),
        domain.encode(),
        pem,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
    )
    return sig + msg


def test_dkim_pass_aligned_through_our_resolver(dkim_dns: DNSServer, keys) -> None:
    assert len(keys["sel2048"][1]) > 255  # the record is served as several strings
    fresh = dkim_check.make_resolver([dkim_dns.address], timeout=0.5)
    before = len(dkim_dns.queries)
    report = verify_dkim(sign(MESSAGE, keys), resolver=fresh)
    assert report.from_domain == "example.test"
    assert report.results == (
        DkimSignatureResult(
            "example.test", "sel2048", DkimResult.PASS, True, report.results[0].b_prefix, ""
        ),
    )
    assert len(report.results[0].b_prefix) == 8
    assert report.aligned_pass and report.any_pass
    seen = dkim_dns.queries[before:]
    assert seen == [("sel2048._domainkey.example.test", "TXT", "udp")]


def test_dkim_lf_message(dkim_dns: DNSServer, resolver, keys) -> None:
    lf = MESSAGE.replace(b"\r\n", b"\n")
    report = verify_dkim(sign(lf, keys), resolver=resolver)
    assert [r.result for r in report.results] == [DkimResult.PASS]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda m: m.replace(b"Hello Bob.", b"Hello Eve."), "body hash mismatch"),
        (lambda m: m.replace(b"Subject: hello", b"Subject: HELLO"), "signature did not verify"),
        (lambda m: m.replace(b"To: bob@dest.test", b"To: eve@dest.test"), "did not verify"),
    ],
)
def test_dkim_tampered_fails(dkim_dns: DNSServer, resolver, keys, mutate, reason: str) -> None:
    report = verify_dkim(mutate(sign(MESSAGE, keys)), resolver=resolver)
    (r,) = report.results
    assert r.result is DkimResult.FAIL
    assert reason in r.reason
    assert r.aligned and not r.aligned_pass
    assert not report.aligned_pass


@pytest.mark.parametrize(
    "selector, expected, reason",
    [
        ("nokey", DkimResult.PERMERROR, "no key"),  # NXDOMAIN
        ("revoked", DkimResult.PERMERROR, "bad key record"),  # p= empty
        ("garbage", DkimResult.PERMERROR, "bad key record"),
        ("sel-silent", DkimResult.TEMPERROR, "Timeout"),
        ("sel-servfail", DkimResult.TEMPERROR, ""),
    ],
)
def test_dkim_key_problems(
    dkim_dns: DNSServer, keys, selector: str, expected: DkimResult, reason: str
) -> None:
    res = dkim_check.make_resolver([dkim_dns.address], timeout=0.3)
    t0 = time.monotonic()
    report = verify_dkim(sign(MESSAGE, keys, sel=selector), resolver=res, timeout=0.3)
    assert time.monotonic() - t0 < 2.0
    (r,) = report.results
    assert r.result is expected, r
    assert reason in r.reason
    assert not report.aligned_pass


def test_dkim_nameserver_never_answers(keys, blackhole: str) -> None:
    dead = dkim_check.make_resolver([blackhole], timeout=0.2)
    report = verify_dkim(sign(MESSAGE, keys), resolver=dead, timeout=0.2)
    assert [r.result for r in report.results] == [DkimResult.TEMPERROR]


def test_dkim_overall_deadline(keys, blackhole: str) -> None:
    """Three signatures whose keys time out: the total deadline bounds the whole verify."""
    dead = dkim_check.make_resolver([blackhole], timeout=0.3)
    msg = sign(sign(sign(MESSAGE, keys), keys), keys)
    t0 = time.monotonic()
    report = verify_dkim(msg, resolver=dead, timeout=0.3, deadline_s=0.4)
    assert time.monotonic() - t0 < 0.9
    assert [r.result for r in report.results] == [DkimResult.TEMPERROR] * 3


def test_dkim_every_signature_is_verified(dkim_dns: DNSServer, resolver, keys) -> None:
    msg = sign(MESSAGE, keys)  # example.test, aligned
    msg = sign(msg, keys, sel="other", domain="other.test")  # third party, not aligned
    msg = sign(msg, keys, sel="nokey")  # no key
    report = verify_dkim(msg, resolver=resolver)
    got = [(r.domain, r.selector, r.result, r.aligned) for r in report.results]
    # signatures are prepended, so the newest is first
    assert got == [
        ("example.test", "nokey", DkimResult.PERMERROR, True),
        ("other.test", "other", DkimResult.PASS, False),
        ("example.test", "sel2048", DkimResult.PASS, True),
    ]
    assert report.aligned_pass


def test_dkim_third_party_only_is_not_aligned(dkim_dns: DNSServer, resolver, keys) -> None:
    report = verify_dkim(sign(MESSAGE, keys, sel="other", domain="other.test"), resolver=resolver)
    assert report.any_pass and not report.aligned_pass


def test_dkim_subdomain_from_aligns(dkim_dns: DNSServer, resolver, keys) -> None:
    msg = MESSAGE.replace(b"alice@example.test", b"alice@news.example.test")
    report = verify_dkim(sign(msg, keys), resolver=resolver)
    assert report.from_domain == "news.example.test"
    assert report.aligned_pass


def test_dkim_no_signature(resolver) -> None:
    report = verify_dkim(MESSAGE, resolver=resolver)
    assert report.results == () and not report.aligned_pass
    ar = authentication_results("mx.test", dkim_results=report.results)
    assert b"dkim=none" in ar


def test_dkim_malformed_signature_is_permerror(resolver) -> None:
    bad = b"DKIM-Signature: v=1; a=rsa-sha256; s=sel2048; h=from; bh=AAAA; b=AAAA\r\n" + MESSAGE
    (r,) = verify_dkim(bad, resolver=resolver).results
    assert r.result is DkimResult.PERMERROR


def test_dkim_key_too_small_for_policy(dkim_dns: DNSServer, resolver, keys) -> None:
    (r,) = verify_dkim(sign(MESSAGE, keys), resolver=resolver, minkey=4096).results
    assert r.result is DkimResult.PERMERROR
    assert "too small" in r.reason


def test_dkim_signature_cap(dkim_dns: DNSServer, resolver, keys) -> None:
    msg = MESSAGE
    for _ in range(3):
        msg = sign(msg, keys)
    report = verify_dkim(msg, resolver=resolver, max_signatures=2)
    assert [r.result for r in report.results] == [
        DkimResult.PASS,
        DkimResult.PASS,
        DkimResult.NEUTRAL,
    ]


def test_dkim_result_values_match_authresult() -> None:
    assert [m.value for m in DkimResult] == [m.value for m in AuthResult]


@pytest.mark.parametrize(
    "d, f, ok",
    [
        ("example.test", "example.test", True),
        ("EXAMPLE.test.", "example.test", True),
        ("example.test", "news.example.test", True),
        ("mail.example.test", "example.test", True),
        ("example.test", "badexample.test", False),
        ("other.test", "example.test", False),
        ("test", "example.test", False),  # a bare TLD never aligns
        ("example.test", None, False),
        ("", "example.test", False),
        # relaxed alignment by the PSL, of canonical names
        ("xn--bcher-kva.test", "b\u00fccher.test", True),     # d= A-label, From: U-label
        ("b\u00fccher.test", "mail.xn--bcher-kva.test", True),
        ("spam.test", "\uff53pam.test", True),                # a spelling is its name
        ("\uff53pam.test", "spam\u3002test", True),
        ("a.example.test", "b.example.test", True),           # same organisational domain
        ("example.co.uk", "mail.example.co.uk", True),
        ("co.uk", "example.co.uk", False),                    # a public suffix is nobody's
        ("github.io", "victim.github.io", False),             # (was aligned: "2 labels")
        ("evil.github.io", "victim.github.io", False),        # PSL private section
        ("bucher.test", "b\u00fccher.test", False),
        ("a..example.test", "a..example.test", False),        # not a domain name
        ("example.test", "[192.0.2.1]", False),
    ],
)
def test_alignment(d: str, f: str | None, ok: bool) -> None:
    assert aligned(d, f) is ok


@pytest.mark.parametrize(
    "headers, domain",
    [
        (b"From: a@Example.TEST\r\n", "example.test"),
        (b'From: "Doe, J" <j@x.test>\r\n', "x.test"),
        (b"FROM:\r\n <folded@y.test>\r\n", "y.test"),
        (b"From: a@x.test, b@y.test\r\n", None),
        (b"From: a@x.test\r\nFrom: b@x.test\r\n", None),
        (b"Sender: a@x.test\r\n", None),
        (b"From: nobody\r\n", None),
        ("From: a@B\u00fccher.test\r\n".encode(), "xn--bcher-kva.test"),   # canonical
        ("From: a@\uff53pam\u3002test\r\n".encode(), "spam.test"),
        (b"From: a@x..test\r\n", None),                                  # not a name
    ],
)
def test_header_from_domain(headers: bytes, domain: str | None) -> None:
    assert header_from_domain(headers + b"\r\nbody From: z@z.test\r\n") == domain


# =========================================================================== A-R headers


def test_authentication_results_header() -> None:
    results = (
        DkimSignatureResult("example.test", "sel", DkimResult.PASS, True, "AbCdEfGh"),
        DkimSignatureResult("other.test", "s2", DkimResult.FAIL, False, "12345678", "body hash"),
    )
    h = authentication_results(
        "mx.example.net",
        spf="pass",
        spf_domain="example.test",
        dkim_results=results,
        comment="lane=fast",
    )
    assert h == (
        b"Authentication-Results: mx.example.net (lane=fast);\r\n"
        b"\tspf=pass smtp.mailfrom=example.test;\r\n"
        b"\tdkim=pass (aligned) header.d=example.test header.s=sel header.b=AbCdEfGh;\r\n"
        b'\tdkim=fail reason="body hash" header.d=other.test header.s=s2 header.b=12345678\r\n'
    )
    helo = authentication_results("mx", spf="temperror", spf_helo="h.test", dkim_checked=False)
    assert helo == b"Authentication-Results: mx;\r\n\tspf=temperror smtp.helo=h.test\r\n"
    nothing = authentication_results("mx", dkim_checked=False)
    assert nothing == b"Authentication-Results: mx; none\r\n"
    evil = authentication_results("mx", spf="pass", spf_domain="x\r\nX-Evil: 1")
    assert b"\r\nX-Evil" not in evil


def test_our_own_header_is_stripped_on_reentry() -> None:
    """A message that already carries our A-R (a loop or a forgery) loses it."""
    ar = authentication_results("mx.example.net", spf="pass", spf_domain="e.test", comment="x")
    assert strip_forged_ar(ar + MESSAGE, "mx.example.net") == MESSAGE


STRIP_CASES = [
    # (headers before MESSAGE, kept headers)
    (b"Authentication-Results: mx.example.net; spf=pass\r\n", b""),
    (b"authentication-results: MX.Example.NET; dkim=pass\r\n", b""),
    (b"Authentication-Results :mx.example.net;spf=pass\r\n", b""),
    (b"Authentication-Results: mx.example.net 1; spf=pass\r\n", b""),
    (b"Authentication-Results: (comment (nested)) mx.example.net; none\r\n", b""),
    (b'Authentication-Results: "mx.example.net"; none\r\n', b""),
    (b"Authentication-Results: mx.example.net\r\n", b""),
    (
        b"Authentication-Results: mx.example.net;\r\n\tspf=pass smtp.mailfrom=a.test;\r\n"
        b"  dkim=pass header.d=a.test\r\n",
        b"",
    ),
    # not ours: kept byte for byte
    (b"Authentication-Results: mx.example.net.evil; spf=pass\r\n",) * 2,
    (b"Authentication-Results: other.example; spf=pass\r\n",) * 2,
    (b"Authentication-Results:\r\n other.example; spf=pass\r\n",) * 2,
    (b"ARC-Authentication-Results: i=1; mx.example.net; spf=pass\r\n",) * 2,
    (b"X-Authentication-Results: mx.example.net; spf=pass\r\n",) * 2,
    # mixed: only ours goes
    (
        b"Received: from a\r\n by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Authentication-Results: mx.example.net; spf=pass\r\n"
        b"Authentication-Results: other.example;\r\n\tdkim=pass\r\n"
        b"AUTHENTICATION-RESULTS: mx.example.net;\r\n\tdkim=pass\r\n",
        b"Received: from a\r\n by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Authentication-Results: other.example;\r\n\tdkim=pass\r\n",
    ),
]


@pytest.mark.parametrize("headers, kept", STRIP_CASES)
def test_strip_forged_ar(headers: bytes, kept: bytes) -> None:
    assert strip_forged_ar(headers + MESSAGE, "mx.example.net") == kept + MESSAGE
    lf_in, lf_out = (
        (headers + MESSAGE).replace(b"\r\n", b"\n"),
        (kept + MESSAGE).replace(b"\r\n", b"\n"),
    )
    assert strip_forged_ar(lf_in, "MX.example.net") == lf_out


def test_strip_forged_ar_leaves_the_body_alone() -> None:
    body_ar = MESSAGE + b"Authentication-Results: mx.example.net; spf=pass\r\n"
    assert strip_forged_ar(body_ar, "mx.example.net") == body_ar
    no_body = b"Authentication-Results: mx.example.net; spf=pass\r\nSubject: x\r\n"
    assert strip_forged_ar(no_body, "mx.example.net") == b"Subject: x\r\n"
    # a line that is not a header field ends the header section (as in Postfix)
    odd = b"Subject: x\r\nnot a header\r\nAuthentication-Results: mx.example.net; x\r\n\r\n"
    assert strip_forged_ar(odd, "mx.example.net") == odd
    assert strip_forged_ar(b"", "mx.example.net") == b""


def test_strip_then_verify_keeps_dkim_valid(dkim_dns: DNSServer, resolver, keys) -> None:
    """Removing a forged, unsigned A-R must not break the signature over the other bytes."""
    signed = sign(MESSAGE, keys)
    forged = b"Authentication-Results: mx.example.net; dkim=pass\r\n" + signed
    cleaned = strip_forged_ar(forged, "mx.example.net")
    assert cleaned == signed
    assert verify_dkim(cleaned, resolver=resolver).aligned_pass
