"""A lane broker in the test's own process, and the DEALER sockets that play its acceptors and
workers (the broker tests drive the Broker object turn by turn on its own ipc sockets).

API
    broker_in(state, lane, extra="") -> Broker     a Broker whose state and spool are under
                                                    `state`, with these extra TOML lines
    close_broker(b)                                 its sockets closed
    dealer(b, name, ident) -> zmq.Socket            a DEALER with routing id `ident` on the
                                                    broker's ipc endpoint `name` ("fast-front",
                                                    "bulk-back"...), LINGER 0
"""

from __future__ import annotations

from pathlib import Path

import zmq

from ingress.core import config
from workers.lane.broker import Broker


def broker_in(state: Path, lane: str, extra: str = "") -> Broker:
    f = state / "c.toml"
    f.write_text(f'[spool]\nstate_dir = "{state}"\npath = "{state / "spool"}"\n{extra}')
    return Broker(config.load(f), lane)


def close_broker(b: Broker) -> None:
    for s in (b.front, b.back, b.pub):
        s.close()


def dealer(b: Broker, name: str, ident: bytes) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, ident)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(b.cfg.ipc(name))
    return s
