"""ingress.policy.dnslist and ingress.core.dnslist_sites (pure): the site syntax, query names,
error codes, scores, trust levels, zone health and the two lists' judgements, as tables."""

from __future__ import annotations

import pytest

from ingress.core.dnslist_sites import check_zone, parse_filter, parse_reply_map, parse_site
from ingress.policy.checks import Outcome
from ingress.policy.dnslist import (
    DNSWL_TRUST_LEVELS,
    State,
    ZoneHealth,
    ZoneResult,
    clamp_ttl,
    dnsbl_judgement,
    dnswl_judgement,
    health_of,
    is_error_code,
    matching,
    query_name,
    trust_of,
    zone_result,
)

# --- the filter grammar (Postfix util/ip_match.c) -----------------------------------------------

FILTERS = [
    # filter, address, matches
    ("127.0.0.2", "127.0.0.2", True),
    ("127.0.0.2", "127.0.0.3", False),
    ("127.0.0.[2..11]", "127.0.0.2", True),
    ("127.0.0.[2..11]", "127.0.0.11", True),
    ("127.0.0.[2..11]", "127.0.0.12", False),
    ("127.0.[0;1].[4..6]", "127.0.1.5", True),
    ("127.0.[0;1].[4..6]", "127.0.2.5", False),
    ("127.0.[0;1].[4..6]", "127.0.0.7", False),
    ("127.0.0.[2;4;6..8]", "127.0.0.7", True),
    ("127.0.0.[2;4;6..8]", "127.0.0.5", False),
    ("127.0.[2..15].[0..3]", "127.0.10.3", True),
    ("127.0.[2..15].[0..3]", "127.0.0.255", False),
    ("127.0.0.2", "::1", False),
    ("127.0.0.2", "garbage", False),
]


@pytest.mark.parametrize(("text", "address", "want"), FILTERS)
def test_filter_matches(text: str, address: str, want: bool) -> None:
    assert parse_filter(text).matches(address) is want


BAD_FILTERS = [
    ("127.0.0", "four fields"),
    ("127.0.0.2.1", "four fields"),
    ("127.0.0.256", "0..255"),
    ("127.0.0.[11..2]", "backwards"),
    ("127.0.0.[2..]", "0..255"),
    ("127.0.0.[]", "closing"),
    ("127.0.0.[2", "missing"),
    ("127.0.0.2]", "without"),
    ("127.0.[0.1]", "four fields"),
    ("127.0.0.3[6..9]", "0..255"),
    ("127.0.0.[[2]]", "inside"),
    ("10.0.0.1", "127.0.0.0/8"),
    ("[127..128].0.0.1", "127.0.0.0/8"),
    ("127.0.0.0x2", "0..255"),
    ("127.0.0.-1", "0..255"),
    ("127.0.0.0002", "0..255"),
]


@pytest.mark.parametrize(("text", "why"), BAD_FILTERS)
def test_bad_filters_are_refused_saying_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace(".", r"\.")):
        parse_filter(text)


SITES = [
    # text, zone, filter text or None, weight
    ("bl.test", "bl.test", None, 1.0),
    ("BL.Test.", "bl.test", None, 1.0),
    ("bl.test*3", "bl.test", None, 3.0),
    ("bl.test=127.0.0.2", "bl.test", "127.0.0.2", 1.0),
    ("zen.spamhaus.org=127.0.0.[2..11]*2.5", "zen.spamhaus.org", "127.0.0.[2..11]", 2.5),
    ("k3y_abc.white.zone.test=127.0.[0;1].[4..6]*1", "k3y_abc.white.zone.test",
     "127.0.[0;1].[4..6]", 1.0),
]


@pytest.mark.parametrize(("text", "zone", "filt", "weight"), SITES)
def test_sites_parse(text: str, zone: str, filt: str | None, weight: float) -> None:
    s = parse_site(text)
    assert (s.zone, s.filter.text if s.filter else None, s.weight) == (zone, filt, weight)


BAD_SITES = [
    "", "bl.test*-2", "bl.test*0", "bl.test*abc", "bl.test*1001", "bl.test=", "bl.test=10.0.0.2",
    "bl test", "test", "bl..test", "-bl.test", "bl.test*", "127.0.0.2", "bl.tést",
    "x" * 64 + ".test", ("a." * 95) + "test",
]


@pytest.mark.parametrize("text", BAD_SITES)
def test_bad_sites_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_site(text)


def test_zone_names_and_reply_maps() -> None:
    assert check_zone("List.DNSWL.org.") == "list.dnswl.org"
    assert parse_reply_map(["k3y.bl.test=bl.test"]) == {"k3y.bl.test": "bl.test"}
    for bad in (["k3y.bl.test"], ["k3y.bl.test=bad name"], ["a.test=b.test", "a.test=c.test"]):
        with pytest.raises(ValueError):
            parse_reply_map(bad)


# --- query names (RFC 5782 2.1, 2.4) ------------------------------------------------------------

NAMES = [
    ("192.0.2.99", "bl.test", "99.2.0.192.bl.test"),
    ("127.0.0.2", "bl.test", "2.0.0.127.bl.test"),
    ("::ffff:192.0.2.99", "bl.test", "99.2.0.192.bl.test"),
    ("2001:db8:1:2:3:4:567:89ab", "bl.test",
     "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test"),
    ("::1", "bl.test", "1." + "0." * 31 + "bl.test"),
]


@pytest.mark.parametrize(("ip", "zone", "name"), NAMES)
def test_query_names(ip: str, zone: str, name: str) -> None:
    assert query_name(ip, zone) == name


def test_query_name_of_garbage_is_an_error() -> None:
    with pytest.raises(ValueError):
        query_name("not-an-ip", "bl.test")


# --- answers ------------------------------------------------------------------------------------

ERRORS = [
    ("127.0.0.2", False), ("127.0.0.1", False), ("127.0.10.3", False), ("127.255.254.1", False),
    ("127.255.255.254", True), ("127.255.255.0", True), ("127.255.255.255", True),
    ("10.0.0.1", True), ("0.0.0.0", True), ("128.0.0.2", True), ("::1", True), ("x", True),
]


@pytest.mark.parametrize(("address", "error"), ERRORS)
def test_error_codes(address: str, error: bool) -> None:
    assert is_error_code(address) is error


RESULTS = [
    ("ok", ("127.0.0.2",), State.LISTED),
    ("ok", ("127.0.0.2", "127.255.255.254"), State.ERROR_CODE),
    ("ok", ("10.0.0.1",), State.ERROR_CODE),
    ("ok", (), State.CLEAN),
    ("nxdomain", (), State.CLEAN),
    ("nodata", (), State.CLEAN),
    ("timeout", (), State.TEMP),
    ("error", (), State.TEMP),
    ("busy", (), State.TEMP),
]


@pytest.mark.parametrize(("status", "records", "state"), RESULTS)
def test_zone_results(status: str, records: tuple[str, ...], state: State) -> None:
    assert zone_result("bl.test", status, records).state is state


TRUST = [("127.0.10.0", 0), ("127.0.10.3", 3), ("127.0.10.4", None), ("127.0.0.255", None),
         ("x", None)]


@pytest.mark.parametrize(("address", "level"), TRUST)
def test_trust_levels(address: str, level: int | None) -> None:
    assert trust_of(address, DNSWL_TRUST_LEVELS) == level


def listed(zone: str, *records: str, txt: str = "") -> ZoneResult:
    return ZoneResult(zone, State.LISTED, records, txt)


def test_scores_add_weights_of_matching_sites() -> None:
    sites = [parse_site(s) for s in ("a.test=127.0.0.2*2", "a.test=127.0.0.[3..5]*3",
                                     "b.test*1.5", "c.test=127.0.0.9")]
    results = {"a.test": listed("a.test", "127.0.0.2", "127.0.0.4"),
               "b.test": listed("b.test", "127.0.0.7"),
               "c.test": listed("c.test", "127.0.0.2")}
    score, hits = matching(sites, results)
    assert score == 6.5
    assert [(s.zone, rec) for s, rec in hits] == [("a.test", "127.0.0.2"),
                                                   ("a.test", "127.0.0.4"),
                                                   ("b.test", "127.0.0.7")]


def test_clamp_ttl() -> None:
    assert [clamp_ttl(t, 60, 3600) for t in (0, 300, 604800)] == [60, 300, 3600]


# --- health (RFC 5782 section 5) ----------------------------------------------------------------

HEALTH = [
    # (status, records) of 127.0.0.2, of 127.0.0.1 -> ok, why
    (("ok", ("127.0.0.2",)), ("nxdomain", ()), True, "ok"),
    (("nxdomain", ()), ("nxdomain", ()), False, "does_not_list_127.0.0.2"),
    (("ok", ("127.0.0.2",)), ("ok", ("127.0.0.2",)), False, "lists_127.0.0.1"),
    (("ok", ("127.255.255.254",)), ("nxdomain", ()), False, "error_code"),
    (("ok", ("10.0.0.1",)), ("nxdomain", ()), False, "error_code"),
    (("timeout", ()), ("nxdomain", ()), None, "no_answer"),
    (("ok", ("127.0.0.2",)), ("error", ()), None, "no_answer"),
]


@pytest.mark.parametrize(("two", "one", "ok", "why"), HEALTH)
def test_health_of_test_points(two: tuple[str, tuple[str, ...]], one: tuple[str, tuple[str, ...]],
                               ok: bool | None, why: str) -> None:
    assert health_of(two[0], two[1], one[0], one[1]) == (ok, why)


def test_zone_health_goes_off_and_comes_back() -> None:
    h = ZoneHealth(interval=300)
    assert h.usable("z") and h.due("z", 0)
    h.begin("z", 0)
    assert not h.due("z", 1)                        # one test at a time
    assert h.tested("z", True, "ok", 1) is None     # on, stays on: nothing to log
    assert not h.due("z", 100) and h.due("z", 301)
    h.begin("z", 301)
    assert h.tested("z", False, "lists_127.0.0.1", 302) == "off:lists_127.0.0.1"
    assert not h.usable("z")
    h.begin("z", 602)
    assert h.tested("z", None, "no_answer", 603) is None and not h.usable("z")
    h.begin("z", 903)
    assert h.tested("z", True, "ok", 904) == "on" and h.usable("z")
    assert h.error_code("z", 905) == "off:error_code"
    assert h.error_code("z", 906) is None           # logged once
    assert not h.due("z", 1000) and h.due("z", 1205)


# --- judgements ---------------------------------------------------------------------------------

BL_SITES = [parse_site(s) for s in ("k3y.bl.test=127.0.0.[2..11]*2", "two.test*1")]
NAMES_MAP = {"k3y.bl.test": "bl.test"}

DNSBL = [
    # results, outcome, reason, zones shown
    ({}, Outcome.NEUTRAL, "", ""),
    ({"two.test": listed("two.test", "127.0.0.2")}, Outcome.SHAPE, "dnsbl:1", "two.test"),
    ({"k3y.bl.test": listed("k3y.bl.test", "127.0.0.4")}, Outcome.SHAPE, "dnsbl:2", "bl.test"),
    ({"k3y.bl.test": listed("k3y.bl.test", "127.0.0.12")}, Outcome.NEUTRAL, "", ""),
    ({"k3y.bl.test": listed("k3y.bl.test", "127.0.0.4"), "two.test": listed("two.test",
                                                                             "127.0.0.2")},
     Outcome.REFUSE, "dnsbl:reject:3", "bl.test,two.test"),
    ({"k3y.bl.test": ZoneResult("k3y.bl.test", State.TEMP, why="timeout")}, Outcome.NEUTRAL,
     "dnsbl:bl.test:timeout", ""),
    ({"k3y.bl.test": ZoneResult("k3y.bl.test", State.TEMP, why="off")}, Outcome.NEUTRAL, "", ""),
]


@pytest.mark.parametrize(("results", "outcome", "reason", "zones"), DNSBL)
def test_dnsbl_judgements(results: dict[str, ZoneResult], outcome: Outcome, reason: str,
                          zones: str) -> None:
    j = dnsbl_judgement(results, BL_SITES, 1.0, 3.0, NAMES_MAP)
    assert (j.outcome, j.reason, dict(j.facts).get("dnsbl_zones", "")) == (outcome, reason, zones)
    if outcome is Outcome.REFUSE:
        assert j.reply.startswith("554 5.7.1 ") and "bl.test, two.test" in j.reply
        assert "k3y" not in j.reply + j.reason + str(j.facts)       # the key never shows
    if outcome is Outcome.SHAPE:
        assert j.score == float(reason.split(":")[-1])


def test_dnsbl_without_reject_threshold_only_shapes() -> None:
    both = {"k3y.bl.test": listed("k3y.bl.test", "127.0.0.4"),
            "two.test": listed("two.test", "127.0.0.2")}
    j = dnsbl_judgement(both, BL_SITES, 1.0, 0.0, NAMES_MAP)
    assert (j.outcome, j.score) == (Outcome.SHAPE, 3.0)


WL_SITES = [parse_site(s) for s in ("list.dnswl.test=127.0.[2..15].[0..3]", "k3y.wl.test*2")]

DNSWL = [
    # results, outcome, identity, reason
    ({"list.dnswl.test": listed("list.dnswl.test", "127.0.10.1", txt="https://x/y")},
     Outcome.PROMOTE, "dnswl:list.dnswl.test", "dnswl:list.dnswl.test:low"),
    ({"list.dnswl.test": listed("list.dnswl.test", "127.0.10.0")}, Outcome.NEUTRAL, "", ""),
    ({"list.dnswl.test": listed("list.dnswl.test", "127.0.0.255")}, Outcome.NEUTRAL, "", ""),
    ({"list.dnswl.test": listed("list.dnswl.test", "127.0.1.3")}, Outcome.NEUTRAL, "", ""),
    ({"list.dnswl.test": listed("list.dnswl.test", "127.0.10.3"),
      "k3y.wl.test": listed("k3y.wl.test", "127.0.0.2")},
     Outcome.PROMOTE, "dnswl:wl.test", "dnswl:wl.test:medium"),
    ({"list.dnswl.test": ZoneResult("list.dnswl.test", State.TEMP, why="timeout")},
     Outcome.NEUTRAL, "", "dnswl:list.dnswl.test:timeout"),
]


@pytest.mark.parametrize(("results", "outcome", "identity", "reason"), DNSWL)
def test_dnswl_judgements(results: dict[str, ZoneResult], outcome: Outcome, identity: str,
                          reason: str) -> None:
    j = dnswl_judgement(results, WL_SITES, 1.0, {"k3y.wl.test": "wl.test"})
    assert (j.outcome, j.identity, j.reason) == (outcome, identity, reason)


def test_dnswl_facts_are_rfc_8904s() -> None:
    r = {"list.dnswl.test": listed("list.dnswl.test", "127.0.10.1", txt="https://x/y")}
    j = dnswl_judgement(r, WL_SITES, 1.0, {})
    assert j.facts == (("dnswl", "list.dnswl.test"), ("dnswl_ip", "127.0.10.1"),
                       ("dnswl_txt", "https://x/y"))


def test_dnswl_threshold_and_no_levels() -> None:
    r = {"list.dnswl.test": listed("list.dnswl.test", "127.0.10.0")}
    assert dnswl_judgement(r, WL_SITES, 1.0, {}, (), 0).outcome is Outcome.PROMOTE
    assert dnswl_judgement(r, WL_SITES, 2.0, {}, (), 0).outcome is Outcome.NEUTRAL
