"""ingress.core.metrics: per-identity fast-lane usage with bounded label cardinality (an attacker
controls domains: 1,000 domains must not make 1,000 series), and the over-share counter."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from ingress.core import metrics


def series(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in REGISTRY.collect():
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_identity_labels_are_bounded() -> None:
    for i in range(1000):
        metrics.fast_identity(f"org:d{i}.test", 100)
    metrics.fast_identity("allow:192.0.2.0/24", 10)
    metrics.fast_identity("nonsense", 1)
    got = series("smtp_ingress_fast_identity_messages_total")
    idents = {dict(k)["identity"] for k in got}
    assert len(idents) <= metrics.TOP_IDENTITIES + 1
    assert "other" in idents
    assert {dict(k)["kind"] for k in got} <= set(metrics.IDENTITY_KINDS)
    # every message is counted, named or not
    assert sum(v for k, v in got.items() if dict(k)["kind"] == "org") >= 1000
    assert series("smtp_ingress_fast_identity_bytes_total")


def test_over_share_counter() -> None:
    before = series("smtp_ingress_over_share_total")
    metrics.over_share("session", "org:spammer.test")
    metrics.over_share("message", "learned:x")   # a share key is never learned:, but kind is
    after = series("smtp_ingress_over_share_total")
    key = (("kind", "org"), ("what", "session"))
    assert after[key] == before.get(key, 0) + 1
    with pytest.raises(ValueError):
        metrics.over_share("bogus", "org:x")
