"""What a stage of the relay is: a sans-IO transform of one side's bytes.

A stage sits between a socket (its *outer* side: what goes over the network) and
the relay (its *inner* side: the bytes a plain relay would move), in the manner
of h11 and wsproto: bytes in, bytes out, no descriptor, no waiting. The hub relay
(``gportmap.engine.hubrelay``) drives it from readiness callbacks:

- ``feed(data)`` / ``feed_eof()``: what was read from the network;
- ``read_into(buf)``: inner bytes out, as they come (the number, 0 at the peer's
  end, ``NEED_DATA`` when what was fed holds nothing more);
- ``data_to_send()``: what the stage answers by itself to its peer (a TLS alert,
  a WebSocket pong), sent through the *other* direction, whose destination that
  peer is;
- ``encode(data)``: inner bytes in, network bytes to send out;
- ``close()``: the stage's end of the conversation (close_notify, a Close frame),
  sent when the other side's stream ends; ``half_close`` says whether the
  transport is then shut for writing at once (TLS) or only once both ways have
  ended (WebSocket: its closing handshake ends the connection);
- ``goodbye(reason, error)``: a last word when the relay cuts the connection (a
  WebSocket Close with a status code), best effort.

Implementations: ``gportmap.engine.tls.TlsStage``,
``gportmap.engine.wsstage.WsStage`` and ``TransformStage`` (plugins' ``on_data``). ``Chain`` stacks stages on one side (wss:
TLS outside, WebSocket inside) and is a stage itself.

A stage bounds what it holds: the relay feeds it again only once ``read_into``
said ``NEED_DATA``, so one read's bytes at most are kept, plus what each stage
documents (a partial header, a control frame).

``StagedSocket`` is the one piece with I/O here: a blocking socket face over a
stage for a greenlet that must still talk through it before the relay takes
over (pywsgi reading a WebSocket upgrade over TLS, a tunnel's upgrade request).
"""

from __future__ import annotations

import _socket
import errno
import io
import socket
from collections.abc import Sequence
from typing import Protocol

from gevent.socket import wait_read, wait_write

from gportmap.plugins import DOWNSTREAM, UPSTREAM, HookError, Reject, log_hook_error
from gportmap.reasons import CloseReason

#: What ``read_into`` returns when the stage has nothing more to give from what
#: was fed: feed it more first.
NEED_DATA = -1


class StageError(OSError):
    """The peer broke a stage's protocol (a bad TLS record, a bad WebSocket frame).
    An ``OSError`` so that the relay's per-side error handling takes it as it is;
    its text is the close record's ``error``, and the close reason is the side's
    error (``client_error``, ``target_error``) unless ``close_reason`` says another."""

    #: The connection's close reason, when it is not the side's error.
    close_reason: CloseReason | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Stage(Protocol):
    """One sans-IO transform between a socket and the relay (see the module docstring)."""

    #: After ``close()``'s bytes, shut the transport for writing at once (True), or
    #: only when the whole connection ends (False).
    half_close: bool

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes read from the network (copied: the caller's buffer is reused)."""

    def feed_eof(self) -> None:
        """The network side ended; ``read_into`` reports it once the rest is read."""

    def read_into(self, buf: memoryview) -> int:
        """Inner bytes into ``buf``: their number, 0 at the peer's end, NEED_DATA
        when nothing is left. StageError when the peer broke the protocol."""

    def data_to_send(self) -> bytes:
        """Bytes the stage has for its peer on its own account, b"" when none."""

    def encode(self, data: bytes | memoryview) -> bytes:
        """The network bytes that carry ``data`` (with anything still waiting to go first)."""

    @property
    def has_input(self) -> bool:
        """``read_into`` may give something without more from the network."""

    def close(self) -> bytes:
        """The stage's end of the conversation, once (b"" after)."""

    def goodbye(self, reason: str, error: str | None) -> bytes:
        """A last word to the peer when the relay cuts the connection, b"" if none."""


class Chain:
    """Stages stacked on one side, outermost (the network's) first: a stage itself.

    Bytes read go outer to inner; what is sent goes inner to outer, and what an
    inner stage answers on its own (a pong) is encoded by the stages outside it.
    An inner stage is fed only once it has nothing left (NEED_DATA), so each holds
    at most one outer stage's read at a time."""

    __slots__ = ("stages",)

    #: Between two stages: what the outer one gave, fed to the inner one at once
    #: (which copies it), so one buffer serves every level of every chain of the
    #: process (reads run one at a time, never across a greenlet switch).
    scratch = memoryview(bytearray(65536))

    def __init__(self, stages: Sequence[Stage]) -> None:
        if len(stages) < 2:
            raise ValueError("a chain is two stages or more")
        self.stages = tuple(stages)

    @property
    def half_close(self) -> bool:  # type: ignore[override]
        return all(stage.half_close for stage in self.stages)

    def feed(self, data: bytes | memoryview) -> None:
        self.stages[0].feed(data)

    def feed_eof(self) -> None:
        self.stages[0].feed_eof()

    def read_into(self, buf: memoryview) -> int:
        return self._read(len(self.stages) - 1, buf)

    def _read(self, level: int, buf: memoryview) -> int:
        stage = self.stages[level]
        if level == 0:
            return stage.read_into(buf)
        while True:
            n = stage.read_into(buf)
            if n != NEED_DATA:
                return n
            scratch = self.scratch
            m = self._read(level - 1, scratch)
            if m == NEED_DATA:
                return NEED_DATA
            if m:
                stage.feed(scratch[:m])
            else:
                stage.feed_eof()

    def data_to_send(self) -> bytes:
        out = b""
        for level, stage in enumerate(self.stages):
            answer = stage.data_to_send()
            if answer:
                out += self._outward(level, answer)
        return out

    def _outward(self, level: int, data: bytes | memoryview) -> bytes:
        """``data`` from stage ``level`` through every stage outside it."""
        for stage in reversed(self.stages[:level]):
            data = stage.encode(data)
        return bytes(data)

    def encode(self, data: bytes | memoryview) -> bytes:
        return self._outward(len(self.stages), data)

    @property
    def has_input(self) -> bool:
        return any(stage.has_input for stage in self.stages)

    def close(self) -> bytes:
        """The innermost stage's end, carried outwards; the outer stages close too
        only when every stage half-closes (otherwise the transport's end is the
        connection's)."""
        out = b""
        closing = True
        for level in range(len(self.stages) - 1, -1, -1):
            stage = self.stages[level]
            if not closing:
                break
            goodbye = stage.close()
            if goodbye:
                out += self._outward(level, goodbye)
            closing = stage.half_close
        return out

    def goodbye(self, reason: str, error: str | None) -> bytes:
        out = b""
        for level in range(len(self.stages) - 1, -1, -1):
            word = self.stages[level].goodbye(reason, error)
            if word:
                out += self._outward(level, word)
        return out


class TransformError(StageError):
    """A plugin's ``on_data`` failed or refused: the connection ends as ``plugin_error``."""

    close_reason = CloseReason.PLUGIN_ERROR


class TransformStage:
    """The rule's ``on_data`` plugins as a stage, innermost on the target's side:
    what goes to the target is ``transform("upstream", chunk)`` (``encode``), what
    comes from it is ``transform("downstream", chunk)`` (``read_into``). So the
    relay counts what the client sent before the plugins, and what it received
    after them, as the greenlet relay does.

    ``transform`` runs in hub callbacks: only for plugins that do not wait
    (``Plugin.may_block``). A failure (a ``HookError``, logged here with the
    plugin's name, or a ``Reject``) is a ``TransformError``.

    Holds at most one chunk fed (the relay feeds again only after ``NEED_DATA``)
    and one ``on_data`` result being given out, which the plugin sizes."""

    __slots__ = ("transform", "rule", "client", "_in", "_eof", "_out", "_given")

    half_close = True

    def __init__(self, transform, rule: str, client: str) -> None:
        self.transform = transform
        self.rule, self.client = rule, client
        self._in = b""
        self._eof = False
        self._out = b""  # the last result, given out from _given on
        self._given = 0

    def feed(self, data: bytes | memoryview) -> None:
        self._in = self._in + bytes(data) if self._in else bytes(data)

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def has_input(self) -> bool:
        return bool(self._in) or self._given < len(self._out) or self._eof

    def read_into(self, buf: memoryview) -> int:
        while self._given >= len(self._out):
            if not self._in:
                self._out, self._given = b"", 0
                return 0 if self._eof else NEED_DATA
            data, self._in = self._in, b""
            self._out, self._given = self._call(DOWNSTREAM, data), 0
        n = min(len(buf), len(self._out) - self._given)
        buf[:n] = self._out[self._given : self._given + n]
        self._given += n
        return n

    def encode(self, data: bytes | memoryview) -> bytes:
        return self._call(UPSTREAM, bytes(data))

    def _call(self, direction: str, data: bytes) -> bytes:
        try:
            return self.transform(direction, data)
        except (HookError, Reject) as exc:
            if isinstance(exc, HookError):
                log_hook_error(exc, self.rule, self.client)
            raise TransformError(str(exc)) from None

    def data_to_send(self) -> bytes:
        return b""

    def close(self) -> bytes:
        return b""

    def goodbye(self, reason: str, error: str | None) -> bytes:
        return b""


def chain(stages: Sequence[Stage]) -> Stage | None:
    """One stage for a side: None for none, the stage itself for one, a Chain for more."""
    if not stages:
        return None
    if len(stages) == 1:
        return stages[0]
    return Chain(stages)


class StagedSocket:
    """A socket face over a bare non-blocking socket and a stage (or none: the
    bytes as they are), for greenlet code that speaks through the stage before the
    relay takes over: ``recv``/``recv_into``/``sendall``/``makefile("rb")``.
    Blocking by default, waiting with gevent (callers bound their waits with
    ``gevent.Timeout``); after ``settimeout(0)`` a read that would wait raises
    ``BlockingIOError`` instead (how pywsgi's reader is peeked without waiting).
    ``detach`` hands the bare socket on; closing this face then closes nothing."""

    def __init__(self, sock: _socket.socket, stage: Stage | None) -> None:
        self.sock: _socket.socket | None = sock
        self.stage = stage
        self.blocking = True
        self._ended = False
        self._buf = bytearray(4096)  # what the network gave, before the stage (handshake-sized)
        self.family, self.type, self.proto = sock.family, sock.type, sock.proto

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def settimeout(self, timeout: float | None) -> None:
        self.blocking = timeout != 0

    def recv_into(self, buf, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buf).cast("B")
        if nbytes:
            view = view[:nbytes]
        stage = self.stage
        while True:
            if stage is None:
                n = NEED_DATA if not self._ended else 0
            else:
                n = stage.read_into(view)
                self._flush()
            if n != NEED_DATA:
                return n
            if self._ended:
                return 0
            if stage is None:
                return self._receive(view)
            got = self._receive(self._buf)
            if got:
                stage.feed(memoryview(self._buf)[:got])
            else:
                stage.feed_eof()

    def recv(self, size: int, flags: int = 0) -> bytes:
        buf = bytearray(size)
        n = self.recv_into(buf)
        return bytes(buf[:n])

    def _receive(self, into) -> int:
        """One read from the network (waiting for it unless non-blocking)."""
        while True:
            try:
                n = self.sock.recv_into(into)
            except BlockingIOError:
                if not self.blocking:
                    raise BlockingIOError(errno.EAGAIN, "no bytes ready") from None
                wait_read(self.sock.fileno())
                continue
            if not n:
                self._ended = True
            return n

    def sendall(self, data: bytes | memoryview, flags: int = 0) -> None:
        self._send(self.stage.encode(data) if self.stage is not None else data)

    def _flush(self) -> None:
        answer = self.stage.data_to_send()
        if answer:
            self._send(answer)

    def _send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                wait_write(self.sock.fileno())
                continue
            view = view[sent:]

    def makefile(self, mode: str = "rb", buffering: int = -1) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError("a StagedSocket is read through a file only")
        return io.BufferedReader(socket.SocketIO(self, "rb"))  # type: ignore[arg-type]

    def _decref_socketios(self) -> None:
        pass  # the face is closed by its owner, not by its files

    def detach(self) -> _socket.socket:
        """Hand the bare socket on (to the relay, with the stage): closing this face
        then closes nothing."""
        sock, self.sock = self.sock, None
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
