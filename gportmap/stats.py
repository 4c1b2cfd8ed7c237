"""Per-rule counters and the table of open connections.

The relay adds to plain integer attributes on the hot path; nothing here formats,
locks or allocates per byte. Readers (logs, the admin endpoint) take snapshots.
Counters are keyed by rule *name* and live in the registry, not in the servers, so
a rule's figures survive when its server is replaced.
"""

from __future__ import annotations

import itertools
import os
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from gportmap.hubwork import in_slices
from gportmap.log import RateLimiter
from gportmap.reasons import CloseReason, DropReason, RejectReason

#: Reasons a connection can be refused before it is relayed (SPEC §5), in the order
#: /stats and the metrics list them: ``gportmap.reasons.RejectReason``. The counter
#: tables are keyed by these plain strings (a member looks its key up as itself).
REJECT_REASONS = tuple(str(reason) for reason in RejectReason)
#: Reasons a UDP datagram can be dropped (SPEC §5): ``DropReason``. ``kernel`` is
#: read from the sockets when the figures are read (``refresh_kernel_drops``).
UDP_DROP_REASONS = tuple(str(reason) for reason in DropReason)
#: Connection ends that are gportmap's fault, counted per rule (``gportmap.failures``):
#: ``internal_error`` is an unexpected exception in a connection's (or a UDP
#: session's) code, which closed that connection only.
ERROR_REASONS = (str(CloseReason.INTERNAL_ERROR),)


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
        "errors",
        "handshaking",
        "peak",
        "kernel",
        "pool",
        "remote_targets",
        "failure_log",
    )
    #: What ``counters()`` reports: every figure (not the name, nor the sockets behind
    #: ``kernel``; the pool's figures go as ``targets``; nor the failure log's limiter).
    FIGURES = __slots__[2:-4]
    #: Per-target figures that are running totals (summed over processes, kept
    #: from workers that are gone); ``active`` is a level, ``state`` a word.
    TARGET_TOTALS = ("total", "connect_failures")

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
        self.errors = dict.fromkeys(ERROR_REASONS, 0)  # connections ended by gportmap's fault
        self.handshaking = 0  # admitted, holding a Slot, not yet open (TLS handshake, WebSocket upgrade)
        #: The most connections (udp: sessions) open at once since the rule's first
        #: start; with workers, the master shows the sum of the live workers' peaks.
        self.peak = 0
        self.kernel: KernelDrops | None = None  # udp: where udp_dropped["kernel"] comes from
        #: The rule's targets (``gportmap.engine.pool.TargetPool``), kept here with the
        #: counters so that they outlive the rule's servers; None until a server made it.
        self.pool: TargetFigures | None = None
        #: Target figures added from other processes (a master's sums), by name.
        self.remote_targets: dict[str, dict[str, Any]] | None = None
        #: How many ``internal_error`` records (with their tracebacks) this rule
        #: writes, per exception type (``gportmap.failures``): a bug hit by every
        #: datagram must not write a traceback per datagram from the hub. Here, not
        #: module-global, so that every registry (a test's, a worker's) has its own.
        self.failure_log = RateLimiter(burst=5, interval=10.0)

    #: The attributes that are levels, not running totals: a worker that is gone
    #: takes its levels along, while its totals stay in the sums (``add``).
    GAUGES = ("active", "udp_sessions", "handshaking", "peak")

    def counters(self) -> dict[str, Any]:
        """Every figure as plain data: what a worker process reports to its master."""
        self.refresh_kernel_drops()
        figures = {
            name: dict(value) if isinstance(value, dict) else value
            for name in self.FIGURES
            for value in (getattr(self, name),)
        }
        figures["targets"] = self.targets()
        return figures

    def targets(self) -> list[dict[str, Any]]:
        """The rule's targets as ``/stats`` shows them (SPEC §8): this process's
        pool, or the sums of the processes that reported them (``add``)."""
        if self.pool is not None:
            return self.pool.describe()
        if not self.remote_targets:
            return []
        return [entry for entry in self.remote_targets.values() if entry.get("state") is not None]

    def _add_targets(self, entries: list[dict[str, Any]], gauges: bool) -> None:
        """Sum another process's targets in: totals always; the level (``active``)
        and the state (up while any process has it up) only from a live one."""
        if self.remote_targets is None:
            self.remote_targets = {}
        for entry in entries:
            name = entry.get("name")
            mine = self.remote_targets.get(name)
            if mine is None:
                mine = self.remote_targets[name] = {
                    **entry, "active": 0, "state": None, "bytes": {"received": 0, "sent": 0},
                    **dict.fromkeys(self.TARGET_TOTALS, 0),
                }
            for key in self.TARGET_TOTALS:
                mine[key] += entry.get(key, 0)
            for key in ("received", "sent"):
                mine["bytes"][key] += entry.get("bytes", {}).get(key, 0)
            if gauges:
                mine["active"] += entry.get("active", 0)
                if mine["state"] != "up":
                    mine["state"] = entry.get("state")
                if entry.get("last_check") and (mine.get("last_check") or "") < entry["last_check"]:
                    mine["last_check"], mine["last_error"] = entry["last_check"], entry.get("last_error")

    def add(self, counters: dict[str, Any], gauges: bool = True) -> None:
        """Add figures from ``counters()`` of another process (the master's sums)."""
        if counters.get("targets"):
            self._add_targets(counters["targets"], gauges)
        for name in self.FIGURES:
            if name not in counters or (not gauges and name in self.GAUGES):
                continue
            value = counters[name]
            if isinstance(value, dict):
                mine = getattr(self, name)
                for key, count in value.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(self, name, getattr(self, name) + value)

    def refresh_kernel_drops(self) -> None:
        """Bring ``udp_dropped["kernel"]`` up to date from the live sockets of this
        rule (see ``KernelDrops``); called by every reader of the figures. A rule
        with no live socket here (a master's sums, a stopped rule) keeps its value."""
        kernel = self.kernel
        if kernel is not None:
            value = kernel.total()
            if value > self.udp_dropped[DropReason.KERNEL]:  # monotonic, whatever a socket reports
                self.udp_dropped[DropReason.KERNEL] = value

    def snapshot(self) -> dict[str, Any]:
        if self.protocol == "udp":
            self.refresh_kernel_drops()
        return {
            "name": self.name,
            "protocol": self.protocol,
            "connections": {
                "active": self.active,
                # admitted, holding a place under maxConnections, still in their handshake
                "handshaking": self.handshaking,
                "peak": self.peak,
                "total": self.total,
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected),
                # connections (udp: sessions) ended by an unexpected exception: a bug
                "errors": sum(self.errors.values()),
                "errors_by_reason": dict(self.errors),
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
            if self.protocol == "udp" or self.udp_packets_received or self.udp_packets_sent  # or a UDP tunnel's exit
            else None,
            "targets": self.targets(),
        }

    def frozen(self) -> RuleStats:
        """A copy of the figures as they are now, for a reader in another thread (the
        admin endpoint renders ``/metrics`` off the hub): every slot copied, its own
        dicts, the targets as a fixed list of copies, no sockets behind it. Costs
        some microseconds; taken on the hub, rule by rule."""
        self.refresh_kernel_drops()
        copy = RuleStats.__new__(RuleStats)
        for name in RuleStats.__slots__:
            value = getattr(self, name)
            setattr(copy, name, dict(value) if isinstance(value, dict) else value)
        targets = [{**entry, "bytes": dict(entry.get("bytes", {}))} for entry in self.targets()]
        copy.kernel = None
        copy.remote_targets = None
        copy.pool = FixedTargets(targets)
        return copy


class FixedTargets:
    """A rule's targets as they were when its figures were frozen (``RuleStats.frozen``)."""

    __slots__ = ("entries",)

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries

    @property
    def up(self) -> bool:
        return any(entry.get("state") == "up" for entry in self.entries)

    def describe(self) -> list[dict[str, Any]]:
        return self.entries


class TargetFigures(Protocol):
    """What the counters need of a rule's pool of targets (``gportmap.engine.pool``)."""

    @property
    def up(self) -> bool:
        """Some target is up."""

    def describe(self) -> list[dict[str, Any]]:
        """One entry per target (SPEC §8, ``/stats``' ``targets``)."""


class Upstream(Protocol):
    """The target a connection holds (``gportmap.engine.pool.TargetState``)."""

    def release(self, conn: Connection) -> None:
        """The connection ended: the target's active count is given back."""


class KernelDrops:
    """The kernel's drop counts of one rule's UDP sockets, kept monotonic while the
    sockets come and go.

    The kernel counts drops per socket, and a rule's sockets (its listener, a
    socket per session) close all the time, taking their counts along. A server
    registers a *source* (a callable returning the drops of its live sockets since
    it took them); before a socket closes, the server moves its count into its own
    total of closed sockets, and when the server ends, ``retire`` folds its last
    figure in here. The sum is only computed when someone reads the figures.
    """

    __slots__ = ("folded", "sources")

    def __init__(self) -> None:
        self.folded = 0
        self.sources: list[Callable[[], int]] = []

    def total(self) -> int:
        return self.folded + sum(source() for source in self.sources)


def watch_kernel_drops(stats: RuleStats, source: Callable[[], int]) -> None:
    """Count ``source()`` (a server's kernel drops, non-decreasing) in ``stats``."""
    if stats.kernel is None:
        stats.kernel = KernelDrops()
    stats.kernel.sources.append(source)


def retire_kernel_drops(stats: RuleStats, source: Callable[[], int]) -> None:
    """Fold the last value of ``source`` in for good: its server has closed its sockets."""
    kernel = stats.kernel
    if kernel is None or source not in kernel.sources:
        return
    kernel.sources.remove(source)
    kernel.folded += source()
    stats.refresh_kernel_drops()


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
        "upstream",
        "lease",
        "listen",
    )

    def __init__(self, conn_id: int, stats: RuleStats, client: str, target: str, listen: str = "") -> None:
        self.id = conn_id
        self.stats = stats
        self.client = client
        self.target = target
        #: The address it came in on (SPEC §9: a rule may listen on many).
        self.listen = listen
        self.started = time.time()
        self.started_mono = self.last_active = time.monotonic()
        self.bytes_received = 0
        self.bytes_sent = 0
        #: The target of the pool it holds once connected (its ``target`` then names
        #: that one); given back when the connection is closed.
        self.upstream: Upstream | None = None
        #: Its place in its client's ``perClient`` entry (``engine.clientlimit.Lease``),
        #: given back when it is closed; None without ``perClient``.
        self.lease: Releasable | None = None

    def hold(self, upstream: Upstream, address: str) -> None:
        """The connection reached ``upstream`` (at ``address``) and holds it until it
        is closed; a target it held before (an earlier hold) is given back."""
        if self.upstream is not None:
            self.upstream.release(self)
        self.upstream = upstream
        self.target = address

    def add_received(self, n: int) -> None:
        self.bytes_received += n
        self.stats.bytes_received += n

    def add_sent(self, n: int) -> None:
        self.bytes_sent += n
        self.stats.bytes_sent += n

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started_mono


class Releasable(Protocol):
    """A place taken at admission and given back once (``engine.clientlimit.Lease``)."""

    def release(self) -> None: ...


class Slot:
    """A connection's place under its rule's and the process's ``maxConnections``,
    taken at admission, before any handshake.

    A limit checked at admission but counted only once a handshake (TLS, a WebSocket
    upgrade) is done lets any number of clients be mid-handshake at once, and more
    than the limit through when they finish together. A slot is counted from the
    moment it is taken (``RuleStats.handshaking``): ``StatsRegistry.open`` turns it
    into the open connection, ``release`` gives it back when the handshake fails.
    Each is done once; later calls do nothing, so a ``finally: slot.release()``
    is always safe.
    """

    __slots__ = ("_registry", "stats", "held", "lease")

    def __init__(self, registry: StatsRegistry, stats: RuleStats) -> None:
        self._registry = registry
        self.stats = stats
        self.held = True  # counted in handshaking: neither opened nor released yet
        #: The client's ``perClient`` place taken with it: given back with the slot,
        #: or handed to the connection the slot becomes (``StatsRegistry.open``).
        self.lease: Releasable | None = None

    def release(self) -> None:
        """Give the place back (the handshake failed, the client left, a refusal)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()
        if self.held:
            self.held = False
            self.stats.handshaking -= 1
            self._registry.handshaking -= 1


class StatsRegistry:
    """All rules' counters, the process-wide connection limit and open connections.

    The open-connection table is bounded by the connection limits: an entry exists
    only while a connection holds a slot.
    """

    def __init__(self, max_active: int = 10000, workers: int = 1, index: int = 0) -> None:
        """``workers``/``index``: this process is worker ``index`` of ``workers``
        sharing the ports. It admits its share of every limit, and numbers its
        connections index+1, index+1+workers, ... so that ids stay unique across the
        workers without any coordination."""
        self.max_active = max_active
        #: Connections this process's open-file limit leaves room for (``fd_capacity``).
        self.fd_cap: int | None = None
        self.active = 0
        self.handshaking = 0  # Slots held by connections not yet open, all rules together
        self.workers = workers
        self._rules: dict[str, RuleStats] = {}
        self._open: dict[int, Connection] = {}
        self._ids = itertools.count(index + 1, workers)
        #: What an upgrade in place carried for a rule's next server, by rule name
        #: (``carry_over``, ``take_carried``).
        self._carried: dict[str, Callable[[Any], None]] = {}

    def carry_over(self, rule: str, adopt: Callable[[Any], None]) -> None:
        """An upgrade in place carried state of ``rule`` that its server must take
        before it serves (UDP sessions: before its listener is read, or a client's
        next datagram would open a second session): ``adopt(server)``, once."""
        self._carried[rule] = adopt

    def take_carried(self, rule: str) -> Callable[[Any], None] | None:
        """What an upgrade in place left for ``rule``'s server (None: nothing); given once."""
        return self._carried.pop(rule, None)

    def continue_ids(self, after: int) -> None:
        """Number new connections from ``after`` on (this process's share of them):
        an upgrade in place goes on past the old program's ids."""
        self._ids = itertools.count(max(after, 1), self.workers)

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
        """True when one more connection would exceed the rule's or the process's
        limit; connections still in their handshake (holding a Slot) count."""
        return (
            stats.active + stats.handshaking >= self.share(rule_limit)
            or self.active + self.handshaking >= self.process_limit
        )

    def reserve(self, stats: RuleStats, rule_limit: int) -> Slot | None:
        """A Slot under the limits for a connection being admitted, or None when the
        rule or the process is full (the caller rejects it as ``limit``)."""
        if self.full(stats, rule_limit):
            return None
        stats.handshaking += 1
        self.handshaking += 1
        return Slot(self, stats)

    @property
    def process_limit(self) -> int:
        """All rules together in this process: its share of maxConnections, and no
        more than its descriptors allow."""
        limit = self.share(self.max_active)
        return limit if self.fd_cap is None else min(limit, self.fd_cap)

    def share(self, limit: int) -> int:
        """This process's part of a limit: all of it, or a worker's share."""
        return worker_share(limit, self.workers) if self.workers > 1 else limit

    def next_id(self) -> int:
        """A connection id, taken before the connection is admitted (plugins see it)."""
        return next(self._ids)

    def open(
        self,
        stats: RuleStats,
        client: str,
        target: str,
        conn_id: int | None = None,
        slot: Slot | None = None,
        listen: str = "",
    ) -> Connection:
        """Count and list a connection; ``slot`` (taken at admission) becomes it."""
        lease = None
        if slot is not None:
            lease, slot.lease = slot.lease, None  # the client's perClient place goes with it
            slot.release()  # the place it held is now the open connection's
        conn = Connection(conn_id if conn_id is not None else next(self._ids), stats, client, target, listen)
        conn.lease = lease
        self._open[conn.id] = conn
        stats.active += 1
        stats.total += 1
        if stats.active > stats.peak:
            stats.peak = stats.active
        self.active += 1
        return conn

    def close(self, conn: Connection) -> None:
        """The connection ended, whatever way: uncounted, and the target it held
        given back (every end path passes here, once)."""
        if self._open.pop(conn.id, None) is not None:
            conn.stats.active -= 1
            self.active -= 1
            upstream, conn.upstream = conn.upstream, None
            if upstream is not None:
                upstream.release(conn)
            lease, conn.lease = conn.lease, None
            if lease is not None:
                lease.release()

    def connections(self) -> list[Connection]:
        return list(self._open.values())

    #: Open connections ``open_tables`` copies on the hub between two yields (a copy
    #: is a tuple of nine plain values, about a microsecond).
    copy_slice = 500

    def open_tables(self) -> list[OpenTable]:
        """This process's open connections for ``/connections``, each copied at one
        moment (``open_row``), in slices of ``copy_slice`` with a yield to the hub
        between two: 10,000 copied in one go would hold every connection's
        forwarding for milliseconds. The list of connections is taken once, at the
        start, so each is listed once; one that closes meanwhile is listed with its
        last figures, one that opens meanwhile waits for the next listing."""
        return [OpenTable(None, [open_row(conn) for conn in in_slices(list(self._open.values()), self.copy_slice)])]


#: One open connection's figures copied at one moment (``open_row``): id, rule,
#: client, listen, target, started (epoch seconds), duration (seconds), bytes
#: received, bytes sent. Plain values: a thread formats them, and a worker sends
#: them to its master as a JSON array (a third of the bytes of the entry).
OpenRow = tuple[int, str, str, str, str, float, float, int, int]


def open_row(conn: Connection) -> OpenRow:
    return (
        conn.id,
        conn.stats.name,
        conn.client,
        conn.listen,
        conn.target,
        conn.started,
        conn.duration,
        conn.bytes_received,
        conn.bytes_sent,
    )


@dataclass(frozen=True)
class OpenTable:
    """One process's open connections: ``worker`` is its index with ``--workers``,
    ``None`` for a process serving alone. ``rows`` are ``OpenRow``s (lists, once
    through a worker's channel), or entries already made (a dict each) by a worker
    of an earlier version answering during an upgrade."""

    worker: int | None
    #: A list, as ``Channel.send`` needs it to encode a long one in slices.
    rows: list[Sequence[Any] | dict[str, Any]]


def connections_document(tables: Iterable[OpenTable]) -> list[dict[str, Any]]:
    """The ``/connections`` document (SPEC §5): one entry per open connection, with
    ``worker`` where there are workers. Formatting 10,000 entries takes tens of
    milliseconds: the admin endpoint calls this in the hub's thread pool."""
    entries = []
    for table in tables:
        for row in table.rows:
            entry = dict(row) if isinstance(row, dict) else open_entry(row)
            if table.worker is not None:
                entry["worker"] = table.worker
            entries.append(entry)
    return entries


def open_entry(row: Sequence[Any]) -> dict[str, Any]:
    """One ``OpenRow`` as its ``/connections`` entry."""
    conn_id, rule, client, listen, target, started, duration, received, sent = row
    return {
        "id": conn_id,
        "rule": rule,
        "client": client,
        "listen": listen,
        "target": target,
        "started": iso_time(started),
        "duration": round(duration, 3),
        "bytes": {"received": received, "sent": sent},
    }


def process_figures() -> dict[str, int | None]:
    """This process's descriptors and memory, for ``/stats``' ``process`` and the
    dashboard: what an operator checks before "too many open files". Reads /proc
    (Linux; a kernel answer, never disk I/O); ``None`` where the platform has none."""
    try:
        open_files: int | None = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError:
        open_files = None
    try:
        with open("/proc/self/statm", "rb") as statm:
            rss: int | None = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "open_files": open_files,
        "open_files_limit": None if soft == resource.RLIM_INFINITY else soft,
        "rss_bytes": rss,
    }


#: Descriptors kept out of the connection budget: listeners, the admin endpoint, the
#: log, the watcher, gevent's own, a target being connected while a client is refused.
#: The admin endpoint's connections are within it: it holds at most
#: ``gportmap.admin.http.AdminServer.max_connections`` (32) and closes any more at once.
FD_RESERVE = 64


def fd_capacity(open_files: int, listeners: int) -> int:
    """Connections an open-file limit can carry: two descriptors each (client and
    target) after a reserve, as HAProxy derives maxconn from ``ulimit -n``. Past it a
    connection is refused at once, counted as ``limit``, instead of every accept()
    failing with EMFILE and queued clients waiting. (Splice pipes are extra; when
    none are left a connection copies instead.)"""
    return max(1, (open_files - FD_RESERVE - listeners) // 2)


def worker_share(limit: int, workers: int) -> int:
    """What one of ``workers`` processes admits of a connection limit: the kernel
    spreads connections unevenly, so the total can exceed ``limit`` by at most
    workers - 1, and a worker can refuse while another still has room."""
    return max(1, -(-limit // workers))


def iso_time(timestamp: float) -> str:
    """UTC ISO 8601 with milliseconds and a ``Z``, as every document of the admin endpoint."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
