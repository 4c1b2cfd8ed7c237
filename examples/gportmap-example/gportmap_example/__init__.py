"""Example plugins and a protocol for gportmap (see README.md)."""

from __future__ import annotations

from typing import Any, ClassVar

from gportmap.plugins import DOWNSTREAM, UPSTREAM, ConnView, Plugin, Reject
from gportmap.protocols.plugin import StreamProtocol


class UpperCase(Plugin):
    """Upper-cases ASCII letters in the chosen direction(s)."""

    options_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"direction": {"enum": [UPSTREAM, DOWNSTREAM, "both"]}},
    }

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        direction = options.get("direction", "both")
        self.directions = {UPSTREAM, DOWNSTREAM} if direction == "both" else {direction}

    def on_data(self, conn: ConnView, direction: str, data: bytes) -> bytes:
        return data.upper() if direction in self.directions else data


class PerClientLimit(Plugin):
    """At most ``max`` open connections per client IP address.

    The count is rule-wide state, so it lives on the plugin (one instance per rule
    server); what belongs to one connection goes in ``conn.state``.
    """

    options_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["max"],
        "properties": {"max": {"type": "integer", "minimum": 1}},
    }

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.max = options["max"]
        self.open: dict[str, int] = {}

    def on_accept(self, conn: ConnView) -> None:
        ip = conn.client.rsplit(":", 1)[0]
        if self.open.get(ip, 0) >= self.max:
            raise Reject(f"{ip} already has {self.max} open connection(s)")
        self.open[ip] = self.open.get(ip, 0) + 1
        conn.state["per-client-limit.ip"] = ip

    def on_close(self, conn: ConnView, summary: dict[str, Any]) -> None:
        ip = conn.state.get("per-client-limit.ip")
        if ip is not None:
            self.open[ip] -= 1
            if not self.open[ip]:
                del self.open[ip]


class GreeterServer(StreamProtocol):
    """The ``greeter`` protocol: tcp forwarding that greets each client first.

    A protocol derives from ``StreamProtocol`` (``gportmap.protocols.plugin``) and
    overrides ``handle(connection)``; gportmap keeps the rest: the listener and its
    reloads, limits, TLS, plugins, counters and the drain, as for a tcp rule.
    """

    greeting = b"220 gportmap-example greeter ready\r\n"

    def handle(self, connection):
        connection.socket.sendall(self.greeting)
        return connection.relay()
