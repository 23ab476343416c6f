"""Config: every invalid value is refused naming the file and the key; valid files round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingress.core import config
from ingress.core.config import ConfigError
from tests.kit.configkit import check_invalid

ROOT = Path(__file__).resolve().parents[2]

INVALID = [
    # (toml text, key named in the error)
    ("[listen]\nport = 70000\n", "listen.port"),
    ("[listen]\nhost = \"localhost\"\n", "listen.host"),
    ("[listen]\nport = \"25\"\n", "listen.port"),
    ("[listen]\nprot = 25\n", "listen.prot"),
    ("[nonsense]\nx = 1\n", "nonsense"),
    ("[smtp]\naccepted_domains = []\n", "smtp.accepted_domains"),
    ("[smtp]\naccepted_domains = [\"a@b\"]\n", "smtp.accepted_domains"),
    ("[smtp]\nmax_message_size = 10\n", "smtp.max_message_size"),
    ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients"),
    ("[smtp]\nidle_timeout = 10.0\nack_timeout = 20.0\n", "smtp.ack_timeout"),
    ("[smtp]\nsession_deadline = 1.0\n", "smtp.session_deadline"),
    ("[smtp]\nmax_connections = 10\nfast_reserve = 10\n", "smtp.fast_reserve"),
    ("[smtp]\nrecipient_map = \"/nonexistent/map\"\n", "smtp.recipient_map"),
    ("[lanes.fast]\nrate = 10.0\n", "lanes.fast.rate"),
    ("[lanes.bulk]\nqueue_max = 0\n", "lanes.bulk.queue_max"),
    ("[lanes.bulk]\ncredit = true\n", "lanes.bulk.credit"),
    ("[lanes.bulk]\nnice = 20\n", "lanes.bulk.nice"),
    ("[lanes.fast]\nnice = -1\n", "lanes.fast.nice"),
    ("[lanes.bulk]\nsched_policy = \"fifo\"\n", "lanes.bulk.sched_policy"),
    ("[relay]\nnice = 99\n", "relay.nice"),
    ("[lanes.bulk]\nqueue_bytes = 1000\n", "lanes.bulk.queue_bytes"),
    ("[smtp]\ndata_memory_budget = 2048\n", "smtp.data_fast_reserve"),
    ("[smtp]\ndata_memory_budget = -1\n", "smtp.data_memory_budget"),
    ("[classify]\nallow_cidrs = [\"10.0.0.0/33\"]\n", "classify.allow_cidrs"),
    ("[classify]\nallow_cidrs = \"10.0.0.0/8\"\n", "classify.allow_cidrs"),
    ("[classify]\nspf_promote = \"sometimes\"\n", "classify.spf_promote"),
    ("[classify]\nspf_promote = \"listed\"\n", "classify.spf_domains"),
    ("[classify]\nspf_promote = \"listed\"\nspf_domains = [\"a..b\"]\n", "classify.spf_domains"),
    ("[classify]\nnameservers = [\"dns.example\"]\n", "classify.nameservers"),
    ("[classify]\ndomain_burst = 0.5\n", "classify.domain_burst"),
    ("[classify]\nlearned_save_interval = 0.0\n", "classify.learned_save_interval"),
    ("[classify]\nlearned_save_interval = 7200.0\n", "classify.learned_save_interval"),
    ("[classify]\nspf_backlog = 0\n", "classify.spf_backlog"),
    ("[classify]\nspf_per_domain = 300\n", "classify.spf_per_domain"),
    ("[classify]\nspf_per_network = 0\n", "classify.spf_per_network"),
    ("[classify]\nspf_timeout_ttl = -1.0\n", "classify.spf_timeout_ttl"),
    ("[classify]\nspf_timeout_ttl = 301.0\n", "classify.spf_timeout_ttl"),
    ("[admission]\ngreet_pause = 100.0\n", "admission.greet_pause"),
    ("[tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"\n", "tls.cert"),
    ("[tls]\ncert = \"x\"\n", "tls.key"),
    ("[tls]\nmtls_port = 4650\n", "tls.mtls_port"),
    ("[tls]\npinned_sha256 = [\"abcd\"]\n", "tls.pinned_sha256"),
    ("[tls]\nstranger_handshake_rate = -1.0\n", "tls.stranger_handshake_rate"),
    ("[tls]\nstranger_handshake_burst = 0.5\n", "tls.stranger_handshake_burst"),
    ("[tls]\nstranger_wait = 5.0\n", "tls.stranger_wait"),          # = handshake_timeout
    ("[tls]\nknown_ttl = 0.0\n", "tls.known_ttl"),
    ("[tls]\nknown_max = 0\n", "tls.known_max"),
    ("[tls]\nknown_handshake_rate = 0.0\n", "tls.known_handshake_rate"),
    ("[tls]\nknown_ipv4_prefix = 33\n", "tls.known_ipv4_prefix"),
    ("[tls]\nfailed_ttl = -1.0\n", "tls.failed_ttl"),
    ("[relay]\ndownstream = \"http://x\"\n", "relay.downstream"),
    ("[relay]\ndsn = \"sometimes\"\n", "relay.dsn"),
    ("[relay]\ndsn = \"Always\"\n", "relay.dsn"),
    ("[relay]\ndsn_rate = 0.0\n", "relay.dsn_rate"),
    ("[relay]\ndsn_rate = 3601.0\n", "relay.dsn_rate"),
    ("[relay]\ndsn_rate = \"lots\"\n", "relay.dsn_rate"),
    ("[metrics]\nlisten = \"9125\"\n", "metrics.listen"),
    ("[supervisor]\nacceptors = 5000\n", "supervisor.acceptors"),
    ("[listen]\nfast_port_proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
     "listen.fast_port_proxy_protocol"),
    ("[listen]\nfast_port = 2526\nfast_port_proxy_protocol = true\n", "listen.trusted_proxies"),
    ("[supervisor]\nheartbeat_interval = 1.0\nheartbeat_timeout = 1.0\n",
     "supervisor.heartbeat_timeout"),
    ("[log]\nlevel = \"chatty\"\n", "log.level"),
    ("[spool]\nstate_dir = \"/" + "x" * 120 + "\"\n", "spool.state_dir"),
    ("this is = = not toml", "-"),
]


@pytest.mark.parametrize(("text", "key"), INVALID)
def test_invalid(tmp_path: Path, text: str, key: str) -> None:
    check_invalid(tmp_path, text, key)


def test_default_is_valid_and_absolute() -> None:
    cfg = config.load(None)
    assert cfg.relay.dsn == "authenticated" and cfg.relay.dsn_rate == 30.0   # the safe ones
    assert cfg.listen.host == "127.0.0.1" and cfg.listen.port == 2525
    assert cfg.spool.path.is_absolute() and cfg.spool.path.name == "spool"
    assert cfg.acceptor_count == config.cores()
    assert cfg.lanes.fast.rate == 0


def test_values_parsed(tmp_path: Path) -> None:
    f = tmp_path / "ok.toml"
    f.write_text('[smtp]\naccepted_domains = ["Example.TEST."]\nidle_timeout = 30\n'
                 '[classify]\nallow_cidrs = ["192.0.2.0/24", "2001:db8::/32"]\n'
                 '[lanes.bulk]\nrate = 100\nworkers = 3\n')
    cfg = config.load(f)
    assert cfg.smtp.accepted_domains == ("example.test",)
    assert cfg.smtp.idle_timeout == 30.0 and isinstance(cfg.smtp.idle_timeout, float)
    assert cfg.lanes.bulk.rate == 100.0 and cfg.worker_count("bulk") == 3
    assert len(cfg.allow_networks) == 2
    with pytest.raises(AttributeError):
        cfg.smtp.idle_timeout = 1.0  # type: ignore[misc]


def test_mtls_pins_without_client_ca_refused(tmp_path: Path) -> None:
    """Python's ssl verifies every client certificate it requests (no verify callback): a
    mutual-TLS port with pins but no CA bundle would fail every handshake. Refused here,
    naming the file and tls.client_ca."""
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    cert.write_text("x")
    key.write_text("x")
    f = tmp_path / "pins.toml"
    f.write_text(f'[tls]\ncert = "{cert}"\nkey = "{key}"\nmtls_port = 4650\n'
                 f'pinned_sha256 = ["{"ab" * 32}"]\n')
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert e.value.key == "tls.client_ca" and str(f) in str(e.value)
    assert "pinned" in e.value.message
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    f.write_text(f.read_text() + f'client_ca = "{ca}"\n')
    assert config.load(f).tls.client_ca == str(ca)


def test_child_count(tmp_path: Path) -> None:
    f = tmp_path / "n.toml"
    f.write_text('[supervisor]\nacceptors = 7\n[lanes.fast]\nworkers = 3\n'
                 '[lanes.bulk]\nworkers = 256\n[relay]\ndownstream = "smtp://127.0.0.1:25"\n')
    cfg = config.load(f)
    # + one fast worker dedicated to the self-proven tier, + the fast acceptor
    assert cfg.child_count == 2 + 3 + 1 + 256 + 1 + 7 + 1


def test_a_table_keeps_the_defaults_it_does_not_name(tmp_path: Path) -> None:
    """[lanes.bulk] with only `rate` keeps the bulk lane's own defaults (nice 10), not a
    generic lane's (nice 0): every config that set the bulk cap had run bulk at full
    priority, and one that set only its nice had an uncapped bulk lane."""
    f = tmp_path / "c.toml"
    f.write_text('[smtp]\naccepted_domains = ["example.test"]\n[lanes.bulk]\nrate = 200.0\n')
    bulk = config.load(f).lanes.bulk
    assert (bulk.rate, bulk.nice, bulk.sched_policy) == (200.0, 10, "other")
    f.write_text('[smtp]\naccepted_domains = ["example.test"]\n[lanes.bulk]\nnice = 5\n')
    bulk = config.load(f).lanes.bulk
    assert (bulk.rate, bulk.nice) == (config.Config().lanes.bulk.rate, 5)
