"""DMARC (issue 18 item 5) with real DNS (tests/kit/dnsserver.py: _dmarc records, a silent
one) and real signatures: a worker's Pipeline, then a running ingress whose spooled messages
carry dmarc= in Authentication-Results and dmarc/dmarc_policy in their evidence. We only
report: a message failing a p=reject policy is accepted (250) and stamped.

Also learning (item 5's "DMARC pass through aligned DKIM can be the condition"): the SPF pass
and the aligned DKIM pass must vouch for one organisation, the one learned."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from ingress.core.config import ClassifyConfig, Config
from ingress.core.schema_evidence import DmarcConfig
from ingress.core.wire import AuthResult, Envelope, Lane, WireEvidence
from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, send_one, split_trace
from workers.lane.pipeline import Pipeline

SPF = "v=spf1 ip4:127.0.0.0/8 -all"


@pytest.fixture(scope="module")
def dns(dkim_key: tuple[bytes, str]) -> Iterator[DNSServer]:
    with DNSServer({
        "sel._domainkey.good.test": {"TXT": [dkim_key[1]]},
        "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject; sp=none"]},
        "spf.test": {"TXT": [SPF]},
        "bounce.spf.test": {"TXT": [SPF]},
        "_dmarc.spf.test": {"TXT": ["v=spf1 -all", "v=DMARC1; p=quarantine; sp=reject"]},
        "_dmarc.victim.test": {"TXT": ["v=DMARC1; p=reject"]},
        "silent.test": {"TXT": [SPF]},
    }) as server:
        server.silent.add("_dmarc.silent.test")
        yield server


def message(author: str, subject: str = "s", key: bytes | None = None,
            d: str = "good.test") -> bytes:
    msg = (f"From: {author}\r\nTo: b@example.test\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject}@x.test>\r\n\r\nHello.\r\n").encode()
    if key is None:
        return msg
    return dkim.sign(msg, b"sel", d.encode(), key,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


def envelope(mail_from: str, spf: str = "", spf_domain: str = "") -> Envelope:
    now = time.time()
    ev = WireEvidence(spf=AuthResult(spf), spf_domain=spf_domain) if spf else WireEvidence()
    return Envelope(qid="Q1", lane=Lane.BULK, peer_ip="127.0.0.50", peer_port=1,
                    helo="spf.test", mail_from=mail_from, rcpts=("b@example.test",),
                    received_at=now, deadline=now + 30, evidence=ev)


def pipeline(dns: DNSServer, dmarc: DmarcConfig | None = None, **classify: object) -> Pipeline:
    c = dataclasses.replace(ClassifyConfig(), nameservers=(dns.address,), dns_timeout=1.0,
                            dkim_dns_budget=1.0, **classify)
    return Pipeline(dataclasses.replace(Config(), classify=c, dmarc=dmarc or DmarcConfig()))


def ar_of(trace: bytes) -> bytes:
    return trace.split(b"\r\nReceived", 1)[0]


@pytest.mark.parametrize("env, author, signed, line, policy", [
    # aligned DKIM (SPF proves another domain): pass, the From domain's own p
    (envelope("a@other.test", "none", "other.test"), "a@good.test", True,
     b"dmarc=pass (p=reject sp=none) header.from=good.test", "reject"),
    # aligned SPF, relaxed (bounce.spf.test / spf.test), no signature
    (envelope("b@bounce.spf.test", "pass", "bounce.spf.test"), "a@spf.test", False,
     b"dmarc=pass (p=quarantine sp=reject) header.from=spf.test", "quarantine"),
    # a subdomain author: the organisational domain's record, its sp applies
    (envelope("b@spf.test", "pass", "spf.test"), "a@news.spf.test", False,
     b"dmarc=pass (p=quarantine sp=reject) header.from=news.spf.test", "reject"),
    # forged: SPF passes for a domain of its own, nothing aligns: fail (p=reject, reported)
    (envelope("x@spf.test", "pass", "spf.test"), "ceo@victim.test", False,
     b"dmarc=fail (p=reject sp=reject) header.from=victim.test", "reject"),
    # a DKIM pass of another domain does not align either
    (envelope("x@spf.test", "pass", "spf.test"), "ceo@victim.test", True,
     b"dmarc=fail (p=reject sp=reject) header.from=victim.test", "reject"),
    # the null sender: SPF checked the HELO name (spf.test), which DMARC never uses
    (envelope("", "pass", "spf.test"), "a@spf.test", False,
     b"dmarc=fail (p=quarantine sp=reject) header.from=spf.test", "quarantine"),
    # no record anywhere: none; the author's spelling is canonical
    (envelope("a@spf.test", "pass", "spf.test"), "a@NoRecord.TEST", False,
     b"dmarc=none (no record) header.from=norecord.test", ""),
    # two From domains: permerror, nothing looked up
    (envelope("a@spf.test", "pass", "spf.test"), "a@good.test, b@victim.test", False,
     b"dmarc=permerror (multiple From)", ""),
])
def test_pipeline_reports_dmarc(dns: DNSServer, dkim_key: tuple[bytes, str], env: Envelope,
                                author: str, signed: bool, line: bytes, policy: str) -> None:
    key = dkim_key[0] if signed else None
    p = pipeline(dns).process(env, message(author, key=key), 5.0)
    ar = ar_of(p.trace)
    assert line in ar, ar
    assert ar.index(b"dkim=") < ar.index(b"dmarc="), ar          # after spf and dkim
    assert p.dmarc is not None
    assert str(p.dmarc.result) == line.split(b"=")[1].split(b" ")[0].strip().decode()
    assert p.dmarc.applied == policy
    stored = p.spool_envelope(env).evidence
    assert (stored.dmarc, stored.dmarc_policy) == (str(p.dmarc.result), policy)


def test_disabled_costs_nothing(dns: DNSServer) -> None:
    before = [q for q in dns.queries if q[0].startswith("_dmarc.")]
    env = envelope("a@spf.test", "pass", "spf.test")
    p = pipeline(dns, DmarcConfig(enabled=False)).process(env, message("a@victim.test"), 5.0)
    assert b"dmarc=" not in p.trace
    assert p.dmarc is None and p.spool_envelope(env).evidence.dmarc == ""
    assert [q for q in dns.queries if q[0].startswith("_dmarc.")] == before


def test_silent_policy_domain_costs_one_timeout_per_ttl(dns: DNSServer) -> None:
    """_dmarc.silent.test never answers: the first message waits its DNS budget (1 s) and gets
    temperror; the next ones, for that domain or any subdomain of it, are temperror at once
    and ask nothing (the worker's negative cache, by organisational domain)."""
    pipe = pipeline(dns)
    env = envelope("a@spf.test", "pass", "spf.test")
    t0 = time.monotonic()
    first = pipe.process(env, message("a@silent.test"), 5.0)
    assert time.monotonic() - t0 >= 0.7
    assert b"dmarc=temperror" in first.trace and b"header.from=silent.test" in first.trace
    asked = len([q for q in dns.queries if "silent.test" in q[0]])
    for author in ("a@silent.test", "b@x.silent.test"):
        t0 = time.monotonic()
        again = pipe.process(env, message(author), 5.0)
        assert time.monotonic() - t0 < 0.5
        assert again.dmarc is not None and again.dmarc.result == "temperror", again.trace
    assert len([q for q in dns.queries if "silent.test" in q[0]]) == asked
    assert len(pipe.dmarc.dead) == 1 if pipe.dmarc else False


def test_learning_needs_one_organisation(dns: DNSServer, dkim_key: tuple[bytes, str]) -> None:
    """SPF passes for spf.test, the aligned DKIM pass is good.test's: the two vouch for
    different organisations, so the client is not learned for spf.test (it was before: the
    signature proved nothing about the domain learned). Both of one domain: learned."""
    pipe = pipeline(dns, spf_promote="any")
    mixed = pipe.process(envelope("a@spf.test", "pass", "spf.test"),
                         message("a@good.test", key=dkim_key[0]), 5.0)
    assert [(r.domain, r.result, r.aligned) for r in mixed.dkim] == [("good.test", "pass", True)]
    assert b"dmarc=pass" in mixed.trace
    assert (mixed.learn, mixed.learn_domain) == (False, "")
    same = pipe.process(envelope("a@good.test", "pass", "good.test"),
                        message("a@good.test", key=dkim_key[0]), 5.0)
    assert (same.learn, same.learn_domain) == (True, "good.test")


def test_spooled_messages_carry_dmarc(tmp_path: Path, dns: DNSServer,
                                      dkim_key: tuple[bytes, str]) -> None:
    """A running ingress: pass through aligned DKIM, pass through aligned SPF, fail under
    p=reject (accepted and stamped: we only report), none, and a silent _dmarc name
    (temperror) sent together with a good message that it does not hold up."""
    tables = {"classify": {"nameservers": [dns.address], "dns_timeout": 3.0,
                           "dkim_dns_budget": 3.0, "dkim_deadline": 4.0,
                           "spf_promote": "any"}}
    sends = {
        "dkim": (message("a@good.test", "dkim", dkim_key[0]), "a@nospf.test"),
        "spf": (message("a@spf.test", "spf"), "b@bounce.spf.test"),
        "forged": (message("ceo@victim.test", "forged"), "x@spf.test"),
        "none": (message("a@norecord.test", "none"), "a@spf.test"),
    }
    with Ingress(tmp_path, tables) as ing:

        async def timed(body: bytes, sender: str) -> tuple[int, float]:
            t0 = time.monotonic()
            code, _ = await send_one(ing.port, body, sender=sender)
            return code, time.monotonic() - t0

        async def send_all() -> list[tuple[int, float]]:
            silent = asyncio.create_task(timed(message("a@silent.test", "silent"),
                                               "a@spf.test"))
            await asyncio.sleep(0.2)          # the silent message is in its lookup first
            others = await asyncio.gather(*(timed(b, s) for b, s in sends.values()))
            return [*others, await silent]

        replies = asyncio.run(send_all())
        assert [code for code, _ in replies] == [250] * 5, replies
        slowest_other, silent_took = max(t for _, t in replies[:-1]), replies[-1][1]
        assert silent_took >= 2.0, replies                      # it waited on its lookup
        assert slowest_other < silent_took - 1.0, replies       # nobody else did
        spooled = {}
        for entry in ing.spooled().values():
            trace, body = split_trace(entry.message)
            subject = body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            spooled[subject] = (trace["Authentication-Results"], entry.envelope["evidence"])
    expected = {
        "dkim": (b"dmarc=pass (p=reject sp=none) header.from=good.test", "pass", "reject"),
        "spf": (b"dmarc=pass (p=quarantine sp=reject) header.from=spf.test", "pass",
                "quarantine"),
        "forged": (b"dmarc=fail (p=reject sp=reject) header.from=victim.test", "fail",
                   "reject"),
        "none": (b"dmarc=none (no record) header.from=norecord.test", "none", ""),
        "silent": (b"dmarc=temperror", "temperror", ""),
    }
    for subject, (line, result, policy) in expected.items():
        ar, ev = spooled[subject]
        assert line in ar, (subject, ar)
        assert (ev["dmarc"], ev.get("dmarc_policy", "")) == (result, policy), (subject, ev)
    assert b"spf=pass smtp.mailfrom=bounce.spf.test" in spooled["spf"][0]


@pytest.mark.parametrize("author", ["a@spf.test", "a@nopolicy.test", "a@silent.test"])
def test_process_now_answers_from_the_cache_what_process_found(dns: DNSServer,
                                                               author: str) -> None:
    """Issue 20: an unsigned message is prepared on the worker's loop only when its DMARC
    policy lookups are answered without asking (the resolver's cache: a record, a cached
    NXDOMAIN; or a policy domain remembered as silent), and then exactly as process() would;
    a policy not yet looked up, or a signed message, is None at once (a pool thread's work)."""
    p = pipeline(dns)
    env = envelope("b@bounce.spf.test", "pass", "bounce.spf.test")
    msg = message(author, subject=author.replace("@", "-"))
    asked = len(dns.queries)
    assert p.process_now(env, msg, 10.0) is None                # nothing cached yet
    assert len(dns.queries) == asked                            # and nothing asked
    online = p.process(env, msg, 10.0)
    asked = len(dns.queries)
    assert p.process_now(env, msg, 10.0) == online
    assert p.process_now(env, b"DKIM-Signature: v=1; d=spf.test\r\n" + msg, 10.0) is None
    assert len(dns.queries) == asked
