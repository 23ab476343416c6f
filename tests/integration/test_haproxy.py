"""PROXY protocol behind a real HAProxy: the backend sees the real client address.

A real HAProxy (Debian package `haproxy`; installed with apt-get when missing and we are root,
else the tests skip) runs in TCP mode on a loopback port with its own config file in a temp dir
(`haproxy -f cfg -db`: foreground, no master-worker, no system service), stopped by its PID. Its
backend server line carries `send-proxy` (v1) in one test and `send-proxy-v2` in the other. The
client connects from 127.0.0.55, HAProxy reaches the backend from 127.0.0.1 (the trusted proxy),
so a backend that reports 127.0.0.55 proves it took the address from the PROXY header.

The backend is BACKEND below: MiniBackend, a minimal aiosmtpd server using ingress.edge.proxy's
proxy_peer() in handle_PROXY, until the ingress itself is wired for `[listen] proxy_protocol`;
then BACKEND = IngressBackend (one line) runs the same tests against the real ingress.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from ingress.edge.proxy import PROXY_TIMEOUT, proxy_peer, trusted_networks
from tests.kit.haproxy import HAProxy
from tests.kit.harness import Ingress, make_body, send_one, smtp_dialogue

CLIENT_IP = "127.0.0.55"          # the "real" client; HAProxy itself connects from 127.0.0.1
TRUSTED = ["127.0.0.1/32"]


class Backend(Protocol):
    port: int

    def seen_clients(self) -> list[str]: ...
    def close(self) -> None: ...


class MiniBackend:
    """aiosmtpd on a loopback port, PROXY header required, in a thread of this process.
    Records the client address each accepted message was attributed to."""

    def __init__(self, tmp: Path) -> None:
        self.trusted = trusted_networks(TRUSTED)
        self.clients: list[str] = []
        self.versions: list[int] = []      # PROXY protocol version of each accepted header
        self.rejected = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _start(self) -> asyncio.AbstractServer:
        return await self.loop.create_server(
            lambda: SMTP(self, hostname="backend.test", proxy_protocol_timeout=PROXY_TIMEOUT,
                         loop=self.loop),
            "127.0.0.1", 0)

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope,
                           proxy_data: Any) -> bool:
        client = proxy_peer(session.peer, proxy_data, self.trusted)
        if client is None:
            self.rejected += 1
            return False
        server.client_addr = client     # type: ignore[attr-defined]
        self.versions.append(int(proxy_data.version))
        return True

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.clients.append(server.client_addr[0])    # type: ignore[attr-defined]
        return "250 2.0.0 Ok"

    def seen_clients(self) -> list[str]:
        return list(self.clients)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class IngressBackend:
    """The real ingress with the PROXY protocol on its listener (needs [listen] proxy_protocol
    and trusted_proxies in ingress.core.config). The client address is the `peer` of its `message`
    log lines."""

    def __init__(self, tmp: Path) -> None:
        self.ingress = Ingress(tmp, {"listen": {"proxy_protocol": True,
                                                "trusted_proxies": TRUSTED}})
        self.ingress.start()
        self.port = self.ingress.port

    def seen_clients(self) -> list[str]:
        return [str(d["peer"]) for d in self.ingress.events("message") if d.get("reply") == "250"]

    def close(self) -> None:
        self.ingress.stop()


BACKEND: type[MiniBackend] | type[IngressBackend] = IngressBackend


@pytest.fixture
def backend(tmp_path: Path) -> Any:
    b = BACKEND(tmp_path)
    try:
        yield b
    finally:
        b.close()


def _through_haproxy(tmp: Path, backend: Backend, send_proxy: str, version: int) -> None:
    hap = HAProxy(tmp, backend.port, send_proxy)
    try:
        code, text = asyncio.run(send_one(hap.port, make_body(1), source=CLIENT_IP))
        assert code == 250, (code, text, hap.log_text())
        deadline = time.monotonic() + 5
        while CLIENT_IP not in backend.seen_clients() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.seen_clients() == [CLIENT_IP], backend.seen_clients()
        versions = getattr(backend, "versions", None)     # MiniBackend only
        assert versions is None or set(versions) == {version}, versions
    finally:
        hap.stop()


@pytest.mark.needs_haproxy
def test_haproxy_send_proxy_v1(tmp_path: Path, backend: Backend) -> None:
    _through_haproxy(tmp_path, backend, "send-proxy", 1)


@pytest.mark.needs_haproxy
def test_haproxy_send_proxy_v2(tmp_path: Path, backend: Backend) -> None:
    _through_haproxy(tmp_path, backend, "send-proxy-v2", 2)


def test_untrusted_peer_cannot_claim_an_address(backend: Backend) -> None:
    """A client that is not a trusted proxy sends a PROXY header naming another address (one
    that might be on the allow list): the connection is closed without a banner."""
    replies = asyncio.run(smtp_dialogue(
        backend.port, [b"PROXY TCP4 10.9.9.9 127.0.0.1 1234 25\r\n"], wait_banner=False,
        source=CLIENT_IP, read_timeout=5))
    assert replies in (["EOF"], ["ERR ConnectionResetError"]), replies
    assert backend.seen_clients() == []


def test_direct_smtp_without_header_is_dropped(backend: Backend) -> None:
    """On a PROXY listener, a client that speaks SMTP at once is not served."""
    replies = asyncio.run(smtp_dialogue(backend.port, [b"EHLO direct.test\r\n"],
                                        wait_banner=False, read_timeout=5))
    assert not any(r.startswith(("220", "250")) for r in replies), replies
    assert backend.seen_clients() == []
