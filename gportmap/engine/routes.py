"""One port for many services (``routes``, SPEC §13): wait for a client's first
bytes, pick the route they match (``gportmap.engine.sniff``), connect to that
route's targets.

The bytes are peeked (``recv(MSG_PEEK)``), never taken off the socket: they stay
in the kernel's receive buffer, so the relay later forwards them first and exactly,
like any other bytes (splice included), and nothing has to be copied or replayed.
To wait for *more* bytes than the ones already peeked without spinning on a
readable socket, the sniffer raises the socket's ``SO_RCVLOWAT`` to one byte more
than it has seen (Linux wakes a reader only once that many bytes are queued, or
at the end of stream), and sets it back to 1 when it has decided.

``Sniffer`` runs in hub callbacks, one read watcher and one timer per connection,
no greenlet (as ``gportmap.engine.pipeline`` runs the TLS handshakes): on the hub
path ``RoutedConnection`` then hands the connection to a ``HubConnection`` bound
to the chosen route; a greenlet (plugins, names to resolve) waits for the same
callbacks through ``await_route``.

Each route is a pool of its own (``RoutePool``): the rule's ``TargetPool`` holds
every route's targets (so the health prober, ``/stats`` and reloads see them as
they see any pool's), and a route's pool balances over its own ones only. A
target belongs to one route (the config checks say so), so its health and
counters are that route's.
"""

from __future__ import annotations

import _socket
import dataclasses
import socket
from collections.abc import Callable
from dataclasses import dataclass

from gevent.event import AsyncResult

from gportmap.config.model import Rule, RuleRoute
from gportmap.engine.net import DeadlineRead
from gportmap.engine.pipeline import HubConnection, HubOwner, Route
from gportmap.engine.pool import TargetPool, make_balancer
from gportmap.engine.sniff import SNIFF_CAP, Verdict, decide
from gportmap.reasons import CloseReason


class RoutePool(TargetPool):
    """A route's targets: the states of the rule's pool that belong to it (their
    health and counters), balanced by the rule's ``balance`` among themselves."""

    def __init__(self, parent: TargetPool, route: RuleRoute) -> None:  # noqa: D107 - no super(): shares states
        self.rule = parent.rule
        self.stats = parent.stats
        keys = {target.key for target in route.targets}
        self.targets = tuple(state for state in parent.targets if state.key in keys)
        self.balancer = make_balancer(parent.rule.balance, self.targets)
        self.route = route


@dataclass(frozen=True)
class RouteTable:
    """A rule's routes as its server uses them, fixed for the server's life."""

    routes: tuple[RuleRoute, ...]
    sniff_timeout: float
    #: By route name: its pool, and how a hub connection reaches it.
    pools: dict[str, RoutePool]
    hub_routes: dict[str, Route]

    @classmethod
    def build(cls, rule: Rule, pool: TargetPool, hub_route: Route | None = None) -> RouteTable:
        pools = {route.name: RoutePool(pool, route) for route in rule.routes}
        hub_routes = {}
        if hub_route is not None:
            hub_routes = {name: dataclasses.replace(hub_route, pool=route_pool) for name, route_pool in pools.items()}
        return cls(rule.routes, rule.sniff_timeout, pools, hub_routes)


class Sniffer(DeadlineRead):
    """Peeks at one client's first bytes in hub callbacks until ``decide`` names
    a route, or none is left, or ``timeout`` passes (then what has come is all
    there is; nothing at all: the ``ssh`` route, else the default). Calls
    ``on_decided(route)`` (None: no route) or ``on_failed(error)`` (the socket
    failed) exactly once unless cancelled; a bug goes to ``on_crash``."""

    __slots__ = ("sock", "routes", "timeout", "on_decided", "on_failed", "on_crash", "reader", "timer", "lowat")

    #: The most bytes peeked at before deciding (``gportmap.engine.sniff.SNIFF_CAP``).
    cap = SNIFF_CAP

    def __init__(
        self,
        sock: _socket.socket,
        routes: tuple[RuleRoute, ...],
        timeout: float,
        on_decided: Callable[[RuleRoute | None], None],
        on_failed: Callable[[OSError], None],
        on_crash: Callable[[Exception], None],
    ) -> None:
        self.sock = sock
        self.routes = routes
        self.timeout = timeout
        self.on_decided = on_decided
        self.on_failed = on_failed
        self.on_crash = on_crash
        self.reader = self.timer = None
        self.lowat = 1

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            try:
                step()
            except OSError as exc:
                self.cancel()
                self.on_failed(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (hubrelay's docstring)
            self.cancel()
            self.on_crash(exc)

    def _peek(self) -> bytes | None:
        try:
            return self.sock.recv(self.cap, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def _on_readable(self) -> None:
        self._guarded(self._look)

    def _look(self) -> None:
        data = self._peek()
        if data is None:
            return  # woken for nothing: wait on
        # fewer than the watermark asked for: woken by the end of stream
        final = len(data) < self.lowat or len(data) >= self.cap
        verdict = decide(self.routes, data, final)
        if verdict is Verdict.MORE:
            self.lowat = len(data) + 1  # wake again only once more has come
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.lowat)
            return
        self._decided(verdict)

    def _on_timeout(self) -> None:
        self._guarded(self._time_out)

    def _time_out(self) -> None:
        data = self._peek() or b""
        self._decided(decide(self.routes, data, True, silent=True))

    def _decided(self, verdict: RuleRoute | Verdict) -> None:
        self.cancel()
        if self.lowat != 1:
            self.lowat = 1
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self.on_decided(verdict if isinstance(verdict, RuleRoute) else None)


class RoutedConnection:
    """A hub connection that sniffs first: the ``Sniffer``, then a
    ``HubConnection`` on the chosen route's ``Route`` (which takes over
    ``on_done``). No route: ``on_no_route()`` (the server counts the refusal),
    then the end. Tracked by its server like a ``HubConnection``: ``start``,
    ``abort``, ``on_done``. An upgrade in place carries it once routed (its
    ``inner`` connection's relay, ``gportmap.runtime.carry.carried_relay``);
    while it sniffs it has taken nothing off its socket but holds no connection
    yet, and it finishes in the drainer."""

    __slots__ = ("client", "table", "owner", "on_no_route", "sniffer", "inner", "on_done", "finished")

    def __init__(self, client: _socket.socket, table: RouteTable, owner: HubOwner,
                 on_no_route: Callable[[], None]) -> None:
        self.client = client
        self.table = table
        self.owner = owner
        self.on_no_route = on_no_route
        self.sniffer: Sniffer | None = None
        self.inner: HubConnection | None = None
        self.on_done: Callable[[str, str | None], None] | None = None
        self.finished = False

    def start(self) -> None:
        self.sniffer = Sniffer(self.client, self.table.routes, self.table.sniff_timeout, self._routed,
                               self._failed, self.crash)
        self.sniffer.start()

    def abort(self, reason: str, error: str | None = None) -> None:
        if self.inner is not None:
            self.inner.abort(reason, error)
        else:
            self._end(reason, error)

    def crash(self, exc: Exception) -> None:
        self.abort(CloseReason.INTERNAL_ERROR, self.owner.internal_error(exc))

    def _routed(self, route: RuleRoute | None) -> None:
        self.sniffer = None
        if route is None:
            self.on_no_route()
            self._end(CloseReason.CLOSED, None)
            return
        inner = self.inner = HubConnection(self.client, self.table.hub_routes[route.name], self.owner)
        inner.on_done = self.on_done
        inner.start()

    def _failed(self, error: OSError) -> None:
        self.sniffer = None
        self._end(CloseReason.CLIENT_ERROR, error.strerror or str(error))

    def _end(self, reason: str, error: str | None) -> None:
        if self.finished or self.inner is not None:
            return
        self.finished = True
        sniffer, self.sniffer = self.sniffer, None
        if sniffer is not None:
            sniffer.cancel()
        self.client.close()
        self.on_done(reason, error)


def await_route(sock: _socket.socket, table: RouteTable) -> RuleRoute | None:
    """``Sniffer`` for a greenlet: the route of ``sock``'s client (None: none),
    decided in hub callbacks while the greenlet waits; raises OSError if the
    client's socket failed."""
    result = AsyncResult()
    sniffer = Sniffer(sock, table.routes, table.sniff_timeout, result.set, result.set_exception,
                      result.set_exception)
    sniffer.start()
    try:
        return result.get()
    finally:
        sniffer.cancel()  # killed while waiting (a drain cut-off): no watcher left behind


def describe_routes(rule: Rule, targets: list[dict]) -> list[dict]:
    """``/stats``' ``routes`` of a rule (SPEC §13): each route's match, its
    targets' names, and its connections summed over them (``targets``: the rule's
    ``/stats`` target entries, each with its ``route``)."""
    routes = []
    for route in rule.routes:
        mine = [entry for entry in targets if entry.get("route") == route.name]
        match = {"sni": list(route.match.sni), "alpn": list(route.match.alpn),
                 "http_host": list(route.match.host),
                 "protocol": route.match.protocol.value if route.match.protocol else None}
        routes.append({
            "name": route.name,
            "default": route.default,
            "match": {key: value for key, value in match.items() if value},
            "targets": [entry["name"] for entry in mine],
            "active": sum(entry.get("active", 0) for entry in mine),
            "total": sum(entry.get("total", 0) for entry in mine),
        })
    return routes
