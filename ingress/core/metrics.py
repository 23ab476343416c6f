"""Prometheus metrics, aggregated across every process (prometheus-client multiprocess mode).

Purpose: one scrape endpoint on the supervisor shows what the acceptors, brokers and workers
count. Each child writes its values to its own mmap'd files in PROMETHEUS_MULTIPROC_DIR; the
supervisor's HTTP thread merges them at scrape time (MultiProcessCollector) and adds the spool
and relay-backlog gauges (counts, bytes, backlog by age bucket, the spool filesystem's free
bytes), which it computes itself by counting files and one statvfs (SpoolCollector).

API (supervisor):
    setup_dir(state_dir) -> Path    before spawning any child: empties <state_dir>/metrics,
                                    sets os.environ["PROMETHEUS_MULTIPROC_DIR"] (children inherit
                                    it through spawn and must import prometheus_client after)
    serve(listen, spool_dir, state_dir) -> MetricsServer | None
                                    HTTP on "host:port" ("" = off; port 0 = any, see .port);
                                    a daemon thread. None (and a log line) if it cannot bind.
    child_dead(pid)                 after reaping a child: drops its live gauges
    configured(cfg)                 at start and reload: the connection slots the config gives
                                    (smtp_ingress_connection_slots{kind=total|fast_reserved|bulk},
                                    over all acceptors), for "sessions vs slots" on a dashboard
    child_exited(kind)              a child died unexpectedly (it will be restarted): counted in
                                    smtp_ingress_child_exits_total{kind} (this process's memory,
                                    exported by SupervisorCollector; always present, 0 per kind)
    MetricsServer.close()           stop serving (reload with a new metrics.listen, drain)

API (hot path: a dict lookup, then one mmap write per counter/gauge, two per histogram
observation; measured ~1.5 us per counter inc and ~3-5 us per observe on the dev VM, see
`python -m tests.integration.test_metrics`):
    Outcome, Result, RcptResult     StrEnums: the declared labels of connection(), message(),
                                    recipient() (OUTCOMES, RESULTS, RCPT_RESULTS: their values);
                                    an undeclared label raises ValueError at its first use
    connection(lane, outcome)       a connection ended its admission: Outcome
    session_open(lane) / session_close(lane)      live sessions per lane (acceptors)
    message(lane, result)           a transaction's end: Result (accepted = 250 after DATA,
                                    tempfailed = a 4xx that ends it, rejected = a 5xx to DATA)
    recipient(lane, result)         a RCPT TO answer: RcptResult
    observe_banner(lane, seconds)   connect -> banner written
    observe_ack(lane, seconds)      end of DATA -> 250 (or the 4xx) written
    DeferReason, RetryResult        StrEnums: the labels of deferred() and retry()
    deferred(lane, reason)          we deferred a transaction for the bulk cap (DeferReason)
    retry(lane, result)             a transaction we had deferred came back: RetryResult
    deferred_accepted(lane, seconds)   a transaction we had deferred got its 250: counted, and
                                    the time since its first deferral (RETRY_BUCKETS, 1 s .. 1 d)
    lane_status(lane, depth=, saturated=, free_credit=, workers=, tokens=)   broker, per status
    lane_nack(lane, reason)         broker refused or lost a message (a wire.NackReason)
    fast_identity(key, size)        fast broker: one message of identity share key `key`
                                    dispatched (smtp_ingress_fast_identity_messages/_bytes
                                    {kind, identity}): the first TOP_IDENTITIES keys a process
                                    sees are named, every later one is "other" (an attacker
                                    controls domains: at most TOP_IDENTITIES + 1 values a kind)
    over_share(what, key)           a session ("session") or message ("message") of identity
                                    `key` served as bulk because the identity is at its share
                                    (smtp_ingress_over_share{what, kind})
    over_tier(tier, what)           a session or message of a capped trust tier
                                    (ingress.policy.tiers: "third-party", "self-proven")
                                    served as bulk because the tier as a whole is at its cap:
                                    what = session (slots), ip (admission.per_ip_fast_max),
                                    message (fast queue or worker credit), rate (the tier's
                                    total rate) (smtp_ingress_over_tier{tier, what})
    spooled(lane, n=1, seconds=)    worker: n messages durable; the group commit's duration
    relay_replies(codes, seconds)   relay: one delivery's per-recipient reply codes, its duration
    relay_error(n)                  relay: n recipients hit connection-level trouble
    relay_breaker(state, failures)  relay: circuit breaker BREAKER_CLOSED|OPEN|HALF_OPEN
    relay_dsn()                     relay: a DSN was spooled (smtp_ingress_relay_dsns_total)
    relay_dsn_decision(result)      relay: a message with failed recipients, whether it got a
                                    DSN (smtp_ingress_relay_dsn_decisions_total{result},
                                    DSN_RESULTS: ingress.policy.dsn.Result's values: sent,
                                    null_sender, suppressed_never, unsendable,
                                    suppressed_unauthenticated, rate_limited, rate_table_full)
    relay_forwarded(method)         relay: a delivery attempt, by how the original client's
                                    identity went to the downstream (FORWARD_METHODS: xclient,
                                    xforward, none)
    relay_forward_missing(mode)     relay: a downstream connection not used because
                                    relay.forward_client = mode ("xclient"/"xforward") and the
                                    downstream does not offer it (the mail waits)
    curve_refused(why)              lanes node: a peer refused (CURVE_REFUSALS: unknown_key,
                                    handshake), counted before the log lines' rate limit
    mtls_gate(tier, outcome)        mutual-TLS port: a connection at the handshake gate
                                    (MTLS_TIERS x MTLS_GATE_OUTCOMES)
    mtls_handshake(tier, result)    mutual-TLS port: a handshake ended (MTLS_RESULTS)
    spf_refused(reason)             acceptor: an SPF check answered temperror at once, without a
                                    lookup (SPF_REFUSALS: timeout = the sender's domain timed
                                    out lately; domain / network / backlog = that many checks
                                    of the domain, from the client's network, in the process,
                                    under way: ingress.policy.spf_gate)
    cluster_state(up)               acceptor: its Redis ([cluster] redis) up or down
    cluster_fallback()              acceptor: a decision taken on local limits (Redis down/slow)

`lane` is "fast" | "bulk" (wire.Lane is a StrEnum, so a Lane works as is).

Failure modes: once a label set's value exists, inc/set/observe only write to an mmap and do
not raise. The first use of a label set in a process opens (creates) that process's .db file: it
raises OSError if PROMETHEUS_MULTIPROC_DIR names a missing or unwritable directory, which
setup_dir() rules out by creating it before any child exists. Without PROMETHEUS_MULTIPROC_DIR
(unit tests, tools) the values live in process memory and nothing is written. serve() never
raises for a busy port: it logs metrics_listen_failed and returns None (mail flows on).

Limits: one .db file per process and metric type; a restarted child starts new files, and the
dead child's counters stay (counters must not go backwards), so the directory grows with restarts
until the next start clears it (a crash loop of 10k restarts is ~10k small files; the scrape cost
grows with it). Gauges use "live" modes: a dead child's gauges vanish once child_dead(pid) is
called. The spool scan stops after SCAN_MAX entries per directory (and says so in
smtp_ingress_spool_scan_truncated) and is cached for SCAN_CACHE seconds, so scraping costs at
most a bounded directory listing. Histograms use BUCKETS (1 ms .. 10 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from ingress.core.wire import Lane, NackReason

ENV = "PROMETHEUS_MULTIPROC_DIR"
SUBDIR = "metrics"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCAN_MAX = 100_000
SCAN_CACHE = 1.0

LANES = ("fast", "bulk")


class Outcome(StrEnum):
    """connection()'s labels: how a connection ended its admission. The refusals are
    ingress.policy.admission.Refusal's values."""

    ADMITTED = "admitted"               # passed admission (Refusal.ADMITTED)
    SLOTS = "slots"                     # 421 before the banner: slots (or the bulk share) full
    PER_IP = "per-ip"                   # per-IP (/64) bulk concurrency cap
    RATE = "rate"                       # per-IP connection rate
    PENALISED = "penalised"             # refused during an early-talker penalty
    EARLY_TALKER = "early_talker"       # admitted, then spoke before the banner (554)
    DRAINING = "draining"               # 421 because this acceptor is draining
    PROXY_REJECTED = "proxy_rejected"   # PROXY header invalid or from an untrusted peer
    NOT_FAST = "not_fast"               # a bulk client on the fast port (554)
    TLS_FAILED = "tls_failed"           # the mutual-TLS handshake failed after its slot
    TLS_BUSY = "tls_busy"               # mutual-TLS port: refused by the handshake gate (an
                                        # alert, no handshake: ingress.edge.mtls)
    EVICTED_SILENT = "evicted_silent"   # silent since its banner, evicted to make room (421)
    HANDED_OFF = "handed_off"           # classified fast at connect, passed to a fast acceptor
    EVICTED = "evicted"                 # an idle lower-tier session closed (421) to make room
                                        # for an operator-tier client (ingress.policy.tiers)
    HANDED_BACK = "handed_back"         # a fast acceptor could not admit a handed connection:
                                        # given back to the acceptor it came from, served there


class Result(StrEnum):
    """message()'s labels: how a transaction ended."""

    ACCEPTED = "accepted"
    TEMPFAILED = "tempfailed"
    REJECTED = "rejected"
    SHED = "shed"                       # bulk over its cap at its first RCPT (451 / 421)
    BAD_COMMAND = "bad_command"         # HELO/EHLO/MAIL refused: bad argument (501), 553 5.6.7
    CUT_OFF = "cut_off"                 # 421 4.7.0: too many errors, or MAILs without a message


class RcptResult(StrEnum):
    """recipient()'s labels: a RCPT TO answer."""

    ACCEPTED = "accepted"
    RELAY_DENIED = "relay_denied"
    UNKNOWN_USER = "unknown_user"
    TOO_MANY = "too_many"
    BAD_ADDRESS = "bad_address"         # 501 bad argument, 553 5.6.7 non-ASCII without SMTPUTF8
    UNVERIFIED = "unverified"           # 450 4.1.1: recipient verification was not sure
    DEFERRED = "deferred"               # 451 4.7.1: its transaction deferred for the bulk cap


class DeferReason(StrEnum):
    """deferred()'s labels: why we deferred a transaction (a retry of it is evidence)."""

    RCPT_CAP = "rcpt_cap"               # shed at its first RCPT TO (451 4.7.1): this
                                        # acceptor's share of the bulk cap was spent
    DATA_RATE = "data_rate"             # the lane broker NACKed it for the rate cap after DATA


class RetryResult(StrEnum):
    """retry()'s labels: what a retry of a deferred transaction got at its first RCPT TO."""

    BYPASSED = "bypassed"               # took a token of the retry share instead of the cap
    TOO_EARLY = "too_early"             # before admission.retry_min_delay: the cap applies
    HAMMERED = "hammered"               # its site is shed more than admission.retry_hammer_
                                        # sheds a minute (or was, when deferred): no evidence
    OVER_SHARE = "over_share"           # the retry share, or its site's part of it, was
                                        # spent: the cap applies


OUTCOMES = tuple(o.value for o in Outcome)
RESULTS = tuple(r.value for r in Result)
RCPT_RESULTS = tuple(r.value for r in RcptResult)

# --- metric definitions (names are the contract with dashboards: change with care) -----------

CONNECTIONS = Counter("smtp_ingress_connections", "Connections by lane and admission outcome",
                      ["lane", "outcome"])
SESSIONS = Gauge("smtp_ingress_sessions", "Live SMTP sessions by lane", ["lane"],
                 multiprocess_mode="livesum")
RECIPIENTS = Counter("smtp_ingress_recipients", "RCPT TO answers by lane and result",
                     ["lane", "result"])
MESSAGES = Counter("smtp_ingress_messages", "DATA transactions by lane and result "
                   "(accepted = 250, tempfailed = 4xx, rejected = 5xx)", ["lane", "result"])
BANNER_SECONDS = Histogram("smtp_ingress_banner_seconds", "Connect to banner written",
                           ["lane"], buckets=BUCKETS)
ACK_SECONDS = Histogram("smtp_ingress_data_ack_seconds",
                        "End of DATA to the reply (250 after the durable write, or 4xx)",
                        ["lane"], buckets=BUCKETS)
LANE_DEPTH = Gauge("smtp_ingress_lane_queue_depth", "Messages queued in the lane broker",
                   ["lane"], multiprocess_mode="livemostrecent")
LANE_SATURATED = Gauge("smtp_ingress_lane_saturated",
                       "1 while the lane refuses new work (bulk cap: rate, queue or no workers)",
                       ["lane"], multiprocess_mode="livemostrecent")
LANE_CREDIT = Gauge("smtp_ingress_lane_free_credit", "Free worker credit in the lane broker",
                    ["lane"], multiprocess_mode="livemostrecent")
LANE_WORKERS = Gauge("smtp_ingress_lane_workers", "Workers registered with the lane broker",
                     ["lane"], multiprocess_mode="livemostrecent")
LANE_TOKENS = Gauge("smtp_ingress_lane_tokens", "Tokens left in the lane's rate bucket "
                    "(absent for an uncapped lane)", ["lane"], multiprocess_mode="livemostrecent")
LANE_NACKS = Counter("smtp_ingress_lane_nacks", "Messages the lane broker refused or lost",
                     ["lane", "reason"])
RETRY_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 86400.0)
DEFERRALS = Counter("smtp_ingress_deferrals", "Transactions we deferred (4xx) for the bulk cap, "
                    "by lane and reason", ["lane", "reason"])
RETRIES = Counter("smtp_ingress_deferral_retries", "Retries of deferred transactions over the "
                  "bulk cap, by lane and result", ["lane", "result"])
DEFERRED_ACCEPTED = Counter("smtp_ingress_deferred_accepted", "Transactions we had deferred "
                            "that were later accepted (250)", ["lane"])
DEFERRED_WAIT = Histogram("smtp_ingress_deferred_to_accepted_seconds", "First deferral of a "
                          "transaction to its acceptance", ["lane"], buckets=RETRY_BUCKETS)
SPOOLED = Counter("smtp_ingress_spooled_messages", "Messages written durably by workers",
                  ["lane"])
COMMIT_SECONDS = Histogram("smtp_ingress_spool_commit_seconds",
                           "One group commit (write, fsync, rename, fsync dir)", ["lane"],
                           buckets=BUCKETS)

RELAY_RESULTS = ("2xx", "4xx", "5xx", "error")
RELAY_DELIVERIES = Counter("smtp_ingress_relay_deliveries",
                           "Relay results per recipient: the downstream's reply class, or error "
                           "(connection-level trouble: refused, timeout, lost reply)", ["result"])
RELAY_SECONDS = Histogram("smtp_ingress_relay_downstream_seconds",
                          "One delivery to the downstream: MAIL FROM to the last reply",
                          buckets=BUCKETS)
BREAKER_CLOSED, BREAKER_OPEN, BREAKER_HALF_OPEN = 0, 1, 2
RELAY_BREAKER = Gauge("smtp_ingress_relay_breaker_state",
                      "Downstream circuit breaker: 0 closed, 1 open (backing off), 2 half-open "
                      "(one probe delivery)", multiprocess_mode="livemostrecent")
RELAY_BREAKER_FAILURES = Gauge("smtp_ingress_relay_breaker_failures",
                               "Consecutive connection-level downstream failures",
                               multiprocess_mode="livemostrecent")
FAST_IDENTITY_MESSAGES = Counter("smtp_ingress_fast_identity_messages",
                                 "Fast-lane messages dispatched, by identity kind and identity "
                                 "(bounded: TOP_IDENTITIES named, the rest 'other')",
                                 ["kind", "identity"])
FAST_IDENTITY_BYTES = Counter("smtp_ingress_fast_identity_bytes",
                              "Fast-lane message bytes dispatched, by identity kind and identity",
                              ["kind", "identity"])
OVER_SHARE = Counter("smtp_ingress_over_share", "Sessions or messages served as bulk because "
                     "their identity was at its share of the fast lane (what: session = of "
                     "the slots, message = of the fast queue or, for a domain, of "
                     "classify.domain_rate at the broker, rate = a domain the broker named "
                     "over its rate, kept bulk at MAIL FROM)", ["what", "kind"])
OVER_TIERS = ("third-party", "self-proven")
OVER_TIER_WHAT = ("session", "ip", "message", "rate")
OVER_TIER = Counter("smtp_ingress_over_tier", "Sessions or messages served as bulk because their "
                    "trust tier as a whole was at its cap (what: session = its part of the "
                    "fast reserve of slots, ip = admission.per_ip_fast_max, message = its part "
                    "of the fast queue or worker credit, rate = the tier's total rate)",
                    ["tier", "what"])
RELAY_DSNS = Counter("smtp_ingress_relay_dsns", "Delivery status notifications spooled")
DSN_RESULTS = ("sent", "null_sender", "suppressed_never", "unsendable",
               "suppressed_unauthenticated", "rate_limited", "rate_table_full")
RELAY_DSN_DECISIONS = Counter("smtp_ingress_relay_dsn_decisions",
                              "Messages with failed recipients by what became of their DSN "
                              "(relay.dsn): sent, or why not (null_sender, suppressed_never, "
                              "unsendable, suppressed_unauthenticated: the return path was not "
                              "authenticated, rate_limited / rate_table_full: relay.dsn_rate)",
                              ["result"])
FORWARD_METHODS = ("xclient", "xforward", "none")
RELAY_FORWARDED = Counter("smtp_ingress_relay_forwarded",
                          "Relay delivery attempts by how the original client's identity went to "
                          "the downstream: xclient, xforward, none (relay.forward_client off, "
                          "not offered under auto, LMTP, or a message the relay made itself)",
                          ["method"])
RELAY_FORWARD_MISSING = Counter("smtp_ingress_relay_forward_missing",
                                "Downstream connections not used because relay.forward_client "
                                "forces a method the downstream does not offer (mail waits)",
                                ["method"])
CURVE_REFUSALS = ("unknown_key", "handshake")
CURVE_REFUSED = Counter("smtp_ingress_curve_refused",
                        "Peers a lanes node refused on its tcp ports: unknown_key (ZAP: a CURVE "
                        "key not in cluster.allowed_keys) or handshake (no CURVE, a wrong server "
                        "key)", ["why"])
# The mutual-TLS port's handshake gate (ingress/policy/handshake_gate.py, ingress/edge/mtls.py)
MTLS_TIERS = ("known", "stranger", "failed")
MTLS_GATE_OUTCOMES = ("started", "waited", "refused")
MTLS_RESULTS = ("ok", "failed")
MTLS_GATE = Counter("smtp_ingress_mtls_gate",
                    "Connections on the mutual-TLS port at the handshake gate, by tier (known: "
                    "its network showed a valid certificate lately; stranger; failed: its "
                    "address failed a handshake lately) and outcome (started: at once; waited: "
                    "started after a wait for a token; refused: a TLS alert, no handshake)",
                    ["tier", "outcome"])
MTLS_HANDSHAKES = Counter("smtp_ingress_mtls_handshakes",
                          "TLS handshakes done on the mutual-TLS port, by tier and result (ok, "
                          "failed: no or a bad certificate, a stall, the client went)",
                          ["tier", "result"])
SPF_REFUSALS = ("timeout", "domain", "network", "backlog")
SPF_REFUSED = Counter("smtp_ingress_spf_refused",
                      "SPF checks answered temperror at once, without a lookup, by reason: "
                      "timeout (the sender's domain timed out lately), domain, network or "
                      "backlog (that many checks of the domain, from the client's network, "
                      "or in the acceptor, already under way)", ["reason"])
# [cluster] redis (ingress/edge/cluster_state.py): per acceptor, 1 while its Redis is reachable
CLUSTER_UP = Gauge("smtp_ingress_cluster_state_up",
                   "Shared admission state in Redis reachable (1) or local fallback (0), "
                   "per acceptor", multiprocess_mode="livemin")
CLUSTER_FALLBACKS = Counter("smtp_ingress_cluster_state_fallbacks",
                            "Admission decisions taken on local limits because Redis was "
                            "down or too slow")
# Relay backlog age buckets (upper bounds in seconds; the last is open-ended).
BACKLOG_AGES = (("lt_1m", 60.0), ("1m_10m", 600.0), ("10m_1h", 3600.0), ("1h_1d", 86400.0),
                ("gt_1d", float("inf")))

# Pre-bound label children, filled on first use (binding at import would create .db files in
# every process that merely imports this module, e.g. the CLI).
_conn: dict[tuple[str, str], Any] = {}
_sess: dict[str, Any] = {}
_msg: dict[tuple[str, str], Any] = {}
_rcpt: dict[tuple[str, str], Any] = {}
_banner: dict[str, Any] = {}
_ack: dict[str, Any] = {}
_defer: dict[tuple[str, str], Any] = {}
_retry: dict[tuple[str, str], Any] = {}
_over_tier: dict[tuple[str, str], Any] = {}
_mtls_gate: dict[tuple[str, str], Any] = {}
_mtls_hs: dict[tuple[str, str], Any] = {}
_spf: dict[str, Any] = {}
_dsn: dict[str, Any] = {}
_forwarded: dict[str, Any] = {}
_forward_missing: dict[str, Any] = {}


def _bind(cache: dict[Any, Any], metric: Any, key: Any,
          labels: type[StrEnum] | None = None,
          declared: tuple[tuple[str, ...], ...] | None = None) -> Any:
    """The first use of a label set: bind it (and cache the child). With `labels`, the last
    label must be one of that enum's; with `declared`, each label one of its tuple's
    (ValueError otherwise): an undeclared label is never emitted. Later uses hit the cache and
    cost no check."""
    if labels is not None:
        labels(key[-1])
    if declared is not None:
        values = key if isinstance(key, tuple) else (key,)
        if len(values) != len(declared) or any(
                v not in ok for v, ok in zip(values, declared, strict=False)):
            raise ValueError(f"undeclared labels {key!r} of {metric}")
    child = cache[key] = metric.labels(*key) if isinstance(key, tuple) else metric.labels(key)
    return child


# --- hot path (acceptors) ---------------------------------------------------------------------

def connection(lane: str, outcome: Outcome) -> None:
    key = (lane, outcome)
    (_conn.get(key) or _bind(_conn, CONNECTIONS, key, Outcome)).inc()


def session_open(lane: str) -> None:
    (_sess.get(lane) or _bind(_sess, SESSIONS, lane)).inc()


def session_close(lane: str) -> None:
    (_sess.get(lane) or _bind(_sess, SESSIONS, lane)).dec()


def message(lane: str, result: Result) -> None:
    key = (lane, result)
    (_msg.get(key) or _bind(_msg, MESSAGES, key, Result)).inc()


def recipient(lane: str, result: RcptResult) -> None:
    key = (lane, result)
    (_rcpt.get(key) or _bind(_rcpt, RECIPIENTS, key, RcptResult)).inc()


def observe_banner(lane: str, seconds: float) -> None:
    (_banner.get(lane) or _bind(_banner, BANNER_SECONDS, lane)).observe(seconds)


def observe_ack(lane: str, seconds: float) -> None:
    (_ack.get(lane) or _bind(_ack, ACK_SECONDS, lane)).observe(seconds)


def deferred(lane: str, reason: DeferReason) -> None:
    key = (lane, reason)
    (_defer.get(key) or _bind(_defer, DEFERRALS, key, DeferReason)).inc()


def retry(lane: str, result: RetryResult) -> None:
    key = (lane, result)
    (_retry.get(key) or _bind(_retry, RETRIES, key, RetryResult)).inc()


def deferred_accepted(lane: str, seconds: float) -> None:
    DEFERRED_ACCEPTED.labels(Lane(lane).value).inc()
    DEFERRED_WAIT.labels(Lane(lane).value).observe(max(0.0, seconds))


# --- brokers and workers ----------------------------------------------------------------------

def lane_status(lane: str, *, depth: int, saturated: bool, free_credit: int, workers: int,
                tokens: float | None = None) -> None:
    LANE_DEPTH.labels(lane).set(depth)
    LANE_SATURATED.labels(lane).set(1 if saturated else 0)
    LANE_CREDIT.labels(lane).set(free_credit)
    LANE_WORKERS.labels(lane).set(workers)
    if tokens is not None and tokens != float("inf"):
        LANE_TOKENS.labels(lane).set(tokens)


def lane_nack(lane: str, reason: NackReason) -> None:
    LANE_NACKS.labels(lane, reason).inc()


TOP_IDENTITIES = 16
IDENTITY_KINDS = ("allow", "cert", "org", "learned", "other")
_named: set[str] = set()


def _identity_labels(key: str) -> tuple[str, str]:
    kind = key.partition(":")[0]
    kind = kind if kind in IDENTITY_KINDS else "other"
    if key not in _named and len(_named) < TOP_IDENTITIES:
        _named.add(key)
    return kind, key if key in _named else "other"


def fast_identity(key: str, size: int) -> None:
    labels = _identity_labels(key)
    FAST_IDENTITY_MESSAGES.labels(*labels).inc()
    FAST_IDENTITY_BYTES.labels(*labels).inc(size)


def over_share(what: str, key: str) -> None:
    if what not in ("session", "message", "rate"):
        raise ValueError(f"over_share: {what!r}")
    OVER_SHARE.labels(what, _identity_labels(key)[0]).inc()


def over_tier(tier: str, what: str) -> None:
    key = (tier, what)
    (_over_tier.get(key) or _bind(_over_tier, OVER_TIER, key,
                                  declared=(OVER_TIERS, OVER_TIER_WHAT))).inc()


def spooled(lane: str, n: int = 1, seconds: float | None = None) -> None:
    SPOOLED.labels(lane).inc(n)
    if seconds is not None:
        COMMIT_SECONDS.labels(lane).observe(seconds)


# --- relay ------------------------------------------------------------------------------------

def relay_class(code: int) -> str:
    return {2: "2xx", 4: "4xx", 5: "5xx"}.get(code // 100, "error")


def relay_replies(codes: Any, seconds: float | None = None) -> None:
    for code in codes:
        RELAY_DELIVERIES.labels(relay_class(int(code))).inc()
    if seconds is not None:
        RELAY_SECONDS.observe(seconds)


def relay_error(n: int = 1) -> None:
    RELAY_DELIVERIES.labels("error").inc(n)


def relay_breaker(state: int, failures: int = 0) -> None:
    RELAY_BREAKER.set(state)
    RELAY_BREAKER_FAILURES.set(failures)


def curve_refused(why: str) -> None:
    """A lanes node refused a peer (ingress.core.cluster): `why` in CURVE_REFUSALS."""
    if why not in CURVE_REFUSALS:
        raise ValueError(f"undeclared curve_refused label {why!r}")
    CURVE_REFUSED.labels(why=why).inc()


def mtls_gate(tier: str, outcome: str) -> None:
    """A connection on the mutual-TLS port passed the handshake gate: `tier` in MTLS_TIERS,
    `outcome` in MTLS_GATE_OUTCOMES."""
    key = (tier, outcome)
    (_mtls_gate.get(key) or _bind(_mtls_gate, MTLS_GATE, key,
                                  declared=(MTLS_TIERS, MTLS_GATE_OUTCOMES))).inc()


def mtls_handshake(tier: str, result: str) -> None:
    """A TLS handshake on the mutual-TLS port ended: `result` in MTLS_RESULTS."""
    key = (tier, result)
    (_mtls_hs.get(key) or _bind(_mtls_hs, MTLS_HANDSHAKES, key,
                                declared=(MTLS_TIERS, MTLS_RESULTS))).inc()


def spf_refused(reason: str) -> None:
    """An acceptor answered an SPF check temperror without a lookup: `reason` in SPF_REFUSALS."""
    (_spf.get(reason) or _bind(_spf, SPF_REFUSED, reason, declared=(SPF_REFUSALS,))).inc()


def relay_dsn() -> None:
    RELAY_DSNS.inc()


def relay_dsn_decision(result: str) -> None:
    """The relay decided about a DSN (ingress.policy.dsn): `result` in DSN_RESULTS."""
    (_dsn.get(result) or _bind(_dsn, RELAY_DSN_DECISIONS, result,
                               declared=(DSN_RESULTS,))).inc()


def relay_forwarded(method: str) -> None:
    """A relay delivery attempt; `method` in FORWARD_METHODS."""
    (_forwarded.get(method)
     or _bind(_forwarded, RELAY_FORWARDED, method, declared=(FORWARD_METHODS,))).inc()


def relay_forward_missing(mode: str) -> None:
    """A downstream connection refused for want of the forced method `mode`."""
    (_forward_missing.get(mode) or _bind(_forward_missing, RELAY_FORWARD_MISSING, mode,
                                         declared=(FORWARD_METHODS[:2],))).inc()


def cluster_state(up: bool) -> None:
    """An acceptor's Redis went up or down (ingress/edge/cluster_state.py)."""
    CLUSTER_UP.set(1 if up else 0)


def cluster_fallback() -> None:
    """One admission decision fell back to local limits (Redis down or over its deadline)."""
    CLUSTER_FALLBACKS.inc()


# --- supervisor -------------------------------------------------------------------------------

def setup_dir(state_dir: Path | str) -> Path:
    """Empty <state_dir>/metrics and point PROMETHEUS_MULTIPROC_DIR at it (call before spawn)."""
    d = Path(state_dir) / SUBDIR
    if d.is_dir():
        for f in d.iterdir():
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                f.unlink()
    else:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(d)
    return d


def child_dead(pid: int) -> None:
    """A child is gone: its live gauges must stop counting (its counters stay)."""
    path = os.environ.get(ENV)
    if path:
        with contextlib.suppress(OSError):
            mark_process_dead(pid, path)


CHILD_KINDS = ("acceptor", "broker", "worker", "relay")
_child_exits: dict[str, int] = dict.fromkeys(CHILD_KINDS, 0)


_slots: dict[str, int] = {}


def configured(cfg: Any, slots: tuple[int, int] | None = None) -> None:
    """Supervisor: the slot capacity of the running config (an ingress.core.config.Config);
    `slots`: (max_connections, fast_reserve) per acceptor as derived (admission.connection_limit;
    default: the configured values)."""
    n, s = cfg.acceptor_count, cfg.smtp
    total, reserve = slots if slots is not None else (s.max_connections, s.fast_reserve)
    _slots.update(total=total * n, fast_reserved=reserve * n, bulk=(total - reserve) * n)


def child_exited(kind: str) -> None:
    """Supervisor only (its scrape thread reads the dict; an int add under the GIL)."""
    _child_exits[kind] = _child_exits.get(kind, 0) + 1


class SupervisorCollector(Collector):
    """What the supervisor itself knows: unexpected child exits (restart loops), slot capacity."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = CounterMetricFamily("smtp_ingress_child_exits",
                                "Children that exited or hung unexpectedly (then restarted)",
                                labels=["kind"])
        for kind, n in list(_child_exits.items()):
            c.add_metric([kind], n)
        yield c
        if _slots:
            g = GaugeMetricFamily("smtp_ingress_connection_slots",
                                  "Connection slots the config gives, over all acceptors: total, "
                                  "reserved for the fast lane, usable by bulk", labels=["kind"])
            for kind, n in list(_slots.items()):
                g.add_metric([kind], n)
            yield g


@dataclass
class SpoolStats:
    at: float = 0.0
    counts: dict[str, int] | None = None
    new_bytes: int = 0
    oldest_age: float = 0.0
    truncated: bool = False
    ages: dict[str, int] | None = None         # relay backlog by BACKLOG_AGES bucket
    fs_free: int = -1                          # bytes available to the service (statvfs)
    fs_size: int = -1


class SpoolCollector(Collector):
    """Counts spool files at scrape time: bounded (SCAN_MAX) and cached (SCAN_CACHE)."""

    DIRS = ("new", "tmp", "failed", "hold")

    def __init__(self, spool_dir: Path | str) -> None:
        self.root = Path(spool_dir)
        self.stats = SpoolStats()
        self.lock = threading.Lock()

    def _scan(self) -> SpoolStats:
        st = SpoolStats(at=time.monotonic(), counts={}, ages=dict.fromkeys(
            (b for b, _ in BACKLOG_AGES), 0))
        assert st.counts is not None and st.ages is not None
        now = time.time()
        oldest = now
        for name in self.DIRS:
            n = 0
            with contextlib.suppress(OSError), os.scandir(self.root / name) as it:
                for e in it:
                    if n >= SCAN_MAX:
                        st.truncated = True
                        break
                    if e.name.startswith("."):
                        continue
                    n += 1
                    if name == "new":
                        with contextlib.suppress(OSError):
                            s = e.stat()
                            st.new_bytes += s.st_size
                            oldest = min(oldest, s.st_mtime)
                            age = now - s.st_mtime
                            st.ages[next(b for b, top in BACKLOG_AGES if age < top)] += 1
            st.counts[name] = n
        st.oldest_age = max(0.0, now - oldest)
        with contextlib.suppress(OSError):
            vfs = os.statvfs(self.root)
            st.fs_free, st.fs_size = vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize
        return st

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.lock:
            if self.stats.counts is None or time.monotonic() - self.stats.at >= SCAN_CACHE:
                self.stats = self._scan()
            st = self.stats
        assert st.counts is not None
        g = GaugeMetricFamily("smtp_ingress_spool_messages", "Messages in the spool by directory",
                              labels=["dir"])
        for name, n in st.counts.items():
            g.add_metric([name], n)
        yield g
        yield GaugeMetricFamily("smtp_ingress_spool_bytes", "Bytes of the messages in spool/new",
                                value=st.new_bytes)
        yield GaugeMetricFamily("smtp_ingress_relay_backlog_messages",
                                "Messages waiting for the relay (spool/new)",
                                value=st.counts.get("new", 0))
        yield GaugeMetricFamily("smtp_ingress_relay_backlog_oldest_seconds",
                                "Age of the oldest message waiting for the relay",
                                value=st.oldest_age)
        a = GaugeMetricFamily("smtp_ingress_relay_backlog_age_messages",
                              "Messages waiting for the relay by age bucket (spool file mtime)",
                              labels=["age"])
        for bucket, n in (st.ages or {}).items():
            a.add_metric([bucket], n)
        yield a
        if st.fs_free >= 0:
            yield GaugeMetricFamily("smtp_ingress_spool_fs_free_bytes",
                                    "Bytes available to the service on the spool's filesystem",
                                    value=st.fs_free)
            yield GaugeMetricFamily("smtp_ingress_spool_fs_size_bytes",
                                    "Size of the spool's filesystem", value=st.fs_size)
        yield GaugeMetricFamily("smtp_ingress_spool_scan_truncated",
                                f"1 if a spool directory held more than {SCAN_MAX} entries "
                                "(the counts are then lower bounds)", value=int(st.truncated))


class MetricsServer:
    def __init__(self, httpd: Any, thread: threading.Thread, registry: CollectorRegistry) -> None:
        self.httpd, self.thread, self.registry = httpd, thread, registry

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(2.0)


def registry(spool_dir: Path | str, metrics_dir: Path | str) -> CollectorRegistry:
    """The scrape registry: every child's files merged, plus the spool gauges."""
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(metrics_dir))
    reg.register(SpoolCollector(spool_dir))
    reg.register(SupervisorCollector())
    return reg


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def serve(listen: str, spool_dir: Path | str, state_dir: Path | str) -> MetricsServer | None:
    """Start the endpoint in a daemon thread; None when off ("") or when it cannot bind."""
    if not listen:
        return None
    from prometheus_client import start_http_server

    from ingress.core import log
    host, port = parse_listen(listen)
    reg = registry(spool_dir, Path(state_dir) / SUBDIR)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=reg)
    except OSError as e:
        log.event("metrics_listen_failed", "error", listen=listen, error=str(e))
        return None
    srv = MetricsServer(httpd, thread, reg)
    log.event("metrics_listening", listen=f"{host}:{srv.port}")
    return srv
