"""The rules file as the rest of gportmap sees it: frozen dataclasses, every default
filled in, built only by ``gportmap.config.load`` from a validated file. Nothing
downstream reads the raw JSON.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gportmap.config.faults import RuleSource

if TYPE_CHECKING:
    from gportmap.config.faults import Fault, ToxiproxySettings
    from gportmap.plugins import PluginSpec


@dataclass(frozen=True)
class AdminSettings:
    """``settings.admin``: where the admin HTTP endpoint listens, and its bearer token.

    ``token`` is the token in force, whether written in the rules file or read from
    ``token_file`` (``settings.admin.tokenFile``, absolute), which is re-read on every
    reload so that a rotated secret applies then.
    """

    host: str = "127.0.0.1"
    port: int = 9900
    token: str | None = None
    token_file: str | None = None

    @property
    def listen(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True)
class TlsListen:
    """``tls`` of a rule: absolute file paths, and a digest of their content so that a
    renewed certificate makes the rule differ (and reload) even with the same paths."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    digest: str


@dataclass(frozen=True)
class TlsTarget:
    """``targetTls`` of a rule; ``server_name`` None means the target host."""

    ca_file: str | None
    server_name: str | None
    verify: bool
    digest: str


class Balance(enum.Enum):
    """``balance`` of a rule with ``targets`` (SPEC §8): how a connection (a UDP
    session) picks its target among those that are up."""

    ROUNDROBIN = "roundrobin"  #: smooth weighted round robin, as nginx's upstream
    LEASTCONN = "leastconn"  #: fewest active connections relative to weight
    SOURCE = "source"  #: consistent hash of the client address, as HAProxy's hash-type consistent
    FIRST = "first"  #: the first target in list order that is up: failover order
    RANDOM = "random"  #: weighted random


class CheckType(enum.Enum):
    """``healthCheck.type`` (SPEC §8)."""

    TCP = "tcp"  #: connect
    TLS = "tls"  #: connect and handshake with the rule's ``targetTls``
    HTTP = "http"  #: ``GET path``: up while the status is in ``expectStatus``
    SEND_EXPECT = "send-expect"  #: send ``send``; up when the reply contains ``expect`` (UDP for udp rules)


@dataclass(frozen=True, order=True)
class PortRange:
    """``listenPort`` or ``targetPort`` (SPEC §9): the ports ``first`` to ``last``,
    inclusive; a single port is a range of one. Always an interval, never a set of
    every port: a 10,000-port rule costs two integers here."""

    first: int
    last: int

    @classmethod
    def of(cls, value: int | str | PortRange) -> PortRange:
        """80 -> 80-80; "20000-20099" -> 20000-20099 (the schema checked the text)."""
        if isinstance(value, PortRange):
            return value
        if isinstance(value, str):
            low, _, high = value.partition("-")
            return cls(int(low), int(high or low))
        return cls(int(value), int(value))

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    @property
    def text(self) -> str:
        """"80" or "20000-20099": how logs and the diff name it."""
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Listen:
    """One listen address of a rule with its ports: ``host`` listens on every port
    of ``ports`` over ``transport`` (a socket per port)."""

    transport: str
    host: str
    ports: PortRange

    @property
    def text(self) -> str:
        return format_address(self.host, self.ports.text)


@dataclass(frozen=True)
class Target:
    """One entry of a rule's ``targets`` (or its ``targetHost``/``targetPort``:
    a pool of one). Known across reloads by ``key``, (host, port)."""

    host: str
    port: int
    weight: int = 1
    backup: bool = False
    name: str = ""  # "" -> "host:port" (``label``)
    #: The ``routes`` entry it belongs to (SPEC §13), "" for a rule's own targets.
    route: str = ""
    #: ``port`` as "C-D" (SPEC §9): listen port A+i forwards to ``port`` + i (``port``
    #: is C, what health checks probe). None: every listen port forwards to ``port``.
    ports: PortRange | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def label(self) -> str:
        """The target's name in stats, metrics and logs."""
        return self.name or self.address

    @property
    def address_text(self) -> str:
        """``address``, with the whole "C-D" range for a range target."""
        return self.address if self.ports is None else format_address(self.host, self.ports.text)


@dataclass(frozen=True)
class KeepAlive:
    """``keepAlive`` of a rule: TCP keepalive probes on the client's and the target's
    connection (SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT), so that a peer that vanished
    without a FIN or RST is found after about ``idle + interval * count`` seconds."""

    idle: int = 60  #: seconds without traffic before the first probe
    interval: int = 10  #: seconds between probes
    count: int = 6  #: unanswered probes that end the connection


@dataclass(frozen=True)
class HealthCheck:
    """``healthCheck`` of a rule (SPEC §8): every default filled in."""

    type: CheckType = CheckType.TCP
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    path: str = "/"  # http
    #: http: statuses that mean up, as inclusive (low, high) ranges.
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    send: str = ""  # send-expect
    expect: str = ""  # send-expect


@dataclass(frozen=True)
class AcceptProxy:
    """``acceptProxy`` of a tcp or websocket rule (SPEC §13): connections from
    ``trusted`` networks must start with a PROXY v1/v2 header within ``timeout``."""

    trusted: tuple[str, ...]
    timeout: float = 3.0


@dataclass(frozen=True)
class PerClient:
    """``perClient`` of a rule (SPEC §13), per client address; None: no such limit.
    tcp/websocket: ``max_connections`` concurrent, ``connection_rate`` new per second;
    udp: ``packet_rate`` datagrams per second. ``burst``: the token bucket's size
    (default: the rate, rounded up, at least 1)."""

    max_connections: int | None = None
    connection_rate: float | None = None
    packet_rate: float | None = None
    burst: int | None = None


class SniffProtocol(enum.Enum):
    """``match.protocol`` of a route (SPEC §13): what the client's first bytes are."""

    SSH = "ssh"  #: an SSH version banner ("SSH-"); also a client silent for sniffTimeout
    TLS = "tls"  #: a TLS handshake record
    HTTP = "http"  #: an HTTP/1.x request line (or the HTTP/2 preface)
    SOCKS5 = "socks5"  #: a SOCKS5 greeting


@dataclass(frozen=True)
class RouteMatch:
    """What a route matches: its ``sni``, ``alpn``, ``http_host`` (``host`` here)
    and ``protocol`` keys. Every key given must hold (and); within a list, any
    entry (or). Names are lower case; ``*.example.com`` matches one or more labels
    in front of ``example.com``."""

    sni: tuple[str, ...] = ()
    alpn: tuple[str, ...] = ()
    host: tuple[str, ...] = ()  # HTTP Host header, without its port
    protocol: SniffProtocol | None = None

    @property
    def empty(self) -> bool:
        return not (self.sni or self.alpn or self.host or self.protocol)


@dataclass(frozen=True)
class RuleRoute:
    """One entry of a tcp rule's ``routes`` (SPEC §13): what it matches (or
    ``default``) and its targets, a pool of its own (``Target.route`` is its name)."""

    name: str
    match: RouteMatch
    targets: tuple[Target, ...]
    default: bool = False


@dataclass(frozen=True)
class Settings:
    """The file's ``settings`` object; every key is optional."""

    max_connections: int = 10000
    drain_timeout: float = 30.0
    log_format: str = "text"
    log_level: str = "INFO"
    watch: bool = True
    admin: AdminSettings | None = AdminSettings()  # None: the admin endpoint is off
    stats_interval: float = 60.0  # 0: no periodic stats records
    allow_targets: tuple[str, ...] = ()  # empty: any target
    workers: int | str = 1  # processes sharing the ports; "auto": one per core
    #: SPEC §12: where Toxiproxy's HTTP API listens; None: off.
    toxiproxy: ToxiproxySettings | None = None


@dataclass(frozen=True)
class Rule:
    """One forwarding rule with every default filled in.

    ``index`` (the rule's position in the file) only serves messages: it is left out
    of ``==`` so that a hot reload sees a rule that merely moved as unchanged.
    """

    name: str
    protocol: str
    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    enabled: bool = True
    max_connections: int = 1000
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    session_timeout: float = 60.0
    max_sessions: int = 1000
    handshake_timeout: float = 10.0
    path: str = "/"  # websocket: the listener's path
    origins: tuple[str, ...] = ()  # websocket: allowed Origin values; empty = any
    max_message_size: int = 1048576  # websocket, and tcp tunnels: largest message
    target_protocol: str = "tcp"  # tcp: "websocket" tunnels each connection over a WebSocket
    target_path: str = "/"  # tcp tunnels: the path asked of the target
    proxy_protocol: str | None = None  # tcp: "v1"/"v2", a PROXY protocol header to the target first
    allow: tuple[str, ...] = ()  # client networks admitted; empty = everyone
    deny: tuple[str, ...] = ()  # client networks refused; wins over allow
    tls: TlsListen | None = None
    target_tls: TlsTarget | None = None
    plugins: tuple[PluginSpec, ...] = ()
    #: The pool (SPEC §8): ``targets``, or one built from targetHost/targetPort.
    #: ``target_host``/``target_port`` are the first target's.
    targets: tuple[Target, ...] = ()
    balance: Balance = Balance.ROUNDROBIN
    retries: int = 2  # more connect attempts, each on another up target
    max_fails: int = 3  # consecutive connect failures that take a target out; 0 = never
    fail_timeout: float = 10.0  # seconds a target is out before one attempt is let through
    health_check: HealthCheck | None = None
    index: int = field(default=0, compare=False)
    keep_alive: KeepAlive | None = None  # tcp, websocket: TCP keepalive on both sides
    #: tcp: pick the target by the client's first bytes (SPEC §13); ``targets`` then
    #: holds every route's targets, in order (each knows its ``route``).
    routes: tuple[RuleRoute, ...] = ()
    sniff_timeout: float = 3.0  # routes: how long to wait for the client's first bytes
    #: SPEC §9: every listen address (``listen_host`` is the first) and the listen
    #: ports (``listen_port`` is the first); empty/None: just those two.
    listen_hosts: tuple[str, ...] = ()
    listen_ports: PortRange | None = None
    #: ``targetPort`` as "C-D" (the single target's ``ports``); None: one port.
    target_ports: PortRange | None = None
    #: tcp, websocket: PROXY headers accepted from trusted senders (SPEC §13).
    accept_proxy: AcceptProxy | None = None
    #: Limits per client address (SPEC §13).
    per_client: PerClient | None = None
    #: Network faults (SPEC §12). Left out of ``==``: a change of faults alone
    #: keeps the rule's server and connections; the service publishes the new
    #: faults to the running server (``gportmap.engine.faults.FaultBoard``).
    faults: tuple[Fault, ...] = field(default=(), compare=False)
    #: Where the rule comes from: the rules file, or the Toxiproxy API (in memory).
    source: RuleSource = RuleSource.FILE

    def __post_init__(self) -> None:
        if not self.targets:  # built from targetHost/targetPort: a pool of one
            object.__setattr__(self, "targets", (Target(self.target_host, self.target_port, ports=self.target_ports),))
        if not self.listen_hosts:
            object.__setattr__(self, "listen_hosts", (self.listen_host,))
        if self.listen_ports is None:
            object.__setattr__(self, "listen_ports", PortRange(self.listen_port, self.listen_port))

    @property
    def transport(self) -> str:
        """The socket type the listener binds: websocket rules share TCP ports."""
        return "udp" if self.protocol == "udp" else "tcp"

    @property
    def key(self) -> tuple[str, str, int]:
        """The rule's first listener (transport, first host, first port): what
        identifies a single-port rule across reloads (SPEC §4); a reload matches
        each of ``listeners`` on its own (SPEC §9)."""
        return (self.transport, self.listen_host, self.listen_port)

    @property
    def listeners(self) -> tuple[Listen, ...]:
        """Every listen address with the rule's ports (SPEC §9)."""
        ports = self.listen_ports or PortRange(self.listen_port, self.listen_port)
        return tuple(Listen(self.transport, host, ports) for host in self.listen_hosts)

    @property
    def listener_count(self) -> int:
        """Listening sockets the rule opens: addresses x ports."""
        return len(self.listen_hosts) * len(self.listen_ports or (self.listen_port,))

    @property
    def listen(self) -> str:
        """Where it listens, compactly: "0.0.0.0:80", "0.0.0.0:20000-20099",
        "127.0.0.1:53,127.0.0.2:53" (a single listener's address as before)."""
        return ",".join(listen.text for listen in self.listeners)

    @functools.cached_property
    def target(self) -> str:
        """The target's address; a pool's addresses, comma-separated ("C-D" ranges whole).
        Cached: records name it per connection, and a rule never changes."""
        return ",".join(target.address_text for target in self.targets)

    def target_port_for(self, target: Target, listen_port: int) -> int:
        """The port of ``target`` that a connection on ``listen_port`` goes to: C+i
        for listen port A+i with a "C-D" target, else the target's one port."""
        if target.ports is None:
            return target.port
        return target.port + (listen_port - (self.listen_ports.first if self.listen_ports else self.listen_port))


@dataclass(frozen=True)
class Config:
    """A validated rules file; ``digest`` lets a watcher skip unchanged content."""

    path: str
    rules: tuple[Rule, ...]
    settings: Settings
    digest: str
    #: The file's bytes as validated: worker processes apply exactly this version.
    raw: bytes = field(default=b"", compare=False, repr=False)

    @property
    def enabled_rules(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.enabled)


def format_address(host: str, port: int | str) -> str:
    """``host:port``, with an IPv6 host in brackets as URLs and logs expect."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
