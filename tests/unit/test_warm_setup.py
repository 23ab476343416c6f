"""What a process builds lazily, it builds at set-up, before it serves (issue 20: across a
reload under a flood, a replacement fast worker built the Public Suffix List at its first
message, and every message it took meanwhile waited 200-240 ms for its ACK). Each case runs in
its own interpreter: this test process built the PSL long ago."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
from ingress.policy import identity
def state():
    return {"psl": identity._psl.cache_info().currsize,
            "txt": "dns.rdtypes.ANY.TXT" in sys.modules}
before = state()
"""

PIPELINE = PROBE + """
import dataclasses
from ingress.core.config import ClassifyConfig, Config
from workers.lane.pipeline import Pipeline
Pipeline(dataclasses.replace(Config(), classify=ClassifyConfig(nameservers=("127.0.0.1:5353",))))
print(json.dumps({"before": before, "after": state()}))
"""

ACCEPTOR = PROBE + """
import asyncio, dataclasses
from pathlib import Path
from ingress.core.config import Config, SpoolConfig
from ingress.edge.context import AcceptorContext
root = Path(sys.argv[1])
(root / "state" / "run").mkdir(parents=True)
cfg = dataclasses.replace(Config(), spool=SpoolConfig(path=root / "spool",
                                                      state_dir=root / "state"))
async def main():
    AcceptorContext(cfg, 0, asyncio.get_running_loop(), fast=True)
asyncio.run(main())
print(json.dumps({"before": before, "after": state()}))
"""


def _run(program: str, *args: str) -> dict[str, dict[str, object]]:
    out = subprocess.run([sys.executable, "-c", program, *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    got: dict[str, dict[str, object]] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def test_a_worker_pipeline_is_warm_before_its_first_message() -> None:
    got = _run(PIPELINE)
    assert got["before"] == {"psl": 0, "txt": False}
    assert got["after"] == {"psl": 1, "txt": True}


def test_an_acceptor_builds_the_psl_before_its_first_client(tmp_path: Path) -> None:
    got = _run(ACCEPTOR, str(tmp_path))
    assert got["before"]["psl"] == 0
    assert got["after"]["psl"] == 1
