"""Addresses the acceptors have learned to steer to the fast acceptors (a DNS allow list's
listing: dnswl.steer; and, in a table of its own, the client addresses the mTLS acceptors
verified: ingress.edge.mtls), shared with the supervisor, which puts them into the kernel's steering
programs beside the operator's networks (ingress.core.reuseport, ingress.tools.listeners).

A DNS-allow-listed client is promoted at connect, but only once a port-25 acceptor has accepted
it; under a flood it first waits in port 25's accept queue behind every bot's connection. Once
its listing is known, its next connections go straight to a fast acceptor's socket, as an
allow-listed network's do.

API
    SteerTable.create(ctx, regions, per_region) -> SteerTable   the supervisor, before any
                                 child starts (ctx: a multiprocessing context); .array is what
                                 a child gets (with its region, its child slot)
    SteerTable(array, regions, per_region)   the same memory, in a child
        .add(region, ip, until)  one writer per region (the child of that slot): `ip` steered
                                 until `until` (time.monotonic(): one clock for every process
                                 on Linux); the same address is refreshed in place; a full
                                 region drops the entry that ends first
        .clear(region)           every entry of the region ended (its new writer's start)
        .generation() -> int     changes whenever any region was written
        .live(now, room) -> {4: [addr, ...], 6: [...]}   the addresses still steered, at most
                                 `room` per family, those that end last first

Layout: per region one generation word, then per_region entries of three unsigned 64-bit words
(the address as IPv6, IPv4 mapped into ::ffff:0:0/96, high and low halves; the end in ms). A
writer zeroes the end first and writes it last; a reader keeps an entry only when its end reads
the same before and after the address (a torn entry is skipped for one pass).
Failure modes: add ignores what is not an IP address. Limits: regions x per_region entries
(the supervisor's bound: dnswl.steer_max per acceptor slot); the kernel's program holds fewer
(reuseport.MAX_NETWORKS per family, the operator's networks first).
"""

from __future__ import annotations

import ipaddress
from typing import Any

_MAPPED = 0xFFFF << 32
_WORDS = 3


def _split(ip: str) -> tuple[int, int] | None:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return None
    n = int(a) | _MAPPED if a.version == 4 else int(a)
    return n >> 64, n & 0xFFFFFFFFFFFFFFFF


def _join(hi: int, lo: int) -> tuple[int, str]:
    n = (hi << 64) | lo
    if hi == 0 and (lo >> 32) == 0xFFFF:
        return 4, str(ipaddress.IPv4Address(lo & 0xFFFFFFFF))
    return 6, str(ipaddress.IPv6Address(n))


class SteerTable:
    def __init__(self, array: Any, regions: int, per_region: int) -> None:
        self.array, self.regions, self.per_region = array, regions, per_region
        self.stride = 1 + per_region * _WORDS

    @classmethod
    def create(cls, ctx: Any, regions: int, per_region: int) -> SteerTable:
        return cls(ctx.RawArray("Q", regions * (1 + per_region * _WORDS)), regions, per_region)

    def add(self, region: int, ip: str, until: float) -> None:
        parts = _split(ip)
        if parts is None or not 0 <= region < self.regions or self.per_region <= 0:
            return
        a, base = self.array, region * self.stride
        end = max(1, int(until * 1000))
        slot, first_end = -1, None
        for i in range(self.per_region):
            at = base + 1 + i * _WORDS
            if a[at] == parts[0] and a[at + 1] == parts[1] and a[at + 2]:
                slot = i
                break
            if first_end is None or a[at + 2] < first_end:
                slot, first_end = i, a[at + 2]
        at = base + 1 + slot * _WORDS
        a[at + 2] = 0
        a[at], a[at + 1] = parts
        a[at + 2] = end
        a[base] = (a[base] + 1) & 0xFFFFFFFFFFFFFFFF

    def clear(self, region: int) -> None:
        """Every entry of `region` ended (a new writer starts it afresh)."""
        if not 0 <= region < self.regions:
            return
        a, base = self.array, region * self.stride
        for i in range(self.per_region):
            a[base + 1 + i * _WORDS + 2] = 0
        a[base] = (a[base] + 1) & 0xFFFFFFFFFFFFFFFF

    def generation(self) -> int:
        return sum(self.array[r * self.stride] for r in range(self.regions))

    def live(self, now: float, room: int) -> dict[int, list[str]]:
        a, now_ms = self.array, int(now * 1000)
        ends: dict[tuple[int, str], int] = {}
        for r in range(self.regions):
            base = r * self.stride
            for i in range(self.per_region):
                at = base + 1 + i * _WORDS
                end = a[at + 2]
                if end <= now_ms:
                    continue
                hi, lo = a[at], a[at + 1]
                if a[at + 2] != end:
                    continue                    # written meanwhile: next pass
                key = _join(hi, lo)
                ends[key] = max(end, ends.get(key, 0))
        out: dict[int, list[str]] = {4: [], 6: []}
        for (family, ip), _end in sorted(ends.items(), key=lambda kv: -kv[1]):
            if len(out[family]) < room:
                out[family].append(ip)
        return out
