"""Deferral records of a verified provider's pool (ingress.edge.retries with the provider key
of ingress.policy.deferrals): a retry from another address of the same verified provider may
claim the record, under every guard of a network's record (wait, hammering, one bypass)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ingress.core.config import Config
from ingress.core.metrics_labels import DeferReason
from ingress.core.wire import CLAIM_TOPIC, DEFER_TOPIC, Lane
from ingress.edge import retries as retries_mod
from ingress.edge.retries import RetryRecords
from ingress.policy.deferrals import ClaimResult, DeferralLimits, DeferralStore

SENDER, RCPT, P = "news@shop.test", "b@example.test", "provider.test"
FIRST, SECOND = "192.0.2.10", "198.51.100.7"          # two networks of one provider's pool


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(retries_mod.time, "time", c)
    return c


def records() -> tuple[RetryRecords, list[tuple[bytes, dict[str, object]]]]:
    told: list[tuple[bytes, dict[str, object]]] = []
    lanes = SimpleNamespace(share_record=lambda f, d: told.append((f, d)),
                            retry_mail_admitted=lambda: True)
    return RetryRecords(Config(), "a0-1", lanes), told   # type: ignore[arg-type]


def test_another_address_of_the_provider_claims_the_record(clock: Clock) -> None:
    r, told = records()
    r.deferred(FIRST, SENDER, (RCPT,), DeferReason.RCPT_CAP, provider=P)
    key = r.store.key(FIRST, SENDER)
    assert [(d["k"], d.get("p")) for f, d in told if f == DEFER_TOPIC] == [(key, P)]
    clock.now += 30
    assert r.retry_claim(SECOND, SENDER, RCPT, provider=P) is None     # too early
    clock.now += 60
    assert r.retry_claim(SECOND, SENDER, RCPT) is None                 # not verified
    assert r.retry_claim(SECOND, SENDER, RCPT, provider="other.test") is None
    assert r.retry_claim(SECOND, SENDER, "c@example.test", provider=P) is None   # other rcpt
    assert r.retry_claim(SECOND, "other@shop.test", RCPT, provider=P) is None    # other sender
    claim = r.retry_claim(SECOND, SENDER, RCPT, provider=P)
    assert claim is not None and claim.covers((RCPT,))
    # one record, one bypass: it is spent, here and (told) everywhere, under its own key
    assert len(r.store) == 0
    assert [d["k"] for f, d in told if f == CLAIM_TOPIC] == [key]
    assert r.retry_claim(FIRST, SENDER, RCPT, provider=P) is None


def test_the_provider_is_shared_with_the_record(clock: Clock) -> None:
    """Another acceptor that heard the defer fact finds the record from the provider too."""
    r, told = records()
    r.deferred(FIRST, SENDER, (RCPT,), DeferReason.RCPT_CAP, provider=P)
    other, _ = records()
    other.ident = "a1-2"
    for fact, doc in told:
        other.on_record(fact, doc)
    clock.now += 120
    assert other.retry_claim(SECOND, SENDER, RCPT, provider=P) is not None
    other.on_record(CLAIM_TOPIC, {"k": r.store.key(FIRST, SENDER), "t": clock.now, "o": "x"})
    assert len(r.store) == 1 and len(other.store) == 0


def test_a_hammering_network_earns_its_provider_nothing(clock: Clock) -> None:
    r, _ = records()
    for _ in range(Config().admission.retry_hammer_sheds + 2):
        r.deferred(FIRST, SENDER, (RCPT,), DeferReason.RCPT_CAP, provider=P)
        clock.now += 0.5
    clock.now += 3600
    assert r.retry_claim(SECOND, SENDER, RCPT, provider=P) is None
    assert r.store.lookup(r.store.key(FIRST, SENDER), clock.now) is not None   # not spent


def test_a_record_without_a_provider_is_its_network_only(clock: Clock) -> None:
    r, _ = records()
    r.deferred(FIRST, SENDER, (RCPT,), DeferReason.RCPT_CAP)
    clock.now += 120
    assert r.retry_claim(SECOND, SENDER, RCPT, provider=P) is None     # another network
    assert r.retry_claim(FIRST, SENDER, RCPT, provider=P) is not None  # its own: claimed
    assert len(r.store) == 0


def test_a_250_from_the_pool_spends_the_record(clock: Clock) -> None:
    r, _ = records()
    r.deferred(FIRST, SENDER, (RCPT,), DeferReason.RCPT_CAP, provider=P)
    r.deferred_accepted(Lane.BULK, SECOND, SENDER, ("c@example.test",), None, provider=P)
    assert len(r.store) == 1                                           # not its recipients
    r.deferred_accepted(Lane.BULK, SECOND, SENDER, (RCPT,), None, provider=P)
    assert len(r.store) == 0


def test_the_provider_index_follows_its_records() -> None:
    """Pure: the index (provider, sender) -> key names the latest record of the pool, and goes
    with its record (claimed, expired): it never holds more than the records."""
    lim = DeferralLimits(min_delay=60, ttl=3600, max_records=8, per_net_max=2)
    store = DeferralStore(lim)
    a, b = store.key(FIRST, SENDER), store.key(SECOND, SENDER)
    store.record(a, 0.0, (RCPT,), provider=P)
    assert store.provider_record(P, "NEWS@Shop.test") == a      # the sender's canonical form
    store.record(b, 10.0, (RCPT,), provider=P)
    assert store.provider_record(P, SENDER) == b                # the latest
    assert store.provider_record("", SENDER) is None
    assert store.claim(b, (RCPT,), 100.0)[0] is ClaimResult.CLAIMED
    assert store.provider_record(P, SENDER) is None
    store.record(a, 200.0, (RCPT,), provider=P)                  # refreshed: indexed again
    assert store.provider_record(P, SENDER) == a
    assert store.lookup(a, 5000.0) is None                       # expired (ttl from first)
    assert store.provider_record(P, SENDER) is None

