"""The rules file as the rest of gportmap sees it: frozen dataclasses, every default
filled in, built only by ``gportmap.config.load`` from a validated file. Nothing
downstream reads the raw JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class Target:
    """One entry of a rule's ``targets`` (or its ``targetHost``/``targetPort``:
    a pool of one). Known across reloads by ``key``, (host, port)."""

    host: str
    port: int
    weight: int = 1
    backup: bool = False
    name: str = ""  # "" -> "host:port" (``label``)

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

    def __post_init__(self) -> None:
        if not self.targets:  # built from targetHost/targetPort: a pool of one
            object.__setattr__(self, "targets", (Target(self.target_host, self.target_port),))

    @property
    def transport(self) -> str:
        """The socket type the listener binds: websocket rules share TCP ports."""
        return "udp" if self.protocol == "udp" else "tcp"

    @property
    def key(self) -> tuple[str, str, int]:
        """What identifies a rule across reloads (SPEC §4)."""
        return (self.transport, self.listen_host, self.listen_port)

    @property
    def listen(self) -> str:
        return format_address(self.listen_host, self.listen_port)

    @property
    def target(self) -> str:
        """The target's address; a pool's addresses, comma-separated."""
        return ",".join(target.address for target in self.targets)


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


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets as URLs and logs expect."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
