"""TCP rules: accept, admit, connect to the target, relay, account, log.

Three paths, by what a rule needs (``TcpServer.path``):

- ``HUB``: no plugin and a target given as an IP address. Accepted, admitted, the
  TLS handshakes (``tls``, ``targetTls``), the connect, the PROXY protocol header
  and the relay all run in hub callbacks (``gportmap.engine.hubrelay``): no
  greenlet at any point.
- ``STAGED``: plugins (their hooks may wait), a target name to resolve, or the
  entry of a WebSocket tunnel (``targetProtocol: "websocket"``: its upgrade
  request, ``gportmap.engine.wstunnel``). A greenlet runs the hooks, the name
  lookup and the upgrade, waits for the same hub handshakes, then hands both
  sockets to the same hub relay and ends. Stages of the target's side, outermost
  first: ``targetTls``, a tunnel's WebSocket codec, the ``on_data`` plugins
  (``gportmap.engine.stage.TransformStage``).
- ``GREENLET``: ``on_data`` plugins that say they may block
  (``Plugin.may_block``) and protocols of plugin packages (their hooks get gevent
  sockets): the greenlet relay, with TLS through ``SSLSocket`` (a tunnel entry's
  through ``WsBridge``).

On every path the connection takes its place under ``maxConnections`` when it is
admitted, before any handshake, and gives it back if the handshake fails.
"""

from __future__ import annotations

import _socket
import enum
import functools
import socket

import gevent.socket
from gevent.server import StreamServer

from gportmap.engine.hubrelay import HubRelay, adopt
from gportmap.engine.net import peer_text, set_nodelay
from gportmap.engine.pipeline import (
    HubConnection,
    await_handshake,
    client_handshake_error,
)
from gportmap.engine.relay import Relay
from gportmap.engine.stage import StagedSocket, TransformStage
from gportmap.engine.tls import TlsStage
from gportmap.engine.wsbridge import WsBridge
from gportmap.engine.wsstage import WsStage
from gportmap.engine.wstunnel import HandshakeError, open_tunnel
from gportmap.plugins import ConnView
from gportmap.protocols.stream import DETACHED, Admitted, Outcome, StreamRuleServer
from gportmap.reasons import CloseReason, RejectReason
from gportmap.stats import Connection, Slot


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


class RelayPath(enum.Enum):
    """Where a rule's connections run (see the module docstring)."""

    HUB = "hub"
    STAGED = "staged"
    GREENLET = "greenlet"


class TcpServer(StreamRuleServer):
    """Serves one tcp rule."""

    def _make_server(self, listener: socket.socket) -> StreamServer:
        if self.path is RelayPath.HUB:
            return RawAcceptServer(listener, self._handle_in_hub, spawn=None)
        if type(self) is not TcpServer:  # a plugin package's protocol: its hooks get gevent sockets
            return StreamServer(listener, self._handle, spawn=self.pool)
        return RawAcceptServer(listener, self._handle, spawn=self.pool)

    @functools.cached_property
    def path(self) -> RelayPath:
        rule = self.rule
        if type(self) is not TcpServer or (self.plugins.transforms and self.plugins.may_block):
            return RelayPath.GREENLET
        if self.plugins.active or self._literal is None or rule.target_protocol == "websocket":
            return RelayPath.STAGED
        return RelayPath.HUB

    @property
    def in_hub(self) -> bool:
        """Connections of this rule never get a greenlet (``RelayPath.HUB``)."""
        return self.path is RelayPath.HUB

    # -- RelayPath.HUB -------------------------------------------------------------

    def _handle_in_hub(self, raw: _socket.socket, address: tuple) -> None:
        """Runs on the hub (``spawn=None``): it must never block, nor raise. An
        unexpected exception raised to the accept loop would be logged without the
        rule, stop accepting for a while and leave the connection counted open; it
        ends this connection only, as ``internal_error``."""
        client_text = peer_text(address)
        admitted = pipeline = None
        try:
            slot = self.admit_slot(address, client_text)
            if slot is None:
                return  # StreamServer closes the client socket
            admitted = Admitted(self, client_text, slot)
            pipeline = HubConnection(adopt(raw), self.route, admitted)
            self.adopt_connection(pipeline, admitted)
        except Exception as exc:  # noqa: BLE001 - a bug: contained to this connection
            text = self.internal_error(exc, client_text)
            if pipeline is not None and pipeline.on_done is not None:
                pipeline.abort(CloseReason.INTERNAL_ERROR, text)  # reports the end through adopt_connection
            elif admitted is not None:
                if admitted.conn is not None:
                    self.finish(admitted.conn, CloseReason.INTERNAL_ERROR, text)
                admitted.release()

    # -- RelayPath.STAGED and RelayPath.GREENLET: a greenlet per connection first ---

    def _handle(self, raw: socket.socket | _socket.socket, address: tuple) -> None:
        client_text = peer_text(address)
        try:
            slot = self.admit_slot(address, client_text)
            if slot is None:
                return  # StreamServer closes the client socket
            try:
                if self.path is RelayPath.STAGED:
                    self._serve_staged(raw, client_text, slot)
                    return
                client = gevent.socket.socket(fileno=raw.detach())  # plugins, tunnels, SSLSocket wait on it
                try:
                    self._serve(client, client_text, slot)
                finally:
                    client.close()
            finally:
                slot.release()  # a no-op once it became the open connection
        except Exception as exc:  # noqa: BLE001 - a bug before the connection was admitted
            # (``account`` contains what comes after): logged with the rule, not by the hub.
            self.internal_error(exc, client_text)

    # -- RelayPath.STAGED ----------------------------------------------------------

    def _serve_staged(self, raw: socket.socket | _socket.socket, client_text: str, slot: Slot) -> None:
        """Plugin hooks and the name lookup here; the handshakes and the relay in
        hub callbacks (this greenlet waits for the handshakes, then ends)."""
        view = self.view(client_text)
        if not self.plugins_accept(view, client_text):
            return
        client = adopt(raw)
        handed = False
        try:
            client_tls = None
            if self.server_tls is not None:
                client_tls = TlsStage.server(self.server_tls)
                try:
                    await_handshake(client, client_tls, self.rule.handshake_timeout)
                except OSError as exc:
                    slot.release()
                    self.reject(client_text, RejectReason.TLS, client_handshake_error(exc))
                    return

            def work(conn: Connection) -> Outcome:
                nonlocal handed
                outcome = self._relay_staged(client, client_tls, conn, view)
                handed = outcome == DETACHED
                return outcome

            self.account(client_text, work, view, slot)
        finally:
            if not handed:
                client.close()

    def _relay_staged(
        self, client: _socket.socket, client_tls: TlsStage | None, conn: Connection, view: ConnView | None
    ) -> Outcome:
        try:
            # The connect, the PROXY header and the TLS handshake with the target
            # (a stage), on the hub, each failure retried on another target.
            target, target_tls = self.connect_staged(client, conn)
        except OSError as exc:
            return self.connect_failed(exc)
        handed = False
        try:
            set_nodelay(client)
            failed = self.plugins_connect(view)
            if failed is not None:
                return failed
            target_stages = []
            if self.rule.target_protocol == "websocket":
                try:
                    leftover = open_tunnel(StagedSocket(target, target_tls), self.rule, conn.target)
                except HandshakeError as exc:
                    self.stats.connect_failures += 1
                    return CloseReason.CONNECT_FAILED, str(exc)
                target_stages.append(WsStage.client(self.rule.max_message_size, leftover))
            transform = self.transform(view)
            if transform is not None:
                target_stages.append(TransformStage(transform, self.rule.name, conn.client))
            relay = HubRelay(
                client, target, conn, self.rule.idle_timeout, self.context.splice,
                client_tls=client_tls, target_tls=target_tls, target_stages=target_stages,
            )
            handed = True
            return self.adopt_relay(relay, conn, view)
        finally:
            if not handed:
                target.close()

    # -- RelayPath.GREENLET --------------------------------------------------------

    def _serve(self, client: socket.socket, client_text: str, slot: Slot | None = None) -> None:
        view = self.view(client_text)
        if not self.plugins_accept(view, client_text):
            return
        if self.server_tls is None:
            self.account(client_text, lambda conn: self._forward(client, conn, view), view, slot)
            return
        tls = self.tls_accept(client, client_text)
        if tls is None:
            return
        try:
            self.account(client_text, lambda conn: self._forward(tls, conn, view), view, slot)
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
                    leftover = open_tunnel(upstream, rule, conn.target)
                except HandshakeError as exc:
                    self.stats.connect_failures += 1
                    return CloseReason.CONNECT_FAILED, str(exc)
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
