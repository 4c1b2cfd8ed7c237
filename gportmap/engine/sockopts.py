"""TCP keepalive (``keepAlive`` of a rule) and TCP_NODELAY on the sockets of a connection.

Set on the listening sockets, the options are inherited by every connection the
kernel accepts there (Linux copies SO_KEEPALIVE and TCP_KEEPIDLE/INTVL/CNT into the
child socket), so the client side costs nothing per connection; the target side is
set on each socket once it is connected (``gportmap.engine.connector``). A rule whose
``keepAlive`` is removed on reload gets SO_KEEPALIVE cleared on the listeners it keeps.
"""

from __future__ import annotations

import socket
import sys

from gportmap.config.model import KeepAlive

#: Accepted sockets inherit TCP_NODELAY from their listener (Linux copies the
#: listener's TCP state into the child socket): set once on the listener, it costs
#: no system call per connection. Elsewhere each accepted socket gets its own.
NODELAY_INHERITED = sys.platform.startswith("linux")

#: TCP_KEEPIDLE and friends exist on Linux and recent macOS; elsewhere only
#: SO_KEEPALIVE is set and the system's timings apply.
_TIMINGS = tuple(
    (getattr(socket, name), attribute)
    for name, attribute in (("TCP_KEEPIDLE", "idle"), ("TCP_KEEPINTVL", "interval"), ("TCP_KEEPCNT", "count"))
    if hasattr(socket, name)
)


def prepare_listener(sock: socket.socket, keep_alive: KeepAlive | None) -> None:
    """What every connection accepted on ``sock`` inherits: TCP_NODELAY (a relay
    must not add latency to small writes) and the rule's keepalive."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (a test's socket): each connection then sets its own
    apply_keep_alive(sock, keep_alive)


def apply_keep_alive(sock: socket.socket, keep_alive: KeepAlive | None) -> None:
    """Turn keepalive on with the rule's timings, or off when the rule has none.
    A socket already reset (or not TCP) is left alone: its relay will see it."""
    try:
        if keep_alive is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, attribute in _TIMINGS:
            sock.setsockopt(socket.IPPROTO_TCP, option, getattr(keep_alive, attribute))
    except OSError:
        pass
