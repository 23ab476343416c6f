"""Durable Maildir-style spool: the only code that writes accepted mail to disk.

Layout under the spool root: tmp/ (being written), new/ (durable, waiting for the relay or the
reader), cur/ (Maildir compatibility; unused by us), failed/ (bounced by the relay).

A spool file is one RFC 5322 message whose first line carries the envelope:

    X-Ingress-Envelope: {"v":1,"qid":...,"mail_from":...,"rcpts":[...],...}\\r\\n
    Received: ... (our trace headers, each CRLF-terminated)
    <the client's message bytes, exactly as received after dot-unstuffing>

API:
    Spool(root).write_batch([(envelope, trace, body), ...]) -> list[str | Exception]
        Group commit: every file is written to tmp/ and fsync'd, moved into new/ with a
        no-replace link (a name already taken there gets a ".N" suffix: nothing in new/ is ever
        overwritten), then new/ is fsync'd once for the whole batch. Only after that does any
        item count as written; an item that failed gets its exception (its tmp file is
        removed), the others their names (the qid stays the second dot-separated field).
    read(path) -> SpoolEntry(envelope dict, message bytes)

Failure modes: OSError from the disk is returned per item (the worker NACKs it: the client gets
451). A short write is continued until every byte is written; one that makes no progress is an
ENOSPC error for that item, never a truncated file in new/. A failed fsync of new/ fails the
whole batch and removes its files from new/. A crash between the link and the directory fsync
can lose the link; that message was not yet acknowledged, so the client got no 250 for it.
Files left in tmp/ by a crash are unacknowledged (or, after a crash between link and unlink, a
second name of a file in new/) and are removed by `clean_tmp()` at worker start.
Limit: the spool filesystem must support hard links (every local Linux filesystem does).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ingress.core.wire import Envelope

ENVELOPE_HEADER = b"X-Ingress-Envelope: "
SPOOL_FORMAT = 1
MAX_NAME_TRIES = 100        # names tried in new/ before a write fails (a collision is rare)


@dataclass(frozen=True)
class SpoolEntry:
    envelope: dict[str, Any]
    message: bytes          # trace headers + client bytes (the envelope line removed)


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


def _write_all(fd: int, data: list[bytes]) -> None:
    """Write every byte of `data` to `fd` or raise OSError.

    writev may write less than asked (a filling disk, a signal): the rest is written in a loop,
    each call's count checked. A call that writes nothing is an error (ENOSPC), never success.
    """
    total = sum(map(len, data))
    written = os.writev(fd, data)
    if written == total:
        return
    rest = memoryview(b"".join(data))[written:]
    while rest:
        n = os.write(fd, rest)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write: no progress", None)
        rest = rest[n:]


class Spool:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.tmp, self.new = self.root / "tmp", self.root / "new"
        self.cur, self.failed = self.root / "cur", self.root / "failed"
        for d in (self.tmp, self.new, self.cur, self.failed):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"

    def name_for(self, env: Envelope) -> str:
        return f"{int(env.received_at)}.{env.qid}.{self._host}"

    def _publish(self, tmp: Path, name: str) -> str:
        """Move tmp/<name> into new/ without ever replacing a file there (link, then unlink
        tmp); a name that is taken gets a numbered suffix. Returns the name used in new/."""
        for k in range(MAX_NAME_TRIES):
            target = name if k == 0 else f"{name}.{k}"
            try:
                os.link(tmp, self.new / target)
            except FileExistsError:
                continue
            # A crash before this unlink leaves a second link in tmp/: clean_tmp removes it,
            # the file in new/ stays.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            return target
        raise FileExistsError(errno.EEXIST, "no free name in new/", str(self.new / name))

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
        results: list[str | Exception] = []
        linked: list[int] = []
        for i, (env, trace, body) in enumerate(items):
            name = self.name_for(env)
            tmp = self.tmp / name
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
                try:
                    _write_all(fd, [envelope_line(env), trace, body])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                name = self._publish(tmp, name)
                results.append(name)
                linked.append(i)
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                results.append(e)
        if linked:
            try:
                dfd = os.open(self.new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as e:
                # The links may not be durable: none of them may be acknowledged, and what is
                # not acknowledged must not stay in new/ (the relay would deliver it, and the
                # client's retry would deliver it again).
                for i in linked:
                    with contextlib.suppress(OSError):
                        os.unlink(self.new / str(results[i]))
                    results[i] = e
        return results
