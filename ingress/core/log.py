"""JSON-lines logging (orjson) for every process, one object per line on stderr.

API:
    setup(level, proc)                  once per process, after spawn (sets the process title)
    event(name, level="info", /, **fields)
                                        one structured line: {"ts","lvl","proc","pid","event",...}
                                        (name and level positional, so any key is a field)
    refused(name, peer, /, *, stage, code, reason="", port=0, level="info", **fields) -> bool
                                        the line for a refusal or shed of a client (every one
                                        goes through here): `peer` (and `port` when known),
                                        `stage` (connect, proxy, tls, greet, banner, helo, ehlo,
                                        mail, rcpt, data, end_of_data, session, command), `code`
                                        (the SMTP reply code, or "close" / "alert" when none can
                                        be sent) and `reason` (a token; default: `name`),
                                        throttled like throttled(); True when written
    throttled(name, peer, level="info", /, **fields) -> bool
                                        any other line a client can make us write as often as
                                        it likes (over-share, hand-backs, tarpit delays): at most
                                        throttle_lines lines per (name, client network: IPv4 /24,
                                        IPv6 /64) per throttle_interval, and throttle_total per
                                        name in the process; the first line after a gap carries
                                        `not_logged` (lines of that name and network left out
                                        since its last) and, when the process-wide cap left any
                                        out, `not_logged_total` (lines of that name, any network)
    configure_throttle(interval, lines, total)
                                        log.throttle_* of the config (child.start); 0 = no limit
    get() -> logging.Logger             for exceptions (log.exception(...) keeps the traceback in
                                        the log line's "exc" field, never in an SMTP reply)
    Throttle(every, max_keys, burst=1).due(key, now) -> int | None
                                        at most `burst` lines per key per `every`-second window,
                                        for lines a client can make us write: None (leave it
                                        out) or how many were left out since the last (pure
                                        clock). The one throttle of every such line.

aiosmtpd's own logger ("mail.log") logs every command at INFO; it is held at WARNING so the
acceptors' hot path does not pay for it. Failure modes: a value orjson cannot encode is logged
with its repr(); a broken stderr (EPIPE) drops the line rather than raising into the caller.
Limits: the client throttle holds at most THROTTLE_KEYS (name, network) keys (forgotten all at
once when full: then the process-wide cap still bounds the lines); a flood of one refusal costs
at most throttle_total lines per throttle_interval per process however many networks send it.
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

from ingress.core.addr import net_key

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
    """At most `burst` log lines per key per `every`-second window (the caller logs when due()
    is not None, saying how many it left out). Holds at most `max_keys` keys: when full, a new
    key that is due forgets them all (an attacker choosing keys cannot grow it)."""

    __slots__ = ("_seen", "burst", "every", "max_keys")

    def __init__(self, every: float, max_keys: int = 1024, burst: int = 1) -> None:
        self.every, self.max_keys, self.burst = every, max(1, max_keys), max(1, burst)
        # key -> (the window's first line, lines in it, left out since the last line)
        self._seen: dict[str, tuple[float, int, int]] = {}

    def due(self, key: str, now: float) -> int | None:
        start, lines, quiet = self._seen.get(key, (float("-inf"), 0, 0))
        if now - start >= self.every:
            if len(self._seen) >= self.max_keys and key not in self._seen:
                self._seen.clear()
            self._seen[key] = (now, 1, 0)
            return quiet
        if lines < self.burst:
            self._seen[key] = (start, lines + 1, 0)
            return quiet
        self._seen[key] = (start, lines, quiet + 1)
        return None


# --- lines a client can make us write: refusals, sheds, hand-backs ---------------------------

THROTTLE_KEYS = 4096          # (name, network) keys of the per-network throttle
THROTTLE_NAMES = 256          # names of the process-wide cap (the code has a few dozen)


class _ClientLines:
    """The per-(name, network) throttle and the per-name process-wide cap of throttled()."""

    def __init__(self, interval: float, lines: int, total: int) -> None:
        self.per_net = Throttle(interval, THROTTLE_KEYS, lines) if lines > 0 else None
        self.per_name = Throttle(interval, THROTTLE_NAMES, total) if total > 0 else None

    def due(self, name: str, peer: str, now: float) -> dict[str, int] | None:
        """None: leave this line out; else the not_logged fields it carries."""
        out: dict[str, int] = {}
        if self.per_net is not None:
            quiet = self.per_net.due(f"{name} {net_key(peer)}", now)
            if quiet is None:
                return None
            out["not_logged"] = quiet
        if self.per_name is not None:
            total = self.per_name.due(name, now)
            if total is None:
                return None
            if total:
                out["not_logged_total"] = total
        return out


_client_lines = _ClientLines(60.0, 5, 300)


def configure_throttle(interval: float, lines: int, total: int) -> None:
    """log.throttle_interval, log.throttle_lines, log.throttle_total (0: no limit)."""
    global _client_lines
    _client_lines = _ClientLines(interval, lines, total)


def throttled(name: str, peer: str, level: str = "info", /, **fields: Any) -> bool:
    """One line a client can make us write at will, throttled per (name, client network) and
    per name in the process (see the module docstring). True when written."""
    if _LEVELS.get(level, logging.INFO) < _min_level:
        return False
    extra = _client_lines.due(name, peer, time.monotonic())
    if extra is None:
        return False
    event(name, level, peer=peer, **fields, **extra)
    return True


def refused(name: str, peer: str, /, *, stage: str, code: str | int, reason: str = "",
            port: int = 0, level: str = "info", **fields: Any) -> bool:
    """The line for one refusal or shed of a client: who (`peer`, `port`), where (`stage`),
    what it was told (`code`) and why (`reason`, default `name`); throttled (throttled())."""
    if port:
        fields["port"] = port
    return throttled(name, peer, level, stage=stage, code=str(code), reason=reason or name,
                     **fields)
