"""Acceptor process: holds TCP connections on a listening socket and runs the SMTP dialogue.

API:
    run(cfg, index, sock, hb, slot, mtls_sock, fast_sock)   process entry point; each `*sock`
                                      is the listening socket, or a list of them (one per
                                      listen address), the supervisor bound for this acceptor
                                      slot (SO_REUSEPORT); all of them are served
    AcceptorContext                   per-process state shared by all sessions: the
                                      SessionHost (ingress.edge.host) that smtp.py runs against;
                                      it holds the session table (ingress.edge.sessions), the SPF
                                      service (ingress.edge.spf_service), the learned store
                                      (ingress.edge.learned_store) and the lane clients
                                      (ingress.edge.lanes) and the deferral records
                                      (ingress.policy.deferrals, shared with every acceptor
                                      through the bulk broker: retry evidence),
                                      and with [cluster] redis the shared state
                                      (ingress.edge.cluster_state); with smtp.verify_recipients
                                      the callout cache and its file (ingress.edge.rcpt_verify,
                                      ingress.edge.verify_store: loaded at start, saved while it
                                      changes and at shutdown, not while retiring)
    (the mutual-TLS port's listeners and handshake gate: ingress.edge.mtls; a slot is taken at
    accept, before the TLS handshake)

listen.port and listen.fast_port start each connection in the lobby (ingress.edge.lobby) unless they
are behind PROXY; the slots are derived.configured_limit's (logged as connection_limit at
start, with what limited them).

Memory: the bytes all sessions hold in DATA (until their ack) are bounded by one DataBudget
(smtp.data_memory_budget, with smtp.data_fast_reserve for the fast lane only, of which the
capped trust tiers their parts: ingress.policy.tiers).

Rates at MAIL FROM: each acceptor holds its part of classify.domain_rate per domain and of
tiers.self_proven_rate for the whole self-proven tier (AcceptorContext.over_rate_why).

Hand-off: a port-25 acceptor hands operator and third-party clients known at connect to a fast
acceptor (ingress.edge.handoff) and serves what a fast acceptor gives back (serve_returned).

The event loop (uvloop) never blocks: no DNS, no disk, no CPU-heavy work here. Every wait has a
deadline: the ack wait is smtp.ack_timeout; a broker that is down fails the send at once
(IMMEDIATE) and the session gets 451. Lane status (saturation) arrives over SUB; status older than
STATUS_STALE is ignored, so a dead broker never makes us shed mail on old news.

SIGUSR1 from the supervisor (retire after a reload): stop accepting and serve the sessions
already accepted until they end. SIGUSR2 from the supervisor, or SIGTERM (shutdown): stop
accepting (the listening socket itself stays open in the supervisor, so nothing queued on it is
reset), close idle sessions with 421 4.3.2, let sessions inside DATA finish, and after
smtp.drain_grace close whatever is left with 421. Then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from typing import Any

from ingress.core import child, log, metrics, procs
from ingress.core.addr import ip_key, site_key
from ingress.core.config import Config
from ingress.core.derived import domain_buckets, fds_needed, rate_parts, tier_buckets
from ingress.core.downstream import parse_downstream
from ingress.core.fsutil import atomic_write
from ingress.core.metrics_labels import DeferReason, RetryResult
from ingress.core.ratelimit import FairBucket, KeyedBuckets
from ingress.core.wire import CLAIM_TOPIC, DEFER_TOPIC, Envelope, Lane, Reply
from ingress.edge import handoff, mtls, proxy
from ingress.edge.cluster_state import ClusterState
from ingress.edge.dataread import DataBudget
from ingress.edge.evidence import cert_evidence, normalize_fingerprint, sha256_fingerprint
from ingress.edge.handler import IngressHandler
from ingress.edge.host import Prototype
from ingress.edge.lanes import Lanes
from ingress.edge.learned_store import LearnedStore
from ingress.edge.lobby import Lobby
from ingress.edge.rcpt_verify import RecipientVerifier
from ingress.edge.sessions import Seat, SessionTable
from ingress.edge.smtp import IngressSMTP
from ingress.edge.spf_service import SpfService
from ingress.edge.verify_store import VerifyStore
from ingress.policy.classify import (
    AuthResult,
    ClassifyPolicy,
    Decision,
    Evidence,
    StaticAllow,
    decide,
)
from ingress.policy.deferrals import (
    MAX_RCPTS,
    Claim,
    ClaimResult,
    DeferralRecords,
    DeferralStore,
    deferral_limits,
)
from ingress.policy.identity import (
    RATE_TRACKED,
    over_rate_reason,
    rate_bounded,
    share_key,
)
from ingress.policy.replies import Refusal, text
from ingress.policy.session_rules import ErrorPolicy
from ingress.policy.tiers import (
    TierShares,
    fast_tier,
    over_tier_rate_reason,
    rate_key,
    tier_rates,
)

OVER_RATE_LOG_EVERY = 10.0    # seconds between two over_rate lines for one domain
OVER_RATE_LOGGED_MAX = 1024   # domains whose last over_rate line is remembered
MAX_SHEDS_TOLD = 1_000_000    # sheds one deferral fact may stand for (a bound, not a limit)


SLOT_PREFIX = {"port25": "a", "fast": "f", "mtls": "m"}


def slot_name(kind: str, index: int) -> str:
    """An acceptor slot's short name ("a0", "f0", "m0"): its ident's head, its files' names."""
    return f"{SLOT_PREFIX[kind]}{index}"


def slot_names(cfg: Config) -> list[str]:
    """Every acceptor slot this host runs, port-25, fast and mTLS ones."""
    counts = {"port25": cfg.acceptor_count, "fast": cfg.supervisor.fast_acceptors,
              "mtls": cfg.mtls_acceptor_count}
    return [slot_name(kind, i) for kind, n in counts.items() for i in range(n)]


class AcceptorContext:
    """Everything the sessions of one acceptor process share (the SessionHost that smtp.py's
    IngressSMTP and IngressHandler run against): the classify policy, and the parts it holds,
    each its own module: the session table (ingress.edge.sessions), the SPF service
    (ingress.edge.spf_service), the learned store (ingress.edge.learned_store), the lane clients
    (ingress.edge.lanes)."""

    def __init__(self, cfg: Config, index: int, loop: asyncio.AbstractEventLoop,
                 nofile: int = 0, fast: bool = False, mtls_only: bool = False) -> None:
        self.cfg, self.index, self.loop = cfg, index, loop
        self.slot = slot_name("mtls" if mtls_only else "fast" if fast else "port25", index)
        self.ident = f"{self.slot}-{os.getpid()}"
        # a port-25 acceptor hands clients classified fast at connect to the fast acceptors
        # (ingress.edge.handoff); a fast acceptor serves what it is handed, and hands nothing on
        self.handoff = None if fast else handoff.Sender(
            cfg, loop, lambda conn: serve_returned(self, conn), index)
        c, a, s = cfg.classify, cfg.admission, cfg.smtp
        self.domains = frozenset(s.accepted_domains)
        self.recipients = load_recipient_map(s.recipient_map) if s.recipient_map else None
        self.static_allow = StaticAllow.from_cidrs(c.allow_cidrs)
        self.trusted_proxies = proxy.trusted_networks(cfg.listen.trusted_proxies)
        self.learned_store = LearnedStore(cfg.spool.state_dir / "learned.json", cfg)
        # port-25 acceptor 0 speaks for this edge's learned cache: its file, its Redis copy
        self.learned_writer = index == 0 and not fast
        self.policy = ClassifyPolicy(
            spf_promote=c.spf_promote, spf_domains=frozenset(c.spf_domains),
            cert_promotes=c.cert_promotes, learned_promotes=c.learned_ttl > 0)
        self.counters: Counter[str] = Counter()
        self.over_rate_lines = log.Throttle(OVER_RATE_LOG_EVERY, OVER_RATE_LOGGED_MAX)
        # classify.domain_rate and domain_burst, held here at MAIL FROM: each acceptor of the
        # edge takes its part of both, so that a domain's fast-lane mail is a steady flow
        # (the fast broker's own bucket bounds the sum of several edges, and names a domain
        # over it in its status: Lanes.over_rate)
        mine, _ = domain_buckets(c.domain_rate, c.domain_burst, cfg.acceptor_processes)
        self.domain_rates = KeyedBuckets(*mine, RATE_TRACKED)
        # tiers.self_proven_rate (and third_party_rate): one total rate for every identity of
        # the tier, held here at MAIL FROM by each acceptor that serves the tier (its part),
        # shared max-min fairly between client sites (FairBucket keyed by addr.site_key:
        # however many domains a spammer mints from its networks, a site sending less than its
        # fair share is not refused); the fast broker's bucket, fair the same way, bounds the
        # sum of several edges
        now = time.monotonic()
        self.tier_rates = {
            tier: FairBucket(*tier_buckets(rate, burst, rate_parts(cfg))[0], now=now,
                             max_keys=RATE_TRACKED)
            for tier, (rate, burst) in tier_rates(cfg).items()}
        self.table = SessionTable(cfg, self.counters, time.monotonic(), nofile=nofile)
        self.pins = frozenset(normalize_fingerprint(f) for f in cfg.tls.pinned_sha256)
        self.spf_service = SpfService(cfg, self.counters)
        # Bytes held in DATA by all sessions (smtp.data_memory_budget); bulk never takes the
        # fast lane's part (smtp.data_fast_reserve).
        self.data_budget = DataBudget(*cfg.data_budget, TierShares.of(cfg))
        self.tls_context = starttls_context(cfg)
        self.mtls_context = mtls.mtls_context(cfg)
        self.handler = IngressHandler(self)
        self.smtp_prototypes: dict[bool, Prototype] = {}
        self.error_policy = ErrorPolicy(
            soft_error_limit=s.soft_error_limit, hard_error_limit=s.hard_error_limit,
            # the delay runs on the idle timer: at most half of the shorter idle timeout
            error_sleep=s.error_sleep, error_sleep_max=min(
                s.error_sleep_max, min(s.idle_timeout, a.stress_idle_timeout) / 2),
            junk_command_limit=s.junk_command_limit,
            mail_without_data_limit=s.mail_without_data_limit,
            recipient_overshoot_limit=s.recipient_overshoot_limit)
        self.verifier = verifier(cfg)
        # its 2xx/5xx answers outlive this process (a reload replaces every acceptor)
        self.verify_store = None if self.verifier is None else VerifyStore(
            self.verifier, cfg.spool.state_dir, self.slot, slot_names(cfg),
            f"{self.verifier.host}:{self.verifier.port}")
        if self.verify_store is not None:
            self.verify_store.load()
        self.draining = False
        self.lanes = Lanes(cfg, self.ident)
        self.receiver: handoff.Receiver | None = None    # a fast acceptor's (listeners())
        self.deferrals: DeferralRecords = DeferralStore(deferral_limits(cfg))
        # [cluster] redis: the state every edge shares (None: in-process only, one host)
        self.cluster = ClusterState.create(
            cfg, self.ident, lambda ip: self.table.penalise(ip, time.monotonic()),
            self.learned_from_cluster, self.on_record, on_unlearn=self.learned_store.unlearn)

    @property
    def resolver(self) -> Any:
        return self.spf_service.resolver

    # --- policy hooks used by smtp.py (the SessionHost protocol) ------------------------------

    def connect_evidence(self, ip: str, peercert_der: bytes | None, verified: bool) -> Evidence:
        entry = self.static_allow.match(ip)
        learned = self.learned_store.contains(ip, time.time())
        ev = Evidence(static_allow=entry is not None, learned_allow=learned, allow_entry=entry,
                      learned_domain=self.learned_store.allow.domain(ip) if learned else None)
        if peercert_der is not None:
            ev = ev.with_cert(cert_evidence(peercert_der, verified, self.pins),
                              sha256_fingerprint(peercert_der))
        return ev

    def decide(self, evidence: Evidence, transaction: bool = False, peer: str = "") -> Decision:
        """The policy's decision, served as bulk when its identity holds its share of this
        acceptor's slots (SessionTable.within_share: classify.identity_share), its trust tier
        its cap, or its IP (`peer`) admission.per_ip_fast_max fast sessions of the capped
        tiers; or when it is a domain over classify.domain_rate or of a tier over its total
        rate (over_rate_why; reason over-rate:<key>): its sessions are then shed by the bulk
        cap at their first RCPT, not after DATA. `transaction`: a MAIL FROM, which takes a
        token of the domain's rate and of its tier's when it is served fast."""
        decision = self.table.within_share(decide(evidence, self.policy), peer)
        why = self.over_rate_why(decision.identity, transaction, peer) \
            if decision.lane is Lane.FAST else ""
        if why:
            self.counters["over_rate"] += 1
            key = why.partition(":")[2]
            tier = fast_tier(decision.identity)
            if why == over_tier_rate_reason(tier):
                metrics.over_tier(tier.label, "rate")
            else:
                metrics.over_share("rate", key)
            reasons = (*decision.reasons, why)
            # One line per domain (or tier) per OVER_RATE_LOG_EVERY (the spammer chooses how
            # many MAILs: the metric counts each), with the number left out since the last.
            quiet = self.over_rate_lines.due(key, time.monotonic())
            if quiet is not None:
                log.event("over_rate", identity=decision.identity, reasons=",".join(reasons),
                          served="bulk", not_logged=quiet)
            return Decision(Lane.BULK, reasons)
        return decision

    def over_rate(self, identity: str, transaction: bool = False, peer: str = "") -> bool:
        return bool(self.over_rate_why(identity, transaction, peer))

    def over_rate_why(self, identity: str, transaction: bool = False, peer: str = "") -> str:
        """Why this identity is over a rate ("" if it is not): a domain over
        classify.domain_rate (over-rate:<key>), or an identity of a tier over its total rate
        (tiers.self_proven_rate: over-rate:tier:<tier>), either named so by the fast
        broker(s), or, for a `transaction` (a MAIL FROM to be served fast), without a token of
        this acceptor's part of the rate (taken when there is one; the domain's first, so a
        domain over its own rate spends none of its tier's; the tier's is shared fairly
        between the client sites: `peer`'s, ingress.core.addr.site_key; the broker names a
        site over its part as rate_key(tier, site)). The operator tier: never."""
        if not identity:
            return ""
        key = share_key(identity)
        now = time.monotonic()
        if rate_bounded(key) and (self.lanes.over_rate(key) or (
                transaction and not self.domain_rates.take(key, now))):
            return over_rate_reason(identity)
        tier = fast_tier(identity)
        bucket = self.tier_rates.get(tier)
        site = site_key(peer, self.table.admission.limits.ipv6_prefix) if peer else key
        if bucket is not None and (self.lanes.over_rate(rate_key(tier, site)) or (
                transaction and not bucket.take(site, now))):
            return over_tier_rate_reason(tier)
        return ""

    def demote(self, proto: Seat) -> None:
        self.table.demote(proto)

    def hand_off(self, transport: asyncio.BaseTransport) -> bool:
        """A connection classified fast at connect (operator or third-party tier), on a plain
        listener: give it to a fast acceptor (True: the caller closes its copy and writes
        nothing)."""
        if self.handoff is None or self.draining or not self.handoff.offer(transport):
            return False
        self.counters["handed_off"] += 1
        return True

    def hand_back(self, transport: asyncio.BaseTransport, to: Any) -> bool:
        """A fast acceptor that cannot admit a connection handed to it (slots full, draining):
        give it back to the acceptor `to` that handed it over, which serves it where it
        arrived (True: the caller closes its copy and writes nothing)."""
        if self.receiver is None or not (
                self.receiver.give_back_any(transport) if to == handoff.ANY
                else self.receiver.give_back(transport, to)):
            return False
        self.counters["handed_back"] += 1
        return True

    def admit(self, proto: Seat) -> str | None:
        now = time.monotonic()
        over = self.cluster is not None and proto.lane is Lane.BULK and self.cluster.conn_over(
            ip_key(proto.peer_ip, self.table.admission.limits.ipv6_prefix), now)
        return self.table.admit(proto, self.draining, now, shared_rate_over=over)

    def spoke(self, proto: Seat) -> None:
        self.table.spoke(proto)

    def release(self, proto: Seat) -> None:
        self.table.release(proto)

    def swap(self, old: Seat, new: Seat) -> None:
        self.table.swap(old, new)

    def promote(self, proto: Seat) -> None:
        self.table.promote(proto)

    def penalise(self, ip: str) -> None:
        """Here at once, and in every other acceptor through the bulk broker's fan-out (and in
        every other edge through Redis, with [cluster] redis)."""
        self.table.penalise(ip, time.monotonic())
        self.lanes.share_penalty(ip)
        if self.cluster is not None:
            self.cluster.share_penalty(ip)

    async def spf(self, peer_ip: str, lane: Lane, mail_from: str,
                  helo: str) -> tuple[AuthResult, str]:
        return await self.spf_service.check(peer_ip, lane, mail_from, helo)

    def lane_saturated(self, lane: Lane) -> bool:
        return self.lanes.lane_saturated(lane) or (
            lane is Lane.BULK and self.cluster is not None
            and self.cluster.bulk_spent(time.monotonic()))

    async def bulk_mail_admitted(self) -> bool:
        """The global bulk bucket in Redis when it is up (one EVALSHA, cluster.redis_timeout);
        else, or when it fails or is late, this acceptor's local share of the cap."""
        if self.cluster is not None and self.cluster.up \
                and not all(lc.saturated() for lc in self.lanes.clients[Lane.BULK]):
            shared = await self.cluster.bulk_take()
            if shared is not None:
                return shared
            self.lanes.local_share(self.cluster.edges())
        return self.lanes.bulk_mail_admitted()

    async def submit(self, env: Envelope, body: bytes) -> tuple[Reply | None, str]:
        return await self.lanes.submit(env, body)

    # --- deferral records: a retry after our own deferral is evidence -----------------------
    # (wall clock: the records are shared between processes, and later between hosts)

    def deferred(self, ip: str, sender: str, rcpts: tuple[str, ...],
                 reason: DeferReason | None) -> None:
        """We defer this bulk transaction for the bulk cap (reason None: another recipient of
        a transaction deferred already, not another shed): remember it, here and (through the
        bulk broker, or Redis) in every other acceptor."""
        now = time.time()
        key = self.deferrals.key(ip, sender)
        if reason is not None:
            metrics.deferred(Lane.BULK, reason)
        if not self.deferrals.record(key, now, rcpts, origin=self.ident,
                                     sheds=0 if reason is None else 1):
            return
        told = self.deferrals.to_share(key, now)
        if told is not None:
            rec, sheds = told
            self.share_record(DEFER_TOPIC, {
                "k": key, "f": rec.first, "t": now, "r": sorted(rec.rcpts)[:MAX_RCPTS],
                "o": self.ident, "n": sheds, "h": int(rec.void)})

    def retry_claim(self, ip: str, sender: str, rcpt: str) -> Claim | None:
        """The first RCPT of a bulk transaction: a ripe retry of a deferred transaction (same
        network, sender, and a recipient it had) may go on within its site's part of the
        retry share (spending its record, here and everywhere); None: the bulk cap applies
        as usual."""
        now = time.time()
        key = self.deferrals.key(ip, sender)
        result = self.deferrals.check(key, (rcpt,), now)
        if result is ClaimResult.NONE:
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
        _, claim = self.deferrals.claim(key, (rcpt,), now)
        metrics.retry(Lane.BULK, RetryResult.BYPASSED)
        self.share_record(CLAIM_TOPIC, {"k": key, "t": now, "o": self.ident, "b": 1})
        log.event("retry_bypass", peer=ip, acceptor=self.ident,
                  deferred_by=claim.origin if claim else "",
                  deferred_s=round(now - claim.first, 3) if claim else 0)
        return claim

    def deferred_accepted(self, lane: Lane, ip: str, sender: str, rcpts: tuple[str, ...],
                          claim: Claim | None) -> None:
        """A message got its 250: if we had deferred it (a claimed retry, or one that came
        back on ordinary capacity with recipients all of the deferred transaction, which
        spends its record), count it and the time since its first deferral."""
        now = time.time()
        if claim is None:
            if not len(self.deferrals):
                return
            key = self.deferrals.key(ip, sender)
            rec = self.deferrals.lookup(key, now)
            if rec is None or not Claim(rec.first, rec.rcpts).covers(rcpts):
                return
            claim = self.deferrals.consume(key, now)
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
            self.deferrals.record(str(doc["k"]), at, rcpts, first=first, origin=str(doc["o"]),
                                  sheds=sheds, hammered=bool(doc.get("h")))
        else:
            self.deferrals.consume(str(doc["k"]), at, bypass=bool(doc.get("b")))

    def count(self, what: str, lane: Lane) -> None:
        self.counters[f"{what}_{lane.value}"] += 1

    def learn(self, ip: str, domain: str = "") -> list[str]:
        """Learn `ip`'s network for `domain`; the keys the quotas evicted for it."""
        return self.learned_store.learn(ip, time.time(), domain)

    # --- background tasks ---------------------------------------------------------------------

    async def read_status(self) -> None:
        await self.lanes.read_status(
            self.learned_from_lane, lambda ip: self.table.penalise(ip, time.monotonic()),
            self.on_record, on_unlearn=self.unlearned_from_lane)

    def learned_from_lane(self, ip: str, domain: str = "") -> None:
        """A worker learned `ip` (every acceptor of this edge hears it from the lane brokers);
        acceptor 0 records it in Redis for the other edges, with the entries the quotas
        evicted for it (so Redis holds what the quotas hold, not just the newest)."""
        evicted = self.learn(ip, domain)
        if self.cluster is not None and self.learned_writer:
            key = self.learned_store.allow.key(ip)
            if self.learned_store.allow.expiry(key) is not None:
                self.cluster.share_learned(key, self.learned_store.allow.domain(key))
            self.cluster.forget_learned(evicted)

    def learned_from_cluster(self, ip: str, at: float, domain: str) -> None:
        """Another edge learned `ip` (a key), at `at` (Redis: pub/sub, or the load)."""
        self.learned_store.learn(ip, at, domain)

    def unlearned_from_lane(self, ip: str) -> None:
        """A worker saw mail from `ip`'s learned network fail SPF or DKIM: forget the entry
        (every acceptor of this edge hears it; acceptor 0 removes it from Redis, whence the
        other edges hear it too)."""
        key = self.learned_store.unlearn(ip)
        if not self.learned_writer:
            return
        if key is not None:
            log.event("unlearned", peer=ip, key=key)
        if self.cluster is not None:
            self.cluster.share_unlearned(key or self.learned_store.allow.key(ip))

    async def persist_learned(self) -> None:
        """Acceptor 0 keeps the learned allow cache on disk (every acceptor learns the same
        entries over pub/sub and reads the file at start), so it survives restarts."""
        while True:
            await asyncio.sleep(self.cfg.classify.learned_save_interval)
            data = self.learned_store.snapshot(time.time())
            if data is not None:
                try:
                    await self.loop.run_in_executor(
                        None, atomic_write, self.learned_store.path, data)
                except OSError as e:
                    log.event("learned_save_failed", "error", error=str(e))

    async def drain(self, servers: list[Any], retire: bool) -> None:
        """Stop accepting, then let the sessions go.

        retire (a reload: replacement acceptors already serve the same sockets): every session
        this process accepted is served as usual until it ends, up to smtp.drain_grace.
        shutdown: idle sessions are closed with 421 4.3.2 at once and a new transaction gets
        421; a message being received or acknowledged finishes first.
        In both cases what is left after drain_grace gets 421 and is closed."""
        self.draining = not retire
        for server in servers:
            server.close()
        line = text(Refusal.SHUTTING_DOWN, host=self.cfg.smtp.hostname)
        deadline = time.monotonic() + self.cfg.smtp.drain_grace
        while self.table.sessions and time.monotonic() < deadline:
            if not retire:
                for proto in list(self.table.sessions):
                    proto.close_if_idle(line)
            await asyncio.sleep(0.05)
        for proto in list(self.table.sessions):
            proto.close_with(line)
        await asyncio.sleep(0.05)
        log.event("acceptor_drained", mode="retire" if retire else "shutdown",
                  left=len(self.table.sessions), **self.counters)


def verifier(cfg: Config) -> RecipientVerifier | None:
    """smtp.verify_recipients: callouts to relay.downstream (config validation made sure it is
    smtp://host:port)."""
    s = cfg.smtp
    if not s.verify_recipients:
        return None
    target = parse_downstream(cfg.relay.downstream)
    return RecipientVerifier(
        target.host, target.port, helo=s.hostname, timeout=s.verify_timeout,
        positive_ttl=s.verify_positive_ttl, negative_ttl=s.verify_negative_ttl,
        tempfail_ttl=s.verify_tempfail_ttl, cache_size=s.verify_cache_size,
        concurrency=s.verify_concurrency)


def load_recipient_map(path: str) -> frozenset[str]:
    """One address a line ("user@domain"), or "@domain" for every user of a domain; # comments.
    Read at start (and so at every reload, which replaces the acceptors)."""
    out = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = line.split("#", 1)[0].strip().lower()
            if entry:
                out.add(entry.split()[0])
    return frozenset(out)


def starttls_context(cfg: Config) -> ssl.SSLContext | None:
    """STARTTLS on the public port: no client certificate is requested there (a client that
    presents an untrusted one would fail the handshake under CERT_OPTIONAL)."""
    if not cfg.tls.cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


Listening = socket.socket | Sequence[socket.socket] | None


def _listening(socks: Listening) -> list[socket.socket]:
    """A listener's sockets (one per listen address) as a list, each non-blocking; None: []."""
    out = [] if socks is None else [socks] if isinstance(socks, socket.socket) else list(socks)
    for s in out:
        s.setblocking(False)
    return out


async def listeners(ctx: AcceptorContext, sock: Listening, mtls_sock: Listening,
                    fast_sock: Listening, handed: bool = True,
                    steered: Listening = None) -> list[Any]:
    """What this acceptor serves: one server per listening socket, i.e. per listen address
    (e.g. 0.0.0.0 and [::]) of port 25, the mutual-TLS port and the fast port; for a fast
    acceptor (`sock` None) the hand-off socket instead of port 25 (not for an mTLS acceptor:
    `handed` False), and its own port-25 sockets that the kernel steers the operator's
    networks to (`steered`: ingress.core.reuseport; served like port 25's)."""
    loop, lst = ctx.loop, ctx.cfg.listen
    servers: list[Any] = []
    if sock is None and handed:
        ctx.receiver = handoff.Receiver(ctx.cfg, ctx.index, loop,
                                        lambda conn, sender: serve_handed(ctx, conn, sender))
        servers.append(ctx.receiver)
    # A plain listener starts each connection in the lobby (ingress.edge.lobby: no aiosmtpd session
    # until the client speaks); behind PROXY the session is built at once.
    servers += [await loop.create_server(
        (lambda: IngressSMTP(ctx, proxy_protocol=True)) if lst.proxy_protocol else
        (lambda: Lobby(ctx)), sock=s) for s in _listening(sock)]
    servers += [await loop.create_server(lambda: Lobby(ctx, hand_back_to=handoff.ANY), sock=s)
                for s in _listening(steered)]
    if ctx.mtls_context is not None:
        gate = mtls.Gate(ctx.cfg, loop)        # one per process, for every mTLS address
        servers += [mtls.MtlsListener(ctx, s, gate) for s in _listening(mtls_sock)]
    servers += [await loop.create_server(
        (lambda: IngressSMTP(ctx, fast_only=True, proxy_protocol=True))
        if lst.fast_port_proxy_protocol else (lambda: Lobby(ctx, fast_only=True)),
        sock=s) for s in _listening(fast_sock)]
    return servers


async def serve(cfg: Config, index: int, sock: Listening, hb: Any, slot: int,
                mtls_sock: Listening, fast_sock: Listening,
                sig: child.Signals | None = None, handed: bool = True,
                steered: Listening = None) -> None:
    """An acceptor's life; `sock` None: a fast acceptor (its connections are handed to it by
    the others over ingress.edge.handoff, it has no port-25 socket), or with `handed` False an mTLS
    acceptor (the mutual-TLS port alone)."""
    loop = asyncio.get_running_loop()
    needed = fds_needed(cfg)      # what config / memory allow, FD_SPARE, SPF's DNS sockets
    nofile, _ = procs.raise_nofile(needed)
    # Admission is capped at what the fd limit allows (derived.connection_limit): a client
    # beyond it gets 421 instead of libuv's silent accept-and-close on EMFILE.
    ctx = AcceptorContext(cfg, index, loop, nofile=nofile, fast=sock is None,
                          mtls_only=not handed)
    limit = ctx.table.limit
    log.event("connection_limit", index=index, max_connections=limit.max_connections,
              fast_reserve=limit.fast_reserve, limited_by=limit.limited_by, nofile=nofile,
              configured=cfg.smtp.max_connections, connection_memory=cfg.smtp.connection_memory)
    if nofile < needed:
        # An explicit smtp.max_connections the fd limit cannot hold is an error; the automatic
        # limit (0) adapts to it by design, so it is only worth a warning.
        log.event("nofile_too_low", "error" if cfg.smtp.max_connections else "warning",
                  limit=nofile, needed=needed,
                  max_connections_effective=ctx.table.admission.limits.max_connections,
                  hint="raise LimitNOFILE / ulimit -n, or lower smtp.max_connections")
    servers = await listeners(ctx, sock, mtls_sock, fast_sock, handed, steered)
    stop = asyncio.Event()
    # SIGUSR2 is the supervisor's order to shut down, SIGUSR1 to retire after a reload; SIGTERM
    # (e.g. sent to the whole process group) shuts down too. ^C in a terminal reaches every
    # process: only the supervisor acts on it (child.ACCEPTOR_SIGNALS).
    sig = sig if sig is not None else child.Signals(child.ACCEPTOR_SIGNALS)
    sig.install_loop(loop)
    sig.on_stop(stop.set)
    heart = child.Heartbeat(hb, slot)
    tasks = [loop.create_task(t) for t in (
        heart.run(child.heartbeat_period(cfg), stop.set), ctx.read_status(),
        *(lc.read_replies() for lc in ctx.lanes.values()),
        *(lc.watch_broker() for lc in ctx.lanes.values()))]
    if index == 0 and sock is not None:     # one writer: port-25 acceptor 0
        tasks.append(loop.create_task(ctx.persist_learned()))
    if ctx.cluster is not None:
        tasks.append(loop.create_task(ctx.cluster.run()))
    saver = None if ctx.verify_store is None else loop.create_task(ctx.verify_store.run())
    log.event("acceptor_start", index=index, learned=len(ctx.learned_store.allow),
              tls=ctx.tls_context is not None, mtls=bool(cfg.tls.mtls_addresses),
              fast_port=bool(cfg.listen.fast_addresses), handed=sock is None,
              servers=len(servers))
    await stop.wait()
    if saver is not None:
        # retiring (a reload): the replacement owns the file now; shutting down: saved below
        saver.cancel()
    await ctx.drain(servers, sig.retire)
    for t in tasks:
        t.cancel()
    if ctx.verify_store is not None and not sig.retire and ctx.verify_store.unsaved:
        ctx.verify_store.save()
    if index == 0 and sock is not None and ctx.learned_store.dirty:
        with contextlib.suppress(OSError):
            atomic_write(ctx.learned_store.path, ctx.learned_store.allow.to_json().encode())
    ctx.spf_service.shutdown()
    if ctx.cluster is not None:
        await ctx.cluster.close()
    ctx.lanes.close()
    if ctx.handoff is not None:
        ctx.handoff.close()


def serve_handed(ctx: AcceptorContext, conn: socket.socket, sender: Any = None) -> None:
    """A fast acceptor: an SMTP session on a socket another acceptor accepted and handed over
    (classified again here, from the same evidence, with this process's own slots); refused
    here, it goes back to `sender` (IngressSMTP.hand_back_to, AcceptorContext.hand_back)."""
    _serve_socket(ctx, conn, lambda: IngressSMTP(ctx, hand_back_to=sender))


def serve_returned(ctx: AcceptorContext, conn: socket.socket) -> None:
    """A port-25 acceptor: a connection it had handed to a fast acceptor, given back (that one
    could not admit it): served here, where it arrived, and never handed off again."""
    ctx.counters["returned"] += 1
    _serve_socket(ctx, conn, lambda: IngressSMTP(ctx, returned=True))


def _serve_socket(ctx: AcceptorContext, conn: socket.socket, factory: Any) -> None:
    async def start() -> None:
        try:
            await ctx.loop.connect_accepted_socket(factory, conn)
        except OSError as e:        # the client went meanwhile
            conn.close()
            log.event("handoff_session_failed", "info", error=str(e))
    ctx.loop.create_task(start())


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """An acceptor's life on uvloop (on asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:     # pragma: no cover - uvloop is a hard dependency; keep serving anyway
        asyncio.run(main)
        return
    uvloop.run(main)


def run_fast(cfg: Config, index: int, hb: Any = None, slot: int = 0,
             mtls_sock: Listening = None, fast_sock: Listening = None,
             steered: Listening = None) -> None:
    """A fast acceptor's entry point (supervisor.fast_acceptors; ingress.edge.handoff): the
    connections handed over from port 25, and the mutual-TLS port and listen.fast_port (their
    clients prove themselves at the handshake or at connect), away from port 25's floods."""
    sig = child.start(cfg, f"fast-acceptor-{index}", child.ACCEPTOR_SIGNALS)
    _run_loop(serve(cfg, index, None, hb, slot, mtls_sock, fast_sock, sig, steered=steered))


def run_mtls(cfg: Config, index: int, hb: Any = None, slot: int = 0,
             mtls_sock: Listening = None) -> None:
    """An mTLS acceptor's entry point (supervisor.mtls_acceptors): the mutual-TLS port alone,
    so that the handshakes of clients without a valid certificate (ingress.edge.mtls's gate bounds
    them) share no event loop with the operator clients port 25 hands to the fast acceptors."""
    sig = child.start(cfg, f"mtls-acceptor-{index}", child.ACCEPTOR_SIGNALS)
    _run_loop(serve(cfg, index, None, hb, slot, mtls_sock, None, sig, handed=False))


def run(cfg: Config, index: int, sock: Listening, hb: Any = None, slot: int = 0,
        mtls_sock: Listening = None, fast_sock: Listening = None) -> None:
    # With fast acceptors, these serve the unknown and the shed: they yield the cores to them.
    sig = child.start(cfg, f"acceptor-{index}", child.ACCEPTOR_SIGNALS,
                      nice=cfg.supervisor.acceptor_nice if cfg.supervisor.fast_acceptors else 0)
    _run_loop(serve(cfg, index, sock, hb, slot, mtls_sock, fast_sock, sig))
