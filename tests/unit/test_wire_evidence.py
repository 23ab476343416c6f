"""The envelope's evidence record (ingress.core.wire_evidence.WireEvidence) and its one codec:
round trip, defaults omitted, unknown keys ignored, the spellings of the untyped dict (an old
spool file) read, and what a hostile peer or a corrupt spool file sends: WireError, never
another exception, never unbounded data."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from ingress.core.wire import (
    AuthResult,
    Envelope,
    Lane,
    WireError,
    WireEvidence,
    head,
)
from ingress.core.wire_evidence import (
    EVIDENCE_ITEM_MAX,
    EVIDENCE_ITEMS_MAX,
    EVIDENCE_STR_MAX,
    evidence_field,
)

FULL = WireEvidence(
    reasons=("spf-pass:a.test", "over-share:org:a.test"), cert="verified", identity="org:a.test",
    learned="a.test", spf=AuthResult.SOFTFAIL, spf_domain="a.test",
    received_spf="Received-SPF: softfail (x) receiver=mx;\r\n", retry=True,
    dkim_pass=("a.test", "b.test"), dsn_for="Q1", dnswl="list.dnswl.test",
    dnswl_ip="127.0.10.2", dnswl_txt="https://list.dnswl.test/x", iprev="pass",
    iprev_name="mail.a.test", provider="a.test", dnsbl_score=-1.5, dnsbl_zones=("zen", "b"),
    dmarc="pass", dmarc_policy="reject")

ROUND_TRIPS = [
    WireEvidence(),
    FULL,
    WireEvidence(spf=AuthResult.PASS),
    WireEvidence(dnsbl_score=3.0),
    WireEvidence(retry=True, reasons=("retry",)),
]


@pytest.mark.parametrize("ev", ROUND_TRIPS)
def test_round_trip(ev: WireEvidence) -> None:
    assert WireEvidence.from_wire(ev.to_wire()) == ev
    assert WireEvidence.from_wire(orjson.loads(orjson.dumps(ev.to_wire()))) == ev
    env = Envelope(qid="Q", lane=Lane.BULK, peer_ip="192.0.2.1", peer_port=1, helo="h",
                   mail_from="", rcpts=("r@x.test",), received_at=1.0, deadline=2.0, evidence=ev)
    assert Envelope.decode(env.encode()) == env
    h = head(env.encode())
    assert (h.qid, h.deadline, h.peer_ip, h.identity, h.retry) == (
        "Q", 2.0, "192.0.2.1", ev.identity, ev.retry)


def test_every_field_is_on_the_wire() -> None:
    """FULL sets every field (so a new field must be added there: its round trip is tested)."""
    assert set(FULL.to_wire()) == {f.name for f in dataclasses.fields(WireEvidence)}


@pytest.mark.parametrize(("ev", "wire"), [
    (WireEvidence(), {}),                                       # defaults omitted: small bytes
    (WireEvidence(spf=AuthResult.PASS), {"spf": "pass"}),
    (WireEvidence(reasons=("a", "b")), {"reasons": ["a", "b"]}),
    (WireEvidence(retry=True), {"retry": True}),
    (WireEvidence(retry=False, dnsbl_score=0.0, dkim_pass=()), {}),
    (WireEvidence(dnsbl_score=2), {"dnsbl_score": 2}),
])
def test_encoding(ev: WireEvidence, wire: dict[str, object]) -> None:
    assert ev.to_wire() == wire
    assert orjson.dumps(ev.to_wire()) == orjson.dumps(wire)


# the dict the code wrote before the record was typed (smtp.trace_evidence, handler's retry,
# pipeline's dkim_pass, the relay's DSN envelope): every spelling decodes
OLD_SPOOL_ENVELOPE = (
    b'{"v":1,"qid":"0190A1B2C3D00001234A0001","lane":"fast","peer_ip":"192.0.2.7",'
    b'"peer_port":40001,"helo":"mail.sender.test","mail_from":"a@sender.test",'
    b'"rcpts":["b@example.test"],"received_at":1700000000.25,"deadline":1700000030.25,'
    b'"acceptor":"a0-1","smtputf8":false,"tls":"TLSv1.3","evidence":{'
    b'"reasons":"spf-pass:sender.test,over-share:org:sender.test","cert":"none",'
    b'"identity":"org:sender.test","learned":"sender.test","spf":"pass",'
    b'"spf_domain":"sender.test","received_spf":"Received-SPF: pass (x)\\r\\n","retry":"1",'
    b'"dkim_pass":"sender.test lists.test"}}')


def test_old_spool_envelope_decodes() -> None:
    env = Envelope.decode(OLD_SPOOL_ENVELOPE)
    assert env.evidence == WireEvidence(
        reasons=("spf-pass:sender.test", "over-share:org:sender.test"), cert="none",
        identity="org:sender.test", learned="sender.test", spf=AuthResult.PASS,
        spf_domain="sender.test", received_spf="Received-SPF: pass (x)\r\n", retry=True,
        dkim_pass=("sender.test", "lists.test"))
    assert head(OLD_SPOOL_ENVELOPE).retry is True
    for old, want in [({"dkim_pass": ""}, WireEvidence()), ({"reasons": ""}, WireEvidence()),
                      ({"retry": "0"}, WireEvidence()), ({"dsn_for": "Q"},
                                                         WireEvidence(dsn_for="Q"))]:
        assert WireEvidence.from_wire(old) == want


@pytest.mark.parametrize(("doc", "want"), [
    (None, WireEvidence()),                                      # no evidence key at all
    ({}, WireEvidence()),
    ({"future_check": "x", "spf": "none", "v": [1, 2]}, WireEvidence(spf=AuthResult.NONE)),
    ({"spf": ""}, WireEvidence()),                               # "" = not evaluated
    ({"retry": False}, WireEvidence()),
    ({"dnsbl_score": 4}, WireEvidence(dnsbl_score=4.0)),         # an int is a number
    ({"reasons": "a, b,,c"}, WireEvidence(reasons=("a", "b", "c"))),
    ({"dnsbl_zones": ["x"] * EVIDENCE_ITEMS_MAX},
     WireEvidence(dnsbl_zones=("x",) * EVIDENCE_ITEMS_MAX)),     # at the bound
    ({"received_spf": "r" * EVIDENCE_STR_MAX}, WireEvidence(received_spf="r" * EVIDENCE_STR_MAX)),
])
def test_decoded_or_coerced(doc: object, want: WireEvidence) -> None:
    assert WireEvidence.from_wire(doc) == want


@pytest.mark.parametrize("doc", [
    [], "spf=pass", 7, True,                                     # not an object
    {"spf": "PASS"}, {"spf": "passed"}, {"spf": 1}, {"spf": ["pass"]},
    {"identity": 7}, {"identity": None}, {"identity": ["allow:x"]}, {"identity": {"a": 1}},
    {"retry": "yes"}, {"retry": 1}, {"retry": None},
    {"dnsbl_score": "3"}, {"dnsbl_score": True}, {"dnsbl_score": None},
    {"reasons": 7}, {"reasons": [1, 2]}, {"reasons": [["a"]]}, {"reasons": {"a": 1}},
    # oversize: bounded, never held
    {"received_spf": "r" * (EVIDENCE_STR_MAX + 1)},
    {"identity": "x" * 10_000_000},
    {"dnsbl_zones": ["x"] * (EVIDENCE_ITEMS_MAX + 1)},
    {"dkim_pass": ["d" * (EVIDENCE_ITEM_MAX + 1)]},
    {"dkim_pass": " ".join(f"d{i}.test" for i in range(EVIDENCE_ITEMS_MAX + 1))},
    {"reasons": "a," * (EVIDENCE_STR_MAX // 2 + 1)},
])
def test_malformed_is_wire_error(doc: object) -> None:
    with pytest.raises(WireError):
        WireEvidence.from_wire(doc)


@pytest.mark.parametrize("raw", [float("nan"), float("inf")])
def test_non_finite_number(raw: float) -> None:
    with pytest.raises(WireError):
        WireEvidence.from_wire({"dnsbl_score": raw})


@pytest.mark.parametrize("evidence", [
    b'[]', b'"garbage"', b'7', b'{"retry":"maybe"}', b'{"identity":7}', b'{"spf":"bogus"}',
    b'{"dkim_pass":"' + b"d " * (EVIDENCE_ITEMS_MAX + 1) + b'"}',
])
def test_envelope_with_bad_evidence_is_wire_error(evidence: bytes) -> None:
    raw = OLD_SPOOL_ENVELOPE.split(b',"evidence":')[0] + b',"evidence":' + evidence + b"}"
    with pytest.raises(WireError):
        Envelope.decode(raw)


@pytest.mark.parametrize("raw", [
    b"", b"[]", b'"x"', b"{}", b'{"qid":"q"}', b'{"qid":"q","deadline":"soon"}',
    b'{"qid":"q","deadline":1,"evidence":[]}', b'{"qid":"q","deadline":1,"evidence":7}',
    b'{"qid":"q","deadline":1,"evidence":{"identity":["x"]}}',
    b'{"qid":"q","deadline":1,"evidence":{"retry":2}}',
    b'{"qid":"q","deadline":1,"evidence":{"identity":"' + b"x" * (EVIDENCE_STR_MAX + 1) + b'"}}',
])
def test_head_of_a_bad_envelope_is_wire_error(raw: bytes) -> None:
    """The broker's partial decode: the same field decoders, the same one error."""
    with pytest.raises(WireError):
        head(raw)


def test_evidence_field_defaults() -> None:
    assert evidence_field(None, "identity") == ""
    assert evidence_field({}, "retry") is False
    assert evidence_field({"retry": "1"}, "retry") is True
    assert evidence_field({"dnsbl_zones": "a b"}, "dnsbl_zones") == ("a", "b")


def test_the_checks_facts_are_read_as_their_fields_types() -> None:
    ev = WireEvidence(identity="dnswl:wl.test").with_facts((
        ("dnswl", "wl.test"), ("dnswl_ip", "127.0.10.2"), ("dnsbl_score", "2.5"),
        ("dnsbl_zones", "bl.test,two.test"), ("identity", "org:x.test"), ("nonsense", "x"),
        ("dnswl", "other.test"), ("iprev", "pass"), ("retry", "1")))
    assert (ev.dnswl, ev.dnswl_ip, ev.dnsbl_score, ev.dnsbl_zones) == (
        "wl.test", "127.0.10.2", 2.5, ("bl.test", "two.test"))
    assert ev.identity == "dnswl:wl.test"            # set already: a fact does not replace it
    assert ev.retry is True and ev.iprev == "pass"
    bad = WireEvidence().with_facts((("dnsbl_score", "lots"), ("spf", "perhaps")))
    assert bad == WireEvidence()                    # unreadable facts are left out
    assert WireEvidence().with_facts(()) == WireEvidence()
