"""The config schema's field helper: a key's doc and bounds stand beside its field.

Purpose
    Every configuration key is a field of a frozen dataclass (ingress.core.schema). Its
    documentation and its single-field rule (a range, a set of choices) are declared with it,
    in the field's metadata, and checked by one generic loop; the configuration reference
    (docs/configuration.md, ingress.tools.configdoc) is generated from the same metadata.

API
    bounded(default, lo=None, hi=None, doc, *, gt=False, lt=False, note="") -> field
        a number in [lo, hi] (gt/lt: lo/hi excluded; None: no bound on that side)
    choice(default, choices, doc) -> field    a string, one of `choices`
    documented(default, doc, *, factory=None) -> field     no single-field rule
    spec(f: dataclasses.Field) -> Spec | None  a field's declaration (None: not a key)
    check_fields(obj, file, prefix="") -> None every field of `obj` (and of the tables it
                                               holds) against its rule
    ConfigError(file, key, message)            str() names all three
    Need(file)                                 need(ok, key, message) / need.parses(...): the
                                               cross-field rules' way to raise ConfigError

Failure modes
    check_fields raises ConfigError(file, dotted key, "must be ...") for the first field out
    of its bounds; cross-field rules are ingress.core.config's.

Limits
    Only scalar rules live here: a rule that reads another key, a file or a parser stays in
    ingress.core.config beside the others of its kind.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "Need", "Spec", "bounded", "check_fields", "choice", "documented", "spec"]

_KEY = "ingress.config"


class ConfigError(Exception):
    """An invalid configuration: names the file, the key and what is wrong."""

    def __init__(self, file: str, key: str, message: str) -> None:
        super().__init__(f"{file}: {key}: {message}")
        self.file, self.key, self.message = file, key, message


def _num(x: float) -> str:
    if math.isinf(x):
        return "inf"
    return str(int(x)) if x == int(x) else f"{x:g}"


@dataclass(frozen=True, slots=True)
class Spec:
    """One key's declaration: its doc, and its rule (bounds or choices)."""

    doc: str
    lo: float | None = None
    hi: float | None = None
    gt: bool = False                    # lo excluded
    lt: bool = False                    # hi excluded
    choices: tuple[str, ...] = ()
    note: str = ""                      # what a special value means, e.g. "0 = off"

    def admits(self, v: Any) -> bool:
        if self.choices:
            return v in self.choices
        if self.lo is not None and (v <= self.lo if self.gt else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.lt else v > self.hi))

    def rule(self) -> str:
        """The allowed values in words ("1..10000", ">= 0", "in (0, 30]", "one of a, b");
        "" when any value of the type is allowed."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        lo, hi = self.lo, self.hi
        if lo is None and hi is None:
            return ""
        if hi is None:
            return f"{'>' if self.gt else '>='} {_num(lo or 0)}"
        if lo is None:
            return f"{'<' if self.lt else '<='} {_num(hi)}"
        if not self.gt and not self.lt:
            return f"{_num(lo)}..{_num(hi)}"
        return f"in {'(' if self.gt else '['}{_num(lo)}, {_num(hi)}{')' if self.lt else ']'}"

    def message(self) -> str:
        return f"must be {self.rule()}" + (f" ({self.note})" if self.note else "")


def _field(default: Any, s: Spec, factory: Callable[[], Any] | None = None) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_KEY: s})
    return dataclasses.field(default=default, metadata={_KEY: s})


def bounded(default: float, lo: float | None = None, hi: float | None = None, doc: str = "",
            *, gt: bool = False, lt: bool = False, note: str = "") -> Any:
    """A numeric key in [lo, hi] (gt / lt exclude the bound; None: unbounded on that side)."""
    return _field(default, Spec(doc, lo, hi, gt, lt, note=note))


def choice(default: str, choices: tuple[str, ...], doc: str) -> Any:
    """A string key that must be one of `choices`."""
    return _field(default, Spec(doc, choices=choices))


def documented(default: Any, doc: str, *, factory: Callable[[], Any] | None = None) -> Any:
    """A key whose rules (if any) read other keys, files or parsers (ingress.core.config)."""
    return _field(default, Spec(doc), factory)


def spec(f: dataclasses.Field[Any]) -> Spec | None:
    s = f.metadata.get(_KEY)
    return s if isinstance(s, Spec) else None


def check_fields(obj: Any, file: str, prefix: str = "") -> None:
    """Every key of `obj` (a schema table) and of its sub-tables against its own rule."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            check_fields(v, file, f"{prefix}{f.name}.")
            continue
        s = spec(f)
        if s is not None and not s.admits(v):
            raise ConfigError(file, prefix + f.name, s.message())


class Need:
    """need(ok, key, message): raise ConfigError(file, key, message) unless ok (a cross-field
    rule); need.parses(parse, values, key, what) the same for values a parser must accept
    (its ValueError becomes the error, named)."""

    def __init__(self, file: str) -> None:
        self.file = file

    def __call__(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(self.file, key, msg)

    def parses(self, parse: Callable[[Any], Any], values: Any, key: str, what: str = "") -> None:
        for v in values:
            try:
                parse(v)
            except ValueError as e:
                raise ConfigError(self.file, key, f"{v!r} is not {what}" if what else str(e)) \
                    from None
