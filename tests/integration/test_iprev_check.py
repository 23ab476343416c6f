"""The FCrDNS check (ingress.edge.checks.iprev) through Checks.run against the loopback DNS
server: PTR and A records that confirm and ones that do not, a silent reverse zone, a learned
provider's promotion (and none for a name that does not confirm), the [iprev] table."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from ingress.core import config
from ingress.edge.checks import Checks, Client
from ingress.edge.learned_store import LearnedStore
from ingress.policy.checks import Stage, Verdict
from tests.kit.configkit import cfg_file
from tests.kit.dnsserver import DNSServer

RECORDS = {
    # 127.0.0.5 and .6: two addresses of one provider's pool, both confirmed forward
    "5.0.0.127.in-addr.arpa": {"PTR": ["mta1.mail.provider.test."]},
    "6.0.0.127.in-addr.arpa": {"PTR": ["mta2.mail.provider.test."]},
    "mta1.mail.provider.test": {"A": ["127.0.0.5"]},
    "mta2.mail.provider.test": {"A": ["127.0.0.6"]},
    # .7 claims the provider's host name, whose A record does not hold it: fail
    "7.0.0.127.in-addr.arpa": {"PTR": ["mta1.mail.provider.test."]},
    # .8: a generic pool name that confirms (pass, no provider)
    "8.0.0.127.in-addr.arpa": {"PTR": ["127-0-0-8.dyn.isp.test."]},
    "127-0-0-8.dyn.isp.test": {"A": ["127.0.0.8"]},
    # .9: a name without any address (fail); .10: no PTR at all (permerror)
    "9.0.0.127.in-addr.arpa": {"PTR": ["nowhere.provider.test."]},
    # .11: the PTR names a host in a forward zone that never answers (temperror)
    "11.0.0.127.in-addr.arpa": {"PTR": ["mx.slow.test."]},
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(RECORDS) as server:
        server.silent.update({"12.0.0.127.in-addr.arpa", "mx.slow.test"})
        yield server


def checks(dns: DNSServer, tmp_path: Path, **iprev: object) -> tuple[Checks, LearnedStore]:
    cfg = config.load(cfg_file(tmp_path, classify={"nameservers": [dns.address],
                                                   "dns_timeout": 0.5},
                               iprev=iprev, spool={"state_dir": str(tmp_path / "state")}))
    store = LearnedStore(tmp_path / "learned.json", cfg)
    return Checks.from_config(cfg, SimpleNamespace(learned_store=store)), store


def run(c: Checks, ip: str, deadline: float = 5.0) -> Verdict:
    return asyncio.run(c.run(Stage.CONNECT, Client(ip), deadline))


def test_the_check_is_on_wherever_dns_is(dns: DNSServer, tmp_path: Path) -> None:
    c, _ = checks(dns, tmp_path)
    (check,) = c.at(Stage.CONNECT)
    assert (check.name, check.holds_banner) == ("iprev", False)
    assert not c.holds_banner(Stage.CONNECT)
    off, _ = checks(dns, tmp_path, enabled=False)
    assert not off.at(Stage.CONNECT)
    nodns = Checks.from_config(config.load(cfg_file(tmp_path)))   # the embedded default
    assert not nodns


@pytest.mark.parametrize(("ip", "facts", "reason"), [
    ("127.0.0.5", {"iprev": "pass", "iprev_name": "mta1.mail.provider.test",
                   "provider": "provider.test"}, "iprev:pass"),
    ("127.0.0.7", {"iprev": "fail"}, "iprev:fail"),
    ("127.0.0.8", {"iprev": "pass", "iprev_name": "127-0-0-8.dyn.isp.test"}, "iprev:pass"),
    ("127.0.0.9", {"iprev": "fail"}, "iprev:fail"),
    ("127.0.0.10", {"iprev": "permerror"}, "iprev:permerror"),
    ("127.0.0.11", {"iprev": "temperror"}, "iprev:temperror"),
    ("127.0.0.12", {"iprev": "temperror"}, "iprev:temperror"),
])
def test_results(dns: DNSServer, tmp_path: Path, ip: str, facts: dict[str, str],
                 reason: str) -> None:
    c, _ = checks(dns, tmp_path, deadline=1.5)
    v = run(c, ip)
    assert (dict(v.facts), v.reasons, v.identity) == (facts, (reason,), "")


def test_a_silent_reverse_zone_is_bounded_by_the_deadline(dns: DNSServer,
                                                           tmp_path: Path) -> None:
    c, _ = checks(dns, tmp_path, deadline=0.3)
    t = time.monotonic()
    v = run(c, "127.0.0.12")
    assert dict(v.facts) == {"iprev": "temperror"}
    assert time.monotonic() - t < 3.0       # the deadline (0.3 s), with a generous margin


def test_a_learned_provider_promotes_its_pool(dns: DNSServer, tmp_path: Path) -> None:
    """Learned from .5 (the worker's learn fact names the provider), .6 of the same verified
    provider is promoted at connect to the learned domain's identity; .7, whose PTR names the
    provider's host but whose forward lookup does not confirm, is not; nor is a generic name."""
    c, store = checks(dns, tmp_path)
    assert run(c, "127.0.0.6").identity == ""            # nothing learned yet
    store.learn_provider("provider.test", time.time(), "shop.test")
    v = run(c, "127.0.0.6")
    assert (v.identity, v.promotion) == ("learned:shop.test", "provider:provider.test")
    assert dict(v.facts)["provider"] == "provider.test"
    v = run(c, "127.0.0.7")
    assert (v.identity, dict(v.facts)) == ("", {"iprev": "fail"})
    assert run(c, "127.0.0.8").identity == ""
    store.unlearn_provider("provider.test")
    assert run(c, "127.0.0.6").identity == ""


def test_ptr_and_forward_keys_bound_the_queries(dns: DNSServer, tmp_path: Path) -> None:
    """The PTR queries of one client network share one key: with dns_per_key = 1, a second
    client of the silent network's /24 gets busy (temperror) at once instead of a query."""
    cfg = config.load(cfg_file(tmp_path, classify={"nameservers": [dns.address],
                                                   "dns_timeout": 0.5},
                               checks={"dns_per_key": 1},
                               spool={"state_dir": str(tmp_path / "state")}))
    c = Checks.from_config(cfg, SimpleNamespace(learned_store=LearnedStore(
        tmp_path / "l.json", cfg)))

    async def main() -> tuple[Verdict, Verdict]:
        before = sum(1 for q in dns.queries if q[0].startswith("13.0.0.127"))
        dns.silent.update({"13.0.0.127.in-addr.arpa", "14.0.0.127.in-addr.arpa"})
        a, b = await asyncio.gather(c.run(Stage.CONNECT, Client("127.0.0.13"), 3.0),
                                    c.run(Stage.CONNECT, Client("127.0.0.14"), 3.0))
        assert sum(1 for q in dns.queries if q[0].startswith("13.0.0.127")) > before
        assert not any(q[0].startswith("14.0.0.127") for q in dns.queries)
        return a, b

    a, b = asyncio.run(main())
    assert dict(a.facts) == dict(b.facts) == {"iprev": "temperror"}


def test_iprev_table_bounds(tmp_path: Path) -> None:
    cfg = config.load(cfg_file(tmp_path))
    assert (cfg.iprev.enabled, cfg.iprev.deadline, cfg.iprev.max_names) == (True, 3.0, 3)
    with pytest.raises(config.ConfigError):
        config.load(cfg_file(tmp_path, iprev={"max_names": 11}))
    with pytest.raises(config.ConfigError):
        config.load(cfg_file(tmp_path, iprev={"deadline": 0}))
