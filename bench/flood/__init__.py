"""Flood generator: botnet load against an SMTP server on loopback, legitimate senders measured.

Purpose
    Reproduce what a botnet does to port 25 (stalling connections, byte-trickling, early talkers,
    spam pushed as fast as possible) while a few *legitimate* senders each send one message at a
    steady rate on a fresh connection and measure connect -> 250 latency. The result is a
    JSON-serialisable dict (see ``FloodResult``-shaped dict built by ``run_flood``) that
    bench/run.py turns into tables and plots.

API
    Target.parse("127.0.0.1:2525")           loopback-only target (raises ValueError otherwise)
    LegitSpec / LegitSpec.parse(text)        one legitimate sender (kinds: trusted, cert, spf,
                                             dnswl, pool, mta)
    BotConfig                                counts and parameters of the bot behaviours
    FloodConfig                              everything for one run
    run_flood(cfg, progress=None) -> dict    async; the whole run, child processes included
    run_flood_sync(cfg, progress=None)       same, with its own (uvloop) event loop
    ensure_fd_limit(needed, what)            raise soft RLIMIT_NOFILE to hard; FdLimitError if short
    percentile_nearest_rank(values, p)       the percentile method used everywhere
    smtp_attempt(...) -> Attempt             one timed SMTP transaction on a fresh connection
    Bot coroutine classes: StallingBot, TrickleBot, EarlyTalkerBot, SpamSender, LegitSender; each
    has ``async run(end)`` where ``end`` is a loop.time() deadline, and records into a stats object
    (BotStats, SpamStats, LegitStats; dataclasses, ``summary()`` gives JSON-ready dicts).

    CLI:  python -m bench.flood --target 127.0.0.1:2525 --duration 30 --stallers 300 \
            --spammers 50 --legit trusted:127.0.0.10:0.1 [--out FILE]
          python -m bench.flood bots ...   (internal: one bot process; JSON lines on stdout)
    ``python -m bench.flood --help`` lists every flag.

Modules (by role)
    common        Target, loopback checks, bot source addresses, RLIMIT_NOFILE, percentiles
    client        the SMTP client: open_conn, read_reply, smtp_attempt -> Attempt
    stats         LegitStats, BotStats, SpamStats (merge, summary)
    bots          StallingBot, TrickleBot, EarlyTalkerBot, SpamSender, LegitSpec, LegitSender
    adversary     issue 17's attackers, the retrying MTA, the one DKIM signer (signed_message)
    pool          a provider's pool of addresses (issue 18): PoolSender, pool_plan
    orchestrate   BotConfig, FloodConfig, BotRunner, the child processes, run_flood(_sync)
    cli           build_parser, config_from_args, main (and the internal ``bots`` child)
    This package re-exports the public names, so ``from bench import flood; flood.X`` works.
    It imports only the standard library, orjson and uvloop (no tests.kit, no ingress).

Processes
    Legitimate senders run in the calling process (the measuring one). Spam senders run in
    ``spam_procs`` child processes and the idle bots (stall/trickle/early) in ``bot_procs`` child
    processes (0 = inline), each ``python -m bench.flood bots ...``; a child prints one JSON
    progress line a second and a final result line, which the parent merges. All processes share
    a wall-clock start time so phases line up.

Accounting (definitions)
    Legit: every scheduled attempt counts. Outcomes: accepted (250 after end of DATA), tempfail
    (4xx, by code and by stage), permfail (5xx, by code and stage), refused (ECONNREFUSED), timeout
    (per-attempt deadline hit, by stage), error (server closed / reset / TLS failure, by stage),
    unfinished (still in flight when the run ended plus ``grace``; excluded from the accepted %
    denominator). Latency = perf_counter from just before connect() to the 250 after DATA, for
    accepted attempts only. Percentiles are *nearest-rank*: the value at 1-based rank
    ceil(p/100 * N) of the sorted sample (p=0 -> minimum); no interpolation, always an observed
    value. Attempts are scheduled open-loop (t0 + k*interval) so a slow server does not lower the
    offered load (no coordinated omission).
    Spam: sent = transactions that reached MAIL FROM, accepted = 250 after DATA, shed = 4xx by
    code (any stage, banner included), rejected = 5xx by code, refused = connections refused.

Failure modes
    Refuses (ValueError / FdLimitError, CLI exit 2) a target or source address outside
    127.0.0.0/8 and ::1, and a configuration whose sockets do not fit RLIMIT_NOFILE (after raising
    the soft limit to the hard one) or the system-wide file table. A child process that dies is
    reported under "processes" with its exit code and stderr tail; its stats are missing.

Limits
    Every loop is bounded both in iterations and by the run's end time; the run stops by itself at
    ``duration`` (+ ``grace`` for legit attempts in flight, + a few seconds for children to report).
    Distinct source addresses exist only for IPv4 targets (127.x.y.z); against ::1 all bots use ::1.
    Source ranges: stallers 127.1/16, tricklers 127.2/16, early talkers 127.3/16, spam 127.4/16 (up
    to 65024 each). The kernel's SYN backlog (somaxconn) shapes what thousands of simultaneous
    connects see; ``ramp`` spreads bot connects. One-message-per-connection spam from few sources
    can exhaust ephemeral ports (TIME_WAIT); IP_BIND_ADDRESS_NO_PORT is set to widen the space.
"""

from __future__ import annotations

from bench.flood.bots import (
    EarlyTalkerBot,
    LegitSender,
    LegitSpec,
    SpamSender,
    StallingBot,
    TrickleBot,
)
from bench.flood.cli import (
    build_parser,
    config_from_args,
    main,
)
from bench.flood.client import (
    Attempt,
    ProtocolError,
    ServerClosed,
    dot_stuff,
    make_message,
    open_conn,
    read_reply,
    smtp_attempt,
)
from bench.flood.common import (
    CHILD_LINE_LIMIT,
    FD_MARGIN,
    IP_BIND_ADDRESS_NO_PORT,
    MAX_LINE,
    MAX_REPLY_LINES,
    FdLimitError,
    Target,
    bot_address,
    check_source,
    ensure_fd_limit,
    percentile_nearest_rank,
)
from bench.flood.orchestrate import (
    BotConfig,
    BotRunner,
    FloodConfig,
    format_progress,
    run_flood,
    run_flood_sync,
)
from bench.flood.stats import (
    BotStats,
    LegitStats,
    SpamStats,
)

__all__ = [
    "CHILD_LINE_LIMIT",
    "FD_MARGIN",
    "IP_BIND_ADDRESS_NO_PORT",
    "MAX_LINE",
    "MAX_REPLY_LINES",
    "Attempt",
    "BotConfig",
    "BotRunner",
    "BotStats",
    "EarlyTalkerBot",
    "FdLimitError",
    "FloodConfig",
    "LegitSender",
    "LegitSpec",
    "LegitStats",
    "ProtocolError",
    "ServerClosed",
    "SpamSender",
    "SpamStats",
    "StallingBot",
    "Target",
    "TrickleBot",
    "bot_address",
    "build_parser",
    "check_source",
    "config_from_args",
    "dot_stuff",
    "ensure_fd_limit",
    "format_progress",
    "main",
    "make_message",
    "open_conn",
    "percentile_nearest_rank",
    "read_reply",
    "run_flood",
    "run_flood_sync",
    "smtp_attempt",
]
