"""One delivery of one spool file to the downstream, and its record: the relay's per-message
work (the scheduler, scheduler.py, decides when; this module does it).

API:
    Delivery(cfg, spool, target, breaker, counters, schedule, busy_retry)
        `await process(name, session)`  claim spool/new/<name>, deliver its pending recipients
                                        on `session` (a transaction.Session, reused), record the
                                        result; `schedule(name, at)` puts a file back (a retry,
                                        a file another relay holds: in `busy_retry` seconds, a
                                        DSN spooled: now)

What it does, per spool file in new/:
  - sends the stored message minus our X-Ingress-Envelope line (trace headers kept), byte-exact,
    with the envelope as stored (clients/transaction.py), under its original client's identity
    (relay.forward_client: XCLIENT or XFORWARD, forward.py); a message the relay made itself
    (a DSN: acceptor forward.OWN) under the ingress's own, never on a connection that XCLIENT
    gave to a client (a connection that cannot carry the message's client is replaced);
    a connection carries at most MAX_PER_CONNECTION messages, then a fresh one is opened;
  - an address that cannot be sent is refused here, before the transaction, for its recipient
    alone (the others still go): NUL, CR, LF, any control character, space, <>, a path over
    254 octets (5.1.3; 5.1.7 for the sender: then every recipient), non-ASCII when the
    downstream has no SMTPUTF8 (5.6.7, RFC 6531). Old spool files, DSNs and acceptor bugs
    can carry such addresses; the relay does not rely on the acceptor's checks;
  - per recipient (RCPT replies; for LMTP one reply per recipient after DATA; for SMTP the DATA
    reply applies to every accepted RCPT): 2xx -> delivered, recorded and never sent again;
    5xx -> failed; 4xx -> deferred;
  - failed recipients get one RFC 3464 DSN (multipart/report; report-type=delivery-status) to the
    envelope sender with MAIL FROM:<>, written into spool/new as an ordinary spool file (so it is
    itself relayed, retried and durable), when ingress.policy.dsn says so (relay.dsn: by default
    only to a sender whose return path the ingress authenticated, SPF pass or DKIM aligned with
    the MAIL FROM domain, from the spool envelope's evidence; at most relay.dsn_rate an hour per
    destination organisational domain); never for the null sender. Every decision is counted
    (smtp_ingress_relay_dsn_decisions_total{result}); a DSN withheld is logged
    (relay_dsn_suppressed: qid, sender, result, why; rate-limited ones at most once a minute
    per domain, with how many were left out) and the message goes to failed/ as any failure;
  - deferred recipients are retried after backoff(attempt) = retry_base * 2**(attempt-1), capped
    at retry_max; once the message is older than max_age a tempfail becomes failed with status
    4.4.7 (Action: failed) and is bounced;
  - each attempt writes one `relay` line (state.outcome_fields: qid, outcome delivered |
    deferred | bounced | failed, the reply that decided it, attempts, delay);
  - the file is unlinked once every recipient is delivered, moved to failed/ once every recipient
    is settled and at least one failed (never replacing a file there: a taken name gets ".N").
    Every change of a spool file or a state file is made by workers/spool/store.py (claim, finish,
    fail, the state files); this module decides.

Failure modes: a failure to open a session is the downstream's (breaker.py counts it; the
message is put back unchanged, or once past max_age given 451 4.4.1, which settles as any
tempfail past max_age). A stale reused session (or
one that answers MAIL with 421 or 503) is retried once on a fresh one. Anything after a session
opened -- a reply, a hang-up, a timeout, any exception (an encoding error, a bug) -- is that
message's: a 4xx for its pending recipients (attempt, backoff, 4.4.7 at max_age; final replies
already received, such as a RCPT's 550 or LMTP's per-recipient replies, stand), and the session
is RSET (checked) or dropped, never reused dirty. So a message that makes the downstream hang up
backs off on its own and can never be the breaker's eternal probe, and a half-open transaction
can never give the next message a 503 (a 503 is never a bounce anyway: bad sequence is our
state, not the message). A corrupt spool file goes to failed/ (relay_corrupt). Errors while
recording a result (disk) propagate to the scheduler, which backs off in memory.

Duplicates are possible exactly when the downstream has taken responsibility and we did not
record it: (1) the process dies (kill -9, power loss) after the downstream's 2xx and before the
state write / unlink; (2) the reply to the final "." is lost (timeout, dropped connection, or a
stop that cancels a delivery waiting for it) although the downstream accepted the message (RFC
1047); a lost reply is logged as relay_unsure with the qid; (3) a DSN was spooled and the process
died before the failure was recorded, so the recipient is tried again and a second DSN may be
spooled. Mail is never lost to these windows:
the spool file is removed only after the reply is recorded.

Limits: the message is held in memory while it is sent; after the reply nothing awaits until
the result is recorded (a cancel cannot split a reply from its record).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from ingress.core import log, metrics
from ingress.core.config import Config
from ingress.core.downstream import Target
from ingress.core.wire import Envelope, Lane, WireEvidence, new_qid
from ingress.policy import dsn as dsn_policy
from workers.relay import forward
from workers.relay.breaker import Breaker
from workers.relay.clients.transaction import Session, Unavailable
from workers.relay.dsn import build_dsn
from workers.relay.forward import Client
from workers.spool import store as spool_mod
from workers.spool.state import (
    Failure,
    RelayState,
    Reply,
    _oneline,
    address_problem,
    envelope_sender,
    outcome_fields,
    settle,
)

MAX_PER_CONNECTION = 500   # messages per downstream connection, then a fresh one
DSN_LOG_EVERY = 60.0       # seconds between two relay_dsn_suppressed lines for a rate-limited
                           # destination domain


class Delivery:
    def __init__(self, cfg: Config, spool: spool_mod.Spool, target: Target, breaker: Breaker,
                 counters: dict[str, Any], schedule: Callable[[str, float], None],
                 busy_retry: float) -> None:
        self.rc, self.spool, self.target, self.breaker = cfg.relay, spool, target, breaker
        self.counters = counters                   # the relay's (its relay_stop line)
        self.schedule = schedule                   # the scheduler's: (name, at wall clock)
        self.busy_retry = busy_retry
        self.hostname = cfg.smtp.hostname
        self.authserv_id = cfg.classify.authserv_id or cfg.smtp.hostname
        self.dsn_limits = dsn_policy.DsnLimits(cfg.relay.dsn_rate)
        self.dsn_log = log.Throttle(DSN_LOG_EVERY, dsn_policy.DSN_TRACKED)

    async def process(self, name: str, session: Session) -> None:
        with contextlib.ExitStack() as held:
            try:
                claim = held.enter_context(self.spool.claim("new", name))
            except spool_mod.Busy:            # another relay (reload overlap) has it
                self.schedule(name, time.time() + self.busy_retry)
                return
            except spool_mod.Gone:            # finished by someone else meanwhile
                return
            raw = claim.read()
            try:
                entry = spool_mod.parse(raw)
                env = entry.envelope
                mail_from = envelope_sender(env)
                rcpts = [str(r) for r in env["rcpts"]]
                received_at = float(env["received_at"])
            except (ValueError, KeyError, TypeError) as e:
                self.counters["corrupt"] += 1
                log.event("relay_corrupt", "error", file=name, error=str(e))
                self._finish(name, "failed", None)
                return
            del raw
            state = self.spool.read_state(name)
            now = time.time()
            if state.next_at > now:            # rescheduled by another relay meanwhile
                self.schedule(name, state.next_at)
                return
            pending = state.pending(rcpts)
            qid = str(env.get("qid", name))
            if pending:
                results = await self._attempt(session, qid, mail_from, pending, entry.message,
                                              bool(env.get("smtputf8")), received_at,
                                              forward.client_of(env))
                if results is None:             # downstream unreachable; message not charged
                    self.schedule(name, 0.0)
                    return
            else:
                results = {}
            # From here on nothing awaits: the reply is recorded before anything can cancel us.
            self._record(name, qid, env, state, results, received_at, entry.message)

    async def _attempt(self, session: Session, qid: str, mail_from: str, pending: list[str],
                       message: bytes, smtputf8: bool, received_at: float,
                       client: Client | None = None) -> dict[str, Reply] | None:
        """Deliver to `pending`; the per-recipient results, or None when the downstream could
        not be reached (connection-level: the breaker counts it, the message is not charged).

        Only a failure to open a session counts against the downstream. Anything after that
        (a reply, a hang-up, a timeout, any exception) is this message's: a result for each
        recipient, so it is charged an attempt with backoff, and expires at max_age. The
        session is dropped after anything unexpected, so the next message gets a clean one."""
        # Syntax first (no connection needed); SMTPUTF8 once the downstream's EHLO is known.
        refused = address_problem(mail_from, sender=True, utf8=True)
        if refused is not None:
            return dict.fromkeys(pending, refused)
        results: dict[str, Reply] = {}
        for r in pending:
            problem = address_problem(r, sender=False, utf8=True)
            if problem is not None:
                results[r] = problem
        good = [r for r in pending if r not in results]
        if not good:
            return results
        got = await self._deliver(session, qid, mail_from, good, message, smtputf8, received_at,
                                  client)
        if got is None:
            return None
        results.update(got)
        return results

    async def _deliver(self, session: Session, qid: str, mail_from: str, good: list[str],
                       message: bytes, smtputf8: bool, received_at: float,
                       client: Client | None) -> dict[str, Reply] | None:
        """_attempt's delivery to the syntactically good recipients: a result for each, or None
        when the downstream could not be reached and the message is not yet past max_age. A
        reused connection found stale is tried once more on a fresh one; a connection that
        carries another client (XCLIENT) is replaced by a fresh one."""
        t0 = time.monotonic()
        mta = self.target.mta_name
        for tries in (1, 2):
            reused = session.connected
            if not session.connected or session.messages >= MAX_PER_CONNECTION \
                    or not session.reusable_for(client):
                reused = False
                why = await self._open_session(session, len(good))
                if why is not None:
                    if time.time() - received_at < self.rc.max_age:
                        return None
                    return dict.fromkeys(
                        good, Reply(451, f"4.4.1 {mta}: {_oneline(why, 300)}", local=True))
            try:
                got = await session.deliver(mail_from, good, message, smtputf8, client)
            except Unavailable as e:
                if e.stage == "connect" and reused and tries == 1:
                    continue                    # a stale reused connection: once more, fresh
                return self._delivery_failed(qid, good, e)
            except Exception as e:
                return await self._attempt_error(session, qid, good, e)
            metrics.relay_replies([r.code for r in got.values()], time.monotonic() - t0)
            self.breaker.ok()
            log.event("relay_attempt", "debug", qid=qid, rcpts=len(good),
                      ms=round((time.monotonic() - t0) * 1000, 2))
            return got
        return None  # pragma: no cover

    async def _open_session(self, session: Session, rcpts: int) -> str | None:
        """Open a fresh downstream session: None, or why it failed (the breaker and the error
        metric count it: a failure to open is the downstream's, not the message's)."""
        try:
            await session.open()
        except Exception as e:          # Unavailable, or a bug: not this message's
            why = e.why if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"
            self.breaker.failed(_oneline(why, 300))
            metrics.relay_error(rcpts)
            return why
        self.breaker.ok()
        return None

    def _delivery_failed(self, qid: str, good: list[str], e: Unavailable) -> dict[str, Reply]:
        """The downstream greeted us and then failed on this message: its failure (451 for
        each recipient). The final replies received before that stand (a 550 for a RCPT,
        LMTP's replies)."""
        metrics.relay_error(len(good))
        if e.stage == "data":
            # The message went out and its reply was lost: the downstream may have it.
            log.event("relay_unsure", "warning", qid=qid, error=e.why,
                      rcpts=[r for r in good if r not in e.partial],
                      note="downstream may have accepted; the retry may duplicate")
        mta = self.target.mta_name
        results = dict.fromkeys(good, Reply(451, f"4.4.2 {mta}: {e.why}", local=True))
        results.update({r: x for r, x in e.partial.items() if r in good})
        return results

    async def _attempt_error(self, session: Session, qid: str, good: list[str],
                             e: Exception) -> dict[str, Reply]:
        """Not expected from a session (a bug, an encoding error): this message's failure,
        never a fixed-interval retry or a dirty session for the next one."""
        why = _oneline(f"{type(e).__name__}: {e}", 300)
        log.event("relay_attempt_error", "error", qid=qid, rcpts=good, error=why)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.close(), 1.0)
        metrics.relay_error(len(good))
        return dict.fromkeys(good, Reply(451, f"4.3.0 local error: {why}", local=True))

    def _record(self, name: str, qid: str, env: dict[str, Any], state: RelayState,
                results: dict[str, Reply], received_at: float, message: bytes) -> None:
        now = time.time()
        out = settle(state, results, rcpts=[str(r) for r in env["rcpts"]], now=now,
                     received_at=received_at, cfg=self.rc)
        mail_from = envelope_sender(env)
        if out.delivered_now:
            self.counters["rcpt_delivered"] += len(out.delivered_now)
        dsn_qid = ""
        if out.bounce:
            self.counters["bounced"] += len(out.bounce)
            dsn_qid, decision = self._bounce(qid, env, out.bounce, received_at, now, message)
            log.event("relay_bounced", "warning", qid=qid, rcpts=[f.rcpt for f in out.bounce],
                      status=[f.status for f in out.bounce],
                      reply=[f.diagnostic for f in out.bounce], dsn=dsn_qid,
                      dsn_result=decision.result.value, sender=mail_from[:300],
                      null_sender=mail_from == "")
        # The one outcome line of this attempt (the acceptor's `message` line has the qid).
        line = outcome_fields(out, results, attempt=state.attempts + 1, now=now,
                              received_at=received_at, dsn=dsn_qid)
        if out.disposition == "retry":
            self.counters["deferred"] += 1
            self.spool.write_state(name, out.state)
            self.schedule(name, out.state.next_at)
            log.event("relay", qid=qid, rcpts=len(env["rcpts"]), **line)
            return
        # failed: the state is kept so `queue requeue-failed` skips the delivered recipients
        self._finish(name, out.disposition, out.state)
        if out.disposition == "done":
            self.counters["sent"] += 1
        log.event("relay", qid=qid, rcpts=len(env["rcpts"]), **line)

    def _bounce(self, qid: str, env: dict[str, Any], failures: Sequence[Failure],
                received_at: float, now: float,
                message: bytes) -> tuple[str, dsn_policy.Decision]:
        """The DSN for `failures`, if ingress.policy.dsn allows one: (its qid or "", the
        decision). Raises only when the DSN could not be spooled (the message is retried)."""
        sender = envelope_sender(env)
        problem = address_problem(sender, sender=False, utf8=True) if sender else None
        decision = dsn_policy.decide(self.rc.dsn, sender,
                                     dsn_policy.return_path(env.get("evidence")),
                                     self.dsn_limits, time.monotonic(),
                                     sendable=problem is None)
        if not decision.send:
            metrics.relay_dsn_decision(decision.result.value)
            self._dsn_withheld(qid, sender, decision, problem)
            return "", decision
        dsn_qid = new_qid(now)
        body = build_dsn(reporting_mta=self.hostname, sender=sender, qid=qid, arrival=received_at,
                         now=now, failures=failures, original=message,
                         remote_mta=self.target.mta_name, dsn_id=f"{dsn_qid}.dsn",
                         authserv_id=self.authserv_id)
        try:
            lane = Lane(str(env.get("lane", "bulk")))
        except ValueError:
            lane = Lane.BULK
        denv = Envelope(qid=dsn_qid, lane=lane, peer_ip="127.0.0.1", peer_port=0,
                        helo=self.hostname, mail_from="", rcpts=(sender,), received_at=now,
                        deadline=now, acceptor=forward.OWN, smtputf8=not sender.isascii(),
                        evidence=WireEvidence(dsn_for=qid))
        (res,) = self.spool.write_batch([(denv, b"", body)])
        if isinstance(res, Exception):
            raise res                           # nothing recorded: the message is retried
        self.counters["dsn_spooled"] += 1
        metrics.relay_dsn()
        metrics.relay_dsn_decision(decision.result.value)      # counted once it is durable
        self.schedule(res, 0.0)
        log.event("relay_dsn", qid=qid, dsn=dsn_qid, sender=sender, authenticated=decision.why)
        return dsn_qid, decision

    def _dsn_withheld(self, qid: str, sender: str, decision: dsn_policy.Decision,
                      problem: Reply | None) -> None:
        """Log why no DSN went (the message itself goes to failed/ as any failure)."""
        R = dsn_policy.Result
        if decision.result is R.NULL_SENDER:
            self.counters["null_sender_failed"] += 1      # relay_bounced says null_sender
            return
        self.counters["dsn_suppressed"] += 1
        if decision.result is R.UNSENDABLE and problem is not None:
            # a DSN to it could never be sent either
            log.event("relay_dsn_unsendable", "warning", qid=qid, sender=sender[:300],
                      why=problem.line())
            return
        fields: dict[str, Any] = {}
        if decision.result in (R.RATE_LIMITED, R.RATE_TABLE_FULL):
            # a flood would write a line per message: once a minute per limited domain, and
            # once a minute in all for a full table (a flood of distinct domains)
            key = decision.domain if decision.result is R.RATE_LIMITED else ""
            left_out = self.dsn_log.due(f"{decision.result}:{key}", time.monotonic())
            if left_out is None:
                return
            fields["left_out"] = left_out
        log.event("relay_dsn_suppressed", "warning", qid=qid, sender=sender[:300],
                  result=decision.result.value, why=decision.why, **fields)

    def _finish(self, name: str, disposition: str, state: RelayState | None) -> None:
        if disposition == "done":
            self.spool.finish(name)
            return
        _where, keep_error = self.spool.fail(name, state)
        if keep_error is not None:         # only requeue-failed needs it: not worth a retry
            log.event("relay_state_keep_failed", "warning", file=name, error=str(keep_error))
