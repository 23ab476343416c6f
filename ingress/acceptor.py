"""Acceptor process: holds TCP connections on a listening socket and runs the SMTP dialogue.

API:
    run(cfg, index, sock, hb, slot)   process entry point; `sock` is the listening socket the
                                      supervisor bound for this acceptor slot (SO_REUSEPORT)
    AcceptorContext                   per-process state shared by all sessions (smtp.py uses it)
    LaneClient                        DEALER to one lane broker: submit() -> (Reply | None, why)

The event loop (uvloop) never blocks: no DNS, no disk, no CPU-heavy work here. Every wait has a
deadline: the ack wait is smtp.ack_timeout; a broker that is down fails the send at once
(IMMEDIATE) and the session gets 451. Lane status (saturation) arrives over SUB; status older than
STATUS_STALE is ignored, so a dead broker never makes us shed mail on old news.

SIGUSR2 from the supervisor, or SIGTERM (drain): stop accepting (the listening socket itself stays
open in the supervisor, so nothing queued on it is reset), close idle sessions with 421 4.3.2, let
sessions inside DATA finish, and after smtp.drain_grace close whatever is left with 421. Then exit
0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import resource
import signal
import socket
import ssl
import time
from collections import Counter
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ingress import log, replies
from ingress.config import Config
from ingress.smtp import IngressHandler, IngressSMTP
from ingress.wire import (
    STATUS_STALE,
    Envelope,
    Lane,
    NackReason,
    Reply,
    WireError,
    decode_reply,
    decode_status,
    submit,
)

HANDOFF_RETRY = 1.5     # seconds to keep trying to reach a broker that is not connected


class LaneClient:
    """One DEALER to a lane broker, with the futures of messages waiting for their ack."""

    def __init__(self, ctx: zmq.asyncio.Context, cfg: Config, lane: Lane, ident: str) -> None:
        self.lane = lane
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, f"{ident}-{lane.value}".encode())
        s.setsockopt(zmq.IMMEDIATE, 1)     # no peer: fail the send now, never queue blindly
        s.setsockopt(zmq.SNDHWM, 200)
        s.setsockopt(zmq.RCVHWM, 2000)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.connect(cfg.ipc(f"{lane.value}-front"))
        self.sock = s
        self.pending: dict[str, asyncio.Future[Reply]] = {}
        self.status: dict[str, Any] = {}
        self.status_at = 0.0

    async def submit(self, env: Envelope, body: bytes, timeout: float) -> tuple[Reply | None, str]:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[env.qid] = fut
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            frames = submit(env, body)
            while True:      # no broker connected (e.g. restarting): retry the hand-off briefly
                try:
                    await self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    if loop.time() - start > min(HANDOFF_RETRY, timeout / 2):
                        return None, "lane unavailable"
                    await asyncio.sleep(0.05)
            try:
                reply = await asyncio.wait_for(fut, timeout - (loop.time() - start))
            except TimeoutError:
                return None, "ack timeout"
            return reply, "" if reply.ok else (reply.reason or "nack")
        finally:
            self.pending.pop(env.qid, None)

    async def read_replies(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                reply = decode_reply(frames)
            except WireError as e:
                log.event("wire_error", "warning", lane=self.lane.value, error=str(e))
                continue
            fut = self.pending.get(reply.qid)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def watch_broker(self) -> None:
        """A broker that dies takes the messages it held with it: answer their sessions now
        (451) instead of at the ack deadline. Some may still be spooled by a worker that had
        them; a client retry then makes a duplicate, never a loss (README: duplicates)."""
        mon = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        while True:
            await recv_monitor_message(mon)
            lost = [f for f in self.pending.values() if not f.done()]
            for fut in lost:
                fut.set_result(Reply(qid="", ok=False, reason=NackReason.WORKER_LOST,
                                     text="broker lost"))
            log.event("broker_disconnected", "warning", lane=self.lane.value, failed=len(lost))

    def saturated(self) -> bool:
        fresh = time.monotonic() - self.status_at < STATUS_STALE
        return fresh and bool(self.status.get("saturated"))


class AcceptorContext:
    def __init__(self, cfg: Config, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg, self.index, self.loop = cfg, index, loop
        self.ident = f"a{index}-{os.getpid()}"
        self.domains = frozenset(cfg.smtp.accepted_domains)
        self.allow = cfg.allow_networks
        self.tls_context: ssl.SSLContext | None = None
        self.handler = IngressHandler(self)
        self.sessions: set[IngressSMTP] = set()
        self.per_lane: Counter[Lane] = Counter()
        self.counters: Counter[str] = Counter()
        self.draining = False
        self.zctx = zmq.asyncio.Context()
        self.lanes = {lane: LaneClient(self.zctx, cfg, lane, self.ident) for lane in Lane}

    # --- policy hooks used by smtp.py ---------------------------------------------------------

    def classify_connect(self, ip: str) -> Lane:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return Lane.BULK
        return Lane.FAST if any(addr in net for net in self.allow) else Lane.BULK

    def admit(self, proto: IngressSMTP) -> str | None:
        """Slots: the fast lane may use any of max_connections; bulk never the fast reserve."""
        s = self.cfg.smtp
        if self.draining:
            return replies.SHUTTING_DOWN.format(host=s.hostname)
        full = len(self.sessions) >= s.max_connections
        if not full and proto.lane is Lane.BULK:
            full = self.per_lane[Lane.BULK] >= s.max_connections - s.fast_reserve
        if full:
            return replies.TOO_MANY_CONNECTIONS.format(host=s.hostname)
        self.sessions.add(proto)
        self.per_lane[proto.lane] += 1
        return None

    def release(self, proto: IngressSMTP) -> None:
        self.sessions.discard(proto)
        self.per_lane[proto.lane] -= 1

    def lane_saturated(self, lane: Lane) -> bool:
        return lane is Lane.BULK and self.lanes[lane].saturated()

    async def submit(self, env: Envelope, body: bytes) -> tuple[Reply | None, str]:
        return await self.lanes[env.lane].submit(env, body, self.cfg.smtp.ack_timeout)

    def count(self, what: str, lane: Lane) -> None:
        self.counters[f"{what}_{lane.value}"] += 1

    # --- background tasks ---------------------------------------------------------------------

    async def read_status(self) -> None:
        sub = self.zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 10)
        sub.setsockopt(zmq.SUBSCRIBE, b"status")
        for lane in Lane:
            sub.connect(self.cfg.ipc(f"{lane.value}-status"))
        while True:
            frames = await sub.recv_multipart()
            try:
                doc = decode_status(frames)
                lc = self.lanes[Lane(str(doc["lane"]))]
            except (WireError, KeyError, ValueError) as e:
                log.event("wire_error", "warning", side="status", error=str(e))
                continue
            lc.status, lc.status_at = doc, time.monotonic()

    async def heartbeat(self, hb: Any, slot: int, stop: asyncio.Event) -> None:
        parent = os.getppid()
        while True:
            if hb is not None:
                hb[slot] = time.monotonic()
            if os.getppid() != parent:
                log.event("orphaned", "warning", why="supervisor gone")
                stop.set()
            await asyncio.sleep(self.cfg.supervisor.heartbeat_interval / 2)

    async def drain(self, server: asyncio.AbstractServer) -> None:
        self.draining = True
        server.close()
        line = replies.SHUTTING_DOWN.format(host=self.cfg.smtp.hostname)
        deadline = time.monotonic() + self.cfg.smtp.drain_grace
        while self.sessions and time.monotonic() < deadline:
            for proto in list(self.sessions):
                proto.close_if_idle(line)
            await asyncio.sleep(0.05)
        for proto in list(self.sessions):
            if proto.transport is not None:
                proto.transport.write(line.encode() + b"\r\n")
                proto.transport.close()
        await asyncio.sleep(0.05)
        log.event("acceptor_drained", left=len(self.sessions), **self.counters)


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn if `needed` cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft < needed:
        log.event("nofile_too_low", "error", limit=soft, needed=needed,
                  hint="raise LimitNOFILE / ulimit -n, or lower smtp.max_connections")
    return soft


async def serve(cfg: Config, index: int, sock: socket.socket, hb: Any, slot: int) -> None:
    loop = asyncio.get_running_loop()
    ctx = AcceptorContext(cfg, index, loop)
    raise_nofile(cfg.smtp.max_connections + 64)
    sock.setblocking(False)
    server = await loop.create_server(lambda: IngressSMTP(ctx), sock=sock)
    stop = asyncio.Event()
    # SIGUSR2 is the supervisor's order; SIGTERM (e.g. sent to the whole process group) drains
    # too. ^C in a terminal reaches every process: only the supervisor acts on it.
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for sig in (signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda: None)
    tasks = [loop.create_task(t) for t in (
        ctx.heartbeat(hb, slot, stop), ctx.read_status(),
        *(lc.read_replies() for lc in ctx.lanes.values()),
        *(lc.watch_broker() for lc in ctx.lanes.values()))]
    log.event("acceptor_start", index=index, fd=sock.fileno())
    await stop.wait()
    await ctx.drain(server)
    for t in tasks:
        t.cancel()
    ctx.zctx.destroy(linger=0)


def run(cfg: Config, index: int, sock: socket.socket, hb: Any = None, slot: int = 0) -> None:
    log.setup(cfg.log.level, f"acceptor-{index}")
    try:
        import uvloop
        uvloop.run(serve(cfg, index, sock, hb, slot))
    except ImportError:     # pragma: no cover - uvloop is a hard dependency; keep serving anyway
        asyncio.run(serve(cfg, index, sock, hb, slot))
