"""WebSocket rules: a browser-to-TCP bridge, and the exit of a TCP-over-WebSocket tunnel.

The HTTP side runs on gevent's pywsgi with gevent-websocket's handler, which
checks that a request really asks for an upgrade (GET, HTTP/1.1, ``Upgrade`` and
``Connection`` headers, a version) and answers 400/426 when it does not. This
module overrides the two places where gevent-websocket falls short for a proxy:

- ``upgrade_connection``: the path must match exactly, the ``Origin`` must be
  allowed (403, counted as rejected ``acl``), the ``binary`` subprotocol is chosen
  only when offered (gevent-websocket matches by substring), and the target is
  connected *before* answering 101, so a dead target is a 502, not an open socket
  that closes at once;
- ``run_websocket``: instead of gevent-websocket's ``WebSocket`` (it reads whole
  frames into memory and unmasks byte by byte), both sockets go to the hub relay
  (``gportmap.engine.hubrelay``) with the WebSocket codec as a stage of the
  client's side (``gportmap.engine.wsstage``), and the handler's greenlet ends: a
  held WebSocket connection has no greenlet. Nothing per connection is stored on
  the shared server object.

wss: the TLS handshake runs in hub callbacks with a TLS stage
(``gportmap.engine.pipeline.await_handshake``), pywsgi reads the upgrade through
that stage (``gportmap.engine.stage.StagedSocket``), and the relay gets the same
stage, under the WebSocket one. ``on_data`` plugins are a stage of the target's
side (``gportmap.engine.stage.TransformStage``); rules with one that says it may
block (``Plugin.may_block``) keep the greenlet bridge (``WsBridge``, TLS through
``SSLSocket``).

A client takes its place under ``maxConnections`` when it is admitted, before its
TLS handshake (wss) or its upgrade request is read (a ``Slot``): a limit of N
holds N clients, upgraded or still mid-upgrade, and the next is accepted and
closed at once, counted as rejected ``limit``. The upgrade request must arrive
within ``handshakeTimeout``. An upgrade that fails (none in time, not an upgrade,
a wrong path, version or key, a malformed request, the client gone first) gives
the place back and is counted and logged in one place: rejected ``handshake``,
one rate-limited ``connection_rejected`` record with the reason (refusals that
have a reason of their own, ``acl`` for a bad ``Origin`` or ``plugin``, keep it).

An unexpected exception (a bug) in a connection's handling ends that connection
as ``internal_error`` (``handle_error``): counted and logged once with its
traceback, instead of pywsgi passing it to the hub without the rule or client.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
from collections.abc import Callable

import gevent
from gevent import GreenletExit
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler

from gportmap.engine import wsframe
from gportmap.engine.faults import FaultClose, fault_transform
from gportmap.engine.hubrelay import HubRelay, adopt
from gportmap.engine.net import peer_text, set_nodelay
from gportmap.engine.pipeline import await_handshake, client_handshake_error
from gportmap.engine.stage import StagedSocket, TransformStage
from gportmap.engine.tls import TlsStage
from gportmap.engine.udptunnel import DatagramPump, connect_datagram
from gportmap.engine.wsbridge import WsBridge
from gportmap.engine.wsstage import WsStage
from gportmap.log import ClientErrorsAsLog, get_logger
from gportmap.protocols.stream import StreamRuleServer
from gportmap.reasons import CloseReason, RejectReason
from gportmap.stats import Connection, Slot

logger = get_logger("websocket")
#: gevent-websocket's own messages ("Client didn't ask for a connection upgrade", ...)
#: go here and no further: each failed upgrade is already one rate-limited
#: ``connection_rejected`` record with its reason; these would be a second,
#: unbounded one at the client's rate, without an event name.
_library_logger = get_logger("websocket.library")
_library_logger.setLevel(logging.ERROR)


class WebSocketServer(StreamRuleServer):
    """Serves one websocket rule."""

    def _make_server(self, listener: socket.socket) -> WSGIServer:
        server = _RuleWSGIServer(
            listener,
            _not_an_upgrade,
            handler_class=_BridgeHandler,
            spawn=self.pool,
            log=None,
            error_log=logger,
            environ=self._server_environ(listener),
        )
        server.rule_server = self  # read-only from the handlers
        return server

    def _server_environ(self, listener: socket.socket) -> dict[str, str]:
        """SERVER_NAME and SERVER_PORT from the rule and the socket. Without them
        pywsgi's ``start()`` asks the resolver for the listen address's name
        (``socket.getfqdn``), which yields to the hub: the supervisor's handover of
        a listening socket from an old server to a new one must not yield."""
        return {"SERVER_NAME": self.rule.listen_host, "SERVER_PORT": str(listener.getsockname()[1])}


class _RuleWSGIServer(WSGIServer):
    """Admission and the TLS handshake (wss) come before any HTTP is read."""

    rule_server: WebSocketServer

    def handle(self, sock: socket.socket, address: tuple) -> None:
        owner = self.rule_server
        client_text = peer_text(address)
        slot = None
        try:
            if owner.trusted is not None:  # acceptProxy: the header's client, or refused
                address = owner.read_proxy_header(sock, address)
                if address is None:
                    return
                client_text = peer_text(address)
            slot = owner.admit_slot(address, client_text)
            if slot is None:
                return
            if owner.server_tls is None:
                self._serve(sock, address, slot)
                return
            if not owner.plugins.may_block:
                self._serve_staged_tls(sock, address, slot, client_text)
                return
            tls = owner.tls_accept(sock, client_text)
            if tls is None:
                return
            try:
                self._serve(tls, address, slot)
            finally:
                tls.close()
        except Exception as exc:  # noqa: BLE001 - a bug outside pywsgi's request handling
            owner.internal_error(exc, client_text)
        finally:
            if slot is not None:
                slot.release()  # a no-op once the upgrade made it an open connection

    def _serve_staged_tls(self, sock: socket.socket, address: tuple, slot: Slot, client_text: str) -> None:
        """wss (unless an ``on_data`` plugin may block): the TLS handshake in hub
        callbacks, the upgrade read through the TLS stage, which the relay then
        carries on."""
        owner = self.rule_server
        raw = adopt(sock, nonblocking=True)
        stage = TlsStage.server(owner.server_tls)
        try:
            await_handshake(raw, stage, owner.rule.handshake_timeout)
        except OSError as exc:
            raw.close()
            owner.reject(client_text, RejectReason.TLS, client_handshake_error(exc))
            return
        except BaseException:  # a stop while it runs: the bare socket is ours to close
            raw.close()
            raise
        staged = StagedSocket(raw, stage)
        try:
            self._serve(staged, address, slot)
        finally:
            staged.close()  # nothing once the relay took the socket

    def _serve(self, sock: socket.socket | StagedSocket, address: tuple, slot: Slot) -> None:
        """pywsgi's ``handle``, with the connection's slot handed to its handler."""
        handler = self.handler_class(sock, address, self)
        handler.slot = slot
        handler.handle()


def _not_an_upgrade(environ: dict, start_response) -> list[bytes]:
    """A plain HTTP request on a WebSocket port: say what is expected, then close."""
    owner: WebSocketServer = environ["gportmap.server"]
    if environ.get("PATH_INFO") != owner.rule.path:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Connection", "close")])
        return [b"not found\n"]
    start_response(
        "426 Upgrade Required",
        [("Content-Type", "text/plain"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"), ("Connection", "close")],
    )
    return [b"this is a WebSocket endpoint: connect with a WebSocket client\n"]


class _BridgeHandler(ClientErrorsAsLog, WebSocketHandler):
    """One client connection: handshake deadline, upgrade, bridge; and the one place
    where a failed upgrade is accounted."""

    #: The connection's place under maxConnections, taken at admission (``_RuleWSGIServer``).
    slot: Slot | None = None
    #: Characters of a malformed request's parser message kept in its rejection record.
    failure_text_max = 200

    def handle(self) -> None:
        owner: WebSocketServer = self.server.rule_server
        self.owner = owner
        self.client_text = peer_text(self.client_address)
        self.conn: Connection | None = None
        self.upstream: socket.socket | None = None
        self.outcome: tuple[str, str | None] = (CloseReason.CLOSED, None)
        self.view = None
        #: Why the upgrade failed, for its ``handshake`` rejection.
        self.failure: str | None = None
        #: The attempt is accounted already, or is no rejection: refused with a
        #: reason of its own (acl, plugin), an internal error, a stop.
        self.settled = False
        #: The connection went to the hub relay, which accounts for its end.
        self.detached = False
        self.deadline = gevent.Timeout(owner.rule.handshake_timeout)
        self.deadline.start()
        try:
            super().handle()
        except gevent.Timeout as timeout:
            if timeout is not self.deadline:
                raise
            limit = owner.rule.handshake_timeout
            self.failure = self.failure or f"no WebSocket upgrade within handshakeTimeout ({limit:g}s)"
        except gevent.GreenletExit:
            self.outcome = (CloseReason.STOPPED, None)
            self.settled = True
            raise
        finally:
            self.deadline.cancel()
            if self.upstream is not None:
                self.upstream.close()
            if self.conn is not None:
                if not self.detached:  # else the relay accounts for it when it ends
                    owner.finish(self.conn, *self.outcome, self.view)
            elif not self.settled:
                owner.reject(self.client_text, RejectReason.HANDSHAKE, self.failure or self._unanswered())

    def _unanswered(self) -> str:
        """Why an upgrade failed that no check of ours refused: the client left, or
        pywsgi or gevent-websocket answered an HTTP error (a request line too long,
        not an upgrade at all: plain GET, HTTP/1.0, no version)."""
        if not self.requestline:
            return "the client closed before sending an upgrade request"
        status = self.status.decode("latin-1") if isinstance(self.status, bytes) else self.status
        if status:
            return f"not a WebSocket upgrade request (answered {status.split()[0]})"
        return "the client closed during its upgrade request"

    def _handle_client_error(self, ex: BaseException):  # pywsgi's hook for a malformed request
        text = (str(ex) or type(ex).__name__).encode("ascii", "backslashreplace").decode()
        self.failure = "malformed request: " + text[: self.failure_text_max]
        return super()._handle_client_error(ex)

    def log_error(self, msg: str, *args) -> None:
        pass  # the one record of a malformed request is its handshake rejection (``failure``)

    @property
    def logger(self):  # gevent-websocket's own logger would add a handler of its own
        return _library_logger

    def handle_error(self, exc_type: type, exc: BaseException, tb) -> None:
        """pywsgi's hook for an unexpected exception while handling the request (a
        bug, not bad client input): the connection ends as ``internal_error``,
        counted and logged here with its traceback, and gets a 500 if nothing was
        answered yet. Socket errors and a greenlet's kill keep pywsgi's handling."""
        if isinstance(exc, (OSError, GreenletExit)) or not isinstance(exc, Exception):
            super().handle_error(exc_type, exc, tb)
            return
        text = self.owner.internal_error(exc, self.client_text)
        self.settled = True  # counted as internal_error, not as a rejection
        if self.conn is not None:
            self.outcome = (CloseReason.INTERNAL_ERROR, text)
        self.close_connection = True
        if getattr(self, "websocket", None) is not True:  # after the 101 no HTTP answer is left to give
            self._send_error_response_if_possible(500)

    def log_request(self) -> None:
        pass  # one record per connection comes from connection_closed

    def get_environ(self) -> dict:
        environ = super().get_environ()
        environ["gportmap.server"] = self.owner
        return environ

    def run_application(self) -> None:
        self.close_connection = True  # one request per connection: an upgrade or an error
        super().run_application()

    def _refuse(self, status: str, text: str, headers: list[tuple[str, str]] | None = None) -> list[bytes]:
        self.deadline.cancel()
        self.start_response(status, [("Content-Type", "text/plain"), ("Connection", "close"), *(headers or [])])
        return [text.encode() + b"\n"]

    def _fail(self, why: str, status: str, text: str, headers: list[tuple[str, str]] | None = None) -> list[bytes]:
        """Refuse an upgrade that is not acceptable; counted as ``handshake`` (``why``) at the end."""
        self.failure = why
        return self._refuse(status, text, headers)

    def upgrade_websocket(self) -> list[bytes] | None:
        """gevent-websocket's checks, then ours (``upgrade_connection``). Two of its
        refusals (an upgrade over HTTP/1.0, answered 402; no Sec-WebSocket-Version,
        426) come with str bodies, which pywsgi cannot send: a TypeError, reported as
        an internal error with its traceback, at the client's will. Sent as bytes
        here, they are failed upgrades like the others."""
        result = super().upgrade_websocket()
        if result is None:
            return None
        return [part.encode("latin-1") if isinstance(part, str) else part for part in result]

    def upgrade_connection(self) -> list[bytes] | None:
        owner, rule, environ = self.owner, self.owner.rule, self.environ
        if environ.get("PATH_INFO") != rule.path:
            return self._fail("no WebSocket endpoint at the requested path", "404 Not Found", "not found")
        if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
            return self._fail(
                "unsupported WebSocket version", "426 Upgrade Required", "WebSocket version 13 only",
                [("Sec-WebSocket-Version", "13")],
            )
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            return self._fail("invalid Sec-WebSocket-Key", "400 Bad Request", "invalid Sec-WebSocket-Key")
        if rule.origins and environ.get("HTTP_ORIGIN") not in rule.origins:
            # the record names the Origin refused: what an operator adds to origins
            origin = environ.get("HTTP_ORIGIN")
            shown = "no Origin header" if origin is None else f"Origin {origin[:200]!r} is not in origins"
            owner.reject(self.client_text, RejectReason.ACL, shown)
            self.settled = True
            return self._refuse("403 Forbidden", "origin not allowed")
        self.view = owner.view(self.client_text)
        if not owner.plugins_accept(self.view, self.client_text):
            self.settled = True  # counted as plugin
            return self._refuse("403 Forbidden", "refused")
        self.deadline.cancel()
        self.conn = owner.open(self.client_text, self.view, self.slot)  # the slot becomes the connection
        try:
            if rule.target_protocol == "udp":  # SPEC §13: a UDP tunnel's exit
                self.upstream, target = connect_datagram(owner.pool_at(owner.target_pool, self.socket))
                self.conn.hold(target, target.address)
            else:
                self.upstream = owner.connect_target(pool=owner.pool_at(owner.target_pool, self.socket))  # SPEC §9
        except OSError as exc:
            self.outcome = owner.connect_failed(exc)
            return self._refuse("502 Bad Gateway", "the target cannot be reached")
        failed = owner.plugins_connect(self.view)
        if failed is not None:
            self.outcome = failed
            return self._refuse("502 Bad Gateway", "refused by a plugin")
        offered = [p.strip() for p in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", wsframe.accept_key(key)),
        ]
        if "binary" in offered:
            headers.append(("Sec-WebSocket-Protocol", "binary"))
        self.websocket = True  # tells WebSocketHandler.run_application the upgrade happened
        environ["wsgi.websocket"] = True  # makes its start_response send a bare 101
        self.start_response("101 Switching Protocols", headers)
        return None

    def run_websocket(self) -> None:
        owner, rule = self.owner, self.owner.rule
        assert self.conn is not None and self.upstream is not None
        client = self.socket
        set_nodelay(client if not isinstance(client, StagedSocket) else client.sock)
        leftover = self._buffered_bytes()
        if rule.target_protocol == "udp":
            self._pump_datagrams(client, leftover)
            return
        transform = owner.transform(self.view)
        faults = owner.fault_session()
        bridge: WsBridge | None = None

        def cut(exc: FaultClose) -> None:  # a fault ends the connection (limit_data): a Close, then the end
            if bridge is not None:
                bridge._abort(CloseReason.FAULT, f"fault {exc.kind.value}", wsframe.CLOSE_GOING_AWAY)

        if faults is not None:  # SPEC §12: the faults act on the payload stream, in the bridge's greenlets
            transform = fault_transform(faults, transform, cut)
        elif transform is None or not owner.plugins.may_block:
            self._hand_to_relay(client, leftover, transform)
            return
        bridge = WsBridge(
            client, leftover, self.upstream, self.conn, rule.idle_timeout, owner.context.buffers, rule.max_message_size, False,
            transform,
        )
        try:
            self.outcome = (bridge.run(), bridge.error)
        finally:
            if faults is not None:
                faults.end()

    def _hand_to_relay(
        self, client: socket.socket | StagedSocket, leftover: bytes, transform: Callable[[str, bytes], bytes] | None
    ) -> None:
        """Both sockets (and the client's TLS stage, for wss) to the hub relay with
        the WebSocket stage, and the ``on_data`` plugins as a stage of the target's
        side; this greenlet then ends, the relay accounts for the end."""
        owner, rule = self.owner, self.owner.rule
        if isinstance(client, StagedSocket):
            stages = [client.stage]
            raw = client.detach()
        else:
            stages = []
            raw = adopt(client, nonblocking=True)
        target = adopt(self.upstream, nonblocking=True)
        try:
            stages.append(WsStage.server(rule.max_message_size, leftover))
            target_stages = [] if transform is None else [TransformStage(transform, rule.name, self.conn.client)]
            relay = HubRelay(raw, target, self.conn, rule.idle_timeout, client_stages=stages,
                             target_stages=target_stages)
        except BaseException:
            raw.close()  # detached from their gevent sockets: nobody else would close them
            target.close()
            raise
        self.detached = True
        owner.adopt_relay(relay, self.conn, self.view)

    def _pump_datagrams(self, client: socket.socket | StagedSocket, leftover: bytes) -> None:
        """A UDP tunnel's exit (SPEC §13): each binary message one datagram to the
        target, each datagram back one message, in this greenlet (and the pump's
        two) until the WebSocket closes or ``idleTimeout`` passes in silence."""
        owner, rule, conn = self.owner, self.owner.rule, self.conn
        stats = owner.stats
        client.settimeout(None)

        def count_in(size: int) -> None:
            conn.add_received(size)
            stats.udp_packets_received += 1

        def count_out(size: int) -> None:
            conn.add_sent(size)
            stats.udp_packets_sent += 1

        pump = DatagramPump(client, self.upstream, False, leftover, rule.idle_timeout, rule.max_message_size,
                            count_in, count_out, owner.transform(self.view))
        self.outcome = pump.run()

    def _buffered_bytes(self) -> bytes:
        """Bytes pywsgi's reader already took from the socket past the request (a
        client may send its first frame right behind the upgrade request)."""
        self.socket.settimeout(0.0)
        try:
            peeked = self.rfile.peek(65536)  # no blocking read: the socket is non-blocking now
        except (BlockingIOError, OSError):
            return b""
        return self.rfile.read(len(peeked)) if peeked else b""
