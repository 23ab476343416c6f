"""The schema is the one source: every key declared with a doc, its bounds enforced naming the
key, docs/configuration.md generated from it and current, and etc/ingress.example.toml naming
only its keys (every one of them) with their defaults stated correctly."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ingress.core import config
from ingress.core.fieldspec import ConfigError, Spec, spec
from ingress.tools import configdoc
from ingress.tools.configshow import toml_value

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "ingress.example.toml"
REFERENCE = ROOT / "docs" / "configuration.md"


def leaves(obj: Any = None, prefix: str = "") -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Every key of the schema: dotted name -> (its field, its default)."""
    obj = config.Config() if obj is None else obj
    out: dict[str, tuple[dataclasses.Field[Any], Any]] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out |= leaves(v, f"{prefix}{f.name}.")
        elif f.name != "source":
            out[prefix + f.name] = (f, v)
    return out


KEYS = leaves()


def test_every_key_is_declared_with_a_doc() -> None:
    missing = [k for k, (f, _) in KEYS.items() if spec(f) is None or not spec(f).doc.strip()]
    assert not missing, f"keys without a fieldspec declaration and doc: {missing}"
    assert [k.name for k in configdoc.schema_keys()] == list(KEYS)


def test_reference_page_is_current() -> None:
    """docs/configuration.md is what `make docs` writes from the schema now."""
    assert REFERENCE.read_text(encoding="utf-8") == configdoc.markdown(), \
        "docs/configuration.md is stale: run `make docs`"


def _outside(s: Spec, default: Any) -> list[Any]:
    """Values just outside the key's bounds, of the key's own type."""
    step: Any = 1 if isinstance(default, int) else 0.5
    out = []
    if s.lo is not None:
        out.append(type(default)(s.lo) if s.gt else type(default)(s.lo) - step)
    if s.hi is not None:
        out.append(type(default)(s.hi) if s.lt else type(default)(s.hi) + step)
    return out


BOUNDED = [(k, v) for k, (f, d) in KEYS.items() if (s := spec(f)) and not s.choices
           for v in _outside(s, d)]
CHOICES = [k for k, (f, _) in KEYS.items() if (s := spec(f)) and s.choices]


def _toml_for(key: str, value: Any) -> str:
    table, _, name = key.rpartition(".")
    return f"[{table}]\n{name} = {toml_value(value)}\n"


@pytest.mark.parametrize(("key", "value"), BOUNDED)
def test_a_value_outside_its_bounds_is_refused_naming_the_key(tmp_path: Path, key: str,
                                                               value: Any) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(_toml_for(key, value))
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert e.value.key == key and str(f) in str(e.value) and "must be" in e.value.message


@pytest.mark.parametrize("key", CHOICES)
def test_a_value_outside_its_choices_is_refused_naming_the_key(tmp_path: Path, key: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(_toml_for(key, "Nonsense"))
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert e.value.key == key and "must be one of" in e.value.message


def test_bounds_admit_their_ends() -> None:
    s = Spec("", 1, 10)
    assert s.admits(1) and s.admits(10) and not s.admits(0) and not s.admits(11)
    assert s.rule() == "1..10"
    s = Spec("", 0, 30, gt=True)
    assert not s.admits(0) and s.admits(30) and s.rule() == "in (0, 30]"
    s = Spec("", 0, 1, lt=True, note="0 = off")
    assert s.admits(0) and not s.admits(1) and s.message() == "must be in [0, 1) (0 = off)"
    assert Spec("", 0, None).rule() == ">= 0" and Spec("", None, 60).rule() == "<= 60"


# --- etc/ingress.example.toml -------------------------------------------------------------------

_TABLE = re.compile(r"^\[([\w.]+)\]")
_KEY = re.compile(r"^(#\s*)?(\w+)\s*=\s*(.*)$")        # a key line, or a commented-out one
_MORE = re.compile(r"^\s+#\s?(.*)$")                    # an indented comment: the key's still


def example_keys() -> list[tuple[str, Any, str, bool]]:
    """(dotted key, value as written, its comment with continuation lines, commented out?)"""
    out: list[tuple[str, Any, str, bool]] = []
    table, current = "", None
    for line in EXAMPLE.read_text().splitlines():
        if m := _TABLE.match(line):
            table, current = m.group(1), None
            continue
        more = _MORE.match(line)
        if more and current is not None:
            current[2].append(more.group(1))
            continue
        m = _KEY.match(line)
        current = None
        if m and table:
            commented, name, rest = m.groups()
            try:
                value = tomllib.loads(f"{name} = {rest}")[name]
            except tomllib.TOMLDecodeError:
                continue            # prose in a comment that happens to contain "x = y"
            comment = rest.split("#", 1)[1] if "#" in rest else ""
            current = [f"{table}.{name}", value, [comment], bool(commented)]
            out.append(current)     # type: ignore[arg-type]
    return [(k, v, " ".join(" ".join(c).split()), commented) for k, v, c, commented in out]


def _as_default_type(value: Any, default: Any) -> Any:
    if isinstance(default, tuple):
        return tuple(value)
    if isinstance(default, Path):
        return Path(value)
    if isinstance(default, float) and not isinstance(value, bool):
        return float(value)
    return value


def test_example_names_only_keys_of_the_schema_and_every_one() -> None:
    config.load(EXAMPLE)                        # its live keys: an unknown one is an error
    named = [k for k, *_ in EXAMPLE_KEYS]
    unknown = [k for k in named if k not in KEYS]
    assert not unknown, f"the example names keys the schema does not have: {unknown}"
    absent = [k for k in KEYS if k not in named]
    assert not absent, f"the example does not show these keys: {absent}"


_DEFAULT = re.compile(r"\bdefault:?\s+(.+)", re.IGNORECASE)


EXAMPLE_KEYS = example_keys()


@pytest.mark.parametrize(("key", "value", "comment", "commented"), EXAMPLE_KEYS,
                         ids=[k for k, *_ in EXAMPLE_KEYS])
def test_example_states_each_default_correctly(key: str, value: Any, comment: str,
                                               commented: bool) -> None:
    """A key set to something else than its default says the default ("default X" in its
    comment); any default a comment states is the schema's."""
    f, default = KEYS[key]
    want = configdoc.default_text(f, default)
    stated = [m.group(1) for m in _DEFAULT.finditer(comment)
              if re.match(r'[-\d"\[]|true|false|inf', m.group(1))]
    for text in stated:
        assert text.startswith(want) and not re.match(r"[\w.]", text[len(want):len(want) + 1]), \
            f"{key}: the example says default {text!r}, the schema's is {want}"
    if _as_default_type(value, default) != default and f.default_factory is dataclasses.MISSING:
        assert stated, f"{key} = {toml_value(value)} in the example: its comment must say " \
                       f"the default ({want})"
