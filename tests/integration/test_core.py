"""The ingress end to end: real supervisor, acceptors, brokers and workers on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit.harness import ROOT, Ingress, client_bytes, make_body, send_one, smtp_dialogue

QUEUED = re.compile(r"queued as ([0-9A-F]+)")


@pytest.fixture
def ingress(tmp_path: Path):
    with Ingress(tmp_path) as ing:
        yield ing


def backlogs(port: int) -> list[int]:
    """The listen(2) backlog of every socket listening on `port` (ss's Send-Q of a LISTEN)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.startswith("LISTEN")]


def listeners(port: int) -> int:
    return len(backlogs(port))


def test_listen_backlog_is_the_configured_one(tmp_path: Path) -> None:
    """listen.backlog holds on every socket an acceptor serves (port 25, the fast port, the
    sockets steered to the fast acceptor), not asyncio's default of 100 that create_server
    puts back when handed a socket: with 100, a flood's SYNs are dropped and a legitimate
    client waits a SYN retransmission (1 s, then 3 s)."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    want = min(777, somaxconn)
    with Ingress(tmp_path, {"listen": {"backlog": 777, "fast_port": 0},
                            "classify": {"allow_cidrs": ["127.0.0.10/32"]}}) as ing:
        fast_port = int(ing.events("ready")[-1]["fast_port"])   # every acceptor serves
        port25, fast = backlogs(ing.port), backlogs(fast_port)
        assert len(port25) >= 2, port25
        assert port25 == [want] * len(port25), port25
        assert fast and fast == [want] * len(fast), fast


async def send_many(port: int, n: int, concurrency: int,
                    bodies: dict[int, bytes]) -> dict[int, tuple[int, str]]:
    sem = asyncio.Semaphore(concurrency)
    results: dict[int, tuple[int, str]] = {}

    async def one(i: int) -> None:
        async with sem:
            results[i] = await send_one(port, bodies[i], rcpts=(f"user{i}@example.test",))

    await asyncio.gather(*(one(i) for i in range(n)))
    return results


def test_500_messages_durable_byte_exact(ingress: Ingress) -> None:
    assert listeners(ingress.port) == 2, "one listening socket per acceptor"
    bodies = {i: make_body(i, size=512 + 37 * i) for i in range(500)}
    bodies[7] = make_body(7, extra=b".leading dot line\r\n..two dots\r\n\xc3\xa9 8-bit\r\n")
    results = asyncio.run(send_many(ingress.port, 500, 20, bodies))
    accepted = {i: QUEUED.search(text).group(1) for i, (code, text) in results.items()
                if code == 250}
    assert len(accepted) == 500, {i: r for i, r in results.items() if r[0] != 250}
    spooled = ingress.spooled()          # asserts that no qid is spooled twice
    assert set(spooled) == set(accepted.values())
    for i, qid in accepted.items():
        entry = spooled[qid]
        assert client_bytes(entry) == bodies[i], f"message {i} altered"
        assert entry.envelope["mail_from"] == "alice@sender.test"
        assert entry.envelope["rcpts"] == [f"user{i}@example.test"]
        assert entry.envelope["helo"] == "client.test"
        assert entry.envelope["peer_ip"] == "127.0.0.1"
    assert not list((ingress.spool / "tmp").iterdir())


def test_policy_replies(ingress: Ingress) -> None:
    port = ingress.port
    big = b"x" * 998 + b"\r\n"

    async def scenarios() -> dict[str, list[str]]:
        ehlo = b"EHLO c.test\r\n"
        mail = b"MAIL FROM:<a@sender.test>\r\n"
        return {
            "ehlo": await smtp_dialogue(port, [ehlo, b"QUIT\r\n"]),
            "relay": await smtp_dialogue(port, [ehlo, mail, b"RCPT TO:<x@elsewhere.test>\r\n",
                                                b"RCPT TO:<x@example.test.evil>\r\n",
                                                b"RCPT TO:<x%elsewhere.test@example.test>\r\n",
                                                b"QUIT\r\n"]),
            "size_declared": await smtp_dialogue(port, [ehlo, b"MAIL FROM:<a@s.test> SIZE=99999999"
                                                              b"\r\n"]),
            "too_big": await smtp_dialogue(port, [ehlo, mail, b"RCPT TO:<b@example.test>\r\n",
                                                  b"DATA\r\n", big * 12000 + b".\r\n"]),
            "data_long_line": await smtp_dialogue(port, [ehlo, mail,
                                                         b"RCPT TO:<b@example.test>\r\n",
                                                         b"DATA\r\n", b"y" * 1200 + b"\r\n.\r\n",
                                                         b"NOOP\r\n"]),
            "rcpts": await smtp_dialogue(port, [ehlo, mail] + [
                f"RCPT TO:<u{i}@example.test>\r\n".encode() for i in range(101)]),
            "bare_lf": await smtp_dialogue(port, [ehlo, mail, b"RCPT TO:<b@example.test>\r\n",
                                                  b"DATA\r\n",
                                                  b"Subject: x\r\n\r\nsmuggle\n.\r\nMAIL FROM:<e@v>"
                                                  b"\r\n.\r\n"]),
            "bare_cr": await smtp_dialogue(port, [ehlo, mail, b"RCPT TO:<b@example.test>\r\n",
                                                  b"DATA\r\n", b"Subject: x\r\n\r\na\rb\r\n.\r\n"]),
            "garbage": await smtp_dialogue(port, [b"\x00\xff\xfe\x80garbage\x01\r\n", ehlo,
                                                  b"NOOP\r\n"]),
            "long_line": await smtp_dialogue(port, [b"EHLO " + b"a" * 2000 + b"\r\n", ehlo]),
            "auth": await smtp_dialogue(port, [ehlo, b"AUTH PLAIN AGFhAGI=\r\n"]),
            "good_after_bad": await smtp_dialogue(port, [ehlo, mail,
                                                         b"RCPT TO:<b@example.test>\r\n",
                                                         b"DATA\r\n", b"a\nb\r\n.\r\n", mail,
                                                         b"RCPT TO:<b@example.test>\r\n",
                                                         b"DATA\r\n", b"ok\r\n.\r\n"]),
        }

    r = asyncio.run(scenarios())
    banner, ehlo = r["ehlo"][0], r["ehlo"][1]
    assert banner.startswith("220 mx.test")
    for ext in ("SIZE", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
        assert ext in ehlo
    assert "AUTH" not in ehlo and "STARTTLS" not in ehlo
    assert all(x.startswith("550 5.7.1") for x in r["relay"][3:6]), r["relay"]
    assert r["size_declared"][2].startswith("552"), r["size_declared"]
    assert r["too_big"][-1].startswith("552"), r["too_big"][-1]
    assert r["data_long_line"][-2].startswith("500 Line too long"), r["data_long_line"]
    assert r["data_long_line"][-1].startswith("250"), "the session survives"
    assert all(x.startswith("250") for x in r["rcpts"][3:103]) and r["rcpts"][103].startswith(
        "452 4.5.3"), r["rcpts"][100:]
    assert r["bare_lf"][-1].startswith("550 5.6.0"), r["bare_lf"]
    assert r["bare_cr"][-1].startswith("550 5.6.0"), r["bare_cr"]
    assert r["garbage"][1].startswith("500"), r["garbage"]
    assert r["garbage"][2].startswith("250") and r["garbage"][3].startswith("250"), r["garbage"]
    assert r["long_line"][1].startswith("500") and r["long_line"][2].startswith("250")
    assert r["auth"][2].startswith("502"), r["auth"]
    assert r["good_after_bad"][5].startswith("550 5.6.0")
    assert r["good_after_bad"][-1].startswith("250 2.0.0"), r["good_after_bad"]
    # Only the one good message was spooled: nothing from the refused ones.
    spooled = ingress.spooled()
    assert len(spooled) == 1
    assert client_bytes(next(iter(spooled.values()))) == b"ok\r\n"
    assert "Traceback" not in ingress.log_tail(500)


def test_stalled_client_cut_at_timeout(tmp_path: Path) -> None:
    with Ingress(tmp_path, {"smtp": {"idle_timeout": 1.5, "ack_timeout": 1.0},
                                 "classify": {"dkim_deadline": 0.5}}) as ing:
        async def stall() -> tuple[list[str], float]:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await smtp_dialogue(ing.port, [
                b"EHLO c.test\r\n", b"MAIL FROM:<a@s.test>\r\n", b"RCPT TO:<b@example.test>\r\n",
                b"DATA\r\n", b"Subject: half a message\r\n"], read_timeout=10)
            return r, loop.time() - t0

        replies, took = asyncio.run(stall())
        assert replies[-1].startswith("421 4.4.2"), replies
        assert took < 5
        assert not ing.spooled()


def test_idle_timer_moves_with_each_command_then_cuts(tmp_path: Path) -> None:
    """The idle timer is lazy (armed once, re-armed when it fires early): commands past its
    first deadline keep the session, and silence after them still ends it at idle_timeout."""
    with Ingress(tmp_path, {"smtp": {"idle_timeout": 1.0, "ack_timeout": 0.5},
                            "classify": {"dkim_deadline": 0.25}}) as ing:
        async def talk_then_stall() -> tuple[list[str], float]:
            reader, writer = await asyncio.open_connection("127.0.0.1", ing.port)
            lines = [(await reader.readline()).decode()]
            for _ in range(7):                 # 2.8 s of commands: past 2 deadlines of 1 s
                writer.write(b"NOOP\r\n")
                lines.append((await asyncio.wait_for(reader.readline(), 5)).decode())
                await asyncio.sleep(0.4)
            t0 = asyncio.get_running_loop().time()
            lines.append((await asyncio.wait_for(reader.readline(), 10)).decode())
            took = asyncio.get_running_loop().time() - t0
            writer.close()
            return lines, took

        lines, took = asyncio.run(talk_then_stall())
        assert all(ln.startswith("250") for ln in lines[1:8]), lines
        assert lines[-1].startswith("421 4.4.2"), lines
        assert 0.3 < took < 4, took


def test_session_deadline(tmp_path: Path) -> None:
    with Ingress(tmp_path, {"smtp": {"idle_timeout": 2.0, "ack_timeout": 1.0,
                                     "session_deadline": 2.5},
                            "classify": {"dkim_deadline": 0.5}}) as ing:
        async def slow_noops() -> list[str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", ing.port)
            lines = [(await reader.readline()).decode()]
            for _ in range(10):
                writer.write(b"NOOP\r\n")
                line = await asyncio.wait_for(reader.readline(), 5)
                lines.append(line.decode())
                if not line or line.startswith(b"421"):
                    break
                await asyncio.sleep(0.5)
            writer.close()
            return lines

        # NOOP every 0.5 s keeps the idle timer happy; the session deadline still ends it.
        lines = asyncio.run(slow_noops())
        assert lines[-1].startswith("421 4.4.2"), lines
        assert len(lines) < 10


def test_status_command(tmp_path: Path) -> None:
    with Ingress(tmp_path, {"metrics": {"listen": "127.0.0.1:0"}}) as ing:
        # Port 0 was for the test; status reads the running instance, so give it the real one.
        metrics_port = next(int(str(e["listen"]).rsplit(":", 1)[1])
                            for e in ing.events("metrics_listening"))
        cfg = ing.config.read_text().replace('listen = "127.0.0.1:0"',
                                             f'listen = "127.0.0.1:{metrics_port}"')
        (tmp_path / "status.toml").write_text(cfg)

        async def hold_and_send() -> tuple[int, str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", ing.port)
            await reader.readline()
            code = await send_one(ing.port, make_body(1))
            r = subprocess.run([sys.executable, "-m", "ingress", "status", "--json",
                                "--config", str(tmp_path / "status.toml")],
                               capture_output=True, text=True, timeout=30, cwd=ROOT)
            writer.close()
            assert code[0] == 250
            return r.returncode, r.stdout

        rc, out = asyncio.run(hold_and_send())
        assert rc == 0, out
        doc = json.loads(out)
        assert doc["lanes"]["bulk"]["workers"] >= 1 and doc["lanes"]["fast"]["workers"] >= 1
        assert doc["lanes"]["bulk"]["acked"] == 1
        assert doc["sessions"]["bulk"] >= 1          # the connection held open above
        assert doc["spool"]["new"] == 1
        assert doc["spool"]["journal"] == 0          # the lane workers' journals: nothing pending
    # Nothing running: the lanes are down, exit 1.
    r = subprocess.run([sys.executable, "-m", "ingress", "status", "--config",
                        str(tmp_path / "status.toml")], capture_output=True, text=True,
                       timeout=30, cwd=ROOT)
    assert r.returncode == 1 and "DOWN" in r.stdout


def test_second_instance_refused(ingress: Ingress, tmp_path: Path) -> None:
    """SO_REUSEPORT would let a second instance share the port (and split the mail between two
    spools); the supervisor refuses instead, and refuses a state dir that is in use."""
    text = ingress.config.read_text()
    same_port = tmp_path / "same_port.toml"
    same_port.write_text(text.replace("port = 0", f"port = {ingress.port}").replace(
        str(ingress.state), str(tmp_path / "other-state")))
    same_state = tmp_path / "same_state.toml"
    same_state.write_text(text)
    for cfg, why in ((same_port, "already in use"), (same_state, "in use by another")):
        r = subprocess.run([sys.executable, "-m", "ingress", "run", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode == 1 and why in r.stderr, (r.returncode, r.stderr)
    code, text = asyncio.run(send_one(ingress.port, make_body(1)))
    assert code == 250, text
