"""The recipient-callout cache on disk: its 2xx and 5xx answers outlive the acceptor process, so
a reload (SIGHUP replaces every acceptor) or a restart during a downstream outage does not turn
mail for recipients the downstream already confirmed into 450s (issue 19 item 9).

API:
    file_name(ident) -> str             "rcpt-verify.<ident>.json"; ident "a<i>" for a port-25
                                        acceptor, "f<i>" a fast one, "m<i>" an mTLS one
    encode(expiry, answers, now, wall, downstream, max_bytes) -> bytes   (pure) the file
    decode(data, downstream, wall) -> (entries, bad)   (pure) [(key, answer, seconds left)]
                                        and how many entries were malformed; ValueError when
                                        the file as a whole is not ours (not JSON, another
                                        version or downstream)
    VerifyStore(verifier, state_dir, ident, idents, downstream)
        .load() -> int                  at start: every acceptor's file of this host (`idents`,
                                        from the config) into the verifier; logged as
                                        verify_cache_loaded
        await .run()                    saves this process's file while the cache changes
        .save() -> bool                 one save now (shutdown; tests)
        .unsaved                        answers cached since the last save that was written

Files: one per acceptor, written only by the acceptor of that slot (old and new one during a
reload: an flock on rcpt-verify.lock orders their writes), atomically (fsutil.atomic_write,
mode 0600) at most every SAVE_INTERVAL seconds while new answers come in (stretched to
SAVE_SPREAD times the last save's cost, so a huge cache is never a steady load), and once more
at shutdown. A retiring acceptor (replaced by a reload) stops saving at once: its replacement
owns the file. Each acceptor reads every acceptor's file at start, so after a reload every
acceptor knows every answer any of them had (before: only its own).

The file: {"v": 1, "downstream": "host:port", "saved_at": wall time, "entries": [[key, "ok" |
"unknown", expires (wall time)], ...]}, positive answers first (when the byte bound cuts, it
cuts negative answers first).

The attacker's view: the keys are recipient addresses the network chose (the domain is ours,
the local part anything), so the file is treated as untrusted input on the way back:
- read with fsutil.read_own: a regular file (a symlink is not followed, a FIFO cannot block),
  owned by our uid, not writable by group or others, at most FILE_MAX_BYTES (checked before
  reading); the files of one start together at most LOAD_MAX_BYTES (the rest are skipped);
- every entry is checked (a list of 3, a printable key of at most MAX_KEY_CHARS in its cache
  form, an answer of 2xx or 5xx, a finite expiry); a malformed one is skipped and counted;
- an answer is kept for at most its TTL from now, whatever the file says, and only if the file
  names this downstream; the cache's own bound (smtp.verify_cache_size) holds, the answers that
  expire soonest giving way;
- anything wrong is a log line (verify_cache_refused, verify_cache_load_failed) and an empty
  (or partial) cache: never a crash, and the start is bounded by the byte limits.

Failure modes: a save that fails (disk, the lock not free within LOCK_WAIT) is logged
(verify_cache_save_failed) and retried at the next interval; the answers stay in memory.
Limits: an answer got in the last SAVE_INTERVAL before a reload, or by the old acceptor while
it drains, is not kept (the next RCPT for it makes a callout); unsure (4xx) answers are never
kept; the byte and count bounds below. The event loop pays a dict copy per save and encodes in
chunks of ENCODE_CHUNK entries with a yield between them; the write and fsync run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import orjson

from ingress.core import log
from ingress.core.fsutil import atomic_write, flock_wait, read_own
from ingress.edge.rcpt_verify import PERSISTED, Answer, RecipientVerifier, cache_key

VERSION = 1
FILE_PREFIX = "rcpt-verify."
LOCK_NAME = "rcpt-verify.lock"
FILE_MAX_BYTES = 8 * 1024 * 1024       # one acceptor's file
LOAD_MAX_BYTES = 32 * 1024 * 1024      # every file one start reads together
MAX_KEY_CHARS = 512                    # an address longer than this is not kept
SAVE_INTERVAL = 1.0                    # seconds between two saves of a changing cache
SAVE_SPREAD = 50                       # ... and at least this many times the last save's cost
ENCODE_CHUNK = 2048                    # entries encoded between two yields to the event loop
LOCK_WAIT = 2.0                        # seconds to wait for rcpt-verify.lock, then skip a save

_ANSWERS = {a.value: a for a in PERSISTED}


def file_name(ident: str) -> str:
    return f"{FILE_PREFIX}{ident}.json"


def _header(downstream: str, wall: float) -> bytes:
    head = orjson.dumps({"v": VERSION, "downstream": downstream, "saved_at": wall})
    return head[:-1] + b',"entries":['


def _chunks(expiry: dict[str, float], answers: dict[str, Answer], now: float,
            wall: float) -> Iterator[list[list[Any]]]:
    """The entries to save, positive answers first, in chunks of ENCODE_CHUNK."""
    chunk: list[list[Any]] = []
    for want in PERSISTED:
        for key, exp in expiry.items():
            if exp <= now or answers.get(key) is not want or len(key) > MAX_KEY_CHARS:
                continue
            chunk.append([key, want.value, wall + (exp - now)])
            if len(chunk) >= ENCODE_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _encode_chunk(chunk: list[list[Any]]) -> list[bytes]:
    """One chunk as JSON array elements; an entry orjson refuses (a key with a lone
    surrogate) is left out."""
    try:
        return [orjson.dumps(chunk)[1:-1]]
    except orjson.JSONEncodeError:
        out = []
        for entry in chunk:
            with contextlib.suppress(orjson.JSONEncodeError):
                out.append(orjson.dumps(entry))
        return out


def _fits(parts: list[bytes], room: int) -> tuple[list[bytes], bool]:
    """The parts (comma-joined) within `room` bytes, and whether something did not fit; a part
    that does not fit whole is split into its entries, as many as fit."""
    out: list[bytes] = []
    for part in parts:
        if len(part) + 1 <= room:
            out.append(part)
            room -= len(part) + 1
            continue
        for entry in orjson.loads(b"[" + part + b"]"):
            b = orjson.dumps(entry)
            if len(b) + 1 > room:
                return out, True
            out.append(b)
            room -= len(b) + 1
    return out, False


def _encode_steps(expiry: dict[str, float], answers: dict[str, Answer], now: float,
                  wall: float, downstream: str, max_bytes: int) -> Generator[None, None, bytes]:
    """encode() one chunk per step (the saver yields to the event loop between them)."""
    head = _header(downstream, wall)
    room = max_bytes - len(head) - 2
    body: list[bytes] = []
    for chunk in _chunks(expiry, answers, now, wall):
        parts, full = _fits(_encode_chunk(chunk), room)
        body += parts
        room -= sum(len(p) + 1 for p in parts)
        if full:
            break
        yield
    return head + b",".join(body) + b"]}"


def encode(expiry: dict[str, float], answers: dict[str, Answer], now: float, wall: float,
           downstream: str, max_bytes: int = FILE_MAX_BYTES) -> bytes:
    """The file for a cache snapshot (RecipientVerifier.export): `now` on the cache's timer,
    `wall` the wall clock at that moment. At most `max_bytes` (positive answers first). Pure."""
    steps = _encode_steps(expiry, answers, now, wall, downstream, max_bytes)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            data: bytes = done.value
            return data


def _entry(e: Any, wall: float) -> tuple[str, Answer, float] | None:
    """(key, answer, seconds left) of a well-formed entry, None for a malformed one. An expired
    entry is well-formed with 0 left."""
    if not isinstance(e, list) or len(e) != 3:
        return None
    key, answer, exp = e
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS or not key.isprintable() \
            or cache_key(key) != key:
        return None
    if not isinstance(answer, str) or answer not in _ANSWERS:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return key, _ANSWERS[answer], max(0.0, float(exp) - wall)


def decode(data: bytes, downstream: str, wall: float) -> tuple[list[tuple[str, Answer, float]],
                                                               int]:
    """A file's entries that have time left, and how many entries were malformed. Pure.
    ValueError: not this format, or saved for another downstream."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ValueError(f"not a version {VERSION} callout cache file")
    if doc.get("downstream") != downstream:
        raise ValueError(f"saved for downstream {str(doc.get('downstream'))[:100]!r}, not "
                         f"{downstream!r}")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise ValueError("no list of entries")
    out, bad = [], 0
    for item in entries:
        got = _entry(item, wall)
        if got is None:
            bad += 1
        elif got[2] > 0:
            out.append(got)
    return out, bad


def _locked_write(lock: Path, path: Path, data: bytes) -> None:
    """atomic_write under an exclusive flock of `lock` (another acceptor of the same slot, the
    old or the new one of a reload, may save too), waiting at most LOCK_WAIT."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if not flock_wait(fd, LOCK_WAIT, 0.01):
            raise TimeoutError(f"{lock} still locked after {LOCK_WAIT} s")
        atomic_write(path, data, mode=0o600)
    finally:
        os.close(fd)            # releases the lock


class VerifyStore:
    def __init__(self, verifier: RecipientVerifier, state_dir: Path, ident: str,
                 idents: list[str], downstream: str) -> None:
        self.verifier = verifier
        self.dir = state_dir
        self.path = state_dir / file_name(ident)
        self.lock = state_dir / LOCK_NAME
        self.idents = idents
        self.downstream = downstream
        self.cost = 0.0             # seconds the last save took on the event loop
        self.written = verifier.changes     # the verifier's count the file on disk holds

    @property
    def unsaved(self) -> bool:
        return self.verifier.changes != self.written

    def load(self) -> int:
        """Every acceptor's file into the verifier (the latest expiry of a key wins); logged."""
        wall, budget = time.time(), LOAD_MAX_BYTES
        merged: dict[str, tuple[Answer, float]] = {}
        files = refused = bad = 0
        for ident in self.idents:
            path = self.dir / file_name(ident)
            try:
                data = read_own(path, min(FILE_MAX_BYTES, budget))
                entries, nbad = decode(data, self.downstream, wall)
            except FileNotFoundError:
                continue
            except ValueError as e:
                refused += 1
                log.event("verify_cache_refused", "warning", path=str(path), error=str(e)[:300])
                continue
            budget -= len(data)
            files += 1
            bad += nbad
            for key, answer, left in entries:
                if left > merged.get(key, (answer, 0.0))[1]:
                    merged[key] = (answer, left)
        kept = self.verifier.preload((k, a, left) for k, (a, left) in merged.items())
        log.event("verify_cache_loaded", entries=kept, files=files, refused=refused,
                  malformed=bad, offered=len(merged))
        return kept

    async def _snapshot(self) -> bytes:
        """The file's bytes, encoded a chunk at a time with a yield to the loop between."""
        t0 = time.monotonic()
        expiry, answers, now = self.verifier.export()
        steps = _encode_steps(expiry, answers, now, time.time(), self.downstream,
                              FILE_MAX_BYTES)
        spent = time.monotonic() - t0
        while True:
            t1 = time.monotonic()
            try:
                next(steps)
            except StopIteration as done:
                data: bytes = done.value
                break
            finally:
                spent += time.monotonic() - t1
            await asyncio.sleep(0)
        self.cost = spent
        return data

    def save(self) -> bool:
        """Save now, on this thread (shutdown): True when written."""
        changes = self.verifier.changes
        expiry, answers, now = self.verifier.export()
        try:
            _locked_write(self.lock, self.path,
                          encode(expiry, answers, now, time.time(), self.downstream))
        except (OSError, TimeoutError) as e:
            log.event("verify_cache_save_failed", "error", path=str(self.path), error=str(e))
            return False
        self.written = changes
        return True

    async def run(self) -> None:
        """Save this process's file whenever the cache got new answers, at most every
        SAVE_INTERVAL (or SAVE_SPREAD times the last save's event-loop cost)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(SAVE_INTERVAL, SAVE_SPREAD * self.cost))
            if not self.unsaved:
                continue
            changes = self.verifier.changes
            data = await self._snapshot()
            try:
                await loop.run_in_executor(None, _locked_write, self.lock, self.path, data)
            except (OSError, TimeoutError) as e:
                log.event("verify_cache_save_failed", "error", path=str(self.path),
                          error=str(e))
                continue
            self.written = changes
