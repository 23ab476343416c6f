"""The acceptor's session table: admission, the live sessions, and eviction of silent ones.

API:
    Seat                      Protocol: what the table needs of a session or a lobby seat
                              (IngressSMTP, Lobby): its Connection (ingress.edge.connection:
                              the state and facts the table reads and moves) and evict/close
    (derived.configured_limit: the slots the config, the fd limit and the memory budget
                              allow (pure; below); SessionTable.limit is what it gave)
    SessionTable(cfg, counters, now, nofile=0)
        admit(seat, draining, now, shared_rate_over=False) -> str | None
                                   None: admitted (seat.conn.ticket set, the seat
                                   is live, and silent if bulk); else the refusal line
                                   (seat.conn.refused_why: the reason); shared_rate_over:
                                   [cluster] redis counts this IP over the cluster's rate.
                                   A fast seat is admitted by its trust tier
                                   (ingress.policy.tiers); an operator-tier seat that finds
                                   no slot takes an idle lower-tier session's (evict_for)
        spoke(seat)                it said something: never evicted for silence again
        shape(seat, score, now) -> bool   a connect-check verdict listed this bulk seat
                                   (ingress.policy.shaping.listed; the caller, ingress.edge.
                                   connect_checks.apply, asks): it is evicted before any
                                   unlisted seat, and counts against its IP key's
                                   dnsbl.listed_per_ip_max (Admission.mark_listed). True: the
                                   key is over it now; the caller closes this seat
                                   (close_listed)
        close_listed(seat)         ... with the per-IP 421, logged (evicted, reason
                                   listed_per_ip) and counted (outcome listed-per-ip)
        promote(seat)              bulk -> fast (slot accounting; the lane's session gauge)
        promoted(seat, decision, **fields)   a decision promoted a bulk seat: its identity and
                                   reasons, promote(), the "promoted_fast" count and the
                                   `promoted` log line (the MAIL FROM's SPF, a connect check)
        demote(seat)               fast -> bulk, its identity's hold released (its domain went
                                   over classify.domain_rate); it has spoken: never evicted
        within_share(decision, ip="") -> Decision   a FAST decision whose identity already
                                   holds its share (classify.identity_share) of this acceptor's
                                   fast reserve (smtp.fast_reserve; max_connections if 0) is
                                   served as bulk: BULK, reasons + "over-share:<key>". The
                                   reserve is what nobody may capture: one identity holding its
                                   share leaves the rest of it to the others (seat.identity
                                   counts from admit/promote to release). Likewise a decision
                                   whose trust tier holds its cap of the reserve
                                   ("over-share:tier:<tier>") or whose IP (`ip`) holds
                                   admission.per_ip_fast_max fast sessions of the capped tiers
                                   ("over-share:ip:<key>"): both bounds apply
        tier(seat) -> Tier         the seat's trust tier now (UNKNOWN while bulk)
        release(seat)              the session ended: its slot is free (idempotent)
        swap(old, new)             a lobby seat (ingress.edge.lobby.Lobby) became a session
        penalise(ip, now)          the early-talker penalty, in this acceptor
        sessions                   the live sessions (drain walks them)
        admission                  the slot accounting (ingress.policy.admission.Admission)

Eviction: when the slots are full, session_rules.pick_eviction chooses the bulk session that has
been connected longest without saying a word, if that is longer than
admission.evict_silent_after (default 0: any); it gets 421 (seat.evict) and its slot goes to the
newcomer. A DNS-block-listed silent seat goes first (ingress.policy.shaping.SilentSeats: the
highest score, then the longest silent, then the unlisted ones; the score arrives after
admission, while the seat waits for its banner, and shape() moves the seat in O(1)).
If none can go and the newcomer is of the operator (or third-party) tier,
tiers.pick_victim chooses an idle session (not in DATA or its ack) of a lower tier, bulk first,
then self-proven: it gets 421 4.7.0 (evicted) and its slot goes to the newcomer. A lower tier
never takes a higher one's slot. A real MTA speaks within milliseconds of the banner; a
slowloris bot never does. While there is room nobody is evicted: a held silent bot is a tarpit
(cheap, and it is not reconnecting). Evictions of silent sessions may be rate-limited
(admission.evict_rate; default inf: no limit, so a newcomer is never refused for want of an
eviction token; 0 = never evict).

The slots: smtp.max_connections, or with 0 (the default) min(RLIMIT_NOFILE - FD_SPARE,
smtp.connection_memory / admission.CONNECTION_COST); smtp.fast_reserve, or with 0 a tenth.
The fd cap: an acceptor holds one fd per session plus FD_SPARE (derived.FD_SPARE: listeners,
ZeroMQ, logs, the SPF pool), so it admits at most RLIMIT_NOFILE - FD_SPARE sessions (the soft
limit after procs.raise_nofile raised it to the hard one; nofile=0: no cap), and an explicit
fast reserve shrinks in proportion. Beyond that a client gets 421 4.7.0 (slots) instead of libuv's
silent accept-and-close on EMFILE; the first refusal the cap causes is logged (fd_limit_reached,
then at most once a minute).

Failure modes: none raised; refusals are lines. Limits: per acceptor (admission's limits); the
silent set holds bulk sessions only, in admission order within a class (so each class's first is
its longest-silent).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from ingress.core import log, metrics
from ingress.core.addr import ip_key
from ingress.core.config import Config
from ingress.core.derived import FD_SPARE, configured_limit
from ingress.core.metrics_labels import Outcome
from ingress.core.ratelimit import TokenBucket
from ingress.core.wire import Lane
from ingress.edge.connection import Connection
from ingress.policy.admission import Admission, AdmissionLimits
from ingress.policy.admission import Refusal as Reason
from ingress.policy.classify import Decision
from ingress.policy.identity import fast_slots, over_share, over_share_reason, share_key
from ingress.policy.replies import Refusal, text
from ingress.policy.session_rules import pick_eviction
from ingress.policy.shaping import SilentSeats
from ingress.policy.tiers import (
    Tier,
    TierShares,
    fast_tier,
    over_ip_reason,
    over_tier_reason,
    pick_victim,
    session_tier,
)


class Seat(Protocol):
    conn: Connection   # its state and facts (ingress.edge.connection): peer_ip, lane, ticket,
                       # refused_why, identity (who vouched for a fast session; "" for bulk),
                       # admitted, busy (inside DATA or its ack: never evicted for another),
                       # started (monotonic)

    def evict(self, line: str, reason: str) -> None: ...  # reason: the log line's token

    def close_if_idle(self, line: str) -> bool: ...

    def close_with(self, line: str) -> None: ...


FD_LOG_INTERVAL = 60.0     # seconds between two fd_limit_reached lines


class SessionTable:
    def __init__(self, cfg: Config, counters: Counter[str], now: float, nofile: int = 0) -> None:
        a = cfg.admission
        self.cfg, self.counters = cfg, counters
        self.limit = configured_limit(cfg, nofile)
        max_connections, fast_reserve = self.limit.max_connections, self.limit.fast_reserve
        self.nofile = nofile
        self.fd_capped = self.limit.limited_by == "fd"
        self._fd_lines = log.Throttle(FD_LOG_INTERVAL, 1)
        self.admission = Admission(AdmissionLimits(
            max_connections=max_connections, fast_reserve=fast_reserve,
            per_ip_bulk_max=a.per_ip_bulk_max, per_ip_rate=a.per_ip_rate,
            per_ip_burst=a.per_ip_burst, penalty_s=a.penalty, ipv6_prefix=a.ipv6_prefix,
            per_ip_fast_max=a.per_ip_fast_max, shares=TierShares.of(cfg),
            listed_per_ip_max=cfg.dnsbl.listed_per_ip_max, listed_ttl=cfg.dnsbl.listed_ttl))
        self.sessions: set[Seat] = set()
        self.silent: SilentSeats[Seat] = SilentSeats()   # bulk, not spoken yet
        # evict_rate: 0 = never (None), inf = no limit (a rate-0 bucket always has a token)
        self.evictions = None if a.evict_rate <= 0 else TokenBucket(0.0) \
            if a.evict_rate == float("inf") else \
            TokenBucket(a.evict_rate, max(1.0, a.evict_rate), now=now)
        self.identity_share = cfg.classify.identity_share
        self.by_identity: Counter[str] = Counter()   # share key -> fast sessions holding a slot

    def within_share(self, decision: Decision, ip: str = "") -> Decision:
        if decision.lane is not Lane.FAST or not decision.identity:
            return decision
        key = share_key(decision.identity)
        tier = fast_tier(decision.identity)
        limits = self.admission.limits
        if over_share(self.by_identity[key],
                      fast_slots(limits.max_connections, limits.fast_reserve),
                      self.identity_share):
            metrics.over_share("session", key)
            reason = over_share_reason(decision.identity)
        else:
            why = self.admission.fast_refusal(ip, tier)
            if why is None:
                return decision
            metrics.over_tier(tier.label, "session" if why == "tier" else "ip")
            reason = over_tier_reason(tier) if why == "tier" \
                else over_ip_reason(ip_key(ip, limits.ipv6_prefix))
        self.counters["over_share"] += 1
        reasons = (*decision.reasons, reason)
        log.throttled("over_share", ip, identity=decision.identity, tier=tier.label,
                      reasons=",".join(reasons), served="bulk")
        return Decision(Lane.BULK, reasons)

    @staticmethod
    def tier(seat: Seat) -> Tier:
        return session_tier(seat.conn.lane, seat.conn.identity)

    def _hold(self, seat: Seat) -> None:
        if seat.conn.identity:
            self.by_identity[share_key(seat.conn.identity)] += 1

    def _unhold(self, seat: Seat) -> None:
        if seat.conn.lane is Lane.FAST and seat.conn.identity:
            key = share_key(seat.conn.identity)
            self.by_identity[key] -= 1
            if self.by_identity[key] <= 0:
                del self.by_identity[key]

    def admit(self, seat: Seat, draining: bool, now: float,
              shared_rate_over: bool = False) -> str | None:
        """Slots: the fast lane may use any of max_connections; bulk never the fast reserve,
        and bulk is capped per IP (/64) in count and connection rate. shared_rate_over: the
        cluster's count of this IP's connections ([cluster] redis) is over its limit: a bulk
        session is refused as over the rate (a penalty still takes precedence)."""
        if draining:
            return text(Refusal.SHUTTING_DOWN, host=self.cfg.smtp.hostname)
        if shared_rate_over and seat.conn.lane is Lane.BULK \
                and not self.admission.is_penalised(seat.conn.peer_ip, now):
            self.counters[f"refused_{Reason.RATE.value}"] += 1
            seat.conn.refused_why = Reason.RATE.value
            return text(Refusal.RATE)
        tier = self.tier(seat)
        verdict = self.admission.try_admit(seat.conn.peer_ip, seat.conn.lane, now, tier)
        if not verdict.admitted and verdict.reason is Reason.SLOTS and self.evict_silent(now):
            verdict = self.admission.try_admit(seat.conn.peer_ip, seat.conn.lane, now, tier)
        if not verdict.admitted and verdict.reason is Reason.SLOTS \
                and seat.conn.lane is Lane.FAST and self.evict_for(tier, seat):
            verdict = self.admission.try_admit(seat.conn.peer_ip, seat.conn.lane, now, tier)
        if not verdict.admitted:
            if verdict.reason is Reason.SLOTS and self.fd_capped:
                self._log_fd_cap(now)
            self.counters[f"refused_{verdict.reason.value}"] += 1
            seat.conn.refused_why = verdict.reason.value
            return verdict.reply
        seat.conn.ticket = verdict.ticket
        self.sessions.add(seat)
        if seat.conn.lane is Lane.BULK:
            self.silent.add(seat, now)
        else:
            self._hold(seat)
        return None

    def _log_fd_cap(self, now: float) -> None:
        """Slots full and they were capped by the fd limit: say so (rate-limited)."""
        if self._fd_lines.due("", now) is None:
            return
        log.event("fd_limit_reached", "warning", nofile=self.nofile, fd_spare=FD_SPARE,
                  max_connections=self.cfg.smtp.max_connections,
                  effective=self.admission.limits.max_connections,
                  why="slots capped at RLIMIT_NOFILE - FD_SPARE: 421 instead of EMFILE "
                      "(too many open files)",
                  hint="raise LimitNOFILE / ulimit -n")

    def evict_silent(self, now: float) -> bool:
        victim = pick_eviction(self.silent.heads(), now,
                               silent_after=self.cfg.admission.evict_silent_after,
                               bucket=self.evictions)
        if victim is None:
            return False
        listed = self.silent.score(victim) > 0
        self.counters["evicted_silent"] += 1
        if listed:
            self.counters["evicted_listed"] += 1
        metrics.connection(victim.conn.lane, Outcome.EVICTED_SILENT)
        victim.evict(text(Refusal.EVICTED_SILENT, host=self.cfg.smtp.hostname),
                     "silent_listed" if listed else "silent")
        return True

    def shape(self, seat: Seat, score: float, now: float) -> bool:
        """A verdict listed this bulk seat with `score` (module docstring)."""
        if seat not in self.sessions or seat.conn.lane is not Lane.BULK:
            return False
        self.silent.mark(seat, score)
        return seat.conn.ticket is not None and self.admission.mark_listed(seat.conn.ticket, now)

    def close_listed(self, seat: Seat) -> None:
        """Its IP key holds more listed sessions than dnsbl.listed_per_ip_max: this one (the
        newest listed) goes, with the line admission's per-IP refusal has."""
        self.counters[f"refused_{Reason.LISTED_PER_IP.value}"] += 1
        metrics.connection(seat.conn.lane, Outcome.LISTED_PER_IP)
        seat.evict(text(Refusal.PER_IP), "listed_per_ip")

    def evict_for(self, tier: Tier, newcomer: Seat) -> bool:
        """No slot for a newcomer of `tier`: close an idle session of a lower tier
        (tiers.pick_victim; only the operator and third-party tiers may take one's room).
        Scans the sessions: this runs only when the slots are full for such a client."""
        victim = pick_victim(tier, ((seat, self.tier(seat), seat.conn.busy, seat.conn.started)
                                    for seat in self.sessions if seat.conn.admitted))
        if victim is None:
            return False
        self.counters["evicted_for_tier"] += 1
        metrics.connection(victim.conn.lane, Outcome.EVICTED)
        log.event("made_room", peer=newcomer.conn.peer_ip, tier=tier.label,
                  victim=victim.conn.peer_ip, victim_tier=self.tier(victim).label)
        victim.evict(text(Refusal.EVICTED, host=self.cfg.smtp.hostname), "made_room")
        return True

    def spoke(self, seat: Seat) -> None:
        self.silent.pop(seat)

    def swap(self, old: Seat, new: Seat) -> None:
        """A lobby seat (ingress.edge.lobby) became a session: `new` holds the slot now. It is
        handed the client's first bytes, so it is not silent any more."""
        if old in self.sessions:
            self.sessions.discard(old)
            self.sessions.add(new)
        self.silent.pop(old)

    def release(self, seat: Seat) -> None:
        if seat in self.sessions:
            self._unhold(seat)
        self.sessions.discard(seat)
        self.silent.pop(seat)
        if seat.conn.ticket is not None:
            self.admission.release(seat.conn.ticket)

    def promote(self, seat: Seat) -> None:
        """Bulk -> fast, in the tier of seat.conn.identity (set by the caller before)."""
        if seat.conn.ticket is not None:
            self.admission.promote(seat.conn.ticket, fast_tier(seat.conn.identity))
        self.silent.pop(seat)            # a fast session is never evicted for being silent
        if seat.conn.admitted and seat.conn.lane is not Lane.FAST:
            metrics.session_close(seat.conn.lane)
            metrics.session_open(Lane.FAST)
        if seat.conn.lane is not Lane.FAST and seat in self.sessions:
            self._hold(seat)
        seat.conn.lane = Lane.FAST

    def promoted(self, seat: Seat, decision: Decision, **fields: object) -> None:
        seat.conn.identity = decision.identity
        self.promote(seat)
        seat.conn.reasons = decision.reasons
        self.counters[f"promoted_{Lane.FAST.value}"] += 1
        log.event("promoted", peer=seat.conn.peer_ip, reasons=",".join(decision.reasons),
                  identity=decision.identity, **fields)

    def demote(self, seat: Seat) -> None:
        if seat.conn.lane is not Lane.FAST:
            return
        if seat.conn.ticket is not None:
            self.admission.demote(seat.conn.ticket)
        if seat in self.sessions:
            self._unhold(seat)
        if seat.conn.admitted:
            metrics.session_close(Lane.FAST)
            metrics.session_open(Lane.BULK)
        seat.conn.lane = Lane.BULK
        seat.conn.identity = ""

    def penalise(self, ip: str, now: float) -> None:
        self.admission.penalise(ip, now)
