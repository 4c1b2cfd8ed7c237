"""WebSocket rules (browser-to-TCP bridge) and TCP-over-WebSocket tunnels, with
real peers: websocket-client, headless Chromium, and raw frames for the hostile cases."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import threading

import pytest
import websocket
from conftest import (
    LOOPBACK,
    HttpPage,
    Pusher,
    TargetServer,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    require_tool,
    tcp_rule,
    wait_for,
)

MB = 1024 * 1024


def ws_rule(port: int, target: int, **extra) -> dict:
    return {"protocol": "websocket", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK, "targetPort": target, **extra}


def handshake(port: int, path: str = "/", extra: str = "") -> tuple[socket.socket, bytes]:
    """A raw upgrade: (socket, response head)."""
    sock = connect(port)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head


def frame(opcode: int, payload: bytes, mask: bool = True, fin: bool = True, length: int | None = None) -> bytes:
    length = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask else 0
    if length < 126:
        head = struct.pack("!BB", first, bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, bit | 127, length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = recv_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", recv_exactly(sock, 8))
    assert not second & 0x80, "a server must not mask"
    return first & 0x0F, recv_exactly(sock, length)


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0]


@pytest.fixture
def bridge(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="ws", path="/vnc", maxMessageSize=1 << 20)])
    gp.port = port
    return gp


@pytest.mark.parametrize("size", [65536, 10], ids=["64KiB", "10B"])
def test_websocket_client_bytes_arrive_intact_and_in_order(bridge, size):
    total = 10 * MB if size == 65536 else 1 * MB  # 10-byte messages: 100k of them
    data = os.urandom(total)
    ws = websocket.create_connection(f"ws://127.0.0.1:{bridge.port}/vnc", subprotocols=["binary"])
    received = bytearray()

    def read() -> None:
        while len(received) < total:
            opcode, payload = ws.recv_data()
            assert opcode == websocket.ABNF.OPCODE_BINARY
            received.extend(payload)

    reader = threading.Thread(target=read)
    reader.start()
    for offset in range(0, total, size):
        ws.send_binary(data[offset : offset + size])
    reader.join(120)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    ws.close()
    (closed,) = bridge.wait_event("connection_closed", rule="ws")
    assert closed["bytes_received"] == closed["bytes_sent"] == total  # payload bytes, not framing


@pytest.mark.parametrize("offered,chosen", [(["binary"], "binary"), (None, None), (["base64", "binary"], "binary")])
def test_subprotocol_is_answered_only_when_offered(bridge, offered, chosen):
    ws = websocket.create_connection(f"ws://127.0.0.1:{bridge.port}/vnc", subprotocols=offered)
    assert ws.subprotocol == chosen
    ws.send_binary(b"ok")
    assert ws.recv() == b"ok"
    ws.close()


def test_a_client_offering_only_unknown_subprotocols_still_connects(bridge):
    # websocket-client refuses an answer without its subprotocol, browsers accept it:
    # check the answer itself on a raw handshake.
    sock, head = handshake(bridge.port, "/vnc", "Sec-WebSocket-Protocol: base64\r\n")
    assert head.startswith(b"HTTP/1.1 101") and b"sec-websocket-protocol" not in head.lower()
    sock.sendall(frame(0x2, b"no subprotocol"))
    assert read_frame(sock) == (0x2, b"no subprotocol")
    sock.close()


def test_text_frames_reach_the_target_as_bytes_and_ping_gets_pong(bridge):
    ws = websocket.create_connection(f"ws://127.0.0.1:{bridge.port}/vnc")
    ws.send("héllo")
    assert ws.recv() == "héllo".encode()
    ws.ping(b"are you there")
    opcode, pong = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_PONG and pong.data == b"are you there"
    ws.close()


def test_wrong_path_plain_http_and_bad_requests_get_their_answers(bridge):
    sock, head = handshake(bridge.port, "/other")
    assert head.startswith(b"HTTP/1.1 404")
    sock.close()
    with connect(bridge.port) as sock:
        sock.sendall(b"GET /vnc HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_until_eof(sock).startswith(b"HTTP/1.1 426")
    with connect(bridge.port) as sock:
        sock.sendall(b"\x16\x03\x01garbage that is no HTTP\r\n\r\n")
        assert recv_until_eof(sock).startswith(b"HTTP/1.1 400")
    # The listener keeps serving.
    ws = websocket.create_connection(f"ws://127.0.0.1:{bridge.port}/vnc")
    ws.send_binary(b"still here")
    assert ws.recv() == b"still here"
    ws.close()


def test_origin_outside_origins_is_403_and_counted(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="web", origins=["https://app.example"])])
    sock, head = handshake(port, "/", "Origin: https://evil.example\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    sock.close()
    (rejected,) = gp.wait_event("connection_rejected", rule="web")
    assert rejected["reason"] == "acl"
    stats = next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == "web")
    assert stats["connections"]["rejected_by_reason"]["acl"] == 1 and stats["connections"]["total"] == 0
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", origin="https://app.example")
    ws.send_binary(b"welcome")
    assert ws.recv() == b"welcome"
    ws.close()


def test_a_2gib_frame_header_is_refused_with_1009_before_anything_is_read(bridge):
    rss_before = bridge.rss_kib()
    sock, head = handshake(bridge.port, "/vnc")
    assert head.startswith(b"HTTP/1.1 101")
    sock.sendall(frame(0x2, b"", length=2 * 1024**3)[:14])  # the header of a 2 GiB frame only
    opcode, payload = read_frame(sock)
    assert opcode == 0x8 and close_code(payload) == 1009
    assert recv_until_eof(sock) == b""
    sock.close()
    assert bridge.rss_kib() - rss_before < 4096  # nothing was allocated for it
    (closed,) = bridge.wait_event("connection_closed", rule="ws")
    assert closed["reason"] == "client_error" and "maxMessageSize" in closed["error"]
    ws = websocket.create_connection(f"ws://127.0.0.1:{bridge.port}/vnc")
    ws.send_binary(b"next")
    assert ws.recv() == b"next"
    ws.close()


def test_fragmented_messages_count_toward_max_message_size(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="small", maxMessageSize=1000)])
    sock, _ = handshake(port)
    sock.sendall(frame(0x2, b"a" * 600, fin=False) + frame(0x0, b"b" * 600))
    while True:
        opcode, payload = read_frame(sock)
        if opcode == 0x8:
            break
    assert close_code(payload) == 1009  # the second fragment makes the message too big
    sock.close()
    (closed,) = gp.wait_event("connection_closed", rule="small")
    assert closed["bytes_received"] == 600  # the first fragment was forwarded, the second refused unread
    assert "1200 bytes exceeds maxMessageSize" in closed["error"]


def test_an_unmasked_client_frame_is_a_protocol_error(bridge):
    sock, _ = handshake(bridge.port, "/vnc")
    sock.sendall(frame(0x2, b"plain", mask=False))
    opcode, payload = read_frame(sock)
    assert opcode == 0x8 and close_code(payload) == 1002
    sock.close()


def test_first_frame_right_behind_the_upgrade_request_is_not_lost(bridge):
    sock = connect(bridge.port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /vnc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    sock.sendall(request + frame(0x2, b"eager"))  # one write: the frame sits in the HTTP reader's buffer
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    assert read_frame(sock) == (0x2, b"eager")
    sock.close()


def test_target_eof_closes_with_1000_and_client_close_half_closes_the_target(start_gportmap):
    def reply_after_eof(conn: socket.socket) -> None:
        request = recv_until_eof(conn)
        conn.sendall(b"got " + str(len(request)).encode())
        conn.shutdown(socket.SHUT_WR)

    target = TargetServer(reply_after_eof)
    port = free_port()
    gp = start_gportmap([ws_rule(port, target.port, name="ends")])
    try:
        sock, _ = handshake(port)
        sock.sendall(frame(0x2, b"x" * 1234) + frame(0x8, struct.pack("!H", 1000)))  # data, then Close
        opcode, payload = read_frame(sock)
        assert (opcode, payload) == (0x2, b"got 1234")  # the reply still arrives after our Close
        opcode, payload = read_frame(sock)
        assert opcode == 0x8 and close_code(payload) == 1000  # target EOF -> Close 1000
        assert recv_until_eof(sock) == b""
        sock.close()
        (closed,) = gp.wait_event("connection_closed", rule="ends")
        assert closed["reason"] == "closed" and closed["bytes_received"] == 1234 and closed["bytes_sent"] == 8
    finally:
        target.close()


def test_dead_target_is_a_502_and_a_silent_client_is_cut_at_handshake_timeout(start_gportmap):
    port, dead = free_port(), free_port()
    gp = start_gportmap([ws_rule(port, dead, name="dead", handshakeTimeout=0.5)])
    sock, head = handshake(port)
    assert head.startswith(b"HTTP/1.1 502")
    sock.close()
    (closed,) = gp.wait_event("connection_closed", rule="dead")
    assert closed["reason"] == "connect_failed"
    silent = connect(port)
    assert recv_until_eof(silent) == b""  # nothing sent: closed after handshakeTimeout
    silent.close()


def test_headless_chromium_page_talks_through_the_bridge(start_gportmap, echo_target, tmp_path):
    from cdp import Chromium

    page = b"""<!doctype html><title>ws</title><body><div id="out">waiting</div><script>
const ws = new WebSocket("ws://127.0.0.1:" + location.hash.slice(1) + "/");
ws.binaryType = "arraybuffer";
ws.onopen = () => ws.send("hello through gportmap");
ws.onmessage = (e) => { document.getElementById("out").textContent = new TextDecoder().decode(e.data); };
ws.onerror = () => { document.getElementById("out").textContent = "error"; };
</script></body>"""

    web = HttpPage(page)
    origin = f"http://127.0.0.1:{web.port}"
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="browser", origins=[origin])])
    chromium = Chromium(require_tool("chromium"), tmp_path / "profile")
    try:
        chromium.navigate(f"{origin}/#{port}")
        text = "document.getElementById('out')?.textContent"
        wait_for(lambda: chromium.evaluate(text) == "hello through gportmap", timeout=20, what="the echo on the page")
        (opened,) = [r for r in gp.admin_json("/stats")["rules"] if r["name"] == "browser"]
        assert opened["connections"]["total"] == 1
    finally:
        chromium.close()
        web.close()


# --- the tunnel: tcp rule (targetProtocol websocket) -> websocket rule -> TCP target ----


@pytest.fixture
def tunnel(start_gportmap, echo_target):
    ws_port, entry = free_port(), free_port()
    gp = start_gportmap(
        [
            ws_rule(ws_port, echo_target.port, name="exit", path="/tunnel"),
            tcp_rule(entry, ws_port, name="entry", targetProtocol="websocket", targetPath="/tunnel"),
        ]
    )
    gp.entry = entry
    return gp


def test_tunnel_carries_10mb_both_ways_and_the_half_close(tunnel):
    data = os.urandom(10 * MB)
    sock = connect(tunnel.entry, timeout=60)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_until_eof(sock)))
    reader.start()
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)  # carried end to end: the echo target sees EOF and ends
    reader.join(60)
    sock.close()
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(data).digest()
    entry = tunnel.wait_event("connection_closed", rule="entry")[0]
    exit_ = tunnel.wait_event("connection_closed", rule="exit")[0]
    assert entry["reason"] == exit_["reason"] == "closed"
    assert entry["bytes_received"] == entry["bytes_sent"] == exit_["bytes_received"] == len(data)


def test_200_concurrent_tunnels(tunnel):
    socks = [connect(tunnel.entry) for _ in range(200)]
    try:
        payloads = [os.urandom(100) + str(i).encode() for i in range(200)]
        for sock, payload in zip(socks, payloads):
            sock.sendall(payload)
        for sock, payload in zip(socks, payloads):
            assert recv_exactly(sock, len(payload)) == payload
        stats = {r["name"]: r for r in tunnel.admin_json("/stats")["rules"]}
        assert stats["entry"]["connections"]["active"] == 200 and stats["exit"]["connections"]["active"] == 200
    finally:
        for sock in socks:
            sock.close()
    tunnel.wait_event("connection_closed", count=200, rule="exit", timeout=30)


def test_tunnel_to_a_target_that_is_no_websocket_fails_cleanly(start_gportmap, echo_target):
    entry = free_port()
    gp = start_gportmap([tcp_rule(entry, echo_target.port, name="wrong", targetProtocol="websocket", handshakeTimeout=1)])
    sock = connect(entry)
    assert recv_until_eof(sock) == b""
    sock.close()
    (closed,) = gp.wait_event("connection_closed", rule="wrong")
    assert closed["reason"] == "connect_failed"
    assert "instead of 101" in closed["error"] or "no WebSocket answer" in closed["error"]


def test_websocket_keys_are_checked_per_protocol(tmp_path):
    import json

    from gportmap.config import parse
    from gportmap.errors import ConfigError

    base = {"listenPort": 1, "targetHost": "127.0.0.1", "targetPort": 2}
    with pytest.raises(ConfigError) as info:
        parse(json.dumps([{**base, "protocol": "tcp", "path": "/x", "targetPath": "/y"}]), "r.json")
    assert info.value.errors == [
        "r.json: rules[0].path: applies only to websocket rules",
        'r.json: rules[0].targetPath: applies to tcp rules only with "targetProtocol": "websocket"',
    ]
    with pytest.raises(ConfigError) as info:
        parse(json.dumps([{**base, "protocol": "websocket", "path": "/a?b"}, {**base, "listenPort": 3, "protocol": "websocket", "origins": []}]), "r.json")
    assert info.value.errors == [
        "r.json: rules[0].path: '/a?b' is not a URL path: '/' then printable ASCII, no spaces, no '?' or '#'",
        "r.json: rules[1].origins: [] should be non-empty",
    ]


@pytest.mark.parametrize("stalled", ["browser", "target"])
def test_a_reader_that_stops_does_not_grow_memory(start_gportmap, stalled):
    release = threading.Event()
    pusher = Pusher(os.urandom(MB), 100 * MB)

    def target_handler(conn: socket.socket) -> None:
        if target.accepted == 1:
            return  # the warm-up connection
        if stalled == "browser":
            pusher.push(conn)
        release.wait(60)

    target = TargetServer(target_handler)
    port = free_port()
    gp = start_gportmap([ws_rule(port, target.port, name="stall", maxMessageSize=1 << 30)])
    try:
        warm = websocket.create_connection(f"ws://127.0.0.1:{port}/")
        warm.close()
        gp.wait_event("connection_closed", rule="stall", timeout=30)
        before = gp.rss_kib()
        sock, head = handshake(port)
        assert head.startswith(b"HTTP/1.1 101")
        if stalled == "target":
            # One huge masked frame, streamed: the header announces 100 MB, the payload follows.
            key = os.urandom(4)
            sock.sendall(struct.pack("!BBQ", 0x82, 0x80 | 127, 100 * MB) + key)
            pusher.chunk = bytes(b ^ key[i % 4] for i, b in enumerate(pusher.chunk[:4096])) * 256  # masked
            pusher.push(sock)
        wait_for(pusher.done.is_set, timeout=60, what="the pusher to stall")
        growth_mib = (gp.rss_kib() - before) / 1024
        print(f"stalled {stalled}: pushed {pusher.bytes / MB:.1f} MiB, RSS growth {growth_mib:.2f} MiB")
        assert pusher.bytes < 100 * MB, "nothing pushed back"
        assert growth_mib < 4, f"RSS grew by {growth_mib:.1f} MiB"
        sock.close()
    finally:
        release.set()
        target.close()
