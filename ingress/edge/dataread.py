"""DATA reception at about the message's size: one bytearray per message, scanned in bulk.

Purpose: aiosmtpd's smtp_DATA keeps one bytearray per line (about 23x the message for short
lines) and runs Python code per line (a 256 KiB read of 3-byte lines stalled the event loop for
~120 ms). DataReader takes whatever the stream buffer holds, finds the end of data and checks
line lengths with bytes methods (C loops), and appends to one bytearray.

API (pure: no I/O, but read_stream; the SMTP layer feeds it from its StreamReader's buffer):
    DataState                       NOMINAL, TOO_LONG (500), TOO_MUCH (552), NO_STORAGE (452)
    DataBudget(total, fast_reserve, shares=TierShares())   the bytes in DATA of one acceptor:
                                    charge(tier, n) -> the tier charged (the session's, or
                                    UNKNOWN: a capped tier past its cap is charged as bulk) or
                                    None; release(tier, n); full(tier) (less than MIN_FREE left
                                    for that tier, bulk included for a capped tier; never for
                                    the operator's); take(lane, n) / give(lane, n) /
                                    bulk_full() for a lane (FAST = the operator tier). The
                                    rule is ingress.policy.tiers.admits: bulk never uses
                                    fast_reserve, the third-party and self-proven tiers each at
                                    most their share of it, the operator the rest
    DataReader(size_limit, budget, lane, line_limit=1001, tier=None)   `tier`: the session's
                                    trust tier (ingress.policy.tiers; None: by the lane)
        feed(buf) -> (consumed, done)   consume from `buf` (the caller deletes `consumed` bytes);
                                        done: the end-of-data line was consumed
        content() -> bytes              the message, dot-unstuffed (NOMINAL only)
        release()                       give every charged byte back to the budget (always call)
    read_stream(stream, writer, reader) -> bool   the one piece of I/O here, the SMTP layer's
                                    glue: feed an asyncio StreamReader's buffer to `reader`
                                    until the end of data; False: the connection is gone

Semantics are aiosmtpd 1.4.6's smtp_DATA, which tests/integration/test_resources.py compares
byte for byte: lines end at CRLF only (a bare CR or LF is part of a line: the SMTP layer refuses
those messages afterwards); a line of only "." ends the data; a leading "." of a line is removed;
a line longer than line_limit bytes with its CRLF -> TOO_LONG; more than size_limit bytes of
lines (CRLFs and stuffing dots included, the final ".\r\n" not) -> TOO_MUCH; the first of the two
in stream order wins (a line that is both is TOO_LONG). Data after an error is read and dropped,
and the reply comes after the end of data (RFC 5321 4.2.5).

Budget: each consumed piece is charged before it is kept (a self-proven or third-party session
past its tier's part of the reserve is charged to the bulk share, as the session would be served
past its cap). A piece that does not fit (a bulk session past the bulk share, any session past
the total, a capped tier past both its part and the bulk share) turns the message into
NO_STORAGE: what
it held is given back at once, the rest is read and dropped, and the reply after the end of data
is 452 4.3.1. The charge stays until release(), i.e. through the ack wait, while the body is
still held.

Limits: at most 4 bytes (an incomplete terminator) are left in the buffer between feeds; a CRLF
is never split between two pieces. Peak memory at the end is about twice the message (the
bytearray and the bytes returned), for the moment of the copy.
"""

from __future__ import annotations

import asyncio
import functools
import re
from enum import Enum

from ingress.core.wire import Lane
from ingress.policy.tiers import CAPPED, FAST_TIERS, Tier, TierShares, admits

TERMINATOR = b"\r\n.\r\n"
MIN_FREE = 64 * 1024         # a bulk DATA is refused at once when less than this is left
CRLF = b"\r\n"


@functools.lru_cache(maxsize=4)
def _long_run_pattern(line_limit: int) -> re.Pattern[bytes]:
    return re.compile(rb"\n[^\n]{%d}" % line_limit)


class DataState(Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too_long"        # 500 Line too long
    TOO_MUCH = "too_much"        # 552 too much mail data
    NO_STORAGE = "no_storage"    # 452 4.3.1 the acceptor's DATA budget is spent


class DataBudget:
    """Bytes held in DATA by all the sessions of one acceptor. Bulk at most
    total - fast_reserve, so the reserve is always there for the fast lane; of the reserve the
    capped tiers each at most their share (ingress.policy.tiers.admits), the operator tier the
    rest and anything free."""

    def __init__(self, total: int, fast_reserve: int,
                 shares: TierShares | None = None) -> None:
        if not 0 <= fast_reserve < total:
            raise ValueError("need 0 <= fast_reserve < total")
        self.total, self.fast_reserve = total, fast_reserve
        self.shares = shares or TierShares()
        self.used = 0
        self._held: dict[Tier, int] = dict.fromkeys(FAST_TIERS, 0)

    @property
    def bulk_limit(self) -> int:
        return self.total - self.fast_reserve

    @property
    def used_bulk(self) -> int:
        """Bytes charged as bulk (bulk sessions, and capped tiers past their part)."""
        return self.used - sum(self._held.values())

    def held(self, tier: Tier) -> int:
        return self._held.get(tier, 0)

    def _fits(self, tier: Tier, n: int) -> bool:
        return admits(tier, n, self._held, self.used, self.total, self.fast_reserve,
                      self.shares)

    def full(self, tier: Tier) -> bool:
        """Less than MIN_FREE (or a tenth of the bulk share) left for `tier` (for a capped
        tier: in its part nor in the bulk share): not worth a 354. Never for the operator."""
        if tier is Tier.OPERATOR:
            return False
        need = min(MIN_FREE, max(1, self.bulk_limit // 10))
        if tier in CAPPED and self._fits(tier, need):
            return False
        return not self._fits(Tier.UNKNOWN, need)

    def bulk_full(self) -> bool:
        return self.full(Tier.UNKNOWN)

    def charge(self, tier: Tier, n: int) -> Tier | None:
        """Charge `n` bytes for a session of `tier`: the tier charged (UNKNOWN for bulk, or
        for a capped tier past its part of the reserve), or None (it does not fit)."""
        if tier is not Tier.UNKNOWN and self._fits(tier, n):
            self._held[tier] += n
            self.used += n
            return tier
        if tier is not Tier.OPERATOR and self._fits(Tier.UNKNOWN, n):
            self.used += n
            return Tier.UNKNOWN
        return None

    def release(self, tier: Tier, n: int) -> None:
        self.used -= n
        if tier is not Tier.UNKNOWN:
            self._held[tier] -= n

    def take(self, lane: Lane, n: int) -> bool:
        return self.charge(_lane_tier(lane), n) is not None

    def give(self, lane: Lane, n: int) -> None:
        self.release(_lane_tier(lane), n)


def _lane_tier(lane: Lane) -> Tier:
    return Tier.OPERATOR if lane is Lane.FAST else Tier.UNKNOWN


class DataReader:
    def __init__(self, size_limit: int | None, budget: DataBudget | None, lane: Lane,
                 line_limit: int = 1001, tier: Tier | None = None) -> None:
        self.size_limit = size_limit or 0
        self.budget, self.lane, self.line_limit = budget, lane, line_limit
        self.tier = Tier.UNKNOWN if lane is Lane.BULK else tier or Tier.OPERATOR
        self.state = DataState.NOMINAL
        self.raw = bytearray()
        self.total = 0           # bytes of lines so far (aiosmtpd's num_bytes)
        self.line = 0            # length of the incomplete line so far
        self.charged = 0
        self._charges: dict[Tier, int] = {}     # what was charged as which tier
        self.at_start = True

    def feed(self, buf: bytes | bytearray) -> tuple[int, bool]:
        if self.at_start:
            if len(buf) < 3 and b".\r\n".startswith(bytes(buf)):
                return 0, False
            if buf[:3] == b".\r\n":        # an empty message
                self.at_start = False
                return 3, True
        i = buf.find(TERMINATOR)
        if i >= 0:
            end, consumed, done = i + 2, i + 5, True
        else:
            end = max(0, len(buf) - 4)
            if end and buf[end - 1] == 13:     # never split a CRLF between two pieces
                end -= 1
            consumed, done = end, False
        if end:
            self.at_start = False
            self._take(buf[:end])
        return consumed, done

    def _take(self, seg: bytes | bytearray) -> None:
        n = len(seg)
        if self.state is DataState.NOMINAL:
            self._check(seg)
        self.total += n
        if self.state is not DataState.NOMINAL:
            return
        if self.budget is not None:
            got = self.budget.charge(self.tier, n)
            if got is None:
                self._fail(DataState.NO_STORAGE)
                return
            self.charged += n
            self._charges[got] = self._charges.get(got, 0) + n
        self.raw += seg

    def _check(self, seg: bytes | bytearray) -> None:
        """Line lengths and the size limit over one piece, in C loops (bytes methods and one
        regex); the order of the two errors is worked out line by line only when both occur
        in this piece."""
        limit, n = self.line_limit, len(seg)
        i0 = seg.find(CRLF)
        if i0 < 0:
            last, too_long = self.line + n, False
        else:
            j = seg.rfind(CRLF)
            last = n - j - 2
            too_long = self.line + i0 + 2 > limit or self._long_line(seg, i0 + 2, j + 2)
        too_long = too_long or last > limit
        too_much = bool(self.size_limit) and self.total + n > self.size_limit
        if too_long and too_much:
            self._fail(self._first_error(seg.split(CRLF)))
        self.line = last
        if self.state is not DataState.NOMINAL:
            return
        if too_long:
            self._fail(DataState.TOO_LONG)
        elif too_much:
            self._fail(DataState.TOO_MUCH)

    def _long_line(self, seg: bytes | bytearray, start: int, end: int) -> bool:
        """Is a complete line in seg[start:end] (whole lines) longer than line_limit with its
        CRLF? Without bare LFs, exactly when a run of line_limit non-LF bytes follows an LF
        (the content and the CR of its CRLF; seg[start - 1] is the LF of the CRLF before the
        region); with bare LFs (refused later anyway), line by line."""
        if seg.count(b"\n", start, end) == seg.count(CRLF, start, end):
            # Anchored on the LF before each line, so each line is scanned once (linear).
            return self._long_run.search(seg, start - 1, end) is not None
        return max(map(len, seg[start:end].split(CRLF)), default=0) + 2 > self.line_limit

    @functools.cached_property
    def _long_run(self) -> re.Pattern[bytes]:
        return _long_run_pattern(self.line_limit)

    def _first_error(self, parts: list[bytes] | list[bytearray]) -> DataState:
        total, line = self.total, self.line
        for k, p in enumerate(parts):
            complete = k < len(parts) - 1
            length = (line if k == 0 else 0) + len(p) + (2 if complete else 0)
            total += len(p) + (2 if complete else 0)
            if length > self.line_limit:
                return DataState.TOO_LONG
            if total > self.size_limit:
                return DataState.TOO_MUCH
        return DataState.TOO_LONG      # pragma: no cover - one of the two occurred

    def _fail(self, state: DataState) -> None:
        self.state = state
        self.raw = bytearray()
        self.release()

    def content(self) -> bytes:
        raw, self.raw = self.raw, bytearray()
        if raw[:1] == b".":
            del raw[0]
        if b"\r\n." in raw:
            raw = raw.replace(b"\r\n.", CRLF)
        return bytes(raw)

    def release(self) -> None:
        if self.budget is not None:
            for tier, n in self._charges.items():
                self.budget.release(tier, n)
        self._charges.clear()
        self.charged = 0


async def read_stream(stream: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      reader: DataReader) -> bool:
    """Feed the stream buffer to `reader` until the end of data. False: the connection
    is gone (aiosmtpd's eof_received cancels the reading task in the same case)."""
    buf: bytearray = stream._buffer           # type: ignore[attr-defined]
    while True:
        if stream._exception is not None:     # type: ignore[attr-defined]
            raise stream._exception           # type: ignore[attr-defined]
        if buf:
            n, done = reader.feed(buf)
            if n:
                del buf[:n]
                stream._maybe_resume_transport()  # type: ignore[attr-defined]
            if done:
                return True
        if stream.at_eof() or stream._eof:    # type: ignore[attr-defined]
            return False
        try:
            await stream._wait_for_data("smtp_DATA")  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            writer.close()                    # the connection was reset during DATA
            raise
