"""The lean relay for plain TCP: no greenlet per connection.

A greenlet per direction costs most of a connection's memory (its saved stack and
frames: ~19 KB for two) and a switch per chunk. Here a connection is a handful of
small objects and libev io watchers on the hub; the bytes move inside the watchers'
callbacks, which never block:

- readable: ``recv_into`` one receive buffer shared by the whole process (callbacks
  run one at a time on the hub, so nobody else can be using it), then a
  non-blocking ``send``. Only an unsent tail is copied out of the shared buffer;
  while a tail waits, the source is not read (backpressure: at most one 64 KiB tail
  per direction, the rest stays in the kernel's socket buffers and pushes back on
  the sender).
- a direction that fills whole reads is streaming and moves on to ``splice(2)``
  through a pipe (made then, so an idle connection holds no pipe), exactly like the
  greenlet relay; ``GPORTMAP_RELAY=splice`` splices from the first byte, ``copy``
  never does.
- end of stream is forwarded as a half-close, the other direction keeps flowing.
- one timer per connection measures the idle timeout across both directions; it
  only re-arms itself when it fires and something moved meanwhile.

``LeanConnection`` goes one step further for targets given as IP addresses: the
connect is a non-blocking ``connect`` and a write watcher with a timer
(``HubConnect``), so such a connection never has a greenlet at all; the server then
runs its accept handler on the hub too (``spawn=None``).

Watchers are stopped and closed before their sockets are: closing a socket does not
stop a libev watcher, and a reused descriptor number would wake the wrong
connection. No callback lets an exception reach the hub: the hub would stop that
watcher and the connection would hang, counted open, with nobody to end it. An
unexpected one (a bug) ends its connection with ``internal_error`` instead,
counted and logged with its traceback (``gportmap.failures``). TLS connections and rules with plugins keep the greenlet relay
(``gportmap.engine.relay.Relay``): they may block in ways a hub callback must not.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import time
from collections.abc import Callable

from gevent import get_hub

from gportmap.engine.net import connect_error_text
from gportmap.engine.relay import BUFFER_SIZE, SPLICE_FLAGS, SideError, close_fd, make_pipe, shutdown
from gportmap.failures import INTERNAL_ERROR, report_internal_error
from gportmap.stats import Connection

#: libev event masks.
READ, WRITE = 1, 2
#: Reads one readiness callback may do before it lets other connections run.
MAX_READS = 16

_BUFFER = memoryview(bytearray(BUFFER_SIZE))
#: ``GPORTMAP_RELAY=splice`` insists on splice: from the first byte, not only once a
#: direction streams, so that the splice path sees every kind of traffic.
SPLICE_FIRST = os.environ.get("GPORTMAP_RELAY", "").strip().lower() == "splice"
_monotonic = time.monotonic
_splice = getattr(os, "splice", None)


def adopt(sock: socket.socket | _socket.socket, nonblocking: bool = False) -> _socket.socket:
    """Take the descriptor out of ``sock`` (which then closes nothing) into a bare,
    non-blocking ``_socket.socket``: C methods, no gevent wrapper per call.

    ``nonblocking``: the descriptor is non-blocking already (gevent's sockets always
    are), so no system call is spent on it. Family, type and protocol are passed
    along, or CPython would ask the kernel for each."""
    family, kind, proto = sock.family, sock.type, sock.proto
    raw = _socket.socket(family, kind, proto, sock.detach())
    if not nonblocking:
        raw.setblocking(False)
    return raw


class HubRelay:
    """Relays one plain TCP connection from hub callbacks until both directions
    have ended or one has failed, then closes both sockets and calls ``on_done``
    with the close reason (``closed``, ``idle_timeout``, ``client_error``,
    ``target_error`` or the ``abort`` reason) and an error text."""

    __slots__ = ("client", "target", "conn", "idle", "on_done", "up", "down", "timer", "reason", "loop")

    def __init__(
        self,
        client: _socket.socket,
        target: _socket.socket,
        conn: Connection,
        idle_timeout: float,
        zero_copy: bool = False,
        splice_first: bool | None = None,
        on_done: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.loop = get_hub().loop
        self.client = client
        self.target = target
        self.conn = conn
        self.idle = idle_timeout
        self.on_done = on_done
        self.reason: str | None = None
        splice = zero_copy and _splice is not None
        if splice_first is None:
            splice_first = SPLICE_FIRST
        self.up = _Direction(self, client, target, "client", "target", True, splice, splice_first)
        self.down = _Direction(self, target, client, "target", "client", False, splice, splice_first)
        self.timer = None

    def start(self) -> None:
        self.up.reader.start(self.up.on_readable)
        self.down.reader.start(self.down.on_readable)
        if self.idle:
            self._arm(self.idle)

    def abort(self, reason: str, error: str | None = None) -> None:
        """End the connection now (an error, the idle timeout, a drain cut-off)."""
        if self.reason is None:
            shutdown(self.client, socket.SHUT_RDWR)
            shutdown(self.target, socket.SHUT_RDWR)
            self._finish(reason, error)

    def fail(self, exc: SideError) -> None:
        self.abort(f"{exc.side}_error", exc.error.strerror or str(exc.error))

    def crash(self, exc: Exception) -> None:
        """An unexpected exception in one of this connection's callbacks: counted,
        logged once with its traceback, and this connection (only) ends."""
        conn = self.conn
        self.abort(INTERNAL_ERROR, report_internal_error(conn.stats, conn.client, conn.target, exc))

    def direction_ended(self) -> None:
        if self.up.done and self.down.done:
            self._finish("closed", None)

    def _arm(self, after: float) -> None:
        self.timer = self.loop.timer(after)
        self.timer.start(self._on_timer)

    def _on_timer(self) -> None:
        try:
            remaining = self.conn.last_active + self.idle - _monotonic()
            self.timer.close()
            if remaining > 0:
                self._arm(remaining)
            else:
                self.abort("idle_timeout")
        except Exception as exc:  # noqa: BLE001 - a bug: see the module docstring
            self.crash(exc)

    def _finish(self, reason: str, error: str | None) -> None:
        """Stop every watcher, then close: the order matters (see the module doc)."""
        if self.reason is not None:
            return  # finished already
        self.reason = reason
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        self.up.close()
        self.down.close()
        self.client.close()
        self.target.close()
        self.on_done(reason, error)


class _Direction:
    """One way through the relay: source -> destination, with its own watchers."""

    __slots__ = (
        "relay",
        "src",
        "dst",
        "src_side",
        "dst_side",
        "uploading",
        "reader",
        "writer",
        "tail",
        "pipe",
        "piped",
        "may_splice",
        "spliced",
        "done",
        "splice_first",
        "on_readable",
        "on_writable",
    )

    def __init__(
        self,
        relay: HubRelay,
        src: _socket.socket,
        dst: _socket.socket,
        src_side: str,
        dst_side: str,
        uploading: bool,
        may_splice: bool,
        splice_first: bool,
    ) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.src_side, self.dst_side = src_side, dst_side
        self.uploading = uploading
        self.reader = relay.loop.io(src.fileno(), READ)
        self.writer = None  # made the first time the destination pushes back
        self.tail: memoryview | None = None  # copied bytes the destination has not taken yet
        self.pipe: tuple[int, int, int] | None = None
        self.piped = 0  # bytes in the pipe not yet spliced out
        self.may_splice = may_splice
        self.spliced = False
        self.done = False
        self.splice_first = splice_first
        # Bound once: a watcher's start() would otherwise get a new bound method each time.
        self.on_readable = self._on_readable
        self.on_writable = self._on_writable

    # -- callbacks (on the hub: they must never block or raise) -------------------

    def _on_readable(self) -> None:
        try:
            if self.pipe is not None or (self.splice_first and self.may_splice and self._open_pipe()):
                self._splice_in()
            else:
                self._copy_in()
        except SideError as exc:
            self.relay.fail(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: see the module docstring
            self.relay.crash(exc)

    def _on_writable(self) -> None:
        try:
            if self.piped:
                self._splice_out()
            else:
                self._flush_tail()
        except SideError as exc:
            self.relay.fail(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: see the module docstring
            self.relay.crash(exc)

    # -- copying ------------------------------------------------------------------

    def _copy_in(self) -> None:
        conn, src, dst, view = self.relay.conn, self.src, self.dst, _BUFFER
        for _ in range(MAX_READS):
            try:
                n = src.recv_into(view)
            except BlockingIOError:
                return
            except OSError as exc:
                raise SideError(self.src_side, exc) from None
            if not n:
                self._end()
                return
            conn.last_active = _monotonic()
            if self.uploading:
                conn.add_received(n)
            chunk = view if n == BUFFER_SIZE else view[:n]
            try:
                sent = dst.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise SideError(self.dst_side, exc) from None
            if sent and not self.uploading:
                conn.add_sent(sent)
            if sent < n:
                self.tail = memoryview(bytes(chunk[sent:]))  # only the unsent tail is copied
                self._wait_writable()
                return
            if n < BUFFER_SIZE:
                return  # drained: the next readiness brings more
            if self.may_splice and self._open_pipe():
                self._splice_in()  # streaming: zero-copy from now on
                return

    def _flush_tail(self) -> None:
        tail = self.tail
        try:
            sent = self.dst.send(tail)
        except BlockingIOError:
            return
        except OSError as exc:
            raise SideError(self.dst_side, exc) from None
        conn = self.relay.conn
        conn.last_active = _monotonic()
        if not self.uploading:
            conn.add_sent(sent)
        if sent < len(tail):
            self.tail = tail[sent:]
            return
        self.tail = None
        self._resume_reading()

    # -- splicing -----------------------------------------------------------------

    def _open_pipe(self) -> bool:
        self.pipe = make_pipe()
        if self.pipe is None:
            self.may_splice = False  # the kernel will not give a useful pipe: keep copying
        return self.pipe is not None

    def _splice_in(self) -> None:
        read_end, write_end, capacity = self.pipe
        try:
            n = _splice(self.src.fileno(), write_end, capacity, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS) and not self.spliced:
                self._close_pipe()  # not spliceable here: copy instead
                self.may_splice = False
                self._copy_in()
                return
            raise SideError(self.src_side, exc) from None
        if not n:
            self._end()
            return
        self.spliced = True
        conn = self.relay.conn
        conn.last_active = _monotonic()
        if self.uploading:
            conn.add_received(n)
        self.piped = n
        self._splice_out()

    def _splice_out(self) -> None:
        read_end, dst_fd, conn = self.pipe[0], self.dst.fileno(), self.relay.conn
        while self.piped:
            try:
                moved = _splice(read_end, dst_fd, self.piped, flags=SPLICE_FLAGS)
            except BlockingIOError:
                self._wait_writable()
                return
            except OSError as exc:
                raise SideError(self.dst_side, exc) from None
            self.piped -= moved
            conn.last_active = _monotonic()
            if not self.uploading:
                conn.add_sent(moved)
        self._resume_reading()

    # -- state changes ----------------------------------------------------------

    def _wait_writable(self) -> None:
        """The destination pushes back: stop reading until it takes what is pending."""
        self.reader.stop()
        if self.writer is None:
            self.writer = self.relay.loop.io(self.dst.fileno(), WRITE)
        if not self.writer.active:
            self.writer.start(self.on_writable)

    def _resume_reading(self) -> None:
        if self.writer is not None and self.writer.active:
            self.writer.stop()
            self.reader.start(self.on_readable)

    def _end(self) -> None:
        """End of stream from the source: forward it as a half-close. When the other
        way has ended too, closing both sockets (next) sends that FIN anyway."""
        self.done = True
        self.reader.stop()
        self._close_pipe()
        relay = self.relay
        if not (relay.up.done and relay.down.done):
            shutdown(self.dst, socket.SHUT_WR)
        relay.direction_ended()

    def _close_pipe(self) -> None:
        if self.pipe is not None:
            close_fd(self.pipe[0])
            close_fd(self.pipe[1])
            self.pipe = None
            self.piped = 0

    def close(self) -> None:
        self.reader.close()
        if self.writer is not None:
            self.writer.close()
        self._close_pipe()


class HubConnect:
    """A non-blocking connect to the first address of ``addresses`` that answers,
    each tried within ``timeout`` seconds, driven by a write watcher and a timer on
    the hub. Calls ``on_connected(sock)`` or ``on_failed(error)`` exactly once,
    unless cancelled first. An unexpected exception in its callbacks goes to
    ``on_crash`` (the connection then ends as ``internal_error``)."""

    __slots__ = (
        "addresses",
        "index",
        "timeout",
        "on_connected",
        "on_failed",
        "on_crash",
        "sock",
        "watcher",
        "timer",
        "loop",
    )

    def __init__(
        self,
        addresses: list[tuple[int, tuple]],
        timeout: float,
        on_connected: Callable[[_socket.socket], None],
        on_failed: Callable[[OSError], None],
        on_crash: Callable[[Exception], None] | None = None,
    ) -> None:
        self.loop = get_hub().loop
        self.addresses = addresses
        self.index = 0
        self.timeout = timeout
        self.on_connected = on_connected
        self.on_failed = on_failed
        self.on_crash = on_crash
        self.sock: _socket.socket | None = None
        self.watcher = None
        self.timer = None

    def start(self) -> None:
        self._next(None)

    def cancel(self) -> None:
        """Stop waiting (a drain cut-off); the socket being connected is closed."""
        self._stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _next(self, error: OSError | None) -> None:
        while self.index < len(self.addresses):
            family, sockaddr = self.addresses[self.index]
            self.index += 1
            sock = None
            try:
                sock = _socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex(sockaddr)
            except OSError as exc:  # out of descriptors, an address of the wrong family
                if sock is not None:
                    sock.close()
                error = exc
                continue
            if not err:
                self.on_connected(sock)
                return
            if err == errno.EINPROGRESS:
                self.sock = sock
                self.watcher = self.loop.io(sock.fileno(), WRITE)
                self.watcher.start(self._on_writable)
                self.timer = self.loop.timer(self.timeout)
                self.timer.start(self._on_timeout)
                return
            sock.close()
            error = OSError(err, os.strerror(err))
        self.on_failed(error or OSError("the target resolved to no address"))

    def _stop(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        if self.timer is not None:
            self.timer.close()
            self.timer = None

    def _on_writable(self) -> None:
        try:
            self._stop()
            sock, self.sock = self.sock, None
            try:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                err = exc.errno or errno.EBADF
            if not err:
                self.on_connected(sock)
                return
            sock.close()
            self._next(OSError(err, os.strerror(err)))
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self._crash(exc)

    def _on_timeout(self) -> None:
        try:
            self._stop()
            sock, self.sock = self.sock, None
            sock.close()
            self._next(TimeoutError("timed out"))
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self._crash(exc)

    def _crash(self, exc: Exception) -> None:
        self.cancel()
        if self.on_crash is None:
            raise exc
        self.on_crash(exc)


class LeanConnection:
    """A plain TCP connection that never has a greenlet: it is accepted in the hub,
    connects to the target with ``HubConnect`` and is relayed by ``HubRelay``.
    ``on_done(reason, error)`` (set before ``start``) is called once at the end,
    ``connect_failed`` and ``internal_error`` included; ``on_connect_failed()``
    counts that failure."""

    __slots__ = (
        "client",
        "conn",
        "idle",
        "zero_copy",
        "connecting",
        "relay",
        "on_done",
        "on_connect_failed",
        "finished",
    )

    def __init__(
        self,
        client: _socket.socket,
        conn: Connection,
        addresses: list[tuple[int, tuple]],
        connect_timeout: float,
        idle_timeout: float,
        zero_copy: bool,
        on_connect_failed: Callable[[], None],
    ) -> None:
        self.client = client
        self.conn = conn
        self.idle = idle_timeout
        self.zero_copy = zero_copy
        self.on_connect_failed = on_connect_failed
        self.on_done: Callable[[str, str | None], None] | None = None
        self.relay: HubRelay | None = None
        self.finished = False  # on_done was called (before a relay took over)
        self.connecting: HubConnect | None = HubConnect(
            addresses, connect_timeout, self._connected, self._failed, self.crash
        )

    def start(self) -> None:
        self.connecting.start()

    def abort(self, reason: str, error: str | None = None) -> None:
        """End the connection now, whatever stage it is in; on_done once."""
        if self.relay is not None:
            self.relay.abort(reason, error)
            return
        if self.finished:
            return
        self.finished = True
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self.client.close()
        self.on_done(reason, error)

    def crash(self, exc: Exception) -> None:
        """An unexpected exception while connecting or handing over to the relay."""
        conn = self.conn
        self.abort(INTERNAL_ERROR, report_internal_error(conn.stats, conn.client, conn.target, exc))

    def _connected(self, target: _socket.socket) -> None:
        self.connecting = None
        try:
            for sock in (self.client, target):  # a relay must not add latency to small writes
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # already reset: the relay will see it
            self.relay = HubRelay(self.client, target, self.conn, self.idle, self.zero_copy, on_done=self.on_done)
            self.relay.start()
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            if self.relay is None:
                target.close()  # the relay that would own it does not exist
            self.crash(exc)

    def _failed(self, error: OSError) -> None:
        self.connecting = None
        self.finished = True
        self.client.close()
        self.on_connect_failed()
        self.on_done("connect_failed", connect_error_text(error))
