"""The bench's issue-17 attackers (bench.flood.adversary) and rows (bench.run): pure parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim
import pytest

from bench.flood import BotConfig, FloodConfig, Target
from bench.flood.adversary import Adversary, SpamMessages
from bench.run import adversary_dns, build_scenarios, issue8_rows, issue17_extra
from tests.kit.dkimkeys import signing_record


def test_adversary_needs_a_port_for_tls_bots() -> None:
    with pytest.raises(ValueError):
        Adversary(handshakers=3)
    with pytest.raises(ValueError):
        Adversary(spam_domains=-1)
    assert Adversary(handshakers=3, tls_stallers=2, tls_port=4650).tls_sockets == 5


def test_tls_bots_run_in_their_own_process_and_only_there() -> None:
    cfg = FloodConfig(target=Target.parse("127.0.0.1:2525"), duration_s=5, bots=BotConfig(
        stallers=10, spammers=5, adversary=Adversary(handshakers=3, tls_stallers=2,
                                                     tls_port=4650, spam_domains=10)))
    plan = {role: bc for role, bc, _ in cfg.plan()}
    assert plan["tls"].adversary.handshakers == 3 and plan["tls"].spammers == 0
    assert plan["spam"].adversary.tls_sockets == 0 and plan["spam"].adversary.spam_domains == 10
    assert plan["spam"].adversary.spam_stride == 5
    assert plan["bots0"].adversary.tls_sockets == 0
    assert cfg.fd_budget()["tls#0"] >= 5


def test_senders_rotate_over_domains_per_connection_and_senders_per_message() -> None:
    m = SpamMessages(Adversary(spam_domains=200, spam_senders=4, spam_stride=50),
                     "s{s}@d{d}.test", "u@x", 512)
    assert m.sender(0, 0, 0) == "s0@d0.test"
    assert m.sender(3, 2, 0) == "s0@d103.test"
    assert [m.sender(0, 0, k) for k in range(5)] == [f"s{k % 4}@d0.test" for k in range(5)]
    # 50 connections at a time: each holds its own domain; every domain is used in turn
    assert len({m.sender(b, 1, 0) for b in range(50)}) == 50
    assert len({m.sender(b, c, 0) for b in range(50) for c in range(4)}) == 200


def test_spam_is_signed_for_its_domain_and_carries_dead_signatures(tmp_path: Path) -> None:
    pem, txt = signing_record()
    key = tmp_path / "k.pem"
    key.write_bytes(pem)
    m = SpamMessages(Adversary(dkim_key=str(key), dead_sigs=2), "spam@a.test", "u@x.test", 600)
    raw = m.message("spam@a.test")
    assert raw is m.message("spam@a.test")               # signed once per domain
    assert raw.count(b"DKIM-Signature:") == 3 and b"s=dead1" in raw
    assert raw.endswith(b"\r\n.\r\n")
    body = raw[:-3]

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return txt.encode() if name.startswith(b"bench._domainkey.a.test") else b""

    assert dkim.verify(body, dnsfunc=dns)                # the first signature is the real one


def test_adversary_dns_names_every_domain_and_the_dead_keys() -> None:
    records, silent = adversary_dns("v=DKIM1; p=x")
    assert "spam0-many.test" in records and "spam199-many.test" in records
    assert records["bench._domainkey.spam7-many.test"] == {"TXT": ["v=DKIM1; p=x"]}
    assert silent == [f"dead{i}._domainkey.spf-bots.test" for i in range(3)]


def test_issue17_scenarios_are_judged_at_the_issue_bounds() -> None:
    full = build_scenarios("full")
    assert dict((w, (p, r)) for w, p, r in full["spfmany"].judged) == {
        "trusted": (100.0, 1.5), "cert": (100.0, 1.5), "spf": (99.0, 2.0)}
    assert full["tlsflood"].bots.adversary.handshakers == 250
    assert full["retryfarm"].mtas == 5 and full["retryfarm"].mta_retry_s == 60.0
    assert full["retryfarm"].duration_s >= 4 * 60.0


def _entry(scn: str, result: dict[str, Any], **legit: tuple[int, int, float]) -> dict[str, Any]:
    return {"scenario": scn, "target": "smtp-ingress", "result": result, "summary": {
        "legit": {k: {"accepted": a, "attempts": n, "accepted_pct": 100.0 * a / n,
                      "p50": p99, "p99": p99} for k, (a, n, p99) in legit.items()},
        "spam": {}}}


def test_issue17_rows() -> None:
    doc = {"params": {"bulk_rate_cap": 200.0,
                      "ingress_config": {"tiers": {"self_proven_rate": 100.0}}},
           "scenarios": {"noflood": {}, "spfmany": {"judged": [["trusted", 100.0, 1.5]],
                                                    "issue": "17"},
                         "retryfarm": {"mtas": 2}},
           "flood": [_entry("noflood", {"x": 1}, trusted=(10, 10, 10.0)),
                     _entry("spfmany", {"bots": {"spam": {"accepted_per_s": 330.0}}},
                            trusted=(10, 10, 16.0)),
                     _entry("retryfarm", {"legit": [{"kind": "mta", "tries": [2]},
                                                    {"kind": "mta", "tries": [5]}]})]}
    row = issue8_rows(doc)[0]
    assert row["issue"] == "17" and row["p99_ratio"] == 1.6 and row["ok"] is False
    extra = {r["scenario"]: r for r in issue17_extra(doc)}
    assert extra["spfmany"]["bound"] == 300.0 and extra["spfmany"]["ok"] is False
    assert extra["retryfarm"]["value"] == [2, 5] and extra["retryfarm"]["ok"] is False


def test_messages_never_end_a_line_with_a_bare_cr() -> None:
    from bench.flood.client import make_message

    for n in range(20):                          # header lengths that cut the filler anywhere
        raw = make_message(f"mta{'x' * n}@example.org", "user@example.test", 1024, "t")
        assert b"\r\r" not in raw and raw.count(b"\n") == raw.count(b"\r\n")
