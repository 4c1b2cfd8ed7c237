"""SPEC §4: the rules-file watcher keeps following the file, whatever happens to it.

When its folder is deleted and made again, when a parent symlink is swapped as
deploy tools do (``current -> releases/N``), when a folder further up is replaced,
and when the watcher's own callback or loop fails. gportmap runs as a subprocess
for what a user sees (a rule added after the replacement starts forwarding); the
watchers run in-process, under gevent, where a failure must be injected or only
one path of the watcher may do the work (the periodic backstop turned off).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest
from conftest import connect, free_port, recv_exactly, tcp_rule

import gportmap.runtime.watcher as watcher_module
from gportmap.runtime.watcher import create_watcher

WATCHERS = ["inotify", "poll"]


def echo_once(port: int, payload: bytes = b"ping") -> bytes:
    with connect(port, timeout=5) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


# -- gportmap as a subprocess ----------------------------------------------------------


@pytest.mark.parametrize("watcher", WATCHERS)
@pytest.mark.parametrize("pause", [False, True], ids=["at_once", "after_the_file_went"])
@pytest.mark.slow
def test_a_folder_deleted_and_made_again_is_still_followed(
    start_gportmap, tmp_path, echo_target, watcher, pause
):
    """rm -rf config; mkdir config; write config/rules.json. The inotify watch was on
    the old folder's inode: it ended with it, and no later edit was ever applied."""
    folder = tmp_path / "config"
    folder.mkdir()
    rules_path = folder / "rules.json"
    rules = [tcp_rule(free_port(), echo_target.port, name="first")]
    gp = start_gportmap(rules, rules_path=rules_path, env={"GPORTMAP_WATCHER": watcher})
    gp.wait_event("watching", mode=watcher)

    shutil.rmtree(folder)
    if pause:
        gp.wait_event("config_invalid")  # the watcher saw the file go; the folder stays away a while
    folder.mkdir()
    rules.append(tcp_rule(free_port(), echo_target.port, name="second"))
    rules_path.write_text(json.dumps(rules))
    gp.wait_event("config_reloaded", added=["second"])

    third = free_port()
    rules.append(tcp_rule(third, echo_target.port, name="third"))
    rules_path.write_text(json.dumps(rules))  # an edit in place, in the new folder
    gp.wait_event("config_reloaded", added=["third"])
    assert echo_once(third) == b"ping"
    if watcher == "inotify":
        rearmed = gp.events("watcher_rearmed")
        assert any(r["folder"] == str(folder) and r["path"] == str(rules_path) for r in rearmed), rearmed


class Releases:
    """The layout deploy tools (Capistrano, Ansible's deploy_helper...) make:
    ``releases/N/rules.json`` and ``current -> releases/N``; gportmap is given
    ``current/rules.json``, and a deploy replaces ``current``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        (root / "releases").mkdir(parents=True)
        os.symlink(self.make_release(), root / "current")

    @property
    def path(self) -> Path:
        return self.root / "current" / "rules.json"

    def make_release(self, content: str | None = None) -> str:
        self.count += 1
        release = self.root / "releases" / str(self.count)
        release.mkdir()
        if content is not None:
            (release / "rules.json").write_text(content)
        return f"releases/{self.count}"

    def switch(self, target: str, how: str) -> None:
        current, tmp = self.root / "current", self.root / "current.tmp"
        if how == "ln_mv":  # ln -s releases/2 current.tmp && mv -T current.tmp current
            subprocess.run(["ln", "-s", target, str(tmp)], check=True)
            subprocess.run(["mv", "-T", str(tmp), str(current)], check=True)
        elif how == "os_replace":
            os.symlink(target, tmp)
            os.replace(tmp, current)
        else:  # ln -sfn: not atomic (unlink, then symlink), still common
            subprocess.run(["ln", "-sfn", target, str(current)], check=True)


@pytest.mark.parametrize("watcher", WATCHERS)
@pytest.mark.parametrize("how", ["ln_mv", "os_replace", "ln_sfn"])
@pytest.mark.slow
def test_a_swapped_parent_symlink_is_followed(start_gportmap, tmp_path, echo_target, watcher, how):
    """current -> releases/1 swapped to releases/2: the inotify watch stayed on
    releases/1, so neither the new release nor any later edit was applied."""
    releases = Releases(tmp_path / "app")
    rules = [tcp_rule(free_port(), echo_target.port, name="first")]
    gp = start_gportmap(rules, rules_path=releases.path, env={"GPORTMAP_WATCHER": watcher})
    gp.wait_event("watching", mode=watcher)

    rules.append(tcp_rule(free_port(), echo_target.port, name="second"))
    releases.switch(releases.make_release(json.dumps(rules)), how)
    gp.wait_event("config_reloaded", added=["second"])

    third = free_port()
    rules.append(tcp_rule(third, echo_target.port, name="third"))
    releases.path.write_text(json.dumps(rules))  # an edit in place, in releases/2
    gp.wait_event("config_reloaded", added=["third"])
    assert echo_once(third) == b"ping"
    if watcher == "inotify":
        rearmed = gp.events("watcher_rearmed")
        new_folder = str(tmp_path / "app" / "releases" / "2")
        assert any(r["folder"] == new_folder and r["why"] == "path_changed" for r in rearmed), rearmed


# -- the watchers in-process ------------------------------------------------------------

#: In-process tunables: fast polling and restarts; no backstop unless a test asks,
#: so that the events alone must do the work.
TUNABLES = {
    "inotify": {"restart_backoff": 0.05, "backstop_interval": 3600.0},
    "poll": {"restart_backoff": 0.05, "interval": 0.05},
}


def gwait(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    """wait_for for in-process tests: polls with gevent.sleep, so the watcher runs."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        gevent.sleep(0.02)
    return result


class Recorder:
    """The watcher's callback: notes what the file holds at each call, and raises
    (a bug in the callback) on the calls numbered in ``fail_on``."""

    def __init__(self, path: Path, fail_on: tuple[int, ...] = ()) -> None:
        self.path = path
        self.fail_on = fail_on
        self.calls = 0
        self.seen: list[bytes | None] = []

    def __call__(self) -> None:
        self.calls += 1
        try:
            self.seen.append(self.path.read_bytes())
        except OSError:
            self.seen.append(None)
        if self.calls in self.fail_on:
            raise RuntimeError(f"callback bug on call {self.calls}")

    def saw(self, content: bytes | None) -> bool:
        return content in self.seen


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def inotify_fds() -> int:
    """inotify instances open in this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return count


@pytest.fixture
def watch(caplog):
    """Factory: ``watch(kind, path, callback, **tunables)`` starts a watcher; each is
    stopped at the end, and must then be dead, not alive, with its descriptor closed."""
    caplog.set_level(logging.INFO, logger="gportmap")
    started = []
    fds_before = inotify_fds()

    def start(kind: str, path: Path, callback: Callable[[], None], **tunables: float):
        watcher = create_watcher(kind, str(path), callback)
        for name, value in {**TUNABLES[kind], **tunables}.items():
            setattr(watcher, name, value)
        watcher.start()
        started.append((watcher, watcher._greenlet))
        return watcher

    yield start
    for watcher, greenlet in started:
        watcher.stop()
        assert greenlet.dead and not watcher.alive
    assert inotify_fds() == fds_before


def write(path: Path, content: bytes) -> None:
    """Rewrite in place; every content a test writes has a new length, so that the
    poll watcher's (mtime, size) tells them apart on a coarse clock too."""
    path.write_bytes(content)


@pytest.mark.parametrize("kind", WATCHERS)
def test_an_exception_from_the_callback_is_logged_and_the_watch_goes_on(watch, caplog, tmp_path, kind):
    """The callback raising once (a reload that hit a bug) ended the watcher's
    greenlet: no later change was ever passed on."""
    path = tmp_path / "rules.json"
    write(path, b"[]")
    recorder = Recorder(path, fail_on=(1,))
    watcher = watch(kind, path, recorder)

    write(path, b"[1]")
    gwait(lambda: recorder.calls >= 1, what="the first (failing) call")
    write(path, b"[1, 2]")
    gwait(lambda: recorder.saw(b"[1, 2]"), what="the change after the failure")
    assert watcher.alive
    (error,) = records(caplog, "internal_error")  # once per occurrence
    assert error.exc_info is not None and "callback bug on call 1" in str(error.exc_info[1])
    assert error.path == str(path)


def fail_once(real: Callable, exc: BaseException) -> Callable:
    """``real``, except that its first call raises ``exc``; ``.fired`` tells."""

    def wrapper(*args, **kwargs):
        if not wrapper.fired:
            wrapper.fired = True
            raise exc
        return real(*args, **kwargs)

    wrapper.fired = False
    return wrapper


@pytest.mark.parametrize("kind", WATCHERS)
def test_a_watch_loop_that_dies_is_restarted_and_says_so(watch, caplog, monkeypatch, tmp_path, kind):
    """An exception inside the loop (a failing syscall, a closed descriptor, a
    bug) ended the watch for good, silently; now it starts again, re-checks the
    file, follows later changes, and still stops cleanly (the fixture checks)."""
    path = tmp_path / "rules.json"
    write(path, b"[]")
    recorder = Recorder(path)
    if kind == "inotify":  # waiting on the descriptor fails once, as on a closed one
        fault = fail_once(watcher_module.wait_read, OSError(errno.EBADF, "Bad file descriptor"))
        monkeypatch.setattr(watcher_module, "wait_read", fault)
        watcher = watch(kind, path, recorder)
    else:  # the look at the file fails once
        watcher = watch(kind, path, recorder)
        fault = fail_once(watcher._signature, RuntimeError("stat went wrong"))
        monkeypatch.setattr(watcher, "_signature", fault)

    gwait(lambda: fault.fired, what="the fault")
    (restarted,) = gwait(lambda: records(caplog, "watcher_restarted"), what="watcher_restarted")
    assert restarted.path == str(path) and restarted.exc_info is not None
    assert ("Bad file descriptor" if kind == "inotify" else "stat went wrong") in restarted.error
    gwait(lambda: watcher.alive, what="the watch back")
    gwait(lambda: recorder.calls >= 1, what="the re-check after the restart")

    write(path, b"[1]")
    gwait(lambda: recorder.saw(b"[1]"), what="a change after the restart")
    assert len(records(caplog, "watcher_restarted")) == 1


def test_alive_is_false_once_stopped(watch, tmp_path):
    path = tmp_path / "rules.json"
    write(path, b"[]")
    watcher = watch("inotify", path, Recorder(path))
    assert watcher.alive
    watcher.stop()
    assert not watcher.alive


@pytest.mark.parametrize("pause", [False, True], ids=["at_once", "after_the_file_went"])
def test_inotify_follows_a_folder_made_again_by_events_alone(watch, caplog, tmp_path, pause):
    """With the backstop off: the folder's IN_DELETE_SELF re-arms the watch, and
    while the folder is missing its parent is watched for it to appear."""
    folder = tmp_path / "config"
    folder.mkdir()
    path = folder / "rules.json"
    write(path, b"[]")
    recorder = Recorder(path)
    watch("inotify", path, recorder)

    shutil.rmtree(folder)
    if pause:
        gwait(lambda: recorder.saw(None), what="the file gone")
    folder.mkdir()
    write(path, b"[1]")
    gwait(lambda: recorder.saw(b"[1]"), what="the new folder's file")
    write(path, b"[1, 2]")
    gwait(lambda: recorder.saw(b"[1, 2]"), what="an edit in the new folder")
    rearmed = records(caplog, "watcher_rearmed")
    assert rearmed[-1].folder == str(folder) and rearmed[-1].why in ("folder_gone", "path_changed")
    if pause:  # the folder stayed away a while: its parent was watched for it
        assert rearmed[0].why == "folder_gone" and rearmed[0].waiting_for == str(folder)


def test_inotify_follows_a_swapped_parent_symlink_by_events_alone(watch, caplog, tmp_path):
    releases = Releases(tmp_path / "app")
    releases.path.write_bytes(b"[]")
    recorder = Recorder(releases.path)
    watch("inotify", releases.path, recorder)

    releases.switch(releases.make_release("[1]"), "os_replace")
    gwait(lambda: recorder.saw(b"[1]"), what="the new release")
    write(releases.path, b"[1, 2]")
    gwait(lambda: recorder.saw(b"[1, 2]"), what="an edit in the new release")
    (rearmed,) = records(caplog, "watcher_rearmed")
    assert rearmed.why == "path_changed" and rearmed.folder == str(tmp_path / "app" / "releases" / "2")
    assert rearmed.path == str(releases.path)


def test_inotify_backstop_follows_a_replaced_grandparent(watch, caplog, tmp_path):
    """a/b/rules.json with ``a`` moved away and made again: no event reaches a watch
    on ``b``; the periodic check finds that the path leads elsewhere."""
    path = tmp_path / "a" / "b" / "rules.json"
    path.parent.mkdir(parents=True)
    write(path, b"[]")
    recorder = Recorder(path)
    watch("inotify", path, recorder, backstop_interval=0.1)

    os.rename(tmp_path / "a", tmp_path / "a.old")
    path.parent.mkdir(parents=True)
    write(path, b"[1]")
    gwait(lambda: recorder.saw(b"[1]"), what="the file in the new folders")
    write(path, b"[1, 2]")
    gwait(lambda: recorder.saw(b"[1, 2]"), what="an edit in the new folders")
    (rearmed,) = records(caplog, "watcher_rearmed")
    assert rearmed.why == "backstop" and rearmed.folder == str(path.parent)


def test_inotify_survives_a_file_name_that_is_not_utf8(watch, caplog, tmp_path):
    """A file whose name is not UTF-8 beside the rules (a Latin-1 name from an old
    tool, say) made pyinotify raise UnicodeDecodeError and ended the watch."""
    path = tmp_path / "rules.json"
    write(path, b"[]")
    recorder = Recorder(path)
    watcher = watch("inotify", path, recorder)

    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"), "wb") as odd:
        odd.write(b"x")
    write(path, b"[1]")
    gwait(lambda: recorder.saw(b"[1]"), what="the change after the odd name")
    assert watcher.alive and not records(caplog, "watcher_restarted")
