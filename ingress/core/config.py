"""Configuration: the only place that reads the TOML file.

API:
    load(path: Path | None) -> Config        the embedded default when path is None
    Config, and one frozen dataclass per TOML table
    ConfigError(file, key, message)           raised for anything invalid; str() names all three
    read_credentials(path) -> (user, password)    relay.auth_file (ValueError: unreadable,
                                              group/world-readable, or not "user:password")
    parse_listen_address("v4:port" | "[v6]:port") -> (host, port)   ValueError if not one
    format_listen_address(host, port) -> str  the reverse

Every value is validated once, here; the rest of the code trusts a Config. Listen addresses:
listen.addresses, listen.fast_addresses and tls.mtls_addresses are never empty-when-on after
loading (filled from listen.host/port, listen.fast_port, tls.mtls_port), and those single keys
mirror each list's first entry. Unknown tables and keys
are errors (a typo must not silently fall back to a default). Counts of 0 for acceptors and workers
mean "scale to the cores". Limits: the file is read whole (it is small); paths are made absolute
relative to the working directory at load time, so children started elsewhere agree.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ingress.core.addr import normalize_domain
from ingress.core.downstream import parse_downstream
from ingress.core.fsutil import read_private
from ingress.core.resolver import parse_nameserver


class ConfigError(Exception):
    """An invalid configuration: names the file, the key and what is wrong."""

    def __init__(self, file: str, key: str, message: str) -> None:
        super().__init__(f"{file}: {key}: {message}")
        self.file, self.key, self.message = file, key, message


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 2525
    backlog: int = 4096                 # per acceptor socket; the kernel caps it (somaxconn)
    proxy_protocol: bool = False        # PROXY v1/v2 header required on listen.port (behind an
                                        # L4 balancer); never on a port direct clients use.
                                        # listen.port only: the fast port has its own key, and
                                        # the mutual-TLS port never takes a PROXY header
    trusted_proxies: tuple[str, ...] = ()   # CIDRs whose PROXY header is believed (required
                                            # when proxy_protocol = true)
    fast_port: int = -1                 # a second plain port (same host) that admits only
                                        # clients with connect-time fast-lane evidence (allow
                                        # list, learned allow); -1 = off
    fast_port_proxy_protocol: bool = False  # PROXY header required on listen.fast_port too
    addresses: tuple[str, ...] = ()     # several listen addresses, "v4:port" / "[v6]:port"
                                        # (e.g. ["0.0.0.0:25", "[::]:25"]); empty = the one
                                        # address listen.host:listen.port. After loading it is
                                        # never empty, and host/port are its first entry
    fast_addresses: tuple[str, ...] = ()    # the fast port's addresses; empty = listen.fast_port
                                        # on every host of listen.addresses (if fast_port >= 0)
    steer_operator: bool = True         # Linux: the kernel steers port-25 connections from
                                        # classify.allow_cidrs to the fast acceptors' own
                                        # sockets (SO_REUSEPORT BPF, ingress.core.reuseport):
                                        # never accepted on a bot-laden loop first. Needs fast
                                        # acceptors; off behind PROXY (the source is the proxy)


@dataclass(frozen=True)
class SmtpConfig:
    hostname: str = field(default_factory=socket.gethostname)
    accepted_domains: tuple[str, ...] = ("example.test", "localhost")
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    idle_timeout: float = 60.0          # per command / DATA line; RFC 5321 suggests 5 min
    session_deadline: float = 600.0     # whole session, whatever the client does
    ack_timeout: float = 20.0           # end of DATA -> worker ack; must be < idle_timeout
    max_connections: int = 0            # per acceptor process; 0 = auto: min(RLIMIT_NOFILE -
                                        # 64, connection_memory / 8 KiB)
    fast_reserve: int = 0               # of max_connections, usable by the fast lane only;
                                        # 0 = a tenth of the slots
    connection_memory: int = 256 << 20  # bytes per acceptor budgeted for held connections
                                        # (8 KiB each) when max_connections = 0
    drain_grace: float = 20.0           # SIGTERM / reload: sessions may finish within this
    recipient_map: str = ""             # file: accepted addresses, one a line ("@dom" = any)
    # Per-session error and command limits (Postfix's smtpd_soft/hard_error_limit,
    # smtpd_error_sleep_time, smtpd_junk_command_limit, smtpd_recipient_overshoot_limit);
    # the counts start afresh after a delivered message. See ingress/policy/session_rules.py.
    soft_error_limit: int = 10          # errors before every reply is delayed
    hard_error_limit: int = 20          # errors, then 421 4.7.0 and a close
    error_sleep: float = 1.0            # delay per error beyond soft_error_limit ...
    error_sleep_max: float = 4.0        # ... at most this, and at most half the idle timeout
                                        # (smtp.idle_timeout, admission.stress_idle_timeout)
    junk_command_limit: int = 100       # NOOP/RSET/VRFY/HELP; each one beyond is an error
    mail_without_data_limit: int = 20   # MAIL commands without a delivered message, then 421
    recipient_overshoot_limit: int = 1000   # 452 too-many-recipients; each one beyond: error
    # Recipient verification against relay.downstream at RCPT time (a cached callout, as
    # Postfix's reject_unverified_recipient): see ingress/edge/rcpt_verify.py.
    verify_recipients: bool = False
    verify_timeout: float = 4.0         # one whole callout (connect .. RCPT answer)
    verify_positive_ttl: float = 86400.0    # a 2xx answer is reused this long
    verify_negative_ttl: float = 3600.0     # a 5xx answer is reused this long
    verify_tempfail_ttl: float = 30.0       # an uncertain answer (450 to the client) this long
    verify_cache_size: int = 100000     # cached answers per acceptor process (2xx/5xx kept
                                        # across reloads: ingress/edge/verify_store.py)
    verify_concurrency: int = 4         # callouts at once per acceptor process (x acceptors:
                                        # keep it well below the downstream's process limit)
    verify_per_session: int = 10        # callouts one session may cause; then 450
    data_memory_budget: int = 0         # bytes all sessions of one acceptor may hold in DATA
                                        # (and until the ack); 0 = 8 x max_message_size
    data_fast_reserve: int = 0          # of it, bytes only the fast lane may use; 0 = a quarter


@dataclass(frozen=True)
class LaneConfig:
    workers: int = 0                    # 0: scale to the cores
    queue_max: int = 256                # broker queue bound
    queue_bytes: int = 0                # broker queue bound in bytes of message bodies; 0 =
                                        # max(64 MiB, 4 x smtp.max_message_size)
    credit: int = 8                     # messages a worker may hold at once (group commit)
    rate: float = 0.0                   # msgs/s cap; 0 = uncapped (the fast lane always is)
    burst: int = 0                      # token bucket depth; 0 = one second of rate
    nice: int = 0                       # the lane's broker and workers run at this nice(2)
                                        # increment (0..19): bulk yields the cores to fast
    sched_policy: str = "other"         # and this CPU scheduling policy, named as systemd's
                                        # CPUSchedulingPolicy=: "other", "batch" or "idle"
                                        # (SCHED_IDLE: only CPU time nobody else wants)


@dataclass(frozen=True)
class LanesConfig:
    fast: LaneConfig = LaneConfig()
    bulk: LaneConfig = LaneConfig(rate=500.0, nice=10)


@dataclass(frozen=True)
class ClassifyConfig:
    allow_cidrs: tuple[str, ...] = ()   # static allow list: these clients are fast lane
    learned_ttl: float = 7 * 86400.0    # SPF pass + aligned DKIM pass: remembered this long
    learned_max: int = 100000           # learned entries (networks: an IPv4 address, an IPv6
                                        # /admission.ipv6_prefix) kept in all
    learned_per_domain: int = 16        # ... learned for one (organisational) domain: the
                                        # domain's oldest goes for a newer one
    learned_per_net: int = 16           # ... in one IPv4 /24 or IPv6 /48: likewise
    learned_save_interval: float = 5.0  # seconds between two saves of a changed learned cache
                                        # to learned.json (acceptor 0); what a crash can lose
    cert_promotes: bool = True          # a verified or pinned client certificate -> fast lane
    spf_promote: str = "off"            # "any" | "listed" | "off": which SPF passes promote
                                        # (off: no SPF lookups at all, e.g. without DNS)
    spf_domains: tuple[str, ...] = ()   # for spf_promote = "listed" (and their subdomains)
    identity_share: float = 0.25        # most of the fast lane (slots, queue, worker credit) one
                                        # identity may hold (ingress.policy.identity); beyond it
                                        # its sessions and messages are served as bulk
    domain_rate: float = 50.0           # messages/s one domain (org:/learned: identity, proven
                                        # only by its own SPF/DKIM) may pass through the fast
                                        # lane of one lanes node; beyond it: served as bulk (the
                                        # bulk cap applies); 0 = no bound. Allow-list entries
                                        # and certificates (operator trust) are not bounded
    domain_burst: float = 10.0          # messages one domain may start in the fast lane at once
                                        # on one edge (split over its acceptors, each of which
                                        # holds the domain to its part of domain_rate at MAIL
                                        # FROM): small, so that its fast-lane mail is a steady
                                        # flow, never a wave that the allow-listed wait behind
    nameservers: tuple[str, ...] = ()   # "ip", "ip@port", "ip:port"; empty = /etc/resolv.conf
    dns_timeout: float = 2.0            # one DNS query
    spf_deadline: float = 3.0           # a whole SPF evaluation; then temperror (never rejects)
    spf_per_domain: int = 16            # SPF checks of one sender (organisational) domain under
                                        # way at once, per acceptor; beyond: temperror at once
    spf_per_network: int = 8            # ... from one client /24 (IPv6: admission.ipv6_prefix)
    spf_backlog: int = 256              # ... in all, per acceptor (each may hold a DNS socket:
                                        # that many descriptors are kept from the slots)
    spf_timeout_ttl: float = 15.0       # a domain whose SPF lookup timed out is temperror at
                                        # once (no lookup) for this long; 0 = never
    dkim_deadline: float = 5.0          # all DKIM signatures of one message, in a worker
    dkim_dns_budget: float = 2.0        # all DKIM key lookups of one message together wait on
                                        # DNS at most this long (ingress.policy.dkim_budget)
    dkim_timeout_ttl: float = 60.0      # a key domain that did not answer is not asked again
                                        # for this long (dkim=temperror at once); 0 = off
    authserv_id: str = ""               # Authentication-Results id; default smtp.hostname


@dataclass(frozen=True)
class AdmissionConfig:
    per_ip_bulk_max: int = 20           # concurrent bulk sessions per IPv4 address / IPv6 /64
    per_ip_rate: float = 10.0           # bulk connections per second per IP (0 = off)
    per_ip_burst: int = 20
    greet_pause: float = 0.0            # bulk early-talker test before the banner (0 = off)
    penalty: float = 300.0              # an early talker is refused this long
    stress_idle_timeout: float = 10.0   # bulk idle timeout while the bulk lane is saturated
    shed_delay: float = 0.1             # a shed bulk MAIL FROM waits this long for its 451
    shed_limit: int = 10                # sheds in one session; the last is 421 and a close
    evict_silent_after: float = 0.0     # slots full: a bulk session silent since its banner
                                        # for this long makes room for a newcomer (0: any;
                                        # the longest-silent goes first)
    evict_rate: float = float("inf")    # at most this many such evictions per second per
                                        # acceptor (inf = no limit, 0 = never evict)
    retry_share: float = 0.1            # a retry of a transaction we deferred for the bulk
                                        # cap bypasses it within this fraction of
                                        # lanes.bulk.rate (0 = off)
    retry_min_delay: float = 60.0       # ... if it comes at least this long after the last
                                        # deferral (bots hammer at once; MTAs wait)
    retry_ttl: float = 14400.0          # ... and within this long of the first deferral
    retry_max_records: int = 20000      # deferral records held (per acceptor; ~1.1 KB each)
    retry_per_net: int = 32             # deferral records per client /24 (IPv4) or IPv6
                                        # network of ipv6_prefix
    retry_per_site: int = 128           # ... and per IPv6 /48 (all its networks together;
                                        # an IPv4 /24 is its own site)
    retry_hammer_sheds: int = 30        # a site (/24, IPv6 /48) shed more than this many times
                                        # in a minute earns no retry evidence (0 = no such rule)
    ipv6_prefix: int = 64               # IPv6 clients are counted (per_ip_*, penalties) per
                                        # network of this prefix length (a /64 is one site)
    per_ip_fast_max: int = 4            # concurrent fast sessions per IP (/ipv6_prefix) per
                                        # acceptor for the self-proven and third-party tiers
                                        # (ingress.policy.tiers); beyond it: bulk. The operator
                                        # tier (allow list, certificates) is exempt


@dataclass(frozen=True)
class TiersConfig:
    """Trust tiers (ingress.policy.tiers): what the tiers below the operator's may hold of every
    fast resource (an acceptor's fast reserve of slots and DATA bytes, the fast queue's count
    and bytes, the fast workers' credit), as a tier, however many identities they hold."""
    self_proven_share: float = 0.5      # SPF, DKIM, learned: at most this share; beyond: bulk
    self_proven_rate: float = 200.0     # msgs/s all self-proven identities together may pass
                                        # through the fast lane of one lanes node (split over
                                        # the acceptors at MAIL FROM); beyond: bulk. 0 = none
    self_proven_burst: float = 20.0     # messages the tier may start at once (split likewise)
    third_party_share: float = 0.25     # DNS allow lists (not built yet): at most this share
    third_party_rate: float = 0.0       # msgs/s for the third-party tier as a whole; 0 = none
    third_party_burst: float = 20.0


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""                      # PEM certificate chain: enables STARTTLS on listen.port
    key: str = ""
    mtls_port: int = -1                 # implicit-TLS port requiring a client certificate; -1 off
    client_ca: str = ""                 # CA bundle that verifies client certificates (mTLS port)
    pinned_sha256: tuple[str, ...] = () # client certificate fingerprints that promote
    handshake_timeout: float = 5.0      # mTLS port: a TLS handshake that takes longer is
                                        # closed (the connection holds a slot meanwhile)
    mtls_addresses: tuple[str, ...] = ()    # the mTLS port's addresses ("v4:port"/"[v6]:port");
                                        # empty = tls.mtls_port on every host of
                                        # listen.addresses (if mtls_port >= 0)
    # --- the mTLS port's handshake gate (ingress/policy/handshake_gate.py), per acceptor ---
    stranger_handshake_rate: float = 50.0   # handshakes a second for clients not known by a
                                        # verified certificate (~1.2 ms CPU each: 6% of a
                                        # core); 0 = no gate
    stranger_handshake_burst: float = 10.0
    stranger_wait: float = 1.0          # seconds a stranger waits for its turn; then a TLS
                                        # alert (the queue holds rate x wait connections)
    known_ttl: float = 604800.0         # a prefix that completed a verified handshake goes
                                        # first for this long (refreshed by each one)
    known_max: int = 4096               # known prefixes remembered
    known_handshake_rate: float = 20.0  # handshakes a second (burst as many) per known
                                        # prefix; beyond it, a stranger
    known_ipv4_prefix: int = 24         # IPv4 network a known client is remembered by (IPv6:
                                        # admission.ipv6_prefix)
    failed_ttl: float = 600.0           # an address whose handshake failed waits behind
                                        # strangers this long (0 = not remembered)


@dataclass(frozen=True)
class RelayConfig:
    downstream: str = ""                # "" keeps mail in the spool; "smtp://host:port",
                                        # "lmtp://host:port", "lmtp:/path/to/socket"
    concurrency: int = 4
    retry_base: float = 30.0            # first retry after a 4xx, doubled up to retry_max
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0        # then the message fails (to failed/; a DSN as relay.dsn
                                        # says), as Postfix does
    dsn: str = "authenticated"          # who gets a DSN for a failed recipient: DSN_MODES
                                        # (ingress.policy.dsn); anything else: failed/ only
    dsn_rate: float = 30.0              # DSNs per destination organisational domain per hour
                                        # (at most that many at once): DSN_RATE_MAX at most
    timeout: float = 60.0               # per downstream SMTP step
    tls: str = "none"                   # STARTTLS to a TCP downstream: RELAY_TLS_MODES
    tls_ca_file: str = ""               # CA bundle for "required" ("" = the system's)
    tls_verify_name: str = ""           # name the certificate must carry ("" = the host)
    auth_file: str = ""                 # "user:password" for AUTH PLAIN; needs tls = "required"
                                        # (verified TLS only); the file must not be
                                        # group/world-readable
    nice: int = 5                       # nice(2) increment of the relay (0..19): delivery is
                                        # background work, accepting is not
    forward_client: str = "auto"        # the original client's identity to an smtp://
                                        # downstream: FORWARD_CLIENT_MODES (workers/relay/
                                        # forward.py); auto = XCLIENT, else XFORWARD, if offered


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9125"      # Prometheus endpoint; "" = off


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = Path("var/spool")
    state_dir: Path = Path("var/state")   # ipc sockets, learned allow cache, callout cache


@dataclass(frozen=True)
class SupervisorConfig:
    acceptors: int = 0                  # 0: one per core
    fast_acceptors: int = 1             # processes serving only clients classified fast at
                                        # connect, handed over by the acceptors (SCM_RIGHTS);
                                        # 0 = none (every acceptor serves everyone)
    mtls_acceptors: int = 1             # with fast acceptors and tls.mtls_addresses: processes
                                        # serving the mutual-TLS port alone, so that strangers'
                                        # handshakes never run on the event loop of the fast
                                        # acceptors (port 25's operator clients); 0 = the fast
                                        # acceptors serve it; 0..64
    acceptor_nice: int = 10             # nice(2) increment of the acceptors with the listeners
                                        # (every unknown client, spam being shed) when there
                                        # are fast acceptors, which keep 0; 0..19
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0      # a child silent this long is hung: killed and restarted
    restart_backoff: float = 0.1        # first restart delay, doubled per consecutive crash
    restart_backoff_max: float = 10.0
    crash_window: float = 30.0          # more than crash_limit restarts in this window: throttled
    crash_limit: int = 10


@dataclass(frozen=True)
class ClusterConfig:
    role: str = "all"                   # "all" (one host, ipc://, no keys) | "edge" | "lanes";
                                        # `smtp-ingress run --role` overrides it
    secret_key: str = ""                # edge and lanes: this node's NAME.key_secret (keygen)
    lanes_bind: str = ""                # lanes: "tcp://host:port"; binds port..port+3
    allowed_keys: str = ""              # lanes: directory of the edges' public keys (*.key)
    lanes_nodes: tuple[str, ...] = ()   # edge: "tcp://host:port /path/node.key" per lanes node
    # --- shared admission state in Redis (ingress/edge/cluster_state.py) ---
    redis: str = ""                     # "redis://host:port/db", "rediss://...", or
                                        # "unix:///path/redis.sock"; "" = in-process only
    redis_timeout: float = 0.05         # deadline of one Redis call (and of its connect)
    redis_retry: float = 2.0            # Redis down: try to reconnect at most this often
    redis_prefix: str = "smtp-ingress"  # key and channel namespace (one cluster per prefix)
    edges: int = 1                      # edge hosts sharing lanes.bulk.rate: Redis down, each
                                        # edge's acceptors hold 1/edges of it


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    # Lines a client can make us write (refusals, sheds, hand-backs: ingress.core.log.refused)
    # are throttled, so that a flood cannot fill the disk: at most throttle_lines per (event,
    # client network: IPv4 /24, IPv6 /64) per throttle_interval, and throttle_total per event
    # in each process; the next line carries not_logged. 0 = no limit.
    throttle_interval: float = 60.0     # seconds: the window of both limits
    throttle_lines: int = 5             # lines per event and client network per window
    throttle_total: int = 300           # lines per event and process per window


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = ListenConfig()
    smtp: SmtpConfig = SmtpConfig()
    lanes: LanesConfig = LanesConfig()
    classify: ClassifyConfig = ClassifyConfig()
    admission: AdmissionConfig = AdmissionConfig()
    tiers: TiersConfig = TiersConfig()
    tls: TlsConfig = TlsConfig()
    relay: RelayConfig = RelayConfig()
    metrics: MetricsConfig = MetricsConfig()
    spool: SpoolConfig = SpoolConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    log: LogConfig = LogConfig()
    cluster: ClusterConfig = ClusterConfig()
    source: str = "<embedded default>"

    # Derived values, computed from the validated fields.
    @property
    def acceptor_count(self) -> int:
        return self.supervisor.acceptors or cores()

    @property
    def acceptor_processes(self) -> int:
        """Every acceptor of this host: those with the listeners and the fast acceptors."""
        return self.acceptor_count + self.supervisor.fast_acceptors

    @property
    def mtls_acceptor_count(self) -> int:
        """Processes serving only the mutual-TLS port (supervisor.mtls_acceptors): with fast
        acceptors and an mTLS port; else 0 (the fast acceptors, or all, serve it)."""
        if not self.tls.mtls_addresses or self.supervisor.fast_acceptors <= 0:
            return 0
        return self.supervisor.mtls_acceptors

    def worker_count(self, lane: str) -> int:
        lc: LaneConfig = getattr(self.lanes, lane)
        return lc.workers or max(1, cores() // 2)

    @property
    def child_count(self) -> int:
        """Processes the supervisor runs for this config: brokers, workers, relay, acceptors."""
        return (2 + self.worker_count("fast") + self.worker_count("bulk")
                + (1 if self.relay.downstream else 0) + self.acceptor_processes
                + self.mtls_acceptor_count)

    @property
    def data_budget(self) -> tuple[int, int]:
        """(bytes per acceptor in DATA, of which reserved for the fast lane), defaults derived."""
        s = self.smtp
        total = s.data_memory_budget or 8 * s.max_message_size
        return total, s.data_fast_reserve or total // 4

    def queue_bytes(self, lane: str) -> int:
        """The lane broker's queue bound in bytes (lanes.<lane>.queue_bytes, derived if 0)."""
        lc: LaneConfig = getattr(self.lanes, lane)
        return lc.queue_bytes or max(64 * 1024 * 1024, 4 * self.smtp.max_message_size)

    def ipc(self, name: str) -> str:
        return f"ipc://{self.spool.state_dir / 'run' / name}.sock"

    @property
    def allow_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.classify.allow_cidrs)


LOG_LEVELS = ("debug", "info", "warning", "error")
SCHED_POLICIES = ("other", "batch", "idle")     # lanes.<lane>.sched_policy (ingress.core.child)


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


RELAY_TLS_MODES = ("none", "opportunistic", "required")
# relay.dsn: "authenticated" (a DSN only to a sender whose return path passed SPF, or DKIM
# aligned with it), "never" (failures go to failed/ only), "always" (every non-null sender, the
# old behaviour: backscatter to forged senders). ingress.policy.dsn decides.
DSN_MODES = ("authenticated", "never", "always")
DSN_RATE_MAX = 3600.0       # relay.dsn_rate: at most one a second per domain, on average
# relay.forward_client: "auto" sends XCLIENT when the downstream offers it, else XFORWARD, else
# nothing; "xclient" / "xforward" insist (a downstream without it is not used: the mail waits);
# "off" never sends either.
FORWARD_CLIENT_MODES = ("auto", "xclient", "xforward", "off")


def read_credentials(path: str) -> tuple[str, str]:
    """relay.auth_file: one line "user:password". ValueError (a message for the operator) when
    the file is unreadable, group/world-readable, or not in that form."""
    raw = read_private(path, 4096)
    try:
        line = raw.decode("utf-8").strip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path!r}: not UTF-8") from None
    user, sep, password = line.partition(":")
    if not sep or not user or not password or "\n" in line:
        raise ValueError(f"{path!r}: want one line user:password")
    return user, password


def load(path: Path | str | None) -> Config:
    """Read and validate `path`; None gives the embedded default (validated too)."""
    if path is None:
        return _finish(Config(), "<embedded default>")
    name = str(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(name, "-", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "-", f"not valid TOML: {e}") from None
    return _finish(_build(Config(), raw, name, ""), name)


def _build(base: Any, raw: Any, file: str, prefix: str) -> Any:
    """`base` (a default instance) with the keys of the table `raw` replaced. A table's keys
    it does not name keep `base`'s values: [lanes.bulk] with only `rate` keeps the bulk lane's
    own defaults (rate 500, nice 10), not a generic lane's."""
    if not isinstance(raw, dict):
        raise ConfigError(file, prefix or "-", "must be a table")
    fields = {f.name: f for f in dataclasses.fields(base) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(file, dotted, f"unknown key (known: {', '.join(sorted(fields))})")
        kwargs[key] = _convert(getattr(base, key), value, file, dotted)
    return dataclasses.replace(base, **kwargs)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Scalar types a config value may have: (the default's type, the check, the message, convert).
_SCALARS: tuple[tuple[type, Any, str, Any], ...] = (
    (bool, lambda v: isinstance(v, bool), "must be true or false", lambda v: v),
    (int, _is_int, "must be an integer", lambda v: v),
    (float, lambda v: _is_int(v) or isinstance(v, float), "must be a number", float),
    (Path, lambda v: isinstance(v, str) and bool(v), "must be a non-empty path string", Path),
    (str, lambda v: isinstance(v, str), "must be a string", lambda v: v),
    (tuple, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
     "must be a list of strings", tuple),
)


def _convert(default: Any, value: Any, file: str, key: str) -> Any:
    if dataclasses.is_dataclass(default):
        return _build(default, value, file, key + ".")
    for kind, ok, message, convert in _SCALARS:   # bool before int: a bool is an int
        if isinstance(default, kind):
            if not ok(value):
                raise ConfigError(file, key, f"{message}, not {value!r}")
            return convert(value)
    raise ConfigError(file, key, "unsupported value")  # pragma: no cover


class _Need:
    """need(ok, key, message): raise ConfigError(file, key, message) unless ok; parses(...)
    the same for a value that a parser must accept (ValueError -> the error, named)."""

    def __init__(self, file: str) -> None:
        self.file = file

    def __call__(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(self.file, key, msg)

    def parses(self, parse: Any, values: Any, key: str, what: str = "") -> None:
        for v in values:
            try:
                parse(v)
            except ValueError as e:
                raise ConfigError(self.file, key, f"{v!r} is not {what}" if what else str(e)) \
                    from None


def _cidr(c: str) -> Any:
    return ipaddress.ip_network(c, strict=False)


def _domain_name(d: str) -> str:
    """The canonical name (ingress.core.addr.normalize_domain); ValueError if there is none."""
    name = normalize_domain(d) if isinstance(d, str) else ""
    if not name:
        raise ValueError(d)
    return name


def parse_listen_address(text: str) -> tuple[str, int]:
    """ "v4:port" or "[v6]:port" -> (host, port); ValueError (a message) for anything else.
    The host is a literal IP address (no names, no zone index), the port 0..65535 (0: a free
    one, picked at start)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not \"v4:port\" or \"[v6]:port\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        want = 6
    else:
        want = 4
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if "%" in host:
        raise ValueError(f"{text!r}: no zone index (%...) in a listen address")
    if addr.version != want:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets (\"[::1]:25\"), an IPv4 "
                         "one without")
    if int(port) > 65535:
        raise ValueError(f"{text!r}: the port must be 0..65535")
    return str(addr), int(port)


def format_listen_address(host: str, port: int) -> str:
    """(host, port) -> "v4:port" / "[v6]:port" (the form parse_listen_address reads)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addresses(need: _Need, key: str, given: tuple[str, ...], hosts: list[str],
               port: int) -> tuple[str, ...]:
    """One listener's addresses, normalised: `given` parsed, or `port` on each of `hosts`
    (port < 0: off, empty). Duplicates, and a wildcard beside an address of the same family
    and port, are errors (SO_REUSEPORT would let both bind and split the clients)."""
    if given:
        parsed = []
        for a in given:
            try:
                parsed.append(parse_listen_address(a))
            except ValueError as e:
                raise ConfigError(need.file, key, str(e)) from None
    elif port >= 0:
        parsed = [(h, port) for h in dict.fromkeys(hosts)]
    else:
        return ()
    out = tuple(format_listen_address(h, p) for h, p in parsed)
    need(len(set(out)) == len(out), key, f"lists an address twice: {', '.join(out)}")
    return out


def _check_overlap(need: _Need, sets: dict[str, tuple[str, ...]]) -> None:
    """No two listen addresses (in any of the sets) that would take the same connections."""
    seen: dict[tuple[int, int], list[tuple[Any, str]]] = {}
    for key, addrs in sets.items():
        for a in addrs:
            host, port = parse_listen_address(a)
            if port == 0:
                continue
            ip = ipaddress.ip_address(host)
            for other, okey in seen.get((ip.version, port), []):
                need(ip != other and not ip.is_unspecified and not other.is_unspecified, key,
                     f"{a!r} overlaps {format_listen_address(str(other), port)!r} ({okey})")
            seen.setdefault((ip.version, port), []).append((ip, key))


def _listen_sets(cfg: Config, need: _Need) -> Config:
    """listen.addresses / listen.fast_addresses / tls.mtls_addresses filled in from the single
    address keys (listen.host, listen.port, listen.fast_port, tls.mtls_port) when empty; the
    single keys then mirror each set's first entry, so old configs keep their meaning."""
    lst, t = cfg.listen, cfg.tls
    default = ListenConfig()
    main = _addresses(need, "listen.addresses", lst.addresses, [lst.host], lst.port)
    if lst.addresses and (lst.host, lst.port) != (default.host, default.port):
        single = format_listen_address(str(ipaddress.ip_address(lst.host)), lst.port)
        need(main[0] == single, "listen.addresses",
             f"set listen.addresses or listen.host and listen.port, not both: the file has "
             f"addresses {list(main)} and host/port {single}. Keep one form: remove "
             "listen.host and listen.port (addresses replaces them), or remove "
             "listen.addresses")
    hosts = [parse_listen_address(a)[0] for a in main]
    fast = _addresses(need, "listen.fast_addresses", lst.fast_addresses, hosts, lst.fast_port)
    mtls = _addresses(need, "tls.mtls_addresses", t.mtls_addresses, hosts, t.mtls_port)
    need(not lst.fast_addresses or lst.fast_port < 0 or lst.fast_port
         == parse_listen_address(fast[0])[1], "listen.fast_port",
         "set listen.fast_addresses or listen.fast_port, not both: set fast_port = -1 (or "
         "remove it) to use fast_addresses, or empty fast_addresses to use fast_port")
    need(not t.mtls_addresses or t.mtls_port < 0 or t.mtls_port
         == parse_listen_address(mtls[0])[1], "tls.mtls_port",
         "set tls.mtls_addresses or tls.mtls_port, not both: set mtls_port = -1 (or remove "
         "it) to use mtls_addresses, or empty mtls_addresses to use mtls_port")
    _check_overlap(need, {"listen.addresses": main, "listen.fast_addresses": fast,
                          "tls.mtls_addresses": mtls})
    host, port = parse_listen_address(main[0])
    return dataclasses.replace(
        cfg,
        listen=dataclasses.replace(
            lst, addresses=main, fast_addresses=fast, host=host, port=port,
            fast_port=parse_listen_address(fast[0])[1] if fast else -1),
        tls=dataclasses.replace(
            t, mtls_addresses=mtls, mtls_port=parse_listen_address(mtls[0])[1] if mtls else -1))


def _check_listen(cfg: Config, need: _Need) -> None:
    lst = cfg.listen
    need(0 <= lst.port <= 65535, "listen.port", "must be 0..65535")
    need(lst.backlog >= 16, "listen.backlog", "must be at least 16")
    need(-1 <= lst.fast_port <= 65535 and (lst.fast_port <= 0 or lst.fast_port != lst.port),
         "listen.fast_port", "must be -1 (off) or 0..65535 and not listen.port")
    need.parses(ipaddress.ip_address, [lst.host], "listen.host", "an IP address")
    need.parses(_cidr, lst.trusted_proxies, "listen.trusted_proxies", "a CIDR")
    need(not lst.proxy_protocol or bool(lst.trusted_proxies), "listen.trusted_proxies",
         "must list the load balancers' addresses when listen.proxy_protocol = true")
    need(not lst.fast_port_proxy_protocol or bool(lst.trusted_proxies), "listen.trusted_proxies",
         "must list the load balancers' addresses when listen.fast_port_proxy_protocol = true")
    need(not lst.fast_port_proxy_protocol or lst.fast_port >= 0 or bool(lst.fast_addresses),
         "listen.fast_port_proxy_protocol", "needs listen.fast_port")


def _check_smtp(cfg: Config, need: _Need) -> None:
    s = cfg.smtp
    need(bool(s.hostname) and " " not in s.hostname, "smtp.hostname", "must be a host name")
    need(len(s.accepted_domains) > 0, "smtp.accepted_domains",
         "must list at least one domain (the ingress is never an open relay)")
    for d in s.accepted_domains:
        need(bool(d) and "@" not in d and " " not in d, "smtp.accepted_domains",
             f"{d!r} is not a domain")
    need(s.max_message_size >= 1024, "smtp.max_message_size", "must be at least 1024")
    need(1 <= s.max_recipients <= 10000, "smtp.max_recipients", "must be 1..10000")
    need(s.idle_timeout > 0, "smtp.idle_timeout", "must be > 0")
    need(s.session_deadline >= s.idle_timeout, "smtp.session_deadline",
         "must be >= smtp.idle_timeout")
    need(0 < s.ack_timeout < s.idle_timeout, "smtp.ack_timeout",
         "must be > 0 and shorter than smtp.idle_timeout (a client waits this long after its "
         "end of data; no idle timer runs meanwhile)")
    need(s.max_connections >= 0, "smtp.max_connections", "must be >= 0 (0 = auto)")
    need(s.fast_reserve >= 0 and (s.max_connections == 0 or s.fast_reserve < s.max_connections),
         "smtp.fast_reserve", "must be >= 0 and below smtp.max_connections (0 = a tenth)")
    need(s.connection_memory >= 8192, "smtp.connection_memory",
         "must be >= 8192 bytes (one connection)")
    need(s.drain_grace >= 0, "smtp.drain_grace", "must be >= 0")
    need(1 <= s.soft_error_limit <= 1000, "smtp.soft_error_limit", "must be 1..1000")
    need(s.soft_error_limit < s.hard_error_limit <= 1000, "smtp.hard_error_limit",
         "must be above smtp.soft_error_limit and at most 1000")
    need(s.error_sleep >= 0, "smtp.error_sleep", "must be >= 0")
    need(s.error_sleep <= s.error_sleep_max <= 60, "smtp.error_sleep_max",
         "must be >= smtp.error_sleep and at most 60 seconds")
    need(s.junk_command_limit >= 0, "smtp.junk_command_limit", "must be >= 0")
    need(s.mail_without_data_limit >= 1, "smtp.mail_without_data_limit", "must be >= 1")
    need(s.recipient_overshoot_limit >= 0, "smtp.recipient_overshoot_limit", "must be >= 0")
    need(not s.verify_recipients or cfg.relay.downstream.startswith("smtp://"),
         "smtp.verify_recipients", "needs an smtp://host:port relay.downstream to ask")
    need(s.verify_timeout > 0 and (not s.verify_recipients or s.verify_timeout < min(
         s.idle_timeout, cfg.admission.stress_idle_timeout) / 2), "smtp.verify_timeout",
         "must be > 0 and below half of smtp.idle_timeout and of "
         "admission.stress_idle_timeout (the callout runs on the idle timer)")
    for key in ("verify_positive_ttl", "verify_negative_ttl", "verify_tempfail_ttl"):
        need(getattr(s, key) >= 0, f"smtp.{key}", "must be >= 0 (0 = not cached)")
    need(1 <= s.verify_cache_size <= 10_000_000, "smtp.verify_cache_size", "must be 1..10000000")
    need(1 <= s.verify_concurrency <= 1000, "smtp.verify_concurrency", "must be 1..1000")
    need(0 <= s.verify_per_session <= 1000, "smtp.verify_per_session", "must be 0..1000")
    need(s.data_memory_budget >= 0 and s.data_fast_reserve >= 0, "smtp.data_memory_budget",
         "smtp.data_memory_budget and smtp.data_fast_reserve must be >= 0 (0 = derived)")
    total, reserve = cfg.data_budget
    need(total - reserve >= s.max_message_size, "smtp.data_fast_reserve",
         f"the bulk share of the DATA budget ({total} - {reserve} bytes) must hold one message "
         f"of smtp.max_message_size ({s.max_message_size})")
    need(not s.recipient_map or os.path.isfile(s.recipient_map), "smtp.recipient_map",
         f"{s.recipient_map!r}: no such file")


def _check_lanes(cfg: Config, need: _Need) -> None:
    s = cfg.smtp
    for lane in ("fast", "bulk"):
        lc: LaneConfig = getattr(cfg.lanes, lane)
        k = f"lanes.{lane}"
        need(0 <= lc.workers <= 256, f"{k}.workers", "must be 0..256 (0 = scale to cores)")
        need(1 <= lc.queue_max <= 100000, f"{k}.queue_max", "must be 1..100000")
        need(lc.queue_bytes == 0 or lc.queue_bytes >= s.max_message_size, f"{k}.queue_bytes",
             "must be 0 (derived) or at least smtp.max_message_size")
        need(1 <= lc.credit <= 1024, f"{k}.credit", "must be 1..1024")
        need(lc.rate >= 0, f"{k}.rate", "must be >= 0 (0 = uncapped)")
        need(lc.burst >= 0, f"{k}.burst", "must be >= 0")
        need(0 <= lc.nice <= 19, f"{k}.nice", "must be 0..19 (a nice(2) increment)")
        need(lc.sched_policy in SCHED_POLICIES, f"{k}.sched_policy",
             f"must be one of {', '.join(SCHED_POLICIES)}")
    need(cfg.lanes.fast.rate == 0, "lanes.fast.rate", "the fast lane is never rate-capped")


def _check_classify(cfg: Config, need: _Need) -> None:
    s = cfg.smtp
    need.parses(_cidr, cfg.classify.allow_cidrs, "classify.allow_cidrs", "a CIDR")
    c = cfg.classify
    need(c.spf_promote in ("any", "listed", "off"), "classify.spf_promote",
         "must be one of any, listed, off")
    need(c.spf_promote != "listed" or bool(c.spf_domains), "classify.spf_domains",
         'must list domains when classify.spf_promote = "listed"')
    need.parses(_domain_name, c.spf_domains, "classify.spf_domains", "a valid domain name")
    need(c.learned_ttl >= 0, "classify.learned_ttl", "must be >= 0 (0 = do not learn)")
    need(0 < c.identity_share <= 1, "classify.identity_share", "must be in (0, 1]")
    need(c.domain_rate >= 0, "classify.domain_rate", "must be >= 0 (0 = no bound)")
    need(c.domain_burst >= 1, "classify.domain_burst", "must be >= 1 (messages)")
    need(c.learned_max >= 1, "classify.learned_max", "must be >= 1")
    need(1 <= c.learned_per_domain <= 10000, "classify.learned_per_domain", "must be 1..10000")
    need(1 <= c.learned_per_net <= 10000, "classify.learned_per_net", "must be 1..10000")
    need(0.1 <= c.learned_save_interval <= 3600, "classify.learned_save_interval",
         "must be 0.1..3600 seconds")
    need(0 < c.dns_timeout <= 30, "classify.dns_timeout", "must be in (0, 30]")
    need(0 < c.spf_deadline <= 60, "classify.spf_deadline",
         "must be in (0, 60] (at most half of smtp.idle_timeout applies)")
    need(1 <= c.spf_backlog <= 65536, "classify.spf_backlog", "must be 1..65536")
    need(1 <= c.spf_per_domain <= c.spf_backlog, "classify.spf_per_domain",
         "must be 1..classify.spf_backlog")
    need(1 <= c.spf_per_network <= c.spf_backlog, "classify.spf_per_network",
         "must be 1..classify.spf_backlog")
    need(0 <= c.spf_timeout_ttl <= 300, "classify.spf_timeout_ttl",
         "must be 0..300 seconds (0 = no cache of timeouts)")
    need(0 < c.dkim_deadline < s.ack_timeout, "classify.dkim_deadline",
         "must be > 0 and below smtp.ack_timeout (it runs before the ack)")
    need(0 < c.dkim_dns_budget <= 30, "classify.dkim_dns_budget",
         "must be in (0, 30] (classify.dkim_deadline bounds it too)")
    need(0 <= c.dkim_timeout_ttl <= 300, "classify.dkim_timeout_ttl",
         "must be in [0, 300] (RFC 2308 7: at most five minutes; 0 = off)")
    need.parses(parse_nameserver, c.nameservers, "classify.nameservers")


def _check_admission(cfg: Config, need: _Need) -> None:
    s = cfg.smtp
    a = cfg.admission
    need(a.per_ip_bulk_max >= 1, "admission.per_ip_bulk_max", "must be >= 1")
    need(a.per_ip_rate >= 0, "admission.per_ip_rate", "must be >= 0 (0 = off)")
    need(a.per_ip_burst >= 1, "admission.per_ip_burst", "must be >= 1")
    need(0 <= a.greet_pause < s.idle_timeout, "admission.greet_pause",
         "must be >= 0 and below smtp.idle_timeout")
    need(a.penalty >= 0, "admission.penalty", "must be >= 0")
    need(0 <= a.shed_delay <= 10, "admission.shed_delay", "must be 0..10 seconds")
    need(a.shed_limit >= 1, "admission.shed_limit", "must be >= 1")
    need(a.evict_silent_after >= 0, "admission.evict_silent_after", "must be >= 0 seconds")
    need(a.evict_rate >= 0, "admission.evict_rate",
         "must be >= 0 (0 = never evict, inf = no limit)")
    need(0 <= a.retry_share <= 1, "admission.retry_share", "must be 0..1 (0 = off)")
    need(a.retry_min_delay >= 0, "admission.retry_min_delay", "must be >= 0 seconds")
    need(a.retry_ttl > a.retry_min_delay, "admission.retry_ttl",
         "must be greater than admission.retry_min_delay")
    need(1 <= a.retry_max_records <= 10_000_000, "admission.retry_max_records",
         "must be 1..10000000")
    need(a.retry_per_net >= 1, "admission.retry_per_net", "must be >= 1")
    need(a.retry_per_site >= a.retry_per_net, "admission.retry_per_site",
         "must be >= admission.retry_per_net")
    need(a.retry_hammer_sheds >= 0, "admission.retry_hammer_sheds", "must be >= 0 (0 = off)")
    need(16 <= a.ipv6_prefix <= 128, "admission.ipv6_prefix", "must be 16..128")
    need(a.stress_idle_timeout > 0, "admission.stress_idle_timeout",
         "must be > 0 (the shorter of it and smtp.idle_timeout applies under stress)")
    need(1 <= a.per_ip_fast_max <= 100000, "admission.per_ip_fast_max", "must be 1..100000")


def _check_tiers(cfg: Config, need: _Need) -> None:
    t = cfg.tiers
    for key in ("self_proven_share", "third_party_share"):
        need(0 <= getattr(t, key) < 1, f"tiers.{key}", "must be in [0, 1)")
    need(t.self_proven_share + t.third_party_share < 1, "tiers.third_party_share",
         "tiers.self_proven_share + tiers.third_party_share must be below 1 (the rest is the "
         "operator tier's floor)")
    for key in ("self_proven", "third_party"):
        need(getattr(t, f"{key}_rate") >= 0, f"tiers.{key}_rate", "must be >= 0 (0 = no bound)")
        need(getattr(t, f"{key}_burst") >= 1, f"tiers.{key}_burst", "must be >= 1 (messages)")


def _check_tls(cfg: Config, need: _Need) -> None:
    t = cfg.tls
    need(bool(t.cert) == bool(t.key), "tls.key", "tls.cert and tls.key go together")
    for key in ("cert", "key", "client_ca"):
        path = getattr(t, key)
        need(not path or os.path.isfile(path), f"tls.{key}", f"{path!r}: no such file")
    need(-1 <= t.mtls_port <= 65535, "tls.mtls_port", "must be -1 (off) or 0..65535")
    need(0 < t.handshake_timeout <= 60, "tls.handshake_timeout", "must be in (0, 60] seconds")
    need(0 <= t.stranger_handshake_rate <= 100000, "tls.stranger_handshake_rate",
         "must be 0 (no gate) .. 100000 a second")
    need(1 <= t.stranger_handshake_burst <= 100000, "tls.stranger_handshake_burst",
         "must be 1..100000")
    need(0 <= t.stranger_wait < t.handshake_timeout, "tls.stranger_wait",
         "must be >= 0 and less than tls.handshake_timeout (the handshake needs time too)")
    need(t.stranger_handshake_rate * t.stranger_wait <= 100000, "tls.stranger_wait",
         "the queue (stranger_handshake_rate x stranger_wait) must hold <= 100000")
    need(0 < t.known_ttl <= 90 * 86400, "tls.known_ttl", "must be in (0, 90 days] seconds")
    need(1 <= t.known_max <= 1_000_000, "tls.known_max", "must be 1..1000000")
    need(0 < t.known_handshake_rate <= 100000, "tls.known_handshake_rate",
         "must be in (0, 100000] a second")
    need(8 <= t.known_ipv4_prefix <= 32, "tls.known_ipv4_prefix", "must be 8..32")
    need(0 <= t.failed_ttl <= 86400, "tls.failed_ttl", "must be 0..86400 seconds")
    mtls_on = t.mtls_port >= 0 or bool(t.mtls_addresses)
    need(not mtls_on or bool(t.cert), "tls.mtls_port", "needs tls.cert and tls.key")
    need(not mtls_on or bool(t.client_ca) or bool(t.pinned_sha256), "tls.mtls_port",
         "needs tls.client_ca or tls.pinned_sha256 to check client certificates against")
    # Python's ssl verifies every client certificate it requests against a CA bundle (there is
    # no verify callback to accept a pinned one instead): pins alone fail every handshake.
    need(not mtls_on or bool(t.client_ca), "tls.client_ca",
         "tls.mtls_port needs a CA bundle even with tls.pinned_sha256: put the pinned (e.g. "
         "self-signed) certificates or their issuers in tls.client_ca")
    for fp in t.pinned_sha256:
        hexed = fp.replace(":", "").lower()
        need(len(hexed) == 64 and all(ch in "0123456789abcdef" for ch in hexed),
             "tls.pinned_sha256", f"{fp!r} is not a SHA-256 fingerprint (64 hex digits)")


def _check_relay(cfg: Config, need: _Need) -> None:
    r = cfg.relay
    need.parses(parse_downstream, [r.downstream] if r.downstream else [], "relay.downstream")
    need(1 <= r.concurrency <= 256, "relay.concurrency", "must be 1..256")
    need(0 <= r.nice <= 19, "relay.nice", "must be 0..19 (a nice(2) increment)")
    need(0 < r.retry_base <= r.retry_max, "relay.retry_base", "must be > 0 and <= retry_max")
    need(r.max_age > 0 and r.timeout > 0, "relay.max_age", "max_age and timeout must be > 0")
    need(r.dsn in DSN_MODES, "relay.dsn", f"must be one of {', '.join(DSN_MODES)}")
    need(1.0 <= r.dsn_rate <= DSN_RATE_MAX, "relay.dsn_rate",
         f"must be 1..{DSN_RATE_MAX:g} (DSNs per destination domain per hour)")
    need(r.tls in RELAY_TLS_MODES, "relay.tls", f"must be one of {', '.join(RELAY_TLS_MODES)}")
    need(r.tls == "none" or r.downstream.startswith(("smtp://", "lmtp://")), "relay.tls",
         "TLS needs a TCP downstream (smtp://host:port or lmtp://host:port)")
    need(not r.tls_ca_file or os.path.isfile(r.tls_ca_file), "relay.tls_ca_file",
         f"{r.tls_ca_file!r}: no such file")
    need(r.forward_client in FORWARD_CLIENT_MODES, "relay.forward_client",
         f"must be one of {', '.join(FORWARD_CLIENT_MODES)}")
    # XCLIENT and XFORWARD are Postfix's SMTP extensions; an LMTP server's (Dovecot's XCLIENT)
    # differ in attributes and restart: the relay speaks them to an smtp:// downstream only.
    need(r.forward_client in ("auto", "off") or not r.downstream
         or r.downstream.startswith("smtp://"), "relay.forward_client",
         f'"{r.forward_client}" needs an smtp://host:port relay.downstream (LMTP gets nothing: '
         'use "auto" or "off")')
    if r.auth_file:
        # "required" is the only mode that verifies the certificate (chain and name): under
        # "opportunistic" the password would go to whoever answers STARTTLS (a MITM, a
        # hijacked route), so credentials need it.
        need(r.tls == "required", "relay.auth_file",
             f"{r.auth_file!r}: credentials are sent only over verified TLS: set "
             f'relay.tls = "required" (now {r.tls!r})')
        need.parses(read_credentials, [r.auth_file], "relay.auth_file")


def _check_outputs_and_supervisor(cfg: Config, need: _Need) -> None:
    sup = cfg.supervisor
    m = cfg.metrics.listen
    if m:
        mhost, _, mport = m.rpartition(":")
        need(mport.isdigit() and int(mport) <= 65535 and bool(mhost), "metrics.listen",
             'must be "host:port" or ""')
    need(0 <= sup.acceptors <= 1024, "supervisor.acceptors",
         "must be 0..1024 (0 = one per core)")
    need(0 <= sup.fast_acceptors <= 64, "supervisor.fast_acceptors", "must be 0..64")
    need(0 <= sup.mtls_acceptors <= 64, "supervisor.mtls_acceptors", "must be 0..64")
    need(0 <= sup.acceptor_nice <= 19, "supervisor.acceptor_nice",
         "must be 0..19 (a nice(2) increment)")
    need(sup.heartbeat_interval > 0, "supervisor.heartbeat_interval", "must be > 0")
    need(sup.heartbeat_timeout >= 2 * sup.heartbeat_interval, "supervisor.heartbeat_timeout",
         "must be at least twice supervisor.heartbeat_interval")
    need(sup.restart_backoff > 0, "supervisor.restart_backoff", "must be > 0")
    need(sup.restart_backoff_max >= sup.restart_backoff, "supervisor.restart_backoff_max",
         "must be >= supervisor.restart_backoff")
    need(sup.crash_limit >= 1, "supervisor.crash_limit", "must be >= 1")
    need(cfg.log.level in LOG_LEVELS, "log.level", f"must be one of {', '.join(LOG_LEVELS)}")
    need(1.0 <= cfg.log.throttle_interval <= 86400.0, "log.throttle_interval",
         "must be 1..86400 seconds")
    need(0 <= cfg.log.throttle_lines <= 1_000_000, "log.throttle_lines",
         "must be 0..1000000 (0 = no limit)")
    need(0 <= cfg.log.throttle_total <= 1_000_000, "log.throttle_total",
         "must be 0..1000000 (0 = no limit)")


def _check_cluster(cfg: Config, need: _Need) -> None:
    from ingress.core import cluster
    c = cfg.cluster
    need(c.role in cluster.ROLES, "cluster.role", f"must be one of {', '.join(cluster.ROLES)}")
    if c.role == "all":
        return
    need(bool(c.secret_key), "cluster.secret_key",
         f"required with role {c.role} (this node's NAME.key_secret from smtp-ingress keygen)")
    need.parses(cluster.key_pair, [c.secret_key], "cluster.secret_key")
    if c.role == "lanes":
        need(bool(c.lanes_bind), "cluster.lanes_bind", 'required with role lanes ("tcp://host:port")')
        need.parses(cluster.parse_base, [c.lanes_bind], "cluster.lanes_bind")
        need(bool(c.allowed_keys), "cluster.allowed_keys",
             "required with role lanes (a directory of the edges' public keys)")
        need.parses(cluster.allowed_keys, [c.allowed_keys], "cluster.allowed_keys")
    else:
        need(bool(c.lanes_nodes), "cluster.lanes_nodes", "required with role edge")
        need.parses(cluster.parse_node, c.lanes_nodes, "cluster.lanes_nodes")
        need.parses(cluster.public_key, [cluster.parse_node(n)[1] for n in c.lanes_nodes],
                    "cluster.lanes_nodes")
        need(len(set(c.lanes_nodes)) == len(c.lanes_nodes), "cluster.lanes_nodes",
             "a lanes node is named twice")


def with_role(cfg: Config, role: str) -> Config:
    """`run --role`: the config with cluster.role replaced, validated again."""
    return _finish(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, role=role)),
                   cfg.source)

REDIS_SCHEMES = ("redis", "rediss", "unix")


def _check_cluster_redis(cfg: Config, need: _Need) -> None:
    """[cluster] redis and its timing keys (the Redis part of [cluster])."""
    c = cfg.cluster
    if c.redis:
        u = urlsplit(c.redis)
        need(u.scheme in REDIS_SCHEMES and bool(u.hostname if u.scheme != "unix" else u.path),
             "cluster.redis", 'must be "redis://host:port/db", "rediss://host:port/db", '
             '"unix:///path" or "" (no Redis)')
    need(0 < c.redis_timeout <= 5.0, "cluster.redis_timeout", "must be > 0 and <= 5 seconds")
    need(c.redis_retry >= c.redis_timeout, "cluster.redis_retry",
         "must be >= cluster.redis_timeout")
    need(bool(c.redis_prefix) and c.redis_prefix.isprintable() and " " not in c.redis_prefix
         and len(c.redis_prefix) <= 64, "cluster.redis_prefix",
         "must be 1..64 printable characters without spaces")
    need(1 <= c.edges <= 1024, "cluster.edges", "must be 1..1024")


def _finish(cfg: Config, file: str) -> Config:
    """Cross-field validation and normalisation; returns the final frozen Config."""
    need = _Need(file)
    for check in (_check_listen, _check_smtp, _check_lanes, _check_classify, _check_admission,
                  _check_tiers, _check_tls, _check_relay, _check_outputs_and_supervisor,
                  _check_cluster, _check_cluster_redis):
        check(cfg, need)
    cfg = _listen_sets(cfg, need)
    s = cfg.smtp
    spool = SpoolConfig(path=cfg.spool.path.absolute(), state_dir=cfg.spool.state_dir.absolute())
    run_dir = spool.state_dir / "run"
    # ipc:// paths are limited by sockaddr_un (107 bytes).
    need(len(str(run_dir)) + 20 < 107, "spool.state_dir",
         f"{run_dir} is too long for unix socket paths (limit ~85 characters)")
    domains = tuple(d.lower().rstrip(".") for d in s.accepted_domains)
    return dataclasses.replace(cfg, spool=spool, source=file,
                               smtp=dataclasses.replace(s, accepted_domains=domains))
