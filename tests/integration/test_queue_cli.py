"""`smtp-ingress queue ...` through the real CLI (a subprocess) on a real spool.

Part 1, no relay running: files written by the real Spool.write_batch, relay state by the relay's
own write_state; every command, and bad input (unknown id, malformed file, a file locked by
someone else) -> a message on stderr and exit status 1.
Part 2, racing the running relay (a real ingress relaying to a real Postfix that delivers into a
Maildir): hold / delete / retry --all while a stream of messages is relayed: every message not
deleted arrives exactly once, a deleted one never; `retry` makes a deferred message due at once
despite a long backoff; `requeue-failed` retries only the failed recipient (the delivered one
is not sent twice). Part 2 skips when Postfix cannot run here.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingress.core.wire import Lane
from tests.kit.harness import (
    ROOT,
    Ingress,
    make_body,
    relaying,
    send_one,
    spool_count,
    wait_for,
    write_config,
)
from tests.kit.postfix import (
    PostfixInstance,
)
from tests.kit.relaykit import (
    REJECTED,
    TEMPFAIL,
    delivered,
    make_spool,
    put,
    relay_postfix,
    relay_tables,
)
from workers.spool.state import RelayState
from workers.spool.store import read_state, write_state

pytestmark = pytest.mark.timeout(120)

def cli(config: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingress", "queue", "--config", str(config),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def listing(cfg: Path) -> dict[str, dict[str, Any]]:
    r = cli(cfg, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {d["qid"]: d for d in orjson.loads(r.stdout)}


# --- part 1: every command on a real spool ------------------------------------------------------

def test_list_and_show(tmp_path: Path) -> None:
    cfg, spool = make_spool(tmp_path)
    assert cli(cfg, "list").stdout.strip() == "queue is empty"
    q1, n1 = put(spool, "alice@sender.test", ("a@example.test", "b@example.test", "c@example.test"),
                 lane=Lane.FAST, age=600)
    q2, _ = put(spool, "", ("d@example.test",))
    later = time.time() + 900
    write_state(spool / "relay", n1, RelayState(attempts=2, next_at=later,
                                                delivered=["a@example.test"],
                                                failed=["b@example.test"],
                                                last_error="451 4.3.0 try later"))
    docs = listing(cfg)
    assert set(docs) == {q1, q2}
    d = docs[q1]
    assert d["sender"] == "alice@sender.test" and d["lane"] == "fast" and d["queue"] == "new"
    assert d["recipients"] == {"a@example.test": "delivered", "b@example.test": "failed",
                               "c@example.test": "deferred"}
    assert d["attempts"] == 2 and abs(d["next_retry"] - later) < 1e-3
    assert 590 < d["age_s"] < 700 and d["size"] == (spool / "new" / n1).stat().st_size
    assert docs[q2]["sender"] == "" and docs[q2]["recipients"] == {"d@example.test": "pending"}
    text = cli(cfg, "list").stdout
    assert q1 in text and "<alice@sender.test>" in text and "next retry in 1" in text
    assert "c@example.test  deferred" in text and "451 4.3.0 try later" in text

    r = cli(cfg, "show", q1)
    assert r.returncode == 0, r.stderr
    head, _, message = r.stdout.partition("\n\n")
    doc = orjson.loads(head)
    assert doc["envelope"]["qid"] == q1 and doc["envelope"]["rcpts"][0] == "a@example.test"
    assert doc["recipients"]["a@example.test"] == "delivered"
    assert message.replace("\n", "\r\n") == f"Received: x\r\nSubject: {q1}\r\n\r\nhello\r\n"


def test_bad_input_exit_1(tmp_path: Path) -> None:
    cfg, spool = make_spool(tmp_path)
    for args in (("show", "NOSUCHID"), ("delete", "NOSUCHID"), ("hold", "NOSUCHID"),
                 ("release", "NOSUCHID"), ("retry", "NOSUCHID"), ("requeue-failed", "NOSUCH"),
                 ("show", "../../etc/passwd")):
        r = cli(cfg, *args)
        assert r.returncode == 1, (args, r)
        assert r.stderr.startswith("smtp-ingress queue: ") and "Traceback" not in r.stderr, r
    bad = spool / "new" / "1700000000.BADFILE0000000000000.host"
    bad.write_bytes(b"this is not a spool file\r\n")
    text = cli(cfg, "list").stdout
    assert "BADFILE0000000000000" in text and "MALFORMED" in text
    r = cli(cfg, "show", "BADFILE0000000000000")
    assert r.returncode == 1 and "malformed spool file" in r.stderr, r
    (spool / "failed" / bad.name).write_bytes(b"X-Ingress-Envelope: {not json\r\n\r\n")
    r = cli(cfg, "requeue-failed", "BADFILE0000000000000")
    assert r.returncode == 1 and "malformed" in r.stderr and "not requeued" in r.stderr, r
    assert (spool / "failed" / bad.name).exists()
    q, _ = put(spool, "a@sender.test", ("x@example.test",))
    r = cli(cfg, "release", q)
    assert r.returncode == 1 and "is in new/" in r.stderr, r


def test_hold_release_keep_state(tmp_path: Path) -> None:
    cfg, spool = make_spool(tmp_path)
    q, name = put(spool, "a@sender.test", ("x@example.test", "y@example.test"))
    raw = (spool / "new" / name).read_bytes()
    write_state(spool / "relay", name, RelayState(attempts=1, next_at=time.time() + 999,
                                                  delivered=["x@example.test"]))
    r = cli(cfg, "hold", q)
    assert r.returncode == 0 and f"{q}: held" in r.stdout, r
    assert not (spool / "new" / name).exists() and not (spool / "relay" / name).exists()
    assert (spool / "hold" / name).read_bytes() == raw
    d = listing(cfg)[q]
    assert d["queue"] == "hold" and d["recipients"]["x@example.test"] == "delivered"
    assert cli(cfg, "hold", q).returncode == 1             # not in new/ any more
    r = cli(cfg, "release", q)
    assert r.returncode == 0, r
    assert (spool / "new" / name).read_bytes() == raw and not (spool / "hold" / name).exists()
    st = read_state(spool / "relay", name)
    assert st.delivered == ["x@example.test"] and st.next_at == 0.0, "released: due now"


def test_retry_delete_requeue(tmp_path: Path) -> None:
    cfg, spool = make_spool(tmp_path)
    q1, n1 = put(spool, "a@sender.test", ("x@example.test",))
    q2, _ = put(spool, "spam@bad.test", ("x@example.test",))
    q3, _ = put(spool, "SPAM@bad.test", ("y@example.test",))
    write_state(spool / "relay", n1, RelayState(attempts=3, next_at=time.time() + 3600))
    r = cli(cfg, "retry", q1)
    assert r.returncode == 0 and "due now" in r.stdout
    assert read_state(spool / "relay", n1).next_at == 0.0
    assert read_state(spool / "relay", n1).attempts == 3
    assert (spool / "retry" / n1).exists(), "the request a running relay picks up"
    assert "3 message(s) due now" in cli(cfg, "retry", "--all").stdout
    r = cli(cfg, "delete", "--all-from", "<spam@bad.test>")
    assert r.returncode == 0 and "2 message(s)" in r.stdout, r
    assert set(listing(cfg)) == {q1}
    write_state(spool / "relay", n1, RelayState(attempts=1, next_at=time.time() + 60))
    assert cli(cfg, "delete", q1).returncode == 0
    assert not (spool / "new" / n1).exists() and not (spool / "relay" / n1).exists()
    assert cli(cfg, "delete", q1).returncode == 1
    # failed/ with the state the relay keeps there: only the failed recipient is tried again
    q4, n4 = put(spool, "a@sender.test", ("ok@example.test", "bad@example.test"))
    os.rename(spool / "new" / n4, spool / "failed" / n4)
    (spool / "relay.failed").mkdir(exist_ok=True)
    write_state(spool / "relay.failed", n4, RelayState(
        attempts=2, delivered=["ok@example.test"], failed=["bad@example.test"]))
    assert listing(cfg)[q4]["queue"] == "failed"
    r = cli(cfg, "requeue-failed")
    assert r.returncode == 0 and "1 message(s) requeued" in r.stdout, r
    assert (spool / "new" / n4).exists() and not (spool / "failed" / n4).exists()
    st = read_state(spool / "relay", n4)
    assert st.delivered == ["ok@example.test"] and st.failed == [] and st.next_at == 0.0
    assert not (spool / "relay.failed" / n4).exists()
    assert q2 and q3


@pytest.mark.parametrize(("cmd", "relay_does"), [("delete", "delivered"), ("hold", "failed"),
                                                ("hold", "delivered"), ("retry", "failed")])
def test_waits_for_the_relay_then_sees_it_gone(tmp_path: Path, cmd: str,
                                               relay_does: str) -> None:
    """The relay holds the file's lock while delivering; the command waits, and once the relay
    has finished (unlinked it, or moved it to failed/) it must not act on the stale file."""
    cfg, spool = make_spool(tmp_path)
    q, name = put(spool, "a@sender.test", ("x@example.test",))
    path = spool / "new" / name
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "ingress", "queue", "--config",
                                 str(cfg), "--wait", "20", cmd, q], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.5)                       # the command is up and waiting for the lock
        assert proc.poll() is None, proc.communicate()
        if relay_does == "delivered":
            path.unlink()
        else:
            os.rename(path, spool / "failed" / name)
    finally:
        os.close(fd)                          # the relay is done with it
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "gone meanwhile" in err, (out, err)
    assert not any((spool / "hold").iterdir()), "a held copy of a finished message"
    if relay_does == "failed":
        assert (spool / "failed" / name).exists()


def test_no_spool_and_owner(tmp_path: Path) -> None:
    cfg = tmp_path / "elsewhere.toml"
    write_config(cfg, {"smtp": {"accepted_domains": ["example.test"]},
                       "spool": {"path": str(tmp_path / "nothing"),
                                 "state_dir": str(tmp_path / "st")}})
    r = cli(cfg, "list")
    assert r.returncode == 1 and "no spool here" in r.stderr, r
    assert not (tmp_path / "nothing").exists(), "a typo must not create a spool"
    if os.geteuid() != 0:
        return
    # run as root on a spool the service user owns: what we create is the service user's
    # (the spool's parents must be traversable by that user, as /var/spool is)
    base = Path(tempfile.mkdtemp(prefix="queue-owner-"))
    base.chmod(0o755)
    try:
        owned_by_service_user(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def owned_by_service_user(tmp_path: Path) -> None:
    cfg, spool = make_spool(tmp_path)
    q, name = put(spool, "a@sender.test", ("x@example.test",))
    write_state(spool / "relay", name, RelayState(attempts=1, next_at=time.time() + 99))
    for p in [spool, *spool.rglob("*")]:
        os.chown(p, 65534, 65534)
    assert cli(cfg, "hold", q).returncode == 0
    assert cli(cfg, "release", q).returncode == 0
    assert cli(cfg, "retry", q).returncode == 0
    for p in [spool, *spool.rglob("*")]:
        assert (p.stat().st_uid, p.stat().st_gid) == (65534, 65534), p


def test_busy_file_is_not_touched(tmp_path: Path) -> None:
    cfg, spool = make_spool(tmp_path)
    q, name = put(spool, "a@sender.test", ("x@example.test",))
    fd = os.open(spool / "new" / name, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)              # as the relay does while delivering
        for cmd in ("delete", "hold"):
            r = subprocess.run([sys.executable, "-m", "ingress", "queue", "--config",
                                str(cfg), "--wait", "0.3", cmd, q], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 1 and "busy" in r.stderr, r
        assert (spool / "new" / name).exists() and not (spool / "hold" / name).exists()
    finally:
        os.close(fd)
    assert cli(cfg, "delete", q).returncode == 0


# --- part 2: racing the running relay -----------------------------------------------------------

@pytest.fixture(scope="module")
def slow_postfix() -> Iterator[PostfixInstance]:
    """Each delivery takes a second (at DATA): the relay has a backlog and files in delivery
    (locked) while the commands run."""
    yield from relay_postfix("queue-slow-pf-", {"smtpd_data_restrictions": "sleep 1"})


def test_commands_race_the_relay(tmp_path: Path, slow_postfix: PostfixInstance) -> None:
    postfix = slow_postfix
    n = 60
    rcpts = [f"race{i}.{time.time_ns()}@example.test" for i in range(n)]
    rng = random.Random(12)
    with Ingress(tmp_path, relay_tables(postfix)) as ing:
        relaying(ing)
        sent: dict[str, int] = {}

        def sender() -> None:
            async def go() -> None:
                for i, r in enumerate(rcpts):
                    sent[r] = (await send_one(ing.port, make_body(i), rcpts=(r,)))[0]
                    await asyncio.sleep(0.05)
            asyncio.run(go())

        t = threading.Thread(target=sender)
        t.start()
        deleted: set[str] = set()
        held: set[str] = set()
        outcomes: list[tuple[str, int, str]] = []
        commands = ("delete", "hold", "retry", "retry-all")
        deadline = time.monotonic() + 60
        while (t.is_alive() or spool_count(ing, "new")) and time.monotonic() < deadline:
            docs = sorted((d for d in listing(ing.config).values() if d["queue"] == "new"),
                          key=lambda d: d["received_at"])
            if docs:
                # Every command in turn (a random draw sometimes skipped one), against the oldest
                # (the one the relay is most likely delivering right now) and a random one.
                cmd = commands[len(outcomes) % len(commands)]
                d = docs[0] if (len(outcomes) // len(commands)) % 2 == 0 else rng.choice(docs)
                r = (cli(ing.config, "retry", "--all") if cmd == "retry-all"
                     else cli(ing.config, cmd, d["qid"]))
                outcomes.append((cmd, r.returncode, r.stderr))
                assert "Traceback" not in r.stderr, r.stderr
                (rcpt,) = d["recipients"]
                if r.returncode == 0 and cmd == "delete":
                    deleted.add(rcpt)
                elif r.returncode == 0 and cmd == "hold":
                    held.add(rcpt)
                elif r.returncode:
                    # delivered between our list and the command, or while we waited
                    assert any(w in r.stderr for w in ("gone meanwhile", "busy", "no such")), r
            time.sleep(0.05)
        t.join(60)
        print("outcomes:", sorted((c, rc, e.split(": ")[-1].strip()[:30]) for c, rc, e in outcomes))
        assert all(code == 250 for code in sent.values()) and len(sent) == n
        assert held and deleted, outcomes                # the race did exercise both
        docs = listing(ing.config).values()
        assert {r for d in docs for r in d["recipients"]} == held
        for d in docs:
            assert d["queue"] == "hold"
            assert cli(ing.config, "release", d["qid"]).returncode == 0
        wait_for(lambda: spool_count(ing, "new") == 0, 30, "the spool to drain")
        assert not listing(ing.config), "nothing left: not in failed/, not held"
        want = set(rcpts) - deleted
        wait_for(lambda: len(delivered(postfix).keys() & set(rcpts)) >= len(want), 30,
                 "Postfix to deliver every message not deleted")
        time.sleep(1.0)                                  # would a duplicate still show up?
        assert not ing.events("relay_unsure")
    got = delivered(postfix)
    assert {r for r in rcpts if r in got} == want, "lost or delivered although deleted"
    dups = {r: len(got[r]) for r in want if len(got[r]) != 1}
    assert not dups, f"delivered twice: {dups}"


def test_retry_makes_deferred_due_now(tmp_path: Path, postfix: PostfixInstance) -> None:
    with Ingress(tmp_path, relay_tables(postfix, retry_base=600.0)) as ing:
        relaying(ing)
        assert asyncio.run(send_one(ing.port, make_body(1), rcpts=(TEMPFAIL,)))[0] == 250
        wait_for(lambda: sum(e["outcome"] == "deferred" for e in ing.events("relay")) == 1, 20,
                 "the first 450")
        (d,) = listing(ing.config).values()
        assert d["recipients"] == {TEMPFAIL: "deferred"} and d["next_retry"] > time.time() + 500
        time.sleep(0.6)                                   # the relay's scans see nothing due
        assert sum(e["outcome"] == "deferred" for e in ing.events("relay")) == 1
        r = cli(ing.config, "retry", d["qid"])
        assert r.returncode == 0, r
        wait_for(lambda: sum(e["outcome"] == "deferred" for e in ing.events("relay")) == 2, 10,
                 "the relay to try again at once (backoff was 600 s)")
        assert listing(ing.config)[d["qid"]]["attempts"] == 2


def test_retry_wakes_the_relay_out_of_its_downstream_backoff(
        tmp_path: Path, postfix: PostfixInstance) -> None:
    """issue 19 item 9: the downstream was down, so the relay's circuit breaker backs off
    (600 s here, as after a long outage); `queue retry --all` must make it try at once, not
    only mark the message due. Still down: one probe, then the backoff again (no storm)."""
    rcpt = f"wake{time.time_ns()}@example.test"
    postfix.stop()
    try:
        with Ingress(tmp_path, relay_tables(postfix, retry_base=600.0)) as ing:
            relaying(ing)
            assert asyncio.run(send_one(ing.port, make_body(3), rcpts=(rcpt,)))[0] == 250
            wait_for(lambda: ing.events("relay_downstream_down"), 20, "the relay to back off")
            (down,) = ing.events("relay_downstream_down")
            assert down["retry_in_s"] > 500, down
            # still down: the retry wakes the relay for one probe, which backs off again
            r = cli(ing.config, "retry", "--all")
            assert r.returncode == 0 and "1 message(s) due now" in r.stdout, r
            wait_for(lambda: len(ing.events("relay_downstream_down")) == 2, 10,
                     "the relay to probe the downstream at once (its backoff was 600 s)")
            time.sleep(1.0)
            assert len(ing.events("relay_downstream_down")) == 2, "one probe per retry"
            postfix.start()
            time.sleep(1.0)                  # back up, but the relay waits out its backoff
            assert rcpt not in delivered(postfix) and spool_count(ing, "new") == 1
            r = cli(ing.config, "retry", "--all")
            assert r.returncode == 0 and "1 message(s) due now" in r.stdout, r
            wait_for(lambda: rcpt in delivered(postfix), 10,
                     "delivery right after `queue retry --all`")
            wait_for(lambda: spool_count(ing, "new") == 0, 10, "the spool to drain")
            assert ing.events("relay_downstream_up")
    finally:
        postfix.start()                      # the module's other tests need it (idempotent)


def test_requeue_failed_skips_delivered(tmp_path: Path, postfix: PostfixInstance) -> None:
    good = f"good{time.time_ns()}@example.test"
    with Ingress(tmp_path, relay_tables(postfix)) as ing:
        relaying(ing)
        assert asyncio.run(send_one(ing.port, make_body(2), rcpts=(good, REJECTED)))[0] == 250
        wait_for(lambda: spool_count(ing, "failed") == 1, 20, "the message in failed/")
        (d,) = [x for x in listing(ing.config).values() if x["queue"] == "failed"]
        assert d["recipients"] == {good: "delivered", REJECTED: "failed"}
        r = cli(ing.config, "requeue-failed", d["qid"])
        assert r.returncode == 0, r
        wait_for(lambda: len(ing.events("relay_bounced")) == 2, 20, "the second bounce")
        wait_for(lambda: spool_count(ing, "failed") == 1 and spool_count(ing, "new") == 0, 20,
                 "the message back in failed/")
        second = ing.events("relay_bounced")[1]
        assert second["rcpts"] == [REJECTED]
        time.sleep(0.5)
    assert len(delivered(postfix)[good]) == 1, "the delivered recipient got it twice"
