"""Close reasons that tell the truth (issue 15): an unexpected exception in a
connection's code is a bug, not a clean close. It ends that connection only, with
the reason ``internal_error``, is logged once (ERROR, event ``internal_error``,
with rule, client and the traceback) and counted per rule (``/stats``
``connections.errors_by_reason.internal_error``, metric
``gportmap_connection_errors_total{reason="internal_error"}``).

The first test runs gportmap as a subprocess with a protocol of a plugin package
that has a bug. The relays are tested in-process, with a bug injected where no
configuration can reach: the lean hub relay, the greenlet relay, the WebSocket
bridge, the WebSocket handshake and the UDP paths, which all run different code.
"""

from __future__ import annotations

import _socket
import logging
import os
import re
import socket
import struct
import types
from pathlib import Path

import gevent
import gevent.socket
import pytest
from conftest import LOOPBACK, closed_by_peer, connect, free_port, recv_until_eof, tcp_rule
from gevent.server import DatagramServer, StreamServer

from gportmap.config import Rule
from gportmap.engine import hubrelay, wsframe
from gportmap.engine.relay import BufferPool, Relay
from gportmap.engine.wsbridge import WsBridge
from gportmap.log import RateLimiter
from gportmap.protocols import ServerContext
from gportmap.protocols import udp as udp_module
from gportmap.protocols.tcp import TcpServer
from gportmap.protocols.websocket import WebSocketServer
from gportmap.stats import Connection, RuleStats, StatsRegistry

TESTS = str(Path(__file__).resolve().parent)


# -- gportmap as a subprocess: a plugin package's protocol with a bug -------------------


def register_buggy_protocol(folder: Path) -> dict[str, str]:
    """An installed distribution, as importlib.metadata finds one on sys.path, whose
    entry point adds protocol ``buggy`` (tests/plugin_samples.py:BuggyTcp)."""
    info = folder / "gportmap_buggy-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gportmap-buggy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gportmap.protocols]\nbuggy = plugin_samples:BuggyTcp\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder), TESTS, os.environ.get("PYTHONPATH", "")])}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus exposition."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    raise AssertionError(f"no series {name}{labels}")


def test_a_bug_in_a_connection_is_an_internal_error_not_a_clean_close(start_gportmap, echo_target, tmp_path):
    port, plain = free_port(), free_port()
    gp = start_gportmap(
        [
            {"protocol": "buggy", "name": "bug", "listenHost": LOOPBACK, "listenPort": port,
             "targetHost": LOOPBACK, "targetPort": echo_target.port},
            tcp_rule(plain, echo_target.port, name="plain"),
        ],
        env=register_buggy_protocol(tmp_path / "site"),
    )
    text = gp.admin("/metrics")[1].decode()
    for rule, protocol in (("bug", "buggy"), ("plain", "tcp")):  # every rule's series, from its start
        assert metric(text, "gportmap_connection_errors_total", rule=rule, protocol=protocol, reason="internal_error") == 0

    survivor = connect(port)
    survivor.sendall(b"hello")
    assert survivor.recv(5) == b"hello"
    with connect(port) as crashing:
        crashing.sendall(b"crash please")
        assert closed_by_peer(crashing)  # the bug ended this connection (a reset: its bytes were unread)

    (error,) = gp.wait_event("internal_error")
    assert error["level"] == "ERROR" and error["rule"] == "bug" and error["protocol"] == "buggy"
    assert error["client"].startswith(f"{LOOPBACK}:") and error["target"] == f"{LOOPBACK}:{echo_target.port}"
    assert "Traceback" in error["exc_info"] and "plugin_samples.py" in error["exc_info"]
    assert "AttributeError" in error["exc_info"] and "crash please" not in error["exc_info"]
    (closed,) = gp.wait_event("connection_closed", rule="bug")
    assert closed["reason"] == "internal_error" and closed["client"] == error["client"]
    assert closed["error"].startswith("AttributeError: ")

    survivor.sendall(b" again")  # the other connection and the listener go on
    assert survivor.recv(6) == b" again"
    with connect(port) as later:
        later.sendall(b"fine")
        later.shutdown(socket.SHUT_WR)
        assert recv_until_eof(later) == b"fine"
    survivor.close()

    stats = {rule["name"]: rule for rule in gp.admin_json("/stats")["rules"]}
    assert stats["bug"]["connections"]["errors"] == 1
    assert stats["bug"]["connections"]["errors_by_reason"] == {"internal_error": 1}
    assert stats["plain"]["connections"]["errors"] == 0
    text = gp.admin("/metrics")[1].decode()
    assert metric(text, "gportmap_connection_errors_total", rule="bug", protocol="buggy", reason="internal_error") == 1
    assert len(gp.events("internal_error")) == 1  # once: not again from the hub


# -- in-process: bugs injected into the relays ------------------------------------------


def context() -> ServerContext:
    return ServerContext(StatsRegistry(), BufferPool(), RateLimiter())


def internal_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "internal_error"]


def closes(caplog, event: str = "connection_closed") -> list[str]:
    return [r.reason for r in caplog.records if getattr(r, "event", None) == event]


def gevent_wait(condition, timeout: float = 10.0) -> None:
    """Poll on the hub (the servers run in this thread) until ``condition()``."""
    with gevent.Timeout(timeout, AssertionError(f"timed out waiting for {condition}")):
        while not condition():
            gevent.sleep(0.01)


def g_recv_until_eof(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def echo(sock, _address) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


@pytest.fixture
def echo_server():
    server = StreamServer((LOOPBACK, 0), echo)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger="gportmap")
    return caplog


def test_a_bug_in_the_hub_relay_ends_only_its_connection(monkeypatch, echo_server, records):
    """The lean path runs in hub callbacks. An exception there used to reach the
    hub, which stopped the watcher: the connection hung, counted open, forever."""
    original, crashed = hubrelay._Direction._copy_in, []

    def copy_in(direction) -> None:
        if not crashed and direction.uploading:
            crashed.append(direction.relay.conn.client)
            raise AttributeError("'NoneType' object has no attribute 'send'")
        original(direction)

    monkeypatch.setattr(hubrelay._Direction, "_copy_in", copy_in)
    port = free_port()
    server = TcpServer(Rule("lean", "tcp", LOOPBACK, port, LOOPBACK, echo_server.server_port), context())
    server.start()
    assert server.in_hub
    try:
        with gevent.Timeout(10):
            first = gevent.socket.create_connection((LOOPBACK, port))
            first.sendall(b"boom")
            assert g_recv_until_eof(first) == b""  # ended, not hanging
            first.close()
            second = gevent.socket.create_connection((LOOPBACK, port))
            second.sendall(b"fine")
            second.shutdown(socket.SHUT_WR)
            assert g_recv_until_eof(second) == b"fine"
            second.close()
        gevent_wait(lambda: len(closes(records)) == 2)
        assert closes(records) == ["internal_error", "closed"]
        (error,) = internal_errors(records)
        assert error.levelno == logging.ERROR and error.rule == "lean" and error.client == crashed[0]
        assert error.exc_info is not None and error.exc_info[0] is AttributeError
        assert server.stats.errors == {"internal_error": 1} and server.stats.active == 0
    finally:
        server.close()


def relay_pair(transform) -> tuple[Relay, socket.socket, socket.socket, RuleStats]:
    """A greenlet Relay between two socketpairs: (relay, client's end, target's end, stats)."""
    client_end, client = gevent.socket.socketpair()
    target, target_end = gevent.socket.socketpair()
    stats = RuleStats("relay", "tcp")
    conn = Connection(1, stats, "127.0.0.1:5555", "127.0.0.1:7")
    return Relay(client, target, conn, 0, BufferPool(), transform), client_end, target_end, stats


def test_a_bug_in_the_greenlet_relay_ends_the_connection_from_either_direction(records):
    """Downstream, the direction in a spawned greenlet: the exception used to kill
    that greenlet alone while the other direction waited, with no idle timeout, for
    ever; upstream, it escaped ``run()`` and the caller logged a clean close."""
    for failing in ("downstream", "upstream"):

        def transform(direction: str, data: bytes, failing=failing) -> bytes:
            if direction == failing:
                raise KeyError("state")
            return data

        relay, client_end, target_end, stats = relay_pair(transform)
        with gevent.Timeout(10):
            runner = gevent.spawn(relay.run)
            (target_end if failing == "downstream" else client_end).sendall(b"data")
            assert runner.get() == "internal_error"
        assert relay.error == "KeyError: 'state'" and stats.errors["internal_error"] == 1
        assert client_end.recv(10) == b"" and target_end.recv(10) == b""  # both sides told
        for sock in (relay.client, relay.target, client_end, target_end):
            sock.close()
    assert [r.exc_info[0] for r in internal_errors(records)] == [KeyError, KeyError]


def test_a_bug_in_the_websocket_bridge_closes_with_1011_and_no_details(records):
    ws_end, ws = gevent.socket.socketpair()
    tcp, tcp_end = gevent.socket.socketpair()
    stats = RuleStats("bridge", "websocket")
    conn = Connection(1, stats, "127.0.0.1:5555", "127.0.0.1:7")

    def transform(direction: str, data: bytes) -> bytes:
        raise ZeroDivisionError("secret detail")

    bridge = WsBridge(ws, b"", tcp, conn, 0, BufferPool(), 1 << 20, False, transform)
    with gevent.Timeout(10):
        runner = gevent.spawn(bridge.run)
        tcp_end.sendall(b"to the browser")
        assert runner.get() == "internal_error"
        frame = g_recv_until_eof(ws_end)
    assert frame[0] == 0x80 | wsframe.OP_CLOSE
    assert frame[2:4] == wsframe.CLOSE_INTERNAL_ERROR.to_bytes(2, "big") and frame[4:] == b"internal error"
    assert bridge.error == "ZeroDivisionError: secret detail" and stats.errors["internal_error"] == 1
    (error,) = internal_errors(records)
    assert error.rule == "bridge" and error.exc_info[0] is ZeroDivisionError
    for sock in (ws, tcp, ws_end, tcp_end):
        sock.close()


def test_a_bug_during_a_websocket_handshake_is_an_internal_error(monkeypatch, echo_server, records):
    """pywsgi passed the exception to the hub (logged without rule or client) and
    the connection was then logged as a clean close."""
    port = free_port()
    server = WebSocketServer(Rule("ws", "websocket", LOOPBACK, port, LOOPBACK, echo_server.server_port), context())

    def connect_target(client=None, pool=None):
        raise AttributeError("'NoneType' object has no attribute 'family'")

    monkeypatch.setattr(server, "connect_target", connect_target)
    server.start()
    request = (
        f"GET / HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    try:
        with gevent.Timeout(10):
            client = gevent.socket.create_connection((LOOPBACK, port))
            client.sendall(request)
            answer = g_recv_until_eof(client)
            client.close()
        assert answer.startswith(b"HTTP/1.1 500 ")
        gevent_wait(lambda: closes(records))
        assert closes(records) == ["internal_error"]
        (error,) = internal_errors(records)
        assert error.rule == "ws" and error.protocol == "websocket" and error.exc_info[0] is AttributeError
        assert server.stats.errors["internal_error"] == 1 and server.stats.active == 0
    finally:
        server.close()


class FailingOnce:
    """A session socket whose first read raises RuntimeError (when ``armed``): a bug
    in the reply path."""

    def __init__(self, real, armed: bool) -> None:
        self.real, self.armed = real, armed

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def recv(self, size: int):
        if self.armed:
            self.armed = False
            raise RuntimeError("unexpected state")
        return self.real.recv(size)


def test_bugs_on_the_udp_paths_end_one_session_and_keep_the_listener(monkeypatch, records):
    """UDP runs in hub callbacks too: an exception in the listener's callback used to
    reach the hub, which stopped watching the listening socket, so the rule never
    forwarded another datagram."""
    target = DatagramServer((LOOPBACK, 0), lambda data, address: target.sendto(data, address))
    target.start()
    made: list[FailingOnce] = []

    def session_socket(*args) -> FailingOnce:
        made.append(FailingOnce(_socket.socket(*args), armed=not made))  # the first session's only
        return made[-1]

    monkeypatch.setattr(udp_module, "_socket", types.SimpleNamespace(socket=session_socket, getaddrinfo=_socket.getaddrinfo))
    original_open, opened = udp_module.UdpServer._open, []

    def open_session(server, address, now):
        opened.append(address)
        if len(opened) == 1:
            raise AttributeError("'NoneType' object has no attribute 'view'")  # the listener's path
        return original_open(server, address, now)

    monkeypatch.setattr(udp_module.UdpServer, "_open", open_session)
    port = free_port(socket.SOCK_DGRAM)
    server = udp_module.UdpServer(Rule("dns", "udp", LOOPBACK, port, LOOPBACK, target.server_port), context())
    server.start()
    client = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with gevent.Timeout(10):
            client.sendto(b"lost in the listener's bug", (LOOPBACK, port))
            gevent_wait(lambda: len(internal_errors(records)) == 1)
            client.sendto(b"lost in the reply path's bug", (LOOPBACK, port))
            gevent_wait(lambda: closes(records, "session_closed") == ["internal_error"])
            client.sendto(b"third", (LOOPBACK, port))
            assert client.recvfrom(100)[0] == b"third"
        assert [r.exc_info[0] for r in internal_errors(records)] == [AttributeError, RuntimeError]
        assert all(r.rule == "dns" and r.protocol == "udp" for r in internal_errors(records))
        assert server.stats.errors["internal_error"] == 2 and len(server.sessions) == 1
    finally:
        client.close()
        server.close()
        target.stop()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real loopback TCP connection (gevent sockets)."""
    with gevent.socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        one = gevent.socket.create_connection(listener.getsockname())
        other, _ = listener.accept()
    return one, other


def test_a_reset_from_the_peer_stays_a_client_error(records):
    """Expected network errors keep their reasons: a client's RST is
    ``client_error``, not counted as a bug."""
    client_end, client = tcp_pair()
    target, target_end = tcp_pair()
    stats = RuleStats("relay", "tcp")
    relay = Relay(client, target, Connection(1, stats, "127.0.0.1:5555", "127.0.0.1:7"), 0, BufferPool())
    with gevent.Timeout(10):
        runner = gevent.spawn(relay.run)
        gevent.sleep(0)  # let the relay start waiting
        client_end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client_end.close()  # an RST
        assert runner.get() == "client_error"
    assert stats.errors["internal_error"] == 0 and internal_errors(records) == []
    for sock in (client, target, target_end):
        sock.close()
