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
  frames into memory and unmasks byte by byte) the bytes go through ``WsBridge``.
  Nothing per connection is stored on the shared server object.

The upgrade request must arrive within ``handshakeTimeout``. An unexpected
exception (a bug) in a connection's handling ends that connection as
``internal_error`` (``handle_error``): counted and logged once with its
traceback, instead of pywsgi passing it to the hub without the rule or client.
"""

from __future__ import annotations

import base64
import binascii
import socket

import gevent
from gevent import GreenletExit
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler

from gportmap.engine import wsframe
from gportmap.engine.net import peer_text, set_nodelay
from gportmap.engine.wsbridge import WsBridge
from gportmap.failures import INTERNAL_ERROR
from gportmap.log import ClientErrorsAsLog, get_logger
from gportmap.protocols.stream import StreamRuleServer
from gportmap.stats import Connection

logger = get_logger("websocket")


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
        try:
            if not owner.admit(address, client_text):
                return
            if owner.server_tls is None:
                super().handle(sock, address)
                return
            tls = owner.tls_accept(sock, client_text)
            if tls is None:
                return
            try:
                super().handle(tls, address)
            finally:
                tls.close()
        except Exception as exc:  # noqa: BLE001 - a bug outside pywsgi's request handling
            owner.internal_error(exc, client_text)


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
    """One client connection: admission, handshake deadline, upgrade, bridge."""

    def handle(self) -> None:
        owner: WebSocketServer = self.server.rule_server
        self.owner = owner
        self.client_text = peer_text(self.client_address)
        self.conn: Connection | None = None
        self.upstream: socket.socket | None = None
        self.outcome: tuple[str, str | None] = ("closed", None)
        self.view = None
        self.deadline = gevent.Timeout(owner.rule.handshake_timeout)
        self.deadline.start()
        try:
            super().handle()
        except gevent.Timeout as timeout:
            if timeout is not self.deadline:
                raise
            if self.conn is not None:
                self.outcome = ("handshake_timeout", None)
        except gevent.GreenletExit:
            self.outcome = ("stopped", None)
            raise
        finally:
            self.deadline.cancel()
            if self.upstream is not None:
                self.upstream.close()
            if self.conn is not None:
                owner.finish(self.conn, *self.outcome, self.view)

    @property
    def logger(self):  # gevent-websocket's own logger would add a handler of its own
        return logger

    def handle_error(self, exc_type: type, exc: BaseException, tb) -> None:
        """pywsgi's hook for an unexpected exception while handling the request (a
        bug, not bad client input): the connection ends as ``internal_error``,
        counted and logged here with its traceback, and gets a 500 if nothing was
        answered yet. Socket errors and a greenlet's kill keep pywsgi's handling."""
        if isinstance(exc, (OSError, GreenletExit)) or not isinstance(exc, Exception):
            super().handle_error(exc_type, exc, tb)
            return
        text = self.owner.internal_error(exc, self.client_text)
        if self.conn is not None:
            self.outcome = (INTERNAL_ERROR, text)
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

    def upgrade_connection(self) -> list[bytes] | None:
        owner, rule, environ = self.owner, self.owner.rule, self.environ
        if environ.get("PATH_INFO") != rule.path:
            return self._refuse("404 Not Found", "not found")
        if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
            return self._refuse("426 Upgrade Required", "WebSocket version 13 only", [("Sec-WebSocket-Version", "13")])
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            return self._refuse("400 Bad Request", "invalid Sec-WebSocket-Key")
        if rule.origins and environ.get("HTTP_ORIGIN") not in rule.origins:
            owner.reject(self.client_text, "acl")
            return self._refuse("403 Forbidden", "origin not allowed")
        self.view = owner.view(self.client_text)
        if not owner.plugins_accept(self.view, self.client_text):
            return self._refuse("403 Forbidden", "refused")
        if owner.full():
            owner.reject(self.client_text, "limit")
            return self._refuse("503 Service Unavailable", "too many connections")
        self.deadline.cancel()
        self.conn = owner.open(self.client_text, self.view)
        try:
            self.upstream = owner.connect_target()
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
        set_nodelay(client)
        leftover = self._buffered_bytes()
        bridge = WsBridge(
            client, leftover, self.upstream, self.conn, rule.idle_timeout, owner.context.buffers, rule.max_message_size, False,
            owner.transform(self.view),
        )
        self.outcome = (bridge.run(), bridge.error)

    def _buffered_bytes(self) -> bytes:
        """Bytes pywsgi's reader already took from the socket past the request (a
        client may send its first frame right behind the upgrade request)."""
        self.socket.settimeout(0.0)
        try:
            peeked = self.rfile.peek(65536)  # no blocking read: the socket is non-blocking now
        except (BlockingIOError, OSError):
            return b""
        return self.rfile.read(len(peeked)) if peeked else b""
