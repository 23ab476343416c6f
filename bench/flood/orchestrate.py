"""The flood generator's run: configuration, bot processes, merging their results.

API
    BotConfig, FloodConfig (validated; fd_budget()); BotRunner (bots inline); run_flood(cfg,
    progress) -> result dict; run_flood_sync(...); format_progress(p); event_loop_runner(uvloop);
    sender_phases(specs): the legitimate senders' ticks, spread over their interval

Failure modes and limits: those of the whole generator, in the package docstring
(bench/flood/__init__.py), with the accounting definitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.flood.adversary import (
    TLS_HANDSHAKE_ROLE,
    TLS_STALL_ROLE,
    Adversary,
    HandshakeBot,
    HandshakeStats,
    RetryingMTA,
    SpamMessages,
)
from bench.flood.bots import (
    EarlyTalkerBot,
    LegitSender,
    LegitSpec,
    SpamSender,
    StallingBot,
    TrickleBot,
)
from bench.flood.common import (
    CHILD_LINE_LIMIT,
    FD_MARGIN,
    Target,
    bot_address,
    check_source,
    ensure_fd_limit,
    percentile_nearest_rank,
)
from bench.flood.pool import PoolSender
from bench.flood.probe import StallWatch, raise_priority, restore_priority
from bench.flood.stats import BotStats, LegitStats, SpamStats, merge_into

# --------------------------------------------------------------------------------------------
# Run configuration and orchestration


@dataclass(frozen=True)
class BotConfig:
    """Bot counts and behaviour parameters (for one process, or the whole run before splitting)."""

    stallers: int = 0
    tricklers: int = 0
    early: int = 0
    spammers: int = 0
    spam_per_conn: int = 100
    spam_rate: float = 0.0  # messages/s per spam bot; 0 = as fast as possible
    spam_size: int = 1024
    spam_from: str = "spam@bots.invalid"
    spam_rcpt: str = "user@example.com"
    trickle_interval: float = 5.0
    reconnect_delay: float = 1.0
    connect_deadline: float = 30.0
    ramp_s: float = 1.0  # spread idle-bot connects over this many seconds
    adversary: Adversary = field(default_factory=Adversary)   # issue 17's attackers

    @property
    def sockets(self) -> int:
        return (self.stallers + self.tricklers + self.early + self.spammers
                + self.adversary.tls_sockets)


@dataclass(frozen=True)
class FloodConfig:
    target: Target
    duration_s: float
    bots: BotConfig = field(default_factory=BotConfig)
    legit: tuple[LegitSpec, ...] = ()
    warmup_s: float = 0.0  # legit senders start this long after the bots
    grace_s: float = 2.0
    spam_procs: int = 1
    bot_procs: int = 1  # 0: stall/trickle/early bots inline in the measuring process
    mail_from: str = "legit@example.org"
    rcpt: str = "user@example.com"
    helo: str = "legit.example.org"
    size: int = 1024
    deadline_s: float = 10.0
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    servername: str = "localhost"
    use_uvloop: bool = True
    probe_rt: bool = True   # the legitimate senders' thread at SCHED_FIFO (bench.flood.probe)

    def __post_init__(self) -> None:
        if not 0 < self.duration_s <= 24 * 3600:
            raise ValueError("duration must be in (0, 86400] seconds")
        for spec in self.legit:
            check_source(spec.source, self.target)
        b = self.bots
        if min(b.stallers, b.tricklers, b.early, b.spammers) < 0:
            raise ValueError("bot counts must be >= 0")
        for role, n in ((1, b.stallers), (2, b.tricklers), (3, b.early), (4, b.spammers),
                        (TLS_HANDSHAKE_ROLE, b.adversary.handshakers),
                        (TLS_STALL_ROLE, b.adversary.tls_stallers)):
            if n:
                bot_address(role, n - 1)  # raises if out of range

    def resolved_legit(self) -> list[LegitSpec]:
        out = []
        for i, s in enumerate(self.legit):
            out.append(dataclasses.replace(
                s,
                name=s.name or f"{s.kind}{i}",
                mail_from=s.mail_from or self.mail_from,
                rcpt=s.rcpt or self.rcpt,
                helo=s.helo or self.helo,
                size=s.size or self.size,
                deadline_s=s.deadline_s or self.deadline_s,
                ca=s.ca or self.ca,
                cert=s.cert or (self.cert if s.kind == "cert" else None),
                key=s.key or (self.key if s.kind == "cert" else None),
                servername=s.servername or self.servername,
            ))
        return out

    @property
    def startup_s(self) -> float:
        """Seconds from run_flood's call to the bots' start: child processes need time to
        spawn (the legitimate senders start warmup_s after that)."""
        return 1.5 if any(role != "inline" for role, _, _ in self.plan()) else 0.05

    def legit_sockets(self) -> int:
        return sum(math.ceil((s.deadline_s or self.deadline_s) / s.interval_s) + 2
                   for s in self.legit)

    def plan(self) -> list[tuple[str, BotConfig, dict[str, int]]]:
        """Split the bots over processes: [(role, BotConfig, first source index per role)].

        Role "spam" and "botsN" are child processes; "inline" runs in the measuring process.
        """
        b = self.bots
        plan: list[tuple[str, BotConfig, dict[str, int]]] = []
        no_tls = dataclasses.replace(b.adversary, handshakers=0, tls_stallers=0,
                                     spam_stride=b.adversary.spam_stride or b.spammers)
        if b.adversary.tls_sockets:
            plan.append(("tls", dataclasses.replace(
                b, stallers=0, tricklers=0, early=0, spammers=0),
                {"stall": 0, "trickle": 0, "early": 0, "spam": 0}))
        b = dataclasses.replace(b, adversary=no_tls)
        if b.spammers:
            n = max(1, min(self.spam_procs, b.spammers))
            for i in range(n):
                lo, hi = b.spammers * i // n, b.spammers * (i + 1) // n
                plan.append(("spam", dataclasses.replace(
                    b, stallers=0, tricklers=0, early=0, spammers=hi - lo),
                    {"stall": 0, "trickle": 0, "early": 0, "spam": lo}))
        if b.stallers + b.tricklers + b.early:
            n = max(1, self.bot_procs)
            for i in range(n):
                def lo(x: int, i: int = i) -> int:
                    return x * i // n

                def cnt(x: int, i: int = i) -> int:
                    return x * (i + 1) // n - x * i // n

                plan.append(("inline" if self.bot_procs <= 0 else f"bots{i}", dataclasses.replace(
                    b, spammers=0, stallers=cnt(b.stallers), tricklers=cnt(b.tricklers),
                    early=cnt(b.early)),
                    {"stall": lo(b.stallers), "trickle": lo(b.tricklers), "early": lo(b.early),
                     "spam": 0}))
        return plan

    def fd_budget(self) -> dict[str, int]:
        """Descriptors each process needs: {'main': n, 'spam0': n, 'bots0': n, ...}."""
        need = {"main": self.legit_sockets() + FD_MARGIN}
        for k, (role, bc, _) in enumerate(self.plan()):
            if role == "inline":
                need["main"] += bc.sockets
            else:
                need[f"{role}#{k}"] = bc.sockets + FD_MARGIN
        return need


class BotRunner:
    """Runs one BotConfig's bots in this process and holds their stats."""

    def __init__(self, target: Target, bc: BotConfig, offsets: dict[str, int]) -> None:
        self.target, self.bc, self.offsets = target, bc, offsets
        self.stall = BotStats(role="stall")
        self.trickle = BotStats(role="trickle")
        self.early = BotStats(role="early")
        self.spam = SpamStats()
        self.handshake = HandshakeStats()
        self.tls_stall = BotStats(role="tls_stall")

    def _src(self, role_octet: int, idx: int) -> str | None:
        return bot_address(role_octet, idx) if self.target.family == socket.AF_INET else None

    def coroutines(self, start_at: float, end: float) -> list[Any]:
        bc, t, off = self.bc, self.target, self.offsets
        idle = max(1, bc.stallers + bc.tricklers + bc.early)
        common = dict(reconnect_delay=bc.reconnect_delay, connect_deadline=bc.connect_deadline)
        coros: list[Any] = []
        k = 0

        def ramp() -> float:
            return start_at + bc.ramp_s * k / idle

        for i in range(bc.stallers):
            coros.append(StallingBot(t, self._src(1, off["stall"] + i), self.stall,
                                     start_at=ramp(), **common).run(end))
            k += 1
        for i in range(bc.tricklers):
            coros.append(TrickleBot(t, self._src(2, off["trickle"] + i), self.trickle,
                                    start_at=ramp(), interval=bc.trickle_interval,
                                    **common).run(end))
            k += 1
        for i in range(bc.early):
            coros.append(EarlyTalkerBot(t, self._src(3, off["early"] + i), self.early,
                                        start_at=ramp(), **common).run(end))
            k += 1
        adv = bc.adversary
        messages = SpamMessages(adv, bc.spam_from, bc.spam_rcpt, bc.spam_size) if (
            adv.spam_domains or adv.spam_senders or adv.dkim_key or adv.dead_sigs) else None
        for i in range(bc.spammers):
            coros.append(SpamSender(
                t, self._src(4, off["spam"] + i), self.spam, start_at=start_at,
                per_conn=bc.spam_per_conn, rate=bc.spam_rate, size=bc.spam_size,
                mail_from=bc.spam_from, rcpt=bc.spam_rcpt, messages=messages,
                index=off["spam"] + i,
            ).run(end))
        tls = t.with_port(adv.tls_port) if adv.tls_sockets else t
        for i in range(adv.handshakers):
            coros.append(HandshakeBot(tls, self._src(TLS_HANDSHAKE_ROLE, i), self.handshake,
                                      start_at=start_at + bc.ramp_s * i / adv.handshakers,
                                      pause=adv.handshake_pause).run(end))
        for i in range(adv.tls_stallers):
            coros.append(StallingBot(tls, self._src(TLS_STALL_ROLE, i), self.tls_stall,
                                     start_at=start_at, **common).run(end))
        return coros

    async def run(self, start_at: float, end: float) -> None:
        await asyncio.gather(*self.coroutines(start_at, end))
        loop = asyncio.get_running_loop()
        if self.bc.spammers:
            self.spam.active_s = max(0.0, min(loop.time(), end) - start_at)
        if self.bc.adversary.handshakers:
            self.handshake.active_s = max(0.0, min(loop.time(), end) - start_at)

    def progress(self) -> dict[str, Any]:
        return {
            "stall_open": self.stall.open_now, "trickle_open": self.trickle.open_now,
            "early_conns": self.early.connections, "spam_open": self.spam.open_now,
            "spam_sent": self.spam.sent, "spam_accepted": self.spam.accepted,
            "spam_shed": sum(self.spam.shed.values()),
            "tls_handshakes": self.handshake.handshakes,
        }

    def raw(self) -> dict[str, Any]:
        return {
            "stall": dataclasses.asdict(self.stall), "trickle": dataclasses.asdict(self.trickle),
            "early": dataclasses.asdict(self.early), "spam": dataclasses.asdict(self.spam),
            "handshake": dataclasses.asdict(self.handshake),
            "tls_stall": dataclasses.asdict(self.tls_stall),
        }


def _from_raw(raw: dict[str, Any]) -> tuple[BotStats, BotStats, BotStats, SpamStats,
                                            HandshakeStats, BotStats]:
    return (BotStats(**raw["stall"]), BotStats(**raw["trickle"]), BotStats(**raw["early"]),
            SpamStats(**raw["spam"]), HandshakeStats(**raw["handshake"]),
            BotStats(**raw["tls_stall"]))


def _bots_argv(cfg: FloodConfig, bc: BotConfig, offsets: dict[str, int],
               start_wall: float) -> list[str]:
    argv = [
        sys.executable, "-m", "bench.flood", "bots", "--target", str(cfg.target),
        "--start-at", repr(start_wall), "--duration", repr(cfg.duration_s),
        "--stallers", str(bc.stallers), "--tricklers", str(bc.tricklers),
        "--early", str(bc.early), "--spammers", str(bc.spammers),
        "--spam-per-conn", str(bc.spam_per_conn), "--spam-rate", repr(bc.spam_rate),
        "--spam-size", str(bc.spam_size), "--spam-from", bc.spam_from,
        "--spam-rcpt", bc.spam_rcpt, "--trickle-interval", repr(bc.trickle_interval),
        "--reconnect-delay", repr(bc.reconnect_delay),
        "--connect-deadline", repr(bc.connect_deadline), "--ramp", repr(bc.ramp_s),
        "--adversary", orjson.dumps(bc.adversary.to_json()).decode(),
    ]
    for role, off in offsets.items():
        argv += [f"--offset-{role}", str(off)]
    if not cfg.use_uvloop:
        argv.append("--no-uvloop")
    return argv


class _Child:
    def __init__(self, role: str, proc: asyncio.subprocess.Process) -> None:
        self.role, self.proc = role, proc
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.stderr = b""
        self.error: str | None = None

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        for _ in range(10_000_000):
            try:
                line = await self.proc.stdout.readline()
            except ValueError as e:  # a line over CHILD_LINE_LIMIT
                self.error = f"child output: {e}"
                break
            if not line:
                break
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if msg.get("type") == "progress":
                self.progress = msg
            elif msg.get("type") == "result":
                self.result = msg
            elif msg.get("type") == "error":
                self.error = msg.get("error")

    async def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = (await self.proc.stderr.read())[-4000:]


def sender_phases(specs: Sequence[LegitSpec]) -> list[float]:
    """Each legitimate sender's offset from the measured window's start: the periodic senders
    (all but the retrying MTAs, 0.0) spread evenly over their interval, sender i of n at i/n
    of it. Started on the same tick, their transactions overlapped in the probe's one thread:
    the certificate sender's TLS handshake and the others' client-side work were counted in
    each other's latency (2-3 ms at the MAIL and RCPT stages of an idle target, measured)."""
    periodic = [i for i, s in enumerate(specs) if s.kind != "mta"]
    out = [0.0] * len(specs)
    for rank, i in enumerate(periodic):
        out[i] = rank * specs[i].interval_s / len(periodic)
    return out


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


async def run_flood(
    cfg: FloodConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the whole flood (children included) and return the result dict (see main())."""
    loop = asyncio.get_running_loop()
    budget = cfg.fd_budget()
    for proc_name, need in budget.items():
        ensure_fd_limit(need, f"process {proc_name}")
    plan = cfg.plan()
    children_roles = [(r, bc, off) for r, bc, off in plan if r != "inline"]
    startup = cfg.startup_s
    wall0 = time.time() + startup
    start_at = loop.time() + startup
    end = start_at + cfg.duration_s
    t_run0 = time.monotonic() + startup  # timeline zero (monotonic clock, as smtp_attempt)

    env = dict(os.environ)
    env["PYTHONPATH"] = _repo_root() + os.pathsep + env.get("PYTHONPATH", "")
    children: list[_Child] = []
    pumps: list[asyncio.Task[None]] = []
    watch = StallWatch()
    priority = raise_priority() if cfg.probe_rt else "normal"
    try:
        for role, bc, off in children_roles:
            proc = await asyncio.create_subprocess_exec(
                *_bots_argv(cfg, bc, off, wall0), env=env, cwd=_repo_root(),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=CHILD_LINE_LIMIT,
            )
            ch = _Child(role, proc)
            children.append(ch)
            pumps += [asyncio.create_task(ch.pump()), asyncio.create_task(ch.read_stderr())]

        inline = [BotRunner(cfg.target, bc, off) for r, bc, off in plan if r == "inline"]
        specs = cfg.resolved_legit()
        legit_stats = [LegitStats(name=s.name, kind=s.kind, source=s.source,
                                  interval_s=s.interval_s) for s in specs]
        phase = sender_phases(specs)
        senders = [RetryingMTA(cfg.target, s.source, st, start_at=start_at + cfg.warmup_s,
                               retry_s=s.retry_s or 60.0, helo=s.helo or cfg.helo,
                               mail_from=s.mail_from or cfg.mail_from, rcpt=s.rcpt or cfg.rcpt,
                               size=s.size or cfg.size, deadline_s=s.deadline_s or cfg.deadline_s,
                               t_run0=t_run0, name=s.name)
                   if s.kind == "mta" else
                   (PoolSender if s.kind == "pool" else LegitSender)(
                       cfg.target, s, st, start_at=start_at + cfg.warmup_s + ph,
                       t_run0=t_run0, grace=cfg.grace_s, prime_at=start_at)
                   for s, st, ph in zip(specs, legit_stats, phase, strict=True)]
        work = [asyncio.create_task(r.run(start_at, end)) for r in inline]
        work += [asyncio.create_task(s.run(end)) for s in senders]

        async def ticker() -> None:
            for _ in range(int(cfg.duration_s + cfg.grace_s + 60) * 2):
                await asyncio.sleep(0.5)
                if progress is not None:
                    progress(_progress(loop.time() - start_at, cfg, legit_stats, inline,
                                       children))

        tick = asyncio.create_task(ticker())
        watching = asyncio.create_task(watch.run())
        if work:        # (none: spam senders alone; the children are waited for below)
            await asyncio.wait(work, timeout=max(0.0, end + cfg.grace_s + 2.0 - loop.time()))
        for w in work:
            w.cancel()
        # children report after `end`; give them a bounded time
        if children:
            await asyncio.wait(
                [asyncio.create_task(c.proc.wait()) for c in children],
                timeout=max(1.0, end + 10.0 - loop.time()),
            )
        tick.cancel()
        watching.cancel()
    finally:
        if priority == "fifo":     # only what raise_priority changed
            restore_priority()
        for c in children:
            if c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.proc.wait(), 5.0)
        if pumps:
            await asyncio.wait(pumps, timeout=2.0)
        for p in pumps:
            p.cancel()

    stall, trickle, early, spam, handshake, tls_stall = (
        BotStats(role="stall"), BotStats(role="trickle"), BotStats(role="early"), SpamStats(),
        HandshakeStats(), BotStats(role="tls_stall"))
    every = (stall, trickle, early, spam, handshake, tls_stall)
    processes: list[dict[str, Any]] = [
                 {"role": "main", "pid": os.getpid(), "fds_needed": budget["main"],
                  "legit": len(specs), "inline_bots": sum(r.bc.sockets for r in inline)}]
    spam_active = hs_active = 0.0
    for r in inline:
        for a, b in zip(every, (r.stall, r.trickle, r.early, r.spam, r.handshake,
                                r.tls_stall), strict=True):
            merge_into(a, b)
    for c in children:
        info: dict[str, Any] = {"role": c.role, "pid": c.proc.pid, "rc": c.proc.returncode}
        if c.result is not None:
            parts = _from_raw(c.result["bots"])
            spam_active = max(spam_active, parts[3].active_s)
            hs_active = max(hs_active, parts[4].active_s)
            for a, b in zip(every, parts, strict=True):
                merge_into(a, b)
            info["fds"] = c.result.get("fds")
        else:
            info["error"] = c.error or "no result"
            info["stderr_tail"] = c.stderr.decode("utf-8", "replace")[-1500:]
        processes.append(info)
    if spam_active:
        spam.active_s = spam_active
    if hs_active:
        handshake.active_s = hs_active
    total = LegitStats.merged("all", legit_stats)
    return {
        "version": 1,
        "target": str(cfg.target),
        "started_unix": round(wall0, 3),
        "duration_s": cfg.duration_s,
        "params": _params(cfg),
        "legit": [s.summary() for s in legit_stats],
        "legit_total": total.summary(timeline=False),
        "bots": {"stall": stall.summary(), "trickle": trickle.summary(),
                 "early": early.summary(), "spam": spam.summary(),
                 **({"handshake": handshake.summary(), "tls_stall": tls_stall.summary()}
                    if cfg.bots.adversary.tls_sockets else {})},
        "processes": processes,
        "probe": {"priority": priority, **watch.summary()},
        "percentile_method": "nearest-rank: sorted[ceil(p/100*N)-1]",
    }


def _params(cfg: FloodConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["target"] = str(cfg.target)
    d["legit"] = [dataclasses.asdict(s) for s in cfg.resolved_legit()]
    return d


def _progress(
    t: float, cfg: FloodConfig, legit: Sequence[LegitStats], inline: Sequence[BotRunner],
    children: Sequence[_Child],
) -> dict[str, Any]:
    agg: dict[str, int] = {}
    for r in inline:
        for k, v in r.progress().items():
            agg[k] = agg.get(k, 0) + v
    for c in children:
        for k, v in c.progress.items():
            if isinstance(v, int) and k != "pid":
                agg[k] = agg.get(k, 0) + v
    lat = [x for s in legit for x in s.latencies_ms]
    return {
        "t": round(t, 1), "duration": cfg.duration_s,
        "legit_attempts": sum(s.attempts for s in legit),
        "legit_accepted": sum(s.accepted for s in legit),
        "legit_p99_ms": percentile_nearest_rank(lat, 99),
        **agg,
    }


def format_progress(p: dict[str, Any]) -> str:
    p99 = p.get("legit_p99_ms")
    return (
        f"t={p['t']:5.1f}/{p['duration']:g}s legit {p['legit_accepted']}/{p['legit_attempts']}"
        f" p99={'-' if p99 is None else f'{p99:.1f}'}ms | stall {p.get('stall_open', 0)}"
        f" trickle {p.get('trickle_open', 0)} early {p.get('early_conns', 0)}"
        f" | spam open {p.get('spam_open', 0)} sent {p.get('spam_sent', 0)}"
        f" ok {p.get('spam_accepted', 0)} shed {p.get('spam_shed', 0)}"
    )


def event_loop_runner(use_uvloop: bool) -> asyncio.Runner:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def run_flood_sync(
    cfg: FloodConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """run_flood in a fresh event loop (uvloop when available and cfg.use_uvloop)."""
    with event_loop_runner(cfg.use_uvloop) as runner:
        return runner.run(run_flood(cfg, progress))
