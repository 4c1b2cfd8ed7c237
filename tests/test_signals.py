"""SPEC §2: SIGTERM/SIGINT drain open connections, refuse new ones, exit 0;
a second signal stops at once."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from conftest import TargetServer, connect, free_port, recv_until_eof, tcp_rule, wait_for


def held_target(go: threading.Event, reply: bytes) -> TargetServer:
    """A target that answers each connection with ``reply`` once ``go`` is set."""

    def handler(conn: socket.socket) -> None:
        go.wait(60)
        conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)
        recv_until_eof(conn)

    return TargetServer(handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_drains_open_transfers_and_refuses_new_ones(start_gportmap, signum):
    go = threading.Event()
    reply = os.urandom(2 * 1024 * 1024)
    target = held_target(go, reply)
    port = free_port()
    gp = start_gportmap({"settings": {"drainTimeout": 20}, "rules": [tcp_rule(port, target.port, name="drain")]})
    try:
        sock = connect(port)
        wait_for(lambda: target.accepted == 1, what="the target connection")
        gp.signal(signum)
        gp.wait_event("stopping")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert gp.proc.poll() is None  # still draining
        go.set()
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == reply
        sock.close()
        assert gp.wait_exit(20) == 0
        (record,) = gp.events("connection_closed")
        assert record["reason"] == "closed" and record["bytes_sent"] == len(reply)
        assert gp.events("stopped")
    finally:
        go.set()
        target.close()


def test_drain_timeout_cuts_what_is_left_and_exits_zero(start_gportmap):
    go = threading.Event()
    target = held_target(go, b"never")
    port = free_port()
    gp = start_gportmap({"settings": {"drainTimeout": 1}, "rules": [tcp_rule(port, target.port, name="slow")]})
    try:
        sock = connect(port)
        wait_for(lambda: target.accepted == 1, what="the target connection")
        started = time.monotonic()
        gp.signal(signal.SIGTERM)
        assert gp.wait_exit(15) == 0
        elapsed = time.monotonic() - started
        assert elapsed >= 0.9, elapsed  # waited for the drain; wait_exit(15) bounds it from above
        assert recv_until_eof(sock) == b""  # cut, not answered
        (record,) = gp.events("connection_closed")
        assert record["reason"] == "stopped"
        (stopped,) = gp.events("rule_stopped")
        assert stopped["cut_connections"] == 1
        sock.close()
    finally:
        go.set()
        target.close()


def test_second_signal_stops_at_once(start_gportmap):
    go = threading.Event()
    target = held_target(go, b"never")
    port = free_port()
    gp = start_gportmap({"settings": {"drainTimeout": 120}, "rules": [tcp_rule(port, target.port)]})
    try:
        sock = connect(port)
        wait_for(lambda: target.accepted == 1, what="the target connection")
        gp.signal(signal.SIGTERM)
        gp.wait_event("stopping")
        gp.signal(signal.SIGTERM)
        assert gp.wait_exit(15) == 0  # far below drainTimeout (120 s): it did not wait for the drain
        sock.close()
    finally:
        go.set()
        target.close()
