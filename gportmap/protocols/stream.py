"""What every rule served over a TCP listener shares (tcp and websocket).

One gevent server per rule on its own greenlet Pool. The pool is a little larger
than ``maxConnections`` so that one connection over the limit is still accepted and
closed at once (counted as rejected, SPEC §3) instead of waiting in the kernel's
backlog; the pool's bound keeps a flood of rejections from spawning greenlets
without limit. Subclasses supply ``_make_server`` (what speaks on the socket).

The limits are counted at admission, for every protocol: ``admit_slot`` takes the
connection's place under ``maxConnections`` (the rule's and the process's, a
``Slot``) before any handshake (TLS, a WebSocket upgrade); ``open`` turns it into
the open connection, and a failed handshake gives it back. So N clients hold the
N places whether they are relayed or still mid-handshake, and the next one is
refused at once as ``limit``.

The targets are the rule's pool (``gportmap.engine.pool``, SPEC §8), kept in its
counters so that a reload keeps each staying target's state. Every connect goes
through the one connector (``gportmap.engine.connector``): the hub path through
``Route.pool``, a greenlet through ``connect_target`` / ``connect_staged``, which
wait on the same hub callbacks. A connection holds the target it reached until it
is closed (``Connection.hold``; ``StatsRegistry.close`` gives it back).
"""

from __future__ import annotations

import _socket
import dataclasses
import functools
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Iterable

import gevent
import gevent.socket
from gevent import get_hub, getcurrent
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from gportmap.config import Rule
from gportmap.config.faults import RuleSource
from gportmap.config.model import Balance, format_address
from gportmap.engine import proxyproto
from gportmap.engine.acceptor import Acceptor, ListenKey
from gportmap.engine.clientlimit import ClientTable, limits_for
from gportmap.engine.connector import PoolConnect, await_connect, retry_connect
from gportmap.engine.faults import FaultSession
from gportmap.engine.net import bind_listener, connect_error_text, peer_text, set_nodelay
from gportmap.engine.pipeline import Route, await_target_ready, target_setup_error
from gportmap.engine.pool import TargetPool
from gportmap.engine.portshift import Shifts, local_address, local_port
from gportmap.engine.proxyaccept import TrustedProxies, await_proxy_header
from gportmap.engine.proxyproto import ProxyHeader, ProxyHeaderError
from gportmap.engine.sockopts import prepare_listener
from gportmap.engine.tls import TlsStage
from gportmap.events import ConnectionClosed, ConnectionRejected, TlsVerifyOff
from gportmap.failures import report_internal_error
from gportmap.log import emit, emit_fields, get_logger
from gportmap.plugins import ConnView, HookError, PluginChain, Reject, log_hook_error
from gportmap.protocols import ServerContext
from gportmap.reasons import CloseReason, RejectReason
from gportmap.security import Admission, client_context, server_context
from gportmap.stats import Connection, Slot

logger = get_logger("connections")

#: Extra pool slots beyond maxConnections, for connections that are only rejected.
REJECT_HEADROOM = 16

#: What a connection's work returns: the close reason and an error text. A
#: ``CloseReason``; a protocol of a plugin package may return a plain str.
Outcome = tuple[CloseReason | str, str | None]

#: What a connection's work returns instead when it handed the connection to a relay
#: that runs without a greenlet (``gportmap.engine.hubrelay``): that relay reports the end.
DETACHED = (CloseReason.DETACHED, None)


class StreamRuleServer:
    """The supervisor's surface, admission, target connects and the connection log."""

    def __init__(self, rule: Rule, context: ServerContext) -> None:
        self.rule = rule
        self.context = context
        self.stats = context.stats.rule(rule.name, rule.protocol)
        self.pool = Pool(rule.max_connections + REJECT_HEADROOM)
        #: Connections relayed by hub callbacks, not by a greenlet of ``pool``: each
        #: has an ``abort(reason)``. ``_no_relays`` is set while there are none.
        self.relays: set = set()
        self._no_relays = Event()
        self._no_relays.set()
        self.listener: socket.socket | None = None
        self._server: StreamServer | None = None
        #: ``faulty()``'s last answer, with the fault board's ``changed`` it holds for.
        self._faulty: tuple[object, bool] | None = None
        #: The rule's targets, kept with its counters across its servers (SPEC §8).
        self.target_pool = TargetPool.for_rule(rule, self.stats)
        #: Set when every target is an IP address: connects need no lookup, so a
        #: connection may run in hub callbacks from its accept on (tcp's HUB path).
        self._literal = self.target_pool.targets[0].addresses.addresses[0] if self.target_pool.literal else None
        #: The connection a greenlet opened (``open``), for ``connect_target`` to
        #: hand the target it reaches; gone with the greenlet.
        self._opened: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.admission = Admission(rule.allow, rule.deny)
        tls, target_tls = rule.tls, rule.target_tls
        self.server_tls = server_context(tls.cert_file, tls.key_file, tls.client_ca_file) if tls else None
        self.client_tls = client_context(target_tls.ca_file, target_tls.verify) if target_tls else None
        #: The name sent and checked in the TLS handshake with a target: ``serverName``,
        #: else the host of the target reached (the first target's here, for callers
        #: that do not know which: a pool's hub and greenlet connects use each one's).
        self.explicit_server_name = target_tls.server_name if target_tls else None
        self.server_name = (target_tls.server_name or rule.target_host) if target_tls else None
        self.plugins = PluginChain(rule.plugins)
        #: ``acceptProxy`` (SPEC §13): whose connections start with a PROXY header.
        accept = rule.accept_proxy
        self.trusted = TrustedProxies(accept.trusted, accept.timeout) if accept is not None else None
        #: Connections whose header is still awaited in hub callbacks (tcp's hub path).
        self.awaiting_header = 0
        #: The header a greenlet's connection came with, for the onward
        #: ``proxyProtocol`` and ``balance: source``; gone with the greenlet.
        self._proxied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        #: ``perClient`` (SPEC §13): the bounded table of clients, or None.
        limits = limits_for(rule.per_client, udp=False)
        self.clients = ClientTable(limits) if limits is not None else None

    def _make_server(self, listener: socket.socket) -> StreamServer:
        raise NotImplementedError

    @functools.cached_property
    def route(self) -> Route:
        """How this rule's connections are readied and relayed on the hub (targets
        given as IP literals; names are resolved by a greenlet first)."""
        rule = self.rule
        return Route(
            pool=self.target_pool,
            connect_timeout=rule.connect_timeout,
            idle_timeout=rule.idle_timeout,
            zero_copy=self.context.splice,
            listener_tls=self.server_tls,
            handshake_timeout=rule.handshake_timeout,
            target_tls=self.client_tls,
            server_name=self.explicit_server_name,
        )

    # -- the supervisor's surface ---------------------------------------------------

    def start(self, listener: socket.socket | None = None) -> None:
        """Start accepting, on ``listener`` if handed over, else on a new socket."""
        self.listener = listener or bind_listener(self.rule.listen_host, self.rule.listen_port)
        prepare_listener(self.listener, self.rule.keep_alive)  # inherited by every accepted socket
        self._server = self._make_server(self.listener)
        self._server.start()
        if self.rule.target_tls is not None and not self.rule.target_tls.verify:
            emit(logger, TlsVerifyOff(rule=self.rule.name, target=self.rule.target))

    # -- several listening sockets (SPEC §9: ranges, lists of addresses) -------------

    #: The rule's listening sockets when it has several (``start_many``): one
    #: ``Acceptor`` with a socket and a watcher per port; None for a single socket.
    doors: Acceptor | None = None

    def start_many(self, sockets: dict[ListenKey, socket.socket]) -> None:
        """Accept on every one of ``sockets`` (bound already; a range's ports, a list's
        addresses): a watcher each, all feeding this rule's one handler, limits and
        counters. The target port of a connection follows the port it came in on."""
        for sock in sockets.values():
            prepare_listener(sock, self.rule.keep_alive)  # inherited by every accepted socket
        template = self._make_server(next(iter(sockets.values())))  # never started: the handler
        self.doors = Acceptor(template, self.rule.name)
        self.doors.add(sockets.items())
        self.doors.start()
        if self.rule.target_tls is not None and not self.rule.target_tls.verify:
            emit(logger, TlsVerifyOff(rule=self.rule.name, target=self.rule.target))

    def add_listeners(self, sockets: dict[ListenKey, socket.socket]) -> None:
        """More sockets for a server started by ``start_many`` (a reload hands a
        large range over in slices)."""
        for sock in sockets.values():
            prepare_listener(sock, self.rule.keep_alive)
        assert self.doors is not None
        self.doors.add(sockets.items())

    def take_listeners(self, keys: Iterable[ListenKey]) -> dict[ListenKey, socket.socket]:
        """Stop accepting on ``keys`` and hand their sockets on, still open."""
        return dict(self.doors.take(keys)) if self.doors is not None else {}

    def listening(self) -> dict[ListenKey, socket.socket]:
        """Every listening socket this server holds, by (host, port)."""
        if self.doors is not None:
            return self.doors.sockets()
        if self.listener is not None:
            return {(self.rule.listen_host, self.rule.listen_port): self.listener}
        return {}

    @functools.cached_property
    def shifts(self) -> Shifts:
        """Per listen port, the pool its connections see ("C-D" targets, SPEC §9)."""
        moved = any(target.ports is not None for target in self.rule.targets)
        return Shifts(self.rule.listen_port, moved)

    @functools.cached_property
    def one_listener(self) -> bool:
        """The rule listens on one address (asked per connection; a rule never changes)."""
        return self.rule.listener_count == 1

    @functools.cached_property
    def rule_listen(self) -> str:
        """``Rule.listen``, made once: a connection's listen address unless it has its own."""
        return self.rule.listen

    def listen_text(self, client: object) -> str | None:
        """The address ``client`` (an accepted socket) came in on, for a rule with
        several listeners (SPEC §9: ``/connections`` shows it); None (the rule's one
        address) for a rule with one, without a system call."""
        if self.one_listener:
            return None
        address = local_address(client)
        return format_address(*address) if address is not None else None  # None: reset, the rule's stands

    def pool_at(self, pool: TargetPool, client: object) -> TargetPool:
        """``pool`` as a connection accepted on ``client`` sees it: its "C-D" targets
        moved to the port of the listener it came in on."""
        if not self.shifts.active:
            return pool
        return self.shifts.pool(pool, local_port(client))

    def route_at(self, route: Route, client: object) -> Route:
        """``route`` for a connection accepted on ``client`` (see ``pool_at``)."""
        if not self.shifts.active:
            return route
        pool = self.pool_at(route.pool, client)
        return route if pool is route.pool else dataclasses.replace(route, pool=pool)

    def stop_accepting(self) -> None:
        if self.doors is not None:
            self.doors.stop()
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
        if self.doors is not None:
            self.doors.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    @property
    def active(self) -> int:
        return len(self.pool) + len(self.relays)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every connection: those with a greenlet, then the hub relays (no
        greenlet hands a connection over once the pool is empty)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.pool.join(timeout=timeout):
            return False
        self._no_relays.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.relays and not self.pool

    def kill(self) -> None:
        self.pool.kill(block=True, timeout=5)
        for relay in list(self.relays):
            relay.abort(CloseReason.STOPPED)

    def adopt_relay(self, relay, conn: Connection, view: ConnView | None = None) -> Outcome:
        """Track a started hub relay as an open connection; when it ends it is
        accounted and logged like any other. Returns DETACHED for ``account``."""
        relay.on_done = lambda reason, error: self._relay_done(relay, conn, reason, error, view)
        self._track(relay)
        return DETACHED

    def adopt_connection(self, pipeline, admitted: Admitted) -> None:
        """Track a ``HubConnection`` from its admission: it holds ``admitted``'s
        slot until it opens its connection (``Admitted.opened``); when it ends the
        connection is accounted and logged, or the slot given back if it never
        opened (a failed TLS handshake, a stop before it)."""

        def done(reason: str, error: str | None) -> None:
            if admitted.conn is None:
                admitted.release()
                self.untrack(pipeline)
            else:
                self._relay_done(pipeline, admitted.conn, reason, error, admitted.view)

        pipeline.on_done = done
        self._track(pipeline)

    def _track(self, relay) -> None:
        self.relays.add(relay)
        self._no_relays.clear()
        relay.start()

    def untrack(self, relay) -> None:
        """Stop tracking a hub relay (it ended, or another process owns it now)."""
        self.relays.discard(relay)
        if not self.relays:
            self._no_relays.set()

    def _relay_done(self, relay, conn: Connection, reason: str, error: str | None, view: ConnView | None) -> None:
        """A hub relay ended (in a hub callback): account and log it. Plugins'
        ``on_close`` is user code that may wait, so with plugins that runs in a
        greenlet of its own; the relay stays tracked until it is done (a drain
        waits for it)."""
        if view is None:
            self.untrack(relay)
            self.finish(conn, reason, error)
            return

        def close() -> None:
            try:
                self.finish(conn, reason, error, view)
            finally:
                self.untrack(relay)

        gevent.spawn(close)

    # -- per connection -------------------------------------------------------------

    def admit(self, address: object, client_text: str) -> bool:
        """Address admission, then the connection limits; refusals are counted.
        Takes no place under the limits: callers with a handshake to run use
        ``admit_slot``."""
        if not self.admission.admits(address):
            self.reject(client_text, RejectReason.ACL)
            return False
        if self.full():
            self.reject(client_text, RejectReason.LIMIT)
            return False
        return True

    def admit_slot(self, address: object, client_text: str) -> Slot | None:
        """Admission for every stream protocol: the address (allow/deny), then the
        connection's place under the rule's and the process's ``maxConnections``,
        taken now, before any handshake. None when refused (counted: ``acl``,
        ``limit``). The caller passes the slot to ``open`` once the connection is
        ready (it becomes that connection), or calls ``slot.release()`` when it
        never gets there (a failed handshake); release is safe to call always."""
        if not self.admission.admits(address):
            self.reject(client_text, RejectReason.ACL)
            return None
        lease = None
        if self.clients is not None:  # perClient, after allow/deny, before the rule's limit
            lease = self.clients.admit(address)
            if isinstance(lease, str):
                self.reject(client_text, RejectReason.CLIENT_LIMIT, lease)
                return None
        slot = self.context.stats.reserve(self.stats, self.rule.max_connections)
        if slot is None:
            if lease is not None:
                lease.release()
            self.reject(client_text, RejectReason.LIMIT)
            return slot
        slot.lease = lease  # given back with the slot, or kept by the connection it becomes
        return slot

    def read_proxy_header(self, sock: object, address: tuple) -> tuple | None:
        """``acceptProxy`` for a greenlet, before admission: the client's address,
        which is the PROXY header's source when ``address`` is a trusted proxy's
        (the header read within the timeout, in hub callbacks, nothing past it
        taken off ``sock``), else ``address`` itself, never parsed. None when a
        trusted sender brought no valid header in time: counted and logged as
        rejected ``proxy_header``; the caller closes the socket."""
        if self.trusted is None or not self.trusted.trusts(address):
            return address
        try:
            header = await_proxy_header(sock, self.trusted.timeout)
        except ProxyHeaderError as exc:
            self.reject(peer_text(address), RejectReason.PROXY_HEADER, str(exc))  # the proxy's address
            return None
        if header.source is None:
            return address
        self._proxied[getcurrent()] = header
        return header.source

    def tls_accept(self, sock: socket.socket, client_text: str) -> socket.socket | None:
        """The client's TLS handshake, in its own greenlet and within handshakeTimeout
        (a client that never sends a ClientHello holds a slot only that long).
        None when it fails: counted as rejected ``tls``."""
        assert self.server_tls is not None
        tls = None
        try:
            with gevent.Timeout(self.rule.handshake_timeout, TimeoutError("no TLS handshake in time")):
                tls = self.server_tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                tls.do_handshake()
            return tls
        except (ssl.SSLError, OSError) as exc:
            if tls is not None:
                tls.close()
            self.reject(client_text, RejectReason.TLS, getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
            return None

    def full(self) -> bool:
        return self.context.stats.full(self.stats, self.rule.max_connections)

    def view(self, client_text: str) -> ConnView | None:
        """The plugins' view of a new connection (None when the rule has no plugins)."""
        if not self.plugins.active:
            return None
        rule = self.rule
        return ConnView(self.context.stats.next_id(), rule.name, rule.protocol, client_text, rule.target, time.time())

    def plugins_accept(self, view: ConnView | None, client_text: str) -> bool:
        """``on_accept`` of every plugin; a refusal or a failure is counted as ``plugin``."""
        if view is None:
            return True
        try:
            self.plugins.accept(view)
            return True
        except Reject as exc:
            self.reject(client_text, RejectReason.PLUGIN, str(exc) or None)
        except HookError as exc:
            log_hook_error(exc, self.rule.name, client_text)
            self.reject(client_text, RejectReason.PLUGIN, str(exc))
        return False

    def plugins_connect(self, view: ConnView | None) -> Outcome | None:
        """``on_connect``; an outcome when a plugin failed (the connection then ends)."""
        if view is None:
            return None
        try:
            self.plugins.connect(view)
        except (HookError, Reject) as exc:
            if isinstance(exc, HookError):
                log_hook_error(exc, self.rule.name, view.client)
            return CloseReason.PLUGIN_ERROR, str(exc)
        return None

    def transform(self, view: ConnView | None) -> Callable[[str, bytes], bytes] | None:
        """The ``on_data`` chain for the relay, or None: then bytes are only moved."""
        if view is None or not self.plugins.transforms:
            return None
        chain = self.plugins
        return lambda direction, data: chain.data(view, direction, data)

    def faulty(self) -> bool:
        """New connections take a greenlet relay with network faults (SPEC §12): the
        rule has faults now, or is a Toxiproxy proxy (whose toxics may come at any time)."""
        board = self.context.faults
        cached = self._faulty
        if cached is not None and cached[0] is board.changed:
            return cached[1]
        rule = self.rule
        answer = rule.source is RuleSource.TOXIPROXY or bool(board.faults(rule.name, rule.faults))
        # Kept until the board publishes again (it makes a new ``changed`` then):
        # a hub rule asks once per connection.
        self._faulty = (board.changed, answer)
        return answer

    def fault_session(self) -> FaultSession | None:
        """The faults of one new connection (``gportmap.engine.faults``), or None
        when the rule has none now."""
        if not self.faulty():
            return None
        return FaultSession(self.context.faults, self.rule.name, self.rule.faults)

    def open(
        self, client_text: str, view: ConnView | None = None, slot: Slot | None = None, listen: str | None = None
    ) -> Connection:
        """Count and list a connection; ``slot`` (from ``admit_slot``) becomes it.
        Opened in a greenlet, it is the one that greenlet's ``connect_target`` is for.
        ``listen``: the address it came in on (``listen_text``); the rule's by default."""
        conn = self.context.stats.open(
            self.stats, client_text, self.rule.target, view.id if view else None, slot=slot,
            listen=self.rule_listen if listen is None else listen,
        )
        current = getcurrent()
        if current is not get_hub():
            self._opened[current] = conn
        return conn

    def account(
        self,
        client_text: str,
        work: Callable[[Connection], Outcome],
        view: ConnView | None = None,
        slot: Slot | None = None,
        listen: str | None = None,
    ) -> None:
        """Run ``work`` as one admitted connection: counted, and logged when it ends
        (by the hub relay, when ``work`` handed the connection to one). An
        unexpected exception (a bug here or in a plugin package's protocol) ends
        this connection only, as ``internal_error``; it is not passed on to the
        hub, which would log it a second time without the rule or the client."""
        conn = self.open(client_text, view, slot, listen)
        reason, error = CloseReason.INTERNAL_ERROR, None  # whatever escapes below is not a clean close
        try:
            reason, error = work(conn)
        except gevent.GreenletExit:
            reason = CloseReason.STOPPED
            raise
        except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - contained: see the docstring
            reason, error = CloseReason.INTERNAL_ERROR, self.internal_error(exc, client_text)
        finally:
            if reason != CloseReason.DETACHED:
                self.finish(conn, reason, error, view)

    def internal_error(self, exc: BaseException, client_text: str) -> str:
        """Count and log (with its traceback) an unexpected exception in one of this
        rule's connections; the caller ends that connection with ``internal_error``."""
        return report_internal_error(self.stats, client_text, self.rule.target, exc)

    def finish(
        self, conn: Connection, reason: CloseReason | str, error: str | None, view: ConnView | None = None
    ) -> None:
        """Account ``conn``'s end and log it once. ``reason`` is a ``CloseReason``,
        or a plain str from a protocol of a plugin package (recorded as it is)."""
        if view is not None:
            summary = {
                "bytes_received": conn.bytes_received,
                "bytes_sent": conn.bytes_sent,
                "duration": round(conn.duration, 3),
                "reason": reason,
            }
            for failure in self.plugins.close(view, summary):
                log_hook_error(failure, self.rule.name, view.client)
        self.context.stats.close(conn)
        level = ConnectionClosed.level_for(reason)
        if not logger.isEnabledFor(level):
            return  # WARNING and above: build no record at all
        # The fields in ConnectionClosed's order; the log writer makes the record.
        values = (self.rule.name, conn.client, conn.target, conn.bytes_received, conn.bytes_sent,
                  round(conn.duration, 3), reason, error)  # fmt: skip
        emit_fields(logger, level, ConnectionClosed, values)

    def connect_target(
        self, client: socket.socket | None = None, tls: bool = True, conn: Connection | None = None,
        pool: TargetPool | None = None,
    ) -> socket.socket:
        """A connection to a target of the rule's pool, for a greenlet: the connect
        (``gportmap.engine.connector``, in hub callbacks; host names resolved here
        first), then (``proxyProtocol``) the PROXY protocol header of ``client``'s
        addresses, then (``targetTls``, unless ``tls`` is false: the caller runs it
        as a stage) the TLS handshake, each within ``connectTimeout``. The header
        goes first, as HAProxy's send-proxy does, so that the target reads it before
        TLS or a tunnel's upgrade. A step that fails is a failed connect to that
        target (counted against it) and another target is tried, up to
        ``retries``; OSError when none could be readied (counted), ClientGone (not
        counted, no target connection made) if the client reset before its address
        could be read. ``conn`` (default: the one this greenlet opened) holds the
        target until it is closed. ``pool``: a route's (SPEC §13), else the rule's."""
        header, key, conn = self._connect_prelude(client, conn)
        timeout = self.rule.connect_timeout
        raw, connector = await_connect(self.pool_at(pool or self.target_pool, client), key, timeout)
        while True:
            upstream = gevent.socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            sent = header is None
            try:
                upstream.settimeout(timeout)
                set_nodelay(upstream)
                if header is not None:
                    upstream.sendall(header)
                    sent = True
                if self.client_tls is not None and tls:
                    name = self.explicit_server_name or connector.target.spec.host
                    upstream = self.client_tls.wrap_socket(upstream, server_hostname=name)
            except OSError as exc:
                upstream.close()
                raw = retry_connect(connector, exc, target_setup_error(exc, sent))
                continue
            except BaseException:  # killed (a drain cut-off): the target is given back
                upstream.close()
                connector.cancel()
                raise
            break
        self._hold(connector, conn)
        return upstream

    def connect_staged(
        self, client: socket.socket | _socket.socket | None = None, conn: Connection | None = None,
        pool: TargetPool | None = None,
    ) -> tuple[_socket.socket, TlsStage | None]:
        """``connect_target`` for a greenlet that relays on the hub: the connect, the
        PROXY protocol header and the TLS handshake with the target (a ``TlsStage``,
        for ``HubRelay``) all run in hub callbacks while this greenlet waits, and a
        failure of any of them is a failed connect to that target: the next one is
        tried, up to ``retries``. Returns the bare socket and its TLS stage (None
        without ``targetTls``); raises as ``connect_target``."""
        header, key, conn = self._connect_prelude(client, conn)
        timeout = self.rule.connect_timeout
        raw, connector = await_connect(self.pool_at(pool or self.target_pool, client), key, timeout)
        while True:
            stage = None
            try:
                set_nodelay(raw)
                if self.client_tls is not None:
                    stage = TlsStage.client(self.client_tls, self.explicit_server_name or connector.target.spec.host)
                await_target_ready(raw, stage, timeout, header or b"")
            except OSError as exc:  # TargetSetupError, worded
                raw.close()
                raw = retry_connect(connector, exc, exc.strerror or connect_error_text(exc))
                continue
            except BaseException:  # killed (a drain cut-off): the target is given back
                raw.close()
                connector.cancel()
                raise
            break
        self._hold(connector, conn)
        return raw, stage

    def _connect_prelude(
        self, client: socket.socket | _socket.socket | None, conn: Connection | None
    ) -> tuple[bytes | None, str | None, Connection | None]:
        """What a greenlet's connect needs first: the PROXY header (ClientGone when the
        client has left), the client's address for ``balance: source``, and the
        connection that will hold the target."""
        header = None
        proxied = self._proxied.get(getcurrent())
        if self.rule.proxy_protocol is not None and proxied is not None:
            header = proxyproto.header(self.rule.proxy_protocol, proxied.source, proxied.destination)
        elif self.rule.proxy_protocol is not None and client is not None:
            header = _proxy_header(self.rule.proxy_protocol, client)
        if conn is None:
            conn = self._opened.pop(getcurrent(), None)
        key = None
        if proxied is not None and self.rule.balance is Balance.SOURCE:
            key = str(proxied.source[0])
        elif client is not None and self.rule.balance is Balance.SOURCE:
            try:
                key = str(client.getpeername()[0])
            except OSError:
                key = None
        return header, key, conn

    @staticmethod
    def _hold(connector: PoolConnect, conn: Connection | None) -> None:
        """The target is ready: it counts the connection, which holds it until it
        is closed (without one, it is counted and given back at once)."""
        target = connector.established()
        if conn is not None:
            conn.hold(target, target.address)
        else:
            target.release()

    @staticmethod
    def connect_failed(exc: OSError) -> Outcome:
        if isinstance(exc, ClientGone):
            return CloseReason.CLIENT_ERROR, exc.strerror
        return CloseReason.CONNECT_FAILED, connect_error_text(exc)

    def reject(self, client_text: str, reason: RejectReason | str, error: str | None = None) -> None:
        """Count a refused connection; log it at a bounded rate."""
        self.stats.rejected[reason] += 1
        allowed, suppressed = self.context.rejections.allow((self.rule.name, reason))
        if allowed:
            event = ConnectionRejected(
                rule=self.rule.name,
                client=client_text,
                target=self.rule.target,
                reason=reason,
                suppressed=suppressed,
                error=error,
            )
            emit(logger, event)


class Admitted:
    """One connection from its admission to its end on the hub: its place under
    the limits (``slot``), then its open ``Connection``. What a ``HubConnection``
    asks of its owner (``gportmap.engine.pipeline.HubOwner``, whose docstrings
    say what each method is for), answered for this rule's server."""

    __slots__ = ("server", "client_text", "slot", "view", "conn", "proxied", "listen")

    def __init__(
        self,
        server: StreamRuleServer,
        client_text: str,
        slot: Slot,
        view: ConnView | None = None,
        proxied: ProxyHeader | None = None,
    ) -> None:
        self.server = server
        self.client_text = client_text
        self.slot = slot
        self.view = view
        self.conn: Connection | None = None
        #: The PROXY header the connection came with (``acceptProxy``): its
        #: addresses, not the socket's, go into an onward ``proxyProtocol``.
        self.proxied = proxied
        #: The address it came in on, for a rule with several (``listen_text``).
        self.listen: str | None = None

    def opened(self) -> Connection:
        self.conn = self.server.open(self.client_text, self.view, self.slot, self.listen)
        return self.conn

    def release(self) -> None:
        self.slot.release()

    def handshake_failed(self, error: str) -> None:
        self.slot.release()
        self.server.reject(self.client_text, RejectReason.TLS, error)

    def preamble(self, client) -> bytes:
        version = self.server.rule.proxy_protocol
        if version is not None and self.proxied is not None and self.proxied.source is not None:
            return proxyproto.header(version, self.proxied.source, self.proxied.destination)
        return b"" if version is None else _proxy_header(version, client)

    def internal_error(self, exc: BaseException) -> str:
        return self.server.internal_error(exc, self.client_text)


class ClientGone(OSError):
    """The client's connection ended (a reset) before gportmap could read its address."""


def _proxy_header(version: str, client: socket.socket) -> bytes:
    """The PROXY protocol header for ``client``: its address, and the address it
    connected to. Read before the target is connected: a client that has already
    reset has no peer address any more, and its bytes must never reach the target
    under an UNKNOWN/LOCAL header, which tells the target to trust the connection's
    own endpoint, gportmap's address."""
    try:
        source, destination = client.getpeername(), client.getsockname()
    except OSError as exc:
        why = f"the client left before the PROXY protocol header was sent: {exc.strerror}"
        raise ClientGone(exc.errno, why) from exc
    return proxyproto.header(version, source, destination)
