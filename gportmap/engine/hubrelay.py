"""The relay in hub callbacks: no greenlet per connection, for plain TCP and TLS.

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
  only re-arms itself when it fires and something moved meanwhile, or when bytes
  are waiting on a socket it reads (the process was stalled, not the connection:
  ``gportmap.engine.idle``).

A direction may pass through a stage (``gportmap.engine.tls``: TLS on the client's
side, the target's, or both): ``_StagedDirection`` keeps the watchers, the
backpressure, the half-close and the idle clock of the plain direction and replaces
only the step that moves a chunk (decrypt what came, encrypt what goes; at most one
chunk of ciphertext in the stage and one unsent tail per direction). A direction
with no stage is exactly the plain one above, splice included.

``HubConnection`` is a connection's whole path in hub callbacks: the TLS handshake
with the client (``HubHandshake``, under a timer for ``handshakeTimeout``), the
non-blocking connect (``HubConnect``), the PROXY protocol header and the TLS
handshake with the target, then the relay. A greenlet that must run user code
first (plugin hooks) or resolve a name runs the same handshakes through
``await_handshake`` and hands the sockets to ``HubRelay``.

Watchers are stopped and closed before their sockets are: closing a socket does not
stop a libev watcher, and a reused descriptor number would wake the wrong
connection. No callback lets an exception reach the hub: the hub would stop that
watcher and the connection would hang, counted open, with nobody to end it. An
unexpected one (a bug) ends its connection with ``internal_error`` instead,
counted and logged with its traceback (``gportmap.failures``). Rules with ``on_data``
plugins keep the greenlet relay (``gportmap.engine.relay.Relay``): user code may
block in ways a hub callback must not.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gevent import get_hub
from gevent.event import AsyncResult

from gportmap.engine.idle import waiting
from gportmap.engine.net import connect_error_text
from gportmap.engine.relay import BUFFER_SIZE, SPLICE_FLAGS, SideError, close_fd, make_pipe, shutdown
from gportmap.engine.tls import NEED_DATA, TlsError, TlsStage
from gportmap.failures import INTERNAL_ERROR, report_internal_error
from gportmap.stats import Connection

#: libev event masks.
READ, WRITE = 1, 2
#: Reads one readiness callback may do before it lets other connections run.
MAX_READS = 16

_BUFFER = memoryview(bytearray(BUFFER_SIZE))
#: Plaintext out of a TLS stage: shared like ``_BUFFER`` (the ciphertext read into
#: ``_BUFFER`` is copied into the stage before any plaintext is taken out).
_PLAIN = memoryview(bytearray(BUFFER_SIZE))
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
    """Relays one connection from hub callbacks until both directions have ended or
    one has failed, then closes both sockets and calls ``on_done`` with the close
    reason (``closed``, ``idle_timeout``, ``client_error``, ``target_error`` or the
    ``abort`` reason) and an error text.

    ``client_tls`` / ``target_tls``: TLS stages whose handshakes are done (the
    client's side, the target's); with either, both directions go through
    ``_StagedDirection``. Without, the plain path, splice included."""

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
        client_tls: TlsStage | None = None,
        target_tls: TlsStage | None = None,
    ) -> None:
        self.loop = get_hub().loop
        self.client = client
        self.target = target
        self.conn = conn
        self.idle = idle_timeout
        self.on_done = on_done
        self.reason: str | None = None
        if client_tls is None and target_tls is None:
            splice = zero_copy and _splice is not None
            if splice_first is None:
                splice_first = SPLICE_FIRST
            self.up = _Direction(self, client, target, "client", "target", True, splice, splice_first)
            self.down = _Direction(self, target, client, "target", "client", False, splice, splice_first)
        else:
            self.up = _StagedDirection(self, client, target, "client", "target", True, client_tls, target_tls)
            self.down = _StagedDirection(self, target, client, "target", "client", False, target_tls, client_tls)
        self.timer = None

    def start(self) -> None:
        self.up.reader.start(self.up.on_readable)
        self.down.reader.start(self.down.on_readable)
        if self.idle:
            self._arm(self.idle)
        for direction in (self.up, self.down):
            # Records that came with the handshake's last flight sit in the stage:
            # no readiness event will announce them.
            if self.reason is None and direction.reader.active and direction.buffered():
                direction.on_readable()

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
            elif waiting(self._read_fds()):
                self._arm(self.idle)  # bytes wait for a stalled process: not idle
            else:
                self.abort("idle_timeout")
        except Exception as exc:  # noqa: BLE001 - a bug: see the module docstring
            self.crash(exc)

    def _read_fds(self) -> list[int]:
        """The sockets a direction is waiting to read: not those paused by
        backpressure (their waiting bytes are a stalled peer's, not activity), nor
        those whose end was read (an end stays readable for ever)."""
        return [d.src.fileno() for d in (self.up, self.down) if d.reader.active]

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

    def buffered(self) -> bool:
        """Bytes this direction holds that no readiness event will announce: none
        on the plain path (everything waits in the kernel)."""
        return False


class _StagedDirection(_Direction):
    """A direction through TLS on either end or both: what ``src`` sends is
    decrypted by ``src_tls``, what goes to ``dst`` is encrypted by ``dst_tls``.

    Everything but the step that moves a chunk is the plain direction's: the
    watchers, the stop-reading-while-a-tail-waits backpressure, the half-close, the
    callbacks' error handling. The step: read one chunk of ciphertext into the
    stage, then take every plaintext chunk out and pass it on before reading again,
    so a direction that is not waiting on its destination holds no complete record
    in its stage (what ``TlsStage.close`` relies on). Pending per direction: at most
    one chunk of ciphertext in the stage and one unsent tail. Never splices.

    Bytes are counted as plaintext (what the client sent and received, as with the
    plain path); a chunk counts as sent once all of its records are sent."""

    __slots__ = ("src_tls", "dst_tls", "tail_plain", "ending")

    #: Most bytes an unsent tail may grow to when the *other* direction's reads
    #: add a TLS stage's answers to it (alerts, renegotiation refusals) while the
    #: peer reads none of them: one chunk's records and as much again. Past it the
    #: peer is cut. Ordinary traffic adds nothing here.
    MAX_TAIL = 2 * BUFFER_SIZE

    def __init__(
        self,
        relay: HubRelay,
        src: _socket.socket,
        dst: _socket.socket,
        src_side: str,
        dst_side: str,
        uploading: bool,
        src_tls: TlsStage | None,
        dst_tls: TlsStage | None,
    ) -> None:
        super().__init__(relay, src, dst, src_side, dst_side, uploading, False, False)
        self.src_tls = src_tls
        self.dst_tls = dst_tls
        self.tail_plain = 0  # plaintext bytes the unsent tail carries (counted once it has gone)
        self.ending = False  # the source ended: close_notify (the tail) goes out, then SHUT_WR

    def buffered(self) -> bool:
        return self.src_tls is not None and self.src_tls.has_input

    # -- moving chunks ------------------------------------------------------------

    def _copy_in(self) -> None:
        src_tls = self.src_tls
        if src_tls is not None and not self._drain_stage():
            return
        for _ in range(MAX_READS):
            try:
                n = self.src.recv_into(_BUFFER)
            except BlockingIOError:
                return
            except OSError as exc:
                raise SideError(self.src_side, exc) from None
            if src_tls is not None:
                if n:
                    src_tls.feed(_BUFFER[:n])
                else:
                    src_tls.feed_eof()
                if not self._drain_stage() or n < BUFFER_SIZE:
                    return  # blocked or ended; or drained: the next readiness brings more
            elif not n:
                self._end()
                return
            elif not self._pass_on(_BUFFER[:n], n) or n < BUFFER_SIZE:
                return

    def _drain_stage(self) -> bool:
        """Pass on every plaintext chunk the source's stage holds. True when it is
        empty (read the socket again), False when the destination pushes back or
        the source ended."""
        src_tls = self.src_tls
        while True:
            try:
                n = src_tls.read_into(_PLAIN)
            except TlsError as exc:
                raise SideError(self.src_side, exc) from None
            answer = src_tls.data_to_send()
            if answer:  # for the source's peer: the other direction's destination
                self._other().emit(answer)
            if n == NEED_DATA:
                return True
            if not n:
                self._end()
                return False
            if not self._pass_on(_PLAIN[:n], n):
                return False

    def _pass_on(self, chunk: memoryview, n: int) -> bool:
        """Count ``n`` plaintext bytes received and send ``chunk`` on (through the
        destination's stage). False when a tail is left: the direction now waits."""
        conn = self.relay.conn
        conn.last_active = _monotonic()
        if self.uploading:
            conn.add_received(n)
        dst_tls = self.dst_tls
        if dst_tls is not None:
            try:
                out: bytes | memoryview = dst_tls.encrypt(chunk)
            except TlsError as exc:
                raise SideError(self.dst_side, exc) from None
        else:
            out = chunk
        sent = self._send(out)
        if sent == len(out):
            if not self.uploading:
                conn.add_sent(n)
            return True
        # Only the unsent tail is kept; the shared buffers' bytes are copied out.
        self.tail = memoryview(out)[sent:] if dst_tls is not None else memoryview(bytes(out[sent:]))
        self.tail_plain = n
        self._wait_writable()
        return False

    def _send(self, data: bytes | memoryview) -> int:
        try:
            return self.dst.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise SideError(self.dst_side, exc) from None

    def _flush_tail(self) -> None:
        tail = self.tail
        sent = self._send(tail)
        self.relay.conn.last_active = _monotonic()
        if sent < len(tail):
            self.tail = tail[sent:]
            return
        self.tail = None
        if self.tail_plain:
            if not self.uploading:
                self.relay.conn.add_sent(self.tail_plain)
            self.tail_plain = 0
        self.writer.stop()
        if self.ending:
            self._ended()
        elif not self.done:
            self.reader.start(self.on_readable)
            if self.buffered():  # what the stage kept while the destination pushed back
                self._copy_in()

    def emit(self, data: bytes) -> None:
        """Ciphertext the other direction's read made the stage answer to this
        direction's destination (rare and small): it goes out before anything this
        direction sends next, in the order the stage produced it."""
        if self.done or self.ending:
            return  # after close_notify nothing more may go; the transport ends anyway
        if self.tail is not None:
            if len(self.tail) + len(data) > self.MAX_TAIL:
                refused = OSError(errno.ENOBUFS, "the peer sends TLS messages and reads none of the answers")
                raise SideError(self.dst_side, refused)
            self.tail = memoryview(bytes(self.tail) + data)
            return
        sent = self._send(data)
        if sent < len(data):
            self.tail = memoryview(data)[sent:]
            self._wait_writable()

    def _other(self) -> _StagedDirection:
        relay = self.relay
        return relay.down if self.uploading else relay.up  # type: ignore[return-value]

    # -- the end ------------------------------------------------------------------

    def _end(self) -> None:
        """End of stream from the source: close_notify to a TLS destination (once;
        its peer may go on sending, which the other direction still reads), then
        the half-close, as on the plain path."""
        self.reader.stop()
        self.ending = True
        goodbye = self.dst_tls.close() if self.dst_tls is not None else b""
        if goodbye:
            if self.tail is not None:  # the other direction queued an answer meanwhile
                self.tail = memoryview(bytes(self.tail) + goodbye)
                return
            sent = self._send(goodbye)
            if sent < len(goodbye):
                self.tail = memoryview(goodbye)[sent:]
                self._wait_writable()
                return
        elif self.tail is not None:
            return  # the tail goes first; _flush_tail then ends
        self._ended()

    def _ended(self) -> None:
        self.ending = False
        self.done = True
        relay = self.relay
        if not (relay.up.done and relay.down.done):
            shutdown(self.dst, socket.SHUT_WR)
        relay.direction_ended()


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
        addresses: Sequence[tuple[int, tuple]],
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


class HubHandshake:
    """Readies one socket for the relay in hub callbacks: sends ``preamble`` (the
    PROXY protocol header), then runs ``stage``'s TLS handshake, all within
    ``timeout`` seconds (one timer; no greenlet, no ``gevent.Timeout``). Calls
    ``on_ready()`` or ``on_failed(error)`` exactly once, unless cancelled:
    ``TlsError`` (the handshake failed), ``TimeoutError`` or the socket's
    ``OSError``. An unexpected exception goes to ``on_crash``.

    What the peer sent past the handshake (its first application records) stays
    in the stage for the relay (``HubRelay.start`` passes it on)."""

    __slots__ = ("sock", "stage", "pending", "preamble_left", "timeout", "on_ready", "on_failed", "on_crash",
                 "reader", "writer", "timer", "loop")

    #: What a handshake that did not finish in time fails with.
    TIMEOUT_TEXT = "no TLS handshake in time"

    def __init__(
        self,
        sock: _socket.socket,
        stage: TlsStage | None,
        timeout: float,
        on_ready: Callable[[], None],
        on_failed: Callable[[OSError], None],
        on_crash: Callable[[Exception], None],
        preamble: bytes = b"",
    ) -> None:
        self.loop = get_hub().loop
        self.sock = sock
        self.stage = stage
        self.pending = memoryview(preamble)
        #: Bytes of the preamble not sent yet: a failure then is the preamble's.
        self.preamble_left = len(preamble)
        self.timeout = timeout
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.on_crash = on_crash
        self.reader = self.writer = self.timer = None

    def start(self) -> None:
        self.timer = self.loop.timer(self.timeout)
        self.timer.start(self._on_timeout)
        self._guarded(self._step)

    def cancel(self) -> None:
        """Stop every watcher (the socket is its owner's to close)."""
        for watcher in (self.reader, self.writer, self.timer):
            if watcher is not None:
                watcher.close()
        self.reader = self.writer = self.timer = None

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run ``step`` the way every callback here runs: failures end the
        handshake through ``on_failed``, bugs (here or in the callbacks) through
        ``on_crash``; nothing reaches the hub."""
        try:
            try:
                step()
            except OSError as exc:  # TlsError included
                self.cancel()
                self.on_failed(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self.cancel()
            self.on_crash(exc)

    def _step(self) -> None:
        """Send what is pending, then advance the handshake, until it must wait for
        the network or is done."""
        stage = self.stage
        while True:
            if self.pending:
                try:
                    sent = self.sock.send(self.pending)
                except BlockingIOError:
                    sent = 0
                self.pending = self.pending[sent:]
                self.preamble_left = max(0, self.preamble_left - sent)
                if self.pending:
                    self._wait(WRITE)
                    return
            if stage is None or stage.handshaken:
                self.cancel()
                self.on_ready()
                return
            complete = stage.handshake()
            out = stage.data_to_send()
            if out:
                self.pending = memoryview(out)
                continue
            if not complete:
                self._wait(READ)
                return

    def _wait(self, mask: int) -> None:
        """Wait for one readiness: the socket readable (the peer's records) or
        writable (room for ours)."""
        if mask == READ:
            if self.writer is not None and self.writer.active:
                self.writer.stop()
            if self.reader is None:
                self.reader = self.loop.io(self.sock.fileno(), READ)
            if not self.reader.active:
                self.reader.start(self._on_readable)
        else:
            if self.reader is not None and self.reader.active:
                self.reader.stop()
            if self.writer is None:
                self.writer = self.loop.io(self.sock.fileno(), WRITE)
            if not self.writer.active:
                self.writer.start(self._on_writable)

    def _on_readable(self) -> None:
        self._guarded(self._receive)

    def _receive(self) -> None:
        try:
            n = self.sock.recv_into(_BUFFER)
        except BlockingIOError:
            return
        if n:
            self.stage.feed(_BUFFER[:n])
        else:
            self.stage.feed_eof()  # the handshake then fails: the peer left in the middle
        self._step()

    def _on_writable(self) -> None:
        self._guarded(self._step)

    def _on_timeout(self) -> None:
        self._guarded(self._time_out)

    def _time_out(self) -> None:
        raise TimeoutError(self.TIMEOUT_TEXT)


def await_handshake(sock: _socket.socket, stage: TlsStage | None, timeout: float, preamble: bytes = b"") -> None:
    """``HubHandshake`` for a greenlet that must wait for it (one that ran plugin
    hooks or resolved a name): returns once ready, raises what it failed with. The
    handshake itself runs in hub callbacks all the same."""
    result = AsyncResult()
    handshake = HubHandshake(sock, stage, timeout, lambda: result.set(None), result.set_exception,
                             result.set_exception, preamble)
    handshake.start()
    try:
        result.get()
    finally:
        handshake.cancel()  # killed while waiting (a drain cut-off): no watcher left behind


def target_setup_error(error: OSError, preamble_sent: bool) -> str:
    """Words for a target that was connected but not readied: the PROXY protocol
    header could not be sent, or the TLS handshake with it failed or timed out."""
    if not preamble_sent:
        reason = "timed out" if isinstance(error, TimeoutError) else connect_error_text(error)
        return f"cannot send the PROXY protocol header: {reason}"
    if isinstance(error, TlsError):
        return f"TLS handshake with the target failed: {error.reason}"
    if isinstance(error, TimeoutError):
        return "TLS handshake with the target timed out"
    return connect_error_text(error)


def client_handshake_error(error: OSError) -> str:
    """Words for a failed TLS handshake with a client (the ``error`` of its
    ``connection_rejected`` record, reason ``tls``)."""
    return getattr(error, "reason", None) or str(error) or type(error).__name__


@dataclass(frozen=True)
class Route:
    """How one rule's connections reach their target from the hub; fixed for the
    life of the rule's server."""

    #: (family, sockaddr) of the target: an IP literal, never a name to resolve.
    addresses: tuple[tuple[int, tuple], ...]
    connect_timeout: float
    idle_timeout: float
    #: The relay may splice (plain connections only).
    zero_copy: bool = False
    #: The listener's TLS (``tls``): a server-side context, and the deadline of the
    #: client's handshake.
    listener_tls: ssl.SSLContext | None = None
    handshake_timeout: float = 10.0
    #: ``targetTls``: a client-side context, and the name to send and check.
    target_tls: ssl.SSLContext | None = None
    server_name: str | None = None


class HubOwner(Protocol):
    """What a ``HubConnection`` asks of whoever admitted it (the protocol server's
    record of one admitted connection)."""

    def opened(self) -> Connection:
        """The client is ready (its TLS handshake done, if any): its admission
        slot becomes an open, counted connection."""

    def handshake_failed(self, error: str) -> None:
        """The client's TLS handshake failed or timed out: a refusal, reason ``tls``."""

    def preamble(self, client: _socket.socket) -> bytes:
        """What goes to the target before the client's bytes (a PROXY protocol
        header), b"" if nothing; OSError when the client is gone already."""

    def connect_failed(self) -> None:
        """Count an upstream connect failure (TCP, the header or ``targetTls``)."""

    def internal_error(self, exc: BaseException) -> str:
        """Count and log a bug in this connection's code; the text for its record."""


class HubConnection:
    """One connection from admission to close in hub callbacks, never a greenlet:
    the TLS handshake with the client (``tls``), the connect, the PROXY protocol
    header and the TLS handshake with the target (``targetTls``), then
    ``HubRelay``. ``on_done(reason, error)`` (set before ``start``) is called once
    at the end, whatever the step; ``owner.opened()`` tells whether it ever became
    a connection."""

    __slots__ = ("client", "route", "owner", "conn", "client_tls", "target", "target_tls", "preamble", "step",
                 "relay", "on_done", "finished")

    def __init__(self, client: _socket.socket, route: Route, owner: HubOwner) -> None:
        self.client = client
        self.route = route
        self.owner = owner
        self.conn: Connection | None = None
        self.client_tls: TlsStage | None = None
        self.target: _socket.socket | None = None
        self.target_tls: TlsStage | None = None
        self.preamble = b""
        self.step: HubHandshake | HubConnect | None = None
        self.relay: HubRelay | None = None
        self.on_done: Callable[[str, str | None], None] | None = None
        self.finished = False  # on_done was called (before a relay took over)

    def start(self) -> None:
        listener_tls = self.route.listener_tls
        if listener_tls is None:
            self._client_ready()
            return
        self.client_tls = TlsStage.server(listener_tls)
        self.step = HubHandshake(
            self.client, self.client_tls, self.route.handshake_timeout, self._client_ready, self._client_failed,
            self.crash,
        )
        self.step.start()

    def abort(self, reason: str, error: str | None = None) -> None:
        """End the connection now, whatever step it is in; on_done once."""
        if self.relay is not None:
            self.relay.abort(reason, error)
        else:
            self._end(reason, error)

    def crash(self, exc: Exception) -> None:
        """An unexpected exception in a step or the handover to the relay."""
        self.abort(INTERNAL_ERROR, self.owner.internal_error(exc))

    # -- the steps, in order --------------------------------------------------------

    def _client_ready(self) -> None:
        self.step = None
        self.conn = self.owner.opened()
        try:
            self.preamble = self.owner.preamble(self.client)
        except OSError as exc:  # the client reset before its address could be read
            self._end("client_error", exc.strerror or str(exc))
            return
        route = self.route
        self.step = HubConnect(route.addresses, route.connect_timeout, self._connected, self._connect_failed,
                               self.crash)
        self.step.start()

    def _client_failed(self, error: OSError) -> None:
        self.step = None
        self.owner.handshake_failed(client_handshake_error(error))
        self._end("tls", None)

    def _connected(self, target: _socket.socket) -> None:
        self.step = None
        self.target = target
        try:
            for sock in (self.client, target):  # a relay must not add latency to small writes
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # already reset: the relay will see it
            route = self.route
            if route.target_tls is None and not self.preamble:
                self._target_ready()
                return
            if route.target_tls is not None:
                self.target_tls = TlsStage.client(route.target_tls, route.server_name)
            self.step = HubHandshake(target, self.target_tls, route.connect_timeout, self._target_ready,
                                     self._target_failed, self.crash, self.preamble)
            self.step.start()
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self.crash(exc)

    def _connect_failed(self, error: OSError) -> None:
        self.step = None
        self.owner.connect_failed()
        self._end("connect_failed", connect_error_text(error))

    def _target_failed(self, error: OSError) -> None:
        step, self.step = self.step, None
        self.owner.connect_failed()
        self._end("connect_failed", target_setup_error(error, step is None or not step.preamble_left))

    def _target_ready(self) -> None:
        self.step = None
        self.preamble = b""
        route = self.route
        self.relay = HubRelay(
            self.client, self.target, self.conn, route.idle_timeout, route.zero_copy, on_done=self.on_done,
            client_tls=self.client_tls, target_tls=self.target_tls,
        )
        self.relay.start()

    def _end(self, reason: str, error: str | None) -> None:
        """The end before a relay took over: sockets closed, on_done once."""
        if self.finished or self.relay is not None:
            return
        self.finished = True
        step, self.step = self.step, None
        if step is not None:
            step.cancel()
        self.client.close()
        if self.target is not None:
            self.target.close()
        self.on_done(reason, error)
