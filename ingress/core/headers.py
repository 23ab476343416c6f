"""Header-field text shared by the acceptor and the workers: the one sanitiser, Received-SPF.

Purpose
    Anything a client chose (HELO name, addresses, SPF explanations) must not be able to add a
    header line or break a structured field. Every trace header we write gets client text only
    through sanitise(), then through quoted_value() or comment_text() for structured parts.
    The Received-SPF field lives here because the acceptor renders it at MAIL time (where the
    SPF explanation is at hand) and the workers' header module uses the same sanitiser.

API
    sanitise(text, replacement=" ", *, printable=False) -> str
        control characters (or, with printable=True, anything but visible ASCII, space
        included) replaced by `replacement`; surrounding whitespace stripped.
    quoted_value(text, plain, replacement="") -> str
        sanitised text (control characters -> `replacement`) as is when `plain` (a compiled regex)
        matches it whole, else as an RFC 5322 quoted-string.
    comment_text(text) -> str       sanitised text with ( ) and backslash escaped
    spf_identity(mail_from, helo) -> (identity, domain)   "mailfrom"/"helo" and its domain,
                                    canonical (ingress.core.addr.normalize_domain; "" invalid)
    spf_request(mail_from, helo) -> (domain, sender, helo) | None   what SPF is evaluated for,
                                    canonical; None: not a valid domain (no lookup: none)
    received_spf_header(result, *, client_ip, mail_from, helo, receiver, explanation=None)
        -> bytes  (RFC 7208 section 9.1, CRLF-terminated, folded at 78 columns)

Failure modes
    None: every function is total over str.

Limits
    Folding is at spaces only; a single word longer than a line stays on one line.
"""

from __future__ import annotations

import re

from ingress.core.addr import normalize_domain, split_address
from ingress.core.wire import AuthResult

__all__ = ["comment_text", "quoted_value", "received_spf_header", "sanitise", "spf_identity",
           "spf_request"]

_CTL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_VCHAR = re.compile(r"[^\x21-\x7e]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_ATOM = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")


def sanitise(text: str, replacement: str = " ", *, printable: bool = False) -> str:
    """`text` without control characters (or non-visible-ASCII), stripped; see module doc."""
    return (_NOT_VCHAR if printable else _CTL).sub(replacement, text).strip()


def quoted_value(text: str, plain: re.Pattern[str], replacement: str = "") -> str:
    v = sanitise(text, replacement)
    if v and plain.match(v):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment_text(text: str) -> str:
    return re.sub(r"([()\\])", r"\\\1", sanitise(text))


def spf_identity(mail_from: str, helo: str) -> tuple[str, str]:
    """SPF identity checked for this MAIL FROM (RFC 7208 2.4): ("mailfrom", domain) or, for
    the null sender, ("helo", helo); the domain canonical (ingress.core.addr.normalize_domain:
    every spelling of a name is one key), "" when it is not a valid domain name."""
    local, domain = split_address(mail_from)
    if local or domain:
        return "mailfrom", normalize_domain(domain)
    return "helo", normalize_domain(helo)


def spf_request(mail_from: str, helo: str) -> tuple[str, str, str] | None:
    """What SPF is evaluated for (and what its cache is keyed by): (domain, sender, helo), all
    canonical: the domain of spf_identity, the sender as local@domain ("" for the null
    sender), the HELO name canonical, or as sent (stripped, lower case) when it is not a
    domain name (an address literal: it only feeds the %{h} macro then). None when the domain
    is not a valid name: no lookup, the result is none (RFC 7208 4.3)."""
    _, domain = spf_identity(mail_from, helo)
    if not domain:
        return None
    local, written = split_address(mail_from)
    sender = f"{local}@{domain}" if local or written else ""
    return domain, sender, normalize_domain(helo) or helo.strip().lower()


def _kv(text: str) -> str:
    return quoted_value(text, _DOT_ATOM, " ")  # RFC 7208 9.1: dot-atom / quoted-string


def received_spf_header(
    result: AuthResult,
    *,
    client_ip: str,
    mail_from: str,
    helo: str,
    receiver: str,
    explanation: str | None = None,
) -> bytes:
    """Received-SPF: header field (RFC 7208 section 9.1), folded, CRLF-terminated.

    Example: Received-SPF: pass (mx.example.net: domain of a@example.com designates
    192.0.2.1 as permitted sender) receiver=mx.example.net; client-ip=192.0.2.1;
    envelope-from="a@example.com"; helo=mail.example.com; identity=mailfrom
    """
    identity, domain = spf_identity(mail_from, helo)
    sender = mail_from.strip().strip("<>") or f"postmaster@{helo.strip()}"
    if explanation:
        comment = f"{receiver}: {explanation}"
    elif result is AuthResult.PASS:
        comment = f"{receiver}: domain of {sender} designates {client_ip} as permitted sender"
    elif result in (AuthResult.FAIL, AuthResult.SOFTFAIL):
        comment = (
            f"{receiver}: domain of {sender} does not designate {client_ip} as permitted sender"
        )
    else:
        comment = f"{receiver}: {result} for {domain or 'unknown domain'}"
    pairs = [
        f"receiver={_kv(receiver)};",
        f"client-ip={_kv(client_ip)};",
        f"envelope-from={_kv(mail_from.strip().strip('<>'))};",
        f"helo={_kv(helo)};",
        f"identity={identity}",
    ]
    words = f"Received-SPF: {result} ({comment_text(comment)}) {' '.join(pairs)}".split(" ")
    lines = [words[0]]
    for w in words[1:]:
        if not w:
            continue
        if len(lines[-1]) + 1 + len(w) > 78 and lines[-1].strip():
            lines.append("\t" + w)  # fold at whitespace (FWS is legal in comments and values)
        else:
            lines[-1] += " " + w
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")
