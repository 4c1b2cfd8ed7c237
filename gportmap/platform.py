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
from dataclasses import asdict, dataclass

from gportmap.relay import splice_available


@dataclass(frozen=True)
class Features:
    #: SIGHUP (reload) and SIGUSR1 (stats) exist: POSIX only.
    posix_signals: bool
    #: The open-file limit can be raised (``resource``): POSIX only.
    fd_limit: bool
    #: inotify can watch the rules folder (pyinotify imports): Linux only.
    inotify: bool
    #: splice(2) moves TCP bytes without copying them through Python: Linux only.
    #: ``GPORTMAP_RELAY=copy`` turns it off, ``splice`` insists on it.
    splice: bool = False
    #: SO_REUSEPORT spreads connections over processes bound to one port (Linux):
    #: what ``--workers`` needs. (BSD and macOS have the option but not the spreading.)
    reuse_port: bool = False

    def enabled(self) -> list[str]:
        return [name for name, on in asdict(self).items() if on]


def portable_mode() -> bool:
    return os.environ.get("GPORTMAP_PORTABLE", "").strip() not in ("", "0")


def _can_import(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not here" (pyinotify raises its own)
        return False
    return True


def detect() -> Features:
    """Probe once at start-up; the result is passed down, not re-read."""
    if portable_mode():
        return Features(posix_signals=False, fd_limit=False, inotify=False, splice=False, reuse_port=False)
    relay = os.environ.get("GPORTMAP_RELAY", "auto").strip().lower()
    return Features(
        posix_signals=hasattr(signal, "SIGHUP") and hasattr(signal, "SIGUSR1"),
        fd_limit=_can_import("resource"),
        inotify=sys.platform.startswith("linux") and _can_import("pyinotify"),
        splice=relay != "copy" and sys.platform.startswith("linux") and splice_available(),
        reuse_port=sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT"),
    )
