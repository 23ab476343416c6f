"""ingress.core.dns_client against the loopback DNS server (tests/kit/dnsserver.py): answers,
deadlines, shared queries, bounds per key and in all, the negative cache of timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from ingress.core.dns_client import DnsClient, Status
from ingress.core.resolver import make_resolver
from tests.kit.dnsserver import DNSServer


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer({
        "2.0.0.127.list.test": {"A": ["127.0.0.2"], "TXT": ["listed: see https://list.test"]},
        "1.0.0.127.in-addr.arpa": {"PTR": ["mail.example.test."]},
        "mail.example.test": {"A": ["127.0.0.1"], "MX": ["10 MX.Example.Test."]},
        "nodata.test": {"TXT": ["x"]},
    }) as server:
        server.silent.update({"dead.test", "0.dead.test", "1.dead.test", "9.dead.test",
                              "x.dead.test", "y.dead.test"})
        server.servfail.add("broken.test")
        yield server


def client(dns: DNSServer, **kw: object) -> DnsClient:
    return DnsClient(make_resolver([dns.address], 1.0), **kw)  # type: ignore[arg-type]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_answers_as_text(dns: DNSServer) -> None:
    async def main() -> None:
        c = client(dns)
        a = await c.query("2.0.0.127.list.test", "A", timeout=1.0)
        assert (a.status, a.records, a.found) == (Status.OK, ("127.0.0.2",), True)
        t = await c.query("2.0.0.127.list.test", "TXT", timeout=1.0)
        assert t.records == ("listed: see https://list.test",)
        p = await c.query("1.0.0.127.in-addr.arpa", "PTR", timeout=1.0)
        assert p.records == ("mail.example.test",)
        m = await c.query("mail.example.test", "MX", timeout=1.0)
        assert m.records == ("mx.example.test",)
        assert (await c.query("nothere.test", "A", timeout=1.0)).status is Status.NXDOMAIN
        assert (await c.query("nodata.test", "A", timeout=1.0)).status is Status.NODATA
        e = await c.query("broken.test", "A", timeout=1.0)
        assert (e.status, e.temporary) == (Status.ERROR, True)
    run(main())


def test_a_silent_name_costs_one_query_per_ttl(dns: DNSServer) -> None:
    async def main() -> None:
        c = client(dns, timeout_ttl=60.0)
        before = sum(1 for q in dns.queries if q[0] == "dead.test")
        t0 = time.monotonic()
        answers = await asyncio.gather(*(c.query("dead.test", "A", timeout=0.3)
                                         for _ in range(20)))
        assert all(a.status is Status.TIMEOUT for a in answers)
        assert time.monotonic() - t0 < 2.0          # each waiter kept its deadline
        await asyncio.sleep(0.8)                    # the shared query's own lifetime ends
        assert c.timed_out("dead.test", "A")
        again = await c.query("DEAD.test.", "A", timeout=1.0)
        assert again.status is Status.TIMEOUT
        sent = sum(1 for q in dns.queries if q[0] == "dead.test") - before
        assert 1 <= sent <= 2                       # one query (a UDP retry at most)
        assert c.pending == 0
    run(main())


def test_bounds_per_key_and_in_all(dns: DNSServer) -> None:
    async def main() -> None:
        c = client(dns, per_key=2, backlog=3, timeout_ttl=0)
        slow = [asyncio.ensure_future(c.query(f"{i}.dead.test", "A", timeout=0.5, key="z"))
                for i in range(2)]
        await asyncio.sleep(0.05)
        assert c.in_flight("z") == 2
        busy = await c.query("9.dead.test", "A", timeout=0.5, key="z")
        assert busy.status is Status.BUSY
        # a query already under way is joined, not refused
        joined = asyncio.ensure_future(c.query("0.dead.test", "A", timeout=0.5, key="z"))
        other = asyncio.ensure_future(c.query("x.dead.test", "A", timeout=0.5, key="y"))
        await asyncio.sleep(0.05)
        assert (await c.query("y.dead.test", "A", timeout=0.5, key="w")).status is Status.BUSY
        for f in (*slow, joined, other):
            assert (await f).status is Status.TIMEOUT
        await asyncio.sleep(0.6)
        assert c.pending == 0 and c.in_flight("z") == 0
        ok = await c.query("2.0.0.127.list.test", "A", timeout=1.0, key="z")
        assert ok.found
    run(main())


def test_replies_that_do_not_match_the_query_are_dropped(dns: DNSServer) -> None:
    """An off-path spoofer's reply (another ID, another question, another sender) is never
    taken for the answer: the query waits for the real one (ingress.core.dns_udp)."""
    import socket

    from ingress.core.dns_udp import UdpTransport

    async def main() -> None:
        # a fake "server" that answers every query twice wrongly, then right
        fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fake.bind(("127.0.0.1", 0))
        fake.setblocking(False)
        loop = asyncio.get_running_loop()
        udp = UdpTransport([("127.0.0.1", fake.getsockname()[1])])
        pending = asyncio.ensure_future(udp.query("2.0.0.127.list.test", "A", 2.0))
        data, addr = await loop.sock_recvfrom(fake, 512)
        import dns.message
        import dns.rrset
        q = dns.message.from_wire(data)
        good = dns.message.make_response(q)
        good.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "127.0.0.2"))
        wrong_id = dns.message.make_response(q)
        wrong_id.id = (q.id + 1) % 65536
        wrong_id.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A",
                                                   "127.0.0.9"))
        other = dns.message.make_query("evil.test", "A")
        other.id = q.id
        wrong_q = dns.message.make_response(other)
        wrong_q.answer.append(dns.rrset.from_text("evil.test.", 60, "IN", "A", "127.0.0.9"))
        spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        spoofer.bind(("127.0.0.2", 0))
        forged = dns.message.make_response(q)
        forged.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "127.0.0.9"))
        spoofer.sendto(forged.to_wire(), addr)                 # right ID, wrong sender
        fake.sendto(wrong_id.to_wire(), addr)
        fake.sendto(wrong_q.to_wire(), addr)
        fake.sendto(b"\x00" * 5, addr)                         # not DNS at all
        await asyncio.sleep(0.1)
        assert not pending.done()
        fake.sendto(good.to_wire(), addr)
        reply = await pending
        assert reply is not None and reply.records == ("127.0.0.2",)
        udp.close()
        fake.close()
        spoofer.close()
    run(main())


def test_answers_are_kept_for_their_ttl(dns: DNSServer) -> None:
    async def main() -> None:
        c = client(dns)
        before = len(dns.queries)
        for _ in range(5):
            assert (await c.query("2.0.0.127.list.test", "A", timeout=1.0)).found
            assert (await c.query("nothere2.test", "A", timeout=1.0)).status is Status.NXDOMAIN
        assert len(dns.queries) - before == 2            # one query each, then the cache
    run(main())


def test_a_burst_of_queries_opens_a_few_sockets(dns: DNSServer) -> None:
    """A burst of queries (a botnet's new addresses) shares the transport's few sockets: it
    never opens one per query (which leaked descriptors until the acceptor stopped
    accepting)."""
    import psutil

    async def main() -> None:
        c = client(dns, per_key=10000, backlog=10000)
        me = psutil.Process()
        before = me.num_fds()
        answers = await asyncio.gather(*(c.query(f"{i}.burst.test", "A", timeout=2.0)
                                         for i in range(600)))
        got = {a.status for a in answers}
        # the test server may drop some of a burst (its UDP buffer): timeouts, never errors
        assert Status.NXDOMAIN in got and got <= {Status.NXDOMAIN, Status.TIMEOUT}, got
        assert me.num_fds() - before <= 8, me.num_fds() - before
        c.udp.close()
    run(main())


def test_a_cancelled_asker_leaves_no_query_and_no_remembered_timeout(dns: DNSServer) -> None:
    """The first asker runs the query itself (no task per query): cancelled (its connection
    went), the ones that joined it get a timeout at once, and the name is not remembered as
    timed out (nobody saw it time out)."""
    async def main() -> None:
        c = client(dns, timeout_ttl=60.0)
        first = asyncio.ensure_future(c.query("x.dead.test", "A", timeout=5.0, key="k"))
        await asyncio.sleep(0.05)
        joiner = asyncio.ensure_future(c.query("x.dead.test", "A", timeout=5.0, key="k"))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        first.cancel()
        answer = await joiner
        assert answer.status is Status.TIMEOUT and time.monotonic() - t0 < 1.0
        assert not c.timed_out("x.dead.test", "A")
        assert c.pending == 0 and c.in_flight("k") == 0
    run(main())
