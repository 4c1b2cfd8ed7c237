"""What every rule served over a TCP listener shares (tcp and websocket).

One gevent server per rule on its own greenlet Pool. The pool is a little larger
than ``maxConnections`` so that one connection over the limit is still accepted and
closed at once (counted as rejected, SPEC §3) instead of waiting in the kernel's
backlog; the pool's bound keeps a flood of rejections from spawning greenlets
without limit. Subclasses supply ``_make_server`` (what speaks on the socket).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import gevent
import gevent.socket
from gevent.pool import Pool
from gevent.server import StreamServer

from gportmap.config import Rule
from gportmap.log import get_logger, log_event
from gportmap.net import bind_listener, connect_error_text, set_nodelay
from gportmap.protocols import ServerContext
from gportmap.stats import Connection

logger = get_logger("connections")

#: Extra pool slots beyond maxConnections, for connections that are only rejected.
REJECT_HEADROOM = 16

#: What a connection's work returns: the close reason and an error text.
Outcome = tuple[str, str | None]


class StreamRuleServer:
    """The supervisor's surface, admission, target connects and the connection log."""

    def __init__(self, rule: Rule, context: ServerContext) -> None:
        self.rule = rule
        self.context = context
        self.stats = context.stats.rule(rule.name, rule.protocol)
        self.pool = Pool(rule.max_connections + REJECT_HEADROOM)
        self.listener: socket.socket | None = None
        self._server: StreamServer | None = None
        self._target = (rule.target_host, rule.target_port)

    def _make_server(self, listener: socket.socket) -> StreamServer:
        raise NotImplementedError

    # -- the supervisor's surface ---------------------------------------------------

    def start(self, listener: socket.socket | None = None) -> None:
        """Start accepting, on ``listener`` if handed over, else on a new socket."""
        self.listener = listener or bind_listener(self.rule.listen_host, self.rule.listen_port)
        self._server = self._make_server(self.listener)
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

    # -- per connection -------------------------------------------------------------

    def full(self) -> bool:
        return self.context.stats.full(self.stats, self.rule.max_connections)

    def open(self, client_text: str) -> Connection:
        return self.context.stats.open(self.stats, client_text, self.rule.target)

    def account(self, client_text: str, work: Callable[[Connection], Outcome]) -> None:
        """Run ``work`` as one admitted connection: counted, and logged when it ends."""
        conn = self.open(client_text)
        reason, error = "closed", None
        try:
            reason, error = work(conn)
        except gevent.GreenletExit:
            reason = "stopped"
            raise
        finally:
            self.finish(conn, reason, error)

    def finish(self, conn: Connection, reason: str, error: str | None) -> None:
        self.context.stats.close(conn)
        fields = {"error": error} if error else {}
        failed = reason == "connect_failed"
        log_event(
            logger,
            logging.WARNING if failed else logging.INFO,
            "connection_closed",
            f"cannot reach target: {error}" if failed else "connection closed",
            rule=self.rule.name,
            client=conn.client,
            target=self.rule.target,
            bytes_received=conn.bytes_received,
            bytes_sent=conn.bytes_sent,
            duration=round(conn.duration, 3),
            reason=reason,
            **fields,
        )

    def connect_target(self) -> socket.socket:
        """A TCP connection to the rule's target within ``connectTimeout``; OSError if not."""
        try:
            upstream = gevent.socket.create_connection(self._target, timeout=self.rule.connect_timeout)
        except OSError:
            self.stats.connect_failures += 1
            raise
        set_nodelay(upstream)
        return upstream

    @staticmethod
    def connect_failed(exc: OSError) -> Outcome:
        return "connect_failed", connect_error_text(exc)

    def reject(self, client_text: str, reason: str) -> None:
        """Count a refused connection; log it at a bounded rate."""
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
