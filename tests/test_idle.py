"""The idle clock's readiness check (engine/idle.py): bytes or an end waiting in
the kernel mean the connection was not idle, whatever the clock says."""

from __future__ import annotations

import socket

import greenlet

from gportmap.engine.idle import waiting


def test_nothing_waiting_is_idle_and_bytes_or_an_end_are_not():
    a, b = socket.socketpair()
    try:
        assert not waiting([a.fileno(), b.fileno()])
        b.sendall(b"x")
        assert waiting([a.fileno()]) and not waiting([b.fileno()])
        a.recv(1)
        assert not waiting([a.fileno()])
        b.shutdown(socket.SHUT_WR)  # the peer's end is something to read too
        assert waiting([a.fileno()])
    finally:
        a.close()
        b.close()


def test_closed_descriptors_are_skipped_and_the_check_never_switches_greenlets():
    a, b = socket.socketpair()
    switches = []
    previous = greenlet.settrace(lambda event, args: switches.append(event))
    try:
        assert not waiting([-1, a.fileno()])
        assert not waiting([])
    finally:
        greenlet.settrace(previous)
        a.close()
        b.close()
    assert switches == []
