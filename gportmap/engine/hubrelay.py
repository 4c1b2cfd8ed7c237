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
  only re-arms itself when it fires and something moved meanwhile, or when a
  direction could go on now: bytes waiting on a socket it reads, room on one it
  waits to write to (the process was stalled, not the connection:
  ``gportmap.engine.idle``). Before it cuts, it looks once more after the event
  loop has served everything else pending (``HubRelay.settle_timeout``): a
  tunnel whose entry and exit both run in this process finds its exit's sockets
  empty after a stall until the entry has read what the stall left.

A side may carry stages (``gportmap.engine.stage``: TLS, the WebSocket codec, or a
chain of them, e.g. wss = TLS then WebSocket on the client's side):
``_StagedDirection`` keeps the watchers, the backpressure, the half-close and the
idle clock of the plain direction and replaces only the step that moves a chunk
(decode what came, encode what goes; at most one read of the network in the
stage and one unsent tail per direction). A direction with no stage is exactly
the plain one above, splice included. When the relay cuts a connection, each
side's stage may have a last word for its peer (``Stage.goodbye``: a WebSocket
Close with its status code), sent if it can go at once.

What comes before the relay (the client's TLS handshake, the connect, the PROXY
protocol header, the target's TLS handshake) is ``gportmap.engine.pipeline``; the
connect itself is ``gportmap.engine.connector``.

Watchers are stopped and closed before their sockets are: closing a socket does not
stop a libev watcher, and a reused descriptor number would wake the wrong
connection. No callback lets an exception reach the hub: the hub would stop that
watcher and the connection would hang, counted open, with nobody to end it. An
unexpected one (a bug) ends its connection with ``internal_error`` instead,
counted and logged with its traceback (``gportmap.failures``). Rules with ``on_data``
plugins run them as a stage too (``gportmap.engine.stage.TransformStage``), unless
a plugin says its ``on_data`` may block (``Plugin.may_block``): those keep the
greenlet relays (``gportmap.engine.relay.Relay``, ``WsBridge``), as a hub callback
must never wait.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import time
from collections.abc import Callable, Sequence

from gevent import get_hub

from gportmap.engine.idle import waiting, writable
from gportmap.engine.net import READ, WRITE
from gportmap.engine.relay import BUFFER_SIZE, SPLICE_FLAGS, SideError, close_fd, make_pipe, shutdown
from gportmap.engine.stage import NEED_DATA, Stage, StageError, chain
from gportmap.engine.tls import TlsStage
from gportmap.failures import report_internal_error
from gportmap.platform import Features, relay_mode
from gportmap.reasons import CloseReason
from gportmap.stats import Connection

#: Reads one readiness callback may do before it lets other connections run.
MAX_READS = 16

_BUFFER = memoryview(bytearray(BUFFER_SIZE))
#: Bytes out of a stage: shared like ``_BUFFER`` (what was read into ``_BUFFER`` is
#: copied into the stage before anything is taken out).
_PLAIN = memoryview(bytearray(BUFFER_SIZE))
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

    ``client_stages`` / ``target_stages``: the stages on the client's side and
    the target's, outermost (the network's) first, ready to carry bytes (their
    handshakes done). ``client_tls`` / ``target_tls``: a TLS stage for that side,
    put outside its other stages. With any stage, both directions go through
    ``_StagedDirection``. Without, the plain path, splice included.

    ``target_reader``: a stopped io watcher on ``target`` to read it with (the
    connect's, ``HubConnect.spare``), the relay's to close from now on; None: one
    is made."""

    __slots__ = ("client", "target", "conn", "idle", "on_done", "up", "down", "timer", "reason", "loop",
                 "settle", "moved")

    #: Seconds at most that a connection whose idle clock ran out waits for the
    #: event loop to serve everything else pending before it is cut (see the
    #: module docstring). An idle loop answers at once; under load an idle cut
    #: comes at most this late.
    settle_timeout = 1.0
    #: Splice every plain direction from its first byte, not only once it streams,
    #: so that the splice path sees every kind of traffic (``GPORTMAP_RELAY=splice``:
    #: ``Features.splice_first``). None until ``configure`` sets it from the
    #: process's features at start; a relay made before that reads the environment
    #: once (``gportmap.platform.relay_mode``) and sets it.
    splice_first: bool | None = None

    @classmethod
    def configure(cls, features: Features) -> None:
        """Take the process's relay policy from its features (once, at start)."""
        cls.splice_first = features.splice_first

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
        client_stages: Sequence[Stage] = (),
        target_stages: Sequence[Stage] = (),
        target_reader=None,  # noqa: ANN001 - a gevent io watcher
    ) -> None:
        self._init_state(client, target, conn, idle_timeout, on_done)
        if client_tls is None and target_tls is None and not client_stages and not target_stages:
            client_stage = target_stage = None  # the plain path (most connections): no chain to make
        else:
            client_stage = chain(([client_tls] if client_tls is not None else []) + list(client_stages))
            target_stage = chain(([target_tls] if target_tls is not None else []) + list(target_stages))
        if client_stage is None and target_stage is None:
            splice = zero_copy and _splice is not None
            if splice_first is None:
                splice_first = HubRelay.splice_first
                if splice_first is None:
                    splice_first = HubRelay.splice_first = relay_mode() == "splice"
            self.up = _Direction(self, client, target, "client", "target", True, splice, splice_first)
            self.down = _Direction(self, target, client, "target", "client", False, splice, splice_first,
                                   target_reader)  # fmt: skip
        else:
            self.up = _StagedDirection(self, client, target, "client", "target", True, client_stage, target_stage)
            self.down = _StagedDirection(self, target, client, "target", "client", False, target_stage, client_stage,
                                         target_reader)  # fmt: skip

    def _init_state(
        self,
        client: _socket.socket,
        target: _socket.socket,
        conn: Connection,
        idle_timeout: float,
        on_done: Callable[[str, str | None], None] | None,
    ) -> None:
        """What every relay of this contract holds besides its directions (a
        ``PumpRelay``'s are a C pair)."""
        self.loop = get_hub().loop
        self.client = client
        self.target = target
        self.conn = conn
        self.idle = idle_timeout
        self.on_done = on_done
        self.reason: str | None = None
        self.timer = None
        self.settle = None  # the watchers of the last look before an idle cut
        self.moved = 0.0

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
            self._goodbye(reason, error)
            shutdown(self.client, socket.SHUT_RDWR)
            shutdown(self.target, socket.SHUT_RDWR)
            self._finish(reason, error)

    def fail(self, exc: SideError) -> None:
        reason = getattr(exc.error, "close_reason", None) or CloseReason.side_error(exc.side)  # a stage may name its own
        self.abort(reason, exc.error.strerror or str(exc.error))

    def crash(self, exc: Exception) -> None:
        """An unexpected exception in one of this connection's callbacks: counted,
        logged once with its traceback, and this connection (only) ends."""
        conn = self.conn
        self.abort(CloseReason.INTERNAL_ERROR, report_internal_error(conn.stats, conn.client, conn.target, exc))

    @property
    def plain(self) -> bool:
        """No stage on either side: the relay's state is its sockets' and
        ``freeze`` says all of it (what an upgrade can carry)."""
        return type(self.up) is _Direction and type(self.down) is _Direction

    def _goodbye(self, reason: str, error: str | None) -> None:
        """Each side's stage's last word before a cut (see the class docstring)."""
        self.up.goodbye(reason, error)
        self.down.goodbye(reason, error)

    def direction_ended(self) -> None:
        if self.up.done and self.down.done:
            self._finish(CloseReason.CLOSED, None)

    # -- handing a connection to another process (an upgrade in place) ---------------

    def freeze(self) -> tuple[tuple[bytes, bool], tuple[bytes, bool]]:
        """A plain relay's state, per direction (up, down): the bytes read and not
        yet written (a splice pipe's drained into the tail), and whether its end was
        read. The relay stays consistent: it may go on if the hand-over fails."""
        return self.up.pending(), self.down.pending()

    def release(self) -> None:
        """Let go of a connection another process now owns: every watcher stopped,
        the descriptors closed without the ``shutdown`` of an abort (which would end
        it for the new owner too), nobody told (it did not end)."""
        self.on_done = _nobody
        self._finish(CloseReason.CARRIED, None)

    def resume(self, up: tuple[bytes, bool], down: tuple[bytes, bool]) -> None:
        """After ``start``: go on from a state ``freeze`` gave in another process."""
        self.up.resume(*up)
        self.down.resume(*down)
        if self.reason is None:
            self.direction_ended()

    def _arm(self, after: float) -> None:
        self.timer = self.loop.timer(after)
        self.timer.start(self._on_timer)

    def _on_timer(self) -> None:
        try:
            remaining = self.conn.last_active + self.idle - _monotonic()
            self.timer.close()
            if remaining > 0:
                self._arm(remaining)
            elif self._could_go_on():
                self._arm(self.idle)  # bytes wait for a stalled process: not idle
            else:
                self._look_again()
        except Exception as exc:  # noqa: BLE001 - a bug: see the module docstring
            self.crash(exc)

    def _could_go_on(self) -> bool:
        """A direction could move bytes now: some waiting on a socket it reads (not
        one paused by backpressure: those bytes are a stalled peer's, not activity;
        nor one whose end was read: an end stays readable for ever), or room on a
        socket it waits to write to. Two polls with a zero timeout."""
        return waiting(self._reading_fds()) or writable(self._writing_fds())

    def _reading_fds(self) -> list[int]:
        """The descriptors a direction reads now (not one paused or ended)."""
        return [d.src.fileno() for d in (self.up, self.down) if d.reader.active]

    def _writing_fds(self) -> list[int]:
        """The descriptors a direction waits to write to."""
        return [d.dst.fileno() for d in (self.up, self.down) if d.writer is not None and d.writer.active]

    def _look_again(self) -> None:
        """The clock ran out and nothing could move: look once more when the loop
        has nothing else pending (an idle watcher), or after ``settle_timeout``."""
        self.moved = self.conn.last_active
        idle, timer = self.loop.idle(), self.loop.timer(self.settle_timeout)
        self.settle = (idle, timer)
        idle.start(self._on_settled)
        timer.start(self._on_settled)

    def _on_settled(self) -> None:
        try:
            for watcher in self.settle:
                watcher.close()
            self.settle = None
            if self.conn.last_active != self.moved or self._could_go_on():
                self.conn.last_active = _monotonic()
                self._arm(self.idle)
            else:
                self.abort(CloseReason.IDLE_TIMEOUT)
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
        if self.settle is not None:
            for watcher in self.settle:
                watcher.close()
            self.settle = None
        self._close_directions()
        self.client.close()
        self.target.close()
        self.on_done(reason, error)

    def _close_directions(self) -> None:
        """Every watcher and pipe of both directions closed (not the sockets)."""
        self.up.close()
        self.down.close()


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
        reader=None,  # noqa: ANN001 - a stopped gevent io watcher on src to reuse
    ) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.src_side, self.dst_side = src_side, dst_side
        self.uploading = uploading
        if reader is None:
            reader = relay.loop.io(src.fileno(), READ)
        else:
            reader.events = READ  # a watcher's events may change while it is stopped
        self.reader = reader
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

    def pending(self) -> tuple[bytes, bool]:
        """(bytes read and not yet written, end read): the unsent tail, then what
        the splice pipe holds (the two never coexist: a direction with a tail reads
        nothing more). The pipe is drained into the tail; its reads never block."""
        tail = bytes(self.tail) if self.tail is not None else b""
        if self.pipe is not None and self.piped:
            chunks, left = [tail], self.piped
            while left:
                try:
                    chunk = os.read(self.pipe[0], left)
                except BlockingIOError:
                    chunk = b""
                if not chunk:
                    break  # the count said more than the pipe held: nothing is waiting
                chunks.append(chunk)
                left -= len(chunk)
            tail = b"".join(chunks)
            self.piped = 0
            self.tail = memoryview(tail)
        return tail, self.done

    def resume(self, tail: bytes, done: bool) -> None:
        """Take on a frozen state: an end read stays read (no second half-close: the
        FIN went out before), a tail goes out before reading resumes."""
        if done:
            self.done = True
            self.reader.stop()
        if tail:
            self.tail = memoryview(tail)
            self._wait_writable()

    def goodbye(self, reason: str, error: str | None) -> None:
        """The relay cuts the connection: nothing to say on the plain path."""


class _StagedDirection(_Direction):
    """A direction through stages on either end or both: what ``src`` sends is
    decoded by ``src_stage``, what goes to ``dst`` is encoded by ``dst_stage``.

    Everything but the step that moves a chunk is the plain direction's: the
    watchers, the stop-reading-while-a-tail-waits backpressure, the half-close, the
    callbacks' error handling. The step: read one chunk from the network into the
    stage, then take every decoded chunk out and pass it on before reading again,
    so a direction that is not waiting on its destination holds no complete record
    in its stage (what ``TlsStage.close`` relies on). Pending per direction: at most
    one read of the network in the stage and one unsent tail. Never splices.

    Bytes are counted as the relay's (plaintext, WebSocket payloads: what the
    client sent and received, as with the plain path); a chunk counts as sent once
    all of its encoding is sent."""

    __slots__ = ("src_stage", "dst_stage", "tail_plain", "ending")

    #: Most bytes an unsent tail may grow to when the *other* direction's reads
    #: add a stage's answers to it (TLS alerts, WebSocket pongs) while the peer
    #: reads none of them: one chunk's encoding and as much again. Past it the
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
        src_stage: Stage | None,
        dst_stage: Stage | None,
        reader=None,  # noqa: ANN001 - as _Direction's
    ) -> None:
        super().__init__(relay, src, dst, src_side, dst_side, uploading, False, False, reader)
        self.src_stage = src_stage
        self.dst_stage = dst_stage
        self.tail_plain = 0  # relayed bytes the unsent tail carries (counted once it has gone)
        self.ending = False  # the source ended: the stage's close (the tail) goes out, then SHUT_WR

    def buffered(self) -> bool:
        return self.src_stage is not None and self.src_stage.has_input

    def goodbye(self, reason: str, error: str | None) -> None:
        """The relay cuts the connection: the destination's stage's last word (a
        WebSocket Close), if nothing of this direction is still on its way (it
        would land in the middle of a frame) and it goes at once."""
        dst_stage = self.dst_stage
        if dst_stage is None or self.done or self.ending or self.tail is not None:
            return
        try:
            word = dst_stage.goodbye(reason, error)
            if word:
                self.dst.send(word)
        except (OSError, StageError):
            pass  # best effort: the peer may be the problem

    # -- moving chunks ------------------------------------------------------------

    def _copy_in(self) -> None:
        src_stage = self.src_stage
        if src_stage is not None and not self._drain_stage():
            return
        for _ in range(MAX_READS):
            try:
                n = self.src.recv_into(_BUFFER)
            except BlockingIOError:
                return
            except OSError as exc:
                raise SideError(self.src_side, exc) from None
            if src_stage is not None:
                if n:
                    src_stage.feed(_BUFFER[:n])
                else:
                    src_stage.feed_eof()
                if not self._drain_stage() or n < BUFFER_SIZE:
                    return  # blocked or ended; or drained: the next readiness brings more
            elif not n:
                self._end()
                return
            elif not self._pass_on(_BUFFER[:n], n) or n < BUFFER_SIZE:
                return

    def _drain_stage(self) -> bool:
        """Pass on every decoded chunk the source's stage holds. True when it is
        empty (read the socket again), False when the destination pushes back or
        the source ended."""
        src_stage = self.src_stage
        while True:
            try:
                n = src_stage.read_into(_PLAIN)
            except StageError as exc:
                raise SideError(self.src_side, exc) from None
            answer = src_stage.data_to_send()
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
        """Count ``n`` relayed bytes received and send ``chunk`` on (through the
        destination's stage). False when a tail is left: the direction now waits."""
        conn = self.relay.conn
        conn.last_active = _monotonic()
        if self.uploading:
            conn.add_received(n)
        dst_stage = self.dst_stage
        if dst_stage is not None:
            try:
                out: bytes | memoryview = dst_stage.encode(chunk)
            except StageError as exc:
                raise SideError(self.dst_side, exc) from None
        else:
            out = chunk
        sent = self._send(out)
        if sent == len(out):
            if not self.uploading:
                conn.add_sent(n)
            return True
        # Only the unsent tail is kept; the shared buffers' bytes are copied out.
        self.tail = memoryview(out)[sent:] if dst_stage is not None else memoryview(bytes(out[sent:]))
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
        """Bytes the other direction's read made the stage answer to this
        direction's destination (rare and small: a TLS alert, a pong): they go out
        before anything this direction sends next, in the order the stage produced
        them, and between whole frames or records (a tail is the rest of one)."""
        if self.done or self.ending:
            return  # after the stage's close nothing more may go; the transport ends anyway
        if self.tail is not None:
            if len(self.tail) + len(data) > self.MAX_TAIL:
                refused = OSError(errno.ENOBUFS, "the peer sends control messages and reads none of the answers")
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
        """End of stream from the source: the destination stage's close (TLS
        close_notify, a WebSocket Close(1000); once: its peer may go on sending,
        which the other direction still reads), then the half-close, as on the
        plain path, unless the stage ends its transport only with the connection."""
        self.reader.stop()
        self.ending = True
        goodbye = self.dst_stage.close() if self.dst_stage is not None else b""
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
        dst_stage = self.dst_stage
        if not (relay.up.done and relay.down.done) and (dst_stage is None or dst_stage.half_close):
            shutdown(self.dst, socket.SHUT_WR)
        relay.direction_ended()


def _nobody(reason: str, error: str | None) -> None:
    """The end of a connection this process no longer owns: nothing to account."""
