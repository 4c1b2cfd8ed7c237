"""SPEC §4: hot reload. Every way a file gets changed is noticed (inotify and the
forced polling watcher), invalid files change nothing, and reloads under load
refuse and break no connection."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    LOOPBACK,
    TargetServer,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    tcp_rule,
    wait_for,
)

WATCHERS = ["inotify", "poll"]


def write_in_place(path: Path, content: str) -> None:
    with open(path, "r+") as file:  # same inode, truncated and rewritten
        file.truncate(0)
        file.write(content)


def write_atomically(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def delete_and_recreate(path: Path, content: str, before_recreate=None) -> None:
    path.unlink()
    if before_recreate is not None:
        before_recreate()
    path.write_text(content)


class K8sFolder:
    """The layout a Kubernetes ConfigMap volume has: rules.json -> ..data/rules.json,
    ..data -> ..<timestamp>; an update swaps ..data by renaming a new symlink over it."""

    def __init__(self, folder: Path, content: str) -> None:
        self.folder = folder
        folder.mkdir()
        self.version = 0
        self.current = self._version_dir(content)
        os.symlink(self.current.name, folder / "..data")
        os.symlink("..data/rules.json", folder / "rules.json")

    @property
    def path(self) -> Path:
        return self.folder / "rules.json"

    def _version_dir(self, content: str) -> Path:
        self.version += 1
        version = self.folder / f"..2026_11_25_00_00_{self.version:02d}.{os.getpid()}"
        version.mkdir()
        (version / "rules.json").write_text(content)
        return version

    def update(self, content: str) -> None:
        new = self._version_dir(content)
        tmp = self.folder / "..data_tmp"
        os.symlink(new.name, tmp)
        os.replace(tmp, self.folder / "..data")
        (self.current / "rules.json").unlink()
        self.current.rmdir()
        self.current = new


def rules_text(*rules: dict, **settings) -> str:
    return json.dumps({"settings": settings, "rules": list(rules)} if settings else list(rules))


def echo_once(port: int, payload: bytes = b"ping") -> bytes:
    with connect(port, timeout=5) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


def tagged_once(port: int, payload: bytes) -> bytes:
    """One round trip to a ``tagged_echo`` target: its tag byte, then the payload."""
    with connect(port, timeout=5) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload) + 1)


def tagged_echo(tag: bytes):
    """An echo server whose replies start with ``tag``: tells which target answered."""

    def handler(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(tag + data)
        conn.shutdown(socket.SHUT_WR)

    return TargetServer(handler)


@pytest.mark.parametrize("watcher", WATCHERS)
@pytest.mark.parametrize("how", ["in_place", "atomic_rename", "kubernetes", "delete_recreate"])
@pytest.mark.slow
def test_every_kind_of_change_is_picked_up(start_gportmap, tmp_path, watcher, how):
    """How fast is bench/reload_latency.py's to measure; here, that it happens."""
    a, b = tagged_echo(b"A"), tagged_echo(b"B")
    port = free_port()
    first = rules_text(tcp_rule(port, a.port, name="web"))
    second = rules_text(tcp_rule(port, b.port, name="web"))
    env = {"GPORTMAP_WATCHER": watcher}
    try:
        if how == "kubernetes":
            k8s = K8sFolder(tmp_path / "config", first)
            gp = start_gportmap(None, rules_path=k8s.path, env=env)
        else:
            gp = start_gportmap(json.loads(first), env=env)
        (watching,) = gp.wait_event("watching")
        assert watching["mode"] == watcher
        assert tagged_once(port, b"1") == b"A1"
        if how == "in_place":
            write_in_place(gp.rules_path, second)
        elif how == "atomic_rename":
            write_atomically(gp.rules_path, second)
        elif how == "kubernetes":
            k8s.update(second)
        else:
            delete_and_recreate(
                gp.rules_path, second, before_recreate=lambda: gp.wait_event("config_invalid", timeout=5)
            )
        (reloaded,) = gp.wait_event("config_reloaded", timeout=10)
        assert reloaded["changed"] == ["web"] and reloaded["source"] == "watcher"
        assert tagged_once(port, b"2") == b"B2"
        if how == "delete_recreate":
            (invalid,) = gp.events("config_invalid")
            assert "cannot read" in invalid["errors"][0] and "keeping the current rules" in invalid["errors"][0]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("watcher", WATCHERS)
@pytest.mark.slow
def test_touch_without_change_reloads_nothing(start_gportmap, echo_target, watcher):
    port = free_port()
    rules = [tcp_rule(port, echo_target.port, name="web")]
    gp = start_gportmap(rules, env={"GPORTMAP_WATCHER": watcher})
    gp.wait_event("watching")
    write_atomically(gp.rules_path, json.dumps(rules, indent=2))  # same content, new inode
    # A real change afterwards proves the watcher ran past the no-op save.
    rules.append(tcp_rule(free_port(), echo_target.port, name="second"))
    write_atomically(gp.rules_path, json.dumps(rules))
    (reloaded,) = gp.wait_event("config_reloaded")
    assert reloaded["added"] == ["second"] and reloaded["unchanged"] == ["web"]
    assert len(gp.events("config_reloaded")) == 1


@pytest.mark.slow
def test_fifty_reloads_under_load_refuse_and_break_nothing(start_gportmap):
    """Short connections in a loop and long-lived streams on a rule whose target
    flips between two echo servers, 50 times."""
    a, b = tagged_echo(b"A"), tagged_echo(b"B")
    port = free_port()
    targets = [a.port, b.port]

    def rules_for(i: int) -> str:
        return rules_text(tcp_rule(port, targets[i % 2], name="flip"), drainTimeout=120)

    gp = start_gportmap(json.loads(rules_for(0)))
    gp.wait_event("watching")
    stop = threading.Event()
    errors: list[str] = []
    answered = {"A": 0, "B": 0, "total": 0}

    def short_connections() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and answered["total"] < 200_000:
            try:
                with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
                    sock.sendall(b"0123456789")
                    reply = recv_exactly(sock, 11)
                if reply[1:] != b"0123456789" or reply[:1] not in (b"A", b"B"):
                    errors.append(f"bad reply {reply!r}")
                else:
                    answered[reply[:1].decode()] += 1
                    answered["total"] += 1
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    assert tagged_once(port, b"w")[1:] == b"w"  # warm up (the resolver's thread pool opens its fds)
    gp.wait_event("connection_closed", rule="flip")
    fds_idle = gp.open_fds()  # nothing open: what must be left after all the reloads
    streams = []
    for _ in range(3):
        sock = connect(port)
        sock.sendall(b"s")
        assert recv_exactly(sock, 2) in (b"As", b"Bs")
        streams.append(sock)

    sent_digests: list = []
    received_digests: list = []
    loader = threading.Thread(target=short_connections)
    loader.start()
    reloads = Generation()
    writers = [
        threading.Thread(target=_stream_writer, args=(s, i, stop, reloads, sent_digests)) for i, s in enumerate(streams)
    ]
    readers = [threading.Thread(target=_stream_reader, args=(s, i, received_digests)) for i, s in enumerate(streams)]
    for thread in writers + readers:
        thread.start()
    try:
        for i in range(1, 51):
            total = answered["total"]
            write_atomically(gp.rules_path, rules_for(i))
            gp.wait_event("config_reloaded", count=i, timeout=10)
            reloads.advance()
            wait_for(lambda total=total: answered["total"] >= total + 5 or errors, what="traffic after reload")
        last_target = "A" if 50 % 2 == 0 else "B"
        before = answered[last_target]
        wait_for(lambda: answered[last_target] > before + 10 or errors, what="new connections on the new target")
    finally:
        stop.set()
        reloads.advance()
        loader.join(30)
        for thread in writers + readers:
            thread.join(60)
    for sock in streams:
        sock.close()
    print(
        f"50 reloads: {answered['total']} short connections (A {answered['A']}, B {answered['B']}), "
        f"{len(errors)} errors, {len(streams)} streams"
    )
    assert errors == []
    assert answered["A"] > 50 and answered["B"] > 50
    assert sorted(sent_digests) == sorted(received_digests) and len(sent_digests) == 3
    reloaded = gp.events("config_reloaded")
    assert all(r["changed"] == ["flip"] for r in reloaded) and len(reloaded) == 50
    wait_for(lambda: len(gp.events("rule_server_retired")) == 50, timeout=30, what="all 50 old servers to retire")
    assert not gp.events("rule_stopped")  # the rule never stopped: each reload handed it on
    wait_for(lambda: gp.open_fds() <= fds_idle, timeout=10, what="fds back (streams closed)")
    assert gp.open_fds() == fds_idle, "listeners, sockets or pipes leaked across reloads"
    a.close()
    b.close()


class Generation:
    """A counter threads can wait on: the streams send a burst after every reload."""

    def __init__(self) -> None:
        self.value = 0
        self._cond = threading.Condition()

    def advance(self) -> None:
        with self._cond:
            self.value += 1
            self._cond.notify_all()

    def wait_past(self, seen: int, timeout: float = 30) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self.value > seen, timeout)
            return self.value


def _stream_writer(sock: socket.socket, index: int, stop: threading.Event, reloads: Generation, out: list) -> None:
    """Sends a burst of chunks (no 'A'/'B' bytes: the echo tags its sends) per reload."""
    digest, seen = hashlib.sha256(), 0
    chunk = bytes(range(67, 256)) * 5
    while not stop.is_set():
        for _ in range(50):
            sock.sendall(chunk)
            digest.update(chunk)
        seen = reloads.wait_past(seen)
    sock.shutdown(socket.SHUT_WR)
    out.append((index, digest.hexdigest()))


def _stream_reader(sock: socket.socket, index: int, out: list) -> None:
    sock.settimeout(60)
    data = recv_until_eof(sock)
    payload = data.replace(b"A", b"").replace(b"B", b"")
    out.append((index, hashlib.sha256(payload).hexdigest()))


def test_removed_rule_stops_accepting_and_its_stream_finishes(start_gportmap, echo_target):
    keep, drop = free_port(), free_port()
    gp = start_gportmap(
        {"settings": {"drainTimeout": 60}, "rules": [tcp_rule(keep, echo_target.port, name="keep"), tcp_rule(drop, echo_target.port, name="drop")]}
    )
    gp.wait_event("watching")
    kept, dropped = connect(keep), connect(drop)
    for sock in (kept, dropped):
        sock.sendall(b"one")
        assert recv_exactly(sock, 3) == b"one"
    write_atomically(gp.rules_path, rules_text(tcp_rule(keep, echo_target.port, name="keep"), drainTimeout=60))
    (reloaded,) = gp.wait_event("config_reloaded")
    assert reloaded["removed"] == ["drop"] and reloaded["unchanged"] == ["keep"]
    with pytest.raises(ConnectionRefusedError):
        connect(drop, timeout=2)
    for sock in (kept, dropped):  # both open connections keep working
        sock.sendall(b"two")
        assert recv_exactly(sock, 3) == b"two"
    dropped.shutdown(socket.SHUT_WR)
    assert recv_until_eof(dropped) == b""
    dropped.close()
    (closed,) = gp.wait_event("connection_closed", rule="drop")
    assert closed["reason"] == "closed" and closed["bytes_received"] == 6
    gp.wait_event("rule_stopped", rule="drop")
    assert echo_once(keep) == b"ping"
    kept.close()


def test_removed_rule_stream_is_cut_at_drain_timeout(start_gportmap, echo_target):
    port, other = free_port(), free_port()
    gp = start_gportmap({"settings": {"drainTimeout": 0.5}, "rules": [tcp_rule(port, echo_target.port, name="gone")]})
    gp.wait_event("watching")
    sock = connect(port)
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    write_atomically(gp.rules_path, rules_text(tcp_rule(other, echo_target.port, name="new"), drainTimeout=0.5))
    gp.wait_event("config_reloaded")
    assert recv_until_eof(sock) == b""  # cut at drainTimeout (0.5 s): idleTimeout (300 s) would never end it here
    (closed,) = gp.wait_event("connection_closed", rule="gone")
    assert closed["reason"] == "stopped"
    (stopped,) = gp.wait_event("rule_stopped", rule="gone")
    assert stopped["cut_connections"] == 1
    sock.close()


@pytest.mark.slow
def test_invalid_versions_keep_the_old_rules_serving(start_gportmap, echo_target):
    port = free_port()
    good = [tcp_rule(port, echo_target.port, name="web")]
    gp = start_gportmap(good)
    gp.wait_event("watching")
    stop, errors, served = threading.Event(), [], [0]

    def traffic() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                assert echo_once(port) == b"ping"
                served[0] += 1
            except (OSError, AssertionError) as exc:
                errors.append(repr(exc))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        valid_text = json.dumps(good + [tcp_rule(free_port(), echo_target.port, name="extra")], indent=2)
        versions = [
            ("invalid JSON", "[{,]", "invalid JSON at line 1, column 3"),
            ("schema error", json.dumps([{**good[0], "listenPort": 70000}]), "70000 is greater than the maximum of 65535"),
            ("truncated", valid_text[: len(valid_text) // 2], "invalid JSON"),
        ]
        for count, (label, text, expected) in enumerate(versions, start=1):
            before = served[0]
            write_in_place(gp.rules_path, text)
            records = gp.wait_event("config_invalid", count=count)
            assert expected in records[-1]["errors"][0], label
            wait_for(lambda before=before: served[0] > before + 3, what=f"traffic after {label}")
        write_in_place(gp.rules_path, valid_text)
        (reloaded,) = gp.wait_event("config_reloaded")
        assert reloaded["added"] == ["extra"] and reloaded["unchanged"] == ["web"]
    finally:
        stop.set()
        thread.join(30)
    assert errors == [] and served[0] > 10


@pytest.mark.slow
def test_a_rule_whose_port_is_taken_binds_once_it_frees(start_gportmap, echo_target):
    blocker = socket.socket()
    blocker.bind((LOOPBACK, 0))
    blocker.listen(1)
    taken, free = blocker.getsockname()[1], free_port()
    gp = start_gportmap([tcp_rule(taken, echo_target.port, name="late"), tcp_rule(free, echo_target.port, name="ok")])
    (failed,) = gp.wait_event("rule_failed", rule="late")
    assert "already in use" in failed["error"]
    assert echo_once(free) == b"ping"
    blocker.close()
    gp.wait_event("rule_started", rule="late", timeout=10)
    assert echo_once(taken) == b"ping"


@pytest.mark.parametrize("off_by", ["settings", "environment"])
def test_sighup_reloads_even_with_watching_off(start_gportmap, echo_target, off_by):
    a, b = tagged_echo(b"A"), tagged_echo(b"B")
    port = free_port()
    settings = {"watch": False} if off_by == "settings" else {"drainTimeout": 5}
    env = {"GPORTMAP_WATCHER": "off"} if off_by == "environment" else {}
    try:
        gp = start_gportmap({"settings": settings, "rules": [tcp_rule(port, a.port, name="web")]}, env=env)
        assert gp.events("watching") == []  # no watcher at all
        write_atomically(gp.rules_path, rules_text(tcp_rule(port, b.port, name="web"), **settings))
        assert tagged_once(port, b"1") == b"A1"  # not applied by itself
        gp.signal(signal.SIGHUP)
        (reloaded,) = gp.wait_event("config_reloaded")
        assert reloaded["source"] == "signal" and reloaded["changed"] == ["web"]
        assert tagged_once(port, b"2") == b"B2"
        # SIGHUP on an unchanged file still reloads (and changes nothing).
        gp.signal(signal.SIGHUP)
        second = gp.wait_event("config_reloaded", count=2)[-1]
        assert second["unchanged"] == ["web"] and second["changed"] == []
    finally:
        a.close()
        b.close()


def test_settings_apply_on_reload(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap({"settings": {"maxConnections": 1}, "rules": [tcp_rule(port, echo_target.port)]})
    gp.wait_event("watching")
    held = connect(port)
    held.sendall(b"x")
    assert recv_exactly(held, 1) == b"x"
    extra = connect(port)
    assert recv_until_eof(extra) == b""  # global limit 1: rejected
    write_atomically(gp.rules_path, rules_text(tcp_rule(port, echo_target.port), maxConnections=5))
    (reloaded,) = gp.wait_event("config_reloaded")
    assert reloaded["settings_changed"] == ["max_connections"] and reloaded["unchanged"] == [f"tcp-{port}"]
    assert echo_once(port) == b"ping"  # now admitted
    held.close()
    extra.close()
