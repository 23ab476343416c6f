"""Acceptor processes: hold TCP connections on the listening sockets and run the SMTP dialogue.

API (the entry points the supervisor starts by name; each builds its service and hands it to the
child skeleton, ingress.core.child.main_loop, which runs it on uvloop):
    run(cfg, index, sock, hb, slot, mtls_sock, fast_sock, steer)
        a port-25 acceptor; each `*sock` is the listening socket, or a list of them (one per
        listen address), the supervisor bound for this acceptor slot (SO_REUSEPORT); all of
        them are served; `steer`: the supervisor's steer table (dnswl.steer), region `slot`
    run_fast(cfg, index, hb, slot, mtls_sock, fast_sock, steered, steer)
        a fast acceptor (supervisor.fast_acceptors): the connections handed over from port 25
        (ingress.edge.handoff), the mutual-TLS port (with mTLS acceptors: its own sockets
        there, where the kernel steers the clients they verified) and listen.fast_port, and
        the port-25 connections the kernel steers to it (`steered`)
    run_mtls(cfg, index, hb, slot, mtls_sock, known)
        an mTLS acceptor (supervisor.mtls_acceptors): the mutual-TLS port alone

Where the parts are: the process's life (listeners, background tasks, drain) is
ingress.edge.service.AcceptorService; the state its sessions share (the SessionHost,
ingress.edge.host) is ingress.edge.context.AcceptorContext; a session is
ingress.edge.smtp.IngressSMTP (after ingress.edge.lobby's seat on a plain listener), its hooks
ingress.edge.handler.IngressHandler.

The event loop (uvloop) never blocks: no DNS, no disk, no CPU-heavy work there. Every wait has a
deadline: the ack wait is smtp.ack_timeout; a broker that is down fails the send at once
(IMMEDIATE) and the session gets 451. Lane status (saturation) arrives over SUB; status older than
STATUS_STALE is ignored, so a dead broker never makes us shed mail on old news.

Signals (child.ACCEPTOR_SIGNALS): SIGUSR1 from the supervisor retires an acceptor after a reload
(it serves the sessions it has, then exits); SIGUSR2 or SIGTERM shut it down (idle sessions get
421, sessions inside DATA finish, smtp.drain_grace bounds it); SIGINT and SIGHUP are ignored
(^C in a terminal reaches every process: only the supervisor acts on it). Exit 0.

Failure modes and limits: those of the service and the context (their modules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ingress.core import child
from ingress.core.config import Config
from ingress.core.steer_table import SteerTable
from ingress.edge.service import AcceptorService, Listening


def _main(cfg: Config, name: str, hb: Any, slot: int, service: AcceptorService,
          nice: int = 0, policy: str = "other") -> None:
    child.main_loop(cfg, child.Spec(name, child.ACCEPTOR_SIGNALS, nice, policy), service.setup,
                    hb, slot)


def run_fast(cfg: Config, index: int, hb: Any = None, slot: int = 0,
             mtls_sock: Listening = None, fast_sock: Listening = None,
             steered: Listening = None, steer: Any = None) -> None:
    """A fast acceptor's entry point (supervisor.fast_acceptors; ingress.edge.handoff): the
    connections handed over from port 25, and the mutual-TLS port and listen.fast_port (their
    clients prove themselves at the handshake or at connect), away from port 25's floods."""
    # At tiers.operator_policy, unless they also do strangers' TLS handshakes (a mutual-TLS
    # port without mTLS acceptors): an attacker's handshakes never run before everything else.
    strangers = bool(cfg.tls.mtls_addresses) and cfg.mtls_acceptor_count == 0
    _main(cfg, f"fast-acceptor-{index}", hb, slot,
          AcceptorService(cfg, index, None, mtls_sock, fast_sock, steered=steered,
                          steer=_steer(steer, slot)),
          policy="other" if strangers else child.operator_policy(cfg))


def run_mtls(cfg: Config, index: int, hb: Any = None, slot: int = 0,
             mtls_sock: Listening = None, known: Any = None) -> None:
    """An mTLS acceptor's entry point (supervisor.mtls_acceptors): the mutual-TLS port alone,
    so that the handshakes of clients without a valid certificate (ingress.edge.mtls's gate bounds
    them) share no event loop with the operator clients port 25 hands to the fast acceptors.
    `known` (the kernel steers the client addresses it verified to the fast acceptors:
    derived.steer_known): the supervisor's known-address table, region `slot`, where it lists
    them (emptied at start); serving strangers and first contacts only, it then yields the
    cores like the port-25 acceptors (supervisor.acceptor_nice)."""
    writer = _steer(known, slot, clear=True)
    _main(cfg, f"mtls-acceptor-{index}", hb, slot,
          AcceptorService(cfg, index, None, mtls_sock, handed=False, known=writer),
          nice=cfg.supervisor.acceptor_nice if known is not None else 0)


def run(cfg: Config, index: int, sock: Listening, hb: Any = None, slot: int = 0,
        mtls_sock: Listening = None, fast_sock: Listening = None, steer: Any = None) -> None:
    # With fast acceptors, these serve the unknown and the shed: they yield the cores to them.
    _main(cfg, f"acceptor-{index}", hb, slot,
          AcceptorService(cfg, index, sock, mtls_sock, fast_sock, steer=_steer(steer, slot)),
          nice=cfg.supervisor.acceptor_nice if cfg.supervisor.fast_acceptors else 0)


def _steer(steer: Any, slot: int, clear: bool = False) -> Callable[[str, float], None] | None:
    """One of the supervisor's steer tables ((array, regions, per_region): dnswl.steer's, or
    the mTLS acceptors' known addresses) as this child's writer: its region is its child
    slot (`clear`: emptied first, what a predecessor in the slot listed)."""
    if steer is None:
        return None
    table = SteerTable(*steer)
    if clear:
        table.clear(slot)
    return lambda ip, until: table.add(slot, ip, until)
