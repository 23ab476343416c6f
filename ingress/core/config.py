"""Configuration: the only place that reads the TOML file; loading and cross-field rules.

API:
    load(path: Path | None) -> Config        the embedded default when path is None
    with_role(cfg, role) -> Config           `run --role`: cluster.role replaced, validated
    Config, and one frozen dataclass per TOML table (ingress.core.schema, re-exported here)
    ConfigError(file, key, message)           raised for anything invalid; str() names all three
    read_credentials(path) -> (user, password)    relay.auth_file (ValueError: unreadable,
                                              group/world-readable, or not "user:password")
    parse_listen_address, format_listen_address   ingress.core.listen's (re-exported)
    cores()                                   ingress.core.derived's (re-exported)

The module split: ingress.core.schema declares every key (default, single-field bounds, doc:
ingress.core.fieldspec checks the bounds in one loop), ingress.core.listen fills the listen
address sets, ingress.core.derived computes what follows from a config. This module reads the
file, converts each value to its field's type, and applies the rules that read more than one
key, a file or a parser.

Every value is validated once, here; the rest of the code trusts a Config. Unknown tables and
keys are errors (a typo must not silently fall back to a default). Counts of 0 for acceptors
and workers mean "scale to the cores". Limits: the file is read whole (it is small); paths are
made absolute relative to the working directory at load time, so children started elsewhere
agree.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ingress.core.addr import normalize_domain
from ingress.core.derived import cores, dns_configured
from ingress.core.dnslist_sites import parse_reply_map, parse_site
from ingress.core.downstream import parse_downstream
from ingress.core.fieldspec import ConfigError, Need, check_fields
from ingress.core.fsutil import read_private
from ingress.core.listen import format_listen_address, listen_sets, parse_listen_address
from ingress.core.resolver import parse_nameserver
from ingress.core.schema import (
    DSN_MODES,
    DSN_RATE_MAX,
    FORWARD_CLIENT_MODES,
    LOG_LEVELS,
    RELAY_TLS_MODES,
    SCHED_POLICIES,
    AdmissionConfig,
    ClassifyConfig,
    ClusterConfig,
    Config,
    LaneConfig,
    LanesConfig,
    ListenConfig,
    LogConfig,
    MetricsConfig,
    RelayConfig,
    SmtpConfig,
    SpoolConfig,
    SupervisorConfig,
    TlsConfig,
)
from ingress.core.schema_tiers import TiersConfig

__all__ = [
    "DSN_MODES", "DSN_RATE_MAX", "FORWARD_CLIENT_MODES", "LOG_LEVELS", "REDIS_SCHEMES",
    "RELAY_TLS_MODES", "SCHED_POLICIES", "AdmissionConfig", "ClassifyConfig", "ClusterConfig",
    "Config", "ConfigError", "LaneConfig", "LanesConfig", "ListenConfig", "LogConfig",
    "MetricsConfig", "RelayConfig", "SmtpConfig", "SpoolConfig", "SupervisorConfig",
    "TiersConfig", "TlsConfig", "cores", "format_listen_address", "load",
    "parse_listen_address", "read_credentials", "with_role",
]

REDIS_SCHEMES = ("redis", "rediss", "unix")


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


def with_role(cfg: Config, role: str) -> Config:
    """`run --role`: the config with cluster.role replaced, validated again."""
    return _finish(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, role=role)),
                   cfg.source)


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


def _cidr(c: str) -> Any:
    return ipaddress.ip_network(c, strict=False)


def _domain_name(d: str) -> str:
    """The canonical name (ingress.core.addr.normalize_domain); ValueError if there is none."""
    name = normalize_domain(d) if isinstance(d, str) else ""
    if not name:
        raise ValueError(d)
    return name


# --- the rules that read more than one key, a file or a parser ------------------------------
# (A key's own range or choices stand beside it in ingress.core.schema.)

def _check_listen(cfg: Config, need: Need) -> None:
    lst = cfg.listen
    need(lst.fast_port <= 0 or lst.fast_port != lst.port, "listen.fast_port",
         "must be -1 (off) or 0..65535 and not listen.port")
    need.parses(ipaddress.ip_address, [lst.host], "listen.host", "an IP address")
    need.parses(_cidr, lst.trusted_proxies, "listen.trusted_proxies", "a CIDR")
    need(not lst.proxy_protocol or bool(lst.trusted_proxies), "listen.trusted_proxies",
         "must list the load balancers' addresses when listen.proxy_protocol = true")
    need(not lst.fast_port_proxy_protocol or bool(lst.trusted_proxies), "listen.trusted_proxies",
         "must list the load balancers' addresses when listen.fast_port_proxy_protocol = true")
    need(not lst.fast_port_proxy_protocol or lst.fast_port >= 0 or bool(lst.fast_addresses),
         "listen.fast_port_proxy_protocol", "needs listen.fast_port")


def _check_smtp(cfg: Config, need: Need) -> None:
    s = cfg.smtp
    need(bool(s.hostname) and " " not in s.hostname, "smtp.hostname", "must be a host name")
    need(len(s.accepted_domains) > 0, "smtp.accepted_domains",
         "must list at least one domain (the ingress is never an open relay)")
    for d in s.accepted_domains:
        need(bool(d) and "@" not in d and " " not in d, "smtp.accepted_domains",
             f"{d!r} is not a domain")
    need(s.session_deadline >= s.idle_timeout, "smtp.session_deadline",
         "must be >= smtp.idle_timeout")
    need(s.ack_timeout < s.idle_timeout, "smtp.ack_timeout",
         "must be > 0 and shorter than smtp.idle_timeout (a client waits this long after its "
         "end of data; no idle timer runs meanwhile)")
    need(s.max_connections == 0 or s.fast_reserve < s.max_connections,
         "smtp.fast_reserve", "must be >= 0 and below smtp.max_connections (0 = a tenth)")
    need(s.soft_error_limit < s.hard_error_limit, "smtp.hard_error_limit",
         "must be above smtp.soft_error_limit and at most 1000")
    need(s.error_sleep <= s.error_sleep_max, "smtp.error_sleep_max",
         "must be >= smtp.error_sleep and at most 60 seconds")
    need(not s.verify_recipients or cfg.relay.downstream.startswith("smtp://"),
         "smtp.verify_recipients", "needs an smtp://host:port relay.downstream to ask")
    need(not s.verify_recipients or s.verify_timeout < min(
         s.idle_timeout, cfg.admission.stress_idle_timeout) / 2, "smtp.verify_timeout",
         "must be > 0 and below half of smtp.idle_timeout and of "
         "admission.stress_idle_timeout (the callout runs on the idle timer)")
    total, reserve = cfg.data_budget
    need(total - reserve >= s.max_message_size, "smtp.data_fast_reserve",
         f"the bulk share of the DATA budget ({total} - {reserve} bytes) must hold one message "
         f"of smtp.max_message_size ({s.max_message_size})")
    need(not s.recipient_map or os.path.isfile(s.recipient_map), "smtp.recipient_map",
         f"{s.recipient_map!r}: no such file")


def _check_lanes(cfg: Config, need: Need) -> None:
    for lane in ("fast", "bulk"):
        lc: LaneConfig = getattr(cfg.lanes, lane)
        need(lc.queue_bytes == 0 or lc.queue_bytes >= cfg.smtp.max_message_size,
             f"lanes.{lane}.queue_bytes", "must be 0 (derived) or at least smtp.max_message_size")
    need(cfg.lanes.fast.rate == 0, "lanes.fast.rate", "the fast lane is never rate-capped")


def _check_classify(cfg: Config, need: Need) -> None:
    c = cfg.classify
    need.parses(_cidr, c.allow_cidrs, "classify.allow_cidrs", "a CIDR")
    need(c.spf_promote != "listed" or bool(c.spf_domains), "classify.spf_domains",
         'must list domains when classify.spf_promote = "listed"')
    need.parses(_domain_name, c.spf_domains, "classify.spf_domains", "a valid domain name")
    need(c.spf_per_domain <= c.spf_backlog, "classify.spf_per_domain",
         "must be 1..classify.spf_backlog")
    need(c.spf_per_network <= c.spf_backlog, "classify.spf_per_network",
         "must be 1..classify.spf_backlog")
    need(c.dkim_deadline < cfg.smtp.ack_timeout, "classify.dkim_deadline",
         "must be > 0 and below smtp.ack_timeout (it runs before the ack)")
    need.parses(parse_nameserver, c.nameservers, "classify.nameservers")


def _check_admission_and_tiers(cfg: Config, need: Need) -> None:
    a, t = cfg.admission, cfg.tiers
    need(a.greet_pause < cfg.smtp.idle_timeout, "admission.greet_pause",
         "must be >= 0 and below smtp.idle_timeout")
    need(a.retry_ttl > a.retry_min_delay, "admission.retry_ttl",
         "must be greater than admission.retry_min_delay")
    need(a.retry_per_site >= a.retry_per_net, "admission.retry_per_site",
         "must be >= admission.retry_per_net")
    need(t.self_proven_share + t.third_party_share < 1, "tiers.third_party_share",
         "tiers.self_proven_share + tiers.third_party_share must be below 1 (the rest is the "
         "operator tier's floor)")


def _check_dnslists(cfg: Config, need: Need) -> None:
    """[dnswl] and [dnsbl]: each site in postscreen's syntax (ingress.core.dnslist_sites)."""
    for table in ("dnswl", "dnsbl"):
        t = getattr(cfg, table)
        need.parses(parse_site, t.sites, f"{table}.sites")
        need.parses(parse_reply_map, [t.reply_map], f"{table}.reply_map")
        need(t.min_ttl <= t.max_ttl, f"{table}.max_ttl", f"must be >= {table}.min_ttl")
        need(not t.sites or dns_configured(cfg), f"{table}.sites",
             "needs DNS: classify.nameservers (or classify.spf_promote on, with "
             "/etc/resolv.conf); without it no check runs")
    w, b = cfg.dnswl, cfg.dnsbl
    need(not w.trust_levels or w.min_trust in w.trust_levels, "dnswl.min_trust",
         f"must be one of dnswl.trust_levels ({', '.join(w.trust_levels)})")
    need(len(set(w.trust_levels)) == len(w.trust_levels) and len(w.trust_levels) <= 256,
         "dnswl.trust_levels", "must be distinct names, at most 256 (one per octet value)")
    need(b.reject_threshold == 0 or b.reject_threshold >= b.threshold, "dnsbl.reject_threshold",
         "must be 0 (never) or >= dnsbl.threshold")


def _check_tls(cfg: Config, need: Need) -> None:
    t = cfg.tls
    need(bool(t.cert) == bool(t.key), "tls.key", "tls.cert and tls.key go together")
    for key in ("cert", "key", "client_ca"):
        path = getattr(t, key)
        need(not path or os.path.isfile(path), f"tls.{key}", f"{path!r}: no such file")
    need(t.stranger_wait < t.handshake_timeout, "tls.stranger_wait",
         "must be >= 0 and less than tls.handshake_timeout (the handshake needs time too)")
    need(t.stranger_handshake_rate * t.stranger_wait <= 100000, "tls.stranger_wait",
         "the queue (stranger_handshake_rate x stranger_wait) must hold <= 100000")
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


def _check_relay(cfg: Config, need: Need) -> None:
    r = cfg.relay
    need.parses(parse_downstream, [r.downstream] if r.downstream else [], "relay.downstream")
    need(r.retry_base <= r.retry_max, "relay.retry_base", "must be > 0 and <= retry_max")
    need(r.tls == "none" or r.downstream.startswith(("smtp://", "lmtp://")), "relay.tls",
         "TLS needs a TCP downstream (smtp://host:port or lmtp://host:port)")
    need(not r.tls_ca_file or os.path.isfile(r.tls_ca_file), "relay.tls_ca_file",
         f"{r.tls_ca_file!r}: no such file")
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


def _check_outputs_and_supervisor(cfg: Config, need: Need) -> None:
    sup = cfg.supervisor
    m = cfg.metrics.listen
    if m:
        mhost, _, mport = m.rpartition(":")
        need(mport.isdigit() and int(mport) <= 65535 and bool(mhost), "metrics.listen",
             'must be "host:port" or ""')
    need(sup.heartbeat_timeout >= 2 * sup.heartbeat_interval, "supervisor.heartbeat_timeout",
         "must be at least twice supervisor.heartbeat_interval")
    need(sup.restart_backoff_max >= sup.restart_backoff, "supervisor.restart_backoff_max",
         "must be >= supervisor.restart_backoff")


def _check_cluster(cfg: Config, need: Need) -> None:
    c = cfg.cluster
    if c.role == "all":
        return
    from ingress.core import cluster  # here: it brings in zmq (edges and lanes nodes only)
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


def _check_cluster_redis(cfg: Config, need: Need) -> None:
    """[cluster] redis and its timing keys (the Redis part of [cluster])."""
    c = cfg.cluster
    if c.redis:
        u = urlsplit(c.redis)
        need(u.scheme in REDIS_SCHEMES and bool(u.hostname if u.scheme != "unix" else u.path),
             "cluster.redis", 'must be "redis://host:port/db", "rediss://host:port/db", '
             '"unix:///path" or "" (no Redis)')
    need(c.redis_retry >= c.redis_timeout, "cluster.redis_retry",
         "must be >= cluster.redis_timeout")
    need(bool(c.redis_prefix) and c.redis_prefix.isprintable() and " " not in c.redis_prefix
         and len(c.redis_prefix) <= 64, "cluster.redis_prefix",
         "must be 1..64 printable characters without spaces")


def _finish(cfg: Config, file: str) -> Config:
    """Validation (each key's own bounds, then the cross-field rules) and normalisation;
    returns the final frozen Config."""
    check_fields(cfg, file)
    need = Need(file)
    for check in (_check_listen, _check_smtp, _check_lanes, _check_classify,
                  _check_admission_and_tiers, _check_dnslists, _check_tls, _check_relay,
                  _check_outputs_and_supervisor, _check_cluster, _check_cluster_redis):
        check(cfg, need)
    cfg = listen_sets(cfg, need)
    s = cfg.smtp
    spool = SpoolConfig(path=cfg.spool.path.absolute(), state_dir=cfg.spool.state_dir.absolute())
    run_dir = spool.state_dir / "run"
    # ipc:// paths are limited by sockaddr_un (107 bytes).
    need(len(str(run_dir)) + 20 < 107, "spool.state_dir",
         f"{run_dir} is too long for unix socket paths (limit ~85 characters)")
    domains = tuple(d.lower().rstrip(".") for d in s.accepted_domains)
    return dataclasses.replace(cfg, spool=spool, source=file,
                               smtp=dataclasses.replace(s, accepted_domains=domains))
