"""Learning obeys the promotion policy (issue 8): a worker's Pipeline, with real DKIM signatures
verified against the real DNS server of tests/kit/dnsserver.py, learns an SPF-pass + aligned-DKIM
client only when classify.spf_promote would promote that domain, and says for which domain.

Issue 17 (Build 5, Measured 9 and 3/4), live: a learned network is fast only for the domain it
was learned for (another MAIL FROM domain from it is judged afresh: bulk without its own SPF);
mail from it failing SPF unlearns it everywhere (and in learned.json); one domain holds at most
classify.learned_per_domain networks. The Pipeline says when mail disowns a learned network
(should_unlearn), with real signatures, forged ones and key names that never answer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import dkim
import pytest

from ingress.core.config import ClassifyConfig, Config
from ingress.core.wire import AuthResult, Envelope, Lane, WireEvidence
from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, eventually, send_one
from workers.lane.pipeline import Pipeline

# learned.json is written this often (classify.learned_save_interval; 5 s by default): the tests
# that read it wait for a save, and several saves happen within each of their waits.
SAVE_INTERVAL = 0.5

@pytest.fixture(scope="module")
def dns(dkim_key: tuple[bytes, str]):
    with DNSServer({"sel._domainkey.good.test": {"TXT": [dkim_key[1]]},
                    "sel._domainkey.spammer.test": {"TXT": [dkim_key[1]]}}) as server:
        yield server


def signed(domain: str, pem: bytes) -> bytes:
    msg = (f"From: a@{domain}\r\nTo: b@example.test\r\nSubject: s\r\n"
           f"Message-ID: <1@{domain}>\r\n\r\nHello.\r\n").encode()
    return dkim.sign(msg, b"sel", domain.encode(), pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


def envelope(domain: str) -> Envelope:
    now = time.time()
    return Envelope(qid="Q1", lane=Lane.BULK, peer_ip="127.0.0.50", peer_port=1, helo="h",
                    mail_from=f"a@{domain}", rcpts=("b@example.test",), received_at=now,
                    deadline=now + 30,
                    evidence=WireEvidence(spf=AuthResult.PASS, spf_domain=domain))


def pipeline(dns: DNSServer, **classify: object) -> Pipeline:
    c = dataclasses.replace(ClassifyConfig(), nameservers=(dns.address,), dns_timeout=1.0,
                            **classify)
    return Pipeline(dataclasses.replace(Config(), classify=c))


@pytest.mark.parametrize("classify, domain, learn", [
    ({"spf_promote": "listed", "spf_domains": ("good.test",)}, "good.test", True),
    ({"spf_promote": "listed", "spf_domains": ("good.test",)}, "spammer.test", False),
    ({"spf_promote": "off"}, "good.test", False),
    ({"spf_promote": "any"}, "spammer.test", True),
])
def test_listed_learns_only_listed_domains(dns: DNSServer, dkim_key: tuple[bytes, str],
                                           classify: dict, domain: str, learn: bool) -> None:
    p = pipeline(dns, **classify).process(envelope(domain), signed(domain, dkim_key[0]), 5.0)
    assert any(r.aligned and r.result == "pass" for r in p.dkim), p.dkim   # real evidence
    assert p.learn is learn
    assert p.learn_domain == (domain if learn else "")


def test_idn_is_learned_under_its_a_label(dns: DNSServer, dkim_key: tuple[bytes, str]) -> None:
    """From: the U-label address, d= the A-label: aligned (canonical names), and learned for
    the A-label, whichever form the envelope's SPF domain came in (issue 17 build item 2)."""
    a_label = "xn--bcher-kva.test"
    dns.set(f"sel._domainkey.{a_label}", "TXT", [dkim_key[1]])
    msg = (f"From: a@B\u00fccher.test\r\nTo: b@example.test\r\nSubject: s\r\n"
           f"Message-ID: <1@{a_label}>\r\n\r\nHello.\r\n").encode()
    body = dkim.sign(msg, b"sel", a_label.encode(), dkim_key[0],
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg
    for spf_domain in (a_label, "b\u00fccher.test"):
        env = dataclasses.replace(envelope(a_label), evidence=WireEvidence(
            spf=AuthResult.PASS, spf_domain=spf_domain))
        p = pipeline(dns, spf_promote="listed", spf_domains=("b\u00fccher.test",)).process(
            env, body, 5.0)
        assert [(r.domain, r.result, r.aligned) for r in p.dkim] == [(a_label, "pass", True)]
        assert (p.learn, p.learn_domain) == (True, a_label)


def test_pipeline_stores_dkim_passes_for_the_relay(dns: DNSServer,
                                                   dkim_key: tuple[bytes, str]) -> None:
    """The worker stores the d= of every passing signature with the envelope (evidence
    "dkim_pass", canonical), replacing whatever the envelope came with: the relay's DSN policy
    (ingress.policy.dsn) reads it from the spool file, never from a header (issue 19)."""
    forged = dataclasses.replace(envelope("good.test"), evidence=WireEvidence(
        spf=AuthResult.PASS, spf_domain="good.test", dkim_pass=("victim.test",)))
    p = pipeline(dns).process(forged, signed("good.test", dkim_key[0]), 5.0)
    assert p.dkim_pass == ("good.test",)
    stored = p.spool_envelope(forged)
    # (issue 18: the DMARC result and policy are stored beside it; good.test publishes none)
    assert stored.evidence == WireEvidence(spf=AuthResult.PASS, spf_domain="good.test",
                                           dkim_pass=("good.test",), dmarc="none",
                                           dmarc_policy="")
    assert forged.evidence.dkim_pass == ("victim.test",)          # not changed in place
    tampered = signed("good.test", dkim_key[0]).replace(b"Hello.", b"Hullo.")
    p = pipeline(dns).process(forged, tampered, 5.0)
    assert [r.result for r in p.dkim] == ["fail"]
    assert p.spool_envelope(forged).evidence.dkim_pass == ()
    unsigned_env = envelope("good.test")
    p = pipeline(dns).process(unsigned_env, b"From: a@good.test\r\n\r\nHi\r\n", 5.0)
    assert p.spool_envelope(unsigned_env).evidence.dkim_pass == ()


def test_listed_learns_only_listed_domains_live(tmp_path: Path,
                                                dkim_key: tuple[bytes, str]) -> None:
    """The whole path: worker -> bulk broker's fan-out -> every acceptor -> learned.json. With
    spf_promote = "listed", a listed domain's client is learned (with its domain: the next
    connection's identity is learned:<domain>); a spammer with valid SPF and DKIM is not."""
    good_ip, spam_ip = "127.0.2.7", "127.0.1.7"
    with DNSServer({"good.test": {"TXT": [f"v=spf1 ip4:{good_ip} -all"]},
                    "spammer.test": {"TXT": [f"v=spf1 ip4:{spam_ip} -all"]},
                    "sel._domainkey.good.test": {"TXT": [dkim_key[1]]},
                    "sel._domainkey.spammer.test": {"TXT": [dkim_key[1]]}}) as dns:
        state = Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
        tables = {"classify": {"spf_promote": "listed", "spf_domains": ["good.test"],
                               "nameservers": [dns.address], "dns_timeout": 1.0,
                               "spf_deadline": 2.0, "learned_save_interval": SAVE_INTERVAL}}
        try:
            with Ingress(tmp_path, tables, state=state) as ing:
                for ip, domain in ((spam_ip, "spammer.test"), (good_ip, "good.test")):
                    code, text = asyncio.run(send_one(ing.port, signed(domain, dkim_key[0]),
                                                      source=ip, sender=f"a@{domain}"))
                    assert code == 250, text
                learned = state / "learned.json"
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not learned.exists():
                    time.sleep(0.2)
                time.sleep(1.0)     # the spammer's learn fact (if any) had time to arrive too
                entries = json.loads(learned.read_text())["entries"]
                assert good_ip in entries and entries[good_ip]["domain"] == "good.test"
                assert spam_ip not in entries
                # the learned client is fast at connect, as identity learned:good.test (for its
                # own domain: issue 17 made the entry vouch for good.test's senders only; this
                # sent other@elsewhere.test before, which is now judged afresh)
                code, text = asyncio.run(send_one(ing.port, signed("good.test", dkim_key[0]),
                                                  source=good_ip, sender="other@good.test"))
                assert code == 250, text
                idents = [e.envelope["evidence"].get("identity")
                          for e in ing.spooled().values() if e.envelope["peer_ip"] == good_ip]
                assert "learned:good.test" in idents, idents
        finally:
            shutil.rmtree(state, ignore_errors=True)


# --------------------------------------------------------------------------- issue 17

def unsigned(domain: str, subject: str) -> bytes:
    return (f"From: a@{domain}\r\nTo: b@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@{domain}>\r\n\r\nHello.\r\n").encode()


def signed_as(domain: str, pem: bytes, subject: str) -> bytes:
    msg = unsigned(domain, subject)
    return dkim.sign(msg, b"sel", domain.encode(), pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


@pytest.mark.parametrize("env_evidence, lane, body, why", [
    # rode the entry (fast as learned:good.test) without an aligned signature: it goes
    ({"learned": "good.test", "identity": "learned:good.test"}, Lane.FAST, "unsigned",
     "dkim-missing"),
    # rode it with a forged signature (the body changed after signing)
    ({"learned": "good.test", "identity": "learned:good.test"}, Lane.FAST, "tampered",
     "dkim-fail"),
    # its key name never answers: DNS trouble is nobody's evidence
    ({"learned": "good.test", "identity": "learned:good.test"}, Lane.FAST, "silent", ""),
    # a good signature: it stays
    ({"learned": "good.test", "identity": "learned:good.test"}, Lane.FAST, "signed", ""),
    # judged afresh for another domain, whose SPF fails: it goes
    ({"learned": "good.test", "spf": "fail", "spf_domain": "bad.test"}, Lane.BULK, "unsigned",
     "spf-fail"),
    # ... whose SPF says nothing: it stays
    ({"learned": "good.test", "spf": "none", "spf_domain": "other.test"}, Lane.BULK,
     "unsigned", ""),
    # not learned: nothing to unlearn
    ({"spf": "fail", "spf_domain": "bad.test"}, Lane.BULK, "tampered", ""),
])
def test_pipeline_unlearns_what_disowns_the_entry(dns: DNSServer, dkim_key: tuple[bytes, str],
                                                  env_evidence: dict, lane: Lane, body: str,
                                                  why: str) -> None:
    domain = "silent.test" if body == "silent" else "good.test"
    dns.silent.add("sel._domainkey.silent.test")
    msg = unsigned(domain, "u") if body == "unsigned" else signed_as(domain, dkim_key[0], "s")
    if body == "tampered":
        msg = msg.replace(b"Hello.", b"Buy now.")
    now = time.time()
    env = Envelope(qid="Q1", lane=lane, peer_ip="127.0.0.50", peer_port=1, helo="h",
                   mail_from=f"a@{domain}", rcpts=("b@example.test",), received_at=now,
                   deadline=now + 30, evidence=WireEvidence.from_wire(env_evidence))
    p = pipeline(dns, spf_promote="any", dkim_deadline=1.5).process(
        env, msg, 5.0)
    assert not p.learn
    assert p.unlearn == why, p.dkim


GOOD_IP, OTHER_SENDER = "127.0.5.7", "b@nodomain.test"


@pytest.fixture()
def live_dns(dkim_key: tuple[bytes, str]):
    with DNSServer({"good.test": {"TXT": [f"v=spf1 ip4:{GOOD_IP} -all"]},
                    "bad.test": {"TXT": ["v=spf1 -all"]},
                    "spammer.test": {"TXT": ["v=spf1 ip4:127.0.4.0/24 -all"]},
                    "sel._domainkey.good.test": {"TXT": [dkim_key[1]]},
                    "sel._domainkey.spammer.test": {"TXT": [dkim_key[1]]}}) as server:
        yield server


def live_tables(dns: DNSServer, **classify: object) -> dict:
    return {"classify": {"spf_promote": "any", "nameservers": [dns.address],
                         "dns_timeout": 1.0, "spf_deadline": 2.0,
                         "learned_save_interval": SAVE_INTERVAL, **classify}}


def learned_entries(state: Path) -> dict:
    try:
        return dict(json.loads((state / "learned.json").read_text())["entries"])
    except (OSError, ValueError, KeyError):
        return {}


def learn_live(ing: Ingress, state: Path, ip: str, domain: str, pem: bytes,
               subject: str) -> None:
    """SPF pass + aligned DKIM pass from `ip`: learned, and saved by acceptor 0."""
    code, text = asyncio.run(send_one(ing.port, signed_as(domain, pem, subject), source=ip,
                                      sender=f"a@{domain}"))
    assert code == 250, text
    assert eventually(lambda: ip in learned_entries(state)), learned_entries(state)


def envelope_of(ing: Ingress, subject: str) -> dict:
    for entry in ing.spooled().values():
        if f"Subject: {subject}\r\n".encode() in entry.message:
            return dict(entry.envelope)
    raise AssertionError(f"{subject!r} not spooled")


async def two_transactions(port: int, source: str, first: tuple[str, bytes],
                           second: tuple[str, bytes]) -> list[int]:
    """Two messages in one session (the learned client is handed to a fast acceptor)."""
    import aiosmtplib
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=15, start_tls=False,
                             local_hostname="client.test", source_address=(source, 0))
    await client.connect()
    try:
        codes = []
        for sender, body in (first, second):
            errors, _ = await client.sendmail(sender, ["b@example.test"], body)
            codes.append(0 if errors else 250)
        return codes
    finally:
        client.close()


def test_learned_network_is_fast_only_for_its_domain_live(tmp_path: Path, live_dns: DNSServer,
                                                          dkim_key: tuple[bytes, str]) -> None:
    """Measured 9: an IP learned for good.test, then a MAIL FROM of another domain (no SPF)
    from it: that transaction is bulk (judged afresh; reason learned-mismatch:good.test), and
    the next, from good.test, in the same session, is fast again as learned:good.test. A new
    session for good.test is fast at connect. The entry stays (nothing disowned it)."""
    state = Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
    try:
        with Ingress(tmp_path, live_tables(live_dns), state=state) as ing:
            learn_live(ing, state, GOOD_IP, "good.test", dkim_key[0], "learn")
            codes = asyncio.run(two_transactions(
                ing.port, GOOD_IP, (OTHER_SENDER, unsigned("nodomain.test", "other")),
                ("a@good.test", signed_as("good.test", dkim_key[0], "own"))))
            assert codes == [250, 250]
            other, own = envelope_of(ing, "other"), envelope_of(ing, "own")
            assert other["lane"] == "bulk", other
            assert "learned-mismatch:good.test" in other["evidence"]["reasons"], other
            assert "identity" not in other["evidence"]
            assert own["lane"] == "fast", own
            assert own["evidence"]["identity"] == "learned:good.test", own
            assert any(e.get("why") == "learned-mismatch" for e in ing.events("demoted"))
            code, text = asyncio.run(send_one(ing.port, signed_as("good.test", dkim_key[0], "next"),
                                              source=GOOD_IP, sender="c@good.test"))
            assert code == 250, text
            nxt = envelope_of(ing, "next")
            assert nxt["lane"] == "fast" and nxt["evidence"]["reasons"] == ["learned-allow"], nxt
            assert GOOD_IP in learned_entries(state)
            assert not ing.events("unlearned")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_learned_network_that_sends_spf_fail_is_unlearned_live(
        tmp_path: Path, live_dns: DNSServer, dkim_key: tuple[bytes, str]) -> None:
    """Measured 9 ("nothing unlearns an IP that later sends spam"): the learned IP sends mail
    whose SPF fails (MAIL FROM bad.test, -all): the worker's unlearn fact reaches every
    acceptor, acceptor 0 drops it from learned.json, and the next connection from that IP is
    not promoted at connect (its own SPF promotes it at MAIL FROM, as org:good.test)."""
    state = Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
    try:
        with Ingress(tmp_path, live_tables(live_dns), state=state) as ing:
            learn_live(ing, state, GOOD_IP, "good.test", dkim_key[0], "learn")
            code, text = asyncio.run(send_one(ing.port, unsigned("bad.test", "spam"),
                                              source=GOOD_IP, sender="x@bad.test"))
            assert code == 250, text
            spam = envelope_of(ing, "spam")
            assert spam["lane"] == "bulk" and spam["evidence"].get("spf") == "fail", spam
            assert eventually(lambda: ing.events("unlearned")), ing.log_tail()
            assert eventually(lambda: GOOD_IP not in learned_entries(state)), \
                learned_entries(state)
            code, text = asyncio.run(send_one(ing.port,
                                              signed_as("good.test", dkim_key[0], "after"),
                                              source=GOOD_IP, sender="a@good.test"))
            assert code == 250, text
            after = envelope_of(ing, "after")
            assert "learned-allow" not in ",".join(after["evidence"]["reasons"]), after
            assert after["evidence"].get("identity") == "org:good.test", after
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_one_domain_learns_at_most_its_quota_of_networks_live(
        tmp_path: Path, live_dns: DNSServer, dkim_key: tuple[bytes, str]) -> None:
    """Measured 3/4 (all 50 spam IPs learned): with classify.learned_per_domain = 2, a domain
    with SPF and DKIM that delivers from 3 networks holds its newest 2; the oldest is not
    learned any more (not promoted at connect)."""
    state = Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
    ips = ["127.0.4.1", "127.0.4.2", "127.0.4.3"]
    try:
        with Ingress(tmp_path, live_tables(live_dns, learned_per_domain=2),
                     state=state) as ing:
            for i, ip in enumerate(ips):
                learn_live(ing, state, ip, "spammer.test", dkim_key[0], f"spam{i}")
            assert eventually(lambda: ips[0] not in learned_entries(state))
            entries = learned_entries(state)
            held = sorted(k for k, v in entries.items() if v["domain"] == "spammer.test")
            assert held == ips[1:], entries
            code, text = asyncio.run(send_one(ing.port,
                                              signed_as("spammer.test", dkim_key[0], "old"),
                                              source=ips[0], sender="a@spammer.test"))
            assert code == 250, text
            assert "learned-allow" not in ",".join(envelope_of(ing, "old")["evidence"]["reasons"])
    finally:
        shutil.rmtree(state, ignore_errors=True)
