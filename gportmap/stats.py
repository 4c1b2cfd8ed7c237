"""Per-rule counters and the table of open connections.

The relay adds to plain integer attributes on the hot path; nothing here formats,
locks or allocates per byte. Readers (logs, the admin endpoint) take snapshots.
Counters are keyed by rule *name* and live in the registry, not in the servers, so
a rule's figures survive when its server is replaced.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

#: Reasons a connection can be refused before it is relayed (SPEC §5).
REJECT_REASONS = ("acl", "limit", "tls", "plugin")
#: Reasons a UDP datagram can be dropped (SPEC §5).
UDP_DROP_REASONS = ("sessions", "acl", "plugin", "error")


class RuleStats:
    """The counters of one rule. Attributes are public and mutated in place."""

    __slots__ = (
        "name",
        "protocol",
        "active",
        "total",
        "rejected",
        "connect_failures",
        "bytes_received",
        "bytes_sent",
        "udp_sessions",
        "udp_packets_received",
        "udp_packets_sent",
        "udp_dropped",
    )

    def __init__(self, name: str, protocol: str) -> None:
        self.name = name
        self.protocol = protocol
        self.active = 0
        self.total = 0
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.connect_failures = 0
        self.bytes_received = 0  # from clients
        self.bytes_sent = 0  # to clients
        self.udp_sessions = 0  # open UDP sessions
        self.udp_packets_received = 0  # datagrams from clients
        self.udp_packets_sent = 0  # datagrams to clients
        self.udp_dropped = dict.fromkeys(UDP_DROP_REASONS, 0)

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "connections": {
                "active": self.active,
                "total": self.total,
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected),
                # a udp rule's connections are its sessions: active == udp.sessions,
                # total counts sessions created
                "counts": "sessions" if self.protocol == "udp" else "connections",
            },
            "upstream_connect_failures": self.connect_failures,
            "bytes": {"received": self.bytes_received, "sent": self.bytes_sent},
            "udp": {
                "sessions": self.udp_sessions,
                "packets_received": self.udp_packets_received,
                "packets_sent": self.udp_packets_sent,
                "dropped": sum(self.udp_dropped.values()),
                "dropped_by_reason": dict(self.udp_dropped),
            }
            if self.protocol == "udp"
            else None,
        }


class Connection:
    """One open connection: what an operator wants to see of it, and when it last moved.

    ``last_active`` is a ``time.monotonic()`` value the relay refreshes per chunk; the
    idle timeout is measured from it across both directions.
    """

    __slots__ = (
        "id",
        "stats",
        "client",
        "target",
        "started",
        "started_mono",
        "last_active",
        "bytes_received",
        "bytes_sent",
    )

    def __init__(self, conn_id: int, stats: RuleStats, client: str, target: str) -> None:
        self.id = conn_id
        self.stats = stats
        self.client = client
        self.target = target
        self.started = time.time()
        self.started_mono = self.last_active = time.monotonic()
        self.bytes_received = 0
        self.bytes_sent = 0

    def add_received(self, n: int) -> None:
        self.bytes_received += n
        self.stats.bytes_received += n

    def add_sent(self, n: int) -> None:
        self.bytes_sent += n
        self.stats.bytes_sent += n

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started_mono


class StatsRegistry:
    """All rules' counters, the process-wide connection limit and open connections.

    The open-connection table is bounded by the connection limits: an entry exists
    only while a connection holds a slot.
    """

    def __init__(self, max_active: int = 10000) -> None:
        self.max_active = max_active
        self.active = 0
        self._rules: dict[str, RuleStats] = {}
        self._open: dict[int, Connection] = {}
        self._ids = itertools.count(1)

    def rule(self, name: str, protocol: str) -> RuleStats:
        """The counters for ``name``, created at 0 the first time it is asked for."""
        stats = self._rules.get(name)
        if stats is None:
            stats = self._rules[name] = RuleStats(name, protocol)
        stats.protocol = protocol
        return stats

    def rules(self) -> list[RuleStats]:
        return list(self._rules.values())

    def full(self, stats: RuleStats, rule_limit: int) -> bool:
        """True when one more connection would exceed the rule's or the process's limit."""
        return stats.active >= rule_limit or self.active >= self.max_active

    def next_id(self) -> int:
        """A connection id, taken before the connection is admitted (plugins see it)."""
        return next(self._ids)

    def open(self, stats: RuleStats, client: str, target: str, conn_id: int | None = None) -> Connection:
        conn = Connection(conn_id if conn_id is not None else next(self._ids), stats, client, target)
        self._open[conn.id] = conn
        stats.active += 1
        stats.total += 1
        self.active += 1
        return conn

    def close(self, conn: Connection) -> None:
        if self._open.pop(conn.id, None) is not None:
            conn.stats.active -= 1
            self.active -= 1

    def connections(self) -> list[Connection]:
        return list(self._open.values())
