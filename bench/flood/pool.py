"""The flood generator's provider pool (issue 18): a big sender's outbound pool of addresses.

Purpose
    A legitimate sender of kind "pool" is one provider's mail servers: ``spec.pool``
    consecutive addresses from ``spec.source`` on (127.8.0.1, 127.8.0.2, ...), each with a
    verified reverse name of the provider (the bench's DNS serves the PTR and A records), its
    mail DKIM-signed for its sender domain (aligned) and covered by that domain's SPF record.
    It sends one message from its first address (the message the ingress learns the provider
    from) and waits for its answer (at most the attempt's deadline), then ``spec.learn_s``
    seconds more (the learned entry reaching every acceptor), then one message every
    ``spec.interval_s`` on a fresh connection, open-loop, rotating over its addresses from the
    second one on (the first comes round again after the last).

API
    pool_addresses(source, n) -> list[str]          the pool's addresses, in order (pure)
    pool_index(k, n) -> int                         the address of attempt k after the
                                                    learned message (pure): the second on
    PoolSender(target, spec, stats, start_at=, t_run0=, grace=)   a LegitSender;
                                                    ``await run(end)``

Failure modes and limits: those of LegitSender (bench/flood/bots.py): open-loop, bounded by the
run's end; loopback addresses only (FloodConfig checks the first; the pool stays in its /24).
"""

from __future__ import annotations

import asyncio
import ipaddress
from functools import cached_property
from typing import Any

from bench.flood.adversary import signed_message
from bench.flood.bots import LegitSender

DEFAULT_LEARN_S = 1.0


def pool_addresses(source: str, n: int) -> list[str]:
    """`n` consecutive addresses from `source` on, within its /24 (ValueError beyond it)."""
    first = ipaddress.IPv4Address(source)
    out = [str(first + i) for i in range(n)]
    if n < 1 or ipaddress.IPv4Address(out[-1]).packed[:3] != first.packed[:3]:
        raise ValueError(f"a pool of {n} from {source} leaves its /24")
    return out


def pool_index(k: int, n: int) -> int:
    """Attempt k (0, 1, ...) of the rotation after the learned message: its address's index,
    from the second address on, the first again after the last."""
    return (k + 1) % n


class PoolSender(LegitSender):
    """LegitSender over a provider's pool: pool_plan's times and addresses, DKIM-signed mail."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        sp = self.spec
        assert sp.source is not None
        self.addresses = pool_addresses(sp.source, sp.pool)
        self.learn_s = DEFAULT_LEARN_S if sp.learn_s is None else sp.learn_s
        self.learning = False
        # Signed here, before the window: dkimpy signs in Python (RSA, about 7 ms), and a
        # signature per message on the probe's one loop delayed the other senders'
        # transactions in flight (the allow-listed sender's no-flood p50 went from 4.5 to 11 ms
        # once the rotation began). The learned message (True), the rotation's (False).
        self._signed = {learning: self._sign(learning) for learning in (True, False)}

    @cached_property
    def _key(self) -> bytes:
        if not self.spec.dkim_key:
            return b""
        with open(self.spec.dkim_key, "rb") as f:
            return f.read()

    async def run(self, end: float) -> None:
        """The learned message (awaited: "after one learned message"), then the rotation."""
        loop = asyncio.get_running_loop()
        delay = self.start_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self.learning = True
        try:
            self.stats.record(await self.attempt(0))
        finally:
            self.learning = False
        self.start_at = loop.time() + self.learn_s
        await super().run(end)

    def source(self, k: int) -> str | None:
        return self.addresses[0 if self.learning else pool_index(k, len(self.addresses))]

    def message(self, k: int) -> bytes:
        return self._signed[self.learning]

    def _sign(self, learning: bool) -> bytes:
        sp = self.spec
        assert sp.mail_from and sp.rcpt and sp.size
        tag = f"{sp.name}-learn" if learning else f"{sp.name}-rotation"
        return signed_message(sp.mail_from, sp.rcpt, sp.size, tag, self._key,
                              sp.dkim_selector or "bench")
