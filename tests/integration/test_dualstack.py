"""Dual stack, end to end: one real ingress (supervisor, acceptors, lanes) listening on
127.0.0.1 and ::1 at once (listen.addresses); IPv6 clients are first-class: SPF ip6 against the
real DNS test server promotes them, per-/64 admission limits hold, a PROXY v2 header from a
trusted IPv6 proxy names an IPv6 client, and the Received trace writes [IPv6:...].

Needs ::1 on the loopback interface (skipped, saying so, where there is none).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.haproxy import HAProxy
from tests.kit.harness import Ingress, send_one, short_message, smtp_dialogue, split_trace


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 on this machine")

DUAL = {"addresses": ["127.0.0.1:0", "[::1]:0"]}


def message(subject: str, sender: str = "alice@sender.test") -> bytes:
    return short_message(subject, sender, msgid_domain="sender.test")


def by_subject(ing: Ingress) -> dict[str, tuple[dict[str, object], dict[str, bytes]]]:
    out = {}
    for entry in ing.spooled().values():
        trace, body = split_trace(entry.message)
        for line in body.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out[line[9:].decode()] = (entry.envelope, trace)
    return out


def ports(ing: Ingress) -> dict[str, int]:
    """Bound port of each listen address, by host ("127.0.0.1", "::1")."""
    out = {}
    for a in ing.addresses:
        host, _, port = a.rpartition(":")
        out[host.strip("[]")] = int(port)
    return out


def test_one_instance_serves_ipv4_and_ipv6(tmp_path: Path) -> None:
    """The same instance takes a message over 127.0.0.1 and one over ::1 (both spooled, each
    with its client's address); a static allow entry for ::1/128 makes the IPv6 client fast
    (the IPv4 one stays bulk), and the fast port listens on both addresses too. A reload
    keeps every listening socket."""
    tables = {"listen": {**DUAL, "fast_port": 0}, "classify": {"allow_cidrs": ["::1/128"]}}
    with Ingress(tmp_path, tables) as ing:
        p = ports(ing)
        assert set(p) == {"127.0.0.1", "::1"} and p["127.0.0.1"] == p["::1"] == ing.port
        ready = ing.events("ready")[-1]
        fast = {a.rpartition(":")[0].strip("[]"): int(a.rpartition(":")[2])
                for a in ready["fast_addresses"]}
        assert set(fast) == {"127.0.0.1", "::1"}

        async def send_all(tag: str) -> list[tuple[int, str]]:
            return [await send_one(ing.port, message(f"v4{tag}"), host="127.0.0.1"),
                    await send_one(ing.port, message(f"v6{tag}"), host="::1"),
                    await send_one(fast["::1"], message(f"fast6{tag}"), host="::1"),
                    await send_one(fast["127.0.0.1"], message(f"fast4{tag}"), host="127.0.0.1")]

        r = asyncio.run(send_all(""))
        assert [c for c, _ in r[:3]] == [250, 250, 250], r
        assert r[3][0] != 250, r          # 127.0.0.1 is not allow-listed: not on the fast port
        ing.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not ing.events("reloaded") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ing.events("reloaded") and not ing.events("reload_restart_needed")
        r = asyncio.run(send_all("-after-reload"))
        assert [c for c, _ in r[:3]] == [250, 250, 250], r
        spooled = by_subject(ing)
    for tag in ("", "-after-reload"):
        env4, trace4 = spooled[f"v4{tag}"]
        env6, trace6 = spooled[f"v6{tag}"]
        assert env4["peer_ip"] == "127.0.0.1" and env4["lane"] == "bulk"
        assert env6["peer_ip"] == "::1" and env6["lane"] == "fast"      # ::1/128 allow-listed
        assert b"([127.0.0.1])" in trace4["Received"]
        assert b"([IPv6:::1])" in trace6["Received"]
        env, _ = spooled[f"fast6{tag}"]
        assert env["peer_ip"] == "::1" and env["lane"] == "fast"
        assert f"fast4{tag}" not in spooled


def test_restarted_acceptor_serves_every_address(tmp_path: Path) -> None:
    """kill -9 of the only acceptor: its replacement gets the slot's sockets for both
    addresses (the supervisor keeps them open), so 127.0.0.1 and ::1 are served again."""
    with Ingress(tmp_path, {"listen": DUAL, "supervisor": {"acceptors": 1}}) as ing:
        [old] = ing.children("acceptor")
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = ing.children("acceptor")
            if now and old not in now and ing.events("acceptor_start")[1:]:
                break
            time.sleep(0.1)
        assert ing.children("acceptor") != [old]

        async def run() -> list[tuple[int, str]]:
            return [await send_one(ing.port, message("after-kill-v4"), host="127.0.0.1"),
                    await send_one(ing.port, message("after-kill-v6"), host="::1")]
        r = asyncio.run(run())
        assert [c for c, _ in r] == [250, 250], r
        starts = [e for e in ing.events("acceptor_start") if e["proc"] == "acceptor-0"]
        spooled = by_subject(ing)
    assert len(starts) == 2 and starts[-1]["servers"] == 2, starts
    assert spooled["after-kill-v6"][0]["peer_ip"] == "::1"


@pytest.fixture(scope="module")
def dns_server():
    records = {
        "v6.test": {"TXT": ["v=spf1 ip6:::1 -all"]},
        "v6other.test": {"TXT": ["v=spf1 ip6:2001:db8::/32 -all"]},
        "v6a.test": {"TXT": ["v=spf1 a -all"], "AAAA": ["::1"]},
    }
    with DNSServer(records) as server:
        yield server


def test_ipv6_client_passing_spf_ip6_is_promoted(tmp_path: Path, dns_server: DNSServer) -> None:
    """SPF over IPv6 through pyspf and our resolver against the real DNS test server: a
    client on ::1 whose domain says "ip6:::1" passes and goes to the fast lane; one whose
    domain lists other IPv6 networks fails and stays bulk; "a" over IPv6 looks up the
    domain's AAAA record (served by the test DNS server) and passes."""
    tables = {"listen": DUAL,
              "classify": {"spf_promote": "any", "nameservers": [dns_server.address],
                           "dns_timeout": 1.0, "spf_deadline": 2.0}}
    with Ingress(tmp_path, tables) as ing:
        async def run() -> list[tuple[int, str]]:
            return [await send_one(ing.port, message("pass6", "alice@v6.test"), host="::1",
                                   sender="alice@v6.test"),
                    await send_one(ing.port, message("fail6", "alice@v6other.test"), host="::1",
                                   sender="alice@v6other.test"),
                    await send_one(ing.port, message("aaaa6", "alice@v6a.test"), host="::1",
                                   sender="alice@v6a.test")]
        r = asyncio.run(run())
        assert [c for c, _ in r] == [250, 250, 250], r
        spooled = by_subject(ing)
    env, trace = spooled["pass6"]
    assert env["peer_ip"] == "::1" and env["lane"] == "fast", env
    assert b"spf=pass smtp.mailfrom=v6.test" in trace["Authentication-Results"]
    assert b"([IPv6:::1])" in trace["Received"]
    env, trace = spooled["fail6"]
    assert env["lane"] == "bulk" and b"spf=fail" in trace["Authentication-Results"]
    env, trace = spooled["aaaa6"]
    assert env["lane"] == "fast" and b"spf=pass smtp.mailfrom=v6a.test" in \
        trace["Authentication-Results"]
    assert any(q[:2] == ("v6a.test", "AAAA") for q in dns_server.queries), dns_server.queries


def test_per_64_bulk_limit_over_ipv6(tmp_path: Path) -> None:
    """::1 is one /64: admission.per_ip_bulk_max concurrent bulk sessions from it, then 421;
    IPv4 clients are counted apart and still admitted."""
    tables = {"listen": DUAL, "admission": {"per_ip_bulk_max": 2, "per_ip_rate": 0.0},
              "supervisor": {"acceptors": 1}}
    with Ingress(tmp_path, tables) as ing:
        async def run() -> tuple[list[str], list[str]]:
            held = [await asyncio.open_connection("::1", ing.port) for _ in range(2)]
            try:
                for reader, _ in held:
                    assert (await reader.readline()).startswith(b"220")
                over = [(await smtp_dialogue(ing.port, [], host="::1"))[0] for _ in range(3)]
                v4 = await smtp_dialogue(ing.port, [b"QUIT\r\n"], host="127.0.0.1")
            finally:
                for _, writer in held:
                    writer.close()
            return over, v4
        over, v4 = asyncio.run(run())
        assert all(o.startswith("421 4.7.0") for o in over), over
        assert v4[0].startswith("220"), v4
        assert ing.proc is not None and ing.proc.poll() is None


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2_inet6(src: str, sport: int, dst: str = "2001:db8::1", dport: int = 25) -> bytes:
    addrs = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
             + struct.pack("!HH", sport, dport))
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21, len(addrs)) + addrs


async def proxied_message(host: str, port: int, header: bytes, subject: str) -> list[str]:
    """A PROXY header, then a whole SMTP transaction; every reply line (or 'EOF')."""
    reader, writer = await asyncio.open_connection(host, port)
    replies: list[str] = []
    try:
        writer.write(header)
        for line in (None, b"EHLO client.test\r\n", b"MAIL FROM:<alice@sender.test>\r\n",
                     b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n",
                     message(subject) + b".\r\n", b"QUIT\r\n"):
            if line is not None:
                writer.write(line)
                await writer.drain()
            while True:
                got = await asyncio.wait_for(reader.readline(), 10)
                if not got:
                    replies.append("EOF")
                    return replies
                if got[3:4] != b"-":
                    replies.append(got.decode(errors="replace").rstrip("\r\n"))
                    break
    except (ConnectionError, TimeoutError) as e:
        replies.append(f"ERR {type(e).__name__}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return replies


def test_proxy_v2_from_ipv6_proxy_names_ipv6_client(tmp_path: Path) -> None:
    """A trusted proxy on ::1 sends a PROXY v2 header naming 2001:db8::5: that is the client
    the ingress sees and records. The same header from 127.0.0.1 (not trusted) is refused."""
    tables = {"listen": {**DUAL, "proxy_protocol": True, "trusted_proxies": ["::1/128"]}}
    header = proxy_v2_inet6("2001:db8::5", 40000)
    with Ingress(tmp_path, tables) as ing:
        ok = asyncio.run(proxied_message("::1", ing.port, header, "via-proxy6"))
        untrusted = asyncio.run(proxied_message("127.0.0.1", ing.port, header, "untrusted"))
        spooled = by_subject(ing)
    assert ok[0].startswith("220") and ok[5].startswith("250 2.0.0"), ok
    assert untrusted[0] in ("EOF", "ERR ConnectionResetError"), untrusted
    env, trace = spooled["via-proxy6"]
    assert env["peer_ip"] == "2001:db8::5", env
    assert b"([IPv6:2001:db8::5])" in trace["Received"]
    assert "untrusted" not in spooled


@pytest.mark.needs_haproxy
def test_real_haproxy_proxy_v2_carries_an_ipv6_client(tmp_path: Path) -> None:
    """A real HAProxy listening on [::1] forwards to the ingress over IPv4 (127.0.0.1, the
    trusted proxy) with send-proxy-v2: the header carries the IPv6 client ::1, and that is the
    address the ingress records, not the TCP peer 127.0.0.1."""
    tables = {"listen": {**DUAL, "proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}}
    with Ingress(tmp_path, tables) as ing:
        hap = HAProxy(tmp_path, ing.port, "send-proxy-v2", bind="::1")
        try:
            r = asyncio.run(send_one(hap.port, message("haproxy6"), host="::1"))
        finally:
            hap.stop()
        spooled = by_subject(ing)
    assert r[0] == 250, r
    env, trace = spooled["haproxy6"]
    assert env["peer_ip"] == "::1", env
    assert b"([IPv6:::1])" in trace["Received"]
