"""A small authoritative DNS server for tests, built on dnspython (UDP and TCP, loopback).

Purpose
    Serve SPF, DKIM and address records to the code under test through the real network
    path (dnspython resolver -> UDP, TCP fallback on truncation), with no dependency on the
    host's resolver or the internet.

API
    server = DNSServer({"example.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"],
                                         "A": ["127.0.0.1"],
                                         "MX": ["10 mx.example.test."]}})
    server.start()            binds UDP and TCP on the same free 127.0.0.1 port (threads)
    server.address            "127.0.0.1@<port>" (the nameserver spec our resolvers take)
    server.host, server.port
    server.set(name, rdtype, values) / server.remove(name)     change records while running
    server.silent.add(name)   never answer queries for this name (a timeout for the client)
    server.servfail.add(name) answer SERVFAIL for this name
    server.queries            list of (qname, rdtype, "udp"|"tcp") seen, for assertions
    server.stop()             closes sockets and joins the threads (also a context manager)
    python -m tests.kit.dnsserver records.json   runs it in the foreground (prints the port);
                              the file's "$silent" key lists names never answered

Records
    Names are case-insensitive, with or without the trailing dot. Values are zone-file rdata
    text ("10 mx.example.test.", "127.0.0.1"), except TXT/SPF, whose values are the plain
    record strings: each is split into 255-byte character-strings as RFC 1035/7208 require,
    so a 2048-bit DKIM key is one TXT record of several strings. Unknown names get NXDOMAIN;
    a known name without the asked type gets NOERROR/no data, with the SOA of a synthetic
    "test." zone in the authority section for negative caching.

Failure modes / limits
    UDP replies larger than 512 bytes (or the client's EDNS payload size) are sent truncated
    (TC=1, no answers) so the client retries over TCP. No zone cuts, no CNAME chasing, no
    DNSSEC, no wildcards. Test use only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Records = Mapping[str, Mapping[str, Iterable[str]]]


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".") + "."


def _txt_chunks(value: str | bytes) -> list[bytes]:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]


class DNSServer:
    def __init__(self, records: Records | None = None, host: str = "127.0.0.1", ttl: int = 60):
        self.host = host
        self.port = 0
        self.ttl = ttl
        self._lock = threading.Lock()
        self._zone: dict[str, dict[int, list[dns.rdata.Rdata]]] = {}
        self.silent: set[str] = set()
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        for name, rrs in (records or {}).items():
            for rdtype, values in rrs.items():
                self.set(name, rdtype, values)

    # ------------------------------------------------------------------ records

    def set(self, name: str, rdtype: str, values: Iterable[str | bytes]) -> None:
        t = dns.rdatatype.from_text(rdtype)
        rdatas: list[dns.rdata.Rdata] = []
        for v in values:
            if t in (dns.rdatatype.TXT, dns.rdatatype.SPF):
                cls = dns.rdata.get_rdata_class(dns.rdataclass.IN, t)
                rdatas.append(cls(dns.rdataclass.IN, t, _txt_chunks(v)))
            else:
                rdatas.append(dns.rdata.from_text(dns.rdataclass.IN, t, str(v)))
        with self._lock:
            self._zone.setdefault(_norm(name), {})[t] = rdatas

    def remove(self, name: str) -> None:
        with self._lock:
            self._zone.pop(_norm(name), None)

    @property
    def address(self) -> str:
        return f"{self.host}@{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> DNSServer:
        last: OSError | None = None
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError as e:  # TCP port taken: try another
                last = e
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        else:
            raise RuntimeError(f"no free port for UDP+TCP: {last}")
        self._udp.settimeout(0.1)
        self._tcp.settimeout(0.1)
        for target in (self._serve_udp, self._serve_tcp):
            th = threading.Thread(target=target, name=f"dnsserver-{target.__name__}", daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for th in self._threads:
            th.join(timeout=2)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        self._threads.clear()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving

    def _answer(self, wire: bytes, proto: str) -> tuple[dns.message.Message | None, int]:
        """(response or None for no reply, the client's UDP size limit)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None, 512
        limit = max(512, query.payload) if query.edns >= 0 else 512
        resp = self._respond(query, proto)
        return resp, limit

    def _respond(self, query: dns.message.Message, proto: str) -> dns.message.Message | None:
        if not query.question:
            return None
        q = query.question[0]
        qname = q.name.to_text().lower()
        self.queries.append((qname.rstrip("."), dns.rdatatype.to_text(q.rdtype), proto))
        if qname in self.silent or qname.rstrip(".") in self.silent:
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if qname in self.servfail or qname.rstrip(".") in self.servfail:
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp
        with self._lock:
            node = self._zone.get(qname)
            rdatas = list(node.get(q.rdtype, [])) if node is not None else []
        if node is None:
            resp.set_rcode(dns.rcode.NXDOMAIN)
            resp.authority.append(self._soa())
        elif not rdatas:
            resp.authority.append(self._soa())
        else:
            rrset = dns.rrset.RRset(q.name, dns.rdataclass.IN, q.rdtype)
            for rd in rdatas:
                rrset.add(rd, self.ttl)
            resp.answer.append(rrset)
        return resp

    def _soa(self) -> dns.rrset.RRset:
        return dns.rrset.from_text(
            "test.", self.ttl, "IN", "SOA", "ns.test. hostmaster.test. 1 3600 600 86400 5"
        )

    def _serve_udp(self) -> None:
        assert self._udp is not None
        while not self._stopping.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            resp, limit = self._answer(wire, "udp")
            if resp is None:
                continue
            try:
                out = resp.to_wire(max_size=limit)
            except dns.exception.TooBig:
                resp.answer.clear()
                resp.authority.clear()
                resp.additional.clear()
                resp.flags |= dns.flags.TC
                out = resp.to_wire()
            with contextlib.suppress(OSError):
                self._udp.sendto(out, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._tcp.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        with conn:
            while not self._stopping.is_set():
                try:
                    head = self._recv_exact(conn, 2)
                    if head is None:
                        return
                    wire = self._recv_exact(conn, int.from_bytes(head, "big"))
                    if wire is None:
                        return
                except OSError:
                    return
                resp, _ = self._answer(wire, "tcp")
                if resp is None:
                    continue
                out = resp.to_wire()
                try:
                    conn.sendall(len(out).to_bytes(2, "big") + out)
                except OSError:
                    return

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf


def main(argv: list[str]) -> int:
    """python -m tests.kit.dnsserver records.json: serve until interrupted; prints the port."""
    with open(argv[1], encoding="utf-8") as f:
        records = json.load(f)
    silent = records.pop("$silent", [])   # names never answered (a dead nameserver)
    server = DNSServer(records)
    server.silent.update(silent)
    server.start()
    print(server.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
