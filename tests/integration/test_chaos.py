"""Chaos with real processes: a spool that fills up, too few file descriptors, a frozen broker.

- ENOSPC: the spool on a 4 MiB tmpfs (needs root and mount; skipped otherwise), flooded until it
  is full. The clients get 4xx, never 250 for what is not stored; everything that got 250 is in
  new/ byte-exact; nothing is left in tmp/; no child crashes; after the tmpfs is remounted bigger
  mail is accepted again.
- EMFILE: the ingress under `prlimit --nofile=N:N`, far below what smtp.max_connections needs. It
  says so at start (nofile_too_low); a flood of connections beyond the limit does not crash it or
  make it spin; once they are gone it serves again. The clients beyond what the limit allows
  get 421 (admission is capped at RLIMIT_NOFILE - FD_SPARE), never a silent close, and the
  operator a log line (test_emfile_is_refused_politely_and_logged; both tests check one flood).
- SIGSTOP of the bulk broker for 5 s, then SIGCONT, while mail streams: every client gets its
  verdict within the ack deadline (250 or 4xx, never a hang), nothing acknowledged is lost,
  nothing is spooled twice, and mail flows again afterwards. With the harness's
  heartbeat_timeout (2 s) the supervisor replaces the frozen broker first; with a longer one the
  same broker resumes without any restart.

Every load loop is bounded in count and time; every process is started and stopped by the
harness, by PID. Only the SIGSTOP test is serial (its deadlines); the others check what is
stored and answered, which a test running beside them does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kit.harness import Ingress, client_bytes, make_body, send_one

QUEUED = re.compile(r"queued as ([0-9A-F]+)")
CRASH_EVENTS = ("child_exit", "child_hung", "crash_loop")


@dataclass
class Sent:
    i: int
    code: int
    text: str
    seconds: float
    start: float = 0.0


async def send_all(port: int, bodies: dict[int, bytes], concurrency: int,
                   stop_after_failures: int = 0, timeout: float = 15.0) -> list[Sent]:
    """Each body on its own connection, `concurrency` at a time; optionally stop once
    `stop_after_failures` messages in a row were not accepted."""
    queue = list(bodies)
    out: list[Sent] = []
    failures_in_a_row = 0

    async def runner() -> None:
        nonlocal failures_in_a_row
        while queue and not (stop_after_failures and failures_in_a_row >= stop_after_failures):
            i = queue.pop(0)
            t0 = time.monotonic()
            code, text = await send_one(port, bodies[i], timeout=timeout)
            out.append(Sent(i, code, text, time.monotonic() - t0))
            failures_in_a_row = 0 if code == 250 else failures_in_a_row + 1

    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return out


def check_accepted_are_stored(ing: Ingress, sent: list[Sent], bodies: dict[int, bytes]) -> None:
    """Every 250 is in new/, byte-exact; no message is there twice; tmp/ holds nothing."""
    spooled = ing.spooled()            # parses every file; a qid twice fails here
    seen_bodies: dict[bytes, str] = {}
    for qid, entry in spooled.items():
        body = client_bytes(entry)
        assert body not in seen_bodies, f"one message spooled twice: {qid}, {seen_bodies[body]}"
        seen_bodies[body] = qid
    for s in sent:
        if s.code == 250:
            m = QUEUED.search(s.text)
            assert m, s.text
            qid = m.group(1)
            assert qid in spooled, f"message {s.i} got 250 ({qid}) but is not in the spool"
            assert client_bytes(spooled[qid]) == bodies[s.i], f"message {s.i} ({qid}) differs"
    assert not list((ing.spool / "tmp").iterdir()), "half-written files left in tmp/"


# --- ENOSPC -----------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_spool_fills_up_enospc(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "spool", "4m") as mnt, \
            Ingress(tmp_path, {"lanes.bulk": {"workers": 2, "rate": 0.0}}) as ing:
        assert ing.spool == mnt
        children = sorted(ing.children())
        # 64 KiB messages: about 60 fit. Flood until 12 in a row are refused (bounded: 200).
        bodies = {i: make_body(i, size=64 * 1024) for i in range(200)}
        sent = asyncio.run(send_all(ing.port, bodies, concurrency=4, stop_after_failures=12))
        accepted = [s for s in sent if s.code == 250]
        refused = [s for s in sent if s.code != 250]
        assert accepted, "nothing accepted before the spool filled up"
        assert len(refused) >= 12, "the spool never filled up"
        bad = [(s.i, s.code, s.text) for s in refused if not 400 <= s.code < 500]
        assert not bad, f"a full spool must give 4xx: {bad[:5]}"
        check_accepted_are_stored(ing, sent, bodies)
        # The ingress kept running: no child crashed or was replaced, the supervisor is alive.
        assert ing.proc is not None and ing.proc.poll() is None
        assert sorted(ing.children()) == children, "children were replaced"
        assert not [e for e in ing.log_lines() if e.get("event") in CRASH_EVENTS]
        assert ing.events("spool_error"), "the write failures are logged"
        # Space returns: the same ingress accepts again, without a restart.
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        more = {1000 + i: make_body(1000 + i, size=8 * 1024) for i in range(10)}
        sent2 = asyncio.run(send_all(ing.port, more, concurrency=2))
        assert all(s.code == 250 for s in sent2), [(s.code, s.text) for s in sent2]
        check_accepted_are_stored(ing, sent + sent2, {**bodies, **more})
        print(f"ENOSPC: {len(accepted)} accepted, {len(refused)} refused with "
              f"{sorted({s.code for s in refused})}; then {len(sent2)} accepted after remount")
        ing.stop()
        assert ing.proc.returncode == 0


# --- EMFILE -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


NOFILE = 160


def emfile_flood(tmp_path: Path) -> dict[str, object]:
    """Start the ingress under `prlimit --nofile=NOFILE:NOFILE` (one acceptor), check it warned,
    open 2 x NOFILE connections and hold them; measure the acceptor's CPU meanwhile; close them
    and wait until it serves again. Returns what the clients and the log saw."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit(1) not installed")
    out: dict[str, object] = {}
    # evict_rate 0: the held connections stay (no silent one makes room), so the fd cap refuses
    with Ingress(tmp_path, {"supervisor": {"acceptors": 1}, "admission": {"evict_rate": 0.0}},
                 prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}"]) as ing:
        out["nofile_too_low"] = ing.events("nofile_too_low")
        out["before"] = asyncio.run(send_one(ing.port, make_body(0)))[0]
        (acceptor,) = ing.children("acceptor")
        children = sorted(ing.children())
        socks: list[socket.socket] = []
        seen: dict[str, int] = {"banner": 0, "421": 0, "closed": 0, "waiting": 0, "other": 0}
        try:
            for _ in range(2 * NOFILE):            # bounded: twice the limit
                s = socket.socket()
                s.settimeout(5)
                s.connect(("127.0.0.1", ing.port))
                socks.append(s)
            time.sleep(1.0)
            # Out of fds, the acceptor must not spin on accept() (nor crash).
            t0, c0 = time.monotonic(), cpu_seconds(acceptor)
            time.sleep(2.0)
            out["cpu"] = (cpu_seconds(acceptor) - c0) / (time.monotonic() - t0)
            out["alive"] = ing.proc is not None and ing.proc.poll() is None
            for s in socks:
                s.settimeout(0.05)
                try:
                    line = s.recv(512)
                except TimeoutError:
                    seen["waiting"] += 1          # still in the kernel's accept queue
                    continue
                except OSError:
                    line = b""
                key = ("banner" if line.startswith(b"220 ") else "421"
                       if line.startswith(b"421 ") else "closed" if not line else "other")
                seen[key] += 1
        finally:
            for s in socks:
                s.close()
        out["seen"] = seen
        # Once the connections are gone, it serves again (give it a few seconds to drain).
        deadline = time.monotonic() + 15
        code, text = 0, ""
        while time.monotonic() < deadline:
            code, text = asyncio.run(send_one(ing.port, make_body(1), timeout=5))
            if code == 250:
                break
            time.sleep(0.5)
        out["after"] = (code, text)
        out["replaced"] = sorted(ing.children()) != children
        out["crashes"] = [e for e in ing.log_lines() if e.get("event") in CRASH_EVENTS]
        out["tracebacks"] = [e for e in ing.log_lines() if "exc" in e]
        out["events"] = sorted({str(e.get("event")) for e in ing.log_lines()})
        out["log"] = ing.log_lines()
    return out


@pytest.fixture(scope="module")
def emfile_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One flood for both EMFILE tests: they check different things of the same run."""
    return emfile_flood(tmp_path_factory.mktemp("emfile"))


def test_emfile_under_a_low_fd_limit(emfile_run: dict[str, object]) -> None:
    r = emfile_run
    low = r["nofile_too_low"]
    assert low and low[0]["limit"] == NOFILE, "no warning that the fd limit is too low"  # type: ignore[index]
    assert r["before"] == 250
    seen = r["seen"]
    assert isinstance(seen, dict) and seen["banner"] < 2 * NOFILE, f"never ran out of fds: {seen}"
    assert seen["other"] == 0, seen
    assert r["cpu"] < 0.5, f"acceptor at {r['cpu']:.0%} CPU while out of file descriptors"  # type: ignore[operator]
    assert r["alive"], "supervisor died"
    assert r["after"][0] == 250, f"not serving again after the flood: {r['after']}"  # type: ignore[index]
    assert not r["replaced"] and not r["crashes"], r["crashes"]
    assert not r["tracebacks"], str(r["tracebacks"])[:2000]
    print(f"EMFILE: {seen}; log events {r['events']}")


def test_emfile_is_refused_politely_and_logged(emfile_run: dict[str, object]) -> None:
    """Beyond what the fd limit allows a client should get 421 (or wait in the backlog), never
    a silent close, and the operator a log line; admission could cap smtp.max_connections at
    what RLIMIT_NOFILE allows (acceptor.raise_nofile only warns today)."""
    r = emfile_run
    seen = r["seen"]
    assert isinstance(seen, dict)
    assert seen["closed"] == 0, f"connections closed without a reply: {seen}"
    logged = [e for e in r["log"] if "emfile" in str(e).lower()  # type: ignore[attr-defined]
              or "too many open files" in str(e).lower()]
    assert logged, f"running out of fds is not logged: {r['events']}"


# --- SIGSTOP of a broker ----------------------------------------------------------------------


# serial: every verdict within ack_timeout + 3 s and mail flowing 3 s after SIGCONT are deadlines
@pytest.mark.serial
@pytest.mark.parametrize("heartbeat_timeout", [2.0, 10.0], ids=["replaced", "resumes"])
def test_sigstop_bulk_broker(tmp_path: Path, heartbeat_timeout: float) -> None:
    ack_timeout = 5.0
    with Ingress(tmp_path, {"supervisor": {"heartbeat_timeout": heartbeat_timeout},
                            "smtp": {"ack_timeout": ack_timeout}}) as ing:
        (broker,) = ing.children("broker-bulk")
        n = 1000                  # more than the 14 s below can send: time bounds the run
        bodies = {i: make_body(i, size=800) for i in range(n)}
        marks: dict[str, float] = {}

        async def chaos() -> list[Sent]:
            async def freeze() -> None:
                await asyncio.sleep(1.0)
                os.kill(broker, signal.SIGSTOP)
                marks["stop"] = time.monotonic()
                # Longer than ack_timeout (so a message submitted at the stop is tempfailed,
                # not just slow) and shorter than the "resumes" heartbeat_timeout.
                await asyncio.sleep(ack_timeout + 2.0)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(broker, signal.SIGCONT)
                marks["cont"] = time.monotonic()

            async def paced(port: int) -> list[Sent]:
                # 4 senders, each a message at most every 50 ms, for at most ~14 s.
                out: list[Sent] = []
                queue = list(bodies)
                t_end = time.monotonic() + 14.0

                async def runner() -> None:
                    while queue and time.monotonic() < t_end:
                        i = queue.pop(0)
                        t0 = time.monotonic()
                        code, text = await send_one(port, bodies[i], timeout=ack_timeout + 10)
                        out.append(Sent(i, code, text, time.monotonic() - t0, start=t0))
                        await asyncio.sleep(0.05)

                await asyncio.gather(*(runner() for _ in range(4)))
                return out

            results = await asyncio.gather(freeze(), paced(ing.port))
            return results[1]

        try:
            sent = asyncio.run(chaos())
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker, signal.SIGCONT)
        codes = sorted({s.code for s in sent})
        bad = [(s.i, s.code, s.text) for s in sent if s.code != 250 and not 400 <= s.code < 500]
        assert not bad, f"only 250 or 4xx: {bad[:5]}"
        # Within the deadlines: no client waited much past the ack deadline for its verdict.
        slow = [(s.i, round(s.seconds, 2)) for s in sent if s.seconds > ack_timeout + 3.0]
        assert not slow, f"verdicts past the ack deadline: {slow[:5]}"
        tempfailed = [s for s in sent if s.code != 250]
        assert tempfailed, "the frozen broker went unnoticed"
        check_accepted_are_stored(ing, sent, bodies)
        # Mail flows again: everything that started 3 s after SIGCONT was accepted (workers and
        # broker find each other again within LANE_LIVENESS heartbeats, 1 s).
        late = [s for s in sent if s.start > marks["cont"] + 3.0]
        assert late, "nothing sent after SIGCONT"
        assert all(s.code == 250 for s in late), [(s.code, s.text) for s in late][:5]
        hung = [e for e in ing.events("child_hung") if e.get("kind") == "broker"]
        if heartbeat_timeout < 5.0:
            # Hang detection saw the frozen broker and replaced it.
            assert hung, "a broker frozen past heartbeat_timeout must be replaced"
            assert broker not in ing.children() and ing.children("broker-bulk")
        else:
            # Frozen for less than heartbeat_timeout: the same broker resumes, nothing restarts.
            assert not hung and not ing.events("child_exit"), ing.events("child_exit")
            assert ing.children("broker-bulk") == [broker]
        stored = {client_bytes(e) for e in ing.spooled().values()}
        dup_risk = sum(bodies[s.i] in stored for s in tempfailed)
        print(f"SIGSTOP ({heartbeat_timeout}s): {len(sent)} sent, codes {codes}, "
              f"{len(tempfailed)} tempfailed ({dup_risk} of them stored all the same: a retry "
              f"makes a duplicate, docs/design.md 'Duplicates'), "
              f"max wait {max(s.seconds for s in sent):.2f}s")
