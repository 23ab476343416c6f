"""The benchmark's scenarios (pure tables): what each flood is, who is judged and against what, and
the DNS records the scenarios need. bench/run.py runs them; the scenario list and what each row
measures are in its docstring and in docs/benchmarks.md.

API
    Scenario                     one flood scenario (frozen): bots, judged senders, issue tag,
                                 reloads, and (issue 18) its own smtp-ingress config overrides
                                 (``settings``: that scenario gets a fresh target), its extra
                                 legitimate senders (``extra``) and its no-flood reference
                                 (``base``)
    build_scenarios(mode, ramp, large_bots, picked) -> dict[str, Scenario]
    adversarial_scenarios(full, measured) -> list[Scenario]          issue 17
    adversary_dns(dkim_record) -> (records, silent names)            issue 17
    evidence_scenarios(full, measured) -> list[Scenario]             issue 18
    evidence_dns(dkim_record) -> records                             issue 18 (DNS lists, PTRs)
    evidence_specs(extra, dkim_key) -> list[LegitSpec]               issue 18's senders
    listed_bots() -> list[str]                                       the block-listed addresses

Failure modes: ValueError for an unknown mode. Limits: none (pure).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.flood import BotConfig, LegitSpec, bot_address
from bench.flood.adversary import Adversary

TRUSTED_IP, CERT_IP, SPF_IP = "127.0.0.10", "127.0.0.11", "127.0.0.12"
SPF_DOMAIN = "spf-pass.test"
SPF_BOTS_DOMAIN = "spf-bots.test"   # a spammer's own domain: SPF pass for the spam bots (127.4/16)
SPF_MANY = "spam{d}-many.test"   # issue 17: 200 organisational domains, SPF pass for 127.4/16
SPF_MANY_N = 200
DKIM_SELECTOR = "bench"             # the spam domains' DKIM key (aligned: learning)
DEAD_SIGS = 3                       # DKIM signatures whose key names never answer (dead<i>)
MTA_RETRY_FULL, MTA_RETRY_QUICK = 60.0, 15.0   # issue 17: retrying MTAs (every 60-300 s)
MTAS = 5                            # MTAs, each from its own /24 (127.7.<k>.1)
BOTS_PER_PROC = 9000                # idle bots per bot process (the hard fd limit here: 20000)
RCPT = "user@example.test"
LEGIT_INTERVAL = 0.1
LEGIT_DEADLINE = 10.0  # per attempt; also the grace after the end, so every attempt resolves
BULK_TOLERANCE_PCT = 5.0
P99_MAX_RATIO = 2.0
LEGIT_PRIME = 2        # unmeasured messages each legitimate sender sends at the run's start

# The no-flood references start their measured window this long after the start, once each
# legitimate sender has sent its LEGIT_PRIME unmeasured messages (bench.run.legit_specs): the
# first transaction of a run is a cold one (90-160 ms: the target's first hand-off, lookups and
# handshake), and with 120 samples the p99 is the second slowest, which a second cold one set.
NOFLOOD_WARMUP = 1.0


def primed(kind: str, source: str, **kw: Any) -> LegitSpec:
    """A judged legitimate sender: one message every LEGIT_INTERVAL, named by its kind, after
    LEGIT_PRIME unmeasured ones at the run's start."""
    return LegitSpec(kind, source, LEGIT_INTERVAL, name=kind, prime=LEGIT_PRIME, **kw)


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    duration_s: float  # whole run, warmup included
    warmup_s: float    # legitimate senders start this long after the bots
    bots: BotConfig
    senders: tuple[str, ...] = ()   # issue 8: the legitimate senders this row is judged on
    p99_max: float = P99_MAX_RATIO  # issue 8: their p99 at most this x their no-flood p99
    min_accepted_pct: float = 99.0  # issue 8: and at least this share accepted
    # issue 17: (sender, min accepted %, p99 max ratio) per judged sender, instead of the above
    judged: tuple[tuple[str, float, float], ...] = ()
    mtas: int = 0                   # issue 17: retrying MTAs (judged: accepted by the 3rd retry)
    mta_retry_s: float = 0.0
    issue: str = "8"
    # issue 20: reload the target (smtp-ingress: SIGHUP; Postfix: `postfix reload`) this many
    # seconds into the measured window (a target without a reload runs the flood without them)
    reloads: tuple[float, ...] = ()
    # issue 18: smtp-ingress config overrides {table: {key: value}} (the scenario runs on its
    # own freshly started smtp-ingress; other targets ignore them), extra legitimate senders
    # (evidence_specs' names), the no-flood scenario its judged senders are compared with, and
    # a note for the report
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    base: str = "noflood"
    note: str = ""

    @property
    def bot_procs(self) -> int:
        """Bot processes for the idle bots, so that none holds more than BOTS_PER_PROC."""
        b = self.bots
        return max(1, -(-(b.stallers + b.tricklers + b.early) // BOTS_PER_PROC))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["measured_s"] = self.duration_s - self.warmup_s
        d["bot_procs"] = self.bot_procs
        return d


def build_scenarios(mode: str, ramp: float | None = None,
                    large_bots: int | None = None,
                    picked: frozenset[str] = frozenset()) -> dict[str, Scenario]:
    """The scenarios of a --quick or --full run, in running order (pure). --quick has noflood,
    flood and large, plus any of the full list named in `picked` (--scenarios), shortened."""
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be quick or full, not {mode!r}")
    full = mode == "full"
    spam = dict(spam_per_conn=100, spam_rcpt=RCPT, spam_from="spam@bots.invalid")
    large_n = large_bots if large_bots is not None else (5000 if full else 1000)
    large_ramp = ramp if ramp is not None else (5.0 if full else 1.0)
    warm = 2.0 if full else 1.5
    measured = 30.0 if full else 4.5
    short = 8.0 if full else 4.0
    s = [
        Scenario("noflood", "no flood", (12.0 if full else 3.0) + NOFLOOD_WARMUP,
                 NOFLOOD_WARMUP, BotConfig()),
        Scenario("stall", "300 stalling bots", short + 2, 2.0,
                 BotConfig(stallers=300, ramp_s=1.0, spam_rcpt=RCPT)),
        Scenario("spam", "50 spam connections", short + 1, 1.0,
                 BotConfig(spammers=50, **spam)),
        Scenario("mixed", "mixed: 150 stall + 50 trickle + 50 early + 25 spam", short + 2, 2.0,
                 BotConfig(stallers=150, tricklers=50, early=50, spammers=25, ramp_s=1.0,
                           trickle_interval=2.0, **spam)),
        Scenario("flood", "300 stalling bots + 50 spam connections", measured + warm, warm,
                 BotConfig(stallers=300, spammers=50, ramp_s=1.0, **spam)),
        Scenario("large", f"{large_n:,} stalling bots (ramp {large_ramp:g} s)",
                 (20.0 if full else 3.5) + large_ramp + 0.5, large_ramp + 0.5,
                 BotConfig(stallers=large_n, ramp_s=large_ramp, spam_rcpt=RCPT)),
    ]
    # Issue 8: silent bots each from its own address that reconnect 0.2 s after a drop, the
    # SPF-pass sender judged; 20,000 silent bots + spam, the allow-listed and certificate
    # senders judged; spam from a domain whose SPF passes for the bots (a spammer who publishes
    # SPF), the allow-listed sender judged. --quick runs them shorter, not smaller.
    silent: dict[str, Any] = dict(reconnect_delay=0.2, spam_rcpt=RCPT)
    i8_measured = 20.0 if full else 4.0
    for n, ramp_n in ((2000, 2.0), (5000, 5.0), (20000, 10.0)):
        s.append(Scenario(f"silent{n // 1000}k", f"{n:,} silent bots, each its own address",
                          i8_measured + ramp_n + 0.5, ramp_n + 0.5,
                          BotConfig(stallers=n, ramp_s=ramp_n, **silent), senders=("spf",)))
    s.append(Scenario("trickle2k", "2,000 trickling bots, each its own address",
                      i8_measured + 2.5, 2.5,
                      BotConfig(tricklers=2000, ramp_s=2.0, trickle_interval=2.0, **silent),
                      senders=("spf",)))
    s.append(Scenario("silent20k_spam", "20,000 silent bots + 50 spam connections",
                      i8_measured + 10.5, 10.5,
                      BotConfig(stallers=20000, spammers=50, ramp_s=10.0, reconnect_delay=0.2,
                                spam_per_conn=100, spam_rcpt=RCPT, spam_from="spam@bots.invalid"),
                      senders=("trusted", "cert"), min_accepted_pct=100.0))
    s.append(Scenario("spfspam", "50 spam connections from an SPF-pass domain they control",
                      i8_measured + 1.0, 1.0,
                      BotConfig(spammers=50, spam_per_conn=100, spam_rcpt=RCPT,
                                spam_from=f"spam@{SPF_BOTS_DOMAIN}"),
                      senders=("trusted",), min_accepted_pct=100.0))
    s += adversarial_scenarios(full, i8_measured)
    s.append(Scenario("reload", "300 stalling bots + 50 spam connections, the target reloaded "
                      "twice (SIGHUP at a third and two thirds of the measured window)",
                      i8_measured + 2.0, 2.0,
                      BotConfig(stallers=300, spammers=50, ramp_s=1.0, **spam),
                      judged=(("trusted", 100.0, 1.5), ("cert", 100.0, 1.5)),
                      reloads=(i8_measured / 3, 2 * i8_measured / 3), issue="20"))
    s += evidence_scenarios(full, i8_measured)   # last: each on its own smtp-ingress
    if not full:
        picked = picked | {x.base for x in s if x.name in picked}   # and their references
        s = [x for x in s if x.name in ("noflood", "flood", "large") or x.name in picked]
    return {x.name: x for x in s}


def adversarial_scenarios(full: bool, measured: float) -> list[Scenario]:
    """Issue 17: a spammer who has read the code (pure). spfmany: every spam connection its own
    SPF-pass domain (200); spfmany_learned: the same signed with aligned DKIM, so their IPs get
    learned; dkimdead: SPF-pass spam carrying DKIM signatures whose key names never answer;
    tlsflood: stranger TLS handshakes on the mutual-TLS port; retryfarm: a bot farming
    deferral records over 64 senders while MTAs retry a deferred message."""
    stall_spam = dict(stallers=300, spammers=50, ramp_s=1.0, spam_rcpt=RCPT)
    many = dict(spam_from=f"spam@{SPF_MANY}", spam_per_conn=10)
    both = (("trusted", 100.0, 1.5), ("cert", 100.0, 1.5))
    retry = MTA_RETRY_FULL if full else MTA_RETRY_QUICK
    return [
        Scenario("spfmany", f"300 silent bots + 50 spam connections, each connection its own "
                 f"SPF-pass domain ({SPF_MANY_N} domains)", measured + 2.0, 2.0,
                 BotConfig(**stall_spam, **many, adversary=Adversary(spam_domains=SPF_MANY_N)),
                 judged=(*both, ("spf", 99.0, 2.0)), issue="17"),
        Scenario("spfmany_learned", f"the same, the {SPF_MANY_N} domains' mail signed with "
                 f"aligned DKIM (their IPs learned)", measured + 4.0, 4.0,
                 BotConfig(**stall_spam, **many, adversary=Adversary(
                     spam_domains=SPF_MANY_N, dkim_key="{dkim_key}",
                     dkim_selector=DKIM_SELECTOR)),
                 judged=both, issue="17"),
        Scenario("spfspam17", "300 bots + 50 spam connections from one SPF-pass domain they own",
                 measured + 2.0, 2.0,
                 BotConfig(**stall_spam, spam_from=f"spam@{SPF_BOTS_DOMAIN}", spam_per_conn=100),
                 judged=(("trusted", 100.0, 1.5),), issue="17"),
        Scenario("dkimdead", f"50 SPF-pass spam connections, each message with {DEAD_SIGS} DKIM "
                 f"signatures whose key names never answer", measured + 1.0, 1.0,
                 BotConfig(spammers=50, spam_per_conn=100, spam_rcpt=RCPT,
                           spam_from=f"spam@{SPF_BOTS_DOMAIN}",
                           adversary=Adversary(dead_sigs=DEAD_SIGS)),
                 judged=(("trusted", 100.0, 1.5),), issue="17"),
        Scenario("tlsflood", "250 bots doing TLS handshakes without a valid certificate on the "
                 "mutual-TLS port + 50 silent connections there", measured + 2.0, 2.0,
                 BotConfig(ramp_s=1.0, adversary=Adversary(handshakers=250, tls_stallers=50,
                                                           tls_port=1)),
                 judged=(("cert", 100.0, 2.0), ("trusted", 100.0, 2.0)), issue="17"),
        Scenario("retryfarm", f"300 bots + 50 spam connections farming deferrals over 64 "
                 f"senders; {MTAS} MTAs retrying every {retry:g} s", 4 * retry + 12.0, 2.0,
                 BotConfig(**stall_spam, spam_from="farm{s}@bots.invalid", spam_per_conn=100,
                           adversary=Adversary(spam_senders=64)),
                 mtas=MTAS, mta_retry_s=retry, issue="17"),
    ]


def adversary_dns(dkim_record: str) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """The records issue 17's scenarios need (the spammer's domains, their DKIM key) and the
    names never answered (the dead DKIM keys) (pure)."""
    records: dict[str, dict[str, list[str]]] = {}
    for d in range(SPF_MANY_N):
        name = SPF_MANY.format(d=d)
        records[name] = {"TXT": ["v=spf1 ip4:127.4.0.0/16 -all"]}
        records[f"{DKIM_SELECTOR}._domainkey.{name}"] = {"TXT": [dkim_record]}
    silent = [f"dead{i}._domainkey.{SPF_BOTS_DOMAIN}" for i in range(DEAD_SIGS)]
    return records, silent




# --------------------------------------------------------------------------------------------
# Issue 18: evidence from the field (a DNS allow list, DNS block lists, FCrDNS providers)

DNSWL_IP = "127.0.0.13"             # on the DNS allow list, not in allow_cidrs
WL_ZONE, BL_ZONE = "wl.bench.test", "bl.bench.test"
WL_ANSWER = "127.0.10.2"            # DNSWL.org style 127.0.x.y: y = 2, trust "medium"
BL_ANSWER = "127.0.0.2"
BL_BOTS, BL_EVERY = 5000, 5         # bots 127.1/16: listed unless index % BL_EVERY == 0
BL_SPAMMERS = 50                    # spam connections 127.4/16: all listed
POOL_ROLE, POOL_N = 8, 50           # the provider's pool: 127.8.0.1 .. 127.8.0.50
PROVIDER = "bigprovider.test"       # its organisational domain: the provider identity
POOL_HOST = "mta{n}.out." + PROVIDER    # no generic word, no address in the name
POOL_FROM = f"news@{PROVIDER}"      # its own domain: SPF covers the pool, DKIM aligned
EV_BASE = "noflood18"               # the no-flood reference of issue 18's rows (same config)
EV_SETTINGS: dict[str, dict[str, Any]] = {
    "dnswl": {"sites": [f"{WL_ZONE}=127.0.[2..15].[0..3]"]},    # min_trust: default "low"
    "dnsbl": {"sites": [f"{BL_ZONE}={BL_ANSWER}"], "threshold": 1.0, "reject_threshold": 0.0},
}
EV_NOTE = ("issue 18: smtp-ingress runs this scenario on its own fresh instance with [dnswl] "
           f"sites = {WL_ZONE} and [dnsbl] sites = {BL_ZONE} (threshold 1, never refused: the "
           "score only shapes bulk); iprev is on (DNS is configured). The peer Postfix does not "
           "use the DNS lists (postscreen is not configured in the bench's private Postfix): "
           "its column is plain Postfix, as in every other row.")


def evidence_scenarios(full: bool, measured: float) -> list[Scenario]:
    """Issue 18's rows (pure): noflood18, the no-flood reference with issue 18's config and
    senders; dnswl20k, 20,000 silent bots + 50 spam connections, the DNS-allow-listed sender
    judged (100 %, p99 <= 1.5x); dnsbl5k, 5,000 silent bots of which 80 % block-listed + 50
    listed spam connections, the unlisted SPF-pass sender judged (99 %, p99 <= 2x) and the
    provider pool (fast from its second address on: bench.evidence)."""
    silent: dict[str, Any] = dict(reconnect_delay=0.2, spam_per_conn=100, spam_rcpt=RCPT,
                                  spam_from="spam@bots.invalid")
    ev: dict[str, Any] = dict(settings=EV_SETTINGS, issue="18", base=EV_BASE, note=EV_NOTE)
    return [
        Scenario(EV_BASE, "no flood, issue 18's senders (smtp-ingress: its DNS lists)",
                 (12.0 if full else 3.0) + NOFLOOD_WARMUP, NOFLOOD_WARMUP, BotConfig(),
                 extra=("dnswl", "pool"), **ev),
        Scenario("dnswl20k", "20,000 silent bots + 50 spam connections; the sender DNS-allow-"
                 "listed", measured + 10.5, 10.5,
                 BotConfig(stallers=20000, spammers=50, ramp_s=10.0, **silent),
                 judged=(("dnswl", 100.0, 1.5),), extra=("dnswl",), **ev),
        Scenario("dnsbl5k", f"{BL_BOTS:,} silent bots, 80% block-listed, + {BL_SPAMMERS} listed "
                 f"spam connections; a provider pool over {POOL_N} addresses",
                 measured + 5.5, 5.5,
                 BotConfig(stallers=BL_BOTS, spammers=BL_SPAMMERS, ramp_s=5.0, **silent),
                 judged=(("spf", 99.0, 2.0),), extra=("pool",), **ev),
    ]


def _rev(ip: str, zone: str) -> str:
    """RFC 5782's query name of an IPv4 address in a zone."""
    return ".".join(reversed(ip.split("."))) + "." + zone


def listed_bots() -> list[str]:
    """dnsbl5k's block-listed addresses: its bots but every fifth, and its spam connections."""
    return ([bot_address(1, i) for i in range(BL_BOTS) if i % BL_EVERY]
            + [bot_address(4, i) for i in range(BL_SPAMMERS)])


def pool_addresses() -> list[str]:
    return [bot_address(POOL_ROLE, i) for i in range(POOL_N)]


def evidence_dns(dkim_record: str) -> dict[str, dict[str, list[str]]]:
    """The records issue 18's scenarios need (pure): both zones' RFC 5782 test points
    (127.0.0.2 listed, 127.0.0.1 not), the allow-listed sender, the block-listed bots, and the
    provider's pool (PTR and forward A per address, SPF for the pool, DKIM key, DMARC)."""
    r: dict[str, dict[str, list[str]]] = {
        _rev("127.0.0.2", WL_ZONE): {"A": ["127.0.0.2"]},
        _rev("127.0.0.2", BL_ZONE): {"A": ["127.0.0.2"]},
        _rev(DNSWL_IP, WL_ZONE): {"A": [WL_ANSWER]},
        PROVIDER: {"TXT": [f"v=spf1 ip4:127.{POOL_ROLE}.0.0/24 -all"]},
        f"{DKIM_SELECTOR}._domainkey.{PROVIDER}": {"TXT": [dkim_record]},
        f"_dmarc.{PROVIDER}": {"TXT": ["v=DMARC1; p=reject"]},
    }
    for ip in listed_bots():
        r[_rev(ip, BL_ZONE)] = {"A": [BL_ANSWER]}
    for n, ip in enumerate(pool_addresses(), 1):
        host = POOL_HOST.format(n=n)
        r[_rev(ip, "in-addr.arpa")] = {"PTR": [host + "."]}
        r[host] = {"A": [ip]}
    return r


def evidence_specs(extra: tuple[str, ...], interval: float,
                   dkim_key: str = "") -> list[LegitSpec]:
    """Issue 18's legitimate senders named in `extra`: dnswl (as trusted, from DNSWL_IP, one
    message before the flood: a correspondent) and pool (the provider: the first address,
    then rotating; bench.flood.pool)."""
    # dnswl: a listed MTA that mails the site sent before the flood (one message at the
    # bots' start, not counted; dnswl.steer then steers it: ingress.core.steer_table)
    specs = {"dnswl": LegitSpec("dnswl", DNSWL_IP, interval, name="dnswl", prime=1),
             "pool": LegitSpec("pool", bot_address(POOL_ROLE, 0), interval, name="pool",
                               mail_from=POOL_FROM, pool=POOL_N, dkim_key=dkim_key or None,
                               dkim_selector=DKIM_SELECTOR)}
    return [specs[x] for x in extra]


def with_settings(tables: dict[str, dict[str, Any]],
                  settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`tables` with a scenario's `settings` merged in, table by table (a new dict)."""
    out = {t: dict(kv) for t, kv in tables.items()}
    for t, kv in settings.items():
        out.setdefault(t, {}).update(kv)
    return out
