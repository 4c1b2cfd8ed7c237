"""Starting a websocket rule never yields: the supervisor hands a listening socket
from an old server to a new one without yielding, so nothing else may run between
the two (issue 15). pywsgi's WSGIServer asked the resolver for the listen address's
name (``socket.getfqdn``, a reverse lookup through gevent's thread pool) during
``start()`` whenever SERVER_NAME was not given."""

from __future__ import annotations

import greenlet
from conftest import LOOPBACK, free_port

from gportmap.config import Rule
from gportmap.engine.net import bind_listener
from gportmap.engine.relay import BufferPool
from gportmap.log import RateLimiter
from gportmap.protocols import ServerContext
from gportmap.protocols.websocket import WebSocketServer
from gportmap.stats import StatsRegistry


def switches_during(action) -> list[greenlet.greenlet]:
    """The greenlets the current one switched to while ``action()`` ran."""
    me, seen = greenlet.getcurrent(), []

    def trace(event: str, args: tuple) -> None:
        if event in ("switch", "throw") and args[0] is me:
            seen.append(args[1])

    previous = greenlet.settrace(trace)
    try:
        action()
    finally:
        greenlet.settrace(previous)
    return seen


def test_starting_on_a_handed_over_listener_does_not_yield() -> None:
    port = free_port()
    rule = Rule("ws", "websocket", LOOPBACK, port, LOOPBACK, 9)
    listener = bind_listener(LOOPBACK, port)  # binding may resolve; the handover starts after it
    server = WebSocketServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    try:
        assert switches_during(lambda: server.start(listener)) == []
        environ = server._server.environ
        assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == (LOOPBACK, str(port))
    finally:
        server.close()
