"""What happens at connect, for a session (ingress.edge.smtp.IngressSMTP) or a lobby seat
(ingress.edge.lobby.Lobby): the same code for both.

API:
    classify_and_admit(seat, ctx, transport, *, implicit_tls=False, fast_only=False,
                       may_hand_off=False, hand_back_to=None) -> str | None
        evidence at connect (allow lists, learned allow, client certificate) -> lane ->
        admission (ctx: the acceptor, ingress.edge.host.SessionHost); the refusal line, ""
        (handed to a fast acceptor, or given back to the one that handed it over: close
        without a word), or None (admitted here, its connect checks started:
        ingress.edge.connect_checks)
    refuse_by_check(seat, ctx, line)   a connect check refused it before its banner: `line`
    refuse_early_talker(seat, ctx)     a bulk client spoke before our banner: 554 and a penalty
                                       shared by every acceptor
    banner_line(hostname), IDENT       the 220 greeting (aiosmtpd's format with our ident)

Failure modes: none raised; a refusal is a reply line, a metric and a log line. Limits: those of
the session table's admission (admission.*).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ingress.core import log, metrics
from ingress.core.metrics_labels import Outcome
from ingress.core.wire import Lane
from ingress.edge import connect_checks
from ingress.edge.host import SessionHost
from ingress.edge.sessions import Seat
from ingress.policy.classify import promote
from ingress.policy.conn_state import Event
from ingress.policy.identity import served_over_share
from ingress.policy.replies import Refusal, text
from ingress.policy.tiers import hands_off, tier_of


def classify_and_admit(seat: Seat, ctx: SessionHost, transport: asyncio.BaseTransport, *,
                       implicit_tls: bool = False, fast_only: bool = False,
                       may_hand_off: bool = False, hand_back_to: Any = None) -> str | None:
    """Evidence at connect (allow lists, learned allow, client certificate) -> lane ->
    admission, for an IngressSMTP or a lobby seat (ingress.edge.lobby.Lobby): sets its
    Connection's (seat.conn) evidence, reasons, lane, identity (and ticket, refused_why through
    ctx.admit) and moves its state: ADMIT, REFUSE or PASS (ingress.policy.conn_state).
    Returns the refusal line, "" when a fast acceptor took the connection (may_hand_off, and
    the operator or third-party tier: ingress.edge.handoff; close it without a word) or when this
    fast acceptor could not admit a connection handed to it and gave it back to the acceptor
    `hand_back_to` (the same), or None when admitted here."""
    conn = seat.conn
    der = None
    if implicit_tls:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    # The TLS handshake of the mutual-TLS port succeeded, so a certificate is verified.
    conn.evidence = ctx.connect_evidence(conn.peer_ip, der, verified=der is not None)
    decision = ctx.decide(conn.evidence, peer=conn.peer_ip)
    if conn.admitted:     # mutual-TLS port: the slot was taken before the handshake
        conn.reasons = decision.reasons
        if promote(conn.lane, decision) is not conn.lane:
            conn.identity = decision.identity
            ctx.table.promote(seat)
        metrics.connection(conn.lane, Outcome.ADMITTED)
        return None
    conn.lane, conn.reasons = decision.lane, decision.reasons
    conn.identity = decision.identity
    if conn.lane is Lane.FAST and may_hand_off and hands_off(tier_of(conn.identity)) \
            and ctx.hand_off(transport):
        conn.fire(Event.PASS)
        metrics.connection(conn.lane, Outcome.HANDED_OFF)
        return ""                       # a fast acceptor serves it (ingress.edge.handoff)
    # listen.fast_port: a fast client over its identity's share is served as bulk there too
    # (never refused for it)
    if fast_only and conn.lane is Lane.BULK and not served_over_share(decision.reasons):
        conn.fire(Event.REFUSE)
        metrics.connection(conn.lane, Outcome.NOT_FAST)
        log.refused("connection_refused", conn.peer_ip, stage="connect", code=554,
                    reason=Outcome.NOT_FAST.value, port=conn.peer_port, lane=conn.lane.value)
        return text(Refusal.FAST_PORT_ONLY, host=ctx.cfg.smtp.hostname)
    refusal = ctx.admit(seat)
    if refusal is not None and hand_back_to is not None and ctx.hand_back(transport,
                                                                          hand_back_to):
        conn.fire(Event.PASS)
        metrics.connection(conn.lane, Outcome.HANDED_BACK)
        log.throttled("handed_back", conn.peer_ip, port=conn.peer_port, lane=conn.lane.value,
                      why=conn.refused_why or "draining")
        return ""                       # served where it arrived (ingress.edge.handoff)
    if refusal is not None:
        conn.fire(Event.REFUSE)
        ctx.count("refused", conn.lane)
        metrics.connection(conn.lane, Outcome(conn.refused_why or "draining"))
        log.refused("connection_refused", conn.peer_ip, stage="connect", code=refusal[:3],
                    reason=conn.refused_why or "draining", port=conn.peer_port,
                    lane=conn.lane.value)
        return refusal
    conn.fire(Event.ADMIT)
    metrics.connection(conn.lane, Outcome.ADMITTED)
    metrics.session_open(conn.lane)
    connect_checks.start(seat, ctx)     # while it waits for its banner (ingress.edge.checks)
    return None


def refuse_by_check(seat: Seat, ctx: SessionHost, line: str) -> None:
    """A connect check refused an admitted bulk client before its banner (a DNS block list
    over its reject threshold: the check logs which): `line` instead of the banner. For an
    IngressSMTP or a lobby seat; the slot goes back when the connection is lost."""
    conn = seat.conn
    ctx.count("check_refused", conn.lane)
    metrics.connection(conn.lane, Outcome.CHECK_REFUSED)
    log.refused("connection_refused", conn.peer_ip, stage="connect", code=line[:3],
                reason=Outcome.CHECK_REFUSED.value, port=conn.peer_port, lane=conn.lane.value,
                why=",".join(r for r in conn.evidence.check_reasons)[:200])
    seat.close_with(line)


def refuse_early_talker(seat: Seat, ctx: SessionHost) -> None:
    """A bulk client spoke before our banner (the greet pause): 554, and the penalty shared by
    every acceptor. For an IngressSMTP or a lobby seat (ingress.edge.lobby.Lobby)."""
    conn = seat.conn
    ctx.penalise(conn.peer_ip)
    ctx.count("early_talker", conn.lane)
    metrics.connection(conn.lane, Outcome.EARLY_TALKER)
    log.refused("early_talker", conn.peer_ip, stage="greet", code=554, port=conn.peer_port,
                penalty_s=ctx.cfg.admission.penalty)
    seat.close_with(text(Refusal.EARLY_TALKER))


def banner_line(hostname: str) -> str:
    """The 220 greeting (aiosmtpd's format with our ident), for a session or a lobby seat."""
    return f"220 {hostname} {IDENT}"


IDENT = "smtp-ingress"
