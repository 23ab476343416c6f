"""The configuration reference, generated from the schema: docs/configuration.md.

Usage: `make docs`, i.e. `python -m ingress.tools.configdoc docs/configuration.md` (no argument:
the page on stdout).

API
    schema_keys() -> list[Key]  every key of the schema in file order: its dotted name, table,
                                default (as TOML), rule (bounds or choices) and doc
    markdown() -> str           the page: one section per TOML table, one row per key
    default_text(field, value) -> str   a default as the page shows it (TOML)

The page's facts all come from ingress.core.schema (each field's default and its
fieldspec declaration), so the reference, the code and the checks cannot disagree;
tests/unit/test_config_reference.py fails when the page is stale, and checks that
etc/ingress.example.toml names only these keys with these defaults.
Failure modes: none (a schema field without a declaration is a bug the test names).
Limits: the rules that read several keys (ingress.core.config) are described in the docs of
the keys they involve, not derived from the code.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingress.core.fieldspec import spec
from ingress.core.schema import Config
from ingress.tools.configshow import toml_value

HEADER = """\
# smtp-ingress — configuration reference

<!-- Generated from ingress/core/schema.py by `make docs` (python -m ingress.tools.configdoc):
     do not edit; change the schema's field docs and run it again. -->

Every key of the configuration file, its default and the values it accepts; a key left out
takes its default, and an unknown table or key is an error (a typo never falls back to a
default). `smtp-ingress check-config FILE` checks a file, naming the file and the key of any
error; `check-config FILE --show` prints every value in effect and the limits derived from them
(connection slots, each rate cap's share per acceptor). `etc/ingress.example.toml` is an
annotated example for a host where smtp-ingress owns port 25.

"Allowed" is the key's own rule; rules that join several keys (e.g. `smtp.ack_timeout` below
`smtp.idle_timeout`) are named in the descriptions. A reload (SIGHUP) re-reads the file;
[listen], [spool], supervisor.acceptors, fast_acceptors and mtls_acceptors, tls.mtls_port and
mtls_addresses, and cluster.role take effect only on a restart.
"""


@dataclass(frozen=True)
class Key:
    name: str           # dotted, e.g. "lanes.bulk.rate"
    table: str          # "lanes.bulk"
    default: str        # as TOML
    rule: str
    doc: str


def default_text(f: dataclasses.Field[Any], value: Any) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return "(the host name)" if f.name == "hostname" else "(computed)"
    return toml_value(value)


def _keys(obj: Any, prefix: str, tables: dict[str, str]) -> list[Key]:
    """The keys of table `obj` (and of its sub-tables); `tables` gets each table's doc: its
    field's declaration ([lanes.fast]) or else its class docstring."""
    out: list[Key] = []
    for f in dataclasses.fields(obj):
        s, value = spec(f), getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            doc = s.doc if s is not None else (type(value).__doc__ or "")
            tables[prefix + f.name] = " ".join(doc.split())
            out += _keys(value, f"{prefix}{f.name}.", tables)
        elif s is not None:     # (Config.source has none: not a key)
            rule = s.rule() + (f" ({s.note})" if s.note else "")
            out.append(Key(prefix + f.name, prefix.rstrip("."), default_text(f, value), rule,
                           s.doc))
    return out


def schema_keys() -> list[Key]:
    return _keys(Config(), "", {})


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    docs: dict[str, str] = {}
    parts = [HEADER]
    table = None
    for k in _keys(Config(), "", docs):
        if k.table != table:
            table = k.table
            parts.append(f"\n## [{table}]\n\n{docs.get(table, '')}\n\n"
                         "| key | default | allowed | description |\n|---|---|---|---|")
        default = k.default if k.default.startswith("(") else f"`{_cell(k.default)}`"
        parts.append(f"| `{k.name.rsplit('.', 1)[1]}` | {default} | "
                     f"{_cell(k.rule) or '—'} | {_cell(k.doc)} |")
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    text = markdown()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
