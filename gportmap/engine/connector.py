"""The connect to a rule's target, in hub callbacks: a non-blocking ``connect`` per
address, driven by a write watcher and a timer, never a greenlet.

What a connection does before it relays (``gportmap.engine.pipeline``) starts here
once the client is ready; a greenlet that must wait for the connect (plugin hooks
ran first) waits on the same callbacks.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
from collections.abc import Callable, Sequence

from gevent import get_hub

from gportmap.engine.net import WRITE


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
