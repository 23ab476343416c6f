"""The aiosmtpd hooks of an acceptor: EHLO, MAIL, RCPT and DATA, applying the session policy.

API:
    IngressHandler(host)    one per acceptor process (host: ingress.edge.host.SessionHost); the
                            per-session state is on the protocol (ingress.edge.smtp.IngressSMTP)
                            and its Connection (server.conn: the evidence, reasons and identity
                            the hooks move; ingress.edge.connection)

What the hooks do (the decisions are ingress/policy/session_rules.py's, pure; this is glue):
- EHLO: PIPELINING advertised, AUTH and HELP never, ENHANCEDSTATUSCODES;
- MAIL: 421 on a draining acceptor; mail_verdict (553 5.6.7 non-ASCII without SMTPUTF8) and
  before_mail (421 4.7.0 too many transactions without a message); SPF for a bulk session,
  evaluated for the canonical domain (ingress.core.headers.spf_request: every spelling of a
  name is one domain; not a domain name: none, no lookup), which may promote it to the fast
  lane (classify.decide / classify.promote) within its identity's share of the fast reserve
  (else it stays bulk, reason over-share:<key>), its trust tier's cap and the per-IP cap of
  promoted sessions (over-share:tier:<tier>, over-share:ip:<key>: ingress.policy.tiers), and
  while neither its domain is over classify.domain_rate nor its tier over its total rate
  (else bulk, reason over-rate:<key> or over-rate:tier:<tier>; a fast session of such a
  domain or tier is demoted at its next MAIL); a fast session that rests on a learned entry
  (or a learned FCrDNS provider: classify.rests_on_learned) is demoted for a MAIL FROM whose
  (organisational) domain is not the one the entry was learned for, and judged afresh (its
  own SPF; reason learned-mismatch:<learned domain>);
- RCPT: rcpt_verdict; then, at the first acceptable RCPT of a bulk transaction, the bulk cap
  (admit(): before any callout, so a shed stays cheap; Postfix-style greylisting defers at
  RCPT too, and so the deferral knows its recipients): a transaction over the cap is shed
  (shed_verdict: 451 4.7.1 after admission.shed_delay, the admission.shed_limit-th 421 4.7.1
  and a close) and the deferral recorded with the recipient (each later RCPT of it: 451 and
  recorded too); a ripe retry of a deferred transaction (ingress.policy.deferrals: same
  network, sender and a recipient it deferred) takes its site's part of admission.retry_share
  first, and the cap only when that is spent (the envelope then carries evidence.retry,
  which the bulk broker honours with its own retry bucket), and may carry only recipients
  of the deferred transaction (another: 451, recorded); a DNS-block-listed client
  (ingress.policy.shaping.listed) never claims one, and its deferrals record nothing
  (ingress.edge.retries); a client of a verified FCrDNS provider (its fact "provider":
  provider_of) may claim a record another address of the provider made; then recipient
  verification
  (ingress/edge/rcpt_verify.py, cached, at most smtp.verify_per_session callouts a session; over
  that 450: never an amplifier);
- DATA: data_verdict (bare CR or LF: 550 5.6.0, SMTP smuggling); then the message goes to its
  lane broker; 250 only on the worker's ACK (durable); a NACK, a timeout or an unreachable
  broker -> 451; a NACK for the lane's rate cap is shed like a first RCPT (and recorded with
  its recipients); a 250 for a transaction we had deferred is counted
  (metrics.deferred_accepted);
- any exception -> 451 4.3.0 and a log line (aiosmtpd's default is a 500 with internals);
- logging: every refusal and shed here is a log.refused line naming the client (stage, code,
  reason; throttled), and each 250 the one `message` line of its message.

Failure modes: none raised to aiosmtpd; every wait is bounded (SPF deadline, callout timeout,
smtp.ack_timeout). Limits: those of the session policy and the acceptor's parts.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import replace
from typing import Any

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from ingress.core import log, metrics
from ingress.core.headers import received_spf_header, spf_identity, spf_request
from ingress.core.metrics_labels import DeferReason, RcptResult, Result
from ingress.core.wire import Envelope, Lane, new_qid
from ingress.edge import connect_checks
from ingress.edge.host import SessionHost
from ingress.edge.rcpt_verify import Answer
from ingress.edge.smtp import IngressSMTP
from ingress.policy import replies, session_rules, shaping
from ingress.policy.classify import AuthResult, decide, promote, rests_on_learned
from ingress.policy.identity import served_over_share
from ingress.policy.replies import Refusal, text


def provider_of(server: IngressSMTP) -> str:
    """The session's verified provider identity (the iprev check's fact; "" none): its
    deferral records hold it, so another address of the provider may claim them
    (ingress.edge.retries)."""
    return dict(server.evidence.facts).get("provider", "")


class IngressHandler:
    """aiosmtpd hooks. One instance per acceptor process; per-session state is on the protocol."""

    def __init__(self, ctx: SessionHost) -> None:
        self.ctx = ctx

    async def handle_EHLO(self, server: IngressSMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses if not r[4:].startswith(("AUTH", "HELP"))]
        out.insert(1, "250-PIPELINING")
        out.append("250 ENHANCEDSTATUSCODES")
        return out

    async def handle_MAIL(self, server: IngressSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if self.ctx.draining:      # no new transaction on a draining acceptor: come back later
            self.ctx.loop.call_soon(server.close_if_idle, "")
            log.refused("shutting_down", server.peer_ip, stage="mail", code=421,
                        port=server.peer_port, lane=server.lane.value)
            return text(Refusal.SHUTTING_DOWN, host=server.hostname)
        ctx = self.ctx
        refusal = session_rules.mail_verdict(address, bool(envelope.smtp_utf8)) \
            or session_rules.before_mail(server.counters, ctx.error_policy, server.hostname)
        if refusal is not None:
            extra = {"why": "mail_without_data"} if refusal.close else {}
            return server._refused(refusal, "MAIL", sender=address[:200], **extra)
        # The transaction's sender domain (SPF's identity: the MAIL FROM domain, or the HELO
        # name for the null sender): a learned entry vouches only for the domain it was
        # learned for (classify.learned_vouches).
        _, mail_domain = spf_identity(address, session.host_name or "")
        if server.lane is Lane.BULK:
            # Connect checks still under way (FCrDNS: nothing held the banner for it) are
            # waited for, within their deadline: a provider they find promotes this very
            # transaction, and its facts reach the trace. A fast session never waits.
            await connect_checks.settle(server.conn, ctx.cfg.checks.connect_deadline)
        server.conn.evidence = replace(server.evidence, spf=AuthResult.NONE, spf_domain=None,
                                       mail_domain=mail_domain)
        server.spf_header = ""
        afresh = server.lane is Lane.FAST and self.demote_for(server, mail_domain)
        # SPF can only promote, so a session already in the fast lane never waits for DNS.
        if ctx.spf_service.enabled and server.lane is Lane.BULK:
            # SPF is evaluated for the canonical name (every spelling of a domain is one
            # identity, one rate, one cache entry); a name that is not a domain: none.
            request = spf_request(address, session.host_name or "")
            if request is None:
                result, why, domain = AuthResult.NONE, "not a valid domain name", ""
            else:
                domain, sender, helo = request
                result, why = await ctx.spf_service.check(server.peer_ip, server.lane, sender, helo)
            server.conn.evidence = server.evidence.with_spf(result, domain or None)
            server.spf_header = received_spf_header(
                result, client_ip=server.peer_ip, mail_from=address,
                helo=session.host_name or "", receiver=server.hostname,
                explanation=why).decode("ascii", "replace")
            decision = ctx.decide(server.evidence, transaction=True, peer=server.peer_ip)
            if promote(server.lane, decision) is not server.lane:
                ctx.table.promoted(server, decision)
            elif afresh or served_over_share(decision.reasons):
                server.conn.reasons = decision.reasons    # served as bulk: say why in the trace
        # A bulk transaction is admitted (the bulk cap, or a retry claim) at its first RCPT,
        # when a recipient is known: see admit().
        server.retry_claim = None
        server.txn_admitted = server.lane is not Lane.BULK
        server.txn_deferred = False
        server.deferred_rcpts = 0
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        server.counters = session_rules.mail_accepted(server.counters)
        return "250 2.1.0 Ok"

    def demote_for(self, server: IngressSMTP, mail_domain: str) -> bool:
        """A fast session's MAIL FROM: demote it for this transaction when what made it fast
        does not hold for it. True: judged afresh because its learned entry was learned for
        another domain (served, not refused: below, its own SPF, else bulk under the bulk
        cap; the trace says learned-mismatch:<domain>)."""
        ctx = self.ctx
        fresh = decide(server.evidence, ctx.policy) if rests_on_learned(server.evidence) \
            else None
        if fresh is not None and fresh.lane is Lane.BULK:
            server.conn.reasons = fresh.reasons
            why = "learned-mismatch"
        elif ctx.over_rate_why(server.identity, transaction=True, peer=server.peer_ip):
            # Its domain is over classify.domain_rate, or its trust tier over its total rate
            # (no token here, or named by the fast broker): bulk from this transaction on
            # (below, its SPF decides again and names the reason), so the bulk cap sheds it
            # before DATA, not after.
            why = "over-rate"
        else:
            return False
        log.event("demoted", peer=server.peer_ip, identity=server.identity, why=why,
                  sender_domain=mail_domain[:100])
        ctx.count("demoted", Lane.FAST)
        ctx.table.demote(server)
        return why == "learned-mismatch"

    async def handle_RCPT(self, server: IngressSMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        ctx = self.ctx
        verdict = session_rules.rcpt_verdict(
            address, smtputf8=bool(envelope.smtp_utf8), domains=ctx.domains,
            primary_domain=ctx.cfg.smtp.accepted_domains[0], recipients=ctx.recipients,
            accepted=len(envelope.rcpt_tos) + server.deferred_rcpts,
            max_recipients=ctx.cfg.smtp.max_recipients)
        refusal = verdict.refusal
        if refusal is None and (not server.txn_admitted or server.retry_claim is not None):
            # before the verification callout: a shed costs no lookup
            deferral = await self.admit(server, envelope, verdict.address)
            if deferral is not None:
                return deferral
        if refusal is None and verdict.verify and ctx.verifier is not None:
            refusal = session_rules.verify_verdict(verdict.address,
                                                   await self.verify(server, verdict.address))
        if refusal is not None:
            return server._refused(refusal, "RCPT", rcpt=verdict.address[:200])
        address = verdict.address
        metrics.recipient(server.lane, RcptResult.ACCEPTED)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def admit(self, server: IngressSMTP, envelope: SmtpEnvelope, rcpt: str) -> str | None:
        """The bulk cap for a bulk transaction, at its first (acceptable) RCPT: None, go on;
        else the 451 (421 at the shed limit) and the deferral recorded with the recipient, so
        that a retry must repeat network, sender and recipients (ingress.policy.deferrals).

        - first RCPT: a ripe retry of a transaction we deferred takes the retry share first
          (the acceptor's share of the cap may have room while the broker's cap is spent);
          else a token of the bulk cap; else shed (the tarpit of shed());
        - a later RCPT of a transaction deferred at its first: 451 too, added to the record;
        - a later RCPT of a claimed retry: only a recipient of the deferred transaction (the
          retry may not carry others in on it); another is deferred (451, and recorded: the
          MTA retries it later)."""
        ctx = self.ctx
        sender = envelope.mail_from or ""
        claim = server.retry_claim
        if server.txn_deferred or (claim is not None and not claim.covers((rcpt,))):
            server.deferred_rcpts += 1
            self.deferred(server, sender, (rcpt,), None)
            metrics.recipient(server.lane, RcptResult.DEFERRED)
            log.refused("shed", server.peer_ip, stage="rcpt", code=451,
                        reason="deferred_transaction" if server.txn_deferred
                        else "not_in_retry", port=server.peer_port, lane=server.lane.value,
                        sender=sender[:200], rcpt=rcpt[:200])
            return text(Refusal.LANE_BUSY)
        if claim is not None:
            return None
        server.retry_claim = ctx.retries.retry_claim(server.peer_ip, sender, rcpt,
                                                     self.listed(server), provider_of(server))
        if server.retry_claim is not None or await ctx.bulk_mail_admitted():
            server.txn_admitted = True
            return None
        server.txn_deferred = True
        server.deferred_rcpts += 1
        server.counters = session_rules.mail_deferred(server.counters)
        self.deferred(server, sender, (rcpt,), DeferReason.RCPT_CAP)
        metrics.recipient(server.lane, RcptResult.DEFERRED)
        return await self.shed(server, DeferReason.RCPT_CAP, "rcpt", sender=sender[:200],
                               rcpt=rcpt[:200])

    def deferred(self, server: IngressSMTP, sender: str, rcpts: tuple[str, ...],
                 reason: DeferReason | None) -> None:
        """We defer this bulk transaction (ingress.edge.retries), as what the client is: a
        listed one earns nothing, a verified provider's record may serve its other addresses."""
        self.ctx.retries.deferred(server.peer_ip, sender, rcpts, reason, self.listed(server),
                                  provider_of(server))

    def listed(self, server: IngressSMTP) -> bool:
        """A DNS block list listed this client: its deferrals earn no retry bypass."""
        return shaping.listed(server.evidence.bulk_score, self.ctx.cfg.dnsbl.threshold)

    async def verify(self, server: IngressSMTP, address: str) -> Answer:
        """The downstream's answer for `address`: cached, or a callout if this session has not
        used up smtp.verify_per_session (then TEMPFAIL: 450, never an amplifier)."""
        verifier = self.ctx.verifier
        assert verifier is not None
        hit = verifier.cached(address)
        if hit is not None:
            return hit
        if server.callouts >= self.ctx.cfg.smtp.verify_per_session:
            log.throttled("verify_session_cap", server.peer_ip, port=server.peer_port,
                          rcpt=address[:200])
            return Answer.TEMPFAIL
        server.callouts += 1
        return await verifier.verify(address, bool(server.envelope and server.envelope.smtp_utf8))

    async def handle_DATA(self, server: IngressSMTP, session: Session,
                          envelope: SmtpEnvelope) -> str:
        body: bytes = envelope.original_content or b""
        refusal = session_rules.data_verdict(body)
        if refusal is not None:
            log.refused(refusal.event, server.peer_ip, stage="end_of_data",
                        code=refusal.reply[:3], port=server.peer_port, lane=server.lane.value,
                        sender=(envelope.mail_from or "")[:200], size=len(body))
            metrics.message(server.lane, Result(refusal.metric))
            return refusal.reply
        ctx = self.ctx
        now = time.time()
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        tls = str(ssl_object.version() or "TLS") if ssl_object is not None else ""
        env = Envelope(
            qid=new_qid(now), lane=server.lane, peer_ip=server.peer_ip,
            peer_port=server.peer_port, helo=session.host_name or "",
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            rcpts=tuple(envelope.rcpt_tos),
            received_at=now, deadline=now + ctx.cfg.smtp.ack_timeout, acceptor=ctx.ident,
            smtputf8=bool(envelope.smtp_utf8), tls=tls, evidence=server.trace_evidence(),
            proto="ESMTP" if session.extended_smtp else "SMTP",
        )
        claim = server.retry_claim
        if claim is not None and env.lane is Lane.BULK and claim.covers(env.rcpts):
            env = replace(env, evidence=replace(env.evidence, retry=True))
        t0 = time.monotonic()
        reply, why = await ctx.lanes.submit(env, body)
        ms = round((time.monotonic() - t0) * 1000, 2)
        metrics.observe_ack(server.lane, time.monotonic() - t0)
        metrics.message(server.lane, Result.ACCEPTED if reply is not None and reply.ok
                        else Result.TEMPFAILED)
        if reply is not None and reply.ok:
            server.messages += 1
            ctx.count("accepted", server.lane)
            ctx.retries.deferred_accepted(server.lane, server.peer_ip, env.mail_from, env.rcpts,
                                          claim, provider_of(server))
            # The one accept line of a message (its 250): the relay's line names the same qid.
            log.event("message", qid=env.qid, peer=server.peer_ip, port=server.peer_port,
                      helo=env.helo[:100], sender=env.mail_from[:200], rcpts=len(env.rcpts),
                      size=len(body), lane=env.lane.value, tier=server.tier.label,
                      identity=env.evidence.identity, reasons=",".join(env.evidence.reasons),
                      spf=env.evidence.spf or "",
                      tls=env.tls, reply="250", ack_ms=ms)
            return replies.QUEUED.format(qid=env.qid)
        ctx.count("tempfail", server.lane)
        fields: dict[str, Any] = {"port": server.peer_port, "lane": env.lane.value, "qid": env.qid,
                  "sender": env.mail_from[:200], "rcpts": len(env.rcpts), "size": len(body),
                  "why": why, "ack_ms": ms}
        if reply is not None and reply.reason is not None and reply.reason.value == "rate":
            self.deferred(server, env.mail_from, env.rcpts, DeferReason.DATA_RATE)
            return await self.shed(server, DeferReason.DATA_RATE, "end_of_data", **fields)
        log.refused("not_queued", server.peer_ip, stage="end_of_data", code=451,
                    reason=str(why).replace(" ", "_"), **fields)
        return text(Refusal.NOT_QUEUED, why=why)

    async def shed(self, server: IngressSMTP, reason: DeferReason, stage: str,
                   **fields: Any) -> str:
        """Refuse a bulk transaction over the cap, cheaply for us and expensively for a bot:
        the 451 comes after admission.shed_delay (a tarpit, like Postfix's error sleep, so a
        spam loop costs us a few commands a second instead of thousands), and the
        admission.shed_limit-th refusal in a session is 421 and a close. The `shed` line
        names the client, `reason` and `stage` (and `fields`)."""
        a = self.ctx.cfg.admission
        shed = session_rules.shed_verdict(server.sheds, shed_limit=a.shed_limit,
                                          shed_delay=a.shed_delay, host=server.hostname)
        server.sheds = shed.sheds
        fields.setdefault("port", server.peer_port)
        fields.setdefault("lane", server.lane.value)
        log.refused("shed", server.peer_ip, stage=stage, code=shed.reply[:3],
                    reason=reason.value, sheds=shed.sheds, closed=shed.close, **fields)
        self.ctx.count("shed", server.lane)
        metrics.message(server.lane, Result.SHED)
        if shed.close:
            server.close_after_reply = True
        elif shed.delay > 0:
            await asyncio.sleep(shed.delay)
        return shed.reply

    async def handle_exception(self, error: Exception, server: IngressSMTP | None = None) -> str:
        """451 4.3.0, and the traceback in a line, throttled like a refusal (a client that
        found a way to raise one could otherwise repeat it at will)."""
        peer = server.peer_ip if server is not None else ""
        log.refused("smtp_exception", peer, level="error", stage="command", code=451,
                    reason=type(error).__name__,
                    port=server.peer_port if server is not None else 0,
                    error=str(error)[:300],
                    exc="".join(traceback.format_exception(error))[-4000:])
        return text(Refusal.INTERNAL_ERROR)
