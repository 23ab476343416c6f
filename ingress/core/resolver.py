"""One DNS resolver factory for SPF (acceptors) and DKIM (workers): cached, with deadlines,
pointable at any nameserver (the tests' server on loopback).

API:
    parse_nameserver(spec) -> (ip, port)   "ip", "ip:port" (IPv4), "[v6]:port", "ip@port"
    make_resolver(nameservers, timeout, cache_size=10000) -> dns.resolver.Resolver
        An empty list means the system's /etc/resolv.conf. `timeout` bounds each query
        (resolver.timeout and resolver.lifetime). The cache is dns.resolver.LRUCache
        (thread-safe, honours TTLs, caches negative answers); the resolver is not modified
        afterwards, so one instance may be shared by threads.
    async_twin(resolver) -> dns.asyncresolver.Resolver
        The asyncio resolver with the same nameservers, timeouts and cache (the one LRUCache
        object: an answer one of them got serves the other). Made once per resolver (held in
        a WeakKeyDictionary). SPF (ingress.edge.evidence.check_spf) queries through it, on the
        event loop, so no DNS wait holds a thread; it works under uvloop.

Failure modes: ValueError for a nameserver that is not an IP literal or has a bad port, or a
timeout that is not > 0.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import weakref
from collections.abc import Iterable

import dns.asyncresolver
import dns.nameserver

# dnspython imports a record type's module at its first answer; those of the types we ask for
# (SPF's and DKIM's TXT, SPF's A, AAAA and MX, FCrDNS's PTR) are imported with this module,
# at a process's set-up.
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver


def parse_nameserver(spec: str) -> tuple[str, int]:
    """ "ip", "ip:port" (IPv4), "[ipv6]:port", "ip@port" -> (ip, port). Raises ValueError."""
    s = spec.strip()
    port = 53
    host = s
    if "@" in s:
        host, _, p = s.rpartition("@")
        port = int(p)
    elif s.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", s)
        if not m:
            raise ValueError(f"invalid nameserver {spec!r}")
        host = m.group(1)
        port = int(m.group(2)) if m.group(2) else 53
    elif s.count(":") == 1:  # IPv4 with port (a bare IPv6 address has >= 2 colons)
        host, _, p = s.partition(":")
        port = int(p)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"nameserver must be an IP address (optionally with port): {spec!r}"
        ) from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid nameserver port in {spec!r}")
    return host, port


def make_resolver(
    nameservers: Iterable[str], timeout: float, cache_size: int = 10000
) -> dns.resolver.Resolver:
    """A dnspython resolver with an LRU cache, bounded timeouts and the given nameservers."""
    if not timeout > 0:
        raise ValueError("resolver timeout must be > 0")
    specs = list(nameservers)
    if specs:
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(s)) for s in specs]
    else:
        res = dns.resolver.Resolver(configure=True)
    res.timeout = timeout
    res.lifetime = timeout
    res.retry_servfail = False
    res.cache = dns.resolver.LRUCache(cache_size)
    return res


_twins: weakref.WeakKeyDictionary[dns.resolver.Resolver, dns.asyncresolver.Resolver] = \
    weakref.WeakKeyDictionary()
_twins_lock = threading.Lock()


def async_twin(resolver: dns.resolver.Resolver) -> dns.asyncresolver.Resolver:
    """The asyncio resolver that asks what `resolver` asks, with its deadlines and its cache."""
    with _twins_lock:
        twin = _twins.get(resolver)
        if twin is None:
            twin = dns.asyncresolver.Resolver(configure=False)
            twin.nameservers = list(resolver.nameservers)
            twin.timeout = resolver.timeout
            twin.lifetime = resolver.lifetime
            twin.retry_servfail = resolver.retry_servfail
            twin.cache = resolver.cache
            _twins[resolver] = twin
        return twin
