"""inotify(7) through libc with ctypes: the three syscalls, the event records, the bits.

One job: give the rules-file watcher a non-blocking inotify descriptor it can wait on
with gevent and the events read from it. What to watch and what an event means for
the rules file is the watcher's business (gportmap.runtime.watcher), not this module's.

Why not pyinotify: its Notifier wrote plain-text lines to stderr on its own (breaking
one JSON object per line), decoded names strictly (a file with a Latin-1 name in the
rules folder raised UnicodeDecodeError and ended the watch), rewrote watch paths
behind its user's back on IN_MOVE_SELF, and needed an asyncore shim from Python 3.12.
The syscalls are a few lines of ctypes, and libc has them on every Linux (glibc since
2.9, musl); elsewhere ``available()`` says no and the watcher polls.

This module sits at the bottom of the layers: it imports only the standard library
(and nothing that imports ``socket``, so it may be imported before gevent patches).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass


class Mask(enum.IntFlag):
    """inotify(7) event and flag bits (the kernel's ABI)."""

    MODIFY = 0x2
    ATTRIB = 0x4
    CLOSE_WRITE = 0x8
    MOVED_FROM = 0x40
    MOVED_TO = 0x80
    CREATE = 0x100
    DELETE = 0x200
    DELETE_SELF = 0x400
    MOVE_SELF = 0x800
    UNMOUNT = 0x2000
    Q_OVERFLOW = 0x4000
    IGNORED = 0x8000
    ONLYDIR = 0x01000000
    DONT_FOLLOW = 0x02000000


#: errno values of ``inotify_init1`` that mean "none left right now", not "none
#: here": the per-user instance limit (``fs.inotify.max_user_instances``, EMFILE),
#: the process's or the system's descriptor limit, kernel memory. ``available()``
#: counts inotify as present then: the watcher meets the same error when it starts,
#: logs it (``watcher_fallback``, with the reason) and polls.
EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


@dataclass(frozen=True)
class InotifyEvent:
    """One event as the kernel reports it: the watch, what happened, and the entry
    of the watched folder it names ("" for the folder itself)."""

    wd: int
    mask: int
    name: str


_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len


def parse_events(data: bytes) -> Iterator[InotifyEvent]:
    """The events in one ``read`` of an inotify descriptor. Names are decoded as the
    os module does (undecodable bytes kept as surrogates), so no file name can make
    this raise."""
    offset = 0
    while offset + _EVENT_HEADER.size <= len(data):
        wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
        start = offset + _EVENT_HEADER.size
        name = data[start : start + length].split(b"\0", 1)[0]
        offset = start + length
        yield InotifyEvent(wd, mask, os.fsdecode(name))


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc with the inotify functions typed; AttributeError where it has none
    (macOS), OSError where there is no libc to load."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


def _errno_error(what: str, path: str | None = None) -> OSError:
    code = ctypes.get_errno()
    if path is None:
        return OSError(code, f"{what}: {os.strerror(code)}")
    return OSError(code, os.strerror(code), path)


class Inotify:
    """One inotify instance: a non-blocking, close-on-exec descriptor and its watches.

    The caller waits for the descriptor to be readable (``gevent.socket.wait_read``)
    and then calls ``read``, which never blocks."""

    #: Bytes asked for per read: room for hundreds of events (16 bytes + the name each).
    read_size = 65536

    def __init__(self) -> None:
        """Raises OSError when no instance can be made: without errno where libc has
        no inotify (not Linux), with the kernel's errno otherwise (EMFILE: the
        instance limit; ENOSYS: a kernel without inotify or a seccomp filter)."""
        try:
            libc = _libc()
        except (OSError, AttributeError) as exc:
            raise OSError(f"no inotify here: {exc}") from None
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _errno_error("inotify_init1")
        self.fd = fd
        self._libc = libc

    def add(self, path: str, mask: int) -> int:
        """Watch ``path``; returns the watch descriptor or raises OSError."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise _errno_error("inotify_add_watch", path)
        return wd

    def remove(self, wd: int) -> None:
        """Stop a watch; one the kernel already ended (its folder deleted) is no error."""
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[InotifyEvent]:
        """The events queued now ([] if none): one non-blocking read."""
        try:
            data = os.read(self.fd, self.read_size)
        except BlockingIOError:
            return []
        return list(parse_events(data))

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def available() -> bool:
    """Whether this system offers inotify: Linux, a libc with ``inotify_init1``, and a
    kernel that makes an instance.

    One instance is made and closed at once (two syscalls, no watch): importing a
    binding proves nothing, while a kernel built without inotify or a seccomp
    filter refusing it (ENOSYS, EPERM) shows only here. An instance limit reached
    right now (``EXHAUSTED_ERRNOS``) is not absence: True, so that the watcher,
    failing the same way when it starts, says why it polls (``watcher_fallback``)
    instead of polling silently. Never raises."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        instance = Inotify()
    except OSError as exc:
        return exc.errno in EXHAUSTED_ERRNOS
    instance.close()
    return True
