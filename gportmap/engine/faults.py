"""Network faults (SPEC §12): Toxiproxy's toxics as timed steps of a relay.

Design: a stream rule with faults takes the greenlet relay (``gportmap.engine.relay``,
as ``may_block`` plugins do): each direction reads a chunk, and the faults of its
stream act on it between the read and the write, by sleeping (latency, bandwidth,
slicer's delay, slow_close), cutting the write (slicer), or ending the connection
(limit_data, timeout, reset_peer). A rule without faults keeps the hub relay and
splice: nothing here is on its path.

Which faults are in force is read for every chunk from the ``FaultBoard`` (the
service publishes each rule's faults after every apply), so a change of faults
alone applies to the next data of the rule's connections on this relay and to new
connections, and never drops a connection (the rule counts as unchanged). A
connection that was opened while its rule had no faults runs on the hub relay
and keeps running there without faults until it ends.

``toxicity`` is decided once per connection and fault (the first time the fault
meets the connection), with the session's RNG (seeded in tests).

Bounds: a direction holds at most the one chunk it read (``relay.BUFFER_SIZE``,
64 KiB) while latency, bandwidth, slicer or a ``timeout`` fault holds it; the rest
waits in the kernel's socket buffers, which push back on the sender. A session
keeps one state per fault of its rule (a list the config bounds).
"""

from __future__ import annotations

import random
import socket
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gevent.event import Event

from gportmap.config.faults import Fault, FaultType, Stream
from gportmap.plugins import UPSTREAM, Reject


class FaultClose(Exception):
    """A fault ends the connection: with a FIN both ways (limit_data, timeout) or
    with a reset (reset_peer, ``reset`` true)."""

    def __init__(self, kind: FaultType, reset: bool = False) -> None:
        super().__init__(kind.value)
        self.kind = kind
        self.reset = reset


class FaultBoard:
    """The faults in force, by rule name, and how often each type acted.

    The service publishes every enabled rule's faults after each apply; relays read
    them per chunk and wait on ``changed`` while a ``timeout`` fault holds data.
    ``applied`` (rule, type) -> count is ``gportmap_faults_applied_total``; its
    keys are bounded by the rules times the fault types."""

    def __init__(self) -> None:
        self._faults: dict[str, tuple[Fault, ...]] = {}
        self.changed = Event()
        self.applied: dict[tuple[str, str], int] = {}
        #: Rule name -> the servers told of each change of its faults (``watch``);
        #: weak, so a server that is gone without ``unwatch`` is not kept alive.
        self._watchers: dict[str, weakref.WeakSet[Any]] = {}

    def publish(self, rules: Iterable[Any]) -> None:
        """The faults of ``rules`` (objects with ``name`` and ``faults``) from now on;
        wakes whatever waits for a change."""
        before = self._faults
        self._faults = {rule.name: tuple(rule.faults) for rule in rules}
        for name, watchers in list(self._watchers.items()):
            faults = self._faults.get(name)
            if faults is not None and faults != before.get(name):
                for watcher in list(watchers):
                    watcher.faults_changed(faults)
        alive = set(self._faults)
        for key in [key for key in self.applied if key[0] not in alive]:
            del self.applied[key]
        changed, self.changed = self.changed, Event()
        changed.set()

    def faults(self, name: str, default: tuple[Fault, ...] = ()) -> tuple[Fault, ...]:
        """The faults of rule ``name`` (``default``, its own, until it is published)."""
        return self._faults.get(name, default)

    def count(self, rule: str, kind: FaultType) -> None:
        key = (rule, kind.value)
        self.applied[key] = self.applied.get(key, 0) + 1

    def watch(self, name: str, watcher: Any) -> None:
        """Call ``watcher.faults_changed(faults)`` (in the hub, from ``publish``; it
        must not raise) whenever rule ``name``'s faults change, until ``unwatch``.
        For a hub server that reads no board per datagram (a udp rule: a rule
        without faults pays nothing for them)."""
        self._watchers.setdefault(name, weakref.WeakSet()).add(watcher)

    def unwatch(self, name: str, watcher: Any) -> None:
        watchers = self._watchers.get(name)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[name]


class TokenBucket:
    """Toxiproxy's bandwidth toxic as a token bucket: ``rate`` bytes a second,
    holding at most ``burst`` (a tenth of a second's worth, as Toxiproxy writes in
    100 ms pieces), starting empty so that the first bytes already pay."""

    #: Seconds of rate the bucket holds at most.
    burst_seconds = 0.1

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * self.burst_seconds)
        self.tokens = 0.0
        self.stamp = now

    def piece(self) -> int:
        """How many bytes to write at once."""
        return max(1, int(self.burst))

    def wait(self, n: int, now: float) -> float:
        """Take ``n`` tokens; the seconds to wait before sending them."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class FaultSession:
    """One connection's (a udp rule: one session's) faults: what each direction
    does to its chunks (``forward``, in the direction's own greenlet: its sleeps
    are the faults' waits) or its datagrams (``datagram``, deciding only). The
    ``send`` handed to ``forward`` is the relay's write of one piece to the
    direction's destination; a fault that ends the connection raises
    ``FaultClose`` to the relay. ``ended`` wakes whatever waits here once the
    connection ends for any reason."""

    #: How long a timeout fault's hold waits between checks that the connection is alive.
    hold_check = 1.0

    def __init__(self, board: FaultBoard, rule: str, own: tuple[Fault, ...] = (), rng: random.Random | None = None) -> None:
        self.board = board
        self.rule = rule
        self.own = own
        self.rng = rng or random.Random()
        self.started = time.monotonic()
        self.ended = Event()
        #: Per fault met: (on for this connection, its state), the state for
        #: bandwidth a TokenBucket, for limit_data the bytes passed, for timeout
        #: the monotonic time it began.
        self._states: dict[Fault, list[Any]] = {}
        self._timer: gevent.Greenlet | None = None
        #: Set by the greenlet relay: where a lane's failed write goes (the relay
        #: ends the connection); None: no lanes, every fault acts in ``forward``.
        self.on_error: Callable[[BaseException], None] | None = None
        self._lanes: list[Lane | None] = [None, None]  # downstream, upstream (``uploading`` as index)

    # -- which faults act --------------------------------------------------------

    def active(self, stream: Stream) -> list[tuple[Fault, list[Any]]]:
        """The faults of ``stream`` on for this connection now, in the rule's order."""
        out = []
        faults = self.board.faults(self.rule, self.own)
        if len(self._states) > 2 * len(faults) + 8:  # faults changed many times: forget the old ones
            self._states = {fault: state for fault, state in self._states.items() if fault in faults}
        for fault in faults:
            if fault.stream is not stream:
                continue
            state = self._states.get(fault)
            if state is None:
                on = fault.toxicity >= 1.0 or self.rng.random() < fault.toxicity
                state = self._states[fault] = [on, None]
            if state[0]:
                out.append((fault, state))
        return out

    # -- the data path -----------------------------------------------------------

    def forward(self, uploading: bool, data: bytes | memoryview, send: Callable[[bytes | memoryview], None]) -> None:
        """Pass one chunk read by a direction through its faults to ``send``.

        With ``on_error`` set (the greenlet relay), latency is a pipeline, as
        Toxiproxy's: the faults up to the first latency act here, then the chunk
        (copied) waits in the direction's ``Lane`` until its delay has run, while
        this direction reads on; the lane's greenlet runs the rest and writes.
        Without (a bridge's transform), every fault acts here, in turn."""
        stream = Stream.UPSTREAM if uploading else Stream.DOWNSTREAM
        faults = self.active(stream)
        if not faults:
            send(data)
            return
        if self.on_error is not None:
            first = next((i for i, (fault, _) in enumerate(faults) if fault.type is FaultType.LATENCY), None)
            if first is not None:
                delay = 0.0
                for fault, _ in faults[first:]:
                    if fault.type is FaultType.LATENCY:
                        self.board.count(self.rule, fault.type)
                        delay += self.delay(fault)
                rest = [(fault, state) for fault, state in faults[first:] if fault.type is not FaultType.LATENCY]
                due = time.monotonic() + delay
                lane = self._lane(uploading, send)
                try:
                    self.apply(faults[:first], data, lambda piece: lane.put(due, bytes(piece), rest))
                except FaultClose as exc:
                    if not exc.reset:
                        lane.drain()  # limit_data: what it let through is written before the close
                    raise
                return
        self.apply(faults, data, send)

    def apply(
        self, faults: list[tuple[Fault, list[Any]]], data: bytes | memoryview, send: Callable[[bytes | memoryview], None]
    ) -> None:
        """``faults`` (of one stream, on for this connection) on one chunk, in order."""
        if not faults:
            send(data)
            return
        pieces: list[bytes | memoryview] = [data]
        for fault, state in faults:
            kind = fault.type
            if kind is FaultType.TIMEOUT:
                self._hold(fault, state)
            elif kind is FaultType.RESET_PEER:
                self.board.count(self.rule, kind)
                gevent.sleep(fault.timeout / 1000.0)
                raise FaultClose(kind, reset=True)
            elif kind is FaultType.LATENCY:
                self.board.count(self.rule, kind)
                gevent.sleep(self.delay(fault))
            elif kind is FaultType.LIMIT_DATA:
                passed = state[1] or 0
                size = sum(len(piece) for piece in pieces)
                if passed + size >= fault.bytes:
                    self.board.count(self.rule, kind)
                    self._send_all(pieces, fault.bytes - passed, send)
                    raise FaultClose(kind)
                state[1] = passed + size
            elif kind is FaultType.SLICER:
                self.board.count(self.rule, kind)
                pieces = [cut for piece in pieces for cut in self.slices(fault, piece)]
        slicer = next((fault for fault, _ in faults if fault.type is FaultType.SLICER), None)
        bucket_state = next((state for fault, state in faults if fault.type is FaultType.BANDWIDTH), None)
        bandwidth = next((fault for fault, _ in faults if fault.type is FaultType.BANDWIDTH), None)
        for index, piece in enumerate(pieces):
            if slicer is not None and index and slicer.delay:
                gevent.sleep(slicer.delay / 1_000_000.0)
            if bandwidth is not None and bucket_state is not None:
                self._paced(bandwidth, bucket_state, piece, send)
            else:
                send(piece)

    def _send_all(self, pieces: list[bytes | memoryview], limit: int, send: Callable[[bytes | memoryview], None]) -> None:
        for piece in pieces:
            if limit <= 0:
                return
            send(piece[:limit])
            limit -= len(piece)

    def _paced(self, fault: Fault, state: list[Any], data: bytes | memoryview, send: Callable[[bytes | memoryview], None]) -> None:
        """Write ``data`` at the bandwidth fault's rate, a bucket-sized piece at a time."""
        if fault.rate <= 0:
            send(data)
            return
        if state[1] is None:
            state[1] = TokenBucket(fault.rate * 1000.0, time.monotonic())
        bucket: TokenBucket = state[1]
        view = memoryview(data)
        step = bucket.piece()
        self.board.count(self.rule, fault.type)
        while view:
            piece, view = view[:step], view[step:]
            wait = bucket.wait(len(piece), time.monotonic())
            if wait > 0:
                gevent.sleep(wait)
            send(piece)

    def _hold(self, fault: Fault, state: list[Any]) -> None:
        """A ``timeout`` fault holds the chunk while it is in force; with a timeout
        the connection is closed once it has run (``arm`` started that clock)."""
        self.board.count(self.rule, fault.type)
        if state[1] is None:
            state[1] = time.monotonic()
        while not self.ended.is_set():
            if fault not in self.board.faults(self.rule, self.own):
                return  # removed: the data flows again
            remaining = None
            if fault.timeout:
                remaining = state[1] + fault.timeout / 1000.0 - time.monotonic()
                if remaining <= 0:
                    raise FaultClose(FaultType.TIMEOUT)
            wait = self.hold_check if remaining is None else min(self.hold_check, remaining)
            gevent.wait([self.board.changed, self.ended], count=1, timeout=wait)
        raise FaultClose(FaultType.TIMEOUT)

    def delay(self, fault: Fault) -> float:
        """Seconds of a latency fault for one chunk: latency ± jitter, never negative."""
        ms = fault.latency
        if fault.jitter:
            ms += self.rng.randint(-fault.jitter, fault.jitter)
        return max(0, ms) / 1000.0

    def slices(self, fault: Fault, data: bytes | memoryview) -> list[bytes | memoryview]:
        """Cut ``data`` into pieces of ``average_size`` ± ``size_variation`` bytes."""
        view = memoryview(data)
        average = max(1, fault.average_size)
        out = []
        while view:
            size = average
            if fault.size_variation:
                size += self.rng.randint(-fault.size_variation, fault.size_variation)
            size = max(1, size)
            out.append(view[:size])
            view = view[size:]
        return out

    # -- datagrams (udp rules: a session is the "connection") ------------------------

    def datagram(self, uploading: bool, size: int) -> list[float]:
        """What the faults do to one datagram of ``size`` bytes: the delay of each
        copy to send (``[0.0]``: send it now, as it is; ``[]``: lost; two entries:
        duplicated). Runs in a hub callback: decides, never waits."""
        stream = Stream.UPSTREAM if uploading else Stream.DOWNSTREAM
        faults = self.active(stream)
        copies = [0.0]
        for fault, state in faults:
            kind = fault.type
            if kind is FaultType.LOSS:
                if self.rng.random() < fault.probability:
                    self.board.count(self.rule, kind)
                    return []
            elif kind is FaultType.DUPLICATE:
                if self.rng.random() < fault.probability:
                    self.board.count(self.rule, kind)
                    copies.append(copies[0])
            elif kind is FaultType.LATENCY:
                self.board.count(self.rule, kind)
                delay = self.delay(fault)
                copies = [copy + delay for copy in copies]
            elif kind is FaultType.BANDWIDTH and fault.rate > 0:
                if state[1] is None:
                    state[1] = TokenBucket(fault.rate * 1000.0, time.monotonic())
                wait = state[1].wait(size * len(copies), time.monotonic())
                if wait > 0:
                    self.board.count(self.rule, kind)
                    copies = [copy + wait for copy in copies]
        return copies

    # -- the end of a stream and the connection ---------------------------------

    def _lane(self, uploading: bool, send: Callable[[bytes | memoryview], None]) -> Lane:
        lane = self._lanes[uploading]
        if lane is None:
            lane = self._lanes[uploading] = Lane(self, send)
        return lane

    def fail(self, exc: BaseException) -> None:
        """A lane's write failed: the connection ends as the relay says (``on_error``)."""
        self.ended.set()
        if self.on_error is not None:
            self.on_error(exc)

    def before_close(self, uploading: bool) -> None:
        """A direction's source ended: what its lane holds goes first, then
        ``slow_close`` delays passing the end on."""
        lane = self._lanes[uploading]
        if lane is not None:
            lane.drain()
        stream = Stream.UPSTREAM if uploading else Stream.DOWNSTREAM
        for fault, _ in self.active(stream):
            if fault.type is FaultType.SLOW_CLOSE:
                self.board.count(self.rule, fault.type)
                gevent.sleep(fault.delay / 1000.0)

    def arm(self, abort: Callable[[FaultClose], None]) -> None:
        """Watch the ``timeout`` faults for as long as the connection lives: a
        timeout runs from the moment the fault meets the connection (its start, or
        when the fault is added), data or not, as Toxiproxy's; ``abort`` is called
        when one runs out. One greenlet per connection with faults, waiting on the
        board's changes and the nearest deadline."""
        self._timer = gevent.spawn(self._watch, abort)

    def _watch(self, abort: Callable[[FaultClose], None]) -> None:
        first = True
        while not self.ended.is_set():
            now = time.monotonic()
            deadline = None
            for stream in Stream:
                for fault, state in self.active(stream):
                    if fault.type is not FaultType.TIMEOUT:
                        continue
                    if state[1] is None:
                        state[1] = self.started if first else now
                    if fault.timeout:
                        due = state[1] + fault.timeout / 1000.0
                        deadline = due if deadline is None else min(deadline, due)
            first = False
            if deadline is not None and deadline <= now:
                self.board.count(self.rule, FaultType.TIMEOUT)
                abort(FaultClose(FaultType.TIMEOUT))
                return
            wait = None if deadline is None else deadline - now
            gevent.wait([self.board.changed, self.ended], count=1, timeout=wait)

    def end(self) -> None:
        """The connection ended: wake held directions, stop the clocks and the lanes."""
        self.ended.set()
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        for lane in self._lanes:
            if lane is not None:
                lane.stop()


class Lane:
    """One direction's chunks behind a latency fault (``FaultSession.forward``):
    queued with the time each is due, written in order by the lane's own greenlet
    once due, through the faults after the latency. The reader waits while the
    lane holds ``limit`` bytes or more, so what latency holds is bounded (and the
    kernel's buffers push back on the sender)."""

    #: Bytes a lane holds at most before the reading direction waits.
    limit = 1 << 20

    def __init__(self, session: FaultSession, send: Callable[[bytes | memoryview], None]) -> None:
        self.session = session
        self.send = send
        self.queue: deque[tuple[float, bytes, list[tuple[Fault, list[Any]]]]] = deque()
        self.held = 0
        self.failed = False
        self._wake = Event()  # something was queued
        self._moved = Event()  # something was written, or the lane failed
        self._writer: gevent.Greenlet | None = None

    def put(self, due: float, data: bytes, rest: list[tuple[Fault, list[Any]]]) -> None:
        """Queue ``data`` to be written at ``due`` (waits while the lane is full;
        drops it once the connection is ending)."""
        session = self.session
        while self.held >= self.limit and not session.ended.is_set():
            self._moved.clear()
            gevent.wait([self._moved, session.ended], count=1, timeout=session.hold_check)
        if session.ended.is_set() or self.failed:
            return
        self.queue.append((due, data, rest))
        self.held += len(data)
        self._wake.set()
        if self._writer is None:
            self._writer = gevent.spawn(self._run)

    def drain(self) -> None:
        """Wait until everything queued has been written (or the lane failed)."""
        session = self.session
        while self.queue and not self.failed and not session.ended.is_set():
            self._moved.clear()
            gevent.wait([self._moved, session.ended], count=1, timeout=session.hold_check)

    def _run(self) -> None:
        try:
            while True:
                while not self.queue:
                    self._wake.clear()
                    self._wake.wait()
                due, data, rest = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    gevent.sleep(wait)
                self.session.apply(rest, data, self.send)
                self.queue.popleft()
                self.held -= len(data)
                self._moved.set()
        except gevent.GreenletExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - a failed write ends the connection, as the relay says
            self.failed = True
            self._moved.set()
            self.session.fail(exc)

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.kill(block=False)
            self._writer = None
        self.queue.clear()
        self.held = 0


#: SO_LINGER on, zero seconds: close() sends a RST instead of a FIN.
LINGER_RESET = struct.pack("ii", 1, 0)


def reset_on_close(sock: socket.socket) -> None:
    """Make the socket's close send a RST (reset_peer)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass  # already gone: nothing to reset


class DelayLine:
    """Datagrams that latency or bandwidth holds back, on the hub: one timer each,
    at most ``limit`` of them per rule (past it a datagram is dropped, which the
    caller counts), so a flood behind a slow fault costs bounded memory: the cap
    times the largest datagram (64 KiB), 64 MiB at worst, a few MB in practice."""

    #: Datagrams held at most, per rule.
    limit = 1024

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self._timers: set[Any] = set()

    @property
    def held(self) -> int:
        return len(self._timers)

    def later(self, delay: float, send: Callable[[], None]) -> bool:
        """Call ``send`` (which must not raise) after ``delay`` seconds; False when
        the line is full (nothing is scheduled)."""
        if len(self._timers) >= self.limit:
            return False
        timer = self.loop.timer(delay)
        self._timers.add(timer)

        def fire() -> None:
            self._timers.discard(timer)
            timer.close()
            send()

        timer.start(fire)
        return True

    def close(self) -> None:
        """Drop what is held (the rule stops)."""
        for timer in self._timers:
            timer.stop()
            timer.close()
        self._timers.clear()


def fault_transform(
    session: FaultSession,
    inner: Callable[[str, bytes], bytes] | None = None,
    on_cut: Callable[[FaultClose], None] | None = None,
) -> Callable[[str, bytes], bytes]:
    """The faults as an ``on_data`` transform, for a relay that runs one in its
    direction's greenlet (the WebSocket bridge): the payload of each read goes
    through ``inner`` (the plugins), then the faults, whose pieces are sent as one
    message once they have all waited their turn. A fault that ends the connection
    with nothing left to pass is a ``Reject`` there; one that passes bytes first
    (limit_data) returns them and calls ``on_cut`` from a greenlet of its own, which
    runs once the bridge has written them and waits again."""

    def transform(direction: str, data: bytes) -> bytes:
        if inner is not None:
            data = inner(direction, data)
        out: list[bytes] = []
        try:
            session.forward(direction == UPSTREAM, data, lambda piece: out.append(bytes(piece)))
        except FaultClose as exc:
            if not out or on_cut is None:
                raise Reject(f"fault {exc.kind.value}") from None
            gevent.spawn(on_cut, exc)
        return b"".join(out)

    return transform
