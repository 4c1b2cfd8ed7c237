"""Upgrade in place (SPEC §11): SIGUSR2 re-executes gportmap, same PID, carrying its
listeners and plain TCP connections; what cannot be carried finishes in a drainer
running the old code. gportmap runs as a subprocess; every peer is real.

The figures (upgrade duration, pause of the carried connections) are printed with
``-s`` and come from the ``upgraded`` records; no test asserts a wall-clock time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from certs import CA
from conftest import (
    LOOPBACK,
    ROOT,
    TargetServer,
    closed_by_peer,
    connect,
    echoes,
    free_port,
    recv_exactly,
    refused,
    require_tool,
    tcp_rule,
    wait_for,
)
from test_systemd import launch, launch_with_sockets, listening_socket  # noqa: F401 - launch: a fixture

#: Upgrades in a row under load (the issue asks for 20; each takes about a second
#: of a Python start-up, twice: the pre-flight and the exec).
UPGRADES = int(os.environ.get("GPORTMAP_TEST_UPGRADES", "20"))
#: Checksummed streams open through every upgrade.
STREAMS = int(os.environ.get("GPORTMAP_TEST_UPGRADE_STREAMS", "12"))
#: The length of the byte pattern the streams send: a prime, so that bytes lost or
#: repeated can never line up with it again by chance.
PATTERN_LENGTH = 1_000_003
MAX_CHUNK = 32 * 1024


def pattern(seed: int) -> bytes:
    """The bytes a stream sends, cyclically, plus a chunk's worth to compare across the wrap."""
    data = random.Random(seed).randbytes(PATTERN_LENGTH)
    return data + data[:MAX_CHUNK]


class PatternSender:
    """Sends ``pattern(seed)`` in random chunks at a paced rate until ``stop`` is
    set, then half-closes; ``sent`` counts the bytes."""

    def __init__(self, sock: socket.socket, seed: int, stop: threading.Event, errors: list[str], name: str) -> None:
        self.sock, self.data, self.stop, self.errors, self.name = sock, pattern(seed), stop, errors, name
        self.rng = random.Random(seed ^ 0x5EED)
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.wait(self.rng.random() * 0.02):
                size = self.rng.randint(1, MAX_CHUNK)
                offset = self.sent % PATTERN_LENGTH
                self.sock.sendall(self.data[offset : offset + size])
                self.sent += size
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(f"{self.name}: send failed after {self.sent} bytes: {exc!r}")


class PatternReceiver:
    """Reads until EOF and checks every byte against ``pattern(seed)`` at its offset."""

    def __init__(self, sock: socket.socket, seed: int, errors: list[str], name: str) -> None:
        self.sock, self.data, self.errors, self.name = sock, pattern(seed), errors, name
        self.received = 0
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(MAX_CHUNK)
                if not chunk:
                    break
                offset = self.received % PATTERN_LENGTH
                if chunk != self.data[offset : offset + len(chunk)]:
                    self.errors.append(f"{self.name}: wrong bytes at offset {self.received}")
                    return
                self.received += len(chunk)
            self.ended.set()
        except OSError as exc:
            self.errors.append(f"{self.name}: receive failed after {self.received} bytes: {exc!r}")


class StreamPeer:
    """The target of the streams: per connection, an 8-byte seed, then the client's
    pattern checked until EOF while its own pattern (seed + 1) goes back until the
    test stops it (``stop_download``), then a half-close."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.stops: dict[int, threading.Event] = {}
        self.receivers: dict[int, PatternReceiver] = {}
        self.senders: dict[int, PatternSender] = {}
        self.lock = threading.Lock()
        self.server = TargetServer(self.handle)

    def stop_download(self, seed: int) -> None:
        with self.lock:
            self.stops.setdefault(seed, threading.Event()).set()

    def handle(self, conn: socket.socket) -> None:
        seed = int.from_bytes(recv_exactly(conn, 8), "big")
        with self.lock:
            stop = self.stops.setdefault(seed, threading.Event())
        receiver = PatternReceiver(conn, seed, self.errors, f"peer {seed} upload")
        sender = PatternSender(conn, seed + 1, stop, self.errors, f"peer {seed} download")
        with self.lock:
            self.receivers[seed], self.senders[seed] = receiver, sender
        receiver.thread.start()
        sender.thread.start()
        sender.thread.join(120)
        receiver.thread.join(120)

    def close(self) -> None:
        for stop in list(self.stops.values()):
            stop.set()
        self.server.close()


class Stream:
    """One client connection: the pattern of ``seed`` up, that of ``seed + 1`` down."""

    def __init__(self, port: int, seed: int, errors: list[str]) -> None:
        self.seed = seed
        self.sock = connect(port, timeout=60)
        self.sock.sendall(seed.to_bytes(8, "big"))
        self.stop_upload = threading.Event()
        self.sender = PatternSender(self.sock, seed, self.stop_upload, errors, f"stream {seed} upload")
        self.receiver = PatternReceiver(self.sock, seed + 1, errors, f"stream {seed} download")
        self.sender.thread.start()
        self.receiver.thread.start()

    def progress(self) -> int:
        return self.sender.sent + self.receiver.received


class ShortConnections:
    """A loop of short connections (connect, one round trip, close) through an echo
    rule; every refusal and every wrong or missing answer is counted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = self.refused = 0
        self.broken: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        count = 0
        while not self.stop.is_set() and count < 100_000:
            count += 1
            payload = f"short {count}".encode()
            try:
                with connect(self.port, timeout=30) as sock:
                    sock.sendall(payload)
                    got = recv_exactly(sock, len(payload))
                if got != payload:
                    self.broken.append(f"#{count}: got {got!r}")
                self.done += 1
            except ConnectionRefusedError:
                self.refused += 1
            except OSError as exc:
                self.broken.append(f"#{count}: {exc!r}")
            time.sleep(0.01)


def end_traffic(shorts: ShortConnections, streams: list[Stream], peer: StreamPeer) -> None:
    """Stop the short-connection loop and both directions of every stream, and wait
    until the peer has read each stream to its end."""
    shorts.stop.set()
    shorts.thread.join(60)
    for stream in streams:
        stream.stop_upload.set()
        peer.stop_download(stream.seed)
    for stream in streams:
        stream.sender.thread.join(60)
        stream.receiver.thread.join(60)
    wait_for(lambda: len(peer.receivers) == len(streams)
             and all(r.ended.is_set() for r in peer.receivers.values()), 60, what="the peer's reads to end")


def abandon_traffic(shorts: ShortConnections | None, streams: list[Stream], peer: StreamPeer) -> None:
    """A test's ``finally``: stop whatever traffic is left, however the test ended."""
    if shorts is not None:
        shorts.stop.set()
    for stream in streams:
        stream.stop_upload.set()
        stream.sock.close()
    peer.close()


def rule(gp, name: str) -> dict:
    return next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == name)


def upgrade(gp, count: int, timeout: float = 60.0) -> dict:
    """SIGUSR2, and the main process's ``upgraded`` record of this (the ``count``-th)
    upgrade (with workers, theirs come first: ``worker_records``)."""
    gp.signal(signal.SIGUSR2)
    record = gp.wait_event("upgraded", timeout, count=count, worker=None)[count - 1]
    gp.wait_event("admin_started", timeout, count=count + 1)
    return record


def worker_records(gp) -> list[dict]:
    return [e for e in gp.events("upgraded") if e.get("worker") is not None]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def no_zombie_drainers(pid: int) -> bool:
    """Every child of ``pid`` (drainers) has ended and been reaped."""
    import psutil

    try:
        return not psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return True


def settings(**extra) -> dict:
    return {"watch": False, **extra}


# -- under load --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)  # 20 upgrades of 2 to 6 s each on a loaded host, with workers
@pytest.mark.parametrize("workers", [1, 2])
def test_upgrades_in_a_row_carry_streams_and_refuse_nothing(start_gportmap, echo_target, workers):
    """UPGRADES upgrades while STREAMS checksummed streams (both ways, some half-closed
    mid-way by either end) and a loop of short connections run: nothing refused,
    broken, lost or reordered; same PIDs (the workers' too); counters continue and
    count each connection once; descriptors back to their idle count."""
    peer = StreamPeer()
    stream_port, short_port = free_port(), free_port()
    rules = {
        "rules": [
            tcp_rule(stream_port, peer.server.port, name="streams"),
            tcp_rule(short_port, echo_target.port, name="shorts"),
        ],
        "settings": settings(),
    }
    gp = start_gportmap(rules, *(("--workers", str(workers)) if workers > 1 else ()))
    errors: list[str] = peer.errors
    streams: list[Stream] = []
    shorts = None
    try:
        pid = gp.pid
        pids = sorted([pid, *gp.children()]) if workers > 1 else [pid]
        assert len(pids) == workers + (workers > 1)
        idle_fds = {p: open_fds(p) for p in pids}
        streams = [Stream(stream_port, 1000 * (i + 1), errors) for i in range(STREAMS)]
        shorts = ShortConnections(short_port)
        records = []
        last_stats = rule(gp, "streams")
        for n in range(1, UPGRADES + 1):
            marks = [stream.progress() for stream in streams]
            wait_for(lambda marks=marks: all(s.progress() > m or s.receiver.ended.is_set()
                                             for s, m in zip(streams, marks)), 30, what="every stream moving")
            if n == UPGRADES // 3:  # clients half-close: their downloads go on
                for stream in streams[:3]:
                    stream.stop_upload.set()
            if n == UPGRADES // 2:  # the target half-closes: those uploads go on
                for stream in streams[3:6]:
                    peer.stop_download(stream.seed)
            records.append(upgrade(gp, n))
            assert gp.pid == pid and gp.proc.poll() is None
            if workers > 1:  # the same workers (a single process's children are drainers, if any)
                assert sorted([pid, *gp.children()]) == pids
            stats = rule(gp, "streams")
            for key in ("total",):
                assert stats["connections"][key] >= last_stats["connections"][key], (n, stats, last_stats)
            for key in ("received", "sent"):
                assert stats["bytes"][key] >= last_stats["bytes"][key], (n, stats, last_stats)
            last_stats = stats
            assert not errors, errors
        end_traffic(shorts, streams, peer)
        assert not errors, errors
        assert shorts.refused == 0 and not shorts.broken, (shorts.refused, shorts.broken[:5])
        assert shorts.done > UPGRADES
        for stream in streams:  # every byte arrived, in order (checked as it came), none extra
            assert stream.receiver.ended.is_set()
            assert stream.receiver.received == peer.senders[stream.seed].sent
            assert peer.receivers[stream.seed].received == stream.sender.sent
        carriers = records if workers == 1 else worker_records(gp)
        assert len(carriers) == UPGRADES * workers
        assert sum(r["carried"] for r in carriers) >= STREAMS  # the streams were carried, not re-made
        # at most the one short connection caught in its connect: it finishes in a drainer
        assert all(r["draining"] <= 1 and r["lost"] == 0 for r in carriers)
        # Counted once each, never twice, never reset: the figures of every connection ever made.
        try:
            wait_for(lambda: gp.admin_json("/stats")["connections"]["active"] == 0, 30, what="no connection open")
        except AssertionError:
            raise AssertionError(f"still open: {gp.admin_json('/connections')}") from None
        uploaded = sum(s.sender.sent + 8 for s in streams)
        downloaded = sum(peer.senders[s.seed].sent for s in streams)
        expected = {"total": STREAMS, "received": uploaded, "sent": downloaded, "shorts": shorts.done}

        def figures() -> dict:  # a master's sums follow its workers' pushes
            streams_rule, shorts_rule = rule(gp, "streams"), rule(gp, "shorts")
            return {"total": streams_rule["connections"]["total"], **streams_rule["bytes"],
                    "shorts": shorts_rule["connections"]["total"]}

        try:
            wait_for(lambda: figures() == expected, 10, what="the final figures")
        except AssertionError:
            assert figures() == expected
        assert gp.admin_json("/stats")["pid"] == pid
        wait_for(lambda: {p: open_fds(p) for p in pids} == idle_fds, 15,
                 what=f"the idle descriptor counts {idle_fds}")
        durations = sorted(r["duration"] for r in records)
        pauses = sorted(r["pause"] for r in carriers)
        print(f"\n{UPGRADES} upgrades, {STREAMS} streams, {workers} worker(s): duration median {durations[len(durations) // 2]:.3f}s "
              f"max {durations[-1]:.3f}s; pause median {pauses[len(pauses) // 2] * 1000:.0f} ms; "
              f"per carried connection median "
              f"{sorted(r['per_connection_us'] for r in carriers)[len(carriers) // 2]:.0f} us; "
              f"short connections {shorts.done}")
    finally:
        abandon_traffic(shorts, streams, peer)


def test_a_half_closed_connection_stays_half_closed(start_gportmap):
    """The client's end was read and forwarded before the upgrade; the target answers
    after it, through the new program, and then the connection ends."""
    late = threading.Event()

    def answer_late(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        late.wait(60)
        conn.sendall(b"after the upgrade: " + data)
        conn.shutdown(socket.SHUT_WR)

    target = TargetServer(answer_late)
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, target.port, name="half")], "settings": settings()})
    try:
        with connect(port) as sock:
            sock.sendall(b"question")
            sock.shutdown(socket.SHUT_WR)
            wait_for(lambda: rule(gp, "half")["bytes"]["received"] == 8, what="the question relayed")
            (before,) = gp.admin_json("/connections")
            record = upgrade(gp, 1)
            assert record["carried"] == 1
            (after,) = gp.admin_json("/connections")  # the same connection, its figures going on
            assert {k: after[k] for k in ("id", "client", "started", "bytes")} == \
                {k: before[k] for k in ("id", "client", "started", "bytes")}
            assert after["duration"] >= before["duration"]
            late.set()
            sock.settimeout(20)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer == b"after the upgrade: question"
        wait_for(lambda: rule(gp, "half")["connections"]["active"] == 0, what="the connection closed")
        stats = rule(gp, "half")
        assert stats["connections"]["total"] == 1
        assert stats["bytes"] == {"received": 8, "sent": len(answer)}
    finally:
        late.set()
        target.close()


@pytest.mark.slow
@pytest.mark.parametrize("relay", ["splice", "copy"])
def test_bytes_waiting_on_a_slow_reader_are_carried(start_gportmap, relay):
    """A client that reads nothing for a while: the relay holds bytes it could not
    write (a full splice pipe, drained into the tail; or the unsent tail of a
    copy) when the upgrade comes; every byte still arrives, once, in order."""
    size = 32 * 1024 * 1024
    data = random.Random(7).randbytes(size)

    def flood(conn: socket.socket) -> None:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    target = TargetServer(flood)
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, target.port, name="slow")], "settings": settings()},
                        env={"GPORTMAP_RELAY": relay})
    try:
        with connect(port) as sock:
            sent = []

            def stalled() -> bool:  # the relay moved what the buffers take, and waits
                sent.append(rule(gp, "slow")["bytes"]["sent"])
                return len(sent) > 5 and sent[-1] == sent[-5] > 0

            wait_for(stalled, 30, interval=0.1, what="the relay waiting on the client")
            record = upgrade(gp, 1)
            assert record["carried"] == 1 and record["tail_bytes"] > 0
            got = bytearray()
            sock.settimeout(30)
            while chunk := sock.recv(1 << 20):
                got += chunk
            assert len(got) == size and bytes(got) == data
        wait_for(lambda: rule(gp, "slow")["bytes"]["sent"] == size, what="every byte counted once")
    finally:
        target.close()


@pytest.mark.slow
def test_the_idle_deadline_is_carried(start_gportmap, echo_target):
    """The idle clock runs on in the new program (from the carried ``last_active``): a
    carried connection left quiet ends as idle, one kept busy does not."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port, name="idle", idleTimeout=3)],
                         "settings": settings()})
    with connect(port) as quiet, connect(port) as busy:
        for sock in (quiet, busy):
            sock.sendall(b"hi")
            assert recv_exactly(sock, 2) == b"hi"
        upgrade(gp, 1)
        for _ in range(120):  # the busy one talks every half second until the quiet one is cut
            busy.sendall(b"still here")
            assert recv_exactly(busy, 10) == b"still here"
            if closed_by_peer(quiet, 0.5):
                break
        closed = gp.wait_event("connection_closed", 10)[0]
        assert closed["reason"] == "idle_timeout" and closed["bytes_received"] == 2
        busy.sendall(b"and now")
        assert recv_exactly(busy, 7) == b"and now"


@pytest.mark.slow
def test_after_an_upgrade_a_stop_drains_the_carried_connections(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port, name="r")], "settings": settings()})
    with connect(port) as sock:
        sock.sendall(b"1")
        assert recv_exactly(sock, 1) == b"1"
        upgrade(gp, 1)
        gp.signal(signal.SIGTERM)
        stopping = gp.wait_event("stopping", 30)[0]
        assert stopping["active"] == 1
        assert refused(port)
        sock.sendall(b"2")  # drained, not cut
        assert recv_exactly(sock, 1) == b"2"
    assert gp.wait_exit(30) == 0


@pytest.mark.slow  # an upgrade: two programs
def test_a_second_signal_during_an_upgrade_is_refused(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port, name="r")], "settings": settings()})
    gp.signal(signal.SIGUSR2)
    gp.wait_event("upgrade_started", 30)
    gp.signal(signal.SIGUSR2)  # during the pre-flight
    assert gp.wait_event("upgrade_failed", 30)[0]["reason"] == "in progress"
    gp.wait_event("upgraded", 30)
    assert len(gp.events("upgrade_started")) == 1 and echoes(port)


@pytest.mark.slow  # an upgrade: two programs, signals while the second starts
def test_signals_while_the_new_program_starts_are_not_fatal(start_gportmap, echo_target):
    """SIGHUP, SIGUSR1 and SIGUSR2 end a process that has no handler for them yet: the
    new program starts with them blocked (the exec keeps the mask) and handles
    them once its handlers are in place."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port, name="r")], "settings": settings()})
    gp.signal(signal.SIGUSR2)
    gp.wait_event("upgrade_started", 30)
    for _ in range(3000):  # bounded: about 30 s of signals at most
        if gp.events("upgraded") or gp.proc.poll() is not None:
            break
        gp.signal(signal.SIGHUP)
        gp.signal(signal.SIGUSR1)
        time.sleep(0.01)
    gp.wait_event("upgraded", 30)
    assert gp.proc.poll() is None and echoes(port)


# -- what is not carried -------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path):
    ca = CA(tmp_path, "ca")
    return ca, ca.issue("server", "127.0.0.1", ips=("127.0.0.1",))


@pytest.mark.slow
def test_a_tls_connection_finishes_in_the_drainer(start_gportmap, echo_target, pki):
    """A TLS connection cannot be carried: the drainer, running the old code, keeps
    relaying it after the upgrade (the new program counts it no more) and ends when
    it closes; a second one open past drainTimeout is cut. The drainer is reaped,
    and the bytes it relayed are added to the rule's then."""
    ca, server = pki
    tls_port, plain_port = free_port(), free_port()
    rules = {
        "rules": [
            tcp_rule(tls_port, echo_target.port, name="tls",
                     tls={"certFile": str(server.cert), "keyFile": str(server.key)}),
            tcp_rule(plain_port, echo_target.port, name="plain"),
        ],
        "settings": settings(drainTimeout=4),
    }
    gp = start_gportmap(rules)
    context = ssl.create_default_context(cafile=str(ca.path))
    finishing = context.wrap_socket(connect(tls_port), server_hostname="127.0.0.1")
    left_open = context.wrap_socket(connect(tls_port), server_hostname="127.0.0.1")
    plain = connect(plain_port)
    with finishing, left_open, plain:
        for sock in (finishing, left_open, plain):
            sock.sendall(b"before")
            assert recv_exactly(sock, 6) == b"before"
        record = upgrade(gp, 1)
        assert record["carried"] == 1 and record["draining"] == 2
        drainer = gp.wait_event("upgrade_draining")[0]
        assert drainer["draining"] == 2 and drainer["drainer"] != gp.pid
        assert rule(gp, "tls")["connections"]["active"] == 0  # the drainer's now
        os.kill(drainer["drainer"], signal.SIGUSR2)  # as `systemctl kill` signals every process of the unit
        for sock in (finishing, plain):
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"
        second = upgrade(gp, 2)  # the drainer still runs: the next program reaps it
        assert (second["carried"], second["draining"]) == (1, 0)
        finishing.close()
        assert closed_by_peer(left_open, 20)  # cut at drainTimeout
        gp.wait_event("upgrade_drained", 20)
        assert not [e for e in gp.events() if e.get("drainer") and e["event"].startswith("upgrade_start")]
        served = [e for e in gp.events("connection_closed") if e.get("drainer") == drainer["drainer"]]
        assert sorted(e["reason"] for e in served) == ["closed", "stopped"]  # the one that ended, the one cut
        wait_for(lambda: no_zombie_drainers(gp.pid), 10, what="the drainer reaped")
        # What it relayed after the upgrades is counted by the program that reaped it
        # (the third: the report went on through the second upgrade with the drainer).
        wait_for(lambda: rule(gp, "tls")["bytes"] == {"received": 17, "sent": 17}, 10,
                 what="the drained bytes counted")
        with context.wrap_socket(connect(tls_port), server_hostname="127.0.0.1") as new:
            new.sendall(b"new")
            assert recv_exactly(new, 3) == b"new"
        plain.sendall(b"still")
        assert recv_exactly(plain, 5) == b"still"


@pytest.mark.slow  # an upgrade and a drain
def test_connections_of_a_rule_the_file_no_longer_has_drain(start_gportmap, echo_target):
    """A rule removed from the file (not yet reloaded) is gone in the new program: its
    open connection finishes in the drainer, as a reload would have drained it."""
    kept_port, gone_port = free_port(), free_port()
    rules = {"rules": [tcp_rule(kept_port, echo_target.port, name="kept"),
                       tcp_rule(gone_port, echo_target.port, name="gone")], "settings": settings()}
    gp = start_gportmap(rules)
    with connect(kept_port) as kept, connect(gone_port) as gone:
        for sock in (kept, gone):
            sock.sendall(b"1")
            assert recv_exactly(sock, 1) == b"1"
        gp.rules_path.write_text(json.dumps({**rules, "rules": rules["rules"][:1]}))
        record = upgrade(gp, 1)
        assert (record["carried"], record["draining"], record["lost"]) == (1, 1, 0)
        for sock in (kept, gone):
            sock.sendall(b"2")
            assert recv_exactly(sock, 1) == b"2"
    assert refused(gone_port)
    gp.wait_event("upgrade_drained", 30)


@pytest.mark.slow
def test_with_workers_a_tls_connection_finishes_in_its_workers_drainer(start_gportmap, echo_target, pki):
    """A worker's drainer lets go of the worker's channel to its master (the upgraded
    worker's now) and finishes the TLS connection; the master and the other worker
    never notice it."""
    ca, server = pki
    port = free_port()
    rules = {"rules": [tcp_rule(port, echo_target.port, name="tls",
                                tls={"certFile": str(server.cert), "keyFile": str(server.key)})],
             "settings": settings()}
    gp = start_gportmap(rules, "--workers", "2")
    context = ssl.create_default_context(cafile=str(ca.path))
    with context.wrap_socket(connect(port), server_hostname="127.0.0.1") as tls:
        tls.sendall(b"before")
        assert recv_exactly(tls, 6) == b"before"
        upgrade(gp, 1)
        assert sorted(r["draining"] for r in worker_records(gp)) == [0, 1]
        drainer = gp.wait_event("upgrade_draining", 10)[0]
        tls.sendall(b"after")
        assert recv_exactly(tls, 5) == b"after"
    gp.wait_event("upgrade_drained", 20, drainer=drainer["drainer"])
    assert not gp.events("master_gone") and not gp.events("worker_exited")
    with context.wrap_socket(connect(port), server_hostname="127.0.0.1") as again:
        again.sendall(b"new")
        assert recv_exactly(again, 3) == b"new"


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.slow  # an upgrade: two programs
def test_a_broken_installed_version_fails_the_upgrade_and_serving_goes_on(start_gportmap, echo_target, tmp_path):
    """The installed code does not import (a package shadowing gportmap on the
    PYTHONPATH the process runs with): ``upgrade_failed`` with the reason, nothing
    changes. Once the installation is repaired, the same signal upgrades."""
    shim = tmp_path / "shim"
    shim.mkdir()
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port, name="r")], "settings": settings()}, env=env)
    with connect(port) as sock:
        sock.sendall(b"one")
        assert recv_exactly(sock, 3) == b"one"
        broken = shim / "gportmap"
        broken.mkdir()
        (broken / "__init__.py").write_text("raise ImportError('a half-installed gportmap')\n")
        gp.signal(signal.SIGUSR2)
        failed = gp.wait_event("upgrade_failed", 60)[0]
        assert "a half-installed gportmap" in failed["reason"]
        assert not gp.events("upgraded")
        sock.sendall(b"two")
        assert recv_exactly(sock, 3) == b"two"
        assert echoes(port)
        shutil.rmtree(broken)  # the shim (and the bytecode its import left)
        record = upgrade(gp, 1)
        assert record["carried"] == 1
        sock.sendall(b"three")
        assert recv_exactly(sock, 5) == b"three"


@pytest.mark.slow  # an upgrade: two programs
def test_rules_the_installed_version_rejects_fail_the_upgrade(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port, name="r")], "settings": settings()})
    pid = gp.pid
    gp.rules_path.write_text('{"rules": [{"protocol": "tcp", "listenPort": "nope"}]}')
    gp.signal(signal.SIGUSR2)
    failed = gp.wait_event("upgrade_failed", 60)[0]
    assert "listenPort" in failed["reason"] and str(gp.rules_path) in failed["reason"]
    assert echoes(port) and gp.pid == pid and not gp.events("upgraded")


@pytest.mark.slow  # an upgrade: two programs
def test_a_state_version_the_installed_code_does_not_read_is_refused_in_the_preflight(tmp_path, echo_target):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [tcp_rule(free_port(), echo_target.port)]}))
    command = [sys.executable, "-m", "gportmap", "--check", str(rules), "--upgrade-state"]
    assert subprocess.run([*command, "1"], capture_output=True, timeout=60).returncode == 0
    assert subprocess.run([*command, "2"], capture_output=True, timeout=60).returncode == 0
    refused = subprocess.run([*command, "999"], capture_output=True, timeout=60)
    assert refused.returncode == 2 and b"state version 999" in refused.stderr


def test_a_start_handed_an_unreadable_state_starts_afresh(launch, echo_target):  # noqa: F811 - the fixture
    """A state document of a version this code does not read (the pre-flight makes
    that impossible; a hand-made environment does not): ``upgrade_failed``, every
    inherited descriptor closed (the passed listener would hold the port), and the
    rules start as at any start."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    memfd = os.memfd_create("state", 0)
    os.write(memfd, json.dumps({"version": 99}).encode())
    gp = launch({"rules": [tcp_rule(port, echo_target.port, name="r")], "settings": settings()}, [],
                env={"GPORTMAP_UPGRADE_STATE": str(memfd)}, pass_fds=[memfd, listener.fileno()])
    listener.close()
    os.close(memfd)
    failed = gp.wait_event("upgrade_failed", 30)[0]
    assert "version 99" in failed["reason"]
    gp.wait_started()
    assert echoes(port)  # bound afresh: had the passed listener stayed open, the bind would fail


def test_state_documents_round_trip_and_unknown_versions_are_refused():
    from gportmap.runtime.carry import (
        CarriedConnection,
        CarriedDirection,
        CarriedListener,
        CarriedSession,
        UnreadableState,
        UpgradeState,
    )

    state = UpgradeState(
        version=2, began=1.0, frozen=2.0, started_at=3.0, generation=4, digest="d", reloads={"success": 1},
        rules="{}", counters={"r": {"total": 3}}, protocols={"r": "tcp"}, next_id=9,
        listeners=[CarriedListener(5, "tcp", "127.0.0.1", 80)],
        connections=[CarriedConnection("r", 6, 7, 8, "c", "t", 1.0, 2.0, 3.0, 4, 5,
                                       CarriedDirection(b"\x00tail", False), CarriedDirection(b"", True))],
        drainers=[42],
        sessions=[CarriedSession("u", 9, ["::1", 53, 0, 0], "[::1]:53", 1.0, 2.0, 3, 4, 5, 6, "established")],
    )
    assert UpgradeState.decode(state.encode()) == state
    assert state.descriptors() == [5, 6, 7, 9]
    older = json.loads(state.encode())  # version 1 had no UDP sessions: still read
    older["version"] = 1
    del older["sessions"]
    assert UpgradeState.decode(json.dumps(older).encode()).sessions == []
    future = json.loads(state.encode())
    future["version"] = 99
    with pytest.raises(UnreadableState, match="version 99"):
        UpgradeState.decode(json.dumps(future).encode())
    with pytest.raises(UnreadableState):
        UpgradeState.decode(b"not json")


def test_without_the_platform_support_the_upgrade_is_unsupported(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port)], "settings": settings()},
                        env={"GPORTMAP_PORTABLE": "1"})
    gp.signal(signal.SIGUSR2)
    record = gp.wait_event("upgrade_unsupported", 30)[0]
    assert "GPORTMAP_PORTABLE" in record["reason"]
    assert echoes(port) and gp.proc.poll() is None


@pytest.mark.slow  # an upgrade with workers
def test_with_workers_a_failed_preflight_touches_no_worker(start_gportmap, echo_target):
    """The master checks the installed code first: when it fails, no worker is
    upgraded (none re-executed: no ``upgraded`` record at all)."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port)], "settings": settings()}, "--workers", "2")
    children = sorted(gp.children())
    gp.rules_path.write_text("{not json")
    gp.signal(signal.SIGUSR2)
    assert "exited 2" in gp.wait_event("upgrade_failed", 30)[0]["reason"]
    assert not gp.events("upgraded") and not gp.events("upgrade_started")[1:]
    assert echoes(port) and gp.proc.poll() is None and sorted(gp.children()) == children


@pytest.mark.slow
def test_with_workers_the_upgraded_master_watches_restarts_and_stops_its_workers(start_gportmap, echo_target):
    """The new master adopted workers it did not start: one killed is restarted, and
    a stop ends them all (it waits for processes it knows only by PID)."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port)], "settings": settings()}, "--workers", "2")
    with connect(port) as held:
        held.sendall(b"1")
        assert recv_exactly(held, 1) == b"1"
        before = sorted(gp.children())
        record = upgrade(gp, 1)
        assert record["workers"] == 2 and sorted(gp.children()) == before
        held.sendall(b"2")
        assert recv_exactly(held, 1) == b"2"
        os.kill(before[0], signal.SIGKILL)
        gp.wait_event("worker_exited", 30, pid=before[0])
        wait_for(lambda: len(gp.children()) == 2 and before[0] not in gp.children(), 30, what="a new worker")
        wait_for(lambda: len(gp.admin_json("/stats")["workers"]) == 2
                 and all(w["state"] == "running" for w in gp.admin_json("/stats")["workers"]), 30,
                 what="both workers running")
        assert echoes(port)
    gp.signal(signal.SIGTERM)
    assert gp.wait_exit(60) == 0
    assert not any(psutil_alive(pid) for pid in before)


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- a real peer -----------------------------------------------------------------------------


@pytest.mark.slow  # an upgrade under a real ssh session
def test_an_openssh_session_survives_an_upgrade(start_gportmap, tmp_path):
    """ssh through a rule to a real sshd: the session's shell answers before and
    after the upgrade, on the same connection."""
    sshd = require_tool("sshd")
    keygen = require_tool("ssh-keygen")
    ssh = require_tool("ssh")
    if os.geteuid() != 0:
        pytest.skip("sshd as a test peer needs root here (privilege separation)")
    Path("/run/sshd").mkdir(exist_ok=True)
    folder = tmp_path / "ssh"
    folder.mkdir()
    for key in ("host", "client"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True, timeout=30)
    (folder / "authorized_keys").write_text((folder / "client.pub").read_text())
    sshd_port, port = free_port(), free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {sshd_port}\nListenAddress {LOOPBACK}\nHostKey {folder / 'host'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
        f"PidFile {folder / 'sshd.pid'}\n"
    )
    server = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    client = None
    try:
        wait_for(lambda: not connect_refused(sshd_port), 15, what="sshd listening")
        gp = start_gportmap({"rules": [tcp_rule(port, sshd_port, name="ssh")], "settings": settings()})
        client = subprocess.Popen(
            [ssh, "-p", str(port), "-i", str(folder / "client"), "-o", "StrictHostKeyChecking=no",
             "-o", f"UserKnownHostsFile={folder / 'known_hosts'}", "-o", "BatchMode=yes",
             f"root@{LOOPBACK}", "cat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        client.stdin.write(b"before the upgrade\n")
        client.stdin.flush()
        assert client.stdout.readline() == b"before the upgrade\n"
        record = upgrade(gp, 1)
        assert record["carried"] == 1
        client.stdin.write(b"after the upgrade\n")
        client.stdin.flush()
        assert client.stdout.readline() == b"after the upgrade\n"
        client.stdin.close()
        assert client.wait(20) == 0
        assert rule(gp, "ssh")["connections"]["total"] == 1
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        server.terminate()
        server.wait(10)


def connect_refused(port: int) -> bool:
    try:
        connect(port, timeout=2).close()
    except OSError:
        return True
    return False


@pytest.mark.slow  # an upgrade: two programs
def test_a_rule_without_connections_keeps_its_port_across_the_upgrade(start_gportmap, echo_target):
    """Connection attempts made while the new program starts wait in the carried
    listener's backlog: none is refused."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port, name="r")], "settings": settings()})
    gp.signal(signal.SIGUSR2)
    gp.wait_event("upgrade_started", 30)
    attempts = []
    deadline = time.monotonic() + 60
    while not gp.events("upgraded") and time.monotonic() < deadline:
        sock = socket.socket()
        sock.settimeout(30)
        sock.connect((LOOPBACK, port))  # never refused: the backlog holds it
        attempts.append(sock)
        time.sleep(0.02)
    gp.wait_event("upgraded", 30)
    for sock in attempts:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        sock.close()
    assert len(attempts) > 3
    assert rule(gp, "r")["connections"]["total"] == len(attempts)


@pytest.mark.slow  # an upgrade: two programs
def test_a_udp_rule_keeps_its_socket_and_its_counters(start_gportmap):
    """The UDP listener is carried: a datagram sent while the new program starts
    waits in its buffer and is answered; the rule's counters go on, and the
    client's session is carried with them (one session, never a second one)."""
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind((LOOPBACK, 0))
    stop = threading.Event()

    def echo() -> None:
        target.settimeout(0.2)
        while not stop.is_set():
            try:
                data, address = target.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            target.sendto(data, address)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    port = free_port(socket.SOCK_DGRAM)
    rules = {"rules": [{"protocol": "udp", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
                        "targetPort": target.getsockname()[1], "name": "dns"}], "settings": settings()}
    gp = start_gportmap(rules)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(20)
    try:
        client.sendto(b"one", (LOOPBACK, port))
        assert client.recvfrom(100)[0] == b"one"
        gp.signal(signal.SIGUSR2)
        gp.wait_event("upgrade_started", 30)
        client.sendto(b"two", (LOOPBACK, port))  # before, during or after the exec: answered
        assert client.recvfrom(100)[0] == b"two"
        gp.wait_event("upgraded", 30)
        client.sendto(b"three", (LOOPBACK, port))
        assert client.recvfrom(100)[0] == b"three"
        udp = rule(gp, "dns")["udp"]
        assert udp["packets_received"] == 3 and udp["packets_sent"] == 3
        assert udp["sessions"] == 1 and rule(gp, "dns")["connections"]["total"] == 1
    finally:
        stop.set()
        client.close()
        target.close()
        thread.join(5)


def test_sockets_from_systemd_stay_adoptable_after_an_upgrade(launch, echo_target):  # noqa: F811 - the fixture
    """Socket activation: the rule's socket and a spare one (no rule yet) passed by
    the service manager are both carried; a reload after the upgrade that adds a
    rule on the spare one adopts it instead of binding (which the port would refuse)."""
    web, spare = listening_socket(socket.SOCK_STREAM), listening_socket(socket.SOCK_STREAM)
    web_port, spare_port = web.getsockname()[1], spare.getsockname()[1]
    rules = {"settings": settings(), "rules": [tcp_rule(web_port, echo_target.port, name="web")]}
    gp = launch_with_sockets(launch, rules, [web, spare], "web:spare")
    gp.wait_started()
    with connect(web_port) as held:
        held.sendall(b"one")
        assert recv_exactly(held, 3) == b"one"
        record = upgrade(gp, 1)
        assert record["carried"] == 1 and record["listeners"] == 3  # the rule's, and systemd's two
        held.sendall(b"two")
        assert recv_exactly(held, 3) == b"two"
    assert echoes(web_port)
    gp.rules_path.write_text(json.dumps({**rules, "rules": [*rules["rules"],
                                                           tcp_rule(spare_port, echo_target.port, name="spare")]}))
    gp.signal(signal.SIGHUP)
    started = gp.wait_event("rule_started", 30, rule="spare")[0]
    assert started["adopted"] is True
    assert echoes(spare_port)


# -- UDP sessions ----------------------------------------------------------------------------


class UdpEchoTarget:
    """A UDP echo target that notes the source address of every datagram: a
    session carried over keeps its socket, so its source port never changes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        #: Source ports seen, by the client id the payload names.
        self.sources: dict[int, set[int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data, address = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sources.setdefault(int(data.split(b" ", 1)[0]), set()).add(address[1])
            self.sock.sendto(data, address)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


class UdpEchoLoop:
    """One client: datagrams numbered ``<client> <seq>``, at most ``window`` of them
    unanswered at a time; every reply is checked (its number outstanding, so none
    is duplicated or made up). What is still unanswered at the end was lost."""

    window = 8

    def __init__(self, client: int, port: int, errors: list[str]) -> None:
        self.client, self.port, self.errors = client, port, errors
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.2)
        self.sent = self.answered = 0
        self.outstanding: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = None
        while self.sent < 200_000:
            if self.stop.is_set():
                deadline = deadline or time.monotonic() + 30  # replies still on their way
                if not self.outstanding or time.monotonic() > deadline:
                    return
            elif len(self.outstanding) < self.window:
                self.sent += 1
                self.outstanding.add(self.sent)
                self.sock.sendto(f"{self.client} {self.sent}".encode(), (LOOPBACK, self.port))
                time.sleep(0.002)
                continue
            try:
                data = self.sock.recv(100)
            except TimeoutError:
                continue
            seq = int(data.split()[1])
            if seq not in self.outstanding:
                self.errors.append(f"client {self.client}: reply {seq} not outstanding (a duplicate?)")
                return
            self.outstanding.discard(seq)
            self.answered += 1

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        self.sock.close()


@pytest.mark.slow
@pytest.mark.timeout(400)  # 20 upgrades of 2 to 4 s each on a loaded host, with workers
@pytest.mark.parametrize("workers", [1, 2])
def test_udp_sessions_are_carried_through_upgrades(start_gportmap, workers):
    """UPGRADES upgrades while UDP echo loops run: not a datagram lost (the listener
    and every session's socket are carried: what arrives meanwhile waits in their
    kernel buffers), the target sees each client from one source port throughout
    (the session is the same flow), sessions are made once per client, the
    ``/stats`` udp counters go on, and the descriptors come back to idle once the
    sessions expire."""
    target = UdpEchoTarget()
    port = free_port(socket.SOCK_DGRAM)
    rules = {"rules": [{"protocol": "udp", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
                        "targetPort": target.port, "name": "dns", "sessionTimeout": 10}],
             "settings": settings()}
    gp = start_gportmap(rules, *(("--workers", str(workers)) if workers > 1 else ()))
    errors: list[str] = []
    loops: list[UdpEchoLoop] = []
    try:
        pids = sorted([gp.pid, *gp.children()]) if workers > 1 else [gp.pid]
        idle_fds = {p: open_fds(p) for p in pids}
        loops = [UdpEchoLoop(client, port, errors) for client in range(4)]
        last = rule(gp, "dns")["udp"]
        records = []
        for n in range(1, UPGRADES + 1):
            marks = [loop.answered for loop in loops]
            wait_for(lambda marks=marks: all(loop.answered > m for loop, m in zip(loops, marks)), 30,
                     what="every echo loop answered")
            records.append(upgrade(gp, n))
            udp = rule(gp, "dns")["udp"]
            for key in ("packets_received", "packets_sent"):
                assert udp[key] >= last[key], (n, udp, last)
            last = udp
            assert not errors, errors
        for loop in loops:
            loop.finish()
        assert not errors, errors
        lost = {loop.client: sorted(loop.outstanding) for loop in loops if loop.outstanding}
        assert not lost, (f"datagrams lost: {lost}", [e for e in gp.events() if e["event"] in (
            "datagram_dropped", "internal_error", "upgraded", "session_closed", "udp_icmp_error")])
        assert all(loop.answered > UPGRADES for loop in loops)
        assert {client: len(ports) for client, ports in target.sources.items()} == dict.fromkeys(range(4), 1)
        carriers = records if workers == 1 else worker_records(gp)
        assert sum(r["carried"] for r in carriers) == len(loops) * UPGRADES and not any(r["lost"] for r in carriers)
        sent = sum(loop.sent for loop in loops)

        def figures() -> dict:  # a master's sums follow its workers' pushes
            stats = rule(gp, "dns")
            return {"sessions": stats["connections"]["total"], "received": stats["udp"]["packets_received"],
                    "sent": stats["udp"]["packets_sent"], "dropped": stats["udp"]["dropped"]}

        expected = {"sessions": len(loops), "received": sent, "sent": sent, "dropped": 0}
        try:
            wait_for(lambda: figures() == expected, 10, what="the final figures")
        except AssertionError:
            assert figures() == expected
        wait_for(lambda: rule(gp, "dns")["udp"]["sessions"] == 0, 30, what="the sessions expired")
        # the records come through the log writer a moment after the figures: wait for them
        closed = gp.wait_event("session_closed", 10, count=len(loops))
        assert len(gp.events("session_closed")) == len(loops) and all(e["reason"] == "expired" for e in closed)
        assert sorted(e["packets_received"] for e in closed) == sorted(loop.sent for loop in loops)
        wait_for(lambda: {p: open_fds(p) for p in pids} == idle_fds, 15, what=f"the idle descriptor counts {idle_fds}")
        pauses = sorted(r["pause"] for r in (records if workers == 1 else worker_records(gp)))
        print(f"\n{UPGRADES} upgrades, {len(loops)} UDP echo loops, {workers} worker(s): {sent} datagrams, "
              f"0 lost, one source port per client; pause median {pauses[len(pauses) // 2] * 1000:.0f} ms "
              f"max {pauses[-1] * 1000:.0f} ms")
    finally:
        for loop in loops:
            loop.finish()
        target.close()


# -- per-target counters, a worker's failed hand-over --------------------------------------


@pytest.mark.slow  # an upgrade: two programs
def test_per_target_counters_continue_across_an_upgrade(start_gportmap, echo_target):
    """``/stats``' targets (connections, connect failures, bytes) go on from the old
    program's instead of starting again at 0."""
    port, dead_port = free_port(), free_port()
    rules = {"rules": [tcp_rule(port, echo_target.port, name="up"), tcp_rule(dead_port, free_port(), name="dead")],
             "settings": settings()}
    gp = start_gportmap(rules)

    def cut(port: int) -> bool:  # the target refuses: gportmap closes the client's connection
        try:
            return not echoes(port)
        except OSError:
            return True

    for _ in range(3):
        assert echoes(port) and cut(dead_port)

    def target(name: str) -> dict:
        (entry,) = rule(gp, name)["targets"]
        return {"total": entry["total"], "connect_failures": entry["connect_failures"], **entry["bytes"]}

    wait_for(lambda: target("up")["total"] == 3 and rule(gp, "up")["connections"]["active"] == 0,
             what="the connections counted")
    before = {"up": target("up"), "dead": target("dead")}
    assert before["up"]["received"] > 0 and before["dead"]["connect_failures"] == 3
    upgrade(gp, 1)
    assert {"up": target("up"), "dead": target("dead")} == before
    assert echoes(port) and cut(dead_port)
    wait_for(lambda: target("up")["total"] == 4 and target("dead")["connect_failures"] == 4,
             what="the next connections counted on top")


@pytest.mark.slow  # starts a master and two workers
def test_with_workers_a_failed_hand_over_ends_the_wait_at_once(start_gportmap, echo_target, tmp_path):
    """A worker whose hand-over fails (here: no memfd, injected) tells its master at
    once: the master's ``upgrade_failed`` names the worker and its reason (it does
    not wait for a worker that will not come back), and everything serves on."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import os\n\n\ndef _refuse(*args, **kwargs):\n    raise OSError('injected: no memfd here')\n\n\n"
        "os.memfd_create = _refuse\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port)], "settings": settings()}, "--workers", "2",
                        env=env)
    children = sorted(gp.children())
    with connect(port) as held:
        held.sendall(b"1")
        assert recv_exactly(held, 1) == b"1"
        gp.signal(signal.SIGUSR2)
        (failed,) = wait_for(lambda: [e for e in gp.events("upgrade_failed") if e.get("worker") is None], 30,
                             what="the master's upgrade_failed")
        assert "could not upgrade" in failed["reason"] and "injected: no memfd here" in failed["reason"]
        assert "this master is not upgraded" in failed["reason"]
        assert not gp.events("upgraded") and not gp.events("worker_upgraded")
        held.sendall(b"2")
        assert recv_exactly(held, 1) == b"2"
    assert echoes(port) and gp.proc.poll() is None and sorted(gp.children()) == children


@pytest.mark.slow  # an upgrade and a drain
def test_a_drainer_lets_go_of_the_carried_udp_sessions(start_gportmap, echo_target, pki):
    """With a drainer (a TLS connection finishing in the old code), the UDP sessions
    are still the new program's: the drainer neither reads their replies nor logs
    them closed, and the client's next datagram goes out from the same port."""
    ca, server = pki
    target = UdpEchoTarget()
    tls_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    rules = {"rules": [tcp_rule(tls_port, echo_target.port, name="tls",
                                tls={"certFile": str(server.cert), "keyFile": str(server.key)}),
                       {"protocol": "udp", "listenHost": LOOPBACK, "listenPort": udp_port, "targetHost": LOOPBACK,
                        "targetPort": target.port, "name": "dns"}],
             "settings": settings(drainTimeout=30)}
    gp = start_gportmap(rules)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(10)
    context = ssl.create_default_context(cafile=str(ca.path))
    try:
        with context.wrap_socket(connect(tls_port), server_hostname="127.0.0.1") as tls:
            tls.sendall(b"before")
            assert recv_exactly(tls, 6) == b"before"
            for n in range(3):
                client.sendto(f"7 {n}".encode(), (LOOPBACK, udp_port))
                assert client.recv(100) == f"7 {n}".encode()
                if n == 0:
                    record = upgrade(gp, 1)
                    assert (record["carried"], record["draining"]) == (1, 1)
                    drainer = gp.wait_event("upgrade_draining", 10)[0]["drainer"]
            tls.sendall(b"after")
            assert recv_exactly(tls, 5) == b"after"
        gp.wait_event("upgrade_drained", 30, drainer=drainer)
        assert target.sources == {7: {next(iter(target.sources[7]))}}
        assert not [e for e in gp.events("session_closed") if e.get("drainer")]
        stats = rule(gp, "dns")
        assert stats["udp"]["sessions"] == 1 and stats["connections"]["total"] == 1
        assert stats["udp"]["packets_sent"] == 3
    finally:
        client.close()
        target.close()
