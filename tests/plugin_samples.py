"""Plugins the tests name by dotted path (tests/ is put on the subprocess's PYTHONPATH)."""

from __future__ import annotations

from typing import Any

from gportmap.plugins import ConnView, Plugin


class Boom(Plugin):
    """Fails in on_data when it sees b"boom": a plugin with a bug."""

    def on_data(self, conn: ConnView, direction: str, data: bytes) -> bytes:
        if b"boom" in data:
            raise RuntimeError("the plugin blew up")
        return data


class Swallow(Plugin):
    """Passes nothing upstream: on_data may drop data by returning b""."""

    def on_data(self, conn: ConnView, direction: str, data: bytes) -> bytes:
        return b"" if direction == "upstream" else data


class BrokenInit(Plugin):
    def __init__(self, options: dict[str, Any]) -> None:
        raise ValueError("no license key")


class NotAPlugin:
    pass
