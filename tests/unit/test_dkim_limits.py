"""DKIM key limits checked before any RSA operation (workers.lane.dkim_parse.key_record_problem).

Issue 9 item 2: dkimpy accepts any key size and exponent; an 8192-bit modulus with an 8192-bit
exponent costs ~1.1 s of GIL-holding pow() per signature. RFC 8301 section 3.1: verifiers must
accept 1024..4096 bits and must not accept < 1024; we refuse > 4096 too, and exponents above
64 bits (OpenSSL's own limit for public operations on large moduli).

The key records are crafted numbers (tests/kit/dkimkeys.py): the check is about the sizes in the
TXT record, not about keys anyone can sign with.
"""

from __future__ import annotations

import base64
import random
from functools import partial

import pytest

from tests.kit.dkimkeys import modulus as _modulus
from tests.kit.dkimkeys import record, rsa_public_key, spki
from workers.lane import dkim_check, dkim_parse
from workers.lane.dkim_parse import (
    MAX_KEY_BITS,
    MIN_KEY_BITS,
    header_from_domain,
    key_record_problem,
)

modulus = partial(_modulus, rng=random.Random(9))


N2048 = modulus(2048)
N8192 = modulus(8192)


@pytest.mark.parametrize(("txt", "problem"), [
    # key sizes (RFC 8301: 1024..4096 must verify; < 1024 must not)
    (record(spki(modulus(512), 65537)), "key too small: 512 bits"),
    (record(spki(modulus(1023), 65537)), "key too small: 1023 bits"),
    (record(spki(modulus(1024), 65537)), None),
    (record(spki(N2048, 65537)), None),
    (record(spki(modulus(4096), 65537)), None),
    (record(spki(modulus(4097), 65537)), "key too large: 4097 bits"),
    (record(spki(N8192, 65537)), "key too large: 8192 bits"),
    (record(spki(N8192, N8192 - 2)), "key too large: 8192 bits"),
    (record(spki(modulus(16384), 65537)), "key too large"),
    (record(rsa_public_key(N8192, 65537)), "key too large: 8192 bits"),   # bare RSAPublicKey
    (record(rsa_public_key(modulus(512), 3)), "key too small: 512 bits"),
    # a DER blob far bigger than any allowed key is refused without being parsed
    (record(spki(modulus(400_000), 65537)), "key too large"),
    # public exponent: odd, 3 <= e < 2**64, e < n
    (record(spki(N2048, 3)), None),
    (record(spki(N2048, 17)), None),
    (record(spki(N2048, 2**64 - 1)), None),
    (record(spki(N2048, 2**64 + 1)), "bad public exponent"),
    (record(spki(N2048, N2048 - 2)), "bad public exponent"),
    (record(spki(N2048, 1)), "bad public exponent"),
    (record(spki(N2048, 65536)), "bad public exponent"),
    (record(spki(N2048, 0)), "bad public exponent"),
    # whitespace inside p= (a TXT record split over several strings, folded)
    (record(spki(N8192, 65537)).replace(b"p=", b"p= ").replace(b"A", b"A "), "key too large"),
    # not ours to judge: dkimpy reports these itself (revoked, garbage, other algorithms)
    (b"v=DKIM1; k=rsa; p=", None),
    (b"v=DKIM1; k=rsa; p=AAAA!!", None),
    (b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=", None),
    (b"v=DKIM1; k=rsa", None),
    (b"garbage without tags", None),
])
def test_key_record_problem(txt: bytes, problem: str | None) -> None:
    got = key_record_problem(txt)
    if problem is None:
        assert got is None
    else:
        assert got is not None and got.startswith(problem), got


def test_rsa_is_the_default_algorithm() -> None:
    """No k= tag means rsa (RFC 6376 3.6.1): the limits apply."""
    txt = b"v=DKIM1; p=" + base64.b64encode(spki(N8192, 65537))
    assert (key_record_problem(txt) or "").startswith("key too large")


def test_limits_follow_rfc_8301() -> None:
    assert (MIN_KEY_BITS, MAX_KEY_BITS) == (1024, 4096)
    assert key_record_problem(record(spki(N2048, 65537)), min_bits=4096) == \
        "key too small: 2048 bits (minimum 4096)"


# --------------------------------------------------------------------------- hostile From:

@pytest.mark.timeout(20)
@pytest.mark.parametrize("value", [
    b"(" * 100_000,                        # the stdlib parser recursed once per level
    b"(" * 5000 + b"a@x.test",
    b'"a' * 50_000,
    b"<" * 100_000,
    b"\\" * 100_000,
    b'("<\\' * 25_000,
    b"a@b.test, " * 20_000,
    b"x" * 1_000_000 + b"@x.test",
])
def test_hostile_from_is_no_domain_not_an_exception(value: bytes) -> None:
    """No From: domain can be found in these; the answer is None (no alignment), never an
    exception (it failed the whole message: 451 on every retry)."""
    msg = b"From: " + value + b"\r\nSubject: s\r\n\r\nbody\r\n"
    assert header_from_domain(msg) is None


def test_ordinary_from_still_parses() -> None:
    msg = b'From: "Doe (J)" <j@Example.TEST> (comment (nested))\r\n\r\nbody\r\n'
    assert header_from_domain(msg) == "example.test"


# --------------------------------------------------------------------------- header parsing

PARSE_CASES = [
    b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\n",
    b"From: a@x.test\nSubject: s\n\nbody\n",
    b"Subject: folded\r\n\tline two\r\n  line three\r\nTo: b@x.test\r\n\r\nbody",
    b"From x@y Mon Jan  1 00:00:00 2024\r\nSubject: s\r\n\r\n",      # mbox line, skipped
    b"Subject: s\r\nFrom x@y\r\n continued after the mbox line\r\n\r\nb",
    b"Subject: s\r\n",                                                 # no body
    b"A:\r\nB: \r\n\r\n\r\n\r\nbody\r\n\r\n",
    b"Subject: s\r\n\r\nbody\r\n\r\nFrom: not a header\r\n",
    b"X-Empty-Name-Value:x\r\n\r\n",
]


@pytest.mark.parametrize("msg", PARSE_CASES)
def test_header_parse_matches_dkimpy(msg: bytes) -> None:
    """The linear parser gives dkimpy exactly what its own rfc822_parse would."""
    import dkim

    assert dkim_parse._rfc822_parse(msg) == dkim.rfc822_parse(msg)


@pytest.mark.parametrize("msg", [b" leading continuation\r\n\r\n", b"bad header line\r\n\r\n"])
def test_header_parse_errors(msg: bytes) -> None:
    import dkim

    with pytest.raises(dkim.MessageFormatError):
        dkim_parse._rfc822_parse(msg)


@pytest.mark.timeout(20)
def test_a_field_folded_a_million_times_is_parsed_linearly() -> None:
    """dkimpy appends each continuation line to the field's bytes (quadratic: 100,000 lines
    took 1 s, a million ~2 minutes, in the worker, per delivery attempt). A hang guard, not a
    speed target."""
    sig = b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AAAA; b=AAAA\r\n"
    msg = sig + b"From: a@x.test\r\nX-Fold: a\r\n" + b" x\r\n" * 1_000_000 + b"\r\nbody\r\n"
    resolver = dkim_check.make_resolver(["127.0.0.1@9"], timeout=0.1)
    (r,) = dkim_check.verify_dkim(msg, resolver=resolver, timeout=0.1, deadline_s=0.5).results
    assert r.result in (dkim_check.DkimResult.FAIL, dkim_check.DkimResult.TEMPERROR,
                        dkim_check.DkimResult.PERMERROR)
    headers, body = dkim_parse._rfc822_parse(msg)
    assert len(headers) == 3 and headers[2][1].count(b"\r\n") == 1_000_001
    assert body == b"body\r\n"


# --------------------------------------------------------------------------- canonicalisation

def _dkimpy_strip_trailing_whitespace(content: bytes) -> bytes:
    """dkimpy 1.1.8's own (dkim/canonicalization.py), the reference for the replacement."""
    import re

    return re.sub(b"[\t ]+\r\n", b"\r\n", content)


@pytest.mark.parametrize("body", [
    b"", b"\r\n", b"a \r\n", b"a\t \t\r\n", b" \r\n \r\n", b"a  b  \r\nc\r\n", b"a \r\r\n",
    b"a \n", b"  x", b"a   ", b"\t\r\n\t", b"x \r\n\r\n \r\n",
])
def test_trailing_whitespace_matches_dkimpy(body: bytes) -> None:
    import dkim.canonicalization

    assert dkim.canonicalization.strip_trailing_whitespace is \
        dkim_parse._strip_trailing_whitespace      # installed by importing dkim_parse
    assert dkim_parse._strip_trailing_whitespace(body) == _dkimpy_strip_trailing_whitespace(body)


def test_trailing_whitespace_matches_dkimpy_on_random_input() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        body = bytes(rng.choice(b" \t\r\nab") for _ in range(rng.randrange(40)))
        assert dkim_parse._strip_trailing_whitespace(body) == \
            _dkimpy_strip_trailing_whitespace(body), body
