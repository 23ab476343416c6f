"""ingress.edge.lobby.Lobby holds only its __slots__: no per-connection dict, no stream state."""

from __future__ import annotations

from typing import Any, cast

from ingress.edge.lobby import Lobby


def test_lobby_seat_has_no_instance_dict() -> None:
    seat = Lobby(cast(Any, object()))
    assert not hasattr(seat, "__dict__")
    assert not any(hasattr(seat, a) for a in ("_reader", "_handler_coroutine", "session"))
