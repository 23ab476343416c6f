"""Durable Maildir-style spool: the only code that changes a spool file on disk.

Every state change of a spool file is made here: written (write_batch), read, claimed (the
flock), finished (unlinked when delivered, moved to failed/ when bounced), its relay state
(the per-message JSON state files) and the operator's queue changes (hold, release, requeue,
delete, retry requests). The relay and the queue tools (workers/spool/queue_ops.py) decide; this
module does the file work.

Layout under the spool root: tmp/ (being written), new/ (durable, waiting for the relay or the
reader), cur/ (Maildir compatibility; unused by us), failed/ (bounced by the relay), hold/
(held by the operator; the relay never reads it); relay/<name> (the relay state of new/<name>),
relay.failed/<name> (a failed message's final state, for requeue), relay.hold/<name> (a held
message's state), retry/<name> (an operator's request: deliver new/<name> now).

A spool file is one RFC 5322 message whose first line carries the envelope:

    X-Ingress-Envelope: {"v":1,"qid":...,"mail_from":...,"rcpts":[...],...}\\r\\n
    Received: ... (our trace headers, each CRLF-terminated)
    <the client's message bytes, exactly as received after dot-unstuffing>

The envelope is ingress.core.wire.Envelope's dict plus "v" (SPOOL_FORMAT). Its "evidence"
(ingress.core.wire.WireEvidence, read back with its one codec, WireEvidence.from_wire) carries
what the ingress proved, for the relay: "spf" and "spf_domain" (the acceptor's SPF verdict and
the MAIL FROM domain it was for) and "dkim_pass" (the worker's: the d= of every DKIM signature
that passed, workers.lane.pipeline); ingress.policy.dsn reads them to decide who may get a DSN.
New evidence fields are additive (optional; a reader treats a missing key as nothing proven),
so they do not change SPOOL_FORMAT; a change that an older relay would misread does. Files
written before the record was typed ("dkim_pass" a space-separated string, "reasons" a comma
string, "retry" "1") still decode.

API:
    Spool(root, batch_sync="syncfs").write_batch([(envelope, trace, body), ...]) -> [str | exc]
        Group commit: every file is written to tmp/ and made durable (a batch of two or more
        with one syncfs(2) of the spool's file system, spool.batch_sync; one file, or
        batch_sync "fsync", with an fsync per file), moved into new/ with a
        no-replace link (a name already taken there gets a ".N" suffix: nothing in new/ is ever
        overwritten), then new/ is fsync'd once. Only then does an item count as written; a
        failed one gets its exception (tmp file removed), the others their names.
    Spool.synced_at_once(fds) -> bool / Spool.publish(path, name) -> name in new/
        write_batch's steps, which the lane workers' journals (journal.py) also take: one syncfs
        for a batch (or False: fsync each); a durable file linked into new/, unlinked at path
    read(path) -> SpoolEntry(envelope dict, message bytes); parse(raw) the same from bytes
    Spool.claim(where, name, wait=0.0) -> context manager of a Claim (fd, path, read())
        the file's exclusive flock, waited for at most `wait` seconds (Busy after that); the
        file must still be linked at its path once the lock is taken (Gone otherwise: it was
        delivered, held or moved meanwhile). Every change below is made under a claim.
    Spool.finish(name) / Spool.fail(name, kept) -> (name in failed/, error writing kept)
        delivered: unlink new/<name>; bounced: kept state first, then a no-replace link into
        failed/ (".N" when the name is taken there), unlink from new/; both drop relay/<name>
    read_state / write_state / drop_state / state_names / cleanup_states
        the relay state, written with core.fsutil.atomic_write (tmp + fsync + rename + fsync)
    hold(claim, name), release-style move_to_new(where, name, reset_failed), delete(where, name)
    request_retry(name) / take_retry_requests() -> names

Failure modes: OSError from the disk is returned per item by write_batch (the worker NACKs it:
the client gets 451) and raised by everything else. A short write is continued until every
byte is written; one that makes no progress is an ENOSPC error for that item, never a
truncated file in new/. A failed syncfs fails every item of its batch (which file's writeback
failed is unknown; Linux >= 5.8 reports it); where libc has no syncfs, an fsync per file.
A failed fsync of new/ fails the whole batch and removes its files from new/. A crash between
the link and the directory fsync can lose the link; that message was not yet acknowledged,
so the client got no 250 for it. Files left in tmp/ by a crash are unacknowledged (or, after
a crash between link and unlink, a second name of a file in new/) and are removed by
`clean_tmp()` at worker start. A corrupt state file reads as "never tried" (logged): that
may resend to delivered recipients, which beats losing the message.
Limit: the spool filesystem must support hard links (every local Linux filesystem does).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ingress.core import log
from ingress.core.fsutil import (
    TMP_PREFIX,
    atomic_write,
    flock_wait,
    fsync_dir,
    syncfs,
    write_all,
)
from ingress.core.wire import Envelope
from workers.spool.state import RelayState

ENVELOPE_HEADER = b"X-Ingress-Envelope: "
SPOOL_FORMAT = 1
MAX_NAME_TRIES = 100        # names tried in new/ before a write fails (a collision is rare)
TMP_DIR = "tmp"                     # spool/tmp/<name>: being written
NEW_DIR = "new"                     # spool/new/<name>: durable, waiting for the relay
CUR_DIR = "cur"                     # spool/cur/: Maildir compatibility, unused
FAILED_DIR = "failed"               # spool/failed/<name>: bounced by the relay
STATE_DIR = "relay"                 # spool/relay/<name>: the relay state of new/<name>
KEPT_STATE_DIR = "relay.failed"     # spool/relay.failed/<name>: a failed message's state
HOLD_DIR = "hold"                   # spool/hold/<name>: held by the operator
HOLD_STATE_DIR = "relay.hold"       # spool/relay.hold/<name>: a held message's relay state
RETRY_REQUEST_DIR = "retry"         # spool/retry/<name>: `smtp-ingress queue retry` asks for it
LOCK_POLL = 0.02                    # seconds between two tries of a busy flock


@dataclass(frozen=True)
class SpoolEntry:
    envelope: dict[str, Any]
    message: bytes          # trace headers + client bytes (the envelope line removed)


class Gone(Exception):
    """The spool file is no longer at its path (delivered, held or moved meanwhile)."""


class Busy(Exception):
    """Another process holds the spool file's lock (the relay delivering it, an operator)."""


def envelope_line(env: Envelope) -> bytes:
    doc = env.as_dict()
    doc["v"] = SPOOL_FORMAT
    return ENVELOPE_HEADER + orjson.dumps(doc) + b"\r\n"


def parse(raw: bytes) -> SpoolEntry:
    if not raw.startswith(ENVELOPE_HEADER):
        raise ValueError("not a spool file: no envelope line")
    end = raw.index(b"\r\n")
    doc = orjson.loads(raw[len(ENVELOPE_HEADER):end])
    if doc.get("v") != SPOOL_FORMAT:
        raise ValueError(f"unknown spool format {doc.get('v')!r}")
    return SpoolEntry(envelope=doc, message=raw[end + 2:])


def read(path: Path | str) -> SpoolEntry:
    with open(path, "rb") as f:
        return parse(f.read())


def write_state(state_dir: Path, name: str, state: RelayState) -> None:
    """Atomically and durably replace <state_dir>/<name>."""
    atomic_write(state_dir / name, state.encode())


def read_state(state_dir: Path, name: str) -> RelayState:
    try:
        return RelayState.decode((state_dir / name).read_bytes())
    except FileNotFoundError:
        return RelayState()
    except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
        # A torn state file cannot happen (rename is atomic); a corrupt one is treated as "never
        # tried": that may resend to delivered recipients, which beats losing the message.
        log.event("relay_state_corrupt", "error", file=name, error=str(e))
        return RelayState()


@dataclass(frozen=True)
class Claim:
    """A spool file held under its exclusive flock (valid inside Spool.claim's with block)."""
    fd: int
    path: Path

    def read(self) -> bytes:
        with os.fdopen(os.dup(self.fd), "rb") as f:
            f.seek(0)
            return f.read()


def _link_noreplace(src: Path, dst_dir: Path, name: str,
                    taken: tuple[Path, ...] = ()) -> str:
    """Link `src` into dst_dir without ever replacing a file there; a name that is taken (in
    dst_dir, or in one of the `taken` directories) gets a numbered suffix. The name used."""
    for k in range(MAX_NAME_TRIES):
        target = name if k == 0 else f"{name}.{k}"
        if any((d / target).exists() for d in taken):
            continue
        try:
            os.link(src, dst_dir / target)
        except FileExistsError:
            continue
        return target
    raise FileExistsError(errno.EEXIST, f"no free name in {dst_dir.name}/", str(dst_dir / name))


_Written = tuple[int, int, Path, str]     # a file of a batch in tmp/: (item, fd, tmp path, name)


class Spool:
    def __init__(self, root: Path | str, batch_sync: str = "syncfs") -> None:
        self.root = Path(root)
        self.batch_sync = batch_sync      # spool.batch_sync: how a batch of 2+ is made durable
        self.tmp, self.new = self.root / TMP_DIR, self.root / NEW_DIR
        self.cur, self.failed = self.root / CUR_DIR, self.root / FAILED_DIR
        for d in (self.tmp, self.new, self.cur, self.failed):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.hold_dir = self.root / HOLD_DIR
        self.retry_dir = self.root / RETRY_REQUEST_DIR
        self.dirs = {"new": self.new, "hold": self.hold_dir, "failed": self.failed}
        self.state_dirs = {"new": self.root / STATE_DIR, "hold": self.root / HOLD_STATE_DIR,
                           "failed": self.root / KEPT_STATE_DIR}
        self.state_dir = self.state_dirs["new"]
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"

    def make_relay_dirs(self, held: bool = False) -> None:
        """The relay's (and with held=True the queue tools') directories."""
        dirs = [self.state_dir, self.state_dirs["failed"], self.retry_dir]
        if held:
            dirs += [self.hold_dir, self.state_dirs["hold"]]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True, mode=0o750)

    def name_for(self, env: Envelope) -> str:
        return f"{int(env.received_at)}.{env.qid}.{self._host}"

    # --- writing new mail ---------------------------------------------------------------------

    def publish(self, tmp: Path, name: str) -> str:
        """Move tmp/<name> into new/ without ever replacing a file there (link, then unlink
        tmp); a name that is taken gets a numbered suffix. Returns the name used in new/."""
        target = _link_noreplace(tmp, self.new, name)
        # A crash before this unlink leaves a second link in tmp/: clean_tmp removes it, the
        # file in new/ stays.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return target

    def clean_tmp(self, older_than: float = 0.0) -> int:
        """Remove unacknowledged leftovers in tmp/ (mtime older than `older_than` epoch)."""
        n = 0
        for p in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if older_than == 0.0 or p.stat().st_mtime < older_than:
                    p.unlink()
                    n += 1
        return n

    def write_batch(self, items: list[tuple[Envelope, bytes, bytes]]) -> list[str | Exception]:
        """One group commit: every file written, then all made durable, then each linked into
        new/, then one fsync of new/. A failure fails that item only (a failed syncfs: all).
        On ext4 each file's fsync commits the journal on its own (n + 1 commits a batch, each
        one the fast lane's fsync might wait behind); one syncfs commits once."""
        results: list[str | Exception | None] = [None] * len(items)
        written: list[_Written] = []
        for i, (env, trace, body) in enumerate(items):
            name = self.name_for(env)
            tmp = self.tmp / name
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            except OSError as e:
                results[i] = e
                continue
            try:
                write_all(fd, [envelope_line(env), trace, body])
            except OSError as e:
                os.close(fd)
                self._drop_tmp(tmp)
                results[i] = e
                continue
            written.append((i, fd, tmp, name))
        linked: list[int] = []
        written, fsync_each = self._sync_batch(written, results)
        for i, fd, tmp, name in written:
            try:
                try:
                    if fsync_each:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                results[i] = self.publish(tmp, name)
                linked.append(i)
            except OSError as e:
                self._drop_tmp(tmp)
                results[i] = e
        if linked:
            try:
                fsync_dir(self.new)
            except OSError as e:
                # The links may not be durable: none of them may be acknowledged, and what is
                # not acknowledged must not stay in new/ (the relay would deliver it, and the
                # client's retry would deliver it again).
                for i in linked:
                    with contextlib.suppress(OSError):
                        os.unlink(self.new / str(results[i]))
                    results[i] = e
        return [r if r is not None else OSError("not written") for r in results]

    def _sync_batch(self, written: list[_Written], results: list[str | Exception | None]
                    ) -> tuple[list[_Written], bool]:
        """synced_at_once for a batch: what is left to link into new/, and whether each file
        must still be fsynced. A failed syncfs leaves nothing: every item fails (its
        descriptor closed, its tmp file removed)."""
        try:
            at_once = self.synced_at_once([fd for _, fd, _, _ in written])
        except OSError as e:
            for i, fd, tmp, _ in written:
                os.close(fd)
                self._drop_tmp(tmp)
                results[i] = e
            return [], False
        return written, not at_once

    def synced_at_once(self, fds: Sequence[int]) -> bool:
        """True when one syncfs made these files durable (two or more, spool.batch_sync
        "syncfs"); False when each must still be fsynced (one file, "fsync", no syncfs in
        libc). OSError: the syncfs failed, and which file's writeback did is unknown."""
        if self.batch_sync != "syncfs" or len(fds) < 2:
            return False
        try:
            syncfs(fds[0])
        except OSError as e:
            if e.errno == errno.ENOSYS:
                return False
            raise
        return True

    @staticmethod
    def _drop_tmp(tmp: Path) -> None:
        with contextlib.suppress(OSError):
            tmp.unlink()

    # --- claiming and finishing ---------------------------------------------------------------

    def names(self, where: str = "new") -> set[str]:
        """The spool files in new/, hold/ or failed/ (none if the directory is missing)."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self.dirs[where]) as it:
            return {e.name for e in it if not e.name.startswith(".")}
        return set()

    @contextlib.contextmanager
    def claim(self, where: str, name: str, wait: float = 0.0) -> Iterator[Claim]:
        """<where>/<name> under its exclusive flock, waiting at most `wait` seconds (Busy);
        Gone when it is not (or no longer, once locked) the file linked at that path."""
        path = self.dirs[where] / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Gone(name) from None
        try:
            if not flock_wait(fd, wait, LOCK_POLL):
                raise Busy(name)
            st = os.fstat(fd)
            try:
                same = os.stat(path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if st.st_nlink == 0 or not same:
                raise Gone(name)
            yield Claim(fd, path)
        finally:
            os.close(fd)

    def finish(self, name: str) -> None:
        """Delivered: new/<name> and its relay state go (under the claim)."""
        (self.new / name).unlink()
        fsync_dir(self.new)
        self.drop_state(name)

    def fail(self, name: str, kept: RelayState | None) -> tuple[str, OSError | None]:
        """Bounced: the final state kept (for requeue-failed), then new/<name> moved into
        failed/ without replacing anything there. (name in failed/, the error that kept the
        state from being written: only requeue-failed needs it, the move is done anyway)."""
        src = self.new / name
        kept_dir = self.state_dirs["failed"]
        target, keep_error = name, None
        for k in range(MAX_NAME_TRIES):
            target = name if k == 0 else f"{name}.{k}"
            if not (self.failed / target).exists() and not (kept_dir / target).exists():
                break
        if kept is not None:
            try:
                write_state(kept_dir, target, kept)
            except OSError as e:
                keep_error = e
        target = _link_noreplace(src, self.failed, target)
        fsync_dir(self.failed)
        src.unlink()
        fsync_dir(self.new)
        self.drop_state(name)
        return target, keep_error

    def delete(self, where: str, name: str) -> None:
        """The operator's delete (under the claim): the file and its relay state."""
        (self.dirs[where] / name).unlink()
        fsync_dir(self.dirs[where])
        self.drop_state(name, where)

    def hold(self, claim: Claim, name: str) -> None:
        """new/<name> -> hold/<name> (under the claim): a durable copy into hold/, then the
        unlink from new/, so a relay waiting for the lock sees st_nlink == 0 and skips it (a
        rename would keep the inode linked and that relay would deliver a held message)."""
        tmp = self.hold_dir / f"{TMP_PREFIX}{name}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.lseek(claim.fd, 0, os.SEEK_SET)
            while chunk := os.read(claim.fd, 1 << 20):
                write_all(out, [chunk])
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(tmp, self.hold_dir / name)
        fsync_dir(self.hold_dir)
        if self.has_state(name):
            self.write_state(name, self.read_state(name), "hold")
        (self.new / name).unlink()
        fsync_dir(self.new)
        self.drop_state(name)

    def move_to_new(self, where: str, name: str, reset_failed: bool) -> None:
        """hold/ or failed/ -> new/ (under the claim): the relay state first (next_at 0; with
        reset_failed the failed recipients and attempts are cleared), then a no-replace link
        into new/ (FileExistsError when new/<name> is taken), then the old name unlinked."""
        if (self.new / name).exists():
            raise FileExistsError(errno.EEXIST, "already in new/", str(self.new / name))
        sdir = self.state_dirs[where]
        if (sdir / name).exists():
            state = read_state(sdir, name)
            state.next_at = 0.0
            if reset_failed:
                state.failed, state.attempts = [], 0
            self.write_state(name, state)
            (sdir / name).unlink()
            fsync_dir(sdir)
        os.link(self.dirs[where] / name, self.new / name)
        fsync_dir(self.new)
        (self.dirs[where] / name).unlink()
        fsync_dir(self.dirs[where])

    # --- relay state --------------------------------------------------------------------------

    def read_state(self, name: str, where: str = "new") -> RelayState:
        return read_state(self.state_dirs[where], name)

    def write_state(self, name: str, state: RelayState, where: str = "new") -> None:
        write_state(self.state_dirs[where], name, state)

    def has_state(self, name: str, where: str = "new") -> bool:
        return (self.state_dirs[where] / name).exists()

    def drop_state(self, name: str, where: str = "new") -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.state_dirs[where] / name).unlink()

    def state_names(self) -> set[str]:
        """Names with a relay state file in relay/ (tmp leftovers included)."""
        with os.scandir(self.state_dir) as it:
            return {e.name for e in it}

    def cleanup_states(self) -> int:
        """Remove state files whose spool file is gone, and tmp leftovers nobody is writing.
        At relay start only. During a reload the old relay is still delivering: it writes a
        message's state (tmp + rename) while holding that spool file's flock, so a tmp file
        is removed only under the lock taken here, and never while another relay holds it."""
        n = 0
        for p in self.state_dir.iterdir():
            tmp = p.name.startswith(TMP_PREFIX)
            name = p.name[len(TMP_PREFIX):] if tmp else p.name
            try:
                fd = os.open(self.new / name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1                          # finished: its state is stale
            except OSError:
                continue
            try:
                if fd >= 0:
                    if not tmp:
                        continue                 # still waiting: keep its schedule
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue                 # another relay is writing it right now
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
            finally:
                if fd >= 0:
                    os.close(fd)
        return n

    # --- retry requests -----------------------------------------------------------------------

    def request_retry(self, name: str) -> None:
        fd = os.open(self.retry_dir / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.close(fd)

    def take_retry_requests(self) -> list[str]:
        """The names asked for (each request removed as it is taken)."""
        try:
            with os.scandir(self.retry_dir) as it:
                names = [e.name for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.retry_dir / name).unlink()
        return names
