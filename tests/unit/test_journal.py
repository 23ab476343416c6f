"""A lane worker's journal (workers.spool.journal): durable records first, the spool file in new/
after them, and a crash at every step between that loses nothing and writes nothing twice.

A crash is a child process killed (os._exit) with its materializer held back, or the journal's
files put by hand in the state each step leaves: the recovery of the next process is the real
code against the real files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ingress.core.wire import Envelope, Lane
from workers.spool import journal
from workers.spool import store as spool

SIZE = 1 << 20


def env(qid: str) -> Envelope:
    return Envelope(qid=qid, lane=Lane.FAST, peer_ip="192.0.2.9", peer_port=1, helo="h.example",
                    mail_from="a@example.org", rcpts=("b@example.test",),
                    received_at=1700000000.0, deadline=1700000020.0)


def item(qid: str) -> tuple[Envelope, bytes, bytes]:
    return env(qid), b"Received: x\r\n", f"Subject: {qid}\r\n\r\nbody\r\n".encode()


def in_new(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "new").iterdir()}


def expected(root: Path, qids: list[str]) -> dict[str, bytes]:
    """What Spool.write_batch would have put in new/ for these messages."""
    other = root.parent / "direct"
    names = spool.Spool(other).write_batch([item(q) for q in qids])
    return {str(n): (other / "new" / str(n)).read_bytes() for n in names}


def crash_after_append(root: Path, *batches: list[str]) -> None:
    """A process appends these batches of messages (each one's 250 would follow) and dies
    before its materializer writes anything."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from workers.spool import journal, store
        journal.LINGER_S = 60.0
        from tests.unit.test_journal import item
        j = journal.Journal.take(store.Spool({str(root)!r}), {SIZE})
        for qids in {list(batches)!r}:
            print(j.append([item(q) for q in qids]), flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip(), out.stderr


def test_append_then_close_puts_the_files_in_new(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    s = spool.Spool(root)
    j = journal.Journal.take(s, SIZE)
    names = j.append([item("Q1"), item("Q2")])
    j.close()
    assert in_new(root) == expected(root, ["Q1", "Q2"])
    assert sorted(names) == sorted(in_new(root))
    assert not list(j.staged.iterdir())


def test_a_process_killed_after_its_250_loses_nothing(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool.Spool(root)
    crash_after_append(root, ["Q1", "Q2", "Q3"])
    assert in_new(root) == {}                    # the 250s were answered from the journal
    assert journal.recover(spool.Spool(root)) == 3
    assert in_new(root) == expected(root, ["Q1", "Q2", "Q3"])
    assert journal.recover(spool.Spool(root)) == 0   # the journal starts a new epoch: nothing
    assert len(in_new(root)) == 3                    # is written twice


def test_a_torn_last_record_was_never_acknowledged(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool.Spool(root)
    crash_after_append(root, ["Q1"], ["Q2"])
    wal = root / "journal" / "0.wal"
    # Q2's record is cut short (a crash in its write: its 250 was never sent)
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        _, end, recs = journal._records(f.fileno(), size)
        assert len(recs) == 2
        f.seek(end - 10)
        f.write(b"\0" * 10)
    assert journal.recover(spool.Spool(root)) == 1
    assert in_new(root) == expected(root, ["Q1"])


@pytest.mark.parametrize("linked", [False, True], ids=["staged", "already-linked"])
def test_a_crash_between_done_and_new_leaves_one_copy(tmp_path: Path, linked: bool) -> None:
    """Killed after the DONE record (the staged file durable), before (or in the middle of)
    moving the staged file into new/: recovery moves it once."""
    root = tmp_path / "spool"
    s = spool.Spool(root)
    j = journal.Journal.take(s, SIZE)
    j.append([item("Q1")])
    j.close()
    (name, data), = in_new(root).items()
    os.unlink(root / "new" / name)
    staged = j.staged / name
    staged.write_bytes(data)
    if linked:
        os.link(staged, root / "new" / name)
    # the DONE record of Q1 in an epoch that still holds its MESSAGE record
    fd = os.open(j.path, os.O_RDWR)
    epoch = journal.HEADER.unpack(os.pread(fd, journal.HEADER.size, 0))[1]
    recs = journal._record(journal.MESSAGE, epoch, name.encode() + b"\n" + data) + \
        journal._record(journal.DONE, epoch, name.encode())
    os.pwrite(fd, recs, journal.DATA_START)
    os.close(fd)
    assert journal.recover(spool.Spool(root)) == 0
    assert in_new(root) == {name: data}
    assert not list(j.staged.iterdir())


def test_a_live_journal_is_not_taken_or_recovered(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    s = spool.Spool(root)
    live = journal.Journal.take(s, SIZE)
    journal.LINGER_S, held = 60.0, journal.LINGER_S
    try:
        other = journal.Journal.take(s, SIZE)
        assert other.path != live.path
        live.append([item("Q1")])
        assert journal.recover(s) == 0 and in_new(root) == {}
    finally:
        journal.LINGER_S = held
    other.close()
    live.close()
    assert list(in_new(root)) == list(expected(root, ["Q1"]))


def test_what_does_not_fit_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path / "spool")
    j = journal.Journal.take(s, journal.DATA_START + journal.DONE_ROOM + 200)
    with pytest.raises(journal.JournalFull):
        j.append([item("Q1"), item("Q2"), item("Q3")])
    j.close()
    assert journal.recover(s) == 0 and in_new(tmp_path / "spool") == {}


def test_after_the_epoch_resets_old_records_are_dead(tmp_path: Path) -> None:
    """Each materialization that leaves nothing outstanding starts a new epoch: records of the
    old one further in the file are never read again (here a long one under a short one)."""
    root = tmp_path / "spool"
    s = spool.Spool(root)
    j = journal.Journal.take(s, SIZE)
    big = (env("BIG"), b"", b"x" * 5000)
    j.append([big])
    j.close()
    j = journal.Journal.take(s, SIZE)
    j.append([item("Q1")])
    j.close()
    fd = os.open(j.path, os.O_RDONLY)
    _, _, recs = journal._records(fd, os.fstat(fd).st_size)
    os.close(fd)
    assert recs == []
    assert len(in_new(root)) == 2


def test_no_journal_is_made_where_it_would_crowd_the_spool(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    s = spool.Spool(tmp_path / "spool")
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    with pytest.raises(OSError, match="free space"):
        journal.Journal.take(s, free // journal.FREE_SHARE + (1 << 20))
    assert not [p for p in (tmp_path / "spool" / "journal").iterdir() if p.is_file()]


def test_a_file_that_is_not_a_journal_stops_no_worker(tmp_path: Path) -> None:
    """A .wal whose header is not a journal's (damaged by hand, another program's) is logged
    and left alone: recovery and taking a journal go on without it."""
    root = tmp_path / "spool"
    s = spool.Spool(root)
    (root / "journal").mkdir()
    bad = root / "journal" / "0.wal"
    bad.write_bytes(b"not a journal" + bytes(8192))
    assert journal.recover(s) == 0
    j = journal.Journal.take(s, SIZE)
    assert j.path != bad and bad.read_bytes().startswith(b"not a journal")
    j.append([item("Q1")])
    j.close()
    assert list(in_new(root)) == list(expected(root, ["Q1"]))
