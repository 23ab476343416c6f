"""The bench's issue-18 rows (bench.scenarios' evidence tables, bench.flood.pool, bench.evidence):
pure parts."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import dkim
import orjson
import pytest

from bench.evidence import issue18_markdown, issue18_rows, pool_verdict, read_log, served_fast
from bench.flood import LegitSpec, LegitStats, Target, bot_address
from bench.flood.adversary import signed_message
from bench.flood.client import Attempt
from bench.flood.pool import PoolSender, pool_addresses, pool_index
from bench.run import build_scenarios, issue8_rows
from bench.scenarios import (
    BL_ZONE,
    DNSWL_IP,
    POOL_N,
    PROVIDER,
    WL_ZONE,
    evidence_dns,
    evidence_specs,
    listed_bots,
    with_settings,
)
from bench.scenarios import pool_addresses as bench_pool
from ingress.policy.iprev import provider_of
from tests.kit.dkimkeys import signing_record

FLOOD = {"classify": {"nameservers": ["127.0.0.1@53"], "allow_cidrs": ["127.0.0.10/32"]}}


def test_issue18_scenarios_are_judged_as_the_issue_says() -> None:
    full = build_scenarios("full")
    wl, bl, base = full["dnswl20k"], full["dnsbl5k"], full["noflood18"]
    assert wl.bots.stallers == 20000 and wl.bots.spammers == 50
    assert wl.judged == (("dnswl", 100.0, 1.5),) and wl.extra == ("dnswl",)
    assert bl.bots.stallers == 5000 and bl.bots.spammers == 50
    assert bl.judged == (("spf", 99.0, 2.0),) and bl.extra == ("pool",)
    assert {wl.issue, bl.issue, base.issue} == {"18"}
    # the no-flood reference: no bots, the same config and both extra senders
    assert base.bots.sockets == 0 and set(base.extra) == {"dnswl", "pool"}
    assert wl.base == bl.base == "noflood18" and full["silent2k"].base == "noflood"
    assert wl.settings == bl.settings == base.settings
    assert {"dnswl", "dnsbl"} <= set(wl.settings) and not full["flood"].settings
    assert "postscreen is not configured" in wl.note
    # --quick with one of them picked runs its reference too (shortened, not smaller)
    quick = build_scenarios("quick", picked=frozenset({"dnsbl5k"}))
    assert list(quick) == ["noflood", "flood", "large", "noflood18", "dnsbl5k"]
    assert quick["dnsbl5k"].bots.stallers == 5000
    assert quick["dnsbl5k"].duration_s < full["dnsbl5k"].duration_s


def test_scenario_settings_merge_table_by_table() -> None:
    merged = with_settings(FLOOD, {"classify": {"dns_timeout": 2.0}, "dnswl": {"sites": ["z"]}})
    assert merged["classify"] == {**FLOOD["classify"], "dns_timeout": 2.0}
    assert merged["dnswl"] == {"sites": ["z"]}
    assert "dns_timeout" not in FLOOD["classify"]            # the shared tables are untouched


def test_exactly_the_bots_but_every_fifth_and_the_spam_are_block_listed() -> None:
    listed = set(listed_bots())
    assert len(listed) == 4000 + 50
    assert bot_address(1, 1) in listed and bot_address(1, 4999) in listed
    assert bot_address(1, 0) not in listed and bot_address(1, 5) not in listed
    assert bot_address(1, 5000) not in listed                 # beyond the scenario's bots
    assert {bot_address(4, i) for i in range(50)} <= listed
    records = evidence_dns("v=DKIM1; p=x")
    bl = {n for n in records if n.endswith("." + BL_ZONE)}
    assert len(bl) == len(listed) + 1                         # + the test point
    # not listed: the SPF sender, the allow-listed sender, the provider's pool
    for ip in ("127.0.0.12", DNSWL_IP, *bench_pool()):
        assert ".".join(reversed(ip.split("."))) + "." + BL_ZONE not in records


def test_dns_lists_answer_their_test_points_only_as_rfc5782_says() -> None:
    records = evidence_dns("v=DKIM1; p=x")
    for zone in (WL_ZONE, BL_ZONE):
        assert records[f"2.0.0.127.{zone}"] == {"A": ["127.0.0.2"]}
        assert f"1.0.0.127.{zone}" not in records
    assert records[f"13.0.0.127.{WL_ZONE}"] == {"A": ["127.0.10.2"]}   # DNSWL.org: medium
    assert [n for n in records if n.endswith("." + WL_ZONE)] == [
        f"2.0.0.127.{WL_ZONE}", f"13.0.0.127.{WL_ZONE}"]


def test_the_provider_pool_is_verified_and_covered_by_spf() -> None:
    records = evidence_dns("v=DKIM1; p=x")
    pool = bench_pool()
    assert len(pool) == POOL_N == 50 and pool[0] == "127.8.0.1" and pool[-1] == "127.8.0.50"
    spf = records[PROVIDER]["TXT"][0]
    net = ipaddress.ip_network(spf.split("ip4:")[1].split()[0])
    for n, ip in enumerate(pool, 1):
        (name,) = records[".".join(reversed(ip.split("."))) + ".in-addr.arpa"]["PTR"]
        assert name == f"mta{n}.out.{PROVIDER}."
        assert records[name.rstrip(".")] == {"A": [ip]}           # forward-confirmed
        assert ipaddress.ip_address(ip) in net
        assert provider_of(name, ip) == PROVIDER              # not generic: one provider
    assert records[f"bench._domainkey.{PROVIDER}"] == {"TXT": ["v=DKIM1; p=x"]}
    assert records[f"_dmarc.{PROVIDER}"]["TXT"][0].startswith("v=DMARC1")


def test_issue18_senders() -> None:
    dnswl, pool = evidence_specs(("dnswl", "pool"), 0.1, "/k.pem")
    assert dnswl.kind == "dnswl" and dnswl.source == DNSWL_IP != "127.0.0.10"
    assert pool.kind == "pool" and pool.pool == 50 and pool.source == "127.8.0.1"
    assert pool.mail_from == f"news@{PROVIDER}" and pool.dkim_key == "/k.pem"
    assert evidence_specs((), 0.1) == []
    assert LegitSpec.parse("pool:127.8.0.1:0.1,pool=5,learn_s=2").learn_s == 2.0
    with pytest.raises(ValueError):
        LegitSpec("pool", "127.8.0.1", 0.1)                   # a pool without its size
    with pytest.raises(ValueError):
        LegitSpec("spf", "127.0.0.12", 0.1, pool=3)


def test_pool_rotates_from_the_second_address_after_the_learned_one() -> None:
    assert [pool_index(k, 3) for k in range(6)] == [1, 2, 0, 1, 2, 0]
    assert pool_addresses("127.8.0.1", 3) == ["127.8.0.1", "127.8.0.2", "127.8.0.3"]
    with pytest.raises(ValueError):
        pool_addresses("127.8.0.250", 10)                     # leaves its /24


async def run_pool(cls: type[PoolSender], *, learn_s: float, start_in: float,
                   end_in: float) -> tuple[LegitStats, float]:
    """A 3-address pool sending every 50 ms from `start_in` to `end_in` seconds from now:
    its stats and its start time (the loop's clock)."""
    now = asyncio.get_running_loop().time()
    spec = LegitSpec("pool", "127.8.0.1", 0.05, name="pool", mail_from="a@b.test",
                     rcpt="u@x.test", helo="h.test", size=100, deadline_s=1.0, pool=3,
                     learn_s=learn_s)
    stats = LegitStats(name="pool", kind="pool", source="127.8.0.1", interval_s=0.05)
    await cls(Target.parse("127.0.0.1:25"), spec, stats, start_at=now + start_in, t_run0=now,
              grace=0.5).run(now + end_in)
    return stats, now + start_in


def test_the_rotation_starts_after_the_learned_messages_answer() -> None:
    """"After one learned message": under a flood its answer can take seconds; the rotation
    must not overtake it (it did when the schedule was open-loop from the start)."""
    seen: list[tuple[str | None, bool, float]] = []

    class Fake(PoolSender):
        async def attempt(self, k: int) -> Attempt:
            seen.append((self.source(k), self.learning, asyncio.get_running_loop().time()))
            if self.learning:
                await asyncio.sleep(0.3)                      # a slow first answer
            return Attempt(0.0, 1.0, "accepted")

    stats, _ = asyncio.run(run_pool(Fake, learn_s=0.1, start_in=0.0, end_in=0.75))
    assert seen[0][:2] == ("127.8.0.1", True)
    assert seen[1][2] - seen[0][2] >= 0.39                    # its answer, then learn_s
    assert [src for src, _, _ in seen[1:5]] == ["127.8.0.2", "127.8.0.3", "127.8.0.1",
                                                "127.8.0.2"]
    assert not any(learning for _, learning, _ in seen[1:])
    assert stats.attempts == stats.accepted == len(seen)


def test_the_pool_signs_with_the_one_signer(tmp_path: Path) -> None:
    pem, txt = signing_record()
    raw = signed_message(f"news@{PROVIDER}", "u@example.test", 600, "pool-1", pem, "bench")
    assert raw.count(b"DKIM-Signature:") == 1 and raw.endswith(b"\r\n.\r\n")

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return txt.encode() if name.startswith(f"bench._domainkey.{PROVIDER}".encode()) else b""

    assert dkim.verify(raw[:-3], dnsfunc=dns)


def _line(peer: str, lane: str = "fast", reasons: str = f"provider:{PROVIDER}",
          event: str = "message") -> dict[str, Any]:
    return {"event": event, "peer": peer, "lane": lane, "reasons": reasons,
            "identity": f"learned:{PROVIDER}"}


POOL = ["127.8.0.1", "127.8.0.2", "127.8.0.3"]


def test_pool_verdict_every_message_after_the_learned_one_must_be_fast() -> None:
    learned = _line(POOL[0], reasons="spf:pass")      # the first: SPF at MAIL FROM, then learned
    ok = pool_verdict([learned, _line(POOL[1]), _line(POOL[2]), _line(POOL[0]),
                       _line("127.0.0.12", reasons="spf:pass"), _line(POOL[1], event="x")],
                      POOL, PROVIDER)
    assert ok["all_fast"] and ok["after_first"] == 3 and ok["fast_after_first"] == 3
    assert ok["learned"]["reasons"] == "spf:pass" and ok["addresses_seen"] == 2
    assert ok["addresses"][POOL[0]] == {"messages": 1, "fast": 1}
    # fast only through its SPF pass at MAIL FROM: not the provider at work
    spf_only = pool_verdict([learned, _line(POOL[1]), _line(POOL[2], reasons="spf:pass")],
                            POOL, PROVIDER)
    assert not spf_only["all_fast"] and spf_only["slow"][0]["peer"] == POOL[2]
    bulk = pool_verdict([learned, _line(POOL[1], lane="bulk")], POOL, PROVIDER)
    assert not bulk["all_fast"]
    assert not pool_verdict([learned], POOL, PROVIDER)["all_fast"]    # nothing after it
    assert not pool_verdict([], POOL, PROVIDER)["all_fast"]
    assert not served_fast(_line(POOL[1], reasons=f"provider:x{PROVIDER}"), PROVIDER)
    # the first address, learned itself, may ride its own entry when the rotation returns;
    # no other address may
    again = pool_verdict([learned, _line(POOL[1]), _line(POOL[0], reasons="learned-allow")],
                         POOL, PROVIDER)
    assert again["all_fast"]
    other = pool_verdict([learned, _line(POOL[1], reasons="learned-allow")], POOL, PROVIDER)
    assert not other["all_fast"]


def test_read_log_from_an_offset(tmp_path: Path) -> None:
    log = tmp_path / "ingress.log"
    log.write_bytes(orjson.dumps(_line(POOL[0])) + b"\n")
    at = log.stat().st_size
    with log.open("ab") as f:
        f.write(b"not json\n" + orjson.dumps(_line(POOL[1])) + b"\n[1]\n")
    assert [d["peer"] for d in read_log(log, at)] == [POOL[1]]
    assert read_log(tmp_path / "missing", 0) == []


def test_issue18_rows_judge_the_pool_and_compare_with_their_own_reference() -> None:
    def entry(scn: str, verdict: dict[str, Any] | None,
              **legit: tuple[int, int, float]) -> dict[str, Any]:
        e: dict[str, Any] = {"scenario": scn, "target": "smtp-ingress", "result": {"x": 1},
                             "summary": {"legit": {k: {"accepted": a, "attempts": n,
                                                       "accepted_pct": 100.0 * a / n,
                                                       "p50": p, "p99": p}
                                                   for k, (a, n, p) in legit.items()}}}
        if verdict is not None:
            e["pool"] = verdict
        return e

    good = pool_verdict([_line(POOL[0]), _line(POOL[1])], POOL, PROVIDER)
    doc = {"scenarios": {
        "noflood": {}, "noflood18": {"base": "noflood18"},
        "dnsbl5k": {"label": "5k", "base": "noflood18", "judged": [["spf", 99.0, 2.0]]}},
        "flood": [entry("noflood", None, spf=(10, 10, 100.0)),
                  entry("noflood18", good, spf=(10, 10, 10.0), pool=(10, 10, 5.0)),
                  entry("dnsbl5k", good, spf=(100, 100, 15.0), pool=(99, 100, 6.0))]}
    (row,) = issue8_rows(doc)
    assert row["base_p99"] == 10.0 and row["p99_ratio"] == 1.5 and row["ok"]  # not noflood's
    rows = {r["scenario"]: r for r in issue18_rows(doc)}
    assert rows["noflood18"]["ok"] is None and rows["dnsbl5k"]["ok"] is True
    doc["flood"][2]["summary"]["legit"]["pool"]["accepted_pct"] = 98.0
    assert issue18_rows(doc)[1]["ok"] is False                      # a message not served
    assert "| 5k |" in issue18_markdown(issue18_rows(doc)) and issue18_markdown([]) == ""


def test_the_pool_signs_before_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """dkimpy signs in Python (RSA, milliseconds): a signature per message on the probe's one
    loop delayed the other senders' transactions. The pool signs its two messages (the learned
    one, the rotation's) before the window, and none during it."""
    signed: list[tuple[str, float]] = []

    def counting(sender: str, rcpt: str, size: int, tag: str, *args: Any) -> bytes:
        signed.append((tag, asyncio.get_running_loop().time()))
        return f"{tag}\r\n.\r\n".encode()

    monkeypatch.setattr("bench.flood.pool.signed_message", counting)
    sent: list[bytes] = []

    class Fake(PoolSender):
        async def attempt(self, k: int) -> Attempt:
            sent.append(self.message(k))
            return Attempt(0.0, 1.0, "accepted")

    _, start = asyncio.run(run_pool(Fake, learn_s=0.05, start_in=0.1, end_in=0.5))
    assert sorted(tag for tag, _ in signed) == ["pool-learn", "pool-rotation"]
    assert all(t < start for _, t in signed)
    assert len(sent) > 4 and sent[0] == b"pool-learn\r\n.\r\n"
    assert set(sent[1:]) == {b"pool-rotation\r\n.\r\n"}
