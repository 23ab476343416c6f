"""The fast lane's workers dedicated to the self-proven tier (tiers.self_proven_workers, issue
17: operator-tier latency isolated from self-proven traffic): a real supervisor, brokers and
workers on loopback, SPF against the test kit's DNS server.

The self-proven tier's mail is written by the dedicated worker, at tiers.self_proven_nice, and
the operator's never is; with none configured every fast worker takes every tier, as before.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, send_one, wait_for

ALLOWED = "127.0.0.20"
SPF_SENDER = "127.0.0.21"


@pytest.fixture(scope="module")
def dns():
    with DNSServer({"good.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}}) as server:
        yield server


def tables(dns: DNSServer, dedicated: int) -> dict[str, dict[str, Any]]:
    return {
        "classify": {"spf_promote": "any", "nameservers": [dns.address], "dns_timeout": 1.0,
                     "spf_deadline": 2.0, "allow_cidrs": [f"{ALLOWED}/32"]},
        "tiers": {"self_proven_workers": dedicated, "self_proven_nice": 7},
        "supervisor": {"acceptors": 1},
        "log": {"level": "debug"},
    }


def body(subject: str) -> bytes:
    return (f"From: a@good.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}.{time.time_ns()}@good.test>\r\n\r\nHello.\r\n").encode()


def who_spooled(ing: Ingress) -> dict[str, tuple[str, str]]:
    """qid -> (the acceptor's tier for it, the process that wrote it)."""
    tiers = {e["qid"]: e.get("tier", "") for e in ing.events("message") if e.get("qid")}
    return {e["qid"]: (tiers.get(e["qid"], ""), e["proc"]) for e in ing.events("spooled")
            if e["qid"] in tiers}


def send_both(ing: Ingress, n: int = 3) -> dict[str, tuple[str, str]]:
    async def go() -> None:
        for i in range(n):
            assert (await send_one(ing.port, body(f"op{i}"), source=ALLOWED,
                                   sender="a@good.test"))[0] == 250
            assert (await send_one(ing.port, body(f"sp{i}"), source=SPF_SENDER,
                                   sender="a@good.test"))[0] == 250
    asyncio.run(go())
    def all_spooled() -> dict[str, tuple[str, str]] | None:
        w = who_spooled(ing)
        return w if len(w) >= 2 * n else None
    return wait_for(all_spooled, 15.0, "the spooled lines")


def test_self_proven_mail_is_written_by_its_own_niced_worker(tmp_path: Path,
                                                             dns: DNSServer) -> None:
    with Ingress(tmp_path, tables(dns, 1)) as ing:
        wait_for(lambda: len([e for e in ing.events("worker_ready")
                              if e.get("lane") == "fast"]) >= 2 or None, 15.0, "fast workers")
        seen = send_both(ing)
        by_tier: dict[str, set[str]] = {}
        for tier, proc in seen.values():
            by_tier.setdefault(tier, set()).add(proc)
        assert by_tier == {"operator": {"worker-fast-0"},
                           "self-proven": {"worker-fast-self-proven-0"}}, seen
        base = psutil.Process(ing.pid).nice()
        nice = {kind: [psutil.Process(p).nice() - base for p in ing.children(kind)]
                for kind in ("worker-fast", "worker-self-proven")}
        assert nice == {"worker-fast": [0], "worker-self-proven": [7]}, nice
        ready = [e for e in ing.events("worker_ready") if e.get("lane") == "fast"]
        assert sorted(e.get("serves") for e in ready) == ["", "self-proven"], ready


def test_without_dedicated_workers_every_fast_worker_takes_every_tier(
        tmp_path: Path, dns: DNSServer) -> None:
    with Ingress(tmp_path, tables(dns, 0)) as ing:
        seen = send_both(ing, 2)
        assert {tier for tier, _ in seen.values()} == {"operator", "self-proven"}, seen
        assert {proc for _, proc in seen.values()} == {"worker-fast-0"}, seen
