"""ingress.core.procs on this process alone (no child is started here; the harness's
children() runs it against a real supervisor in every integration test)."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time

from ingress.core import procs


def test_raise_nofile_lifts_soft_to_hard() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        _, hard = before
        if hard != resource.RLIM_INFINITY and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        soft, hard2 = procs.raise_nofile(32)
        assert hard2 == hard
        assert soft == (hard if hard != resource.RLIM_INFINITY else soft) and soft >= 32
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_alive_and_environ_of_a_process() -> None:
    assert procs.alive(os.getpid())
    child = subprocess.Popen(["sleep", "30"], env={"PATH": "/usr/bin:/bin", "PROBE": "x1"})
    try:
        env: dict[str, str] = {}
        deadline = time.monotonic() + 5       # until its exec is done
        while env.get("PROBE") is None and time.monotonic() < deadline:
            env = procs.environ(child.pid)
            time.sleep(0.01)
        assert env.get("PROBE") == "x1" and env.get("PATH") == "/usr/bin:/bin", env
    finally:
        child.kill()
        child.wait(5)
    assert not procs.alive(child.pid)
    assert procs.environ(child.pid) == {}          # gone: empty, never an exception


def test_a_pid_that_does_not_exist() -> None:
    gone = 2 ** 22 + 17          # above the kernel's pid_max ceiling
    assert not procs.alive(gone)
    assert procs.environ(gone) == {}
    assert procs.children(gone) == []


def test_listeners_finds_this_process_on_its_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert os.getpid() not in procs.listeners(port)      # bound, not listening
        s.listen()
        assert os.getpid() in procs.listeners(port)


def test_cpu_table_has_this_process_and_its_parent() -> None:
    table = procs.cpu_table()
    ppid, own, _ = table[os.getpid()]
    assert ppid == os.getppid() and own > 0
