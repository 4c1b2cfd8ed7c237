"""TCP rules: accept, admit, connect to the target, relay, account, log.

With ``targetProtocol: "websocket"`` the rule is the entry of a tunnel: each
accepted connection is carried over a WebSocket to a ``websocket`` rule elsewhere
(see ``gportmap.wstunnel``).
"""

from __future__ import annotations

import socket

from gevent.server import StreamServer

from gportmap.net import peer_text, set_nodelay
from gportmap.plugins import ConnView
from gportmap.protocols.stream import Outcome, StreamRuleServer
from gportmap.relay import Relay
from gportmap.stats import Connection
from gportmap.wsbridge import WsBridge
from gportmap.wstunnel import HandshakeError, open_tunnel


class TcpServer(StreamRuleServer):
    """Serves one tcp rule."""

    def _make_server(self, listener: socket.socket) -> StreamServer:
        return StreamServer(listener, self._handle, spawn=self.pool)

    def _handle(self, client: socket.socket, address: tuple) -> None:
        client_text = peer_text(address)
        if not self.admit(address, client_text):
            return  # StreamServer closes the client socket
        view = self.view(client_text)
        if not self.plugins_accept(view, client_text):
            return
        if self.server_tls is None:
            self.account(client_text, lambda conn: self._forward(client, conn, view), view)
            return
        tls = self.tls_accept(client, client_text)
        if tls is None:
            return
        try:
            self.account(client_text, lambda conn: self._forward(tls, conn, view), view)
        finally:
            tls.close()

    def _forward(self, client: socket.socket, conn: Connection, view: ConnView | None) -> Outcome:
        rule, context = self.rule, self.context
        try:
            upstream = self.connect_target(client)
        except OSError as exc:
            return self.connect_failed(exc)
        try:
            failed = self.plugins_connect(view)
            if failed is not None:
                return failed
            transform = self.transform(view)
            set_nodelay(client)
            if rule.target_protocol == "websocket":
                try:
                    leftover = open_tunnel(upstream, rule)
                except HandshakeError as exc:
                    self.stats.connect_failures += 1
                    return "connect_failed", str(exc)
                bridge = WsBridge(
                    upstream, leftover, client, conn, rule.idle_timeout, context.buffers, rule.max_message_size, True,
                    transform,
                )
                return bridge.run(), bridge.error
            plain = self.server_tls is None and self.client_tls is None
            relay = Relay(client, upstream, conn, rule.idle_timeout, context.buffers, transform, context.splice and plain)
            return relay.run(), relay.error
        finally:
            upstream.close()
