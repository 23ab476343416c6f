"""The [tiers] table of the configuration: what each trust tier below the operator's may hold,
and how the processes that serve the operator's tiers are scheduled.

API
    TiersConfig         [tiers] (Config holds it: ingress.core.schema)
    OPERATOR_POLICIES   the values of tiers.operator_policy (ingress.core.child.operator_policy)
    NICE                the note of every nice(2) key

Failure modes: none here (fieldspec.check_fields applies the rules; config.load raises).
Limits: none.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingress.core.fieldspec import bounded, choice

NICE = "a nice(2) increment"
OPERATOR_POLICIES = ("rr", "other")


@dataclass(frozen=True)
class TiersConfig:
    """Trust tiers (ingress.policy.tiers): what the tiers below the operator's may hold of every
    fast resource (an acceptor's fast reserve of slots and DATA bytes, the fast queue's count
    and bytes, the fast workers' credit), as a tier, however many identities they hold."""
    self_proven_share: float = bounded(0.5, 0, 1, "SPF, DKIM, learned: at most this share; "
                                       "beyond: bulk. With third_party_share below 1", lt=True)
    self_proven_rate: float = bounded(200.0, 0, None, "messages/s all self-proven identities "
                                      "together may pass through the fast lane of one lanes "
                                      "node; beyond: bulk", note="0 = no bound")
    self_proven_burst: float = bounded(20.0, 1, None, "messages the tier may start at once")
    third_party_share: float = bounded(0.25, 0, 1, "DNS allow lists: at most this share",
                                       lt=True)
    third_party_rate: float = bounded(0.0, 0, None, "messages/s for the third-party tier as a "
                                      "whole", note="0 = no bound")
    third_party_burst: float = bounded(20.0, 1, None, "messages the tier may start at once")
    self_proven_workers: int = bounded(1, 0, 256, "fast-lane worker processes dedicated to the "
                                       "self-proven tier: its mail never shares a process with "
                                       "the operator's; the other fast workers take it only "
                                       "while none is up", note="0 = none: every fast worker "
                                       "takes every tier")
    self_proven_nice: int = bounded(5, 0, 19, "nice(2) increment of those workers (at least "
                                    "lanes.fast.nice)", note=NICE)
    operator_policy: str = choice("rr", OPERATOR_POLICIES, "CPU scheduling of the processes "
                                  "that serve the operator's and third parties' tiers (the fast "
                                  "acceptors, the fast broker, the fast workers not dedicated to "
                                  "the self-proven tier): rr = SCHED_RR priority 1, as systemd's "
                                  "CPUSchedulingPolicy=rr, so a flood's work on the same cores "
                                  "never delays them; needs CAP_SYS_NICE or LimitRTPRIO=1 (the "
                                  "unit grants it), else logged and run as other")
