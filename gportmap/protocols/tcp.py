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
from gevent import getcurrent
from gevent.server import StreamServer

from gportmap.config.faults import RuleSource
from gportmap.engine.faults import FaultClose, fault_transform
from gportmap.engine.hubrelay import adopt
from gportmap.engine.net import peer_text, set_nodelay
from gportmap.engine.pipeline import (
    HubConnection,
    await_handshake,
    client_handshake_error,
)
from gportmap.engine.proxyaccept import HubProxyRead
from gportmap.engine.proxyproto import ProxyHeader
from gportmap.engine.pumprelay import make_relay
from gportmap.engine.relay import Relay
from gportmap.engine.routes import RoutedConnection, RoutePool, RouteTable, await_route
from gportmap.engine.stage import StagedSocket, TransformStage
from gportmap.engine.tls import TlsStage
from gportmap.engine.wsbridge import WsBridge
from gportmap.engine.wsframe import CLOSE_GOING_AWAY
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
    the handler returns, which is a no-op once its descriptor was taken.

    A handler run on the hub (``spawn=None``) may keep the very socket it was
    given instead (no second socket object, no ``getsockname`` that CPython makes
    for every socket built on a descriptor): it returns True, and the server
    leaves that socket to it."""

    #: What an ``Acceptor`` over several sockets hands the handler: bare sockets too.
    raw_accept = True

    def do_read(self) -> tuple[_socket.socket, tuple] | None:
        listener = self.socket
        try:
            fd, address = listener._accept()
        except BlockingIOError:
            return None
        return _socket.socket(listener.family, listener.type, listener.proto, fileno=fd), address

    def do_handle(self, sock: _socket.socket, address: tuple) -> None:  # type: ignore[override]
        if self._spawn is not None:
            super().do_handle(sock, address)
            return
        try:
            kept = self._handle(sock, address)
        except BaseException:
            sock.close()
            raise
        if not kept:
            sock.close()  # a no-op when the handler took the descriptor out


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
        if rule.source is RuleSource.TOXIPROXY:
            return RelayPath.GREENLET  # its toxics come and go while connections run
        if self.plugins.active or self._literal is None or rule.target_protocol == "websocket":
            return RelayPath.STAGED
        return RelayPath.HUB

    @property
    def in_hub(self) -> bool:
        """Connections of this rule never get a greenlet (``RelayPath.HUB``)."""
        return self.path is RelayPath.HUB

    # -- RelayPath.HUB -------------------------------------------------------------

    def _handle_in_hub(self, raw: _socket.socket, address: tuple, proxied: ProxyHeader | None = None) -> bool:
        """Runs on the hub (``spawn=None``): it must never block, nor raise. An
        unexpected exception raised to the accept loop would be logged without the
        rule, stop accepting for a while and leave the connection counted open; it
        ends this connection only, as ``internal_error``. ``proxied``: the PROXY
        header it came with (``acceptProxy``); ``address`` is then the header's.
        True when the connection kept ``raw`` itself (``RawAcceptServer.do_handle``:
        the caller must not close it); else the caller closes it (a no-op when its
        descriptor was taken out)."""
        client_text = peer_text(address)
        if self.faulty() and self._spawn_faulty(raw, address, proxied):
            return False  # the greenlet reads any PROXY header itself (or takes the one read here)
        if proxied is None and self.trusted is not None and self.trusted.trusts(address):
            self._read_proxy_in_hub(raw, address)
            return False
        admitted = pipeline = None
        try:
            slot = self.admit_slot(address, client_text)
            if slot is None:
                return False  # StreamServer closes the client socket
            admitted = Admitted(self, client_text, slot, proxied=proxied)
            admitted.listen = self.listen_text(raw)
            raw.setblocking(False)  # kept as it is: the pipeline and the relay own it from here
            if self.rule.routes:  # SPEC §13: the route by the client's first bytes, then as below
                no_route = functools.partial(self.reject, client_text, RejectReason.NO_ROUTE)
                pipeline = RoutedConnection(raw, self.route_table, admitted, no_route)
            else:
                pipeline = HubConnection(raw, self.route_at(self.route, raw), admitted)
            self.adopt_connection(pipeline, admitted)
            return True
        except Exception as exc:  # noqa: BLE001 - a bug: contained to this connection
            text = self.internal_error(exc, client_text)
            if pipeline is not None and pipeline.on_done is not None:
                pipeline.abort(CloseReason.INTERNAL_ERROR, text)  # reports the end through adopt_connection
                return True  # closed by the abort
            if admitted is not None:
                if admitted.conn is not None:
                    self.finish(admitted.conn, CloseReason.INTERNAL_ERROR, text)
                admitted.release()
            return False

    def _read_proxy_in_hub(self, raw: _socket.socket, address: tuple) -> None:
        """``acceptProxy`` on the hub path: the header of a trusted proxy's
        connection read in hub callbacks (``HubProxyRead``, tracked as a relay so
        that a stop ends it), then the connection admitted as the header's client.
        The socket is this method's to close from here on (the accept loop's close
        is a no-op on the descriptor taken out of ``raw``).

        Connections waiting for their header hold no place under the limits yet
        (admission needs the header's address), so their number is bounded on its
        own: at the rule's ``maxConnections``, past which one is refused at once
        as ``limit`` (a greenlet path is bounded by its pool instead)."""
        proxy_text = peer_text(address)
        if self.awaiting_header >= self.context.stats.share(self.rule.max_connections):
            self.reject(proxy_text, RejectReason.LIMIT)
            return  # StreamServer closes the client socket
        sock = adopt(raw)

        def settle() -> None:
            """Every end of the wait passes here once."""
            if read in self.relays:
                self.awaiting_header -= 1
                self.untrack(read)

        def on_header(header: ProxyHeader) -> None:
            settle()
            if not self._handle_in_hub(sock, header.source or address, header):
                sock.close()  # refused at admission: nothing took the socket

        def on_failed(text: str) -> None:
            settle()
            sock.close()
            self.reject(proxy_text, RejectReason.PROXY_HEADER, text)

        def on_crash(exc: Exception) -> None:
            settle()
            sock.close()
            self.internal_error(exc, proxy_text)

        def on_done(reason: str, error: str | None) -> None:  # a stop while waiting
            settle()
            sock.close()

        read = HubProxyRead(sock, self.trusted.timeout, on_header, on_failed, on_crash)
        read.on_done = on_done
        self.awaiting_header += 1
        try:
            self._track(read)  # starts it
        except Exception as exc:  # noqa: BLE001 - a bug: contained to this connection, never to the hub
            read.cancel()
            on_crash(exc)

    # -- RelayPath.STAGED and RelayPath.GREENLET: a greenlet per connection first ---

    def _handle(
        self, raw: socket.socket | _socket.socket, address: tuple, proxied: ProxyHeader | None = None
    ) -> None:
        """A connection in a greenlet of its own; ``proxied``: its PROXY header when
        the hub read it already (``address`` is then the header's client)."""
        client_text = peer_text(address)
        try:
            if proxied is not None:
                self._proxied[getcurrent()] = proxied  # what an onward proxyProtocol sends
            elif self.trusted is not None:  # acceptProxy: the header's client, or refused
                address = self.read_proxy_header(raw, address)
                if address is None:
                    return  # StreamServer closes the client socket
                client_text = peer_text(address)
            slot = self.admit_slot(address, client_text)
            if slot is None:
                return  # StreamServer closes the client socket
            try:
                pool = None
                if self.rule.routes:
                    pool = self._sniff_route(raw, client_text)
                    if pool is None:
                        return
                if self.path is RelayPath.STAGED and not self.faulty():
                    self._serve_staged(raw, client_text, slot, pool)
                    return
                client = gevent.socket.socket(fileno=raw.detach())  # plugins, tunnels, SSLSocket wait on it
                try:
                    self._serve(client, client_text, slot, pool)
                finally:
                    client.close()
            finally:
                slot.release()  # a no-op once it became the open connection
        except Exception as exc:  # noqa: BLE001 - a bug before the connection was admitted
            # (``account`` contains what comes after): logged with the rule, not by the hub.
            self.internal_error(exc, client_text)

    # -- routes (SPEC §13, ``gportmap.engine.routes``) --------------------------------

    @functools.cached_property
    def route_table(self) -> RouteTable:
        """The rule's routes, each with its pool (and its hub ``Route``)."""
        return RouteTable.build(self.rule, self.target_pool, self.route)

    def _sniff_route(self, raw: _socket.socket, client_text: str) -> RoutePool | None:
        """A greenlet's wait for the route of its client (the sniffing itself runs
        in hub callbacks); None when the client left or no route takes it (counted
        as rejected ``no_route``)."""
        try:
            route = await_route(raw, self.route_table)
        except OSError:
            return None  # the client reset while it was looked at: nothing to count
        if route is None:
            self.reject(client_text, RejectReason.NO_ROUTE)
            return None
        return self.route_table.pools[route.name]

    # -- RelayPath.STAGED ----------------------------------------------------------

    def _serve_staged(
        self, raw: socket.socket | _socket.socket, client_text: str, slot: Slot, pool: RoutePool | None = None
    ) -> None:
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
                outcome = self._relay_staged(client, client_tls, conn, view, pool)
                handed = outcome == DETACHED
                return outcome

            self.account(client_text, work, view, slot, self.listen_text(client))
        finally:
            if not handed:
                client.close()

    def _relay_staged(
        self, client: _socket.socket, client_tls: TlsStage | None, conn: Connection, view: ConnView | None,
        pool: RoutePool | None = None,
    ) -> Outcome:
        try:
            # The connect, the PROXY header and the TLS handshake with the target
            # (a stage), on the hub, each failure retried on another target.
            target, target_tls = self.connect_staged(client, conn, pool)
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
            relay = make_relay(
                client, target, conn, self.rule.idle_timeout, self.context.splice,
                client_tls=client_tls, target_tls=target_tls, target_stages=target_stages,
            )
            handed = True
            return self.adopt_relay(relay, conn, view)
        finally:
            if not handed:
                target.close()

    # -- RelayPath.GREENLET --------------------------------------------------------

    def _serve(
        self, client: socket.socket, client_text: str, slot: Slot | None = None, pool: RoutePool | None = None
    ) -> None:
        view = self.view(client_text)
        if not self.plugins_accept(view, client_text):
            return
        listen = self.listen_text(client)
        if self.server_tls is None:
            self.account(client_text, lambda conn: self._forward_routed(client, conn, view, pool), view, slot, listen)
            return
        tls = self.tls_accept(client, client_text)
        if tls is None:
            return
        try:
            self.account(client_text, lambda conn: self._forward_routed(tls, conn, view, pool), view, slot, listen)
        finally:
            tls.close()

    def _forward_routed(
        self, client: socket.socket, conn: Connection, view: ConnView | None, pool: RoutePool | None
    ) -> Outcome:
        """``_forward``, with a route's pool only when there is one: a protocol of a
        plugin package written before ``gportmap.protocols.plugin.StreamProtocol``
        overrides ``_forward(client, conn, view)`` and still works on rules without
        routes (deprecated: docs/plugins.md)."""
        return self._forward(client, conn, view) if pool is None else self._forward(client, conn, view, pool)

    def _forward(
        self, client: socket.socket, conn: Connection, view: ConnView | None, pool: RoutePool | None = None
    ) -> Outcome:
        rule, context = self.rule, self.context
        try:
            upstream = self.connect_target(client, pool=pool)
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
                faults = self.fault_session()
                bridge: WsBridge | None = None

                def cut(exc: FaultClose) -> None:  # a fault ends the tunnelled connection (limit_data)
                    if bridge is not None:
                        bridge._abort(CloseReason.FAULT, f"fault {exc.kind.value}", CLOSE_GOING_AWAY)

                if faults is not None:  # SPEC §12: on the tunnelled byte stream, in the bridge's greenlets
                    transform = fault_transform(faults, transform, cut)
                bridge = WsBridge(
                    upstream, leftover, client, conn, rule.idle_timeout, context.buffers, rule.max_message_size, True,
                    transform,
                )
                try:
                    return bridge.run(), bridge.error
                finally:
                    if faults is not None:
                        faults.end()
            plain = self.server_tls is None and self.client_tls is None
            faults = self.fault_session()
            relay = Relay(
                client, upstream, conn, rule.idle_timeout, context.buffers, transform, context.splice and plain, faults
            )
            if faults is None:
                return relay.run(), relay.error
            faults.arm(relay.fault_abort)
            try:
                return relay.run(), relay.error
            finally:
                faults.end()
        finally:
            upstream.close()

    # -- network faults (SPEC §12, ``gportmap.engine.faults``) ----------------------

    def _spawn_faulty(self, raw: _socket.socket, address: tuple, proxied: ProxyHeader | None = None) -> bool:
        """A hub rule that has faults now: hand the connection to a greenlet (the
        greenlet relay runs them), with the PROXY header already read in the hub if
        any. False when the pool is full: the hub path then refuses it as any
        connection over the limit."""
        if self.pool.full():
            return False
        moved = _socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        self.pool.spawn(self._handle, moved, address, proxied)
        return True
