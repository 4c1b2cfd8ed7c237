"""TCP rules: accept, admit, connect to the target, relay, account, log.

With ``targetProtocol: "websocket"`` the rule is the entry of a tunnel: each
accepted connection is carried over a WebSocket to a ``websocket`` rule elsewhere
(see ``gportmap.engine.wstunnel``).
"""

from __future__ import annotations

import _socket
import functools
import socket

import gevent.socket
from gevent.server import StreamServer

from gportmap.engine.hubrelay import HubRelay, LeanConnection, adopt
from gportmap.engine.net import peer_text, set_nodelay
from gportmap.engine.relay import Relay
from gportmap.engine.wsbridge import WsBridge
from gportmap.engine.wstunnel import HandshakeError, open_tunnel
from gportmap.failures import INTERNAL_ERROR
from gportmap.plugins import ConnView
from gportmap.protocols.stream import Outcome, StreamRuleServer
from gportmap.stats import Connection


class RawAcceptServer(StreamServer):
    """A StreamServer that hands its handler the accepted socket as a bare
    ``_socket.socket``: the lean path never needs gevent's wrapper (building one
    and taking the descriptor back out cost ~7% of a new connection), and the
    handler wraps it itself when it does. The server closes the bare socket when
    the handler returns, which is a no-op once its descriptor was taken."""

    def do_read(self) -> tuple[_socket.socket, tuple] | None:
        listener = self.socket
        try:
            fd, address = listener._accept()
        except BlockingIOError:
            return None
        return _socket.socket(listener.family, listener.type, listener.proto, fileno=fd), address


class TcpServer(StreamRuleServer):
    """Serves one tcp rule."""

    def _make_server(self, listener: socket.socket) -> StreamServer:
        if self.in_hub:
            return RawAcceptServer(listener, self._handle_in_hub, spawn=None)
        if type(self) is not TcpServer:  # a plugin package's protocol: its hooks get gevent sockets
            return StreamServer(listener, self._handle, spawn=self.pool)
        return RawAcceptServer(listener, self._handle, spawn=self.pool)

    @functools.cached_property
    def in_hub(self) -> bool:
        """The leanest path: a lean rule whose target is an IP literal (no name to
        resolve, which would block) and that sends no PROXY protocol header (a
        blocking write before the relay). Its connections never get a greenlet:
        accepted, admitted, connected and relayed in hub callbacks."""
        return self.lean and self._literal is not None and getattr(self.rule, "proxy_protocol", None) is None

    def _handle_in_hub(self, raw: _socket.socket, address: tuple) -> None:
        """Runs on the hub (``spawn=None``): it must never block, nor raise. An
        unexpected exception raised to the accept loop would be logged without the
        rule, stop accepting for a while and leave the connection counted open; it
        ends this connection only, as ``internal_error``."""
        client_text = peer_text(address)
        conn = lean = None
        try:
            if not self.admit(address, client_text):
                return  # StreamServer closes the client socket
            conn = self.open(client_text)
            lean = LeanConnection(
                adopt(raw),
                conn,
                [self._literal],
                self.rule.connect_timeout,
                self.rule.idle_timeout,
                self.context.splice,
                self._count_connect_failure,
            )
            self.adopt_relay(lean, conn)
        except Exception as exc:  # noqa: BLE001 - a bug: contained to this connection
            text = self.internal_error(exc, client_text)
            if lean is not None and lean.on_done is not None:
                lean.abort(INTERNAL_ERROR, text)  # reports the end through adopt_relay
            elif conn is not None:
                self.finish(conn, INTERNAL_ERROR, text)

    def _count_connect_failure(self) -> None:
        self.stats.connect_failures += 1

    def _handle(self, raw: socket.socket | _socket.socket, address: tuple) -> None:
        client_text = peer_text(address)
        try:
            if not self.admit(address, client_text):
                return  # StreamServer closes the client socket
            if self.lean:
                self._serve(raw, client_text)
                return
            client = gevent.socket.socket(fileno=raw.detach())  # TLS, plugins, tunnels wait on it
            try:
                self._serve(client, client_text)
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - a bug before the connection was admitted
            # (``account`` contains what comes after): logged with the rule, not by the hub.
            self.internal_error(exc, client_text)

    @functools.cached_property
    def lean(self) -> bool:
        """Plain TCP without plugins: relayed by hub callbacks (``gportmap.engine.hubrelay``).
        Not for a protocol derived from this class (a plugin package's): its hooks
        (``_forward``...) expect gevent sockets and a greenlet they may block."""
        rule = self.rule
        return (
            type(self) is TcpServer
            and self.server_tls is None
            and self.client_tls is None
            and not self.plugins.active
            and rule.target_protocol != "websocket"
        )

    def _serve(self, client: socket.socket, client_text: str) -> None:
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
            if self.lean:
                # The lean path: no greenlet, no gevent wrapper once connected. Plugins
                # (user code that may block) and TLS keep the greenlet relay.
                hub_relay = HubRelay(
                    adopt(client), adopt(upstream, nonblocking=True), conn, rule.idle_timeout, context.splice
                )
                return self.adopt_relay(hub_relay, conn)
            relay = Relay(client, upstream, conn, rule.idle_timeout, context.buffers, transform, context.splice and plain)
            return relay.run(), relay.error
        finally:
            upstream.close()
