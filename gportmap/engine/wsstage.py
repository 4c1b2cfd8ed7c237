"""The WebSocket codec as a sans-IO stage of the hub relay, for both roles.

Server role (a ``websocket`` rule): the peer is gportmap's client, its frames
come masked, ours go out unmasked. Client role (the entry of a tunnel, a tcp rule
with ``targetProtocol: "websocket"``): the peer is the target, and we mask. The
stage sits on the WebSocket peer's side of ``HubRelay``; the other side is plain
TCP (``gportmap.engine.stage`` says what a stage is):

- ``read_into``: data payloads out as they come, unmasked, never a whole message
  assembled: the payloads of consecutive frames are joined into the caller's
  buffer (TCP keeps no boundaries), so a burst of small messages is one send.
  ``maxMessageSize`` is checked against each header, so an oversized message is
  refused (1009) before a byte of it is read. Pings are answered (the pong comes
  out of ``data_to_send``); the peer's Close, or its transport's end, is the end
  (``read_into`` gives 0), and what follows a Close is ignored.
- ``encode``: TCP bytes out as one binary frame per chunk (masked in client role).
- ``close``: Close(1000), sent when the TCP side's stream ends, after everything
  before it. ``half_close`` is False: the relay does not shut the WebSocket's
  transport after it, the peer may go on sending until its own Close (the other
  way keeps flowing); the transport ends with the connection, once both ways are
  done, as ``WsBridge`` does.
- ``goodbye``: the Close a cut connection ends with: the protocol error's code
  (1002, 1009) and reason, 1001 for ``idle_timeout`` and ``stopped``, 1011 when
  the TCP side failed or for a bug (whose details stay in the log), nothing when
  the WebSocket peer's own transport failed.

Bounds (per connection): the input holds at most one read of the network (the
relay feeds again only after ``NEED_DATA``) plus a partial header (13 bytes), and
nothing once it is read (an idle connection keeps no buffer); a
control frame's payload (125 bytes at most) is kept aside until it is whole;
pongs waiting to go are at most ``max_answers`` bytes, past which only the most
recent ping is answered (RFC 6455 5.5.3 allows it).
"""

from __future__ import annotations

import os

from gportmap.engine import wsframe
from gportmap.engine.stage import NEED_DATA, StageError
from gportmap.reasons import CloseReason


class WsError(StageError):
    """The peer broke the WebSocket protocol; ``code`` is the Close code it gets."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class WsStage:
    """One WebSocket connection's codec (see the module docstring)."""

    __slots__ = (
        "client_role",
        "max_message",
        "peer_side",
        "_in",
        "_pos",
        "_eof",
        "_header",
        "_remaining",
        "_offset",
        "_in_message",
        "_message_size",
        "_control",
        "_answers",
        "_closed_in",
        "_close_sent",
        "_error",
        "_failure",
        "_got",
    )

    half_close = False
    #: Bytes of pongs at most waiting to be taken by ``data_to_send``; past it only
    #: the latest ping is answered.
    max_answers = 4096

    def __init__(self, client_role: bool, max_message: int, leftover: bytes = b"") -> None:
        self.client_role = client_role
        self.max_message = max_message
        #: The WebSocket peer's side of the connection, as close reasons name it.
        self.peer_side = "target" if client_role else "client"
        self._in = bytearray(leftover)  # fed bytes; _pos: where parsing stands
        self._pos = 0
        self._eof = False
        self._header: wsframe.Header | None = None  # the frame whose payload is being read
        self._remaining = 0
        self._offset = 0  # payload bytes of the current frame already read (the mask rotates)
        self._in_message = False  # between a non-final data frame and its last continuation
        self._message_size = 0
        self._control = bytearray()  # the current control frame's payload (<= 125 bytes)
        self._answers = b""
        self._closed_in = False  # the peer's Close (or end) was read: nothing more comes
        self._close_sent = False
        self._error: WsError | None = None  # raised on the next read, after the data before it
        self._failure: WsError | None = None  # what goodbye tells the peer
        self._got = 0  # bytes an interrupted parse had put in the caller's buffer

    @classmethod
    def server(cls, max_message: int, leftover: bytes = b"") -> WsStage:
        return cls(False, max_message, leftover)

    @classmethod
    def client(cls, max_message: int, leftover: bytes = b"") -> WsStage:
        return cls(True, max_message, leftover)

    # -- from the network ---------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        if self._closed_in:
            return  # after the peer's Close nothing more is read
        if self._pos >= len(self._in):
            self._in = bytearray(data)
        else:
            del self._in[: self._pos]
            self._in += data
        self._pos = 0

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def has_input(self) -> bool:
        return not self._closed_in and (self._pos < len(self._in) or self._eof or self._error is not None)

    def read_into(self, buf: memoryview) -> int:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._closed_in:
            return 0
        try:
            n = self._parse(buf)
        except wsframe.FrameError as exc:
            error = WsError(exc.code, exc.reason)
            self._failure = error
            got, self._got = self._got, 0
            if got:
                self._error = error  # what came before the bad frame still goes on
                return got
            raise error from None
        if n:
            return n
        if self._closed_in or self._eof:
            self._closed_in = True  # an end in the middle of a frame is an end too
            return 0
        return NEED_DATA

    def _parse(self, buf: memoryview) -> int:
        """Decode what was fed into ``buf``: data payloads joined, until ``buf`` is
        full, the input runs out, or a Close arrives."""
        data, pos, end = self._in, self._pos, len(self._in)
        cap, n = len(buf), 0
        fast, max_message = not self.client_role, self.max_message  # only clients mask
        view = memoryview(data)  # slices without copies; released before data may resize
        try:
            while True:
                header = self._header
                if header is None:
                    if n == cap:
                        break
                    if fast and pos + 1 < end and not self._in_message:
                        # The bulk of small-message traffic: a whole, final, masked text
                        # or binary frame under 126 bytes, all of it here and room for
                        # it in ``buf``. It passes every check of parse_header and
                        # _begin, so it is unmasked straight into ``buf`` in one step.
                        first = data[pos]
                        length = data[pos + 1] - 0x80
                        start = pos + 6
                        stop = start + length
                        whole = 0 <= length < 126 and stop <= end and length <= cap - n
                        if whole and (first == 0x82 or first == 0x81):
                            if length > max_message:
                                raise wsframe.FrameError(
                                    wsframe.CLOSE_TOO_BIG, f"message of {length} bytes exceeds maxMessageSize"
                                )
                            key = bytes(view[pos + 2 : start]) * ((length >> 2) + 1)
                            buf[n : n + length] = (
                                int.from_bytes(view[start:stop], "big") ^ int.from_bytes(key[:length], "big")
                            ).to_bytes(length, "big")
                            n += length
                            pos = stop
                            if pos >= end:
                                break
                            continue
                    header = wsframe.parse_header(data, pos)
                    if header is None:
                        break
                    self._begin(header)
                    pos += header.size
                elif pos < end or not self._remaining:
                    take = min(self._remaining, end - pos)
                    control = header.opcode >= wsframe.OP_CLOSE
                    if not control:
                        take = min(take, cap - n)
                        if not take and self._remaining:
                            break
                    stop = pos + take
                    if header.mask is not None and take:
                        wsframe.unmask_range(data, pos, stop, header.mask, self._offset)
                    if control:
                        self._control += view[pos:stop]
                    else:
                        buf[n : n + take] = view[pos:stop]
                        n += take
                    pos = stop
                    self._offset += take
                    self._remaining -= take
                else:
                    break
                if self._header is not None and not self._remaining:
                    if self._finish():
                        break  # the peer's Close: nothing after it is read
                elif pos >= end:
                    break
        except wsframe.FrameError:
            self._got = n
            raise
        finally:
            view.release()
            if not self._closed_in:
                if pos >= end:  # all of it read: an idle connection keeps no buffer
                    self._in, self._pos = bytearray(), 0
                else:
                    self._pos = pos
        return n

    def _begin(self, header: wsframe.Header) -> None:
        if self.client_role and header.mask is not None:
            raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "a server must not mask its frames")
        if not self.client_role and header.mask is None:
            raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "a client must mask its frames")
        opcode = header.opcode
        if opcode < wsframe.OP_CLOSE:  # a data frame
            continuation = opcode == wsframe.OP_CONTINUATION
            if continuation != self._in_message:
                raise wsframe.FrameError(wsframe.CLOSE_PROTOCOL_ERROR, "unexpected continuation frame")
            size = (self._message_size + header.length) if continuation else header.length
            if size > self.max_message:
                raise wsframe.FrameError(wsframe.CLOSE_TOO_BIG, f"message of {size} bytes exceeds maxMessageSize")
            self._message_size = size
            self._in_message = not header.fin
        else:
            self._control.clear()
        self._header, self._remaining, self._offset = header, header.length, 0

    def _finish(self) -> bool:
        """The current frame is complete: answer a ping; True for a Close."""
        opcode = self._header.opcode
        self._header = None
        if opcode == wsframe.OP_PING:
            pong = self._frame(wsframe.OP_PONG, bytes(self._control))
            if len(self._answers) + len(pong) > self.max_answers:
                self._answers = b""  # answer the latest ping only (RFC 6455 5.5.3)
            self._answers += pong
        elif opcode == wsframe.OP_CLOSE:
            self._closed_in = True
            self._in = bytearray()
            self._pos = 0
            return True
        return False

    def data_to_send(self) -> bytes:
        answers, self._answers = self._answers, b""
        if self._close_sent:
            return b""  # after our Close, nothing more may go
        return answers

    # -- to the network -----------------------------------------------------------

    def _frame(self, opcode: int, payload: bytes | memoryview) -> bytes:
        if not self.client_role:
            return b"".join((wsframe.encode_header(opcode, len(payload)), payload))
        mask = os.urandom(4)
        body = bytearray(payload)
        wsframe.unmask_range(body, 0, len(body), mask)
        return b"".join((wsframe.encode_header(opcode, len(body), mask), body))

    def encode(self, data: bytes | memoryview) -> bytes:
        """One binary frame carrying ``data`` (with any pong still waiting first)."""
        if self._close_sent:
            return b""
        frame = self._frame(wsframe.OP_BINARY, data)
        if self._answers:
            frame, self._answers = self._answers + frame, b""
        return frame

    def close(self) -> bytes:
        """Close(1000), once."""
        return self._close_frame(wsframe.CLOSE_NORMAL, "")

    def _close_frame(self, code: int, reason: str) -> bytes:
        if self._close_sent:
            return b""
        frame = self._frame(wsframe.OP_CLOSE, wsframe.close_payload(code, reason))
        self._close_sent = True
        return frame

    def goodbye(self, reason: str, error: str | None) -> bytes:
        failure = self._failure
        if failure is not None:
            return self._close_frame(failure.code, failure.reason)
        if reason in (CloseReason.IDLE_TIMEOUT, CloseReason.STOPPED):
            return self._close_frame(wsframe.CLOSE_GOING_AWAY, "")
        if reason == CloseReason.side_error(self.peer_side):
            return b""  # the peer's own transport failed: nothing to tell it
        if reason == CloseReason.INTERNAL_ERROR:
            return self._close_frame(wsframe.CLOSE_INTERNAL_ERROR, "internal error")  # details stay in the log
        if reason.endswith("_error"):
            return self._close_frame(wsframe.CLOSE_INTERNAL_ERROR, error or "")
        return b""
