"""Retry evidence: one acceptor's deferral records, and their sharing with every other acceptor.

A retry after our own deferral is evidence (ingress.policy.deferrals holds the pure rules): a bulk
transaction we deferred for the bulk cap is remembered, here and in every other acceptor, so
that its retry (same network, sender, and a recipient it had) may go on within its site's part
of the retry share.

API:
    RetryRecords(cfg, ident, lanes)   ident: this acceptor's (origin of its facts); lanes: the
                                      lane clients (ingress.edge.lanes), through whose bulk
                                      broker the facts reach this host's acceptors
        .cluster                      the shared state ([cluster] redis:
                                      ingress.edge.cluster_state), set once it exists (it is
                                      built with .on_record); None: this host only
        .deferred(ip, sender, rcpts, reason, listed=False, provider="")   we defer this bulk
                                      transaction
        .retry_claim(ip, sender, rcpt, listed=False, provider="") -> Claim|None   its first
                                      RCPT: a ripe retry may go on
        .deferred_accepted(lane, ip, sender, rcpts, claim, provider="")   a message got its 250
        provider: the client's verified provider identity (FCrDNS: ingress.policy.iprev; ""
        none). A record made for a client of a provider holds it (the defer fact's "p"), and
        a retry from another address of the same verified provider may claim that record
        (DeferralStore.provider_record) when its own network has none: one record, one
        bypass, under the guards of the network that made it
        .on_record(fact, doc)         another acceptor's deferral or claim (from the bulk
                                      broker's fan-out or from Redis)
        .store                        the records (ingress.policy.deferrals.DeferralStore)

A DNS-block-listed client (listed=True: ingress.policy.shaping.listed, asked by the handler)
earns nothing: its deferral is counted (metrics.deferred) but not recorded, here or anywhere
(nor do its sheds count towards its site's hammering: a listed bot cannot void the records of
an unlisted MTA beside it), and its retry never claims a record (one made before it was
listed is left alone: retry result listed, retry_listed logged); the bulk cap applies.

Sharing goes one way only: through Redis when it is up, else through the bulk broker, so no
acceptor counts a fact twice. Clock: the wall clock (the records are shared between processes
and hosts).

Failure modes: none raised; a fact from another acceptor is bounded as it is applied (its
recipients to MAX_RCPTS, its sheds to MAX_SHEDS_TOLD); a lost fact only costs a retry its
bypass. Limits: the store's (deferral_limits(cfg)).
"""

from __future__ import annotations

import time

from ingress.core import log, metrics
from ingress.core.config import Config
from ingress.core.metrics_labels import DeferReason, RetryResult
from ingress.core.wire import CLAIM_TOPIC, DEFER_TOPIC, Lane
from ingress.edge.cluster_state import ClusterState
from ingress.edge.lanes import Lanes
from ingress.policy.deferrals import (
    MAX_RCPTS,
    Claim,
    ClaimResult,
    DeferralRecords,
    DeferralStore,
    deferral_limits,
)

MAX_SHEDS_TOLD = 1_000_000    # sheds one deferral fact may stand for (a bound, not a limit)


class RetryRecords:
    """One acceptor's deferral records (retry evidence), shared with every other acceptor."""

    def __init__(self, cfg: Config, ident: str, lanes: Lanes) -> None:
        self.ident, self.lanes = ident, lanes
        self.store: DeferralRecords = DeferralStore(deferral_limits(cfg))
        self.cluster: ClusterState | None = None

    def deferred(self, ip: str, sender: str, rcpts: tuple[str, ...],
                 reason: DeferReason | None, listed: bool = False,
                 provider: str = "") -> None:
        """We defer this bulk transaction for the bulk cap (reason None: another recipient of
        a transaction deferred already, not another shed): remember it, here and (through the
        bulk broker, or Redis) in every other acceptor."""
        now = time.time()
        key = self.store.key(ip, sender)
        if reason is not None:
            metrics.deferred(Lane.BULK, reason)
        if listed:               # a listed client earns no retry evidence
            return
        if not self.store.record(key, now, rcpts, origin=self.ident,
                                 sheds=0 if reason is None else 1, provider=provider):
            return
        told = self.store.to_share(key, now)
        if told is not None:
            rec, sheds = told
            doc: dict[str, object] = {
                "k": key, "f": rec.first, "t": now, "r": sorted(rec.rcpts)[:MAX_RCPTS],
                "o": self.ident, "n": sheds, "h": int(rec.void)}
            self.share_record(DEFER_TOPIC, {**doc, "p": rec.provider} if rec.provider else doc)

    def _key(self, ip: str, sender: str, rcpts: tuple[str, ...], provider: str,
             now: float) -> str:
        """The record a transaction may claim: its network's, else (with a verified
        provider) the latest of the provider's pool for this sender covering `rcpts`."""
        key = self.store.key(ip, sender)
        rec = self.store.lookup(key, now)
        if (rec is not None and Claim(rec.first, rec.rcpts).covers(rcpts)) or not provider:
            return key
        return self.store.provider_record(provider, sender) or key

    def retry_claim(self, ip: str, sender: str, rcpt: str, listed: bool = False,
                    provider: str = "") -> Claim | None:
        """The first RCPT of a bulk transaction: a ripe retry of a deferred transaction (same
        network, sender, and a recipient it had) may go on within its site's part of the
        retry share (spending its record, here and everywhere); None: the bulk cap applies
        as usual."""
        now = time.time()
        key = self._key(ip, sender, (rcpt,), provider, now)
        result = self.store.check(key, (rcpt,), now)
        if result is ClaimResult.NONE:
            return None
        if listed:
            metrics.retry(Lane.BULK, RetryResult.LISTED)
            log.throttled("retry_listed", ip, net=key.split("|", 1)[0])
            return None
        if result is ClaimResult.TOO_EARLY:
            metrics.retry(Lane.BULK, RetryResult.TOO_EARLY)
            return None
        if result is ClaimResult.HAMMERED:
            metrics.retry(Lane.BULK, RetryResult.HAMMERED)
            log.throttled("retry_hammered", ip, net=key.split("|", 1)[0])
            return None
        if result is ClaimResult.OVER_SHARE or not self.lanes.retry_mail_admitted():
            metrics.retry(Lane.BULK, RetryResult.OVER_SHARE)
            log.throttled("retry_over_share", ip,
                          part="site" if result is ClaimResult.OVER_SHARE else "all")
            return None
        _, claim = self.store.claim(key, (rcpt,), now)
        metrics.retry(Lane.BULK, RetryResult.BYPASSED)
        self.share_record(CLAIM_TOPIC, {"k": key, "t": now, "o": self.ident, "b": 1})
        log.event("retry_bypass", peer=ip, acceptor=self.ident,
                  deferred_by=claim.origin if claim else "",
                  deferred_s=round(now - claim.first, 3) if claim else 0)
        return claim

    def deferred_accepted(self, lane: Lane, ip: str, sender: str, rcpts: tuple[str, ...],
                          claim: Claim | None, provider: str = "") -> None:
        """A message got its 250: if we had deferred it (a claimed retry, or one that came
        back on ordinary capacity with recipients all of the deferred transaction, which
        spends its record), count it and the time since its first deferral."""
        now = time.time()
        if claim is None:
            if not len(self.store):
                return
            key = self._key(ip, sender, rcpts, provider, now)
            rec = self.store.lookup(key, now)
            if rec is None or not Claim(rec.first, rec.rcpts).covers(rcpts):
                return
            claim = self.store.consume(key, now)
            if claim is None:
                return
            self.share_record(CLAIM_TOPIC, {"k": key, "t": now, "o": self.ident})
        metrics.deferred_accepted(lane, now - claim.first)

    def share_record(self, fact: bytes, doc: dict[str, object]) -> None:
        """Every edge through Redis when it is up ([cluster] redis), else this host's
        acceptors through the bulk broker: one way only, so no acceptor counts a fact twice."""
        if self.cluster is None or not self.cluster.share_record(fact, doc):
            self.lanes.share_record(fact, doc)

    def on_record(self, fact: bytes, doc: dict[str, object]) -> None:
        """Another acceptor's deferral or claim (decoded by wire.decode_record)."""
        if doc["o"] == self.ident:
            return
        t, f, r = doc.get("t"), doc.get("f"), doc.get("r")
        at = float(t) if isinstance(t, int | float) else time.time()
        if fact == DEFER_TOPIC:
            rcpts = [str(x) for x in r[:MAX_RCPTS]] if isinstance(r, list) else []
            first = float(f) if isinstance(f, int | float) else at
            n = doc.get("n", 1)
            sheds = min(MAX_SHEDS_TOLD, max(0, int(n))) if isinstance(n, int | float) else 1
            p = doc.get("p")
            self.store.record(str(doc["k"]), at, rcpts, first=first, origin=str(doc["o"]),
                              sheds=sheds, hammered=bool(doc.get("h")),
                              provider=p if isinstance(p, str) else "")
        else:
            self.store.consume(str(doc["k"]), at, bypass=bool(doc.get("b")))
