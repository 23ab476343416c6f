"""Fast-acceptor hand-off: connections classified fast at connect leave the shared acceptors.

Purpose
    The acceptors on port 25 serve everyone: silent bots, spam being shed, bulk DATA. A client
    known at connect (static allow list, learned allow cache) would share their event loops
    and wait behind their work. So, as Postfix's postscreen hands a client it has judged to an
    smtpd process, an acceptor that classifies a new connection fast passes the socket itself
    (SCM_RIGHTS over a unix datagram socket) to a *fast acceptor*: a process with no listening
    socket of its own, which serves only what it is handed. The accept queue, the kernel
    socket and the client's bytes are untouched: the fast acceptor writes the banner.

    Only the operator and third-party trust tiers are handed over (ingress.policy.tiers
    .hands_off): self-proven clients (learned entries), which anyone can mint, are served on
    port 25's acceptors and never share the fast acceptors' event loops.

    A fast acceptor that cannot admit a connection (its slots full even after it took an
    idle lower-tier session's room, or it is draining) does not refuse it: it hands it back
    to the acceptor it came from (the sender's socket is bound to its path in run/ for that,
    return_endpoint; it takes connections back only from the fast acceptors' own socket
    paths), which serves it where it arrived and never hands it off again.

API
    endpoint(cfg, index) -> str        the unix socket path of fast acceptor `index`
    return_endpoint(cfg, index) -> str where port-25 acceptor `index` takes connections back
    Sender(cfg, loop=None, returned=None, index=None)   in every port-25 acceptor (`index`:
                                       bound at return_endpoint, else an abstract address)
        .offer(transport) -> bool      True: the connection is the fast acceptor's now (the
                                       caller closes its own copy without writing anything);
                                       False: serve it here (no fast acceptor configured, or
                                       none is up or has room: never a refusal)
                                       a connection handed back is given to returned(sock)
                                       (which serves it here); needs `loop`
        .close()
    Receiver(cfg, index, loop, serve)  in a fast acceptor: every socket handed over is given
                                       to serve(sock, sender) (which builds the SMTP session on
                                       it; `sender`: the address to give it back to, or None)
        .give_back(transport, sender) -> bool   True: `sender` has it now (the caller closes
                                       its own copy without writing anything)
        .give_back_any(transport) -> bool       the same, to any port-25 acceptor
                                       (return_endpoint; a connection nobody handed here)
        .close()

Failure modes
    Every send is non-blocking: a fast acceptor that is down (ECONNREFUSED / ENOENT), busy
    (EAGAIN: its datagram queue is full) or gone mid-send leaves the connection where it is;
    the sender tries each fast acceptor at most once per connection (round robin) and then
    serves it itself. A give-back that cannot be sent (the sender restarted meanwhile) leaves
    the connection with the fast acceptor, which then refuses it (421) as before. A
    connection the kernel steered to a fast acceptor (listen.steer_operator) that it cannot
    admit is given to a port-25 acceptor, whose path it knows (return_endpoint, in run/);
    none takes it: 421. A fast
    acceptor that is restarted re-binds its path (the old file is unlinked); one that stops
    unlinks its path only while the file is still its own (a reload binds the successor's
    first). A datagram that
    carries no descriptor, or more than one, is ignored (extra descriptors are closed).

Limits
    Only plain listeners hand off (not the mutual-TLS port, whose TLS state lives in this
    process, nor a PROXY-protocol listener, whose header has been read here). Late evidence
    (SPF at MAIL FROM) promotes a session where it is: an aiosmtpd session cannot move.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any

from ingress.core import log
from ingress.core.config import Config

MAGIC = b"si-handoff-1"       # the datagram's payload (a version, for a later change)
RETURN = b"si-handback-1"     # a connection given back by a fast acceptor
ANY = "any port-25 acceptor"  # hand_back_to of a steered connection (give_back_any)


def endpoint(cfg: Config, index: int) -> str:
    return str(cfg.spool.state_dir / "run" / f"fast-acceptor-{index}.sock")


def return_endpoint(cfg: Config, index: int) -> str:
    """Where port-25 acceptor `index` takes connections back (a path in the state dir's run/,
    which only the service can reach: never an abstract address another user could take)."""
    return str(cfg.spool.state_dir / "run" / f"acceptor-{index}.sock")


def _bind_path(sock: socket.socket, path: str) -> int:
    """Bind `sock` to `path`, a stale file of a previous process (or the one a process being
    replaced still holds) removed first; the inode of the file made, which is ours alone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock.bind(path)
    return os.stat(path).st_ino


def _recv_one(sock: socket.socket) -> tuple[bytes, socket.socket | None, Any] | None:
    """One datagram with its descriptor: (payload, the socket or None, the sender's address);
    None when nothing is waiting. A datagram without exactly one descriptor yields None for
    the socket (its descriptors are closed)."""
    try:
        msg, fds, _flags, addr = socket.recv_fds(sock, 64, 4)
    except BlockingIOError:
        return None
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return msg, None, addr
    conn = socket.socket(fileno=fds[0])
    conn.setblocking(False)
    return msg, conn, addr


def _drain(sock: socket.socket, payload: bytes, allowed: Callable[[Any], bool],
           serve: Callable[[socket.socket, Any], Any]) -> None:
    """Every datagram waiting on `sock` (at most 256, then the loop runs and the reader fires
    again): one carrying exactly one descriptor, `payload` and a sender `allowed` is served;
    anything else is logged and dropped (its descriptors closed)."""
    for _ in range(256):
        try:
            got = _recv_one(sock)
        except OSError as e:
            log.event("handoff_recv_failed", "warning", error=str(e))
            return
        if got is None:
            return
        msg, conn, addr = got
        if conn is None or msg != payload or not allowed(addr):
            if conn is not None:
                conn.close()
            log.event("handoff_ignored", "warning", size=len(msg), sender=str(addr)[:120])
            continue
        serve(conn, addr)


def _send_fd(sock: socket.socket, payload: bytes, fd: int, to: Any) -> None:
    sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                 0, to)


class Sender:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop | None = None,
                 returned: Callable[[socket.socket], Any] | None = None,
                 index: int | None = None) -> None:
        self.paths = [endpoint(cfg, i) for i in range(cfg.supervisor.fast_acceptors)]
        self.sock: socket.socket | None = None
        self.loop, self.returned = loop, returned
        if self.paths:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
            if loop is not None and returned is not None:
                # an address of its own, so that a fast acceptor can give a connection back:
                # port-25 acceptor `index`'s path (return_endpoint: a fast acceptor finds it
                # for the clients the kernel steered to it, which nobody handed over), else an
                # abstract one (Linux autobind)
                if index is None:
                    self.sock.bind("")
                else:
                    _bind_path(self.sock, return_endpoint(cfg, index))
                loop.add_reader(self.sock.fileno(), self._readable)
        self.next = 0
        self.failed_logged = False

    def _readable(self) -> None:
        assert self.sock is not None and self.returned is not None
        returned = self.returned
        # Only from a fast acceptor: its socket's path is in the state directory, and the
        # kernel fills in a datagram's source address (an abstract address, which anyone on
        # the host could send to, is ours, not theirs).
        _drain(self.sock, RETURN, lambda addr: addr in self.paths,
               lambda conn, _addr: returned(conn))

    def offer(self, transport: asyncio.BaseTransport) -> bool:
        if self.sock is None:
            return False
        raw = transport.get_extra_info("socket")
        if raw is None:
            return False
        fd = raw.fileno()
        for _ in range(len(self.paths)):
            path = self.paths[self.next]
            self.next = (self.next + 1) % len(self.paths)
            try:
                _send_fd(self.sock, MAGIC, fd, path)
            except OSError as e:          # down, restarting, or its queue is full
                if not self.failed_logged:
                    self.failed_logged = True
                    log.event("handoff_failed", "warning", path=path, error=str(e),
                              why="served by this acceptor instead (logged once)")
                continue
            self.failed_logged = False
            return True
        return False

    def close(self) -> None:
        if self.sock is not None:
            if self.loop is not None and self.returned is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class Receiver:
    def __init__(self, cfg: Config, index: int, loop: asyncio.AbstractEventLoop,
                 serve: Callable[[socket.socket, Any], Any]) -> None:
        self.path = endpoint(cfg, index)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.inode = _bind_path(self.sock, self.path)
        self.returns = [return_endpoint(cfg, i) for i in range(cfg.acceptor_count)]
        self.next_return = index
        # room for a burst of hand-offs (each datagram is tiny)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setblocking(False)
        self.loop, self.serve = loop, serve
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        # any sender (a port-25 acceptor; an unbound one, which cannot take a connection
        # back, has no address)
        _drain(self.sock, MAGIC, lambda _addr: True,
               lambda conn, addr: self.serve(conn, addr or None))

    def give_back_any(self, transport: asyncio.BaseTransport) -> bool:
        """A connection nobody handed here (steered by the kernel) that this fast acceptor
        cannot admit: to a port-25 acceptor (return_endpoint), each tried once in turn;
        False when none takes it (down, restarting, its queue full)."""
        for _ in range(len(self.returns)):
            path = self.returns[self.next_return % len(self.returns)]
            self.next_return += 1
            if self.give_back(transport, path):
                return True
        return False

    def give_back(self, transport: asyncio.BaseTransport, sender: Any) -> bool:
        raw = transport.get_extra_info("socket")
        if raw is None or not sender:
            return False
        try:
            _send_fd(self.sock, RETURN, raw.fileno(), sender)
        except OSError as e:      # the sender restarted (its address is gone), or is full
            log.event("handback_failed", "warning", error=str(e))
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        # Only our own file: on a reload the successor bound this path (a new file) before we
        # stop, and unlinking its file would fail every hand-off to it with ENOENT.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
