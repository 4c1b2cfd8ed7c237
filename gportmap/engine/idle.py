"""The idle clock: a connection is idle when no byte moved while the process could
have moved one.

A timer that reads the time passed cuts busy connections after any stall of the
process longer than ``idleTimeout`` (a big reload, a SIGSTOP, a swapped-out page):
the bytes were there, the process was not. So before a relay cuts a connection as
idle, it asks the kernel whether either socket has bytes waiting (or a peer's end):
if one has, the connection was not idle, only unserved, and its clock starts again.
The same for a direction that waits to write: room on its destination now means
the process, not the peer, held it up (``writable``). One ``poll`` with a zero
timeout each: no blocking, no greenlet switch.
"""

from __future__ import annotations

import select
from collections.abc import Iterable

from gevent.monkey import get_original

# The process is monkeypatched: gevent's select functions may switch to the hub even
# with a zero timeout. The originals ask the kernel and return at once.
_poll = get_original("select", "poll") if hasattr(select, "poll") else None
_select = get_original("select", "select")
_READABLE = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2) | getattr(select, "POLLHUP", 16)


def waiting(fds: Iterable[int]) -> bool:
    """True when any of the descriptors has something to read now (bytes, an end
    of stream, an error): the connection is not idle. Closed or invalid descriptors
    (-1) are skipped. Never blocks."""
    wanted = [fd for fd in fds if fd >= 0]
    if not wanted:
        return False
    if _poll is not None:
        poller = _poll()
        for fd in wanted:
            poller.register(fd, _READABLE)
        return bool(poller.poll(0))
    readable, _, errored = _select(wanted, [], wanted, 0)  # Windows: sockets only, which these are
    return bool(readable or errored)


def writable(fds: Iterable[int]) -> bool:
    """True when any of the descriptors can take bytes now (or has failed, which a
    write would report at once): a direction waiting to write there could go on,
    the connection is not idle. The write-side twin of ``waiting``. Closed or
    invalid descriptors (-1) are skipped. Never blocks."""
    wanted = [fd for fd in fds if fd >= 0]
    if not wanted:
        return False
    if _poll is not None:
        poller = _poll()
        for fd in wanted:
            poller.register(fd, select.POLLOUT)
        return bool(poller.poll(0))
    _, ready, errored = _select([], wanted, wanted, 0)
    return bool(ready or errored)
