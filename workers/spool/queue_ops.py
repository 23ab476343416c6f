"""Queue operations on the spool (`smtp-ingress queue ...`), safe while the relay runs.

The spool module (workers/spool/store.py) owns every state change of a spool file: it writes files
into new/, does the relay's claims and settlements, and the file work of the operator's changes
(hold, release, delete, retry, requeue). This module is their command logic: it finds the
message, takes the claim and says what went wrong. The rules (the relay's, workers/relay/):

- a spool file is changed only while its flock() is held, the same exclusive lock the relay
  takes while delivering it; after the lock is taken the file must still be linked *and* still be
  the file at that path (the relay may have delivered it, st_nlink == 0, or moved it to failed/
  meanwhile): otherwise the operation reports `Gone` instead of acting on a stale file;
- the relay scans only new/. hold/ is a directory it never reads. A message is held by writing a
  durable copy into hold/ (tmp + fsync + rename + fsync dir) and then unlinking new/<name> under
  the lock: a relay that opened the file before and waits for the lock then sees st_nlink == 0
  and skips it (a plain rename would keep the inode linked and the relay would deliver a held
  message). Release links hold/<name> back into new/ (never replacing a file there).
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

import builtins
import contextlib
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from workers.spool import store as spool_mod
from workers.spool.state import RelayState, envelope_sender

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
        self.spool.make_relay_dirs(held=True)
        self.root = self.spool.root
        self.wait = wait
        self.dirs = self.spool.dirs
        self.skipped: list[str] = []

    # --- reading ------------------------------------------------------------------------------

    def _item(self, where: str, name: str) -> Item | None:
        path = self.dirs[where] / name
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        env, err = _read_envelope(path)
        state = None
        if self.spool.has_state(name, where):
            state = self.spool.read_state(name, where)
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

    # --- the lock ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, item: Item, wait: float | None = None) -> Iterator[spool_mod.Claim]:
        """The spool file's claim (the relay's flock), waiting at most `wait` seconds; the
        file must still be linked at its path after the lock is taken."""
        try:
            with self.spool.claim(item.where, item.name,
                                  self.wait if wait is None else wait) as claim:
                yield claim
        except spool_mod.Gone:
            raise QueueError(f"{item.qid}: gone meanwhile (delivered or moved)") from None
        except spool_mod.Busy:
            raise QueueError(f"{item.qid}: busy (being delivered right now); try again") from None

    # --- operations ---------------------------------------------------------------------------

    def delete(self, qid: str) -> Item:
        item = self.find(qid)
        with self._locked(item):
            self.spool.delete(item.where, item.name)
        return item

    def delete_from(self, sender: str) -> builtins.list[Item]:
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
        with self._locked(item) as claim:
            self.spool.hold(claim, item.name)
        return item

    def _back_to_new(self, item: Item, reset_failed: bool) -> None:
        taken = QueueError(f"{item.qid}: a file of that name is already in new/; "
                           "delete one of them first")
        if (self.spool.new / item.name).exists():
            raise taken
        with self._locked(item):
            try:
                self.spool.move_to_new(item.where, item.name, reset_failed=reset_failed)
            except FileExistsError:
                raise taken from None
        # a relay that still has the name scheduled (hold and release within one of its scans)
        self.spool.request_retry(item.name)

    def release(self, qid: str) -> Item:
        item = self.find(qid, ("hold",))
        self._back_to_new(item, reset_failed=False)
        return item

    def requeue_failed(self, qid: str | None = None) -> builtins.list[Item]:
        """failed/ -> new/ (one, or all); with all, a message that cannot be requeued
        (malformed, busy, its name already in new/) is left and listed in `self.skipped`."""
        self.skipped = []
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
            if self.spool.has_state(item.name):
                state = self.spool.read_state(item.name)
                if state.next_at:
                    state.next_at = 0.0
                    self.spool.write_state(item.name, state)
            self.spool.request_retry(item.name)
        return item

    def retry_all(self) -> tuple[builtins.list[Item], builtins.list[Item]]:
        done, busy = [], []
        for item in self.list(("new",)):
            try:
                done.append(self.retry(item.name, wait=0.0))
            except QueueError:
                busy.append(item)
        return done, busy
