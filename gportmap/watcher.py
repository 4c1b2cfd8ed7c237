"""Notice when the rules file changes, however it is changed.

The inotify watcher watches the rules file's *folder*, not the file: an editor's
atomic rename (write a temporary file, rename it over the old one) and a
Kubernetes ConfigMap update (a ``..data`` symlink swapped to a new timestamped
folder) replace the file's inode, which silently ends a watch on the file itself.
Events are filtered to the names that can change what the path reads, debounced,
and passed on; the callback compares content hashes, so a touch reloads nothing.

Where inotify is not available (not Linux, pyinotify missing), or when
``GPORTMAP_WATCHER=poll`` forces it, a polling watcher compares (mtime, size,
inode, device) twice a second. ``GPORTMAP_WATCHER=off`` disables watching.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import gevent
from gevent.socket import wait_read

from gportmap.errors import WatcherError
from gportmap.log import get_logger, log_event
from gportmap.platform import Features

logger = get_logger("watcher")

WATCHER_ENV = "GPORTMAP_WATCHER"
MODES = ("inotify", "poll", "off")


def choose_mode(features: Features, environ: dict | os._Environ = os.environ) -> str:
    """``$GPORTMAP_WATCHER`` if set, else inotify where it works, else poll."""
    wanted = environ.get(WATCHER_ENV, "").strip().lower()
    if wanted and wanted not in MODES:
        log_event(
            logger,
            logging.WARNING,
            "watcher_fallback",
            f"{WATCHER_ENV}={wanted!r} is not one of {', '.join(MODES)}; choosing automatically",
        )
        wanted = ""
    if wanted == "inotify" and not features.inotify:
        log_event(
            logger,
            logging.WARNING,
            "watcher_fallback",
            "inotify is not available here; polling the rules file instead",
        )
        return "poll"
    return wanted or ("inotify" if features.inotify else "poll")


class PollWatcher:
    """Compares the file's (mtime, size, inode, device) every ``interval`` seconds."""

    interval = 0.5

    def __init__(self, path: str, on_change: Callable[[], None]) -> None:
        self.path = os.path.abspath(path)
        self.on_change = on_change
        self._greenlet: gevent.Greenlet | None = None

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows symlinks: a ConfigMap swap changes the inode
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        last = self._signature()
        while True:
            gevent.sleep(self.interval)
            current = self._signature()
            if current != last:
                last = current
                self.on_change()

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None


class InotifyWatcher:
    """pyinotify on the rules file's folder, read from a greenlet."""

    #: Quiet time after the last event before the change is passed on (an editor's
    #: save is several events: truncate, write, close, rename).
    debounce = 0.1
    #: Upper bound of the debounce under a steady stream of events.
    max_delay = 1.0

    def __init__(self, path: str, on_change: Callable[[], None]) -> None:
        self.path = os.path.abspath(path)
        self.folder = os.path.dirname(self.path)
        self.on_change = on_change
        self._greenlet: gevent.Greenlet | None = None
        self._manager = None
        self._pending_since: float | None = None
        self._last_relevant = 0.0

    def start(self) -> None:
        """Raise WatcherError when inotify cannot be set up (limits, permissions)."""
        try:
            import pyinotify

            self._start(pyinotify)
        except ImportError as exc:
            raise WatcherError(f"cannot import pyinotify: {exc}") from None
        except (OSError, pyinotify.PyinotifyError) as exc:
            raise WatcherError(f"cannot watch {self.folder} with inotify: {exc}") from None

    def _start(self, pyinotify) -> None:
        self._manager = manager = pyinotify.WatchManager()
        mask = (
            pyinotify.IN_CLOSE_WRITE
            | pyinotify.IN_MODIFY
            | pyinotify.IN_MOVED_TO
            | pyinotify.IN_MOVED_FROM
            | pyinotify.IN_CREATE
            | pyinotify.IN_DELETE
            | pyinotify.IN_ATTRIB
        )
        self._watched_extra: str | None = None
        self._mask = mask
        manager.add_watch(self.folder, mask, quiet=False)
        self._watch_link_target()
        notifier = pyinotify.Notifier(manager, default_proc_fun=self._on_event, timeout=0)
        self._greenlet = gevent.spawn(self._run, notifier, manager.get_fd())

    def _watch_link_target(self) -> None:
        """If the path is a symlink into another folder, watch that folder too
        (its file may be edited in place); only one such extra watch is kept."""
        target_folder = os.path.dirname(os.path.realpath(self.path))
        if target_folder == self.folder or target_folder == self._watched_extra:
            return
        if self._watched_extra is not None:
            wd = self._manager.get_wd(self._watched_extra)
            if wd is not None:
                self._manager.rm_watch(wd, quiet=True)
        self._watched_extra = None
        if os.path.isdir(target_folder):
            self._manager.add_watch(target_folder, self._mask, quiet=True)
            self._watched_extra = target_folder

    def _relevant_names(self) -> set[str]:
        names = {self.path, os.path.realpath(self.path)}
        if os.path.islink(self.path):
            link = os.readlink(self.path)
            if not os.path.isabs(link):  # "..data/rules.json": the ..data swap matters
                first = link.replace("\\", "/").split("/", 1)[0]
                names.add(os.path.join(self.folder, first))
        return names

    def _on_event(self, event) -> None:  # pyinotify.Event
        if event.pathname in self._relevant_names():
            now = gevent.get_hub().loop.now()
            self._last_relevant = now
            if self._pending_since is None:
                self._pending_since = now

    def _run(self, notifier, fd: int) -> None:
        loop = gevent.get_hub().loop
        try:
            while True:
                timeout = None
                if self._pending_since is not None:
                    # Other files in the folder (a log file, say) wake this loop too:
                    # only events about the rules file push the deadline back.
                    fire_at = min(self._last_relevant + self.debounce, self._pending_since + self.max_delay)
                    timeout = fire_at - loop.now()
                    if timeout <= 0:
                        self._fire()
                        continue
                try:
                    wait_read(fd, timeout)
                except TimeoutError:
                    continue
                notifier.read_events()
                notifier.process_events()
        finally:
            notifier.stop()

    def _fire(self) -> None:
        self._pending_since = None
        self._watch_link_target()
        self.on_change()

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None


def create_watcher(mode: str, path: str, on_change: Callable[[], None]) -> PollWatcher | InotifyWatcher:
    """The watcher for ``mode`` ("inotify" or "poll"; "off" means no watcher at all)."""
    return InotifyWatcher(path, on_change) if mode == "inotify" else PollWatcher(path, on_change)
