"""A lane worker's journal: the 250 after one fdatasync of a preallocated file, the spool file
written into new/ after it.

Why: a message made durable as a spool file of its own costs a file creation and two journal
commits of the file system (the file's fsync, then new/'s), and under a flood each of them waits
behind the commits of everyone else's metadata (the bulk lane's files, the downstream MTA's). A
record written over blocks that are already allocated and initialised needs no metadata at all:
its fdatasync is a data write and a cache flush. So every lane worker acknowledges the mail it
is for (ingress.policy.tiers.journals: the operator's fast workers the operator's and third
parties' only) once its records are in its own journal, and a materializer thread writes the
spool files into new/ after the 250, off the client's path, many to one commit (issue 20: a
group commit of files of their own wrote 7.4 blocks per message on this machine's ext4, the
journal 2.2).

Layout: spool/journal/<n>.wal (spool.journal_size bytes, zero-filled at creation) and
spool/journal/<n>.staged/ (its spool files before they go into new/). The first 4096 bytes are
the header (magic, epoch); records follow back to back, each (magic, kind, epoch, length,
crc32) + payload: a MESSAGE record is "<spool name>\\n<spool file bytes>", a DONE record the
names of messages whose staged file is durable. A record counts only if its magic, epoch and
crc are right, and reading stops at the first one that is not (the unacknowledged tail of a
crash, or an older epoch's leftovers). A journal whose every message is done is reset by
writing the header with the next epoch: everything after it is then dead.

Order (each step durable before the next): MESSAGE records (fdatasync) -> ACK -> staged file
(fsync, fsync of the staged directory) -> DONE record, or the reset when nothing else is
outstanding (fdatasync) -> linked into new/ (no-replace, Spool._publish; fsync of new/). A
file reaches new/ (and the relay) only once its record is done, so a record that is not done was
never delivered and may be written again, and a done one is never replayed.

API:
    Journal.take(spool, size) -> Journal        this process's journal: an unlocked one in
                                                spool/journal/ (recovered first) or a new one;
                                                held under an exclusive flock while it lives
    Journal.append(items) -> list[str]          [(envelope, trace, body)]: durable when it
                                                returns (one pwrite, one fdatasync); the names
                                                the files will have in new/; JournalFull when
                                                they do not fit (the caller writes them the
                                                usual way, Spool.write_batch)
    Journal.close()                             materialize what is pending, release the file
    outstanding(root) -> int                    acknowledged messages not yet in new/ (read
                                                only: `smtp-ingress status`, the test kit)
    recover(spool) -> int                       every journal that no live process holds: its
                                                messages not yet done written into new/; the
                                                count (every lane worker calls it at start)

Failure modes: an OSError of append propagates (the worker NACKs the batch: 451) and turns the
journal off for this process (the records may or may not be durable: they are recovered at the
next start, never acknowledged twice). A failed materialization is retried every RETRY_S with
everything pending; what it could not write stays in the journal and is recovered by the next
process to start. A crash at any step leaves either a record that is not done (written again) or
a staged file (moved into new/ by recovery; one already linked there is not linked twice).
A file in journal/ whose header is not a journal's is logged (journal_unreadable) and left
alone. A new journal that would take more than 1/FREE_SHARE of the spool's free space is not made
(OSError: the worker runs without one and logs journal_off). Limits: one process per journal
file (the flock); messages wait in memory and in the journal
until materialized (bounded by its size: JournalFull beyond); a message larger than the
journal is written the usual way; Linux (fdatasync, flock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from ingress.core import log
from ingress.core.fsutil import fsync_dir, write_all
from ingress.core.wire import Envelope
from workers.spool.store import Spool, envelope_line

JOURNAL_DIR = "journal"
MAGIC = b"SIJ1"
HEADER = struct.Struct("<4sQ")          # magic, epoch
RECORD = struct.Struct("<4sBQII")       # magic, kind, epoch, payload length, crc32 of payload
DATA_START = 4096                       # records start after the header's block
MESSAGE, DONE = 1, 2
LINGER_S = 0.02      # the materializer waits this long for more messages to write together
RETRY_S = 1.0        # after a failed materialization
DONE_ROOM = 64 * 1024   # kept free of MESSAGE records for the DONE records of what is in it
MAX_JOURNALS = 256   # <n>.wal names tried when creating one
FREE_SHARE = 4       # a new journal takes at most this fraction (1/4) of the free space
ZEROS = bytes(1 << 20)


class JournalFull(Exception):
    """The records do not fit in what is left of the journal."""


def _records(fd: int, size: int) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(epoch, end offset, [(kind, payload)]) of a journal file: the valid records in order."""
    head = os.pread(fd, HEADER.size, 0)
    if len(head) < HEADER.size or head[:4] != MAGIC:
        raise ValueError("not a journal: bad header")
    epoch = HEADER.unpack(head)[1]
    out: list[tuple[int, bytes]] = []
    pos = DATA_START
    while pos + RECORD.size <= size:
        magic, kind, rec_epoch, length, crc = RECORD.unpack(os.pread(fd, RECORD.size, pos))
        if magic != MAGIC or rec_epoch != epoch or kind not in (MESSAGE, DONE) \
                or pos + RECORD.size + length > size:
            break
        payload = os.pread(fd, length, pos + RECORD.size)
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        out.append((kind, payload))
        pos += RECORD.size + length
    return epoch, pos, out


def _record(kind: int, epoch: int, payload: bytes) -> bytes:
    return RECORD.pack(MAGIC, kind, epoch, len(payload), zlib.crc32(payload)) + payload


def _not_done(records: list[tuple[int, bytes]]) -> dict[bytes, bytes]:
    """Name -> spool file bytes of the MESSAGE records that no DONE record names."""
    messages: dict[bytes, bytes] = {}
    done: set[bytes] = set()
    for kind, payload in records:
        if kind == MESSAGE:
            name, _, data = payload.partition(b"\n")
            messages[name] = data
        else:
            done.update(payload.split(b"\n"))
    return {n: d for n, d in messages.items() if n not in done}


def _unheld(spool: Spool) -> Iterator[Journal]:
    """Every journal of the spool that no live process holds, locked (exclusive flock) and
    recovered; one whose header is not a journal's is logged (journal_unreadable) and left
    where it is for the operator, never a reason for a worker not to start."""
    d = spool.root / JOURNAL_DIR
    for path in sorted(d.glob("*.wal")) if d.is_dir() else []:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            j = Journal(spool, path, fd)
        except BlockingIOError:     # a live process holds it
            os.close(fd)
            continue
        except ValueError as e:
            os.close(fd)
            log.event("journal_unreadable", "error", journal=path.name, error=str(e))
            continue
        except BaseException:
            os.close(fd)
            raise
        yield j


class Journal:
    def __init__(self, spool: Spool, path: Path, fd: int) -> None:
        self.spool, self.path, self.fd = spool, path, fd
        self.size = os.fstat(fd).st_size
        self.staged = path.with_suffix(".staged")
        self.staged.mkdir(mode=0o750, exist_ok=True)
        self.lock = threading.Lock()          # the file: appends, DONE records, resets
        self.cond = threading.Condition()     # pending and closing
        self.pending: list[tuple[str, list[bytes]]] = []    # durable, not yet in new/
        self.outstanding = 0                  # MESSAGE records in this epoch, not yet done
        self.closing = False
        self.broken: OSError | None = None
        self.epoch, self.tail = 0, DATA_START
        self.recovered = self._recover()     # messages a process before us left not done
        self.thread: threading.Thread | None = None     # the materializer, once taken

    # --- taking a journal ---------------------------------------------------------------------

    @classmethod
    def take(cls, spool: Spool, size: int) -> Journal:
        d = spool.root / JOURNAL_DIR
        d.mkdir(mode=0o750, exist_ok=True)
        j = next(_unheld(spool), None) or cls(spool, *_create(d, size))
        j.thread = threading.Thread(target=j._run, name="materializer", daemon=True)
        j.thread.start()
        return j

    # --- the client's path --------------------------------------------------------------------

    def append(self, items: Sequence[tuple[Envelope, bytes, bytes]]) -> list[str]:
        """Records for every item, durable when this returns; the names in new/ to be."""
        files = [(self.spool.name_for(env), [envelope_line(env), trace, body])
                 for env, trace, body in items]
        payloads = [name.encode() + b"\n" + b"".join(c) for name, c in files]
        with self.lock:
            room = self.size - DONE_ROOM
            size = sum(RECORD.size + len(p) for p in payloads)
            if self.tail + size > room and self.outstanding == 0 and self.tail > DATA_START:
                self._reset_or_break()      # a DONE record left the tail up; nothing is pending
            blob = b"".join(_record(MESSAGE, self.epoch, p) for p in payloads)
            if self.tail + len(blob) > room:
                raise JournalFull(f"{len(blob)} bytes do not fit ({room - self.tail} left)")
            self._write_or_break(blob)
            self.outstanding += len(files)
        with self.cond:
            self.pending.extend(files)
            self.cond.notify()
        return [name for name, _ in files]

    # --- after the 250 ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closing:
                    self.cond.wait()
                if not self.pending:
                    return
                self.cond.wait_for(lambda: self.closing, timeout=LINGER_S)
                batch, self.pending = self.pending, []
            try:
                self._materialize(batch)
            except OSError as e:
                log.event("journal_materialize_failed", "error", journal=self.path.name,
                          messages=len(batch), error=str(e))
                with self.cond:
                    self.pending[:0] = batch
                    if self.cond.wait_for(lambda: self.closing, timeout=RETRY_S):
                        return      # left in the journal: the next process recovers it

    def _materialize(self, batch: list[tuple[str, list[bytes]]]) -> None:
        """Staged files durable, then their records done, then into new/."""
        fds: list[int] = []
        try:
            for name, chunks in batch:
                fd = os.open(self.staged / name,
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
                fds.append(fd)
                write_all(fd, chunks)
            if not self.spool.synced_at_once(fds):
                for fd in fds:
                    os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        fsync_dir(self.staged)
        with self.lock:
            if self.outstanding == len(batch):
                self._reset_or_break()      # nothing else outstanding: the next epoch
            else:
                done = b"\n".join(name.encode() for name, _ in batch)
                rec = _record(DONE, self.epoch, done)
                if self.tail + len(rec) > self.size:
                    # no room to say so (DONE_ROOM was used up): retried with everything
                    # pending, which is then all that is outstanding (the reset above)
                    raise OSError(errno.ENOSPC, "no room in the journal for a DONE record")
                self._write_or_break(rec)
            self.outstanding -= len(batch)
        self._publish()

    def _write_or_break(self, data: bytes, at: int | None = None) -> None:
        """`data` durable at `at` (the tail by default; under self.lock). A failure turns the
        journal off for this process: what it holds is then unknown until a recovery."""
        if self.broken is not None:
            raise self.broken
        try:
            if os.pwrite(self.fd, data, self.tail if at is None else at) != len(data):
                raise OSError(errno.ENOSPC, "short write to the journal")
            os.fdatasync(self.fd)
        except OSError as e:
            if self.broken is None:
                log.event("journal_off", "error", journal=self.path.name, error=str(e))
            self.broken = e
            raise
        if at is None:
            self.tail += len(data)

    def _reset_or_break(self) -> None:
        """Every message of this epoch is done: the next epoch starts (under self.lock)."""
        self._write_or_break(HEADER.pack(MAGIC, self.epoch + 1), at=0)
        self.epoch, self.tail = self.epoch + 1, DATA_START

    def _publish(self) -> None:
        """Every staged file (all done) into new/, then new/ durable."""
        moved = False
        for p in sorted(self.staged.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                there = self.spool.new / p.name
                if there.exists() and os.path.samefile(there, p):
                    p.unlink()      # linked by a run that crashed before the unlink
                    continue
                self.spool.publish(p, p.name)
                moved = True
        if moved:
            fsync_dir(self.spool.new)

    # --- start and end ------------------------------------------------------------------------

    def _recover(self) -> int:
        """What a process before us left (under our lock): messages not done written again and
        done, staged files into new/, then a fresh epoch."""
        epoch, _, records = _records(self.fd, self.size)
        self.epoch = epoch
        todo = [(n.decode(), [d]) for n, d in _not_done(records).items()]
        if todo:
            self.outstanding = len(todo)
            self._materialize(todo)      # resets the journal (nothing else is outstanding)
        else:
            self._publish()
            if records:
                with self.lock:
                    self._reset_or_break()
        if todo:
            log.event("journal_recovered", "warning", journal=self.path.name, messages=len(todo))
        return len(todo)

    def close(self, timeout: float | None = None) -> None:
        """Materialize what is pending (waiting at most `timeout` s: what is left stays in the
        journal for the next process), then release the file; append raises after this."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)
        with self.lock:
            if self.broken is None:
                self.broken = OSError(errno.EBADF, "the journal is closed")
            if self.fd >= 0:
                os.close(self.fd)       # the flock goes with it
                self.fd = -1


def _create(d: Path, size: int) -> tuple[Path, int]:
    """A new journal, zero-filled (its blocks allocated and written: an fdatasync over them has
    no metadata to commit), locked, then linked under the first free <n>.wal."""
    size = max(size, DATA_START + RECORD.size)
    st = os.statvfs(d)
    if size > st.f_bavail * st.f_frsize // FREE_SHARE:
        raise OSError(errno.ENOSPC, f"a journal of {size} bytes would take more than 1/"
                      f"{FREE_SHARE} of the spool's free space")
    tmp = d / f".tmp.{os.getpid()}.{time.monotonic_ns()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        left = size
        while left > 0:
            left -= os.write(fd, ZEROS[:min(left, len(ZEROS))])
        os.pwrite(fd, HEADER.pack(MAGIC, 1), 0)
        os.fsync(fd)
        for n in range(MAX_JOURNALS):
            path = d / f"{n}.wal"
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue
            fsync_dir(d)
            return path, fd
        raise OSError(errno.EEXIST, f"no free journal name in {d}")
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def outstanding(root: Path) -> int:
    """Acknowledged messages not yet in new/ (read only, no lock): records of the current epoch
    not done, and staged files, in the spool at `root`. 0 once every journaled message is in
    new/."""
    d = root / JOURNAL_DIR
    n = 0
    for path in sorted(d.glob("*.wal")) if d.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _, _, records = _records(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            n += len(_not_done(records))
        with contextlib.suppress(OSError):
            n += len(os.listdir(path.with_suffix(".staged")))
    return n


def recover(spool: Spool) -> int:
    """Every journal in spool/journal/ that no live process holds, recovered and released."""
    n = 0
    for j in _unheld(spool):
        n += j.recovered
        j.close()
    return n
