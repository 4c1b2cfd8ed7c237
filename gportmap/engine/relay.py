"""The byte pump between a client and its target, for connections that need a
greenlet: rules with ``on_data`` plugins that may block (``Plugin.may_block``; TLS
through ``SSLSocket`` there), protocols of plugin packages, WebSocket bridges
(which reuse the helpers here). Everything else goes through
``gportmap.engine.hubrelay``.

Two directions, each in its own greenlet, each a loop of: wait until the source is
readable (holding no buffer), borrow a buffer from the shared pool, read, write it
all to the destination, give the buffer back. An idle connection therefore holds
no userspace memory, and a slow reader holds at most one buffer per direction while
the kernel's socket buffers push back on the sender.

End of stream is forwarded as a half-close (``shutdown(SHUT_WR)``) and the other
direction keeps flowing until it ends too: closing both sockets on the first EOF
(as gevent's example port forwarder does) truncates replies. Any error or the idle
timeout aborts both directions at once. The idle clock is the hub relay's: a
wait that runs out while a socket being read has bytes waiting (the process was
stalled, not the connection) waits again (``gportmap.engine.idle``).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence

try:
    import fcntl

    F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux values where Python lacks them
    F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
except ImportError:  # Windows: no splice either
    fcntl = None  # type: ignore[assignment]

import gevent
from gevent.monkey import get_original
from gevent.socket import wait_read, wait_write

from gportmap.engine.faults import FaultClose, FaultSession, reset_on_close
from gportmap.engine.idle import waiting
from gportmap.failures import report_internal_error
from gportmap.plugins import DOWNSTREAM, UPSTREAM, HookError, Reject, log_hook_error
from gportmap.reasons import CloseReason
from gportmap.stats import Connection

BUFFER_SIZE = 65536
#: Pipe size asked for the zero-copy path; a smaller grant (a user past
#: /proc/sys/fs/pipe-user-pages-soft gets one page) would collapse throughput.
PIPE_SIZE = 1 << 20
MIN_PIPE_SIZE = 1 << 16
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


#: close(2) itself. gevent's patched ``os.close`` defers closing anything but a regular
#: file to the next turn of the event loop, which an idle process may never take: the
#: pipes of a finished connection stayed open. No watcher ever waits on these pipes
#: (only on the sockets), so closing them at once is safe.
close_fd = get_original("os", "close")


def make_pipe() -> tuple[int, int, int] | None:
    """(read end, write end, capacity) of a non-blocking pipe for splice, or None
    when the kernel will not give a pipe big enough to be worth it."""
    try:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # out of descriptors: the copying path needs none
    capacity = 0
    try:
        capacity = fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        try:
            capacity = fcntl.fcntl(write_end, F_GETPIPE_SZ)
        except OSError:
            capacity = 0
    if capacity < MIN_PIPE_SIZE:
        close_fd(read_end)
        close_fd(write_end)
        return None
    return read_end, write_end, capacity

#: What a non-blocking read or write raises when it must wait; TLS sockets raise
#: their own kinds (and may need to read to write, or write to read).
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def has_pending(sock: socket.socket) -> bool:
    """Decrypted bytes a TLS socket holds that no readiness wait would announce."""
    pending = getattr(sock, "pending", None)
    return pending is not None and pending() > 0


def wait_for_retry(exc: BaseException, fd: int, conn: Connection, idle: float) -> None:
    """Wait for what ``exc`` (one of WOULD_BLOCK) says the socket needs."""
    if isinstance(exc, ssl.SSLWantReadError):
        _wait(wait_read, fd, conn, idle)
    elif isinstance(exc, ssl.SSLWantWriteError):
        _wait(wait_write, fd, conn, idle)


class BufferPool:
    """Reusable receive buffers, shared by every connection of the process.

    At most ``max_free`` idle buffers are kept; the number in use is bounded by the
    number of directions actually moving data at this instant.
    """

    def __init__(self, size: int = BUFFER_SIZE, max_free: int = 64) -> None:
        self.size = size
        self.max_free = max_free
        self._free: list[memoryview] = []

    def take(self) -> memoryview:
        free = self._free
        return free.pop() if free else memoryview(bytearray(self.size))

    def give(self, buf: memoryview) -> None:
        if len(self._free) < self.max_free:
            self._free.append(buf)


class IdleTimeout(Exception):
    """No byte moved in either direction for ``idleTimeout`` seconds."""


class _Tick(Exception):
    """A wait ran out; the caller re-checks the connection-wide idle clock."""


_TICK = _Tick()


class SideError(Exception):
    """An I/O error attributed to one side ("client" or "target")."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error


def _wait(waiter: Callable, fd: int, conn: Connection, idle: float, reading: Sequence[int] | None = None) -> None:
    """Wait for readiness; raise IdleTimeout once the whole connection has been
    silent. ``reading``: the descriptors the connection is waiting to read (-1 for
    none): bytes waiting on one of them when the clock runs out mean the process
    was stalled, not the connection, which then gets another period."""
    if not idle:
        waiter(fd)
        return
    while True:
        remaining = conn.last_active + idle - time.monotonic()
        if remaining <= 0:
            if not (reading and waiting(reading)):
                raise IdleTimeout()
            remaining = idle
        try:
            waiter(fd, remaining, _TICK)
            return
        except _Tick:
            continue


def send_all(
    dst: socket.socket,
    dst_fd: int,
    view: memoryview,
    side: str,
    conn: Connection,
    idle: float,
    on_sent: Callable[[int], None] | None = None,
    reading: Sequence[int] | None = None,
) -> None:
    """Write all of ``view`` to a non-blocking socket, waiting for writability with the
    connection's idle clock (``reading``: see ``_wait``); partial writes count as
    activity and (via ``on_sent``) as bytes sent. Errors are attributed to ``side``."""
    while view:
        try:
            sent = dst.send(view)
        except BlockingIOError:
            _wait(wait_write, dst_fd, conn, idle, reading)
            continue
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
            wait_for_retry(exc, dst_fd, conn, idle)
            continue
        except OSError as exc:
            raise SideError(side, exc) from None
        conn.last_active = time.monotonic()
        if on_sent is not None:
            on_sent(sent)
        view = view[sent:]


def wait_readable(fd: int, conn: Connection, idle: float) -> None:
    """Wait until ``fd`` is readable, raising IdleTimeout per the connection's idle clock."""
    _wait(wait_read, fd, conn, idle)


def shutdown(sock: socket.socket, how: int) -> None:
    """shutdown() that ignores a socket already closed or reset.

    On a TLS socket, a half-close first sends close_notify (so the peer sees a clean
    end, not a truncation: OpenSSL 3 clients report a bare TCP end as an error) and
    then shuts the TCP write side *without* dropping the TLS state:
    ``SSLSocket.shutdown`` forgets it, after which the other direction would read
    ciphertext as if it were data. Known limit, left only to the greenlet relay
    (rules with ``on_data`` plugins and TLS): Python calls SSL_shutdown twice, and
    the second call discards application data that has already arrived from the
    peer, so bytes a TLS client sends right after the target's end can be lost.
    The hub relay's TLS stage (``gportmap.engine.tls``) does not have it.
    """
    try:
        if how == socket.SHUT_WR and getattr(sock, "_sslobj", None) is not None:
            try:
                sock._sslobj.shutdown()  # sends close_notify; the peer's need not come
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLError):
                pass
            type(sock).__mro__[1].shutdown(sock, how)  # the plain socket's shutdown
        else:
            sock.shutdown(how)
    except OSError:
        pass  # already closed or reset by the peer: nothing left to tell it


class Relay:
    """Relays one connection until both directions have ended or one has failed.

    ``run()`` returns the close reason: ``closed`` (both sides finished),
    ``idle_timeout``, ``client_error``, ``target_error``, ``plugin_error`` or
    ``internal_error`` (an unexpected exception in either direction, already
    counted and logged with its traceback); ``error`` then holds the error text.
    """

    __slots__ = (
        "client", "target", "conn", "idle", "pool", "reason", "error", "transform", "zero_copy", "reading", "faults"
    )

    def __init__(
        self,
        client: socket.socket,
        target: socket.socket,
        conn: Connection,
        idle_timeout: float,
        pool: BufferPool,
        transform: Callable[[str, bytes], bytes] | None = None,
        zero_copy: bool = False,
        faults: FaultSession | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.conn = conn
        self.idle = idle_timeout
        self.pool = pool
        self.reason: str | None = None
        self.error: str | None = None
        #: The plugins' on_data chain: bytes are copied out of the buffer and passed
        #: through it; None moves them untouched.
        self.transform = transform
        #: Move bytes with splice(2) through a pipe, never through userspace. Only for
        #: plain sockets without an on_data plugin; falls back to copying if refused.
        self.zero_copy = zero_copy and transform is None and faults is None
        #: The connection's network faults (``gportmap.engine.faults``): timed steps
        #: between each read and its write; None for a rule without faults.
        self.faults = faults
        if faults is not None:
            faults.on_error = self._fault_lane_failed
        #: The descriptor each direction (upload, download) waits to read, -1 while
        #: it does not: what the idle clock checks for waiting bytes.
        self.reading = [-1, -1]

    def run(self) -> str:
        self.client.settimeout(0.0)
        self.target.settimeout(0.0)
        download = gevent.spawn(self._direction, self.target, self.client, "target", "client")
        try:
            self._direction(self.client, self.target, "client", "target")
            download.join()
        finally:
            # Killed from outside (drain cut-off): stop the other direction too.
            download.kill(block=True)
        return self.reason or CloseReason.CLOSED

    def _direction(self, src: socket.socket, dst: socket.socket, src_side: str, dst_side: str) -> None:
        try:
            # Copy first; a direction that fills whole buffers is streaming and moves on
            # to splice (HAProxy's splice-auto): small request/response traffic would
            # only pay splice's extra system calls.
            if self._pump(src, dst, src_side, dst_side) and not self._pump_splice(src, dst, src_side, dst_side):
                self._pump(src, dst, src_side, dst_side, allow_switch=False)
        except IdleTimeout:
            self._abort(CloseReason.IDLE_TIMEOUT, None)
        except SideError as exc:
            self._abort(CloseReason.side_error(exc.side), exc.error.strerror or str(exc.error))
        except (HookError, Reject) as exc:
            if isinstance(exc, HookError):
                log_hook_error(exc, self.conn.stats.name, self.conn.client)
            self._abort(CloseReason.PLUGIN_ERROR, str(exc))
        except FaultClose as exc:
            self.fault_abort(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: end this connection, not the other direction's wait
            conn = self.conn
            self._abort(CloseReason.INTERNAL_ERROR, report_internal_error(conn.stats, conn.client, conn.target, exc))

    def _abort(self, reason: str, error: str | None) -> None:
        """Record the first failure and wake the other direction by shutting both sockets."""
        if self.reason is None:
            self.reason = reason
            self.error = error
        shutdown(self.client, socket.SHUT_RDWR)
        shutdown(self.target, socket.SHUT_RDWR)

    def fault_abort(self, exc: FaultClose) -> None:
        """A fault ends the connection (``gportmap.engine.faults``): limit_data and
        timeout with a FIN both ways, reset_peer with a RST to both peers (SO_LINGER
        0, then only the read sides shut to wake the directions: the close resets)."""
        if self.reason is None:
            self.reason = CloseReason.FAULT
            self.error = f"fault {exc.kind.value}"
        if self.faults is not None:
            self.faults.ended.set()
        if not exc.reset:
            self._abort(CloseReason.FAULT, self.error)
            return
        for sock in (self.client, self.target):
            reset_on_close(sock)
            shutdown(sock, socket.SHUT_RD)

    def _fault_lane_failed(self, exc: BaseException) -> None:
        """A write of a fault's lane (latency's pipeline, in a greenlet of its own)
        failed: the connection ends as it would had a direction failed."""
        if isinstance(exc, FaultClose):
            self.fault_abort(exc)
        elif isinstance(exc, SideError):
            self._abort(CloseReason.side_error(exc.side), exc.error.strerror or str(exc.error))
        elif isinstance(exc, IdleTimeout):
            self._abort(CloseReason.IDLE_TIMEOUT, None)
        else:
            conn = self.conn
            self._abort(CloseReason.INTERNAL_ERROR, report_internal_error(conn.stats, conn.client, conn.target, exc))

    def _wait_to_read(self, fd: int, uploading: bool) -> None:
        """Wait until ``fd`` is readable, with the idle clock; meanwhile the clock
        (of both directions) knows that this direction reads ``fd``."""
        reading, index = self.reading, 0 if uploading else 1
        reading[index] = fd
        try:
            _wait(wait_read, fd, self.conn, self.idle, reading)
        finally:
            reading[index] = -1

    def _pump_splice(self, src: socket.socket, dst: socket.socket, src_side: str, dst_side: str) -> bool:
        """The zero-copy pump (realm's zero_copy.rs in Python): socket -> pipe -> socket
        with splice(2). The pipe is made when the first byte is ready, so an idle
        connection costs no descriptors. Returns False, having moved nothing, when the
        kernel refuses (then the copying pump takes over); True once done."""
        conn, idle = self.conn, self.idle
        spliced = False
        uploading = src_side == "client"
        src_fd, dst_fd = src.fileno(), dst.fileno()
        pipe = None
        try:
            while True:
                self._wait_to_read(src_fd, uploading)
                if self.reason is not None:
                    return True
                if pipe is None:
                    pipe = make_pipe()
                    if pipe is None:
                        return False
                read_end, write_end, capacity = pipe
                try:
                    n = os.splice(src_fd, write_end, capacity, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EINVAL, errno.ENOSYS) and not spliced:
                        return False  # not spliceable here: copy instead
                    raise SideError(src_side, exc) from None
                if not n:
                    shutdown(dst, socket.SHUT_WR)  # forward the FIN, keep the other way open
                    return True
                spliced = True
                conn.last_active = time.monotonic()
                if uploading:
                    conn.add_received(n)
                while n:  # drain the pipe into the destination
                    try:
                        moved = os.splice(read_end, dst_fd, n, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        _wait(wait_write, dst_fd, conn, idle, self.reading)
                        continue
                    except OSError as exc:
                        raise SideError(dst_side, exc) from None
                    n -= moved
                    conn.last_active = time.monotonic()
                    if not uploading:
                        conn.add_sent(moved)
        finally:
            if pipe is not None:
                close_fd(pipe[0])
                close_fd(pipe[1])

    def _pump(
        self, src: socket.socket, dst: socket.socket, src_side: str, dst_side: str, allow_switch: bool = True
    ) -> bool:
        """The copying pump. Returns True when it stops to hand over to splice (a full
        buffer was read and zero-copy is allowed), False at the end of the stream."""
        conn, idle, pool = self.conn, self.idle, self.pool
        switch = allow_switch and self.zero_copy
        uploading = src_side == "client"
        src_fd, dst_fd = src.fileno(), dst.fileno()
        while True:
            self._wait_to_read(src_fd, uploading)
            if self.reason is not None:
                return False
            buf = pool.take()
            try:
                while True:
                    try:
                        n = src.recv_into(buf)
                    except BlockingIOError:
                        break  # drained: wait again without holding the buffer
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLWantWriteError as exc:
                        wait_for_retry(exc, src_fd, conn, idle)
                        continue
                    except OSError as exc:
                        raise SideError(src_side, exc) from None
                    if not n:
                        if self.faults is not None:
                            self.faults.before_close(uploading)  # what latency holds, then slow_close
                        shutdown(dst, socket.SHUT_WR)  # forward the FIN, keep the other way open
                        return False
                    conn.last_active = time.monotonic()
                    if uploading:
                        conn.add_received(n)
                    chunk = buf[:n]
                    if self.transform is not None:
                        chunk = memoryview(self.transform(UPSTREAM if uploading else DOWNSTREAM, bytes(chunk)))
                    on_sent = None if uploading else conn.add_sent
                    if self.faults is not None:
                        self.faults.forward(
                            uploading,
                            chunk,
                            lambda piece, on_sent=on_sent: send_all(
                                dst, dst_fd, piece, dst_side, conn, idle, on_sent, self.reading
                            ),
                        )
                    else:
                        send_all(dst, dst_fd, chunk, dst_side, conn, idle, on_sent, self.reading)
                    if switch and n == len(buf):
                        return True
                    if n < len(buf) and not has_pending(src):
                        break
            finally:
                pool.give(buf)

