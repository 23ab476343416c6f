"""Queue operations on the spool (`smtp-ingress queue ...`), safe while the relay runs.

The spool owns every state change of a spool file: spool.py writes files into new/, the relay
delivers and settles them, and this module makes the operator's changes (hold, release, delete,
retry, requeue). They all follow the relay's own rules (workers/relay/scheduler.py docstring):

- a spool file is changed only while its flock() is held, the same exclusive lock the relay
  takes while delivering it; after the lock is taken the file must still be linked *and* still be
  the file at that path (the relay may have delivered it, st_nlink == 0, or moved it to failed/
  meanwhile): otherwise the operation reports `Gone` instead of acting on a stale file;
- the relay scans only new/. hold/ is a directory it never reads. A message is held by writing a
  durable copy into hold/ (tmp + fsync + rename + fsync dir) and then unlinking new/<name> under
  the lock: a relay that opened the file before and waits for the lock then sees st_nlink == 0
  and skips it (a plain rename would keep the inode linked and the relay would deliver a held
  message). Release renames hold/<name> back into new/.
- per-message relay state (spool/relay/<name>: delivered / failed recipients, attempts, next
  retry) travels with the message: spool/relay.hold/<name> while held, spool/relay.failed/<name>
  for a message the relay moved to failed/ (the relay keeps it there), so release and requeue-failed
  never resend to a recipient that was already delivered. State is always moved before the spool
  file comes back into new/, so the relay sees both at once.
- "retry now": the state's next_at is set to 0 under the lock, then a request file
  spool/retry/<name> tells a running relay to reschedule the message at its next scan (the relay
  keeps its schedule in memory; without a relay the state alone makes it due at start).

API:
    Queue(spool_root)
    .list(dirs=("new", "hold", "failed")) -> list[Item]      (envelope read from the first line)
    .find(qid_or_name) -> Item            QueueError if unknown
    .show(qid) -> (Item, message bytes)
    .delete(qid) / .hold(qid) / .release(qid) / .retry(qid) -> Item
    .retry_all() -> (made due, skipped busy)   .delete_from(sender) -> [Item]
    .requeue_failed(qid | None) -> [Item]
    become_owner(spool_root)              as root: become the spool's owner first (the CLI does)
Errors: QueueError (unknown id, wrong place, malformed file, busy beyond `wait` seconds, gone
meanwhile); its message is meant for the operator.

Failure modes: a failed message without kept state (failed before this existed, the relay
could not write it, or a malformed file) is requeued with every recipient pending again. A crash
in the middle of hold leaves the message in hold/ and new/ (release then
refuses, because new/<name> exists, rather than deliver it twice); in the middle of release or
requeue the state may already be in spool/relay/ without the file (a relay starting exactly then
removes it as stale: the pending recipients are all tried again). Limits: `list` reads the first
line of every file (bounded to ENVELOPE_MAX bytes); O(files).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from workers import spool as spool_mod
from workers.relay.scheduler import (
    KEPT_STATE_DIR,
    RETRY_REQUEST_DIR,
    _fsync_dir,
    read_state,
    write_state,
)
from workers.relay.state import RelayState, envelope_sender

HOLD_DIR = "hold"
HOLD_STATE_DIR = "relay.hold"       # spool/relay.hold/<name>: a held message's relay state
ENVELOPE_MAX = 1 << 20
DIRS = ("new", "hold", "failed")


class QueueError(Exception):
    """An operation that cannot be done; str() is the operator's message."""


@dataclass(frozen=True)
class Item:
    name: str                    # spool file name: <received>.<qid>.<host>
    qid: str
    where: str                   # "new" | "hold" | "failed"
    size: int
    mtime: float
    envelope: dict[str, Any] | None     # None: malformed (see error)
    state: RelayState | None            # None: never tried
    error: str = ""

    @property
    def sender(self) -> str:
        return envelope_sender(self.envelope) if self.envelope else ""

    @property
    def rcpts(self) -> list[str]:
        return [str(r) for r in (self.envelope or {}).get("rcpts", [])]

    def rcpt_states(self) -> dict[str, str]:
        """Recipient -> delivered | failed | deferred (tried, 4xx) | pending (never tried)."""
        st = self.state or RelayState()
        out: dict[str, str] = {}
        for r in self.rcpts:
            if r in st.delivered:
                out[r] = "delivered"
            elif r in st.failed:
                out[r] = "failed"
            else:
                out[r] = "deferred" if st.attempts else "pending"
        return out

    def as_dict(self, now: float) -> dict[str, Any]:
        env = self.envelope or {}
        received = float(env.get("received_at", self.mtime) or self.mtime)
        st = self.state
        return {"qid": self.qid, "name": self.name, "queue": self.where, "size": self.size,
                "received_at": received, "age_s": round(max(0.0, now - received), 3),
                "sender": self.sender, "lane": env.get("lane", ""),
                "recipients": self.rcpt_states(),
                "attempts": st.attempts if st else 0,
                "next_retry": (st.next_at if st and st.next_at else None),
                "last_error": st.last_error if st else "", "error": self.error}


def qid_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) >= 3 else name


def _read_envelope(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        with open(path, "rb") as f:
            head = f.read(ENVELOPE_MAX)
    except OSError as e:
        return None, str(e)
    end = head.find(b"\r\n")
    try:
        if end < 0:
            raise ValueError("no envelope line end")
        return spool_mod.parse(head[:end + 2]).envelope, ""
    except (ValueError, orjson.JSONDecodeError) as e:
        return None, f"malformed spool file: {e}"


def become_owner(root: Path | str) -> tuple[int, int] | None:
    """Run as root: from here on act as the spool's owner (the service user), so that whatever
    the operator's command creates (a held copy, a state file, a retry request) is the relay's
    to read and replace. Returns the (uid, gid) taken on, None when nothing changed."""
    if os.geteuid() != 0:
        return None
    st = os.stat(root)
    if st.st_uid == 0:
        return None
    try:
        os.initgroups(pwd.getpwuid(st.st_uid).pw_name, st.st_gid)
    except KeyError:
        os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)
    return st.st_uid, st.st_gid


class Queue:
    def __init__(self, root: Path | str, wait: float = 10.0) -> None:
        if not (Path(root) / "new").is_dir():
            raise QueueError(f"{root}: no spool here (spool.path in the config?)")
        self.spool = spool_mod.Spool(root)
        self.root = self.spool.root
        self.wait = wait
        self.state_dir = self.root / "relay"
        self.hold_dir = self.root / HOLD_DIR
        self.dirs = {"new": self.spool.new, "hold": self.hold_dir, "failed": self.spool.failed}
        self.state_dirs = {"new": self.state_dir, "hold": self.root / HOLD_STATE_DIR,
                           "failed": self.root / KEPT_STATE_DIR}
        self.retry_dir = self.root / RETRY_REQUEST_DIR
        self.skipped: list[str] = []
        for d in (self.state_dir, self.hold_dir, self.retry_dir, *self.state_dirs.values()):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)

    def _write_state(self, where: str, name: str, state: RelayState) -> None:
        write_state(self.state_dirs[where], name, state)

    # --- reading ------------------------------------------------------------------------------

    def _item(self, where: str, name: str) -> Item | None:
        path = self.dirs[where] / name
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        env, err = _read_envelope(path)
        state = None
        if (self.state_dirs[where] / name).exists():
            state = read_state(self.state_dirs[where], name)
        qid = str(env.get("qid", qid_of(name))) if env else qid_of(name)
        return Item(name, qid, where, st.st_size, st.st_mtime, env, state, err)

    def list(self, dirs: tuple[str, ...] = DIRS) -> list[Item]:
        out: list[Item] = []
        for where in dirs:
            names: list[str] = []
            with contextlib.suppress(FileNotFoundError), os.scandir(self.dirs[where]) as it:
                names = [e.name for e in it if not e.name.startswith(".") and e.is_file()]
            for name in names:
                item = self._item(where, name)
                if item is not None:
                    out.append(item)
        out.sort(key=lambda i: (i.mtime, i.name))
        return out

    def find(self, qid: str, dirs: tuple[str, ...] = DIRS, _say_where: bool = True) -> Item:
        if not qid or "/" in qid or qid.startswith("."):
            raise QueueError(f"{qid!r} is not a queue id")
        for where in dirs:
            if (self.dirs[where] / qid).is_file():       # a full file name
                item = self._item(where, qid)
                if item is not None:
                    return item
            with contextlib.suppress(FileNotFoundError), os.scandir(self.dirs[where]) as it:
                for e in it:
                    if not e.name.startswith(".") and qid_of(e.name) == qid:
                        item = self._item(where, e.name)
                        if item is not None:
                            return item
        for where in (w for w in DIRS if w not in dirs and _say_where):
            try:
                self.find(qid, (where,), _say_where=False)
            except QueueError:
                continue
            raise QueueError(f"{qid}: is in {where}/, not in {'/, '.join(dirs)}/")
        raise QueueError(f"{qid}: no such message in the queue")

    def show(self, qid: str) -> tuple[Item, bytes]:
        item = self.find(qid)
        try:
            raw = (self.dirs[item.where] / item.name).read_bytes()
        except FileNotFoundError:
            raise QueueError(f"{qid}: gone meanwhile (delivered or moved)") from None
        if item.envelope is None:
            raise QueueError(f"{qid}: {item.error}")
        return item, spool_mod.parse(raw).message

    # --- the lock -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, item: Item, wait: float | None = None) -> Iterator[int]:
        """The spool file's exclusive flock (the relay's), waiting at most `wait` seconds; the
        file must still be linked at its path after the lock is taken."""
        path = self.dirs[item.where] / item.name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise QueueError(f"{item.qid}: gone meanwhile (delivered or moved)") from None
        try:
            deadline = time.monotonic() + (self.wait if wait is None else wait)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise QueueError(f"{item.qid}: busy (being delivered right now); "
                                         "try again") from None
                    time.sleep(0.02)
            st = os.fstat(fd)
            try:
                same = os.stat(path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if st.st_nlink == 0 or not same:
                raise QueueError(f"{item.qid}: gone meanwhile (delivered or moved)")
            yield fd
        finally:
            os.close(fd)

    def _move_state(self, name: str, src: str, dst: str,
                    reset_failed: bool = False) -> RelayState | None:
        """Move <name>'s relay state from src's state dir to dst's (durably, new first)."""
        sdir = self.state_dirs[src]
        if not (sdir / name).exists():
            return None
        state = read_state(sdir, name)
        state.next_at = 0.0
        if reset_failed:
            state.failed, state.attempts = [], 0
        self._write_state(dst, name, state)
        (sdir / name).unlink()
        _fsync_dir(sdir)
        return state

    # --- operations ---------------------------------------------------------------------------

    def delete(self, qid: str) -> Item:
        item = self.find(qid)
        with self._locked(item):
            (self.dirs[item.where] / item.name).unlink()
            _fsync_dir(self.dirs[item.where])
            with contextlib.suppress(FileNotFoundError):
                (self.state_dirs[item.where] / item.name).unlink()
        return item

    def delete_from(self, sender: str) -> list[Item]:
        want = sender.strip().strip("<>").lower()
        out = []
        for item in self.list():
            if item.envelope is not None and item.sender.lower() == want:
                with contextlib.suppress(QueueError):
                    self.delete(item.name)
                    out.append(item)
        return out

    def hold(self, qid: str) -> Item:
        item = self.find(qid, ("new",))
        src = self.spool.new / item.name
        with self._locked(item) as fd:
            tmp = self.hold_dir / f".tmp.{item.name}"
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                while chunk := os.read(fd, 1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                os.fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, self.hold_dir / item.name)
            _fsync_dir(self.hold_dir)
            if (self.state_dir / item.name).exists():
                self._write_state("hold", item.name, read_state(self.state_dir, item.name))
            src.unlink()                    # the relay, waiting for the lock, sees nlink == 0
            _fsync_dir(self.spool.new)
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / item.name).unlink()
        return item

    def _back_to_new(self, item: Item, reset_failed: bool) -> None:
        if (self.spool.new / item.name).exists():
            raise QueueError(f"{item.qid}: a file of that name is already in new/; "
                             "delete one of them first")
        with self._locked(item):
            self._move_state(item.name, item.where, "new", reset_failed=reset_failed)
            os.rename(self.dirs[item.where] / item.name, self.spool.new / item.name)
            _fsync_dir(self.spool.new)
            _fsync_dir(self.dirs[item.where])
        # a relay that still has the name scheduled (hold and release within one of its scans)
        self._request_retry(item.name)

    def release(self, qid: str) -> Item:
        item = self.find(qid, ("hold",))
        self._back_to_new(item, reset_failed=False)
        return item

    def requeue_failed(self, qid: str | None = None) -> list[Item]:
        """failed/ -> new/ (one, or all); with all, a message that cannot be requeued
        (malformed, busy, its name already in new/) is left and listed in `self.skipped`."""
        self.skipped: list[str] = []
        items = [self.find(qid, ("failed",))] if qid else self.list(("failed",))
        out = []
        for item in items:
            try:
                if item.envelope is None:
                    raise QueueError(f"{item.qid}: {item.error}; not requeued")
                self._back_to_new(item, reset_failed=True)
            except QueueError as e:
                if qid:
                    raise
                self.skipped.append(str(e))
                continue
            out.append(item)
        return out

    def retry(self, qid: str, wait: float | None = None) -> Item:
        item = self.find(qid, ("new",))
        with self._locked(item, wait):
            if (self.state_dir / item.name).exists():
                state = read_state(self.state_dir, item.name)
                if state.next_at:
                    state.next_at = 0.0
                    self._write_state("new", item.name, state)
            self._request_retry(item.name)
        return item

    def retry_all(self) -> tuple[list[Item], list[Item]]:
        done, busy = [], []
        for item in self.list(("new",)):
            try:
                done.append(self.retry(item.name, wait=0.0))
            except QueueError:
                busy.append(item)
        return done, busy

    def _request_retry(self, name: str) -> None:
        fd = os.open(self.retry_dir / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.close(fd)
