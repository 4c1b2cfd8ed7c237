"""Accepting on many listening sockets for one rule (SPEC §9), as HAProxy's ``bind
:A-B`` and nginx's ``listen A-B`` do: one object, a socket and a read watcher per
port. An idle port costs its descriptor and its libev watcher, no server object, no
pool and no greenlet.

What is done with an accepted connection is a gevent server's: the rule's server
builds one as it always does (``StreamServer``, ``RawAcceptServer``, pywsgi's
``WSGIServer``) but never starts it; ``Acceptor`` uses it as the template, calling
its ``do_handle`` (which runs the handler on the hub or spawns it in the rule's
greenlet pool, and closes the client socket after). So every listen port of a rule
runs exactly the code a single-port rule runs.

Like gevent's ``BaseServer._do_read``: up to ``max_accept`` connections per
readiness; when the pool is full every socket stops accepting until a greenlet ends
(clients wait in the kernel's backlog); an accept error (EMFILE) pauses that socket
for ``min_delay`` seconds, doubling up to ``max_delay``. Nothing raised here reaches
the hub: a handler's exception is counted on ``errors`` and logged, rate-limited.
"""

from __future__ import annotations

import _socket
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import gevent.socket
from gevent import get_hub

from gportmap.config.model import format_address
from gportmap.engine.net import READ
from gportmap.events import AcceptFailed, InternalError
from gportmap.log import RateLimiter, emit, get_logger

logger = get_logger("acceptor")

#: A listener's address: (host as written in the rule, port).
ListenKey = tuple[str, int]


class Door:
    """One listening socket of a rule and its watcher (None while not accepting)."""

    __slots__ = ("key", "sock", "raw", "watcher", "timer", "delay")

    def __init__(self, key: ListenKey, sock: socket.socket) -> None:
        self.key = key
        self.sock = sock  # owned: closed by close()/remove() unless handed on
        self.raw = getattr(sock, "_sock", sock)  # accept() without gevent's wrapper
        self.watcher: Any = None
        self.timer: Any = None
        self.delay = 0.0

    @property
    def text(self) -> str:
        return format_address(*self.key)


class Acceptor:
    """Accepts on every ``Door`` and hands each connection to ``template``."""

    #: Connections accepted per readiness of one socket before others get the loop.
    max_accept = 100
    #: Seconds an accept error (EMFILE, ENFILE, ENOBUFS) pauses its socket at first.
    min_delay = 0.01
    #: ... doubling up to this.
    max_delay = 1.0

    def __init__(self, template: Any, name: str) -> None:
        """``template``: the rule's unstarted gevent server; ``name``: the rule's,
        for log records."""
        self.template = template
        self.name = name
        self.doors: dict[ListenKey, Door] = {}
        self.loop = get_hub().loop
        #: Gevent sockets for the handler (a ``StreamServer``'s), else bare ones.
        self.raw = bool(getattr(template, "raw_accept", False))
        self.accepting = False
        self.paused = False  # by a full pool: resumed by the pool's semaphore
        self.errors = 0
        self._limiter = RateLimiter()

    # -- the sockets --------------------------------------------------------------------

    def add(self, sockets: Iterable[tuple[ListenKey, socket.socket]]) -> None:
        """Take these listening sockets (accepting on them if this accepts)."""
        for key, sock in sockets:
            door = self.doors[key] = Door(key, sock)
            if self.accepting and not self.paused:
                self._watch(door)

    def take(self, keys: Iterable[ListenKey]) -> Iterator[tuple[ListenKey, socket.socket]]:
        """Stop accepting on ``keys`` and give their sockets away, still open."""
        for key in keys:
            door = self.doors.pop(key, None)
            if door is not None:
                self._unwatch(door)
                yield key, door.sock

    def start(self) -> None:
        self.accepting = True
        if not self.paused:
            for door in self.doors.values():
                self._watch(door)

    def stop(self) -> None:
        """Stop accepting everywhere (the sockets stay open: attempts queue)."""
        self.accepting = False
        self._unpause_link()
        for door in self.doors.values():
            self._unwatch(door)

    def close(self) -> None:
        """Stop and close every socket: attempts are refused from now on."""
        self.stop()
        doors, self.doors = self.doors, {}
        for door in doors.values():
            door.sock.close()

    def sockets(self) -> dict[ListenKey, socket.socket]:
        return {key: door.sock for key, door in self.doors.items()}

    # -- watchers -----------------------------------------------------------------------

    def _watch(self, door: Door) -> None:
        if door.watcher is None and door.timer is None:
            door.watcher = self.loop.io(door.raw.fileno(), READ)
            door.watcher.start(self._on_ready, door)

    @staticmethod
    def _unwatch(door: Door) -> None:
        for name in ("watcher", "timer"):
            watcher = getattr(door, name)
            if watcher is not None:
                watcher.stop()
                watcher.close()
                setattr(door, name, None)

    def _full(self) -> bool:
        full = getattr(self.template, "full", None)
        return bool(full is not None and full())

    def _pause(self) -> None:
        """The pool is full: no socket accepts until a greenlet ends."""
        self.paused = True
        for door in self.doors.values():
            self._unwatch(door)
        pool = getattr(self.template, "pool", None)
        if pool is not None:
            pool._semaphore.rawlink(self._resume)

    def _unpause_link(self) -> None:
        pool = getattr(self.template, "pool", None)
        if self.paused and pool is not None:
            pool._semaphore.unlink(self._resume)
        self.paused = False

    def _resume(self, _semaphore: Any = None) -> None:
        try:
            self.paused = False
            if self.accepting:
                for door in self.doors.values():
                    self._watch(door)
        except Exception as exc:  # noqa: BLE001 - never to the hub
            self._report(exc, None)

    # -- accepting (hub callbacks) ----------------------------------------------------------

    def _on_ready(self, door: Door) -> None:
        template = self.template
        for _ in range(self.max_accept):
            if self._full():
                self._pause()
                return
            try:
                fd, address = door.raw._accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: pause this socket a while
                self._backoff(door, exc)
                return
            except Exception as exc:  # noqa: BLE001 - never to the hub
                self._report(exc, door)
                return
            door.delay = 0.0
            raw = door.raw
            try:
                if self.raw:
                    client: Any = _socket.socket(raw.family, raw.type, raw.proto, fileno=fd)
                else:
                    client = gevent.socket.socket(raw.family, raw.type, raw.proto, fileno=fd)
            except OSError as exc:
                _close_fd(fd)
                self._report(exc, door)
                continue
            try:
                template.do_handle(client, address)
            except Exception as exc:  # noqa: BLE001 - a bug in a handler on the hub: this connection only
                client.close()
                self._report(exc, door)
            if door.watcher is None:  # taken away or stopped by what it ran
                return

    def _backoff(self, door: Door, exc: OSError) -> None:
        self._unwatch(door)
        door.delay = min(self.max_delay, door.delay * 2) if door.delay else self.min_delay
        door.timer = self.loop.timer(door.delay)
        door.timer.start(self._retry, door)
        allowed, suppressed = self._limiter.allow((self.name, "accept"))
        if allowed:
            event = AcceptFailed(
                rule=self.name, listen=door.text, error=exc.strerror or str(exc), suppressed=suppressed, delay=door.delay
            )
            emit(logger, event)

    def _retry(self, door: Door) -> None:
        try:
            timer, door.timer = door.timer, None
            if timer is not None:
                timer.close()
            if self.accepting and not self.paused and self.doors.get(door.key) is door:
                self._watch(door)
        except Exception as exc:  # noqa: BLE001 - never to the hub
            self._report(exc, door)

    def _report(self, exc: BaseException, door: Door | None) -> None:
        self.errors += 1
        allowed, suppressed = self._limiter.allow((self.name, "internal"))
        if allowed:
            where = door.text if door is not None else "its ports"
            event = InternalError(
                rule=self.name, suppressed=suppressed, what=f"rule {self.name}: unexpected error accepting on {where}: {exc!r}"
            )
            emit(logger, event)


def _close_fd(fd: int) -> None:
    try:
        _socket.socket(fileno=fd).close()
    except OSError:
        pass
