"""The evidence record of an envelope (WireEvidence) and its one codec; ingress.core.wire, which
re-exports everything here, describes the envelope it travels in.

API:
    WireEvidence(...)                  frozen; one typed field per fact an acceptor, worker or
                                       relay proved (the field comments say who sets it)
    WireEvidence.to_wire() -> dict     the JSON object: only the fields that differ from their
                                       defaults (an envelope stays small); a tuple as a list, an
                                       AuthResult as its value, a bool as true
    WireEvidence.from_wire(doc)        decode (missing or null: no evidence), or WireError
    WireEvidence.with_facts(facts)     the record with the evidence checks' (field, text)
                                       facts set, each read as its field's type
    evidence_field(doc, name)          one field of an undecoded evidence object, by the same
                                       decoder (the broker's partial decode, wire.head)
    AuthResult, WireError              the result vocabulary; the wire's one error

A new fact is ONE line in WireEvidence: the codec is derived from the fields, by type: str,
bool, float, tuple[str, ...] or AuthResult | None (any other type fails at import).

Decoding (the input may be a spool file or a hostile peer process): unknown keys are ignored;
the spellings written before the record was typed are coerced (a bool "1"/"0"/"", a tuple as
one string "a,b" or "a b": reasons and dkim_pass were such strings), so an old spool file
decodes; anything else is WireError, never another exception: a value of the wrong type (a
number for a string, a string for a number), an AuthResult that is not one, a non-finite
number, a string over EVIDENCE_STR_MAX characters, a list over EVIDENCE_ITEMS_MAX items or an
item over EVIDENCE_ITEM_MAX characters. Nothing is truncated: our own processes never write
such values, so one that does is not ours. The values are not checked further (a token's
spelling, a domain's syntax): their readers judge them as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any, get_type_hints

__all__ = ["EVIDENCE_ITEMS_MAX", "EVIDENCE_ITEM_MAX", "EVIDENCE_STR_MAX", "AuthResult",
           "WireError", "WireEvidence", "evidence_field"]


class AuthResult(StrEnum):
    """SPF / DKIM result, spelled as in RFC 7208 and RFC 8601 (the envelope's evidence carries
    SPF results; workers report DKIM results in the same vocabulary)."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class WireError(ValueError):
    """A malformed message: wrong version, kind, frame count or JSON, or bad evidence."""


EVIDENCE_STR_MAX = 8192      # characters of one evidence string (a Received-SPF line fits)
EVIDENCE_ITEM_MAX = 512      # characters of one item of an evidence list (a domain, a token)
EVIDENCE_ITEMS_MAX = 64      # items of one evidence list


@dataclass(frozen=True)
class WireEvidence:
    """What the ingress proved about a message, as it travels (the codec: module docstring).
    A new fact is one line: its type str, bool, float, tuple[str, ...] or AuthResult | None."""

    reasons: tuple[str, ...] = ()        # acceptor: the lane decision's reason tokens
    cert: str = ""                       # acceptor: the client certificate's CertResult value
    identity: str = ""                   # acceptor, fast lane: the share key (DRR, shares)
    learned: str = ""                    # acceptor: the network was learned for this domain
    spf: AuthResult | None = None        # acceptor: the SPF result (None: not evaluated)
    spf_domain: str = ""                 # acceptor: the MAIL FROM domain SPF was for ("": HELO)
    received_spf: str = ""               # acceptor: its Received-SPF line, CRLF-ended
    retry: bool = False                  # acceptor: a claimed retry of a deferred transaction
    dkim_pass: tuple[str, ...] = ()      # worker: canonical d= of every DKIM pass
    dsn_for: str = ""                    # relay: a DSN for this qid
    dnswl: str = ""                      # the DNS allow-list zone that listed the client
    dnswl_ip: str = ""                   # acceptor: its answer (RFC 8904 policy.ip)
    dnswl_txt: str = ""                  # acceptor: its TXT for the client (policy.txt)
    iprev: str = ""                      # RFC 8601 iprev: pass|fail|temperror|permerror
    iprev_name: str = ""                 # the verified PTR name
    provider: str = ""                   # the provider identity: a verified PTR's org domain
    dnsbl_score: float = 0.0             # the DNSBL score (summed weights)
    dnsbl_zones: tuple[str, ...] = ()    # the listing zones, mapped for display
    dmarc: str = ""                      # pass|fail|none|temperror|permerror
    dmarc_policy: str = ""               # the From: domain's DMARC policy

    def to_wire(self) -> dict[str, object]:
        """The JSON object: the fields that differ from their defaults."""
        return {name: enc(v) for name, default, enc, _ in _EVIDENCE_CODEC
                if (v := getattr(self, name)) != default}

    def with_facts(self, facts: Iterable[tuple[str, str]]) -> WireEvidence:
        """This record with the evidence checks' facts (ingress.policy.checks: (field, text)
        pairs) set: each text read as its field's type (a number, a comma-separated list, a
        result); a field already set, one that is not ours, or a text that does not read as
        its type is left as it is (the first fact of a field wins, as in the checks' fold)."""
        kw: dict[str, Any] = {}
        for name, text in facts:
            dec = _EVIDENCE_DECODE.get(name)
            if dec is None or name in kw or getattr(self, name) != _EVIDENCE_DEFAULT[name]:
                continue
            try:
                kw[name] = dec(name, _from_text(_hints[name], text))
            except (WireError, ValueError):
                continue
        return replace(self, **kw) if kw else self

    @classmethod
    def from_wire(cls, doc: object) -> WireEvidence:
        """Decode (validated; unknown keys ignored; missing or null: no evidence), or WireError."""
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise WireError(f"evidence is a {type(doc).__name__}")
        if len(doc) > len(_EVIDENCE_DECODE):          # mostly unknown keys: look up ours only
            doc = {k: doc[k] for k in _EVIDENCE_DECODE if k in doc}
        kw: dict[str, Any] = {k: dec(k, v) for k, v in doc.items()
                              if (dec := _EVIDENCE_DECODE.get(k)) is not None}
        return cls(**kw)


def _ev_str(name: str, v: object) -> str:
    if not isinstance(v, str) or len(v) > EVIDENCE_STR_MAX:
        raise WireError(f"evidence {name}: not a string of at most {EVIDENCE_STR_MAX}")
    return v


def _ev_bool(name: str, v: object) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("1", "0", ""):              # the spelling before the record was typed ("retry")
        return v == "1"
    raise WireError(f"evidence {name}: not a boolean")


def _ev_float(name: str, v: object) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    raise WireError(f"evidence {name}: not a finite number")


def _ev_tuple(name: str, v: object) -> tuple[str, ...]:
    if isinstance(v, str):               # the spelling before the record was typed: "a,b", "a b"
        v = [i for i in re.split(r"[,\s]+", _ev_str(name, v)) if i]
    if not isinstance(v, list) or len(v) > EVIDENCE_ITEMS_MAX or not all(
            isinstance(i, str) and len(i) <= EVIDENCE_ITEM_MAX for i in v):
        raise WireError(f"evidence {name}: not a list of at most {EVIDENCE_ITEMS_MAX} strings "
                        f"of at most {EVIDENCE_ITEM_MAX}")
    return tuple(v)


def _ev_auth(name: str, v: object) -> AuthResult | None:
    if v is None or v == "":
        return None
    try:
        return AuthResult(_ev_str(name, v))
    except ValueError:
        raise WireError(f"evidence {name}: not an AuthResult") from None


def _from_text(kind: object, text: str) -> object:
    """A fact's text as the JSON value its field's decoder reads (with_facts)."""
    if kind is float:
        return float(text)
    if kind is bool:
        return text in ("1", "true")
    return text          # str, AuthResult | None, tuple[str, ...] ("a,b": the decoder splits)


def _same(v: object) -> object:
    return v


def _plain(v: object) -> object:         # a tuple as a JSON list, an AuthResult as its value
    return list(v) if isinstance(v, tuple) else v.value if isinstance(v, AuthResult) else v


_Codec = tuple[Callable[[object], object], Callable[[str, object], object]]
_EVIDENCE_TYPES: dict[object, _Codec] = {
    str: (_same, _ev_str), bool: (_same, _ev_bool), float: (_same, _ev_float),
    tuple[str, ...]: (_plain, _ev_tuple), AuthResult | None: (_plain, _ev_auth),
}
_hints = get_type_hints(WireEvidence)
# (name, default, encode, decode) per field; a field of any other type fails here, at import
_EVIDENCE_CODEC = tuple((f.name, f.default, *_EVIDENCE_TYPES[_hints[f.name]])
                        for f in fields(WireEvidence))
_EVIDENCE_DECODE = {name: dec for name, _, _, dec in _EVIDENCE_CODEC}
_EVIDENCE_DEFAULT = {name: default for name, default, _, _ in _EVIDENCE_CODEC}


def evidence_field(doc: object, name: str) -> Any:
    """Field `name` of an undecoded evidence object (its default when absent), or WireError."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise WireError(f"evidence is a {type(doc).__name__}")
    return _EVIDENCE_DECODE[name](name, doc[name]) if name in doc else _EVIDENCE_DEFAULT[name]
