"""The benchmark's DNS server: unbound on loopback, serving the bench's records as local data.

Purpose
    An MX asks a local caching resolver (unbound, as DNSBL operators advise) for its DNS lists,
    SPF, DKIM and PTR records. The bench used the test kit's dnspython server
    (tests/kit/dnsserver.py), which answers about 2,000 queries a second on this machine and
    drops the rest: 20,000 new bot addresses in 10 s ask 4,000 a second (two lists each), so a
    flood measured that server instead of the ingress. unbound answers local data in C, tens of
    thousands a second on one thread. The records and their semantics are the test kit's:
    an unknown name is NXDOMAIN, a known name without the asked type is NOERROR with no data,
    a "silent" name is never answered (a query that times out).

API
    available() -> bool                      the unbound binary is installed
    config(records, silent, port, directory) -> str   unbound.conf text (pure)
    start(procs, directory, records, silent, timeout=15.0) -> (addr, Popen)
                                             unbound -d on 127.0.0.1:<free port>, started
                                             and answering; addr is "127.0.0.1@PORT" (the
                                             ingress's nameserver syntax); stopped by PID
                                             with the bench's other processes (Processes)

Records (as tests.kit.dnsserver's): {name: {rdtype: [value, ...]}}; values are zone-file
rdata text, except TXT, whose values are the plain strings (split into 255-byte
character-strings here). Every name's last label (and 127.in-addr.arpa, which unbound serves by
default) is a static local zone, so nothing is ever looked up outside; a silent name is a
zone of its own of type deny (unbound drops the query).

Failure modes: start raises bench.targets' TargetError (via RuntimeError) with the tail of
unbound's log when it does not answer in time; the process is stopped first.
Limits: loopback only, UDP and TCP on one port; no DNSSEC, no wildcards, no CNAME chains.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from tests.kit.procs import Processes

Records = Mapping[str, Mapping[str, Iterable[str]]]
DEFAULT_ZONES = ("127.in-addr.arpa.",)    # unbound's own contents there would win otherwise
TTL = 60


def available() -> bool:
    return shutil.which("unbound") is not None


def _name(name: str) -> str:
    return name.strip().lower().rstrip(".") + "."


def _txt(value: str) -> str:
    raw = value.encode()
    parts = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + p.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'
                    for p in parts)


def config(records: Records, silent: Iterable[str], port: int, directory: Path) -> str:
    """unbound.conf for `records` and the `silent` names on 127.0.0.1:`port` (pure)."""
    zones = set(DEFAULT_ZONES)
    data: list[str] = []
    for name, rrs in records.items():
        n = _name(name)
        zones.add(n.rstrip(".").rsplit(".", 1)[-1] + ".")
        for rdtype, values in rrs.items():
            t = rdtype.upper()
            for v in values:
                rdata = _txt(v) if t in ("TXT", "SPF") else v
                data.append(f"    local-data: '{n} {TTL} IN {t} {rdata}'")
    lines = [
        "server:",
        "    interface: 127.0.0.1",
        f"    port: {port}",
        "    do-ip6: no",
        "    do-daemonize: no",
        '    username: ""',
        '    chroot: ""',
        f'    directory: "{directory}"',
        '    pidfile: ""',
        "    use-syslog: no",
        "    verbosity: 0",
        "    num-threads: 1",
        "    so-rcvbuf: 4m",
        "    access-control: 127.0.0.0/8 allow",
        '    module-config: "iterator"',
        "    local-zone: \"127.in-addr.arpa.\" static",
        *(f'    local-zone: "{z}" static' for z in sorted(zones - set(DEFAULT_ZONES))),
        *(f'    local-zone: "{_name(s)}" deny' for s in sorted(set(silent))),
        *data,
        "remote-control:",
        "    control-enable: no",
        "",
    ]
    return "\n".join(lines)


def _free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 now (unbound binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for UDP and TCP on 127.0.0.1")


def _answers(port: int) -> bool:
    q = dns.message.make_query("ready.probe.invalid.", "A")
    try:
        r = dns.query.udp(q, "127.0.0.1", port=port, timeout=0.2)
    except (OSError, dns.exception.DNSException):
        return False
    return r.rcode() in (dns.rcode.NXDOMAIN, dns.rcode.NOERROR)


def start(procs: Processes, directory: Path, records: Records, silent: Iterable[str],
          timeout: float = 15.0) -> tuple[str, subprocess.Popen[bytes]]:
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = directory / "unbound.conf"
    conf.write_text(config(records, silent, port, directory))
    log = directory / "unbound.log"
    proc = procs.spawn(["unbound", "-d", "-c", str(conf)], log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _answers(port):
            return f"127.0.0.1@{port}", proc
        time.sleep(0.05)
    procs.stop(proc)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"unbound did not answer on 127.0.0.1:{port}: {tail}")
