"""The recipient-callout cache on disk (ingress/edge/verify_store.py; issue 19 item 9: a reload
emptied the cache, so a reload during a downstream outage turned known recipients into 450s).

The keys are addresses the network chose and the file is read back at every start, so it is
tested as hostile input: files that are not ours (a symlink, a FIFO, another owner, writable by
others, too big), files that are not the format, and entries of every wrong shape; answers
kept beyond their TTL; more entries than the cache holds; a flood of made-up recipients
against the known ones. The end-to-end reload (real processes, a real Postfix stopped) is
tests/integration/test_rcpt_verify.py::test_cache_survives_a_reload.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingress.core import log
from ingress.core.fsutil import read_own
from ingress.edge import verify_store
from ingress.edge.rcpt_verify import Answer, RecipientVerifier
from ingress.edge.verify_store import VerifyStore, decode, encode, file_name

DOWN = "127.0.0.1:10025"
TTL = {Answer.OK: 1000.0, Answer.UNKNOWN: 100.0, Answer.TEMPFAIL: 10.0}


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


def verifier(size: int = 100, clock: Clock | None = None) -> RecipientVerifier:
    return RecipientVerifier("127.0.0.1", 10025, helo="mx.test", timeout=2.0,
                             positive_ttl=TTL[Answer.OK], negative_ttl=TTL[Answer.UNKNOWN],
                             tempfail_ttl=TTL[Answer.TEMPFAIL], cache_size=size, concurrency=1,
                             timer=clock or Clock())


def filled(v: RecipientVerifier) -> RecipientVerifier:
    v.preload([("bob@example.test", Answer.OK, 500.0), ("nosuch@example.test", Answer.UNKNOWN,
                                                        50.0)])
    v._store("busy@example.test", Answer.TEMPFAIL, 10.0)
    return v


def file_of(entries: list[Any], downstream: str = DOWN, **head: Any) -> bytes:
    return orjson.dumps({"v": 1, "downstream": downstream, "saved_at": time.time(),
                         "entries": entries, **head})


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    got: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(log, "event", lambda name, level="info", /, **kw: got.append((name, kw)))
    return got


# --- the format ---------------------------------------------------------------------------------

def test_round_trip_keeps_answers_and_time_left_not_unsure_ones() -> None:
    clock = Clock()
    v = filled(verifier(clock=clock))
    wall = 1_700_000_000.0
    entries, bad = decode(encode(*v.export(), wall, DOWN), DOWN, wall + 100)
    assert bad == 0
    got = {k: (a, round(left)) for k, a, left in entries}
    # saved 100 s before it is read: bob has 400 s left; nosuch (50 s) has expired; busy (unsure)
    # was never saved
    assert got == {"bob@example.test": (Answer.OK, 400)}
    fresh = verifier(clock=Clock())
    assert fresh.preload(entries) == 1
    assert fresh.cached("bob@EXAMPLE.test") is Answer.OK
    assert fresh.cached("busy@example.test") is None


def test_positive_answers_first_when_the_bytes_run_out() -> None:
    v = verifier(size=10_000)
    v.preload([(f"known{i}@example.test", Answer.OK, 900.0) for i in range(50)]
              + [(f"made-up{i}@example.test", Answer.UNKNOWN, 90.0) for i in range(5000)])
    data = encode(*v.export(), 1e9, DOWN, max_bytes=8000)
    assert len(data) <= 8000
    entries, bad = decode(data, DOWN, 1e9)
    assert bad == 0 and len(entries) > 50
    assert {k for k, a, _ in entries if a is Answer.OK} == {f"known{i}@example.test"
                                                           for i in range(50)}


def test_key_orjson_refuses_is_left_out() -> None:
    v = verifier()
    v.preload([("bob@example.test", Answer.OK, 500.0), ("\udcff@example.test", Answer.OK, 500.0)])
    entries, _ = decode(encode(*v.export(), 1e9, DOWN), DOWN, 1e9)
    assert [k for k, _, _ in entries] == ["bob@example.test"]


@pytest.mark.parametrize("data, why", [
    (b"", "not JSON"),
    (b"\xff\xfe{", "not JSON"),
    (b"[1, 2, 3]", "version"),
    (orjson.dumps({"v": 2, "downstream": DOWN, "entries": []}), "version"),
    (file_of([], downstream="10.0.0.9:25"), "another downstream"),
    (file_of([], downstream=["x"]), "another downstream"),
    (orjson.dumps({"v": 1, "downstream": DOWN, "entries": {"a": 1}}), "entries"),
    (b'{"v": 1, "downstream": "127.0.0.1:10025", "entries": [["a@b", "ok", NaN]]}', "not JSON"),
], ids=["empty", "binary", "list", "v2", "other-downstream", "downstream-shape", "entries-dict",
        "nan"])
def test_a_file_that_is_not_ours_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(ValueError):
        decode(data, DOWN, 1e9)


def test_malformed_entries_are_skipped_and_counted() -> None:
    wall = 1e9
    good = ["bob@example.test", "ok", wall + 10]
    bad: list[Any] = [
        "bob@example.test", 1, None, {"k": 1}, [], ["a@example.test", "ok"],
        ["a@example.test", "ok", wall + 10, 1],
        [1, "ok", wall + 10], ["", "ok", wall + 10], ["a" * 600 + "@example.test", "ok", wall + 1],
        ["a\r\nRSET@example.test", "ok", wall + 10], ["a\x00@example.test", "ok", wall + 10],
        ["bob@EXAMPLE.test", "ok", wall + 10],           # not in its cache form
        ["a@example.test", "tempfail", wall + 10], ["a@example.test", "OK", wall + 10],
        ["a@example.test", None, wall + 10], ["a@example.test", "ok", "soon"],
        ["a@example.test", "ok", True], ["a@example.test", "ok", None],
        ["a@example.test", "ok", 1e400],
    ]
    entries, nbad = decode(file_of([*bad, good]), DOWN, wall)
    assert nbad == len(bad)
    assert [(k, a) for k, a, _ in entries] == [("bob@example.test", Answer.OK)]


def test_a_file_cannot_extend_an_answer_beyond_its_ttl() -> None:
    clock = Clock()
    v = verifier(clock=clock)
    wall = 1e9
    entries, _ = decode(file_of([["bob@example.test", "ok", wall + 1e12],
                                 ["nosuch@example.test", "unknown", 1.7e308]]), DOWN, wall)
    assert v.preload(entries) == 2
    clock.t += TTL[Answer.UNKNOWN] + 1
    assert v.cached("nosuch@example.test") is None
    assert v.cached("bob@example.test") is Answer.OK
    clock.t += TTL[Answer.OK]
    assert v.cached("bob@example.test") is None


def test_preload_never_replaces_an_answer_this_process_got() -> None:
    v = verifier()
    v._store("bob@example.test", Answer.UNKNOWN, 50.0)
    assert v.preload([("bob@example.test", Answer.OK, 500.0)]) == 0
    assert v.cached("bob@example.test") is Answer.UNKNOWN


def test_made_up_recipients_do_not_push_out_known_ones() -> None:
    """The cache is full: what expires soonest goes first, so a flood of 5xx answers for
    made-up recipients (an hour) cannot evict the 2xx answers (a day)."""
    v = verifier(size=10)
    v.preload([(f"known{i}@example.test", Answer.OK, 900.0) for i in range(5)])
    for i in range(100):
        v._store(f"made-up{i}@example.test", Answer.UNKNOWN, TTL[Answer.UNKNOWN])
    assert len(v) == 10
    assert all(v.cached(f"known{i}@example.test") is Answer.OK for i in range(5))


# --- the files ----------------------------------------------------------------------------------

def store_for(v: RecipientVerifier, d: Path, ident: str = "a0",
              idents: tuple[str, ...] = ("a0", "a1", "f0")) -> VerifyStore:
    return VerifyStore(v, d, ident, list(idents), DOWN)


def test_save_and_load_every_acceptors_file(tmp_path: Path,
                                            events: list[tuple[str, dict[str, Any]]]) -> None:
    a0, a1 = verifier(), verifier()
    a0.preload([("bob@example.test", Answer.OK, 500.0)])
    a1.preload([("carol@example.test", Answer.OK, 500.0),
                ("nosuch@example.test", Answer.UNKNOWN, 50.0)])
    assert store_for(a0, tmp_path, "a0").save() and store_for(a1, tmp_path, "a1").save()
    st = (tmp_path / file_name("a0")).stat()
    assert st.st_mode & 0o777 == 0o600
    new = verifier()
    assert store_for(new, tmp_path, "f0").load() == 3
    assert {k: new.cached(k) for k in ("bob@example.test", "carol@example.test",
                                       "nosuch@example.test")} == {
        "bob@example.test": Answer.OK, "carol@example.test": Answer.OK,
        "nosuch@example.test": Answer.UNKNOWN}
    assert ("verify_cache_loaded", {"entries": 3, "files": 2, "refused": 0, "malformed": 0,
                                    "offered": 3}) in events
    assert not store_for(new, tmp_path, "f0").unsaved      # nothing new to save


def test_more_entries_than_the_cache_holds(tmp_path: Path) -> None:
    wall = time.time()
    entries = ([[f"known{i}@example.test", "ok", wall + 900] for i in range(20)]
               + [[f"x{i}@example.test", "unknown", wall + 90] for i in range(500)])
    (tmp_path / file_name("a1")).write_bytes(file_of(entries))
    os.chmod(tmp_path / file_name("a1"), 0o600)
    v = verifier(size=30)
    store_for(v, tmp_path).load()
    assert len(v) == 30
    assert all(v.cached(f"known{i}@example.test") is Answer.OK for i in range(20))


def hostile(d: Path, case: str) -> Path:
    path = d / file_name("a1")
    good = file_of([["evil@example.test", "ok", time.time() + 900]])
    if case == "symlink":
        target = d / "elsewhere.json"
        target.write_bytes(good)
        os.chmod(target, 0o600)
        path.symlink_to(target)
    elif case == "fifo":
        os.mkfifo(path, 0o600)              # nobody writes: an open without O_NONBLOCK hangs
    elif case == "directory":
        path.mkdir(mode=0o700)
    elif case == "group-writable":
        path.write_bytes(good)
        os.chmod(path, 0o620)
    elif case == "other-owner":
        path.write_bytes(good)
        os.chmod(path, 0o600)
        os.chown(path, 65534, 65534)
    elif case == "too-big":
        with open(path, "wb") as f:
            f.truncate(verify_store.FILE_MAX_BYTES + 1)   # sparse: never read
        os.chmod(path, 0o600)
    elif case == "garbage":
        path.write_bytes(os.urandom(4096))
        os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize("case", ["symlink", "fifo", "directory", "group-writable",
                                  "other-owner", "too-big", "garbage"])
def test_a_hostile_file_is_refused_and_logged_never_fatal(
        tmp_path: Path, case: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    if case == "other-owner" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    hostile(tmp_path, case)
    ours = verifier()
    ours.preload([("bob@example.test", Answer.OK, 500.0)])
    assert store_for(ours, tmp_path, "a0").save()
    v = verifier()
    t0 = time.monotonic()
    assert store_for(v, tmp_path, "f0").load() == 1           # a0's file still counts
    assert time.monotonic() - t0 < 10                          # generous: never a hang
    assert v.cached("bob@example.test") is Answer.OK
    assert v.cached("evil@example.test") is None
    refused = [kw for name, kw in events if name == "verify_cache_refused"]
    assert len(refused) == 1 and file_name("a1") in refused[0]["path"], events


def test_read_own_accepts_our_private_file(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"hello")
    os.chmod(f, 0o640)                      # readable by the group is fine: not writable
    assert read_own(f, 5) == b"hello"
    with pytest.raises(ValueError, match="over the limit"):
        read_own(f, 4)
    with pytest.raises(FileNotFoundError):
        read_own(tmp_path / "missing", 5)


def test_the_byte_budget_of_one_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      events: list[tuple[str, dict[str, Any]]]) -> None:
    """Every file of a start together stays within LOAD_MAX_BYTES: a file beyond the rest of
    the budget is refused (its acceptor's answers are the ones lost), the start goes on."""
    for i, ident in enumerate(("a0", "a1")):
        v = verifier()
        v.preload([(f"user{i}.{j}@example.test", Answer.OK, 500.0) for j in range(50)])
        assert store_for(v, tmp_path, ident).save()
    size = (tmp_path / file_name("a0")).stat().st_size
    monkeypatch.setattr(verify_store, "LOAD_MAX_BYTES", size + 10)
    v = verifier()
    assert store_for(v, tmp_path, "f0").load() == 50
    assert [kw["path"].endswith(file_name("a1")) for name, kw in events
            if name == "verify_cache_refused"] == [True]


def test_the_saver_writes_new_answers_and_retries_a_failed_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        events: list[tuple[str, dict[str, Any]]]) -> None:
    """run(): a new answer is on disk within a few SAVE_INTERVALs; a write that fails (here:
    the state dir is gone) is logged, the answers stay unsaved and the next interval tries
    again; nothing new, nothing written."""
    monkeypatch.setattr(verify_store, "SAVE_INTERVAL", 0.02)
    state = tmp_path / "state"
    state.mkdir()
    v = verifier()
    store = store_for(v, state)

    async def go() -> None:
        task = asyncio.create_task(store.run())
        try:
            v._store("bob@example.test", Answer.OK, 500.0)
            v.changes += 1                      # as verify() counts a callout's answer
            for _ in range(200):
                if not store.unsaved:
                    break
                await asyncio.sleep(0.01)
            assert not store.unsaved
            assert b"bob@example.test" in (state / file_name("a0")).read_bytes()
            shutil.rmtree(state)
            v._store("carol@example.test", Answer.OK, 500.0)
            v.changes += 1
            for _ in range(200):
                if any(name == "verify_cache_save_failed" for name, _ in events):
                    break
                await asyncio.sleep(0.01)
            assert store.unsaved
            state.mkdir()
            for _ in range(200):
                if not store.unsaved:
                    break
                await asyncio.sleep(0.01)
            assert b"carol@example.test" in (state / file_name("a0")).read_bytes()
        finally:
            task.cancel()
    asyncio.run(go())
    assert any(name == "verify_cache_save_failed" for name, _ in events)
