"""Provider identities in the worker (workers.lane.pipeline) with real DKIM signatures against
the loopback DNS server: a learned client is learned with its verified provider; mail that rode
the provider's entry and disowns it unlearns the provider too; iprev is in the A-R. And the
acceptor's side of the learn fact (AcceptorContext.learned_from_lane / unlearned_from_lane)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest

from ingress.core import wire
from ingress.core.config import ClassifyConfig, Config
from ingress.core.wire import Envelope, Lane, WireEvidence
from ingress.edge.context import AcceptorContext
from ingress.edge.lanes import _apply_fact
from ingress.edge.learned_store import LearnedStore
from tests.kit.dnsserver import DNSServer
from workers.lane.pipeline import Pipeline


@pytest.fixture(scope="module")
def dns(dkim_key: tuple[bytes, str]) -> Iterator[DNSServer]:
    with DNSServer({"sel._domainkey.shop.test": {"TXT": [dkim_key[1]]}}) as server:
        yield server


def message(pem: bytes | None, subject: str = "s") -> bytes:
    msg = (f"From: a@shop.test\r\nTo: b@example.test\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject}@shop.test>\r\n\r\nHello.\r\n").encode()
    if pem is None:
        return msg
    return dkim.sign(msg, b"sel", b"shop.test", pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + msg


def envelope(lane: Lane = Lane.BULK, **evidence: object) -> Envelope:
    now = time.time()
    ev = WireEvidence.from_wire({"spf": "pass", "spf_domain": "shop.test", **evidence})
    return Envelope(qid="Q1", lane=lane, peer_ip="127.0.0.6", peer_port=1, helo="h",
                    mail_from="a@shop.test", rcpts=("b@example.test",), received_at=now,
                    deadline=now + 30, evidence=ev)


def pipeline(dns: DNSServer) -> Pipeline:
    c = dataclasses.replace(ClassifyConfig(), nameservers=(dns.address,), dns_timeout=1.0,
                            dkim_deadline=2.0, spf_promote="any")
    return Pipeline(dataclasses.replace(Config(), classify=c))


VERIFIED = {"iprev": "pass", "iprev_name": "mta2.mail.provider.test",
            "provider": "provider.test"}


def test_learned_with_its_provider_and_iprev_in_the_ar(dns: DNSServer,
                                                       dkim_key: tuple[bytes, str]) -> None:
    p = pipeline(dns).process(envelope(**VERIFIED), message(dkim_key[0]), 5.0)
    assert (p.learn, p.learn_domain, p.provider) == (True, "shop.test", "provider.test")
    assert b"iprev=pass policy.iprev=127.0.0.6 (mta2.mail.provider.test);" in p.trace
    # no provider (a generic name, or no FCrDNS): learned by network only
    p = pipeline(dns).process(envelope(iprev="pass"), message(dkim_key[0]), 5.0)
    assert (p.learn, p.provider) == (True, "")
    assert b"iprev=pass policy.iprev=127.0.0.6;" in p.trace
    assert b"iprev" not in pipeline(dns).process(envelope(), message(dkim_key[0]), 5.0).trace


@pytest.mark.parametrize(("reasons", "lane", "signed", "why", "provider"), [
    # rode the provider's entry (the iprev check's promotion) without an aligned signature
    ("provider:provider.test", Lane.FAST, False, "dkim-missing", "provider.test"),
    # the provider was learned, the transaction judged afresh (another domain's SPF fails)
    ("provider:provider.test,learned-mismatch:shop.test", Lane.BULK, False, "", ""),
    # a good signature: it stays
    ("provider:provider.test", Lane.FAST, True, "", "provider.test"),
    # the provider was not learned (no promotion): nothing to unlearn
    ("iprev:pass", Lane.BULK, False, "", ""),
])
def test_unlearns_a_provider_that_mail_riding_it_disowns(
        dns: DNSServer, dkim_key: tuple[bytes, str], reasons: str, lane: Lane, signed: bool,
        why: str, provider: str) -> None:
    ev: dict[str, object] = {**VERIFIED, "reasons": reasons.split(",")}
    if lane is Lane.FAST:
        ev["identity"] = "learned:shop.test"
    p = pipeline(dns).process(envelope(lane, **ev), message(dkim_key[0] if signed else None),
                              5.0)
    assert p.unlearn == why
    assert p.provider == (provider if why or p.learn else "")
    if lane is Lane.BULK and "mismatch" in reasons:     # SPF fail for its own sender domain
        p = pipeline(dns).process(envelope(lane, **{**ev, "spf": "fail"}), message(None), 5.0)
        assert (p.unlearn, p.provider) == ("spf-fail", "provider.test")


def test_the_acceptor_learns_and_unlearns_the_provider(tmp_path: Path) -> None:
    """The learn fact with a provider frame, as a lane broker publishes it, reaches the
    acceptor's hooks: the provider is learned for the domain; the unlearn fact forgets it."""
    cfg = Config()
    store = LearnedStore(tmp_path / "learned.json", cfg)
    ctx = SimpleNamespace(learned_store=store, cluster=None, learned_writer=False)
    learn = wire.shared_publication(wire.share(wire.LEARN_TOPIC, "127.0.0.5", "shop.test",
                                               "provider.test"))
    _apply_fact(learn, lambda *a: AcceptorContext.learned_from_lane(ctx, *a),  # type: ignore
                lambda ip: None, lambda *a: AcceptorContext.unlearned_from_lane(ctx, *a))  # type: ignore
    assert store.provider_domain("provider.test", time.time()) == "shop.test"
    assert store.contains("127.0.0.5", time.time())
    unlearn = wire.shared_publication(wire.share(wire.UNLEARN_TOPIC, "127.0.0.6", "",
                                                 "provider.test"))
    _apply_fact(unlearn, lambda *a: None, lambda ip: None,
                lambda *a: AcceptorContext.unlearned_from_lane(ctx, *a))  # type: ignore
    assert store.provider_domain("provider.test", time.time()) == ""
    assert store.contains("127.0.0.5", time.time())        # another network's entry stays
