"""Hostile input, fuzzed with hypothesis (issue 11).

- the WebSocket frame parser (``gportmap.engine.wsframe``): arbitrary bytes give a header,
  "need more bytes" or a FrameError, never another exception; encode -> parse is
  exact; unmasking is its own inverse and the same in any number of pieces;
- the bridge's frame reader, over a real websocket rule: arbitrary byte streams
  close only their own connection, the process keeps serving the others, and valid
  streams cut at arbitrary points are echoed back byte for byte;
- the admin endpoint: malformed HTTP requests never touch forwarding, and
  ``/healthz`` keeps answering;
- the rules loader, where ``tests/test_config.py`` stops: nested ``tls``/``targetTls``
  objects with hostile file names and server names, and plausible ``settings``.
- the PROXY protocol writer (``gportmap.engine.proxyproto``): any IPv4, IPv6 or
  IPv4-mapped addresses and ports read back the same through a reference reader,
  v1 stays within 107 bytes, and any odd address shape gives UNKNOWN / LOCAL
  instead of an exception.

Every hypothesis run is bounded (``max_examples``) so that the file stays within a
few seconds per test; the examples that talk to gportmap share one process per test.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import struct

import pytest
import websocket
from conftest import LOOPBACK, closed_by_peer, connect, free_port, recv_exactly, tcp_rule, wait_for
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_websocket import handshake, ws_rule

from gportmap.config import Config, parse
from gportmap.engine import proxyproto, wsframe
from gportmap.errors import ConfigError

# Examples that drive a live gportmap: a function-scoped fixture outside @given is
# the point (one process per test, shared by its examples).
LIVE = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- the frame parser, in process ------------------------------------------------

opcodes = st.sampled_from(sorted(wsframe.DATA_OPCODES | wsframe.CONTROL_OPCODES))
masks = st.none() | st.binary(min_size=4, max_size=4)
lengths = st.one_of(
    st.integers(0, 125),
    st.sampled_from([126, 127, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 63) - 1]),
    st.integers(0, (1 << 63) - 1),
)


@pytest.mark.slow  # a fuzzer (2,000 examples)
@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=40))
def test_parse_header_gives_a_header_needs_more_or_raises_frame_error(data: bytes) -> None:
    try:
        header = wsframe.parse_header(data)
    except wsframe.FrameError as exc:
        assert exc.code == wsframe.CLOSE_PROTOCOL_ERROR and exc.reason
        return
    if header is None:
        assert len(data) < wsframe.MAX_HEADER
        return
    assert 2 <= header.size <= min(len(data), wsframe.MAX_HEADER)
    assert header.opcode in wsframe.DATA_OPCODES | wsframe.CONTROL_OPCODES
    assert 0 <= header.length < 1 << 63
    assert header.mask is None or len(header.mask) == 4
    if header.opcode in wsframe.CONTROL_OPCODES:
        assert header.fin and header.length <= 125
    # More bytes behind a complete header change nothing: the reader can parse a
    # header out of a buffer that already holds the payload.
    assert wsframe.parse_header(data + b"\xff" * 16) == header


@pytest.mark.slow  # a fuzzer (1,000 examples)
@settings(max_examples=1000, deadline=None)
@given(opcodes, lengths, masks, st.booleans(), st.binary(max_size=20))
def test_encode_then_parse_is_exact(opcode: int, length: int, mask: bytes | None, fin: bool, rest: bytes) -> None:
    encoded = wsframe.encode_header(opcode, length, mask, fin)
    control_ok = opcode not in wsframe.CONTROL_OPCODES or (fin and length <= 125)
    for cut in range(len(encoded)):  # every strict prefix asks for more bytes (or fails early)
        try:
            assert wsframe.parse_header(encoded[:cut]) is None
        except wsframe.FrameError:
            assert not control_ok
    try:
        header = wsframe.parse_header(encoded + rest)
    except wsframe.FrameError:
        assert not control_ok
        return
    assert control_ok
    assert header == wsframe.Header(fin, opcode, length, mask, len(encoded))


def reference_mask(data: bytes, mask: bytes, offset: int) -> bytes:
    return bytes(b ^ mask[(offset + i) % 4] for i, b in enumerate(data))


@pytest.mark.slow  # a fuzzer (500 examples)
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.integers(0, 1 << 40), st.lists(st.integers(0, 300), max_size=4))
def test_mask_in_place_matches_the_rfc_in_any_number_of_pieces(data: bytes, mask: bytes, offset: int, cuts: list[int]) -> None:
    buf = bytearray(b"<" + data + b">")  # a slice of a larger buffer, as the reader uses it
    view = memoryview(buf)[1 : 1 + len(data)]
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:]):
        wsframe.mask_in_place(view[start:end], mask, offset + start)
    assert bytes(buf[1:-1]) == reference_mask(data, mask, offset)
    assert buf[:1] == b"<" and buf[-1:] == b">"  # nothing outside the slice is touched
    wsframe.mask_in_place(view, mask, offset)
    assert bytes(view) == data  # XOR twice is the identity


# --- the bridge's frame reader, over a real websocket rule ------------------------


def masked(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x11\x22\x33\x44") -> bytes:
    body = bytearray(payload)
    wsframe.mask_in_place(memoryview(body), mask)
    return wsframe.encode_header(opcode, len(payload), mask, fin) + bytes(body)


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """One unmasked frame from gportmap; None at EOF."""
    head = recv_exactly(sock, 2)
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", recv_exactly(sock, 8))
    assert not head[1] & 0x80, "a server must not mask"
    return head[0] & 0x0F, recv_exactly(sock, length)


# Pieces of a hostile stream: well-formed frames of every kind, frames that break one
# rule each, raw garbage, and headers that announce more than will ever come.
frame_pieces = st.one_of(
    st.builds(masked, opcodes, st.binary(max_size=200), st.booleans()),
    st.builds(lambda p: masked(wsframe.OP_BINARY, p), st.binary(max_size=2000)),
    st.builds(lambda op, p: wsframe.encode_header(op, len(p)) + p, opcodes, st.binary(max_size=50)),  # unmasked
    st.builds(lambda bits, p: bytes([0x82 | bits]) + masked(2, p)[1:], st.sampled_from([0x10, 0x20, 0x40]), st.binary(max_size=20)),
    st.builds(lambda op: bytes([0x80 | op, 0x80]) + b"\0\0\0\0", st.integers(3, 7) | st.integers(0xB, 0xF)),
    st.builds(lambda n: wsframe.encode_header(wsframe.OP_BINARY, n, b"abcd"), st.integers(0, (1 << 63) - 1)),
    st.builds(lambda n: bytes([0x82, 0xFF]) + struct.pack("!Q", n) + b"abcd", st.integers(1 << 63, (1 << 64) - 1)),
    st.binary(max_size=64),
)
hostile_streams = st.lists(frame_pieces, max_size=12).map(b"".join) | st.binary(max_size=4096)


@pytest.mark.slow  # a fuzzer against a live gportmap
def test_arbitrary_byte_streams_close_only_their_own_connection(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="fz", path="/fz", maxMessageSize=4096, idleTimeout=5)])
    steady = websocket.create_connection(f"ws://{LOOPBACK}:{port}/fz", timeout=10)
    fds = gp.open_fds()
    examples = 0

    @LIVE
    @given(hostile_streams, st.booleans())
    def feed(stream: bytes, half_close: bool) -> None:
        nonlocal examples
        examples += 1
        sock, head = handshake(port, "/fz")
        try:
            assert head.startswith(b"HTTP/1.1 101"), head
            try:
                sock.sendall(stream)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # gportmap already refused the stream: fine
            if half_close:
                assert closed_by_peer(sock), "gportmap left a half-closed client hanging"
        finally:
            sock.close()
        steady.send_binary(b"still here %d" % examples)
        assert steady.recv() == b"still here %d" % examples

    feed()
    assert gp.proc.poll() is None
    # Every fuzzed connection is reclaimed (a client that closed without a valid Close
    # frame included); no greenlet died with an unexpected exception.
    wait_for(lambda: active(gp, "fz") == 1, timeout=15, what="the fuzzed connections to be reclaimed")
    wait_for(lambda: gp.open_fds() <= fds, timeout=10, what=f"fds back to {fds} (now {gp.open_fds()})")
    assert not gp.events("internal_error")
    gp.wait_event("connection_closed", 10, count=examples)  # records follow the figures through the log writer
    closed = gp.events("connection_closed")
    assert len(closed) == examples and {r["reason"] for r in closed} <= {"closed", "client_error"}
    steady.close()


def active(gp, rule: str) -> int:
    (found,) = [r for r in gp.admin_json("/stats")["rules"] if r["name"] == rule]
    return found["connections"]["active"]


@st.composite
def valid_streams(draw) -> tuple[bytes, bytes, list[bytes]]:
    """(stream, data payload in order, ping payloads): fragmented messages with pings
    between fragments, ending with a Close frame."""
    stream, data, pings = bytearray(), bytearray(), []
    for _ in range(draw(st.integers(1, 6))):
        parts = draw(st.lists(st.binary(max_size=700), min_size=1, max_size=4))
        for i, part in enumerate(parts):
            opcode = draw(st.sampled_from([wsframe.OP_BINARY, wsframe.OP_TEXT])) if i == 0 else wsframe.OP_CONTINUATION
            mask = draw(st.binary(min_size=4, max_size=4))
            stream += masked(opcode, part, fin=i == len(parts) - 1, mask=mask)
            data += part
            if draw(st.booleans()):
                ping = draw(st.binary(max_size=125))
                stream += masked(wsframe.OP_PING, ping, mask=mask)
                pings.append(ping)
    stream += masked(wsframe.OP_CLOSE, struct.pack("!H", 1000))
    return bytes(stream), bytes(data), pings


@pytest.mark.slow  # a fuzzer against a live gportmap
def test_valid_streams_cut_anywhere_are_echoed_byte_for_byte(start_gportmap, echo_target):
    port = free_port()
    start_gportmap([ws_rule(port, echo_target.port, name="fz", path="/fz")])

    @LIVE
    @given(valid_streams(), st.lists(st.integers(0, 6000), max_size=6))
    def feed(case: tuple[bytes, bytes, list[bytes]], cuts: list[int]) -> None:
        stream, data, pings = case
        sock, head = handshake(port, "/fz")
        with sock:
            assert head.startswith(b"HTTP/1.1 101"), head
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
            for start, end in zip(points, points[1:]):
                sock.sendall(stream[start:end])  # header and payload boundaries fall anywhere
            sock.settimeout(10)
            echoed, pongs = bytearray(), []
            while (got := read_frame(sock)) is not None:
                opcode, payload = got
                if opcode == wsframe.OP_CLOSE:
                    assert wsframe.parse_close(payload) == wsframe.CLOSE_NORMAL
                    break
                if opcode == wsframe.OP_PONG:
                    pongs.append(payload)
                else:
                    assert opcode == wsframe.OP_BINARY
                    echoed += payload
            assert bytes(echoed) == data
            assert pongs == pings

    feed()


# --- the admin endpoint --------------------------------------------------------------

TOKEN = "s3cret-token"
methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "CONNECT", "get", "G\x00T", ""]) | st.text(max_size=8)
paths = st.sampled_from(
    ["/", "/healthz", "/metrics", "/stats", "/connections", "/reload", "*", "", "//", "/../../etc/passwd",
     "/%00", "/%ff%fe", "/healthz?x=%zz", "/?token=" + TOKEN, "/stats?token=nope", "http://x/stats", "/" + "a" * 9000]
) | st.text(max_size=40)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "http/1.1", "HTTP/", ""])
header_names = st.sampled_from(
    ["Host", "Content-Length", "Transfer-Encoding", "Authorization", "Connection", "Expect", "Upgrade", "X", " Host", "Bad Name", ""]
) | st.text(max_size=12)
header_values = st.sampled_from(
    ["0", "5", "-1", "99999999999999999999", "abc", "chunked", "gzip, chunked", "close", "keep-alive", "100-continue",
     "Bearer " + TOKEN, "Bearer nope", "Bearer", "websocket", "x" * 9000, "\x00", "a\rb", "é"]
) | st.text(max_size=30)
bodies = st.sampled_from([b"", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"ffffffffffffffff\r\nx", b"{}"]) | st.binary(max_size=300)


@st.composite
def http_requests(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2000))  # not HTTP at all
    eol = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    line = f"{draw(methods)} {draw(paths)} {draw(versions)}"
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    text = line + eol + "".join(f"{name}: {value}{eol}" for name, value in headers) + eol
    request = text.encode("utf-8", "surrogatepass") + draw(bodies)
    cut = draw(st.none() | st.integers(0, len(request)))
    return request if cut is None else request[:cut]


@pytest.mark.slow  # a fuzzer against a live gportmap
def test_malformed_admin_requests_never_touch_forwarding(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap({"settings": {"admin": {"listen": "127.0.0.1:1", "token": TOKEN}}, "rules": [tcp_rule(port, echo_target.port, name="fwd")]})
    stream = connect(port)
    fds = gp.open_fds()
    examples = 0

    @LIVE
    @given(http_requests())
    @example(b"GET /healthz HTTP/1\r\n\r\n")  # pywsgi used to print a traceback to stderr for this one
    def feed(request: bytes) -> None:
        nonlocal examples
        examples += 1
        with connect(gp.admin_port) as admin:
            try:
                admin.sendall(request)
                admin.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass  # the endpoint already answered (414, 400) and closed: ENOTCONN on shutdown
            assert closed_by_peer(admin, timeout=10), f"admin left {request[:80]!r} hanging"
        stream.sendall(b"%08d" % examples)  # the open stream on the other rule is untouched
        assert recv_exactly(stream, 8) == b"%08d" % examples

    feed()
    assert gp.proc.poll() is None
    status, body, _ = gp.admin("/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    with connect(port) as fresh:
        fresh.sendall(b"new")
        assert recv_exactly(fresh, 3) == b"new"
    stream.close()
    wait_for(lambda: gp.open_fds() <= fds, timeout=10, what=f"fds back to {fds} (now {gp.open_fds()})")
    assert not gp.events("internal_error")  # and every line on stderr is still one JSON object
    records = gp.wait_event("connection_closed", rule="fwd", count=2)
    assert sorted((r["reason"], r["bytes_received"]) for r in records) == [("closed", 3), ("closed", 8 * examples)]


@pytest.mark.slow  # a fuzzer against a live gportmap
def test_malformed_upgrade_requests_close_only_their_own_connection(start_gportmap, echo_target):
    """The HTTP side of a websocket rule (pywsgi) fed the same hostile requests."""
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="ws", path="/")])
    steady = websocket.create_connection(f"ws://{LOOPBACK}:{port}/", timeout=10)
    examples = 0

    @LIVE
    @given(http_requests())
    @example(b"GET / HTTP/1\r\nUpgrade: websocket\r\n\r\n")
    def feed(request: bytes) -> None:
        nonlocal examples
        examples += 1
        with connect(port) as sock:
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server closed first (a pipe broken, a reset, ENOTCONN): what is checked next
            assert closed_by_peer(sock, timeout=15), f"{request[:80]!r} left hanging"
        steady.send_binary(b"%08d" % examples)
        assert steady.recv() == b"%08d" % examples

    feed()
    assert gp.proc.poll() is None
    assert not gp.events("internal_error")  # and every line on stderr is still one JSON object
    wait_for(lambda: active(gp, "ws") == 1, timeout=15, what="the fuzzed connections to be reclaimed")
    steady.close()


# --- the rules loader: nested objects the generic fuzzer of test_config.py never builds --

# File names a hand-edited rules file or a templating accident can produce.
file_names = st.sampled_from(
    ["", "\x00", "cert\x00.pem", "/", "/dev/null", "/proc/self/status", "~", "~nobody-here/x", "../x", ".", "\udc80",
     "x" * 5000, "missing.pem", "/etc/passwd"]
) | st.text(max_size=20)
server_names = st.sampled_from(
    ["", ".", ".example", "example.", "a..b", "-a", "a b", "\x00", "é.example", "\udc80", "x" * 64, "x" * 300,
     "127.0.0.1", "::1", "[::1]", "localhost"]
) | st.text(max_size=20)
tls_objects = st.fixed_dictionaries({"certFile": file_names, "keyFile": file_names}, optional={"clientCaFile": file_names})
target_tls = st.one_of(
    st.just(True),
    st.fixed_dictionaries({"caFile": file_names}, optional={"verify": st.booleans()}),
    st.fixed_dictionaries({"serverName": server_names}, optional={"verify": st.booleans()}),
)
cidrs = st.sampled_from(
    ["127.0.0.0/8", "127.0.0.1", "::1/128", "0.0.0.0/0", "10.0.0.0/33", "127.0.0.0/8:1-65535", "127.0.0.0/8:9-1",
     "127.0.0.0/8:0-70000", "127.0.0.0/8:x", "::/0:80", "[::1]:80", "", "\x00", "1.2.3.4/8"]
) | st.text(max_size=16)
listens = st.sampled_from(["127.0.0.1:9900", ":0", "[::1]:1", "x:y", "\x00:1", "127.0.0.1:70000", "[::1]"]) | st.text(max_size=12)
# One valid rule, then one to three hostile strings put in their places: the numbers
# and enums are fuzzed by test_config.py already, and several errors at once would
# hide what a single odd value does further down the loader.
mutations = st.one_of(
    st.tuples(st.just("rule"), st.just("tls"), tls_objects),
    st.tuples(st.just("rule"), st.just("targetTls"), target_tls),
    st.tuples(st.just("rule"), st.sampled_from(["allow", "deny"]), st.lists(cidrs, min_size=1, max_size=2)),
    st.tuples(st.just("rule"), st.just("targetHost"), st.sampled_from(["127.0.0.1", "::1", "localhost"])),
    st.tuples(st.just("settings"), st.just("allowTargets"), st.lists(cidrs, max_size=3)),
    st.tuples(st.just("settings"), st.just("admin"), st.fixed_dictionaries({"listen": listens}, optional={"token": st.text(max_size=10)})),
)


@st.composite
def hostile_documents(draw) -> dict:
    rule = {"protocol": "tcp", "listenHost": "127.0.0.1", "listenPort": 9000, "targetHost": "127.0.0.1", "targetPort": 9001}
    settings_: dict = {}
    for where, key, value in draw(st.lists(mutations, min_size=1, max_size=3)):
        (rule if where == "rule" else settings_)[key] = value
    return {"settings": settings_, "rules": [rule]}


@settings(max_examples=400, deadline=None)
@given(hostile_documents())
@pytest.mark.slow
def test_nested_tls_and_settings_give_a_config_or_a_config_error(document: dict) -> None:
    try:
        config = parse(json.dumps(document), "fuzz.json")
    except ConfigError as error:
        assert error.errors
        for line in error.errors:
            assert line.startswith("fuzz.json: ") and "\n" not in line
            line.encode("utf-8")
        return
    assert isinstance(config, Config)
    for rule in config.rules:  # what the loader accepts must work at connect time
        if rule.target_tls is not None:
            name = rule.target_tls.server_name or rule.target_host
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            with context.wrap_socket(socket.socket(), server_hostname=name, do_handshake_on_connect=False):
                pass  # the SNI name is encoded here, as gportmap does it for every connection


# --- the PROXY protocol writer (gportmap.engine.proxyproto) ------------------------------


def parse_proxy_header(data: bytes) -> tuple[str, str | None, tuple | None, int]:
    """A reference reader written from proxy-protocol.txt, not from the writer: (the
    version, the v1 protocol word or the v2 family byte in hex (None for LOCAL),
    (source ip, destination ip, source port, destination port) or None, and how
    many bytes the header took). Anything off the spec fails an assertion."""
    if data.startswith(proxyproto.V2_SIGNATURE):
        assert len(data) >= 16
        version_command, family, length = struct.unpack("!BBH", data[12:16])
        assert version_command >> 4 == 2 and len(data) == 16 + length
        block = data[16:]
        if version_command == 0x20:  # LOCAL: the receiver uses the real endpoints
            assert family == 0x00 and length == 0
            return "v2", None, None, len(data)
        assert version_command == 0x21
        if family == 0x11:
            assert length == 12
            src, dst, sport, dport = struct.unpack("!4s4sHH", block)
            return (
                "v2",
                "11",
                (ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst), sport, dport),
                len(data),
            )
        assert family == 0x21 and length == 36, family
        src, dst, sport, dport = struct.unpack("!16s16sHH", block)
        return "v2", "21", (ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst), sport, dport), len(data)
    end = data.find(b"\r\n")
    assert data.startswith(b"PROXY ") and 0 < end and end + 2 == len(data) <= 107, data
    words = data[:end].decode("ascii").split(" ")
    if words[1] == "UNKNOWN":
        return "v1", "UNKNOWN", None, len(data)
    assert len(words) == 6 and words[1] in ("TCP4", "TCP6"), words
    kind = ipaddress.IPv4Address if words[1] == "TCP4" else ipaddress.IPv6Address
    for port in words[4:]:  # decimal, no leading zero, 0-65535
        assert port.isdigit() and str(int(port)) == port and int(port) <= 65535, port
    return "v1", words[1], (kind(words[2]), kind(words[3]), int(words[4]), int(words[5])), len(data)


ports = st.integers(0, 65535)
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)
mapped = ipv4s.map(lambda ip: ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed))


@st.composite
def socket_addresses(draw) -> tuple[tuple, ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """A socket address tuple as Python gives it (AF_INET pairs, AF_INET6 4-tuples,
    a zone on link-local addresses), the IP the header must carry, and the port."""
    ip = draw(st.one_of(ipv4s, ipv6s, mapped))
    port = draw(ports)
    if ip.version == 4:
        return (str(ip), port), ip, port
    host = str(ip)
    if ip.is_link_local and draw(st.booleans()):
        host += "%" + draw(st.sampled_from(["eth0", "lo", "1"]))
    address = (host, port, draw(st.integers(0, 0xFFFFF)), draw(st.integers(0, 2**32 - 1)))
    return address, (ip.ipv4_mapped or ip), port


def as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip


@settings(max_examples=1000, deadline=None)
@given(socket_addresses(), socket_addresses())
@example(
    (("::ffff:127.0.0.1", 40000, 0, 0), ipaddress.IPv4Address("127.0.0.1"), 40000),
    (("::ffff:127.0.0.1", 8080, 0, 0), ipaddress.IPv4Address("127.0.0.1"), 8080),
)
@example(
    (("fe80::1%eth0", 1, 0, 2), ipaddress.IPv6Address("fe80::1"), 1),
    (("::", 0, 0, 0), ipaddress.IPv6Address("::"), 0),
)
@example(
    (("255.255.255.255", 65535), ipaddress.IPv4Address("255.255.255.255"), 65535),
    (
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 0, 0),
        ipaddress.IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        65535,
    ),
)
@pytest.mark.slow
def test_proxy_headers_parse_back_to_the_addresses_written(source, destination) -> None:
    (src_address, src_ip, src_port), (dst_address, dst_ip, dst_port) = source, destination
    line = proxyproto.header("v1", src_address, dst_address)
    binary = proxyproto.header("v2", src_address, dst_address)
    assert len(line) <= proxyproto.V1_MAX_LENGTH
    if src_ip.version == dst_ip.version:
        word, family = ("TCP4", "11") if src_ip.version == 4 else ("TCP6", "21")
        assert parse_proxy_header(line) == ("v1", word, (src_ip, dst_ip, src_port, dst_port), len(line))
        assert parse_proxy_header(binary) == ("v2", family, (src_ip, dst_ip, src_port, dst_port), len(binary))
    else:  # a mixed pair (no TCP socket has one): v1 cannot say it, v2 maps IPv4 into IPv6
        assert parse_proxy_header(line) == ("v1", "UNKNOWN", None, len(line))
        expected = (as_v6(src_ip), as_v6(dst_ip), src_port, dst_port)
        assert parse_proxy_header(binary) == ("v2", "21", expected, len(binary))


# Whatever a socket call, a platform or a future caller might hand the writer.
odd_hosts = st.one_of(
    st.text(max_size=50),
    st.sampled_from(
        [
            "",
            "::ffff:1.2.3.4%",
            "1.2.3.4%eth0",
            "1.2.3.04",
            " 1.2.3.4",
            "1.2.3.4\n",
            "[::1]",
            "::1%",
            "/run/x.sock",
            "\x00",
            "\udc80",
            "localhost",
            "fe80::1%" + "x" * 300,
        ]
    ),
    st.binary(max_size=20),
    st.none(),
    st.integers(),
    ipv4s,
)
odd_ports = st.one_of(st.integers(), st.booleans(), st.floats(), st.text(max_size=5), st.none(), ports)
odd_addresses = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.integers(),
    st.tuples(),
    st.tuples(odd_hosts),
    st.tuples(odd_hosts, odd_ports),
    st.tuples(odd_hosts, odd_ports, st.integers(), st.integers()),
    st.lists(st.one_of(odd_hosts, odd_ports), max_size=5).map(tuple),
    st.lists(st.one_of(odd_hosts, odd_ports), max_size=4),
    socket_addresses().map(lambda drawn: drawn[0]),
)


@settings(max_examples=1500, deadline=None)
@given(odd_addresses, odd_addresses)
@pytest.mark.slow
def test_proxy_header_writer_never_raises_and_always_writes_a_valid_header(source, destination) -> None:
    line = proxyproto.header("v1", source, destination)
    binary = proxyproto.header("v2", source, destination)
    assert len(line) <= proxyproto.V1_MAX_LENGTH
    v1, v2 = parse_proxy_header(line), parse_proxy_header(binary)
    if proxyproto.endpoint(source) is None or proxyproto.endpoint(destination) is None:
        assert v1 == ("v1", "UNKNOWN", None, len(b"PROXY UNKNOWN\r\n"))
        assert v2 == ("v2", None, None, 16)  # LOCAL, UNSPEC
    else:
        assert v2[1] in ("11", "21")
