"""The original client's identity for the downstream: XCLIENT or XFORWARD (Postfix's SMTP
extensions), chosen and encoded here. Pure: no I/O; clients/smtp.py sends what this module builds.

Why: the relay connects from the ingress host, so without these the downstream's logs, milters,
policy servers and mynetworks see the ingress instead of the sender.

API:
    OWN                                     the envelope's acceptor for mail the relay made
                                            itself (its DSNs): such a message names no client
    client_of(env) -> Client | None         the original client of a spool envelope (dict)
    Client(addr, port, helo, proto, ident)  sanitised, bounded values; .session: what one
                                            XCLIENT session carries (everything but ident)
    select(mode, exts) -> Method            what to send on a connection whose EHLO offered
                                            `exts` (lower-case keyword -> parameters, as
                                            aiosmtplib's esmtp_extensions): Method.command
                                            "XCLIENT" | "XFORWARD" | "" (nothing), .attrs (the
                                            attributes the downstream listed), .problem (a
                                            forced method it does not offer: why nothing may
                                            be sent on this connection)
    plan(method, client) -> Plan            the command lines (bytes, no CRLF) and, after
                                            XCLIENT, the HELO or EHLO (verb, name) that
                                            answers its 220
    xtext(value) -> str                     RFC 3461 section 4 encoding

Choice (relay.forward_client, ingress.core.config.FORWARD_CLIENT_MODES): "auto" uses XCLIENT
when offered, else XFORWARD, else nothing; "xclient" / "xforward" use that one or report a
problem (the caller does not use such a connection: nothing goes out unattributed); "off"
nothing. A method counts as offered only when its EHLO keyword lists NAME, ADDR, PROTO and HELO
(what every Postfix since 2.1 lists; a server listing less has other semantics).

What is sent (only the attributes the downstream listed):
    XCLIENT  ADDR NAME PORT PROTO HELO, one command (each XCLIENT restarts the session, and
             Postfix re-checks smtpd_authorized_xclient_hosts against the *new* client, so a
             second one would be refused: a connection carries one client, XCLIENT_README);
             the 220 greeting is then answered with the client's own HELO or EHLO (PROTO says
             which), as an XCLIENT proxy must: Postfix resets the HELO and the milters' connect
             state, and that command is what milters and smtpd_helo_restrictions see.
    XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE, split into as many commands as the line
             limit needs (as Postfix's smtp client does); the downstream resets them after the
             transaction (RSET or the end of DATA), so each message sends its own.
Values: ADDR is the canonical IP (IPv4-mapped IPv6 as IPv4; IPv6 as "IPV6:..."); NAME is
always [UNAVAILABLE] (the ingress resolves no reverse names: Postfix shows "unknown[addr]");
PORT the client's port or [UNAVAILABLE]; PROTO SMTP or ESMTP (the downstream adds UTF8 and S/A
from its own transaction, so SMTPUTF8 and TLS are not in it); HELO the client's own, made safe
below, or [UNAVAILABLE]; IDENT our queue id; SOURCE REMOTE. A message the relay made itself
(acceptor OWN) or without a valid peer address gets nothing: it goes as the ingress's own.

Attacker-controlled text (the HELO; an old or edited spool file's anything): every character
outside visible ASCII (space, CR, LF, NUL, non-ASCII) and every one of Postfix's
NEUTER_CHARACTERS (space < > ( ) \\ " ; @) becomes "?", exactly what Postfix makes of them
when the client talks to it directly, so its logs read the same; then the value is cut so that
its xtext is at most VALUE_MAX octets (Postfix refuses longer values). Every value is xtext
encoded ("+" and "=" too). So a command line is printable ASCII without CR/LF, one attribute is
one space-free token, and no line exceeds LINE_MAX: nothing from the network can add a command,
an attribute, or a refusal of its own making.
Failure modes: none raised for any envelope; plan() raises ValueError only for a Method without
a command (a caller bug).
Limits: SMTP only (config refuses a forced method with an LMTP downstream; "auto" sends
nothing there); no LOGIN, REVERSE_NAME, DESTADDR, DESTPORT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ingress.core.addr import try_parse_ip
from ingress.core.headers import sanitise

OWN = "relay"               # Envelope.acceptor of the relay's own messages (scheduler's DSNs)
LINE_MAX = 510              # octets of a command line without CRLF (RFC 5321 4.5.3.1.4: 512)
VALUE_MAX = 255             # octets of one xtext-encoded value (Postfix: "value too long" beyond)
IDENT_MAX = 64              # octets of the forwarded queue id
UNAVAILABLE = "[UNAVAILABLE]"
NEEDED = frozenset({"NAME", "ADDR", "PROTO", "HELO"})
XCLIENT_ATTRS = ("ADDR", "NAME", "PORT", "PROTO", "HELO")
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
NEUTER = frozenset(' <>()\\";@')      # Postfix's NEUTER_CHARACTERS (global/smtpd: '?')
PROTOCOLS = ("SMTP", "ESMTP")


def xtext(value: str) -> str:
    """RFC 3461 section 4: each octet (of the UTF-8 encoding) outside "!".."~", and "+" and
    "=", as "+" and two upper-case hex digits; the rest as is."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
                   for b in value.encode("utf-8", "surrogatepass"))


def _fit(value: str, limit: int = VALUE_MAX) -> str:
    """The longest prefix of `value` whose xtext is at most `limit` octets."""
    used = 0
    for i, ch in enumerate(value):
        used += len(xtext(ch))
        if used > limit:
            return value[:i]
    return value


def safe_text(text: str, limit: int = VALUE_MAX) -> str:
    """Client text as the downstream may see it: visible ASCII minus NEUTER, each other
    character "?", cut so that its xtext fits `limit` octets ("" stays "")."""
    shown = sanitise(text.strip(), "?", printable=True)
    return _fit("".join("?" if c in NEUTER else c for c in shown), limit)


@dataclass(frozen=True)
class Client:
    """The original client of one message, every value already safe (client_of)."""
    addr: str                   # canonical IP text
    port: int = 0               # 0 = unknown
    helo: str = ""              # "" = unavailable
    proto: str = ""             # "SMTP" | "ESMTP" | "" unknown
    ident: str = ""             # our queue id ("" = unavailable)

    @property
    def session(self) -> tuple[str, int, str, str]:
        """What an XCLIENT session carries: one ingress session's messages share it."""
        return self.addr, self.port, self.helo, self.proto


def client_of(env: Mapping[str, Any]) -> Client | None:
    """The original client of a spool envelope; None for the relay's own messages (acceptor
    OWN) and for an envelope without a valid peer address (then nothing is forwarded)."""
    if str(env.get("acceptor", "")) == OWN:
        return None
    ip = try_parse_ip(env.get("peer_ip"))
    if ip is None:
        return None
    try:
        port = int(env.get("peer_port") or 0)
    except (TypeError, ValueError):
        port = 0
    proto = str(env.get("proto") or "").upper()
    return Client(addr=str(ip), port=port if 0 < port < 65536 else 0,
                  helo=safe_text(str(env.get("helo") or "")),
                  proto=proto if proto in PROTOCOLS else "",
                  ident=safe_text(str(env.get("qid") or ""), IDENT_MAX))


@dataclass(frozen=True)
class Method:
    command: str = ""                     # "XCLIENT" | "XFORWARD" | "" (send nothing)
    attrs: frozenset[str] = field(default_factory=frozenset)   # listed by the downstream
    problem: str = ""                     # forced and not offered: do not use the connection


def _listed(exts: Mapping[str, str], command: str) -> frozenset[str] | None:
    params = exts.get(command.lower())
    return None if params is None else frozenset(params.upper().split())


def select(mode: str, exts: Mapping[str, str]) -> Method:
    """What relay.forward_client = `mode` sends on a connection whose EHLO offered `exts`."""
    if mode not in ("auto", "xclient", "xforward"):
        return Method()
    usable: dict[str, frozenset[str]] = {}
    for command in ("XCLIENT", "XFORWARD"):
        listed = _listed(exts, command)
        if listed is not None and listed >= NEEDED:
            usable[command] = listed
    if mode == "auto":
        for command in ("XCLIENT", "XFORWARD"):
            if command in usable:
                return Method(command, usable[command])
        return Method()
    command = mode.upper()
    if command in usable:
        return Method(command, usable[command])
    listed = _listed(exts, command)
    why = (f"does not offer {command}" if listed is None
           else f"offers {command} without {' '.join(sorted(NEEDED - listed))}")
    return Method(problem=f'relay.forward_client = "{mode}": the downstream {why} (Postfix: '
                          f"smtpd_authorized_{mode}_hosts must match the relay's address)")


@dataclass(frozen=True)
class Plan:
    lines: tuple[bytes, ...]      # commands without CRLF, each <= LINE_MAX octets
    greeting: tuple[str, str] | None = None   # XCLIENT: ("EHLO" | "HELO", the client's HELO)
                                  # to answer its 220 with (a single safe token)


def _address_literal(addr: str) -> str:
    return f"[IPv6:{addr}]" if ":" in addr else f"[{addr}]"


def _values(client: Client) -> dict[str, str]:
    port = str(client.port) if client.port else UNAVAILABLE
    return {"NAME": UNAVAILABLE,
            "ADDR": f"IPV6:{client.addr}" if ":" in client.addr else client.addr,
            "PORT": port, "PROTO": client.proto or UNAVAILABLE,
            "HELO": client.helo or UNAVAILABLE, "IDENT": client.ident or UNAVAILABLE,
            "SOURCE": "REMOTE"}


def _pack(command: str, tokens: list[str]) -> list[bytes]:
    """`tokens` in as few `command` lines of at most LINE_MAX octets as they fit."""
    lines: list[str] = []
    line = command
    for tok in tokens:
        if len(line) + 1 + len(tok) > LINE_MAX and line != command:
            lines.append(line)
            line = command
        line += " " + tok
    lines.append(line)
    return [x.encode("ascii") for x in lines]


def plan(method: Method, client: Client) -> Plan:
    """The commands that give the downstream `client`'s identity (see the module docstring)."""
    if not method.command:
        raise ValueError("plan() of a Method that sends nothing")
    values = _values(client)
    if method.command == "XFORWARD":
        tokens = [f"{a}={xtext(values[a])}" for a in XFORWARD_ATTRS if a in method.attrs]
        return Plan(tuple(_pack("XFORWARD", tokens)))
    # XCLIENT: an unknown PROTO is left out (the greeting below sets it); the rest as listed.
    sent = [a for a in XCLIENT_ATTRS if a in method.attrs and (a != "PROTO" or client.proto)]
    (line,) = _pack("XCLIENT", [f"{a}={xtext(values[a])}" for a in sent])  # fits: <= 366
    verb = "HELO" if client.proto == "SMTP" else "EHLO"
    return Plan((line,), (verb, client.helo or _address_literal(client.addr)))
