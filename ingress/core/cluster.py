"""Several hosts: the addresses and the CURVE security between edge nodes and lanes nodes.

Roles (cluster.role, or `smtp-ingress run --role`): "all" runs everything on one host over
ipc:// sockets in the state dir, with no keys; "edge" runs the supervisor and the acceptors,
which reach every lanes node in cluster.lanes_nodes over tcp://; "lanes" runs the brokers,
workers, spool and relay, bound on cluster.lanes_bind.

A lanes node binds four consecutive ports from its base address "tcp://host:port" (PORTS):
fast front (ROUTER: SUBMIT, ACK/NACK, SHARE), fast status (PUB: status, shared facts), then the
same for bulk. Workers still reach their broker over ipc:// (they run on the lanes node).
Every tcp socket is CURVE: the lanes node is the CURVE server (its own key pair), each edge a
client that must know the server's public key, and the lanes node admits (ZAP, zmq.auth) only
the edge public keys in cluster.allowed_keys (plus its own, for `smtp-ingress status`).

API:
    PORTS                                     (the roles: ingress.core.schema.ROLES)
    parse_base(base) -> (host, port)          ValueError unless "tcp://host:port", port+3 valid
    endpoint(base, lane, kind) -> str         kind "front" | "status"
    local_base(base) -> str                   the node's own address for a wildcard bind
    parse_node(spec) -> (base, public_key_path)   "tcp://host:port /path/node.key"
    Node(base, public)                        a lanes node as an edge sees it
    nodes(cfg) -> list[Node]                  cluster.lanes_nodes, keys loaded
    key_pair(path) -> (public, secret)        a keygen .key_secret file (ValueError; also when
                                              group or others may read or write it)
    public_key(path) -> bytes                 a keygen .key file (ValueError)
    keygen(dir, name, force=False) -> (public_path, secret_path)
                                              a new pair (ValueError: a symlinked or shared
                                              directory, an existing pair without force)
    curve_client(sock, cfg, server_public)    an edge's socket towards a lanes node
    curve_server(sock, cfg)                   a lanes node's tcp socket
    Gate(ctx, cfg)                            the lanes node's ZAP handler; .stop()
    HANDSHAKE_FAILURES, log_handshake_event(frames, where)   a monitor socket's refusals
    refused(label, **fields)                  one refusal: counted (metrics.curve_refused(label)),
                                              one curve_refused line (rate-limited)

Failure modes: an unknown client key is refused by ZAP and logged (curve_refused, with the
key); a peer without CURVE, or with a wrong server key, fails the handshake, which a monitor
socket on the server socket logs (curve_refused, with libzmq's protocol error). Neither ever
gets a pipe: nothing it sends reaches the broker, nothing is published to it. Key files that
cannot be read or parsed are a ValueError (config.load turns it into a ConfigError naming the
key), and so is a secret key file that group or others may access (fsutil.read_private: the
message names the file and its mode).

keygen: DIR is created with mode 0700 when missing (its parents with the umask's); an existing
DIR must be a real directory (a symlink is refused), not writable by group or others, owned by
the running user or root. The secret is created O_CREAT|O_EXCL|O_NOFOLLOW with mode 0600 from
the start (never written with the umask's mode and chmod'ed afterwards), the public file 0644,
both relative to the opened directory (no path re-walked). An existing NAME.key or
NAME.key_secret is kept unless force (replacing a pair locks out every peer that knows the old
public key); force writes fresh O_EXCL temporary files and renames them into place (a symlink
planted at a key's path is replaced, never written through). Files and directory are fsync'd.
Limits: the allowed keys are read once at start (a new edge key needs a restart of the
lanes node). Refusal lines are rate-limited per process (REFUSAL_LOG_RATE; the count of
those left out rides on the next line). A peer stuck in the handshake is dropped after
HANDSHAKE_IVL_MS; the number of connections an unauthenticated peer may open is not bounded
here (libzmq has no such limit): firewall the lanes ports to the edges' addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ingress.core import log, metrics
from ingress.core.fsutil import private_dir_problem, read_private, write_all
from ingress.core.ratelimit import TokenBucket

if TYPE_CHECKING:
    from ingress.core.schema import Config

PORTS = {("fast", "front"): 0, ("fast", "status"): 1, ("bulk", "front"): 2,
         ("bulk", "status"): 3}
ZAP_DOMAIN = b"smtp-ingress"
HEARTBEAT_IVL_MS = 300       # ZMTP PING on every tcp socket: a silent peer is dropped after
HEARTBEAT_TIMEOUT_MS = 1200  # this long (a host that vanished without a FIN or RST)
HANDSHAKE_IVL_MS = 5000      # a peer that does not finish the CURVE handshake is dropped
REFUSAL_LOG_RATE = 5.0       # refusal lines per second and process (burst REFUSAL_LOG_BURST);
REFUSAL_LOG_BURST = 20       # the rest are counted and the count rides on the next line


class _RefusalLog:
    """curve_refused lines, rate-limited: a peer reconnecting in a loop must not flood the log
    (each line after a gap carries `suppressed`, the refusals not logged meanwhile)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()      # the ZAP thread and the main loop both log
        self.bucket = TokenBucket(REFUSAL_LOG_RATE, REFUSAL_LOG_BURST, now=time.monotonic())
        self.suppressed = 0
        self.total = 0

    def __call__(self, label: str, **fields: Any) -> None:
        metrics.curve_refused(label)
        with self.lock:
            self.total += 1
            if not self.bucket.take(time.monotonic()):
                self.suppressed += 1
                return
            suppressed, self.suppressed = self.suppressed, 0
        log.event("curve_refused", "warning", suppressed=suppressed, **fields)


refused = _RefusalLog()


def parse_base(base: str) -> tuple[str, int]:
    """"tcp://host:port" (IPv6 in brackets) -> (host, port); the node uses port..port+3."""
    if not base.startswith("tcp://"):
        raise ValueError(f"{base!r}: want tcp://host:port")
    host, sep, port = base[len("tcp://"):].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{base!r}: want tcp://host:port")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
    if not 1 <= int(port) <= 65535 - 3:
        raise ValueError(f"{base!r}: port must be 1..65532 (the node uses 4 ports from it)")
    return host, int(port)


def endpoint(base: str, lane: str, kind: str) -> str:
    host, port = parse_base(base)
    return f"tcp://{host}:{port + PORTS[(lane, kind)]}"


WILDCARDS = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}


def local_base(base: str) -> str:
    """The address a process on the lanes node itself connects to for `base` (a wildcard bind
    address such as tcp://*:7100 or tcp://0.0.0.0:7100 means loopback)."""
    host, port = parse_base(base)
    return f"tcp://{WILDCARDS.get(host, host)}:{port}"


def parse_node(spec: str) -> tuple[str, str]:
    """A cluster.lanes_nodes entry: "tcp://host:port /path/to/lanes-node.key"."""
    parts = spec.split()
    if len(parts) != 2:
        raise ValueError(f"{spec!r}: want \"tcp://host:port /path/to/node.key\"")
    if parse_base(parts[0])[0] in WILDCARDS:
        raise ValueError(f"{spec!r}: name the lanes node's address, not a wildcard")
    return parts[0], parts[1]


@dataclass(frozen=True)
class Node:
    base: str            # tcp://host:port
    public: bytes        # its CURVE public key (z85)


def public_key(path: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r}: not a CURVE key file ({e})") from None
    if not public or len(public) != 40:
        raise ValueError(f"{path!r}: no public-key in it")
    return public


def key_pair(path: str) -> tuple[bytes, bytes]:
    read_private(path, 64 * 1024)      # only its owner may read it (ValueError naming it)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r}: not a CURVE key file ({e})") from None
    if not public or not secret or len(public) != 40 or len(secret) != 40:
        raise ValueError(f"{path!r}: want a secret key file (NAME.key_secret from "
                         "`smtp-ingress keygen`)")
    return public, secret


def allowed_keys(directory: str) -> set[bytes]:
    """The public keys (*.key) in `directory` (ValueError if it is not one, or one is bad)."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{directory!r}: not a directory")
    return {public_key(str(p)) for p in sorted(d.glob("*.key"))}


def nodes(cfg: Config) -> list[Node]:
    out = []
    for spec in cfg.cluster.lanes_nodes:
        base, path = parse_node(spec)
        out.append(Node(base, public_key(path)))
    return out


_CERT = """#   ****  Generated by smtp-ingress keygen  ****
#   ZeroMQ CURVE {what} Certificate
metadata
curve
    public-key = "{public}"
{secret}"""


def _key_dir(directory: Path) -> int:
    """An fd of `directory` (created 0700 if missing), checked: no symlink, private enough."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # raced with someone: checked below
            os.mkdir(directory, 0o700)
        st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{str(directory)!r} is a symbolic link: refused (name the real "
                         "directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{str(directory)!r}: not a directory")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    problem = private_dir_problem(os.fstat(fd), (os.geteuid(), 0))
    if problem:
        os.close(fd)
        raise ValueError(f"{str(directory)!r} {problem}: keys need a directory only their owner "
                         "can change")
    return fd


def _exists(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _create(dfd: int, name: str, data: bytes, mode: int) -> None:
    """`name` in the directory `dfd`, new (O_EXCL: never an existing file or a symlink's
    target), with `mode` from the start, fsync'd; removed again if writing fails."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dfd)
    try:
        write_all(fd, [data])
        os.fsync(fd)
    except BaseException:
        os.unlink(name, dir_fd=dfd)
        raise
    finally:
        os.close(fd)


def keygen(directory: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """NAME.key (public, to hand out) and NAME.key_secret (mode 0600) in `directory`."""
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise ValueError(f"{name!r}: want a plain file name")
    public, secret = zmq.curve_keypair()
    files = [(f"{name}.key_secret", 0o600, _CERT.format(
                 what="**Secret**", public=public.decode(),
                 secret=f'    secret-key = "{secret.decode()}"\n')),
             (f"{name}.key", 0o644, _CERT.format(what="Public", public=public.decode(),
                                                 secret=""))]
    dfd = _key_dir(directory)
    try:
        if not force:
            for fname, _, _ in reversed(files):
                if _exists(fname, dfd):
                    raise ValueError(
                        f"{str(directory / fname)!r} exists: not replacing a key pair (every "
                        "peer that knows its public key would be locked out); --force to "
                        "replace it")
        created: list[str] = []
        try:
            for fname, mode, text in files:
                if force:
                    tmp = f".{fname}.{secrets.token_hex(8)}.tmp"
                    _create(dfd, tmp, text.encode(), mode)
                    os.replace(tmp, fname, src_dir_fd=dfd, dst_dir_fd=dfd)
                else:
                    _create(dfd, fname, text.encode(), mode)
                    created.append(fname)
        except BaseException:
            for fname in created:              # no half pair left behind by a failed keygen
                os.unlink(fname, dir_fd=dfd)
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return directory / files[1][0], directory / files[0][0]


def _heartbeats(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


def curve_client(sock: zmq.Socket[Any], cfg: Config, server_public: bytes) -> None:
    public, secret = key_pair(cfg.cluster.secret_key)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    _heartbeats(sock)


def curve_server(sock: zmq.Socket[Any], cfg: Config) -> None:
    public, secret = key_pair(cfg.cluster.secret_key)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)    # no ZAP handler (no Gate): refuse, not admit
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    _heartbeats(sock)


class _Allowed:
    """zmq.auth's credentials provider: the allowed keys; a refusal is logged here."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        refused("unknown_key", why="unknown client key", key=key.decode("ascii", "replace"))
        return False


class Gate:
    """The lanes node's ZAP handler (one per process, on its zmq.Context): only the allowed
    edge keys, and the node's own (its `status` command), pass."""

    def __init__(self, ctx: zmq.Context[Any], cfg: Config) -> None:
        keys = allowed_keys(cfg.cluster.allowed_keys)
        keys.add(key_pair(cfg.cluster.secret_key)[0])
        self.allowed = _Allowed(keys)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(),
                                           credentials_provider=self.allowed)

    def stop(self) -> None:
        self.auth.stop()


HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def log_handshake_event(frames: list[bytes], where: str) -> None:
    """One monitor message of a server socket: a failed handshake is a refused peer."""
    from zmq.utils.monitor import parse_monitor_message
    try:
        ev = parse_monitor_message(frames)
    except (ValueError, IndexError, TypeError):
        return
    event = int(ev["event"])
    # A ZAP refusal (EVENT_HANDSHAKE_FAILED_AUTH) was counted and logged by the Gate, with the
    # key: here only the handshakes that never reached ZAP.
    if not event & HANDSHAKE_FAILURES or event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return
    whys = {int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "handshake failed (no CURVE or wrong key)",
            int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "handshake failed"}
    raw = ev.get("endpoint", b"")
    refused("handshake", why=whys.get(event, "handshake failed"), socket=where,
            code=ev.get("value"),
            endpoint=raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
