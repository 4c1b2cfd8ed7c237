"""UDP rules: a session per client address, expiring on silence in both directions.

One gevent ``DatagramServer`` per rule reads the listening socket. Its handler runs
inside the hub's read callback (``spawn=None``): no greenlet per datagram, so the
handler must never block and uses only non-blocking calls on raw sockets.

Each client address gets a *session*: its own upstream socket, connected to the
target so that the kernel drops datagrams from anyone else, and one greenlet that
waits for replies and sends them to that client through the listening socket. A
session ends after ``sessionTimeout`` seconds without a datagram in either direction
(a one-way stream keeps it alive), when the rule is removed or stopped, or on an
error of its own. The table is capped by ``maxSessions``: a datagram from a new
address beyond the cap is dropped and counted, so a flood of source ports costs
nothing but the counting.

An ICMP port unreachable from a dead target surfaces as ECONNREFUSED on the
connected socket; it is counted as a dropped datagram and the session goes on, so
replies flow again as soon as the target is back.
"""

from __future__ import annotations

import _socket  # the C socket type: never cooperative, safe to call from the hub
import errno
import logging
import socket
import time

import gevent
import gevent.socket
from gevent.event import Event
from gevent.server import DatagramServer

from gportmap.config import Rule
from gportmap.log import get_logger, log_event
from gportmap.net import bind_listener, peer_text
from gportmap.plugins import DOWNSTREAM, UPSTREAM, ConnView, HookError, PluginChain, Reject, log_hook_error
from gportmap.protocols import ServerContext
from gportmap.security import Admission

logger = get_logger("udp")

#: Largest datagram read: 65535 covers IPv4's 65507-byte and IPv6's 65527-byte payloads.
MAX_DATAGRAM = 65535
#: Replies forwarded per wake-up before the session greenlet yields to the others.
REPLY_BURST = 64
#: Seconds a resolved target host name is reused for new sessions.
RESOLVE_TTL = 30.0
#: Errors an ICMP message reports on a connected UDP socket: one datagram was lost,
#: the session and its socket stay usable.
TRANSIENT_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EMSGSIZE}
)


class _Silence(Exception):
    """A reply wait ran out; the session re-checks its clock (refreshed by both directions)."""


_SILENCE = _Silence()


class _Reader(DatagramServer):
    """gevent's DatagramServer reading whole datagrams (its own ``do_read`` reads 8192
    bytes and silently truncates anything larger)."""

    def do_read(self) -> tuple[bytes, tuple] | None:
        try:
            return self._socket.recvfrom(MAX_DATAGRAM)
        except BlockingIOError:
            return None


class Session:
    """One client address: its connected upstream socket and what it has moved."""

    __slots__ = (
        "address",
        "client",
        "upstream",
        "greenlet",
        "started",
        "last_active",
        "packets_received",
        "packets_sent",
        "bytes_received",
        "bytes_sent",
        "reason",
        "error",
        "closed",
        "view",
    )

    def __init__(self, address: tuple, client: str, upstream: _socket.socket) -> None:
        self.address = address
        self.client = client
        self.upstream = upstream
        self.greenlet: gevent.Greenlet | None = None
        self.started = self.last_active = time.monotonic()
        self.packets_received = self.packets_sent = 0
        self.bytes_received = self.bytes_sent = 0
        self.reason = "stopped"  # what a kill leaves; the greenlet sets the others
        self.error: str | None = None
        self.closed = False
        self.view: ConnView | None = None  # what plugins see of it (None: no plugins)


class UdpServer:
    """Serves one udp rule; the supervisor's surface is the same as TcpServer's."""

    def __init__(self, rule: Rule, context: ServerContext) -> None:
        self.rule = rule
        self.context = context
        self.stats = context.stats.rule(rule.name, rule.protocol)
        self.sessions: dict[tuple, Session] = {}
        self.admission = Admission(rule.allow, rule.deny)
        self.plugins = PluginChain(rule.plugins)
        self.listener: socket.socket | None = None  # owned: closed by close()
        self._replies: _socket.socket | None = None  # where replies go; kept after a handover
        self._server: _Reader | None = None
        self._idle = Event()
        self._idle.set()
        self._target: tuple[int, tuple] | None = _numeric_address(rule.target_host, rule.target_port)
        self._numeric = self._target is not None
        self._resolved_at = 0.0
        self._resolver: gevent.Greenlet | None = None

    # -- the supervisor's surface -------------------------------------------------

    def start(self, listener: socket.socket | None = None) -> None:
        """Start reading, on ``listener`` if handed over, else on a new socket."""
        self.listener = listener or bind_listener(
            self.rule.listen_host, self.rule.listen_port, socket.SOCK_DGRAM
        )
        self._replies = getattr(self.listener, "_sock", self.listener)
        self._server = _Reader(self.listener, self._handle, spawn=None)
        self._server.start()
        if not self._numeric:
            self._target_address()  # resolve before the first client arrives

    def release_listener(self) -> socket.socket | None:
        """Stop reading and hand the socket to a successor, still open (datagrams queue
        in the kernel meanwhile). Open sessions keep sending their late replies
        through it until they expire or the drain ends."""
        if self._server is not None:
            self._server.stop_accepting()
        listener, self.listener = self.listener, None
        return listener

    def close(self) -> None:
        """Stop reading, end every session and close the listening socket (if still ours)."""
        if self._server is not None:
            self._server.stop_accepting()
        self._kill_all(block=False)  # the sessions close their sockets as they end
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self._replies = None

    @property
    def active(self) -> int:
        return len(self.sessions)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every session has ended; True if they all did in time."""
        return self._idle.wait(timeout)

    def kill(self) -> None:
        """End every session now, releasing every socket this server owns."""
        self._kill_all(block=True)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self._replies = None

    def _kill_all(self, block: bool) -> None:
        greenlets = [s.greenlet for s in self.sessions.values() if s.greenlet is not None]
        if self._resolver is not None:
            greenlets.append(self._resolver)
        gevent.killall(greenlets, block=block, timeout=5 if block else None)

    # -- client to target (runs in the hub: nothing here may block) ----------------

    def _handle(self, data: bytes, address: tuple) -> None:
        stats, size = self.stats, len(data)
        stats.udp_packets_received += 1
        stats.bytes_received += size
        session = self.sessions.get(address)
        if session is None:
            session = self._open(address)
            if session is None:
                return
        session.last_active = time.monotonic()
        session.packets_received += 1
        session.bytes_received += size
        if session.view is not None and self.plugins.transforms:
            data = self._through_plugins(session, UPSTREAM, data)
            if not data:
                return
        try:
            session.upstream.send(data)
        except OSError as exc:  # a reported ICMP error, a full send buffer, EMSGSIZE
            self._drop("error", session.client, f"cannot send to the target: {_error_text(exc)}")

    def _admit(self, address: tuple) -> bool:
        """The one place a new client address is let in or turned away; ACL and plugin
        checks belong here too. Turning away costs no memory: nothing is stored."""
        if not self.admission.admits(address):
            self._drop("acl", peer_text(address), "client address not admitted (allow/deny)")
            return False
        if len(self.sessions) >= self.rule.max_sessions:
            self._drop(
                "sessions", peer_text(address), f"session table full ({self.rule.max_sessions} sessions)"
            )
            return False
        return True

    def _through_plugins(self, session: Session, direction: str, data: bytes) -> bytes:
        """A datagram through the on_data chain; b"" when it is not to be sent (a
        plugin dropped it, counted as ``plugin``, or failed: the session then ends)."""
        assert session.view is not None
        try:
            data = self.plugins.data(session.view, direction, data)
        except (HookError, Reject) as exc:
            if isinstance(exc, HookError):
                log_hook_error(exc, self.rule.name, session.client)
            session.reason, session.error = "plugin_error", str(exc)
            if session.greenlet is not None:
                session.greenlet.kill(block=False)
            return b""
        if not data:
            self.stats.udp_dropped["plugin"] += 1
        return data

    def _plugins_accept(self, address: tuple) -> ConnView | None | bool:
        """A view for a new session's plugins; False when a plugin refuses it."""
        if not self.plugins.active:
            return None
        rule, client = self.rule, peer_text(address)
        view = ConnView(self.context.stats.next_id(), rule.name, "udp", client, rule.target, time.time())
        try:
            self.plugins.accept(view)
        except Reject as exc:
            self._drop("plugin", client, f"refused by a plugin: {exc}" if str(exc) else "refused by a plugin")
            return False
        except HookError as exc:
            log_hook_error(exc, rule.name, client)
            self._drop("plugin", client, str(exc))
            return False
        return view

    def _open(self, address: tuple) -> Session | None:
        """A new session for ``address``, or None (dropped and counted)."""
        if not self._admit(address):
            return None
        view = self._plugins_accept(address)
        if view is False:
            return None
        client = peer_text(address)
        target = self._target_address()
        if target is None:
            self._drop("error", client, "the target's address is not resolved (yet)")
            return None
        family, sockaddr = target
        try:
            upstream = _socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS
            self._drop("error", client, f"cannot open a socket: {_error_text(exc)}")
            return None
        try:
            upstream.setblocking(False)
            upstream.connect(sockaddr)  # UDP: no packet is sent, only the peer is fixed
        except OSError as exc:
            upstream.close()
            self._drop("error", client, f"cannot reach the target: {_error_text(exc)}")
            return None
        session = Session(address, client, upstream)
        session.view = view or None
        self.sessions[address] = session
        stats = self.stats
        stats.udp_sessions += 1
        stats.active += 1  # a udp rule's connections are its sessions
        stats.total += 1
        self._idle.clear()
        session.greenlet = gevent.spawn(self._serve, session)
        # A greenlet killed before it first ran never runs its ``finally``: this does.
        session.greenlet.rawlink(lambda _greenlet: self._finish(session))
        return session

    # -- target to client: one greenlet per session -------------------------------

    def _serve(self, session: Session) -> None:
        watcher = gevent.get_hub().loop.io(session.upstream.fileno(), 1)
        try:
            session.reason = self._pump_replies(session, watcher)
        except OSError as exc:
            session.reason, session.error = "error", _error_text(exc)
        finally:
            watcher.close()
            self._finish(session)

    def _pump_replies(self, session: Session, watcher) -> str:
        """Forward replies until the session has been silent both ways for sessionTimeout."""
        timeout, upstream = self.rule.session_timeout, session.upstream
        while True:
            remaining = session.last_active + timeout - time.monotonic()
            if remaining <= 0:
                return "expired"
            try:
                gevent.socket.wait(watcher, remaining, _SILENCE)
            except _Silence:
                continue  # a client datagram may have moved the clock meanwhile
            for _ in range(REPLY_BURST):
                try:
                    data = upstream.recv(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno not in TRANSIENT_ERRORS:
                        raise
                    self._drop("error", session.client, f"the target reported: {_error_text(exc)}")
                    continue
                self._reply(session, data)

    def _reply(self, session: Session, data: bytes) -> None:
        session.last_active = time.monotonic()
        if session.view is not None and self.plugins.transforms:
            data = self._through_plugins(session, DOWNSTREAM, data)
            if not data:
                return
        replies = self._replies
        if replies is None:
            return  # closed: this session is being ended
        try:
            replies.sendto(data, session.address)
        except OSError as exc:  # a full send buffer; EBADF once a successor closed the socket
            self._drop("error", session.client, f"cannot send to the client: {_error_text(exc)}")
            return
        size = len(data)
        session.packets_sent += 1
        session.bytes_sent += size
        self.stats.udp_packets_sent += 1
        self.stats.bytes_sent += size

    def _finish(self, session: Session) -> None:
        """End a session exactly once: close its socket, leave the table, log it."""
        if session.closed:
            return
        session.closed = True
        session.upstream.close()
        if self.sessions.get(session.address) is session:
            del self.sessions[session.address]
        stats = self.stats
        stats.udp_sessions -= 1
        stats.active -= 1
        if not self.sessions:
            self._idle.set()
        if session.view is not None:
            summary = {
                "bytes_received": session.bytes_received,
                "bytes_sent": session.bytes_sent,
                "packets_received": session.packets_received,
                "packets_sent": session.packets_sent,
                "duration": round(time.monotonic() - session.started, 3),
                "reason": session.reason,
            }
            for failure in self.plugins.close(session.view, summary):
                log_hook_error(failure, self.rule.name, session.client)
        fields = {"error": session.error} if session.error else {}
        log_event(
            logger,
            logging.WARNING if session.reason == "error" else logging.INFO,
            "session_closed",
            f"session closed ({session.reason})",
            rule=self.rule.name,
            client=session.client,
            target=self.rule.target,
            packets_received=session.packets_received,
            packets_sent=session.packets_sent,
            bytes_received=session.bytes_received,
            bytes_sent=session.bytes_sent,
            duration=round(time.monotonic() - session.started, 3),
            reason=session.reason,
            **fields,
        )

    # -- drops and the target's address ---------------------------------------------

    def _drop(self, reason: str, client: str, why: str) -> None:
        """Count a dropped datagram, every time; log it at a bounded rate."""
        self.stats.udp_dropped[reason] += 1
        allowed, suppressed = self.context.rejections.allow((self.rule.name, "udp", reason))
        if allowed:
            extra = {"suppressed": suppressed} if suppressed else {}
            log_event(
                logger,
                logging.WARNING,
                "datagram_dropped",
                f"dropped: {why}",
                rule=self.rule.name,
                client=client,
                target=self.rule.target,
                reason=reason,
                **extra,
            )

    def _target_address(self) -> tuple[int, tuple] | None:
        """(family, sockaddr) for new sessions. A host name is resolved in the
        background (the hub cannot wait for DNS) and re-resolved after RESOLVE_TTL;
        existing sessions keep the address they were connected to."""
        if self._numeric:
            return self._target
        stale = self._target is None or time.monotonic() - self._resolved_at > RESOLVE_TTL
        if stale and self._resolver is None:
            self._resolver = gevent.spawn(self._resolve)
        return self._target

    def _resolve(self) -> None:
        rule = self.rule
        try:
            infos = gevent.socket.getaddrinfo(rule.target_host, rule.target_port, 0, socket.SOCK_DGRAM)
        except OSError as exc:  # socket.gaierror included
            # Tried again by the next new client (at once while never resolved).
            self._resolved_at = time.monotonic()
            allowed, suppressed = self.context.rejections.allow((rule.name, "udp", "resolve"))
            if allowed:
                extra = {"suppressed": suppressed} if suppressed else {}
                log_event(
                    logger,
                    logging.WARNING,
                    "target_unresolved",
                    f"cannot resolve target {rule.target_host}: {_error_text(exc)}",
                    rule=rule.name,
                    target=rule.target,
                    **extra,
                )
        else:
            family, _, _, _, sockaddr = infos[0]
            self._target, self._resolved_at = (family, sockaddr), time.monotonic()
        finally:
            self._resolver = None


def _numeric_address(host: str, port: int) -> tuple[int, tuple] | None:
    """(family, sockaddr) of an IP literal without any lookup; None for a host name."""
    try:
        infos = _socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _error_text(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (port unreachable)"
    return exc.strerror or str(exc)
