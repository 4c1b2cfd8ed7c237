"""Relay between a TCP socket and a WebSocket, in either role, with a greenlet per
direction: for rules with ``on_data`` plugins that may block (``Plugin.may_block``).
Every other WebSocket connection goes through the hub relay with the WebSocket
stage (``gportmap.engine.wsstage``), which keeps the behaviour described here.

Server role (a ``websocket`` rule): the WebSocket peer is the client, its frames
arrive masked, ours go out unmasked. Client role (a tcp rule with
``targetProtocol: "websocket"``, the tunnel's entry): the WebSocket peer is the
target, and we mask. Either way:

- TCP bytes go out as binary frames, framed in place in a pooled buffer (the
  payload is received 14 bytes into the buffer and the header written in front);
- frames are parsed straight out of pooled receive buffers and their payload is
  forwarded piece by piece, never assembled; ``maxMessageSize`` is enforced from the
  headers, so a 2 GiB announcement is refused (1009) before a byte of it is read;
- the data payloads found in one read are unmasked in place and written to TCP
  together, one send per read however many small messages it held (TCP keeps no
  boundaries, and websockify does the same in the other direction: one frame per
  TCP read); a read that fills the buffer is followed by another at once;
- the ends map like a half-close: TCP EOF sends Close(1000) once everything before
  it is out; the peer's Close (or EOF) shuts down the TCP side's write direction,
  and the other way keeps flowing until it ends too; pings are answered;
- both directions write to the WebSocket under one lock, so a pong never lands in
  the middle of a data frame;
- the idle clock reads traffic missed, not time passed: when ``idleTimeout`` runs
  out, the connection is cut only if neither direction could go on now (nothing
  to read where a direction waits to read, no room where one waits to write),
  and still cannot once the event loop has served everything else pending.
  Otherwise the process was stalled (a SIGSTOP, a long reload, swapping), not the
  connection: its clock starts again and the bytes move. The second look is for
  bytes one hop away in this same process: a tunnel whose entry and exit both run
  here finds its exit's sockets empty after a stall until the entry has read
  what the stall left on its own.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import gevent
from gevent.lock import Semaphore

from gportmap.engine import wsframe
from gportmap.engine.idle import waiting, writable
from gportmap.engine.relay import (
    WOULD_BLOCK,
    BufferPool,
    IdleTimeout,
    SideError,
    has_pending,
    send_all,
    shutdown,
    wait_readable,
)
from gportmap.failures import report_internal_error
from gportmap.plugins import DOWNSTREAM, UPSTREAM, HookError, Reject, log_hook_error
from gportmap.reasons import CloseReason
from gportmap.stats import Connection

_HEADROOM = wsframe.MAX_HEADER


def _backing(buf: memoryview) -> bytearray | None:
    """The bytearray a pooled buffer views, when the view covers all of it (so its
    offsets are the bytearray's), else None and the caller masks through the view."""
    store = buf.obj
    return store if type(store) is bytearray and len(store) == len(buf) else None


class WsBridge:
    """One bridged connection; ``run()`` returns the close reason like ``Relay.run``."""

    #: Seconds at most that a connection whose idle clock ran out waits for the event
    #: loop to serve everything else pending before it is cut (``_check_idle``). An
    #: idle loop answers at once; under load an idle cut comes at most this late.
    settle_timeout = 1.0

    def __init__(
        self,
        ws: socket.socket,
        leftover: bytes,
        tcp: socket.socket,
        conn: Connection,
        idle_timeout: float,
        pool: BufferPool,
        max_message: int,
        client_role: bool,
        transform: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        self.ws, self.tcp, self.conn = ws, tcp, conn
        self.ws_fd, self.tcp_fd = ws.fileno(), tcp.fileno()
        self.idle, self.pool, self.max_message = idle_timeout, pool, max_message
        self.client_role = client_role
        self.transform = transform  # the plugins' on_data chain, or None
        # Which side is gportmap's client, for counters and error reasons.
        self.ws_side, self.tcp_side = ("target", "client") if client_role else ("client", "target")
        self.reason: str | None = None
        self.error: str | None = None
        self._pending = leftover  # bytes read past the handshake: the first frames
        self._lock = Semaphore()
        self._close_sent = False
        self._close_received = False
        #: What each direction's greenlet waits for now, (fd, to write): what the idle
        #: check asks the kernel about. A direction that has ended waits for nothing.
        self._waits: dict[object, tuple[int, bool]] = {}

    # -- orchestration ----------------------------------------------------------------

    def run(self) -> str:
        self.ws.settimeout(0.0)
        self.tcp.settimeout(0.0)
        outbound = gevent.spawn(self._guard, self._tcp_to_ws)
        try:
            self._guard(self._ws_to_tcp)
            outbound.join()
        finally:
            outbound.kill(block=True)
        return self.reason or CloseReason.CLOSED

    def _guard(self, direction) -> None:
        try:
            direction()
        except IdleTimeout:
            self._abort(CloseReason.IDLE_TIMEOUT, None, wsframe.CLOSE_GOING_AWAY)
        except wsframe.FrameError as exc:
            self._abort(CloseReason.side_error(self.ws_side), exc.reason, exc.code)
        except SideError as exc:
            code = wsframe.CLOSE_INTERNAL_ERROR if exc.side != self.ws_side else None
            self._abort(CloseReason.side_error(exc.side), exc.error.strerror or str(exc.error), code)
        except (HookError, Reject) as exc:
            if isinstance(exc, HookError):
                log_hook_error(exc, self.conn.stats.name, self.conn.client)
            self._abort(CloseReason.PLUGIN_ERROR, str(exc), wsframe.CLOSE_INTERNAL_ERROR)
        except Exception as exc:  # noqa: BLE001 - a bug: this connection ends (1011), counted and logged
            conn = self.conn
            text = report_internal_error(conn.stats, conn.client, conn.target, exc)
            self._abort(CloseReason.INTERNAL_ERROR, text, wsframe.CLOSE_INTERNAL_ERROR, told="internal error")  # no details out

    def _abort(self, reason: str, error: str | None, close_code: int | None, told: str | None = None) -> None:
        """End both directions; the WebSocket peer gets a Close with ``close_code``
        and ``told`` (default: the error text) as its reason."""
        if self.reason is None:
            self.reason, self.error = reason, error
            if close_code is not None and not self._close_sent and self._lock.acquire(blocking=False):
                told = (error or "") if told is None else told
                try:  # best effort, never waits: the peer may be the problem
                    self.ws.send(self._control(wsframe.OP_CLOSE, wsframe.close_payload(close_code, told)))
                    self._close_sent = True
                except OSError:
                    pass
                finally:
                    self._lock.release()
        shutdown(self.ws, socket.SHUT_RDWR)
        shutdown(self.tcp, socket.SHUT_RDWR)

    # -- the idle clock ---------------------------------------------------------------

    def _wait_readable(self, fd: int) -> None:
        """Wait until ``fd`` is readable, on the connection's idle clock (``_check_idle``)."""
        me = gevent.getcurrent()
        self._waits[me] = (fd, False)
        try:
            while True:
                try:
                    wait_readable(fd, self.conn, self.idle)
                    return
                except IdleTimeout:
                    self._check_idle()
        finally:
            self._waits.pop(me, None)

    def _send_all(self, sock: socket.socket, fd: int, view: memoryview, side: str) -> None:
        """Write all of ``view``, on the connection's idle clock (``_check_idle``)."""
        me = gevent.getcurrent()
        self._waits[me] = (fd, True)
        sent = 0

        def advance(n: int) -> None:
            nonlocal sent
            sent += n

        try:
            while True:
                try:
                    send_all(sock, fd, view[sent:], side, self.conn, self.idle, advance)
                    return
                except IdleTimeout:
                    self._check_idle()
        finally:
            self._waits.pop(me, None)

    def _check_idle(self) -> None:
        """``idleTimeout`` ran out: raise IdleTimeout if the connection was idle. If a
        direction could go on now, the process was stalled, not the connection: its
        clock starts again. Looked at twice: now, and once the loop has served what
        else is pending (a stall's backlog elsewhere in this process may be about to
        reach this connection). Only when the clock runs out, never per chunk."""
        if self._could_go_on():
            self.conn.last_active = time.monotonic()
            return
        moved = self.conn.last_active
        with gevent.Timeout(self.settle_timeout, False):
            gevent.idle()
        # Ended meanwhile (by the other direction): raise too, its reason stays (``_abort``).
        if self.reason is None and (self.conn.last_active != moved or self._could_go_on()):
            self.conn.last_active = time.monotonic()
            return
        raise IdleTimeout()

    def _could_go_on(self) -> bool:
        """A direction could move bytes now: some waiting where it reads (or an end),
        room where it writes. Two polls with a zero timeout."""
        waits = list(self._waits.values())
        reads = [fd for fd, writes in waits if not writes]
        return waiting(reads) or writable([fd for fd, writes in waits if writes])

    # -- writing frames ---------------------------------------------------------------

    def _control(self, opcode: int, payload: bytes) -> bytes:
        if self.client_role:
            mask = os.urandom(4)
            body = bytearray(payload)
            wsframe.mask_in_place(memoryview(body), mask)
            return wsframe.encode_header(opcode, len(body), mask) + bytes(body)
        return wsframe.encode_header(opcode, len(payload)) + payload

    def _send_ws(self, view: memoryview, payload: int = 0) -> None:
        """Send one whole frame; ``payload`` bytes of it count as sent to/received from the client."""
        with self._lock:
            if self._close_sent:
                return  # after our Close, nothing more may be sent
            self._send_all(self.ws, self.ws_fd, view, self.ws_side)
        if payload:
            (self.conn.add_received if self.client_role else self.conn.add_sent)(payload)

    def _send_close(self, code: int) -> None:
        frame = self._control(wsframe.OP_CLOSE, wsframe.close_payload(code))
        with self._lock:
            if not self._close_sent:
                self._send_all(self.ws, self.ws_fd, memoryview(frame), self.ws_side)
                self._close_sent = True

    # -- TCP -> WebSocket ---------------------------------------------------------------

    def _tcp_to_ws(self) -> None:
        tcp, fd, pool, conn = self.tcp, self.tcp_fd, self.pool, self.conn
        full = False  # the last read filled the buffer: more is likely waiting
        while True:
            if not full and not has_pending(tcp):  # a TLS target may hold decrypted bytes already
                self._wait_readable(fd)
            if self.reason is not None:
                return
            buf = pool.take()
            try:
                try:
                    n = tcp.recv_into(buf[_HEADROOM:])
                except WOULD_BLOCK:
                    full = False
                    continue
                except OSError as exc:
                    raise SideError(self.tcp_side, exc) from None
                if not n:
                    self._send_close(wsframe.CLOSE_NORMAL)
                    if self._close_received:
                        shutdown(self.ws, socket.SHUT_WR)
                    return
                conn.last_active = time.monotonic()
                full = n == len(buf) - _HEADROOM
                if self.transform is not None:
                    self._send_transformed(buf[_HEADROOM : _HEADROOM + n])
                    continue
                mask = os.urandom(4) if self.client_role else None
                if mask is not None:
                    store = _backing(buf)
                    if store is not None:
                        wsframe.unmask_range(store, _HEADROOM, _HEADROOM + n, mask)
                    else:
                        wsframe.mask_in_place(buf[_HEADROOM : _HEADROOM + n], mask)
                header = wsframe.encode_header(wsframe.OP_BINARY, n, mask)
                start = _HEADROOM - len(header)
                buf[start:_HEADROOM] = header
                self._send_ws(buf[start : _HEADROOM + n], payload=n)
            finally:
                pool.give(buf)

    def _send_transformed(self, chunk: memoryview) -> None:
        """The copying path for a rule with an on_data plugin: TCP bytes through the
        chain, then framed (the payload size may have changed)."""
        direction = DOWNSTREAM if not self.client_role else UPSTREAM
        data = bytearray(self.transform(direction, bytes(chunk)))
        if not data:
            return
        mask = os.urandom(4) if self.client_role else None
        if mask is not None:
            wsframe.mask_in_place(memoryview(data), mask)
        frame = wsframe.encode_header(wsframe.OP_BINARY, len(data), mask) + bytes(data)
        self._send_ws(memoryview(frame), payload=len(data))

    # -- WebSocket -> TCP ---------------------------------------------------------------

    def _ws_to_tcp(self) -> None:
        reader = _FrameReader(self)
        reader.run()
        # The peer closed (frame or EOF): pass the end on as a half-close.
        self._close_received = True
        shutdown(self.tcp, socket.SHUT_WR)
        if self._close_sent:
            shutdown(self.ws, socket.SHUT_WR)


class _FrameReader:
    """Parses the peer's frames out of pooled buffers and forwards data payloads.

    Per read, every data payload in the buffer is unmasked in place and slid down
    against the one before it (a memmove over the headers between them), and the
    whole run goes to TCP in one write: a burst of small messages costs one send,
    not one per message. TCP promises no boundaries, so nothing is lost by joining
    them; a Close, a protocol error or the end of the buffer writes what was joined
    so far first.
    """

    def __init__(self, bridge: WsBridge) -> None:
        self.b = bridge
        self.partial = b""  # an incomplete header carried between reads (at most 13 bytes)
        self.header: wsframe.Header | None = None
        self.remaining = 0  # payload bytes of the current frame not yet seen
        self.offset = 0  # payload bytes of the current frame already seen (mask rotation)
        self.in_message = False  # between a non-final data frame and its last continuation
        self.message_size = 0
        self.control = bytearray()

    def run(self) -> None:
        b = self.b
        fd, pool = b.ws_fd, b.pool
        while True:
            if not b._pending and not has_pending(b.ws):
                b._wait_readable(fd)  # holding no buffer while the peer is quiet
                if b.reason is not None:
                    return
            buf = pool.take()
            try:
                while True:  # read again at once while reads fill the buffer
                    filled = self._fill(buf)
                    if filled is None:
                        return  # EOF: treated like a Close without a status
                    if self._consume(buf, filled):
                        return  # a Close frame arrived
                    if b.reason is not None:
                        return
                    if filled < len(buf) and not b._pending and not has_pending(b.ws):
                        break  # drained: wait again without holding the buffer
            finally:
                pool.give(buf)

    def _fill(self, buf: memoryview) -> int | None:
        """Put the carried partial header and what is available in ``buf``; None on EOF."""
        b = self.b
        start = len(self.partial)
        buf[:start] = self.partial
        self.partial = b""
        if b._pending:
            take = min(len(b._pending), len(buf) - start)
            buf[start : start + take] = b._pending[:take]
            b._pending = b._pending[take:]
            return start + take
        try:
            n = b.ws.recv_into(buf[start:])
        except WOULD_BLOCK:
            return start  # woken without data: nothing new
        except OSError as exc:
            raise SideError(b.ws_side, exc) from None
        if not n:
            return None
        b.conn.last_active = time.monotonic()
        return start + n

    def _consume(self, buf: memoryview, end: int) -> bool:
        """Process every complete piece of ``buf[:end]``; True once a Close frame is handled.

        ``run_start:run_end`` is the joined data not yet written to TCP; it only
        grows downwards of ``pos``, so sliding a payload never overwrites bytes not
        yet parsed.
        """
        store = _backing(buf)
        view = buf[:end]  # parse_header must not see stale bytes past the read
        pos = run_start = run_end = 0
        small_ok = not self.b.client_role  # only clients mask, and the fast path unmasks
        max_message = self.b.max_message
        try:
            while pos < end:
                header = self.header
                if header is None and small_ok and not self.in_message:
                    # Fast path, the bulk of small-message traffic: a whole, final, masked
                    # text or binary frame of under 126 bytes, entirely in this buffer.
                    # It passes every check of parse_header and _begin, so it is unmasked
                    # straight to the end of the joined run in one step.
                    first, second = view[pos], view[pos + 1] if pos + 1 < end else 0
                    length = second - 0x80
                    start = pos + 6
                    if (first == 0x82 or first == 0x81) and 0 <= length < 126 and start + length <= end:
                        if length > max_message:
                            raise wsframe.FrameError(
                                wsframe.CLOSE_TOO_BIG, f"message of {length} bytes exceeds maxMessageSize"
                            )
                        if run_end == run_start:
                            run_start = run_end = start
                        stop = start + length
                        key = bytes(view[pos + 2 : start]) * ((length >> 2) + 1)
                        view[run_end : run_end + length] = (
                            int.from_bytes(view[start:stop], "big") ^ int.from_bytes(key[:length], "big")
                        ).to_bytes(length, "big")
                        run_end += length
                        pos = stop
                        continue
                if header is None:
                    header = wsframe.parse_header(view, pos)
                    if header is None:
                        self.partial = bytes(view[pos:end])
                        break
                    self._begin(header)
                    pos += header.size
                    if self.remaining:
                        continue
                else:
                    take = min(self.remaining, end - pos)
                    if header.mask is None:
                        pass
                    elif store is not None:
                        wsframe.unmask_range(store, pos, pos + take, header.mask, self.offset)
                    else:
                        wsframe.mask_in_place(view[pos : pos + take], header.mask, self.offset)
                    self.offset += take
                    self.remaining -= take
                    if header.opcode & 0x8:  # a control frame: at most 125 bytes, kept aside
                        self.control += view[pos : pos + take]
                    elif run_end == pos:  # right behind the joined run (or the first piece)
                        run_end += take
                    elif run_end == run_start:  # nothing joined yet: start here, no move
                        run_start, run_end = pos, pos + take
                    else:
                        view[run_end : run_end + take] = view[pos : pos + take]
                        run_end += take
                    pos += take
                    if self.remaining:
                        continue
                if self._finish():
                    self._forward(view[run_start:run_end])
                    return True
        except wsframe.FrameError:
            self._forward(view[run_start:run_end])  # what came before the bad frame still counts
            raise
        self._forward(view[run_start:run_end])
        return False

    def _forward(self, chunk: memoryview) -> None:
        """Write joined data payloads to the TCP side."""
        count = len(chunk)
        if not count:
            return
        b = self.b
        if b.transform is not None:
            chunk = memoryview(b.transform(DOWNSTREAM if b.client_role else UPSTREAM, bytes(chunk)))
        b._send_all(b.tcp, b.tcp_fd, chunk, b.tcp_side)
        if b.client_role:
            b.conn.add_sent(len(chunk))
        else:
            b.conn.add_received(count)

    def _begin(self, header: wsframe.Header) -> None:
        b = self.b
        if b.client_role and header.mask is not None:
            raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "a server must not mask its frames")
        if not b.client_role and header.mask is None:
            raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "a client must mask its frames")
        opcode = header.opcode
        if opcode < wsframe.OP_CLOSE:  # a data frame
            continuation = opcode == wsframe.OP_CONTINUATION
            if continuation != self.in_message:
                raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "unexpected continuation frame")
            self.message_size = (self.message_size + header.length) if continuation else header.length
            if self.message_size > b.max_message:
                raise wsframe.FrameError(
                    wsframe.CLOSE_TOO_BIG, f"message of {self.message_size} bytes exceeds maxMessageSize"
                )
            self.in_message = not header.fin
        elif self.control:
            self.control.clear()
        self.header, self.remaining, self.offset = header, header.length, 0

    def _finish(self) -> bool:
        header, b = self.header, self.b
        assert header is not None
        self.header = None
        if header.opcode == wsframe.OP_PING:
            b._send_ws(memoryview(b._control(wsframe.OP_PONG, bytes(self.control))))
        elif header.opcode == wsframe.OP_CLOSE:
            return True
        return False
