"""Config files for the tests of the config rules (unit tests and the check-config CLI).

API
    cfg_file(tmp_path, **tables) -> Path      tmp_path/c.toml: smtp.accepted_domains =
                                              ["example.test"] plus `tables` (TOML tables,
                                              dotted names as in "lanes.bulk")
    load_relay(tmp_path, **relay) -> Config   such a file with a [relay] table, loaded
    check_invalid(tmp_path, text, key)        loading `text` is refused with a ConfigError
                                              naming `key` and the file

Failure modes
    AssertionError (or pytest's "DID NOT RAISE") when a check fails; load_relay raises what
    config.load raises.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ingress.core import config
from ingress.core.config import ConfigError
from tests.kit.harness import write_config


def cfg_file(tmp_path: Path, **tables: dict[str, object]) -> Path:
    f = tmp_path / "c.toml"
    write_config(f, {"smtp": {"accepted_domains": ["example.test"]}, **tables})
    return f


def load_relay(tmp_path: Path, **relay: object) -> config.Config:
    return config.load(cfg_file(tmp_path, relay=relay))


def check_invalid(tmp_path: Path, text: str, key: str) -> None:
    """Loading `text` is refused, naming `key` and the file."""
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert e.value.key == key
    assert str(f) in str(e.value)
