"""What this platform offers, probed at run time and never assumed.

gportmap runs on Linux, macOS and Windows; Linux-only features each have a
portable fallback. ``GPORTMAP_PORTABLE=1`` turns every one of them off, so the
fallbacks are exercised on the one platform the test suite runs on.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import ClassVar

from gportmap import inotify
from gportmap.events import FdLimitCapped
from gportmap.log import emit, get_logger

logger = get_logger("platform")

#: The soft open-file limit aimed for when the hard limit is unlimited: every
#: connection costs two descriptors, so this carries about half a million.
UNLIMITED_FD_TARGET = 1 << 20
#: macOS ``OPEN_MAX`` (<sys/syslimits.h>): setrlimit(RLIMIT_NOFILE) refuses a soft
#: limit above ``kern.maxfilesperproc``, and this is the value that always passes
#: (the hard limit there is usually "unlimited", which is never accepted as such).
MACOS_OPEN_MAX = 10240


@dataclass(frozen=True)
class Features:
    #: SIGHUP (reload) and SIGUSR1 (stats) exist: POSIX only.
    posix_signals: bool
    #: The open-file limit can be raised (``resource``): POSIX only.
    fd_limit: bool
    #: The kernel offers inotify for the rules-file watcher (``gportmap.inotify.available``:
    #: Linux, libc has it, an instance can be made): Linux only. Elsewhere, and where
    #: the watch cannot be set up when it starts, the watcher polls.
    inotify: bool
    #: splice(2) moves TCP bytes without copying them through Python: Linux only.
    #: ``GPORTMAP_RELAY=copy`` turns it off, ``splice`` insists on it.
    splice: bool = False
    #: SO_REUSEPORT spreads connections over processes bound to one port (Linux):
    #: what ``--workers`` needs. (BSD and macOS have the option but not the spreading.)
    reuse_port: bool = False
    #: ``GPORTMAP_RELAY=splice``: splice every plain direction from its first byte,
    #: not only once it streams, so that the splice path sees every kind of traffic
    #: (tests, benchmarks). Read here, once at start, and handed to the relay
    #: (``HubRelay.splice_first``); never read at import.
    splice_first: bool = False
    #: Plain TCP connections are relayed by the C engine (``gportmap.engine._pump``,
    #: built at install where a compiler is): Linux, unless ``GPORTMAP_PUMP=off``
    #: or the engine was not built. Off: the Python relay (``engine.hubrelay``).
    pump: bool = False

    def enabled(self) -> list[str]:
        """The platform's features on (the ``started`` record's ``features``); a
        policy such as ``splice_first`` is not one."""
        return [name for name, on in asdict(self).items() if on and name not in self.POLICIES]

    #: Fields that say how to use a feature rather than that the platform has it.
    POLICIES: ClassVar[frozenset[str]] = frozenset({"splice_first"})


def portable_mode() -> bool:
    return os.environ.get("GPORTMAP_PORTABLE", "").strip() not in ("", "0")


def _can_import(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def splice_available() -> bool:
    """os.splice exists with non-blocking moves (Linux, Python 3.10+)."""
    return hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")


def relay_mode() -> str:
    """``GPORTMAP_RELAY``: ``copy`` (never splice), ``splice`` (from the first byte)
    or ``auto``. Read by ``detect`` (and by nothing at import)."""
    return os.environ.get("GPORTMAP_RELAY", "auto").strip().lower() or "auto"


def detect() -> Features:
    """Probe once at start-up; the result is passed down, not re-read."""
    if portable_mode():
        return Features(posix_signals=False, fd_limit=False, inotify=False, splice=False, reuse_port=False)
    relay = relay_mode()
    return Features(
        posix_signals=hasattr(signal, "SIGHUP") and hasattr(signal, "SIGUSR1"),
        fd_limit=_can_import("resource"),
        inotify=inotify.available(),
        splice=relay != "copy" and sys.platform.startswith("linux") and splice_available(),
        reuse_port=sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT"),
        splice_first=relay == "splice",
        pump=pump_wanted() and sys.platform.startswith("linux"),
    )


def pump_wanted() -> bool:
    """``GPORTMAP_PUMP``: ``off`` (or ``0``, ``no``, ``false``) keeps every connection
    on the Python relay; anything else uses the C engine where it is built (whether
    it is, the engine layer knows: ``gportmap.engine.pumprelay.configure`` turns
    ``Features.pump`` off when it is not). Read by ``detect``."""
    return os.environ.get("GPORTMAP_PUMP", "auto").strip().lower() not in ("off", "0", "no", "false")


def raise_fd_limit() -> int | None:
    """Lift the soft open-file limit as far as the platform allows; return the soft
    limit now in force (None: unlimited, or no ``resource`` module as on Windows).

    Every connection costs two descriptors, and the usual soft limit (1024 on
    Linux, 256 on macOS) would cap a proxy at a few hundred clients. The hard limit
    is tried first; where the kernel refuses it (macOS above
    ``kern.maxfilesperproc``, Linux above ``fs.nr_open`` when the hard limit is
    unlimited) the platform's maximum is tried, then halves of the target, so the
    result is the most the kernel grants rather than the low default. The hard
    limit is left as it is, and the soft limit is never lowered."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = UNLIMITED_FD_TARGET if hard == resource.RLIM_INFINITY else hard
    for candidate in _fd_limit_candidates(soft, target):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
        except (ValueError, OSError):  # CPython raises ValueError for EINVAL and EPERM
            continue
        if candidate < target:
            emit(logger, FdLimitCapped(open_files=candidate, wanted=target))
        return candidate
    return soft


def _fd_limit_candidates(soft: int, target: int) -> Iterator[int]:
    """Soft limits to try, highest first, each above ``soft``: the target, halves
    of it, and on macOS the platform's own maxima (``kern.maxfilesperproc``,
    ``OPEN_MAX``), which are usually what the kernel accepts there."""
    candidates = {target}
    if sys.platform == "darwin":
        per_process = macos_max_files_per_proc()
        if per_process:
            candidates.add(min(target, per_process))
        candidates.add(min(target, MACOS_OPEN_MAX))
    step = target // 2
    while step > soft:
        candidates.add(step)
        step //= 2
    yield from sorted((c for c in candidates if c > soft), reverse=True)


def macos_max_files_per_proc() -> int | None:
    """``kern.maxfilesperproc`` through libc's sysctlbyname (no process spawned);
    None where it cannot be read."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
        failed = libc.sysctlbyname(b"kern.maxfilesperproc", ctypes.byref(value), ctypes.byref(size), None, 0)
    except (OSError, AttributeError):
        return None
    return value.value if failed == 0 and value.value > 0 else None
