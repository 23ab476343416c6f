"""The connect stage's evidence checks of one connection: started when it is admitted, applied
when they end (the checks themselves: ingress.edge.checks).

API:
    start(seat, ctx)          an admitted connection (seat.conn) starts its connect checks
                              (ingress.edge.connect.classify_and_admit calls it): a bulk
                              connection the checks that hold the banner (the DNS lists), judged
                              at once when they can (Checks.run_now: cached, or their DNS
                              bounds full), else in a task that holds the banner
                              (Connection.hold); a fast one all of
                              them (nothing waits for them); their tasks are seat.conn.checks
                              (cancelled when the connection goes: Connection.drop_checks)
    spoke(seat, ctx)          the client's first words after the banner (IngressSMTP): the
                              other checks (FCrDNS) of a connection that was bulk at connect
                              start now (if it was promoted since, too), so a silent bot
                              costs no lookup however often it reconnects (docs/design.md:
                              a connection that has proven nothing costs an fd and a few KB)
    held(conn) -> Task | None the task the banner waits for (its result: the refusal line, or
                              ""); the lobby calls Connection.ready() when it ends, the session
                              (behind PROXY) awaits it
    await settle(conn, limit) a bulk session's MAIL FROM waits (at most `limit`) for the checks
                              still under way (FCrDNS), so that what they find (a learned
                              provider, iprev) applies to the transaction
    apply(conn, ctx, verdict) -> str   a verdict joins the connection's evidence
                              (Evidence.with_verdict) and the connection is judged again: a
                              promotion moves it to its tier's part of the slots in place
                              (SessionTable.promote: conn.seat, the protocol holding it now),
                              then and there, before or during its session; a refusal (bulk,
                              before its banner) is returned for the caller to write instead of
                              the banner. A bulk connection whose score now lists it
                              (ingress.policy.shaping.listed, dnsbl.threshold) is shaped
                              (SessionTable.shape: evicted first, held to
                              dnsbl.listed_per_ip_max: over it, closed now with the per-IP 421,
                              SessionTable.close_listed, unless inside DATA)

Rules: evidence only promotes (a fast connection is never demoted or refused by a check); a
verdict that promotes nothing (FCrDNS's, mostly: it arrives for every connection, often
mid-transaction) adds its facts, refuses or shapes, and decides nothing again; a
verdict that arrives after the connection went changes nothing; a refusal that arrives after
the banner (it cannot: only checks that hold the banner refuse) is ignored. The judgement is
ingress.policy.checks'; what promotes is ingress.policy.classify.decide's, with the shares,
tiers and rates of AcceptorContext.decide.

Failure modes: a bug in applying a verdict is logged (check_error) and changes nothing; the
checks' own failures are neutral (ingress.edge.checks). Limits: two tasks per connection at
most; each check's deadline is checks.connect_deadline (one that does not hold the banner:
its own, when it has one: ingress.edge.checks).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ingress.core import log
from ingress.core.wire import Lane
from ingress.edge.checks import Client
from ingress.edge.connection import Connection
from ingress.edge.host import SessionHost
from ingress.policy.checks import NO_VERDICT, Stage, Verdict
from ingress.policy.conn_state import ConnState
from ingress.policy.shaping import listed
from ingress.policy.tiers import Tier, tier_of

__all__ = ["apply", "held", "settle", "spoke", "start"]

HELD = "checks-held"        # the name of the task the banner waits for
REST = "checks-rest"        # ... of the task of the checks nothing waits for


def start(seat: Any, ctx: SessionHost) -> None:
    conn: Connection = seat.conn
    checks = ctx.checks
    if not checks or not checks.at(Stage.CONNECT):
        return
    conn.seat = seat
    if conn.lane is not Lane.BULK:
        _launch(conn, ctx, None, REST)          # nothing waits for them
    elif checks.holds_banner(Stage.CONNECT):
        verdict = checks.run_now(Stage.CONNECT, Client(conn.peer_ip, conn.peer_port), True)
        if verdict is not None and not verdict.refusal:
            apply(conn, ctx, verdict)           # judged at once: nothing to wait for
        else:
            conn.hold()
            _launch(conn, ctx, True, HELD)
    # a bulk connection's other checks (FCrDNS) wait for it to speak (spoke): a silent bot
    # costs them nothing, however many of them reconnect


def spoke(seat: Any, ctx: SessionHost) -> None:
    conn: Connection = seat.conn
    checks = ctx.checks
    if not checks or any(t.get_name() == REST for t in conn.checks):
        return                  # started at connect (a fast connection), or already
    if any(not c.holds_banner for c in checks.at(Stage.CONNECT)):
        conn.seat = seat
        _launch(conn, ctx, False, REST)


def _launch(conn: Connection, ctx: SessionHost, holding: bool | None, name: str) -> None:
    client = Client(conn.peer_ip, conn.peer_port)
    task = ctx.loop.create_task(_judge(conn, ctx, client, holding), name=name)
    conn.checks = (*conn.checks, task)


def held(conn: Connection) -> asyncio.Task[str] | None:
    return next((t for t in conn.checks if t.get_name() == HELD), None)


async def settle(conn: Connection, limit: float) -> None:
    """Wait (at most `limit` seconds) for the connection's connect checks still under way:
    their verdicts are applied when they end, before this returns."""
    pending = [t for t in conn.checks if not t.done()]
    if pending and limit > 0:
        await asyncio.wait(pending, timeout=limit)


async def _judge(conn: Connection, ctx: SessionHost, client: Client,
                 holding: bool | None) -> str:
    verdict = await ctx.checks.run(Stage.CONNECT, client, holding=holding)
    try:
        return apply(conn, ctx, verdict)
    except Exception as e:  # a bug here must not take the connection (or the loop) down
        log.event("check_error", check="apply", error=f"{type(e).__name__}: {e}"[:200])
        return ""


def apply(conn: Connection, ctx: SessionHost, verdict: Verdict) -> str:
    if not conn.admitted or verdict == NO_VERDICT:
        return ""
    conn.evidence = conn.evidence.with_verdict(verdict)
    if conn.lane is Lane.FAST:
        return ""
    if verdict.refusal and conn.state in (ConnState.WAITING, ConnState.EARLY_TALK):
        return verdict.refusal
    if verdict.score > 0 and conn.seat is not None \
            and listed(conn.evidence.bulk_score, ctx.cfg.dnsbl.threshold) \
            and ctx.table.shape(conn.seat, conn.evidence.bulk_score, time.monotonic()) \
            and not conn.busy:
        ctx.table.close_listed(conn.seat)
        return ""
    if not verdict.identity:
        return ""       # a verdict that promotes nothing decides nothing again
    decision = ctx.decide(conn.evidence, peer=conn.peer_ip)
    conn.reasons = decision.reasons
    if decision.lane is Lane.FAST and conn.seat is not None:
        ctx.table.promoted(conn.seat, decision, stage="connect",
                           after_ms=round((time.monotonic() - conn.started) * 1000, 1))
        if tier_of(decision.identity) is Tier.THIRD_PARTY:
            ctx.steer(conn.peer_ip)         # its next connections skip port 25's queue
    return ""
