"""Durable file writes: one implementation for the spool, the relay state, the learned cache and
the callout cache; and the readers of private files (secrets, our own state files).

API:
    write_all(fd, chunks)               every byte of `chunks` written to `fd`, or OSError
    fsync_dir(path)                     make the directory's entries (links, renames, unlinks)
                                        durable
    syncfs(fd)                          syncfs(2): every file's data and metadata on the file
                                        system holding `fd` durable (one journal commit), or
                                        OSError; OSError(ENOSYS) where libc has no syncfs
    atomic_write(path, data, mode=0o640)
                                        replace `path` atomically and durably: the data goes to
                                        <dir>/.tmp.<name>, is fsync'd, renamed over `path`, and
                                        the directory is fsync'd; a reader sees the old file or
                                        the new one, never a torn one
    read_private(path, limit) -> bytes  a secret's bytes (relay.auth_file, a CURVE secret key):
                                        ValueError (naming the file, and its mode) when group or
                                        others have any access, it cannot be read, or it is
                                        longer than `limit`
    read_own(path, limit) -> bytes      a state file this process wrote itself (the callout
                                        cache): ValueError unless it is a regular file (not
                                        followed if a symlink; a FIFO never blocks the open),
                                        owned by the effective uid, not writable by group or
                                        others and at most `limit` bytes (checked before
                                        reading); FileNotFoundError when it is not there
    private_dir_problem(st, owners) -> str
                                        "" when a directory (its stat) is owned by one of
                                        `owners` and not writable by group or others, else why
                                        not (for a message): the rule for the key directory and
                                        spool.state_dir

Failure modes: OSError from the disk propagates (ENOSPC, EIO, EACCES). A short write is
continued; one that makes no progress is ENOSPC. A failed atomic_write leaves `path` as it was
and may leave the .tmp.<name> file behind (the caller's start-up clean-up removes such
leftovers; a later atomic_write replaces it). A crash before the directory fsync may lose the
rename: the old file is then still there.
Limits: `path`'s directory must exist and be on a local filesystem with atomic rename (every
local Linux filesystem); one writer per path at a time (the tmp name is fixed per path).
read_private checks the mode of the file it opened (fstat, no race with a swap), follows a
symlink (an operator may link a secret into place) and does not check the owner.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

_LIBC = ctypes.CDLL(None, use_errno=True)

TMP_PREFIX = ".tmp."


def write_all(fd: int, chunks: Sequence[bytes]) -> None:
    """Write every byte of `chunks` to `fd` or raise OSError.

    writev may write less than asked (a filling disk, a signal): the rest is written in a loop,
    each call's count checked. A call that writes nothing is an error (ENOSPC), never success.
    """
    total = sum(map(len, chunks))
    written = os.writev(fd, chunks)
    if written == total:
        return
    rest = memoryview(b"".join(chunks))[written:]
    while rest:
        n = os.write(fd, rest)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write: no progress", None)
        rest = rest[n:]


def syncfs(fd: int) -> None:
    """One syncfs(2) (Python has no wrapper): its error since `fd` was opened (Linux >= 5.8
    reports writeback errors of any file on that file system) raises OSError."""
    fn = getattr(_LIBC, "syncfs", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes, mode: int = 0o640) -> None:
    path = Path(path)
    tmp = path.with_name(TMP_PREFIX + path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        write_all(fd, [data])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_limited(path: Path | str, fd: int, limit: int,
                  problem: Callable[[os.stat_result], str]) -> bytes:
    """The bytes of the open file `fd` (closed here) when problem(its fstat) is "", at most
    `limit` (ValueError naming `path` otherwise): read_private's and read_own's one reader."""
    try:
        why = problem(os.fstat(fd))
        if why:
            raise ValueError(f"{str(path)!r} {why}")
        raw = _read_upto(fd, limit + 1)
    except OSError as e:
        raise ValueError(f"{str(path)!r} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > limit:                    # grew after the fstat
        raise ValueError(f"{str(path)!r} is longer than {limit} bytes")
    return raw


def _secret_problem(st: os.stat_result) -> str:
    mode = st.st_mode & 0o777
    if mode & 0o077:
        return (f"is open to group or others (mode {mode:04o}; a secret must not be readable "
                "by others): chmod 600, owned by the service user")
    return ""


def read_private(path: str, limit: int) -> bytes:
    """The bytes of a secret that only its owner may read or write (mode 0600 or 0400)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{path!r} cannot be read: {e.strerror}") from None
    return _read_limited(path, fd, limit, _secret_problem)


def _own_file_problem(st: os.stat_result, limit: int) -> str:
    """Why a file (its fstat) is not one read_own may read; "" when it is."""
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by uid {os.geteuid()} (this process)"
    if mode & 0o022:
        return f"is writable by group or others (mode {mode:04o})"
    if st.st_size > limit:
        return f"has {st.st_size} bytes, over the limit of {limit}"
    return ""


def _read_upto(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.read(fd, n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_own(path: Path | str, limit: int) -> bytes:
    """The bytes of a file this process (its effective uid) wrote, refused when anyone else
    could have: see the module docstring. O_NOFOLLOW: a symlink planted at `path` is refused
    (ELOOP), never followed; O_NONBLOCK: a FIFO cannot hold the open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        why = "is a symlink" if e.errno == errno.ELOOP else f"cannot be read: {e.strerror}"
        raise ValueError(f"{str(path)!r} {why}") from None
    return _read_limited(path, fd, limit, lambda st: _own_file_problem(st, limit))


def private_dir_problem(st: os.stat_result, owners: Collection[int]) -> str:
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if mode & 0o022:
        return f"is writable by group or others (mode {mode:04o})"
    if st.st_uid not in owners:
        return (f"is owned by uid {st.st_uid}, not by the user this runs as (uid "
                f"{os.geteuid()})")
    return ""


def flock_wait(fd: int, wait: float, poll: float = 0.02) -> bool:
    """An exclusive flock of `fd`, tried every `poll` seconds for at most `wait` seconds (never
    a blocking wait: a holder that hangs cannot hang us). False: still held by another."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
