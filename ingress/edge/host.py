"""SessionHost: what an SMTP session (ingress.edge.smtp.IngressSMTP) and its hooks
(ingress.edge.handler.IngressHandler) need of the acceptor process that runs them.

API:
    SessionHost    typing.Protocol; ingress.edge.context.AcceptorContext is the implementation.
                   The session side imports only this, never the acceptor, so the dialogue can
                   be built against a small fake in tests. The parts the host holds are used
                   directly: .table (the session table: admit, spoke, release, swap, promote,
                   demote), .spf_service (check; enabled: SPF may promote), .lanes (submit),
                   .retries (the deferral records), .checks (the evidence checks); the methods
                   here are the hooks that join several parts.
    Prototype      what IngressSMTP keeps per listener kind of the first session's aiosmtpd
                   configuration: (shared attributes, smtp_* command names, AUTH mechanisms:
                   name -> (method name, is_builtin))

Failure modes and limits: none; this module holds types only.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Protocol

from ingress.core.config import Config
from ingress.core.wire import Lane
from ingress.edge.checks import Checks
from ingress.edge.dataread import DataBudget
from ingress.edge.lanes import Lanes
from ingress.edge.rcpt_verify import RecipientVerifier
from ingress.edge.retries import RetryRecords
from ingress.edge.sessions import SessionTable
from ingress.edge.spf_service import SpfService
from ingress.policy.classify import ClassifyPolicy, Decision, Evidence
from ingress.policy.session_rules import ErrorPolicy

Prototype = tuple[dict[str, Any], tuple[str, ...], dict[str, tuple[str, bool]]]


class SessionHost(Protocol):
    cfg: Config
    loop: asyncio.AbstractEventLoop
    ident: str
    handler: Any                    # the aiosmtpd handler (ingress.edge.handler.IngressHandler)
    smtp_prototypes: dict[bool, Prototype]
    tls_context: ssl.SSLContext | None
    trusted_proxies: tuple[Any, ...]
    domains: frozenset[str]
    recipients: frozenset[str] | None
    verifier: RecipientVerifier | None
    error_policy: ErrorPolicy
    data_budget: DataBudget
    draining: bool
    policy: ClassifyPolicy                # the classify policy (pure decide(): no shares)
    table: SessionTable                   # the session table (ingress.edge.sessions)
    spf_service: SpfService
    lanes: Lanes                          # the lane clients (ingress.edge.lanes)
    retries: RetryRecords                 # the deferral records (ingress.edge.retries)
    checks: Checks                        # the evidence checks (ingress.edge.checks)

    def connect_evidence(self, ip: str, peercert_der: bytes | None,
                         verified: bool) -> Evidence: ...

    def decide(self, evidence: Evidence, transaction: bool = False,
               peer: str = "") -> Decision: ...

    def over_rate_why(self, identity: str,       # a domain over classify.domain_rate, or its
                      transaction: bool = False,  # tier over the client site's part of its
                      peer: str = "") -> str: ...  # rate (a transaction takes a token); "": not

    def hand_off(self, transport: asyncio.BaseTransport) -> bool: ...

    def hand_back(self, transport: asyncio.BaseTransport, to: Any) -> bool: ...

    def admit(self, proto: Any) -> str | None: ...     # the table's, with the shared per-IP rate

    def penalise(self, ip: str) -> None: ...            # here, in every acceptor, in every edge

    def steer(self, ip: str) -> None: ...       # dnswl.steer: to the fast acceptors from its
                                                # next connection (ingress.core.steer_table)

    def count(self, what: str, lane: Lane) -> None: ...

    def lane_saturated(self, lane: Lane) -> bool: ...

    async def bulk_mail_admitted(self) -> bool: ...
