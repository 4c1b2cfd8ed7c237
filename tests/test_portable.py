"""With the Linux-only features forced off (GPORTMAP_PORTABLE=1), gportmap still
forwards and stops cleanly: the fallbacks other platforms use are tested here."""

from __future__ import annotations

import os
import signal
import socket

from conftest import connect, free_port, recv_until_eof, tcp_rule


def test_portable_mode_forwards_and_stops(start_gportmap, echo_target) -> None:
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="portable")], env={"GPORTMAP_PORTABLE": "1"})
    (started,) = gp.events("started")
    assert started["features"] == []
    payload = os.urandom(1 << 20)
    sock = connect(port)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == payload
    sock.close()
    gp.wait_event("connection_closed", rule="portable")
    gp.signal(signal.SIGTERM)
    assert gp.wait_exit(15) == 0


def test_linux_features_are_reported_when_available(start_gportmap, echo_target) -> None:
    gp = start_gportmap([tcp_rule(free_port(), echo_target.port)])
    (started,) = gp.events("started")
    assert {"posix_signals", "fd_limit"} <= set(started["features"])
