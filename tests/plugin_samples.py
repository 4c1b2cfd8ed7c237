"""Plugins the tests name by dotted path (tests/ is put on the subprocess's PYTHONPATH),
and a protocol server class that tests register by entry point."""

from __future__ import annotations

import socket
from typing import Any

from gportmap.plugins import ConnView, Plugin
from gportmap.protocols.tcp import TcpServer


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


class BuggyTcp(TcpServer):
    """A protocol of a plugin package with a bug: a client whose first bytes are
    ``crash`` sends its connection down a code path that raises AttributeError
    (registered as protocol ``buggy`` by tests/test_internal_errors.py)."""

    def _forward(self, client: socket.socket, conn, view):
        first = client.recv(64, socket.MSG_PEEK)
        if first.startswith(b"crash"):
            settings = None
            return settings.greeting  # the bug: AttributeError on None
        return super()._forward(client, conn, view)
