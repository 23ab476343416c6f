"""PROXY protocol (v1 and v2): which client address to believe behind a load balancer.

Purpose: on a listener configured for the PROXY protocol, an L4 load balancer (HAProxy,
nginx stream, AWS NLB, ...) opens the TCP connection and prefixes the stream with a PROXY header
that names the real client. What runs (ingress/edge/smtp.py, IngressSMTP._proxy_header, in place of
aiosmtpd's own PROXY handling: aiosmtpd's proxy_protocol_timeout and handle_PROXY hook are not
used): the TCP peer is checked with `peer_trusted()` before anything is read (an untrusted
peer is closed at once), the header is read with aiosmtpd's `get_proxy()` with the
idle timer set to PROXY_TIMEOUT, and `proxy_peer()` decides, as a pure function, what that
header is worth. The answer is the address classification and admission see; only then does
the session start (greet pause, banner).

API:
    trusted_networks(cidrs) -> tuple[network, ...]   parse CIDR strings once (ValueError if bad)
    proxy_peer(peer, proxy_data, trusted) -> (ip, port) | None
        peer        the TCP peer (ip, port) as the socket sees it (the load balancer)
        proxy_data  aiosmtpd's ProxyData (or anything with the same attributes)
        trusted     networks from trusted_networks(); a peer outside them is never believed
      returns
        (client_ip, client_port)   PROXY command, TCP over IPv4/IPv6, from a trusted peer
        peer (normalised)          LOCAL command (v2: the balancer's own health check), or an
                                   UNKNOWN (v1) / UNSPEC (v2) / AF_UNIX / UDP family, from a
                                   trusted peer: the spec says to keep the real connection's
                                   addresses
        None                       reject the connection: the peer is not a trusted proxy (its
                                   header could name any address, e.g. one on the allow list),
                                   or the header is invalid
    peer_trusted(ip, trusted) -> bool   may this TCP peer send a PROXY header at all?
    PROXY_TIMEOUT   seconds the acceptor waits for the whole header

Addresses come back as strings, IPv4-mapped IPv6 (::ffff:a.b.c.d) unwrapped to a.b.c.d, so
"127.0.0.1" behind a dual-stack socket and behind a v4 socket look the same to the allow list
(ingress.core.addr.parse_ip, the one address parser; a zone index is dropped).

Failure modes: none raised; every bad input is None (reject). A missing or malformed header
is a ProxyData with an error: proxy_peer() answers None and the acceptor closes
the connection without a reply, so on a PROXY listener a client that speaks SMTP directly is
dropped: never enable the PROXY protocol on a port that direct
clients also use. A header that does not arrive within PROXY_TIMEOUT ends the connection on
the idle timer.

Limits: no TLV is interpreted (PP2_TYPE_SSL, AUTHORITY, ...); the CRC32C TLV is not checked (the
header comes from a trusted peer over a connection it opened). The trust decision is by TCP peer
address only; an untrusted peer never costs a header read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from ingress.core.addr import Address, try_parse_ip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PROXY_TIMEOUT = 5.0      # seconds for the whole header

# aiosmtpd.proxy_protocol values, repeated so this module stays importable and testable alone.
_CMD_LOCAL = 0
_CMD_PROXY = 1
_AF_INET, _AF_INET6 = 1, 2
_PROTO_STREAM = 1


def trusted_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings -> networks (host bits allowed: "10.0.0.1/8" is 10.0.0.0/8)."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


def _addr(value: Any) -> Address | None:
    return try_parse_ip(value)


def peer_trusted(peer_ip: str | Address, trusted: tuple[Network, ...]) -> bool:
    """Is this TCP peer one of the trusted proxies?"""
    a = _addr(peer_ip)
    return a is not None and any(a in net for net in trusted)


def proxy_peer(peer: tuple[Any, ...] | None, proxy_data: Any,
               trusted: tuple[Network, ...]) -> tuple[str, int] | None:
    """The client address to use for this connection, or None to reject it (see module doc)."""
    tcp_peer = _trusted_tcp_peer(peer, trusted)
    if tcp_peer is None:
        return None
    if proxy_data is None or not bool(getattr(proxy_data, "valid", False)):
        return None
    return _header_source(proxy_data, tcp_peer)


def _trusted_tcp_peer(peer: tuple[Any, ...] | None,
                      trusted: tuple[Network, ...]) -> tuple[str, int] | None:
    """The TCP peer as (address, port) if it is a trusted proxy (port 0 if unreadable), or None."""
    if not peer:
        return None
    real = _addr(peer[0])
    if real is None or not any(real in net for net in trusted):
        return None
    try:
        real_port = int(peer[1])
    except (IndexError, TypeError, ValueError):
        real_port = 0
    return str(real), real_port


def _header_source(proxy_data: Any, tcp_peer: tuple[str, int]) -> tuple[str, int] | None:
    """The client named by a valid PROXY header from a trusted peer: the header's source, the
    TCP peer itself (v2 LOCAL; a family or protocol that names no TCP client), or None."""
    version = getattr(proxy_data, "version", None)
    command = getattr(proxy_data, "command", None)
    if version == 2 and command == _CMD_LOCAL:
        return tcp_peer
    if version == 2 and command != _CMD_PROXY:
        return None
    if version not in (1, 2):
        return None
    family = getattr(proxy_data, "family", None)
    protocol = getattr(proxy_data, "protocol", None)
    if family not in (_AF_INET, _AF_INET6) or protocol != _PROTO_STREAM:
        return tcp_peer                      # UNKNOWN / UNSPEC / AF_UNIX / UDP: keep the peer
    src = _addr(getattr(proxy_data, "src_addr", None))
    port = getattr(proxy_data, "src_port", None)
    if src is None or not isinstance(port, int) or not 0 <= port <= 65535:
        return None
    if family == _AF_INET and src.version != 4:    # (AF_INET6 may carry ::ffff:a.b.c.d)
        return None
    return str(src), port
