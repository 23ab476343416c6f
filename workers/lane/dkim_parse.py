"""DKIM input parsed within bounds, for workers.lane.dkim_check (dkimpy 1.1.8).

Purpose
    Everything dkimpy is handed, judged or parsed first so that no message or key record can
    make it quadratic or hold the GIL for long: the sizes of a key record (before any RSA),
    the size and blank runs of a signature field (before dkimpy's regexes), the header
    section in linear time, relaxed body canonicalisation in linear time, and the From:
    domain that alignment is judged against.

API
    MIN_KEY_BITS, MAX_KEY_BITS, MAX_EXPONENT_BITS, MAX_KEY_DER, MAX_SIGNATURES, MAX_HEADER_WORK,
    MAX_SIGNATURE_FIELD, MAX_SIGNATURE_WSP_RUN, MAX_FROM_FIELD   the bounds (see their comments)
    key_record_problem(txt, *, min_bits=1024, max_bits=4096) -> str | None
        why an RSA key record must not be used (size, exponent), judged before any RSA.
    header_from_domain(message) -> str | None     (exactly one From: with one address, the
                                                   field at most MAX_FROM_FIELD bytes; its
                                                   domain canonical, None if not a valid name)
    header_from_domains(message) -> (fields, domains)   the From: fields counted and the
                                                   domains of the one field's addresses
                                                   (DMARC's Author Domain: ingress.policy.dmarc)
    signature_field_problem(raw) -> str | None    why a DKIM-Signature value is refused unparsed
    LinearDKIM(message, ...)                      dkim.DKIM with the linear header parser
    sig_tag(sig, key) -> str                      a parsed signature's tag, blanks removed
    count_signatures(message) -> int              DKIM-Signature fields in the header section

dkimpy traps handled here
    dkimpy's header parser (rfc822_parse) is quadratic in the continuation lines of a field:
    LinearDKIM uses _rfc822_parse, the same rules in linear time (tests compare the two).
    Its header selection is quadratic in h= names x fields: bounded by MAX_HEADER_WORK (checked
    by dkim_check before the key lookup). Its b= removal and h= split regexes backtrack
    quadratically over whitespace: signature headers over 16 KiB or with a blank run over 256
    bytes are a permerror, before dkimpy parses them. Its relaxed body canonicalisation is
    quadratic in a run of blanks not followed by CRLF: importing this module replaces
    dkim.canonicalization.strip_trailing_whitespace with a linear regex that makes the same
    replacements (tests compare the two).

Failure modes
    Nothing here raises for message content except _rfc822_parse (dkim.MessageFormatError, as
    dkimpy's own), which LinearDKIM's caller catches; key_record_problem leaves a record it
    cannot parse to dkimpy (None), which reports it itself.

Limits
    Every function is linear in its input. An RSA key over MAX_KEY_DER bytes of DER is refused
    unparsed; a From: field over MAX_FROM_FIELD bytes has no domain.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
from typing import Any

import dkim
import dkim.canonicalization
import dkim.crypto
import dkim.util

from ingress.core.addr import normalize_domain
from ingress.core.fields import field_value, header_fields, unfold

__all__ = [
    "MAX_EXPONENT_BITS",
    "MAX_FROM_FIELD",
    "MAX_HEADER_WORK",
    "MAX_KEY_BITS",
    "MAX_KEY_DER",
    "MAX_SIGNATURES",
    "MAX_SIGNATURE_FIELD",
    "MAX_SIGNATURE_WSP_RUN",
    "MIN_KEY_BITS",
    "LinearDKIM",
    "count_signatures",
    "header_from_domain",
    "header_from_domains",
    "key_record_problem",
    "sig_tag",
    "signature_field_problem",
]

# CPU bounds, checked before dkimpy does any RSA operation (its pow() holds the GIL: an
# 8192-bit modulus with an 8192-bit exponent took ~1.1 s per signature, and the worker's
# heartbeats stopped). RFC 8301 3.1: verifiers must validate 1024..4096-bit keys and must not
# accept smaller ones; larger ones are allowed to be refused, and are. The exponent: RFC 8017
# requires 3 <= e < n, odd; real DKIM keys use 65537 (a few old ones 3); OpenSSL refuses
# exponents over 64 bits for moduli over 3072 bits (OPENSSL_RSA_MAX_PUBEXP_BITS), so nothing
# real is lost by the same rule here, and a verify costs at most ~2x the 65537 case.
MIN_KEY_BITS = 1024
MAX_KEY_BITS = 4096
MAX_EXPONENT_BITS = 64
# A DER key longer than this is refused without parsing (dkimpy's ASN.1 integer decoding is
# quadratic in the length; a TCP TXT answer can carry ~64 KiB). A 4096-bit SPKI is ~550 bytes;
# up to 4 KiB (16384 bits) a refused key is still parsed, so the reason names its size.
MAX_KEY_DER = 4096
MAX_SIGNATURES = 5           # signatures evaluated per message; later ones are "neutral"
# dkimpy finds each h= name by scanning the header fields backwards (dkim.select_headers):
# distinct names x fields steps, ~50 ns each. Real signatures: ~20 names x ~100 fields. A
# signature over this bound is a permerror, decided before the key is fetched.
MAX_HEADER_WORK = 1_000_000
# dkimpy removes b= from the signature header with a regex (RE_BTAG), and splits h= with
# another (\s*:\s*), that backtrack quadratically over whitespace. Real signature headers
# are a few KiB (a 4096-bit b= is 684 characters) with folds of a few blanks; longer ones, or
# longer blank runs, are a permerror before dkimpy parses them.
MAX_SIGNATURE_FIELD = 16 * 1024
MAX_SIGNATURE_WSP_RUN = 256
_WSP_RUN = re.compile(rb"\s{%d}" % (MAX_SIGNATURE_WSP_RUN + 1))



def key_record_problem(txt: bytes, *, min_bits: int = MIN_KEY_BITS,
                       max_bits: int = MAX_KEY_BITS) -> str | None:
    """Why the RSA key in DKIM key record `txt` must not be used, or None.

    Only sizes are judged here (modulus bits, exponent range, DER length), before any RSA
    operation; a record that is not an RSA key we can parse (revoked p=, garbage, ed25519,
    unknown k=) is left to dkimpy, which reports it itself. Linear in len(txt)."""
    try:
        tags = dkim.util.parse_tag_value(txt)
    except Exception:  # InvalidTagValueList and friends: dkimpy says "bad key record"
        return None
    if tags.get(b"k", b"rsa").strip() != b"rsa" or not tags.get(b"p"):
        return None
    try:
        der = base64.b64decode(re.sub(rb"\s+", b"", tags[b"p"]))
    except (binascii.Error, ValueError):
        return None
    if len(der) > MAX_KEY_DER:
        return f"key too large: {len(der)} bytes (limit {max_bits} bits)"
    try:
        pk = dkim.crypto.parse_public_key(der)
        n, e = int(pk["modulus"]), int(pk["publicExponent"])
    except Exception:  # UnparsableKeyError, or a template mismatch
        return None
    bits = n.bit_length()
    if bits < min_bits:
        return f"key too small: {bits} bits (minimum {min_bits})"
    if bits > max_bits:
        return f"key too large: {bits} bits (limit {max_bits})"
    if not (3 <= e < n and e % 2 == 1 and e.bit_length() <= MAX_EXPONENT_BITS):
        return f"bad public exponent ({e.bit_length()} bits; odd, 3..2^{MAX_EXPONENT_BITS})"
    return None


# A From: field longer than this has no usable domain (one address is well under 1 KiB; a
# From: with several addresses has none anyway): it is not parsed.
MAX_FROM_FIELD = 8 * 1024


def header_from_domains(message: bytes) -> tuple[int, tuple[str, ...]]:
    """(the number of From: fields, the domains of the addresses of the From: field when
    there is exactly one), each domain canonical or "" when it is not a valid name
    (ingress.core.addr.normalize_domain). A field over MAX_FROM_FIELD bytes, or one the
    parser gives up on, has no addresses."""
    froms = [message[s:e] for s, e, name in header_fields(message) if name == b"from"]
    if len(froms) != 1 or len(froms[0]) > MAX_FROM_FIELD:
        return len(froms), ()
    try:
        pairs = email.utils.getaddresses([unfold(field_value(froms[0]))])
    except (RecursionError, ValueError, IndexError):
        # the stdlib parser recurses once per nested comment: hostile input, no domain
        return 1, ()
    return 1, tuple(normalize_domain(a.rpartition("@")[2]) if "@" in a else ""
                    for _, a in pairs if a)


def header_from_domain(message: bytes) -> str | None:
    """Canonical domain of the single From: address (ingress.core.addr.normalize_domain);
    None if absent, ambiguous or not a valid domain name."""
    fields, domains = header_from_domains(message)
    if fields != 1 or len(domains) != 1:
        return None
    return domains[0] or None


_LINE_END = re.compile(rb"\r?\n")
_DKIMPY_FIELD = re.compile(rb"([\x21-\x7e]+?):")


def _rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkim.rfc822_parse's result, in linear time.

    dkimpy appends every continuation line to its field's bytes (quadratic in the lines of one
    field: a header folded 100,000 times cost 1 s). Same rules, same output: lines split at
    CRLF or LF, an empty line ends the header section, a line starting with SP or HT continues
    the field, an mbox "From " line is skipped, anything else raises MessageFormatError."""
    headers: list[list[Any]] = []
    lines = _LINE_END.split(message)
    parts: list[bytes] | None = None
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line:
            i += 1
            break
        if line[0] in (0x09, 0x20):
            if parts is None:
                raise dkim.MessageFormatError("continuation line before any header field")
            parts.append(line)
            parts.append(b"\r\n")
        else:
            m = _DKIMPY_FIELD.match(line)
            if m is not None:
                parts = [line[m.end(0):], b"\r\n"]
                headers.append([m.group(1), parts])
            elif not line.startswith(b"From "):
                raise dkim.MessageFormatError(
                    f"Unexpected characters in RFC822 header: {line[:80]!r}")
        i += 1
    for h in headers:
        h[1] = b"".join(h[1])
    return headers, b"\r\n".join(lines[i:])


# dkimpy's relaxed body canonicalisation strips blanks before CRLF with re.sub(b"[\t ]+\r\n"),
# which retries from every blank of a run that is not followed by CRLF: quadratic in the run,
# in one GIL-holding call (8 MiB of 996-blank lines: ~11 s, and the worker was killed). The
# lookbehind makes only the first blank of a run a match start: the same matches, linear.
_TRAILING_WSP = re.compile(rb"(?<![\t ])[\t ]+\r\n")


def _strip_trailing_whitespace(content: bytes) -> bytes:
    return _TRAILING_WSP.sub(b"\r\n", content)


dkim.canonicalization.strip_trailing_whitespace = _strip_trailing_whitespace


class LinearDKIM(dkim.DKIM):
    """dkim.DKIM with the linear header parser (see _rfc822_parse); nothing else differs."""

    def set_message(self, message: bytes) -> None:
        super().set_message(b"")          # resets the per-message state, parses nothing
        if message:
            self.headers, self.body = _rfc822_parse(message)


def sig_tag(sig: dict, key: bytes) -> str:
    v = sig.get(key, b"")
    return re.sub(r"\s+", "", v.decode("ascii", "replace")) if isinstance(v, bytes) else ""


def count_signatures(message: bytes) -> int:
    return sum(1 for _, _, name in header_fields(message) if name == b"dkim-signature")


def signature_field_problem(raw: bytes) -> str | None:
    """Why a DKIM-Signature field value is refused unparsed (size, blank runs), or None."""
    if len(raw) > MAX_SIGNATURE_FIELD:
        return f"signature header too long: {len(raw)} bytes (limit {MAX_SIGNATURE_FIELD})"
    if _WSP_RUN.search(raw):
        return f"signature header: whitespace run over {MAX_SIGNATURE_WSP_RUN} bytes"
    return None
