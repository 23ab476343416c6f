"""ingress.core.fsutil: the one durable write (spool, relay state, learned cache)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ingress.core import fsutil


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_atomic_write_replaces_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data is fsync'd, renamed over the target, and the directory is fsync'd (the learned
    cache's own writer skipped that: a crash could lose the rename)."""
    target = tmp_path / "learned.json"
    target.write_bytes(b"old")
    seen = _record_fsyncs(monkeypatch)
    fsutil.atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000
    assert seen == ["file", "dir"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned.json"]
    assert stat.S_IMODE(target.stat().st_mode) & 0o007 == 0


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        fsutil.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize("writes, want", [
    ([3, 3], b"abcdef"),             # writev short, then the rest
    ([6], b"abcdef"),                # all at once
    ([2, 0], None),                  # no progress: ENOSPC, never success
])
def test_write_all_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                writes: list[int], want: bytes | None) -> None:
    out: list[bytes] = []
    counts = iter(writes)

    def writev(fd: int, chunks: list[bytes]) -> int:
        n = next(counts)
        out.append(b"".join(chunks)[:n])
        return n

    def write(fd: int, data: memoryview) -> int:
        n = next(counts)
        out.append(bytes(data[:n]))
        return n

    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(os, "write", write)
    if want is None:
        with pytest.raises(OSError) as e:
            fsutil.write_all(0, [b"abc", b"def"])
        assert e.value.errno == 28
    else:
        fsutil.write_all(0, [b"abc", b"def"])
        assert b"".join(out) == want


def test_syncfs_syncs_the_file_system_of_a_descriptor(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fsutil.syncfs(fd)                  # no error on a real file system
        with pytest.raises(OSError):
            fsutil.syncfs(-1)              # EBADF is raised, never ignored
    finally:
        os.close(fd)
