"""Reading the rules file and the files it names, bounded: only a regular file of at
most a known size is read, opened without blocking (a FIFO, a device or a directory
is refused at once). Thread-safe and free of gevent: the reload path runs it in a
thread pool."""

from __future__ import annotations

import os
import stat

from gportmap.config.messages import clip
from gportmap.errors import ConfigError

#: The largest rules file read, in bytes. A rule with most of its keys set is 250 to
#: 330 bytes pretty-printed, so 10,000 rules are 2.5-3.3 MB: 16 MiB leaves room for
#: about 50,000. A larger file is refused unread, so a runaway one (a symlink to
#: /dev/zero, a log written to the wrong path) costs neither memory (a full 16 MiB
#: file holds about 7 times its size while parsed) nor minutes of checking (the
#: checks run at about 1 MB/s, so a full 16 MiB file already takes some 15 s).
MAX_RULES_FILE_BYTES = 16 * 1024 * 1024


#: The largest certificate, key or CA file read for ``tls``/``targetTls``, in bytes:
#: a full CA bundle is well under 1 MiB.
MAX_TLS_FILE_BYTES = 4 * 1024 * 1024


#: The largest ``settings.admin.tokenFile`` read, in bytes: a bearer token is tens of
#: bytes; a larger file is the wrong file (a certificate, a log), refused unread.
MAX_TOKEN_FILE_BYTES = 4096


#: Never wait: opening a FIFO without O_NONBLOCK blocks until a writer comes, and
#: O_NOCTTY keeps a terminal device from becoming the process's controlling terminal.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


_READ_CHUNK = 1024 * 1024


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class Unreadable(Exception):
    """Why a file was not read, worded to follow "cannot read ...: "."""


def read_rules_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the rules file at ``path``, or ConfigError with one message naming it.

    Only a regular file of at most ``MAX_RULES_FILE_BYTES`` is read: a FIFO, a device
    (``rules.json -> /dev/zero``), a directory or an oversized file is refused at once,
    without blocking and without reading it. Thread-safe and free of gevent: the
    reload path runs it in a thread pool.
    """
    shown = os.fsdecode(path)
    try:
        return read_regular_file(path, MAX_RULES_FILE_BYTES)
    except Unreadable as exc:
        raise ConfigError([f"{shown}: cannot read: {exc}"]) from None


def read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``, else Unreadable.

    The path is stat()ed before it is opened, because opening some devices acts (a
    tape rewinds, a modem line hangs up), and the descriptor is fstat()ed after, since
    a rename in between may have put something else there.
    """
    try:
        mode = os.stat(path).st_mode
        if _file_kind(mode) is not None:
            raise Unreadable(_not_regular(path, mode))
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise Unreadable(exc.strerror or str(exc)) from None
    except ValueError as exc:  # a NUL byte in the name
        raise Unreadable(str(exc)) from None
    try:
        info = os.fstat(fd)
        if _file_kind(info.st_mode) is not None:
            raise Unreadable(_not_regular(path, info.st_mode))
        if info.st_size > limit:
            raise Unreadable(_too_large(info.st_size, limit))
        data = _read_up_to(fd, limit + 1)
    except OSError as exc:
        raise Unreadable(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since the fstat, or st_size is not its size (/proc)
        raise Unreadable(_too_large(None, limit))
    return data


def _read_up_to(fd: int, count: int) -> bytes:
    """Read until end of file or ``count`` bytes, whichever comes first."""
    chunks = []
    left = count
    while left > 0:
        chunk = os.read(fd, min(left, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("a FIFO (named pipe)"), or None."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def _not_regular(path: str | os.PathLike[str], mode: int) -> str:
    """``it is a FIFO (named pipe), not a regular file``, naming where a symlink leads."""
    kind = _file_kind(mode)
    real = os.path.realpath(path)
    if os.path.normcase(real) != os.path.normcase(os.path.abspath(path)):
        return f"it leads to {clip(real, 200)}, {kind}, not a regular file"
    return f"it is {kind}, not a regular file"


def _too_large(size: int | None, limit: int) -> str:
    limit_text = f"{limit:,} bytes" + (f" ({limit / 1048576:g} MiB)" if limit >= 1048576 else "")
    if size is None:
        return f"the file is larger than the limit of {limit_text}"
    return f"the file is {size:,} bytes, larger than the limit of {limit_text}"
