"""The plain relay with its bytes moved in C (``gportmap.engine._pump``), when built.

Why: on the plain path (no TLS, no stage, no plugin) the Python relay's cost is
mostly Python between system calls, a callback per readiness per direction. With
the C engine, every plain connection's sockets sit in one epoll set; the hub
watches that set's descriptor with one libev watcher and, when it is readable,
``Engine.run()`` serves every ready socket in C (the same copy, backpressure,
splice and half-close steps as ``hubrelay._Direction``) and hands back only the
connections that ended. It also writes each moved connection's counters and
``last_active`` on its ``Connection`` once per run, so the idle clock,
``/connections``, ``/metrics`` and the logs read what they always read.

``PumpRelay`` is a ``HubRelay`` (the idle clock, the abort, the finish, the
hand-over in an upgrade are the same code); only the directions are the C pair's.
``make_relay`` picks it for a plain connection when the engine is available and
``Features.pump`` is on, and ``HubRelay`` otherwise: the module is optional (not
built on other platforms or without a compiler), ``GPORTMAP_PUMP=off`` and
``GPORTMAP_PORTABLE=1`` turn it off, and the Python relay stays the path for
anything with a stage.
"""

from __future__ import annotations

import _socket
import os
from collections.abc import Callable, Sequence
from dataclasses import replace

from gevent import get_hub

from gportmap.engine.hubrelay import HubRelay, _splice
from gportmap.engine.net import READ
from gportmap.engine.relay import BUFFER_SIZE, SideError
from gportmap.engine.stage import Stage
from gportmap.engine.tls import TlsStage
from gportmap.events import InternalError
from gportmap.log import emit, get_logger
from gportmap.platform import Features
from gportmap.reasons import CloseReason
from gportmap.stats import Connection

try:
    from gportmap.engine import _pump
except ImportError:  # not built: the Python relay does everything
    _pump = None

logger = get_logger("relay")

#: ``Pair.error``'s side numbers.
_SIDES = ("client", "target")


def available() -> bool:
    """The C engine was built and imports."""
    return _pump is not None


def configure(features: Features) -> Features:
    """Take the process's relay policy from its features, once at start: the splice
    policy (``HubRelay.configure``) and whether plain connections go to the C
    engine (``Features.pump``). Returns the features as they are in force: without
    ``pump`` when the engine was not built."""
    if features.pump and not available():
        features = replace(features, pump=False)
    HubRelay.configure(features)
    PumpRelay.enabled = features.pump
    if features.pump:
        # Made now, not with the first connection: its descriptor is part of the
        # process's from the start (an idle process's count does not move later).
        PumpEngine.current(get_hub().loop)
    return features


class PumpEngine:
    """The C engine of this process's hub: its epoll set and the one libev watcher
    on it. Made on first use; a forked child (which would share the parent's epoll
    set) makes its own."""

    __slots__ = ("core", "watcher", "loop")

    #: The engine of the running process (see ``current``).
    _current: PumpEngine | None = None

    def __init__(self, loop) -> None:  # noqa: ANN001 - the hub's gevent loop
        self.loop = loop
        self.core = _pump.Engine(BUFFER_SIZE)
        self.watcher = self.loop.io(self.core.fileno(), READ)
        # The engine never keeps the loop alive: open connections do that through
        # whatever waits for them (servers, drains), as with the Python relay.
        self.watcher.ref = False
        self.watcher.start(self._on_ready)

    @classmethod
    def current(cls, loop) -> PumpEngine:  # noqa: ANN001 - the hub's gevent loop
        """The engine on ``loop``, made on first use (per loop: a test's new hub gets
        its own). A forked child keeps its parent's: the upgrade's drainer is a fork
        that goes on relaying the connections the new program does not carry, in
        the same epoll set (the parent execs at once, which closes its copy)."""
        engine = cls._current
        if engine is None or engine.loop is not loop:
            engine = cls._current = cls(loop)
        return engine


    def waiter(self, fd: int, owner: object):  # noqa: ANN201 - a _pump.Waiter
        """Wait in this engine for ``fd`` (a connecting socket) to be writable;
        ``owner.on_pump(waiter)`` is called once when it is. A ``PumpRelay`` made
        with the waiter as its ``target_reader`` takes the registration over."""
        waiter = _pump.Waiter(self.core, fd)
        waiter.owner = owner
        return waiter

    def _on_ready(self) -> None:
        """A hub callback: serve what is ready, then end what ended and tell the
        waits that fired. Nothing raised here reaches the hub."""
        try:
            ended = self.core.run()
        except Exception as exc:  # noqa: BLE001 - out of memory for a list: the next run goes on
            emit(
                logger, InternalError(context="relay engine", error=repr(exc), what=f"relay engine: {exc!r}")
            )
            return
        for item in ended:
            owner = item.owner
            if owner is None:
                continue
            try:
                owner.on_pump(item)
            except Exception as exc:  # noqa: BLE001 - a bug: this connection only
                owner.on_pump_crash(exc)
            if type(item) is _pump.Waiter:
                # Taken over by a pair by now, or not to be (a TLS or PROXY step
                # follows, or the connect failed): it must not fire again.
                item.close()


class PumpRelay(HubRelay):
    """A plain ``HubRelay`` whose directions are a C ``Pair`` in the process's
    ``PumpEngine``. Same contract: ``start``, ``abort``, ``freeze``/``release``/
    ``resume``, ``on_done`` once with the close reason."""

    __slots__ = ("pair",)

    #: Plain connections go to the C engine: set by ``configure`` at start (off
    #: until then, so a relay made in-process without it is the Python one).
    enabled = False

    def __init__(
        self,
        client: _socket.socket,
        target: _socket.socket,
        conn: Connection,
        idle_timeout: float,
        zero_copy: bool = False,
        splice_first: bool | None = None,
        on_done: Callable[[str, str | None], None] | None = None,
        target_reader=None,  # noqa: ANN001 - a stopped gevent io watcher: closed, the engine reads
    ) -> None:
        self._init_state(client, target, conn, idle_timeout, on_done)
        loop = self.loop
        if splice_first is None:
            splice_first = bool(HubRelay.splice_first)
        splice = zero_copy and _splice is not None
        waiter = target_reader if type(target_reader) is _pump.Waiter else None
        self.pair = _pump.Pair(PumpEngine.current(loop).core, client.fileno(), target.fileno(), conn, splice,
                               splice and splice_first, waiter)  # fmt: skip
        self.pair.owner = self
        if target_reader is not None:
            target_reader.close()  # a waiter the pair took over has nothing left to close

    def start(self) -> None:
        try:
            self.pair.start()
        except OSError as exc:  # the epoll set refused a socket (ENOMEM, ENOSPC: max_user_watches)
            self.crash(exc)
            return
        if self.idle:
            self._arm(self.idle)

    def on_pump(self, pair) -> None:  # noqa: ANN001 - its _pump.Pair
        """The engine saw both ends, or an error on a side."""
        error = self.pair.error
        if error is None:
            self._finish(CloseReason.CLOSED, None)
            return
        side, number = error
        self.fail(SideError(_SIDES[side], OSError(number, os.strerror(number))))

    @property
    def plain(self) -> bool:
        return True

    def on_pump_crash(self, exc: Exception) -> None:
        self.crash(exc)

    def _goodbye(self, reason: str, error: str | None) -> None:
        """Nothing to say on the plain path."""

    def direction_ended(self) -> None:
        if self.pair.up_done and self.pair.down_done:
            self._finish(CloseReason.CLOSED, None)

    def freeze(self) -> tuple[tuple[bytes, bool], tuple[bytes, bool]]:
        return self.pair.pending(True), self.pair.pending(False)

    def resume(self, up: tuple[bytes, bool], down: tuple[bytes, bool]) -> None:
        self.pair.resume(True, *up)
        self.pair.resume(False, *down)
        if self.reason is None:
            self.direction_ended()

    def _reading_fds(self) -> list[int]:
        return self.pair.reading_fds()

    def _writing_fds(self) -> list[int]:
        return self.pair.writing_fds()

    def _close_directions(self) -> None:
        self.pair.stop()
        self.pair.owner = None  # no cycle left behind


def make_relay(
    client: _socket.socket,
    target: _socket.socket,
    conn: Connection,
    idle_timeout: float,
    zero_copy: bool = False,
    on_done: Callable[[str, str | None], None] | None = None,
    client_tls: TlsStage | None = None,
    target_tls: TlsStage | None = None,
    client_stages: Sequence[Stage] = (),
    target_stages: Sequence[Stage] = (),
    target_reader=None,  # noqa: ANN001 - as HubRelay's
) -> HubRelay:
    """The relay for one connection: ``PumpRelay`` for a plain one when the C engine
    is on (``PumpRelay.enabled``), else ``HubRelay``."""
    plain = client_tls is None and target_tls is None and not client_stages and not target_stages
    if plain and PumpRelay.enabled:
        return PumpRelay(client, target, conn, idle_timeout, zero_copy, on_done=on_done, target_reader=target_reader)
    if _pump is not None and type(target_reader) is _pump.Waiter:
        target_reader.close()  # the engine's wait: the Python relay reads with a libev watcher
        target_reader = None
    return HubRelay(client, target, conn, idle_timeout, zero_copy, on_done=on_done, client_tls=client_tls,
                    target_tls=target_tls, client_stages=client_stages, target_stages=target_stages,
                    target_reader=target_reader)  # fmt: skip
