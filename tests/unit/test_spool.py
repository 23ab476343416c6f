"""Spool: group commit, parse round-trip, failures per item, tmp cleanup; trace headers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ingress.wire import Envelope, Lane
from workers import pipeline, spool


def env(qid: str = "Q", **kw: object) -> Envelope:
    base: dict[str, object] = dict(
        qid=qid, lane=Lane.BULK, peer_ip="192.0.2.9", peer_port=1, helo="h.example",
        mail_from="a@example.org", rcpts=("b@example.test",), received_at=1700000000.0,
        deadline=1700000020.0)
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_batch_roundtrip(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path)
    items = [(env(f"Q{i}"), b"Received: x\r\n", b"Subject: %d\r\n\r\nbody\r\n" % i)
             for i in range(5)]
    names = s.write_batch(items)
    assert all(isinstance(n, str) for n in names)
    for (e, trace, body), name in zip(items, names, strict=True):
        entry = spool.read(tmp_path / "new" / str(name))
        assert entry.message == trace + body
        assert entry.envelope["qid"] == e.qid and entry.envelope["v"] == spool.SPOOL_FORMAT
        assert entry.envelope["rcpts"] == list(e.rcpts)
    assert not list((tmp_path / "tmp").iterdir())


def test_failure_is_per_item(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path)
    (tmp_path / "tmp" / s.name_for(env("DUP"))).write_bytes(b"occupied")   # O_EXCL fails
    out = s.write_batch([(env("OK1"), b"", b"a\r\n"), (env("DUP"), b"", b"b\r\n"),
                         (env("OK2"), b"", b"c\r\n")])
    assert isinstance(out[0], str) and isinstance(out[2], str)
    assert isinstance(out[1], FileExistsError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_spool(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path)
    (tmp_path / "tmp").chmod(0o500)
    try:
        out = s.write_batch([(env("Q"), b"", b"x\r\n")])
        assert isinstance(out[0], PermissionError)
    finally:
        (tmp_path / "tmp").chmod(0o750)


def test_clean_tmp_only_old(tmp_path: Path) -> None:
    s = spool.Spool(tmp_path)
    old, new = tmp_path / "tmp" / "old", tmp_path / "tmp" / "new"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert s.clean_tmp(older_than=time.time() - 60) == 1
    assert new.exists() and not old.exists()


@pytest.mark.parametrize("raw", [b"", b"Subject: x\r\n", b"X-Ingress-Envelope: {\"v\":2}\r\n"])
def test_parse_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        spool.parse(raw)


@pytest.mark.parametrize(("field", "value", "must_not_contain"), [
    ("helo", "evil\r\nX-Injected: yes", b"\r\nX-Injected"),
    ("helo", "a\nb", b"a\nb"),
    ("rcpts", ("x>\r\nBcc: all@example.test",), b"\r\nBcc"),
    ("qid", "Q\r\nX: y", b"\r\nX: y"),
])
def test_received_header_cannot_be_injected(field: str, value: object,
                                            must_not_contain: bytes) -> None:
    kw = {"qid": "Q1", field: value}
    h = pipeline.received_header(env(**kw), "mx.example")  # type: ignore[arg-type]
    assert must_not_contain not in h
    assert h.startswith(b"Received: from ") and h.endswith(b"\r\n")
    # Every line after the first is a continuation line.
    assert all(line.startswith(b"\t") for line in h.split(b"\r\n")[1:-1])


def test_received_header_variants() -> None:
    h = pipeline.received_header(env("Q1", tls="TLSv1.3", smtputf8=True, lane=Lane.FAST), "mx")
    assert b"with UTF8SMTPS (TLSv1.3) id Q1" in h and b"lane=fast" in h
    h = pipeline.received_header(env("Q2", rcpts=("a@x", "b@x")), "mx")
    assert b"for <" not in h
