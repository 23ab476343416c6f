"""A DNS block-list score shapes bulk, end to end (issue 18 item 3; ingress.policy.shaping): a
real ingress (one acceptor, so that its slots and per-IP counts are the ones the test fills)
asks the loopback DNS server about its clients (loopback source addresses are different
clients); dnsbl.reject_threshold is 0, so a listing never refuses by itself.

- 2 listed + 5 unlisted silent bots fill the bulk slots (the listed ones connected last, so the
  longest-silent rule alone would pick an unlisted one): newcomers evict the listed ones first,
  the higher score first, then the longest-silent unlisted one;
- a listed IP's second connection gets the per-IP 421 (at admission: the IP is remembered
  listed); two at once from another listed IP: one of them gets it (at admission or when its
  verdict arrives, whichever came first);
- with the bulk cap saturated, a listed client's retry after the minimum delay is deferred again
  (no retry bypass), while an unlisted client's is accepted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, make_body, send_one
from tests.kit.scrape import metrics_port, scrape, value

LOW = "127.0.0.91"             # bl.test lists it: score 2
HIGH = "127.0.0.92"            # bl.test and hi.test: score 3
PAIR = "127.0.0.93"            # bl.test: the per-IP cap, one after the other
BURST = "127.0.0.94"           # bl.test: the per-IP cap, two at once
RETRIER = "127.0.0.95"         # bl.test: a listed MTA retrying
UNLISTED = [f"127.0.0.{100 + i}" for i in range(5)]
NEWCOMERS = [f"127.0.0.{110 + i}" for i in range(3)]
SPAM_SOURCE = "127.0.1.2"      # test_retry_deferred's spam source (another /24)
MIN_DELAY = 1.0


def rev(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    records = {f"2.0.0.127.{z}": {"A": ["127.0.0.2"]} for z in ("bl.test", "hi.test")}
    records.update({f"{rev(ip)}.bl.test": {"A": ["127.0.0.2"]}
                    for ip in (LOW, HIGH, PAIR, BURST, RETRIER)})
    records[f"{rev(HIGH)}.hi.test"] = {"A": ["127.0.0.2"]}
    with DNSServer(records) as server:
        yield server


def tables(dns: DNSServer, **extra: dict[str, object]) -> dict[str, dict[str, object]]:
    return {
        "supervisor": {"acceptors": 1},
        "classify": {"nameservers": [dns.address], "dns_timeout": 1.0},
        "metrics": {"listen": "127.0.0.1:0"},
        "dnsbl": {"sites": ["bl.test*2", "hi.test*1"], "threshold": 2,
                  "listed_per_ip_max": 1, "listed_ttl": 300.0},
        **extra,
    }


class Bot:
    """A silent client: reads its banner, then says nothing."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self, port: int) -> str:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port,
                                                                 local_addr=(self.ip, 0))
        return (await asyncio.wait_for(self.reader.readline(), 15)).decode()

    async def told(self, timeout: float = 0.5) -> str:
        """What the server said since the banner ("" if nothing within `timeout`)."""
        assert self.reader is not None
        try:
            return (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
        except TimeoutError:
            return ""

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def test_listed_silent_bots_are_evicted_first(tmp_path: Path, dns: DNSServer) -> None:
    with Ingress(tmp_path, tables(dns, smtp={"max_connections": 8, "fast_reserve": 1})) as ing:
        async def scenario() -> list[str]:
            held = [Bot(ip) for ip in (*UNLISTED, LOW, HIGH)]      # 7: the bulk share
            newcomers = [Bot(ip) for ip in NEWCOMERS]
            try:
                for bot in held:
                    assert (await bot.connect(ing.port)).startswith("220"), bot.ip
                evicted = []
                for bot in newcomers:
                    assert (await bot.connect(ing.port)).startswith("220"), bot.ip
                    alive = [b for b in held if b.ip not in evicted]
                    told = dict(zip((b.ip for b in alive),
                                    await asyncio.gather(*(b.told() for b in alive)),
                                    strict=True))
                    gone = [ip for ip, line in told.items() if line.startswith("421")]
                    assert len(gone) == 1, told
                    evicted += gone
                return evicted
            finally:
                for bot in (*held, *newcomers):
                    bot.close()

        assert asyncio.run(scenario()) == [HIGH, LOW, UNLISTED[0]]
        reasons = {e["peer"]: e["reason"] for e in ing.events("evicted")}
        assert reasons[HIGH] == reasons[LOW] == "silent_listed"
        assert reasons[UNLISTED[0]] == "silent"


def test_a_listed_ip_is_held_to_its_per_ip_limit(tmp_path: Path, dns: DNSServer) -> None:
    with Ingress(tmp_path, tables(dns)) as ing:
        mport = metrics_port(ing)

        async def scenario() -> tuple[str, str, list[str]]:
            first, second = Bot(PAIR), Bot(PAIR)
            burst = [Bot(BURST), Bot(BURST)]
            try:
                one = await first.connect(ing.port)
                two = await second.connect(ing.port)      # PAIR is remembered listed now
                lines = list(await asyncio.gather(*(b.connect(ing.port) for b in burst)))
                lines += [await b.told() for b in burst if b.reader is not None]
                return one, two, lines
            finally:
                for bot in (first, second, *burst):
                    bot.close()

        one, two, lines = asyncio.run(scenario())
        assert one.startswith("220") and two.startswith("421 4.7.0"), (one, two)
        assert sum(line.startswith("220") for line in lines[:2]) >= 1, lines
        assert sum(line.startswith("421 4.7.0") for line in lines) == 1, lines
        refused = [e for e in ing.events("connection_refused") if e.get("peer") == PAIR]
        assert refused and refused[0]["reason"] == "listed-per-ip"
        m = scrape(mport)
        assert value(m, "smtp_ingress_connections_total", lane="bulk",
                     outcome="listed-per-ip") == 2


async def _saturate(port: int, attempts: int = 100) -> None:
    run = 0
    for i in range(attempts):
        code, _ = await send_one(port, make_body(i, 200), sender=f"spam{i}@spam.test",
                                 source=SPAM_SOURCE)
        run = run + 1 if code in (421, 451) else 0
        if run >= 3:
            return
    raise AssertionError("the bulk cap was never saturated")


def test_a_listed_client_gets_no_retry_bypass(tmp_path: Path, dns: DNSServer) -> None:
    with Ingress(tmp_path, tables(
            dns, lanes={"bulk": {"rate": 0.001, "burst": 1, "workers": 1}},
            admission={"retry_share": 0.5, "retry_min_delay": MIN_DELAY, "retry_ttl": 600.0,
                       "shed_delay": 0.0})) as ing:
        mport = metrics_port(ing)

        async def scenario() -> tuple[int, ...]:
            await _saturate(ing.port)
            codes = []
            for source, sender in ((RETRIER, "mta@listed.test"), ("127.0.0.1", "mta@ok.test")):
                codes.append((await send_one(ing.port, make_body(1), sender=sender,
                                             source=source))[0])
            await asyncio.sleep(MIN_DELAY + 0.3)
            for source, sender in ((RETRIER, "mta@listed.test"), ("127.0.0.1", "mta@ok.test")):
                codes.append((await send_one(ing.port, make_body(2), sender=sender,
                                             source=source))[0])
            return tuple(codes)

        # deferred both; the unlisted one's retry is a bypass, the listed one's is not
        assert asyncio.run(scenario()) == (451, 451, 451, 250)
        m = scrape(mport)
        assert value(m, "smtp_ingress_deferral_retries_total", lane="bulk",
                     result="bypassed") == 1
