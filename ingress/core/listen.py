"""Listen addresses: parse them, and fill the three address sets of a config.

API
    parse_listen_address("v4:port" | "[v6]:port") -> (host, port)   ValueError if not one
    format_listen_address(host, port) -> str   the reverse
    listen_sets(cfg, need) -> Config           listen.addresses, listen.fast_addresses and
                                               tls.mtls_addresses filled in and normalised

After listen_sets, the three lists are never empty-when-on (filled from listen.host/port,
listen.fast_port, tls.mtls_port), and those single keys mirror each list's first entry, so
configs written with the single keys keep their meaning.

Failure modes: ConfigError (through `need`, ingress.core.fieldspec.Need) naming the key: an
address that does not parse, one listed twice, two that would take the same connections (a
wildcard beside an address of the same family and port: SO_REUSEPORT would let both bind and
split the clients), or both forms of one listener set at once.
Limits: IP literals only (no names, no zone index); port 0 means a free port picked at start
and is never an overlap.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from ingress.core.fieldspec import ConfigError, Need
from ingress.core.schema import Config, ListenConfig

__all__ = ["format_listen_address", "listen_sets", "parse_listen_address"]


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


def _addresses(need: Need, key: str, given: tuple[str, ...], hosts: list[str],
               port: int) -> tuple[str, ...]:
    """One listener's addresses, normalised: `given` parsed, or `port` on each of `hosts`
    (port < 0: off, empty). Duplicates are errors."""
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


def _check_overlap(need: Need, sets: dict[str, tuple[str, ...]]) -> None:
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


def listen_sets(cfg: Config, need: Need) -> Config:
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
