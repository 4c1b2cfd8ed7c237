"""UDP over the WebSocket tunnel (SPEC §13): a session's datagrams as binary
WebSocket messages, one datagram per message, so boundaries survive the stream.

Two halves, one pump:

- the entry, a udp rule with ``targetProtocol: "websocket"``: each UDP session
  (``gportmap.protocols.udp``) gets, instead of a UDP socket connected to its
  target, one end of an ``AF_UNIX``/``SOCK_DGRAM`` socket pair (datagrams keep
  their boundaries, up to 65,535 bytes); ``TunnelEntry`` connects to the
  WebSocket exit, runs the upgrade (``gportmap.engine.wstunnel.open_tunnel``, with
  ``targetTls`` if set) and pumps between the pair's other end and the WebSocket.
  The udp server sees an ordinary session socket: its accounting, ``maxSessions``,
  ``sessionTimeout`` sweep and drops stay exactly as for plain UDP.
- the exit, a websocket rule with ``targetProtocol: "udp"``: after the upgrade,
  the WebSocket handler's greenlet pumps between the client's WebSocket and a UDP
  socket connected to a target of the rule's pool, until the WebSocket closes or
  no datagram moved for ``idleTimeout`` (then the WebSocket is closed with 1000).

``DatagramPump`` runs two greenlets (one per direction) plus the one that waits
for the end: unlike the TCP relay this is not in hub callbacks, a choice for
simplicity; sessions are bounded by ``maxSessions`` (entry) and
``maxConnections`` (exit), so the greenlets are too. Nothing is buffered beyond
one message being assembled (at most ``max_message`` bytes plus a frame header)
and one datagram being sent: a full socket pushes back on the WebSocket (TCP
flow control) or, on the entry's UDP side, the udp server drops and counts.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import time
from collections.abc import Callable

import gevent
import gevent.socket
from gevent.event import Event
from gevent.lock import Semaphore

from gportmap.config import Rule
from gportmap.engine import wsframe
from gportmap.engine.pool import TargetPool, TargetState
from gportmap.engine.wstunnel import HandshakeError, open_tunnel
from gportmap.plugins import DOWNSTREAM, UPSTREAM
from gportmap.reasons import CloseReason

#: The largest datagram a tunnel carries (the UDP payload limit over IPv4 is 65,507).
MAX_DATAGRAM = 65535

#: What a pump's end reports: the close reason and an error text.
Outcome = tuple[CloseReason, str | None]


class DatagramPump:
    """Moves datagrams between ``dgram`` (a gevent datagram socket) and a WebSocket
    on ``stream`` (anything with ``recv``/``sendall`` that waits cooperatively: a
    gevent socket, an SSLSocket, a ``StagedSocket``). ``client_role`` masks what it
    sends (the entry); ``leftover`` is what arrived behind the upgrade. ``idle``:
    seconds without a datagram either way that end it (None: its owner ends it,
    ``stop``). ``count_in(size)``/``count_out(size)``: one datagram delivered to
    ``dgram`` / sent as a message. ``transform(direction, data)``: the rule's
    ``on_data`` plugins, once per datagram (``upstream``: message to datagram); an
    empty result drops it."""

    #: Bytes read from the stream at once.
    read_size = 65536

    def __init__(
        self,
        stream,
        dgram: gevent.socket.socket,
        client_role: bool,
        leftover: bytes = b"",
        idle: float | None = None,
        max_message: int = MAX_DATAGRAM,
        count_in: Callable[[int], None] | None = None,
        count_out: Callable[[int], None] | None = None,
        transform: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        self.stream = stream
        self.dgram = dgram
        self.client_role = client_role
        self.buffer = bytearray(leftover)
        self.idle = idle
        self.max_message = min(max_message, MAX_DATAGRAM)
        self.count_in = count_in or (lambda size: None)
        self.count_out = count_out or (lambda size: None)
        self.transform = transform
        self.write_lock = Semaphore()
        self.done = Event()
        self.outcome: Outcome = (CloseReason.CLOSED, None)
        self.last_active = time.monotonic()
        self.close_code = wsframe.CLOSE_NORMAL

    def run(self) -> Outcome:
        """Pump until the WebSocket closes, a side fails, ``idle`` passes or ``stop``."""
        workers = [gevent.spawn(self._guard, self._to_datagrams), gevent.spawn(self._guard, self._to_websocket)]
        try:
            while not self.done.is_set():
                if self.idle is None:
                    self.done.wait()
                    break
                left = self.last_active + self.idle - time.monotonic()
                if left <= 0:
                    self._end(CloseReason.EXPIRED, None)
                    break
                self.done.wait(left)
        finally:
            gevent.killall(workers, block=True, timeout=5)
            self._goodbye()
        return self.outcome

    def stop(self, reason: CloseReason = CloseReason.CLOSED) -> None:
        """End it from outside (the entry's session ended)."""
        self._end(reason, None)

    def _end(self, reason: CloseReason, error: str | None, code: int = wsframe.CLOSE_NORMAL) -> None:
        if not self.done.is_set():
            self.outcome = (reason, error)
            self.close_code = code
            self.done.set()

    def _guard(self, direction: Callable[[], None]) -> None:
        try:
            direction()
        except wsframe.FrameError as exc:
            self._end(CloseReason.CLIENT_ERROR if not self.client_role else CloseReason.TARGET_ERROR,
                      exc.reason, exc.code)
        except OSError as exc:
            side = CloseReason.TARGET_ERROR if self.client_role else CloseReason.CLIENT_ERROR
            self._end(side, exc.strerror or str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: this session ends, its owner reports it
            self._end(CloseReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", wsframe.CLOSE_INTERNAL_ERROR)

    def _goodbye(self) -> None:
        """A Close frame if it can go at once (best effort: the peer may be gone)."""
        frame = self._frame(wsframe.OP_CLOSE, wsframe.close_payload(self.close_code))
        try:
            with gevent.Timeout(1):
                self.stream.sendall(frame)
        except (OSError, gevent.Timeout):
            pass

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        if not self.client_role:
            return wsframe.encode_header(opcode, len(payload)) + payload
        mask = os.urandom(4)
        masked = bytearray(payload)
        wsframe.mask_in_place(memoryview(masked), mask)
        return wsframe.encode_header(opcode, len(payload), mask) + masked

    def _send(self, opcode: int, payload: bytes) -> None:
        frame = self._frame(opcode, payload)
        with self.write_lock:
            self.stream.sendall(frame)

    # -- datagram -> message ------------------------------------------------------------

    def _to_websocket(self) -> None:
        while True:
            try:
                data = self.dgram.recv(MAX_DATAGRAM)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # an ICMP error from the target: that datagram is lost, not the session
                raise
            self.last_active = time.monotonic()
            if self.transform is not None:
                data = self.transform(DOWNSTREAM, data)
                if not data:
                    continue
            self._send(wsframe.OP_BINARY, data)
            self.count_out(len(data))

    # -- message -> datagram ------------------------------------------------------------

    def _fill(self, need: int) -> None:
        """Read until the buffer holds ``need`` bytes; the end of stream ends the pump."""
        while len(self.buffer) < need:
            chunk = self.stream.recv(self.read_size)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "the WebSocket peer closed the connection")
            self.buffer += chunk

    def _to_datagrams(self) -> None:
        message: bytearray | None = None
        while True:
            header = wsframe.parse_header(self.buffer)
            if header is None:
                self._fill(len(self.buffer) + 1)
                continue
            if header.mask is None and not self.client_role:
                raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "a client's frame must be masked")
            if header.length > self.max_message or (message is not None and len(message) + header.length > self.max_message):
                raise wsframe.FrameError(wsframe.CLOSE_TOO_BIG, f"a message over {self.max_message} bytes")
            end = header.size + header.length
            self._fill(end)
            payload = bytearray(self.buffer[header.size:end])
            del self.buffer[:end]
            if header.mask is not None:
                wsframe.mask_in_place(memoryview(payload), header.mask)
            opcode = header.opcode
            if opcode == wsframe.OP_CLOSE:
                self._end(CloseReason.CLOSED, None)
                return
            if opcode == wsframe.OP_PING:
                self._send(wsframe.OP_PONG, bytes(payload))
                continue
            if opcode == wsframe.OP_PONG:
                continue
            if opcode == wsframe.OP_CONTINUATION:
                if message is None:
                    raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "a continuation frame with no message")
                message += payload
            else:
                if message is not None:
                    raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "a new message inside a fragmented one")
                message = payload
            if header.fin:
                self.last_active = time.monotonic()
                self._deliver(bytes(message))
                message = None

    def _deliver(self, datagram: bytes) -> None:
        if self.transform is not None:
            datagram = self.transform(UPSTREAM, datagram)
            if not datagram:
                return
        try:
            self.dgram.send(datagram)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOBUFS):
                return  # lost on the way, as UDP may lose it
            raise
        self.count_in(len(datagram))


class TunnelEntry:
    """One UDP session of a tunnel entry: its end of the socket pair for the udp
    server (``session_socket``), and a greenlet that connects to the exit
    (``address``, a resolved (family, sockaddr)), upgrades, and pumps.
    ``on_open()`` once the exit accepted the upgrade; ``on_end(reason, error)``
    once when the tunnel ended by itself (not after ``stop``)."""

    def __init__(
        self,
        rule: Rule,
        address: tuple[int, tuple],
        host_header: str,
        client_tls,
        server_name: str | None,
        on_open: Callable[[], None],
        on_end: Callable[[CloseReason, str | None], None],
    ) -> None:
        self.rule = rule
        self.address = address
        self.host_header = host_header
        self.client_tls = client_tls
        self.server_name = server_name
        self.on_open = on_open
        self.on_end = on_end
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for sock in (mine, theirs):  # room for a few full-size datagrams each way
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_DATAGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_DATAGRAM)
        self.dgram = gevent.socket.socket(fileno=mine.detach(), family=socket.AF_UNIX, type=socket.SOCK_DGRAM)
        #: The udp server's end, a bare non-blocking socket like a UDP session's.
        self.session_socket = _socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM, 0, theirs.detach())
        self.session_socket.setblocking(False)
        self.pump: DatagramPump | None = None
        self.stopped = False
        self.greenlet = gevent.spawn(self._run)
        # Closed when the greenlet ends, also if it is killed before it ever ran.
        self.greenlet.link(lambda _greenlet: self.dgram.close())

    def stop(self) -> None:
        """The udp server ended the session (it closes ``session_socket``)."""
        if self.stopped:
            return
        self.stopped = True
        if self.pump is not None:
            self.pump.stop()
        else:
            self.greenlet.kill(block=False)

    def _run(self) -> None:
        stream = None
        outcome: Outcome = (CloseReason.CLOSED, None)
        try:
            stream, leftover = self._connect()
            if self.stopped:
                return
            self.on_open()
            self.pump = DatagramPump(stream, self.dgram, True, leftover, None, self.rule.max_message_size)
            if self.stopped:
                return
            outcome = self.pump.run()
        except (OSError, HandshakeError) as exc:
            text = getattr(exc, "strerror", None) or str(exc)
            outcome = (CloseReason.CONNECT_FAILED, text)
        finally:
            if stream is not None:
                stream.close()
            if not self.stopped:
                self.stopped = True
                self.on_end(*outcome)

    def _connect(self):
        family, sockaddr = self.address
        sock = gevent.socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.rule.connect_timeout)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.client_tls is not None:
                sock = self.client_tls.wrap_socket(sock, server_hostname=self.server_name)
            sock.settimeout(None)
            leftover = open_tunnel(sock, self.rule, self.host_header)
        except BaseException:
            sock.close()
            raise
        return sock, leftover


def connect_datagram(pool: TargetPool) -> tuple[gevent.socket.socket, TargetState]:
    """The exit's UDP socket, connected to a target of ``pool`` (its host name
    resolved here, in the caller's greenlet). UDP has no connect to fail: the
    target counts the session at once and holds it until its connection ends.
    OSError when no target is up or none can be addressed (counted)."""
    tried: list[TargetState] = []
    last: OSError | None = None
    while len(tried) <= pool.retries:
        target = pool.acquire(None, tried)
        if target is None:
            break
        tried.append(target)
        try:
            family, sockaddr = target.addresses.resolve()[0]
            sock = gevent.socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            last = exc
            target.attempt_failed(exc.strerror or str(exc))
            continue
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            target.attempt_failed(exc.strerror or str(exc))
            continue
        target.connected()
        return sock, target
    if last is None:
        pool.unavailable()
        raise OSError(errno.EHOSTUNREACH, pool.no_target_error())
    raise last
