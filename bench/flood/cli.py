"""The flood generator's command line, and the internal ``bots`` child-process entry.

API
    build_parser(); config_from_args(ns) -> FloodConfig; main(argv) -> exit code (0 run done,
    2 refused config); the internal ``bots`` sub-command runs one bot child (JSON lines on stdout)

Failure modes and limits: those of the whole generator, in the package docstring
(bench/flood/__init__.py), with the accounting definitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.flood.adversary import Adversary
from bench.flood.bots import LegitSpec
from bench.flood.common import FD_MARGIN, FdLimitError, Target, bot_address, ensure_fd_limit
from bench.flood.orchestrate import (
    BotConfig,
    BotRunner,
    FloodConfig,
    event_loop_runner,
    format_progress,
    run_flood_sync,
)

# --------------------------------------------------------------------------------------------
# Child process: `python -m bench.flood bots ...`


async def _bots_child(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    target = Target.parse(args.target)
    bc = BotConfig(
        stallers=args.stallers, tricklers=args.tricklers, early=args.early,
        spammers=args.spammers, spam_per_conn=args.spam_per_conn, spam_rate=args.spam_rate,
        spam_size=args.spam_size, spam_from=args.spam_from, spam_rcpt=args.spam_rcpt,
        trickle_interval=args.trickle_interval, reconnect_delay=args.reconnect_delay,
        connect_deadline=args.connect_deadline, ramp_s=args.ramp,
        adversary=Adversary.from_json(orjson.loads(args.adversary)),
    )
    offsets = {"stall": args.offset_stall, "trickle": args.offset_trickle,
               "early": args.offset_early, "spam": args.offset_spam}
    for role, octet, n in (("stall", 1, bc.stallers), ("trickle", 2, bc.tricklers),
                           ("early", 3, bc.early), ("spam", 4, bc.spammers)):
        if n:
            bot_address(octet, offsets[role] + n - 1)
    fds = ensure_fd_limit(bc.sockets + FD_MARGIN, "bot process")
    start_at = loop.time() + max(0.0, args.start_at - time.time())
    end = start_at + args.duration
    runner = BotRunner(target, bc, offsets)

    async def ticker() -> None:
        for _ in range(int(args.duration + 60)):
            await asyncio.sleep(1.0)
            _emit({"type": "progress", **runner.progress()})

    tick = asyncio.create_task(ticker())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(runner.run(start_at, end), timeout=end + 5.0 - loop.time())
    tick.cancel()
    return {"type": "result", "bots": runner.raw(), "fds": list(fds)}


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(msg) + b"\n")
    sys.stdout.buffer.flush()


# --------------------------------------------------------------------------------------------
# CLI


def _add_bot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="HOST:PORT on loopback")
    p.add_argument("--duration", type=float, required=True, help="seconds; the run stops itself")
    p.add_argument("--stallers", type=int, default=0, help="stalling bots (127.1.x.y)")
    p.add_argument("--tricklers", type=int, default=0, help="one-byte-every-few-s bots (127.2/16)")
    p.add_argument("--early", type=int, default=0, help="early talkers (127.3/16)")
    p.add_argument("--spammers", type=int, default=0, help="spam senders (127.4/16)")
    p.add_argument("--spam-per-conn", type=int, default=100, help="messages per connection")
    p.add_argument("--spam-rate", type=float, default=0.0, help="msgs/s per spammer; 0=max")
    p.add_argument("--spam-size", type=int, default=1024)
    p.add_argument("--spam-from", default="spam@bots.invalid")
    p.add_argument("--spam-rcpt", default="user@example.com")
    p.add_argument("--trickle-interval", type=float, default=5.0)
    p.add_argument("--reconnect-delay", type=float, default=1.0,
                   help="idle bots: pause before reconnecting after the server closed")
    p.add_argument("--connect-deadline", type=float, default=30.0)
    p.add_argument("--ramp", type=float, default=1.0, help="spread idle-bot connects over S s")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--probe-normal", action="store_true",
                   help="the legitimate senders at normal priority, not SCHED_FIFO "
                        "(bench.flood.probe)")
    p.add_argument("--adversary", default="{}",
                   help="JSON of bench.flood.adversary.Adversary (issue 17's attackers)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.flood",
        description="Loopback SMTP flood with measured legitimate senders (see module doc).",
    )
    _add_bot_flags(p)
    p.add_argument("--legit", action="append", default=[], metavar="KIND:SRC:INTERVAL[,k=v]",
                   help="legit sender, repeatable: trusted|cert|spf|dnswl|pool|mta (see LegitSpec)")
    p.add_argument("--warmup", type=float, default=0.0, help="legit start after S s of bots")
    p.add_argument("--grace", type=float, default=2.0,
                   help="wait S s after the end for legit attempts in flight")
    p.add_argument("--deadline", type=float, default=10.0, help="per legit attempt, seconds")
    p.add_argument("--mail-from", default="legit@example.org")
    p.add_argument("--rcpt", default="user@example.com")
    p.add_argument("--helo", default="legit.example.org")
    p.add_argument("--size", type=int, default=1024, help="legit message size, bytes")
    p.add_argument("--ca", help="CA file to verify the server (TLS senders)")
    p.add_argument("--client-cert", help="client certificate (PEM) for cert senders")
    p.add_argument("--client-key", help="client key (PEM) for cert senders")
    p.add_argument("--servername", default="localhost", help="TLS server name to verify")
    p.add_argument("--spam-procs", type=int, default=1, help="processes for spam senders")
    p.add_argument("--bot-procs", type=int, default=1,
                   help="processes for stall/trickle/early bots (0 = in the measuring process)")
    p.add_argument("--out", help="write the JSON result here instead of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def config_from_args(a: argparse.Namespace) -> FloodConfig:
    return FloodConfig(
        target=Target.parse(a.target),
        duration_s=a.duration,
        bots=BotConfig(
            stallers=a.stallers, tricklers=a.tricklers, early=a.early, spammers=a.spammers,
            spam_per_conn=a.spam_per_conn, spam_rate=a.spam_rate, spam_size=a.spam_size,
            spam_from=a.spam_from, spam_rcpt=a.spam_rcpt, trickle_interval=a.trickle_interval,
            reconnect_delay=a.reconnect_delay, connect_deadline=a.connect_deadline,
            ramp_s=a.ramp, adversary=Adversary.from_json(orjson.loads(a.adversary)),
        ),
        legit=tuple(LegitSpec.parse(x) for x in a.legit),
        warmup_s=a.warmup, grace_s=a.grace, spam_procs=a.spam_procs, bot_procs=a.bot_procs,
        mail_from=a.mail_from, rcpt=a.rcpt, helo=a.helo, size=a.size, deadline_s=a.deadline,
        ca=a.ca, cert=a.client_cert, key=a.client_key, servername=a.servername,
        use_uvloop=not a.no_uvloop, probe_rt=not a.probe_normal,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry. Exit 0 on a completed run (whatever the server did), 2 on a refused config.

    Result JSON: {version, target, started_unix, duration_s, params, percentile_method,
      legit: [{name, kind, source, interval_s, attempts, accepted, accepted_pct, unfinished,
               latency_ms: {n, min, p50, p95, p99, max, mean}, tempfails: {code: n},
               tempfails_by_stage: {"MAIL 451": n}, permfails, permfails_by_stage,
               timeouts: {stage: n}, conn_errors: {"closed at MAIL": n}, refused,
               timeline: [{t, latency_ms, outcome, code, stage}]}],
      legit_total: (same without timeline, over all legit senders),
      bots: {stall|trickle|early: {bots, connections, connected, refused, connect_timeouts,
               errors, banner_codes, first_replies, later_replies, closed_by_server,
               open_at_end, no_banner_at_end, bytes_sent, held_s: {n, p50, ...}},
             spam: {bots, connections, connected, refused, timeouts, conn_errors, banner_codes,
               sent, cut, accepted, accepted_pct, accepted_per_s, sent_per_s, shed, shed_by_stage,
               rejected, rejected_by_stage, active_s}},
      processes: [{role, pid, rc, ...}]}
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bots":
        return _child_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"flood: {e}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def show(p: dict[str, Any]) -> None:
        if not args.quiet:
            sys.stderr.write(("\r" if tty else "") + format_progress(p) + ("" if tty else "\n"))
            sys.stderr.flush()

    try:
        result = run_flood_sync(cfg, show)
    except FdLimitError as e:
        print(f"flood: {e}", file=sys.stderr)
        return 2
    if tty and not args.quiet:
        sys.stderr.write("\n")
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    if args.out:
        Path(args.out).write_bytes(data + b"\n")
    else:
        sys.stdout.buffer.write(data + b"\n")
    return 0


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flood bots")
    _add_bot_flags(p)
    p.add_argument("--start-at", type=float, required=True, help="wall-clock start (time.time())")
    for role in ("stall", "trickle", "early", "spam"):
        p.add_argument(f"--offset-{role}", type=int, default=0)
    args = p.parse_args(argv)
    try:
        with event_loop_runner(not args.no_uvloop) as runner:
            result = runner.run(_bots_child(args))
    except (FdLimitError, ValueError) as e:
        _emit({"type": "error", "error": str(e)})
        print(f"flood bots: {e}", file=sys.stderr)
        return 2
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
