"""TCP rules: accept, admit, connect to the target, relay, account, log.

One gevent StreamServer per rule with its own greenlet Pool. The pool is a little
larger than ``maxConnections`` so that one connection over the limit is still
accepted and closed at once (counted as rejected, SPEC §3) instead of waiting in
the kernel's backlog; the pool's bound keeps a flood of rejections from spawning
greenlets without limit.
"""

from __future__ import annotations

import logging
import socket

import gevent
import gevent.socket
from gevent.pool import Pool
from gevent.server import StreamServer

from gportmap.config import Rule
from gportmap.log import get_logger, log_event
from gportmap.net import bind_listener, connect_error_text, peer_text, set_nodelay
from gportmap.protocols import ServerContext
from gportmap.relay import Relay

logger = get_logger("tcp")

#: Extra pool slots beyond maxConnections, for connections that are only rejected.
REJECT_HEADROOM = 16


class TcpServer:
    """Serves one tcp rule."""

    def __init__(self, rule: Rule, context: ServerContext) -> None:
        self.rule = rule
        self.context = context
        self.stats = context.stats.rule(rule.name, rule.protocol)
        self.pool = Pool(rule.max_connections + REJECT_HEADROOM)
        self.listener: socket.socket | None = None
        self._server: StreamServer | None = None
        self._target = (rule.target_host, rule.target_port)

    # -- the supervisor's surface -------------------------------------------------

    def start(self, listener: socket.socket | None = None) -> None:
        """Start accepting, on ``listener`` if handed over, else on a new socket."""
        self.listener = listener or bind_listener(self.rule.listen_host, self.rule.listen_port)
        self._server = StreamServer(self.listener, self._handle, spawn=self.pool)
        self._server.start()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.stop_accepting()

    def release_listener(self) -> socket.socket | None:
        """Stop accepting and hand the listening socket to a successor, still open:
        connection attempts queue in the kernel's backlog meanwhile, none is refused."""
        self.stop_accepting()
        listener, self.listener = self.listener, None
        return listener

    def close(self) -> None:
        """Close the listening socket: new connection attempts are refused from now on."""
        self.stop_accepting()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    @property
    def active(self) -> int:
        return len(self.pool)

    def join(self, timeout: float | None = None) -> bool:
        return self.pool.join(timeout=timeout)

    def kill(self) -> None:
        self.pool.kill(block=True, timeout=5)

    # -- per connection -----------------------------------------------------------

    def _handle(self, client: socket.socket, address: tuple) -> None:
        rule, stats, context = self.rule, self.stats, self.context
        client_text = peer_text(address)
        if context.stats.full(stats, rule.max_connections):
            self._reject(client_text, "limit")
            return  # StreamServer closes the client socket
        conn = context.stats.open(stats, client_text, rule.target)
        reason, error, upstream = "closed", None, None
        try:
            try:
                upstream = gevent.socket.create_connection(self._target, timeout=rule.connect_timeout)
            except OSError as exc:
                stats.connect_failures += 1
                reason, error = "connect_failed", connect_error_text(exc)
            else:
                set_nodelay(client)
                set_nodelay(upstream)
                relay = Relay(client, upstream, conn, rule.idle_timeout, context.buffers)
                reason = relay.run()
                error = relay.error
        except gevent.GreenletExit:
            reason = "stopped"
            raise
        finally:
            if upstream is not None:
                upstream.close()
            context.stats.close(conn)
            fields = {"error": error} if error else {}
            log_event(
                logger,
                logging.WARNING if reason == "connect_failed" else logging.INFO,
                "connection_closed",
                "connection closed" if reason != "connect_failed" else f"cannot reach target: {error}",
                rule=rule.name,
                client=client_text,
                target=rule.target,
                bytes_received=conn.bytes_received,
                bytes_sent=conn.bytes_sent,
                duration=round(conn.duration, 3),
                reason=reason,
                **fields,
            )

    def _reject(self, client_text: str, reason: str) -> None:
        self.stats.rejected[reason] += 1
        allowed, suppressed = self.context.rejections.allow((self.rule.name, reason))
        if allowed:
            extra = {"suppressed": suppressed} if suppressed else {}
            log_event(
                logger,
                logging.WARNING,
                "connection_rejected",
                "connection rejected",
                rule=self.rule.name,
                client=client_text,
                target=self.rule.target,
                reason=reason,
                **extra,
            )
