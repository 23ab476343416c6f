"""The supervisor's heartbeat array is sized from the config, and a reload that would not fit
is refused (the running config kept) instead of raising IndexError in the supervisor."""

from __future__ import annotations

from pathlib import Path

from ingress.core import config
from ingress.tools.children import heartbeat_slots, wanted
from ingress.tools.supervisor import Supervisor


def cfg_with(tmp_path: Path, name: str, text: str) -> config.Config:
    f = tmp_path / name
    f.write_text(text)
    return config.load(f)


def occupy(sup: Supervisor, cfg: config.Config) -> None:
    """Take a slot for each child `cfg` wants, as start() does (without starting anything)."""
    for _ in wanted(cfg):
        sup.table.free_slots.pop()


def test_array_fits_a_reload_of_a_big_host(tmp_path: Path) -> None:
    # 128 cores: 128 acceptors, 64 workers per lane; or workers = 256.
    for text in ("[supervisor]\nacceptors = 128\n[lanes.fast]\nworkers = 64\n"
                 "[lanes.bulk]\nworkers = 64\n",
                 "[supervisor]\nacceptors = 2\n[lanes.bulk]\nworkers = 256\n"):
        cfg = cfg_with(tmp_path, "big.toml", text)
        sup = Supervisor(cfg, None)
        assert len(sup.table.hb) == len(sup.table.free_slots) == heartbeat_slots(cfg)
        assert len(sup.table.hb) >= 2 * cfg.child_count
        occupy(sup, cfg)               # start
        assert sup.table.fits(cfg)    # a SIGHUP with the same config: old and new side by side
        occupy(sup, cfg)


def test_reload_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    small = cfg_with(tmp_path, "small.toml", "[supervisor]\nacceptors = 2\n"
                     "[lanes.fast]\nworkers = 1\n[lanes.bulk]\nworkers = 1\n")
    sup = Supervisor(small, None)
    occupy(sup, small)
    big = cfg_with(tmp_path, "big.toml", "[supervisor]\nacceptors = 2\n"
                   "[lanes.fast]\nworkers = 1\n[lanes.bulk]\nworkers = 256\n")
    assert not sup.table.fits(big)
    assert sup.table.fits(small)
