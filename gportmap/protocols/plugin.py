"""The public base for a protocol that a plugin package adds (SPEC §7, docs/plugins.md).

A protocol is a server class that an entry point in group ``gportmap.protocols``
names. Derive it from ``StreamProtocol`` and override one method,
``handle(connection)``: what to do with one admitted client connection. Everything
else is gportmap's, exactly as for a ``tcp`` rule (the rule takes a tcp rule's
keys): the listener and its hand-over on reload, allow/deny and ``maxConnections``
(counted at admission), ``acceptProxy``, TLS towards the client (``tls``), the
plugins' ``on_accept``, the counters and the ``connection_closed`` record, the drain.

``handle`` runs in a greenlet of its own: ``connection.socket`` is a gevent socket,
whose blocking calls let every other connection run meanwhile. ``connection.relay()``
is what a tcp rule does with the connection (connect to a target of the rule's
pool, the plugins' ``on_connect`` and ``on_data``, relay both ways until both ends
closed) and returns how it ended; ``handle`` returns that, or ``None`` (the
connection ended ``closed``), or its own ``(reason, error)``. gportmap closes the
socket once ``handle`` returns. An exception out of ``handle`` is a bug: that
connection alone ends as ``internal_error``, counted and logged with its traceback.

Before this base, protocol packages subclassed ``TcpServer`` and overrode its
private ``_forward``; that method's signature changes with the engine (it took a
route's pool when routes came), so such a subclass breaks on upgrade. Overriding
``handle`` here is the interface gportmap keeps.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from gportmap.protocols.stream import Outcome
from gportmap.protocols.tcp import TcpServer
from gportmap.reasons import CloseReason

if TYPE_CHECKING:
    from gportmap.engine.routes import RoutePool
    from gportmap.plugins import ConnView
    from gportmap.stats import Connection

__all__ = ["Outcome", "StreamConnection", "StreamProtocol"]


class StreamConnection:
    """One admitted client connection, as ``StreamProtocol.handle`` gets it."""

    __slots__ = ("socket", "view", "_server", "_conn", "_pool")

    def __init__(
        self,
        sock: socket.socket,
        view: ConnView | None,
        server: StreamProtocol,
        conn: Connection,
        pool: RoutePool | None,
    ) -> None:
        #: The client's socket (gevent: blocking calls yield to the other connections).
        self.socket = sock
        #: What the rule's plugins see of it (``gportmap.plugins.ConnView``); None
        #: when the rule has no plugins.
        self.view = view
        self._server = server
        self._conn = conn
        self._pool = pool

    @property
    def id(self) -> int:
        """The connection's id, as ``/connections`` and the records show it."""
        return self._conn.id

    @property
    def client(self) -> str:
        """The client's address, ``host:port`` (the PROXY header's with ``acceptProxy``)."""
        return self._conn.client

    @property
    def rule(self) -> str:
        """The rule's name."""
        return self._server.rule.name

    def relay(self) -> Outcome:
        """Connect to a target of the rule's pool and relay both ways until both
        ends have closed, as a tcp rule does; returns how it ended, ``(reason, error)``."""
        return TcpServer._forward(self._server, self.socket, self._conn, self.view, self._pool)


class StreamProtocol(TcpServer):
    """Base class of a protocol from a plugin package: override ``handle``.

    Class attributes and the constructor are the server's (``(rule, context)``,
    called by gportmap); a subclass adds its own tunables as class attributes."""

    def handle(self, connection: StreamConnection) -> Outcome | None:
        """Serve one admitted connection; by default, relay it to the rule's target.
        Returns how it ended: ``(reason, error)``, or None for ``closed``."""
        return connection.relay()

    def _forward(
        self, client: socket.socket, conn: Connection, view: ConnView | None, pool: RoutePool | None = None
    ) -> Outcome:
        """``TcpServer``'s step for one connection in a greenlet, handed to ``handle``."""
        outcome = self.handle(StreamConnection(client, view, self, conn, pool))
        if outcome is None:
            return CloseReason.CLOSED, None
        if not (isinstance(outcome, tuple) and len(outcome) == 2 and isinstance(outcome[0], str)):
            # the package's bug, told as such: this connection ends as internal_error
            raise TypeError(f"{type(self).__name__}.handle returned {outcome!r:.100}, not (reason, error) or None")
        return outcome
