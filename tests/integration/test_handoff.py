"""Fast acceptors (ingress.edge.handoff, issue 8 item 4): a client classified fast at connect is
served by a fast acceptor, not on the port-25 acceptors' loops where bots and spam are; when
no fast acceptor is up it is served where it arrived, never refused."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

from tests.kit.harness import Ingress, make_body, send_one

TRUSTED = "127.0.0.20"
OTHER = "127.0.0.21"


def _served_by(ing: Ingress, peer: str) -> list[str]:
    return [d["proc"] for d in ing.events("message") if d.get("peer") == peer]


def test_fast_clients_are_served_by_the_fast_acceptor(tmp_path: Path) -> None:
    tables = {"classify": {"allow_cidrs": [f"{TRUSTED}/32"]},
              "supervisor": {"acceptors": 2, "fast_acceptors": 1}}
    with Ingress(tmp_path, tables) as ing:
        assert len(ing.children("fast-acceptor")) == 1
        assert len(ing.children("acceptor")) == 2

        async def go() -> list[tuple[int, str]]:
            out = []
            for i in range(6):
                out.append(await send_one(ing.port, make_body(i), source=TRUSTED))
                out.append(await send_one(ing.port, make_body(100 + i), source=OTHER))
            return out

        codes = [c for c, _ in asyncio.run(go())]
        assert codes == [250] * 12
        deadline = time.monotonic() + 5
        while len(_served_by(ing, TRUSTED)) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(_served_by(ing, TRUSTED)) == {"fast-acceptor-0"}
        assert set(_served_by(ing, OTHER)) <= {"acceptor-0", "acceptor-1"}
        assert len(_served_by(ing, OTHER)) == 6
        # the whole dialogue (EHLO, pipelined commands, STARTTLS-less DATA) happens there
        lanes = {d.get("lane") for d in ing.events("message") if d.get("peer") == TRUSTED}
        assert lanes == {"fast"}
        assert len(ing.spooled()) == 12


def test_without_a_fast_acceptor_the_client_is_served_where_it_arrived(tmp_path: Path) -> None:
    tables = {"classify": {"allow_cidrs": [f"{TRUSTED}/32"]},
              "supervisor": {"acceptors": 1, "fast_acceptors": 1,
                             # keep it down long enough to be seen gone
                             "restart_backoff": 5.0, "restart_backoff_max": 5.0}}
    with Ingress(tmp_path, tables) as ing:
        (fast,) = ing.children("fast-acceptor")
        os.kill(fast, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while fast in ing.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        # the premise: nothing receives on the fast acceptor's socket any more
        path = str(ing.state / "run" / "fast-acceptor-0.sock")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        while time.monotonic() < deadline:
            try:
                probe.sendto(b"probe", path)        # ignored by a receiver: no descriptor
            except OSError:
                break
            time.sleep(0.05)
        probe.close()
        # and the kernel no longer steers the allow list to its port-25 socket (the
        # supervisor turns steering off when it sees the child gone: listen.steer_operator)
        while time.monotonic() < deadline and not any(
                e.get("on") is False for e in ing.events("steering")[1:]):
            time.sleep(0.05)
        code, text = asyncio.run(send_one(ing.port, make_body(1), source=TRUSTED))
        assert code == 250, (text, ing.log_tail())
        deadline = time.monotonic() + 5
        while not _served_by(ing, TRUSTED) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _served_by(ing, TRUSTED) == ["acceptor-0"], ing.log_tail()
        assert ing.events("handoff_failed")


def test_early_talk_travels_with_the_socket(tmp_path: Path) -> None:
    """Bytes the client sent before the banner are in the kernel socket, which is handed over
    whole: the fast acceptor reads them (fast clients have no greet pause, so this is
    pipelining, answered in order)."""
    tables = {"classify": {"allow_cidrs": ["127.0.0.1/32"]},
              "supervisor": {"fast_acceptors": 1}}

    async def talk(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\n"
                     b"RCPT TO:<b@example.test>\r\nDATA\r\n")      # before the banner
        await writer.drain()
        got = b""
        async with asyncio.timeout(10):
            while b"354" not in got:
                got += await reader.read(4096)
            writer.write(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
            while True:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                got += chunk
        writer.close()
        return got

    with Ingress(tmp_path, tables) as ing:
        got = asyncio.run(talk(ing.port)).decode()
        codes = [line[:3] for line in got.splitlines() if line[3:4] == " "]
        assert codes == ["220", "250", "250", "250", "354", "250", "221"], got
        assert _served_by(ing, "127.0.0.1") == ["fast-acceptor-0"]


def test_hand_offs_survive_a_reload(tmp_path: Path) -> None:
    """A reload replaces the fast acceptor: the new one binds the hand-off path before the old
    one stops, and the old one's exit leaves the new one's path alone (issue 20: it unlinked
    it, and every hand-off after a reload failed with ENOENT until a restart). Steering is off
    here, so the hand-off is the only way to the fast acceptor."""
    tables = {"classify": {"allow_cidrs": [f"{TRUSTED}/32"]},
              "listen": {"steer_operator": False},
              "supervisor": {"acceptors": 1, "fast_acceptors": 1}}
    with Ingress(tmp_path, tables) as ing:
        (old,) = ing.children("fast-acceptor")
        assert asyncio.run(send_one(ing.port, make_body(0), source=TRUSTED))[0] == 250
        ing.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
                not ing.events("reloaded") or old in ing.children()):
            time.sleep(0.1)
        assert ing.events("reloaded") and old not in ing.children(), ing.log_tail()
        (new,) = ing.children("fast-acceptor")
        code, text = asyncio.run(send_one(ing.port, make_body(1), source=TRUSTED))
        assert code == 250, text
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                d.get("pid") == new for d in ing.events("message") if d.get("peer") == TRUSTED):
            time.sleep(0.05)
        served = [(d["proc"], d["pid"]) for d in ing.events("message") if d.get("peer") == TRUSTED]
        assert served == [("fast-acceptor-0", old), ("fast-acceptor-0", new)], ing.log_tail()
        assert not ing.events("handoff_failed")
