"""Acceptor process: holds TCP connections on a listening socket and runs the SMTP dialogue.

API:
    run(cfg, index, sock, hb, slot)   process entry point; `sock` is the listening socket the
                                      supervisor bound for this acceptor slot (SO_REUSEPORT)
    AcceptorContext                   per-process state shared by all sessions (smtp.py uses it)
    LaneClient                        DEALER to one lane broker: submit() -> (Reply | None, why)
    MtlsListener                      the mutual-TLS port: a slot is taken at accept, before
                                      the TLS handshake (tls.handshake_timeout)

Memory: the bytes all sessions hold in DATA (until their ack) are bounded by one DataBudget
(smtp.data_memory_budget, with smtp.data_fast_reserve for the fast lane only).

The event loop (uvloop) never blocks: no DNS, no disk, no CPU-heavy work here. Every wait has a
deadline: the ack wait is smtp.ack_timeout; a broker that is down fails the send at once
(IMMEDIATE) and the session gets 451. Lane status (saturation) arrives over SUB; status older than
STATUS_STALE is ignored, so a dead broker never makes us shed mail on old news.

SIGUSR1 from the supervisor (retire after a reload): stop accepting and serve the sessions
already accepted until they end. SIGUSR2 from the supervisor, or SIGTERM (shutdown): stop
accepting (the listening socket itself stays open in the supervisor, so nothing queued on it is
reset), close idle sessions with 421 4.3.2, let sessions inside DATA finish, and after
smtp.drain_grace close whatever is left with 421. Then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import ssl
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ingress import proxy
from ingress.core import log, metrics
from ingress.core.config import Config
from ingress.core.downstream import parse_downstream
from ingress.core.fsutil import atomic_write
from ingress.core.ratelimit import TokenBucket
from ingress.core.wire import (
    LEARN_TOPIC,
    PENALTY_TOPIC,
    SHARED_FACTS,
    STATUS_STALE,
    STATUS_TOPIC,
    Envelope,
    Lane,
    NackReason,
    Reply,
    WireError,
    decode_reply,
    decode_shared,
    decode_status,
    share,
    submit,
)
from ingress.dataread import DataBudget
from ingress.evidence import cert_evidence, check_spf, make_resolver, normalize_fingerprint
from ingress.policy import replies
from ingress.policy.admission import (
    FD_SPARE,
    Admission,
    AdmissionLimits,
    Refusal,
    bulk_share_bucket,
)
from ingress.policy.classify import (
    AuthResult,
    ClassifyPolicy,
    Decision,
    Evidence,
    LearnedAllow,
    StaticAllow,
    decide,
)
from ingress.policy.session_rules import ErrorPolicy
from ingress.rcpt_verify import RecipientVerifier
from ingress.smtp import IngressHandler, IngressSMTP

HANDOFF_RETRY = 1.5          # seconds to keep trying to reach a broker that is not connected
SPF_BACKLOG = 64             # SPF checks waiting per lane before new ones get temperror
SPF_CACHE_TTL = 300.0        # seconds an SPF result for (ip, domain, helo) is reused
SPF_CACHE_SIZE = 10000
LEARNED_SAVE_INTERVAL = 5.0  # seconds between saves of a changed learned allow cache


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
        """The broker cannot take work (queue nearly full, no workers), by fresh news."""
        fresh = time.monotonic() - self.status_at < STATUS_STALE
        return fresh and bool(self.status.get("saturated"))

    def cap_spent(self) -> bool:
        """The broker's rate bucket was empty at its last publication."""
        tokens = self.status.get("tokens")
        fresh = time.monotonic() - self.status_at < STATUS_STALE
        return fresh and isinstance(tokens, int | float) and tokens < 1.0


class AcceptorContext:
    """Everything the sessions of one acceptor process share: policy, admission, lanes, TLS."""

    def __init__(self, cfg: Config, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg, self.index, self.loop = cfg, index, loop
        self.ident = f"a{index}-{os.getpid()}"
        c, a, s = cfg.classify, cfg.admission, cfg.smtp
        self.domains = frozenset(s.accepted_domains)
        self.recipients = load_recipient_map(s.recipient_map) if s.recipient_map else None
        self.static_allow = StaticAllow.from_cidrs(c.allow_cidrs)
        self.trusted_proxies = proxy.trusted_networks(cfg.listen.trusted_proxies)
        self.learned_path = cfg.spool.state_dir / "learned.json"
        self.learned = load_learned(self.learned_path, c.learned_ttl, c.learned_max)
        self.learned_dirty = False
        self.policy = ClassifyPolicy(
            spf_promote=c.spf_promote, spf_domains=frozenset(c.spf_domains),
            cert_promotes=c.cert_promotes, learned_promotes=c.learned_ttl > 0)
        self.admission = Admission(AdmissionLimits(
            max_connections=s.max_connections, fast_reserve=s.fast_reserve,
            per_ip_bulk_max=a.per_ip_bulk_max, per_ip_rate=a.per_ip_rate,
            per_ip_burst=a.per_ip_burst, penalty_s=a.penalty))
        self.pins = frozenset(normalize_fingerprint(f) for f in cfg.tls.pinned_sha256)
        self.resolver = make_resolver(c.nameservers, c.dns_timeout) \
            if c.spf_promote != "off" else None
        # SPF lookups block in pyspf: one small bounded pool per lane, so a flood of bulk
        # lookups never delays the fast lane's.
        self.spf_pools = {lane: ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"spf-{lane}")
                          for lane in Lane}
        self.spf_inflight: Counter[Lane] = Counter()
        self.spf_cache: OrderedDict[tuple[str, str, str], tuple[float, AuthResult, str]] = \
            OrderedDict()
        bulk_share = bulk_share_bucket(cfg)
        self.bulk_bucket = TokenBucket(*bulk_share, now=time.monotonic()) \
            if bulk_share is not None else None
        # Bytes held in DATA by all sessions (smtp.data_memory_budget); bulk never takes the
        # fast lane's part (smtp.data_fast_reserve).
        self.data_budget = DataBudget(*cfg.data_budget)
        self.tls_context = starttls_context(cfg)
        self.mtls_context = mtls_context(cfg)
        self.handler = IngressHandler(self)
        self.smtp_prototypes: dict[bool, tuple[dict[str, Any], tuple[str, ...]]] = {}
        self.sessions: set[IngressSMTP] = set()
        self.error_policy = ErrorPolicy(
            soft_error_limit=s.soft_error_limit, hard_error_limit=s.hard_error_limit,
            # the delay runs on the idle timer: at most half of the shorter idle timeout
            error_sleep=s.error_sleep, error_sleep_max=min(
                s.error_sleep_max, min(s.idle_timeout, a.stress_idle_timeout) / 2),
            junk_command_limit=s.junk_command_limit,
            mail_without_data_limit=s.mail_without_data_limit,
            recipient_overshoot_limit=s.recipient_overshoot_limit)
        self.verifier = verifier(cfg)
        self.silent: OrderedDict[IngressSMTP, float] = OrderedDict()   # bulk, not spoken yet
        self.evictions = TokenBucket(a.evict_rate, max(1.0, a.evict_rate), now=time.monotonic())
        self.counters: Counter[str] = Counter()
        self.draining = False
        self.zctx = zmq.asyncio.Context()
        self.lanes = {lane: LaneClient(self.zctx, cfg, lane, self.ident) for lane in Lane}

    # --- policy hooks used by smtp.py ---------------------------------------------------------

    def connect_evidence(self, ip: str, peercert_der: bytes | None, verified: bool) -> Evidence:
        ev = Evidence(static_allow=self.static_allow.contains(ip),
                      learned_allow=self.learned.contains(ip, time.time()))
        if peercert_der is not None:
            ev = ev.with_cert(cert_evidence(peercert_der, verified, self.pins))
        return ev

    def decide(self, evidence: Evidence) -> Decision:
        return decide(evidence, self.policy)

    def admit(self, proto: IngressSMTP) -> str | None:
        """Slots: the fast lane may use any of max_connections; bulk never the fast reserve,
        and bulk is capped per IP (/64) in count and connection rate."""
        if self.draining:
            return replies.SHUTTING_DOWN.format(host=self.cfg.smtp.hostname)
        now = time.monotonic()
        verdict = self.admission.try_admit(proto.peer_ip, proto.lane, now)
        if not verdict.admitted and verdict.reason is Refusal.SLOTS and self.evict_silent(now):
            verdict = self.admission.try_admit(proto.peer_ip, proto.lane, now)
        if not verdict.admitted:
            self.counters[f"refused_{verdict.reason.value}"] += 1
            proto.refused_why = verdict.reason.value
            return verdict.reply
        proto.ticket = verdict.ticket
        self.sessions.add(proto)
        if proto.lane is Lane.BULK:
            self.silent[proto] = now
        return None

    def evict_silent(self, now: float) -> bool:
        """Slots are full: the bulk session that has been connected longest without saying a
        word, if that is longer than admission.evict_silent_after, makes room (421). A real
        MTA speaks within milliseconds of the banner; a slowloris bot never does. So a flood
        of stalling bots cannot keep unknown (bulk) senders out for good: they get in as the
        stallers rotate, and a session that has started talking is never evicted. Evictions
        are rate-limited (admission.evict_rate): each one makes a bot reconnect, and that
        churn must not cost the fast lane its latency."""
        if not self.silent or self.cfg.admission.evict_rate <= 0:
            return False
        victim, since = next(iter(self.silent.items()))
        if now - since < self.cfg.admission.evict_silent_after or not self.evictions.take(now):
            return False
        self.counters["evicted_silent"] += 1
        metrics.connection(victim.lane, "evicted_silent")
        victim.evict(replies.EVICTED_SILENT.format(host=self.cfg.smtp.hostname))
        return True

    def spoke(self, proto: IngressSMTP) -> None:
        self.silent.pop(proto, None)

    def release(self, proto: IngressSMTP) -> None:
        self.sessions.discard(proto)
        self.silent.pop(proto, None)
        if proto.ticket is not None:
            self.admission.release(proto.ticket)

    def promote(self, proto: IngressSMTP) -> None:
        if proto.ticket is not None:
            self.admission.promote(proto.ticket)
        self.silent.pop(proto, None)      # a fast session is never evicted for being silent
        if proto.admitted and proto.lane is not Lane.FAST:
            metrics.session_close(proto.lane)
            metrics.session_open(Lane.FAST)
        proto.lane = Lane.FAST

    def penalise(self, ip: str) -> None:
        """Here at once, and in every other acceptor through the bulk broker's fan-out."""
        self.admission.penalise(ip, time.monotonic())
        with contextlib.suppress(zmq.ZMQError):
            self.lanes[Lane.BULK].sock.send_multipart(share(PENALTY_TOPIC, ip), zmq.NOBLOCK)

    async def spf(self, proto: IngressSMTP, mail_from: str, helo: str) -> tuple[AuthResult, str]:
        """SPF for (client IP, sender domain, HELO): from a small result cache (a spam run
        repeats itself), else in the lane's thread pool with a deadline. When SPF_BACKLOG
        checks are already waiting (a slow DNS server under a flood), the answer is temperror
        at once: the pool's queue never grows without bound."""
        assert self.resolver is not None
        key = (proto.peer_ip, mail_from.rpartition("@")[2].lower(), helo.lower())
        hit = self.spf_cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            self.spf_cache.move_to_end(key)
            return hit[1], hit[2]
        result, why = await self._spf_lookup(proto, mail_from, helo)
        if result is not AuthResult.TEMPERROR:
            self.spf_cache[key] = (now + SPF_CACHE_TTL, result, why)
            self.spf_cache.move_to_end(key)
            while len(self.spf_cache) > SPF_CACHE_SIZE:
                self.spf_cache.popitem(last=False)
        return result, why

    async def _spf_lookup(self, proto: IngressSMTP, mail_from: str,
                          helo: str) -> tuple[AuthResult, str]:
        assert self.resolver is not None
        if self.spf_inflight[proto.lane] >= SPF_BACKLOG:
            self.counters["spf_backlog"] += 1
            return AuthResult.TEMPERROR, "SPF backlog full"
        self.spf_inflight[proto.lane] += 1
        try:
            return await check_spf(proto.peer_ip, mail_from, helo, resolver=self.resolver,
                                   deadline_s=min(self.cfg.classify.spf_deadline,
                                                  self.cfg.smtp.idle_timeout / 2),
                                   executor=self.spf_pools[proto.lane],
                                   receiver=self.cfg.smtp.hostname)
        finally:
            self.spf_inflight[proto.lane] -= 1

    def lane_saturated(self, lane: Lane) -> bool:
        """Stress: the bulk broker cannot take work, or the bulk cap (ours or the broker's) is
        spent."""
        if lane is not Lane.BULK:
            return False
        if self.bulk_bucket is not None and self.bulk_bucket.tokens(time.monotonic()) < 1.0:
            return True
        return self.lanes[lane].saturated() or self.lanes[lane].cap_spent()

    def bulk_mail_admitted(self) -> bool:
        """May a bulk session start a transaction now? Each acceptor holds a share of the bulk
        cap (BULK_SHARE / acceptors of it) and spends it at MAIL FROM, so the excess is shed
        before DATA without waiting for the broker's news; the broker's own bucket enforces
        the cap exactly after DATA."""
        if self.lanes[Lane.BULK].saturated():
            return False
        return self.bulk_bucket is None or self.bulk_bucket.take(time.monotonic())

    async def submit(self, env: Envelope, body: bytes) -> tuple[Reply | None, str]:
        return await self.lanes[env.lane].submit(env, body, self.cfg.smtp.ack_timeout)

    def count(self, what: str, lane: Lane) -> None:
        self.counters[f"{what}_{lane.value}"] += 1

    def learn(self, ip: str) -> None:
        self.learned.learn(ip, time.time())
        self.learned_dirty = True

    # --- background tasks ---------------------------------------------------------------------

    async def read_status(self) -> None:
        sub = self.zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 10)
        sub.setsockopt(zmq.SUBSCRIBE, STATUS_TOPIC)
        for topic in SHARED_FACTS:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        for lane in Lane:
            sub.connect(self.cfg.ipc(f"{lane.value}-status"))
        while True:
            frames = await sub.recv_multipart()
            if frames and frames[0] in SHARED_FACTS:
                try:
                    fact, ip = decode_shared(frames)
                except WireError as e:
                    log.event("wire_error", "warning", side="fact", error=str(e))
                    continue
                if fact == LEARN_TOPIC:
                    self.learn(ip)
                else:
                    self.admission.penalise(ip, time.monotonic())
                continue
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

    async def persist_learned(self) -> None:
        """Acceptor 0 keeps the learned allow cache on disk (every acceptor learns the same
        entries over pub/sub and reads the file at start), so it survives restarts."""
        while True:
            await asyncio.sleep(LEARNED_SAVE_INTERVAL)
            if self.learned_dirty:
                self.learned_dirty = False
                self.learned.purge(time.time())
                data = self.learned.to_json().encode()
                try:
                    await self.loop.run_in_executor(None, atomic_write, self.learned_path, data)
                except OSError as e:
                    log.event("learned_save_failed", "error", error=str(e))

    async def drain(self, servers: list[Any], retire: bool) -> None:
        """Stop accepting, then let the sessions go.

        retire (a reload: replacement acceptors already serve the same sockets): every session
        this process accepted is served as usual until it ends, up to smtp.drain_grace.
        shutdown: idle sessions are closed with 421 4.3.2 at once and a new transaction gets
        421; a message being received or acknowledged finishes first.
        In both cases what is left after drain_grace gets 421 and is closed."""
        self.draining = not retire
        for server in servers:
            server.close()
        line = replies.SHUTTING_DOWN.format(host=self.cfg.smtp.hostname)
        deadline = time.monotonic() + self.cfg.smtp.drain_grace
        while self.sessions and time.monotonic() < deadline:
            if not retire:
                for proto in list(self.sessions):
                    proto.close_if_idle(line)
            await asyncio.sleep(0.05)
        for proto in list(self.sessions):
            if proto.transport is not None:
                proto.transport.write(line.encode() + b"\r\n")
                proto.transport.close()
        await asyncio.sleep(0.05)
        log.event("acceptor_drained", mode="retire" if retire else "shutdown",
                  left=len(self.sessions), **self.counters)


class MtlsListener:
    """The mutual-TLS port. Connections are accepted here (loop.sock_accept), and each takes a
    slot (IngressSMTP.admit_before_handshake) before its TLS handshake, so handshakes are
    bounded by smtp.max_connections like any session; a refused one is closed at once. Then
    the handshake (loop.connect_accepted_socket, bounded by tls.handshake_timeout) and the SMTP
    session on the TLS transport. (A protocol on a plain listener calling start_tls would race
    uvloop, which starts reading after connection_made: the ClientHello could be lost.)
    close() stops accepting, like asyncio.Server.close()."""

    def __init__(self, ctx: AcceptorContext, sock: socket.socket) -> None:
        self.ctx, self.sock = ctx, sock
        self.task = ctx.loop.create_task(self._accept_loop())

    def close(self) -> None:
        self.task.cancel()

    async def _accept_loop(self) -> None:
        loop = self.ctx.loop
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as e:       # EMFILE, ENFILE, ECONNABORTED ...: no busy loop
                log.event("accept_failed", "warning", port="mtls", error=str(e))
                await asyncio.sleep(0.1)
                continue
            proto = IngressSMTP(self.ctx, implicit_tls=True)
            if not proto.admit_before_handshake(addr):
                conn.close()
                continue
            task = loop.create_task(self._handshake(conn, proto))
            proto.abort_handshake = task.cancel

    async def _handshake(self, conn: socket.socket, proto: IngressSMTP) -> None:
        ctx = self.ctx
        assert ctx.mtls_context is not None
        try:
            await ctx.loop.connect_accepted_socket(
                lambda: proto, conn, ssl=ctx.mtls_context,
                ssl_handshake_timeout=ctx.cfg.tls.handshake_timeout)
        except asyncio.CancelledError:     # evicted, or the acceptor is stopping
            proto.handshake_failed("cancelled")
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            proto.handshake_failed(f"{type(e).__name__}: {e}")
        else:
            proto.abort_handshake = None


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


def load_learned(path: Path, ttl: float, max_size: int) -> LearnedAllow:
    try:
        return LearnedAllow.from_json(path.read_bytes(), ttl=max(ttl, 1.0),
                                      max_size=max_size, now=time.time())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.event("learned_load_failed", "warning", path=str(path), error=str(e))
    return LearnedAllow(ttl=max(ttl, 1.0), max_size=max_size)


def verifier(cfg: Config) -> RecipientVerifier | None:
    """smtp.verify_recipients: callouts to relay.downstream (config validation made sure it is
    smtp://host:port)."""
    s = cfg.smtp
    if not s.verify_recipients:
        return None
    target = parse_downstream(cfg.relay.downstream)
    return RecipientVerifier(
        target.host, target.port, helo=s.hostname, timeout=s.verify_timeout,
        positive_ttl=s.verify_positive_ttl, negative_ttl=s.verify_negative_ttl,
        tempfail_ttl=s.verify_tempfail_ttl, cache_size=s.verify_cache_size,
        concurrency=s.verify_concurrency)


def load_recipient_map(path: str) -> frozenset[str]:
    """One address a line ("user@domain"), or "@domain" for every user of a domain; # comments.
    Read at start (and so at every reload, which replaces the acceptors)."""
    out = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = line.split("#", 1)[0].strip().lower()
            if entry:
                out.add(entry.split()[0])
    return frozenset(out)


def starttls_context(cfg: Config) -> ssl.SSLContext | None:
    """STARTTLS on the public port: no client certificate is requested there (a client that
    presents an untrusted one would fail the handshake under CERT_OPTIONAL)."""
    if not cfg.tls.cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def mtls_context(cfg: Config) -> ssl.SSLContext | None:
    """The mutual-TLS port: implicit TLS, a client certificate required and verified against
    tls.client_ca (a pinned self-signed certificate must be in that bundle too: Python's ssl
    cannot request a certificate without verifying it; config validation requires the bundle)."""
    t = cfg.tls
    if t.mtls_port < 0 or not t.cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(t.cert, t.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if t.client_ca:
        ctx.load_verify_locations(cafile=t.client_ca)
    return ctx


async def serve(cfg: Config, index: int, sock: socket.socket, hb: Any, slot: int,
                mtls_sock: socket.socket | None, fast_sock: socket.socket | None) -> None:
    loop = asyncio.get_running_loop()
    ctx = AcceptorContext(cfg, index, loop)
    raise_nofile(cfg.smtp.max_connections + FD_SPARE)
    sock.setblocking(False)
    lst = cfg.listen
    servers = [await loop.create_server(
        lambda: IngressSMTP(ctx, proxy_protocol=lst.proxy_protocol), sock=sock)]
    if mtls_sock is not None and ctx.mtls_context is not None:
        mtls_sock.setblocking(False)
        servers.append(MtlsListener(ctx, mtls_sock))
    if fast_sock is not None:
        fast_sock.setblocking(False)
        servers.append(await loop.create_server(
            lambda: IngressSMTP(ctx, fast_only=True, proxy_protocol=lst.fast_port_proxy_protocol),
            sock=fast_sock))
    stop = asyncio.Event()
    retire = False

    def retire_now() -> None:      # SIGUSR1: replaced by a reload
        nonlocal retire
        retire = True
        stop.set()

    # SIGUSR2 is the supervisor's order to shut down, SIGUSR1 to retire after a reload; SIGTERM
    # (e.g. sent to the whole process group) shuts down too. ^C in a terminal reaches every
    # process: only the supervisor acts on it.
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, retire_now)
    for sig in (signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda: None)
    tasks = [loop.create_task(t) for t in (
        ctx.heartbeat(hb, slot, stop), ctx.read_status(),
        *(lc.read_replies() for lc in ctx.lanes.values()),
        *(lc.watch_broker() for lc in ctx.lanes.values()))]
    if index == 0:
        tasks.append(loop.create_task(ctx.persist_learned()))
    log.event("acceptor_start", index=index, learned=len(ctx.learned),
              tls=ctx.tls_context is not None, mtls=mtls_sock is not None,
              fast_port=fast_sock is not None)
    await stop.wait()
    await ctx.drain(servers, retire)
    for t in tasks:
        t.cancel()
    if index == 0 and ctx.learned_dirty:
        with contextlib.suppress(OSError):
            atomic_write(ctx.learned_path, ctx.learned.to_json().encode())
    for pool in ctx.spf_pools.values():
        pool.shutdown(wait=False, cancel_futures=True)
    ctx.zctx.destroy(linger=0)


def run(cfg: Config, index: int, sock: socket.socket, hb: Any = None, slot: int = 0,
        mtls_sock: socket.socket | None = None, fast_sock: socket.socket | None = None) -> None:
    log.setup(cfg.log.level, f"acceptor-{index}")
    try:
        import uvloop
        uvloop.run(serve(cfg, index, sock, hb, slot, mtls_sock, fast_sock))
    except ImportError:     # pragma: no cover - uvloop is a hard dependency; keep serving anyway
        asyncio.run(serve(cfg, index, sock, hb, slot, mtls_sock, fast_sock))
