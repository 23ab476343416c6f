"""The lane side's header module: parse the header block, strip forged A-R, render the trace.

Purpose
    What the workers write and remove in a header section (its parser is ingress.core.fields,
    shared with the relay's DSN): remove Authentication-Results fields that claim our
    authserv-id (RFC 8601 section 5: nobody else may speak for us), and render the
    Authentication-Results (RFC 8601) and Received trace fields. Client-chosen text reaches a
    header only through ingress.core.headers.sanitise (the one sanitiser, shared with the
    acceptor's Received-SPF renderer, which ingress.core.headers holds because the acceptor
    renders that field at MAIL time).

API
    strip_forged_ar(message, authserv_id) -> bytes
    authentication_results(authserv_id, *, spf=None, spf_domain=None, spf_helo=None,
                           dkim_results=(), dkim_checked=True, dmarc=None,
                           comment=None, dnswl=None, iprev=None, iprev_ip=None,
                           iprev_name=None) -> bytes
        dmarc: an ingress.policy.dmarc.DmarcVerdict, rendered after the dkim resinfos
        dnswl: a DNS allow-list listing (zone, answer, TXT) as RFC 8904's resinfo, last
        iprev (RFC 8601 2.7.3) first when given: "iprev=pass policy.iprev=192.0.2.1
        (mail.example.com)" (the verified name as a comment)
    received_header(env, hostname) -> bytes   the client IP as an RFC 5321 address-literal
    address_literal(ip) -> str                "[192.0.2.1]", "[IPv6:2001:db8::1]"
    received_spf_header (ingress.core.headers', re-exported)
    MAX_AR_FIELD

Failure modes
    None raised for message content (the parser's: ingress.core.fields).

Limits
    strip_forged_ar parses each A-R authserv-id in one
    linear pass (CFWS with nested comments and quoted-pairs) and removes, unparsed, any A-R
    field longer than MAX_AR_FIELD (16 KiB). Received values are cut to 200 characters.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ingress.core.addr import try_parse_ip
from ingress.core.fields import ar_authserv_id, field_value, header_fields
from ingress.core.headers import comment_text, quoted_value, received_spf_header, sanitise
from ingress.core.wire import AuthResult, Envelope

if TYPE_CHECKING:
    from ingress.policy.dmarc import DmarcVerdict
    from workers.lane.dkim_check import DkimSignatureResult

__all__ = [
    "MAX_AR_FIELD",
    "address_literal",
    "authentication_results",
    "received_header",
    "received_spf_header",
    "strip_forged_ar",
]

DkimResult = AuthResult

# --------------------------------------------------------------------------- Received


def _safe(text: str, limit: int = 200) -> str:
    return sanitise(text, "?", printable=True)[:limit] or "unknown"


def address_literal(ip: str) -> str:
    """RFC 5321 address-literal (4.1.3) of the client's IP: "[192.0.2.1]", "[IPv6:2001:db8::1]"
    (an IPv4-mapped IPv6 address is written as IPv4); something that is not an address is
    bracketed as it is, made safe."""
    addr = try_parse_ip(ip)
    if addr is None:
        return f"[{_safe(ip)}]"
    return f"[IPv6:{addr}]" if addr.version == 6 else f"[{addr}]"


def received_header(env: Envelope, hostname: str) -> bytes:
    """Received: from <helo> ([ip] or [IPv6:ip]) by <host> (smtp-ingress lane=...) with
    ESMTP[S] id <qid>."""
    with_ = "ESMTPS" if env.tls else "ESMTP"
    if env.smtputf8:
        with_ = "UTF8SMTPS" if env.tls else "UTF8SMTP"
    tls = f" ({_safe(env.tls)})" if env.tls else ""
    for_ = f"\r\n\tfor <{_safe(env.rcpts[0])}>" if len(env.rcpts) == 1 else ""
    date = email.utils.formatdate(env.received_at, localtime=True)
    line = (f"Received: from {_safe(env.helo)} ({address_literal(env.peer_ip)})\r\n"
            f"\tby {_safe(hostname)} (smtp-ingress lane={env.lane.value}) with {with_}{tls}"
            f" id {_safe(env.qid)}{for_};\r\n\t{date}\r\n")
    return line.encode("ascii")


# --------------------------------------------------------------------------- A-R header

_VALUE_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~@]+$")
_NEVER_TOKEN = re.compile(r"(?!)")          # policy.txt: always a quoted-string (RFC 8904)


def _value(text: str) -> str:
    """RFC 2045 token if possible, else a quoted-string; control characters removed."""
    return quoted_value(text, _VALUE_TOKEN)


def authentication_results(
    authserv_id: str,
    *,
    spf: str | None = None,
    spf_domain: str | None = None,
    spf_helo: str | None = None,
    dkim_results: Sequence[DkimSignatureResult] = (),
    dkim_checked: bool = True,
    dmarc: DmarcVerdict | None = None,
    comment: str | None = None,
    dnswl: tuple[str, str, str] | None = None,
    iprev: str | None = None,
    iprev_ip: str | None = None,
    iprev_name: str | None = None,
) -> bytes:
    """Authentication-Results header field (RFC 8601), folded one resinfo per line, CRLF-ended.

    spf: an AuthResult value string or None (not checked: omitted). spf_domain is reported as
    smtp.mailfrom, else spf_helo as smtp.helo. dkim_results: one resinfo per signature; when
    empty and dkim_checked, "dkim=none". dmarc: the DMARC verdict (None: not evaluated,
    omitted), "dmarc=<result> (p=.. sp=..) header.from=<domain>" (RFC 7489 11.2; no "dis=":
    we report, we do not enforce). comment: e.g. "lane=fast" after the authserv-id.
    dnswl: (zone, answer, TXT) of the DNS allow list that listed the client (RFC 8904:
    "dnswl=pass dns.zone=<zone> policy.ip=<answer> policy.txt=<TXT>"; no TXT: no policy.txt);
    None (not listed, or not asked): no dnswl resinfo.
    With nothing to report the body is "authserv-id; none".
    """
    head = f"Authentication-Results: {_value(authserv_id)}"
    if comment:
        head += " (" + comment_text(comment) + ")"
    resinfos: list[str] = []
    if iprev is not None:
        resinfos.append(_iprev_resinfo(iprev, iprev_ip, iprev_name))
    if spf is not None:
        resinfos.append(_spf_resinfo(spf, spf_domain, spf_helo))
    resinfos.extend(_dkim_resinfo(res) for res in dkim_results)
    if not dkim_results and dkim_checked:
        resinfos.append("dkim=none")
    if dmarc is not None:
        resinfos.append(_dmarc_resinfo(dmarc))
    if dnswl is not None and dnswl[0]:
        resinfos.append(_dnswl_resinfo(*dnswl))
    if not resinfos:
        return (head + "; none\r\n").encode("utf-8", "replace")
    return (head + ";\r\n\t" + ";\r\n\t".join(resinfos) + "\r\n").encode("utf-8", "replace")


def _iprev_resinfo(iprev: str, ip: str | None, name: str | None) -> str:
    """"iprev=<result> policy.iprev=<address> (<verified name>)" (RFC 8601 2.7.3)."""
    r = f"iprev={_value(iprev)}"
    addr = try_parse_ip(ip) if ip else None
    if addr is not None:
        r += f" policy.iprev={_value(str(addr))}"
    if name:
        r += f" ({comment_text(name[:253])})"
    return r


def _spf_resinfo(spf: str, spf_domain: str | None, spf_helo: str | None) -> str:
    """"spf=<result>" with smtp.mailfrom, else smtp.helo, when known."""
    r = f"spf={_value(str(spf))}"
    if spf_domain:
        r += f" smtp.mailfrom={_value(spf_domain)}"
    elif spf_helo:
        r += f" smtp.helo={_value(spf_helo)}"
    return r


def _dnswl_resinfo(zone: str, answer: str, txt: str) -> str:
    """RFC 8904: "dnswl=pass" with dns.zone, policy.ip (the A record) and policy.txt (the
    zone's TXT for the client, a quoted-string when it is not a token). Only listings are
    rendered: an unlisted client or a zone in trouble has no dnswl resinfo (RFC 8904's none
    and temperror are not written: they would say the same of every unlisted client). dns.sec
    is not written: the answers are not DNSSEC-validated here."""
    r = f"dnswl=pass dns.zone={_value(zone[:253])}"
    if answer:
        r += f" policy.ip={_value(answer[:64])}"
    if txt:
        r += f" policy.txt={quoted_value(txt[:512], _NEVER_TOKEN)}"
    return r


def _dkim_resinfo(res: DkimSignatureResult) -> str:
    """"dkim=<result>" for one signature: "(aligned)" on an aligned pass, else the reason of a
    non-pass; then header.d, header.s and header.b when known."""
    r = f"dkim={res.result}"
    if res.result is DkimResult.PASS and res.aligned:
        r += " (aligned)"
    elif res.result is not DkimResult.PASS and res.reason:
        r += f" reason={_value(res.reason[:120])}"
    if res.domain:
        r += f" header.d={_value(res.domain)}"
    if res.selector:
        r += f" header.s={_value(res.selector)}"
    if res.b_prefix:
        r += f" header.b={_value(res.b_prefix)}"
    return r


def _dmarc_resinfo(v: DmarcVerdict) -> str:
    """"dmarc=<result>", the published policy (or why there is none) as a comment, then
    header.from (RFC 7489 11.2, the RFC 8601 registry: ptype header, property from)."""
    r = f"dmarc={v.result}"
    if v.comment:
        r += f" ({comment_text(v.comment[:120])})"
    if v.author:
        r += f" header.from={_value(v.author)}"
    return r


# --------------------------------------------------------------------------- forged A-R

# An A-R field longer than this is removed without being parsed. Real ones are well under
# 4 KiB (ours with 20 signatures is about 3 KiB); RFC 8601 section 5 allows a border MTA to
# remove any A-R, and one this long could only be hiding an id behind a huge comment.
MAX_AR_FIELD = 16 * 1024


def strip_forged_ar(message: bytes, authserv_id: str) -> bytes:
    """Remove every Authentication-Results header field whose authserv-id is ours.

    Field name match is case-insensitive, folded continuation lines are removed with their
    field, and every other byte (other headers, ARC-Authentication-Results, the body, line
    endings) is kept identical.
    """
    ours = authserv_id.strip().lower()
    drop = [
        (s, e)
        for s, e, name in header_fields(message)
        if name == b"authentication-results"
        and (e - s > MAX_AR_FIELD or ar_authserv_id(field_value(message[s:e])) == ours)
    ]
    if not drop:
        return message
    out = bytearray()
    pos = 0
    for s, e in drop:
        out += message[pos:s]
        pos = e
    out += message[pos:]
    return bytes(out)
