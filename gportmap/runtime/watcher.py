"""Notice when the rules file changes, however it is changed, and keep noticing.

The inotify watcher watches *folders*, never the file: an editor's atomic rename
(write a temporary file, rename it over the old one) and a Kubernetes ConfigMap
update (a ``..data`` symlink swapped to a new timestamped folder) replace the file's
inode, which silently ends a watch on the file itself. Which folders is worked out by
resolving the path one component at a time, as the kernel does (``plan_watches``):

- the folder the file really lives in, for events naming the file;
- every folder holding a symlink on the path (``current -> releases/7`` as deploy
  tools make it, a ConfigMap's ``..data`` and ``rules.json`` links), for events naming
  that symlink: replacing it re-routes the path;
- while a folder on the path does not exist, its parent, for it to appear.

A structural event (a watched folder deleted or moved away, a route symlink
replaced, the kernel's queue overflowing) makes the watcher resolve the path again
and move its watches (``watcher_rearmed``). As a backstop for what no event reports
(a grandparent folder replaced), the path is resolved again every
``backstop_interval`` seconds: a handful of ``lstat`` calls. Events are debounced
and passed on; the callback compares content digests, so a spurious call costs a
read and changes nothing.

inotify itself is a small ctypes binding over libc (gportmap.inotify). Where it is
not available (not Linux, a kernel or sandbox without it: ``Features.inotify``),
where it cannot be set up when the watch starts (the instance or watch limit
reached: ``InotifyWatcher`` raises WatcherError, the caller logs
``watcher_fallback``), or when ``GPORTMAP_WATCHER=poll`` forces it, a polling
watcher compares (mtime, size, inode, device) twice a second.
``GPORTMAP_WATCHER=off`` disables watching.

Both watchers contain their failures: an exception out of the callback is logged as
``internal_error`` (with its traceback) and the watch goes on; an exception in the
watch loop itself (a bug, a failing syscall, a closed descriptor) is logged as
``watcher_restarted`` and the loop starts afresh after a back-off, re-checking the
file. ``alive`` says whether a watch is in place right now.
"""

from __future__ import annotations

import enum
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from gevent import getcurrent
from gevent.socket import wait_read

from gportmap.errors import WatcherError
from gportmap.events import InternalError, WatcherFallback, WatcherRearmed, WatcherRestarted
from gportmap.inotify import Inotify, InotifyEvent, Mask
from gportmap.log import emit, get_logger
from gportmap.platform import Features

logger = get_logger("watcher")

WATCHER_ENV = "GPORTMAP_WATCHER"
MODES = ("inotify", "poll", "off")


def choose_mode(features: Features, environ: dict | os._Environ = os.environ) -> str:
    """``$GPORTMAP_WATCHER`` if set, else inotify where it works, else poll."""
    wanted = environ.get(WATCHER_ENV, "").strip().lower()
    if wanted and wanted not in MODES:
        emit(
            logger,
            WatcherFallback(why=f"{WATCHER_ENV}={wanted!r} is not one of {', '.join(MODES)}; choosing automatically"),
        )
        wanted = ""
    if wanted == "inotify" and not features.inotify:
        emit(logger, WatcherFallback(why="inotify is not available here; polling the rules file instead"))
        return "poll"
    return wanted or ("inotify" if features.inotify else "poll")


# -- what both watchers share: a contained callback and a loop that restarts ---------


class _SelfRestarting:
    """A watch loop in one greenlet that outlives its own failures.

    ``_open`` sets a watch up, ``_loop`` runs it (never returning), ``_close``
    releases it. An exception out of ``_open`` or ``_loop`` closes the watch, is
    logged as ``watcher_restarted``, and after a back-off the watch is opened again
    and the file re-checked (a change made while it was down would go unnoticed
    otherwise). One exception ending the greenlet used to end hot reload for good,
    while ``/stats`` still said the file was watched.
    """

    #: Seconds before the first restart of a loop that died; doubled for each
    #: consecutive death, up to ``max_restart_backoff``.
    restart_backoff = 0.5
    #: Upper bound of the restart back-off; a loop that ran this long before dying
    #: starts again from ``restart_backoff``.
    max_restart_backoff = 10.0

    def __init__(self, path: str, on_change: Callable[[], None]) -> None:
        self.path = os.path.abspath(path)
        self.on_change = on_change
        #: How many times the loop died and was started again.
        self.restarts = 0
        self._greenlet: gevent.Greenlet | None = None
        self._watching = False
        self._stopped = False

    @property
    def alive(self) -> bool:
        """True while a watch is in place: started, not stopped, not in a restart back-off."""
        return self._watching and not self._stopped and self._greenlet is not None and not self._greenlet.dead

    def start(self) -> None:
        """Set the watch up now (so that the caller can fall back when it cannot be,
        see ``InotifyWatcher``), then run it in its own greenlet."""
        self._open()
        self._watching = True
        self._greenlet = gevent.spawn(self._supervise)

    def stop(self) -> None:
        """End the watch. Called from the callback itself (a reload that turns
        ``watch`` off), the loop ends once the callback returns."""
        self._stopped = True
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None and greenlet is not getcurrent():
            greenlet.kill()
        if greenlet is None:
            self._close()

    def _supervise(self) -> None:
        backoff = self.restart_backoff
        try:
            while not self._stopped:
                began = time.monotonic()
                try:
                    if not self._watching:
                        self._open()
                        self._watching = True
                        self._notify()
                    self._loop()
                except Exception as exc:  # noqa: BLE001 - any failure of the loop: log it, start again
                    self._watching = False
                    self._close()
                    if time.monotonic() - began >= self.max_restart_backoff:
                        backoff = self.restart_backoff
                    self._log_restart(exc, backoff)
                    gevent.sleep(backoff)
                    backoff = min(backoff * 2, self.max_restart_backoff)
        finally:
            self._watching = False
            self._close()

    def _log_restart(self, exc: Exception, backoff: float) -> None:
        self.restarts += 1
        event = WatcherRestarted(path=self.path, error=repr(exc)[:200], retry_in=backoff, restarts=self.restarts)
        emit(logger, event, exc_info=exc)

    def _notify(self) -> None:
        """Call the callback; an exception out of it (a bug) is logged once, with its
        traceback, and the watch goes on."""
        try:
            self.on_change()
        except Exception as exc:  # noqa: BLE001 - contained: the next change must still be seen
            event = InternalError(
                path=self.path,
                error=repr(exc)[:200],
                what=f"the rules file's change callback raised {exc!r}; the watch goes on",
            )
            emit(logger, event, exc_info=exc)
        if self._stopped:
            raise gevent.GreenletExit  # stop() was called from the callback

    def _open(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class PollWatcher(_SelfRestarting):
    """Compares the file's (mtime, size, inode, device) every ``interval`` seconds."""

    #: Seconds between two looks at the file (one ``stat``, following symlinks).
    interval = 0.5

    def __init__(self, path: str, on_change: Callable[[], None]) -> None:
        super().__init__(path, on_change)
        self._last: tuple[int, int, int, int] | None = None

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows symlinks: a ConfigMap swap changes the inode
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def _open(self) -> None:
        self._last = self._signature()

    def _loop(self) -> None:
        while True:
            gevent.sleep(self.interval)
            current = self._signature()
            if current != self._last:
                self._last = current
                self._notify()

    def _close(self) -> None:
        pass


# -- what to watch ----------------------------------------------------------------------


#: A folder entry appeared, went, or was renamed over: what replacing a symlink or a
#: folder looks like from the folder holding it.
ENTRY_EVENTS = Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO
#: And what writing a file looks like (the rules file's own folder only: a log file
#: beside a route symlink must not wake the watcher at each line).
CONTENT_EVENTS = ENTRY_EVENTS | Mask.MODIFY | Mask.CLOSE_WRITE | Mask.ATTRIB
#: The watched folder itself was deleted or moved away.
SELF_EVENTS = Mask.DELETE_SELF | Mask.MOVE_SELF
#: After any of these the watch no longer follows the path (IGNORED and UNMOUNT
#: come without asking).
GONE_EVENTS = SELF_EVENTS | Mask.UNMOUNT | Mask.IGNORED


#: Symlinks followed while resolving the path before it counts as unresolvable
#: (the kernel's own limit, ELOOP).
MAX_SYMLINKS = 40


@dataclass(frozen=True)
class FolderWatch:
    """One folder to watch and which of its entries matter.

    ``file_name``: the rules file, when this is the folder it really lives in (its
    writes matter). ``route_names``: entries that decide where the path leads: a
    symlink on it, or the missing folder waited for (replacing one re-routes the
    path). ``identity`` is the folder's (st_dev, st_ino) when it was resolved.
    """

    path: str
    identity: tuple[int, int]
    file_name: str | None
    route_names: frozenset[str]

    @property
    def mask(self) -> int:
        events = CONTENT_EVENTS if self.file_name is not None else ENTRY_EVENTS
        # ONLYDIR | DONT_FOLLOW: the watch lands on this very folder or fails.
        return int(events | SELF_EVENTS | Mask.ONLYDIR | Mask.DONT_FOLLOW)


@dataclass(frozen=True)
class WatchPlan:
    """Where the path leads now: the folders to watch. ``missing`` is the first
    folder on the path that does not exist (its parent is watched for it)."""

    folders: frozenset[FolderWatch]
    missing: str | None = None

    @property
    def file_folder(self) -> str | None:
        return next((watch.path for watch in self.folders if watch.file_name is not None), None)


def _components(path: str) -> list[str]:
    """Path components, last first (popped from the end)."""
    return [part for part in reversed(path.split("/")) if part not in ("", ".")]


def plan_watches(path: str) -> WatchPlan:
    """Resolve ``path`` one component at a time, noting each folder whose entries
    decide where it leads (its ``route_names``) and the folder the file is in.

    ``..`` is taken as the kernel takes it, from the folder reached so far (after a
    symlink, not lexically as ``os.path.abspath`` would). Costs one ``lstat`` per
    component and one ``readlink`` per symlink: cheap enough for a periodic backstop."""
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    routes: dict[str, set[str]] = {}
    identities: dict[str, tuple[int, int]] = {}
    file_at: tuple[str, str] | None = None
    missing: str | None = None
    pending = _components(path)
    folder, followed = "/", 0
    while pending:
        name = pending.pop()
        if name == "..":
            folder = os.path.dirname(folder)
            continue
        entry = os.path.join(folder, name)
        try:
            st: os.stat_result | None = os.lstat(entry)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode) and followed < MAX_SYMLINKS:
            followed += 1
            routes.setdefault(folder, set()).add(name)
            try:
                target = os.readlink(entry)
            except OSError:  # replaced by something else just now: resolve again later
                missing = entry
                break
            if target.startswith("/"):
                folder = "/"
            pending.extend(_components(target))
            continue
        if not pending:
            file_at = (folder, name)
            break
        if st is None or not stat.S_ISDIR(st.st_mode):
            missing = entry
            routes.setdefault(folder, set()).add(name)  # watched for the folder to appear
            break
        identities[entry] = (st.st_dev, st.st_ino)
        folder = entry
    return _freeze(routes, identities, file_at, missing)


def _freeze(
    routes: dict[str, set[str]],
    identities: dict[str, tuple[int, int]],
    file_at: tuple[str, str] | None,
    missing: str | None,
) -> WatchPlan:
    paths = set(routes) | ({file_at[0]} if file_at else set())
    folders = set()
    for path in paths:
        identity = identities.get(path)
        if identity is None:  # "/" or a folder reached through "..": not lstat'ed on the way
            try:
                st = os.stat(path)
            except OSError:
                continue
            identity = (st.st_dev, st.st_ino)
        file_name = file_at[1] if file_at and file_at[0] == path else None
        folders.add(FolderWatch(path, identity, file_name, frozenset(routes.get(path, ()))))
    return WatchPlan(frozenset(folders), missing)


class RearmReason(enum.Enum):
    """Why the watches moved (the ``why`` of ``watcher_rearmed``)."""

    FOLDER_GONE = "folder_gone"  #: a watched folder was deleted, moved away or unmounted
    PATH_CHANGED = "path_changed"  #: a symlink on the path was replaced, or a missing folder appeared
    BACKSTOP = "backstop"  #: the periodic check found the path leading elsewhere
    OVERFLOW = "overflow"  #: the kernel's event queue overflowed: events were lost


class InotifyWatcher(_SelfRestarting):
    """inotify on the folders that decide what the rules path reads."""

    #: Quiet time after the last event before the change is passed on (an editor's
    #: save is several events: truncate, write, close, rename).
    debounce = 0.1
    #: Upper bound of the debounce under a steady stream of events.
    max_delay = 1.0
    #: Seconds between two checks that the watched folders are still the ones the
    #: path leads to (an ``lstat`` per path component): catches what no event tells,
    #: such as a grandparent folder replaced, and retries while a folder is missing.
    backstop_interval = 2.0

    def __init__(self, path: str, on_change: Callable[[], None]) -> None:
        super().__init__(path, on_change)
        self.folder = os.path.dirname(self.path)
        self._given_path = path  # resolved as open() resolves it: ".." after a symlink is physical
        self._inotify: Inotify | None = None
        self._armed: dict[int, FolderWatch] = {}
        self._pending_since: float | None = None
        self._last_event = 0.0
        self._rearm_reason: RearmReason | None = None

    # -- set-up --------------------------------------------------------------------

    def _open(self) -> None:
        """Raise WatcherError when inotify cannot be set up (no inotify, instance or
        watch limits, permissions): the caller then polls instead."""
        try:
            self._inotify = Inotify()
        except OSError as exc:
            raise WatcherError(f"cannot watch {self.folder} with inotify: {exc}") from None
        self._armed = {}
        self._pending_since = None
        self._rearm_reason = None
        _, errors = self._reconcile(plan_watches(self._given_path))
        if errors:
            self._close()
            raise WatcherError(f"cannot watch {self.folder} with inotify: {'; '.join(errors)}")

    def _close(self) -> None:
        inotify, self._inotify = self._inotify, None
        self._armed = {}
        if inotify is not None:
            inotify.close()

    def _reconcile(self, plan: WatchPlan) -> tuple[bool, list[str]]:
        """Make the watches the plan's: drop those it no longer names, add the ones
        missing. Returns (whether any watch moved, the folders that could not be
        watched)."""
        assert self._inotify is not None
        changed = False
        for wd, watch in list(self._armed.items()):
            if watch not in plan.folders:
                self._drop(wd)
                changed = True
        armed = set(self._armed.values())
        errors = []
        for watch in plan.folders - armed:
            try:
                wd = self._inotify.add(watch.path, watch.mask)
            except OSError as exc:
                errors.append(f"{watch.path}: {exc.strerror or exc}")
                continue
            self._armed[wd] = watch
            changed = True
        return changed, errors

    def _drop(self, wd: int) -> None:
        if self._armed.pop(wd, None) is not None and self._inotify is not None:
            self._inotify.remove(wd)

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        next_check = time.monotonic() + self.backstop_interval
        while True:
            now = time.monotonic()
            if self._pending_since is not None and now >= self._fire_at():
                self._fire()
                continue
            if now >= next_check:
                next_check = now + self.backstop_interval
                self._backstop()
                continue
            deadline = next_check if self._pending_since is None else min(next_check, self._fire_at())
            assert self._inotify is not None
            try:
                wait_read(self._inotify.fd, deadline - now)
            except TimeoutError:
                continue
            for event in self._inotify.read():
                self._on_event(event)

    def _fire_at(self) -> float:
        # Other files in a watched folder wake this loop too: only events about
        # the path push the deadline back.
        assert self._pending_since is not None
        return min(self._last_event + self.debounce, self._pending_since + self.max_delay)

    def _on_event(self, event: InotifyEvent) -> None:
        if event.mask & Mask.Q_OVERFLOW:
            for wd in list(self._armed):
                self._drop(wd)  # events were lost: trust no watch, set them all again
            self._schedule(RearmReason.OVERFLOW)
            return
        watch = self._armed.get(event.wd)
        if watch is None:
            return  # a watch already dropped (its IN_IGNORED, say)
        if event.mask & GONE_EVENTS:
            self._drop(event.wd)  # a moved-away folder would still report: not the path's
            self._schedule(RearmReason.FOLDER_GONE)
        elif event.name in watch.route_names:
            self._schedule(RearmReason.PATH_CHANGED)
        elif event.name == watch.file_name:
            self._touch()

    def _touch(self) -> None:
        now = time.monotonic()
        self._last_event = now
        if self._pending_since is None:
            self._pending_since = now

    def _schedule(self, reason: RearmReason) -> None:
        if self._rearm_reason is None:
            self._rearm_reason = reason
        self._touch()

    def _fire(self) -> None:
        """Pass a (debounced) change on, moving the watches first if the path may
        lead elsewhere now: watches first, then the check, so no write falls between."""
        self._pending_since = None
        reason, self._rearm_reason = self._rearm_reason, None
        if reason is not None:
            self._rearm(reason, plan_watches(self._given_path))
        self._notify()

    def _backstop(self) -> None:
        plan = plan_watches(self._given_path)
        if plan.folders != frozenset(self._armed.values()) and self._rearm(RearmReason.BACKSTOP, plan):
            self._notify()

    def _rearm(self, reason: RearmReason, plan: WatchPlan) -> bool:
        changed, errors = self._reconcile(plan)
        if changed:
            self._log_rearmed(reason, plan, errors)
        return changed

    def _log_rearmed(self, reason: RearmReason, plan: WatchPlan, errors: list[str]) -> None:
        event = WatcherRearmed(
            path=self.path, why=reason.value, folder=plan.file_folder, waiting_for=plan.missing, errors=errors[:10]
        )
        emit(logger, event)


def create_watcher(mode: str, path: str, on_change: Callable[[], None]) -> PollWatcher | InotifyWatcher:
    """The watcher for ``mode`` ("inotify" or "poll"; "off" means no watcher at all)."""
    return InotifyWatcher(path, on_change) if mode == "inotify" else PollWatcher(path, on_change)
