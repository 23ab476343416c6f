"""The supervisor's listening sockets: bound once, kept across restarts and reloads of the
acceptors that serve them, and the kernel's steering of the operator's clients among them.

API:
    Listeners()                         the sockets of one supervisor (none until bind)
        .bind(cfg) -> Config            every listen set's sockets, one set per acceptor slot;
                                        the config with the addresses as bound (port 0 -> the
                                        real port)
        .sockets / .mtls_sockets / .fast_sockets / .steered_sockets
                                        per acceptor slot, one socket per address
        .set_steering(cfg, on)          attach the steering programs for `on` (the fast
                                        acceptors all up) when that changed
        .steer_known(cfg, on, known)    the same for the mutual-TLS port: the client addresses
                                        the mTLS acceptors verified (`known`, per family) when
                                        those or `on` changed; .mtls_steered_sockets per fast
                                        slot
        .steering                       what the programs attached do (None: unknown; a reload
                                        sets it so, and the next watch re-attaches them)
        .close()                        close every listening socket (the drain's end)
    bind_listener(cfg, host, port, first=False) -> socket   one SO_REUSEPORT listener
    bind_addresses(cfg, addresses, count) -> (sets, addresses as bound)
    bind_error_message(address, errno, strerror) -> str     why a bind failed, for the operator
    with_bound(cfg, main, fast, mtls) -> Config, listen_sets(cfg) -> (main, fast, mtls)
    steer_networks(cfg, host, learned) -> networks the kernel steers to the fast acceptors there
    address_networks(addresses, version, room) -> a steer table's addresses as networks

The supervisor binds one SO_REUSEPORT listening socket per listen address (listen.addresses,
listen.fast_addresses, tls.mtls_addresses: e.g. "0.0.0.0:25" and "[::]:25", the IPv6 one
V6ONLY) per acceptor slot and hands that slot's sockets to its acceptor, which serves them all.
A replacement acceptor (restart, reload) gets the same sockets. Because a socket outlives its
acceptor, restarting or replacing an acceptor never closes a listening socket, so connections
waiting in its backlog are never reset (plain SO_REUSEPORT would reset them unless
net.ipv4.tcp_migrate_req=1). The mutual-TLS and fast ports get one set per fast acceptor
when there are any (per mTLS acceptor for the mutual-TLS port with supervisor.mtls_acceptors).
listen.steer_operator: one more socket per fast acceptor in each port-25 address's group whose
family has allow-list networks, and a program (ingress.core.reuseport) that steers the
operator's networks to them while every fast acceptor is up. With mTLS acceptors (the same
key: derived.steer_known), one more socket per fast acceptor in each mutual-TLS address's
group, and a program that sends the client addresses the mTLS acceptors verified lately (the
supervisor's known-address table, ingress.core.steer_table) to the fast acceptors, every other
client to the mTLS acceptors: a certificate sender, once verified, is served by a process that
does no strangers' handshakes and never queues behind theirs in one accept queue.

Failure modes: a listener that cannot be bound stops the start with one line naming the cause
from the errno (BindError, bind_error_message: in use, by anyone, even another smtp-ingress of
the same user; a port below 1024 without CAP_NET_BIND_SERVICE; an address this host does not
have). Where the kernel refuses a steering program, its sockets are closed and port 25 is
served as without steering (steer_unavailable in the log); more networks of a family than one
program holds steer none (steer_too_many).
Limits: port 0 (tests) on several addresses picks one port free on all within PORT_PICK_TRIES
attempts; the sockets' backlog is listen.backlog.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
from collections.abc import Mapping

from ingress.core import derived, log, reuseport
from ingress.core.config import Config, format_listen_address, parse_listen_address


class BindError(OSError):
    """A listening socket that cannot be bound: str() is the message for the operator (the
    errno is kept in .errno)."""

    def __str__(self) -> str:
        return self.strerror or ""


def bind_error_message(address: str, errno_: int | None, strerror: str | None = None) -> str:
    """Why `address` ("v4:port" / "[v6]:port") cannot be bound, from the errno: in use, a
    privileged port without the capability, an address this host does not have."""
    if errno_ == errno.EADDRINUSE:
        return f"{address} is already in use (another smtp-ingress or MTA?)"
    if errno_ in (errno.EACCES, errno.EPERM):
        return (f"{address}: permission denied: a port below 1024 needs the capability "
                "CAP_NET_BIND_SERVICE (AmbientCapabilities= in the systemd unit) or root; "
                "or listen on a port >= 1024")
    if errno_ == errno.EADDRNOTAVAIL:
        return (f"{address}: the address is not on this host (no interface has it: check "
                "listen.host / listen.addresses and `ip addr`)")
    if errno_ == errno.EAFNOSUPPORT:
        return f"{address}: this host has no IPv6 (or IPv4) support for that address"
    return f"{address}: cannot bind: {strerror or 'error'}" + \
        (f" (errno {errno_})" if errno_ else "")


def bind_failure(host: str, port: int, e: OSError) -> BindError:
    return BindError(e.errno, bind_error_message(format_listen_address(host, port), e.errno,
                                                 e.strerror))


def port_taken(family: int, host: str, port: int) -> OSError | None:
    """SO_REUSEPORT would let a second instance (same user) share a port with the first, the
    kernel splitting the clients between two spools. A plain bind tells whether anyone
    listens there already: None when free, else the bind's error (EADDRINUSE, or EACCES,
    EADDRNOTAVAIL, ...: the real cause, for the message)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e
    return None


def bind_listener(cfg: Config, host: str, port: int, first: bool = False) -> socket.socket:
    """One SO_REUSEPORT listening socket on host:port; `first` refuses a port someone already
    listens on. An IPv6 socket is V6ONLY, so "0.0.0.0" and "[::]" on one port coexist (and a
    v4 client is never seen as ::ffff:a.b.c.d). BindError (naming the cause) when it fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if first and port:
        taken = port_taken(family, host, port)
        if taken is not None:
            raise bind_failure(host, port, taken)
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise bind_failure(host, port, e) from None
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(cfg.listen.backlog)
    except OSError as e:
        s.close()
        raise bind_failure(host, port, e) from None
    return s


def steer_networks(cfg: Config, host: str, learned: Mapping[int, list[str]] | None = None
                   ) -> list[reuseport.Network]:
    """classify.allow_cidrs of the family of listen address `host`, then the addresses the
    acceptors learned (dnswl.steer: ingress.core.steer_table), as many as one program holds
    (what the kernel steers to the fast acceptors there: listen.steer_operator)."""
    version = 6 if ":" in host else 4
    nets: list[reuseport.Network] = [n for n in cfg.allow_networks if n.version == version]
    return nets + address_networks(learned, version, reuseport.MAX_NETWORKS - len(nets))


def address_networks(addresses: Mapping[int, list[str]] | None, version: int,
                     room: int) -> list[reuseport.Network]:
    """The first `room` addresses of family `version` (a steer table's live ones, per
    family) as host networks, for a steering program."""
    return [ipaddress.ip_network(a) for a in (addresses or {}).get(version, [])[:max(0, room)]]


PORT_PICK_TRIES = 20     # port 0 on several addresses: attempts to find one port free on all


def bind_addresses(cfg: Config, addresses: tuple[str, ...], count: int
                   ) -> tuple[list[list[socket.socket]], tuple[str, ...]]:
    """`count` sets (one per acceptor slot) of one SO_REUSEPORT socket per address, and the
    addresses as bound. Port 0 (tests): the addresses with port 0 share one free port (the
    first picks it; if another address has it taken, all are closed and a new one is tried)."""
    for attempt in range(PORT_PICK_TRIES):
        firsts: list[socket.socket] = []
        bound: list[str] = []
        shared = 0
        try:
            for a in addresses:
                host, port = parse_listen_address(a)
                pick = port == 0
                s = bind_listener(cfg, host, shared if pick else port, first=True)
                firsts.append(s)
                if pick and not shared:
                    shared = s.getsockname()[1]
                bound.append(format_listen_address(host, s.getsockname()[1]))
        except OSError:
            for s in firsts:
                s.close()
            if shared and attempt + 1 < PORT_PICK_TRIES:
                continue                 # the picked port is taken on another address
            raise
        break
    slots = [firsts]
    for _ in range(count - 1):
        slots.append([bind_listener(cfg, *parse_listen_address(a)) for a in bound])
    return slots, tuple(bound)


def with_bound(cfg: Config, main: tuple[str, ...], fast: tuple[str, ...],
               mtls: tuple[str, ...]) -> Config:
    """The config with its listen sets replaced by the addresses as bound (port 0 -> the real
    port); listen.host/port, listen.fast_port, tls.mtls_port mirror each set's first entry."""
    host, port = parse_listen_address(main[0])
    return dataclasses.replace(
        cfg,
        listen=dataclasses.replace(
            cfg.listen, addresses=main, host=host, port=port, fast_addresses=fast,
            fast_port=parse_listen_address(fast[0])[1] if fast else -1),
        tls=dataclasses.replace(
            cfg.tls, mtls_addresses=mtls,
            mtls_port=parse_listen_address(mtls[0])[1] if mtls else -1))


def listen_sets(cfg: Config) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    return cfg.listen.addresses, cfg.listen.fast_addresses, cfg.tls.mtls_addresses

class Listeners:
    def __init__(self) -> None:
        # Per acceptor slot, one socket per listen address (listen.addresses, ...).
        self.sockets: list[list[socket.socket]] = []
        self.mtls_sockets: list[list[socket.socket]] = []
        self.fast_sockets: list[list[socket.socket]] = []
        # Per fast acceptor slot, its own socket in port 25's groups that the kernel steers the
        # operator's networks to (ingress.core.reuseport), for the addresses in self.steered.
        self.steered_sockets: list[list[socket.socket]] = []
        self.steered: list[int] = []      # indexes into the listen addresses
        self.steering: bool | None = None  # the programs attached send the operator's
                                           # networks to the fast acceptors (None: unknown)
        self.learned: dict[int, list[str]] = {}   # and these addresses (dnswl.steer)
        # Per fast acceptor slot, its own socket in each mutual-TLS address's group, which the
        # kernel steers the client addresses the mTLS acceptors verified to (steer_known).
        self.mtls_steered_sockets: list[list[socket.socket]] = []
        self.known: dict[int, list[str]] = {}         # the addresses steered there now
        self.known_on: bool | None = None             # ... while on (None: not attached yet)

    def bind(self, cfg: Config) -> Config:
        """Bind every listen set of `cfg`; the config with the addresses as bound."""
        # Port 0 (tests): the first socket of an address picks a free port, the others share it.
        main, fast, mtls = listen_sets(cfg)
        n = cfg.acceptor_count
        self.sockets, main = bind_addresses(cfg, main, n)
        # the mTLS and fast ports are served by the fast acceptors when there are any (_target)
        nf = cfg.supervisor.fast_acceptors or n
        if mtls:
            self.mtls_sockets, mtls = bind_addresses(
                cfg, mtls, cfg.mtls_acceptor_count or nf)
        if fast:
            self.fast_sockets, fast = bind_addresses(cfg, fast, nf)
        cfg = with_bound(cfg, main, fast, mtls)
        self._bind_steered(cfg, main)
        self._bind_mtls_steered(cfg)
        return cfg

    def _bind_mtls_steered(self, cfg: Config) -> None:
        """derived.steer_known: one more socket per fast acceptor in each mutual-TLS address's
        group, where the kernel sends nobody until steer_known attaches a program that names
        verified addresses. Where the kernel refuses a program, no steering on that port."""
        nf, nm = cfg.supervisor.fast_acceptors, cfg.mtls_acceptor_count
        if not derived.steer_known(cfg) or not self.mtls_sockets:
            return
        per_slot: list[list[socket.socket]] = [[] for _ in range(nf)]
        try:
            for j, addr in enumerate(cfg.tls.mtls_addresses):
                extra = [bind_listener(cfg, *parse_listen_address(addr)) for _ in range(nf)]
                for slot, sock in zip(per_slot, extra, strict=True):
                    slot.append(sock)
                prog = reuseport.program((), nm, nf)
                assert prog is not None
                reuseport.attach(self.mtls_sockets[0][j], prog)
        except OSError as e:
            for sock in (s for slot in per_slot for s in slot):
                sock.close()
            log.event("steer_unavailable", "warning", port="mtls", error=str(e))
            return
        self.mtls_steered_sockets = per_slot
        log.event("steer_known", addresses=cfg.tls.mtls_addresses, fast_acceptors=nf)

    def steer_known(self, cfg: Config, on: bool, known: Mapping[int, list[str]]) -> None:
        """Steer the client addresses the mTLS acceptors verified (`known`, per family: the
        supervisor's known-address table) to the fast acceptors (`on`: every one of them is
        up), when those or `on` changed."""
        known = dict(known) if on else {}
        if (on, known) == (self.known_on, self.known):
            return
        # (set before the attempt: a failure is logged once, and tried at the next change)
        self.known_on, self.known = on, known
        nf, nm = cfg.supervisor.fast_acceptors, cfg.mtls_acceptor_count
        try:
            for sock in self.mtls_sockets[0]:
                version = 6 if sock.family == socket.AF_INET6 else 4
                nets = address_networks(known, version, reuseport.MAX_NETWORKS)
                prog = reuseport.program(nets, nm, nf)
                assert prog is not None
                reuseport.attach(sock, prog)
        except OSError as e:
            log.event("steer_unavailable", "warning", port="mtls", error=str(e))
            return
        log.event("steering_known", on=on, ipv4=len(known.get(4, [])),
                  ipv6=len(known.get(6, [])))

    def _bind_steered(self, cfg: Config, main: tuple[str, ...]) -> None:
        """listen.steer_operator: one more socket per fast acceptor in each port-25 address's
        group whose family has allow-list networks, and the program that steers them there.
        Where the kernel refuses it, those sockets are closed (they leave the group: the
        others keep their indexes) and port 25 is served as without steering."""
        nf = cfg.supervisor.fast_acceptors
        if not cfg.listen.steer_operator or nf <= 0 or cfg.listen.proxy_protocol:
            return
        per_slot: list[list[socket.socket]] = [[] for _ in range(nf)]
        for j, addr in enumerate(main):
            host, port = parse_listen_address(addr)
            if not steer_networks(cfg, host) and not derived.steer_listed(cfg):
                continue
            extra = [bind_listener(cfg, host, port) for _ in range(nf)]
            try:
                self._steer(j, cfg, on=False)    # on once the fast acceptors are up (set_steering)
            except OSError as e:
                for sock in extra:
                    sock.close()
                log.event("steer_unavailable", "warning", address=addr, error=str(e))
                continue
            self.steered.append(j)
            for slot, sock in zip(per_slot, extra, strict=True):
                slot.append(sock)
        if self.steered:
            self.steered_sockets = per_slot
            log.event("steer_operator", addresses=[main[j] for j in self.steered],
                      fast_acceptors=nf, networks=len(cfg.classify.allow_cidrs))

    def _steer(self, j: int, cfg: Config, on: bool) -> None:
        """(Re)attach the program of listen address `j`'s group for `cfg`'s allow list and the
        learned addresses; `on` False: every client to the port-25 acceptors (then the
        operator's are handed over as without steering). More networks of its family than one
        program holds steer none."""
        sock = self.sockets[0][j]
        nets = steer_networks(cfg, sock.getsockname()[0], self.learned) if on else []
        prog = reuseport.program(nets, cfg.acceptor_count, cfg.supervisor.fast_acceptors)
        if prog is None:           # too many networks for one program
            log.event("steer_too_many", "warning", networks=len(nets),
                      max=reuseport.MAX_NETWORKS)
            prog = reuseport.program((), cfg.acceptor_count, cfg.supervisor.fast_acceptors)
        assert prog is not None
        reuseport.attach(sock, prog)


    def set_steering(self, cfg: Config, on: bool,
                     learned: Mapping[int, list[str]] | None = None) -> None:
        """Steer the operator's networks and the `learned` addresses to the fast acceptors
        (`on`: every one of them is up) or to the port-25 acceptors, when that is not what the
        programs attached already do."""
        learned = dict(learned or {})
        changed = learned != self.learned
        if on == self.steering and (not on or not changed):
            return
        self.learned = learned
        try:
            for j in self.steered:
                self._steer(j, cfg, on)
        except OSError as e:
            log.event("steer_unavailable", "warning", error=str(e))
            return
        if on != self.steering:
            log.event("steering", on=on)
        self.steering = on
        if changed:
            log.event("steer_learned", ipv4=len(learned.get(4, [])),
                      ipv6=len(learned.get(6, [])))

    def close(self) -> None:
        for slot in (self.sockets + self.mtls_sockets + self.fast_sockets
                     + self.mtls_steered_sockets):
            for s in slot:
                s.close()
