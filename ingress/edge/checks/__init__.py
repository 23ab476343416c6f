"""The evidence checks of an acceptor: found, built from config, run concurrently per stage.

Purpose
    A check is one module of this package (docs/design.md, "Evidence checks"; the DNS allow
    and block lists, FCrDNS). Each module defines `build(cfg, dns, host) -> Check | None`
    (None: not configured; host: the acceptor, ingress.edge.host.SessionHost, for a check that
    consults its state, e.g. the learned store) and a class with `name`, `stage`,
    `holds_banner` and `async judge(client)`: an asynchronous lookup through the acceptor's
    one DNS client (ingress.core.dns_client, every query with a deadline) whose result a pure
    judgement in ingress.policy turns into an ingress.policy.checks.Judgement. Adding a check
    is one module here, one config table (ingress.core.schema_evidence) and its reason
    tokens; nothing else is edited.

API
    Client(ip, port=0, helo="", mail_from="")   frozen: what a check may look at
    Check                      Protocol: name, stage (ingress.policy.checks.Stage),
                               holds_banner (connect stage: a bulk banner waits for it),
                               async judge(client) -> Judgement; optionally
                               judge_now(client) -> Judgement | None (no wait, or None)
    Checks(checks, deadline)   the acceptor's checks (in name order)
        Checks.from_config(cfg, host=None, dns=None)   every module's build(); dns: the
                                            DnsClient (made from classify.nameservers,
                                            dns_timeout, [checks] when None)
        .at(stage) -> tuple[Check, ...];  .holds_banner(stage) -> bool;  bool(checks)
        .run_now(stage, client, holding=None) -> Verdict | None   the same without a wait,
                               when every check can judge at once (judge_now), else None
        await .run(stage, client, deadline=None, holding=None) -> Verdict   the stage's
                               checks (holding: only those that do / do not hold the banner)
                               concurrently, each within `deadline` seconds (default
                               checks.connect_deadline; a check that does not hold the banner
                               and has a `deadline` attribute, within that: FCrDNS's
                               iprev.deadline), folded by ingress.policy.checks.combine
    modules() -> list[str]     this package's check modules (name order)

Failure modes: a check that raises or overruns the deadline is neutral ("<name>:error",
"<name>:timeout"; the error is logged once per check and minute): DNS trouble and check bugs are
nobody's evidence. Limits: the DNS client's (per key, backlog, timeouts cached).
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ingress.core import log, metrics
from ingress.core.config import Config
from ingress.core.derived import dns_configured
from ingress.core.dns_client import DnsClient
from ingress.core.resolver import make_resolver
from ingress.policy.checks import NO_VERDICT, Judgement, Stage, Verdict, combine

__all__ = ["Check", "Checks", "Client", "dns_client", "modules"]


@dataclass(frozen=True, slots=True)
class Client:
    """What a check may look at: the connection, and what the client has said so far."""

    ip: str
    port: int = 0
    helo: str = ""
    mail_from: str = ""


class Check(Protocol):
    name: str
    stage: Stage
    holds_banner: bool

    async def judge(self, client: Client) -> Judgement: ...


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def dns_client(cfg: Config) -> DnsClient:
    """The acceptor's one DNS client for the checks (classify.nameservers, dns_timeout)."""
    c, k = cfg.classify, cfg.checks
    return DnsClient(make_resolver(c.nameservers, c.dns_timeout), per_key=k.dns_per_key,
                     backlog=k.dns_backlog, timeout_ttl=k.dns_timeout_ttl)


ERROR_LOG_EVERY = 60.0


class Checks:
    def __init__(self, checks: Sequence[Check], deadline: float) -> None:
        self.checks = tuple(checks)
        self.deadline = deadline
        self._errors = log.Throttle(ERROR_LOG_EVERY, 64)

    @classmethod
    def from_config(cls, cfg: Config, host: Any = None, dns: DnsClient | None = None) -> Checks:
        if not dns_configured(cfg):
            return cls((), cfg.checks.connect_deadline)
        client = dns if dns is not None else dns_client(cfg)
        built = []
        for name in modules():
            module = importlib.import_module(f"{__name__}.{name}")
            check = module.build(cfg, client, host)
            if check is not None:
                built.append(check)
        return cls(built, cfg.checks.connect_deadline)

    def __bool__(self) -> bool:
        return bool(self.checks)

    def at(self, stage: Stage) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.stage is stage)

    def holds_banner(self, stage: Stage = Stage.CONNECT) -> bool:
        return any(c.holds_banner for c in self.at(stage))

    def run_now(self, stage: Stage, client: Client,
                holding: bool | None = None) -> Verdict | None:
        """run()'s verdict when every check of the selection can judge without a wait (its
        optional judge_now: an answer cached, or its DNS client busy), else None (then run()).
        A flood of new addresses is judged this way once the lists' query bounds are full: no
        task, no query, no timer per bot."""
        judged = []
        for check in self._selection(stage, holding):
            now = getattr(check, "judge_now", None)
            try:
                j = now(client) if now is not None else None
            except Exception:       # run() judges it (and logs what is wrong)
                return None
            if j is None:
                return None
            judged.append(j)
        for j in judged:
            metrics.check_result(j.check, j.outcome.value)
        return combine(judged)

    def _selection(self, stage: Stage, holding: bool | None) -> tuple[Check, ...]:
        return tuple(c for c in self.at(stage) if holding is None or c.holds_banner is holding)

    async def run(self, stage: Stage, client: Client, deadline: float | None = None,
                  holding: bool | None = None) -> Verdict:
        checks = self._selection(stage, holding)
        if not checks:
            return NO_VERDICT
        limit = self.deadline if deadline is None else deadline
        judged = await asyncio.gather(*(self._one(c, client, limit) for c in checks))
        for j in judged:
            metrics.check_result(j.check, j.outcome.value)
        return combine(judged)

    async def _one(self, check: Check, client: Client, limit: float) -> Judgement:
        if not check.holds_banner:      # nothing waits for it: its own deadline, if it has one
            limit = getattr(check, "deadline", limit)
        try:
            async with asyncio.timeout(limit):
                return await check.judge(client)
        except TimeoutError:
            return Judgement.neutral(check.name, f"{check.name}:timeout")
        except Exception as e:  # a check's bug is nobody's evidence, never a crash
            if self._errors.due(check.name, time.monotonic()) is not None:
                log.event("check_error", check=check.name, error=f"{type(e).__name__}: {e}"[:200])
            return Judgement.neutral(check.name, f"{check.name}:error")
