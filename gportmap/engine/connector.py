"""The one connector: a target of the rule's pool (``gportmap.engine.pool``),
reached in hub callbacks, with a retry on another target when it fails.

``HubConnect`` is one target's non-blocking ``connect`` per address, driven by a
write watcher and a timer, never a greenlet. ``PoolConnect`` picks a target
(``TargetPool.acquire``), connects with ``HubConnect`` and, when that fails (or
its owner's set-up after it: the PROXY header, the TLS handshake with the
target), counts the failure against the target (passive health) and tries
another up target, up to ``retries`` more: one dead target costs a client
nothing. When no target can take it the client is failed at once.

What a connection does before it relays (``gportmap.engine.pipeline``) starts here
once the client is ready; a greenlet that must wait for the connect (plugin hooks
ran first, a host name was resolved) waits on the same callbacks
(``await_connect``).
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence

from gevent import get_hub
from gevent.event import AsyncResult

from gportmap.engine.net import WRITE, connect_error_text
from gportmap.engine.pool import TargetPool, TargetState
from gportmap.engine.pumprelay import PumpEngine, PumpRelay
from gportmap.engine.sockopts import apply_keep_alive

#: A TCP socket created non-blocking (Linux; elsewhere ``setblocking`` is needed after).
_NONBLOCK_AT_BIRTH = hasattr(socket, "SOCK_NONBLOCK")
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


class ConnectSweep:
    """The deadlines of connects that share one timeout (one rule's), kept in
    start order (so in deadline order) and served by one timer armed for the
    first: no timer made, started and closed per connect.

    An entry whose connect ended (``HubConnect.sock`` None, or a later deadline
    of the same connect: its next address) is dropped when it reaches the front;
    each new entry first drops the ended ones at the front, so the queue holds
    about the connects in progress (bounded by them and the connect rate times
    the timeout at worst)."""

    __slots__ = ("timeout", "loop", "entries", "timer", "on_timer", "sweeping")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.loop = get_hub().loop
        self.entries: deque[tuple[float, HubConnect]] = deque()
        self.timer = None
        self.on_timer = self._on_timer  # bound once
        self.sweeping = False  # in _on_timer: it arms the timer for the front when done

    @classmethod
    def of(cls, pool: object, timeout: float) -> ConnectSweep | None:
        """``pool``'s sweep for ``timeout`` (made on first use); None for a pool
        without sweeps (a connect then runs a timer of its own)."""
        sweeps = getattr(pool, "sweeps", None)
        if sweeps is None:
            return None
        sweep = sweeps.get(timeout)
        if sweep is None:
            # A new timeout (a reload changed connectTimeout): the idle sweeps of
            # old ones go, so that the table stays as small as the timeouts in use.
            for key in [key for key, old in sweeps.items() if not old.entries and old.timer is None]:
                del sweeps[key]
            sweep = sweeps[timeout] = cls(timeout)
        return sweep

    def add(self, connect: HubConnect) -> None:
        entries = self.entries
        while entries and _ended(entries[0]):
            entries.popleft()
        deadline = time.monotonic() + self.timeout
        connect.deadline = deadline
        entries.append((deadline, connect))
        if self.timer is None and not self.sweeping:
            self._arm(self.timeout)

    def _arm(self, after: float) -> None:
        self.timer = self.loop.timer(max(after, 0.0))
        self.timer.start(self.on_timer, update=True)  # from now (see HubConnect._next)

    def _on_timer(self) -> None:
        """Time out every connect whose deadline passed (each in its own guard:
        ``HubConnect._on_timeout``), then wait for the next deadline."""
        self.timer.close()
        self.timer = None
        entries = self.entries
        now = time.monotonic()
        self.sweeping = True
        try:
            while entries:
                deadline, connect = entries[0]
                if _ended(entries[0]):
                    entries.popleft()
                    continue
                if deadline > now:
                    break
                entries.popleft()
                connect.deadline = None
                connect.on_timeout()  # guarded: its failures end its own connection
        finally:
            self.sweeping = False
            while entries and _ended(entries[0]):
                entries.popleft()
            if entries:
                self._arm(entries[0][0] - time.monotonic())


def _ended(entry: tuple[float, HubConnect]) -> bool:
    deadline, connect = entry
    return connect.sock is None or connect.deadline != deadline


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
        "spare",
        "sweep",
        "deadline",
        "on_timeout",
    )

    def __init__(
        self,
        addresses: Sequence[tuple[int, tuple]],
        timeout: float,
        on_connected: Callable[[_socket.socket], None],
        on_failed: Callable[[OSError], None],
        on_crash: Callable[[Exception], None] | None = None,
        sweep: ConnectSweep | None = None,
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
        #: After a connect that waited: its io watcher on the connected socket,
        #: stopped, for the relay to read with (``take_spare``): one watcher (and
        #: one ``fcntl`` gevent makes per watcher) fewer per connection.
        self.spare = None
        #: Serves this connect's deadline (its ``timeout`` must be the sweep's);
        #: None: a timer of its own.
        self.sweep = sweep if sweep is not None and sweep.timeout == timeout else None
        self.deadline: float | None = None  # while in the sweep
        self.on_timeout = self._on_timeout  # bound once (the sweep or the timer calls it)

    def start(self) -> None:
        self._next(None)

    def take_spare(self):  # noqa: ANN201 - a gevent io watcher or None
        """The stopped watcher of the connected socket (see ``spare``), now the
        caller's to close; None when the connect did not wait."""
        spare, self.spare = self.spare, None
        return spare

    def cancel(self) -> None:
        """Stop waiting (a drain cut-off); the socket being connected is closed."""
        self._stop()
        spare = self.take_spare()
        if spare is not None:
            spare.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _next(self, error: OSError | None) -> None:
        while self.index < len(self.addresses):
            family, sockaddr = self.addresses[self.index]
            self.index += 1
            sock = None
            try:
                # non-blocking from birth: one system call fewer than setblocking() after
                sock = _socket.socket(family, _STREAM_NONBLOCK)
                if not _NONBLOCK_AT_BIRTH:
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
                if PumpRelay.enabled:  # the C engine waits, and its pair takes the wait over
                    self.watcher = PumpEngine.current(self.loop).waiter(sock.fileno(), self)
                else:
                    self.watcher = self.loop.io(sock.fileno(), WRITE)
                    self.watcher.start(self._on_writable)
                if self.sweep is not None:
                    self.sweep.add(self)
                    return
                self.timer = self.loop.timer(self.timeout)
                # From now, not from when the loop last woke: a greenlet may start a
                # connect long after (gevent.Timeout does the same).
                self.timer.start(self.on_timeout, update=True)
                return
            sock.close()
            error = OSError(err, os.strerror(err))
        self.on_failed(error or OSError("the target resolved to no address"))

    def _stop(self) -> None:
        self.deadline = None  # out of the sweep (dropped when it reaches the front)
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        if self.timer is not None:
            self.timer.close()
            self.timer = None

    def on_pump(self, waiter) -> None:  # noqa: ANN001 - the engine's Waiter
        """The C engine's wait fired (``PumpEngine.waiter``): the connect's result
        comes with it. A wait cancelled earlier in the same run is over already."""
        if self.watcher is waiter:
            self._on_writable(waiter.error)

    def on_pump_crash(self, exc: Exception) -> None:
        self._crash(exc)

    def _on_writable(self, err: int | None = None) -> None:
        """Writable: connected, or failed (``err``: the result when the engine
        gave it; None: ask the socket)."""
        try:
            watcher, self.watcher = self.watcher, None
            if err is None:
                watcher.stop()
            self._stop()  # the timer
            sock, self.sock = self.sock, None
            if err is None:
                try:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                except OSError as exc:
                    err = exc.errno or errno.EBADF
            if not err:
                self.spare = watcher
                self.on_connected(sock)
                return
            watcher.close()
            sock.close()
            self._next(OSError(err, os.strerror(err)))
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self._crash(exc)

    def _on_timeout(self) -> None:
        try:
            self._stop()
            sock, self.sock = self.sock, None
            if sock is None:
                return  # ended meanwhile (the sweep looked before this callback)
            sock.close()
            self._next(TimeoutError("timed out"))
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self._crash(exc)

    def _crash(self, exc: Exception) -> None:
        self.cancel()
        if self.on_crash is None:
            raise exc
        self.on_crash(exc)


class NoTargetError(OSError):
    """No target of the pool can take a connection now (all down or all tried)."""


class PoolConnect:
    """A connection's connect to its rule's pool, in hub callbacks.

    ``on_connected(sock, target)``: the TCP connect to ``target`` succeeded; the
    owner then readies it (PROXY header, TLS) and calls ``established()`` (the
    target counts it: the connection holds it from then on) or ``retry(error)``
    (count it against the target, try another). ``on_failed(error)`` once when
    every attempt failed or no target is up (the rule's connect failure is
    counted by then). ``cancel()`` gives back what it holds."""

    __slots__ = ("pool", "client_key", "timeout", "on_connected", "on_failed", "on_crash", "tried", "target",
                 "step", "last_error", "last_text", "spare")

    def __init__(
        self,
        pool: TargetPool,
        client_key: str | None,
        timeout: float,
        on_connected: Callable[[_socket.socket, TargetState], None],
        on_failed: Callable[[OSError], None],
        on_crash: Callable[[Exception], None] | None = None,
    ) -> None:
        self.pool = pool
        self.client_key = client_key
        self.timeout = timeout
        self.on_connected = on_connected
        self.on_failed = on_failed
        self.on_crash = on_crash
        self.tried: list[TargetState] = []
        self.target: TargetState | None = None  # acquired, its outcome not reported yet
        self.step: HubConnect | None = None
        self.last_error: OSError | None = None
        #: Words for the last failed attempt (what the connection's record says).
        self.last_text: str | None = None
        #: The connect's stopped io watcher on the socket it handed over
        #: (``HubConnect.spare``), for the owner's relay: ``take_spare``.
        self.spare = None

    def start(self) -> None:
        self._attempt()

    def established(self) -> TargetState:
        """The target is ready (connected and set up): it counts the connection,
        which holds it from now on (``Connection.hold``)."""
        target, self.target = self.target, None
        assert target is not None
        target.connected()
        return target

    def retry(self, error: OSError, text: str | None = None) -> None:
        """The set-up after the connect failed (``text`` says how): counted
        against the target; the next target is tried."""
        self._drop_spare()
        self._failed(error, text)

    def take_spare(self):  # noqa: ANN201 - a gevent io watcher or None
        """The stopped io watcher on the socket handed to ``on_connected`` (None if
        the connect did not wait), now the caller's to use and close."""
        spare, self.spare = self.spare, None
        return spare

    def _drop_spare(self) -> None:
        spare = self.take_spare()
        if spare is not None:
            spare.close()

    def cancel(self) -> None:
        """Stop (the client left, a drain cut-off): the socket being connected is
        closed and the target given back, counted neither way."""
        step, self.step = self.step, None
        if step is not None:
            step.cancel()
        self._drop_spare()
        target, self.target = self.target, None
        if target is not None:
            target.cancelled()

    def _attempt(self) -> None:
        pool = self.pool
        while True:
            if len(self.tried) > pool.retries:
                self._give_up()
                return
            target = pool.acquire(self.client_key, self.tried)
            if target is None:
                self._give_up()
                return
            self.tried.append(target)
            self.target = target
            addresses = target.addresses.cached
            if addresses is None:  # a name not resolved (or stale): never looked up here, on the hub
                why = target.addresses.error
                detail = f": {why.strerror or why}" if why is not None else ""
                self.last_text = f"cannot resolve {target.spec.host}{detail}"
                self.last_error = OSError(self.last_text)
                self.target = None
                target.attempt_failed(self.last_text)
                continue
            self.step = HubConnect(addresses, self.timeout, self._connected, self._failed, self._crash,
                                   ConnectSweep.of(pool, self.timeout))  # fmt: skip
            self.step.start()
            return

    def _give_up(self) -> None:
        error = self.last_error
        if error is None:
            self.pool.unavailable()
            error = NoTargetError(self.pool.no_target_error())
        self.on_failed(error)

    def _connected(self, sock: _socket.socket) -> None:
        step, self.step = self.step, None
        if step is not None:
            self._drop_spare()
            self.spare = step.take_spare()
        keep_alive = self.pool.rule.keep_alive
        if keep_alive is not None:
            apply_keep_alive(sock, keep_alive)
        self.on_connected(sock, self.target)

    def _failed(self, error: OSError, text: str | None = None) -> None:
        self.step = None
        target, self.target = self.target, None
        self.last_error = error
        self.last_text = text or connect_error_text(error)
        if target is not None:
            target.attempt_failed(self.last_text)
        self._attempt()

    def _crash(self, exc: Exception) -> None:
        self.cancel()
        if self.on_crash is None:
            raise exc
        self.on_crash(exc)


def await_connect(pool: TargetPool, client_key: str | None, timeout: float) -> tuple[_socket.socket, PoolConnect]:
    """``PoolConnect`` for a greenlet: resolves the pool's host names first (here,
    never on the hub), then waits for the hub connect. Returns the connected socket
    (a bare non-blocking ``_socket.socket``) and the connector, whose
    ``established()`` or ``retry()`` the caller reports after its set-up; raises
    the last error (NoTargetError when no target is up)."""
    for target in pool.targets:
        if target.addresses.cached is None:
            try:
                target.addresses.resolve()
            except OSError:
                pass  # the attempt on it fails and is counted (PoolConnect._attempt)
    result = AsyncResult()
    connector = PoolConnect(pool, client_key, timeout, lambda sock, target: result.set(sock), result.set_exception,
                            result.set_exception)
    connector.start()
    try:
        sock = result.get()
        connector._drop_spare()  # a greenlet's relay makes its own watchers
        return sock, connector
    except OSError as exc:
        raise _worded(connector, exc) from None
    except BaseException:
        connector.cancel()
        raise


def retry_connect(connector: PoolConnect, error: OSError, text: str | None = None) -> _socket.socket:
    """After ``await_connect``: the set-up on its socket failed; count it against the
    target and wait for the next one (raises as ``await_connect``)."""
    result = AsyncResult()
    connector.on_connected = lambda sock, target: result.set(sock)
    connector.on_failed = connector.on_crash = result.set_exception
    connector.retry(error, text)
    try:
        sock = result.get()
        connector._drop_spare()
        return sock
    except OSError as exc:
        raise _worded(connector, exc) from None
    except BaseException:
        connector.cancel()
        raise


def _worded(connector: PoolConnect, error: OSError) -> OSError:
    """The error a greenlet's connect fails with, in the words of its last attempt
    (a PROXY header or TLS handshake that failed says so)."""
    if connector.last_error is error and connector.last_text:
        worded = OSError(error.errno, connector.last_text)
        worded.__cause__ = error
        return worded
    return error

