"""ingress.edge.handoff: a fast acceptor that cannot admit a connection gives it back to the
acceptor that handed it over (issue 17: the hand-off never turns into a 421), and the acceptor takes
connections back only from a fast acceptor's own socket path. Real unix datagram sockets and
descriptors, in one event loop."""

from __future__ import annotations

import array
import asyncio
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingress.core import config
from ingress.edge import handoff
from tests.kit.harness import write_config


class FakeTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[config.Config]:
    """One fast acceptor; the state directory short (unix socket paths), removed after."""
    state = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))
    (state / "run").mkdir()
    write_config(tmp_path / "c.toml", {"spool": {"state_dir": str(state),
                                                 "path": str(tmp_path / "spool")},
                                       "supervisor": {"fast_acceptors": 1}})
    yield config.load(tmp_path / "c.toml")
    shutil.rmtree(state, ignore_errors=True)


def test_give_back_reaches_the_sender_and_only_from_a_fast_acceptor(cfg: config.Config) -> None:

    async def run() -> tuple[list[Any], list[bytes]]:
        loop = asyncio.get_running_loop()
        handed: list[tuple[socket.socket, Any]] = []
        returned: list[socket.socket] = []
        got = asyncio.Event()
        receiver = handoff.Receiver(cfg, 0, loop, lambda c, s: (handed.append((c, s)),
                                                                 got.set()))
        sender = handoff.Sender(cfg, loop, lambda c: (returned.append(c), got.set()))
        client, server = socket.socketpair()
        try:
            assert sender.offer(FakeTransport(server))           # handed over ...
            await asyncio.wait_for(got.wait(), 5)
            got.clear()
            conn, back_to = handed[0]
            assert back_to is not None
            assert receiver.give_back(FakeTransport(conn), back_to)   # ... and back
            await asyncio.wait_for(got.wait(), 5)
            got.clear()
            # an impostor (any process can reach an abstract address) is ignored
            impostor = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            impostor.sendmsg([handoff.RETURN], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 array.array("i", [server.fileno()]))],
                             0, sender.sock.getsockname())
            impostor.close()
            await asyncio.sleep(0.2)
            # the socket given back is the client's connection
            returned[0].setblocking(True)
            client.sendall(b"EHLO x\r\n")
            data = returned[0].recv(64)
            return [len(handed), len(returned)], [data]
        finally:
            for s in (client, server, conn, *returned):
                s.close()
            sender.close()
            receiver.close()

    counts, data = asyncio.run(run())
    assert counts == [1, 1] and data == [b"EHLO x\r\n"]


def test_a_replaced_fast_acceptor_leaves_its_successors_path(cfg: config.Config) -> None:
    """A reload starts the new fast acceptor (it binds the path, the old file unlinked) before
    the old one stops; the old one's close must not unlink the path its successor now holds.
    Before, it did: every hand-off after a reload failed with ENOENT (issue 20)."""

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        served: list[str] = []
        got = asyncio.Event()

        def serving(name: str) -> Any:
            return lambda conn, _sender: (served.append(name), conn.close(), got.set())

        old = handoff.Receiver(cfg, 0, loop, serving("old"))
        new = handoff.Receiver(cfg, 0, loop, serving("new"))
        old.close()
        sender = handoff.Sender(cfg, loop, lambda c: c.close())
        client, server = socket.socketpair()
        try:
            assert sender.offer(FakeTransport(server)), "the successor's path is gone"
            await asyncio.wait_for(got.wait(), 5)
            return served
        finally:
            client.close()
            server.close()
            sender.close()
            new.close()

    assert asyncio.run(run()) == ["new"]
