"""A private Postfix instance (tests/kit/postfix.py) starts on loopback, accepts and stops cleanly.

Checks, with a real Postfix on a free 127.0.0.1 port: one message sent with aiosmtplib gets 250
and lands as a Maildir file under maildir_root (delivery="maildir"); a foreign domain is refused
(no open relay); after stop() no process of the instance is left and the port is closed. Skips
when not root or Postfix is not installed (the needs_postfix marker). Budget: well under 20 s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from tests.kit.postfix import PostfixInstance, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not tmp_path: /tmp/pytest-of-root is 0700, and virtual(8) delivers as an unprivileged
    # user that must traverse every parent of maildir_root.
    d = Path(tempfile.mkdtemp(prefix="pf-instance-test-"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _send(port: int, rcpt: str, marker: str) -> tuple[dict[str, tuple[int, str]], str]:
    msg = EmailMessage()
    msg["From"] = "sender@source.test"
    msg["To"] = rcpt
    msg["Subject"] = "postfix instance test"
    msg.set_content(f"hello {marker}\n")

    async def go() -> tuple[dict[str, tuple[int, str]], str]:
        return await aiosmtplib.send(
            msg, hostname="127.0.0.1", port=port, sender="sender@source.test",
            recipients=[rcpt], timeout=10, start_tls=False,
        )

    return asyncio.run(go())


@pytest.mark.needs_postfix
def test_maildir_delivery_and_clean_stop(workdir: Path) -> None:
    maildir_root = workdir / "maildir"
    pf = PostfixInstance(workdir, free_port(), delivery="maildir", maildir_root=maildir_root,
                         accept_domains=("example.test",))
    with pf:
        pids = pf.pids()
        assert pids and pids[0] == pf.master_pid()
        marker = f"m-{os.getpid()}-{time.monotonic_ns()}"
        errors, reply = _send(pf.port, "alice@example.test", marker)
        assert errors == {}
        assert reply.startswith("2.0.0 Ok: queued"), reply

        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            _send(pf.port, "bob@foreign.test", marker)
        assert refused.value.recipients[0].code == 554

        deadline = time.monotonic() + 10
        while not pf.maildir_messages("example.test") and time.monotonic() < deadline:
            time.sleep(0.05)
        files = pf.maildir_messages("example.test")
        assert len(files) == 1, pf.log_tail()
        assert files[0].parent == maildir_root / "example.test" / "new"
        text = files[0].read_text()
        assert "Delivered-To: alice@example.test" in text
        assert marker in text
        pids = pf.pids()

    assert not pf.running
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not left, f"processes left behind: {left}"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", pf.port), timeout=1):
        pass
