"""Deferral record facts on the wire (ingress.core.wire share_record / decode_record)."""

from __future__ import annotations

import orjson
import pytest

from ingress.core.wire import (
    CLAIM_TOPIC,
    DEFER_TOPIC,
    RECORD_MAX,
    VERSION,
    WireError,
    decode_record,
    expect,
    kind_of,
    share_record,
    shared_publication,
)

DOC = {"k": "192.0.2.0/24|a@b", "f": 1.0, "t": 2.0, "r": ["x@y"], "o": "a0-1"}


@pytest.mark.parametrize("fact", [DEFER_TOPIC, CLAIM_TOPIC])
def test_round_trip_through_the_broker(fact: bytes) -> None:
    frames = share_record(fact, DOC)
    kind_of(frames)
    pub = shared_publication(frames)   # what the broker publishes
    assert pub[0] == fact and pub[1] == VERSION
    assert decode_record(pub) == (fact, DOC)
    assert expect(frames, 2)[0] == fact


@pytest.mark.parametrize("frames", [
    [DEFER_TOPIC, VERSION, b"not json"],
    [DEFER_TOPIC, VERSION, b"[1]"],
    [DEFER_TOPIC, VERSION, orjson.dumps({"k": 1, "o": "a"})],
    [DEFER_TOPIC, VERSION, orjson.dumps({"k": "x"})],                       # no origin
    [DEFER_TOPIC, VERSION, orjson.dumps({"k": "x", "o": "a", "t": "now"})],
    [DEFER_TOPIC, VERSION, orjson.dumps({"k": "x", "o": "a", "r": [1]})],
    [DEFER_TOPIC, VERSION, orjson.dumps({"k": "x", "o": "a", "n": "many"})],   # sheds
    [DEFER_TOPIC, VERSION, orjson.dumps({"k": "x", "o": "a", "h": [1]})],      # hammered
    [CLAIM_TOPIC, VERSION, orjson.dumps({"k": "x", "o": "a", "b": "yes"})],    # a bypass
    [DEFER_TOPIC, b"SI0", orjson.dumps(DOC)],
    [b"learn", VERSION, orjson.dumps(DOC)],
    [CLAIM_TOPIC, VERSION, orjson.dumps({**DOC, "k": "x" * RECORD_MAX})],   # too big
])
def test_malformed_publications_raise(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        decode_record(frames)


@pytest.mark.parametrize("fact,doc", [
    (DEFER_TOPIC, {**DOC, "n": 12, "h": 1}),       # sheds it stands for, made while hammering
    (CLAIM_TOPIC, {"k": DOC["k"], "t": 2.0, "o": "a0-1", "b": 1}),   # a bypass
])
def test_the_earned_evidence_fields_round_trip(fact: bytes, doc: dict) -> None:
    assert decode_record(shared_publication(share_record(fact, doc))) == (fact, doc)


def test_broker_refuses_an_oversized_record() -> None:
    with pytest.raises(WireError):
        shared_publication(share_record(DEFER_TOPIC, {**DOC, "k": "x" * RECORD_MAX}))
