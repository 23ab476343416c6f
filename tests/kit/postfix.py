"""A private, throw-away Postfix instance on a loopback port, for benchmarks and relay tests.

Purpose
    Run the Debian ``postfix`` package as a *second*, fully separate instance: its own
    config_directory, queue_directory, data_directory and log file, all under one ``workdir``. It
    never reads or touches ``/etc/postfix/main.cf``, the system queue (``/var/spool/postfix``) or
    a system Postfix that may be running, and it listens on exactly one socket:
    ``127.0.0.1:<port>`` (no port 25, no other inet listener). Postfix keeps its *default* limits
    (``default_process_limit = 100`` and so on): the point of the benchmark is Postfix as shipped.

    Two delivery modes:

    ``delivery="discard"``
        Mail for ``accept_domains`` is accepted into the queue (cleanup writes and fsyncs the queue
        file as usual) and then delivered by discard(8). This is the throughput peer.
    ``delivery="maildir"``
        Mail for ``accept_domains`` is delivered by virtual(8) as Maildir files under
        ``maildir_root/<domain>/new/`` (one catch-all Maildir per domain; virtual(8) prepends
        ``Return-Path:``, ``X-Original-To:``, ``Delivered-To: <recipient>``, and smtpd a
        ``Received:`` header; nothing else is rewritten). The files are owned by
        ``delivery_user``. This is the downstream MTA for relay tests.

    Any other recipient domain is refused at RCPT (``smtpd_relay_restrictions =
    reject_unauth_destination``, 554 5.7.1), from every client including 127.0.0.0/8: the instance
    never sends mail anywhere (``default_transport`` and ``local_transport`` are ``error:``).

API
    ``PostfixInstance(workdir, port, *, accept_domains=("example.test",), delivery="discard",
    maildir_root=None, extra_main_cf=None, host="127.0.0.1", delivery_user="nobody",
    start_timeout=20.0, stop_timeout=15.0)``
        ``.start()`` / ``.stop()`` (idempotent), ``.reload()``, context manager, ``.port``,
        ``.host``, ``.address`` (``"127.0.0.1:port"``), ``.running``, ``.pids()`` (master +
        children), ``.master_pid()``, ``.queue_size()``, ``.wait_queue_empty(timeout)``,
        ``.maildir_messages()``, ``.log_tail(lines)``, ``.postconf(name)``, ``.version()``,
        ``.main_cf()`` / ``.master_cf()`` (the generated config, pure).
        TLS: put ``smtpd_tls_*`` settings (cert, key, security level) in ``extra_main_cf``;
        master.cf then also runs tlsmgr (smtpd disables TLS without its entropy).
    ``check_available()`` raises ``PostfixUnavailable`` unless root with Postfix installed.
    ``free_port(host)`` returns a currently free TCP port on a loopback address.

Failure modes
    ``PostfixUnavailable`` (a RuntimeError): not root, or the postfix binaries / the ``postfix``
    user / the ``postdrop`` group are missing. Tests turn it into a skip.
    ``PostfixError`` (a RuntimeError): ``postfix check``/``start`` failed, the port is already
    taken by someone else, the port did not answer ``220`` before ``start_timeout``, or the master
    did not exit on ``stop``. Its message carries the tail of the instance's maillog.
    ``ValueError``: bad arguments (non-loopback host, unknown delivery, workdir not traversable by
    the ``postfix`` user or maildir_root not traversable by the delivery user -- e.g. under a 0700
    pytest tmp_path --, newline in an extra_main_cf value, whitespace/','/'$' in a path).

Limits
    Linux only (reads ``/proc``). Must run as root (``postfix start`` needs it). Every wait has a
    deadline; ``stop()`` uses ``postfix -c CONF stop``, waits, and as a last resort SIGKILLs the
    master by the PID in its own pid file, and then any leftover child of that master, after
    checking each process's ``MAIL_CONFIG`` is this instance's config directory. It never uses
    pkill/killall. An instance left running at interpreter exit is stopped by an atexit hook.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

from ingress.core import procs

__all__ = [
    "POSTFIX",
    "PostfixError",
    "PostfixInstance",
    "PostfixUnavailable",
    "check_available",
    "free_port",
]

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
DAEMON_DIR = "/usr/lib/postfix/sbin"
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
_CMD_TIMEOUT = 60.0  # any single postfix/postconf command

Delivery = Literal["discard", "maildir"]


class PostfixUnavailable(RuntimeError):
    """Postfix cannot be run here (not root, or not installed). Tests should skip."""


class PostfixError(RuntimeError):
    """The private instance failed to check, start, answer or stop."""


def check_available() -> None:
    """Raise PostfixUnavailable unless a private Postfix instance can be started here."""
    if os.name != "posix" or not Path("/proc/self").exists():
        raise PostfixUnavailable("a private Postfix instance needs Linux (/proc)")
    if os.geteuid() != 0:
        raise PostfixUnavailable("a private Postfix instance must be started as root")
    for path in (POSTFIX, POSTCONF, f"{DAEMON_DIR}/master", f"{DAEMON_DIR}/smtpd"):
        if not os.access(path, os.X_OK):
            raise PostfixUnavailable(
                f"Postfix is not installed ({path} missing); apt-get install postfix"
            )
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError as exc:
        raise PostfixUnavailable(f"Postfix user/group missing: {exc}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (racy by nature; retry on clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def smtp_banner(host: str, port: int, timeout: float = 3.0) -> str | None:
    """Connect, read the first reply line, say QUIT. None if nothing usable arrived in time."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
                s.recv(512)
            return data.decode("latin-1").strip() or None
    except OSError:
        return None


_pid_alive = procs.alive            # a zombie is not alive for our purposes
_proc_env = procs.environ


_SAFE_VALUE = re.compile(r"^[^\n\r]*$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class PostfixInstance:
    """One private Postfix instance under ``workdir``, listening on ``host:port`` only."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        accept_domains: Iterable[str] = ("example.test",),
        delivery: Delivery = "discard",
        maildir_root: Path | None = None,
        extra_main_cf: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        delivery_user: str = "nobody",
        start_timeout: float = 20.0,
        stop_timeout: float = 15.0,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).version != 4:
            raise ValueError(f"host must be an IPv4 loopback address, not {host!r}")
        if not 0 < int(port) < 65536:
            raise ValueError(f"bad port {port!r}")
        domains = tuple(d.strip().lower().rstrip(".") for d in accept_domains)
        if not domains or not all(_DOMAIN.match(d) for d in domains):
            raise ValueError(f"accept_domains must be plain domain names, got {accept_domains!r}")
        if delivery not in ("discard", "maildir"):
            raise ValueError(f"delivery must be 'discard' or 'maildir', not {delivery!r}")
        if delivery == "maildir" and maildir_root is None:
            raise ValueError("delivery='maildir' needs maildir_root")
        extra = dict(extra_main_cf or {})
        for key, value in extra.items():
            if not re.fullmatch(r"[A-Za-z0-9_]+", key) or not _SAFE_VALUE.match(str(value)):
                raise ValueError(f"bad extra_main_cf entry {key!r} = {value!r}")

        self.workdir = Path(workdir).absolute()
        for p in (self.workdir, maildir_root):
            if p is not None and re.search(r"[\s,$\\]", str(Path(p).absolute())):
                raise ValueError(f"path {p} must not contain whitespace, ',', '$' or '\\' "
                                 "(main.cf would mangle it)")
        self.host = host
        self.port = int(port)
        self.accept_domains = domains
        self.delivery: Delivery = delivery
        self.maildir_root = Path(maildir_root).absolute() if maildir_root is not None else None
        self.extra_main_cf = {k: str(v) for k, v in extra.items()}
        self.delivery_user = delivery_user
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.maillog = self.workdir / "maillog"
        self._started = False
        self._master_pid: int | None = None

    # ------------------------------------------------------------------ config (pure)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _delivery_ids(self) -> tuple[int, int]:
        try:
            pw = pwd.getpwnam(self.delivery_user)
        except KeyError:
            pw = pwd.getpwnam(MAIL_OWNER)
        return pw.pw_uid, pw.pw_gid

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings this instance runs with (extra_main_cf applied last)."""
        domains = ", ".join(self.accept_domains)
        cf: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
            "myhostname": "bench-postfix.localdomain",
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Never relay anywhere, not even for mynetworks: only accept_domains are accepted.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_banner": "$myhostname ESMTP Postfix (bench instance)",
            "default_transport": "error:5.7.1 outbound delivery disabled on this bench instance",
            "local_transport": "error:5.1.1 no local delivery on this bench instance",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.workdir}",
        }
        if self.delivery == "discard":
            cf.update({
                "relay_domains": domains,
                "relay_recipient_maps": "",
                "relay_transport": "discard:bench instance discards",
            })
        else:
            assert self.maildir_root is not None
            uid, gid = self._delivery_ids()
            cf.update({
                "relay_domains": "",
                "virtual_mailbox_domains": domains,
                "virtual_mailbox_base": str(self.maildir_root),
                "virtual_mailbox_maps": f"regexp:{self.config_dir / 'virtual_mailbox.regexp'}",
                "virtual_uid_maps": f"static:{uid}",
                "virtual_gid_maps": f"static:{gid}",
                "virtual_minimum_uid": str(min(100, uid)),
                # Downstream for relay tests: do not invent Message-Id/Date/From for loopback
                # clients, so only Received/Return-Path/Delivered-To/X-Original-To are added.
                "local_header_rewrite_clients": "",
            })
        cf.update(self.extra_main_cf)
        return cf

    def master_cf(self) -> str:
        """master.cf: one inet service (smtpd on host:port), the internal services, no chroot."""
        rows = [
            (f"{self.address}", "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("local", "unix", "-", "n", "n", "-", "-", "local"),
            ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        if any(k.startswith(("smtpd_tls_", "smtp_tls_")) for k in self.extra_main_cf):
            # TLS settings in extra_main_cf: smtpd needs tlsmgr for its entropy (without it,
            # "no entropy for TLS key generation: disabling TLS support").
            rows.append(("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"))
        head = "# Generated by tests/kit/postfix.py: private bench instance, loopback only.\n"
        return head + "".join("{:<22} {:<10} {:<3} {:<3} {:<3} {:<6} {:<3} {}\n".format(*r)
                              for r in rows)

    def _virtual_regexp(self) -> str:
        # One catch-all Maildir per accepted domain (trailing slash = Maildir). virtual(8) forbids
        # $n substitution in virtual_mailbox_maps, so per-recipient boxes would need a fixed list;
        # the recipient is in the Delivered-To: header virtual(8) prepends.
        lines = [f"/@{re.escape(d)}$/\t{d}/\n" for d in self.accept_domains]
        return "".join(lines)

    # ------------------------------------------------------------------ files

    @staticmethod
    def _check_traversable(path: Path, uid: int, gid: int, what: str) -> None:
        for p in [path, *path.parents]:
            st = p.stat()
            if st.st_uid == uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid == gid:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                raise ValueError(
                    f"{what} {path}: {p} is not traversable by uid {uid} "
                    f"(mode {stat.filemode(st.st_mode)}); chmod o+x it or pick another directory"
                )

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        # Postfix wants its config and queue root owned by root and not writable by others.
        for d in (self.workdir, self.config_dir, self.queue_dir):
            os.chown(d, 0, 0)
            d.chmod(0o755)
        owner = pwd.getpwnam(MAIL_OWNER)
        # The master and daemons open data_directory (master.lock, caches) as mail_owner.
        self._check_traversable(self.workdir, owner.pw_uid, owner.pw_gid, "workdir")
        cf = self.main_cf()
        text = "# Generated by tests/kit/postfix.py: private bench instance, loopback only.\n"
        text += "".join(f"{k} = {v}\n" for k, v in cf.items())
        (self.config_dir / "main.cf").write_text(text)
        (self.config_dir / "master.cf").write_text(self.master_cf())
        if self.delivery == "maildir":
            assert self.maildir_root is not None
            (self.config_dir / "virtual_mailbox.regexp").write_text(self._virtual_regexp())
            uid, gid = self._delivery_ids()
            self.maildir_root.mkdir(parents=True, exist_ok=True)
            os.chown(self.maildir_root, uid, gid)
            self.maildir_root.chmod(0o755)
            self._check_traversable(self.maildir_root, uid, gid, "maildir_root")
        for name in ("main.cf", "master.cf", "virtual_mailbox.regexp"):
            f = self.config_dir / name
            if f.exists():
                os.chown(f, 0, 0)
                f.chmod(0o644)

    # ------------------------------------------------------------------ commands

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
        env["MAIL_CONFIG"] = str(self.config_dir)
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        return env

    def _run(self, *args: str, timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                list(args), env=self._env(), capture_output=True, text=True, timeout=timeout,
                check=False, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostfixError(f"{' '.join(args)} did not finish within {timeout:g}s") from exc

    def _postfix(
        self, command: str, timeout: float = _CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return self._run(POSTFIX, "-c", str(self.config_dir), command, timeout=timeout)

    def postconf(self, name: str) -> str:
        """The effective value of one parameter in this instance (``postconf -c CONF -h``)."""
        r = self._run(POSTCONF, "-c", str(self.config_dir), "-h", name)
        if r.returncode != 0:
            raise PostfixError(f"postconf {name}: {r.stderr.strip()}")
        return r.stdout.strip()

    @staticmethod
    def version() -> str:
        r = subprocess.run([POSTCONF, "-d", "-h", "mail_version"], capture_output=True, text=True,
                           timeout=_CMD_TIMEOUT, check=False)
        return r.stdout.strip() or "unknown"

    def log_tail(self, lines: int = 30) -> str:
        try:
            with self.maillog.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 200 * lines))
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return "(no maillog)"

    def _fail(self, what: str) -> PostfixError:
        return PostfixError(f"private Postfix at {self.address} ({self.workdir}): {what}\n"
                            f"--- maillog tail ---\n{self.log_tail()}")

    # ------------------------------------------------------------------ processes

    def master_pid(self) -> int | None:
        """PID of this instance's master from its pid file, if that process is alive and ours."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) and self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        return _proc_env(pid).get("MAIL_CONFIG") == str(self.config_dir)

    def pids(self) -> list[int]:
        """The master PID followed by its live children (smtpd, qmgr, cleanup, ...)."""
        master = self.master_pid() or self._master_pid
        if master is None or not _pid_alive(master):
            return []
        return [master, *procs.children(master)]

    @property
    def running(self) -> bool:
        return self.master_pid() is not None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PostfixInstance:
        """Write config, ``postfix check``, ``postfix start``; return once the port says 220."""
        check_available()
        if self.running:
            return self
        if _port_open(self.host, self.port):
            raise PostfixError(f"{self.address} is already in use by another process")
        self._write_config()
        r = self._postfix("check")
        if r.returncode != 0:
            raise self._fail(f"postfix check failed: {(r.stderr or r.stdout).strip()}")
        r = self._postfix("start")
        self._started = True
        atexit.register(self._atexit_stop)
        if r.returncode != 0:
            self.stop()
            raise self._fail(f"postfix start failed: {(r.stderr or r.stdout).strip()}")
        deadline = time.monotonic() + self.start_timeout
        banner: str | None = None
        while time.monotonic() < deadline:
            self._master_pid = self.master_pid() or self._master_pid
            if self._master_pid is not None:
                banner = smtp_banner(self.host, self.port, timeout=2.0)
                if banner and banner.startswith("220"):
                    return self
            time.sleep(0.1)
        self.stop()
        raise self._fail(f"no 220 banner within {self.start_timeout:g}s (got {banner!r})")

    def reload(self) -> None:
        """``postfix reload`` of this instance (the master re-reads its files; its smtpd
        processes finish their sessions and are replaced): what an operator does weekly."""
        r = self._postfix("reload")
        if r.returncode != 0:
            raise PostfixError(f"postfix reload: {(r.stderr or r.stdout).strip()}")

    def stop(self) -> None:
        """Stop this instance only: ``postfix stop``, wait, then SIGKILL by PID as a last resort."""
        if not self._started:
            return
        master = self.master_pid() or self._master_pid
        children = self.pids()[1:]
        if master is not None and _pid_alive(master):
            with contextlib.suppress(PostfixError):
                self._postfix("stop", timeout=self.stop_timeout)
            deadline = time.monotonic() + self.stop_timeout
            while _pid_alive(master) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(master) and self._is_ours(master):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(master, signal.SIGKILL)
        # Children exit when the master's status pipe closes; kill only leftovers that are ours.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_pid_alive(p) for p in children):
            time.sleep(0.05)
        for pid in children:
            if _pid_alive(pid) and self._is_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._started = False
        self._master_pid = None
        atexit.unregister(self._atexit_stop)
        if master is not None and _pid_alive(master):
            raise self._fail(f"master {master} did not exit")

    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ queue and mailboxes

    def queue_size(self) -> int:
        """Messages not yet delivered (maildrop, incoming, active, deferred, hold)."""
        total = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(self.queue_dir / sub):
                total += len(files)
        return total

    def wait_queue_empty(self, timeout: float = 60.0, poll: float = 0.2) -> bool:
        """Wait until the queue is empty; False if it is not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.queue_size() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    def maildir_messages(self, domain: str | None = None) -> list[Path]:
        """Files delivered under maildir_root (``<domain>/new/*`` and ``<domain>/cur/*``)."""
        if self.maildir_root is None or not self.maildir_root.exists():
            return []
        pattern = domain.lower() if domain else "*"
        found = [p for sub in ("new", "cur") for p in self.maildir_root.glob(f"{pattern}/{sub}/*")
                 if p.is_file()]
        return sorted(found)

    def __repr__(self) -> str:
        return (f"PostfixInstance({str(self.workdir)!r}, {self.port}, delivery={self.delivery!r}, "
                f"running={self.running})")


def started_postfix(prefix: str, *,
                    accept_domains: tuple[str, ...] = ("example.test", "sender.test"),
                    extra_main_cf: Mapping[str, str] | None = None) -> Iterator[PostfixInstance]:
    """For a module-scoped pytest fixture (`yield from started_postfix(...)`): a started private
    Postfix delivering to maildirs under a fresh work dir, stopped and removed afterwards; the
    test skips, naming why, when Postfix cannot run here. The work dir is not pytest's tmp_path
    but a 0711 dir under /tmp: virtual(8) delivers as an unprivileged user that must traverse
    the parents."""
    import pytest

    try:
        check_available()
    except PostfixUnavailable as exc:
        pytest.skip(str(exc))
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o711)
    pf = PostfixInstance(work, free_port(), delivery="maildir", maildir_root=work / "maildir",
                         accept_domains=accept_domains, extra_main_cf=dict(extra_main_cf or {}))
    try:
        pf.start()
        yield pf
    finally:
        pf.stop()
        shutil.rmtree(work, ignore_errors=True)
