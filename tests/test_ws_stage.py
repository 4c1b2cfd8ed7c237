"""The WebSocket codec as a stage of the hub relay (gportmap.engine.wsstage).

The stage alone, sans-IO: bytes in, payloads and answers out, in both roles,
whatever the cuts. Then end to end through gportmap with websocket-client, ws and
wss, the tunnel over targetTls, and the point of it all: a held WebSocket
connection holds no greenlet (counted by a probe inside the gportmap process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import sys
import threading
from pathlib import Path

import pytest
import websocket
from certs import CA
from conftest import (
    LOOPBACK,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    tcp_rule,
    wait_for,
)

from gportmap.engine import wsframe
from gportmap.engine.stage import NEED_DATA, Chain
from gportmap.engine.tls import TlsStage
from gportmap.engine.wsstage import WsError, WsStage

MB = 1 << 20

# -- helpers -----------------------------------------------------------------------


def masked(opcode: int, payload: bytes, fin: bool = True, length: int | None = None) -> bytes:
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return wsframe.encode_header(opcode, len(payload) if length is None else length, key, fin) + body


def plain(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return wsframe.encode_header(opcode, len(payload), None, fin) + payload


def drain(stage: WsStage, size: int = 65536) -> tuple[bytes, bool]:
    """Everything ``read_into`` gives now: (payload bytes, whether the end came)."""
    out, buf = bytearray(), memoryview(bytearray(size))
    while True:
        n = stage.read_into(buf)
        if n == NEED_DATA:
            return bytes(out), False
        if n == 0:
            return bytes(out), True
        out += buf[:n]


def frames_of(data: bytes) -> list[tuple[int, bytes, bool]]:
    """(opcode, unmasked payload, masked?) of every frame in ``data``."""
    frames, pos = [], 0
    while pos < len(data):
        header = wsframe.parse_header(data, pos)
        assert header is not None, "a partial frame"
        start = pos + header.size
        payload = bytearray(data[start : start + header.length])
        if header.mask is not None:
            wsframe.unmask_range(payload, 0, len(payload), header.mask)
        frames.append((header.opcode, bytes(payload), header.mask is not None))
        pos = start + header.length
    return frames


def feed_in_cuts(stage: WsStage, stream: bytes, step: int, buffer: int = 65536) -> tuple[bytes, bool, bytes]:
    """Feed ``stream`` ``step`` bytes at a time, reading out after each feed, as the
    relay does: (payloads, ended, answers)."""
    out, answers, ended = bytearray(), bytearray(), False
    for pos in range(0, len(stream), step):
        stage.feed(stream[pos : pos + step])
        got, ended = drain(stage, buffer)
        out += got
        answers += stage.data_to_send()
        if ended:
            break
    return bytes(out), ended, bytes(answers)


def mixed_stream(mask: bool = True) -> tuple[bytes, bytes, list[bytes]]:
    """Frames of every kind: (stream, the data it carries, ping payloads)."""
    make = masked if mask else plain
    parts = [
        (wsframe.OP_BINARY, b"whole message", True),
        (wsframe.OP_TEXT, b"first half, ", False),
        (wsframe.OP_PING, b"ping between fragments", True),
        (wsframe.OP_CONTINUATION, b"middle, ", False),
        (wsframe.OP_PONG, b"unsolicited pong", True),
        (wsframe.OP_CONTINUATION, b"last half", True),
        (wsframe.OP_BINARY, os.urandom(300), True),  # past the small-XOR size
        (wsframe.OP_BINARY, b"", True),
        (wsframe.OP_BINARY, os.urandom(70000), True),  # a 64-bit length
        (wsframe.OP_PING, b"", True),
    ]
    stream, data, pings = b"", b"", []
    for opcode, payload, fin in parts:
        stream += make(opcode, payload, fin)
        if opcode == wsframe.OP_PING:
            pings.append(payload)
        elif opcode < wsframe.OP_CLOSE:
            data += payload
    return stream, data, pings


# -- the stage alone ------------------------------------------------------------------


@pytest.mark.parametrize("client_role", [False, True], ids=["server", "client"])
def test_every_kind_of_frame_fed_a_byte_at_a_time_gives_the_data_and_the_pongs(client_role: bool) -> None:
    stream, data, pings = mixed_stream(mask=not client_role)
    for step in (1, 7, 4096, len(stream)):
        stage = WsStage(client_role, 1 << 20)
        out, ended, answers = feed_in_cuts(stage, stream, step)
        assert out == data and not ended, f"step {step}"
        pongs = frames_of(answers)
        assert [p for _, p, _ in pongs] == pings
        assert all(op == wsframe.OP_PONG and was_masked == client_role for op, _, was_masked in pongs)


def test_a_small_caller_buffer_gets_payloads_in_pieces_and_loses_nothing() -> None:
    stream, data, _ = mixed_stream()
    stage = WsStage.server(1 << 20)
    stage.feed(stream)
    out, ended = drain(stage, size=5)
    assert out == data and not ended


def test_payloads_of_a_read_are_joined_into_one_chunk() -> None:
    stage = WsStage.server(1 << 20)
    stage.feed(b"".join(masked(wsframe.OP_BINARY, bytes([i]) * 10) for i in range(50)))
    buf = memoryview(bytearray(65536))
    assert stage.read_into(buf) == 500  # one chunk for the relay: one send
    assert bytes(buf[:500]) == b"".join(bytes([i]) * 10 for i in range(50))
    assert stage.read_into(buf) == NEED_DATA


def test_an_oversized_announcement_is_refused_from_its_header_alone() -> None:
    stage = WsStage.server(1 << 20)
    stage.feed(wsframe.encode_header(wsframe.OP_BINARY, 2 << 30, b"\1\2\3\4"))  # 2 GiB, no payload
    with pytest.raises(WsError) as refused:
        stage.read_into(memoryview(bytearray(100)))
    assert refused.value.code == wsframe.CLOSE_TOO_BIG and "maxMessageSize" in str(refused.value)
    (close,) = frames_of(stage.goodbye("client_error", str(refused.value)))
    assert close[0] == wsframe.OP_CLOSE and wsframe.parse_close(close[1]) == 1009


def test_a_message_too_big_across_fragments_is_refused_after_what_came_before() -> None:
    stage = WsStage.server(100)
    stage.feed(masked(wsframe.OP_BINARY, b"a" * 60, fin=False) + masked(wsframe.OP_CONTINUATION, b"b" * 60))
    buf = memoryview(bytearray(1000))
    assert stage.read_into(buf) == 60  # the first fragment went on before the second was seen
    with pytest.raises(WsError) as refused:
        stage.read_into(buf)
    assert refused.value.code == 1009 and "120 bytes" in str(refused.value)


@pytest.mark.parametrize(
    "client_role,frame,why",
    [
        (False, plain(wsframe.OP_BINARY, b"x"), "a client must mask its frames"),
        (True, masked(wsframe.OP_BINARY, b"x"), "a server must not mask its frames"),
        (False, masked(wsframe.OP_CONTINUATION, b"x"), "unexpected continuation frame"),
        (False, bytes([0x80 | 0x3, 0x80]) + b"\0" * 4, "unknown opcode 0x3"),
        (False, masked(wsframe.OP_PING, b"p", fin=False), "control frames must be whole"),
    ],
)
def test_protocol_errors_answer_1002(client_role: bool, frame: bytes, why: str) -> None:
    stage = WsStage(client_role, 1 << 20)
    stage.feed(frame)
    with pytest.raises(WsError) as refused:
        stage.read_into(memoryview(bytearray(100)))
    assert refused.value.code == 1002 and why in str(refused.value)
    (close,) = frames_of(stage.goodbye(f"{stage.peer_side}_error", str(refused.value)))
    assert wsframe.parse_close(close[1]) == 1002 and close[2] == client_role


def test_the_client_role_masks_what_it_sends_and_the_server_role_does_not() -> None:
    payload = os.urandom(1000)
    client, server = WsStage.client(1 << 20), WsStage.server(1 << 20)
    ((opcode, carried, was_masked),) = frames_of(client.encode(payload))
    assert (opcode, carried, was_masked) == (wsframe.OP_BINARY, payload, True)
    assert client.encode(payload) != client.encode(payload)  # a new key per frame
    ((opcode, carried, was_masked),) = frames_of(server.encode(payload))
    assert (opcode, carried, was_masked) == (wsframe.OP_BINARY, payload, False)
    server.feed(client.encode(payload))  # and the two roles understand each other
    assert drain(server) == (payload, False)


def test_the_peers_close_is_the_end_and_nothing_after_it_is_read() -> None:
    stage = WsStage.server(1 << 20)
    stage.feed(masked(wsframe.OP_BINARY, b"last words") + masked(wsframe.OP_CLOSE, wsframe.close_payload(1000))
               + masked(wsframe.OP_BINARY, b"after the close"))
    assert drain(stage) == (b"last words", True)
    stage.feed(masked(wsframe.OP_BINARY, b"still later"))
    assert not stage.has_input and stage.read_into(memoryview(bytearray(10))) == 0


def test_a_transport_end_is_an_end_even_in_the_middle_of_a_frame() -> None:
    stage = WsStage.server(1 << 20)
    stage.feed(masked(wsframe.OP_BINARY, b"complete") + masked(wsframe.OP_BINARY, b"cut short")[:9])
    assert drain(stage) == (b"completecut", False)  # a payload goes on as it comes
    stage.feed_eof()
    assert stage.has_input
    assert drain(stage) == (b"", True)


def test_close_is_sent_once_and_ends_the_connection_not_the_transport() -> None:
    stage = WsStage.server(1 << 20)
    assert stage.half_close is False  # the relay shuts nothing: the peer may go on sending
    (close,) = frames_of(stage.close())
    assert close[0] == wsframe.OP_CLOSE and wsframe.parse_close(close[1]) == 1000
    assert stage.close() == b"" and stage.encode(b"too late") == b""
    stage.feed(masked(wsframe.OP_PING, b"?"))
    drain(stage)
    assert stage.data_to_send() == b""  # no pong after our Close
    assert stage.goodbye("idle_timeout", None) == b""  # one Close only


@pytest.mark.parametrize(
    "reason,error,code,told",
    [
        ("idle_timeout", None, 1001, b""),
        ("stopped", None, 1001, b""),
        ("target_error", "Connection reset by peer", 1011, b"Connection reset by peer"),
        ("internal_error", "Traceback: secret details", 1011, b"internal error"),
        ("client_error", "Connection reset by peer", None, None),  # the peer's own transport
        ("closed", None, None, None),
    ],
)
def test_a_cut_tells_the_peer_why_as_the_bridge_did(reason: str, error: str | None, code: int | None, told) -> None:
    word = WsStage.server(1 << 20).goodbye(reason, error)
    if code is None:
        assert word == b""
        return
    ((opcode, payload, _),) = frames_of(word)
    assert opcode == wsframe.OP_CLOSE and wsframe.parse_close(payload) == code and payload[2:] == told


def test_a_ping_flood_leaves_a_bounded_answer() -> None:
    stage = WsStage.server(1 << 20)
    pings = [os.urandom(100) for _ in range(500)]
    stage.feed(b"".join(masked(wsframe.OP_PING, p) for p in pings))
    assert drain(stage) == (b"", False)
    answers = stage.data_to_send()
    assert len(answers) <= WsStage.max_answers
    assert frames_of(answers)[-1][1] == pings[-1]  # the latest ping is always answered


def test_what_the_stage_holds_is_one_feed_and_a_partial_header() -> None:
    stage = WsStage.server(1 << 30)
    big = masked(wsframe.OP_BINARY, os.urandom(200_000))
    buf = memoryview(bytearray(65536))
    for pos in range(0, len(big), 65536):
        stage.feed(big[pos : pos + 65536])
        while stage.read_into(buf) != NEED_DATA:
            pass
        assert len(stage._in) == 0  # payload goes out as it comes: nothing kept, no buffer
    stage.feed(masked(wsframe.OP_BINARY, b"x" * 300)[:3])
    assert stage.read_into(buf) == NEED_DATA and len(stage._in) - stage._pos == 3


def test_a_chain_of_tls_and_websocket_carries_frames_both_ways(tmp_path: Path) -> None:
    """wss as the relay sees it: a TLS stage outside a WebSocket stage, against a
    TLS client made of memory BIOs speaking frames."""
    ca = CA(tmp_path, "ca")
    issued = ca.issue("server", "127.0.0.1", ips=("127.0.0.1",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(issued.cert, issued.key)
    client_ctx = ssl.create_default_context(cafile=str(ca.path))
    chain = Chain([TlsStage.server(server_ctx), WsStage.server(1 << 20)])
    tls = chain.stages[0]
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client_ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    for _ in range(10):  # the handshake, flight by flight
        try:
            peer.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        tls.feed(outgoing.read())
        if not tls.handshaken:
            tls.handshake()
        incoming.write(tls.data_to_send())
        if done and tls.handshaken:
            break
    peer.write(masked(wsframe.OP_BINARY, b"hello through TLS") + masked(wsframe.OP_PING, b"are you there"))
    chain.feed(outgoing.read())
    assert drain(chain) == (b"hello through TLS", False)  # type: ignore[arg-type]
    incoming.write(chain.data_to_send())  # the pong, encrypted
    incoming.write(chain.encode(b"and back"))
    received = b""
    while True:
        try:
            received += peer.read(65536)
        except ssl.SSLWantReadError:
            break
    assert [(op, p) for op, p, _ in frames_of(received)] == [
        (wsframe.OP_PONG, b"are you there"), (wsframe.OP_BINARY, b"and back")]
    incoming.write(chain.close())  # the Close frame; no close_notify: the connection's end is the transport's
    closing = frames_of(peer.read(65536))
    assert closing[0][0] == wsframe.OP_CLOSE and not chain.half_close


# -- end to end ----------------------------------------------------------------------


def ws_rule(port: int, target: int, **extra) -> dict:
    return {"protocol": "websocket", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
            "targetPort": target, **extra}


@pytest.fixture
def cert(tmp_path: Path):
    ca = CA(tmp_path, "ca")
    issued = ca.issue("server", "127.0.0.1", ips=("127.0.0.1",))
    return {"certFile": str(issued.cert), "keyFile": str(issued.key)}, ca.path


def exchange(ws: websocket.WebSocket, total: int, size: int) -> None:
    data = os.urandom(total)
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


@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
def test_a_websocket_client_through_the_stage(start_gportmap, echo_target, cert, secure: bool) -> None:
    """websocket-client: bulk both ways, a fragmented message with a ping between
    its fragments, the pong, the close handshake mapped to a half-close."""
    port = free_port()
    tls, ca_path = cert
    extra = {"tls": tls} if secure else {}
    gp = start_gportmap([ws_rule(port, echo_target.port, name="ws", **extra)])
    scheme, sslopt = ("wss", {"ca_certs": str(ca_path)}) if secure else ("ws", None)
    ws = websocket.create_connection(f"{scheme}://127.0.0.1:{port}/", subprotocols=["binary"], sslopt=sslopt)
    exchange(ws, 4 * MB, 65536)
    ws.send_frame(websocket.ABNF.create_frame(b"frag", websocket.ABNF.OPCODE_BINARY, fin=0))
    ws.ping(b"between")
    ws.send_frame(websocket.ABNF.create_frame(b"mented", websocket.ABNF.OPCODE_CONT, fin=1))
    got, pong = b"", None
    while len(got) < len(b"fragmented") or pong is None:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_PONG:
            pong = frame.data
        else:
            got += frame.data
    assert got == b"fragmented" and pong == b"between"
    ws.send_close(1000)  # the echo target sees its end and ends: our Close(1000) comes back
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", frame.data[:2])[0] == 1000
    ws.shutdown()
    (closed,) = gp.wait_event("connection_closed", rule="ws")
    assert closed["reason"] == "closed"
    assert closed["bytes_received"] == closed["bytes_sent"] == 4 * MB + len(b"fragmented")


def test_what_the_target_sends_before_its_end_arrives_before_the_close(start_gportmap, cert) -> None:
    """TCP EOF -> Close(1000), after everything before it."""
    payload = os.urandom(3 * MB)
    server = socket.create_server((LOOPBACK, 0))

    def target() -> None:
        conn, _ = server.accept()
        conn.sendall(payload)
        conn.close()

    thread = threading.Thread(target=target)
    thread.start()
    port = free_port()
    tls, ca_path = cert
    gp = start_gportmap([ws_rule(port, server.getsockname()[1], name="ws", tls=tls)])
    ws = websocket.create_connection(f"wss://127.0.0.1:{port}/", sslopt={"ca_certs": str(ca_path)})
    got = bytearray()
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        got += frame.data
    assert bytes(got) == payload and struct.unpack("!H", frame.data[:2])[0] == 1000
    ws.send_close(1000)
    ws.shutdown()
    thread.join(10)
    server.close()
    assert gp.wait_event("connection_closed", rule="ws")[0]["bytes_sent"] == len(payload)


def test_a_tunnel_over_target_tls_to_a_wss_exit(start_gportmap, echo_target, cert) -> None:
    """tcp -> (WebSocket stage inside a TLS stage) -> wss exit -> TCP: 10 MB each
    way and the half-close, counted exactly at both ends."""
    tls, ca_path = cert
    exit_port, entry_port = free_port(), free_port()
    gp = start_gportmap([
        ws_rule(exit_port, echo_target.port, name="exit", path="/t", tls=tls),
        tcp_rule(entry_port, exit_port, name="entry", targetProtocol="websocket", targetPath="/t",
                 targetTls={"caFile": str(ca_path), "serverName": "127.0.0.1"}),
    ])
    data = os.urandom(10 * MB)
    sock = connect(entry_port, timeout=60)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_until_eof(sock)))
    reader.start()
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    reader.join(60)
    sock.close()
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(data).digest()
    entry = gp.wait_event("connection_closed", rule="entry")[0]
    exit_ = gp.wait_event("connection_closed", rule="exit")[0]
    assert entry["reason"] == exit_["reason"] == "closed"
    assert entry["bytes_received"] == entry["bytes_sent"] == exit_["bytes_received"] == len(data)


@pytest.mark.slow  # waits out an idle timeout
def test_an_idle_websocket_is_told_going_away(start_gportmap, echo_target) -> None:
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="ws", idleTimeout=1)])
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=30)
    ws.send_binary(b"once")
    assert ws.recv() == b"once"
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", frame.data[:2])[0] == 1001
    assert gp.wait_event("connection_closed", rule="ws")[0]["reason"] == "idle_timeout"
    ws.shutdown()


# -- no greenlet per held connection --------------------------------------------------

PROBE = '''
import gc, os, signal

def _count(signum, frame):
    from greenlet import greenlet
    gc.unfreeze()  # gportmap freezes what start-up made (the hub among it): count that too
    alive = sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and o)
    gc.freeze()
    path = os.environ["GPORTMAP_GREENLET_PROBE"]
    with open(path + ".tmp", "w") as out:
        out.write(str(alive))
    os.replace(path + ".tmp", path)

if os.environ.get("GPORTMAP_GREENLET_PROBE"):
    signal.signal(signal.SIGWINCH, _count)
'''


def greenlets(gp, path: Path) -> int:
    """Greenlets alive in the gportmap process, counted by the probe on SIGWINCH."""
    path.unlink(missing_ok=True)
    gp.signal(signal.SIGWINCH)
    return wait_for(lambda: path.exists() and int(path.read_text()), what="the probe's count")


def test_held_websocket_connections_hold_no_greenlet(start_gportmap, echo_target, cert, tmp_path: Path) -> None:
    """ws, wss and tunnel connections, upgraded and held after a message: the
    process has as many greenlets as it had with none (the bridge had two per
    connection, plus its handler's)."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    count_file = tmp_path / "greenlets"
    env = {"PYTHONPATH": os.pathsep.join([str(probe_dir), *sys.path]), "GPORTMAP_GREENLET_PROBE": str(count_file)}
    tls, ca_path = cert
    ws_port, wss_port, entry_port = free_port(), free_port(), free_port()
    gp = start_gportmap([
        ws_rule(ws_port, echo_target.port, name="ws", path="/t"),
        ws_rule(wss_port, echo_target.port, name="wss", tls=tls),
        tcp_rule(entry_port, ws_port, name="entry", targetProtocol="websocket", targetPath="/t"),
    ], env=env)
    before = greenlets(gp, count_file)
    held: list = []
    try:
        for _ in range(10):
            ws = websocket.create_connection(f"ws://127.0.0.1:{ws_port}/t")
            wss = websocket.create_connection(f"wss://127.0.0.1:{wss_port}/", sslopt={"ca_certs": str(ca_path)})
            entry = connect(entry_port)
            for client in (ws, wss):
                client.send_binary(b"held")
                assert client.recv() == b"held"
            entry.sendall(b"held")
            assert recv_exactly(entry, 4) == b"held"
            held += [ws, wss, entry]
        stats = {r["name"]: r["connections"]["active"] for r in gp.admin_json("/stats")["rules"]}
        assert stats == {"ws": 20, "wss": 10, "entry": 10}  # 10 of ws's are the tunnels' exits
        # The handlers' greenlets end right after they hand over: wait for that.
        wait_for(lambda: greenlets(gp, count_file) <= before, timeout=10, what="no greenlet per connection")
    finally:
        for client in held:
            client.close()
    gp.wait_event("connection_closed", count=40)
    assert all(json.dumps(r["reason"]) == '"closed"' for r in gp.events("connection_closed"))


def test_a_stop_tells_held_websockets_going_away(start_gportmap, echo_target) -> None:
    """A stop that outlasts drainTimeout cuts what is left: each WebSocket peer gets
    Close(1001) (the bridge's greenlets were killed without a word)."""
    port = free_port()
    rules = {"settings": {"drainTimeout": 0.5}, "rules": [ws_rule(port, echo_target.port, name="ws")]}
    gp = start_gportmap(rules)
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=30)
    ws.send_binary(b"held")
    assert ws.recv() == b"held"
    gp.signal(signal.SIGTERM)
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", frame.data[:2])[0] == 1001
    assert gp.wait_event("connection_closed", rule="ws")[0]["reason"] == "stopped"
    ws.shutdown()
    assert gp.wait_exit() == 0


def test_a_failed_wss_handshake_is_a_tls_rejection(start_gportmap, echo_target, cert) -> None:
    port = free_port()
    tls, _ = cert
    gp = start_gportmap([ws_rule(port, echo_target.port, name="wss", tls=tls)])
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # HTTP where a ClientHello should be
        with contextlib.suppress(ConnectionResetError):
            assert b"HTTP" not in recv_until_eof(sock)  # no upgrade answered: at most an alert
    (rejected,) = gp.wait_event("connection_rejected", rule="wss")
    assert rejected["reason"] == "tls"
    stats = next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == "wss")["connections"]
    assert (stats["rejected_by_reason"]["tls"], stats["active"], stats["handshaking"]) == (1, 0, 0)


# -- on_data plugins as a stage (plugins that say may_block = False) ------------------

LOOP_PLUGINS = '''
from gportmap.plugins import Plugin


class LoopUpper(Plugin):
    """Upstream upper-cased, fails on b"boom"; promises never to wait."""

    may_block = False

    def on_data(self, conn, direction, data):
        if b"boom" in data:
            raise RuntimeError("the plugin blew up")
        return data.upper() if direction == "upstream" else data


class LoopDouble(Plugin):
    """Downstream doubled: a result bigger than the read it came from."""

    may_block = False

    def on_data(self, conn, direction, data):
        return data * 2 if direction == "downstream" else data


class LoopSwallow(Plugin):
    may_block = False

    def on_data(self, conn, direction, data):
        return b"" if direction == "upstream" else data
'''


@pytest.fixture
def loop_plugins(tmp_path: Path) -> dict[str, str]:
    """A plugin module on the gportmap process's path, and the greenlet probe."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "loop_plugins.py").write_text(LOOP_PLUGINS)
    (folder / "sitecustomize.py").write_text(PROBE)
    return {"PYTHONPATH": os.pathsep.join([str(folder), *sys.path]),
            "GPORTMAP_GREENLET_PROBE": str(tmp_path / "greenlets")}


def plugins(*names: str) -> list[dict]:
    return [{"name": f"loop_plugins:{name}"} for name in names]


def test_on_data_in_the_loop_transforms_counts_and_holds_no_greenlet(start_gportmap, echo_target, loop_plugins,
                                                                     tmp_path: Path) -> None:
    tcp_port, ws_port = free_port(), free_port()
    gp = start_gportmap([
        tcp_rule(tcp_port, echo_target.port, name="tcp", plugins=plugins("LoopUpper", "LoopDouble")),
        ws_rule(ws_port, echo_target.port, name="ws", plugins=plugins("LoopUpper", "LoopDouble")),
    ], env=loop_plugins)
    count_file = Path(loop_plugins["GPORTMAP_GREENLET_PROBE"])
    before = greenlets(gp, count_file)
    payload = b"a" * 100_000  # several reads, results past a buffer; doubled it stays all b"A"
    sock = connect(tcp_port, timeout=30)
    ws = websocket.create_connection(f"ws://127.0.0.1:{ws_port}/", timeout=30)
    try:
        sock.sendall(payload)
        assert recv_exactly(sock, 2 * len(payload)) == b"A" * 2 * len(payload)
        ws.send_binary(b"to the target")
        got = b""
        while len(got) < 2 * len(b"to the target"):
            got += ws.recv()
        assert got == b"TO THE TARGET" * 2
        wait_for(lambda: greenlets(gp, count_file) <= before, what="no greenlet per held connection")
    finally:
        sock.close()
        ws.close()
    closed = {r["rule"]: r for r in gp.wait_event("connection_closed", count=2)}
    assert closed["tcp"]["bytes_received"] == len(payload) and closed["tcp"]["bytes_sent"] == 2 * len(payload)
    assert closed["ws"]["bytes_received"] == 13 and closed["ws"]["bytes_sent"] == 26


def test_on_data_in_the_loop_doubles_every_chunk_in_order(start_gportmap, echo_target, loop_plugins) -> None:
    port = free_port()
    start_gportmap([tcp_rule(port, echo_target.port, name="tcp", plugins=plugins("LoopDouble"))], env=loop_plugins)
    with connect(port, timeout=30) as sock:
        sock.sendall(b"ab")
        assert recv_exactly(sock, 4) == b"abab"  # one echo chunk, doubled as it came


def test_a_failing_on_data_in_the_loop_is_a_plugin_error(start_gportmap, echo_target, loop_plugins) -> None:
    tcp_port, ws_port = free_port(), free_port()
    gp = start_gportmap([
        tcp_rule(tcp_port, echo_target.port, name="tcp", plugins=plugins("LoopUpper")),
        ws_rule(ws_port, echo_target.port, name="ws", plugins=plugins("LoopUpper")),
    ], env=loop_plugins)
    with connect(tcp_port) as sock:
        sock.sendall(b"boom")
        assert recv_until_eof(sock) == b""
    ws = websocket.create_connection(f"ws://127.0.0.1:{ws_port}/", timeout=30)
    ws.send_binary(b"boom")
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", frame.data[:2])[0] == 1011
    ws.shutdown()
    closed = {r["rule"]: r for r in gp.wait_event("connection_closed", count=2)}
    assert closed["tcp"]["reason"] == closed["ws"]["reason"] == "plugin_error"
    errors = gp.wait_event("plugin_error", count=2)
    assert {e["rule"] for e in errors} == {"tcp", "ws"}
    assert all(e["plugin"] == "loop_plugins:LoopUpper" and e["hook"] == "on_data" for e in errors)


def test_on_data_in_the_loop_may_pass_nothing(start_gportmap, loop_plugins) -> None:
    seen: list[bytes] = []
    server = socket.create_server((LOOPBACK, 0))

    def target() -> None:
        conn, _ = server.accept()
        seen.append(recv_until_eof(conn))
        conn.close()

    thread = threading.Thread(target=target)
    thread.start()
    port = free_port()
    gp = start_gportmap([tcp_rule(port, server.getsockname()[1], name="swallow", plugins=plugins("LoopSwallow"))],
                        env=loop_plugins)
    with connect(port) as sock:
        sock.sendall(b"seventeen bytes!!")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    thread.join(10)
    server.close()
    assert seen == [b""]
    (closed,) = gp.wait_event("connection_closed", rule="swallow")
    assert closed["bytes_received"] == 17  # received from the client, not passed on


def test_the_transform_stage_alone() -> None:
    """Sans-IO: a result bigger than the caller's buffer comes out in pieces; an
    empty one gives nothing; a failure is a TransformError ending as plugin_error."""
    from gportmap.engine.stage import TransformError, TransformStage
    from gportmap.plugins import HookError

    def transform(direction: str, data: bytes) -> bytes:
        if data == b"boom":
            raise HookError("sample", "on_data", RuntimeError("blew up"))
        return data * 3 if direction == "downstream" else data.upper()

    stage = TransformStage(transform, "rule", "client")
    assert stage.encode(b"up") == b"UP"
    stage.feed(b"abcd")
    buf = memoryview(bytearray(5))
    pieces = []
    while (n := stage.read_into(buf)) != NEED_DATA:
        pieces.append(bytes(buf[:n]))
    assert pieces == [b"abcda", b"bcdab", b"cd"] and not stage.has_input
    stage.feed(b"boom")
    with pytest.raises(TransformError) as failed:
        stage.read_into(buf)
    assert failed.value.close_reason == "plugin_error" and "blew up" in str(failed.value)
    stage.feed_eof()
    assert stage.read_into(buf) == 0


def test_a_protocol_error_over_wss_is_answered_1002_through_tls(start_gportmap, echo_target, cert) -> None:
    """The stage's last word goes out through the stage outside it (TLS)."""
    port = free_port()
    tls, ca_path = cert
    gp = start_gportmap([ws_rule(port, echo_target.port, name="wss", tls=tls)])
    context = ssl.create_default_context(cafile=str(ca_path))
    with context.wrap_socket(connect(port), server_hostname="127.0.0.1") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                     + plain(wsframe.OP_BINARY, b"unmasked"))  # the frame right behind the request
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(1)
        assert answer.startswith(b"HTTP/1.1 101")
        rest = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                rest += chunk
    ((opcode, payload, was_masked),) = frames_of(rest)
    assert opcode == wsframe.OP_CLOSE and wsframe.parse_close(payload) == 1002 and not was_masked
    assert payload[2:] == b"a client must mask its frames"
    (closed,) = gp.wait_event("connection_closed", rule="wss")
    assert closed["reason"] == "client_error" and closed["error"] == "a client must mask its frames"
