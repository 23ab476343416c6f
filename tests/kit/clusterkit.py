"""Several hosts on one machine, for tests and the bench (tests/integration/test_cluster.py,
bench/cluster.py): CURVE key pairs made through the command line, and a free port range for a
lanes node.

API:
    keygen(dir, name) -> (public key path, secret key path)   `smtp-ingress keygen`, as an
                                                                operator would run it
    free_base(host) -> int        a port p with p..p+3 free on `host` (a lanes node binds four)

Failure modes: keygen raises CalledProcessError (or TimeoutExpired after 30 s); free_base
raises RuntimeError after 200 tries. Loopback only.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def keygen(d: Path, name: str) -> tuple[Path, Path]:
    out = subprocess.run([sys.executable, "-m", "ingress", "keygen", str(d), name],
                         cwd=ROOT, capture_output=True, timeout=30, check=True)
    assert b"public key" in out.stdout
    return d / f"{name}.key", d / f"{name}.key_secret"


def free_base(host: str) -> int:
    for _ in range(200):
        p = random.randrange(20000, 60000)
        socks: list[socket.socket] = []
        try:
            for i in range(4):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return p
    raise RuntimeError("no free port range")
