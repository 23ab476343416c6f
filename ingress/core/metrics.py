"""Prometheus metrics: the declarations, and the calls every process counts with.

Purpose: what the acceptors, brokers, workers and the relay count, declared once (the names and
labels are the contract with dashboards, alerts and docs/reference.md). In prometheus-client
multiprocess mode each child writes its values to its own mmap'd files in
PROMETHEUS_MULTIPROC_DIR; the supervisor merges them at scrape time and serves them
(ingress.core.metrics_server), with the spool's gauges (workers.spool.collector). The label
values of the acceptor's counters are StrEnums of their own (ingress.core.metrics_labels).

API (hot path: a dict lookup, then one mmap write per counter/gauge, two per histogram
observation; measured ~1.5 us per counter inc and ~3-5 us per observe on the dev VM, see
`python -m tests.integration.test_metrics`):
    Outcome, Result, RcptResult     StrEnums (ingress.core.metrics_labels): the declared labels
                                    of connection(), message(), recipient() (OUTCOMES, RESULTS,
                                    RCPT_RESULTS: their values); an undeclared label raises
                                    ValueError at its first use
    connection(lane, outcome)       a connection ended its admission: Outcome
    session_open(lane) / session_close(lane)      live sessions per lane (acceptors)
    message(lane, result)           a transaction's end: Result (accepted = 250 after DATA,
                                    tempfailed = a 4xx that ends it, rejected = a 5xx to DATA)
    recipient(lane, result)         a RCPT TO answer: RcptResult
    observe_banner(lane, seconds)   connect -> banner written
    observe_ack(lane, seconds)      end of DATA -> 250 (or the 4xx) written
    DeferReason, RetryResult        StrEnums (metrics_labels): the labels of deferred(), retry()
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
    check_result(check, outcome)    an evidence check's judgement (ingress.edge.checks)
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
metrics_server.setup_dir() rules out by creating it before any child exists. Without
PROMETHEUS_MULTIPROC_DIR (unit tests, tools) the values live in process memory and nothing is
written.

Limits: every label value comes from a declared set (an enum or a tuple here, a wire.Lane or
wire.NackReason) or is bounded (fast_identity's TOP_IDENTITIES): an attacker cannot grow the
series. One .db file per process and metric type
(ingress.core.metrics_server says how the directory grows with restarts). Gauges use "live"
modes: a dead child's gauges vanish once metrics_server.child_dead(pid) is called. Histograms
use BUCKETS (1 ms .. 10 s).
"""

from __future__ import annotations

import functools
from enum import StrEnum
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from ingress.core.metrics_labels import DeferReason, Outcome, RcptResult, Result, RetryResult
from ingress.core.wire import Lane, NackReason

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

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
CHECK_OUTCOMES = ("promote", "neutral", "shape", "refuse")
CHECK_RESULTS = Counter("smtp_ingress_check_results",
                        "Evidence checks' judgements (ingress.edge.checks), by check and outcome "
                        "(promote, neutral: no evidence or DNS trouble, shape: a bulk "
                        "suspicion score, refuse)", ["check", "outcome"])
# [cluster] redis (ingress/edge/cluster_state.py): per acceptor, 1 while its Redis is reachable.
# Made on first use: a label-less gauge made at import would give every process that imports
# this module (workers, brokers beside the acceptors on a role "all" node) a 0 in the minimum.
@functools.cache
def _cluster_up() -> Gauge:
    return Gauge("smtp_ingress_cluster_state_up", "Shared admission state in Redis reachable (1) "
                 "or local fallback (0), per acceptor", multiprocess_mode="livemin")

CLUSTER_FALLBACKS = Counter("smtp_ingress_cluster_state_fallbacks",
                            "Admission decisions taken on local limits because Redis was "
                            "down or too slow")

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


def check_result(check: str, outcome: str) -> None:
    """One evidence check's judgement (check names are the code's own: a bounded set)."""
    if outcome not in CHECK_OUTCOMES:
        raise ValueError(f"check_result: {outcome!r}")
    CHECK_RESULTS.labels(check, outcome).inc()


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
    _cluster_up().set(1 if up else 0)


def cluster_fallback() -> None:
    """One admission decision fell back to local limits (Redis down or over its deadline)."""
    CLUSTER_FALLBACKS.inc()
