"""SPF lookups that stall hold nobody else's mail (issue 17, measured item 6), end to end.

A real ingress, the test kit's DNS server on loopback, and a sender domain whose nameserver
never answers (its names are in `DNSServer.silent`). Many bulk sessions, each from its own
client network, use that domain in MAIL FROM; a moment later three legitimate senders of
another domain, whose SPF passes, arrive, each from its own loopback address. All three are
promoted to the fast lane (spf=pass in their trace), and the dead domain's lookups run a few
times, not once per session.

Before the fix (one 4-thread pool per lane, pyspf blocking a thread per DNS wait, no cache of
timeouts) the dead domain's checks held every thread for most of their deadline, the
legitimate checks queued behind them and ran out their own, and the senders stayed bulk.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, send_one, short_message, split_trace

pytestmark = pytest.mark.timeout(90)

DEAD = "dead.test"
GOOD = "good.test"
DEAD_SESSIONS = 36
LEGIT_SOURCES = ("127.2.1.1", "127.2.2.1", "127.2.3.1")


def message(subject: str, sender: str) -> bytes:
    return short_message(subject, sender, msgid_domain="spf.test")


@pytest.fixture
def dns_server():
    with DNSServer({GOOD: {"TXT": ["v=spf1 ip4:127.2.0.0/16 -all"]},
                    DEAD: {"TXT": ["v=spf1 -all"]}}) as server:
        server.silent.add(DEAD)
        yield server


def test_a_dead_sender_domain_does_not_starve_spf_pass_senders(
        tmp_path: Path, dns_server: DNSServer) -> None:
    with Ingress(tmp_path, {
        "classify": {"spf_promote": "any", "nameservers": [dns_server.address],
                     "dns_timeout": 1.0, "spf_deadline": 1.5},
    }) as ing:
        async def run() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
            # Each dead-domain session from its own /24: the per-network bound is not what
            # holds them here, the per-domain one and the cache of timeouts are.
            dead = [asyncio.create_task(send_one(
                ing.port, message(f"dead{i}", f"spam{i}@{DEAD}"), sender=f"spam{i}@{DEAD}",
                source=f"127.1.{i + 1}.1", timeout=20)) for i in range(DEAD_SESSIONS)]
            await asyncio.sleep(0.5)        # their MAIL FROMs are in, their lookups waiting
            legit = await asyncio.gather(*(
                send_one(ing.port, message(f"legit{i}", f"alice{i}@{GOOD}"),
                         sender=f"alice{i}@{GOOD}", source=src, timeout=20)
                for i, src in enumerate(LEGIT_SOURCES)))
            return list(legit), list(await asyncio.gather(*dead))

        legit, dead = asyncio.run(run())
        assert all(code == 250 for code, _ in legit), legit
        # The dead domain's senders are served too (as bulk: temperror never rejects).
        assert all(code == 250 for code, _ in dead), dead

        lanes: dict[str, tuple[str, bytes]] = {}
        for entry in ing.spooled().values():
            trace, body = split_trace(entry.message)
            subject = body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            lanes[subject] = (str(entry.envelope["lane"]), trace["Authentication-Results"])
        for i in range(len(LEGIT_SOURCES)):
            lane, ar = lanes[f"legit{i}"]
            assert lane == "fast", (i, lane, ar)
            assert f"spf=pass smtp.mailfrom={GOOD}".encode() in ar, ar
        for i in range(DEAD_SESSIONS):
            lane, ar = lanes[f"dead{i}"]
            assert lane == "bulk", (i, lane)
            assert b"spf=temperror" in ar, ar

        # The dead domain was asked a few times (its first lookups per acceptor, at most two
        # at once), not once per session: the rest were answered from the cache of timeouts
        # or refused over the domain's bound.
        asked = [q for q in dns_server.queries if q[0] == DEAD]
        assert len(asked) <= 8, asked
        reasons = {e.get("reason") for e in ing.events("spf_refused")}
        assert reasons & {"timeout", "domain"}, reasons
