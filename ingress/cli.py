"""Command line: `smtp-ingress run|status [--config FILE]`, `smtp-ingress check-config FILE
[--show]` (ingress/configshow.py: the effective config and the derived limits),
`smtp-ingress queue [--config FILE] list|show|retry|delete|hold|release|requeue-failed`
(ingress/queuecmd.py; bad input: a message on stderr and exit status 1).

Exit status: 0 clean stop, 2 invalid configuration (the message names file, key and problem),
1 anything else that stops the start (e.g. the port is taken), with one line saying why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ingress.core import config, log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smtp-ingress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start the supervisor and its children")
    r.add_argument("--config", type=Path, help="TOML file (default: the embedded default)")
    c = sub.add_parser("check-config", help="validate a configuration file and exit")
    c.add_argument("file", type=Path)
    c.add_argument("--show", action="store_true",
                   help="print every value after defaults and the derived limits")
    st = sub.add_parser("status", help="show the running instance: lanes, sessions, spool")
    st.add_argument("--config", type=Path, help="the running instance's TOML file")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    from ingress import queuecmd
    queuecmd.add_parser(sub)
    args = p.parse_args(argv)

    path = args.file if args.cmd == "check-config" else args.config
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        print(f"smtp-ingress: invalid configuration: {e}", file=sys.stderr)
        return 2
    if args.cmd == "check-config" and args.show:
        from ingress import configshow
        print(configshow.render(cfg), end="")
        return 0
    if args.cmd == "check-config":
        print(f"{cfg.source}: ok")
        return 0
    if args.cmd == "queue":
        return queuecmd.run(cfg.spool.path, args)
    if args.cmd == "status":
        import orjson

        from ingress import status
        doc = status.collect(cfg)
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if args.json
              else status.render(doc))
        return 0 if all(v is not None for v in doc["lanes"].values()) else 1

    from ingress.supervisor import Supervisor
    log.setup(cfg.log.level, "supervisor")
    try:
        return Supervisor(cfg, path).run()
    except OSError as e:
        print(f"smtp-ingress: cannot start: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
