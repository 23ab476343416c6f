"""ingress.core.dns_udp's lean reader against dnspython's: the same records for every reply
dnspython writes, and no exception for any bytes (hypothesis)."""

from __future__ import annotations

import dns.message
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from ingress.core.dns_udp import _SLOW, _lean, _parse, _question

NAME = "2.0.0.127.bl.test"


def reply(*rrsets: str, rcode: int = 0, qtype: str = "A") -> tuple[bytes, int, int]:
    q = dns.message.make_query(NAME, qtype)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for text in rrsets:
        r.answer.append(dns.rrset.from_text(*text.split(" ", 4)))
    question = _question(NAME, qtype)
    assert question is not None and question.lower() == q.to_wire()[12:].lower()
    return r.to_wire(), 12 + len(question), int.from_bytes(question[-4:-2], "big")


CASES = [
    (f"{NAME}. 60 IN A 127.0.0.2",),
    (f"{NAME}. 60 IN A 127.0.0.2", f"{NAME}. 30 IN A 127.0.0.4"),
    (),
    (f"{NAME}. 3600 IN TXT \"listed\" \"see x\"",),
]


def test_lean_reads_what_dnspython_reads() -> None:
    for rrsets in CASES:
        qtype = "TXT" if rrsets and " TXT " in rrsets[0] else "A"
        wire, qend, qcode = reply(*rrsets, qtype=qtype)
        lean = _lean(wire, qend, qcode)
        assert lean is not _SLOW and lean is not None
        full = _parse(wire)
        assert full is not None
        assert (sorted(lean.records), lean.rcode, lean.ttl) == \
            (sorted(full.records), full.rcode, full.ttl), rrsets
    nx, qend, qcode = reply(rcode=3)
    assert _lean(nx, qend, qcode).rcode == 3  # type: ignore[union-attr]


def test_cnames_and_other_owners_go_to_dnspython() -> None:
    wire, qend, qcode = reply(f"{NAME}. 60 IN CNAME other.test.", "other.test. 60 IN A 127.0.0.2")
    assert _lean(wire, qend, qcode) is _SLOW
    assert _parse(wire) is not None


def test_names_the_lean_writer_leaves_to_dnspython() -> None:
    assert _question("bücher.test", "A") is None
    assert _question("a" * 64 + ".test", "A") is None
    assert _question("a..test", "A") is None
    assert _question("x.test", "SRV") is None
    assert _question("x.test.", "a") == _question("x.test", "A")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.integers(12, 80), st.sampled_from([1, 16, 28, 12]))
def test_any_bytes_never_raise(data: bytes, qend: int, qcode: int) -> None:
    result = _lean(data, qend, qcode)
    assert result is None or result is _SLOW or result.rcode >= 0
    _parse(data)
