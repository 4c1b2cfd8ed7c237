"""udp rules with several listening sockets (SPEC §9: a port range, a list of
listen addresses).

A UDP session is a client address *on one listening socket*: its replies go back
through that socket. So each socket keeps its own session table, in a
``UdpPort`` (the single-socket ``UdpServer``, its target port moved by the
listener's offset for a "C-D" target); ``UdpRangeServer`` is the rule's one server
over all of them, with the supervisor's surface. They share the rule's counters
and its pool (``RuleStats``), and ``maxSessions`` counts the rule's sessions over
all its ports (``RuleStats.active``, which includes a draining predecessor's).

An upgrade in place carries each port's sessions (``gportmap.runtime.carry``):
a session is named by the address of its port's socket (``UdpPort.listen_key``),
and the new program's port on that same socket (carried too) adopts it as it
starts, before it reads a datagram, exactly as a single-socket rule's server does.

Kernel drops are one source for the whole rule (``UdpRangeServer.kernel_drops``),
not one per port: a 10,000-port rule would otherwise make every retirement of a
port scan a list of 10,000.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable

from gportmap.config import Rule
from gportmap.engine.acceptor import ListenKey
from gportmap.engine.net import peer_text
from gportmap.engine.pool import TargetState
from gportmap.protocols import ServerContext
from gportmap.protocols.udp import UdpServer
from gportmap.reasons import DropReason
from gportmap.stats import retire_kernel_drops, watch_kernel_drops


class UdpPort(UdpServer):
    """One listening socket of a udp rule with several (see the module docstring)."""

    def __init__(self, rule: Rule, context: ServerContext, listen_port: int, shared: UdpPort | None = None) -> None:
        super().__init__(rule, context)
        assert rule.listen_ports is not None
        self.offset = listen_port - rule.listen_ports.first
        #: The address of its socket, (host, port), as the kernel names it: what
        #: an upgrade in place knows its sessions by (set by ``start``).
        self.listen_key: tuple[str, int] | None = None
        if shared is not None:  # one of each per rule, not per port (their own are freed here)
            self.admission = shared.admission
            self.plugins = shared.plugins
            self.clients = shared.clients  # perClient counts a client over every port

    def start(self, listener: socket.socket | None = None) -> None:
        if listener is not None:  # before super().start: it adopts carried sessions by it
            self.listen_key = tuple(listener.getsockname()[:2])
        super().start(listener)
        kernel = self.stats.kernel
        if kernel is not None and kernel.sources and kernel.sources[-1] == self.kernel_drops:
            kernel.sources.pop()  # counted by the rule's UdpRangeServer instead

    def _target_address(self, target: TargetState) -> tuple[int, tuple] | None:
        address = super()._target_address(target)
        if address is None or target.spec.ports is None or not self.offset:
            return address
        family, sockaddr = address
        return family, (sockaddr[0], sockaddr[1] + self.offset, *sockaddr[2:])

    def _admit(self, address: tuple) -> bool:
        """``maxSessions`` over every port of the rule, then the usual checks."""
        limit = self.context.stats.share(self.rule.max_sessions)
        if self.stats.active >= limit and self.admission.admits(address):
            self._drop(DropReason.SESSIONS, peer_text(address), f"session table full ({limit} sessions)")
            return False
        return super()._admit(address)


class UdpRangeServer:
    """Serves one udp rule on several sockets; the supervisor's surface, plus
    ``start_many`` / ``take_listeners`` / ``listening`` as ``StreamRuleServer``'s."""

    #: The single-socket servers' attribute: several sockets here (``listening``).
    listener = None

    def __init__(self, rule: Rule, context: ServerContext) -> None:
        self.rule = rule
        self.context = context
        self.stats = context.stats.rule(rule.name, rule.protocol)
        self.ports: dict[ListenKey, UdpPort] = {}  # reading or draining
        self.reading: set[ListenKey] = set()
        self._watched = False

    # -- the supervisor's surface -------------------------------------------------

    def start_many(self, sockets: dict[ListenKey, socket.socket]) -> None:
        for key, sock in sockets.items():
            part = UdpPort(self.rule, self.context, key[1], next(iter(self.ports.values()), None))
            self.ports[key] = part
            part.start(sock)
            self.reading.add(key)
        if not self._watched:
            self._watched = True
            watch_kernel_drops(self.stats, self.kernel_drops)

    def add_listeners(self, sockets: dict[ListenKey, socket.socket]) -> None:
        """More sockets (a reload hands a large range over in slices)."""
        self.start_many(sockets)

    def start(self, listener: socket.socket | None = None) -> None:
        raise NotImplementedError("a udp rule with several listeners starts with start_many")

    def take_listeners(self, keys: Iterable[ListenKey]) -> dict[ListenKey, socket.socket]:
        """Stop reading on ``keys``; their sockets go to a successor, still open (their
        sessions keep replying through them until they end or the drain does)."""
        taken = {}
        for key in keys:
            if key in self.reading:
                self.reading.discard(key)
                sock = self.ports[key].release_listener()
                if sock is not None:
                    taken[key] = sock
        return taken

    def listening(self) -> dict[ListenKey, socket.socket]:
        return {key: self.ports[key].listener for key in self.reading if self.ports[key].listener is not None}

    def parts(self) -> list[UdpPort]:
        """The ports it reads: an upgrade in place carries their sessions (those of
        a port a reload handed on are not carried, as a draining rule's are not)."""
        return [self.ports[key] for key in self.reading]

    def release_listener(self) -> socket.socket | None:
        return None  # several sockets: the supervisor takes them with take_listeners

    def close(self) -> None:
        """Close the sockets still read, ending their sessions (as a removed udp rule's);
        those handed on keep their sessions until they end or the drain does."""
        for key in self.reading:
            self.ports[key].close()
        self.reading.clear()

    def stop_accepting(self) -> None:
        self.take_listeners(list(self.reading))

    @property
    def active(self) -> int:
        return sum(len(part.sessions) for part in self.ports.values())

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for part in self.ports.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not part.join(left):
                return False
        return True

    def kill(self) -> None:
        """End every session of every port now (the drain is over)."""
        for part in self.ports.values():
            part.kill()
        self.reading.clear()
        self._retire()

    def kernel_drops(self) -> int:
        return sum(part.kernel_drops() for part in self.ports.values())

    def _retire(self) -> None:
        if self._watched:
            self._watched = False
            retire_kernel_drops(self.stats, self.kernel_drops)
