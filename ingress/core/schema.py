"""The configuration schema: one frozen dataclass per TOML table, each key's doc and bounds.

API
    Config and its tables (ListenConfig, SmtpConfig, LaneConfig, LanesConfig, ClassifyConfig,
    AdmissionConfig, TiersConfig, TlsConfig, RelayConfig, MetricsConfig, SpoolConfig,
    SupervisorConfig, LogConfig, ClusterConfig; the evidence checks' tables: ChecksConfig and
    the others of ingress.core.schema_evidence)
    the value sets of the choice keys (LOG_LEVELS, SCHED_POLICIES, SPF_PROMOTE, RELAY_TLS_MODES,
    DSN_MODES, FORWARD_CLIENT_MODES, ROLES) and DSN_RATE_MAX (TiersConfig and its
    OPERATOR_POLICIES: ingress.core.schema_tiers)

Each key is declared with ingress.core.fieldspec's helpers (bounded, choice, documented): its
default, its single-field rule, and the doc from which docs/configuration.md is generated
(`make docs`). Config's derived values (acceptor_count, worker_count, ...) are
ingress.core.derived's. Loading, cross-field rules and normalisation: ingress.core.config.

Failure modes: none here (fieldspec.check_fields applies the rules; config.load raises).
Limits: the defaults are the embedded default config (`make run`); smtp.hostname's is the
machine's host name, read when a SmtpConfig is made.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from ingress.core import derived
from ingress.core.fieldspec import bounded, choice, documented
from ingress.core.schema_evidence import (
    ChecksConfig,
    DmarcConfig,
    DnsblConfig,
    DnswlConfig,
    IprevConfig,
)
from ingress.core.schema_tiers import NICE, TiersConfig

LOG_LEVELS = ("debug", "info", "warning", "error")
SCHED_POLICIES = ("other", "batch", "idle")     # lanes.<lane>.sched_policy (ingress.core.child)
SPF_PROMOTE, RELAY_TLS_MODES = ("any", "listed", "off"), ("none", "opportunistic", "required")
# relay.dsn (ingress.policy.dsn): "authenticated" (only to a return path that passed SPF or aligned
# DKIM), "never" (failures go to failed/ only), "always" (any non-null sender: backscatter).
DSN_MODES = ("authenticated", "never", "always")
DSN_RATE_MAX = 3600.0       # relay.dsn_rate: at most one a second per domain, on average
# relay.forward_client: "auto" sends XCLIENT if offered, else XFORWARD, else nothing; "xclient" /
# "xforward" insist (a downstream without it is not used: the mail waits); "off" sends neither.
FORWARD_CLIENT_MODES = ("auto", "xclient", "xforward", "off")
ROLES = ("all", "edge", "lanes")                # cluster.role (ingress.core.cluster)
SPOOL_PATH, STATE_DIR = Path("var/spool"), Path("var/state")
STATE_DOC = "ipc sockets, learned allow cache, callout cache; short (unix socket paths: ~85 chars)"


@dataclass(frozen=True)
class ListenConfig:
    """Where port 25 (and the optional fast port) listen."""
    host: str = documented("127.0.0.1", "the single-address form, used without "
                           "listen.addresses: an IP address, not a name")
    port: int = bounded(2525, 0, 65535, "the single-address form's port (0: a free one)")
    backlog: int = bounded(4096, 16, None, "listen(2) backlog per acceptor socket; the kernel "
                           "caps it (net.core.somaxconn)")
    proxy_protocol: bool = documented(False, "a PROXY v1/v2 header is required on listen.port "
                                      "(behind an L4 balancer); never on a port direct clients "
                                      "use. The mutual-TLS port never takes one")
    trusted_proxies: tuple[str, ...] = documented((), "CIDRs whose PROXY header is believed "
                                                  "(required with proxy_protocol)")
    fast_port: int = bounded(-1, -1, 65535, "a second plain port (same host) that admits only "
                             "clients with connect-time fast-lane evidence (allow list, learned "
                             "allow); on every host of listen.addresses", note="-1 = off")
    fast_port_proxy_protocol: bool = documented(False, "a PROXY header is required on the fast "
                                                "port too")
    addresses: tuple[str, ...] = documented((), 'listen addresses, "v4:port" / "[v6]:port" '
                                            '(e.g. ["0.0.0.0:25", "[::]:25"]), one SO_REUSEPORT '
                                            "socket each per acceptor; empty = the one address "
                                            "listen.host:listen.port")
    fast_addresses: tuple[str, ...] = documented((), "the fast port's addresses; empty = "
                                                 "listen.fast_port on every host of "
                                                 "listen.addresses")
    steer_operator: bool = documented(True, "Linux: the kernel steers port-25 connections from "
                                      "classify.allow_cidrs, and mTLS-port ones from addresses the "
                                      "mTLS acceptors verified, to the fast acceptors' own sockets "
                                      "(SO_REUSEPORT BPF): never accepted on a bot-laden loop "
                                      "first. Needs fast acceptors; port 25: off behind PROXY")


@dataclass(frozen=True)
class SmtpConfig:
    """The SMTP dialogue: names, sizes, timeouts, slots and per-session limits."""
    hostname: str = documented("", "banner, EHLO and Received: name",
                               factory=socket.gethostname)
    accepted_domains: tuple[str, ...] = documented(
        ("example.test", "localhost"), "mail only for these domains (never an open relay); at "
        "least one")
    max_message_size: int = bounded(10 * 1024 * 1024, 1024, None, "bytes (SIZE)")
    max_recipients: int = bounded(100, 1, 10000, "per transaction; more get 452 4.5.3")
    idle_timeout: float = bounded(60.0, 0, None, "seconds per command / DATA line (RFC 5321 "
                                  "suggests 300)", gt=True)
    session_deadline: float = documented(600.0, "the whole session, whatever the client does; "
                                         ">= smtp.idle_timeout")
    ack_timeout: float = bounded(20.0, 0, None, "end of DATA -> worker ack, then 451; below "
                                 "smtp.idle_timeout", gt=True)
    max_connections: int = bounded(0, 0, None, "per acceptor process; 0 = auto: "
                                   "min(RLIMIT_NOFILE - 64, connection_memory / 8 KiB)",
                                   note="0 = auto")
    fast_reserve: int = bounded(0, 0, None, "of max_connections, usable by the fast lane only; "
                                "below max_connections", note="0 = a tenth of the slots")
    connection_memory: int = bounded(256 << 20, 8192, None, "bytes per acceptor budgeted for "
                                     "held connections (8 KiB each) when max_connections = 0")
    drain_grace: float = bounded(20.0, 0, None, "seconds sessions may finish within on "
                                 "SIGTERM / reload")
    recipient_map: str = documented("", 'file of accepted addresses, one a line ("@domain" = '
                                    'the whole domain); "" = every address of the domains')
    # Per-session error and command limits (Postfix's smtpd_soft/hard_error_limit,
    # smtpd_error_sleep_time, smtpd_junk_command_limit, smtpd_recipient_overshoot_limit);
    # the counts start afresh after a delivered message. See ingress/policy/session_rules.py.
    soft_error_limit: int = bounded(10, 1, 1000, "errors before every reply is delayed")
    hard_error_limit: int = bounded(20, None, 1000, "errors, then 421 4.7.0 and a close; above "
                                    "soft_error_limit")
    error_sleep: float = bounded(1.0, 0, None, "seconds of delay per error beyond "
                                 "soft_error_limit")
    error_sleep_max: float = bounded(4.0, None, 60, "... at most this (>= error_sleep), and at "
                                     "most half the idle timeout")
    junk_command_limit: int = bounded(100, 0, None, "NOOP/RSET/VRFY/HELP; each one beyond is an "
                                      "error")
    mail_without_data_limit: int = bounded(20, 1, None, "MAIL commands without a delivered "
                                           "message, then 421 4.7.0")
    recipient_overshoot_limit: int = bounded(1000, 0, None, "452 too-many-recipients answers; "
                                             "each one beyond is an error")
    # Recipient verification against relay.downstream at RCPT time (a cached callout, as
    # Postfix's reject_unverified_recipient): see ingress/edge/rcpt_verify.py.
    verify_recipients: bool = documented(False, "verify recipients at RCPT time against "
                                         "relay.downstream (smtp:// only)")
    verify_timeout: float = bounded(4.0, 0, None, "one whole callout (connect .. RCPT answer); "
                                    "below half of smtp.idle_timeout and of "
                                    "admission.stress_idle_timeout", gt=True)
    verify_positive_ttl: float = bounded(86400.0, 0, None, "seconds a 2xx answer is reused",
                                         note="0 = not cached")
    verify_negative_ttl: float = bounded(3600.0, 0, None, "seconds a 5xx answer is reused",
                                         note="0 = not cached")
    verify_tempfail_ttl: float = bounded(30.0, 0, None, "seconds an uncertain answer (450 to "
                                         "the client) is reused", note="0 = not cached")
    verify_cache_size: int = bounded(100000, 1, 10_000_000, "cached answers per acceptor "
                                     "process (2xx/5xx kept across reloads)")
    verify_concurrency: int = bounded(4, 1, 1000, "callouts at once per acceptor process (x "
                                      "acceptors: keep it well below the downstream's limit)")
    verify_per_session: int = bounded(10, 0, 1000, "callouts one session may cause; then 450")
    data_memory_budget: int = bounded(0, 0, None, "bytes all sessions of one acceptor may hold "
                                      "in DATA (and until the ack)",
                                      note="0 = 8 x max_message_size")
    data_fast_reserve: int = bounded(0, 0, None, "of it, bytes only the fast lane may use; the "
                                     "rest must hold one message of max_message_size",
                                     note="0 = a quarter")


@dataclass(frozen=True)
class LaneConfig:
    """One lane's broker and workers."""
    workers: int = bounded(0, 0, 256, "worker processes", note="0 = half the cores")
    queue_max: int = bounded(256, 1, 100000, "broker queue bound; beyond it 451")
    queue_bytes: int = bounded(0, 0, None, "broker queue bound in bytes of message bodies (0, "
                               "or >= smtp.max_message_size)",
                               note="0 = max(64 MiB, 4 x smtp.max_message_size)")
    credit: int = bounded(8, 1, 1024, "messages a worker may hold at once (group commit)")
    rate: float = bounded(0.0, 0, None, "messages/s cap; the fast lane is never capped",
                          note="0 = uncapped")
    burst: int = bounded(0, 0, None, "token bucket depth", note="0 = one second of rate")
    nice: int = bounded(0, 0, 19, "the lane's broker and workers run at this nice(2) "
                        "increment: bulk yields the cores to fast", note=NICE)
    sched_policy: str = choice("other", SCHED_POLICIES, "their CPU scheduling policy, named as "
                               "systemd's CPUSchedulingPolicy= (idle: only CPU time nobody "
                               "else wants)")


FAST_LANE = LaneConfig()
BULK_LANE = LaneConfig(rate=500.0, nice=10)
FAST_DOC = "mail classified legitimate: reserved capacity, never rate-capped"
BULK_DOC = "everything else: accepted up to the cap, shed politely (4xx) above it"


@dataclass(frozen=True)
class LanesConfig:
    """The two lanes: [lanes.fast] and [lanes.bulk]."""
    # (noqa RUF009: documented() returns a dataclasses.field, as fieldspec's helpers all do)
    fast: LaneConfig = documented(FAST_LANE, FAST_DOC)  # noqa: RUF009
    bulk: LaneConfig = documented(BULK_LANE, BULK_DOC)  # noqa: RUF009


@dataclass(frozen=True)
class ClassifyConfig:
    """Evidence that promotes a session to the fast lane."""
    allow_cidrs: tuple[str, ...] = documented((), "static allow list (CIDRs): these clients "
                                              "are fast lane")
    learned_ttl: float = bounded(7 * 86400.0, 0, None, "seconds a client with SPF pass + "
                                 "aligned DKIM pass is remembered", note="0 = do not learn")
    learned_max: int = bounded(100000, 1, None, "learned entries (an IPv4 address, an IPv6 "
                               "/admission.ipv6_prefix) kept in all")
    learned_per_domain: int = bounded(16, 1, 10000, "... learned for one (organisational) "
                                      "domain: its oldest goes for a newer one")
    learned_per_net: int = bounded(16, 1, 10000, "... in one IPv4 /24 or IPv6 /48: likewise")
    learned_save_interval: float = bounded(5.0, 0.1, 3600, "seconds between two saves of a "
                                           "changed learned cache (what a crash can lose)")
    cert_promotes: bool = documented(True, "a verified or pinned client certificate -> fast "
                                     "lane")
    spf_promote: str = choice("off", SPF_PROMOTE, "which SPF passes promote at MAIL FROM (off: "
                              "no SPF lookups at all, e.g. without DNS)")
    spf_domains: tuple[str, ...] = documented((), 'for spf_promote = "listed": these domains '
                                              "and their subdomains")
    identity_share: float = bounded(0.25, 0, 1, "most of the fast lane (slots, queue, worker "
                                    "credit) one identity may hold; beyond it: bulk", gt=True)
    domain_rate: float = bounded(50.0, 0, None, "messages/s one domain proven only by its own "
                                 "SPF/DKIM may pass through the fast lane of one lanes node; "
                                 "beyond it: bulk", note="0 = no bound")
    domain_burst: float = bounded(10.0, 1, None, "messages one domain may start in the fast "
                                  "lane at once on one edge (split over its acceptors)")
    nameservers: tuple[str, ...] = documented((), '"ip", "ip@port", "ip:port"; empty = '
                                              "/etc/resolv.conf")
    dns_timeout: float = bounded(2.0, 0, 30, "seconds for one DNS query", gt=True)
    spf_deadline: float = bounded(3.0, 0, 60, "a whole SPF evaluation, then temperror (never "
                                  "rejects); at most half of smtp.idle_timeout applies",
                                  gt=True)
    spf_per_domain: int = bounded(16, 1, None, "SPF checks of one sender (organisational) "
                                  "domain under way at once per acceptor (<= spf_backlog); "
                                  "beyond: temperror at once")
    spf_per_network: int = bounded(8, 1, None, "... from one client /24 (IPv6: "
                                   "admission.ipv6_prefix), <= spf_backlog")
    spf_backlog: int = bounded(256, 1, 65536, "... in all, per acceptor (each may hold a DNS "
                               "socket: that many descriptors are kept from the slots)")
    spf_timeout_ttl: float = bounded(15.0, 0, 300, "seconds a domain whose SPF lookup timed out "
                                     "is temperror at once", note="0 = never")
    dkim_deadline: float = bounded(5.0, 0, None, "seconds for all DKIM signatures of one message "
                                   "in a worker; below smtp.ack_timeout", gt=True)
    dkim_dns_budget: float = bounded(2.0, 0, 30, "seconds all DNS lookups of one message in a "
                                     "worker (DKIM keys, then its DMARC policy) together wait",
                                     gt=True)
    dkim_timeout_ttl: float = bounded(60.0, 0, 300, "seconds a key domain that did not answer "
                                      "is not asked again (dkim=temperror at once)",
                                      note="0 = off")
    authserv_id: str = documented("", 'Authentication-Results id; "" = smtp.hostname')


@dataclass(frozen=True)
class AdmissionConfig:
    """Bulk-lane limits (the fast lane is exempt)."""
    per_ip_bulk_max: int = bounded(20, 1, None, "concurrent bulk sessions per IPv4 address / "
                                   "IPv6 /ipv6_prefix")
    per_ip_rate: float = bounded(10.0, 0, None, "bulk connections per second per IP",
                                 note="0 = off")
    per_ip_burst: int = bounded(20, 1, None, "token bucket depth for per_ip_rate")
    greet_pause: float = bounded(0.0, 0, None, "seconds before the bulk banner (early-talker "
                                 "test); below smtp.idle_timeout", note="0 = off")
    penalty: float = bounded(300.0, 0, None, "seconds an early talker is refused")
    stress_idle_timeout: float = bounded(10.0, 0, None, "bulk idle timeout while the bulk lane "
                                         "is saturated", gt=True)
    shed_delay: float = bounded(0.1, 0, 10, "seconds a shed bulk MAIL FROM waits for its 451")
    shed_limit: int = bounded(10, 1, None, "sheds in one session; the last is 421 and a close")
    evict_silent_after: float = bounded(0.0, 0, None, "slots full: a bulk session silent since "
                                        "its banner for this long makes room for a newcomer",
                                        note="0 = any")
    evict_rate: float = bounded(float("inf"), 0, None, "at most this many such evictions per "
                                "second per acceptor", note="0 = never evict, inf = no limit")
    retry_share: float = bounded(0.1, 0, 1, "a retry of a transaction deferred for the bulk cap "
                                 "bypasses it within this fraction of lanes.bulk.rate",
                                 note="0 = off")
    retry_min_delay: float = bounded(60.0, 0, None, "... if it comes at least this long after "
                                     "the last deferral (bots hammer at once; MTAs wait)")
    retry_ttl: float = documented(14400.0, "... and within this long of the first deferral; "
                                  "above retry_min_delay")
    retry_max_records: int = bounded(20000, 1, 10_000_000, "deferral records held per acceptor "
                                     "(~1.1 KB each)")
    retry_per_net: int = bounded(32, 1, None, "deferral records per client /24 (IPv4) or IPv6 "
                                 "/ipv6_prefix")
    retry_per_site: int = documented(128, "... and per IPv6 /48 (>= retry_per_net; an IPv4 /24 "
                                     "is its own site)")
    retry_hammer_sheds: int = bounded(30, 0, None, "a site shed more than this many times in a "
                                      "minute earns no retry evidence", note="0 = off")
    ipv6_prefix: int = bounded(64, 16, 128, "IPv6 clients are counted (per_ip_*, penalties) per "
                               "network of this prefix length")
    per_ip_fast_max: int = bounded(4, 1, 100000, "concurrent fast sessions per IP per acceptor "
                                   "for the self-proven and third-party tiers; beyond: bulk")


@dataclass(frozen=True)
class TlsConfig:
    """STARTTLS on port 25, the mutual-TLS port and its handshake gate (per acceptor)."""
    cert: str = documented("", "PEM certificate chain: enables STARTTLS on listen.port")
    key: str = documented("", "its private key (with tls.cert)")
    mtls_port: int = bounded(-1, -1, 65535, "implicit-TLS port requiring a client certificate",
                             note="-1 = off")
    client_ca: str = documented("", "CA bundle that verifies client certificates (required "
                                "with the mTLS port, also with pins)")
    pinned_sha256: tuple[str, ...] = documented((), "client certificate SHA-256 fingerprints "
                                                "that promote (64 hex digits)")
    handshake_timeout: float = bounded(5.0, 0, 60, "seconds a TLS handshake on the mTLS port "
                                       "may take (it holds a slot meanwhile)", gt=True)
    mtls_addresses: tuple[str, ...] = documented((), "the mTLS port's addresses; empty = "
                                                 "tls.mtls_port on every host of "
                                                 "listen.addresses")
    stranger_handshake_rate: float = bounded(50.0, 0, 100000, "handshakes a second for clients "
                                             "not known by a verified certificate (~1.2 ms CPU "
                                             "each)", note="0 = no gate")
    stranger_handshake_burst: float = bounded(10.0, 1, 100000, "their bucket's depth")
    stranger_wait: float = bounded(1.0, 0, None, "seconds a stranger waits for its turn, then a "
                                   "TLS alert; below handshake_timeout")
    known_ttl: float = bounded(604800.0, 0, 90 * 86400, "seconds a prefix that completed a "
                               "verified handshake goes first", gt=True)
    known_max: int = bounded(4096, 1, 1_000_000, "known prefixes remembered")
    known_handshake_rate: float = bounded(20.0, 0, 100000, "handshakes a second per known "
                                          "prefix; beyond it, a stranger", gt=True)
    known_ipv4_prefix: int = bounded(24, 8, 32, "IPv4 network a known client is remembered by "
                                     "(IPv6: admission.ipv6_prefix)")
    failed_ttl: float = bounded(600.0, 0, 86400, "seconds an address whose handshake failed "
                                "waits behind strangers", note="0 = not remembered")


@dataclass(frozen=True)
class RelayConfig:
    """Delivery from the spool to the downstream MTA."""
    downstream: str = documented("", '"" keeps mail in the spool; "smtp://host:port", '
                                 '"lmtp://host:port", "lmtp:/path/to/socket"')
    concurrency: int = bounded(4, 1, 256, "parallel downstream sessions")
    retry_base: float = bounded(30.0, 0, None, "seconds to the first retry after a 4xx, "
                                "doubled up to retry_max", gt=True)
    retry_max: float = documented(3600.0, "the longest retry delay (>= retry_base)")
    max_age: float = bounded(5 * 86400.0, 0, None, "seconds in the spool, then the message "
                             "fails (failed/, a DSN as relay.dsn says)", gt=True)
    dsn: str = choice("authenticated", DSN_MODES, "who gets a DSN for a failed recipient "
                      "(ingress.policy.dsn)")
    dsn_rate: float = bounded(30.0, 1, DSN_RATE_MAX, "DSNs per destination organisational "
                              "domain per hour")
    timeout: float = bounded(60.0, 0, None, "seconds per downstream SMTP step", gt=True)
    tls: str = choice("none", RELAY_TLS_MODES, "STARTTLS to a TCP downstream")
    tls_ca_file: str = documented("", 'CA bundle for "required" ("" = the system\'s)')
    tls_verify_name: str = documented("", 'name the certificate must carry ("" = the host)')
    auth_file: str = documented("", '"user:password" for AUTH PLAIN; needs tls = "required"; '
                                "the file must not be group/world-readable")
    nice: int = bounded(5, 0, 19, "nice(2) increment of the relay: delivery is background "
                        "work, accepting is not", note=NICE)
    forward_client: str = choice("auto", FORWARD_CLIENT_MODES, "the original client's identity "
                                 "to an smtp:// downstream: auto = XCLIENT, else XFORWARD, if "
                                 "offered")


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint."""
    listen: str = documented("127.0.0.1:9125", '"host:port"; "" = off')


@dataclass(frozen=True)
class SpoolConfig:
    """Where mail and state live (made absolute at load)."""
    path: Path = documented(SPOOL_PATH, "accepted mail (tmp/ new/ cur/ failed/)")  # noqa: RUF009
    state_dir: Path = documented(STATE_DIR, STATE_DOC)  # noqa: RUF009
    batch_sync: str = choice("syncfs", ("syncfs", "fsync"), "a group commit of 2+ messages made "
                             "durable by one syncfs(2) of the file system, or an fsync per file")
    journal_size: int = bounded(4 << 20, 0, 1 << 30, "bytes of each lane worker's journal: the mail"
                                " it is for is durable after one fdatasync of it, in new/ after "
                                "the 250 (ingress.policy.tiers.journals)", note="0 = off")


@dataclass(frozen=True)
class SupervisorConfig:
    """Processes, priorities, heartbeats and restarts."""
    acceptors: int = bounded(0, 0, 1024, "acceptor processes", note="0 = one per core")
    fast_acceptors: int = bounded(1, 0, 64, "processes serving only clients classified fast at "
                                  "connect, handed over by the acceptors (SCM_RIGHTS)",
                                  note="0 = none")
    mtls_acceptors: int = bounded(1, 0, 64, "with fast acceptors and an mTLS port: processes "
                                  "serving that port alone", note="0 = the fast acceptors")
    acceptor_nice: int = bounded(10, 0, 19, "nice(2) increment of the acceptors with the "
                                 "listeners when there are fast acceptors (which keep 0)",
                                 note=NICE)
    heartbeat_interval: float = bounded(0.5, 0, None, "seconds between child heartbeats",
                                        gt=True)
    heartbeat_timeout: float = documented(5.0, "a child silent this long is hung: killed and "
                                          "restarted (>= 2 x heartbeat_interval)")
    restart_backoff: float = bounded(0.1, 0, None, "first restart delay, doubled per "
                                     "consecutive crash", gt=True)
    restart_backoff_max: float = documented(10.0, "the longest restart delay (>= "
                                            "restart_backoff)")
    crash_window: float = documented(30.0, "more than crash_limit restarts in this many "
                                     "seconds: throttled")
    crash_limit: int = bounded(10, 1, None, "restarts within crash_window before throttling")


@dataclass(frozen=True)
class LogConfig:
    """JSON log lines; lines a client can make us write are throttled (per event and client
    network: IPv4 /24, IPv6 /64; the next line carries not_logged)."""
    level: str = choice("info", LOG_LEVELS, "the lowest level written")
    throttle_interval: float = bounded(60.0, 1, 86400, "seconds: the window of both limits")
    throttle_lines: int = bounded(5, 0, 1_000_000, "lines per event and client network per "
                                  "window", note="0 = no limit")
    throttle_total: int = bounded(300, 0, 1_000_000, "lines per event and process per window",
                                  note="0 = no limit")


@dataclass(frozen=True)
class ClusterConfig:
    """Several hosts (edges and lanes nodes over CURVE) and shared state in Redis."""
    role: str = choice("all", ROLES, "all: one host, ipc://, no keys; `smtp-ingress run "
                       "--role` overrides it")
    secret_key: str = documented("", "edge and lanes: this node's NAME.key_secret (keygen)")
    lanes_bind: str = documented("", 'lanes: "tcp://host:port"; binds port..port+3')
    allowed_keys: str = documented("", "lanes: directory of the edges' public keys (*.key)")
    lanes_nodes: tuple[str, ...] = documented((), 'edge: "tcp://host:port /path/node.key" per '
                                              "lanes node")
    redis: str = documented("", '"redis://host:port/db", "rediss://...", or '
                            '"unix:///path/redis.sock"; "" = in-process only')
    redis_timeout: float = bounded(0.05, 0, 5.0, "seconds: deadline of one Redis call (and of "
                                   "its connect)", gt=True)
    redis_retry: float = documented(2.0, "seconds between reconnects while Redis is down (>= "
                                    "redis_timeout)")
    redis_prefix: str = documented("smtp-ingress", "key and channel namespace (one cluster per "
                                   "prefix); 1..64 printable characters, no spaces")
    edges: int = bounded(1, 1, 1024, "edge hosts sharing lanes.bulk.rate: Redis down, each "
                         "edge's acceptors hold 1/edges of it")


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = ListenConfig()
    smtp: SmtpConfig = SmtpConfig()
    lanes: LanesConfig = LanesConfig()
    classify: ClassifyConfig = ClassifyConfig()
    admission: AdmissionConfig = AdmissionConfig()
    tiers: TiersConfig = TiersConfig()        # noqa: RUF009 (frozen: immutable)
    tls: TlsConfig = TlsConfig()
    relay: RelayConfig = RelayConfig()
    metrics: MetricsConfig = MetricsConfig()
    spool: SpoolConfig = SpoolConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    log: LogConfig = LogConfig()
    cluster: ClusterConfig = ClusterConfig()
    checks: ChecksConfig = ChecksConfig()     # noqa: RUF009 (frozen: immutable)
    dmarc: DmarcConfig = DmarcConfig()        # noqa: RUF009 (frozen: immutable)
    dnswl: DnswlConfig = DnswlConfig()        # noqa: RUF009 (frozen: immutable)
    dnsbl: DnsblConfig = DnsblConfig()        # noqa: RUF009 (frozen: immutable)
    iprev: IprevConfig = IprevConfig()        # noqa: RUF009 (frozen: immutable)
    source: str = "<embedded default>"      # the file it was loaded from (not a key)

    # Derived values: ingress.core.derived computes them (one rule, one implementation).
    @property
    def acceptor_count(self) -> int:
        return derived.acceptor_count(self)

    @property
    def acceptor_processes(self) -> int:
        return derived.acceptor_processes(self)

    @property
    def mtls_acceptor_count(self) -> int:
        return derived.mtls_acceptor_count(self)

    def worker_count(self, lane: str) -> int:
        return derived.worker_count(self, lane)

    @property
    def child_count(self) -> int:
        return derived.child_count(self)

    @property
    def data_budget(self) -> tuple[int, int]:
        return derived.data_budget(self)

    def queue_bytes(self, lane: str) -> int:
        return derived.queue_bytes(self, lane)

    def ipc(self, name: str) -> str:
        return f"ipc://{self.spool.state_dir / 'run' / name}.sock"

    @property
    def allow_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.classify.allow_cidrs)
