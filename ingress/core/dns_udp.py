"""A lean DNS-over-UDP transport for the evidence checks' client (ingress.core.dns_client):
a few long-lived sockets instead of one per query.

Why
    dnspython's asyncio resolver opens a datagram endpoint per query and runs its whole
    resolution machinery: measured ~0.8 ms of CPU per query on the dev VM, so two DNS lists
    cost an acceptor ~2 ms for every new client, which a botnet's new addresses turn into a
    busy loop (bench: 20,000 silent bots). Here a query is one datagram on a socket that is
    already open and one parse (dnspython's message codec: names and records are parsed by
    the library, never by hand): two lists cost ~0.85 ms per new client, list logic included
    (measured: 300 clients, the test DNS server in another process).

API
    UdpTransport(servers, *, sockets=4, reuse=256)
        servers: [(ip, port), ...] tried in turn, one per query (rotated)
        await .query(name, qtype, timeout) -> Reply | None
            None: no usable answer within `timeout` (a timeout); a Reply otherwise
        .close()
    Reply(rcode, records, ttl, truncated)
        rcode: dns.rcode value; records: the answer's records for (name, qtype) as text (an
        address, a name in lower case without the final dot, a TXT record's strings joined;
        at most MAX_RECORDS), CNAMEs followed inside the response (dnspython's
        resolve_chaining); ttl: their TTL;
        truncated: TC set (the caller asks again over TCP with the full resolver)
    servers_of(resolver) -> [(ip, port), ...]   the nameservers a dnspython resolver uses
    text_of(rdata) -> str     a dnspython record as Reply.records has it (the TCP path's too)

Spoofing (an off-path attacker who wants a DNSWL listing or a PTR for his bots): a reply is
taken only from the server the query went to, with the query's ID, and a question section equal
to the query's (name, type, class; compared byte for byte, case folded, before it is parsed:
a reply that does not match is dropped and the query keeps waiting for the real one, until its
deadline); each socket has a kernel-chosen random source port and is replaced after `reuse`
queries (so the port is not fixed for long), IDs are random (secrets), and a query's ID is
unique among the socket's pending ones. As with any stub resolver, the path to the resolver
must be trusted: run it on the host (127.0.0.1).

Failure modes: never raises for network trouble or a malformed reply (None, or the reply is
dropped); OSError from opening a socket becomes None. Limits: `sockets` sockets open per
address family (and retired ones until their pending queries end), at most 65536 pending
queries per socket (IDs), replies of at most 65535 bytes.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

__all__ = ["MAX_RECORDS", "Reply", "UdpTransport", "servers_of", "text_of"]

MAX_RECORDS = 32            # records of one answer handed on (a list has one or two)


@dataclass(frozen=True, slots=True)
class Reply:
    rcode: int
    records: tuple[str, ...] = ()
    ttl: int = 0
    truncated: bool = False


def servers_of(resolver: dns.resolver.Resolver) -> list[tuple[str, int]]:
    out = []
    for ns in resolver.nameservers:
        if isinstance(ns, str):
            out.append((ns, int(resolver.port)))
        elif isinstance(ns, dns.nameserver.Do53Nameserver):
            out.append((str(ns.address), int(ns.port)))
    return out


class _Socket(asyncio.DatagramProtocol):
    """One UDP socket and its pending queries (ID -> (server, question, future))."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        # ID -> (the server asked, the query's question section in wire form, its future)
        self.pending: dict[int, tuple[tuple[str, int], bytes, asyncio.Future[bytes]]] = {}
        self.used = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) < 12:
            return
        hit = self.pending.get(int.from_bytes(data[:2], "big"))
        if hit is None:
            return
        server, question, fut = hit
        if (str(addr[0]), int(addr[1])) == server and not fut.done() \
                and data[12:12 + len(question)].lower() == question:
            fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        pass                    # an ICMP error: the query times out

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class UdpTransport:
    def __init__(self, servers: list[tuple[str, int]], *, sockets: int = 4,
                 reuse: int = 256) -> None:
        self.servers = servers
        self.reuse = max(1, reuse)
        self.size = max(1, sockets)
        # per address family, `size` slots of sockets; a slot is refilled by one query at a
        # time (the others that find it empty wait for that socket: never one socket per
        # query of a burst, which would leak descriptors)
        self._slots: dict[int, list[_Socket | None]] = {}
        self._filling: dict[tuple[int, int], asyncio.Future[_Socket | None]] = {}
        self._next = 0
        self._server = 0

    async def _socket(self, family: int) -> _Socket | None:
        slots = self._slots.setdefault(family, [None] * self.size)
        i = self._next = (self._next + 1) % self.size
        sock = slots[i]
        if sock is not None and (sock.transport is None or sock.used >= self.reuse
                                 or sock.loop is not asyncio.get_running_loop()):
            self._retire(sock)
            sock = slots[i] = None
        if sock is not None:
            return sock
        filling = self._filling.get((family, i))
        if filling is not None and filling.get_loop() is asyncio.get_running_loop():
            return await asyncio.shield(filling)
        fut: asyncio.Future[_Socket | None] = asyncio.get_running_loop().create_future()
        self._filling[(family, i)] = fut
        proto: _Socket | None = None
        try:
            _t, proto = await asyncio.get_running_loop().create_datagram_endpoint(
                _Socket, family=family, local_addr=("::" if family == 10 else "0.0.0.0", 0))
            slots[i] = proto
        except OSError:
            pass
        finally:        # whatever happened (the filler cancelled too), its waiters are answered
            self._filling.pop((family, i), None)
            if not fut.done():
                fut.set_result(proto)
        return proto

    @staticmethod
    def _retire(sock: _Socket) -> None:
        """No new queries; closed once its pending ones end (at their deadlines at most), or
        at once when its event loop is not the running one (it cannot serve this one)."""
        if sock.transport is not None and (
                not sock.pending or sock.loop is not asyncio.get_running_loop()):
            if not sock.loop.is_closed():
                sock.transport.close()
            sock.transport = None

    async def query(self, name: str, qtype: str, timeout: float) -> Reply | None:
        if not self.servers:
            return None
        server = self.servers[self._server % len(self.servers)]
        self._server += 1
        question = _question(name, qtype)
        if question is None:          # a name or type the lean path does not write
            try:
                question = dns.message.make_query(name, qtype).to_wire()[12:]
            except (dns.exception.DNSException, ValueError):
                return Reply(dns.rcode.FORMERR)
        sock = await self._socket(10 if ":" in server[0] else 2)
        if sock is None or sock.transport is None:
            return None
        qid = secrets.randbelow(65536)
        while qid in sock.pending:
            qid = secrets.randbelow(65536)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        sock.pending[qid] = (server, question.lower(), fut)
        sock.used += 1
        try:
            sock.transport.sendto(qid.to_bytes(2, "big") + _HEADER + question, server)
            async with asyncio.timeout(timeout):
                data = await fut
        except (TimeoutError, OSError):
            return None
        finally:
            sock.pending.pop(qid, None)
            if sock.used >= self.reuse:
                self._retire(sock)
        reply = _lean(data, 12 + len(question), int.from_bytes(question[-4:-2], "big"))
        return _parse(data) if reply is _SLOW else reply

    def close(self) -> None:
        for slots in self._slots.values():
            for sock in slots:
                if sock is not None and sock.transport is not None:
                    sock.transport.close()
        self._slots = {}


_HEADER = b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"  # after the ID: RD, one question
_QTYPES = {"A": 1, "AAAA": 28, "TXT": 16, "PTR": 12, "MX": 15}
_SLOW = Reply(-1)           # _lean's "ask dnspython's parser"


def _question(name: str, qtype: str) -> bytes | None:
    """The question section for (name, qtype, IN), or None for what the lean path does not
    write (a type not in _QTYPES, a name that is not plain ASCII labels of 1..63 bytes)."""
    code = _QTYPES.get(qtype.upper())
    name = name.rstrip(".")
    if code is None or not name or len(name) > 253 or not name.isascii():
        return None
    labels = name.encode("ascii").split(b".")
    if any(not 0 < len(label) < 64 for label in labels):
        return None
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00" \
        + code.to_bytes(2, "big") + b"\x00\x01"


def _lean(data: bytes, qend: int, qcode: int) -> Reply | None:
    """The reply in `data` (its question already matched: _Socket) read without building
    message objects, for the common shapes: a negative answer, or A / AAAA / TXT records
    owned by the question's name (a compression pointer to it). _SLOW for anything else (a
    CNAME, another owner, PTR and MX, more than one question); None when it is malformed."""
    if len(data) < qend or not data[2] & 0x80:
        return None
    rcode = data[3] & 0x0F
    if data[2] & 0x02:
        return Reply(rcode, truncated=True)
    if int.from_bytes(data[4:6], "big") != 1:
        return _SLOW
    count = int.from_bytes(data[6:8], "big")
    if rcode != 0 or count == 0:
        return Reply(rcode)
    if qcode not in (1, 28, 16):
        return _SLOW
    return _records(data, qend, count, qcode, rcode)


def _records(data: bytes, pos: int, count: int, qcode: int, rcode: int) -> Reply | None:
    """_lean's answer section: `count` records from `pos`."""
    records: list[str] = []
    ttl = 2**31 - 1
    for _ in range(count):
        if pos + 12 > len(data):
            return None
        if data[pos:pos + 2] != b"\xc0\x0c":
            return _SLOW                    # owned by another name: dnspython judges it
        rtype, rclass, rttl, rdlen = struct.unpack_from("!HHIH", data, pos + 2)
        rdata = data[pos + 12:pos + 12 + rdlen]
        pos += 12 + rdlen
        if len(rdata) != rdlen:
            return None
        if rtype == 5:
            return _SLOW                    # a CNAME: dnspython follows it
        if rtype != qcode or rclass != 1:
            continue
        text = _rdata_text(qcode, rdata)
        if text is None:
            return None
        ttl = min(ttl, rttl if rttl < 2**31 else 0)     # RFC 2181 8: a "negative" TTL is 0
        if len(records) < MAX_RECORDS:
            records.append(text)
    return Reply(rcode, tuple(records), ttl if records else 0)


def _rdata_text(qcode: int, rdata: bytes) -> str | None:
    if qcode == 1:
        return socket.inet_ntop(socket.AF_INET, rdata) if len(rdata) == 4 else None
    if qcode == 28:
        return socket.inet_ntop(socket.AF_INET6, rdata) if len(rdata) == 16 else None
    parts, i = [], 0                        # TXT: length-prefixed character-strings
    while i < len(rdata):
        n = rdata[i]
        if i + 1 + n > len(rdata):
            return None
        parts.append(rdata[i + 1:i + 1 + n])
        i += 1 + n
    return b"".join(parts).decode("utf-8", "replace")


def text_of(rdata: Any) -> str:
    """One dnspython record as text: an address, a target name, or a TXT's strings joined."""
    strings = getattr(rdata, "strings", None)
    if strings is not None:
        return b"".join(strings).decode("utf-8", "replace")
    for attr in ("address", "target", "exchange"):
        value = getattr(rdata, attr, None)
        if value is not None:
            return value if isinstance(value, str) else \
                value.to_text(omit_final_dot=True).lower()
    return str(rdata.to_text())


def _parse(data: bytes) -> Reply | None:
    """The reply in `data` by dnspython's parser (its question already matched), or None when
    it is not one (malformed)."""
    try:
        r = dns.message.from_wire(data, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, EOFError):
        return None
    if not isinstance(r, dns.message.QueryMessage) or not r.flags & dns.flags.QR:
        return None
    if r.flags & dns.flags.TC:
        return Reply(r.rcode(), truncated=True)
    try:
        chain = r.resolve_chaining() if r.rcode() == dns.rcode.NOERROR else None
    except dns.exception.DNSException:
        return None
    if chain is None or chain.answer is None:
        return Reply(r.rcode())
    rrset = chain.answer
    if rrset.rdclass != dns.rdataclass.IN:
        return Reply(r.rcode())
    return Reply(r.rcode(), tuple(text_of(x) for x in list(rrset)[:MAX_RECORDS]),
                 int(chain.minimum_ttl))
