"""Spool: group commit, parse round-trip, failures per item, tmp cleanup; trace headers."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from ingress.core.wire import Envelope, Lane
from workers.lane import headers
from workers.spool import store as spool


def env(qid: str = "Q", **kw: object) -> Envelope:
    base: dict[str, object] = dict(
        qid=qid, lane=Lane.BULK, peer_ip="192.0.2.9", peer_port=1, helo="h.example",
        mail_from="a@example.org", rcpts=("b@example.test",), received_at=1700000000.0,
        deadline=1700000020.0)
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_batch_roundtrip(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path)
    items = [(env(f"Q{i}"), b"Received: x\r\n", b"Subject: %d\r\n\r\nbody\r\n" % i)
             for i in range(5)]
    names = s.write_batch(items)
    assert all(isinstance(n, str) for n in names)
    for (e, trace, body), name in zip(items, names, strict=True):
        entry = spool.read(tmp_path / "new" / str(name))
        assert entry.message == trace + body
        assert entry.envelope["qid"] == e.qid and entry.envelope["v"] == spool.SPOOL_FORMAT
        assert entry.envelope["rcpts"] == list(e.rcpts)
    assert not list((tmp_path / "tmp").iterdir())


def test_failure_is_per_item(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path)
    (tmp_path / "tmp" / s.name_for(env("DUP"))).write_bytes(b"occupied")   # O_EXCL fails
    out = s.write_batch([(env("OK1"), b"", b"a\r\n"), (env("DUP"), b"", b"b\r\n"),
                         (env("OK2"), b"", b"c\r\n")])
    assert isinstance(out[0], str) and isinstance(out[2], str)
    assert isinstance(out[1], FileExistsError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_spool(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path)
    (tmp_path / "tmp").chmod(0o500)
    try:
        out = s.write_batch([(env("Q"), b"", b"x\r\n")])
        assert isinstance(out[0], PermissionError)
    finally:
        (tmp_path / "tmp").chmod(0o750)


def test_clean_tmp_only_old(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path)
    old, new = tmp_path / "tmp" / "old", tmp_path / "tmp" / "new"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert s.clean_tmp(older_than=time.time() - 60) == 1
    assert new.exists() and not old.exists()


@pytest.mark.parametrize("raw", [b"", b"Subject: x\r\n", b"X-Ingress-Envelope: {\"v\":2}\r\n"])
def test_parse_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        spool.parse(raw)


@pytest.mark.parametrize(("field", "value", "must_not_contain"), [
    ("helo", "evil\r\nX-Injected: yes", b"\r\nX-Injected"),
    ("helo", "a\nb", b"a\nb"),
    ("rcpts", ("x>\r\nBcc: all@example.test",), b"\r\nBcc"),
    ("qid", "Q\r\nX: y", b"\r\nX: y"),
])
def test_received_header_cannot_be_injected(field: str, value: object,
                                            must_not_contain: bytes) -> None:
    kw = {"qid": "Q1", field: value}
    h = headers.received_header(env(**kw), "mx.example")  # type: ignore[arg-type]
    assert must_not_contain not in h
    assert h.startswith(b"Received: from ") and h.endswith(b"\r\n")
    # Every line after the first is a continuation line.
    assert all(line.startswith(b"\t") for line in h.split(b"\r\n")[1:-1])


def test_received_header_variants() -> None:
    h = headers.received_header(env("Q1", tls="TLSv1.3", smtputf8=True, lane=Lane.FAST), "mx")
    assert b"with UTF8SMTPS (TLSv1.3) id Q1" in h and b"lane=fast" in h
    h = headers.received_header(env("Q2", rcpts=("a@x", "b@x")), "mx")
    assert b"for <" not in h


class ShortWrites:
    """os.writev / os.write that accept at most `step` bytes per call (as a filling disk or a
    signal can make them), optionally failing once with ENOSPC before succeeding again."""

    def __init__(self, step: int, enospc_after: int | None = None) -> None:
        self.step, self.enospc_after, self.calls = step, enospc_after, 0
        self.real_write = os.write

    def _tick(self) -> None:
        self.calls += 1
        if self.enospc_after is not None and self.calls == self.enospc_after:
            raise OSError(28, "No space left on device")

    def writev(self, fd: int, buffers: list[bytes]) -> int:
        self._tick()
        return self.real_write(fd, b"".join(bytes(b) for b in buffers)[:self.step])

    def write(self, fd: int, data: bytes) -> int:
        self._tick()
        return self.real_write(fd, bytes(data)[:self.step])


@pytest.mark.parametrize("step", [1, 7, 4096, 8192])
def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    step: int) -> None:
    """Every write may be short: the file still holds every byte (issue 9 item 4: one short
    writev left an 8192-byte file for a 20 KB message, and it was acknowledged)."""
    body = b"Subject: big\r\n\r\n" + b"x" * 20_000 + b"\r\n"
    fake = ShortWrites(step)
    monkeypatch.setattr(spool.os, "writev", fake.writev)
    monkeypatch.setattr(spool.os, "write", fake.write)
    s = spool.Spool(tmp_path)
    (name,) = s.write_batch([(env("BIG"), b"Received: x\r\n", body)])
    assert isinstance(name, str), name
    assert spool.read(tmp_path / "new" / name).message == b"Received: x\r\n" + body
    assert fake.calls > 1


def test_enospc_mid_file_fails_that_item_only(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC after a short write: that item is an exception and leaves nothing behind; the
    next item (space freed meanwhile) is complete."""
    body = b"Subject: big\r\n\r\n" + b"y" * 20_000 + b"\r\n"
    fake = ShortWrites(8192, enospc_after=2)
    monkeypatch.setattr(spool.os, "writev", fake.writev)
    monkeypatch.setattr(spool.os, "write", fake.write)
    s = spool.Spool(tmp_path)
    out = s.write_batch([(env("FULL"), b"", body), (env("NEXT"), b"", body)])
    assert isinstance(out[0], OSError) and out[0].errno == 28
    assert isinstance(out[1], str)
    assert [p.name for p in (tmp_path / "new").iterdir()] == [out[1]]
    assert spool.read(tmp_path / "new" / out[1]).message == body
    assert not list((tmp_path / "tmp").iterdir())


def test_existing_file_in_new_is_never_replaced(tmp_path: Path) -> None:
    """A name already in new/ (a qid collision, a restored backup) keeps its file: the new
    message is stored under another name (issue 9 item 11: os.rename replaced it silently)."""
    s = spool.Spool(tmp_path)
    taken = tmp_path / "new" / s.name_for(env("SAME"))
    taken.write_bytes(b"X-Ingress-Envelope: earlier message\r\n")
    first, second = s.write_batch([(env("SAME"), b"", b"one\r\n")]), \
        s.write_batch([(env("SAME"), b"", b"two\r\n")])
    assert taken.read_bytes() == b"X-Ingress-Envelope: earlier message\r\n"
    names = [first[0], second[0]]
    assert all(isinstance(n, str) for n in names) and len({taken.name, *names}) == 3
    assert [spool.read(tmp_path / "new" / str(n)).message for n in names] == [b"one\r\n",
                                                                              b"two\r\n"]
    assert all(str(n).split(".")[1] == "SAME" for n in names)   # the qid stays findable
    assert not list((tmp_path / "tmp").iterdir())


def test_failed_directory_fsync_leaves_nothing_in_new(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """If new/ cannot be fsync'd, no item of the batch is acknowledged, so none may stay in
    new/ either: the relay would deliver it and the client's retry would deliver it again."""

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(spool.os, "fsync", fsync)
    s = spool.Spool(tmp_path)
    out = s.write_batch([(env("A"), b"", b"a\r\n"), (env("B"), b"", b"b\r\n")])
    assert all(isinstance(r, OSError) and r.errno == 5 for r in out), out
    assert not list((tmp_path / "new").iterdir())
    assert not list((tmp_path / "tmp").iterdir())


def _count_syncs(monkeypatch: pytest.MonkeyPatch, syncfs_error: int = 0) -> dict[str, int]:
    """Count the per-file fsyncs and the syncfs calls of write_batch; syncfs_error: the errno
    syncfs fails with (0: it works)."""
    seen = {"file_fsync": 0, "syncfs": 0}
    real_fsync, real_syncfs = os.fsync, spool.syncfs

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            seen["file_fsync"] += 1
        real_fsync(fd)

    def syncfs(fd: int) -> None:
        seen["syncfs"] += 1
        if syncfs_error:
            raise OSError(syncfs_error, os.strerror(syncfs_error))
        real_syncfs(fd)

    monkeypatch.setattr(spool.os, "fsync", fsync)
    monkeypatch.setattr(spool, "syncfs", syncfs)
    return seen


@pytest.mark.parametrize(("batch_sync", "n", "file_fsyncs", "syncfs_calls"), [
    ("syncfs", 3, 0, 1),     # a group commit: one syncfs, not a journal commit per file
    ("syncfs", 1, 1, 0),     # one message (the fast lane's own): its fsync
    ("fsync", 3, 3, 0),      # the operator's choice: an fsync per file
])
def test_a_batch_is_made_durable_by_one_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               batch_sync: str, n: int, file_fsyncs: int,
                                               syncfs_calls: int) -> None:
    seen = _count_syncs(monkeypatch)
    s = spool.Spool(tmp_path, batch_sync)
    out = s.write_batch([(env(f"S{i}"), b"", b"x\r\n") for i in range(n)])
    assert all(isinstance(r, str) for r in out), out
    assert len(list((tmp_path / "new").iterdir())) == n
    assert seen == {"file_fsync": file_fsyncs, "syncfs": syncfs_calls}


def test_a_failed_syncfs_fails_the_whole_batch(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Which file's writeback failed is unknown: none of them is acknowledged, none stays."""
    _count_syncs(monkeypatch, syncfs_error=errno.EIO)
    s = spool.Spool(tmp_path)
    out = s.write_batch([(env("A"), b"", b"a\r\n"), (env("B"), b"", b"b\r\n")])
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in out), out
    assert not list((tmp_path / "new").iterdir())
    assert not list((tmp_path / "tmp").iterdir())


def test_without_syncfs_each_file_is_fsynced(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _count_syncs(monkeypatch, syncfs_error=errno.ENOSYS)    # libc has no syncfs
    s = spool.Spool(tmp_path)
    out = s.write_batch([(env("A"), b"", b"a\r\n"), (env("B"), b"", b"b\r\n")])
    assert all(isinstance(r, str) for r in out), out
    assert seen == {"file_fsync": 2, "syncfs": 1}
