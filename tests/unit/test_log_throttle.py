"""log.Throttle: table of (every, max_keys, burst, (key, now) calls) -> due() results; and the
client-line throttle of log.refused / log.throttled (per event and client network, per event
and process), driven through the real functions with the clock patched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ingress.core import log
from ingress.core.log import Throttle

CASES = [
    # every, max_keys, burst, calls, expected (None: leave it out; n: log, n were left out)
    (10.0, 8, 1, [("a", 0.0), ("a", 1.0), ("a", 9.9), ("a", 10.0), ("a", 25.0)],
     [0, None, None, 2, 0]),
    (10.0, 8, 1, [("a", 0.0), ("b", 1.0), ("a", 2.0), ("b", 11.0)],
     [0, 0, None, 0]),                                     # one budget per key
    (10.0, 1, 1, [("a", 0.0), ("b", 1.0), ("a", 2.0)],
     [0, 0, 0]),                                           # full: a due line forgets the rest
    (60.0, 1, 1, [("", -5.0), ("", 50.0), ("", 56.0)], [0, None, 1]),   # any clock origin
    # burst: that many lines a window, then left out until the window ends
    (10.0, 8, 3, [("a", 0.0), ("a", 1.0), ("a", 2.0), ("a", 3.0), ("a", 4.0), ("a", 10.0),
                  ("a", 11.0)],
     [0, 0, 0, None, None, 2, 0]),
    (10.0, 8, 2, [("a", 0.0), ("b", 0.5), ("a", 1.0), ("b", 1.5), ("a", 2.0), ("a", 20.0)],
     [0, 0, 0, 0, None, 1]),                               # a burst per key
    (10.0, 2, 1, [("a", 0.0), ("b", 0.0), ("a", 10.0), ("c", 11.0), ("b", 12.0)],
     [0, 0, 0, 0, 0]),          # a known key due again keeps the others; a new one clears
]


@pytest.mark.parametrize(("every", "max_keys", "burst", "calls", "expected"), CASES)
def test_throttle(every: float, max_keys: int, burst: int, calls: list[tuple[str, float]],
                  expected: list[int | None]) -> None:
    t = Throttle(every, max_keys, burst)
    assert [t.due(k, now) for k, now in calls] == expected


# --- log.refused / log.throttled --------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Clock, list[dict[str, Any]]]]:
    """(the clock log's throttle reads, the lines log.event wrote)."""
    clock = Clock()
    out: list[dict[str, Any]] = []
    monkeypatch.setattr(log.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(log.os, "write",
                        lambda fd, b: out.append(json.loads(b)) or len(b))
    yield clock, out
    log.configure_throttle(60.0, 5, 300)


def test_refusal_line_names_the_client(lines: tuple[Clock, list[dict[str, Any]]]) -> None:
    _, out = lines
    log.configure_throttle(60.0, 5, 300)
    assert log.refused("connection_refused", "192.0.2.7", stage="connect", code=421,
                       reason="per-ip", port=40001, lane="bulk")
    (line,) = out
    assert line["event"] == "connection_refused"
    assert (line["peer"], line["port"], line["stage"], line["code"], line["reason"],
            line["lane"], line["not_logged"]) == (
        "192.0.2.7", 40001, "connect", "421", "per-ip", "bulk", 0)


def test_flood_from_one_network_is_bounded(lines: tuple[Clock, list[dict[str, Any]]]) -> None:
    """1,000 refusals from one /24 (any address in it) in a minute: 5 lines; the first line
    after the window says how many were left out; nothing is lost from the count."""
    clock, out = lines
    log.configure_throttle(60.0, 5, 300)
    for i in range(1000):
        clock.now += 0.01
        log.refused("relay_denied", f"198.51.100.{i % 250}", stage="rcpt", code=550)
    assert len(out) == 5
    assert all(d["not_logged"] == 0 for d in out)
    clock.now += 60.0
    log.refused("relay_denied", "198.51.100.9", stage="rcpt", code=550)
    assert len(out) == 6 and out[-1]["not_logged"] == 995
    # another network, and another event from the same one, have budgets of their own
    assert log.refused("relay_denied", "203.0.113.1", stage="rcpt", code=550)
    assert log.refused("early_talker", "198.51.100.9", stage="greet", code=554)


def test_ipv6_network_is_the_64(lines: tuple[Clock, list[dict[str, Any]]]) -> None:
    log.configure_throttle(60.0, 1, 300)
    assert log.refused("early_talker", "2001:db8:1:2::1", stage="greet", code=554)
    assert not log.refused("early_talker", "2001:db8:1:2:ffff::9", stage="greet", code=554)
    assert log.refused("early_talker", "2001:db8:1:3::1", stage="greet", code=554)


def test_many_networks_hit_the_process_cap(lines: tuple[Clock, list[dict[str, Any]]]) -> None:
    """A botnet of 20,000 networks: at most throttle_total lines of one event a window,
    the rest counted on the next line (not_logged_total)."""
    clock, out = lines
    log.configure_throttle(60.0, 5, 300)
    for i in range(20_000):
        log.refused("connection_refused", f"10.{i >> 8 & 255}.{i & 255}.1", stage="connect",
                    code=421, reason="rate")
    assert len(out) == 300
    clock.now += 60.0
    assert log.refused("connection_refused", "192.0.2.1", stage="connect", code=421)
    assert out[-1]["not_logged_total"] == 20_000 - 300
    # other events are not starved by it
    assert log.refused("shed", "10.0.0.1", stage="rcpt", code=451)


def test_throttle_off(lines: tuple[Clock, list[dict[str, Any]]]) -> None:
    _, out = lines
    log.configure_throttle(60.0, 0, 0)
    for _ in range(50):
        log.throttled("over_share", "192.0.2.1", identity="org:x.test")
    assert len(out) == 50 and "not_logged" not in out[0]


def test_below_the_level_is_not_counted(lines: tuple[Clock, list[dict[str, Any]]]) -> None:
    _, out = lines
    log.configure_throttle(60.0, 1, 300)
    assert not log.throttled("over_share", "192.0.2.1", "debug")
    assert log.throttled("over_share", "192.0.2.1")
    assert out[0]["not_logged"] == 0
