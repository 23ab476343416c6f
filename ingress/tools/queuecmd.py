"""`smtp-ingress queue ...`: the operator's view of the spool (mailq, postcat, postsuper).

API: add_parser(sub, parents) (the `queue` subcommands: --config, from ingress.tools.cli, and --wait
     go before or after a subcommand's name); run(spool_root, args) -> exit status;
     render_list(items, now) -> str (pure)

Every change goes through workers.spool.queue_ops (the queue commands; workers.spool.store does
their file work under the relay's lock); this module only parses arguments' meaning and prints. Run
as root, it first becomes the spool's owner (queue_ops.become_owner), so what it creates is the
service user's.
Errors (unknown id, malformed file, busy, gone meanwhile) go to stderr as
"smtp-ingress queue: <why>" with exit status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from workers.spool.queue_ops import Item, Queue, QueueError, become_owner

WAIT_HELP = "seconds to wait for a message the relay is delivering (default 10)"


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """`queue` and its subcommands; `parents`: the options every subcommand takes (--config:
    ingress.tools.cli.common_options). --config and --wait go before or after a subcommand's
    name."""
    q = sub.add_parser("queue", help="inspect and change the spool (mailq, postcat, postsuper)",
                       parents=parents)
    q.add_argument("--wait", type=float, default=10.0, help=WAIT_HELP)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--wait", type=float, default=argparse.SUPPRESS, help=WAIT_HELP)
    parents = [*parents, own]
    qs = q.add_subparsers(dest="qcmd", required=True)
    ls = qs.add_parser("list", help="every waiting, held and failed message (mailq)",
                       parents=parents)
    ls.add_argument("--json", action="store_true", help="one JSON document")
    sh = qs.add_parser("show", help="envelope, relay state and the message (postcat)",
                       parents=parents)
    sh.add_argument("qid")
    rt = qs.add_parser("retry", help="make a deferred message due now and wake the relay "
                       "(postqueue -i / -f)", parents=parents)
    g = rt.add_mutually_exclusive_group(required=True)
    g.add_argument("qid", nargs="?")
    g.add_argument("--all", action="store_true")
    de = qs.add_parser("delete", help="remove a message (postsuper -d)", parents=parents)
    g = de.add_mutually_exclusive_group(required=True)
    g.add_argument("qid", nargs="?")
    g.add_argument("--all-from", metavar="SENDER", help="every message from this envelope sender")
    rq = qs.add_parser("requeue-failed", help="failed/ back to new/, failed recipients retried",
                       parents=parents)
    rq.add_argument("qid", nargs="?")
    for name, what in (("hold", "keep a message from the relay (postsuper -h)"),
                       ("release", "give a held message back to the relay (postsuper -H)")):
        qs.add_parser(name, help=what, parents=parents).add_argument("qid")


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def render_list(items: Sequence[Item], now: float) -> str:
    """mailq-like: one block per message, recipients indented with their state."""
    if not items:
        return "queue is empty"
    lines = []
    total = 0
    for it in items:
        d = it.as_dict(now)
        total += it.size
        mark = {"new": "", "hold": "!", "failed": "#"}[it.where]
        nxt = d["next_retry"]
        due = ("due now" if not nxt or nxt <= now else f"next retry in {_age(nxt - now)}")
        if it.where != "new":
            due = {"hold": "held", "failed": "failed"}[it.where]
        if it.envelope is None:
            lines.append(f"{it.qid}{mark}  {it.size:>9}  {_age(now - it.mtime):>4}  "
                         f"MALFORMED: {it.error}")
            continue
        lines.append(f"{it.qid}{mark}  {it.size:>9}  {_age(d['age_s']):>4}  "
                     f"<{d['sender']}>  lane={d['lane']}  {due}"
                     + (f"  attempts={d['attempts']}" if d["attempts"] else ""))
        if d["last_error"]:
            lines.append(f"    ({d['last_error']})")
        for rcpt, state in d["recipients"].items():
            lines.append(f"    {rcpt}  {state}")
    lines.append(f"-- {len(items)} message(s), {total} bytes "
                 "(! held, # failed)")
    return "\n".join(lines)


def _say(msg: str) -> None:
    print(msg)


def run(spool_root: Path, args: argparse.Namespace) -> int:
    now = time.time()
    try:
        if (spool_root / "new").is_dir():
            become_owner(spool_root)
        q = Queue(spool_root, wait=args.wait)
        return _dispatch(q, args, now)
    except QueueError as e:
        print(f"smtp-ingress queue: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"smtp-ingress queue: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1


def _dispatch(q: Queue, args: argparse.Namespace, now: float) -> int:
    """Run one queue subcommand; the exit status (QueueError and OSError reach run())."""
    match args.qcmd:
        case "list":
            _list(q, args.json, now)
        case "show":
            _show(q, args.qid, now)
        case "requeue-failed":
            return _requeue_failed(q, args.qid)
        case _:
            _change(q, args)
    return 0


def _list(q: Queue, as_json: bool, now: float) -> None:
    items = q.list()
    if as_json:
        sys.stdout.write(orjson.dumps([i.as_dict(now) for i in items],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _say(render_list(items, now))


def _show(q: Queue, qid: str, now: float) -> None:
    item, message = q.show(qid)
    doc = {"envelope": item.envelope, **item.as_dict(now)}
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
                     + "\n\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(message)
    sys.stdout.buffer.flush()


def _change(q: Queue, args: argparse.Namespace) -> None:
    """The subcommands that change one message's (or a set's) state: retry, delete, hold,
    release."""
    match args.qcmd:
        case "retry" if args.all:
            done, busy = q.retry_all()
            _say(f"{len(done)} message(s) due now"
                 + (f", {len(busy)} being delivered right now" if busy else ""))
        case "retry":
            _say(f"{q.retry(args.qid).qid}: due now")
        case "delete" if args.all_from is not None:
            gone = q.delete_from(args.all_from)
            _say(f"{len(gone)} message(s) from <{args.all_from}> deleted")
        case "delete":
            _say(f"{q.delete(args.qid).qid}: deleted")
        case "hold":
            _say(f"{q.hold(args.qid).qid}: held")
        case "release":
            _say(f"{q.release(args.qid).qid}: released")


def _requeue_failed(q: Queue, qid: str | None) -> int:
    items = q.requeue_failed(qid)
    if qid:
        _say(f"{items[0].qid}: requeued")
        return 0
    _say(f"{len(items)} message(s) requeued")
    for why in q.skipped:
        print(f"smtp-ingress queue: {why}", file=sys.stderr)
    return 1 if q.skipped else 0
