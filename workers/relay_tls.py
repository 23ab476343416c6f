"""Downstream TLS (STARTTLS) and AUTH PLAIN for the relay: relay.tls, relay.tls_ca_file,
relay.tls_verify_name, relay.auth_file.

Modes (relay.tls):
  none           plain SMTP / LMTP (a local MTA; the default).
  opportunistic  STARTTLS whenever the downstream offers it, the certificate is not verified
                 (RFC 7435: protection against passive listeners, Postfix's "may"); plain text
                 when it is not offered.
  required       STARTTLS is mandatory and the certificate is verified against tls_ca_file (or
                 the system's CAs) for tls_verify_name (or the downstream's host), TLS >= 1.2.
AUTH PLAIN (relay.auth_file, "user:password", read once at relay start with
config.read_credentials) is sent only inside TLS: with opportunistic TLS and a downstream that
does not offer STARTTLS, the password is never sent in clear.

API:
    policy(rc, target) -> TlsPolicy       built once by the relay (ssl context included)
    PLAIN                                 the "none" policy (a session's default)
    await secure_smtp(client, policy)     after EHLO on an aiosmtplib.SMTP: STARTTLS, EHLO, AUTH
    await secure_lmtp(session, policy)    after LHLO on a relay.LmtpSession: STARTTLS, LHLO, AUTH

Failure modes: every refusal (no STARTTLS when required, a failed handshake, a certificate
that does not verify, AUTH refused or not offered) raises TlsFailure, an OSError: the relay's
sessions turn it into Unavailable("connect"), i.e. the circuit breaker and a retry later; the
message stays queued and is not charged an attempt (until relay.max_age).
Limits: no client certificates, no DANE/MTA-STS, no SASL mechanism but PLAIN.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ingress.core.config import RelayConfig, read_credentials

if TYPE_CHECKING:
    from workers.relay import LmtpSession, Target


class TlsFailure(ConnectionError):
    """The downstream cannot be used under the configured TLS / AUTH policy."""


@dataclass(frozen=True)
class TlsPolicy:
    mode: str = "none"
    context: ssl.SSLContext | None = None
    server_name: str = ""
    credentials: tuple[str, str] | None = None


PLAIN = TlsPolicy()


def client_context(mode: str, ca_file: str = "") -> ssl.SSLContext | None:
    if mode == "none":
        return None
    if mode == "required":
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def policy(rc: RelayConfig, target: Target) -> TlsPolicy:
    if rc.tls == "none" or target.path:
        return PLAIN
    creds = read_credentials(rc.auth_file) if rc.auth_file else None
    return TlsPolicy(rc.tls, client_context(rc.tls, rc.tls_ca_file),
                     rc.tls_verify_name or target.host, creds)


def _handshake_error(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS handshake: certificate not accepted: {e.verify_message}"
    return f"TLS handshake: {e.reason or e}"


def _plain_token(creds: tuple[str, str]) -> str:
    user, password = creds
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()


def _offers_plain(auth_ext: str) -> bool:
    return "PLAIN" in auth_ext.upper().split()


async def secure_smtp(client: Any, p: TlsPolicy) -> None:
    """STARTTLS (and AUTH) on a connected aiosmtplib.SMTP after EHLO, as the policy says."""
    if p.mode == "none":
        return
    import aiosmtplib
    if not client.supports_extension("starttls"):
        if p.mode == "required":
            raise TlsFailure("downstream does not offer STARTTLS (relay.tls = required)")
        if p.credentials:
            raise TlsFailure("downstream does not offer STARTTLS: AUTH is not sent in clear")
        return
    try:
        await client.starttls(tls_context=p.context, server_hostname=p.server_name)
        await client.ehlo()
    except ssl.SSLError as e:
        raise TlsFailure(_handshake_error(e)) from None
    except aiosmtplib.SMTPException as e:
        raise TlsFailure(f"STARTTLS: {e}") from None
    if p.credentials:
        if not _offers_plain(client.esmtp_extensions.get("auth", "")):
            raise TlsFailure("downstream does not offer AUTH PLAIN")
        try:
            await client.auth_plain(*p.credentials)
        except aiosmtplib.SMTPException as e:
            raise TlsFailure(f"AUTH PLAIN refused: {e}") from None


async def _lhlo(session: LmtpSession) -> dict[str, str]:
    assert session.reader is not None and session.writer is not None
    session.writer.write(f"LHLO {session.hostname}\r\n".encode())
    await asyncio.wait_for(session.writer.drain(), session.timeout)
    lines: list[str] = []
    while True:
        raw = await asyncio.wait_for(session.reader.readline(), session.timeout)
        if not raw.endswith(b"\n"):
            raise TlsFailure("connection closed during LHLO")
        lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
        if lines[-1][3:4] != "-":
            break
    if not lines[-1].startswith("250"):
        raise TlsFailure(f"LHLO refused: {lines[-1]}")
    exts = {}
    for ln in lines[1:]:
        word, _, rest = ln[4:].partition(" ")
        exts[word.lower()] = rest
    return exts


async def secure_lmtp(session: LmtpSession, p: TlsPolicy) -> None:
    """STARTTLS (and AUTH) on a relay.LmtpSession right after its LHLO, as the policy says."""
    if p.mode == "none":
        return
    assert session.writer is not None
    if "starttls" not in session.exts:
        if p.mode == "required":
            raise TlsFailure("downstream does not offer STARTTLS (relay.tls = required)")
        if p.credentials:
            raise TlsFailure("downstream does not offer STARTTLS: AUTH is not sent in clear")
        return
    r = await session._cmd(b"STARTTLS")
    if r.code != 220:
        raise TlsFailure(f"STARTTLS refused: {r.line()}")
    try:
        await asyncio.wait_for(session.writer.start_tls(p.context, server_hostname=p.server_name),
                               session.timeout)
    except ssl.SSLError as e:
        raise TlsFailure(_handshake_error(e)) from None
    exts = await _lhlo(session)
    session.exts = set(exts)
    if p.credentials:
        if not _offers_plain(exts.get("auth", "")):
            raise TlsFailure("downstream does not offer AUTH PLAIN")
        r = await session._cmd(b"AUTH PLAIN " + _plain_token(p.credentials).encode())
        if r.code != 235:
            raise TlsFailure(f"AUTH PLAIN refused: {r.line()}")
