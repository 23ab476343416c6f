"""Command line: `smtp-ingress run|status [--config FILE] [--role all|edge|lanes]`,
`smtp-ingress keygen [--force] DIR NAME` (a CURVE key pair: DIR/NAME.key, DIR/NAME.key_secret;
an existing pair is replaced only with --force; see ingress/core/cluster.py),
`smtp-ingress check-config [FILE] [--show]` (ingress/tools/configshow.py: the effective config
and the derived limits),
`smtp-ingress queue [--config FILE] list|show|retry|delete|hold|release|requeue-failed`
(ingress/tools/queuecmd.py; bad input: a message on stderr and exit status 1).

The config file, one lookup for every subcommand (config_path): --config FILE (accepted before
the subcommand's name or after it, queue's subcommands included), else $SMTP_INGRESS_CONFIG,
else DEFAULT_CONFIG (/etc/smtp-ingress/ingress.toml, the systemd unit's) when it exists, else
the embedded default. check-config's FILE, when given, is --config.

Exit status: 0 clean stop, 2 invalid configuration (the message names file, key and problem),
1 anything else that stops the start (e.g. the port is taken), with one line saying why.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ingress.core import config, log

DEFAULT_CONFIG = Path("/etc/smtp-ingress/ingress.toml")     # systemd/smtp-ingress.service's
CONFIG_ENV = "SMTP_INGRESS_CONFIG"
CONFIG_HELP = (f"TOML file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if it exists, else "
               "the embedded default)")


def config_path(given: Path | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The config file every subcommand uses: `given` (--config), else $SMTP_INGRESS_CONFIG,
    else DEFAULT_CONFIG when it exists, else None (the embedded default)."""
    if given is not None:
        return given
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def common_options() -> argparse.ArgumentParser:
    """--config for every subcommand (a parent parser): its default is SUPPRESS, so a
    subcommand that is not given it keeps what was given before the subcommand's name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                        help=CONFIG_HELP)
    return common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smtp-ingress", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    common = [common_options()]
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start the supervisor and its children", parents=common)
    r.add_argument("--role", choices=("all", "edge", "lanes"),
                   help="all: one host (default: cluster.role); edge: supervisor and acceptors; "
                        "lanes: brokers, workers, spool and relay")
    k = sub.add_parser("keygen", help="write a CURVE key pair for an edge or lanes node")
    k.add_argument("dir", type=Path)
    k.add_argument("name")
    k.add_argument("--force", action="store_true",
                   help="replace an existing pair (every peer that knows its public key is "
                        "locked out until it gets the new one)")
    c = sub.add_parser("check-config", help="validate a configuration file and exit",
                       parents=common)
    c.add_argument("file", type=Path, nargs="?", help="the file (the same as --config)")
    c.add_argument("--show", action="store_true",
                   help="print every value after defaults and the derived limits")
    st = sub.add_parser("status", help="show the running instance: lanes, sessions, spool",
                        parents=common)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--role", choices=("all", "edge", "lanes"),
                    help="the running instance's role (default: cluster.role)")
    from ingress.tools import queuecmd
    queuecmd.add_parser(sub, common)
    args = p.parse_args(argv)
    if args.cmd == "keygen":
        from ingress.core import cluster
        try:
            pub, sec = cluster.keygen(args.dir, args.name, force=args.force)
        except (OSError, ValueError) as e:
            print(f"smtp-ingress: keygen: {e}", file=sys.stderr)
            return 1
        print(f"public key {pub} (give it to the peers)\nsecret key {sec} (keep it here)")
        return 0

    given = args.file if args.cmd == "check-config" and args.file else args.config
    path = config_path(given)
    try:
        cfg = config.load(path)
        if getattr(args, "role", None):
            cfg = config.with_role(cfg, args.role)
    except config.ConfigError as e:
        origin = "" if given is not None or path in (None, DEFAULT_CONFIG) else \
            f" (from ${CONFIG_ENV})"
        print(f"smtp-ingress: invalid configuration: {e}{origin}", file=sys.stderr)
        return 2
    if args.cmd == "check-config" and args.show:
        from ingress.tools import configshow
        print(configshow.render(cfg), end="")
        return 0
    if args.cmd == "check-config":
        print(f"{cfg.source}: ok")
        return 0
    if args.cmd == "queue":
        return queuecmd.run(cfg.spool.path, args)
    if args.cmd == "status":
        import orjson

        from ingress.tools import status
        doc = status.collect(cfg)
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if args.json
              else status.render(doc))
        return 0 if status.healthy(doc) else 1

    from ingress.tools.supervisor import Supervisor
    log.setup(cfg.log.level, "supervisor")
    try:
        return Supervisor(cfg, path, args.role).run()
    except OSError as e:
        print(f"smtp-ingress: cannot start: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
