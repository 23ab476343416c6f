"""The DATA phase of a session: aiosmtpd's smtp_DATA, reading the message in bulk into one buffer.

API:
    DataPhase     an aiosmtpd SMTP that provides smtp_DATA: the lowest of the layers of
                  ingress.edge.smtp.IngressSMTP (below ingress.edge.smtp_commands.CommandPhase);
                  it uses the session's ctx (ingress.edge.host.SessionHost) and its Connection
                  (conn: lane, peer_ip; it moves the state through DATA, ACK_WAIT, ACK_DONE and
                  DATA_END: busy and awaiting_ack derive from it; ingress.policy.conn_state).

What it keeps of aiosmtpd's smtp_DATA: the checks before 354 (HELO, AUTH, RCPT, no argument),
end-of-data, dot-unstuffing, the line-length (500) and size (552) replies. What it changes: the
message is read into one bytearray by ingress.edge.dataread (aiosmtpd keeps a bytearray per line,
about 23x the message for short lines) and charged to the acceptor's DATA budget by the
session's trust tier (ingress.policy.tiers: bulk never takes the fast reserve, a capped tier at
most its part of it and then the bulk share): a DATA with no room left for its tier (never the
operator's) gets 452 4.3.1 at once, a message that overflows it mid-transfer
is read to its end, dropped and answered 452 4.3.1; and no idle timer runs while the worker's
ack is awaited (the ack wait has its own deadline, smtp.ack_timeout).

Failure modes: none of its own; the hook's exceptions go to aiosmtpd's handle_exception (our
handler answers 451 4.3.0). Limits: smtp.max_message_size, the line length, the DATA budget.
"""

from __future__ import annotations

from aiosmtpd.smtp import MISSING, SMTP

from ingress.core import log
from ingress.edge.connection import ConnView
from ingress.edge.dataread import DataReader, DataState, read_stream
from ingress.edge.host import SessionHost
from ingress.policy.conn_state import Event
from ingress.policy.replies import Refusal, text
from ingress.policy.tiers import Tier, session_tier


class DataPhase(ConnView, SMTP):
    ctx: SessionHost           # (conn, the Connection, and its read-only views: ConnView)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's smtp_DATA (same checks, replies and end-of-data, dot-unstuffing,
        line-length and size semantics), but the message is read into one bytearray in bulk
        (ingress.edge.dataread) and charged to the acceptor's DATA budget; the idle timers are off
        while the worker's ack is awaited (the ack wait has its own deadline)."""
        if await self._data_refused(arg):
            return
        assert self.envelope is not None
        budget = self.ctx.data_budget
        self.conn.fire(Event.DATA)          # busy: never evicted, drained or idle-timed
        reader = DataReader(self.data_size_limit, budget, self.lane, self.line_length_limit,
                            tier=self.tier)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            if not await read_stream(self._reader, self._writer, reader):
                return
            if reader.state is not DataState.NOMINAL:
                await self._data_failed(reader)
                return
            content = reader.content()
            self.envelope.content = content
            self.envelope.original_content = content
            self.conn.fire(Event.ACK_WAIT)   # no idle timer now
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            try:
                status = await self._call_handler_hook("DATA")
            finally:
                self.conn.fire(Event.ACK_DONE)
                self.envelope.content = self.envelope.original_content = None
                self._reset_timeout()       # the idle timer again, whatever happened
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            reader.release()
            self.conn.fire(Event.DATA_END)

    @property
    def tier(self) -> Tier:
        """This session's trust tier now (UNKNOWN while bulk)."""
        return session_tier(self.lane, self.identity)

    async def _data_refused(self, arg: str) -> bool:
        """aiosmtpd's checks before 354, then the DATA budget's bulk share: True = answered."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return True
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return True
        if arg:
            await self.push("501 Syntax: DATA")
            return True
        if self.ctx.data_budget.full(self.tier):
            self.ctx.count("data_no_storage", self.lane)
            log.refused("data_no_storage", self.peer_ip, stage="data", code=452,
                        port=self.peer_port, lane=self.lane.value, at="DATA")
            await self.push(text(Refusal.DATA_NO_STORAGE))
            return True
        return False

    async def _data_failed(self, reader: DataReader) -> None:
        """The message was read but cannot be taken: too long a line, too big, no storage."""
        if reader.state is DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        elif reader.state is DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
        else:
            self.ctx.count("data_no_storage", self.lane)
            log.refused("data_no_storage", self.peer_ip, stage="end_of_data", code=452,
                        port=self.peer_port, lane=self.lane.value, at="end of data",
                        size=reader.total)
            await self.push(text(Refusal.DATA_NO_STORAGE))
        self._set_post_data_state()
