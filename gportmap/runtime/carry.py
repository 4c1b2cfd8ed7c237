"""What an upgrade in place hands to the new program (SPEC §11): the state document.

The old program writes one JSON document into a memfd it leaves open across
``exec`` and names it in ``$GPORTMAP_UPGRADE_STATE``; the descriptors the document
lists (listeners, both sockets of every carried connection) are made inheritable,
so the kernel keeps every byte in flight in their buffers meanwhile. The document
is versioned (``STATE_VERSION``): the pre-flight asks the installed code whether it
reads this version (``gportmap --check --upgrade-state N``) and the upgrade is
refused before anything changes when it does not.

A carried connection is a plain ``HubRelay`` (no TLS stage, a rule without
plugins): two sockets, per direction the bytes read but not yet written (the unsent
tail, and what a splice pipe held, drained into it: pipes are not carried) and
whether its end was read (a half-close stays a half-close: the FIN was already
forwarded, the kernel keeps the socket's state), and the connection's counters and
clocks. ``time.monotonic`` is the system's ``CLOCK_MONOTONIC``, the same clock on
both sides of ``exec``: start times and the idle deadline carry as they are.

A routed connection (``routes``, SPEC §13) is carried once its route is chosen
and its relay runs: it is then a plain relay like any other, and the state names
its route (``CarriedConnection.route``) so that it holds that route's target
again. One still sniffing its client's first bytes is not carried: it finishes in
the drainer (it has taken nothing off its socket, but it holds no connection yet,
only its admission; the window is the client's first bytes, ``sniffTimeout`` at
most). A connection that came through a trusted proxy (``acceptProxy``) is
carried with its header's client: ``/connections``, its record and its
``perClient`` place are that client's in the new program too.

A carried UDP session is its upstream socket (connected to its target: the same
source port, the same flow for the target), its client's address, its target and
counters, and for a rule with several listening sockets (a port range, SPEC
§9) the address of the one it came in on: each socket has its sessions, and
replies go out through it. No datagram is in flight inside the program (each is
sent as it is read). The new program's rule server (a range's port) adopts its
sessions as it starts, before it reads its listener (``StatsRegistry.carry_over``),
so that a client's next datagram finds its session rather than opening a second one.

Exporting reads ``HubRelay``'s attributes; the new program rebuilds each connection
as a new ``HubRelay`` tracked by its rule's server (``adopt_relay``), counted once:
the rule's counters are restored first with the carried connections taken out of
their ``total``, and opening each one counts it again.
"""

from __future__ import annotations

import _socket
import base64
import ipaddress
import json
import os
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import gevent.socket

from gportmap.engine.hubrelay import HubRelay
from gportmap.engine.pipeline import HubConnection
from gportmap.engine.pumprelay import make_relay
from gportmap.engine.routes import RoutedConnection
from gportmap.errors import GportmapError
from gportmap.protocols.tcp import TcpServer
from gportmap.protocols.udp import Hold, Session, UdpServer
from gportmap.protocols.udprange import UdpPort, UdpRangeServer
from gportmap.runtime.systemd import InheritedSocket, InheritedSockets
from gportmap.stats import Connection, KernelDrops, StatsRegistry

#: The version of the state document this code writes and reads (2: UDP sessions
#: carried, ``UpgradeState.sessions``; 3: a connection's route and listen
#: address, a session's listening socket for a port range).
STATE_VERSION = 3
#: Versions this code can read (the pre-flight asks the new code about the old one's).
READABLE_VERSIONS = frozenset({1, 2, 3})
#: The environment variable naming the memfd that holds the document.
STATE_ENV = "GPORTMAP_UPGRADE_STATE"
#: Name of carried listeners in ``rule_started`` records (systemd's are named by it).
CARRIED_NAME = "upgrade"


class UnreadableState(GportmapError):
    """The state document cannot be read: a version this code does not know, or
    not a document at all."""


@dataclass(frozen=True)
class CarriedListener:
    """A listening socket kept open across the exec."""

    fd: int
    transport: str  #: "tcp" or "udp"
    host: str
    port: int
    #: "upgrade": a rule's listener, adopted by the rule of that address and then
    #: closed; "systemd": a socket of the service manager, kept for the process's life.
    origin: str = CARRIED_NAME
    name: str = CARRIED_NAME


@dataclass(frozen=True)
class CarriedDirection:
    """One way of a carried connection: the bytes it must still write, and whether
    its source's end was read (and forwarded as a half-close)."""

    tail: bytes = b""
    done: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"tail": base64.b64encode(self.tail).decode(), "done": self.done}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CarriedDirection:
        return cls(base64.b64decode(data["tail"]), bool(data["done"]))


@dataclass(frozen=True)
class CarriedConnection:
    """A plain TCP connection: its sockets, its unsent bytes, its counters and clocks."""

    rule: str
    client_fd: int
    target_fd: int
    id: int
    client: str
    target: str
    started: float  #: wall clock (``/connections``)
    started_mono: float  #: CLOCK_MONOTONIC: the duration goes on
    last_active: float  #: CLOCK_MONOTONIC: the idle deadline goes on
    bytes_received: int
    bytes_sent: int
    up: CarriedDirection
    down: CarriedDirection
    #: Version 3. The ``routes`` entry whose target it reached ("" for none).
    route: str = ""
    #: The address it came in on (``/connections``' ``listen``; "": the rule's).
    listen: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["up"], data["down"] = self.up.as_dict(), self.down.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CarriedConnection:
        data = dict(data)
        data["up"] = CarriedDirection.from_dict(data["up"])
        data["down"] = CarriedDirection.from_dict(data["down"])
        return cls(**data)

    @property
    def fds(self) -> tuple[int, int]:
        return (self.client_fd, self.target_fd)


@dataclass(frozen=True)
class CarriedSession:
    """A UDP session: its upstream socket (kept open: the target sees the same
    source port, the same flow), its client, its target, its counters and clocks.
    No datagram is in flight in the program: each is sent as it is read, and what
    waits sits in the kernel's buffers of the listener and of this socket."""

    rule: str
    fd: int
    #: The client's address as ``recvfrom`` gives it (host, port[, flowinfo, scope]).
    address: list[Any]
    target: str  #: the pool target's address (``TargetState.address``)
    started: float  #: CLOCK_MONOTONIC
    last_active: float  #: CLOCK_MONOTONIC: the session timeout goes on
    packets_received: int
    packets_sent: int
    bytes_received: int
    bytes_sent: int
    hold: str  #: ``udp.Hold``'s value: what the target knows of it
    refused: bool = False
    #: Version 3. The listening socket it came in on, (host, port), for a rule
    #: with several (a port range); None for a rule with one.
    listen: list[Any] | None = None


@dataclass(frozen=True)
class UpgradeState:
    """Everything the new program continues from."""

    version: int
    #: When ``upgrade_started`` was logged and when the connections were frozen
    #: (CLOCK_MONOTONIC): the new program reports the duration and the pause.
    began: float
    frozen: float
    #: The service's figures that go on: its start time, rules generation and digest, reloads.
    started_at: float
    generation: int
    digest: str
    reloads: dict[str, int]
    #: The rules file's bytes that ran: used if the file no longer loads in the new program.
    rules: str
    #: Every rule's counters (``RuleStats.counters()``), by rule name.
    counters: dict[str, dict[str, Any]]
    protocols: dict[str, str]
    next_id: int
    listeners: list[CarriedListener] = field(default_factory=list)
    connections: list[CarriedConnection] = field(default_factory=list)
    #: Processes finishing connections that could not be carried (children to reap).
    drainers: list[int] = field(default_factory=list)
    draining: int = 0
    export_seconds: float = 0.0
    #: The rules file's path (a worker starts from ``rules`` and this).
    path: str = ""
    #: A worker: the master's generation whose rules it runs.
    link_generation: int = 0
    #: A master: its workers (``workers.HandedWorker`` as dicts), its generation
    #: and the totals of workers that exited (the sums go on).
    workers: list[dict[str, Any]] = field(default_factory=list)
    pool_generation: int = 0
    pool_count: int = 0
    retired: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: UDP sessions (version 2).
    sessions: list[CarriedSession] = field(default_factory=list)
    #: Drainers' reports (version 2): by drainer pid (as text), the memfd in which it
    #: writes the bytes it relayed after the upgrade (``DrainerReport``), read once it ended.
    drainer_reports: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        data = asdict(self)
        data["listeners"] = [asdict(item) for item in self.listeners]
        data["connections"] = [item.as_dict() for item in self.connections]
        data["sessions"] = [asdict(item) for item in self.sessions]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> UpgradeState:
        try:
            data = json.loads(raw)
            version = data["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UnreadableState(f"not an upgrade state document: {exc}") from None
        if version not in READABLE_VERSIONS:
            raise UnreadableState(f"state document version {version!r} is not one this gportmap reads "
                             f"({', '.join(map(str, sorted(READABLE_VERSIONS)))})")
        try:
            data["listeners"] = [CarriedListener(**item) for item in data["listeners"]]
            data["connections"] = [CarriedConnection.from_dict(item) for item in data["connections"]]
            data["sessions"] = [CarriedSession(**item) for item in data.get("sessions", [])]
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise UnreadableState(f"a malformed state document (version {version}): {exc!r}") from None

    def descriptors(self) -> list[int]:
        """Every descriptor the document hands over."""
        fds = [item.fd for item in self.listeners]
        for conn in self.connections:
            fds.extend(conn.fds)
        fds.extend(item.fd for item in self.sessions)
        fds.extend(self.drainer_reports.values())
        return fds


def reads_version(version: int) -> bool:
    """The pre-flight's question to the installed code."""
    return version in READABLE_VERSIONS


# -- the old program: what can be carried, and taking it out ------------------------


def carried_relay(item: object, server: object) -> HubRelay | None:
    """The plain relay behind one tracked connection of ``server``, or None when it
    cannot be carried: a TLS stage, a connection still in its handshake or connect
    (or still sniffing for its route), a rule with plugins (their ``on_close`` is
    owed), a plugin package's protocol."""
    if type(server) is not TcpServer or server.plugins.active:
        return None
    if isinstance(item, RoutedConnection):
        item = item.inner  # None while it sniffs
    relay = item.relay if isinstance(item, HubConnection) else item
    if not isinstance(relay, HubRelay) or relay.reason is not None or not relay.plain:
        return None
    return relay


def export_relay(relay: HubRelay, rule: str) -> CarriedConnection:
    """One relay's state; its sockets are made inheritable (kept across exec)."""
    conn = relay.conn
    up, down = (CarriedDirection(tail, done) for tail, done in relay.freeze())
    for sock in (relay.client, relay.target):
        os.set_inheritable(sock.fileno(), True)
    return CarriedConnection(
        rule=rule,
        client_fd=relay.client.fileno(),
        target_fd=relay.target.fileno(),
        id=conn.id,
        client=conn.client,
        target=conn.target,
        started=conn.started,
        started_mono=conn.started_mono,
        last_active=conn.last_active,
        bytes_received=conn.bytes_received,
        bytes_sent=conn.bytes_sent,
        up=up,
        down=down,
        route=_route_of(conn),
        listen=conn.listen,
    )


def _route_of(conn: Connection) -> str:
    """The route whose target ``conn`` holds ("" for a rule without routes)."""
    spec = getattr(conn.upstream, "spec", None)
    return getattr(spec, "route", "") or ""


def forget_relay(relay: HubRelay) -> None:
    """In the drainer (a copy of the old program): let go of a connection the new
    program carries (``HubRelay.release``)."""
    relay.release()


# -- the new program: listeners and connections back --------------------------------


class CarriedSockets(InheritedSockets):
    """Listeners handed over by the old program (and systemd's, if it passed any):
    adopted by the rules whose addresses match, exactly as socket activation's are.
    The carried listeners are closed once the first rules started (``settle``):
    the rules hold duplicates, and a rule a later reload removes must close its
    port, not leave it queueing here."""

    def __init__(self, sockets: Iterable[InheritedSocket], origins: dict[int, str]) -> None:
        super().__init__(sockets)
        self.origins = origins

    @classmethod
    def open(cls, listeners: Iterable[CarriedListener]) -> CarriedSockets:
        sockets, origins = [], {}
        for item in listeners:
            sock = gevent.socket.socket(fileno=item.fd)
            os.set_inheritable(item.fd, False)
            host = ipaddress.ip_address(item.host.split("%", 1)[0])
            sockets.append(InheritedSocket(item.name, item.fd, item.transport, host, item.port, sock))
            origins[item.fd] = item.origin
        return cls(sockets, origins)

    def settle(self) -> None:
        """Close the carried listeners (the rules serve on their duplicates)."""
        keep = []
        for sock in self.sockets:
            if self.origins.get(sock.fd) == CARRIED_NAME:
                sock.sock.close()
            else:
                keep.append(sock)
        self.sockets = keep


def describe_listener(sock: socket.socket, origin: str = CARRIED_NAME, name: str = CARRIED_NAME) -> CarriedListener:
    """A listening socket as the document lists it (made inheritable)."""
    os.set_inheritable(sock.fileno(), True)
    host, port = sock.getsockname()[:2]
    transport = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    return CarriedListener(sock.fileno(), transport, host, port, origin, name)


def restore_counters(registry: StatsRegistry, state: UpgradeState) -> None:
    """Every rule's counters go on from the old program's (levels excepted: the
    carried connections are counted open again, so their ``total`` is taken out
    here). Connection ids go on past the old program's."""
    carried = {}
    for conn in [*state.connections, *state.sessions]:
        carried[conn.rule] = carried.get(conn.rule, 0) + 1
    for name, counters in state.counters.items():
        counters = dict(counters, total=counters.get("total", 0) - carried.get(name, 0))
        counters.pop("targets", None)  # into the rule's pool: ``continue_targets``
        stats = registry.rule(name, state.protocols.get(name, "tcp"))
        stats.add(counters, gauges=False)
        kernel = counters.get("udp_dropped", {}).get("kernel", 0)
        if kernel and stats.kernel is None:
            # The kernel's drops are read from live sockets: those of the old program
            # are folded in, and the new sockets' counts add to them.
            stats.kernel = KernelDrops()
            stats.kernel.folded = kernel
    registry.continue_ids(state.next_id)


def import_connection(server: TcpServer, carried: CarriedConnection) -> HubRelay:
    """Rebuild one carried connection as a hub relay tracked by its rule's server.
    If that fails, both descriptors are closed (the connection ends) and the error
    raised."""
    registry = server.context.stats
    socks: list[_socket.socket] = []
    try:
        for fd in carried.fds:
            sock = _socket.socket(fileno=fd)
            socks.append(sock)
            sock.setblocking(False)
            os.set_inheritable(fd, False)  # a later exec carries it again only if told
        client_raw, target_raw = socks
        conn: Connection = registry.open(server.stats, carried.client, carried.target, conn_id=carried.id,
                                         listen=carried.listen or server.rule.listen)
        conn.started, conn.started_mono = carried.started, carried.started_mono
        conn.last_active = carried.last_active
        conn.bytes_received, conn.bytes_sent = carried.bytes_received, carried.bytes_sent
        try:
            relay = make_relay(client_raw, target_raw, conn, server.rule.idle_timeout, server.context.splice)
        except Exception:
            registry.close(conn)
            raise
    except Exception:
        close_descriptors(carried.fds[len(socks):])  # those no socket object owns yet
        for sock in socks:
            sock.close()
        raise
    _hold_target(server, conn, carried.route)
    _hold_client(server, conn)
    server.adopt_relay(relay, conn)  # starts both readers; from here on the relay reports its end
    relay.resume((carried.up.tail, carried.up.done), (carried.down.tail, carried.down.done))
    return relay


def _hold_target(server: TcpServer, conn: Connection, route: str = "") -> None:
    """A carried connection holds its target of the rule's pool again (leastconn
    counts it, its end gives it back), found by the address it reached and, for a
    routed one, its route (so that route's figures in ``/stats`` count it)."""
    for target in server.target_pool.targets:
        if target.address == conn.target and (not route or target.spec.route == route):
            target.carried()
            conn.hold(target, conn.target)
            return


def _hold_client(server: TcpServer, conn: Connection) -> None:
    """``perClient``: a carried connection takes its client's place again (the
    header's client for one behind a trusted proxy: ``conn.client``), so that the
    client's count in the new program includes it. It takes no token of
    ``connectionRate`` and is never refused: it was admitted before the upgrade
    (``ClientTable.carried``)."""
    if server.clients is None:
        return
    conn.lease = server.clients.carried(client_host(conn.client))


def client_host(text: str) -> str:
    """The host of a client address as ``peer_text`` wrote it ("1.2.3.4:5",
    "[::1]:5"), for the ``perClient`` table's key."""
    if text.startswith("["):
        return text[1:text.find("]")]
    return text.rpartition(":")[0] or text


def udp_sessions(server: object) -> list[tuple[UdpServer, Session]] | None:
    """Every carriable session of a UDP rule's server, with the single-socket
    server that holds it (the rule's, or for a port range the port's: its
    ``UdpRangeServer.parts``); None when ``server`` is not a UDP rule's."""
    if isinstance(server, UdpServer):
        parts: list[UdpServer] = [server]
    elif isinstance(server, UdpRangeServer):
        parts = server.parts()
    else:
        return None
    return [(part, session) for part in parts for session in part.carriable()]


def export_session(session: Session, rule: str, part: UdpServer | None = None) -> CarriedSession:
    """One UDP session's state; its socket is made inheritable (kept across exec).
    ``part``: the server holding it, which names its listening socket when it is
    one port of a rule with several."""
    os.set_inheritable(session.upstream.fileno(), True)
    return CarriedSession(
        rule=rule,
        fd=session.upstream.fileno(),
        address=list(session.address),
        target=session.target.address,
        started=session.started,
        last_active=session.last_active,
        packets_received=session.packets_received,
        packets_sent=session.packets_sent,
        bytes_received=session.bytes_received,
        bytes_sent=session.bytes_sent,
        hold=session.hold.value,
        refused=session.refused,
        listen=list(part.listen_key) if isinstance(part, UdpPort) else None,
    )


def import_session(server: UdpServer, carried: CarriedSession) -> Session:
    """Rebuild one carried UDP session on its rule's server, holding its target
    again (found by address) as it held it in the old program. If that fails
    (its target is no longer the rule's), the socket is closed and the error raised."""
    try:
        upstream = _socket.socket(fileno=carried.fd)
    except OSError:
        close_descriptors([carried.fd])
        raise
    try:
        os.set_inheritable(carried.fd, False)  # a later exec carries it again only if told
        target = next((t for t in server.target_pool.targets if t.address == carried.target), None)
        if target is None:
            raise ValueError(f"target {carried.target} is no longer one of rule {carried.rule}'s")
        session = Session(tuple(carried.address), upstream, carried.last_active, target)
        session.started = carried.started
        session.packets_received, session.packets_sent = carried.packets_received, carried.packets_sent
        session.bytes_received, session.bytes_sent = carried.bytes_received, carried.bytes_sent
        session.hold, session.refused = Hold(carried.hold), carried.refused
        server.adopt_session(session)
    except Exception:
        upstream.close()
        raise
    if session.hold is not Hold.GIVEN_BACK:
        target.carried()
    return session


@dataclass(frozen=True)
class DrainerReport:
    """What a drainer relayed after the upgrade, by rule: bytes from clients and to
    clients. Written by the drainer into a memfd as it ends, read by the program
    that reaps it, which adds it to its rules' byte counters."""

    bytes: dict[str, tuple[int, int]]

    @staticmethod
    def baseline(registry: StatsRegistry) -> dict[str, tuple[int, int]]:
        return {rule.name: (rule.bytes_received, rule.bytes_sent) for rule in registry.rules()}

    @classmethod
    def since(cls, registry: StatsRegistry, baseline: dict[str, tuple[int, int]]) -> DrainerReport:
        moved = {}
        for name, (received, sent) in cls.baseline(registry).items():
            was = baseline.get(name, (0, 0))
            if (received, sent) != was:
                moved[name] = (received - was[0], sent - was[1])
        return cls(moved)

    def write(self, fd: int) -> None:
        os.pwrite(fd, json.dumps({"bytes": self.bytes}).encode(), 0)

    @classmethod
    def read(cls, fd: int, limit: int = 1 << 20) -> DrainerReport:
        """The report in ``fd`` (empty if the drainer wrote none: killed)."""
        raw = os.pread(fd, limit, 0)
        if not raw:
            return cls({})
        data = json.loads(raw)
        return cls({str(name): (int(pair[0]), int(pair[1])) for name, pair in data["bytes"].items()})

    def add_to(self, registry: StatsRegistry) -> None:
        """Count the drained bytes in this program's rules (those it still knows)."""
        for name, (received, sent) in self.bytes.items():
            for rule in registry.rules():
                if rule.name == name:
                    rule.bytes_received += received
                    rule.bytes_sent += sent


def close_descriptors(fds: Iterable[int]) -> None:
    """Close handed-over descriptors nobody will use (an unreadable document)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
