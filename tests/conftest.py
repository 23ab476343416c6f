"""Markers for tests that need a program the machine may not have.

Purpose
    One place that decides whether Postfix, HAProxy or the systemd tools can run here, so a test
    says what it needs (``@pytest.mark.needs_postfix``) instead of writing its own skip.

API
    ``@pytest.mark.needs_postfix``   root, and the Debian postfix package (binaries, the postfix
                                     user, the postdrop group): tests.kit.postfix.check_available
    ``@pytest.mark.needs_haproxy``   ``haproxy`` on PATH
    ``@pytest.mark.needs_systemd``   ``systemd-analyze``, ``systemd-sysusers``, ``systemd-tmpfiles``
                                     on PATH
    ``@pytest.mark.needs_redis``     ``redis-server`` on PATH (tests start and stop their own)
    ``missing(marker_name) -> str | None``   the skip reason, or None when the program is there
    ``@pytest.mark.serial``          put by a test on itself, with a comment saying what it
                                     times: failover within a deadline, a deadline, or a
                                     shared rate across processes, which a test running
                                     beside it on these 2 cores would skew. `make test` runs
                                     the rest a few at a time (pytest-xdist, -n TEST_WORKERS,
                                     by file), then these alone. A test that only checks what
                                     happens (not how fast) is not serial, even beside serial
                                     tests in its file: every test run alone is one the 2
                                     cores do not share.

Failure modes
    A test carrying a marker whose program is missing is skipped with a reason that names the
    program and the Debian package (``make sysdeps`` installs them as root); it never errors.

Limits
    Checks presence only (and root for Postfix), once per session; a program that is present but
    broken fails the test that uses it, which is what we want.
"""

from __future__ import annotations

import functools
import shutil

import pytest

from tests.kit.postfix import PostfixUnavailable, check_available

SYSTEMD_TOOLS = ("systemd-analyze", "systemd-sysusers", "systemd-tmpfiles")


@functools.cache
def missing(marker: str) -> str | None:
    """Why a test with ``marker`` cannot run here, or None."""
    if marker == "needs_postfix":
        try:
            check_available()
        except PostfixUnavailable as exc:
            return f"Postfix cannot run here: {exc}"
        return None
    if marker == "needs_haproxy":
        if shutil.which("haproxy") is None:
            return "haproxy not installed (Debian package haproxy; `make sysdeps` as root)"
        return None
    if marker == "needs_systemd":
        gone = [t for t in SYSTEMD_TOOLS if shutil.which(t) is None]
        if gone:
            return (f"{', '.join(gone)} not installed (Debian package systemd; "
                    "`make sysdeps` as root)")
        return None
    if marker == "needs_redis":
        if shutil.which("redis-server") is None:
            return ("redis-server not installed (Debian package redis-server; "
                    "`make sysdeps` as root)")
        return None
    raise ValueError(f"unknown marker {marker}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_postfix: needs root and the Debian postfix package")
    config.addinivalue_line("markers", "needs_haproxy: needs haproxy on PATH")
    config.addinivalue_line("markers", "needs_systemd: needs systemd-analyze/-sysusers/-tmpfiles")
    config.addinivalue_line("markers", "needs_redis: needs redis-server on PATH")
    config.addinivalue_line("markers", "serial: run alone, not beside another test (timing)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in ("needs_postfix", "needs_haproxy", "needs_systemd", "needs_redis"):
        if item.get_closest_marker(name) is not None:
            reason = missing(name)
            if reason is not None:
                pytest.skip(reason)
