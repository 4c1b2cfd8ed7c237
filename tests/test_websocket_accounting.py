"""A websocket rule's refusals and limits, accounted like every other protocol's:
failed upgrades counted and logged as rejected ``handshake``, and ``maxConnections``
holding from admission, before the upgrade (or the wss TLS handshake) is read.

gportmap runs as a subprocess; the clients are real sockets and websocket-client.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
from pathlib import Path

import pytest
import websocket
from certs import CA
from conftest import LOOPBACK, connect, free_port, recv_until_eof, wait_for

HANDSHAKE_TIMEOUT = 0.5
REJECTED = "gportmap_connections_rejected_total"


def ws_rule(port: int, target: int, **extra) -> dict:
    return {
        "protocol": "websocket",
        "listenHost": LOOPBACK,
        "listenPort": port,
        "targetHost": LOOPBACK,
        "targetPort": target,
        **extra,
    }


def upgrade_request(path: str = "/", version: str = "13", key: str | None = None) -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    ).encode()


def answer_head(sock: socket.socket) -> bytes:
    """The response head, b"" when the connection ends without one (a reset included)."""
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                return b""
            head += chunk
    except ConnectionResetError:
        return b""
    return head


def rule_stats(gp, name: str) -> dict:
    return next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == name)


def rejected(gp, name: str) -> dict[str, int]:
    return rule_stats(gp, name)["connections"]["rejected_by_reason"]


def metric(gp, name: str, **labels: str) -> float | None:
    """One sample of /metrics, None when the series is missing."""
    _, body, _ = gp.admin("/metrics")
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in body.decode().splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{"):
            found = ",".join(sorted(series[len(name) + 1 : -1].split(",")))
            if found == wanted:
                return float(value)
    return None


@pytest.fixture
def server_cert(tmp_path: Path):
    return CA(tmp_path, "ca").issue("server", "127.0.0.1", ips=("127.0.0.1",)), tmp_path / "ca.pem"


def test_upgrades_cut_by_handshake_timeout_are_counted_and_logged(start_gportmap, echo_target):
    port, clients = free_port(), 20
    gp = start_gportmap([ws_rule(port, echo_target.port, name="ws", handshakeTimeout=HANDSHAKE_TIMEOUT)])
    labels = {"rule": "ws", "protocol": "websocket", "reason": "handshake"}
    assert metric(gp, REJECTED, **labels) == 0  # the series exists from the start
    silent = [connect(port) for _ in range(clients)]  # TCP open, nothing sent
    for sock in silent:
        assert recv_until_eof(sock) == b""  # closed at handshakeTimeout, no answer
        sock.close()
    wait_for(lambda: rejected(gp, "ws")["handshake"] == clients, what=f"{clients} handshake rejections")
    stats = rule_stats(gp, "ws")["connections"]
    assert (stats["total"], stats["active"], stats["handshaking"]) == (0, 0, 0)
    assert metric(gp, REJECTED, **labels) == clients
    records = gp.wait_event("connection_rejected", rule="ws", reason="handshake")
    assert all("handshakeTimeout" in record["error"] for record in records)
    assert len(gp.events("connection_rejected")) < clients  # rate-limited in the log, never in the counters
    assert not gp.events("connection_closed")  # never admitted as a connection


#: Failed upgrades, each with the answer it gets (b"": none, the connection closed).
FAILED_UPGRADES = {
    "wrong-path": (upgrade_request(path="/elsewhere"), b"HTTP/1.1 404"),
    "wrong-version": (upgrade_request(version="8"), b"HTTP/1.1 426"),
    "bad-key": (upgrade_request(key="short"), b"HTTP/1.1 400"),
    "not-an-upgrade": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 426"),  # plain HTTP, no upgrade
    "malformed": (b"\x16\x03\x01garbage that is no HTTP\r\n\r\n", b"HTTP/1.1 400"),
    "http-1.0": (b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"HTTP/1.1 402"),
    "no-version": (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"HTTP/1.1 426"),
    "too-long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"HTTP/1.1 414"),
    "left-silent": (b"", b""),  # connected and left without a byte
}


@pytest.fixture(scope="module")
def upgrades_gportmap(start_shared_gportmap, shared_echo_target):
    """One gportmap for every case of ``FAILED_UPGRADES``: a rule (and port) of its own
    each, so that each case reads only its rule's records and figures (rejections are
    rate-limited in the log per rule and reason)."""
    ports = {case: free_port() for case in FAILED_UPGRADES}
    rules = [ws_rule(port, shared_echo_target.port, name=f"ws-{case}") for case, port in ports.items()]
    return start_shared_gportmap(rules), ports


@pytest.mark.parametrize("case", list(FAILED_UPGRADES))
def test_failed_upgrades_keep_their_answer_and_are_counted_as_handshake(upgrades_gportmap, case):
    gp, ports = upgrades_gportmap
    request_bytes, answer = FAILED_UPGRADES[case]
    port, name = ports[case], f"ws-{case}"
    with connect(port) as sock:
        if request_bytes:
            sock.sendall(request_bytes)
        if not answer:
            sock.shutdown(socket.SHUT_WR)
        reply = recv_until_eof(sock)
        assert reply.startswith(answer) if answer else reply == b""
    (record,) = gp.wait_event("connection_rejected", rule=name, reason="handshake")
    assert record["error"] and record["client"].startswith("127.0.0.1:")
    stats = rule_stats(gp, name)["connections"]
    assert stats["rejected_by_reason"] == {
        "acl": 0, "limit": 0, "tls": 0, "plugin": 0, "handshake": 1, "no_route": 0, "proxy_header": 0, "client_limit": 0}
    assert (stats["total"], stats["handshaking"]) == (0, 0)
    assert not gp.events("bad_request")  # one record per failed upgrade: the rejection
    assert not gp.events("internal_error")
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/")  # the listener serves on
    ws.send_binary(b"next")
    assert ws.recv() == b"next"
    ws.close()


@pytest.mark.slow  # waits out refused upgrades
def test_max_connections_holds_upgraded_and_mid_upgrade_clients(start_gportmap, echo_target):
    """maxConnections 2: two clients with TCP open and nothing sent hold both places;
    a third is rejected ``limit`` at once; the two upgrade and are served; a third is
    still rejected; one leaves and the next gets its place."""
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="ws", maxConnections=2)])
    url = f"ws://127.0.0.1:{port}/"
    waiting = [connect(port) for _ in range(2)]
    wait_for(lambda: rule_stats(gp, "ws")["connections"]["handshaking"] == 2, what="2 mid-upgrade")
    with connect(port) as third:
        third.sendall(upgrade_request())
        assert answer_head(third) == b""  # accepted and closed at once
    assert rejected(gp, "ws")["limit"] == 1
    for sock in waiting:
        sock.sendall(upgrade_request())
        assert answer_head(sock).startswith(b"HTTP/1.1 101")
    stats = rule_stats(gp, "ws")["connections"]
    assert (stats["active"], stats["handshaking"], stats["total"]) == (2, 0, 2)
    with pytest.raises((websocket.WebSocketException, ConnectionError)):
        websocket.create_connection(url, timeout=10)
    assert rejected(gp, "ws")["limit"] == 2
    waiting[0].close()
    wait_for(lambda: rule_stats(gp, "ws")["connections"]["active"] == 1, what="one place free")
    ws = websocket.create_connection(url)
    ws.send_binary(b"in")
    assert ws.recv() == b"in"
    ws.close()
    waiting[1].close()
    assert rule_stats(gp, "ws")["connections"]["rejected"] == 2


def test_a_failed_upgrade_gives_its_place_back(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(
        [ws_rule(port, echo_target.port, name="ws", maxConnections=1, handshakeTimeout=HANDSHAKE_TIMEOUT)]
    )
    with connect(port) as silent:
        assert recv_until_eof(silent) == b""  # cut at handshakeTimeout
    with connect(port) as wrong:
        wrong.sendall(upgrade_request(path="/elsewhere"))
        assert recv_until_eof(wrong).startswith(b"HTTP/1.1 404")
    wait_for(lambda: rejected(gp, "ws")["handshake"] == 2, what="2 handshake rejections")
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/")  # the one place is free again
    ws.send_binary(b"mine")
    assert ws.recv() == b"mine"
    ws.close()
    assert rejected(gp, "ws")["limit"] == 0


@pytest.mark.slow  # TLS handshakes held open
def test_wss_clients_in_their_tls_handshake_hold_their_places(start_gportmap, echo_target, server_cert):
    issued, ca = server_cert
    port = free_port()
    tls = {"certFile": str(issued.cert), "keyFile": str(issued.key)}
    gp = start_gportmap([ws_rule(port, echo_target.port, name="wss", maxConnections=2, tls=tls)])
    context = ssl.create_default_context(cafile=str(ca))
    waiting = [connect(port) for _ in range(2)]  # no ClientHello yet
    wait_for(lambda: rule_stats(gp, "wss")["connections"]["handshaking"] == 2, what="2 mid-handshake")
    with connect(port) as third, pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(third, server_hostname="127.0.0.1")  # closed at once: no handshake
    assert rejected(gp, "wss")["limit"] == 1
    served = []
    for sock in waiting:
        tls_sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        tls_sock.sendall(upgrade_request())
        assert answer_head(tls_sock).startswith(b"HTTP/1.1 101")
        served.append(tls_sock)
    assert rule_stats(gp, "wss")["connections"]["active"] == 2
    for tls_sock in served:
        tls_sock.close()
