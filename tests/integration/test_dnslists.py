"""The DNS list checks ([dnswl], [dnsbl]) through the checks runner against the loopback DNS
server: listings shape, refuse and promote; error codes, dead and SERVFAILing zones change
nothing; a zone failing its RFC 5782 health test is switched off and comes back; answers are
cached within the TTL bounds; config errors name their key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingress.core import config
from ingress.core.config import Config
from ingress.core.dns_client import DnsClient
from ingress.core.fieldspec import ConfigError
from ingress.core.resolver import make_resolver
from ingress.edge.checks import Checks, Client
from ingress.policy.checks import Stage, Verdict
from tests.kit.dnsserver import DNSServer

LISTED = "127.0.0.50"          # in bl.test (127.0.0.2) and two.test
BL_ONLY = "127.0.0.51"         # in bl.test only
ERR = "127.0.0.52"             # bl.test answers an error code for it (127.255.255.254)
TEN = "127.0.0.53"             # bl.test answers 10.0.0.1 for it (outside 127/8)
WL = "127.0.0.60"              # in the allow list, trust 2 (medium)
WL_NONE = "127.0.0.61"         # in the allow list, trust 0 (none: no promotion)
CLEAN = "127.0.0.70"


def rev(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


def healthy(zone: str) -> dict[str, dict[str, list[str]]]:
    return {f"2.0.0.127.{zone}": {"A": ["127.0.0.2"], "TXT": ["test point"]}}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    records: dict[str, Any] = {
        **healthy("bl.test"), **healthy("two.test"), **healthy("wl.test"),
        **healthy("dead.test"), **healthy("broken.test"), **healthy("flaky.test"),
        f"{rev(LISTED)}.bl.test": {"A": ["127.0.0.2"]},
        f"{rev(LISTED)}.two.test": {"A": ["127.0.0.3"]},
        f"{rev(BL_ONLY)}.bl.test": {"A": ["127.0.0.2"]},
        f"{rev(ERR)}.bl.test": {"A": ["127.255.255.254"]},
        f"{rev(TEN)}.bl.test": {"A": ["10.0.0.1"]},
        f"{rev(WL)}.wl.test": {"A": ["127.0.10.2"], "TXT": ["https://wl.test/lookup?ip=x"]},
        f"{rev(WL_NONE)}.wl.test": {"A": ["127.0.10.0"]},
        # a zone listing everything (an expired domain's wildcard): fails its health test
        "1.0.0.127.everything.test": {"A": ["127.0.0.2"]},
        **healthy("everything.test"),
        f"{rev(CLEAN)}.everything.test": {"A": ["127.0.0.2"]},
        f"{rev(LISTED)}.everything.test": {"A": ["127.0.0.2"]},
    }
    with DNSServer(records, ttl=300) as server:
        server.silent.update({f"{rev(ip)}.dead.test" for ip in (LISTED, CLEAN, WL)})
        server.servfail.update({f"{rev(ip)}.broken.test" for ip in (LISTED, CLEAN)})
        yield server


def load(tmp_path: Path, dns: DNSServer, tables: dict[str, dict[str, Any]]) -> Config:
    """The config: DNS, the lists of `tables`, and FCrDNS off (on wherever DNS is, it is not
    what these tests are about: its facts and reason tokens would join every verdict)."""
    lines = [f'[classify]\nnameservers = ["{dns.address}"]\ndns_timeout = 0.5\n']
    for table, keys in {"iprev": {"enabled": False}, **tables}.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    f = tmp_path / "ingress.toml"
    f.write_text("\n".join(lines) + "\n")
    return config.load(f)


def checks(cfg: Config, dns: DNSServer, **kw: Any) -> Checks:
    client = DnsClient(make_resolver([dns.address], 0.5), **kw)
    return Checks.from_config(cfg, None, client)


def judge(c: Checks, *ips: str) -> list[Verdict]:
    async def main() -> list[Verdict]:
        return [await c.run(Stage.CONNECT, Client(ip)) for ip in ips]
    return asyncio.run(main())


BL = {"dnsbl": {"sites": ["bl.test=127.0.0.[2..11]*2", "two.test*1"], "threshold": 2,
                "reject_threshold": 3}}


def test_lists_are_off_until_zones_are_named(tmp_path: Path, dns: DNSServer) -> None:
    c = checks(load(tmp_path, dns, {}), dns)
    assert not c and judge(c, LISTED) == [Verdict()]


def test_block_listed_clients_are_shaped_then_refused(tmp_path: Path, dns: DNSServer) -> None:
    c = checks(load(tmp_path, dns, BL), dns)
    assert c.holds_banner(Stage.CONNECT)
    shaped, refused, clean = judge(c, BL_ONLY, LISTED, CLEAN)
    assert (shaped.score, shaped.refusal, shaped.reasons) == (2.0, "", ("dnsbl:2",))
    assert dict(shaped.facts) == {"dnsbl_score": "2", "dnsbl_zones": "bl.test"}
    assert refused.refusal.startswith("554 5.7.1 ") and "bl.test, two.test" in refused.refusal
    assert dict(refused.facts)["dnsbl_zones"] == "bl.test,two.test"
    assert (clean.score, clean.refusal, clean.facts) == (0.0, "", ())


def test_error_codes_are_never_listings_and_switch_the_zone_off(tmp_path: Path,
                                                                 dns: DNSServer) -> None:
    c = checks(load(tmp_path, dns, BL), dns)
    healthy_first = judge(c, BL_ONLY)[0]
    assert healthy_first.score == 2.0
    err, after = judge(c, ERR, LISTED)
    assert (err.score, err.refusal) == (0.0, "")
    assert "dnsbl:bl.test:error_code" in err.reasons
    # bl.test is off now: LISTED counts only two.test (weight 1: below the threshold)
    assert (after.score, after.refusal) == (0.0, "")
    c2 = checks(load(tmp_path, dns, BL), dns)
    ten = judge(c2, TEN)[0]
    assert (ten.score, ten.refusal) == (0.0, "")


def test_dead_and_servfailing_zones_change_nothing(tmp_path: Path, dns: DNSServer) -> None:
    cfg = load(tmp_path, dns, {"dnsbl": {"sites": ["dead.test*5", "broken.test*5", "bl.test*2"],
                                         "threshold": 2}})
    c = checks(cfg, dns)
    listed, clean = judge(c, LISTED, CLEAN)
    assert (listed.score, listed.refusal, listed.reasons) == (2.0, "", ("dnsbl:2",))
    assert (clean.score, clean.refusal) == (0.0, "")
    assert clean.reasons == ("dnsbl:dead.test:timeout",)     # the first zone in trouble


def test_a_zone_failing_its_health_test_is_off_and_comes_back(tmp_path: Path,
                                                              dns: DNSServer) -> None:
    cfg = load(tmp_path, dns, {"dnsbl": {"sites": ["everything.test*5"], "threshold": 1,
                                         "health_interval": 10}})
    c = checks(cfg, dns)
    assert judge(c, CLEAN)[0].score == 0.0              # listed, but the zone lists 127.0.0.1
    check = c.checks[0]
    lookup = check.lookup                               # type: ignore[attr-defined]
    assert not lookup.health.usable("everything.test")
    # the zone is repaired; its next test (after health_interval) turns it back on
    dns.remove("1.0.0.127.everything.test")
    try:
        lookup.health._zones["everything.test"].next_check = 0.0   # the interval has passed
        lookup.dns._answers.clear()                                # and the old answer's TTL
        assert judge(c, LISTED)[0].score == 5.0
        assert lookup.health.usable("everything.test")
    finally:
        dns.set("1.0.0.127.everything.test", "A", ["127.0.0.2"])


def test_a_zone_not_listing_its_test_point_is_off(tmp_path: Path, dns: DNSServer) -> None:
    dns.set(f"{rev(LISTED)}.nopoint.test", "A", ["127.0.0.2"])
    c = checks(load(tmp_path, dns, {"dnsbl": {"sites": ["nopoint.test*5"]}}), dns)
    assert judge(c, LISTED)[0].score == 0.0


WLCFG = {"dnswl": {"sites": ["wl.test=127.0.[2..15].[0..3]"]}}


def test_allow_listed_clients_are_promoted_with_rfc_8904_facts(tmp_path: Path,
                                                               dns: DNSServer) -> None:
    c = checks(load(tmp_path, dns, {**WLCFG, **BL}), dns)
    wl, none_trust, clean = judge(c, WL, WL_NONE, CLEAN)
    assert (wl.identity, wl.promotion) == ("dnswl:wl.test", "dnswl:wl.test:medium")
    assert dict(wl.facts) == {"dnswl": "wl.test", "dnswl_ip": "127.0.10.2",
                              "dnswl_txt": "https://wl.test/lookup?ip=x"}
    assert none_trust.identity == "" and clean.identity == ""


def test_a_promoted_client_is_never_refused_by_a_block_list(tmp_path: Path,
                                                            dns: DNSServer) -> None:
    dns.set(f"{rev(LISTED)}.wl.test", "A", ["127.0.3.1"])
    try:
        c = checks(load(tmp_path, dns, {**WLCFG, **BL}), dns)
        v = judge(c, LISTED)[0]
        assert (v.identity, v.refusal, v.score) == ("dnswl:wl.test", "", 0.0)
    finally:
        dns.remove(f"{rev(LISTED)}.wl.test")


def test_answers_are_cached_within_the_ttl_bounds(tmp_path: Path, dns: DNSServer) -> None:
    c = checks(load(tmp_path, dns, BL), dns)
    judge(c, BL_ONLY)
    name = f"{rev(BL_ONLY)}.bl.test"
    before = sum(1 for q in dns.queries if q[0] == name)
    assert judge(c, BL_ONLY, BL_ONLY)[1].score == 2.0
    assert sum(1 for q in dns.queries if q[0] == name) == before     # cached
    lookup = c.checks[0].lookup                                       # type: ignore[attr-defined]
    entry = lookup._cache[("bl.test", BL_ONLY)]
    assert entry[1] == 300.0                    # the zone's TTL, inside [60, 3600]
    capped = checks(load(tmp_path, dns, {"dnsbl": {**BL["dnsbl"], "max_ttl": 120}}), dns)
    judge(capped, BL_ONLY)
    assert capped.checks[0].lookup._cache[("bl.test", BL_ONLY)][1] == 120.0  # type: ignore


def test_keyed_zones_show_their_public_name(tmp_path: Path, dns: DNSServer) -> None:
    dns.set(f"{rev(LISTED)}.s3cr3t.bl.test", "A", ["127.0.0.2"])
    dns.set("2.0.0.127.s3cr3t.bl.test", "A", ["127.0.0.2"])
    c = checks(load(tmp_path, dns, {"dnsbl": {"sites": ["s3cr3t.bl.test*9"],
                                              "reject_threshold": 5,
                                              "reply_map": ["s3cr3t.bl.test=bl.example"]}}), dns)
    v = judge(c, LISTED)[0]
    assert "bl.example" in v.refusal and "s3cr3t" not in v.refusal + str(v.facts)


BAD = [
    ({"dnsbl": {"sites": ["bl.test=10.0.0.2"]}}, "dnsbl.sites"),
    ({"dnsbl": {"sites": ["bl.test*-2"]}}, "dnsbl.sites"),
    ({"dnsbl": {"sites": ["bl.test=127.0.0.[9..2]"]}}, "dnsbl.sites"),
    ({"dnswl": {"sites": ["wl"]}}, "dnswl.sites"),
    ({"dnsbl": {"reply_map": ["a.test"]}}, "dnsbl.reply_map"),
    ({"dnsbl": {"reply_map": ["a.test=b.test", "a.test=c.test"]}}, "dnsbl.reply_map"),
    ({"dnsbl": {"threshold": 3, "reject_threshold": 2}}, "dnsbl.reject_threshold"),
    ({"dnswl": {"min_trust": "ultra"}}, "dnswl.min_trust"),
    ({"dnswl": {"trust_levels": ["a", "a"], "min_trust": "a"}}, "dnswl.trust_levels"),
    ({"dnswl": {"min_ttl": 600, "max_ttl": 60}}, "dnswl.max_ttl"),
]


def test_lists_need_dns(tmp_path: Path) -> None:
    f = tmp_path / "nodns.toml"
    f.write_text('[dnsbl]\nsites = ["bl.test"]\n')
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert e.value.key == "dnsbl.sites" and "DNS" in e.value.message


@pytest.mark.parametrize(("tables", "key"), BAD)
def test_config_errors_name_the_key(tmp_path: Path, dns: DNSServer,
                                    tables: dict[str, dict[str, Any]], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, dns, tables)
    assert e.value.key == key


def test_authentication_results_render_rfc_8904() -> None:
    from workers.lane.headers import authentication_results
    h = authentication_results("mx.test", spf="pass", spf_domain="e.test", dkim_checked=False,
                               dnswl=("wl.test", "127.0.10.2", 'see "x"\r\nX-Evil: 1'))
    assert h == (b"Authentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=e.test;\r\n"
                 b'\tdnswl=pass dns.zone=wl.test policy.ip=127.0.10.2 policy.txt="see \\"x\\"'
                 b'X-Evil: 1"\r\n')
    bare = authentication_results("mx.test", dkim_checked=False, dnswl=("wl.test", "127.0.0.2", ""))
    assert bare == b"Authentication-Results: mx.test;\r\n\tdnswl=pass dns.zone=wl.test " \
                   b"policy.ip=127.0.0.2\r\n"
    assert authentication_results("mx.test", dkim_checked=False, dnswl=None) == \
        b"Authentication-Results: mx.test; none\r\n"


def test_a_client_is_judged_at_once_when_nothing_needs_a_wait(tmp_path: Path,
                                                              dns: DNSServer) -> None:
    """Checks.run_now: the lists judge without a task or a query when the answer is kept
    (a repeat client) or the zone's query bound is full (a flood of new addresses: neutral,
    as run() would say at once); otherwise None (run() asks)."""
    c = checks(load(tmp_path, dns, BL), dns)
    assert c.run_now(Stage.CONNECT, Client(BL_ONLY), holding=True) is None   # health due
    first = judge(c, BL_ONLY)[0]
    again = c.run_now(Stage.CONNECT, Client(BL_ONLY), holding=True)
    assert again is not None and (again.score, again.reasons) == (first.score, first.reasons)
    assert c.run_now(Stage.CONNECT, Client("127.0.0.77"), holding=True) is None  # must ask
    check = c.checks[0]
    client = check.lookup.dns                           # type: ignore[attr-defined]
    client._by_key.update({"bl.test": client.per_key, "two.test": client.per_key})
    busy = c.run_now(Stage.CONNECT, Client("127.0.0.77"), holding=True)
    assert busy is not None and (busy.score, busy.refusal) == (0.0, "")
    assert all(r.endswith(":busy") for r in busy.reasons), busy.reasons
