"""No DKIM lookup holds anyone else's mail (issue 17, Measured 5 / Build 3): a real ingress with
one fast worker, a real DNS server (tests/kit/dnsserver.py) whose DKIM key names never answer.

Before: a worker acknowledged nothing in a batch until its slowest DKIM check ended (up to
classify.dkim_deadline) and took no new work meanwhile. So an allow-listed message sent right
after one carrying dead-key signatures waited out that message's DKIM deadline (measured
here: 3.1 s behind a 3 s deadline; now 0.01-0.05 s). Now each message is acknowledged when its
own pipeline is done and it is durable, and the worker keeps taking work while a slow check
runs. A key lookup that got no answer marks its signing domain for a while
(workers.lane.dkim_check.DeadKeyDomains), so the next message naming it costs no wait. The lookups
of one message share a DNS budget, aligned signatures first (ingress.policy.dkim_budget).

The slow message arrives either from the allow-listed forwarder itself (spf_promote off) or
from an SPF-promoted domain: both were measured (0.8-5.3 s for the allow-listed sender).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, send_one, short_message, split_trace
from workers.lane import dkim_check
from workers.lane.dkim_check import DeadKeyDomains, DkimResult, verify_dkim

TRUSTED_IP = "127.0.0.1"          # allow-listed (the sender we protect; also the forwarder)
SPF_IP = "127.0.0.2"              # SPF pass for spam.test (promoted when spf_promote is "any")
DEADLINE = 3.0                    # classify.dkim_deadline
DNS_TIMEOUT = 1.0                 # classify.dns_timeout: one key lookup
DEAD = ("dead.test", "dead2.test", "dead3.test")    # signing domains whose keys never answer
SUBS = ("x1.rot.test", "x2.rot.test")                # subdomains of one silent domain


@pytest.fixture(scope="module")
def pem(dkim_key: tuple[bytes, str]) -> bytes:
    return dkim_key[0]


@pytest.fixture(scope="module")
def dns(dkim_key: tuple[bytes, str]) -> Iterator[DNSServer]:
    with DNSServer({"spam.test": {"TXT": ["v=spf1 ip4:127.0.0.2 -all"]},
                    "a._domainkey.good.test": {"TXT": [dkim_key[1]]}}) as server:
        for d in DEAD + SUBS:
            server.silent.update({f"a._domainkey.{d}", f"b._domainkey.{d}"})
        yield server


def dead_signed(subject: str, pem: bytes, signers: list[tuple[str, str]],
                author: str = "dead.test") -> bytes:
    """A message from `author` signed by each (selector, domain) of `signers`, the first
    outermost."""
    msg = (f"From: x@{author}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject}@{author}>\r\n\r\nHello.\r\n").encode()
    for sel, domain in reversed(signers):
        msg = dkim.sign(msg, sel.encode(), domain.encode(), pem,
                        include_headers=[b"from", b"to", b"subject"]) + msg
    return msg


def plain(subject: str) -> bytes:
    return short_message(subject, "a@trusted.test", msgid_domain="trusted.test")


def dead_queries(dns: DNSServer) -> int:
    return sum(1 for name, _, _ in dns.queries if "._domainkey.dead" in name)


def auth_results(ing: Ingress, subject: str) -> bytes:
    for entry in ing.spooled().values():
        trace, body = split_trace(entry.message)
        if f"Subject: {subject}\r\n".encode() in body:
            return trace["Authentication-Results"]
    raise AssertionError(f"{subject!r} not spooled")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("via", ["forwarder", "spf"])
def test_dead_dkim_keys_do_not_hold_up_the_allow_listed(tmp_path: Path, dns: DNSServer,
                                                        pem: bytes, via: str) -> None:
    tables = {
        "classify": {"allow_cidrs": [f"{TRUSTED_IP}/32"], "nameservers": [dns.address],
                     "dns_timeout": DNS_TIMEOUT, "dkim_deadline": DEADLINE,
                     "spf_promote": "any" if via == "spf" else "off", "spf_deadline": 2.0},
        "lanes.fast": {"workers": 1},           # one fast worker: head-of-line is deterministic
    }
    source, sender = (TRUSTED_IP, "fwd@list.test") if via == "forwarder" else \
        (SPF_IP, "x@spam.test")
    signers = [("a", d) for d in DEAD]
    with Ingress(tmp_path, tables) as ing:
        async def scenario() -> dict[str, object]:
            before = dead_queries(dns)
            t_slow = time.monotonic()
            slow = asyncio.create_task(send_one(ing.port, dead_signed("slow", pem, signers),
                                                sender=sender, source=source))
            # The slow message is in the fast worker once its first key lookup is asked.
            limit = time.monotonic() + 15
            while dead_queries(dns) == before and time.monotonic() < limit:
                await asyncio.sleep(0.01)
            assert dead_queries(dns) > before, "the dead-key message never reached a worker"
            t0 = time.monotonic()
            fast = await send_one(ing.port, plain("allowed"), sender="a@trusted.test",
                                  source=TRUSTED_IP)
            fast_s = time.monotonic() - t0
            slow_done = slow.done()
            slow_reply = await slow
            return {"fast": fast, "fast_s": fast_s, "slow": slow_reply,
                    "slow_done_first": slow_done, "slow_s": time.monotonic() - t_slow}

        r = asyncio.run(scenario())
        print(f"{via}: allow-listed message behind a dead-key DKIM message: "
              f"{r['fast_s']:.3f}s (slow message {r['slow_s']:.2f}s)")
        assert r["fast"][0] == 250, r
        assert r["slow"][0] == 250, r           # the slow message is stored and acked too
        assert r["fast_s"] < DEADLINE / 2, r
        assert not r["slow_done_first"], r      # acked before the slow one
        ar = auth_results(ing, "slow")
        assert ar.count(b"dkim=temperror") == len(DEAD), ar
        assert b"dkim=pass" not in ar, ar
        if via == "spf":
            assert b"spf=pass" in ar, ar

        # The next message naming the same dead key domain (another selector, even) waits for
        # nothing: the timeout is remembered per signing domain.
        before = dead_queries(dns)
        t0 = time.monotonic()
        again = asyncio.run(send_one(ing.port, dead_signed("again", pem,
                                                           [("b", "dead.test"),
                                                            ("a", "dead.test")]),
                                     sender=sender, source=source))
        again_s = time.monotonic() - t0
        print(f"{via}: second message with the same dead key domain: {again_s:.3f}s")
        assert again[0] == 250, again
        assert dead_queries(dns) == before, dns.queries[-4:]      # not asked again
        ar = auth_results(ing, "again")
        assert ar.count(b"dkim=temperror") == 2, ar
        assert ar.count(b"dead.test did not answer recently") == 2, ar
        # The worker waited for no lookup: its ack came sooner than one key lookup's timeout
        # (the acceptor's DATA-to-ack time; the whole session took about 0.05 s unloaded).
        qid = again[1].rsplit(" ", 1)[1]
        (event,) = [e for e in ing.events("message") if e.get("qid") == qid]
        assert event["ack_ms"] < DNS_TIMEOUT * 1000, event


# --------------------------------------------------------------------------- verify_dkim alone

LOOKUP = 0.5                      # one key lookup in the tests below (classify.dns_timeout)


def queries_for(dns: DNSServer, domain: str) -> int:
    return sum(1 for name, _, _ in dns.queries if name.endswith("._domainkey." + domain))


def test_a_message_waits_at_most_its_dns_budget(dns: DNSServer, pem: bytes) -> None:
    """Three dead signing domains, a budget of two lookups: the third is not even asked."""
    resolver = dkim_check.make_resolver([dns.address], timeout=LOOKUP)
    before = queries_for(dns, "dead3.test")
    t0 = time.monotonic()
    report = verify_dkim(dead_signed("budget", pem, [("a", d) for d in DEAD]),
                         resolver=resolver, timeout=LOOKUP, deadline_s=5.0,
                         dns_budget=2 * LOOKUP, dead=DeadKeyDomains())
    took = time.monotonic() - t0
    assert [r.result for r in report.results] == [DkimResult.TEMPERROR] * 3
    assert "DNS time of the message exhausted" in report.results[2].reason, report
    assert queries_for(dns, "dead3.test") == before
    assert 2 * LOOKUP * 0.9 < took < 2 * LOOKUP + 1.0, took


def test_the_aligned_signature_is_judged_first(dns: DNSServer, pem: bytes) -> None:
    """Dead third-party signatures above the author's own: the author's is judged first, so
    they cannot use up its time (a budget of one lookup here)."""
    resolver = dkim_check.make_resolver([dns.address], timeout=LOOKUP)
    dead = DeadKeyDomains()
    msg = dead_signed("aligned", pem, [("a", "dead.test"), ("a", "dead2.test"),
                                       ("a", "good.test")], author="good.test")
    report = verify_dkim(msg, resolver=resolver, timeout=LOOKUP, deadline_s=5.0,
                         dns_budget=LOOKUP, dead=dead)
    assert [(r.domain, r.result) for r in report.results] == [
        ("dead.test", DkimResult.TEMPERROR), ("dead2.test", DkimResult.TEMPERROR),
        ("good.test", DkimResult.PASS)], report
    assert report.aligned_pass
    # dead.test had most of a lookup's time after the healthy one: it is remembered;
    # dead2.test got none: nothing is concluded about it.
    assert dead.is_dead("dead.test") and not dead.is_dead("dead2.test")


def test_a_lookup_cut_short_marks_nothing(dns: DNSServer, pem: bytes) -> None:
    resolver = dkim_check.make_resolver([dns.address], timeout=LOOKUP)
    dead = DeadKeyDomains()
    report = verify_dkim(dead_signed("short", pem, [("a", "dead.test"), ("a", "dead2.test")]),
                         resolver=resolver, timeout=LOOKUP, deadline_s=5.0,
                         dns_budget=1.4 * LOOKUP, dead=dead)
    assert [r.result for r in report.results] == [DkimResult.TEMPERROR] * 2
    assert dead.is_dead("dead.test")
    assert not dead.is_dead("dead2.test")       # it had 0.4 of a lookup: inconclusive


def test_a_fresh_subdomain_of_a_dead_domain_costs_nothing(dns: DNSServer, pem: bytes) -> None:
    """A sender who delegates its subdomains to a silent server cannot make up a new one per
    message: the timeout is remembered for the organisational domain."""
    resolver = dkim_check.make_resolver([dns.address], timeout=LOOKUP)
    dead = DeadKeyDomains()
    first = verify_dkim(dead_signed("rot1", pem, [("a", SUBS[0])], author=SUBS[0]),
                        resolver=resolver, timeout=LOOKUP, dns_budget=LOOKUP, dead=dead)
    assert [r.result for r in first.results] == [DkimResult.TEMPERROR]
    before = queries_for(dns, SUBS[1])
    t0 = time.monotonic()
    second = verify_dkim(dead_signed("rot2", pem, [("a", SUBS[1])], author=SUBS[1]),
                         resolver=resolver, timeout=LOOKUP, dns_budget=LOOKUP, dead=dead)
    assert time.monotonic() - t0 < LOOKUP / 2
    assert [r.result for r in second.results] == [DkimResult.TEMPERROR]
    assert "rot.test did not answer recently" in second.results[0].reason, second
    assert queries_for(dns, SUBS[1]) == before
