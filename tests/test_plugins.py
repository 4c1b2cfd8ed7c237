"""SPEC §7: plugins by entry point (the example package under examples/, installed
by .ci/run) and by dotted path, every hook end to end, failures contained, the two
shipped plugins, and a protocol added by a plugin package."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import websocket
from conftest import (
    LOOPBACK,
    ROOT,
    TargetServer,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    tcp_rule,
    wait_for,
)

TESTS = str(Path(__file__).resolve().parent)
SAMPLES = {"PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(autouse=True, scope="module")
def example_package_installed():
    names = {ep.name for ep in entry_points(group="gportmap.plugins")}
    if "uppercase" not in names:
        pytest.fail(
            "the example plugin package is not installed: pip install -e examples/gportmap-example "
            "(.ci/run does it)"
        )


def rule_stats(gp, name: str) -> dict:
    return next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == name)


def round_trip(port: int, payload: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


@pytest.mark.parametrize("name", ["uppercase", "gportmap_example:UpperCase"], ids=["entry_point", "dotted_path"])
def test_on_data_transforms_end_to_end(start_gportmap, echo_target, name):
    port = free_port()
    gp = start_gportmap(
        [tcp_rule(port, echo_target.port, name="upper", plugins=[{"name": name, "options": {"direction": "upstream"}}])]
    )
    assert round_trip(port, b"hello, plugin world " * 1000) == b"HELLO, PLUGIN WORLD " * 1000
    (closed,) = gp.wait_event("connection_closed", rule="upper")
    assert closed["bytes_received"] == closed["bytes_sent"] == 20_000


def test_on_accept_rejects_and_is_counted(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(
        [tcp_rule(port, echo_target.port, name="gate", plugins=[{"name": "per-client-limit", "options": {"max": 2}}])]
    )
    held = [connect(port), connect(port)]
    for sock in held:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    third = connect(port)
    assert recv_until_eof(third) == b""
    third.close()
    (rejected,) = gp.wait_event("connection_rejected", rule="gate")
    assert rejected["reason"] == "plugin" and "already has 2 open" in rejected["error"]
    stats = rule_stats(gp, "gate")
    assert stats["connections"]["rejected_by_reason"]["plugin"] == 1 and stats["connections"]["total"] == 2
    held.pop().close()  # on_close gives the slot back
    gp.wait_event("connection_closed", rule="gate")
    assert round_trip(port, b"room again") == b"room again"
    held[0].close()


def test_on_close_summaries_have_exact_byte_counts(start_gportmap, echo_target, tmp_path):
    port = free_port()
    log = tmp_path / "connections.jsonl"
    gp = start_gportmap(
        [tcp_rule(port, echo_target.port, name="billed", plugins=[{"name": "connlog", "options": {"path": str(log)}}])]
    )
    sizes = [1, 1000, 123_457]
    for size in sizes:
        assert round_trip(port, os.urandom(size)) is not None
    gp.wait_event("connection_closed", rule="billed", count=3)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["bytes_received"], line["bytes_sent"]) for line in lines] == [(s, s) for s in sizes]
    assert all(line["rule"] == "billed" and line["reason"] == "closed" and line["client"].startswith("127.0.0.1:") for line in lines)


def test_connlog_rotates_by_size(start_gportmap, echo_target, tmp_path):
    port = free_port()
    log = tmp_path / "audit.jsonl"
    gp = start_gportmap(
        [tcp_rule(port, echo_target.port, name="audit", plugins=[{"name": "connlog", "options": {"path": str(log), "maxBytes": 2048, "backups": 2}}])]
    )
    for _ in range(40):
        round_trip(port, b"x")
    gp.wait_event("connection_closed", rule="audit", count=40)
    files = sorted(p.name for p in tmp_path.glob("audit.jsonl*"))
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 2048 for p in tmp_path.glob("audit.jsonl*"))


def test_a_failing_hook_closes_only_its_connection(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(
        [tcp_rule(port, echo_target.port, name="fragile", plugins=[{"name": "plugin_samples:Boom"}])], env=SAMPLES
    )
    other = connect(port)
    other.sendall(b"fine")
    assert recv_exactly(other, 4) == b"fine"
    with connect(port) as bad:
        bad.sendall(b"this goes boom")
        assert recv_until_eof(bad) == b""
    (error,) = gp.wait_event("plugin_error")
    assert error["plugin"] == "plugin_samples:Boom" and error["hook"] == "on_data" and "blew up" in error["message"]
    closed = [e for e in gp.wait_event("connection_closed", rule="fragile") if e["reason"] == "plugin_error"]
    assert len(closed) == 1
    other.sendall(b"still fine")  # the other connection and the rule go on
    assert recv_exactly(other, 10) == b"still fine"
    assert round_trip(port, b"new one") == b"new one"
    other.close()


def test_on_data_may_pass_nothing(start_gportmap):
    seen: list[bytes] = []
    target = TargetServer(lambda conn: seen.append(recv_until_eof(conn)))
    port = free_port()
    try:
        gp = start_gportmap([tcp_rule(port, target.port, name="swallow", plugins=[{"name": "plugin_samples:Swallow"}])], env=SAMPLES)
        round_trip(port, b"nobody hears this")
        wait_for(lambda: seen, what="the target's EOF")
        assert seen == [b""]
        (closed,) = gp.wait_event("connection_closed", rule="swallow")
        assert closed["bytes_received"] == 17  # received from the client, not passed on
    finally:
        target.close()


BAD_PLUGINS = [
    ({"name": "no-such-plugin"}, "rules[0].plugins[0]: no plugin named 'no-such-plugin' (installed:"),
    ({"name": "no_such_module:Thing"}, "rules[0].plugins[0]: cannot import 'no_such_module': ModuleNotFoundError"),
    ({"name": "plugin_samples:NotAPlugin"}, "rules[0].plugins[0]: 'plugin_samples:NotAPlugin' is not a subclass of gportmap.plugins.Plugin"),
    ({"name": "plugin_samples:BrokenInit"}, "rules[0].plugins[0]: cannot build 'plugin_samples:BrokenInit': ValueError: no license key"),
    ({"name": "bandwidth", "options": {"rate": -5}}, "rules[0].plugins[0]: options.rate: -5 is less than the minimum of 1"),
    ({"name": "per-client-limit", "options": {}}, "rules[0].plugins[0]: options: 'max' is a required property"),
]


@pytest.mark.parametrize("entry,expected", BAD_PLUGINS, ids=[e[0]["name"] for e in BAD_PLUGINS])
def test_a_broken_plugin_is_a_config_error(tmp_path, entry, expected):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([tcp_rule(free_port(), 9, plugins=[entry])]))
    result = subprocess.run(
        [sys.executable, "-m", "gportmap", str(path), "--admin", "off"],
        capture_output=True, text=True, env={**os.environ, **SAMPLES}, timeout=30,
    )
    assert result.returncode == 2
    assert f"{path}: {expected}" in result.stderr, result.stderr


def test_a_broken_plugin_on_reload_keeps_the_old_rules(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="web")])
    gp.wait_event("watching")
    gp.rules_path.write_text(json.dumps([tcp_rule(port, echo_target.port, name="web", plugins=[{"name": "nope"}])]))
    (invalid,) = gp.wait_event("config_invalid")
    assert "no plugin named 'nope'" in invalid["errors"][0]
    assert round_trip(port, b"unchanged") == b"unchanged"


@pytest.mark.slow
def test_bandwidth_limiter_holds_1_mib_per_second(start_gportmap):
    counted: dict[str, float] = {}

    def measure(conn: socket.socket) -> None:
        total, first, last = 0, None, None
        while chunk := conn.recv(65536):
            now = time.monotonic()
            first = first or now
            last = now
            total += len(chunk)
        counted.update(total=total, seconds=(last or 0) - (first or 0))

    target = TargetServer(measure)
    port = free_port()
    rate = 1024 * 1024
    try:
        start_gportmap(
            [tcp_rule(port, target.port, name="slow", plugins=[{"name": "bandwidth", "options": {"rate": rate, "burst": 65536}}])]
        )
        payload = os.urandom(5 * rate + 65536)  # 5 s at the limit, after the burst
        with connect(port, timeout=30) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            recv_until_eof(sock)
        wait_for(lambda: "total" in counted, timeout=20, what="the target to count")
        achieved = (counted["total"] - 65536) / counted["seconds"]
        print(f"bandwidth limiter: {achieved / rate:.3f} x the 1 MiB/s limit over {counted['seconds']:.2f}s")
        assert counted["total"] == len(payload)
        assert abs(achieved - rate) / rate < 0.10
    finally:
        target.close()


def test_udp_plugins_see_sessions_and_datagrams(start_gportmap, tmp_path):
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((LOOPBACK, 0))
    stop = threading.Event()

    def serve() -> None:
        echo.settimeout(0.2)
        while not stop.is_set():
            try:
                data, peer = echo.recvfrom(65535)
            except TimeoutError:
                continue
            echo.sendto(data, peer)

    threading.Thread(target=serve, daemon=True).start()
    port = free_port(socket.SOCK_DGRAM)
    log = tmp_path / "udp.jsonl"
    gp = start_gportmap(
        [{"protocol": "udp", "name": "dns", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
          "targetPort": echo.getsockname()[1], "sessionTimeout": 0.5,
          "plugins": [{"name": "uppercase", "options": {"direction": "downstream"}},
                      {"name": "connlog", "options": {"path": str(log)}}]}]
    )
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    try:
        for word in (b"abc", b"defg"):
            client.sendto(word, (LOOPBACK, port))
            assert client.recv(100) == word.upper()
        gp.wait_event("session_closed", rule="dns")
        (line,) = [json.loads(x) for x in log.read_text().splitlines()]
        assert line["protocol"] == "udp" and line["packets_received"] == 2 and line["bytes_sent"] == 7
    finally:
        stop.set()
        client.close()
        echo.close()


def test_websocket_rule_with_a_transforming_plugin(start_gportmap, echo_target):
    port = free_port()
    start_gportmap(
        [{"protocol": "websocket", "name": "ws", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
          "targetPort": echo_target.port, "plugins": [{"name": "uppercase", "options": {"direction": "downstream"}}]}]
    )
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/")
    ws.send_binary(b"quiet please")
    assert ws.recv() == b"QUIET PLEASE"
    ws.close()


def test_a_plugin_package_adds_a_protocol(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(
        [{"protocol": "greeter", "name": "hello", "listenHost": LOOPBACK, "listenPort": port,
          "targetHost": LOOPBACK, "targetPort": echo_target.port, "idleTimeout": 30}]
    )
    with connect(port) as sock:
        assert recv_exactly(sock, 36) == b"220 gportmap-example greeter ready\r\n"
        sock.sendall(b"EHLO")
        assert recv_exactly(sock, 4) == b"EHLO"
    (started,) = gp.events("rule_started")
    assert started["protocol"] == "greeter"
    result = subprocess.run(
        [sys.executable, "-m", "gportmap", "--check", str(gp.rules_path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "greeter" in result.stdout


def test_example_package_layout():
    setup_py = (ROOT / "examples" / "gportmap-example" / "setup.py").read_text()
    assert '"gportmap.plugins"' in setup_py and '"gportmap.protocols"' in setup_py
