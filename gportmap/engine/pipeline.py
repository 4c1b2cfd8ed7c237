"""A connection's whole path in hub callbacks up to the relay: the TLS handshake
with the client (``HubHandshake``, under a timer for ``handshakeTimeout``), the
connect to a target of the rule's pool (``gportmap.engine.connector.PoolConnect``),
the PROXY protocol header and the TLS handshake with the target (a failure of
either is a failed connect: another target is tried), then
``gportmap.engine.hubrelay.HubRelay``.

A greenlet that must run user code first (plugin hooks) runs the same handshakes
through ``await_handshake`` and hands the sockets to ``HubRelay``. As in the relay,
no callback lets an exception reach the hub: a bug ends its connection as
``internal_error``.
"""

from __future__ import annotations

import _socket
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gevent import get_hub
from gevent.event import AsyncResult

from gportmap.config.model import Balance
from gportmap.engine.connector import PoolConnect
from gportmap.engine.hubrelay import _BUFFER, HubRelay
from gportmap.engine.net import READ, WRITE, connect_error_text
from gportmap.engine.pool import TargetPool, TargetState
from gportmap.engine.pumprelay import make_relay
from gportmap.engine.sockopts import NODELAY_INHERITED
from gportmap.engine.tls import TlsError, TlsStage
from gportmap.reasons import CloseReason
from gportmap.stats import Connection


class HubHandshake:
    """Readies one socket for the relay in hub callbacks: sends ``preamble`` (the
    PROXY protocol header), then runs ``stage``'s TLS handshake, all within
    ``timeout`` seconds (one timer; no greenlet, no ``gevent.Timeout``). Calls
    ``on_ready()`` or ``on_failed(error)`` exactly once, unless cancelled:
    ``TlsError`` (the handshake failed), ``TimeoutError`` or the socket's
    ``OSError``. An unexpected exception goes to ``on_crash``.

    What the peer sent past the handshake (its first application records) stays
    in the stage for the relay (``HubRelay.start`` passes it on)."""

    __slots__ = ("sock", "stage", "pending", "preamble_left", "timeout", "on_ready", "on_failed", "on_crash",
                 "reader", "writer", "timer", "loop")

    #: What a handshake that did not finish in time fails with.
    TIMEOUT_TEXT = "no TLS handshake in time"

    def __init__(
        self,
        sock: _socket.socket,
        stage: TlsStage | None,
        timeout: float,
        on_ready: Callable[[], None],
        on_failed: Callable[[OSError], None],
        on_crash: Callable[[Exception], None],
        preamble: bytes = b"",
    ) -> None:
        self.loop = get_hub().loop
        self.sock = sock
        self.stage = stage
        self.pending = memoryview(preamble)
        #: Bytes of the preamble not sent yet: a failure then is the preamble's.
        self.preamble_left = len(preamble)
        self.timeout = timeout
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.on_crash = on_crash
        self.reader = self.writer = self.timer = None

    def start(self) -> None:
        self.timer = self.loop.timer(self.timeout)
        self.timer.start(self._on_timeout, update=True)  # from now (see HubConnect)
        self._guarded(self._step)

    def cancel(self) -> None:
        """Stop every watcher (the socket is its owner's to close)."""
        for watcher in (self.reader, self.writer, self.timer):
            if watcher is not None:
                watcher.close()
        self.reader = self.writer = self.timer = None

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run ``step`` the way every callback here runs: failures end the
        handshake through ``on_failed``, bugs (here or in the callbacks) through
        ``on_crash``; nothing reaches the hub."""
        try:
            try:
                step()
            except OSError as exc:  # TlsError included
                self.cancel()
                self.on_failed(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self.cancel()
            self.on_crash(exc)

    def _step(self) -> None:
        """Send what is pending, then advance the handshake, until it must wait for
        the network or is done."""
        stage = self.stage
        while True:
            if self.pending:
                try:
                    sent = self.sock.send(self.pending)
                except BlockingIOError:
                    sent = 0
                self.pending = self.pending[sent:]
                self.preamble_left = max(0, self.preamble_left - sent)
                if self.pending:
                    self._wait(WRITE)
                    return
            if stage is None or stage.handshaken:
                self.cancel()
                self.on_ready()
                return
            complete = stage.handshake()
            out = stage.data_to_send()
            if out:
                self.pending = memoryview(out)
                continue
            if not complete:
                self._wait(READ)
                return

    def _wait(self, mask: int) -> None:
        """Wait for one readiness: the socket readable (the peer's records) or
        writable (room for ours)."""
        if mask == READ:
            if self.writer is not None and self.writer.active:
                self.writer.stop()
            if self.reader is None:
                self.reader = self.loop.io(self.sock.fileno(), READ)
            if not self.reader.active:
                self.reader.start(self._on_readable)
        else:
            if self.reader is not None and self.reader.active:
                self.reader.stop()
            if self.writer is None:
                self.writer = self.loop.io(self.sock.fileno(), WRITE)
            if not self.writer.active:
                self.writer.start(self._on_writable)

    def _on_readable(self) -> None:
        self._guarded(self._receive)

    def _receive(self) -> None:
        try:
            n = self.sock.recv_into(_BUFFER)
        except BlockingIOError:
            return
        if n:
            self.stage.feed(_BUFFER[:n])
        else:
            self.stage.feed_eof()  # the handshake then fails: the peer left in the middle
        self._step()

    def _on_writable(self) -> None:
        self._guarded(self._step)

    def _on_timeout(self) -> None:
        self._guarded(self._time_out)

    def _time_out(self) -> None:
        raise TimeoutError(self.TIMEOUT_TEXT)


def await_handshake(sock: _socket.socket, stage: TlsStage | None, timeout: float, preamble: bytes = b"") -> None:
    """``HubHandshake`` for a greenlet that must wait for it (one that ran plugin
    hooks or resolved a name): returns once ready, raises what it failed with. The
    handshake itself runs in hub callbacks all the same."""
    result = AsyncResult()
    handshake = HubHandshake(sock, stage, timeout, lambda: result.set(None), result.set_exception,
                             result.set_exception, preamble)
    handshake.start()
    try:
        result.get()
    finally:
        handshake.cancel()  # killed while waiting (a drain cut-off): no watcher left behind


class TargetSetupError(OSError):
    """The PROXY protocol header or the TLS handshake with a connected target
    failed; its ``strerror`` says which and why (``target_setup_error``)."""


def await_target_ready(sock: _socket.socket, stage: TlsStage | None, timeout: float, preamble: bytes = b"") -> None:
    """``await_handshake`` for a target: sends ``preamble`` (the PROXY header), then
    runs ``stage``'s TLS handshake, in hub callbacks while the greenlet waits;
    TargetSetupError in words that say which step failed."""
    result = AsyncResult()
    handshake = HubHandshake(sock, stage, timeout, lambda: result.set(None), result.set_exception,
                             result.set_exception, preamble)
    handshake.start()
    try:
        result.get()
    except OSError as exc:
        raise TargetSetupError(exc.errno, target_setup_error(exc, not handshake.preamble_left)) from exc
    finally:
        handshake.cancel()  # killed while waiting (a drain cut-off): no watcher left behind


def target_setup_error(error: OSError, preamble_sent: bool) -> str:
    """Words for a target that was connected but not readied: the PROXY protocol
    header could not be sent, or the TLS handshake with it failed or timed out."""
    if not preamble_sent:
        reason = "timed out" if isinstance(error, TimeoutError) else connect_error_text(error)
        return f"cannot send the PROXY protocol header: {reason}"
    if isinstance(error, TlsError):
        return f"TLS handshake with the target failed: {error.reason}"
    if isinstance(error, TimeoutError):
        return "TLS handshake with the target timed out"
    return connect_error_text(error)


def client_handshake_error(error: OSError) -> str:
    """Words for a failed TLS handshake with a client (the ``error`` of its
    ``connection_rejected`` record, reason ``tls``)."""
    return getattr(error, "reason", None) or str(error) or type(error).__name__


@dataclass(frozen=True)
class Route:
    """How one rule's connections reach their target from the hub; fixed for the
    life of the rule's server."""

    #: The rule's targets (their addresses IP literals on the hub path: no name to
    #: resolve there).
    pool: TargetPool
    connect_timeout: float
    idle_timeout: float
    #: The relay may splice (plain connections only).
    zero_copy: bool = False
    #: The listener's TLS (``tls``): a server-side context, and the deadline of the
    #: client's handshake.
    listener_tls: ssl.SSLContext | None = None
    handshake_timeout: float = 10.0
    #: ``targetTls``: a client-side context, and the name to send and check
    #: (``serverName``; None: the host of the target reached).
    target_tls: ssl.SSLContext | None = None
    server_name: str | None = None


class HubOwner(Protocol):
    """What a ``HubConnection`` asks of whoever admitted it (the protocol server's
    record of one admitted connection)."""

    def opened(self) -> Connection:
        """The client is ready (its TLS handshake done, if any): its admission
        slot becomes an open, counted connection."""

    def handshake_failed(self, error: str) -> None:
        """The client's TLS handshake failed or timed out: a refusal, reason ``tls``."""

    def preamble(self, client: _socket.socket) -> bytes:
        """What goes to the target before the client's bytes (a PROXY protocol
        header), b"" if nothing; OSError when the client is gone already."""

    def internal_error(self, exc: BaseException) -> str:
        """Count and log a bug in this connection's code; the text for its record."""


class HubConnection:
    """One connection from admission to close in hub callbacks, never a greenlet:
    the TLS handshake with the client (``tls``), the connect, the PROXY protocol
    header and the TLS handshake with the target (``targetTls``), then
    ``HubRelay``. ``on_done(reason, error)`` (set before ``start``) is called once
    at the end, whatever the step; ``owner.opened()`` tells whether it ever became
    a connection."""

    __slots__ = ("client", "route", "owner", "conn", "client_tls", "target", "target_tls", "preamble", "step",
                 "connector", "relay", "on_done", "finished")

    def __init__(self, client: _socket.socket, route: Route, owner: HubOwner) -> None:
        self.client = client
        self.route = route
        self.owner = owner
        self.conn: Connection | None = None
        self.client_tls: TlsStage | None = None
        self.target: _socket.socket | None = None
        self.target_tls: TlsStage | None = None
        self.preamble = b""
        self.step: HubHandshake | PoolConnect | None = None
        #: Its connect to the pool, from the client ready to the target ready: it
        #: holds the target being tried, and retries on another when one fails.
        self.connector: PoolConnect | None = None
        self.relay: HubRelay | None = None
        self.on_done: Callable[[str, str | None], None] | None = None
        self.finished = False  # on_done was called (before a relay took over)

    def start(self) -> None:
        listener_tls = self.route.listener_tls
        if listener_tls is None:
            self._client_ready()
            return
        self.client_tls = TlsStage.server(listener_tls)
        self.step = HubHandshake(
            self.client, self.client_tls, self.route.handshake_timeout, self._client_ready, self._client_failed,
            self.crash,
        )
        self.step.start()

    def abort(self, reason: str, error: str | None = None) -> None:
        """End the connection now, whatever step it is in; on_done once."""
        if self.relay is not None:
            self.relay.abort(reason, error)
        else:
            self._end(reason, error)

    def crash(self, exc: Exception) -> None:
        """An unexpected exception in a step or the handover to the relay."""
        self.abort(CloseReason.INTERNAL_ERROR, self.owner.internal_error(exc))

    # -- the steps, in order --------------------------------------------------------

    def _client_ready(self) -> None:
        self.step = None
        self.conn = self.owner.opened()
        try:
            self.preamble = self.owner.preamble(self.client)
        except OSError as exc:  # the client reset before its address could be read
            self._end(CloseReason.CLIENT_ERROR, exc.strerror or str(exc))
            return
        route = self.route
        self.connector = self.step = PoolConnect(
            route.pool, self._client_key(), route.connect_timeout, self._connected, self._connect_failed, self.crash
        )
        self.step.start()

    def _client_key(self) -> str | None:
        """The client's address for ``balance: source`` (the one balancer that needs it)."""
        if self.route.pool.rule.balance is not Balance.SOURCE:
            return None
        proxied = getattr(self.owner, "proxied", None)  # acceptProxy: the header's client
        if proxied is not None and proxied.source is not None:
            return str(proxied.source[0])
        try:
            return str(self.client.getpeername()[0])
        except OSError:
            return None  # already reset: the relay will see it

    def _client_failed(self, error: OSError) -> None:
        self.step = None
        self.owner.handshake_failed(client_handshake_error(error))
        self._end(CloseReason.TLS, None)

    def _connected(self, target: _socket.socket, state: TargetState) -> None:
        self.step = None
        self.target = target
        try:
            # A relay must not add latency to small writes; the client's socket has
            # TCP_NODELAY from its listener where the kernel passes it on.
            for sock in (target,) if NODELAY_INHERITED else (self.client, target):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # already reset: the relay will see it
            route = self.route
            if route.target_tls is None and not self.preamble:
                self._target_ready()
                return
            if route.target_tls is not None:
                self.target_tls = TlsStage.client(route.target_tls, route.server_name or state.spec.host)
            self.step = HubHandshake(target, self.target_tls, route.connect_timeout, self._target_ready,
                                     self._target_failed, self.crash, self.preamble)
            self.step.start()
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self.crash(exc)

    def _connect_failed(self, error: OSError) -> None:
        """Every attempt failed, or no target is up (counted by the pool)."""
        connector = self.connector
        self.step = self.connector = None
        text = connector.last_text if connector is not None and connector.last_error is error else None
        self._end(CloseReason.CONNECT_FAILED, text or connect_error_text(error))

    def _target_failed(self, error: OSError) -> None:
        """The PROXY header or the TLS handshake with the target failed: a failed
        connect, counted against that target; the connector tries the next."""
        step, self.step = self.step, None
        text = target_setup_error(error, step is None or not step.preamble_left)
        target, self.target = self.target, None
        target.close()
        self.target_tls = None
        self.step = self.connector
        self.connector.retry(error, text)

    def _target_ready(self) -> None:
        self.step = None
        connector, self.connector = self.connector, None
        state = connector.established()
        self.conn.hold(state, state.address)
        self.preamble = b""
        route = self.route
        self.relay = make_relay(
            self.client, self.target, self.conn, route.idle_timeout, route.zero_copy, on_done=self.on_done,
            client_tls=self.client_tls, target_tls=self.target_tls, target_reader=connector.take_spare(),
        )
        self.relay.start()

    def _end(self, reason: str, error: str | None) -> None:
        """The end before a relay took over: sockets closed, on_done once."""
        if self.finished or self.relay is not None:
            return
        self.finished = True
        step, self.step = self.step, None
        if step is not None:
            step.cancel()
        connector, self.connector = self.connector, None
        if connector is not None and connector is not step:
            connector.cancel()  # a target held while its handshake ran: given back
        self.client.close()
        if self.target is not None:
            self.target.close()
        self.on_done(reason, error)
