"""systemd's two protocols: readiness notification and socket activation.

Both are small enough to speak directly, which is why no library is used here
(python-systemd needs libsystemd's headers and a C build, and its ``notify`` blocks;
``sdnotify`` uses a blocking socket and has no socket activation):

- ``sd_notify(3)``: one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named
  by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). ``Notifier``
  sends ``READY=1`` once the first rules run, ``RELOADING=1`` (with
  ``MONOTONIC_USEC``) and ``READY=1`` around every applied reload, ``STATUS=`` lines,
  ``STOPPING=1`` at SIGTERM, and ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` from a
  timer of the gevent hub, so that a hub that stalls stops the pings and systemd
  restarts gportmap. The socket is non-blocking and a failure is logged once: the
  hub never waits for systemd.
- ``sd_listen_fds(3)``: ``$LISTEN_FDS`` descriptors from 3, for this process only
  (``$LISTEN_PID``), named by ``$LISTEN_FDNAMES``. ``InheritedSockets`` keeps them
  for the life of the process (systemd keeps its own copy just the same) and a rule
  whose transport, address and port match one adopts a duplicate of it instead of
  binding: a connection that reached the socket before gportmap ran is served. A
  rule removed by a reload closes its duplicate like any listener; added again, it
  adopts the socket again (binding would fail: the socket unit holds the port). The
  variables are removed once read, so worker processes never take them for theirs.

Socket activation serves one process: with ``--workers`` each worker binds its own
``SO_REUSEPORT`` socket, which a port held by a socket unit refuses, so the command
line refuses that combination at start-up (exit 2) instead of running with every
rule failing.
"""

from __future__ import annotations

import _socket
import ipaddress
import os
import socket
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gevent
import gevent.socket

from gportmap.config import Rule, format_address
from gportmap.config.model import PortRange
from gportmap.events import ListenFds, NotifyFailed, SocketUnmatched, SocketUnusable
from gportmap.log import emit, get_logger

if TYPE_CHECKING:
    from gportmap.runtime.service import Service

logger = get_logger("systemd")

#: The first descriptor the service manager passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
_TRANSPORTS = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}


# -- sd_notify ------------------------------------------------------------------------


def notify_address(value: str | None) -> str | None:
    """The ``sendto`` address for ``$NOTIFY_SOCKET``: a path, or ``@name`` turned into
    the abstract namespace's leading NUL; None when unset or of a kind not spoken here
    (``vsock:``), or where the platform has no ``AF_UNIX``."""
    if not value or not hasattr(_socket, "AF_UNIX"):
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half ``$WATCHDOG_USEC``, as systemd
    advises), or None when the watchdog is off or meant for another process
    (``$WATCHDOG_PID``, as ``sd_watchdog_enabled(3)`` checks)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID")
    if usec <= 0 or (owner is not None and owner.strip() != str(pid)):
        return None
    return usec / 2 / 1e6


class Notifier:
    """Tells systemd what gportmap is doing; every method is a no-op outside systemd.

    Sends never block and never raise: the socket is non-blocking, and the first
    failure is logged (``notify_failed``), later ones only counted."""

    #: Seconds between two ``STATUS=`` updates at most; one is sent only when the
    #: text changed. Reloads and the stop update it at once.
    status_interval = 5.0

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = address
        #: Seconds between two ``WATCHDOG=1`` (None: no watchdog).
        self.watchdog = watchdog if address is not None else None
        #: Datagrams that could not be sent.
        self.failures = 0
        self._sock: _socket.socket | None = None
        self._service: Service | None = None
        self._status: str | None = None
        self._stopping = False
        self._timers: list = []

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd asked for in the environment (none: a silent one).
        ``$NOTIFY_SOCKET`` stays set: an upgrade in place re-executes this same
        process, which must go on notifying."""
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        address = notify_address(environ.get("NOTIFY_SOCKET"))
        return cls(address, watchdog_interval(environ, pid) if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; False if it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        if self.failures == 1:
            emit(
                logger,
                NotifyFailed(
                    address=self.address.replace("\0", "@", 1) if self.address else None,
                    error=exc.strerror or str(exc),
                ),
            )

    # -- the life cycle ------------------------------------------------------------------

    def ready(self, service: Service) -> None:
        """The first rules run and the admin endpoint started: ``READY=1``. Starts the
        periodic ``STATUS=`` and, when asked for, the watchdog pings (the first one
        with this datagram, so a watchdog is never late while starting)."""
        if self.address is None or self._stopping:
            return
        self._service = service
        self._status = status_line(service)
        extra = ("WATCHDOG=1",) if self.watchdog is not None else ()
        self.send("READY=1", f"STATUS={self._status}", *extra)
        self._every(self.status_interval, self._refresh_status)
        if self.watchdog is not None:
            self._every(self.watchdog, self._ping)

    def reloading(self) -> None:
        """A valid new version is about to change the running rules (``Service``'s
        reload listener): ``RELOADING=1`` with the monotonic clock, as systemd wants."""
        if self._service is None or self._stopping:
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the rules")

    def reloaded(self) -> None:
        """The reload is over, however it ended: ``READY=1`` and what runs now."""
        if self._service is None or self._stopping:
            return
        self._status = status_line(self._service)
        self.send("READY=1", f"STATUS={self._status}")

    def stopping(self, active: int) -> None:
        """SIGTERM/SIGINT: ``STOPPING=1``. The status stops following the rules; the
        watchdog pings go on while the connections drain."""
        if self.address is None or self._stopping:
            return
        self._stopping = True
        self.send("STOPPING=1", f"STATUS=stopping: draining {active} connection(s)")

    def close(self) -> None:
        """Stop notifying for good (a stop, or an upgrade's drainer, which must never
        tell the service manager anything about the service the new program runs)."""
        for timer in self._timers:
            timer.close()
        self._timers = []
        self.address = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- hub timers ------------------------------------------------------------------

    def _every(self, seconds: float, callback) -> None:
        """A repeating timer of the hub's loop: it runs in the hub itself, so it fires
        only while the hub turns (a stalled hub sends no watchdog ping)."""
        timer = gevent.get_hub().loop.timer(seconds, seconds, ref=False)
        timer.start(callback)
        self._timers.append(timer)

    def _ping(self) -> None:
        self.send("WATCHDOG=1")

    def _refresh_status(self) -> None:
        if self._service is None or self._stopping:
            return
        status = status_line(self._service)
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")


def status_line(service: Service) -> str:
    """What ``systemctl status`` shows, kept short: ``serving 3 rules, 12 connections``,
    or ``serving 2 of 3 rules, ... (1 failing)``, and a rejected last reload. Only the
    rules of the running version count: a removed one still draining serves nobody new."""
    names = {rule.name for rule in service.config.enabled_rules}
    states = [state for rule, state, _ in service.supervisor.rule_states() if rule.name in names]
    serving = sum(state == "running" for state in states)
    failing = sum(state == "failed" for state in states)
    active = service.supervisor.stats.active
    rules = f"{serving} rule{'' if serving == 1 else 's'}"
    if serving != len(states):
        rules = f"{serving} of {len(states)} rules"
    text = f"serving {rules}, {active} connection{'' if active == 1 else 's'}"
    if failing:
        text += f" ({failing} failing)"
    if service.last_error:
        text += "; last reload rejected"
    return text


# -- socket activation ----------------------------------------------------------------


@dataclass(frozen=True)
class ListenFd:
    """One descriptor passed by the service manager, with its ``$LISTEN_FDNAMES`` name."""

    fd: int
    name: str


def take_listen_fds(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[ListenFd]:
    """The descriptors passed to this process (``sd_listen_fds(1)``): none unless
    ``$LISTEN_PID`` is this process. The three variables are removed either way, so
    that no child takes them for its own; the descriptors are made close-on-exec."""
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    count, owner, names = (environ.pop(name, None) for name in _LISTEN_VARIABLES)
    try:
        number = int(count or "")
        owned = int(owner or "") == pid
    except ValueError:
        return []
    if not owned or number <= 0:
        return []
    labels = (names or "").split(":") if names else []
    found = []
    for index in range(number):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # not open: nothing was passed there
        found.append(ListenFd(fd, labels[index] if index < len(labels) and labels[index] else "unknown"))
    return found


@dataclass(frozen=True)
class InheritedSocket:
    """A listening socket the service manager passed: what a rule must match to adopt it."""

    name: str
    fd: int
    transport: str  #: "tcp" or "udp", as ``Rule.transport``
    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    sock: socket.socket

    @property
    def listen(self) -> str:
        return format_address(str(self.host), self.port)

    def describe(self) -> str:
        return f"{self.listen}/{self.transport} (fd {self.fd}, {self.name})"

    def duplicate(self) -> socket.socket:
        """A descriptor of the same socket for one rule's server: closing it (a
        removed rule) leaves the socket listening here, for a rule added again."""
        return self.sock.dup()


class InheritedSockets:
    """The sockets passed by the service manager, kept open until gportmap stops."""

    def __init__(self, sockets: Iterable[InheritedSocket]) -> None:
        self.sockets = list(sockets)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> InheritedSockets | None:
        """The sockets ``$LISTEN_FDS`` passes to this process (None if it passes
        none). Descriptors no rule could ever use (not an IP socket, not listening,
        not TCP or UDP) are logged and closed at once."""
        passed = take_listen_fds(environ)
        if not passed:
            return None
        sockets = [sock for sock in (_inspect(item) for item in passed) if sock is not None]
        emit(
            logger,
            ListenFds(
                passed=len(passed),
                sockets=[{"fd": s.fd, "name": s.name, "listen": s.listen, "transport": s.transport} for s in sockets],
            ),
        )
        return cls(sockets)

    def __len__(self) -> int:
        return len(self.sockets)

    def matching(self, transport: str, host: str, ports: PortRange) -> dict[int, InheritedSocket]:
        """The passed sockets that one listen address of a rule adopts, by port: same
        transport, a port of ``ports`` (every port of a range, not only its first) and
        the address ``host`` binds (a host name is resolved as binding would: this may
        yield). The one test of a match: a rule's start adopts what it returns, and
        ``report_unmatched`` warns about what it returns for no rule."""
        candidates = [sock for sock in self.sockets if sock.transport == transport and sock.port in ports]
        if not candidates:
            return {}
        address = listen_ip(host, ports.first, transport)
        return {sock.port: sock for sock in candidates if sock.host == address}

    def take(self, rule: Rule) -> InheritedSocket | None:
        """The socket a rule of a single listener listens on, if one was passed."""
        port = rule.listen_port
        return self.matching(rule.transport, rule.listen_host, PortRange(port, port)).get(port)

    def adopted_by(self, rule: Rule) -> list[InheritedSocket]:
        """The passed sockets ``rule`` adopts: on every listen address, every port."""
        return [
            sock
            for listen in rule.listeners
            for sock in self.matching(listen.transport, listen.host, listen.ports).values()
        ]

    def report_unmatched(self, rules: Iterable[Rule]) -> list[InheritedSocket]:
        """Warn about the sockets no enabled rule adopts: they stay open, unserved
        (connections wait in their backlog), for a rule a reload may add. A socket on
        any port of a rule's range, or on any of its addresses, is that rule's."""
        adopted = {id(sock) for rule in rules if rule.enabled for sock in self.adopted_by(rule)}
        unmatched = [sock for sock in self.sockets if id(sock) not in adopted]
        for sock in unmatched:
            emit(logger, SocketUnmatched(fd=sock.fd, fd_name=sock.name, listen=sock.listen, transport=sock.transport))
        return unmatched

    def close(self) -> None:
        """gportmap stops: close every inherited socket (new attempts are refused,
        or, under systemd, wait for the next start at the socket unit's copy)."""
        for sock in self.sockets:
            sock.sock.close()
        self.sockets = []


def listen_ip(host: str, port: int, transport: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a rule binds: an IP literal as it is, a name resolved as
    ``bind_listener`` resolves it (the first passive address); None if it does not resolve."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    sock_type = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    try:
        infos = gevent.socket.getaddrinfo(
            host or None, port, socket.AF_UNSPEC, sock_type, 0, socket.AI_PASSIVE
        )
    except OSError:
        return None
    return ipaddress.ip_address(str(infos[0][4][0]).split("%", 1)[0])


def _inspect(passed: ListenFd) -> InheritedSocket | None:
    """The passed descriptor as an ``InheritedSocket``, or None (logged and closed)
    when no rule could use it: not a socket, not IPv4/IPv6, not a listening TCP
    socket (an ``Accept=yes`` connection) or a UDP socket."""
    try:
        sock = gevent.socket.socket(fileno=passed.fd)
    except OSError as exc:
        _unusable(passed, f"not a socket ({exc.strerror or exc})")
        os.close(passed.fd)
        return None
    problem = None
    transport = _TRANSPORTS.get(sock.type)
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        problem = "not an IPv4 or IPv6 socket"
    elif transport is None:
        problem = "neither a stream nor a datagram socket"
    elif transport == "tcp" and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "a stream socket that is not listening (Accept=yes passes connections: use Accept=no)"
    if problem is not None:
        _unusable(passed, problem)
        sock.close()
        return None
    host, port = sock.getsockname()[:2]
    return InheritedSocket(
        passed.name, passed.fd, transport, ipaddress.ip_address(host.split("%", 1)[0]), port, sock
    )


def _unusable(passed: ListenFd, problem: str) -> None:
    emit(logger, SocketUnusable(fd=passed.fd, name=passed.name, problem=problem))
