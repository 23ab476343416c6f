"""The relay's TLS and AUTH policy toward the downstream (relay.tls, relay.auth_file): the
client SSL context, STARTTLS and AUTH PLAIN on an SMTP or an LMTP session.

API:
    policy(rc, target) -> TlsPolicy      built once by the relay (ssl context included)
    PLAIN                                the "none" policy (a session's default)
    TlsPolicy(mode, context, server_name, credentials)
    client_context(mode, ca_file) -> ssl.SSLContext | None
    secure_smtp(client, policy), secure_lmtp(session, policy)
                                         after EHLO / LHLO: STARTTLS, EHLO / LHLO, AUTH
    auth_smtp(client, policy)            AUTH PLAIN alone (again after XCLIENT, which resets
                                         the downstream's SASL state: smtp.py)
    TlsFailure                           the downstream cannot be used under the policy

TLS modes (relay.tls): none (plain; the default, a local MTA); opportunistic (STARTTLS whenever
offered, the certificate not verified, RFC 7435; plain text when not offered); required
(STARTTLS mandatory, the certificate verified against tls_ca_file or the system's CAs for
tls_verify_name or the downstream's host, TLS >= 1.2). AUTH PLAIN (relay.auth_file,
"user:password", read once at relay start) is sent only inside TLS whose certificate verified:
the configuration allows auth_file with tls = "required" only, so the password never goes in
clear nor to a server that merely answers STARTTLS. A downstream over a unix socket (LMTP) is
always PLAIN.

Failure modes: TlsFailure (a ConnectionError) for a STARTTLS that is required but not offered,
AUTH that would go in clear or is not offered, a refused STARTTLS or AUTH, a failed handshake
(the certificate's verify message in the text). The sessions turn it into a connection-level
failure (transaction.Unavailable, stage "connect"): the breaker backs off, the mail waits.
policy() raises ValueError (read_credentials) for an auth_file it cannot read (the config
load checked it already).
Limits: no client certificates, no DANE/MTA-STS, no SASL mechanism but PLAIN.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiosmtplib

from ingress.core.config import RelayConfig, read_credentials
from ingress.core.downstream import Target

if TYPE_CHECKING:
    from workers.relay.clients.lmtp import LmtpSession


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
    await auth_smtp(client, p)


async def auth_smtp(client: Any, p: TlsPolicy) -> None:
    """AUTH PLAIN when the policy has credentials (inside the TLS secure_smtp verified; again
    after XCLIENT, which resets the downstream's SASL state)."""
    if p.credentials:
        if not _offers_plain(client.esmtp_extensions.get("auth", "")):
            raise TlsFailure("downstream does not offer AUTH PLAIN")
        try:
            await client.auth_plain(*p.credentials)
        except aiosmtplib.SMTPException as e:
            raise TlsFailure(f"AUTH PLAIN refused: {e}") from None


async def secure_lmtp(session: LmtpSession, p: TlsPolicy) -> None:
    """STARTTLS (and AUTH) on an LmtpSession right after its LHLO, as the policy says."""
    if p.mode == "none":
        return
    assert session.writer is not None
    if "starttls" not in session.exts:
        if p.mode == "required":
            raise TlsFailure("downstream does not offer STARTTLS (relay.tls = required)")
        if p.credentials:
            raise TlsFailure("downstream does not offer STARTTLS: AUTH is not sent in clear")
        return
    assert p.context is not None        # every mode but "none" has one (policy())
    r = await session._cmd(b"STARTTLS")
    if r.code != 220:
        raise TlsFailure(f"STARTTLS refused: {r.line()}")
    try:
        await asyncio.wait_for(session.writer.start_tls(p.context, server_hostname=p.server_name),
                               session.timeout)
    except ssl.SSLError as e:
        raise TlsFailure(_handshake_error(e)) from None
    exts = await session.lhlo(TlsFailure)
    session.exts = set(exts)
    if p.credentials:
        if not _offers_plain(exts.get("auth", "")):
            raise TlsFailure("downstream does not offer AUTH PLAIN")
        r = await session._cmd(b"AUTH PLAIN " + _plain_token(p.credentials).encode())
        if r.code != 235:
            raise TlsFailure(f"AUTH PLAIN refused: {r.line()}")
