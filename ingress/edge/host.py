"""SessionHost: what an SMTP session (ingress.edge.smtp.IngressSMTP) and its hooks
(ingress.edge.handler.IngressHandler) need of the acceptor process that runs them.

API:
    SessionHost    typing.Protocol; ingress.edge.acceptor.AcceptorContext is the implementation.
                   The session side imports only this, never the acceptor, so the dialogue can
                   be built against a small fake in tests.
    Prototype      what IngressSMTP keeps per listener kind of the first session's aiosmtpd
                   configuration: (shared attributes, smtp_* command names, AUTH mechanisms as
                   (name, method name, is_builtin))

Failure modes and limits: none; this module holds types only.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Protocol

from ingress.core.config import Config
from ingress.core.metrics_labels import DeferReason
from ingress.core.wire import Envelope, Lane, Reply
from ingress.edge.dataread import DataBudget
from ingress.edge.rcpt_verify import RecipientVerifier
from ingress.policy.classify import AuthResult, ClassifyPolicy, Decision, Evidence
from ingress.policy.deferrals import Claim
from ingress.policy.session_rules import ErrorPolicy

Prototype = tuple[dict[str, Any], tuple[str, ...], tuple[tuple[str, str, bool], ...]]


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

    @property
    def resolver(self) -> Any: ...        # None: SPF is off

    def connect_evidence(self, ip: str, peercert_der: bytes | None,
                         verified: bool) -> Evidence: ...

    def decide(self, evidence: Evidence, transaction: bool = False,
               peer: str = "") -> Decision: ...

    def hand_off(self, transport: asyncio.BaseTransport) -> bool: ...

    def hand_back(self, transport: asyncio.BaseTransport, to: Any) -> bool: ...

    def admit(self, proto: Any) -> str | None: ...

    def spoke(self, proto: Any) -> None: ...

    def release(self, proto: Any) -> None: ...

    def swap(self, old: Any, new: Any) -> None: ...    # a lobby seat becomes a session

    def promote(self, proto: Any) -> None: ...

    def over_rate(self, identity: str,       # a domain over classify.domain_rate, or its
                  transaction: bool = False,  # tier over the client site's part of its rate
                  peer: str = "") -> bool: ...  # (a transaction takes a token)

    def demote(self, proto: Any) -> None: ...          # fast -> bulk (its domain over rate)

    def penalise(self, ip: str) -> None: ...

    def count(self, what: str, lane: Lane) -> None: ...

    def lane_saturated(self, lane: Lane) -> bool: ...

    async def bulk_mail_admitted(self) -> bool: ...

    def deferred(self, ip: str, sender: str, rcpts: tuple[str, ...],
                 reason: DeferReason | None) -> None: ...

    def retry_claim(self, ip: str, sender: str, rcpt: str) -> Claim | None: ...

    def deferred_accepted(self, lane: Lane, ip: str, sender: str, rcpts: tuple[str, ...],
                          claim: Claim | None) -> None: ...

    async def spf(self, peer_ip: str, lane: Lane, mail_from: str,
                  helo: str) -> tuple[AuthResult, str]: ...

    async def submit(self, env: Envelope, body: bytes) -> tuple[Reply | None, str]: ...
