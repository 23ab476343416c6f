"""Downstream TLS: the relay over STARTTLS to a real Postfix with smtpd_tls_security_level =
encrypt (certificates from trustme), in `required` mode (verified against our CA and a name)
and in `opportunistic` mode; `required` against a Postfix without TLS, or with a certificate for
another name, gets retries and the message stays queued (nothing is sent in clear);
`opportunistic` against a Postfix without TLS delivers in clear. Skips without Postfix.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.kit.harness import Ingress, make_body, relaying, send_one, spool_count, wait_for
from tests.kit.postfix import PostfixInstance, PostfixUnavailable, check_available, free_port
from tests.kit.relaykit import delivered

pytestmark = pytest.mark.timeout(120)

NAME = "downstream.test"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_postfix(ca: trustme.CA) -> Iterator[tuple[PostfixInstance, Path]]:
    try:
        check_available()
    except PostfixUnavailable as exc:
        pytest.skip(str(exc))
    work = Path(tempfile.mkdtemp(prefix="tls-pf-"))
    work.chmod(0o711)
    cert = ca.issue_cert(NAME)
    cert_file, key_file, ca_file = work / "cert.pem", work / "key.pem", work / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    ca.cert_pem.write_to_path(str(ca_file))
    pf = PostfixInstance(
        work, free_port(), delivery="maildir", maildir_root=work / "maildir",
        accept_domains=("example.test", "sender.test"),
        extra_main_cf={"smtpd_tls_security_level": "encrypt",
                       "smtpd_tls_cert_file": str(cert_file),
                       "smtpd_tls_key_file": str(key_file),
                       "smtpd_tls_received_header": "yes"})
    try:
        pf.start()
        yield pf, ca_file
    finally:
        pf.stop()
        shutil.rmtree(work, ignore_errors=True)


def relay(pf: PostfixInstance, **tls: object) -> dict[str, dict[str, object]]:
    return {"relay": {"downstream": f"smtp://127.0.0.1:{pf.port}", "retry_base": 0.3,
                      "retry_max": 1.0, "timeout": 10.0, "concurrency": 2, **tls}}


def rcpts(tag: str, n: int) -> list[str]:
    return [f"{tag}{i}.{time.time_ns()}@example.test" for i in range(n)]


def send(ing: Ingress, to: list[str]) -> None:
    async def go() -> None:
        for i, r in enumerate(to):
            assert (await send_one(ing.port, make_body(i), rcpts=(r,)))[0] == 250
    asyncio.run(go())


@pytest.mark.parametrize("mode", ["required", "opportunistic"])
def test_starttls_to_postfix(tmp_path: Path, tls_postfix: tuple[PostfixInstance, Path],
                             mode: str) -> None:
    pf, ca_file = tls_postfix
    extra = {"tls_ca_file": str(ca_file), "tls_verify_name": NAME} if mode == "required" else {}
    to = rcpts(mode, 5)
    with Ingress(tmp_path, relay(pf, tls=mode, **extra)) as ing:
        relaying(ing)
        send(ing, to)
        wait_for(lambda: set(to) <= delivered(pf).keys(), 30, "delivery over STARTTLS")
        wait_for(lambda: spool_count(ing, "new") == 0, 10, "the spool to drain")
        assert not ing.events("relay_downstream_down")
    got = delivered(pf)
    for r in to:
        (raw,) = got[r]
        # Postfix records the TLS session in its Received header (smtpd_tls_received_header)
        assert b"(using TLSv1." in raw and b"with ESMTPS id" in raw, raw[:600]


def test_required_refuses_plain_and_wrong_name(
        tmp_path: Path, postfix: PostfixInstance,
        tls_postfix: tuple[PostfixInstance, Path]) -> None:
    tpf, ca_file = tls_postfix
    cases = [("plain", relay(postfix, tls="required"), "STARTTLS", postfix),
             ("badname", relay(tpf, tls="required", tls_ca_file=str(ca_file),
                               tls_verify_name="other.test"), "certificate", tpf),
             ("noca", relay(tpf, tls="required"), "certificate", tpf)]
    for tag, tables, why, pf in cases:
        to = rcpts(tag, 2)
        with Ingress(tmp_path / tag, tables) as ing:
            relaying(ing)
            send(ing, to)
            wait_for(lambda: len(ing.events("relay_downstream_down")) >= 2, 20,
                     f"{tag}: retries against a downstream we must not use")
            down = ing.events("relay_downstream_down")
            assert all(why in d["error"] for d in down), (tag, down)
            assert spool_count(ing, "new") == 2, f"{tag}: the messages stay queued"
            assert spool_count(ing, "failed") == 0 and not ing.events("relay_bounced")
        assert not set(to) & delivered(pf).keys(), f"{tag}: sent anyway"


def test_opportunistic_without_tls_sends_plain(tmp_path: Path,
                                               postfix: PostfixInstance) -> None:
    to = rcpts("opp-plain", 2)
    with Ingress(tmp_path, relay(postfix, tls="opportunistic")) as ing:
        relaying(ing)
        send(ing, to)
        wait_for(lambda: set(to) <= delivered(postfix).keys(), 30, "delivery in clear")
    for r in to:
        (raw,) = delivered(postfix)[r]
        assert b"(using TLS" not in raw and b"with ESMTP id" in raw


# --- AUTH PLAIN inside TLS, SMTP and LMTP (aiosmtpd as the downstream: Postfix's smtpd needs a
# --- SASL server for AUTH, and it has no LMTP listener) ---------------------------------------

class _Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], str]] = []     # (login, rcpts, tls cipher)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        # authenticated: only _authenticator's check of relayuser / s3cret:pw sets it
        login = "relayuser" if getattr(session, "authenticated", False) else ""
        cipher = getattr(session, "ssl", None)
        self.got.append((login, list(envelope.rcpt_tos),  # type: ignore[attr-defined]
                         "tls" if cipher else "plain"))
        return "250 2.0.0 ok"


def _authenticator(server: object, session: object, envelope: object, mechanism: str,
                   auth_data: object) -> object:
    from aiosmtpd.smtp import AuthResult, LoginPassword
    ok = (mechanism == "PLAIN" and isinstance(auth_data, LoginPassword)
          and auth_data.login == b"relayuser" and auth_data.password == b"s3cret:pw")
    return AuthResult(success=ok, handled=False)


def _controller(proto: str, ca: trustme.CA, sink: _Sink,
                auth_seen: list[str] | None = None) -> object:
    """An aiosmtpd downstream with a certificate from `ca`; every AUTH command it receives (in
    TLS or not, before any check) is appended to auth_seen."""
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.lmtp import LMTP
    from aiosmtpd.smtp import SMTP

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME).configure_cert(ctx)
    base = LMTP if proto == "lmtp" else SMTP

    class cls(base):  # type: ignore[valid-type,misc]
        async def smtp_AUTH(self, arg: str) -> None:
            if auth_seen is not None:
                auth_seen.append(arg)
            await super().smtp_AUTH(arg)

    class C(Controller):
        def factory(self) -> object:
            # aiosmtpd's LMTP refuses LHLO itself under require_starttls (it allows only
            # EHLO/HELO first): TLS before AUTH is still enforced by auth_require_tls.
            return cls(self.handler, hostname=NAME, tls_context=ctx,
                       require_starttls=proto == "smtp",
                       auth_require_tls=True, authenticator=_authenticator,
                       auth_exclude_mechanism=["LOGIN"])

    c = C(sink, hostname="127.0.0.1", port=free_port())
    c.start()
    return c


@pytest.mark.parametrize("proto", ["smtp", "lmtp"])
def test_auth_plain_over_starttls(tmp_path: Path, ca: trustme.CA, proto: str) -> None:
    sink, auth_seen = _Sink(), []
    ctl = _controller(proto, ca, sink, auth_seen)
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        good, bad = tmp_path / "auth", tmp_path / "auth-bad"
        good.write_text("relayuser:s3cret:pw\n")
        bad.write_text("relayuser:wrong\n")
        for f in (good, bad):
            f.chmod(0o600)
        port = ctl.port  # type: ignore[attr-defined]
        t = {"relay": {"downstream": f"{proto}://127.0.0.1:{port}", "retry_base": 0.3,
                       "retry_max": 1.0, "timeout": 10.0, "concurrency": 1, "tls": "required",
                       "tls_ca_file": str(ca_file), "tls_verify_name": NAME,
                       "auth_file": str(good)}}
        to = rcpts(f"auth-{proto}", 2)
        with Ingress(tmp_path / "good", t) as ing:
            relaying(ing)
            send(ing, to)
            wait_for(lambda: len(sink.got) == 2, 20, "delivery with AUTH")
        assert sorted(r for _, rs, _ in sink.got for r in rs) == sorted(to)
        assert {(login, tls) for login, _, tls in sink.got} == {("relayuser", "tls")}
        assert auth_seen and all(a.startswith("PLAIN") for a in auth_seen), auth_seen
        t["relay"]["auth_file"] = str(bad)
        with Ingress(tmp_path / "bad", t) as ing:
            relaying(ing)
            send(ing, rcpts("authbad", 1))
            wait_for(lambda: len(ing.events("relay_downstream_down")) >= 2, 20, "AUTH refusals")
            assert all("AUTH PLAIN refused" in d["error"]
                       for d in ing.events("relay_downstream_down"))
            assert spool_count(ing, "new") == 1
        assert len(sink.got) == 2
    finally:
        ctl.stop()  # type: ignore[attr-defined]


@pytest.mark.parametrize("proto", ["smtp", "lmtp"])
def test_required_refuses_untrusted_ca_and_sends_no_auth(tmp_path: Path, ca: trustme.CA,
                                                        proto: str) -> None:
    """Issue 19 item 4: a downstream whose certificate (the right name) comes from a CA we do
    not trust -- a MITM answering STARTTLS -- never sees AUTH: the relay refuses the handshake,
    the message stays queued. (opportunistic + auth_file, which used to send the password
    here, is a configuration error: tests/unit/test_relay_tls.py.)"""
    sink, auth_seen = _Sink(), []
    ctl = _controller(proto, trustme.CA(), sink, auth_seen)     # a stranger's CA
    try:
        ca_file, good = tmp_path / "ca.pem", tmp_path / "auth"
        ca.cert_pem.write_to_path(str(ca_file))
        good.write_text("relayuser:s3cret:pw\n")
        good.chmod(0o600)
        t = {"relay": {"downstream": f"{proto}://127.0.0.1:{ctl.port}",  # type: ignore[attr-defined]
                       "retry_base": 0.3, "retry_max": 1.0, "timeout": 10.0, "concurrency": 1,
                       "tls": "required", "tls_ca_file": str(ca_file), "tls_verify_name": NAME,
                       "auth_file": str(good)}}
        with Ingress(tmp_path / "ing", t) as ing:
            relaying(ing)
            send(ing, rcpts(f"mitm-{proto}", 1))
            wait_for(lambda: len(ing.events("relay_downstream_down")) >= 2, 20,
                     "retries against an unverified downstream")
            assert all("certificate" in d["error"] for d in ing.events("relay_downstream_down"))
            assert spool_count(ing, "new") == 1
        assert auth_seen == [] and sink.got == []
    finally:
        ctl.stop()  # type: ignore[attr-defined]
