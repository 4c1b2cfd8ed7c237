"""WebSocket rules (browser-to-TCP bridge) and TCP-over-WebSocket tunnels, with
real peers: websocket-client, headless Chromium, and raw frames for the hostile cases."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import websocket
from conftest import (
    LOOPBACK,
    Gportmap,
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
from hypothesis import given, settings
from hypothesis import strategies as st

from gportmap.engine import wsframe
from gportmap.engine.relay import BufferPool
from gportmap.engine.wsbridge import WsBridge, _FrameReader

MB = 1024 * 1024


def ws_rule(port: int, target: int, **extra) -> dict:
    return {
        "protocol": "websocket",
        "listenHost": LOOPBACK,
        "listenPort": port,
        "targetHost": LOOPBACK,
        "targetPort": target,
        **extra,
    }


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


def frame(
    opcode: int, payload: bytes, mask: bool = True, fin: bool = True, length: int | None = None
) -> bytes:
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


@dataclass(frozen=True)
class Bridge:
    """One websocket rule of the module's shared gportmap, for one test."""

    gp: Gportmap
    port: int
    rule: str


#: Rules of the shared bridge process: one per test that takes ``bridge`` (11 now).
BRIDGE_RULES = 16


@pytest.fixture(scope="module")
def bridges(start_shared_gportmap, shared_echo_target) -> tuple[Gportmap, Iterator[Bridge]]:
    """One gportmap for every ``bridge`` test, with a rule (and port) for each, so
    that a test reads only its own rule's records; started once per module."""
    ports = [free_port() for _ in range(BRIDGE_RULES)]
    rules = [
        ws_rule(port, shared_echo_target.port, name=f"ws-{index}", path="/vnc", maxMessageSize=1 << 20)
        for index, port in enumerate(ports)
    ]
    gp = start_shared_gportmap(rules)
    return gp, iter([Bridge(gp, port, rule["name"]) for port, rule in zip(ports, rules, strict=True)])


@pytest.fixture
def bridge(bridges) -> Bridge:
    """A websocket rule on /vnc to an echo target, no other test's."""
    _, unused = bridges
    taken = next(unused, None)
    assert taken is not None, f"more bridge tests than BRIDGE_RULES ({BRIDGE_RULES}): raise it"
    return taken


@pytest.mark.slow  # a long transfer (10 MB; 100,000 messages)
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
    (closed,) = bridge.gp.wait_event("connection_closed", rule=bridge.rule)
    assert closed["bytes_received"] == closed["bytes_sent"] == total  # payload bytes, not framing


@pytest.mark.parametrize(
    "offered,chosen", [(["binary"], "binary"), (None, None), (["base64", "binary"], "binary")]
)
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
    assert rejected["error"] == "Origin 'https://evil.example' is not in origins"  # what to add to origins
    stats = next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == "web")
    assert stats["connections"]["rejected_by_reason"]["acl"] == 1 and stats["connections"]["total"] == 0
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", origin="https://app.example")
    ws.send_binary(b"welcome")
    assert ws.recv() == b"welcome"
    ws.close()


def test_a_2gib_frame_header_is_refused_with_1009_before_anything_is_read(bridge):
    rss_before = bridge.gp.rss_kib()
    sock, head = handshake(bridge.port, "/vnc")
    assert head.startswith(b"HTTP/1.1 101")
    sock.sendall(frame(0x2, b"", length=2 * 1024**3)[:14])  # the header of a 2 GiB frame only
    opcode, payload = read_frame(sock)
    assert opcode == 0x8 and close_code(payload) == 1009
    assert recv_until_eof(sock) == b""
    sock.close()
    assert bridge.gp.rss_kib() - rss_before < 4096  # nothing was allocated for it
    (closed,) = bridge.gp.wait_event("connection_closed", rule=bridge.rule)
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


@pytest.mark.slow
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
        wait_for(
            lambda: chromium.evaluate(text) == "hello through gportmap",
            timeout=20,
            what="the echo on the page",
        )
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


@pytest.mark.slow  # a long transfer (10 MB each way)
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


@pytest.mark.slow  # a load test (200 tunnels)
def test_200_concurrent_tunnels(tunnel):
    socks = [connect(tunnel.entry) for _ in range(200)]
    try:
        payloads = [os.urandom(100) + str(i).encode() for i in range(200)]
        for sock, payload in zip(socks, payloads):
            sock.sendall(payload)
        for sock, payload in zip(socks, payloads):
            assert recv_exactly(sock, len(payload)) == payload
        stats = {r["name"]: r for r in tunnel.admin_json("/stats")["rules"]}
        assert (
            stats["entry"]["connections"]["active"] == 200 and stats["exit"]["connections"]["active"] == 200
        )
    finally:
        for sock in socks:
            sock.close()
    tunnel.wait_event("connection_closed", count=200, rule="exit", timeout=30)


def test_tunnel_to_a_target_that_is_no_websocket_fails_cleanly(start_gportmap, echo_target):
    entry = free_port()
    gp = start_gportmap(
        [tcp_rule(entry, echo_target.port, name="wrong", targetProtocol="websocket", handshakeTimeout=1)]
    )
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
        parse(
            json.dumps(
                [
                    {**base, "protocol": "websocket", "path": "/a?b"},
                    {**base, "listenPort": 3, "protocol": "websocket", "origins": []},
                ]
            ),
            "r.json",
        )
    assert info.value.errors == [
        "r.json: rules[0].path: '/a?b' is not a URL path: '/' then printable ASCII, no spaces, no '?' or '#'",
        "r.json: rules[1].origins: [] should be non-empty",
    ]


@pytest.mark.slow
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


# --- the frame reader and the unmasking, in process ----------------------------------
#
# WsBridge's reader joins the data payloads of one read into one TCP write, takes a
# fast path for small whole frames and carries partial headers between reads. These
# drive the real reader over fake sockets, so every split of a stream can be tried.


def reference_mask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ mask[(offset + i) % 4] for i, b in enumerate(data))


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=70000) | st.binary(min_size=200, max_size=400),  # around the 256-byte switch too
    st.binary(min_size=4, max_size=4) | st.just(bytes(4)) | st.just(b"\x07\x07\x07\x07"),
    st.integers(0, 1 << 40),
    st.lists(st.integers(0, 70000), max_size=4),
)
def test_unmask_range_matches_the_rfc_in_any_number_of_pieces(
    data: bytes, mask: bytes, offset: int, cuts: list[int]
) -> None:
    buf = bytearray(b"<<<" + data + b">>>")  # a range inside a larger buffer, as the reader uses it
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:]):
        wsframe.unmask_range(buf, 3 + start, 3 + end, mask, offset + start)
    assert bytes(buf[3:-3]) == reference_mask(data, mask, offset)
    assert buf[:3] == b"<<<" and buf[-3:] == b">>>"  # nothing outside the range is touched
    view = memoryview(buf)[3:-3]
    wsframe.mask_in_place(view, mask, offset)  # the general form agrees, and undoes it
    assert bytes(view) == data


def test_mask_in_place_large_view_leaves_its_neighbours_alone() -> None:
    data = os.urandom(65536 + 3)
    buf = bytearray(b"ab" + data + b"cd")
    wsframe.mask_in_place(memoryview(buf)[2:-2], b"\x01\x80\xfe\x33", 6)
    assert buf[:2] == b"ab" and buf[-2:] == b"cd"
    assert bytes(buf[2:-2]) == reference_mask(data, b"\x01\x80\xfe\x33", 6)


class _ScriptedSocket:
    """A non-blocking socket stand-in: recv_into hands out ``chunks`` (one read never
    crosses a chunk boundary), then EOF; ``pending`` (as on a TLS socket) says a read
    is due, so the reader never waits on the fake descriptor. What is sent is kept."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = [c for c in chunks if c]
        self.eof_read = False
        self.sent = bytearray()

    def fileno(self) -> int:
        return -1

    def pending(self) -> int:
        return 0 if self.eof_read else 1

    def recv_into(self, view: memoryview) -> int:
        if not self.chunks:
            self.eof_read = True
            return 0
        chunk = self.chunks[0]
        n = min(len(view), len(chunk))
        view[:n] = chunk[:n]
        self.chunks[0] = chunk[n:]
        if not self.chunks[0]:
            self.chunks.pop(0)
        return n

    def send(self, view: memoryview) -> int:
        self.sent += view
        return len(view)


class _Counts:
    def __init__(self) -> None:
        self.last_active = 0.0
        self.bytes_received = self.bytes_sent = 0

    def add_received(self, n: int) -> None:
        self.bytes_received += n

    def add_sent(self, n: int) -> None:
        self.bytes_sent += n


def run_reader(
    stream: bytes, cuts: list[int], buffer_size: int, max_message: int = 1 << 20, client_role: bool = False
) -> tuple[bytes, bytes, _Counts, str | None]:
    """Feed ``stream``, cut at ``cuts``, through a bridge's frame reader: (bytes
    written to the TCP side, frames written to the WebSocket peer, counters, error)."""
    points = sorted({c for c in cuts if 0 < c < len(stream)} | {0, len(stream)})
    ws = _ScriptedSocket([stream[a:b] for a, b in zip(points, points[1:])])
    tcp = _ScriptedSocket([])
    counts = _Counts()
    bridge = WsBridge(ws, b"", tcp, counts, 0, BufferPool(buffer_size), max_message, client_role=client_role)
    error = None
    try:
        _FrameReader(bridge).run()
    except wsframe.FrameError as exc:
        error = f"{exc.code} {exc.reason}"
    return bytes(tcp.sent), bytes(ws.sent), counts, error


def masked_frame(
    opcode: int,
    payload: bytes,
    fin: bool = True,
    mask: bytes | None = None,
    length_bytes: int | None = None,
    masked: bool = True,
) -> bytes:
    """A client frame (a server frame with ``masked=False``); ``length_bytes`` (2 or 8)
    forces a longer length encoding than needed."""
    key = (os.urandom(4) if mask is None else mask) if masked else None
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if length_bytes == 2:
        head = struct.pack("!BBH", first, bit | 126, len(payload)) + (key or b"")
    elif length_bytes == 8:
        head = struct.pack("!BBQ", first, bit | 127, len(payload)) + (key or b"")
    else:
        head = wsframe.encode_header(opcode, len(payload), key, fin)
    return head + (reference_mask(payload, key) if key else payload)


def mixed_stream(masked: bool = True) -> tuple[bytes, bytes, list[bytes]]:
    """(frames, the data they carry, the ping payloads): every path of the reader."""
    frames, data, pings = [], [], []

    def add(opcode: int, payload: bytes, **kw) -> None:
        frames.append(masked_frame(opcode, payload, masked=masked, **kw))
        if opcode in (wsframe.OP_BINARY, wsframe.OP_TEXT, wsframe.OP_CONTINUATION):
            data.append(payload)
        elif opcode == wsframe.OP_PING:
            pings.append(payload)

    for i in range(5):
        add(wsframe.OP_BINARY, bytes([i]) * 32)  # small whole frames: the fast path
    add(wsframe.OP_BINARY, b"")
    add(wsframe.OP_TEXT, b"t" * 125)
    add(wsframe.OP_BINARY, os.urandom(126))  # 16-bit length
    add(wsframe.OP_BINARY, os.urandom(300))  # unmasked by translate
    add(wsframe.OP_BINARY, b"zero mask", mask=bytes(4))
    add(wsframe.OP_BINARY, b"fragmented ", fin=False)  # a message in three frames ...
    add(wsframe.OP_PING, b"ping inside a message")  # ... with control frames between them
    add(wsframe.OP_CONTINUATION, os.urandom(40), fin=False)
    add(wsframe.OP_PONG, b"unsolicited")
    add(wsframe.OP_CONTINUATION, b" end", fin=True)
    add(wsframe.OP_BINARY, b"long form 16", length_bytes=2)  # non-minimal lengths are accepted
    add(wsframe.OP_BINARY, os.urandom(200), length_bytes=8)
    add(wsframe.OP_PING, b"")
    add(wsframe.OP_BINARY, b"last")
    frames.append(masked_frame(wsframe.OP_CLOSE, struct.pack("!H", 1000), masked=masked))
    frames.append(masked_frame(wsframe.OP_BINARY, b"after the close: never forwarded", masked=masked))
    return b"".join(frames), b"".join(data), pings


def pongs_of(sent: bytes, masked: bool = False) -> list[bytes]:
    """The payloads of the pong frames in ``sent`` (masked ones from a tunnel entry)."""
    pongs, pos = [], 0
    while pos < len(sent):
        header = wsframe.parse_header(sent, pos)
        assert header is not None and (header.mask is not None) == masked and header.opcode == wsframe.OP_PONG
        payload = sent[pos + header.size : pos + header.size + header.length]
        pongs.append(reference_mask(payload, header.mask) if masked else payload)
        pos += header.size + header.length
    return pongs


def test_frames_split_at_every_byte_boundary_arrive_whole() -> None:
    stream, data, pings = mixed_stream()
    for cut in range(1, len(stream)):
        for buffer_size in (
            wsframe.MAX_HEADER,
            4096,
        ):  # the smallest buffer a header fits in, and a roomy one
            forwarded, sent, counts, error = run_reader(stream, [cut], buffer_size)
            assert error is None
            assert forwarded == data, f"cut at {cut}, buffer {buffer_size}"
            assert pongs_of(sent) == pings
            assert counts.bytes_received == len(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 2000), max_size=20), st.integers(wsframe.MAX_HEADER, 3000))
def test_frames_split_anywhere_in_any_buffer_size_arrive_whole(cuts: list[int], buffer_size: int) -> None:
    stream, data, pings = mixed_stream()
    forwarded, sent, counts, error = run_reader(stream, cuts, buffer_size)
    assert error is None and forwarded == data and pongs_of(sent) == pings
    assert counts.bytes_received == len(data)


@pytest.mark.parametrize("fast", [True, False], ids=["small-frame", "general"])
def test_a_bad_frame_still_forwards_what_came_before_it(fast: bool) -> None:
    good = masked_frame(wsframe.OP_BINARY, b"before")
    over = b"x" * 100 if fast else os.urandom(300)  # both over maxMessageSize=64
    stream = good + masked_frame(wsframe.OP_BINARY, over) + masked_frame(wsframe.OP_BINARY, b"after")
    forwarded, _, _, error = run_reader(stream, [], 4096, max_message=64)
    assert forwarded == b"before"
    assert error is not None and error.startswith("1009 ")
    unmasked = good + wsframe.encode_header(wsframe.OP_BINARY, 5) + b"after"
    forwarded, _, _, error = run_reader(unmasked, [], 4096)
    assert forwarded == b"before" and error == "1002 a client must mask its frames"


def test_a_continuation_outside_a_message_and_a_new_message_inside_one_are_refused() -> None:
    for stream in (
        masked_frame(wsframe.OP_BINARY, b"ok") + masked_frame(wsframe.OP_CONTINUATION, b"stray"),
        masked_frame(wsframe.OP_BINARY, b"open", fin=False) + masked_frame(wsframe.OP_BINARY, b"x" * 10),
    ):
        _, _, _, error = run_reader(stream, [], 4096)
        assert error == "1002 unexpected continuation frame"


def test_many_small_frames_in_one_read_go_to_the_target_in_one_write() -> None:
    stream = b"".join(masked_frame(wsframe.OP_BINARY, bytes([i % 251]) * 32) for i in range(100))
    writes = []
    tcp = _ScriptedSocket([])
    tcp.send = lambda view: writes.append(bytes(view)) or len(view)
    bridge = WsBridge(
        _ScriptedSocket([stream]), b"", tcp, _Counts(), 0, BufferPool(65536), 1 << 20, client_role=False
    )
    _FrameReader(bridge).run()
    assert writes == [b"".join(bytes([i % 251]) * 32 for i in range(100))]


def test_a_tunnel_entry_reads_unmasked_frames_split_at_every_byte_boundary() -> None:
    stream, data, pings = mixed_stream(masked=False)
    for cut in range(1, len(stream)):
        forwarded, sent, counts, error = run_reader(stream, [cut], wsframe.MAX_HEADER, client_role=True)
        assert error is None and forwarded == data, f"cut at {cut}"
        assert pongs_of(sent, masked=True) == pings  # a client masks even its pongs
        assert counts.bytes_sent == len(data)
    _, _, _, error = run_reader(masked_frame(wsframe.OP_BINARY, b"x"), [], 4096, client_role=True)
    assert error == "1002 a server must not mask its frames"
