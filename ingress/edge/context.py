"""An acceptor process's shared state: the SessionHost (ingress.edge.host) its sessions run against.

API:
    AcceptorContext(cfg, index, loop, nofile=0, fast=False, mtls_only=False)
        the policy hooks that join several parts: connect_evidence, decide (the lane, with the
        shares and rates), over_rate_why, hand_off / hand_back (ingress.edge.handoff), admit
        (with the shared per-IP rate of [cluster] redis), penalise (here, in every acceptor,
        in every edge), lane_saturated, bulk_mail_admitted (the global bulk bucket, else the
        local share), count; learned_from_lane / unlearned_from_lane (a worker's verdict,
        acceptor 0 writing Redis); serve_handed / serve_returned (a socket handed over between
        acceptors). The parts it holds are used directly by their users: .table (the session
        table: ingress.edge.sessions), .spf_service (ingress.edge.spf_service), .learned_store
        (ingress.edge.learned_store), .lanes (the lane clients: ingress.edge.lanes), .retries
        (the deferral records: ingress.edge.retries), .cluster (with [cluster] redis the
        shared state: ingress.edge.cluster_state), .verifier and .verify_store (with
        smtp.verify_recipients the callout cache and its file: ingress.edge.rcpt_verify,
        ingress.edge.verify_store; loaded here)
    slot_name(kind, index), slot_names(cfg)    an acceptor slot's short name ("a0", "f0",
                                               "m0"), and every slot this host runs
    verifier(cfg), load_recipient_map(path), starttls_context(cfg)   parts built at start

Rates at MAIL FROM: each acceptor holds its part of classify.domain_rate per domain and of
tiers.self_proven_rate for the whole self-proven tier (over_rate_why); over its part, or named
over by a fast broker, an identity is served as bulk (decide: reason over-rate:<key>) and its
over_rate line is logged at most once per OVER_RATE_LOG_EVERY per key.

Memory: the bytes all sessions hold in DATA (until their ack) are bounded by one DataBudget
(smtp.data_memory_budget, with smtp.data_fast_reserve for the fast lane only, of which the
capped trust tiers their parts: ingress.policy.tiers).

Set-up builds the Public Suffix List (ingress.policy.identity.warm) before any session: a new
acceptor of a reload does not build it on its event loop at its first client's name.

Failure modes: a recipient map or TLS certificate that cannot be read raises at start (the
supervisor's config check reads them first); every hook runs on the event loop and never blocks
(no DNS, no disk). Limits: those of the parts (their own modules), OVER_RATE_LOGGED_MAX keys of
over_rate lines.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ingress.core import log, metrics
from ingress.core.addr import ip_key, site_key
from ingress.core.config import Config
from ingress.core.derived import domain_buckets, rate_parts, tier_buckets
from ingress.core.downstream import parse_downstream
from ingress.core.ratelimit import FairBucket, KeyedBuckets
from ingress.core.wire import Lane
from ingress.edge import handoff, mtls, proxy
from ingress.edge.checks import Checks
from ingress.edge.cluster_state import ClusterState
from ingress.edge.dataread import DataBudget
from ingress.edge.evidence import cert_evidence, normalize_fingerprint, sha256_fingerprint
from ingress.edge.handler import IngressHandler
from ingress.edge.host import Prototype
from ingress.edge.lanes import Lanes
from ingress.edge.learned_store import LearnedStore
from ingress.edge.rcpt_verify import RecipientVerifier
from ingress.edge.retries import RetryRecords
from ingress.edge.sessions import Seat, SessionTable
from ingress.edge.smtp import IngressSMTP
from ingress.edge.spf_service import SpfService
from ingress.edge.verify_store import VerifyStore
from ingress.policy.classify import ClassifyPolicy, Decision, Evidence, StaticAllow, decide
from ingress.policy.identity import (
    RATE_TRACKED,
    over_rate_reason,
    rate_bounded,
    share_key,
    warm,
)
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
STRESS_RECHECK = 0.1         # seconds a stress judgement (lane_saturated) is reused


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
    each its own module, which the sessions use directly: the session table (.table:
    ingress.edge.sessions), the SPF service (.spf_service), the learned store
    (.learned_store), the lane clients (.lanes), the retry evidence (.retries:
    ingress.edge.retries)."""

    def __init__(self, cfg: Config, index: int, loop: asyncio.AbstractEventLoop,
                 nofile: int = 0, fast: bool = False, mtls_only: bool = False) -> None:
        self.cfg, self.index, self.loop = cfg, index, loop
        warm()      # the PSL, before the first client's name needs it (not on its time)
        self._stress, self._stress_at = False, float("-inf")     # lane_saturated's memo
        self.slot = slot_name("mtls" if mtls_only else "fast" if fast else "port25", index)
        self.ident = f"{self.slot}-{os.getpid()}"
        # a port-25 acceptor hands clients classified fast at connect to the fast acceptors
        # (ingress.edge.handoff); a fast acceptor serves what it is handed, and hands nothing on
        self.handoff = None if fast else handoff.Sender(cfg, loop, self.serve_returned, index)
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
        self.steer_writer: Callable[[str, float], None] | None = None   # the service sets it
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
        self.retries = RetryRecords(cfg, self.ident, self.lanes)
        # [cluster] redis: the state every edge shares (None: in-process only, one host); what
        # another edge learned goes straight into the learned store
        self.cluster = ClusterState.create(
            cfg, self.ident, lambda ip: self.table.penalise(ip, time.monotonic()),
            self.learned_store.learn, self.retries.on_record,
            on_unlearn=self.learned_store.unlearn)
        self.retries.cluster = self.cluster
        # the evidence checks (ingress.edge.checks): none without DNS
        self.checks = Checks.from_config(cfg, self)

    # --- the policy hooks of the SessionHost protocol (ingress.edge.host) ----------------------

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
        over = self.cluster is not None and proto.conn.lane is Lane.BULK and self.cluster.conn_over(
            ip_key(proto.conn.peer_ip, self.table.admission.limits.ipv6_prefix), now)
        return self.table.admit(proto, self.draining, now, shared_rate_over=over)

    def steer(self, ip: str) -> None:
        """A client a DNS allow list vouches for (the third-party tier): the kernel steers its
        next connections to the fast acceptors for dnswl.steer_ttl (the supervisor reads the
        steer table: ingress.core.steer_table), so they never wait in port 25's accept queue."""
        if self.steer_writer is not None:      # (derived.steer_listed: given only then)
            self.steer_writer(ip, time.monotonic() + self.cfg.dnswl.steer_ttl)

    def penalise(self, ip: str) -> None:
        """Here at once, and in every other acceptor through the bulk broker's fan-out (and in
        every other edge through Redis, with [cluster] redis)."""
        self.table.penalise(ip, time.monotonic())
        self.lanes.share_penalty(ip)
        if self.cluster is not None:
            self.cluster.share_penalty(ip)

    def lane_saturated(self, lane: Lane) -> bool:
        """Stress (the bulk lane cannot take more): asked at every command of a bulk session
        (its idle timeout), so judged at most every STRESS_RECHECK seconds; its inputs (the
        brokers' status, the buckets) move on that scale or slower."""
        if lane is not Lane.BULK:
            return False
        now = time.monotonic()
        if now - self._stress_at < STRESS_RECHECK:
            return self._stress
        self._stress_at = now
        self._stress = self.lanes.lane_saturated(lane) or (
            self.cluster is not None and self.cluster.bulk_spent(now))
        return self._stress

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

    def count(self, what: str, lane: Lane) -> None:
        self.counters[f"{what}_{lane.value}"] += 1

    # --- the learned allow cache: what the workers learn and unlearn ---------------------------

    def learned_from_lane(self, ip: str, domain: str = "", provider: str = "") -> None:
        """A worker learned `ip` (every acceptor of this edge hears it from the lane brokers),
        and `provider` (its verified PTR name's provider identity, ingress.policy.iprev) for
        the same domain; acceptor 0 records the network in Redis for the other edges, with the
        entries the quotas evicted for it (so Redis holds what the quotas hold, not just the
        newest; the providers stay in this edge)."""
        now = time.time()
        if provider and domain:
            self.learned_store.learn_provider(provider, now, domain)
        evicted = self.learned_store.learn(ip, now, domain)
        if self.cluster is not None and self.learned_writer:
            key = self.learned_store.allow.key(ip)
            if self.learned_store.allow.expiry(key) is not None:
                self.cluster.share_learned(key, self.learned_store.allow.domain(key))
            self.cluster.forget_learned(evicted)

    def unlearned_from_lane(self, ip: str, provider: str = "") -> None:
        """A worker saw mail from `ip`'s learned network (or of the learned `provider`) fail
        SPF or DKIM: forget the entry, and the provider's (every acceptor of this edge hears
        it; acceptor 0 removes the network's from Redis, whence the other edges hear it too)."""
        if provider and self.learned_store.unlearn_provider(provider) and self.learned_writer:
            log.event("unlearned", peer=ip, provider=provider)
        key = self.learned_store.unlearn(ip)
        if not self.learned_writer:
            return
        if key is not None:
            log.event("unlearned", peer=ip, key=key)
        if self.cluster is not None:
            self.cluster.share_unlearned(key or self.learned_store.allow.key(ip))

    # --- sockets handed over between acceptors (ingress.edge.handoff) --------------------------

    def serve_handed(self, conn: socket.socket, sender: Any = None) -> None:
        """A fast acceptor: an SMTP session on a socket another acceptor accepted and handed
        over (classified again here, from the same evidence, with this process's own slots);
        refused here, it goes back to `sender` (IngressSMTP.hand_back_to, hand_back)."""
        self._serve_socket(conn, lambda: IngressSMTP(self, hand_back_to=sender))

    def serve_returned(self, conn: socket.socket) -> None:
        """A port-25 acceptor: a connection it had handed to a fast acceptor, given back (that
        one could not admit it): served here, where it arrived, and never handed off again."""
        self.counters["returned"] += 1
        self._serve_socket(conn, lambda: IngressSMTP(self, returned=True))

    def _serve_socket(self, conn: socket.socket, factory: Any) -> None:
        async def start() -> None:
            try:
                await self.loop.connect_accepted_socket(factory, conn)
            except OSError as e:        # the client went meanwhile
                conn.close()
                log.event("handoff_session_failed", "info", error=str(e))
        self.loop.create_task(start())


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

