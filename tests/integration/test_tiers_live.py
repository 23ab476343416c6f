"""Trust tiers end to end (issue 17, Build item 1): real supervisor, acceptors, brokers and workers
on loopback, SPF against the real DNS server of tests/kit/dnsserver.py, several loopback source
addresses.

(a) Many SPF-pass domains cannot get more than the self-proven tier's total rate plus the bulk
    cap accepted, however many domains there are (5 or 30: the same ceiling).
(b) Self-proven sessions (learned clients) holding the slots never cost an allow-listed client
    a 421: it finds the operator tier's floor free, or takes an idle lower-tier session's slot,
    or, when the fast acceptor is full, is served where it arrived (the hand-off falls back).
(c) Promoted sessions of one IP are capped (admission.per_ip_fast_max); beyond it they are
    served as bulk; the operator tier is exempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from ingress.policy.learned import LearnedAllow
from tests.kit.dnsserver import DNSServer
from tests.kit.harness import Ingress, send_one
from tests.kit.session import HeldSession

ALLOWED = "127.0.0.20"
SPF_RECORD = "v=spf1 ip4:127.0.0.0/8 -all"
DOMAINS = [f"d{i}.test" for i in range(30)]


@pytest.fixture(scope="module")
def dns():
    records: dict[str, dict[str, list[str]]] = {d: {"TXT": [SPF_RECORD]} for d in DOMAINS}
    records["good.test"] = {"TXT": [SPF_RECORD]}
    with DNSServer(records) as server:
        yield server


def body(subject: str, domain: str = "d0.test") -> bytes:
    return (f"From: a@{domain}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}.{time.time_ns()}@{domain}>\r\n\r\nHello.\r\n").encode()


TIER_RATE = 3.0          # tiers.self_proven_rate (and its burst)
BULK_RATE = 3.0          # lanes.bulk.rate (and its burst)
WINDOW = 5.0             # seconds of sending


def flood_tables(dns: DNSServer) -> dict[str, dict[str, Any]]:
    return {
        "classify": {"spf_promote": "any", "nameservers": [dns.address], "dns_timeout": 1.0,
                     "spf_deadline": 2.0, "identity_share": 1.0,
                     "domain_rate": 1.0, "domain_burst": 1.0},
        "tiers": {"self_proven_rate": TIER_RATE, "self_proven_burst": TIER_RATE},
        "lanes.bulk": {"rate": BULK_RATE, "burst": int(BULK_RATE)},
        # a spammer's client: no tarpit on sheds and no error limits in its way
        "admission": {"shed_delay": 0.0, "shed_limit": 100000},
        "smtp": {"mail_without_data_limit": 100000, "soft_error_limit": 999,
                 "hard_error_limit": 1000, "error_sleep": 0.0},
        "supervisor": {"acceptors": 1},
    }


async def spam(port: int, domains: list[str], conns: int, window: float
               ) -> tuple[int, int, float]:
    """`conns` connections (each from its own loopback address), each sending one message
    after another, the MAIL FROM domain rotating over `domains`, for `window` seconds.
    Returns (accepted, MAIL attempts, seconds from the first MAIL to the last 250)."""
    start = time.monotonic()
    end = start + window
    accepted = attempts = 0
    last_ok = start

    async def one(j: int) -> None:
        nonlocal accepted, attempts, last_ok
        i = j
        while time.monotonic() < end:
            s, banner = await HeldSession.open(port, f"127.0.9.{j + 1}")
            if not banner.startswith("220") or not (await s.cmd("EHLO spam.test")
                                                    ).startswith("250"):
                s.close()
                await asyncio.sleep(0.05)
                continue
            while time.monotonic() < end:
                domain = domains[i % len(domains)]
                i += conns
                attempts += 1
                r = await s.message(f"x{i}@{domain}", body(f"s{j}-{i}", domain))
                if r.startswith("250"):
                    accepted += 1
                    last_ok = time.monotonic()
                elif r.startswith("421") or r == "EOF":
                    break
                elif not r.startswith("4"):
                    raise AssertionError(f"unexpected reply {r!r}")
            s.close()

    await asyncio.gather(*(one(j) for j in range(conns)))
    return accepted, attempts, last_ok - start


@pytest.mark.parametrize("n_domains", [5, 30])
def test_many_spf_domains_get_one_tier_rate(tmp_path: Path, dns: DNSServer,
                                            n_domains: int) -> None:
    """Each domain has its own SPF record and its own classify.domain_rate (1/s), so on the
    code before tiers 30 domains got 30 x the domain rate through the fast lane. Now the
    self-proven tier as a whole gets tiers.self_proven_rate: what is accepted (fast and bulk)
    stays under the tier's rate plus the bulk cap, with 5 domains and with 30."""
    with Ingress(tmp_path, flood_tables(dns)) as ing:
        accepted, attempts, elapsed = asyncio.run(spam(ing.port, DOMAINS[:n_domains], 6,
                                                       WINDOW))
        # the broker buckets (each starting full) bound it exactly: rate x t + burst each
        ceiling = (TIER_RATE + BULK_RATE) * max(elapsed, WINDOW) + TIER_RATE + BULK_RATE + 3
        print(f"{n_domains} domains: {accepted} accepted of {attempts} tries in {elapsed:.1f} s"
              f" (ceiling {ceiling:.0f})")
        assert attempts >= 2 * ceiling, (attempts, ceiling)       # the spammer did push
        assert accepted <= ceiling, (n_domains, accepted, ceiling, elapsed)
        assert accepted > 0
        lanes = [e.get("lane") for e in ing.events("message") if e.get("reply") == "250"]
        assert "fast" in lanes and "bulk" in lanes, lanes
        if n_domains == 30:       # the tier's rate is what held it, not the domains' own
            assert ing.events("over_rate") and any(
                "over-rate:tier:self-proven" in str(e.get("reasons"))
                for e in ing.events("over_rate")), ing.events("over_rate")


@pytest.mark.parametrize(("n_domains", "window", "sends", "fast"), [(3, 7.0, 12, 9),
                                                                  (30, 8.0, 15, 14)])
def test_a_modest_spf_sender_keeps_its_share_of_the_tier(
        tmp_path: Path, dns: DNSServer, n_domains: int, window: float, sends: int,
        fast: int) -> None:
    """The tier's total rate is shared max-min fairly (FairBucket), not first come first
    served, and between client sites (/24, /48), not identities: a spammer's network asking
    as fast as six connections go, its MAIL FROM rotating over 3 or 30 SPF-pass domains (each
    a fresh identity with a fresh fair part), cannot starve an SPF-pass sender from its own
    network that sends 2.5 messages a second: with 30 domains, ten times what a per-domain
    part of the tier (20/s over 31, with headroom) would give it. Its mail stays in the fast
    lane. (A plain bucket let through about one in twelve of the 3-domain row; shared by
    domain, the 30-domain row got about one in five. The bulk cap here is tiny, so what
    spills is shed; an ask now and then still finds the shared bucket empty.)"""
    t = flood_tables(dns)
    t["classify"].update(domain_rate=1000.0, domain_burst=50.0)
    t["tiers"] = {"self_proven_rate": 20.0, "self_proven_burst": 10.0}
    t["lanes.bulk"] = {"rate": 1.0, "burst": 1}
    with Ingress(tmp_path, t) as ing:
        async def run() -> list[tuple[int, str]]:
            flood = asyncio.create_task(spam(ing.port, DOMAINS[:n_domains], 6, window))
            await asyncio.sleep(1.5)
            out = []
            for i in range(sends):
                out.append(await send_one(ing.port, body(f"good{i}", "good.test"),
                                          source="127.0.2.5", sender="a@good.test"))
                await asyncio.sleep(0.4)
            _, attempts, _ = await flood
            assert attempts > 200, attempts            # the spammer did push
            return out

        out = asyncio.run(run())
        assert sum(c == 250 for c, _ in out) >= fast, out
        lanes = [e.get("lane") for e in ing.events("message") if e.get("peer") == "127.0.2.5"]
        assert lanes.count("fast") >= fast, lanes
        # the tier's rate did bind (the spammer's sessions were sent to the bulk lane)
        assert any("over-rate:tier:self-proven" in str(e.get("reasons"))
                   for e in ing.events("over_rate")), ing.events("over_rate")


# --------------------------------------------------------------------------------------- (b)

LEARNED = [(f"127.{10 + i}.0.1", f"d{i}.test") for i in range(8)]   # each its own network


def learned_state(domains: list[tuple[str, str]]) -> Path:
    """A state directory whose learned allow cache holds these (ip, domain) entries (as if
    each had delivered SPF + aligned DKIM mail), read by every acceptor at start."""
    state = Path(tempfile.mkdtemp(prefix="si-", dir="/tmp"))
    cache = LearnedAllow(ttl=86400.0, max_size=1000)
    for ip, domain in domains:
        cache.learn(ip, time.time(), domain)
    (state / "learned.json").write_text(cache.to_json())
    return state


def remove_state(state: Path) -> None:
    with contextlib.suppress(OSError):
        for f in (state / "run").iterdir():
            f.unlink()
        (state / "run").rmdir()
    with contextlib.suppress(OSError):
        for f in state.iterdir():
            f.unlink()
        state.rmdir()


async def hold(port: int, sources: list[str]) -> tuple[list[HeldSession], list[str]]:
    """A session from each source (repeats allowed), EHLO said, held open; their banners."""
    held, banners = [], []
    for src in sources:
        s, banner = await HeldSession.open(port, src)
        banners.append(banner[:3])
        if banner.startswith("220"):
            await s.cmd("EHLO held.test")
            held.append(s)
        else:
            s.close()
    return held, banners


@pytest.mark.parametrize("fast_acceptors", [0, 1])
def test_learned_sessions_never_cost_the_allow_listed_a_421(tmp_path: Path,
                                                            fast_acceptors: int) -> None:
    """8 learned domains, each from its own IP, 2 sessions per IP, against one acceptor of 8
    slots (4 of them the fast reserve). Before tiers they filled its slots (or, with a fast
    acceptor, the fast acceptor's) and the allow-listed client got 421. Now the self-proven
    tier holds at most its share of the reserve (the rest of them are bulk or refused), and
    learned clients stay on the port-25 acceptor: the allow-listed client is served, in the
    fast lane."""
    state = learned_state(LEARNED)
    tables = {"classify": {"allow_cidrs": [f"{ALLOWED}/32"], "identity_share": 1.0},
              "smtp": {"max_connections": 8, "fast_reserve": 4},
              "supervisor": {"acceptors": 1, "fast_acceptors": fast_acceptors}}
    try:
        with Ingress(tmp_path, tables, state=state) as ing:
            async def run() -> tuple[list[str], list[tuple[int, str]]]:
                held, banners = await hold(ing.port, [ip for ip, _ in LEARNED for _ in (0, 1)])
                await asyncio.sleep(0.2)
                out = [await send_one(ing.port, body(f"allowed{i}"), source=ALLOWED,
                                      sender="a@allowed.test") for i in range(3)]
                for s in held:
                    s.close()
                return banners, out

            banners, out = asyncio.run(run())
            assert [c for c, _ in out] == [250] * 3, (out, banners)
            assert banners.count("220") >= 4, banners       # they did hold the slots
            lanes = {e.get("lane") for e in ing.events("message") if e.get("peer") == ALLOWED}
            assert lanes == {"fast"}, ing.events("message")
            promoted = [e for e in ing.events("over_share") if "tier:self-proven"
                        in str(e.get("reasons"))]
            assert promoted, ing.events("over_share")     # the tier's cap bit
    finally:
        remove_state(state)


def test_allow_listed_takes_an_idle_self_proven_slot(tmp_path: Path) -> None:
    """One acceptor of 5 slots (4 reserved for the fast lane: the operator's floor is 1, the
    self-proven tier's cap 2): two learned sessions and three allow-listed ones fill it. The
    fourth allow-listed client takes an idle self-proven session's slot (that one gets 421 and
    comes back later); before tiers it got 421 itself."""
    state = learned_state(LEARNED[:2])
    tables = {"classify": {"allow_cidrs": [f"{ALLOWED}/32"], "identity_share": 1.0},
              "smtp": {"max_connections": 5, "fast_reserve": 4},
              "supervisor": {"acceptors": 1, "fast_acceptors": 0}}
    try:
        with Ingress(tmp_path, tables, state=state) as ing:
            async def run() -> tuple[list[str], list[str], str, list[str]]:
                learned, lb = await hold(ing.port, [ip for ip, _ in LEARNED[:2]])
                allowed, ab = await hold(ing.port, [ALLOWED] * 3)
                fourth, banner = await HeldSession.open(ing.port, ALLOWED)
                await fourth.cmd("EHLO relay.test")
                reply = await fourth.message("a@allowed.test", body("fourth"))
                # the evicted learned session was told why
                told = [await s.reply(timeout=2.0) for s in learned]
                for s in (*learned, *allowed, fourth):
                    s.close()
                return lb + ab, told, reply, [banner[:3]]

            banners, told, reply, fourth = asyncio.run(run())
            assert banners == ["220"] * 5, banners
            assert fourth == ["220"] and reply.startswith("250"), (fourth, reply)
            assert sum(t.startswith("421") for t in told) == 1, told
            evicted = ing.events("evicted")
            assert [e.get("tier") for e in evicted] == ["self-proven"], evicted
    finally:
        remove_state(state)


def test_a_full_fast_acceptor_hands_the_client_back(tmp_path: Path) -> None:
    """The fast acceptor holds 4 slots, all taken by allow-listed sessions: the next
    allow-listed client cannot be served there, so it is handed back and served by the port-25
    acceptor it arrived at (never a 421; before tiers the hand-off counted as done and the fast
    acceptor refused it)."""
    tables = {"classify": {"allow_cidrs": ["127.0.0.0/24"], "identity_share": 1.0},
              "smtp": {"max_connections": 4, "fast_reserve": 2},
              "supervisor": {"acceptors": 1, "fast_acceptors": 1}}
    with Ingress(tmp_path, tables) as ing:
        async def run() -> tuple[list[str], tuple[int, str]]:
            held, banners = await hold(ing.port, [f"127.0.0.{30 + i}" for i in range(4)])
            out = await send_one(ing.port, body("fifth"), source="127.0.0.40",
                                 sender="a@allowed.test")
            for s in held:
                s.close()
            return banners, out

        banners, (code, text) = asyncio.run(run())
        assert banners == ["220"] * 4, banners
        assert code == 250, (code, text, ing.log_tail())
        served = [e["proc"] for e in ing.events("message") if e.get("peer") == "127.0.0.40"]
        assert served == ["acceptor-0"], served
        assert ing.events("handed_back"), ing.log_tail()


# --------------------------------------------------------------------------------------- (c)

def test_promoted_sessions_are_capped_per_ip(tmp_path: Path, dns: DNSServer) -> None:
    """admission.per_ip_fast_max 2: of four sessions from one address whose SPF passes, two
    are promoted and two are served as bulk (reason over-share:ip:...), all accepted. The
    allow-listed address is exempt: four sessions, four in the fast lane."""
    tables = {"classify": {"spf_promote": "any", "nameservers": [dns.address],
                           "dns_timeout": 1.0, "spf_deadline": 2.0, "identity_share": 1.0,
                           "allow_cidrs": [f"{ALLOWED}/32"]},
              "admission": {"per_ip_fast_max": 2},
              "smtp": {"max_connections": 40, "fast_reserve": 20},
              "supervisor": {"acceptors": 1, "fast_acceptors": 0}}
    with Ingress(tmp_path, tables) as ing:
        async def run() -> list[str]:
            spf, _ = await hold(ing.port, ["127.0.5.1"] * 4)
            allowed, _ = await hold(ing.port, [ALLOWED] * 4)
            out = [await s.message("a@good.test", body(f"spf{i}", "good.test"))
                   for i, s in enumerate(spf)]
            out += [await s.message("a@allowed.test", body(f"allowed{i}"))
                    for i, s in enumerate(allowed)]
            for s in (*spf, *allowed):
                s.close()
            return out

        out = asyncio.run(run())
        assert all(r.startswith("250") for r in out), out
        lanes = {e["peer"]: [] for e in ing.events("message")}
        for e in ing.events("message"):
            lanes[e["peer"]].append(e["lane"])
        assert sorted(lanes["127.0.5.1"]) == ["bulk", "bulk", "fast", "fast"], lanes
        assert lanes[ALLOWED] == ["fast"] * 4, lanes
        assert len(ing.events("promoted")) == 2, ing.events("promoted")
        assert sum("over-share:ip:127.0.5.1" in str(e.get("reasons"))
                   for e in ing.events("over_share")) == 2, ing.events("over_share")
