"""relay.tls / relay.auth_file validation (ingress.core.config) and the relay's TLS policy
(workers.relay.clients.tls): table-driven, no network."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from ingress.core import config
from ingress.core.downstream import parse_downstream
from tests.kit.configkit import load_relay
from workers.relay.clients import tls as relay_tls


@pytest.mark.parametrize(("relay", "key", "text"), [
    ({"downstream": "smtp://127.0.0.1:25", "tls": "yes"}, "relay.tls", "must be one of"),
    ({"downstream": "lmtp:/run/lmtp.sock", "tls": "required"}, "relay.tls", "TCP downstream"),
    ({"downstream": "smtp://127.0.0.1:25", "tls": "required", "tls_ca_file": "/nonexistent"},
     "relay.tls_ca_file", "no such file"),
    ({"downstream": "smtp://127.0.0.1:25", "auth_file": "AUTH"}, "relay.auth_file",
     "over verified TLS"),
    # issue 19 item 4: opportunistic TLS verifies nothing, so the password would go to any
    # server that answers STARTTLS (an untrusted CA, a MITM): credentials need "required"
    ({"downstream": "smtp://127.0.0.1:25", "tls": "opportunistic", "auth_file": "AUTH"},
     "relay.auth_file", 'relay.tls = "required"'),
    ({"downstream": "lmtp://127.0.0.1:24", "tls": "opportunistic", "auth_file": "AUTH"},
     "relay.auth_file", "/auth'"),
])
def test_config_errors(tmp_path: Path, relay: dict[str, object], key: str, text: str) -> None:
    (tmp_path / "auth").write_text("u:p\n")
    (tmp_path / "auth").chmod(0o600)
    relay = {k: (str(tmp_path / "auth") if v == "AUTH" else v) for k, v in relay.items()}
    with pytest.raises(config.ConfigError) as e:
        load_relay(tmp_path, **relay)
    assert key in str(e.value) and text in str(e.value), str(e.value)


@pytest.mark.parametrize(("content", "mode", "want"), [
    ("relayuser:s3cret\n", 0o600, ("relayuser", "s3cret")),
    ("relayuser:pass:with:colons", 0o400, ("relayuser", "pass:with:colons")),
    ("relayuser:s3cret\n", 0o640, "readable by others"),
    ("relayuser:s3cret\n", 0o604, "readable by others"),
    ("no-colon\n", 0o600, "user:password"),
    (":nouser\n", 0o600, "user:password"),
    ("a:b\nc:d\n", 0o600, "user:password"),
])
def test_read_credentials(tmp_path: Path, content: str, mode: int,
                          want: tuple[str, str] | str) -> None:
    f = tmp_path / "auth"
    f.write_text(content)
    f.chmod(mode)
    if isinstance(want, tuple):
        assert config.read_credentials(str(f)) == want
    else:
        with pytest.raises(ValueError, match=want):
            config.read_credentials(str(f))


def test_policy(tmp_path: Path) -> None:
    f = tmp_path / "auth"
    f.write_text("u:p\n")
    f.chmod(0o600)
    plain = config.RelayConfig(downstream="smtp://127.0.0.1:25")
    assert relay_tls.policy(plain, parse_downstream(plain.downstream)) is relay_tls.PLAIN
    req = config.RelayConfig(downstream="smtp://10.0.0.5:25", tls="required",
                             tls_verify_name="mx.example", auth_file=str(f))
    p = relay_tls.policy(req, parse_downstream(req.downstream))
    assert p.mode == "required" and p.server_name == "mx.example" and p.credentials == ("u", "p")
    assert p.context is not None and p.context.verify_mode == ssl.CERT_REQUIRED
    assert p.context.check_hostname and p.context.minimum_version == ssl.TLSVersion.TLSv1_2
    opp = config.RelayConfig(downstream="lmtp://10.0.0.5:24", tls="opportunistic")
    p = relay_tls.policy(opp, parse_downstream(opp.downstream))
    assert p.server_name == "10.0.0.5" and p.credentials is None
    assert p.context is not None and p.context.verify_mode == ssl.CERT_NONE
