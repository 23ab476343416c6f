"""Every child process a test or a bench run starts, stopped by PID on exit.

Purpose
    One registry for the child processes of a run (DNS server, ingress, baseline, bots), so each
    is stopped by its own PID and process group even on ^C or an error -- never by name.

API
    Processes()   context manager; ``__exit__`` stops every child still registered
        .spawn(argv, log=None, stdout_pipe=False, env=None, cwd=ROOT) -> Popen
            starts ``argv`` in its own session; stderr (and stdout unless piped) into ``log``
        .stop(proc, timeout=30.0, sig=SIGTERM) -> returncode   signal, wait, then SIGKILL the group
        .stop_all()   every registered child, newest first
        .pids()       the PIDs still running

Failure modes
    ``spawn`` raises what ``subprocess.Popen`` raises (OSError for a missing program). ``stop``
    never raises for a process that is already gone; ``stop_all`` swallows per-child errors so
    one stuck child does not leave the others running.

Limits
    POSIX only (sessions, process groups). A child that leaves its own process group is not
    followed; the kill is by the group the child was started in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent.parent


class Processes:
    """Every child process the suite starts, stopped by PID on exit (also on ^C and errors)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, IO[bytes]] = {}

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(self, argv: Sequence[str], *, log: Path | None = None, stdout_pipe: bool = False,
              env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session; stderr (and stdout unless piped) into ``log``."""
        out: IO[bytes] | int = subprocess.DEVNULL
        logf = None
        if log is not None:
            logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
            out = logf
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else out, stderr=out,
            start_new_session=True)
        self._procs.append(proc)
        if logf is not None:
            self._logs[proc.pid] = logf
        return proc

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0,
             sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM (or ``sig``), wait up to ``timeout`` s, then SIGKILL its own process group."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this target
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5.0)
        # Whatever the target left behind in its own group (e.g. a child that outlived it).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        logf = self._logs.pop(proc.pid, None)
        if logf is not None:
            logf.close()
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=20.0)
