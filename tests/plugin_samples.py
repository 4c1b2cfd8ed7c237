"""Plugins the tests name by dotted path (tests/ is put on the subprocess's PYTHONPATH),
and a protocol server class that tests register by entry point."""

from __future__ import annotations

import socket
from typing import Any

from gportmap.plugins import ConnView, Plugin
from gportmap.protocols.plugin import Outcome, StreamConnection, StreamProtocol
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


class BuggyTcp(StreamProtocol):
    """A protocol of a plugin package with a bug: a client whose first bytes are
    ``crash`` sends its connection down a code path that raises AttributeError
    (registered as protocol ``buggy`` by tests/test_internal_errors.py)."""

    def handle(self, connection: StreamConnection) -> Outcome | None:
        first = connection.socket.recv(64, socket.MSG_PEEK)
        if first.startswith(b"crash"):
            settings = None
            return settings.greeting  # the bug: AttributeError on None
        return connection.relay()


class BannerProtocol(StreamProtocol):
    """Through the public base (tests/test_plugins_protocol.py): greets each client
    with its connection's id, rule and address, then relays it to the target; a
    client whose first line is ``local`` is answered here and never reaches it; one
    whose first line is ``bad`` meets a handle() that returns no outcome (a bug)."""

    banner = b"hello"

    def handle(self, connection: StreamConnection) -> Outcome | None:
        sock = connection.socket
        sock.sendall(b"%s %d %s %s\n" % (self.banner, connection.id, connection.rule.encode(),
                                         connection.client.encode()))
        first = sock.recv(64, socket.MSG_PEEK)
        if first.startswith(b"local\n"):
            sock.recv(6)
            sock.sendall(b"served here\n")
            return None  # the connection ended "closed", no target involved
        if first.startswith(b"bad\n"):
            return "done"  # not an outcome: the package's bug, an internal_error
        return connection.relay()


class OldStyleTcp(TcpServer):
    """A protocol written before the public base: it overrides the private
    ``_forward``, which keeps working on rules without routes (deprecated)."""

    def _forward(self, client: socket.socket, conn, view):
        client.sendall(b"old style\n")
        return super()._forward(client, conn, view)
