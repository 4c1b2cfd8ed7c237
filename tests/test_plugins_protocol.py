"""A protocol from a plugin package, through the public base
(``gportmap.protocols.plugin.StreamProtocol``, SPEC §7, docs/plugins.md): gportmap
started as a subprocess finds it by entry point, and a real client meets it.

The base gives the protocol one method, ``handle(connection)``; what a tcp rule
does around it (admission and ``maxConnections``, counters, ``connection_closed``)
is gportmap's, and is checked here too. A protocol written before the base
(overriding the private ``_forward``) still works on rules without routes.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from conftest import LOOPBACK, closed_by_peer, connect, free_port, recv_until_eof, rule_stats, wait_for

TESTS = str(Path(__file__).resolve().parent)


def register_protocols(folder: Path, **protocols: str) -> dict[str, str]:
    """An installed distribution (as importlib.metadata finds one on sys.path) whose
    entry points add ``protocols`` (name -> ``module:Class`` in tests/)."""
    info = folder / "gportmap_samples-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gportmap-samples\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in protocols.items())
    (info / "entry_points.txt").write_text("[gportmap.protocols]\n" + lines)
    return {"PYTHONPATH": os.pathsep.join([str(folder), TESTS, os.environ.get("PYTHONPATH", "")])}


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"closed after {line!r}"
        line += chunk
    return line


def test_a_protocol_on_the_public_base_is_served_end_to_end(start_gportmap, echo_target, tmp_path):
    port, refusing = free_port(), free_port()
    gp = start_gportmap(
        [
            {"protocol": "banner", "name": "greet", "listenHost": LOOPBACK, "listenPort": port,
             "targetHost": LOOPBACK, "targetPort": echo_target.port, "maxConnections": 1},
            {"protocol": "banner", "name": "nowhere", "listenHost": LOOPBACK, "listenPort": refusing,
             "targetHost": LOOPBACK, "targetPort": free_port()},
        ],
        env=register_protocols(tmp_path / "site", banner="plugin_samples:BannerProtocol"),
    )
    (started, _) = sorted(gp.events("rule_started"), key=lambda r: r["rule"])
    assert started["protocol"] == "banner"

    with connect(port) as client:
        hello, conn_id, rule, address = read_line(client).split()
        assert (hello, rule) == (b"hello", b"greet")
        assert address.decode() == "{}:{}".format(*client.getsockname())
        # gportmap's admission holds the rule's limit around the protocol's handle()
        with connect(port) as second:
            assert closed_by_peer(second)
        client.sendall(b"ping through the relay")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b"ping through the relay"
    closed = gp.wait_event("connection_closed", rule="greet")[0]
    assert closed["reason"] == "closed" and closed["bytes_received"] == len(b"ping through the relay")
    rejected = gp.wait_event("connection_rejected", rule="greet")[0]
    assert rejected["reason"] == "limit"
    assert closed["client"] == address.decode() and int(conn_id) > 0

    # handle() may serve a connection itself: its target (refusing here) is never tried
    with connect(refusing) as client:
        read_line(client)
        client.sendall(b"local\n")
        assert read_line(client) == b"served here\n"
        assert recv_until_eof(client) == b""
    closed = gp.wait_event("connection_closed", rule="nowhere")[0]
    assert closed["reason"] == "closed" and "error" not in closed
    counts = rule_stats(gp, "nowhere")
    assert counts["connections"]["total"] == 1 and counts["upstream_connect_failures"] == 0

    # what handle() returns is checked: anything but (reason, error) or None is a bug of the package
    with connect(refusing) as client:
        read_line(client)
        client.sendall(b"bad\n")
        assert closed_by_peer(client)
    (error,) = gp.wait_event("internal_error", rule="nowhere")
    assert "BannerProtocol.handle returned 'done'" in error["message"]
    assert gp.wait_event("connection_closed", rule="nowhere", reason="internal_error")
    assert wait_for(lambda: rule_stats(gp, "greet")["connections"]["active"] == 0)


def test_a_protocol_overriding_the_private_forward_still_works(start_gportmap, echo_target, tmp_path):
    port = free_port()
    gp = start_gportmap(
        [{"protocol": "oldstyle", "name": "old", "listenHost": LOOPBACK, "listenPort": port,
          "targetHost": LOOPBACK, "targetPort": echo_target.port}],
        env=register_protocols(tmp_path / "site", oldstyle="plugin_samples:OldStyleTcp"),
    )
    with connect(port) as client:
        assert read_line(client) == b"old style\n"
        client.sendall(b"echo")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b"echo"
    assert gp.wait_event("connection_closed", rule="old")[0]["reason"] == "closed"
