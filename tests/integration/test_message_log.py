"""One accept line and one relay line per message (issue 19, item 9: "no line names a
message's sender, size and recipients. Postfix's qmgr line has no counterpart").

A real ingress relaying to a real, private Postfix (tests/kit/postfix.py): three messages (one
from an allow-listed client, so fast lane and operator tier; one with two recipients) give
exactly three `message` lines when their 250 is sent, with the queue id, the client's address
and port, the sender, the recipient count, the size, the lane, the tier and identity; and
exactly three `relay` lines with the same queue ids, outcome delivered, the downstream's 250,
the attempts and the delay. Skips when Postfix cannot run here.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from tests.kit.harness import Ingress, make_body, send_one, wait_for
from tests.kit.postfix import PostfixInstance

pytestmark = pytest.mark.timeout(90)

QUEUED = re.compile(r"queued as ([0-9A-F]+)")
FAST = "127.0.0.9"


def test_one_accept_line_and_one_relay_line_per_message(tmp_path: Path,
                                                        postfix: PostfixInstance) -> None:
    sends = [  # (source, sender, recipients, body)
        ("127.0.0.1", "alice@sender.test", ("bob@example.test",), make_body(1, size=500)),
        ("127.0.0.2", "carol@sender.test", ("dave@example.test", "erin@example.test"),
         make_body(2, size=3000)),
        (FAST, "frank@sender.test", ("gina@example.test",), make_body(3, size=1200)),
    ]
    with Ingress(tmp_path, {
            "relay": {"downstream": f"smtp://127.0.0.1:{postfix.port}", "timeout": 10.0},
            "classify": {"allow_cidrs": [f"{FAST}/32"]}}) as ing:
        wait_for(lambda: ing.events("relay_start"), 15, "the relay")
        qids = {}
        for source, sender, rcpts, body in sends:
            code, text = asyncio.run(send_one(ing.port, body, sender=sender, rcpts=rcpts,
                                              source=source))
            assert code == 250, text
            m = QUEUED.search(text)
            assert m, text
            qids[m.group(1)] = (source, sender, rcpts, body)
        wait_for(lambda: len(ing.events("relay")) >= 3 and not list((ing.spool / "new").iterdir()),
                 30, "three relay lines")
        time.sleep(0.5)                     # a duplicate line would be written by now
        accepted, relayed = ing.events("message"), ing.events("relay")

    assert len(accepted) == 3, accepted
    assert {d["qid"] for d in accepted} == set(qids)
    for d in accepted:
        source, sender, rcpts, body = qids[d["qid"]]
        assert d["peer"] == source and isinstance(d["port"], int) and d["port"] > 0, d
        assert (d["sender"], d["rcpts"], d["size"]) == (sender, len(rcpts), len(body)), d
        fast = source == FAST
        assert d["lane"] == ("fast" if fast else "bulk"), d
        assert d["tier"] == ("operator" if fast else "unknown"), d
        assert d["identity"] == (f"allow:{FAST}/32" if fast else ""), d
        assert d["helo"] == "client.test" and d["reply"] == "250", d

    assert len(relayed) == 3, relayed
    assert {d["qid"] for d in relayed} == set(qids)
    for d in relayed:
        _, _, rcpts, _ = qids[d["qid"]]
        assert d["outcome"] == "delivered" and d["code"] == 250, d
        assert d["reply"].startswith("250 ") and not d["local"], d
        assert (d["attempts"], d["rcpts"], d["delivered"], d["failed"]) == (
            1, len(rcpts), len(rcpts), 0), d
        assert 0 <= d["delay_s"] < 30, d
