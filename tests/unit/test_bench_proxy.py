"""bench.proxy's pure parts: the documented HAProxy config made loopback, its variants, the
medians; and the docs show exactly the config the bench runs."""

from __future__ import annotations

import re
from typing import Any

import pytest

from bench import proxy
from bench.targets import ROOT


def test_render_rewrites_only_the_addresses() -> None:
    text = proxy.EXAMPLE.read_text()
    out = proxy.render(text, 4000, 4001, 4002, "/tmp/x/allow.lst")
    assert "bind 127.0.0.1:4000\n" in out
    assert "server mx1 127.0.0.1:4001 send-proxy-v2\n" in out
    assert "server mx1 127.0.0.1:4002 send-proxy-v2\n" in out
    assert "{ src -f /tmp/x/allow.lst }" in out
    assert "10.0.0.20" not in out and ":25\n" not in out
    # every other line as documented
    strip = re.compile(r"bind .*|server .*|src -f \S+")
    assert strip.sub("", out) == strip.sub("", text)


def test_render_refuses_a_config_it_cannot_map() -> None:
    text = proxy.EXAMPLE.read_text()
    with pytest.raises(ValueError, match="2526"):
        proxy.render(text.replace("10.0.0.20:2526 ", "10.0.0.21:2526 "), 1, 2, 3, "a")


def test_variants() -> None:
    text = proxy.render(proxy.EXAMPLE.read_text(), 4000, 4001, 4002, "/a")
    assert proxy.VARIANTS["recommended"](text) == text
    one = proxy.VARIANTS["one-backend"](text)
    assert "use_backend" not in one and "default_backend smtp_ingress" in one
    assert len(one.splitlines()) == len(text.splitlines()) - 1
    assert proxy.VARIANTS["nbthread1"](text).startswith(text.split("global\n")[0] +
                                                        "global\n    nbthread 1\n")
    with pytest.raises(ValueError):
        proxy.VARIANTS["one-backend"](one)


def test_the_docs_show_the_config_the_bench_runs() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```haproxy\n(.*?)```", doc, re.S)
    assert blocks == [proxy.EXAMPLE.read_text()]


def _run(flooded: bool, p50: float, p99: float, pct: float = 100.0) -> dict[str, Any]:
    return {"flood": flooded, "accepted_pct": pct, "latency_ms": {"p50": p50, "p99": p99},
            "stages_p99_ms": {"connect": p99 / 10}}


def test_summarise_medians_and_ratio() -> None:
    runs = [_run(False, 5, 10), _run(True, 8, 30), _run(True, 9, 18), _run(False, 6, 12),
            _run(False, 4, 9), _run(True, 7, 24, 99.0)]
    s = proxy.summarise(runs)
    assert s["ref"]["p99"] == 10 and s["flood"]["p99"] == 24
    assert s["ref"]["p50"] == 5 and s["flood"]["p50"] == 8
    assert s["flood"]["accepted_pct"] == 100.0
    assert s["ratio"] == 2.4
    assert s["run_ratios"] == [3.0, 1.5, 2.67]     # each run's flood against its own reference
    assert s["median_run_ratio"] == 2.67
    assert s["flood"]["stages_p99_ms"] == {"connect": 2.4}
    assert proxy.summarise([_run(False, 5, 10)])["ratio"] is None
