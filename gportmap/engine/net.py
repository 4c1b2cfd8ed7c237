"""Socket set-up shared by the protocol servers: listening sockets, address text,
and error messages an operator can act on.

Platform features are probed, never assumed: ``SO_REUSEADDR`` is skipped on
Windows (where it lets another process steal the port) and ``IPV6_V6ONLY`` is
only touched where the platform has it.
"""

from __future__ import annotations

import errno
import socket
import ssl
import sys
from dataclasses import dataclass

import gevent
import gevent.socket

from gportmap.config import format_address
from gportmap.errors import BindError

#: Pending connections the kernel may queue before gportmap accepts them.
LISTEN_BACKLOG = 1024

#: libev event masks (a watcher waiting to read, to write).
READ, WRITE = 1, 2


class DeadlineRead:
    """A wait in hub callbacks for a socket's first bytes, under one deadline: a
    read watcher calls ``_on_readable`` at each readiness, a timer ``_on_timeout``
    once. What reads a PROXY header (``proxyaccept``) and what sniffs a route
    (``routes``) both wait this way; they declare the ``sock``, ``timeout``,
    ``reader`` and ``timer`` slots and the two callbacks."""

    __slots__ = ()

    def start(self) -> None:
        loop = gevent.get_hub().loop
        self.timer = loop.timer(self.timeout)
        self.timer.start(self._on_timeout, update=True)  # from now, not from the loop's last wake-up
        self.reader = loop.io(self.sock.fileno(), READ)
        self.reader.start(self._on_readable)

    def cancel(self) -> None:
        """Stop the watchers (the socket is its owner's to close)."""
        for watcher in (self.reader, self.timer):
            if watcher is not None:
                watcher.close()
        self.reader = self.timer = None

_WILDCARDS = {"0.0.0.0", "::", ""}


def peer_text(address: object) -> str:
    """Text of a socket address tuple as returned by accept()/getpeername()."""
    if isinstance(address, tuple) and len(address) >= 2:
        return format_address(str(address[0]), int(address[1]))
    return str(address)


def bind_listener(
    host: str, port: int, sock_type: int = socket.SOCK_STREAM, reuse_port: bool = False
) -> socket.socket:
    """Create, bind and (for TCP) listen; raise BindError with advice on failure.

    ``reuse_port`` lets the worker processes of one gportmap each bind the same
    address (``SO_REUSEPORT``): the kernel then spreads new connections, and UDP
    clients by their address, over the workers' sockets."""
    return bind_resolved(resolve_listen(host, port, sock_type), port, reuse_port)


@dataclass(frozen=True)
class ListenAddress:
    """A listen host resolved once (``resolve_listen``): what binding each port of a
    range needs, without a lookup per port."""

    host: str
    family: int
    sock_type: int
    proto: int
    sockaddr: tuple

    def at(self, port: int) -> tuple:
        return (self.sockaddr[0], port, *self.sockaddr[2:])


def resolve_listen(host: str, port: int = 0, sock_type: int = socket.SOCK_STREAM) -> ListenAddress:
    """The address to bind for ``host`` (may yield: gevent resolves in its thread
    pool); BindError when it does not resolve."""
    try:
        infos = gevent.socket.getaddrinfo(
            host or None, port, socket.AF_UNSPEC, sock_type, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    family, _, proto, _, sockaddr = infos[0]
    return ListenAddress(host, family, sock_type, proto, sockaddr)


def bind_resolved(address: ListenAddress, port: int, reuse_port: bool = False) -> socket.socket:
    """Bind (and for TCP listen on) ``address`` at ``port``: system calls only, never a
    wait, so a range binds port after port without yielding. BindError on failure."""
    host, family, sock_type = address.host, address.family, address.sock_type
    # gevent's socket class whether or not the process is monkeypatched: the
    # servers need a non-blocking listener.
    try:
        sock = gevent.socket.socket(family, sock_type, address.proto)
    except OSError as exc:  # EMFILE: out of descriptors
        raise BindError(bind_error_message(host, port, exc)) from None
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in _WILDCARDS and hasattr(socket, "IPV6_V6ONLY"):
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass  # the OS insists on IPv6 only; "::" then serves IPv6 alone
        sock.bind(address.at(port))
        if sock_type == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(bind_error_message(host, port, exc)) from None
    return sock


def bind_error_message(host: str, port: int, exc: OSError) -> str:
    where = format_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where} is already in use by another process or rule "
            f"(see which with: ss -ltnup 'sport = :{port}')"
        )
    if exc.errno == errno.EACCES and 0 < port < 1024:
        return (
            f"permission denied binding {where}: ports below 1024 need root or the "
            "CAP_NET_BIND_SERVICE capability (or choose a port >= 1024)"
        )
    if exc.errno == errno.EACCES:
        return f"permission denied binding {where}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this machine"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def connect_error_text(exc: OSError) -> str:
    """Short words for why the target could not be reached."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with the target failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve target: {exc.strerror}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "connect timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc)


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: a relay must not add latency to small interactive writes."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket (tests with socketpairs) or already reset


class BindRetry:
    """When a listener cannot bind (port in use, permission), try again later: after
    ``first`` seconds, doubling up to ``most``. Rules and the admin endpoint share it."""

    #: Seconds before the first retry.
    first = 1.0
    #: Seconds between retries at most.
    most = 30.0

    def __init__(self, first: float | None = None, most: float | None = None) -> None:
        if first is not None:
            self.first = first
        if most is not None:
            self.most = most
        self.delay = self.first  # what the next schedule() will wait: logged as retry_in

    def schedule(self, attempt):  # -> gevent.Greenlet
        greenlet = gevent.spawn_later(self.delay, attempt)
        self.delay = min(self.delay * 2, self.most)
        return greenlet

    def reset(self) -> None:
        self.delay = self.first
