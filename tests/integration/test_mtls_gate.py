"""The mutual-TLS port under a handshake flood (issue 17, Measured 10 / Build 6), through the
real processes on loopback with real TLS (trustme).

- A failed handshake ends with a TLS alert the client can read (before: a bare EOF).
- Strangers (no valid certificate shown from their network lately) get handshakes at
  tls.stranger_handshake_rate at most, the rest wait briefly or get an alert (internal_error)
  without one; a client whose network completed a verified handshake before is started at
  once (the known tier), and allow-listed port-25 clients of the same fast acceptor keep being
  served.
- A resumed TLS 1.3 session keeps the certificate it was verified with (fast lane).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kit.harness import Ingress, make_body, mtls_port, realtime_allowed, send_one
from tests.kit.scrape import metrics_port, scrape, value

CERT_IP = "127.0.0.50"           # the certificate sender (its /24 becomes known)
ALLOWED_IP = "127.0.0.2"         # allow-listed on port 25 (served by the fast acceptor)
BOT_IPS = ("127.0.1.101", "127.0.1.102", "127.0.1.103")    # another /24: strangers


def client_ctx(pki: dict[str, Path], cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(pki[cert]))
    return ctx


def tls_config(pki: dict[str, Path], **gate: Any) -> dict[str, Any]:
    return {"cert": str(pki["cert"]), "key": str(pki["key"]), "mtls_port": 0,
            "client_ca": str(pki["ca"]), **gate}


def handshake_outcome(port: int, ctx: ssl.SSLContext, source: str) -> str:
    """One TLS connection: what the client saw first. 'alert: <name>' for a TLS alert, 'eof'
    for a close without one, 'banner' for an SMTP greeting, else the error's name."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=(source, 0)) as raw, \
                ctx.wrap_socket(raw, server_hostname="mx.test") as s:
            data = s.recv(100)      # TLS 1.3: the server's verdict comes after our Finished
            return "banner" if data.startswith(b"220 ") else "eof" if not data else "data"
    except ssl.SSLError as e:
        reason = (e.reason or "").lower().replace("_", " ")
        return f"alert: {reason}" if "alert" in reason else f"ssl: {reason or e}"
    except OSError as e:
        return type(e).__name__


def smtp_tls(port: int, ctx: ssl.SSLContext, source: str, body: bytes,
             session: ssl.SSLSession | None = None
             ) -> tuple[str, bool, ssl.SSLSession | None]:
    """One message over implicit TLS from `source`: (the reply to the data, session reused,
    the session to resume next time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15,
                                  source_address=(source, 0)) as raw, \
            ctx.wrap_socket(raw, server_hostname="mx.test", session=session) as s:
        f = s.makefile("rb")

        def reply() -> str:
            while True:
                line = f.readline().decode()
                if line[3:4] != "-":
                    return line.strip()

        banner = reply()
        assert banner.startswith("220 "), banner
        for cmd in (b"EHLO client.test", b"MAIL FROM:<alice@good.test>",
                    b"RCPT TO:<bob@example.test>", b"DATA"):
            s.sendall(cmd + b"\r\n")
            reply()
        s.sendall(body + b"\r\n.\r\n")
        result = reply()
        s.sendall(b"QUIT\r\n")
        reply()
        return result, s.session_reused, s.session


def test_failed_handshake_ends_with_a_tls_alert(tmp_path: Path, pki: dict[str, Path]) -> None:
    """No certificate: 'certificate required'; one from another CA: 'unknown ca'. Before, the
    server dropped the alert OpenSSL wrote and the client read a bare EOF."""
    with Ingress(tmp_path, {"tls": tls_config(pki)}) as ing:
        port = mtls_port(ing)
        none = handshake_outcome(port, client_ctx(pki, None), "127.0.0.1")
        rogue = handshake_outcome(port, client_ctx(pki, "rogue"), "127.0.0.1")
        good = handshake_outcome(port, client_ctx(pki, "client"), "127.0.0.1")
    assert none == "alert: tlsv13 alert certificate required", none
    assert rogue == "alert: tlsv1 alert unknown ca", rogue
    assert good == "banner", good


def test_resumed_session_keeps_its_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    """A TLS 1.3 session resumed with the ticket of a verified handshake is the certificate
    sender again: its message is fast lane, like the first one."""
    with Ingress(tmp_path, {"tls": tls_config(pki)}) as ing:
        port, ctx = mtls_port(ing), client_ctx(pki, "client")
        first, reused1, session = smtp_tls(port, ctx, CERT_IP, make_body(1))
        second, reused2, _ = smtp_tls(port, ctx, CERT_IP, make_body(2), session)
        lanes = sorted(str(e.envelope["lane"]) for e in ing.spooled().values())
    assert first.startswith("250 ") and second.startswith("250 "), (first, second)
    assert (reused1, reused2) == (False, True)
    assert lanes == ["fast", "fast"]


FLOOD_S = 3.0
RATE, BURST, WAIT = 4.0, 2.0, 0.5


def test_stranger_handshake_flood_is_held_to_its_rate(tmp_path: Path,
                                                      pki: dict[str, Path]) -> None:
    """Three bots from another /24 do back-to-back handshakes without a valid certificate for
    3 s (bounded: 400 attempts each). The server does at most rate x time + burst of them;
    the rest get a TLS alert (internal_error) without a handshake, never a bare EOF. The
    certificate sender, known by its /24 since its first message, is started at once every
    time and gets 250 each time; the allow-listed port-25 client too.
    Before: every bot connection got a full handshake and an EOF."""
    with Ingress(tmp_path, {
        "supervisor": {"acceptors": 1, "fast_acceptors": 1},
        "classify": {"allow_cidrs": [f"{ALLOWED_IP}/32"]},
        "metrics": {"listen": "127.0.0.1:0"},
        "tls": tls_config(pki, stranger_handshake_rate=RATE, stranger_handshake_burst=BURST,
                          stranger_wait=WAIT, handshake_timeout=5.0),
    }) as ing:
        port, mport = mtls_port(ing), metrics_port(ing)
        cert_ctx = client_ctx(pki, "client")
        first, _, _ = smtp_tls(port, cert_ctx, CERT_IP, make_body(0))   # becomes known

        outcomes: list[str] = []
        stop = time.monotonic() + FLOOD_S

        def bot(ip: str, ctx: ssl.SSLContext) -> None:
            for _ in range(400):
                if time.monotonic() >= stop:
                    return
                outcomes.append(handshake_outcome(port, ctx, ip))

        bots = [threading.Thread(target=bot, args=(ip, client_ctx(pki, cert)), daemon=True)
                for ip, cert in zip(BOT_IPS, ("rogue", None, "rogue"), strict=True)]
        started = time.monotonic()
        for t in bots:
            t.start()
        time.sleep(0.3)
        during = [smtp_tls(port, cert_ctx, CERT_IP, make_body(i))[0] for i in range(1, 6)]
        allowed = [asyncio.run(send_one(ing.port, make_body(10 + i), source=ALLOWED_IP))[0]
                   for i in range(3)]
        for t in bots:
            t.join(FLOOD_S + 15)
        window = time.monotonic() - started
        time.sleep(WAIT + 0.5)           # waiters still queued are started or refused
        m = scrape(mport)
        failed_lines = len(ing.events("mtls_handshake_failed"))

    assert first.startswith("250 "), first
    assert all(r.startswith("250 ") for r in during), during
    assert allowed == [250, 250, 250], allowed
    # The certificate sender's handshakes were all started at once as known: 5 during the
    # flood (its first one, before, was a stranger's).
    assert value(m, "smtp_ingress_mtls_gate_total", tier="known", outcome="started") >= 5, m
    assert value(m, "smtp_ingress_mtls_handshakes_total", tier="known", result="ok") >= 5, m
    # Handshakes done for the bots: within the bucket (+1: the sender's first one).
    bound = RATE * (window + WAIT) + BURST + 1
    bot_handshakes = sum(value(m, "smtp_ingress_mtls_handshakes_total", tier=tier, result=r)
                         for tier in ("stranger", "failed") for r in ("ok", "failed"))
    assert bot_handshakes <= bound, (bot_handshakes, bound, window, m)
    assert failed_lines <= bound, (failed_lines, bound)
    # The bots made many more attempts than that; each one ended with a TLS alert.
    assert len(outcomes) > bound, (len(outcomes), bound)
    refused = sum(1 for o in outcomes if o == "alert: tlsv1 alert internal error")
    assert refused > 0, outcomes
    assert value(m, "smtp_ingress_mtls_gate_total", tier="failed", outcome="refused") > 0, m
    others = [o for o in outcomes if o not in (
        "alert: tlsv1 alert internal error", "alert: tlsv1 alert unknown ca",
        "alert: tlsv13 alert certificate required")]
    assert not others, others[:20]


@pytest.mark.parametrize("mtls_acceptors", [1, 0])
def test_the_mtls_port_has_its_own_process(tmp_path: Path, pki: dict[str, Path],
                                           mtls_acceptors: int) -> None:
    """supervisor.mtls_acceptors: the mutual-TLS port is served by its own process, so the
    handshakes of strangers run on no event loop that serves port 25's operator clients (the
    fast acceptor they are handed to). 0: the fast acceptor serves both, as before."""
    with Ingress(tmp_path, {
        "supervisor": {"acceptors": 1, "fast_acceptors": 1, "mtls_acceptors": mtls_acceptors},
        "classify": {"allow_cidrs": [f"{ALLOWED_IP}/32"]},
        "tls": tls_config(pki),
    }) as ing:
        cert, _, _ = smtp_tls(mtls_port(ing), client_ctx(pki, "client"), CERT_IP, make_body(0))
        allowed = asyncio.run(send_one(ing.port, make_body(1), source=ALLOWED_IP))[0]
        procs = {e["peer"]: e.get("proc") for e in ing.events("message")}
        starts = [e.get("proc") for e in ing.events("acceptor_start")]
    assert cert.startswith("250 ") and allowed == 250, (cert, allowed)
    assert procs[ALLOWED_IP] == "fast-acceptor-0", procs
    assert procs[CERT_IP] == ("mtls-acceptor-0" if mtls_acceptors else "fast-acceptor-0"), procs
    assert ("mtls-acceptor-0" in starts) == bool(mtls_acceptors), starts


NEIGHBOUR_IP = "127.0.0.51"      # the certificate sender's /24, no certificate


def test_a_verified_sender_is_steered_away_from_the_strangers_process(
        tmp_path: Path, pki: dict[str, Path]) -> None:
    """Once the certificate sender has completed a verified handshake on the mTLS acceptor
    (the process that does strangers' handshakes), the kernel steers its address to the fast
    acceptor: its later messages are served there, never queued behind the strangers' accepts
    and handshakes. A client without a certificate from the same /24 (a neighbour, not the
    verified address) still lands on the mTLS acceptor and gets its alert there. Before: every
    connection to the mutual-TLS port was the mTLS acceptor's."""
    with Ingress(tmp_path, {
        "supervisor": {"acceptors": 1, "fast_acceptors": 1, "mtls_acceptors": 1},
        "classify": {"allow_cidrs": [f"{ALLOWED_IP}/32"]},
        "tls": tls_config(pki),
    }) as ing:
        port, ctx = mtls_port(ing), client_ctx(pki, "client")
        first, _, _ = smtp_tls(port, ctx, CERT_IP, make_body(0))
        served: list[str] = []
        deadline = time.monotonic() + 10.0
        for i in range(1, 40):           # bounded: steering follows within ~0.3 s
            reply, _, _ = smtp_tls(port, ctx, CERT_IP, make_body(i))
            assert reply.startswith("250 "), reply
            served = [e.get("proc") for e in ing.events("message") if e["peer"] == CERT_IP]
            if served[-1] == "fast-acceptor-0" or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        neighbour = handshake_outcome(port, client_ctx(pki, None), NEIGHBOUR_IP)
        time.sleep(0.3)
        failed = [e.get("proc") for e in ing.events("mtls_handshake_failed")
                  if e["peer"] == NEIGHBOUR_IP]
        allowed = asyncio.run(send_one(ing.port, make_body(99), source=ALLOWED_IP))[0]
    assert first.startswith("250 "), first
    assert served[0] == "mtls-acceptor-0", served
    assert served[-1] == "fast-acceptor-0", served
    assert neighbour == "alert: tlsv13 alert certificate required", neighbour
    assert failed == ["mtls-acceptor-0"], failed
    assert allowed == 250


SILENT_IPS = tuple(f"127.0.2.{i}" for i in range(1, 21))


def test_silent_strangers_the_gate_refuses_hold_no_slot(tmp_path: Path,
                                                        pki: dict[str, Path]) -> None:
    """The gate has no token left for strangers (rate 0.01/s, burst 1, no wait): 20 strangers
    connect and send nothing yet. They wait for their ClientHello parked, without a connection
    slot (the mTLS acceptor has 8), so the certificate sender, known but bulk until its
    handshake, still gets one and its message through; the strangers then get their alert
    (internal_error) at once when they speak. Before: each took a slot at accept (or was
    closed there, the slots full), and was closed without an alert to make room (a bare EOF)."""
    with Ingress(tmp_path, {
        "supervisor": {"acceptors": 1, "fast_acceptors": 1, "mtls_acceptors": 1},
        "listen": {"steer_operator": False},       # the known sender stays on this process
        "smtp": {"max_connections": 8, "fast_reserve": 1},
        "tls": tls_config(pki, stranger_handshake_rate=0.01, stranger_handshake_burst=1.0,
                          stranger_wait=0.0, handshake_timeout=10.0),
    }) as ing:
        port, ctx = mtls_port(ing), client_ctx(pki, "client")
        first, _, _ = smtp_tls(port, ctx, CERT_IP, make_body(0))   # the burst's token
        silent = [socket.create_connection(("127.0.0.1", port), timeout=10,
                                           source_address=(ip, 0)) for ip in SILENT_IPS]
        try:
            time.sleep(0.5)
            second, _, _ = smtp_tls(port, ctx, CERT_IP, make_body(1))
            outcomes = []
            for s in silent[:3]:           # speaking now: refused with the alert
                sctx = client_ctx(pki, None)
                try:
                    with sctx.wrap_socket(s, server_hostname="mx.test") as t:
                        outcomes.append("data" if t.recv(100) else "eof")
                except ssl.SSLError as e:
                    outcomes.append(str(e.reason).lower())
        finally:
            for s in silent:
                s.close()
    assert first.startswith("250 "), first
    assert second.startswith("250 "), second
    assert outcomes == ["tlsv1_alert_internal_error"] * 3, outcomes


def _policies(ing: Ingress) -> dict[str, int]:
    """Each child's scheduling policy, by its process title's role."""
    out = {}
    for pid in ing.children():
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        out[title.removeprefix("smtp-ingress: ")] = os.sched_getscheduler(pid)
    return out


@pytest.mark.parametrize(("mtls_acceptors", "fast_rr"), [(1, True), (0, False)])
def test_strangers_handshakes_never_run_at_real_time_priority(
        tmp_path: Path, pki: dict[str, Path], mtls_acceptors: int, fast_rr: bool) -> None:
    """The fast acceptors run at tiers.operator_policy (SCHED_RR) only while mTLS acceptors do
    the handshakes of clients without a certificate; without them (supervisor.mtls_acceptors =
    0) the fast acceptors do those handshakes, and run as ordinary processes: an attacker's
    handshake flood must never run before everything else on the machine."""
    with Ingress(tmp_path, {"tls": tls_config(pki),
                            "supervisor": {"mtls_acceptors": mtls_acceptors}}) as ing:
        got = _policies(ing)
    rr = os.SCHED_RR if realtime_allowed() else os.SCHED_OTHER   # not permitted: ordinary
    assert got["fast-acceptor-0"] == (rr if fast_rr else os.SCHED_OTHER), got
    assert got["worker-fast-0"] == rr, got
    assert all(policy == os.SCHED_OTHER for role, policy in got.items()
               if role.startswith(("acceptor-", "mtls-acceptor-"))), got
