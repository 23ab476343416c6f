"""Values derived from a validated Config: the one place each limit is computed.

Purpose
    The running processes and `check-config --show` (ingress.tools.configshow, which only
    prints them) take every number that follows from the config and the machine from here:
    process counts, byte budgets, connection slots under the fd limit, and how each rate cap is
    divided between acceptors, edges and brokers.

API
    cores() -> int                               CPUs this process may run on
    acceptor_count(cfg), acceptor_processes(cfg), mtls_acceptor_count(cfg),
    worker_count(cfg, lane), child_count(cfg)    processes (Config's properties of those names)
    dedicated_workers(cfg, lane) -> int          the lane's workers dedicated to one tier, on
                                                 top of worker_count (the fast lane's
                                                 tiers.self_proven_workers; bulk: none)
    lane_workers(cfg, lane) -> int               every worker of the lane's broker: the two
    steer_listed(cfg) -> bool                    DNS-allow-listed clients are steered to the
                                                 fast acceptors (dnswl.steer)
    steer_known(cfg) -> bool                     the mTLS port's verified clients are steered
                                                 to the fast acceptors (ingress.core.reuseport)
    data_budget(cfg) -> (total, fast reserve)    DATA bytes per acceptor
    queue_bytes(cfg, lane) -> int                a lane broker's queue bound in bytes
    raised_nofile(soft, hard) -> int             the fd limit an acceptor runs with (it raises
                                                 its soft RLIMIT_NOFILE to the hard one)
    FD_SPARE, CONNECTION_COST, FAST_RESERVE_SHARE, ConnectionLimit
    connection_limit(max_connections, fast_reserve, nofile, memory, cost) -> ConnectionLimit
    dns_configured(cfg) -> bool                  classify.nameservers named, or SPF on
    dns_fds(cfg) -> int                          descriptors kept for DNS sockets (SPF, checks)
    configured_limit(cfg, nofile) -> ConnectionLimit   one acceptor's slots for `cfg`
    fds_needed(cfg) -> int                       descriptors an acceptor asks for at start
    PARK_FDS, park_reserve(cfg), park_fds(cfg, nofile, sessions)
                                                 descriptors kept for the mTLS port's parked
                                                 clients (out of the fd cap), and how many one
                                                 listener may park
    fd_capped(max_connections, fast_reserve, nofile) -> (slots, reserve)
    BULK_SHARE, bulk_share_bucket(cfg, edges=0)  one acceptor's share of the bulk cap
    broker_bucket(cfg, lane)                     a lane broker's own bucket
    retry_buckets(cfg)                           the retry share: per acceptor, at the broker
    domain_buckets(rate, burst, parts), tier_buckets(rate, burst, parts)
                                                 a per-domain / per-tier rate split between an
                                                 edge's acceptors, and at the fast broker
    rate_parts(cfg) -> int                       the acceptors that share a tier's total rate
    listen_sockets(cfg) -> int                   SO_REUSEPORT sockets the supervisor binds

Failure modes: none; every function is pure arithmetic on a Config that ingress.core.config
has validated (counts >= 1 where divided by).
Limits: the fd limit is an argument (the caller reads RLIMIT_NOFILE); cores() reads the CPU
affinity of the calling process.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingress.core.schema import Config, LaneConfig


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --- processes ------------------------------------------------------------------------------

def acceptor_count(cfg: Config) -> int:
    """The acceptors with the listeners: supervisor.acceptors, or one per core."""
    return cfg.supervisor.acceptors or cores()


def acceptor_processes(cfg: Config) -> int:
    """Every acceptor of this host: those with the listeners and the fast acceptors."""
    return acceptor_count(cfg) + cfg.supervisor.fast_acceptors


def mtls_acceptor_count(cfg: Config) -> int:
    """Processes serving only the mutual-TLS port (supervisor.mtls_acceptors): with fast
    acceptors and an mTLS port; else 0 (the fast acceptors, or all, serve it)."""
    if not cfg.tls.mtls_addresses or cfg.supervisor.fast_acceptors <= 0:
        return 0
    return cfg.supervisor.mtls_acceptors


def steer_listed(cfg: Config) -> bool:
    """The acceptors list the clients a DNS allow list vouches for, and the kernel steers
    them to the fast acceptors (dnswl.steer, with sites, fast acceptors and
    listen.steer_operator: ingress.core.steer_table)."""
    return (bool(cfg.dnswl.sites) and cfg.dnswl.steer and cfg.listen.steer_operator
            and cfg.supervisor.fast_acceptors > 0)


def steer_known(cfg: Config) -> bool:
    """The mutual-TLS port's verified client addresses are steered from the mTLS acceptors to
    the fast acceptors (listen.steer_operator with mTLS acceptors: ingress.core.reuseport)."""
    return cfg.listen.steer_operator and mtls_acceptor_count(cfg) > 0


def _lane(cfg: Config, lane: str) -> LaneConfig:
    lc: LaneConfig = getattr(cfg.lanes, lane)
    return lc


def worker_count(cfg: Config, lane: str) -> int:
    return _lane(cfg, lane).workers or max(1, cores() // 2)


def dedicated_workers(cfg: Config, lane: str) -> int:
    return cfg.tiers.self_proven_workers if lane == "fast" else 0


def lane_workers(cfg: Config, lane: str) -> int:
    return worker_count(cfg, lane) + dedicated_workers(cfg, lane)


def child_count(cfg: Config) -> int:
    """Processes the supervisor runs for this config: brokers, workers, relay, acceptors."""
    return (2 + lane_workers(cfg, "fast") + lane_workers(cfg, "bulk")
            + (1 if cfg.relay.downstream else 0) + acceptor_processes(cfg)
            + mtls_acceptor_count(cfg))


def listen_sockets(cfg: Config) -> int:
    """Listening sockets: one per listen address (port 25, fast port, mTLS) per acceptor."""
    return acceptor_count(cfg) * (len(cfg.listen.addresses) + len(cfg.listen.fast_addresses)
                                  + len(cfg.tls.mtls_addresses))


# --- bytes ----------------------------------------------------------------------------------

def data_budget(cfg: Config) -> tuple[int, int]:
    """(bytes per acceptor in DATA, of which reserved for the fast lane), defaults derived."""
    s = cfg.smtp
    total = s.data_memory_budget or 8 * s.max_message_size
    return total, s.data_fast_reserve or total // 4


def queue_bytes(cfg: Config, lane: str) -> int:
    """The lane broker's queue bound in bytes (lanes.<lane>.queue_bytes, derived if 0)."""
    return _lane(cfg, lane).queue_bytes or max(64 * 1024 * 1024, 4 * cfg.smtp.max_message_size)


# --- connection slots -----------------------------------------------------------------------

FD_SPARE = 64                # descriptors an acceptor needs besides its sessions
PARK_FDS = 256               # per mTLS address: clients parked before their ClientHello
FAST_RESERVE_SHARE = 10      # smtp.fast_reserve = 0: a tenth of the slots (1 / this)
CONNECTION_COST = 8 * 1024   # bytes one held connection is budgeted at (smtp.connection_memory)


def raised_nofile(soft: int, hard: int) -> int:
    """The fd limit an acceptor runs with: it raises its soft RLIMIT_NOFILE to the hard one
    (ingress.core.procs.raise_nofile); an unlimited hard limit leaves the soft one."""
    return soft if hard == resource.RLIM_INFINITY else max(soft, hard)


@dataclass(frozen=True, slots=True)
class ConnectionLimit:
    """One acceptor's slots: `max_connections` of which `fast_reserve` for the fast lane only;
    `limited_by` says what set the number: "config" (smtp.max_connections), "fd"
    (RLIMIT_NOFILE - FD_SPARE) or "memory" (smtp.connection_memory / CONNECTION_COST)."""
    max_connections: int
    fast_reserve: int
    limited_by: str


def connection_limit(max_connections: int, fast_reserve: int, nofile: int,
                     memory: int, cost: int = CONNECTION_COST) -> ConnectionLimit:
    """The per-acceptor slots. max_connections > 0: that, capped at what the fd limit `nofile`
    allows (nofile - FD_SPARE, at least 1; nofile <= 0: unknown, no cap), an explicit reserve
    scaled down in the same proportion. max_connections = 0 (auto): min(nofile - FD_SPARE,
    memory // cost), at least 1. fast_reserve = 0: limit // FAST_RESERVE_SHARE. The reserve is
    always below the limit."""
    fd_cap = max(1, nofile - FD_SPARE) if nofile > 0 else 0
    if max_connections > 0:
        if not fd_cap or fd_cap >= max_connections:
            limit, why = max_connections, "config"
        else:
            limit, why = fd_cap, "fd"
        reserve = fast_reserve * limit // max_connections if fast_reserve else 0
    else:
        mem_cap = max(1, memory // max(1, cost))
        limit, why = (fd_cap, "fd") if fd_cap and fd_cap < mem_cap else (mem_cap, "memory")
        reserve = min(fast_reserve, limit)
    if not fast_reserve:
        reserve = limit // FAST_RESERVE_SHARE
    return ConnectionLimit(limit, max(0, min(limit - 1, reserve)), why)


def dns_configured(cfg: Config) -> bool:
    """Is DNS configured: classify.nameservers named, or SPF promotion on (which resolves
    through /etc/resolv.conf)? The checks that are on "wherever DNS is configured" (iprev,
    DMARC) follow it; without DNS (the embedded default) no lookup is made."""
    return bool(cfg.classify.nameservers) or cfg.classify.spf_promote != "off"


def dns_fds(cfg: Config) -> int:
    """Descriptors an acceptor keeps for DNS beside FD_SPARE: each SPF check under way may
    have a DNS query (a UDP socket) in flight, bounded by classify.spf_backlog (0 when
    classify.spf_promote is "off": no lookups), and so may the evidence checks' DNS client,
    bounded by checks.dns_backlog (0 without DNS: ingress.core.dns_client)."""
    spf = cfg.classify.spf_backlog if cfg.classify.spf_promote != "off" else 0
    return spf + (cfg.checks.dns_backlog if dns_configured(cfg) else 0)


def configured_limit(cfg: Config, nofile: int) -> ConnectionLimit:
    """connection_limit for `cfg`'s smtp.max_connections, fast_reserve and connection_memory,
    under the fd limit `nofile` less what DNS keeps (dns_fds) and the mTLS port's parked
    clients (park_reserve)."""
    s = cfg.smtp
    fds = max(1, nofile - dns_fds(cfg) - park_reserve(cfg)) if nofile > 0 else nofile
    return connection_limit(s.max_connections, s.fast_reserve, fds, s.connection_memory)


def fds_needed(cfg: Config) -> int:
    """Descriptors an acceptor needs for the slots the config (or the memory budget) asks for:
    one per session, FD_SPARE, the DNS sockets (dns_fds) and the mTLS port's parked clients
    (PARK_FDS per mTLS address)."""
    return configured_limit(cfg, 0).max_connections + FD_SPARE + dns_fds(cfg) + park_reserve(cfg)


def park_reserve(cfg: Config) -> int:
    """Descriptors kept for the mTLS port's parked clients: PARK_FDS per mTLS address."""
    return PARK_FDS * len(cfg.tls.mtls_addresses)


def park_fds(cfg: Config, nofile: int, sessions: int) -> int:
    """Clients one mTLS listener may park before their ClientHello (ingress.edge.mtls): PARK_FDS,
    or what the fd limit `nofile` leaves beside `sessions` slots, FD_SPARE and dns_fds, shared
    by the mTLS addresses (nofile <= 0: unknown, PARK_FDS)."""
    if nofile <= 0:
        return PARK_FDS
    left = nofile - sessions - FD_SPARE - dns_fds(cfg)
    return max(0, min(PARK_FDS, left // max(1, len(cfg.tls.mtls_addresses))))


def fd_sessions(cfg: Config, nofile: int) -> int:
    """Sessions the fd limit `nofile` leaves room for (before the at-least-one rule)."""
    return max(0, nofile - FD_SPARE - dns_fds(cfg) - park_reserve(cfg))


def fd_capped(max_connections: int, fast_reserve: int, nofile: int) -> tuple[int, int]:
    """smtp.max_connections and smtp.fast_reserve (both explicit) as the fd limit `nofile`
    allows: connection_limit's rule for a configured limit."""
    lim = connection_limit(max_connections, fast_reserve, nofile, 0)
    return lim.max_connections, lim.fast_reserve


# --- rate caps: who holds which part ---------------------------------------------------------

BULK_SHARE = 1.1    # acceptors together admit this much of the bulk cap (at the first RCPT)


def bulk_share_bucket(cfg: Config, edges: int = 0) -> tuple[float, float] | None:
    """(rate, burst) of one acceptor's share of the bulk cap (spent at a bulk transaction's
    first RCPT TO); None: uncapped.
    Several edges ([cluster]) divide lanes.bulk.rate between them: `edges` (0: cluster.edges)
    is how many; this local share is what an edge holds while the shared bucket in Redis is
    out of reach (ingress.edge.cluster_state)."""
    lb = cfg.lanes.bulk
    if lb.rate <= 0:
        return None
    n = acceptor_count(cfg) * max(1, edges or cfg.cluster.edges)
    return (lb.rate * BULK_SHARE / n, max(1.0, (lb.burst or lb.rate) / n))


def broker_bucket(cfg: Config, lane: str) -> tuple[float, float]:
    """(rate, burst) of a lane broker's own bucket. One host: lanes.<lane>.rate exactly (the
    acceptors' shares overshoot by BULK_SHARE; the broker trims after DATA). With the shared
    bucket in Redis ([cluster] redis, bulk lane) the cap is already exact at the first RCPT, across
    every edge: the broker is only the lane-side guard against an edge that does not hold to
    it, so it gets BULK_SHARE of headroom in rate and twice the burst. Otherwise the jitter
    between the first RCPT and the end of DATA would bunch admitted messages past an exact bucket,
    and it would shed (after DATA, the costly place) mail the shared cap had admitted."""
    lc = _lane(cfg, lane)
    burst = float(lc.burst) if lc.burst > 0 else max(1.0, lc.rate)
    if lane == "bulk" and cfg.cluster.redis and lc.rate > 0:
        return lc.rate * BULK_SHARE, 2 * burst
    return lc.rate, float(lc.burst)


def retry_buckets(cfg: Config) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(rate, burst) of one acceptor's retry bucket and of the bulk broker's: the
    admission.retry_share of lanes.bulk.rate (and of its burst, at least 1 token), the
    acceptors' parts summing to the broker's. None: the bulk lane is uncapped or the share 0."""
    lb, share = cfg.lanes.bulk, cfg.admission.retry_share
    if lb.rate <= 0 or share <= 0:
        return None
    rate = lb.rate * share
    burst = max(1.0, (lb.burst or lb.rate) * share)
    n = acceptor_count(cfg)
    return (rate / n, max(1.0, burst / n)), (rate, burst)


def domain_buckets(domain_rate: float, domain_burst: float, acceptors: int
                   ) -> tuple[tuple[float, float], tuple[float, float]]:
    """(rate, burst) of a domain's bucket in one of an edge's `acceptors` acceptors, which
    share classify.domain_rate and domain_burst evenly (a steady fast-lane flow per domain,
    never a wave), and of its bucket at the fast broker: one second of the rate and at least
    one edge's burst, so that on one edge it never bites first (it bounds several edges)."""
    parts = max(1, acceptors)
    return ((domain_rate / parts, max(1.0, domain_burst / parts)),
            (domain_rate, max(1.0, domain_rate, domain_burst)))


def tier_buckets(rate: float, burst: float, parts: int
                 ) -> tuple[tuple[float, float], tuple[float, float]]:
    """(rate, burst) of a tier's bucket in one of `parts` acceptors, and at the fast broker
    (which bounds several edges): the split of domain_buckets."""
    return domain_buckets(rate, burst, parts)


def rate_parts(cfg: Config) -> int:
    """The acceptors of an edge that hold self-proven sessions and so share its total rate at
    MAIL FROM: the port-25 acceptors (self-proven clients are not handed off), and the fast
    acceptors when listen.fast_port is on (a learned client may come in there)."""
    fast = cfg.supervisor.fast_acceptors if cfg.listen.fast_addresses else 0
    return max(1, acceptor_count(cfg) + fast)
