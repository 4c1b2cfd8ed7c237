"""A rule's pool as the connections of one listen port see it (SPEC §9).

A target written ``"port": "C-D"`` is one target of the pool (one health state, one
set of counters, probed on its first port C), but a connection that arrived on
listen port A+i reaches it on port C+i. ``ShiftedPool`` is the pool of a rule for
one offset i: it hands out its targets as ``ShiftedTarget`` views whose addresses
are moved by i; everything else (health, counts, balancing) is the target's own.
Targets with a single port are handed out as they are. No lookup is made here:
the view moves the addresses the target has cached (literals, or a name resolved
by a greenlet), so it may run in hub callbacks like the pool.

A server keeps one ``ShiftedPool`` per offset in use (``Shifts``), built on the first
connection of a listen port: a rule of 10,000 idle ports holds none.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from gportmap.config.model import format_address
from gportmap.engine.resolver import Address


class ShiftedAddresses:
    """``TargetAddresses``' read side (``cached``, ``error``, ``addresses``) moved by
    ``offset`` ports."""

    __slots__ = ("base", "offset")

    def __init__(self, base: Any, offset: int) -> None:
        self.base = base
        self.offset = offset

    def _move(self, addresses: tuple[Address, ...] | None) -> tuple[Address, ...] | None:
        if addresses is None:
            return None
        offset = self.offset
        return tuple((family, (sockaddr[0], sockaddr[1] + offset, *sockaddr[2:])) for family, sockaddr in addresses)

    @property
    def cached(self) -> tuple[Address, ...] | None:
        return self._move(self.base.cached)

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._move(self.base.addresses) or ()

    @property
    def error(self) -> OSError | None:
        return self.base.error

    @property
    def literal(self) -> bool:
        return self.base.literal

    def resolve(self) -> tuple[Address, ...]:
        return self._move(self.base.resolve()) or ()


class ShiftedTarget:
    """A ``TargetState`` of a "C-D" target, as a connection on one listen port sees it:
    its addresses and ``address`` moved by ``offset``; every other attribute and
    method (its health, its counters, ``connected``, ``release``, ...) is the
    target's own. Equal to the target itself, so a retry's ``exclude`` holds."""

    __slots__ = ("state", "offset", "addresses")

    def __init__(self, state: Any, offset: int) -> None:
        self.state = state
        self.offset = offset
        self.addresses = ShiftedAddresses(state.addresses, offset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.state or (isinstance(other, ShiftedTarget) and other.state is self.state)

    def __hash__(self) -> int:
        return hash(self.state)

    @property
    def address(self) -> str:
        """The address this connection reaches: the target's host, its port C+i."""
        return format_address(self.state.spec.host, self.state.spec.port + self.offset)


class ShiftedPool:
    """``pool`` for the connections of one listen port: its "C-D" targets moved by
    ``offset``. Reads every other attribute from ``pool``."""

    __slots__ = ("pool", "offset")

    def __init__(self, pool: Any, offset: int) -> None:
        self.pool = pool
        self.offset = offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def acquire(self, client_key: str | None, exclude: Collection[Any] = ()) -> Any:
        states = [getattr(target, "state", target) for target in exclude]
        target = self.pool.acquire(client_key, states)
        if target is None or target.spec.ports is None or not self.offset:
            return target
        return ShiftedTarget(target, self.offset)


class Shifts:
    """One ``ShiftedPool`` per (pool, offset) in use by a server; the base listen
    port is the rule's first. ``None`` from ``for_port`` means "the pool as it is"."""

    __slots__ = ("first", "active", "_pools")

    def __init__(self, first_port: int, active: bool) -> None:
        self.first = first_port
        #: Some target of the rule has a "C-D" range: without one nothing moves.
        self.active = active
        self._pools: dict[tuple[int, int], ShiftedPool] = {}  # bounded by pools x listen ports

    def pool(self, pool: Any, listen_port: int | None) -> Any:
        """``pool`` as connections on ``listen_port`` see it."""
        if not self.active or listen_port is None or listen_port == self.first:
            return pool
        offset = listen_port - self.first
        key = (id(pool), offset)
        shifted = self._pools.get(key)
        if shifted is None:
            shifted = self._pools[key] = ShiftedPool(pool, offset)
        return shifted


def local_address(sock: Any) -> tuple[str, int] | None:
    """The (host, port) ``sock`` (an accepted connection, bare, gevent's or staged)
    was accepted on. None when it cannot be read (the client reset)."""
    for candidate in (sock, getattr(sock, "sock", None)):
        getsockname = getattr(candidate, "getsockname", None)
        if getsockname is not None:
            try:
                host, port = getsockname()[:2]
                return str(host), int(port)
            except (OSError, ValueError, TypeError):
                return None
    return None


def local_port(sock: Any) -> int | None:
    """The port ``sock`` was accepted on: its listener's port (see ``local_address``)."""
    address = local_address(sock)
    return address[1] if address is not None else None
