"""Reading a PROXY protocol header a trusted sender puts before the client's bytes
(``acceptProxy``, SPEC §13), in hub callbacks: an io watcher and one timer for the
deadline, no greenlet, nothing that blocks.

The parser is ``gportmap.engine.proxyproto.parse_header`` (sans-IO). Bytes are
first *peeked* (``MSG_PEEK``) and only the header's own bytes are then taken off
the socket: what the client sent after the header stays in the kernel's buffer,
where the next step (a TLS handshake, an HTTP upgrade, the relay) reads it as if
no header had been there: exactly, and in order, with no buffer to hand over.
While the header is incomplete every peeked byte is part of it (the parser's
promise), so those are taken too: the socket is never left readable with
nothing consumed, which would spin the loop.

Only connections from the rule's ``acceptProxy.trusted`` networks are read this
way (``TrustedProxies``); anyone else's connection is direct and its bytes never
parsed.
"""

from __future__ import annotations

import _socket
import socket
from collections.abc import Callable, Iterable

from gevent.event import AsyncResult

from gportmap.engine.net import DeadlineRead
from gportmap.engine.proxyproto import V1_MAX_LENGTH, V2_FIXED, ProxyHeader, ProxyHeaderError, parse_header
from gportmap.security import NetworkSet, client_key


class TrustedProxies:
    """``acceptProxy``: the networks whose connections must start with a header,
    looked up as allow/deny lists are (two bisects), and the deadline."""

    __slots__ = ("networks", "timeout")

    def __init__(self, trusted: Iterable[str], timeout: float) -> None:
        self.networks = NetworkSet.parse(trusted)
        self.timeout = timeout

    def trusts(self, address: object) -> bool:
        key = client_key(address)
        return key is not None and self.networks.covers(*key)


class HubProxyRead(DeadlineRead):
    """Reads one header from ``sock`` (a bare non-blocking socket) within
    ``timeout`` seconds. Calls exactly one of ``on_header(header)`` and
    ``on_failed(text)`` (a malformed or oversized header, the client gone, the
    deadline), unless ``cancel``/``abort`` came first; an unexpected exception
    goes to ``on_crash``. Never closes the socket: its owner does."""

    __slots__ = ("sock", "timeout", "on_header", "on_failed", "on_crash", "taken", "reader", "timer", "on_done")

    #: The longest version 2 address-and-TLV block accepted (its length field);
    #: HAProxy's own TLVs (SSL, unique id, AWS/Azure ids) fit several times over.
    #: A longer header is refused at once rather than awaited.
    max_v2_length = 4096
    #: What a header that did not arrive in time fails with.
    TIMEOUT_TEXT = "no PROXY protocol header within acceptProxy.timeout"

    def __init__(
        self,
        sock: _socket.socket,
        timeout: float,
        on_header: Callable[[ProxyHeader], None],
        on_failed: Callable[[str], None],
        on_crash: Callable[[Exception], None],
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        self.on_header = on_header
        self.on_failed = on_failed
        self.on_crash = on_crash
        #: The header's bytes taken off the socket so far.
        self.taken = b""
        self.reader = self.timer = None
        #: For a protocol server that tracks it as a relay (``abort`` on a stop).
        self.on_done: Callable[[str, str | None], None] | None = None

    def abort(self, reason: str, error: str | None = None) -> None:
        """A stop while the header is awaited: the watchers stop and the owner's
        ``on_done`` hears why."""
        self.cancel()
        if self.on_done is not None:
            self.on_done(reason, error)

    def _on_readable(self) -> None:
        try:
            try:
                header = self._receive()
            except ProxyHeaderError as exc:
                self.cancel()
                self.on_failed(str(exc))
                return
            except OSError as exc:
                self.cancel()
                self.on_failed(f"the client failed before its PROXY protocol header: {exc.strerror or exc}")
                return
            if header is not None:
                self.cancel()
                self.on_header(header)
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (engine.hubrelay)
            self.cancel()
            self.on_crash(exc)

    def _receive(self) -> ProxyHeader | None:
        """Peek, parse, take the header's bytes (or all, while incomplete); the
        header once complete, else None. ProxyHeaderError for a bad header or EOF
        before its end; OSError from the socket (a reset)."""
        limit = max(V1_MAX_LENGTH, V2_FIXED + self.max_v2_length)
        try:
            peeked = self.sock.recv(limit - len(self.taken), socket.MSG_PEEK)
        except BlockingIOError:
            return None
        if not peeked:
            raise ProxyHeaderError("the connection closed before its PROXY protocol header was complete")
        header = parse_header(self.taken + peeked, self.max_v2_length)
        want = len(peeked) if header is None else header.length - len(self.taken)
        self.taken += self.sock.recv(want)  # queued already: returns at once, these bytes only
        if header is None or len(self.taken) < header.length:
            return None  # the rest on the next readiness
        return header

    def _on_timeout(self) -> None:
        try:
            self.cancel()
            self.on_failed(self.TIMEOUT_TEXT)
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub
            self.on_crash(exc)


def await_proxy_header(sock: socket.socket | _socket.socket, timeout: float) -> ProxyHeader:
    """``HubProxyRead`` for a greenlet (one that runs plugins, or pywsgi's): returns
    the header, raises ProxyHeaderError with the reason it failed. ``sock`` may be
    a gevent socket (its descriptor is non-blocking already) or a bare one, which
    is made non-blocking here."""
    raw = getattr(sock, "_sock", sock)  # gevent's socket wraps the C one
    if raw.gettimeout() != 0.0:
        raw.setblocking(False)
    result = AsyncResult()
    read = HubProxyRead(raw, timeout, result.set, lambda text: result.set_exception(ProxyHeaderError(text)),
                        result.set_exception)
    read.start()
    try:
        return result.get()
    finally:
        read.cancel()  # killed while waiting (a stop): no watcher left behind
