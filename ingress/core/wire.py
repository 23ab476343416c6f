"""THE wire format between acceptor, lane broker and worker (ZeroMQ multipart messages).

Every message starts with the version frame b"SI2" and a kind frame (SI2: a learn fact carries
the domain it was learned for). ROUTER sockets add and strip
the routing-id frames themselves; the frames below are what the application sends.

    acceptor -> broker   SUBMIT     [b"SI2", b"SUBMIT", envelope, body]
    broker   -> worker   WORK       [b"SI2", b"WORK", reply_to, envelope, body]
    worker   -> broker   READY      [b"SI2", b"READY", credit(, serves)]  credit: ascii int;
                                     serves: a dedicated worker's one tier (b"self-proven":
                                     ingress.policy.tiers.worker_takes); absent: any tier
    worker  <-> broker   HEARTBEAT  [b"SI2", b"HEARTBEAT", free(, serves)]  free: ascii int
                                     (worker; serves as in its READY, so a restarted broker
                                     that learns the worker from a heartbeat knows it)
    worker   -> broker   DISCONNECT [b"SI2", b"DISCONNECT"]              leaving: no more work
    broker   -> worker   DISCONNECT [b"SI2", b"DISCONNECT"]              read it: nothing follows
    any      -> broker   SHARE      [b"SI2", b"SHARE", fact, ip(, domain(, provider))]  a fact
                                     about a client IP: fact b"learn" (worker: SPF + aligned
                                     DKIM passed, and the policy promotes the domain; `domain`
                                     is the SPF domain it was learned for; `provider`, when the
                                     client's PTR name was confirmed forward and names one
                                     (ingress.policy.iprev): learn the provider for the domain
                                     too), b"unlearn" (worker: mail from a learned network, or
                                     of a learned provider, failed SPF or DKIM: forget its
                                     entry; `domain` "", `provider` the provider entry to
                                     forget) or b"penalty" (acceptor: an early talker)
    worker   -> broker   ACK/NACK   [b"SI2", b"ACK"|b"NACK", reply_to, qid, detail]
    broker   -> acceptor ACK/NACK   [b"SI2", b"ACK"|b"NACK", qid, detail]
    broker   PUB status  STATUS     [b"status", b"SI2", status-json]     topic frame first
             (every STATUS_INTERVAL when status_key changed, else every STATUS_KEEPALIVE)
    acceptor -> broker   SHARE      [b"SI2", b"SHARE", fact, record-json]  a deferral record:
                                     fact b"defer" (we deferred it) or b"claim" (a retry
                                     used it); record-json {"k": key, "f": first, "t": at,
                                     "r": [rcpt...], "o": origin, "n": sheds it stands for,
                                     "h": 1 made while its site hammered, "p": the
                                     client's verified provider, optional} (defer) or {"k",
                                     "t", "o", "b": 1 a bypass, charged to its site} (claim),
                                     at most RECORD_MAX bytes
    broker   PUB fact    SHARE      [fact, b"SI2", ip(, domain(, provider))]  every acceptor
                                     applies it
    broker   PUB record  SHARE      [fact, b"SI2", record-json]          (defer / claim) likewise

`envelope` is orjson of `Envelope` (keys below, stable); `body` is the client's raw message bytes
(dot-unstuffed, CRLF line ends) in a frame of its own so it is never re-encoded. `detail` is
orjson: for ACK {"path": spool file name}, for NACK {"reason": NackReason, "text": str}.
`reply_to` is the acceptor's routing id, carried through the worker and back so that a restarted
broker can still route a late ACK (brokers keep no routing state that matters).
`evidence` is a WireEvidence (ingress.core.wire_evidence, re-exported here with AuthResult and
WireError): one typed field per fact an acceptor, worker or relay proved; encoded as a JSON
object of the fields that differ from their defaults. Its one codec (to_wire / from_wire) is
derived from the dataclass fields (a new fact is one line there); decoding ignores unknown
keys, reads the spellings written before it was typed (an old spool file decodes) and raises
WireError for anything else (wrong types, oversize values). Every process reads it this way:
acceptor, broker and worker (Envelope.decode), relay and ingress.policy.dsn (the spool file's
envelope, WireEvidence.from_wire); the broker, on its hot path, reads only qid, deadline,
peer_ip, identity and retry (head(), with the same field decoders). An envelope whose
evidence has `learned` = <domain> came from a network learned for that domain when its
session began (the worker unlearns it when the message disowns it: workers.lane.pipeline).
One with `retry` is a claimed retry of a transaction we deferred (ingress.policy.deferrals):
the bulk broker charges it to its retry bucket first. New record facts and evidence fields
are additive (a new SHARE fact, an optional field; so is the provider frame of a learn or
unlearn fact: a fact without it names none), so the version stays SI2: every process
of a host runs the same code (the supervisor starts them all). So is the envelope's "proto"
("SMTP" when the client greeted with HELO, "ESMTP" with EHLO; the relay forwards it with
XCLIENT/XFORWARD): written only when set, and an envelope without it (a spool file written
before it, a DSN the relay made) decodes as "" (unknown).

Every process sends a message with send_now(sock, frames) and takes one with
recv_now(sock) -> frames | None (nothing waiting): pyzmq's send_multipart / recv_multipart
without their per-frame costs (enum.Flag's Python `SNDMORE | flags`, type checks, a raised
zmq.Again when the queue is empty): 4.7 us per five-frame message sent and received, not 8.9.

Failure modes: `decode_*` raise WireError for anything malformed (wrong version, frame count,
kind, JSON); callers log it and drop the message (an acceptor waiting on it times out: 451).
send_now raises what zmq's send raises (zmq.Again: the peer's queue is full, nothing was sent;
EHOSTUNREACH: a ROUTER_MANDATORY socket's peer is gone).
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from itertools import count
from typing import NamedTuple

import orjson
import zmq

from ingress.core.wire_evidence import (  # re-exported: the wire's vocabulary
    AuthResult,
    WireError,
    WireEvidence,
    evidence_field,
)

__all__ = ["AuthResult", "WireError", "WireEvidence"]   # and everything defined below

VERSION = b"SI2"
STATUS_TOPIC = b"status"
LEARN_TOPIC = b"learn"
PENALTY_TOPIC = b"penalty"
UNLEARN_TOPIC = b"unlearn"     # additive (a new SHARE fact): the version stays SI2
SHARED_FACTS = (LEARN_TOPIC, PENALTY_TOPIC, UNLEARN_TOPIC)
DEFER_TOPIC = b"defer"
CLAIM_TOPIC = b"claim"
RECORD_FACTS = (DEFER_TOPIC, CLAIM_TOPIC)   # deferral records (ingress.policy.deferrals)
RECORD_MAX = 4096           # bytes of one record fact's JSON
RECORD_NUMBERS = ("f", "t", "n", "h", "b")   # a record fact's numeric fields (all optional)
LANE_HEARTBEAT = 0.25       # seconds between broker <-> worker heartbeats
LANE_LIVENESS = 4           # heartbeats missed before the peer is presumed dead
STATUS_INTERVAL = 0.1       # seconds between a broker's looks at its status: published when
                            # what acceptors act on changed (status_key), else every
STATUS_KEEPALIVE = 0.3      # seconds at least (an idle broker: 3 a second, not 10 per lane)
STATUS_STALE = 1.0          # an acceptor ignores lane status older than this
assert 3 * STATUS_KEEPALIVE <= STATUS_STALE      # two lost publications never make it stale


class StatusKey(NamedTuple):
    """What an acceptor acts on in a lane status (ingress.edge.lanes: saturated(), cap_spent(),
    over_rate)."""
    saturated: bool          # the lane cannot take work (queue nearly full, no workers)
    cap_spent: bool          # its rate bucket was empty
    over_rate: tuple[object, ...]   # the domains (and tiers) refused for their rate


def status_key(doc: Mapping[str, object]) -> StatusKey:
    """A lane status's StatusKey: read so by the acceptors, and a broker publishes at once
    when it changes."""
    tokens = doc.get("tokens")
    over = doc.get("over_rate")
    return StatusKey(bool(doc.get("saturated")), isinstance(tokens, int | float) and tokens < 1.0,
                     tuple(over) if isinstance(over, list) else ())


class Lane(StrEnum):
    FAST = "fast"
    BULK = "bulk"


class Kind(bytes, Enum):
    SUBMIT = b"SUBMIT"
    WORK = b"WORK"
    READY = b"READY"
    HEARTBEAT = b"HEARTBEAT"
    DISCONNECT = b"DISCONNECT"
    SHARE = b"SHARE"
    ACK = b"ACK"
    NACK = b"NACK"


class NackReason(StrEnum):
    RATE = "rate"                  # bulk token bucket empty
    QUEUE_FULL = "queue_full"      # broker queue at its bound
    WORKER_LOST = "worker_lost"    # the worker holding it stopped heartbeating
    EXPIRED = "expired"            # waited in the broker past its deadline
    ERROR = "error"                # the worker failed (disk error, bad input)
    SHUTDOWN = "shutdown"          # broker or worker shutting down
    SHARE = "share"                # fast lane: the message's identity is at its share of the
                                   # queue (classify.identity_share); the acceptor serves it as
                                   # bulk (resubmits it to the bulk lane)


_seq = count()


def new_qid(now: float | None = None) -> str:
    """A queue id unique across processes and restarts: time (ms), the whole pid (pid_t is 32
    bits; Linux pid_max reaches 2**22, so keeping fewer bits lets two live processes collide),
    per-process counter. 23 upper-case hex digits, sortable by time."""
    t = int((time.time() if now is None else now) * 1000)
    return f"{t:011X}{os.getpid() & 0xFFFFFFFF:08X}{next(_seq) & 0xFFFF:04X}"


@dataclass(frozen=True)
class Envelope:
    qid: str
    lane: Lane
    peer_ip: str
    peer_port: int
    helo: str
    mail_from: str
    rcpts: tuple[str, ...]
    received_at: float                         # wall clock, end of DATA
    deadline: float                            # wall clock; a broker drops work older than this
    acceptor: str = ""
    smtputf8: bool = False
    tls: str = ""                              # e.g. "TLSv1.3" when the session used TLS
    evidence: WireEvidence = field(default_factory=WireEvidence)   # what was proven
    proto: str = ""                            # "SMTP" (HELO) | "ESMTP" (EHLO) | "" unknown

    def encode(self) -> bytes:
        return orjson.dumps(self.as_dict())

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "qid": self.qid, "lane": self.lane.value, "peer_ip": self.peer_ip,
            "peer_port": self.peer_port, "helo": self.helo, "mail_from": self.mail_from,
            "rcpts": list(self.rcpts), "received_at": self.received_at,
            "deadline": self.deadline, "acceptor": self.acceptor,
            "smtputf8": self.smtputf8, "tls": self.tls, "evidence": self.evidence.to_wire(),
        }
        if self.proto:                  # additive: an envelope without it encodes as before
            d["proto"] = self.proto
        return d

    @classmethod
    def decode(cls, raw: bytes) -> Envelope:
        try:
            d = orjson.loads(raw)
            return cls(qid=str(d["qid"]), lane=Lane(d["lane"]), peer_ip=str(d["peer_ip"]),
                       peer_port=int(d["peer_port"]), helo=str(d["helo"]),
                       mail_from=str(d["mail_from"]), rcpts=tuple(map(str, d["rcpts"])),
                       received_at=float(d["received_at"]), deadline=float(d["deadline"]),
                       acceptor=str(d.get("acceptor", "")), smtputf8=bool(d.get("smtputf8")),
                       tls=str(d.get("tls", "")), proto=str(d.get("proto", "")),
                       evidence=WireEvidence.from_wire(d.get("evidence")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise WireError(f"bad envelope: {e}") from None


@dataclass(frozen=True, slots=True)
class EnvelopeHead:
    """What a broker reads of an envelope (head()): the rest travels on to the worker as bytes."""

    qid: str
    deadline: float
    peer_ip: str
    identity: str       # evidence.identity
    retry: bool         # evidence.retry


def head(raw: bytes) -> EnvelopeHead:
    """The broker's partial decode of an envelope, with WireEvidence's own field decoders (one
    codec; about a quarter of Envelope.decode's cost on the broker's hot path), or WireError. The
    worker decodes the whole envelope: one this passed may still fail there (NACK error)."""
    try:
        d = orjson.loads(raw)
        ev = d.get("evidence")
        return EnvelopeHead(str(d["qid"]), float(d["deadline"]), str(d.get("peer_ip", "")),
                            evidence_field(ev, "identity"), evidence_field(ev, "retry"))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise WireError(f"bad envelope: {e}") from None


@dataclass(frozen=True)
class Reply:
    """An ACK or NACK as the acceptor sees it."""

    qid: str
    ok: bool
    path: str = ""
    reason: NackReason | None = None
    text: str = ""


# --- encoders -------------------------------------------------------------------------------

def submit(env: Envelope, body: bytes) -> list[bytes]:
    return [VERSION, Kind.SUBMIT.value, env.encode(), body]


def work(reply_to: bytes, env_raw: bytes, body: bytes) -> list[bytes]:
    return [VERSION, Kind.WORK.value, reply_to, env_raw, body]


def ready(credit: int, serves: str = "") -> list[bytes]:
    frames = [VERSION, Kind.READY.value, str(credit).encode()]
    return [*frames, serves.encode("ascii")] if serves else frames


def heartbeat(free: int = 0, serves: str = "") -> list[bytes]:
    frames = [VERSION, Kind.HEARTBEAT.value, str(free).encode()]
    return [*frames, serves.encode("ascii")] if serves else frames


def worker_hello(frames: list[bytes]) -> tuple[int, str]:
    """A worker's READY or HEARTBEAT: (credit or free, serves), or WireError."""
    if len(frames) not in (3, 4):
        raise WireError(f"{frames[1]!r}: expected 1 or 2 payload frames, got {len(frames) - 2}")
    serves = frames[3].decode("ascii", "replace") if len(frames) == 4 else ""
    return int_frame(frames[2]), serves


def disconnect() -> list[bytes]:
    return [VERSION, Kind.DISCONNECT.value]


def share(fact: bytes, ip: str, domain: str = "", provider: str = "") -> list[bytes]:
    frames = [VERSION, Kind.SHARE.value, fact, ip.encode("ascii")]
    if provider:
        return [*frames, domain.encode("ascii", "replace"), provider.encode("ascii", "replace")]
    return [*frames, domain.encode("ascii", "replace")] if domain else frames


def share_record(fact: bytes, doc: Mapping[str, object]) -> list[bytes]:
    """A deferral record fact (DEFER_TOPIC or CLAIM_TOPIC) for every acceptor."""
    return [VERSION, Kind.SHARE.value, fact, orjson.dumps(doc)]


def shared_publication(frames: list[bytes]) -> list[bytes]:
    """What a broker publishes for a SHARE message it received (validated), or WireError."""
    payload = frames[2:]
    if len(frames) < 2 or len(payload) not in (2, 3, 4):
        expect(frames, 2)    # raises WireError with the frame count
    fact = payload[0]
    if fact in RECORD_FACTS:
        if len(payload) != 2 or len(payload[1]) > RECORD_MAX:
            raise WireError(f"record fact of {len(payload[1])} bytes or {len(payload)} frames")
        return [fact, VERSION, payload[1]]
    if fact not in SHARED_FACTS:
        raise WireError(f"unknown fact {fact[:20]!r}")
    return [fact, VERSION, *payload[1:]]


def ack_detail(path: str) -> bytes:
    return orjson.dumps({"path": path})


def nack_detail(reason: NackReason, text: str = "") -> bytes:
    return orjson.dumps({"reason": reason.value, "text": text})


def worker_ack(reply_to: bytes, qid: bytes, path: str) -> list[bytes]:
    return [VERSION, Kind.ACK.value, reply_to, qid, ack_detail(path)]


def worker_nack(reply_to: bytes, qid: bytes, reason: NackReason, text: str = "") -> list[bytes]:
    return [VERSION, Kind.NACK.value, reply_to, qid, nack_detail(reason, text)]


def to_acceptor(kind: Kind, qid: bytes, detail: bytes) -> list[bytes]:
    return [VERSION, kind.value, qid, detail]


def status(doc: Mapping[str, object]) -> list[bytes]:
    return [STATUS_TOPIC, VERSION, orjson.dumps(doc)]


# --- sending and taking messages -----------------------------------------------------------

_NOBLOCK, _MORE, _RCVMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.RCVMORE)


def send_now(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    """`frames` as one message without blocking; zmq.Again (nothing sent) when the queue is full.
    Once its first part is taken zmq takes the whole message (a multipart send is atomic)."""
    for part in frames[:-1]:
        sock.send(part, _MORE, copy=False)
    sock.send(frames[-1], _NOBLOCK, copy=False)


def recv_now(sock: zmq.Socket[bytes]) -> list[bytes] | None:
    """The next message's frames, or None when none is waiting."""
    try:
        parts = [sock.recv(_NOBLOCK)]
    except zmq.Again:
        return None
    while sock.get(_RCVMORE):
        parts.append(sock.recv(_NOBLOCK))
    return parts


# --- decoders -------------------------------------------------------------------------------

def kind_of(frames: list[bytes]) -> Kind:
    """Validate version and return the kind; the remaining frames are frames[2:]."""
    if len(frames) < 2 or frames[0] != VERSION:
        raise WireError(f"bad version or frame count: {frames[:1]!r}")
    try:
        return Kind(frames[1])
    except ValueError:
        raise WireError(f"unknown kind {frames[1]!r}") from None


def expect(frames: list[bytes], n: int) -> list[bytes]:
    """The n payload frames after version and kind, or WireError."""
    if len(frames) != n + 2:
        raise WireError(f"{frames[1]!r}: expected {n} payload frames, got {len(frames) - 2}")
    return frames[2:]


def int_frame(raw: bytes) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise WireError(f"not an integer: {raw[:20]!r}") from None
    if not 0 <= v <= 1_000_000:
        raise WireError(f"out of range: {v}")
    return v


def decode_reply(frames: list[bytes]) -> Reply:
    """An ACK/NACK frame list as received by an acceptor's DEALER."""
    kind = kind_of(frames)
    if kind not in (Kind.ACK, Kind.NACK):
        raise WireError(f"acceptor got {kind.name}")
    qid_raw, detail_raw = expect(frames, 2)
    try:
        detail = orjson.loads(detail_raw)
        qid = qid_raw.decode("ascii")
        if kind is Kind.ACK:
            return Reply(qid=qid, ok=True, path=str(detail["path"]))
        return Reply(qid=qid, ok=False, reason=NackReason(detail["reason"]),
                     text=str(detail.get("text", "")))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise WireError(f"bad reply detail: {e}") from None


_DOMAIN = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def decode_shared(frames: list[bytes]) -> tuple[bytes, str, str]:
    """(fact, IP address, domain or "") of a fact publication (validated), or WireError."""
    if len(frames) not in (3, 4, 5) or frames[0] not in SHARED_FACTS or frames[1] != VERSION:
        raise WireError("bad fact publication")
    try:
        ip = str(ipaddress.ip_address(frames[2].decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise WireError(f"bad address {frames[2][:50]!r}") from None
    return frames[0], ip, _domain_frame(frames, 3)


def shared_provider(frames: list[bytes]) -> str:
    """The provider a fact publication names ("" for none), or WireError (decode_shared first:
    this reads the optional fifth frame only)."""
    return _domain_frame(frames, 4)


def _domain_frame(frames: list[bytes], at: int) -> str:
    domain = frames[at].decode("ascii", "replace").lower() if len(frames) > at else ""
    if domain and (len(domain) > 253 or not _DOMAIN.fullmatch(domain)):
        raise WireError(f"bad domain {frames[at][:50]!r}")
    return domain


def decode_record(frames: list[bytes]) -> tuple[bytes, dict[str, object]]:
    """(fact, record) of a deferral record publication (validated shape), or WireError."""
    if len(frames) != 3 or frames[0] not in RECORD_FACTS or frames[1] != VERSION \
            or len(frames[2]) > RECORD_MAX:
        raise WireError("bad record publication")
    try:
        doc = orjson.loads(frames[2])
    except orjson.JSONDecodeError as e:
        raise WireError(f"bad record json: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("k"), str) \
            or not isinstance(doc.get("o"), str) \
            or not all(isinstance(doc.get(t, 0), int | float) for t in RECORD_NUMBERS) \
            or not isinstance(doc.get("r", []), list) \
            or not all(isinstance(r, str) for r in doc.get("r", [])):
        raise WireError("bad record fields")
    return frames[0], doc


def decode_status(frames: list[bytes]) -> dict[str, object]:
    if len(frames) != 3 or frames[0] != STATUS_TOPIC or frames[1] != VERSION:
        raise WireError("bad status message")
    try:
        doc = orjson.loads(frames[2])
    except orjson.JSONDecodeError as e:
        raise WireError(f"bad status json: {e}") from None
    if not isinstance(doc, dict):
        raise WireError("status is not an object")
    return doc
