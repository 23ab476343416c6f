"""The acceptor's SPF service (ingress.edge.spf_service) against the test kit's DNS server: what an
attacker with dead nameservers can and cannot hold (issue 17, build item 3, SPF).

In process (no ingress): SpfService.check as the acceptor calls it at MAIL FROM, the loopback
DNS server, names in `DNSServer.silent` that never answer. Client addresses are only strings
here (SPF evaluates them; nothing connects from them), so any network can be named.

Before the fix (one 4-thread pool per lane, a DNS wait blocking a thread, no cache of
timeouts, one backlog of 64) the legitimate checks below were refused or ran out their
deadline behind the attacker's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from ingress.core.config import ClassifyConfig, Config
from ingress.core.wire import Lane
from ingress.edge.spf_service import SpfService
from ingress.policy.classify import AuthResult
from tests.kit.dnsserver import DNSServer

pytestmark = pytest.mark.timeout(60)

GOOD = "good.test"
LEGIT_IPS = ("127.2.1.1", "127.2.2.1", "127.2.3.1")
DEADLINE = 1.5
DNS_TIMEOUT = 1.0


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer({
        GOOD: {"TXT": ["v=spf1 ip4:127.2.0.0/16 -all"]},
        # a legitimate domain whose record still uses the ptr mechanism
        "ptr.test": {"TXT": ["v=spf1 ip4:127.2.0.0/16 ptr -all"]},
        "8.9.9.10.in-addr.arpa": {"PTR": ["host.attacker.test."]},
        # answers its own record, then stalls on an include
        **{f"inc{i}.test": {"TXT": [f"v=spf1 include:sink{i}.test -all"]} for i in range(40)},
    }) as server:
        server.silent.update({"9.9.9.10.in-addr.arpa", "host.attacker.test"})
        server.silent.update(f"sink{i}.test" for i in range(40))
        server.silent.update(f"dead{i}.test" for i in range(300))
        server.silent.update(f"x{i}.evil.test" for i in range(300))
        yield server


def service(dns: DNSServer, **classify: object) -> SpfService:
    c = dataclasses.replace(ClassifyConfig(), spf_promote="any", nameservers=(dns.address,),
                            dns_timeout=DNS_TIMEOUT, spf_deadline=DEADLINE, **classify)
    return SpfService(dataclasses.replace(Config(), classify=c), Counter())


def net(i: int) -> str:
    """A client address in the i-th of many /24s."""
    return f"10.{i // 250}.{i % 250}.1"


async def legit_while(svc: SpfService, attack: list[tuple[str, str]]
                      ) -> tuple[list[tuple[AuthResult, str]], list[float],
                                 list[tuple[AuthResult, str]]]:
    """Start the attacker's checks ((ip, mail_from) each), then, once they are all waiting
    on DNS, the legitimate ones: (legit results, their durations, the attacker's results)."""
    bad = [asyncio.create_task(svc.check(ip, Lane.BULK, mf, "bot.test")) for ip, mf in attack]
    await asyncio.sleep(0.3)

    async def timed(ip: str, i: int) -> tuple[tuple[AuthResult, str], float]:
        t0 = time.monotonic()
        r = await svc.check(ip, Lane.BULK, f"alice{i}@{GOOD}", "mail.good.test")
        return r, time.monotonic() - t0

    legit = await asyncio.gather(*(timed(ip, i) for i, ip in enumerate(LEGIT_IPS)))
    return [r for r, _ in legit], [t for _, t in legit], list(await asyncio.gather(*bad))


def run_attack(svc: SpfService, attack: list[tuple[str, str]]
               ) -> tuple[list[tuple[AuthResult, str]], list[tuple[AuthResult, str]]]:
    try:
        legit, took, bad = asyncio.run(legit_while(svc, attack))
    finally:
        svc.shutdown()
    assert [r for r, _ in legit] == [AuthResult.PASS] * 3, legit
    # Not queued behind anyone's DNS: far inside the deadline (generous for a loaded box).
    assert max(took) < DEADLINE * 0.6, took
    assert {r for r, _ in bad} <= {AuthResult.TEMPERROR}, bad
    return legit, bad


def test_many_dead_domains_from_many_networks(dns: DNSServer) -> None:
    """200 domains whose nameserver never answers, each from its own /24: none of them holds a
    thread, and the backlog has room; three SPF-pass senders of another domain pass."""
    svc = service(dns)
    run_attack(svc, [(net(i), f"spam@dead{i}.test") for i in range(200)])


def test_dead_includes(dns: DNSServer) -> None:
    """40 domains that answer their own record and then stall on an include; each is then
    remembered as timed out (its next check costs no lookup)."""
    svc = service(dns)
    run_attack(svc, [(net(i), f"spam@inc{i}.test") for i in range(40)])
    before = len(dns.queries)
    res, why = asyncio.run(svc.check(net(99), Lane.BULK, "spam@inc7.test", "bot.test"))
    assert res is AuthResult.TEMPERROR and "timed out lately" in why, why
    assert len(dns.queries) == before
    assert svc.counters["spf_refused_timeout"] == 1


def test_one_dead_domain_many_sessions(dns: DNSServer) -> None:
    """The measured case: many sessions of one dead domain. Its checks beyond
    classify.spf_per_domain are refused at once, the admitted ones share one query, and once
    it has timed out it is answered from the cache of timeouts."""
    svc = service(dns)
    run_attack(svc, [(net(i), "spam@dead0.test") for i in range(36)])
    assert [q for q in dns.queries if q[0] == "dead0.test"] == [("dead0.test", "TXT", "udp")]
    assert svc.counters["spf_refused_domain"] == 36 - 16
    assert svc.gates[Lane.BULK].timed_out("dead0.test", time.monotonic())


def test_subdomains_are_one_domain(dns: DNSServer) -> None:
    """A wildcard zone's subdomains (x1.evil.test, x2.evil.test, ...) share the bound of their
    organisational domain: 16 lookups, not 300."""
    svc = service(dns)
    run_attack(svc, [(net(i), f"spam@x{i}.evil.test") for i in range(300)])
    asked = [q for q in dns.queries if q[0].endswith(".evil.test")]
    assert len(asked) == 16, len(asked)
    assert svc.counters["spf_refused_domain"] == 300 - 16
    res, why = asyncio.run(svc.check(net(7), Lane.BULK, "spam@x299.evil.test", "bot.test"))
    assert res is AuthResult.TEMPERROR and "evil.test" in why and "timed out" in why, why


def test_one_network_many_domains(dns: DNSServer) -> None:
    """A thousand domains from one /24 hold classify.spf_per_network checks, no more."""
    svc = service(dns)
    run_attack(svc, [(f"10.7.7.{i % 250 + 1}", f"spam@dead{i}.test") for i in range(100)])
    assert svc.counters["spf_refused_network"] == 100 - 8
    assert len([q for q in dns.queries if q[0].startswith("dead")]) == 8


def test_backlog_is_the_last_bound(dns: DNSServer) -> None:
    svc = service(dns, spf_backlog=50, spf_per_network=50)
    try:
        async def main() -> tuple[AuthResult, str]:
            bad = [asyncio.create_task(svc.check(net(i), Lane.BULK, f"s@dead{i}.test", "b"))
                   for i in range(50)]
            await asyncio.sleep(0.1)
            res = await svc.check(LEGIT_IPS[0], Lane.BULK, f"a@{GOOD}", "mail.good.test")
            await asyncio.gather(*bad)
            return res
        res, why = asyncio.run(main())
    finally:
        svc.shutdown()
    assert res is AuthResult.TEMPERROR and "too many checks under way" in why, why
    assert svc.counters["spf_refused_backlog"] == 1


def test_timeouts_are_remembered_for_a_while(dns: DNSServer) -> None:
    svc = service(dns, spf_timeout_ttl=1.0)
    try:
        async def main() -> list[tuple[AuthResult, str]]:
            out = [await svc.check(net(1), Lane.BULK, "s@dead5.test", "b")]
            out.append(await svc.check(net(2), Lane.BULK, "s@dead5.test", "b"))
            await asyncio.sleep(1.1)
            out.append(await svc.check(net(3), Lane.BULK, "s@dead5.test", "b"))
            return out
        first, cached, again = asyncio.run(main())
    finally:
        svc.shutdown()
    assert first[0] is AuthResult.TEMPERROR and "timeout" in first[1], first
    assert cached[0] is AuthResult.TEMPERROR and "timed out lately" in cached[1], cached
    assert again[0] is AuthResult.TEMPERROR and "timed out lately" not in again[1], again
    assert len([q for q in dns.queries if q[0] == "dead5.test"]) == 2


@pytest.mark.parametrize("attacker_ip", ["10.9.9.9", "10.9.9.8"])
def test_the_clients_reverse_dns_cannot_poison_a_domain(dns: DNSServer,
                                                        attacker_ip: str) -> None:
    """ptr.test's record uses the ptr mechanism. A client whose reverse DNS never answers
    (10.9.9.9), or whose PTR names a host that never answers (10.9.9.8), makes its own check
    a temperror, but ptr.test is not remembered as timed out: its senders still pass."""
    svc = service(dns)
    try:
        async def main() -> tuple[tuple[AuthResult, str], tuple[AuthResult, str]]:
            bad = await svc.check(attacker_ip, Lane.BULK, "spam@ptr.test", "bot.test")
            good = await svc.check(LEGIT_IPS[0], Lane.BULK, "alice@ptr.test", "mail.ptr.test")
            return bad, good
        bad, good = asyncio.run(main())
    finally:
        svc.shutdown()
    assert bad[0] is AuthResult.TEMPERROR, bad
    assert good[0] is AuthResult.PASS, good
    assert not svc.gates[Lane.BULK].timed_out("ptr.test", time.monotonic())
    assert svc.counters["spf_refused_timeout"] == 0


def test_results_are_cached_and_pools_stay_per_lane(dns: DNSServer) -> None:
    svc = service(dns)
    try:
        async def main() -> list[tuple[AuthResult, str]]:
            return [await svc.check(LEGIT_IPS[0], lane, f"a@{GOOD}", "mail.good.test")
                    for lane in (Lane.BULK, Lane.BULK, Lane.FAST)]
        results = asyncio.run(main())
    finally:
        svc.shutdown()
    assert [r for r, _ in results] == [AuthResult.PASS] * 3
    assert len([q for q in dns.queries if q[0] == GOOD]) == 1
    assert set(svc.pools) == set(Lane) and len({id(p) for p in svc.pools.values()}) == 2
