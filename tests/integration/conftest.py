"""Fixtures shared by the integration tests (helpers that are not fixtures live in tests/kit/).

API
    ``postfix``    module scope: a private Postfix delivering to maildirs (tests/kit/postfix.py),
                   one per test module, stopped after it. By default it refuses
                   tests.kit.relaykit.REJECTED (550 5.1.1) and TEMPFAIL (450 4.2.0) at RCPT. A
                   module that needs another Postfix says so in a module constant
                   ``POSTFIX = {"accept_domains": (...), "extra_main_cf": {...}}`` (the keyword
                   arguments of tests.kit.postfix.started_postfix; they replace the default
                   restrictions).
    ``dkim_key``   module scope: (private key PEM, "v=DKIM1; ..." TXT record) of a fresh RSA key
                   (tests.kit.dkimkeys.signing_record), for the module's DNS zone and signatures.
    ``pki``        module scope: trustme certificates (tests.kit.pki.write_pki: ca, cert, key,
                   client, rogue) in a fresh directory.

Failure modes
    ``postfix`` skips the test, naming why, when Postfix cannot run here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.dkimkeys import signing_record
from tests.kit.pki import write_pki
from tests.kit.postfix import PostfixInstance, started_postfix
from tests.kit.relaykit import relay_postfix


@pytest.fixture(scope="module")
def postfix(request: pytest.FixtureRequest) -> Iterator[PostfixInstance]:
    own: dict[str, Any] | None = getattr(request.module, "POSTFIX", None)
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    if own is None:
        yield from relay_postfix(f"{name}-pf-")
    else:
        yield from started_postfix(f"{name}-pf-", **own)


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    return signing_record()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_pki(tmp_path_factory.mktemp("pki"))
