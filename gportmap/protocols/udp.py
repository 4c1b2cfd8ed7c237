"""UDP rules: a session per client address, expiring on silence in both directions.

Everything here runs in the hub, driven by io watchers: no greenlet per datagram
and none per session, so nothing may block and only non-blocking calls on raw
sockets are made.

- The listening socket has one io watcher. Under load each readiness drains up to
  ``LISTEN_BURST`` datagrams (recvfrom until EAGAIN, bounded so that one busy client
  cannot keep the loop from the replies and the other rules); per datagram the work
  is the session lookup, a few integer adds and the send.
- Each client address gets a *session*: its own upstream socket, connected to the
  target so that the kernel drops datagrams from anyone else, with its own io
  watcher that forwards its replies to the client through the listening socket:
  one per readiness, or up to ``REPLY_BURST`` when its socket has a backlog (a
  client with many requests in flight). A session costs a few hundred bytes (a
  slotted object, a socket object, a watcher), not a greenlet's stack.
- A datagram of an established session on a *plain* rule (no faults, no plugin
  that transforms data, no ``perClient`` rate) takes a short path inline in the
  watcher's callback; everything else (a new client, a session not yet
  established, a rule with any of those) takes the general one. Whether a rule is
  plain is known when its server starts and when its faults change (the fault
  board tells the server, ``FaultBoard.watch``), never looked up per datagram.
- A session ends after ``sessionTimeout`` seconds without a datagram in either
  direction (a one-way stream keeps it alive), when the rule is removed or stopped,
  or on an error of its own. One timer per rule sweeps the table: it fires at the
  earliest deadline (never before it) and at most every ``sweep_granularity``
  seconds, so a session lives at least ``sessionTimeout`` and at most that plus the
  granularity; datagrams themselves only stamp the session with the time read once
  per readiness.
- Silence is traffic missed, not time passed: a process stalled for longer than
  ``sessionTimeout`` (a SIGSTOP, a long reload, swapping) finds every deadline
  gone, while datagrams wait in its sockets. So before it expires a session, the
  sweep asks the kernel (``engine.idle.waiting``): a session whose own socket
  holds replies was not silent, its clock starts again; and datagrams waiting on
  the listening socket, which is shared, are read first (at most
  ``sweep_drain`` of them, through the ordinary path), so that a client whose
  datagram was queued there has its session stamped before any is expired.
- The table is capped by ``maxSessions``: a datagram from a new address beyond the
  cap is dropped and counted, so a flood of source ports costs nothing but the
  counting.
- The rule's targets are a pool (``gportmap.engine.pool``, SPEC §8): a new
  session takes a target by ``balance`` (``source`` hashes the client's address)
  and keeps it for its life; sessions never move. New sessions avoid targets that
  are down (by active checks or passive health); with none up, the datagram is
  dropped (``error``) and counted as the rule's connect failure. UDP has no
  connect, so a session's outcome comes later: a reply, or a second datagram sent
  without an ICMP error, shows the target alive (the pool counts the session,
  ``connected``); an ICMP port unreachable first is a failed attempt against the
  target (passive health: ``maxFails`` of them take it out). An ICMP error on a
  session already established counts one failure against its target until the
  target answers again (not one per datagram). A session ending undecided (one
  datagram, no answer) is counted neither way.
- A send that would block (a full socket buffer) drops that datagram and counts it
  as ``error``: nothing is buffered and the hub never waits.
- An ICMP port unreachable from a dead target surfaces as ECONNREFUSED on the
  connected socket (Windows: WSAECONNRESET, a "reset"); it is counted as a dropped
  datagram and the session goes on, so replies flow again as soon as the target is
  back. Windows also reports the ICMP error of a reply to a client that has gone
  on the next read of the *listening* socket: nothing was read, the listener goes
  on reading (logged at DEBUG only).
- An unexpected exception while forwarding (a bug) ends only the session it
  concerns, with the close reason ``internal_error``: counted, and logged once
  with its traceback (``gportmap.failures``). It never reaches the hub, which would
  stop the watcher of the listening socket for good.
- What the kernel drops on a full receive buffer (listener or session socket) is
  read from the sockets (``SO_MEMINFO``, Linux) only when the figures are read, and
  counted as ``kernel``; a socket's count is folded into the rule's total before it
  closes, so the figure never goes down.
"""

from __future__ import annotations

import _socket  # the C socket type: never cooperative, safe to call from the hub
import errno
import functools
import logging
import socket
import struct
import sys
import time
from collections.abc import Iterable
from enum import Enum

import gevent
import gevent.socket
from gevent.event import Event

from gportmap.config import Rule
from gportmap.config.model import Balance
from gportmap.engine.clientlimit import ClientTable, limits_for
from gportmap.engine.faults import DelayLine, FaultSession
from gportmap.engine.idle import waiting
from gportmap.engine.net import bind_listener, peer_text
from gportmap.engine.pool import TargetPool, TargetState, client_key
from gportmap.engine.udptunnel import TunnelEntry
from gportmap.events import DatagramDropped, ListenerError, SessionClosed, TargetUnresolved, UdpIcmpError
from gportmap.failures import report_internal_error
from gportmap.log import emit, get_logger
from gportmap.plugins import DOWNSTREAM, UPSTREAM, ConnView, HookError, PluginChain, Reject, log_hook_error
from gportmap.protocols import ServerContext
from gportmap.reasons import CloseReason, DropReason
from gportmap.security import Admission, client_context
from gportmap.stats import retire_kernel_drops, watch_kernel_drops

logger = get_logger("udp")

#: Largest datagram read: 65535 covers IPv4's 65507-byte and IPv6's 65527-byte payloads.
MAX_DATAGRAM = 65535
#: Datagrams read from the listening socket per readiness before the loop serves others.
LISTEN_BURST = 64
#: Replies read from one session's socket per readiness at most, when it has a
#: backlog (it was readable on the previous loop iteration too: a client with many
#: requests in flight, like dnsperf's); otherwise one. A request/reply session
#: almost always holds a single reply, so reading on until EAGAIN would cost a
#: wasted recv per reply (measured: 8.0 -> 5.7 us of CPU per round trip with 50
#: clients); a backlog read one reply per loop iteration would cost a wake-up each.
REPLY_BURST = 16

#: What one readiness reads at most: one datagram when the traffic is sparse,
#: ``LISTEN_BURST`` (listening socket) or ``REPLY_BURST`` (a session's) on a backlog.
#: Tuples to iterate over, so a wake-up makes no range object.
_SPARSE_READS = (None,)
_BACKLOG_READS = (None,) * LISTEN_BURST
_REPLY_BACKLOG_READS = (None,) * REPLY_BURST
#: Errors an ICMP message reports on the next read of a UDP socket: one datagram was
#: lost, the socket stays usable. Linux says ECONNREFUSED for a port unreachable (and
#: only on a connected socket); Windows says WSAECONNRESET (Python's
#: ``errno.ECONNRESET`` there), on connected and listening sockets alike.
TRANSIENT_ERRORS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        getattr(errno, "WSAECONNRESET", errno.ECONNRESET),
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EMSGSIZE,
    }
)
#: Linux ``SO_MEMINFO`` (since 4.6): nine u32 counters of a socket; the ninth,
#: SK_MEMINFO_DROPS, is what ``/proc/net/udp`` shows as ``drops``.
_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55) if sys.platform.startswith("linux") else None
_MEMINFO_SIZE = 9 * 4
_MEMINFO_DROPS_OFFSET = 8 * 4
#: libev's read event.
_READ = 1


def kernel_drops(sock: _socket.socket | socket.socket) -> int:
    """Datagrams the kernel dropped for ``sock`` (full receive buffer, and the like),
    since it was created; 0 where the OS does not say (non-Linux, closed socket)."""
    if _SO_MEMINFO is None:
        return 0
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO_SIZE)
    except OSError:
        return 0
    if len(raw) < _MEMINFO_SIZE:
        return 0
    return struct.unpack_from("I", raw, _MEMINFO_DROPS_OFFSET)[0]


def sweep_granularity(session_timeout: float) -> float:
    """How late past its deadline a silent session may end: a twentieth of the
    timeout, between 10 ms and 250 ms. It bounds the sweeps a rule makes to a few
    per second however many sessions expire at different times."""
    return min(max(session_timeout / 20, 0.01), 0.25)


class Hold(Enum):
    """What a session's target knows of it (the pool's bookkeeping, see the module
    docstring): UDP has no connect, so the outcome comes with the traffic."""

    PENDING = "pending"  #: acquired; neither a reply nor an ICMP error yet
    ESTABLISHED = "established"  #: the target answered (or took two datagrams): counted, held
    GIVEN_BACK = "given_back"  #: the first word was an ICMP error: a failed attempt, no longer held


# Looked up once: an enum member read through its class costs ~0.2 us in Python 3.11,
# and the hub callbacks compare a session's hold per datagram.
_PENDING = Hold.PENDING
_ESTABLISHED = Hold.ESTABLISHED
_monotonic = time.monotonic


class Session:
    """One client address: its connected upstream socket, its watcher, what it moved."""

    __slots__ = (
        "address",
        "upstream",
        "target",
        "hold",
        "refused",
        "watcher",
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
        "faults",
        "read_iteration",
    )

    def __init__(self, address: tuple, upstream: _socket.socket, now: float, target: TargetState) -> None:
        self.address = address
        self.upstream = upstream
        #: The pool's target this session was given; it keeps it for its life.
        self.target = target
        self.hold = Hold.PENDING
        #: An ICMP error was counted against the target since its last reply.
        self.refused = False
        self.watcher = None  # the io watcher on ``upstream``, set once started
        self.started = self.last_active = now
        self.packets_received = self.packets_sent = 0
        self.bytes_received = self.bytes_sent = 0
        self.reason: str = CloseReason.STOPPED
        self.error: str | None = None
        self.closed = False
        self.view: ConnView | None = None  # what plugins see of it (None: no plugins)
        self.faults: FaultSession | None = None  # its network faults, once the rule has any (SPEC §12)
        self.read_iteration = -2  # the loop iteration its socket was last read in (a backlog's sign)

    @property
    def client(self) -> str:
        """The client's address as text, made only when a log line or plugin needs it."""
        return peer_text(self.address)


class UdpServer:
    """Serves one udp rule; the supervisor's surface is the same as TcpServer's."""

    #: Datagrams a sweep reads at most from the listening socket before it expires
    #: sessions, when the socket holds a backlog (after a stall of the process): the
    #: datagrams of a client waiting there stamp its session first. A bound, so that
    #: a flood cannot keep a sweep in the hub; past it, what is still queued counts
    #: for nothing and the silent sessions expire.
    sweep_drain = 1024

    def __init__(self, rule: Rule, context: ServerContext) -> None:
        self.rule = rule
        self.context = context
        self.stats = context.stats.rule(rule.name, rule.protocol)
        self.sessions: dict[tuple, Session] = {}
        self.admission = Admission(rule.allow, rule.deny)
        self.plugins = PluginChain(rule.plugins)
        self.listener: socket.socket | None = None  # owned: closed by close()
        self._replies: _socket.socket | None = None  # where replies go; kept after a handover
        self._loop = gevent.get_hub().loop
        self._reader = None  # the io watcher on the listening socket while reading
        self._sweeper = None  # the timer that ends silent sessions
        self._granularity = sweep_granularity(rule.session_timeout)
        self._idle = Event()
        self._idle.set()
        #: The rule's targets, kept with its counters across its servers (SPEC §8).
        self.target_pool = TargetPool.for_rule(rule, self.stats)
        self._source = rule.balance is Balance.SOURCE
        self._resolver: gevent.Greenlet | None = None
        # Kernel drops: the listener's count when this server took it, and the
        # counts of this server's sockets that are closed or handed over.
        self._listener_base = 0
        self._listener_counted = False
        self._last_read_iteration = -2  # the loop iteration of the last listener read
        self._kernel_done = 0
        self._retired = False
        #: ``perClient.packetRate`` (SPEC §13): a token bucket per client address in
        #: a bounded table (``gportmap.engine.clientlimit``), or None.
        limits = limits_for(rule.per_client, udp=True)
        self.clients = ClientTable(limits) if limits is not None else None
        #: ``targetProtocol: "websocket"`` (SPEC §13): each session's tunnel to the
        #: exit, by client address (``gportmap.engine.udptunnel``); None: plain UDP.
        self.tunnels: dict[tuple, TunnelEntry] | None = {} if rule.target_protocol == "websocket" else None
        tls = rule.target_tls
        self._tunnel_tls = client_context(tls.ca_file, tls.verify) if tls is not None and self.tunnels is not None else None
        #: Datagrams held back by latency or bandwidth faults (SPEC §12), bounded.
        self._delays = DelayLine(self._loop)
        #: The rule has faults now (``faults_changed``: set at start and by the board).
        self._faulty = False
        #: Datagrams go through as they are (no faults, no transforming plugin, no
        #: perClient rate): an established session's take the short path.
        self._plain = False

    # -- the supervisor's surface -------------------------------------------------

    def start(self, listener: socket.socket | None = None) -> None:
        """Start reading, on ``listener`` if handed over, else on a new socket."""
        self.listener = listener or bind_listener(
            self.rule.listen_host, self.rule.listen_port, socket.SOCK_DGRAM
        )
        raw = getattr(self.listener, "_sock", self.listener)
        raw.setblocking(False)
        self._replies = raw
        self._listener_base, self._listener_counted = kernel_drops(raw), True
        watch_kernel_drops(self.stats, self.kernel_drops)
        board = self.context.faults
        board.watch(self.rule.name, self)
        self.faults_changed(board.faults(self.rule.name, self.rule.faults))
        carried = self.context.stats.take_carried(self.rule.name)
        if carried is not None:
            carried(self)  # an upgrade in place's sessions, before any datagram is read
        self._reader = self._loop.io(raw.fileno(), _READ)
        self._reader.start(self._on_datagrams, raw)
        if not self.target_pool.literal:
            self._resolve_later()  # resolve before the first client arrives

    def release_listener(self) -> socket.socket | None:
        """Stop reading and hand the socket to a successor, still open (datagrams queue
        in the kernel meanwhile). Open sessions keep sending their late replies
        through it until they expire or the drain ends."""
        self._stop_reading()
        self._fold_listener()
        listener, self.listener = self.listener, None
        return listener

    def close(self) -> None:
        """Stop reading, end every session and close the listening socket (if still ours)."""
        self._stop_reading()
        self._shut_down()

    @property
    def active(self) -> int:
        return len(self.sessions)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every session has ended; True if they all did in time."""
        return self._idle.wait(timeout)

    def kill(self) -> None:
        """End every session now, releasing every socket this server owns."""
        self._stop_reading()
        self._shut_down()

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on this server's sockets while it had them
        (a source for ``stats.watch_kernel_drops``, read when the figures are read)."""
        total = self._kernel_done + self._listener_drops()
        for session in self.sessions.values():
            total += kernel_drops(session.upstream)
        return total

    def _stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader.close()
            self._reader = None

    def _listener_drops(self) -> int:
        """The listener's kernel drops since this server took it (0 once folded in)."""
        if not self._listener_counted or self._replies is None:
            return 0
        return max(0, kernel_drops(self._replies) - self._listener_base)

    def _fold_listener(self) -> None:
        """Move the listener's kernel drops into this server's total before the
        listener closes or goes to a successor (which counts from there on)."""
        self._kernel_done += self._listener_drops()
        self._listener_counted = False

    def _shut_down(self) -> None:
        self.context.faults.unwatch(self.rule.name, self)
        self._delays.close()
        self._end_sessions(list(self.sessions.values()), CloseReason.STOPPED)
        self._stop_sweeping()
        if self._resolver is not None:
            self._resolver.kill(block=False)
        self._fold_listener()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self._replies = None
        if not self._retired:
            self._retired = True
            retire_kernel_drops(self.stats, self.kernel_drops)

    # -- client to target (a hub callback: nothing here may block) ----------------

    def _on_datagrams(self, raw: _socket.socket) -> None:
        """Forward what the listening socket holds, up to LISTEN_BURST datagrams.

        A socket that was readable on the previous loop iteration too has a backlog:
        it is drained (until EAGAIN, at most LISTEN_BURST). Otherwise traffic is
        sparse, one datagram is the rule, and the recv that would only report EAGAIN
        is saved; if more were waiting, the socket is still readable and this runs
        again on the very next iteration, draining.

        An established session's datagram on a plain rule is forwarded inline (the
        short path: three integer stores and the send); any other goes through
        ``_upload``."""
        iteration = self._loop.iteration
        reads = _BACKLOG_READS if iteration - self._last_read_iteration <= 1 else _SPARSE_READS
        self._last_read_iteration = iteration
        sessions, now, plain = self.sessions, _monotonic(), self._plain
        received = received_bytes = 0
        try:
            for _ in reads:
                try:
                    data, address = raw.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in TRANSIENT_ERRORS:
                        self._icmp_on_listener(exc)  # nothing was read: read on
                        continue
                    self._listener_failed(exc)
                    break
                size = len(data)
                received += 1
                received_bytes += size
                session = sessions.get(address)
                if plain and session is not None and session.hold is _ESTABLISHED:
                    try:
                        session.last_active = now
                        session.packets_received += 1
                        session.bytes_received += size
                        session.upstream.send(data)
                    except OSError as exc:  # a reported ICMP error, a full send buffer, EMSGSIZE
                        self._send_failed(session, exc)
                    except Exception as exc:  # noqa: BLE001 - a bug: only this client's session ends
                        self._internal_error(address, exc, session)
                else:
                    self._upload(address, session, data, size, now)
        finally:
            stats = self.stats
            stats.udp_packets_received += received
            stats.bytes_received += received_bytes

    def _upload(self, address: tuple, session: Session | None, data: bytes, size: int, now: float) -> None:
        """One datagram from ``address`` to its session's target, the general path: a
        new client (admitted, or dropped and counted), perClient's rate, the plugins,
        the faults, and the pool's word on a session not yet established."""
        try:
            if session is None:
                session = self._open(address, now)  # perClient's first token: _admit
                if session is None:
                    return
            elif self.clients is not None and not self.clients.allows(address, now):
                self._drop(DropReason.CLIENT_LIMIT, peer_text(address), "over perClient.packetRate")
                return
            session.last_active = now
            session.packets_received += 1
            session.bytes_received += size
            if session.view is not None and self.plugins.transforms:
                data = self._through_plugins(session, UPSTREAM, data)
                if not data:
                    return
            if self._faulty and not self._faulted(session, True, data):
                return  # lost, or held back by a fault
            try:
                session.upstream.send(data)
            except OSError as exc:  # a reported ICMP error, a full send buffer, EMSGSIZE
                self._send_failed(session, exc)
            else:
                if session.hold is _PENDING and session.packets_received > 1 and self.tunnels is None:
                    self._established(session)  # the first went without an ICMP error
        except Exception as exc:  # noqa: BLE001 - a bug: only this client's session ends
            self._internal_error(address, exc, self.sessions.get(address))

    def _send_failed(self, session: Session, exc: OSError) -> None:
        """A datagram the target's socket would not take: dropped and counted; an
        ICMP port unreachable counts against the target."""
        if exc.errno == errno.ECONNREFUSED:
            self._refused(session, exc)
        self._drop(DropReason.ERROR, session.client, f"cannot send to the target: {_error_text(exc)}")

    def faults_changed(self, faults: tuple) -> None:
        """The rule's faults from now on (at start, and from the fault board when they
        change): they apply to the next datagram of every session."""
        self._faulty = bool(faults)
        self._plain = not self._faulty and self.clients is None and not self.plugins.transforms

    def _icmp_on_listener(self, exc: OSError) -> None:
        """An ICMP error reported on the listening socket (Windows, after a reply to
        a client that is gone): that client's problem, not the listener's. DEBUG only:
        a client that leaves is no event, and the reply was counted as sent."""
        if not logger.isEnabledFor(logging.DEBUG):
            return
        allowed, suppressed = self.context.rejections.allow((self.rule.name, "udp", "icmp"))
        if allowed:
            event = UdpIcmpError(
                rule=self.rule.name, listen=self.rule.listen, suppressed=suppressed, error=_error_text(exc)
            )
            emit(logger, event)

    def _internal_error(self, address: tuple, exc: Exception, session: Session | None) -> None:
        """An unexpected exception while serving ``address``: counted and logged with
        its traceback, and that client's ``session`` (if it has one) ends. The
        datagram is lost; the listener and the other sessions go on."""
        text = report_internal_error(self.stats, peer_text(address), self.rule.target, exc)
        if session is not None:
            session.error = text
            self._end_sessions([session], CloseReason.INTERNAL_ERROR)

    def _listener_failed(self, exc: OSError) -> None:
        """A read error on the listening socket other than a queued ICMP report: ENOMEM
        and the like are tried again on the next readiness; a socket that is gone
        (EBADF, ENOTSOCK) is no longer watched, so the hub never spins on it."""
        fatal = exc.errno in (errno.EBADF, errno.ENOTSOCK, errno.EINVAL)
        if fatal:
            self._stop_reading()
        allowed, suppressed = self.context.rejections.allow((self.rule.name, "udp", "listener"))
        if allowed or fatal:
            event = ListenerError(
                rule=self.rule.name,
                listen=self.rule.listen,
                suppressed=suppressed,
                error=_error_text(exc),
                fatal=fatal,
            )
            emit(logger, event)

    def _admit(self, address: tuple) -> bool:
        """The one place a new client address is let in or turned away; ACL and plugin
        checks belong here too. Turning away costs no memory: nothing is stored."""
        if not self.admission.admits(address):
            self._drop(DropReason.ACL, peer_text(address), "client address not admitted (allow/deny)")
            return False
        if self.clients is not None and not self.clients.allows(address, time.monotonic()):  # after allow/deny
            self._drop(DropReason.CLIENT_LIMIT, peer_text(address), "over perClient.packetRate")
            return False
        if len(self.sessions) >= self.context.stats.share(self.rule.max_sessions):  # a worker's share
            self._drop(
                DropReason.SESSIONS, peer_text(address), f"session table full ({self.context.stats.share(self.rule.max_sessions)} sessions)"
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
            session.error = str(exc)
            self._end_sessions([session], CloseReason.PLUGIN_ERROR)
            return b""
        if not data:
            self.stats.udp_dropped[DropReason.PLUGIN] += 1
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
            self._drop(DropReason.PLUGIN, client, f"refused by a plugin: {exc}" if str(exc) else "refused by a plugin")
            return False
        except HookError as exc:
            log_hook_error(exc, rule.name, client)
            self._drop(DropReason.PLUGIN, client, str(exc))
            return False
        return view

    def _open(self, address: tuple, now: float) -> Session | None:
        """A new session for ``address``, or None (dropped and counted)."""
        if not self._admit(address):
            return None
        view = self._plugins_accept(address)
        if view is False:
            return None
        pool = self.target_pool
        target = pool.acquire(client_key(address) if self._source else None)
        if target is None:
            pool.unavailable()
            self._drop(DropReason.ERROR, peer_text(address), pool.no_target_error())
            return None
        sockaddr = self._target_address(target)
        if sockaddr is None:
            target.cancelled()
            self._drop(DropReason.ERROR, peer_text(address), f"the address of target {target.name} is not resolved (yet)")
            return None
        family, sockaddr = sockaddr
        if self.tunnels is not None:  # SPEC §13: the session rides a WebSocket to the exit
            try:
                upstream = self._tunnel(address, target, family, sockaddr)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: no socket pair
                target.cancelled()
                self._drop(DropReason.ERROR, peer_text(address), f"cannot open a socket: {_error_text(exc)}")
                return None
            return self._start_session(address, upstream, now, target, view)
        try:
            upstream = _socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS
            target.cancelled()
            self._drop(DropReason.ERROR, peer_text(address), f"cannot open a socket: {_error_text(exc)}")
            return None
        try:
            upstream.setblocking(False)
            upstream.connect(sockaddr)  # UDP: no packet is sent, only the peer is fixed
        except OSError as exc:
            upstream.close()
            target.attempt_failed(_error_text(exc))
            self._drop(DropReason.ERROR, peer_text(address), f"cannot reach target {target.name}: {_error_text(exc)}")
            return None
        return self._start_session(address, upstream, now, target, view)

    def _start_session(
        self, address: tuple, upstream: _socket.socket, now: float, target: TargetState, view: ConnView | None
    ) -> Session:
        """Table, watch and count a new session on its ``upstream`` socket."""
        session = Session(address, upstream, now, target)
        session.view = view or None
        session.watcher = watcher = self._loop.io(upstream.fileno(), _READ)
        watcher.start(self._on_replies, session)
        self.sessions[address] = session
        stats = self.stats
        stats.udp_sessions += 1
        stats.active += 1  # a udp rule's connections are its sessions
        stats.total += 1
        if stats.active > stats.peak:
            stats.peak = stats.active
        self._idle.clear()
        if self._sweeper is None:
            self._sweep_in(self.rule.session_timeout)
        return session

    # -- UDP over the WebSocket tunnel (SPEC §13, ``gportmap.engine.udptunnel``) -----

    def _tunnel(self, address: tuple, target: TargetState, family: int, sockaddr: tuple) -> _socket.socket:
        """A new session's tunnel to ``target`` (a WebSocket exit): the session's end
        of its socket pair. The connect and the upgrade run in the tunnel's greenlet;
        until then the session's datagrams wait in the pair (a full one drops them)."""
        rule = self.rule
        tls = rule.target_tls
        server_name = (tls.server_name or target.spec.host) if tls is not None else None

        def opened() -> None:
            session = self.sessions.get(address)
            if session is not None and session.upstream is entry.session_socket and session.hold is Hold.PENDING:
                self._established(session)

        def ended(reason: CloseReason, error: str | None) -> None:
            session = self.sessions.get(address)
            if session is None or session.upstream is not entry.session_socket:
                return
            if reason is CloseReason.CONNECT_FAILED and session.hold is Hold.PENDING:
                session.hold = Hold.GIVEN_BACK
                target.attempt_failed(error or "the tunnel could not be opened")
            session.error = error
            self._end_sessions([session], reason)

        entry = TunnelEntry(rule, (family, sockaddr), target.address, self._tunnel_tls, server_name, opened, ended)
        self.tunnels[address] = entry
        return entry.session_socket

    # -- target to client (a hub callback per session) -----------------------------

    def _on_replies(self, session: Session) -> None:
        """Forward the replies the session's socket holds to its client: one per
        readiness, up to ``REPLY_BURST`` on a backlog (as ``_on_datagrams`` reads the
        listening socket). A plain rule's go straight out, any other's through
        ``_download`` first."""
        iteration = self._loop.iteration
        reads = _REPLY_BACKLOG_READS if iteration - session.read_iteration <= 1 else _SPARSE_READS
        session.read_iteration = iteration
        upstream, plain, stats, now = session.upstream, self._plain, self.stats, _monotonic()
        try:
            for _ in reads:
                try:
                    data = upstream.recv(MAX_DATAGRAM)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._reply_failed(session, exc)
                    if session.closed:
                        return
                    continue
                session.last_active = now  # a reply, even one dropped on the way, is life
                if session.hold is _PENDING:
                    self._established(session)
                session.refused = False
                if not plain:
                    data = self._download(session, data)
                    if session.closed:
                        return
                    if data is None:
                        continue
                replies = self._replies
                if replies is None:
                    return  # closed: this session is being ended
                try:
                    replies.sendto(data, session.address)
                except OSError as exc:  # a full send buffer; EBADF once a successor closed the socket
                    self._drop(DropReason.ERROR, session.client, f"cannot send to the client: {_error_text(exc)}")
                    continue
                size = len(data)
                session.packets_sent += 1
                session.bytes_sent += size
                stats.udp_packets_sent += 1
                stats.bytes_sent += size
        except Exception as exc:  # noqa: BLE001 - a bug: this session ends, the rule goes on
            self._internal_error(session.address, exc, session)

    def _download(self, session: Session, data: bytes) -> bytes | None:
        """A reply through the plugins and the faults (a rule that is not plain): what
        to send now, or None (dropped by a plugin, lost or held back by a fault)."""
        if session.view is not None and self.plugins.transforms:
            data = self._through_plugins(session, DOWNSTREAM, data)
            if session.closed or not data:
                return None
        if self._faulty and not self._faulted(session, False, data):
            return None
        return data

    def _reply_failed(self, session: Session, exc: OSError) -> None:
        """A read error on the session's socket: an ICMP report (one datagram lost,
        the session goes on), or the end of the session."""
        if exc.errno not in TRANSIENT_ERRORS:
            session.error = _error_text(exc)
            self._end_sessions([session], CloseReason.ERROR)
            return
        if exc.errno == errno.ECONNREFUSED:
            self._refused(session, exc)
        self._drop(DropReason.ERROR, session.client, f"the target reported: {_error_text(exc)}")

    # -- network faults (SPEC §12, ``gportmap.engine.faults``) ------------------------

    def _faulted(self, session: Session, uploading: bool, data: bytes) -> bool:
        """One datagram through the faults: True to send it now as usual; its
        duplicates and delayed copies are sent from here (a full delay line drops
        them, counted as ``error``)."""
        if session.faults is None:
            session.faults = FaultSession(self.context.faults, self.rule.name, self.rule.faults)
        now = False
        for delay in session.faults.datagram(uploading, len(data)):
            if delay <= 0 and not now:
                now = True
            elif delay <= 0:
                self._send_copy(session, uploading, data)
            elif not self._delays.later(delay, functools.partial(self._send_copy, session, uploading, data)):
                self._drop(DropReason.ERROR, session.client, "too many datagrams held back by faults")
        return now

    def _send_copy(self, session: Session, uploading: bool, data: bytes) -> None:
        """Send a duplicated or delayed datagram (a hub callback: never raises)."""
        if session.closed:
            return
        try:
            if uploading:
                session.upstream.send(data)
                return
            replies = self._replies
            if replies is None:
                return
            replies.sendto(data, session.address)
            session.packets_sent += 1
            session.bytes_sent += len(data)
            self.stats.udp_packets_sent += 1
            self.stats.bytes_sent += len(data)
        except OSError as exc:
            self._drop(DropReason.ERROR, session.client, f"cannot send: {_error_text(exc)}")
        except Exception as exc:  # noqa: BLE001 - a bug: this session ends, the rule goes on
            self._internal_error(session.address, exc, session)

    # -- session ends ------------------------------------------------------------------

    def _sweep_in(self, delay: float) -> None:
        self._stop_sweeping()
        self._sweeper = self._loop.timer(max(delay, self._granularity))
        self._sweeper.start(self._sweep)

    def _stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper.close()
            self._sweeper = None

    def _sweep(self) -> None:
        """End the sessions silent for sessionTimeout; come back at the next deadline."""
        self._stop_sweeping()
        timeout = self.rule.session_timeout
        if self._due(timeout):
            self._drain_listener()
            self._end_sessions(self._silent(self._due(timeout)), CloseReason.EXPIRED)
        if self.sessions:
            earliest = min(s.last_active for s in self.sessions.values())
            self._sweep_in(earliest + timeout - time.monotonic())

    def _due(self, timeout: float) -> list[Session]:
        """The sessions whose clock says silent for ``timeout``."""
        now = time.monotonic()
        return [s for s in self.sessions.values() if now - s.last_active >= timeout]

    def _drain_listener(self) -> None:
        """Read what waits on the listening socket (at most ``sweep_drain`` datagrams)
        before sessions are expired: the socket is shared, so which client a queued
        datagram is from is known only by reading it. Nothing waits there in the
        common case (one poll); only a stalled process or a flood finds a backlog.
        Not on a socket handed over to a successor: that one reads it now."""
        raw = self._replies
        for _ in range(-(-self.sweep_drain // LISTEN_BURST)):  # each read takes at most LISTEN_BURST
            if self._reader is None or raw is None or not waiting([raw.fileno()]):
                return
            self._on_datagrams(raw)

    @staticmethod
    def _silent(due: list[Session]) -> list[Session]:
        """The sessions of ``due`` with nothing waiting on their sockets; the others
        were not silent, only unserved (their watchers forward the replies as soon as
        the loop turns): their clocks start again. One poll for all of them
        in the common case, where nothing waits."""
        if not waiting([s.upstream.fileno() for s in due]):
            return due
        now, silent = time.monotonic(), []
        for session in due:
            if waiting([session.upstream.fileno()]):
                session.last_active = now
            else:
                silent.append(session)
        return silent

    def _end_sessions(self, ended: Iterable[Session], reason: str) -> None:
        """End sessions exactly once each: stop the watcher, keep the kernel's drop
        count, close the socket, leave the table, tell the plugins, log it."""
        stats = self.stats
        for session in ended:
            if session.closed:
                continue
            session.closed = True
            session.reason = reason
            if session.watcher is not None:
                session.watcher.stop()
                session.watcher.close()
                session.watcher = None
            self._kernel_done += kernel_drops(session.upstream)
            session.upstream.close()
            if self.tunnels is not None and (entry := self.tunnels.pop(session.address, None)) is not None:
                entry.stop()  # its WebSocket is closed: the exit ends its side now
            self._give_back(session)
            if self.sessions.get(session.address) is session:
                del self.sessions[session.address]
            stats.udp_sessions -= 1
            stats.active -= 1
            self._closed(session)
        if not self.sessions:
            self._idle.set()
            self._stop_sweeping()

    def _closed(self, session: Session) -> None:
        duration = round(time.monotonic() - session.started, 3)
        if session.view is not None:
            summary = {
                "bytes_received": session.bytes_received,
                "bytes_sent": session.bytes_sent,
                "packets_received": session.packets_received,
                "packets_sent": session.packets_sent,
                "duration": duration,
                "reason": session.reason,
            }
            for failure in self.plugins.close(session.view, summary):
                log_hook_error(failure, self.rule.name, session.client)
        if not logger.isEnabledFor(SessionClosed.level_for(session.reason)):
            return  # build no record at all
        event = SessionClosed(
            rule=self.rule.name,
            client=session.client,
            target=session.target.address,
            packets_received=session.packets_received,
            packets_sent=session.packets_sent,
            bytes_received=session.bytes_received,
            bytes_sent=session.bytes_sent,
            duration=duration,
            reason=session.reason,
            error=session.error,
        )
        emit(logger, event)

    # -- drops and the target's address ---------------------------------------------

    def _drop(self, reason: str, client: str, why: str) -> None:
        """Count a dropped datagram, every time; log it at a bounded rate."""
        self.stats.udp_dropped[reason] += 1
        allowed, suppressed = self.context.rejections.allow((self.rule.name, "udp", reason))
        if allowed:
            event = DatagramDropped(
                rule=self.rule.name,
                client=client,
                target=self.rule.target,
                reason=reason,
                suppressed=suppressed,
                why=why,
            )
            emit(logger, event)

    # -- the session's target (the pool) ------------------------------------------

    def _established(self, session: Session) -> None:
        """The target answered, or took a second datagram without an ICMP error:
        the pool counts the session (``connected``), which holds it from now on."""
        session.hold = Hold.ESTABLISHED
        session.target.connected()

    def _refused(self, session: Session, exc: OSError) -> None:
        """The target's port is unreachable (an ICMP error on the session's socket):
        a failure against it (passive health), once per session until it answers."""
        if session.refused or session.hold is Hold.GIVEN_BACK:
            return
        session.refused = True
        target, text = session.target, f"port unreachable: {_error_text(exc)}"
        if session.hold is Hold.PENDING:
            session.hold = Hold.GIVEN_BACK
            target.attempt_failed(text)
        else:
            target.failed(text)  # the session holds it on: given back when it ends

    @staticmethod
    def _give_back(session: Session) -> None:
        """The session ended: its target is given back (its bytes added), or, if it
        never showed the target alive, given back uncounted."""
        hold, session.hold = session.hold, Hold.GIVEN_BACK
        if hold is Hold.ESTABLISHED:
            session.target.release(session)
        elif hold is Hold.PENDING:
            session.target.cancelled()

    def _target_address(self, target: TargetState) -> tuple[int, tuple] | None:
        """(family, sockaddr) of ``target`` for a new session. Host names are
        resolved in the background (the hub cannot wait for DNS) and again after
        their TTL; meanwhile a stale answer still serves, and existing sessions keep
        the address they were connected to."""
        addresses = target.addresses
        cached = addresses.cached
        if cached is None:
            self._resolve_later()
            cached = addresses.addresses  # stale, or () when never resolved
        return cached[0] if cached else None

    def _resolve_later(self) -> None:
        if self._resolver is None:
            self._resolver = gevent.spawn(self._resolve)

    def _resolve(self) -> None:
        """Resolve the pool's host names that are stale (one greenlet per server)."""
        rule = self.rule
        try:
            for target in self.target_pool.targets:
                if target.addresses.cached is not None:
                    continue
                try:
                    target.addresses.resolve()
                except OSError as exc:  # socket.gaierror included; tried again by the next new client
                    allowed, suppressed = self.context.rejections.allow((rule.name, "udp", "resolve"))
                    if allowed:
                        event = TargetUnresolved(
                            rule=rule.name,
                            target=target.address,
                            suppressed=suppressed,
                            host=target.spec.host,
                            error=_error_text(exc),
                        )
                        emit(logger, event)
        finally:
            self._resolver = None

    # -- upgrade in place (gportmap.runtime.carry) ---------------------------------------

    def carriable(self) -> list[Session]:
        """The sessions an upgrade in place can carry into the new program: every
        open one, unless the rule has plugins (their ``on_close`` is owed, and
        what they keep of a session lives in this process)."""
        if self.plugins.active or self.tunnels is not None:  # a tunnel's WebSocket stays here
            return []
        return [session for session in self.sessions.values() if not session.closed]

    def forget_session(self, session: Session) -> None:
        """In the drainer (a copy of the old program): let go of a session the new
        program carries. Its watcher stops and this copy of its socket closes (the
        new program holds the socket itself: its port stays the flow's), without a
        record, a plugin call or giving its target back."""
        if session.closed:
            return
        session.closed = True
        if session.watcher is not None:
            session.watcher.stop()
            session.watcher.close()
            session.watcher = None
        session.upstream.close()
        if self.sessions.get(session.address) is session:
            del self.sessions[session.address]
        self.stats.udp_sessions -= 1
        self.stats.active -= 1
        if not self.sessions:
            self._idle.set()
            self._stop_sweeping()

    def adopt_session(self, session: Session) -> None:
        """In the new program: serve a session the old one carried (its socket,
        still connected to the same target from the same port, its counters and
        clocks set; its target held again by the caller). Counted open again as
        ``restore_counters`` took it out of the rule's ``total``. Called from
        ``start`` before the listener is read (``StatsRegistry.take_carried``), so
        no datagram of its client can open a second session."""
        if session.address in self.sessions:
            raise ValueError(f"a session of {session.client} is open already")
        session.upstream.setblocking(False)
        # The kernel counts the socket's drops since it was made: the old program
        # reported those already (``restore_counters``), this one counts from here.
        self._kernel_done -= kernel_drops(session.upstream)
        session.watcher = watcher = self._loop.io(session.upstream.fileno(), _READ)
        watcher.start(self._on_replies, session)
        self.sessions[session.address] = session
        stats = self.stats
        stats.udp_sessions += 1
        stats.active += 1
        stats.total += 1
        if stats.active > stats.peak:
            stats.peak = stats.active
        self._idle.clear()
        if self._sweeper is None:  # soon: the sweep finds the earliest deadline (once, not per session)
            self._sweep_in(0)


def _error_text(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (port unreachable)"
    if isinstance(exc, ConnectionResetError):
        return "connection reset (Windows' report of a port unreachable)"
    return exc.strerror or str(exc)
