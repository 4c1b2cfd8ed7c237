"""The admin endpoint's documents that grow with the process (``gportmap.admin.render``):
``/stats``' process figures read off the hub, ``/connections`` copied on the hub in
slices and formatted in a thread, each connection listed once with its figures."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import gevent
import pytest
from conftest import HubTurns, TargetServer, connect, echo_handler, free_port, tcp_rule, wait_for

from gportmap.admin.render import Renderings
from gportmap.config import parse
from gportmap.runtime.service import Overrides, Service
from gportmap.stats import StatsRegistry, iso_time

#: The fields of a ``/connections`` entry, in their order (SPEC §5).
CONNECTION_FIELDS = ["id", "rule", "client", "listen", "target", "started", "duration", "bytes"]


@pytest.fixture
def echo() -> TargetServer:
    target = TargetServer(echo_handler)
    yield target
    target.close()


def _open(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = connect(port)
        sock.sendall(b"x")  # a byte each way: the connection reached the target
        assert sock.recv(1) == b"x"
        socks.append(sock)
    return socks


def test_stats_counts_the_descriptors_the_connections_hold(start_gportmap, echo):
    """``process.open_files`` follows the descriptors gportmap holds: 40 connections
    through a rule are 80 more (a client's and its target's), and the figure agrees
    with the process's own /proc listing."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo.port, name="fwd")]})
    before = gp.admin_json("/stats")["process"]["open_files"]
    socks = _open(port, 40)
    try:
        held = wait_for(
            lambda: (stats := gp.admin_json("/stats"))["connections"]["active"] == 40 and stats,
            what="40 connections open",
        )
        during = held["process"]["open_files"]
        assert during >= before + 80, (before, during)
        assert abs(during - gp.open_fds()) <= 4  # the endpoint's own request, a log rotation
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: gp.admin_json("/stats")["connections"]["active"] == 0, what="the connections closed")
    assert gp.admin_json("/stats")["process"]["open_files"] <= before + 4


def test_connections_lists_each_open_connection_once_with_its_figures(start_gportmap, echo):
    """300 connections over two rules: each listed once, by id in the order they
    opened, with the fields as before and its own client, rule and bytes."""
    ports = [free_port(), free_port()]
    gp = start_gportmap({"rules": [tcp_rule(ports[0], echo.port, name="a"), tcp_rule(ports[1], echo.port, name="b")]})
    socks = _open(ports[0], 150) + _open(ports[1], 150)
    try:
        wait_for(lambda: gp.admin_json("/stats")["connections"]["active"] == 300, what="300 connections open")
        entries = gp.admin_json("/connections")
        assert len(entries) == 300
        assert [list(entry) for entry in entries] == [CONNECTION_FIELDS] * 300
        ids = [entry["id"] for entry in entries]
        assert ids == sorted(set(ids))  # once each, in the order they opened
        clients = {f"127.0.0.1:{sock.getsockname()[1]}": rule for rule, group in (("a", socks[:150]), ("b", socks[150:])) for sock in group}
        assert {entry["client"]: entry["rule"] for entry in entries} == clients
        assert {entry["listen"] for entry in entries} == {f"127.0.0.1:{p}" for p in ports}
        assert {entry["target"] for entry in entries} == {f"127.0.0.1:{echo.port}"}
        assert all(entry["bytes"] == {"received": 1, "sent": 1} for entry in entries)
        assert all(entry["started"].endswith("Z") and entry["duration"] >= 0 for entry in entries)
    finally:
        for sock in socks:
            sock.close()


# -- in this process, with hooks: where the work runs -------------------------------------


@pytest.fixture
def service(tmp_path: Path, echo) -> Service:
    """A service in this process (its hub in this thread) forwarding one rule."""
    port = free_port()
    path = tmp_path / "rules.json"
    text = json.dumps({"settings": {"admin": False, "watch": False}, "rules": [tcp_rule(port, echo.port, name="fwd")]})
    path.write_text(text)
    service = Service(parse(text, str(path)), "off", Overrides(admin="off"))
    service.start()
    service.port = port  # type: ignore[attr-defined]
    yield service
    service.stop_reloading(5)
    service.supervisor.stop(1.0)


def test_the_process_figures_are_read_in_the_thread_not_on_the_hub(service, monkeypatch):
    """``/stats``' open-file count lists /proc/self/fd: milliseconds at 20,000
    descriptors. The rendering lists it in the hub's thread pool, and that is the
    figure served (the listing hook answers 1,000 entries there, and only there)."""
    hub_thread = threading.get_ident()
    listed: list[int] = []
    real_listdir = os.listdir

    def listdir(path: str = ".") -> list[str]:
        if path == "/proc/self/fd":
            listed.append(threading.get_ident())
            if threading.get_ident() != hub_thread:
                return [str(fd) for fd in range(1000)]
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    renderings = Renderings(service, dict)
    document = json.loads(gevent.spawn(renderings.stats.get).get(timeout=10))
    assert document["process"]["open_files"] == 999  # less the listing's own descriptor
    assert any(thread != hub_thread for thread in listed)
    assert hub_thread not in listed  # no listing of /proc/self/fd on the hub


def test_connections_are_copied_in_slices_with_the_hub_running_between_them(service, monkeypatch):
    """The copy of 60 connections, 7 at a time, yields to the hub after each slice
    (a greenlet that counts its turns runs between them); the answer still lists
    each connection once. Before, the whole table was built in one go on the hub."""
    monkeypatch.setattr(StatsRegistry, "copy_slice", 7)
    clients: list[gevent.socket.socket] = []

    def open_all() -> None:
        for _ in range(60):
            sock = gevent.socket.create_connection(("127.0.0.1", service.port), timeout=10)
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            clients.append(sock)

    gevent.spawn(open_all).get(timeout=30)
    try:
        renderings = Renderings(service, dict)
        turns = HubTurns()
        start = turns.count
        (table,) = service.supervisor.stats.open_tables()  # here: the counter runs only if it yields
        turns.stop()
        rows = table.rows
        assert table.worker is None
        assert len(rows) == 60 and len({row[0] for row in rows}) == 60
        assert turns.count - start >= 60 // 7  # a turn after each full slice
        entries = json.loads(gevent.spawn(renderings.connections.get).get(timeout=10))
        assert [entry["id"] for entry in entries] == [row[0] for row in rows]
        # each entry is its connection's figures (but for the seconds gone by since)
        conns = {conn.id: conn for conn in service.supervisor.stats.connections()}
        for entry in entries:
            conn = conns[entry["id"]]
            assert entry == {
                "id": conn.id,
                "rule": conn.stats.name,
                "client": conn.client,
                "listen": conn.listen,
                "target": conn.target,
                "started": iso_time(conn.started),
                "duration": entry["duration"],
                "bytes": {"received": 1, "sent": 1},
            }
            assert entry["duration"] <= conn.duration + 0.001
    finally:
        for sock in clients:
            sock.close()
