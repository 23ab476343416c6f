"""bench/unbound.py: the benchmark's DNS server answers the bench's records as the test kit's
dnspython server does (the same records, the same semantics), so a bench run measures the
ingress and not the DNS server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from bench import unbound
from tests.kit.procs import Processes

pytestmark = pytest.mark.skipif(not unbound.available(), reason="unbound not installed "
                                "(make sysdeps installs it as root)")

LONG = "v=DKIM1; k=rsa; p=" + "A" * 600          # more than one 255-byte string, > 512 bytes
RECORDS = {
    "2.0.0.127.bl.bench.test": {"A": ["127.0.0.2"]},
    "key._domainkey.bench.test": {"TXT": [LONG]},
    "1.0.8.127.in-addr.arpa": {"PTR": ["mta1.out.provider.test."]},
    "example.org": {"TXT": ['v=spf1 "quoted" ?all']},
}
SILENT = "dead._domainkey.bench.test"


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with Processes() as procs:
        addr, _ = unbound.start(procs, tmp_path_factory.mktemp("unbound"), RECORDS, [SILENT])
        yield int(addr.rsplit("@", 1)[1])


def ask(port: int, name: str, rdtype: str) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=0, payload=4096)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=2.0)


@pytest.mark.parametrize(("name", "rdtype", "rcode", "answer"), [
    ("2.0.0.127.bl.bench.test", "A", "NOERROR", ["127.0.0.2"]),
    ("3.0.0.127.bl.bench.test", "A", "NXDOMAIN", []),          # unknown name
    ("2.0.0.127.bl.bench.test", "TXT", "NOERROR", []),         # known name, no such type
    ("1.0.8.127.in-addr.arpa", "PTR", "NOERROR", ["mta1.out.provider.test."]),
    ("2.0.8.127.in-addr.arpa", "PTR", "NXDOMAIN", []),         # not unbound's localhost data
    ("example.org", "TXT", "NOERROR", ['"v=spf1 \\"quoted\\" ?all"']),
])
def test_records(port: int, name: str, rdtype: str, rcode: str, answer: list[str]) -> None:
    r = ask(port, name, rdtype)
    assert dns.rcode.to_text(r.rcode()) == rcode
    assert [rd.to_text() for rrset in r.answer for rd in rrset] == answer


def test_a_long_txt_record_is_whole(port: int) -> None:
    r = ask(port, "key._domainkey.bench.test", "TXT")
    strings = [s for rrset in r.answer for rd in rrset for s in rd.strings]
    assert len(strings) == 3 and b"".join(strings).decode() == LONG


def test_a_silent_name_is_never_answered(port: int) -> None:
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query(SILENT, "TXT"), "127.0.0.1", port=port,
                      timeout=1.0)


def test_config_is_pure() -> None:
    text = unbound.config(RECORDS, [SILENT], 5353, Path("/nonexistent"))
    assert 'local-zone: "test." static' in text and 'local-zone: "org." static' in text
    assert f'local-zone: "{SILENT}." deny' in text
    assert "port: 5353" in text and "interface: 127.0.0.1" in text
