"""Process-level helpers: the file-descriptor limit and looking at other processes (psutil).

API:
    raise_nofile(needed=0) -> (soft, hard)   raise the soft RLIMIT_NOFILE to the hard limit (an
                                             unlimited hard one: to max(soft, needed, 2**20));
                                             returns the limits in force afterwards. The caller
                                             decides what a soft limit below `needed` means (the
                                             acceptor logs nofile_too_low, the bench refuses)
    children(ppid) -> list[int]              live children of `ppid` (zombies left out), sorted
    alive(pid) -> bool                       does `pid` exist and is it not a zombie
    environ(pid) -> dict[str, str]           its environment ({} when it cannot be read)
    cpu_table() -> {pid: (ppid, own_s, children_s)}   CPU seconds of every readable process
    listeners(port) -> set[int]              PIDs holding a listening TCP socket on `port`

The process tables go through psutil rather than reading /proc by hand, so the parsing of
/proc/<pid>/stat (a command name may hold spaces and parentheses) lives in one well-kept place.

Failure modes: a process that exits while it is being looked at is left out (children) or
reported dead (alive); a process we may not read (another user's) counts as alive, with an
empty environ. raise_nofile never raises: a refused setrlimit leaves the limit as it was.
Limits: children() is one walk of the process table (O(processes)); keep it off hot paths.
"""

from __future__ import annotations

import contextlib
import resource

import psutil


def raise_nofile(needed: int = 0) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed, 1 << 20)
    if soft != target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def children(ppid: int) -> list[int]:
    try:
        kids = psutil.Process(ppid).children()
    except psutil.Error:
        return []
    out = []
    for p in kids:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def environ(pid: int) -> dict[str, str]:
    try:
        return dict(psutil.Process(pid).environ())
    except psutil.Error:
        return {}


def cpu_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (ppid, its own CPU seconds (user + system), its reaped children's CPU seconds),
    for every process we may read."""
    out: dict[int, tuple[int, float, float]] = {}
    for p in psutil.process_iter(["ppid", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is None or p.info["ppid"] is None:      # gone, or not ours to read
            continue
        out[p.pid] = (p.info["ppid"], t.user + t.system, t.children_user + t.children_system)
    return out


def listeners(port: int) -> set[int]:
    """PIDs holding a listening TCP socket (IPv4 or IPv6) on `port`."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {c.pid for c in conns
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
            and c.pid is not None}
