"""The aiosmtpd coupling: a session cloned from the per-process prototype (IngressSMTP copies
SMTP.__init__'s configuration instead of running it per connection) must hold the same state
as a freshly built instance, and nothing bound to the prototype session."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from ingress.core import config
from ingress.edge.handler import IngressHandler
from ingress.edge.smtp import IngressSMTP


def make_ctx(loop: asyncio.AbstractEventLoop) -> types.SimpleNamespace:
    ctx = types.SimpleNamespace(cfg=config.load(None), smtp_prototypes={}, tls_context=None,
                                loop=loop)
    ctx.handler = IngressHandler(ctx)  # type: ignore[arg-type]
    return ctx


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def shape(value: Any, owner: object, depth: int = 0) -> Any:
    """A comparable picture of one attribute: plain values as they are, bound methods as
    (function, bound to the owner?), containers element-wise, other objects by type."""
    if depth > 4:
        return type(value).__name__
    if value is owner:
        return "<self>"
    if isinstance(value, types.MethodType):
        return ("method", value.__func__, value.__self__ is owner)
    if isinstance(value, str | bytes | int | float | bool | type(None)):
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return (type(value).__name__, *(shape(v, owner, depth + 1) for v in value))
    if isinstance(value, list | tuple):
        return [shape(v, owner, depth + 1) for v in value]
    if isinstance(value, Mapping):      # dicts, and the tables bound on lookup (_Bound)
        return {k: shape(v, owner, depth + 1) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(repr(v) for v in value)
    return type(value).__name__


def bound_to(value: Any, target: object, depth: int = 0) -> bool:
    """Does `value` (recursively) hold `target` or a method bound to it?"""
    if depth > 4:
        return False
    if value is target:
        return True
    if isinstance(value, types.MethodType):
        return value.__self__ is target
    if isinstance(value, Mapping):      # dicts, and the tables bound on lookup (_Bound)
        return any(bound_to(v, target, depth + 1) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(bound_to(v, target, depth + 1) for v in value)
    return False


def test_clone_equals_a_fresh_instance(loop: asyncio.AbstractEventLoop) -> None:
    ctx = make_ctx(loop)
    prototype = IngressSMTP(ctx)          # runs SMTP.__init__, becomes the prototype
    assert ctx.smtp_prototypes
    clone = IngressSMTP(ctx)
    fresh = IngressSMTP(make_ctx(loop))   # a new context: SMTP.__init__ again
    assert set(clone.__dict__) == set(fresh.__dict__)
    for key in fresh.__dict__:
        if key == "ctx":
            continue
        assert shape(clone.__dict__[key], clone) == shape(fresh.__dict__[key], fresh), key
    assert prototype is not clone


def test_clone_holds_nothing_bound_to_the_prototype(loop: asyncio.AbstractEventLoop) -> None:
    ctx = make_ctx(loop)
    prototype = IngressSMTP(ctx)
    clone = IngressSMTP(ctx)
    own = {k: v for k, v in prototype.__dict__.items()
           if k != "ctx" and not isinstance(v, str | bytes | int | float | bool | type(None))}
    for key, value in clone.__dict__.items():
        assert not bound_to(value, prototype), key
        # per-connection objects of the prototype (its stream, session, limits) never shared
        if key in ("_strong_reader", "_stream_reader_wr", "_auth_methods", "_smtp_methods",
                   "command_size_limits", "counters", "evidence", "_continuation"):
            assert value is not own.get(key), key
    assert clone._auth_methods, "aiosmtpd offers builtin AUTH mechanisms (LOGIN, PLAIN)"
    for mech in clone._auth_methods.values():
        assert mech.method.__self__ is clone


def test_auth_methods_are_per_connection() -> None:
    from ingress.edge.smtp import _PER_CONNECTION
    assert "_auth_methods" in _PER_CONNECTION
