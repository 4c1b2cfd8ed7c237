"""``perClient`` (SPEC §13): limits per client address, so that one client cannot
take a rule's whole ``maxConnections`` or its accept rate.

A client is its IP address (not its port), after ``acceptProxy``: behind a
trusted proxy, the address the PROXY header carries. Per client a table entry
holds its live connections and a token bucket of new connections (tcp and
websocket rules) or datagrams (udp rules) per second.

The table is bounded, and every operation is O(1):

- entries of clients with live connections are *pinned*: they are never
  evicted, because forgetting one would forget its count and let that client
  past ``maxConnections``. Their number is bounded anyway: each holds at least
  one of the rule's ``maxConnections`` places;
- the other entries (clients with no live connection, remembered only for
  their token bucket) are an LRU of at most ``ClientTable.max_idle`` entries:
  past it the least recently seen is forgotten. A forgotten client starts again
  with a full bucket, which is what a client seen that long ago would nearly
  have anyway; a flood of new addresses (100,000 spoofed UDP sources) costs a
  bounded table and evicts only idle entries.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from gportmap.config.model import PerClient
from gportmap.security import client_key


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one rule allows each client; None: no such limit."""

    max_connections: int | None = None
    #: New connections (udp: datagrams) per second, refilled continuously ...
    rate: float | None = None
    #: ... into a bucket of this many: the most accepted at once after a pause.
    burst: int = 1


class _Entry:
    __slots__ = ("live", "tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.live = 0
        self.tokens = tokens
        self.stamp = stamp


class Lease:
    """One live connection's place in its client's entry; ``release`` gives it
    back (once: later calls do nothing, so it is safe in every end path)."""

    __slots__ = ("table", "key", "held")

    def __init__(self, table: ClientTable, key: object) -> None:
        self.table = table
        self.key = key
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.table._release(self.key)


class ClientTable:
    """The per-client entries of one rule server (see the module docstring)."""

    __slots__ = ("limits", "idle", "live", "clock", "evicted")

    #: Entries kept for clients with no live connection (only their token bucket):
    #: an LRU of this many, about 250 bytes each (4 MiB at the bound). Entries of
    #: clients with live connections are kept besides, never evicted (bounded by
    #: maxConnections).
    max_idle = 16384

    def __init__(self, limits: ClientLimits, clock=time.monotonic) -> None:
        self.limits = limits
        self.idle: OrderedDict[object, _Entry] = OrderedDict()
        self.live: dict[object, _Entry] = {}
        self.clock = clock
        #: Idle entries forgotten to keep the bound (for /stats and tests).
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.idle) + len(self.live)

    @staticmethod
    def key(address: object) -> object:
        """The client of a socket address: its IP as (version, integer), or the text
        when it is not an IP (a UNIX socket path)."""
        return client_key(address) or str(address)

    def admit(self, address: object, now: float | None = None) -> Lease | str | None:
        """A new connection from ``address``: a Lease when admitted, else the reason
        (text for the ``client_limit`` record). Takes a token and a live place."""
        limits = self.limits
        key = self.key(address)
        entry = self._entry(key, self.clock() if now is None else now)
        if limits.max_connections is not None and entry.live >= limits.max_connections:
            return f"the client has {entry.live} connections (perClient.maxConnections)"
        if limits.rate is not None and not self._take(entry):
            return f"the client opens more than {limits.rate:g} connections a second (perClient.connectionRate)"
        if entry.live == 0:
            self.idle.pop(key, None)
            self.live[key] = entry
        entry.live += 1
        return Lease(self, key)

    def carried(self, address: object) -> Lease:
        """A connection carried over by an upgrade in place: its live place again,
        without a token and never refused (it was admitted before the upgrade; a
        client with more carried connections than its burst must not be refused for
        a moment after it)."""
        key = self.key(address)
        entry = self._entry(key, self.clock())
        if entry.live == 0:
            self.idle.pop(key, None)
            self.live[key] = entry
        entry.live += 1
        return Lease(self, key)

    def allows(self, address: object, now: float) -> bool:
        """A datagram from ``address`` (udp ``perClient.packetRate``): a token, or False."""
        return self._take(self._entry(self.key(address), now))

    def _entry(self, key: object, now: float) -> _Entry:
        entry = self.live.get(key)
        if entry is None:
            entry = self.idle.get(key)
            if entry is None:
                entry = _Entry(float(self.limits.burst), now)
                self.idle[key] = entry
                if len(self.idle) > self.max_idle:
                    self.idle.popitem(last=False)
                    self.evicted += 1
            else:
                self.idle.move_to_end(key)
        rate = self.limits.rate
        if rate is not None and now > entry.stamp:
            entry.tokens = min(float(self.limits.burst), entry.tokens + (now - entry.stamp) * rate)
        entry.stamp = max(entry.stamp, now)
        return entry

    @staticmethod
    def _take(entry: _Entry) -> bool:
        if entry.tokens >= 1.0:
            entry.tokens -= 1.0
            return True
        return False

    def _release(self, key: object) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry.live -= 1
        if entry.live <= 0:
            del self.live[key]
            self.idle[key] = entry  # the most recently seen idle entry
            if len(self.idle) > self.max_idle:
                self.idle.popitem(last=False)
                self.evicted += 1


def limits_for(per_client: PerClient | None, udp: bool) -> ClientLimits | None:
    """The ``ClientLimits`` of a rule's ``perClient`` (a ``config.model.PerClient``,
    or None): tcp and websocket rules count connections, udp rules datagrams. None
    when nothing is limited. ``burst`` defaults to the rate rounded up (at least 1):
    one second's worth at once."""
    if per_client is None:
        return None
    rate = per_client.packet_rate if udp else per_client.connection_rate
    most = None if udp else per_client.max_connections
    if rate is None and most is None:
        return None
    burst = per_client.burst if per_client.burst is not None else max(1, math.ceil(rate or 1))
    return ClientLimits(max_connections=most, rate=rate, burst=burst)
