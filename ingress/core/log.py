"""JSON-lines logging (orjson) for every process, one object per line on stderr.

API:
    setup(level, proc)                  once per process, after spawn (sets the process title)
    event(name, level="info", /, **fields)
                                        one structured line: {"ts","lvl","proc","pid","event",...}
                                        (name and level positional, so any key is a field)
    get() -> logging.Logger             for exceptions (log.exception(...) keeps the traceback in
                                        the log line's "exc" field, never in an SMTP reply)
    Throttle(every, max_keys).due(key, now) -> int | None
                                        at most one line per key per `every` seconds, for
                                        lines a client can make us write: None (leave it out)
                                        or how many were left out since the last (pure clock)

aiosmtpd's own logger ("mail.log") logs every command at INFO; it is held at WARNING so the
acceptors' hot path does not pay for it. Failure modes: a value orjson cannot encode is logged
with its repr(); a broken stderr (EPIPE) drops the line rather than raising into the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, TextIO

import orjson
import setproctitle

_LOGGER = logging.getLogger("smtp_ingress")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_proc = "main"
_pid = os.getpid()
_min_level = logging.INFO


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6), "lvl": record.levelname.lower(), "proc": _proc,
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            doc["event"] = record.getMessage()
            doc.update(fields)
        else:
            doc["event"] = "log"
            doc["logger"] = record.name
            doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=repr).decode()


class _SafeHandler(logging.StreamHandler[TextIO]):
    def handleError(self, record: logging.LogRecord) -> None:
        pass   # never let logging raise into mail handling


def setup(level: str, proc: str) -> None:
    """JSON logging for this process, named `proc`; also its title in ps/top
    ("smtp-ingress: acceptor-0"), so an operator can tell the processes apart."""
    global _proc, _pid, _min_level
    _proc, _pid = proc, os.getpid()
    _min_level = _LEVELS.get(level, logging.INFO)
    setproctitle.setproctitle(f"smtp-ingress: {proc}")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _SafeHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime


def event(name: str, level: str = "info", /, **fields: Any) -> None:
    """One structured line, written straight to stderr (fd 2) with a single write(2): this is
    on the acceptors' per-message path, where the logging module's records, locks and
    formatters cost more than the line itself."""
    if _LEVELS.get(level, logging.INFO) < _min_level:
        return
    doc = {"ts": round(time.time(), 6), "lvl": level, "proc": _proc, "pid": _pid,
           "event": name, **fields}
    with contextlib.suppress(OSError):     # a broken stderr drops the line, never the mail
        os.write(2, orjson.dumps(doc, default=repr) + b"\n")


def get() -> logging.Logger:
    return _LOGGER


class Throttle:
    """At most one log line per key per `every` seconds (the caller logs when due() is not
    None, saying how many it left out). Holds at most `max_keys` keys: when full, a line that
    is due forgets them all (an attacker choosing keys cannot grow it)."""

    __slots__ = ("_seen", "every", "max_keys")

    def __init__(self, every: float, max_keys: int = 1024) -> None:
        self.every, self.max_keys = every, max(1, max_keys)
        self._seen: dict[str, tuple[float, int]] = {}   # key -> (last line, left out since)

    def due(self, key: str, now: float) -> int | None:
        last, quiet = self._seen.get(key, (float("-inf"), 0))
        if now - last >= self.every:
            if len(self._seen) >= self.max_keys:
                self._seen.clear()
            self._seen[key] = (now, 0)
            return quiet
        self._seen[key] = (last, quiet + 1)
        return None
