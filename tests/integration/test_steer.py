"""listen.steer_operator end to end: the kernel steers port-25 connections from the operator's
allow list to the fast acceptor's own socket (ingress.core.reuseport), so they are accepted
and served there, never on a port-25 acceptor's loop first (no hand-off); everyone else goes
to the port-25 acceptors. A reload re-attaches the program for the new allow list."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, make_body, send_one, wait_for
from tests.kit.scrape import metrics_port, scrape, value

ALLOWED = "127.0.0.20"
OTHER = "127.0.0.21"


def tables(steer: bool) -> dict[str, dict[str, object]]:
    return {"supervisor": {"acceptors": 2, "fast_acceptors": 1},
            "listen": {"steer_operator": steer},
            "classify": {"allow_cidrs": [f"{ALLOWED}/32"]},
            "metrics": {"listen": "127.0.0.1:0"}}


def served(ing: Ingress, peer: str) -> list[object]:
    return [e.get("proc") for e in ing.events("message") if e.get("peer") == peer]


@pytest.mark.parametrize("steer", [True, False])
def test_allow_listed_clients_are_accepted_by_the_fast_acceptor(tmp_path: Path,
                                                                steer: bool) -> None:
    with Ingress(tmp_path, tables(steer)) as ing:
        async def run() -> list[int]:
            out = []
            for i in range(6):
                out.append((await send_one(ing.port, make_body(i), source=ALLOWED))[0])
                out.append((await send_one(ing.port, make_body(10 + i), source=OTHER))[0])
            return out

        codes = asyncio.run(run())
        m = scrape(metrics_port(ing))
        assert codes == [250] * 12, codes
        assert served(ing, ALLOWED) == ["fast-acceptor-0"] * 6
        assert set(served(ing, OTHER)) <= {"acceptor-0", "acceptor-1"}, served(ing, OTHER)
        handed = value(m, "smtp_ingress_connections_total", lane="fast", outcome="handed_off")
        if steer:      # accepted where it is served: nothing to hand over
            assert ing.events("steer_operator")
            assert handed == 0, m
        else:
            assert not ing.events("steer_operator")
            assert handed == 6, m


def test_a_reload_steers_the_new_allow_list(tmp_path: Path) -> None:
    with Ingress(tmp_path, tables(True)) as ing:
        assert asyncio.run(send_one(ing.port, make_body(0), source=ALLOWED))[0] == 250
        ing.config.write_text(ing.config.read_text().replace(f"{ALLOWED}/32", f"{OTHER}/32"))
        ing.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not ing.events("reloaded") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ing.events("reloaded"), ing.log_tail()
        codes = [asyncio.run(send_one(ing.port, make_body(i), source=src))[0]
                 for i, src in enumerate((OTHER, OTHER, ALLOWED, ALLOWED), 1)]
        assert codes == [250] * 4, codes
        assert served(ing, OTHER) == ["fast-acceptor-0"] * 2, served(ing, OTHER)
        # the old fast acceptor served until its replacement was ready: steering stayed on
        # through the reload (re-attached for the new list), never off
        ons = [e.get("on") for e in ing.events("steering")]
        assert ons[ons.index(True):] == [True, True], ons
        assert set(served(ing, ALLOWED)[1:]) <= {"acceptor-0", "acceptor-1"}, \
            served(ing, ALLOWED)


LISTED = "127.0.0.22"      # on the DNS allow list, not in allow_cidrs


def rev(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


@pytest.mark.parametrize("steer", [True, False])
def test_a_dns_allow_listed_client_is_steered_from_its_next_connection(tmp_path: Path,
                                                                       steer: bool) -> None:
    """dnswl.steer: once a port-25 acceptor found a client on a DNS allow list, the kernel
    steers its next connections to the fast acceptor (never port 25's accept queue, where a
    flood's bots wait); a client on no list stays with the port-25 acceptors. Off: every
    connection of the listed client is accepted by a port-25 acceptor (promoted there)."""
    with DNSServer({"2.0.0.127.wl.test": {"A": ["127.0.0.2"]},
                    f"{rev(LISTED)}.wl.test": {"A": ["127.0.10.2"]}}) as dns, \
            Ingress(tmp_path, {"supervisor": {"acceptors": 2, "fast_acceptors": 1},
                               "classify": {"nameservers": [dns.address]},
                               "dnswl": {"sites": ["wl.test=127.0.[2..15].[0..3]"],
                                         "steer": steer}}) as ing:
        async def send(n: int, source: str) -> list[int]:
            return [(await send_one(ing.port, make_body(i), source=source))[0] for i in range(n)]

        assert asyncio.run(send(1, LISTED)) == [250]
        first = served(ing, LISTED)
        assert first and first[0] in ("acceptor-0", "acceptor-1"), first
        if steer:
            # (the supervisor logs steer_learned with ipv4=0 at start: wait for this client's)
            wait_for(lambda: any(e.get("ipv4") == 1 for e in ing.events("steer_learned")), 10,
                     "the supervisor steers it")
        assert asyncio.run(send(6, LISTED)) == [250] * 6
        assert asyncio.run(send(4, OTHER)) == [250] * 4
        later = served(ing, LISTED)[1:]
        if steer:
            assert later == ["fast-acceptor-0"] * 6, later
            assert ing.events("steer_learned")[-1].get("ipv4") == 1
        else:
            assert set(later) <= {"acceptor-0", "acceptor-1"}, later
            assert not ing.events("steer_learned")
        assert set(served(ing, OTHER)) <= {"acceptor-0", "acceptor-1"}, served(ing, OTHER)
        promoted = [e for e in ing.events("promoted") if e.get("peer") == LISTED]
        assert promoted and all(e.get("identity") == "dnswl:wl.test" for e in promoted)
