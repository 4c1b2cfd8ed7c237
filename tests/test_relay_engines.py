"""Both plain TCP relays as users run them: the C engine (``gportmap.engine._pump``,
the default of a gportmap started by the CLI) and the Python relay
(``gportmap.engine.hubrelay``, ``GPORTMAP_PUMP=off`` or the engine not built).

Every test here runs once per engine (ids ``pump`` and ``python``) and asserts the
same user-visible behaviour for each: exact bytes both ways, half-closes, the
counters of ``/stats``, ``/metrics`` and the ``connection_closed`` records,
backpressure on a reader that stalls, the idle timeout, the close reasons, the
drain of a reload and of a stop, an upgrade in place. Each also checks that the
engine asked for is the one running: the ``started`` record lists ``pump`` in its
``features`` exactly when the C engine relays. A difference between the engines is
a bug in one of them.

The default tier shares one gportmap per engine (``served``: a rule per test, so
the tests read only their own rule's records and figures); the tests that stop,
reload or upgrade their process start their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import (
    ROOT,
    Gportmap,
    TargetServer,
    closed_by_peer,
    connect,
    echo_handler,
    free_port,
    metric,
    recv_exactly,
    recv_until_eof,
    rule_stats,
    tcp_rule,
    wait_for,
)

KB = 1024
MB = 1024 * KB

#: The engines, as the ``engine`` parameter and the test ids name them.
ENGINES = ("pump", "python")
#: The C engine is built in place by ``pip install -e .`` (optional: no compiler, no engine).
PUMP_BUILT = any((ROOT / "gportmap" / "engine").glob("_pump*.so"))


def engine_env(engine: str, **extra: str) -> dict[str, str]:
    """The environment that asks for ``engine`` (explicitly either way, whatever the
    test run's own environment says)."""
    return {"GPORTMAP_PUMP": "auto" if engine == "pump" else "off", **extra}


def need(engine: str) -> None:
    if engine == "pump" and not PUMP_BUILT:
        pytest.skip("the C engine is not built (pip install -e . builds it where a compiler is)")


def assert_engine(gp: Gportmap, engine: str, count: int = 1) -> None:
    """The ``count``-th ``started`` record says the engine asked for is on."""
    features = gp.wait_event("started", count=count)[count - 1]["features"]
    assert ("pump" in features) == (engine == "pump"), (engine, features)


def start_on(start_gportmap: Callable[..., Gportmap], engine: str, rules: object, **env: str) -> Gportmap:
    need(engine)
    gp = start_gportmap(rules, env=engine_env(engine, **env))
    assert_engine(gp, engine)
    return gp


def warm_up(gp: Gportmap, port: int) -> None:
    """One echo through ``port`` (rule ``warm``, of its own), to its end: the C
    engine makes its epoll set (a descriptor it keeps) on the first connection, so
    a descriptor count taken after this one sees only what connections hold."""
    with connect(port) as sock:
        sock.sendall(b"warm")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"warm"
    gp.wait_event("connection_closed", rule="warm")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_records(gp: Gportmap, rule: str, count: int = 1) -> list[dict]:
    return gp.wait_event("connection_closed", count=count, rule=rule)


# -- targets shared by the module ------------------------------------------------------

#: What the half-close targets send: the reply after the client's end, and the
#: greeting sent before the target's own end.
REPLY = random.Random(1).randbytes(1 * MB)
GREETING = random.Random(2).randbytes(512 * KB)


@dataclass
class Targets:
    """The module's target servers, one per behaviour; ``results`` and ``held`` carry
    what a handler saw or holds to the test (tests run one at a time)."""

    echo: TargetServer
    reply_after_eof: TargetServer
    greet_first: TargetServer
    reset: TargetServer
    holder: TargetServer
    results: queue.Queue
    held: queue.Queue

    def close(self) -> None:
        for server in (self.echo, self.reply_after_eof, self.greet_first, self.reset, self.holder):
            server.close()


@pytest.fixture(scope="module")
def targets() -> Iterator[Targets]:
    results: queue.Queue = queue.Queue()
    held: queue.Queue = queue.Queue()

    def reply_after_eof(conn: socket.socket) -> None:
        """Reads the whole request (its end forwarded by gportmap), then answers."""
        request = recv_until_eof(conn)
        conn.sendall(hashlib.sha256(request).digest() + REPLY)
        conn.shutdown(socket.SHUT_WR)

    def greet_first(conn: socket.socket) -> None:
        """Sends its greeting and its end at once, then reads the client to its end."""
        conn.sendall(GREETING)
        conn.shutdown(socket.SHUT_WR)
        results.put(sha(recv_until_eof(conn)))

    def reset(conn: socket.socket) -> None:
        """Reads the first bytes, then resets the connection (RST: SO_LINGER 0)."""
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def hold(conn: socket.socket) -> None:
        """Reads nothing: hands the connection to the test until it says it is done."""
        done = threading.Event()
        held.put((conn, done))
        done.wait(60)

    found = Targets(
        TargetServer(echo_handler), TargetServer(reply_after_eof), TargetServer(greet_first),
        TargetServer(reset), TargetServer(hold), results, held,
    )  # fmt: skip
    yield found
    found.close()


@dataclass
class Served:
    """One gportmap on one engine, with a rule per test of the shared tier."""

    gp: Gportmap
    engine: str
    ports: dict[str, int]


#: The shared process's idle rule's ``idleTimeout`` (seconds).
IDLE_TIMEOUT = 1.0


@pytest.fixture(scope="module", params=ENGINES)
def served(request: pytest.FixtureRequest, start_shared_gportmap, targets: Targets) -> Served:
    engine = request.param
    need(engine)
    names = ("warm", "echo", "chatty", "churn", "half_client", "half_target", "idle", "stall_idle", "reset", "client_reset", "refused",
             "stall_target", "stall_client")  # fmt: skip
    ports = {name: free_port() for name in names}
    nothing = free_port()  # handed out once, below the ephemeral range: nothing listens there
    rules = [
        tcp_rule(ports["warm"], targets.echo.port, name="warm"),
        tcp_rule(ports["echo"], targets.echo.port, name="echo"),
        tcp_rule(ports["chatty"], targets.echo.port, name="chatty"),
        tcp_rule(ports["churn"], targets.echo.port, name="churn"),
        tcp_rule(ports["half_client"], targets.reply_after_eof.port, name="half_client"),
        tcp_rule(ports["half_target"], targets.greet_first.port, name="half_target"),
        tcp_rule(ports["idle"], targets.echo.port, name="idle", idleTimeout=IDLE_TIMEOUT),
        tcp_rule(ports["stall_idle"], targets.holder.port, name="stall_idle", idleTimeout=IDLE_TIMEOUT),
        tcp_rule(ports["reset"], targets.reset.port, name="reset"),
        tcp_rule(ports["client_reset"], targets.echo.port, name="client_reset"),
        tcp_rule(ports["refused"], nothing, name="refused"),
        tcp_rule(ports["stall_target"], targets.holder.port, name="stall_target"),
        tcp_rule(ports["stall_client"], targets.holder.port, name="stall_client"),
    ]
    gp = start_shared_gportmap({"settings": {"watch": False}, "rules": rules}, env=engine_env(engine))
    assert_engine(gp, engine)
    warm_up(gp, ports["warm"])
    return Served(gp, engine, ports)


# -- 1. bytes both ways, counted ---------------------------------------------------------

CONNECTIONS = 50
PAYLOAD = 200 * KB


def echo_through(port: int, payload: bytes) -> str:
    """Sends ``payload`` (then the end) while reading the echo to its end: its checksum."""
    with connect(port, timeout=30) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_until_eof(sock)
        sender.join(30)
    return sha(echoed)


def test_concurrent_echoes_are_exact_and_counted(served: Served):
    gp, port = served.gp, served.ports["echo"]
    fds = gp.open_fds()
    payloads = [os.urandom(PAYLOAD) for _ in range(CONNECTIONS)]
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        echoed = list(pool.map(lambda payload: echo_through(port, payload), payloads))
    assert echoed == [sha(payload) for payload in payloads]
    for record in closed_records(gp, "echo", CONNECTIONS):
        assert (record["reason"], record["bytes_received"], record["bytes_sent"]) == ("closed", PAYLOAD, PAYLOAD)
    total = CONNECTIONS * PAYLOAD
    stats = rule_stats(gp, "echo")
    assert stats["bytes"] == {"received": total, "sent": total}
    assert stats["connections"]["total"] == CONNECTIONS and stats["connections"]["active"] == 0
    assert metric(gp, "gportmap_received_bytes_total", rule="echo") == total
    assert metric(gp, "gportmap_sent_bytes_total", rule="echo") == total
    # (at most: a descriptor something else held for an instant may be in the first count)
    wait_for(lambda: gp.open_fds() <= fds, what=f"gportmap's descriptors back to {fds}")


def test_ping_pong_of_single_bytes_and_an_empty_connection(served: Served):
    """The smallest traffic: one byte at a time, each waiting for its echo; and a
    connection that ends before sending anything."""
    gp, port = served.gp, served.ports["chatty"]
    rounds = 300
    with connect(port) as sock:
        for i in range(rounds):
            byte = bytes([i % 256])
            sock.sendall(byte)
            assert sock.recv(1) == byte
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    with connect(port) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    records = closed_records(gp, "chatty", 2)
    assert [(r["reason"], r["bytes_received"], r["bytes_sent"]) for r in records] == [
        ("closed", rounds, rounds), ("closed", 0, 0)
    ]  # fmt: skip


def test_short_connections_one_after_another_reuse_descriptors_cleanly(served: Served):
    """Connections one after another get the same descriptor numbers in gportmap
    again and again (the C engine tells a number's connections apart by a
    generation); every third one ends with a reset instead of an end."""
    gp, port = served.gp, served.ports["churn"]
    count = 150
    for i in range(count):
        sock = connect(port)
        payload = b"%d" % i * 10
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        if i % 3 == 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        sock.close()
    records = closed_records(gp, "churn", count)
    expected = [("client_error" if i % 3 == 2 else "closed", len(b"%d" % i * 10)) for i in range(count)]
    assert sorted((r["reason"], r["bytes_received"]) for r in records) == sorted(expected)
    assert all(r["bytes_sent"] == r["bytes_received"] for r in records)


# -- 2. half-close, either side first ------------------------------------------------------


def test_client_ends_first_and_the_reply_still_flows(served: Served):
    gp = served.gp
    request = os.urandom(300 * KB)
    with connect(served.ports["half_client"], timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # forwarded: the target answers only after it
        answer = recv_until_eof(sock)
    assert answer == hashlib.sha256(request).digest() + REPLY
    (record,) = closed_records(gp, "half_client")
    assert record["reason"] == "closed"
    assert (record["bytes_received"], record["bytes_sent"]) == (len(request), len(answer))


def test_target_ends_first_and_the_client_still_sends(served: Served, targets: Targets):
    gp = served.gp
    upload = os.urandom(1 * MB)
    with connect(served.ports["half_target"], timeout=30) as sock:
        assert recv_until_eof(sock) == GREETING  # the target's end arrived, the connection lives on
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        assert targets.results.get(timeout=30) == sha(upload)
        assert recv_until_eof(sock) == b""
    (record,) = closed_records(gp, "half_target")
    assert record["reason"] == "closed"
    assert (record["bytes_received"], record["bytes_sent"]) == (len(upload), len(GREETING))


# -- 4. a reader that stalls -------------------------------------------------------------

#: The most a stalled test pushes: far above what the kernel's socket buffers and
#: the relay's one tail (and splice pipe) per direction hold, so a relay that buffered
#: without bound would take it all.
PUSH_LIMIT = 160 * MB
#: gportmap's RSS may grow this much while the reader stalls (generous: the relay
#: holds at most a 64 KiB tail per direction; what waits is in the kernel).
RSS_GROWTH = 48 * MB
#: The pushed bytes: a block of prime length sent cyclically, so that a byte lost,
#: repeated or reordered cannot line up with it again.
PATTERN_LENGTH = 1_000_003
CHUNK = 256 * KB
_BLOCK = random.Random(3).randbytes(PATTERN_LENGTH)
PATTERN = _BLOCK + _BLOCK[:CHUNK]  # a chunk's worth more, to slice across the wrap


def push_until_stalled(sock: socket.socket, limit: int, stall: float = 0.5) -> int:
    """Sends the pattern until ``limit``, until no byte goes for ``stall`` seconds,
    or until the connection is cut (an idle timeout); returns how many bytes went."""
    sock.settimeout(stall)
    pushed = 0
    try:
        while pushed < limit:
            offset = pushed % PATTERN_LENGTH
            pushed += sock.send(PATTERN[offset : offset + min(CHUNK, limit - pushed)])
    except (TimeoutError, ConnectionError):
        pass
    return pushed


def read_pattern(sock: socket.socket) -> tuple[int, bool]:
    """Reads to the end: (bytes read, every one of them matched the pattern)."""
    got, exact = 0, True
    while chunk := sock.recv(CHUNK):
        offset = got % PATTERN_LENGTH
        exact = exact and chunk == PATTERN[offset : offset + len(chunk)]
        got += len(chunk)
    return got, exact


@pytest.mark.parametrize("stalled", ["target", "client"])
def test_a_stalled_reader_holds_the_sender_back_and_then_gets_every_byte(served: Served, targets: Targets, stalled):
    """``target``: the client pushes, the target reads nothing; ``client``: the
    other way round. Then the reader drains."""
    gp, name = served.gp, f"stall_{stalled}"
    process = psutil.Process(gp.pid)
    before = process.memory_info().rss
    with connect(served.ports[name], timeout=30) as client:
        target, done = targets.held.get(timeout=10)
        sender, reader = (client, target) if stalled == "target" else (target, client)
        try:
            pushed = push_until_stalled(sender, PUSH_LIMIT)
            assert 0 < pushed < PUSH_LIMIT  # held back: the relay did not take everything
            grown = process.memory_info().rss - before
            moved = rule_stats(gp, name)["bytes"]
            print(f"{served.engine}, {stalled} stalled: {pushed / MB:.1f} MB pushed before the stall, "
                  f"gportmap read {max(moved.values()) / MB:.1f} MB of them, its RSS grew {grown / MB:.1f} MB")  # fmt: skip
            assert grown < RSS_GROWTH, grown
            sender.shutdown(socket.SHUT_WR)
            reader.settimeout(30)
            assert read_pattern(reader) == (pushed, True)  # the reader drains: every byte, in order
            reader.shutdown(socket.SHUT_WR)
        finally:
            done.set()
        assert recv_until_eof(client) == b""
    (record,) = closed_records(gp, name)
    expected = (pushed, 0) if stalled == "target" else (0, pushed)
    assert (record["reason"], record["bytes_received"], record["bytes_sent"]) == ("closed", *expected)


# -- 5. the idle timeout ------------------------------------------------------------------


def test_an_idle_connection_is_cut_and_a_busy_one_lives(served: Served):
    gp, port = served.gp, served.ports["idle"]
    with connect(port) as quiet, connect(port) as busy:
        quiet.sendall(b"hi")
        assert recv_exactly(quiet, 2) == b"hi"
        talks = 0
        for _ in range(int(20 / 0.25)):  # the busy one talks every quarter second until the quiet one is cut
            busy.sendall(b"still here")
            assert recv_exactly(busy, 10) == b"still here"
            talks += 1
            if closed_by_peer(quiet, 0.25):
                break
        else:
            pytest.fail("the idle connection was never cut")
        (record,) = closed_records(gp, "idle")
        assert (record["reason"], record["bytes_received"], record["bytes_sent"]) == ("idle_timeout", 2, 2)
        assert record["duration"] >= IDLE_TIMEOUT
        # The open connection's figures are live (the C engine writes them once per
        # round of ready sockets): the echoes so far, both ways.
        (live,) = [c for c in gp.admin_json("/connections") if c["rule"] == "idle"]
        assert live["bytes"] == {"received": 10 * talks, "sent": 10 * talks}
        busy.sendall(b"and now")  # past the timeout, and alive
        assert recv_exactly(busy, 7) == b"and now"
        busy.shutdown(socket.SHUT_WR)
        assert recv_until_eof(busy) == b""
    closed = closed_records(gp, "idle", 2)
    assert closed[1]["reason"] == "closed" and closed[1]["bytes_received"] == 10 * talks + 7
    assert closed[1]["duration"] >= IDLE_TIMEOUT  # it lived past the timeout: its traffic kept it


def test_a_connection_stalled_both_ways_is_idle(served: Served, targets: Targets):
    """Bytes wait on both sides of the relay but none can move (the target reads
    nothing, the client pushes nothing more): nothing could go on, so the idle
    clock cuts it (what waits on a paused direction is a stalled peer's, not
    activity: ``HubRelay._could_go_on``)."""
    gp = served.gp
    with connect(served.ports["stall_idle"], timeout=30) as client:
        target, done = targets.held.get(timeout=10)
        try:
            pushed = push_until_stalled(client, PUSH_LIMIT)
            assert 0 < pushed < PUSH_LIMIT
            assert closed_by_peer(client, 20)
        finally:
            done.set()
    (record,) = closed_records(gp, "stall_idle")
    assert record["reason"] == "idle_timeout" and 0 < record["bytes_received"] <= pushed


# -- 6. errors -------------------------------------------------------------------------------


def test_a_target_reset_ends_with_target_error(served: Served):
    gp = served.gp
    with connect(served.ports["reset"]) as sock:
        sock.sendall(b"hello")
        assert closed_by_peer(sock, 10)
    (record,) = closed_records(gp, "reset")
    assert (record["reason"], record["bytes_received"], record["bytes_sent"]) == ("target_error", 5, 0)


def test_a_client_reset_ends_with_client_error(served: Served):
    gp = served.gp
    sock = connect(served.ports["client_reset"])
    sock.sendall(b"hi")
    assert recv_exactly(sock, 2) == b"hi"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, not an end
    (record,) = closed_records(gp, "client_reset")
    assert (record["reason"], record["bytes_received"], record["bytes_sent"]) == ("client_error", 2, 2)


def test_a_refused_connect_ends_with_connect_failed(served: Served):
    gp = served.gp
    with connect(served.ports["refused"]) as sock:
        assert closed_by_peer(sock, 10)
    (record,) = closed_records(gp, "refused")
    assert record["reason"] == "connect_failed"


# -- 3. a long transfer, zero-copy and copying -----------------------------------------------

BULK = 50 * MB


class PatternStream:
    """A client connection to an echo target: a thread sends the pattern (``total``
    bytes at full speed, or, when ``total`` is None, a chunk every ``pace`` seconds
    until ``stop``), then its end; another reads the echo to its end and checks
    every byte."""

    def __init__(self, port: int, total: int | None = None, chunk: int = CHUNK, pace: float = 0.002) -> None:
        self.sock = connect(port, timeout=60)
        self.total, self.chunk, self.pace = total, chunk, pace
        self.stop = threading.Event()
        self.sent = 0
        self.echoed: tuple[int, bool] | None = None
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._send, daemon=True), threading.Thread(target=self._read, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        try:
            while self.total is None or self.sent < self.total:
                if self.total is None and self.stop.wait(self.pace):  # (a stream with a total runs to it)
                    break
                size = self.chunk if self.total is None else min(self.chunk, self.total - self.sent)
                offset = self.sent % PATTERN_LENGTH
                self.sock.sendall(PATTERN[offset : offset + size])
                self.sent += size
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(f"send failed after {self.sent} bytes: {exc!r}")

    def _read(self) -> None:
        try:
            self.echoed = read_pattern(self.sock)
        except OSError as exc:
            self.errors.append(f"receive failed: {exc!r}")

    def finish(self, timeout: float = 60) -> tuple[int, bool]:
        """Stops sending (a stream without a total), waits for the echo's end:
        (bytes echoed, all exact)."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout)
        self.sock.close()
        assert not self.errors, self.errors
        assert self.echoed is not None, "the echo did not end"
        return self.echoed


# (Under a second each on 2 shared cores, start included: the default tier.)
@pytest.mark.parametrize("relay", ["splice", "copy"])  # GPORTMAP_RELAY: zero-copy from the first byte, or never
@pytest.mark.parametrize("engine", ENGINES)
def test_50mb_each_way_are_exact(start_gportmap, echo_target, engine, relay):
    port = free_port()
    warm = free_port()
    rules = [tcp_rule(port, echo_target.port, name="bulk"), tcp_rule(warm, echo_target.port, name="warm")]
    gp = start_on(start_gportmap, engine, rules, GPORTMAP_RELAY=relay)
    assert ("splice" in gp.events("started")[0]["features"]) == (relay == "splice")
    warm_up(gp, warm)
    fds = gp.open_fds()
    stream = PatternStream(port, BULK)
    assert stream.finish() == (BULK, True)
    (record,) = closed_records(gp, "bulk")
    assert (record["reason"], record["bytes_received"], record["bytes_sent"]) == ("closed", BULK, BULK)
    assert rule_stats(gp, "bulk")["bytes"] == {"received": BULK, "sent": BULK}
    wait_for(lambda: gp.open_fds() <= fds, what=f"gportmap's descriptors (sockets, pipes) back to {fds}")


# -- 7. reload and stop: open connections drain ------------------------------------------------


def tagged_echo(tag: bytes) -> TargetServer:
    """An echo target whose every reply starts with ``tag``: tells which target answered."""

    def handler(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(tag + data)
        conn.shutdown(socket.SHUT_WR)

    return TargetServer(handler)


def ask(sock: socket.socket, question: bytes) -> bytes:
    sock.sendall(question)
    return recv_exactly(sock, len(question) + 1)


@pytest.mark.slow  # drainTimeout (3 s) runs out
@pytest.mark.parametrize("engine", ENGINES)
def test_a_changed_target_drains_the_open_connections_and_a_stop_cuts_them(start_gportmap, engine):
    drain = 3.0
    old, new = tagged_echo(b"A"), tagged_echo(b"B")
    port = free_port()
    settings = {"watch": False, "drainTimeout": drain}
    try:
        gp = start_on(start_gportmap, engine, {"settings": settings, "rules": [tcp_rule(port, old.port, name="web")]})
        before = [connect(port) for _ in range(3)]
        for i, sock in enumerate(before):
            assert ask(sock, b"before %d" % i) == b"Abefore %d" % i
        gp.rules_path.write_text(json.dumps({"settings": settings, "rules": [tcp_rule(port, new.port, name="web")]}))
        gp.signal(signal.SIGHUP)
        (reloaded,) = gp.wait_event("config_reloaded")
        assert reloaded["changed"] == ["web"]
        after = connect(port)
        assert ask(after, b"new") == b"Bnew"
        for i, sock in enumerate(before):  # the open ones go on, to the target they had
            assert ask(sock, b"after %d" % i) == b"Aafter %d" % i
        gp.signal(signal.SIGTERM)
        gp.wait_event("stopping")
        assert ask(after, b"draining") == b"Bdraining"  # a stop drains too
        for sock in (*before, after):  # until drainTimeout cuts what is left
            assert closed_by_peer(sock, drain + 10)
            sock.close()
        assert gp.wait_exit(30) == 0
        closed = gp.events("connection_closed")
        assert [record["reason"] for record in closed] == ["stopped"] * 4, closed
        received = sorted(record["bytes_received"] for record in closed)
        assert received == [len(b"newdraining")] + [len(b"before 0after 0")] * 3
    finally:
        old.close()
        new.close()


# -- 8. an upgrade in place from one engine to the other and back ------------------------------

#: Imported by every Python the upgrade test starts (its shim is first on
#: PYTHONPATH): sets GPORTMAP_PUMP from a file the test rewrites, so that the program
#: an upgrade starts (which inherits the environment) runs the engine the test asks for.
SITECUSTOMIZE = """\
import os
_path = os.environ.get("GPORTMAP_TEST_PUMP_FILE")
if _path:
    with open(_path) as _file:
        os.environ["GPORTMAP_PUMP"] = _file.read().strip()
"""


def upgrade(gp: Gportmap, count: int) -> dict:
    """SIGUSR2, and the ``upgraded`` record of this (the ``count``-th) upgrade."""
    gp.signal(signal.SIGUSR2)
    record = gp.wait_event("upgraded", 60, count=count)[count - 1]
    gp.wait_event("admin_started", 60, count=count + 1)
    return record


#: What the stalled connection of the upgrade test carries: far more than the
#: kernel's socket buffers hold, so that the relay holds some (a tail, a pipe).
FLOOD = 64 * MB


def stalled(gp: Gportmap, rule: str) -> Callable[[], bool]:
    """A condition: the rule's sent figure has stopped moving (the relay moved what
    the buffers take and waits on the client)."""
    seen: list[int] = []

    def check() -> bool:
        seen.append(rule_stats(gp, rule)["bytes"]["sent"])
        return len(seen) > 5 and seen[-1] == seen[-5] > 0

    return check


@pytest.mark.slow  # two upgrades in place: four Python start-ups
@pytest.mark.parametrize("relay", ["auto", "copy"])  # the slow client's bytes wait in a splice pipe, or a tail
@pytest.mark.parametrize("engine", ENGINES)
def test_an_upgrade_carries_connections_to_the_other_engine_and_back(
    start_gportmap, echo_target, tmp_path: Path, engine, relay
):
    """From ``engine`` to the other one and back, three connections are carried
    both times: one streaming both ways, one whose client reads nothing (the relay
    holds bytes it could not write: a tail, or a splice pipe's, handed from one
    engine to the other), one half-closed by its client (its end stays read). Every
    byte arrives once, in order; each connection is counted once."""
    need("pump")
    other = ENGINES[1 - ENGINES.index(engine)]
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    wanted = tmp_path / "engine"
    wanted.write_text(engine_env(engine)["GPORTMAP_PUMP"])
    late = threading.Event()

    def flood(conn: socket.socket) -> None:
        sent = 0
        while sent < FLOOD:
            offset = sent % PATTERN_LENGTH
            conn.sendall(PATTERN[offset : offset + CHUNK])
            sent += CHUNK
        conn.shutdown(socket.SHUT_WR)
        recv_until_eof(conn)

    def answer_late(conn: socket.socket) -> None:
        question = recv_until_eof(conn)
        late.wait(60)
        conn.sendall(b"after the upgrades: " + question)
        conn.shutdown(socket.SHUT_WR)

    flooder, answerer = TargetServer(flood), TargetServer(answer_late)
    ports = {name: free_port() for name in ("stream", "flood", "half")}
    rules = [
        tcp_rule(ports["stream"], echo_target.port, name="stream"),
        tcp_rule(ports["flood"], flooder.port, name="flood"),
        tcp_rule(ports["half"], answerer.port, name="half"),
    ]
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH", "")])),
        "GPORTMAP_TEST_PUMP_FILE": str(wanted),
        "GPORTMAP_RELAY": relay,
    }
    gp = start_on(start_gportmap, engine, {"settings": {"watch": False}, "rules": rules}, **env)
    stream = PatternStream(ports["stream"], chunk=16 * KB, pace=0.002)
    slow, half = connect(ports["flood"], timeout=30), connect(ports["half"], timeout=30)
    try:
        half.sendall(b"question")
        half.shutdown(socket.SHUT_WR)

        def moved_past(figure: int) -> bool:
            return rule_stats(gp, "stream")["bytes"]["sent"] > figure

        wait_for(lambda: moved_past(1 * MB), 30, what="the stream flowing")
        wait_for(stalled(gp, "flood"), 30, interval=0.1, what="the relay waiting on the slow client")
        wait_for(lambda: rule_stats(gp, "half")["bytes"]["received"] == 8, what="the question relayed")
        for count, now in enumerate((other, engine), start=1):
            wanted.write_text(engine_env(now)["GPORTMAP_PUMP"])
            record = upgrade(gp, count)
            assert (record["carried"], record["lost"]) == (3, 0)
            assert record["tail_bytes"] > 0  # the slow client's bytes, held by the relay
            assert_engine(gp, now, count + 1)
            figure = rule_stats(gp, "stream")["bytes"]["sent"]
            wait_for(lambda figure=figure: moved_past(figure + 1 * MB), 30, what=f"the stream flowing on {now}")
        late.set()
        assert recv_until_eof(half) == b"after the upgrades: question"
        assert read_pattern(slow) == (FLOOD, True)
        slow.shutdown(socket.SHUT_WR)
        echoed = stream.finish()
    finally:
        late.set()
        stream.stop.set()
        for sock in (slow, half):
            sock.close()
        flooder.close()
        answerer.close()
    assert echoed == (stream.sent, True)
    expected = {"stream": (stream.sent, stream.sent), "flood": (0, FLOOD), "half": (8, 28)}
    for name, (received, sent) in expected.items():
        (record,) = closed_records(gp, name)
        assert (record["reason"], record["bytes_received"], record["bytes_sent"]) == ("closed", received, sent), name
        stats = rule_stats(gp, name)
        assert stats["bytes"] == {"received": received, "sent": sent} and stats["connections"]["total"] == 1, name
