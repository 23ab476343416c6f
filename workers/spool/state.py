"""The relay's pure delivery state: replies, per-message state, settling, backoff, addresses.

API (pure: no I/O, the clock is an argument):
    backoff(attempt, base, maximum) -> float    base doubling per attempt, capped
    Reply(code, text, local=False)              one downstream reply (.kind ok|temp|perm,
                                                .status the RFC 3463 code, .line())
    address_problem(addr, sender=, utf8=) -> Reply | None
                                                can this address be sent at all
    envelope_sender(env) -> str                 MAIL FROM of a spool envelope ("" = null)
    RelayState                                  what is durably known about one message
                                                (attempts, next_at, delivered, failed,
                                                last_error; .pending(rcpts), encode/decode)
    failure_for(rcpt, reply, expired) -> Failure    one recipient to report in a DSN
    settle(state, results, rcpts=, now=, received_at=, cfg=) -> Outcome
                                                one attempt's results folded into the state
    outcome_fields(out, results, attempt=, now=, received_at=, dsn=) -> dict
                                                the fields of the one `relay` log line of an
                                                attempt (outcome delivered | deferred |
                                                bounced | failed, the reply that decided it)

Rules: 2xx -> delivered (never sent again); 5xx -> failed; 4xx (and 503: our session out of
step, never a verdict on the message) -> deferred, retried after backoff(attempt); once the
message is older than relay.max_age a deferral fails with status 4.4.7. A recipient without a
result is deferred, so a message is never finished while one has none.
Failure modes: RelayState.decode raises orjson.JSONDecodeError / ValueError / TypeError /
AttributeError on a corrupt state file (the caller treats it as never tried).
Limits: addresses are checked for what can be sent (control characters, space, <>, length,
non-ASCII without SMTPUTF8), not for syntax beyond that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from ingress.core.config import RelayConfig


def backoff(attempt: int, base: float, maximum: float) -> float:
    """Delay before retry number `attempt` (1 = the first retry): base doubling, capped."""
    if attempt <= 0:
        return 0.0
    return min(base * 2.0 ** min(attempt - 1, 64), maximum)




_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True)
class Reply:
    """One downstream reply for one recipient. local=True: made up here (connection trouble)."""
    code: int
    text: str
    local: bool = False

    @property
    def kind(self) -> Literal["ok", "temp", "perm"]:
        if 200 <= self.code < 300:
            return "ok"
        if self.code == 503:
            # Bad sequence of commands: our session is out of step (a half-open transaction),
            # never a verdict on the message. Retried; at max_age it fails as 4.4.7.
            return "temp"
        return "perm" if 500 <= self.code < 600 else "temp"

    @property
    def status(self) -> str:
        """The RFC 3463 status: the enhanced code in the text, else derived from the class."""
        m = _ENHANCED.match(self.text.strip())
        if m and m.group(1) == str(self.code // 100):
            return ".".join(m.groups())
        return {"ok": "2.0.0", "temp": "4.0.0", "perm": "5.0.0"}[self.kind]

    def line(self) -> str:
        return f"{self.code} {self.text}".strip()


ADDRESS_MAX = 254     # octets in a path without its <> (RFC 5321 4.5.3.1.3: 256 with them)


def _unsafe_char(c: str) -> bool:
    o = ord(c)
    return (o <= 0x20 or o == 0x7f or 0x80 <= o <= 0x9f or 0xd800 <= o <= 0xdfff
            or c in "<>\u2028\u2029")


def address_problem(addr: str, *, sender: bool, utf8: bool) -> Reply | None:
    """Why `addr` cannot go into MAIL FROM (sender=True) or RCPT TO, as the local permanent
    Reply to record for it; None if it can. Pure. `utf8`: the downstream offers SMTPUTF8.

    Refused: NUL, CR, LF and every other control character (C0, DEL, C1, U+2028/9), space,
    angle brackets, lone surrogates (command or parameter injection, or not encodable at all)
    -> 5.1.3 (5.1.7 for the sender); a path over ADDRESS_MAX octets -> the same; a non-ASCII
    address when the downstream has no SMTPUTF8 -> 5.6.7 (RFC 6531 3.2). The null sender is
    fine; an empty recipient is not."""
    bad = "5.1.7 bad sender address syntax" if sender else "5.1.3 bad recipient address syntax"
    if addr == "":
        return None if sender else Reply(553, bad + ": empty", local=True)
    if len(addr) > ADDRESS_MAX:
        return Reply(553, f"{bad}: longer than {ADDRESS_MAX} octets", local=True)
    if any(map(_unsafe_char, addr)):
        return Reply(553, f"{bad}: control character, space or angle bracket", local=True)
    if len(addr.encode("utf-8")) > ADDRESS_MAX:
        return Reply(553, f"{bad}: longer than {ADDRESS_MAX} octets", local=True)
    if not utf8 and not addr.isascii():
        return Reply(553, "5.6.7 non-ASCII address and the downstream does not offer SMTPUTF8",
                     local=True)
    return None


def envelope_sender(env: dict[str, Any]) -> str:
    """MAIL FROM of a spool envelope; the null sender is "" (the acceptor may store "<>")."""
    sender = str(env["mail_from"]).strip()
    return "" if sender in ("", "<>") else sender


def _oneline(text: str, limit: int = 900) -> str:
    return " ".join(text.split())[:limit]


@dataclass
class RelayState:
    """What is durably known about one message's relaying (spool/relay/<name>)."""
    attempts: int = 0                  # deliveries that ended with something deferred
    next_at: float = 0.0               # wall clock: not before this
    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    last_error: str = ""

    def pending(self, rcpts: Sequence[str]) -> list[str]:
        settled = set(self.delivered) | set(self.failed)
        out: list[str] = []
        for r in rcpts:
            if r not in settled and r not in out:
                out.append(r)
        return out

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, "attempts": self.attempts, "next_at": self.next_at,
                             "delivered": self.delivered, "failed": self.failed,
                             "last_error": self.last_error})

    @classmethod
    def decode(cls, raw: bytes) -> RelayState:
        d = orjson.loads(raw)
        return cls(attempts=int(d.get("attempts", 0)), next_at=float(d.get("next_at", 0.0)),
                   delivered=[str(x) for x in d.get("delivered", [])],
                   failed=[str(x) for x in d.get("failed", [])],
                   last_error=str(d.get("last_error", "")))


@dataclass(frozen=True)
class Failure:
    """One recipient to report in a DSN."""
    rcpt: str
    status: str                 # RFC 3463, e.g. "5.1.1" or "4.4.7"
    diagnostic: str             # "smtp; 550 5.1.1 ..." or "X-Ingress; ..." ("" = none)
    reply: str                  # human-readable reason


def failure_for(rcpt: str, reply: Reply, expired: bool = False) -> Failure:
    line = _oneline(reply.line())
    diag = f"X-Ingress; {line}" if reply.local else f"smtp; {line}"
    if expired:
        return Failure(rcpt, "4.4.7", diag, f"delivery time expired; last error: {line}")
    return Failure(rcpt, reply.status, diag, line)


@dataclass(frozen=True)
class Outcome:
    state: RelayState
    bounce: tuple[Failure, ...]          # newly failed recipients: report them now
    disposition: Literal["done", "failed", "retry"]
    delivered_now: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()


_NO_RESULT = Reply(451, "4.3.0 no result for this recipient", local=True)


def settle(state: RelayState, results: dict[str, Reply], *, rcpts: Sequence[str], now: float,
           received_at: float, cfg: RelayConfig) -> Outcome:
    """Fold one delivery attempt's per-recipient results into the state. Pure.

    Every recipient of the message (`rcpts`) not settled in `state` is pending. A pending
    recipient missing from `results` (or with a 4xx) is deferred, so the message is never
    finished while a recipient has no result; once the message is older than cfg.max_age a
    deferral is a failure with status 4.4.7. Results for recipients that are not pending
    (not in the message, or already settled) are ignored."""
    pending = state.pending(rcpts)
    new = RelayState(state.attempts, state.next_at, list(state.delivered), list(state.failed),
                     state.last_error)
    bounce: list[Failure] = []
    delivered: list[str] = []
    deferred: list[str] = []
    expired = now - received_at >= cfg.max_age
    for rcpt in pending:
        reply = results.get(rcpt, _NO_RESULT)
        if reply.kind == "ok":
            new.delivered.append(rcpt)
            delivered.append(rcpt)
        elif reply.kind == "perm":
            new.failed.append(rcpt)
            bounce.append(failure_for(rcpt, reply))
        elif expired:
            new.failed.append(rcpt)
            bounce.append(failure_for(rcpt, reply, expired=True))
        else:
            deferred.append(rcpt)
            new.last_error = _oneline(reply.line(), 300)
    if deferred:
        new.attempts += 1
        new.next_at = now + backoff(new.attempts, cfg.retry_base, cfg.retry_max)
        disp: Literal["done", "failed", "retry"] = "retry"
    else:
        disp = "failed" if new.failed else "done"
    return Outcome(new, tuple(bounce), disp, tuple(delivered), tuple(deferred))



OUTCOMES = ("delivered", "deferred", "bounced", "failed")
_DECIDES = {"delivered": "ok", "deferred": "temp", "bounced": "perm", "failed": "perm"}


def outcome_fields(out: Outcome, results: dict[str, Reply], *, attempt: int, now: float,
                   received_at: float, dsn: str = "") -> dict[str, object]:
    """The `relay` line of one delivery attempt (Postfix's status= line): the message's
    outcome after it -- delivered (every recipient delivered: removed), deferred (some wait
    for a retry), bounced (settled with failures, and a DSN for them was spooled now: `dsn`
    its qid), failed (settled with failures, no DSN now: the null sender, relay.dsn withheld
    it, a sender a DSN cannot reach, or the DSN left with an earlier attempt) -- and the
    downstream's reply that decided it (the first of that kind; `local`: made up here, e.g.
    connection trouble). Pure."""
    if out.disposition == "retry":
        outcome = "deferred"
    elif out.disposition == "done":
        outcome = "delivered"
    else:
        outcome = "bounced" if dsn else "failed"
    replies = list(results.values())
    reply = next((r for r in replies if r.kind == _DECIDES[outcome]),
                 replies[0] if replies else None)
    fields: dict[str, object] = {
        "outcome": outcome, "code": reply.code if reply else 0,
        "reply": _oneline(reply.line(), 200) if reply else "",
        "local": bool(reply and reply.local), "attempts": attempt,
        "delay_s": round(max(0.0, now - received_at), 3),
        "delivered": len(out.delivered_now), "deferred": len(out.deferred),
        "failed": len(out.bounce)}
    if outcome == "deferred":
        fields["retry_in_s"] = round(max(0.0, out.state.next_at - now), 3)
    if dsn:
        fields["dsn"] = dsn
    return fields
