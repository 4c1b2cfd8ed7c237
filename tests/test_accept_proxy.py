"""``acceptProxy`` (SPEC §13, issue 20): a tcp or websocket rule behind a proxy that
sends the PROXY protocol (v1 or v2) sees the original client's address.

- The parser (``proxyproto.parse_header``) is sans-IO: checked on known headers,
  on every prefix of them, and fuzzed with hypothesis: it raises nothing but
  ``ProxyHeaderError`` and never claims a byte past the header.
- gportmap runs as a subprocess; clients bind 127.0.0.5 (or another loopback
  address) so that the address a header carries differs from the proxy's
  (127.0.0.1). Real proxies in front: HAProxy (``send-proxy-v2``) and nginx's
  stream module (``proxy_protocol on``, version 1); both skipped cleanly when not
  installed.
- What must see the header's client: the ``connection_closed`` record,
  ``/connections``, allow/deny, and a ``proxyProtocol`` header sent onward. An
  untrusted sender's header is data, byte for byte; a trusted sender without a
  header is cut at the deadline (``proxy_header``, counted).
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    LOOPBACK,
    TargetServer,
    closed_by_peer,
    echo_handler,
    free_port,
    metric,
    recv_exactly,
    require_tool,
    rule_stats,
    tcp_rule,
    wait_for,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_proxy_protocol import NGINX_STREAM_MODULE, Peer, _missing

from gportmap.engine import proxyproto
from gportmap.engine.proxyproto import ProxyHeader, ProxyHeaderError, parse_header

#: The client's own address: not the proxy's (127.0.0.1), so the two can be told apart.
CLIENT_HOST = "127.0.0.5"


# --- the parser ---------------------------------------------------------------------


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    return proxyproto.v1_header((src, sport), (dst, dport))


def v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    return proxyproto.v2_header((src, sport), (dst, dport))


HEADERS = [
    (v1("127.0.0.5", "127.0.0.1", 40000, 80), ("127.0.0.5", 40000), ("127.0.0.1", 80)),
    (v1("2001:db8::1", "::1", 1, 65535), ("2001:db8::1", 1), ("::1", 65535)),
    (v2("192.0.2.7", "198.51.100.1", 5555, 443), ("192.0.2.7", 5555), ("198.51.100.1", 443)),
    (v2("2001:db8::7", "2001:db8::8", 0, 22), ("2001:db8::7", 0), ("2001:db8::8", 22)),
    (b"PROXY UNKNOWN\r\n", None, None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None, None),
    (proxyproto.v2_header(None, None), None, None),  # LOCAL
]


@pytest.mark.parametrize("raw, source, destination", HEADERS)
def test_known_headers_parse_and_what_follows_is_not_taken(raw, source, destination):
    tail = b"GET / HTTP/1.1\r\n\r\n\x00\xff"
    header = parse_header(raw + tail)
    assert header == ProxyHeader(len(raw), 1 if raw.startswith(b"PROXY") else 2, source, destination)
    for cut in range(len(raw)):  # every prefix: incomplete, never an error
        assert parse_header(raw[:cut]) is None


def test_v2_tlvs_are_skipped_and_the_length_is_bounded():
    base = v2("10.0.0.1", "10.0.0.2", 1000, 2000)
    tlv = b"\x04\x00\x05hello"  # PP2_TYPE_NOOP with 5 bytes
    length = int.from_bytes(base[14:16], "big") + len(tlv)
    with_tlv = base[:14] + length.to_bytes(2, "big") + base[16:] + tlv
    assert parse_header(with_tlv + b"data") == ProxyHeader(len(with_tlv), 2, ("10.0.0.1", 1000), ("10.0.0.2", 2000))
    huge = base[:14] + (5000).to_bytes(2, "big")
    with pytest.raises(ProxyHeaderError, match="more than"):
        parse_header(huge, max_v2_length=4096)


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"GET / HTTP/1.1\r\n", "does not start"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx", "CRLF"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "IPv4"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4|TCP6"),
        (b"PROXY " + b"A" * 110, "longer than 107"),
        (proxyproto.V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version"),
        (proxyproto.V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "command"),
        (proxyproto.V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "family"),
        (proxyproto.V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "less than"),
        (b"\r\n\r\n\x00\r\nQUIX", "does not start"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(raw, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(raw)


def _check(data: bytes) -> None:
    """The parser's contract on any input: a header, None, or ProxyHeaderError;
    a header never longer than the input; None only while every byte so far could
    still be the header (a longer input then never ends the header sooner)."""
    try:
        header = parse_header(data)
    except ProxyHeaderError:
        return
    if header is None:  # incomplete: no byte of it can be past a header's end
        if data.startswith(b"P"):
            assert b"\r\n" not in data and len(data) < proxyproto.V1_MAX_LENGTH
        elif data:
            assert len(data) < proxyproto.V2_FIXED or len(data) < proxyproto.V2_FIXED + int.from_bytes(data[14:16], "big")
        return
    assert 0 < header.length <= len(data)
    assert parse_header(data[: header.length]) == header  # the header alone says the same
    for cut in range(header.length):  # a prefix is incomplete or already refused, never another header
        try:
            assert parse_header(data[:cut]) is None
        except ProxyHeaderError:
            pytest.fail(f"a prefix of a valid header was refused: {data[:cut]!r}")


def _mutations() -> st.SearchStrategy[bytes]:
    """Valid headers, cut, spliced and flipped; plus plain random bytes."""
    valid = st.sampled_from([raw for raw, _, _ in HEADERS])
    return st.one_of(
        st.binary(max_size=300),
        st.tuples(valid, st.binary(max_size=64)).map(lambda pair: pair[0] + pair[1]),
        st.tuples(valid, st.integers(0, 200), st.integers(0, 255)).map(
            lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1 :]
        ),
        st.tuples(st.sampled_from([b"PROXY ", proxyproto.V2_SIGNATURE]), st.binary(max_size=120)).map(
            lambda pair: pair[0] + pair[1]
        ),
    )


@pytest.mark.slow  # a fuzzer (generated headers)
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
@example(proxyproto.V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216))  # UNIX: the socket's own addresses
@example(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\r\n")
def test_fuzzed_parser_raises_only_its_error_and_never_reads_past_the_header(data):
    _check(data)


# --- gportmap as a subprocess --------------------------------------------------------


def client_from(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from the local address ``host``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((host, 0))
    sock.connect((LOOPBACK, port))
    return sock


class LineThenEcho(TargetServer):
    """A target that records its first line (a PROXY header sent onward) byte by
    byte, so as not to take a byte past it, then echoes."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\r\n") and len(line) < 108:
            byte = conn.recv(1)
            if not byte:
                return
            line += byte
        self.lines.append(line)
        while data := conn.recv(65536):
            conn.sendall(data)


@pytest.fixture
def echo() -> Iterator[TargetServer]:
    server = TargetServer(echo_handler)
    yield server
    server.close()


def accept_rule(target_port: int, trusted: list[str], **extra: object) -> dict:
    return tcp_rule(
        free_port(), target_port, name="ap", acceptProxy={"trusted": trusted, "timeout": extra.pop("timeout", 3)},
        **extra,
    )


def open_connection(gp, rule: str = "ap") -> list[dict]:
    return [conn for conn in gp.admin_json("/connections") if conn["rule"] == rule]


#: Paths through gportmap: the hub path (an IP target, no plugin), and a greenlet
#: that resolves the target's name first (the staged path).
PATHS = {"hub": LOOPBACK, "greenlet": "localhost"}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_a_trusted_header_names_the_client_everywhere(start_gportmap, echo, make, path):
    rule = accept_rule(echo.port, ["127.0.0.1/32"], targetHost=PATHS[path])
    gp = start_gportmap([rule])
    header = make(CLIENT_HOST, LOOPBACK, 41234, rule["listenPort"])
    payload = os.urandom(70000)
    with client_from(LOOPBACK, rule["listenPort"]) as sock:
        # The header and the first bytes in one segment: what follows the header
        # must reach the target first and exactly.
        sock.sendall(header + payload[:1000])
        sock.sendall(payload[1000:])
        assert recv_exactly(sock, len(payload)) == payload
        (conn,) = wait_for(lambda: open_connection(gp) or None, what="the connection in /connections")
        assert conn["client"] == f"{CLIENT_HOST}:41234"
    record = gp.wait_event("connection_closed", rule="ap")[-1]
    assert record["client"] == f"{CLIENT_HOST}:41234"
    assert record["bytes_received"] == len(payload)


def test_allow_and_deny_judge_the_headers_client(start_gportmap, echo):
    rule = accept_rule(echo.port, ["127.0.0.1"], deny=[CLIENT_HOST], allow=["127.0.0.0/8"])
    gp = start_gportmap([rule])
    with client_from(LOOPBACK, rule["listenPort"]) as sock:
        sock.sendall(v2(CLIENT_HOST, LOOPBACK, 5000, rule["listenPort"]) + b"hello")
        assert closed_by_peer(sock)
    record = gp.wait_event("connection_rejected", rule="ap")[-1]
    assert (record["reason"], record["client"]) == ("acl", f"{CLIENT_HOST}:5000")
    # Another client behind the same proxy is admitted: the proxy's address is not judged.
    with client_from(LOOPBACK, rule["listenPort"]) as sock:
        sock.sendall(v2("127.0.0.6", LOOPBACK, 5001, rule["listenPort"]) + b"hello")
        assert recv_exactly(sock, 5) == b"hello"
    assert rule_stats(gp, "ap")["connections"]["rejected_by_reason"]["acl"] == 1


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_onward_proxy_protocol_header_carries_the_headers_client(start_gportmap, version):
    target = LineThenEcho()
    try:
        rule = accept_rule(target.port, ["127.0.0.1"], proxyProtocol="v1")
        gp = start_gportmap([rule])
        make = v1 if version == "v1" else v2
        with client_from(LOOPBACK, rule["listenPort"]) as sock:
            sock.sendall(make(CLIENT_HOST, "127.0.0.9", 6000, 7000) + b"ping")
            assert recv_exactly(sock, 4) == b"ping"
        assert target.lines == [f"PROXY TCP4 {CLIENT_HOST} 127.0.0.9 6000 7000\r\n".encode()]
        assert gp.wait_event("connection_closed", rule="ap")[-1]["client"] == f"{CLIENT_HOST}:6000"
    finally:
        target.close()


def test_a_rule_with_faults_applies_them_to_connections_behind_a_proxy(start_gportmap):
    """The PROXY header is read in hub callbacks; a rule with faults then hands the
    connection to the greenlet relay that runs them, header and all: the faults act,
    and the onward header still names the header's client."""
    target = LineThenEcho()
    try:
        rule = accept_rule(target.port, ["127.0.0.1"], proxyProtocol="v1",
                           faults=[{"type": "latency", "attributes": {"latency": 300}}])
        gp = start_gportmap([rule])
        with client_from(LOOPBACK, rule["listenPort"]) as sock:
            started = time.monotonic()
            sock.sendall(v2(CLIENT_HOST, "127.0.0.9", 6000, 7000) + b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            assert time.monotonic() - started >= 0.28  # the reply waited for the latency
        assert target.lines == [f"PROXY TCP4 {CLIENT_HOST} 127.0.0.9 6000 7000\r\n".encode()]
        assert gp.wait_event("connection_closed", rule="ap")[-1]["client"] == f"{CLIENT_HOST}:6000"
        assert metric(gp, "gportmap_faults_applied_total", rule="ap", type="latency") >= 1
    finally:
        target.close()


def test_an_untrusted_senders_header_is_data(start_gportmap, echo):
    rule = accept_rule(echo.port, ["127.0.0.9/32"])
    gp = start_gportmap([rule])
    data = v2("10.1.2.3", LOOPBACK, 1, 2) + v1("10.1.2.3", LOOPBACK, 1, 2) + b"rest"
    with client_from(CLIENT_HOST, rule["listenPort"]) as sock:
        sock.sendall(data)
        assert recv_exactly(sock, len(data)) == data  # byte for byte, never parsed
    record = gp.wait_event("connection_closed", rule="ap")[-1]
    assert record["client"].startswith(f"{CLIENT_HOST}:")
    assert record["bytes_received"] == len(data)


@pytest.mark.parametrize("path", PATHS)
def test_a_trusted_client_without_a_header_is_cut_at_the_deadline(start_gportmap, echo, path):
    rule = accept_rule(echo.port, ["127.0.0.0/8"], timeout=0.5, targetHost=PATHS[path])
    gp = start_gportmap([rule])
    with client_from(CLIENT_HOST, rule["listenPort"]) as sock:
        assert closed_by_peer(sock, timeout=10)
    record = gp.wait_event("connection_rejected", rule="ap")[-1]
    assert record["reason"] == "proxy_header"
    assert "acceptProxy.timeout" in record["error"]
    connections = rule_stats(gp, "ap")["connections"]
    assert connections["rejected_by_reason"]["proxy_header"] == 1
    assert connections["total"] == 0
    assert metric(gp, "gportmap_connections_rejected_total", rule="ap", reason="proxy_header") == 1


def test_a_malformed_header_is_refused_at_once(start_gportmap, echo):
    rule = accept_rule(echo.port, ["127.0.0.1"], timeout=30)
    gp = start_gportmap([rule])
    with client_from(LOOPBACK, rule["listenPort"]) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_peer(sock, timeout=10)  # long before the 30 s deadline
    record = gp.wait_event("connection_rejected", rule="ap")[-1]
    assert record["reason"] == "proxy_header"
    assert "does not start" in record["error"]
    # A sender that stops mid-header: refused as soon as it closes, not at the deadline.
    with client_from(LOOPBACK, rule["listenPort"]) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.5 ")
        sock.shutdown(socket.SHUT_WR)
        assert closed_by_peer(sock, timeout=10)
    record = gp.wait_event("connection_rejected", rule="ap", count=2)[-1]
    assert record["reason"] == "proxy_header" and "closed before" in record["error"]
    # The header's bytes a few at a time: still read whole.
    with client_from(LOOPBACK, rule["listenPort"]) as sock:
        header = v1(CLIENT_HOST, LOOPBACK, 9, 10)
        for i in range(0, len(header), 7):
            sock.sendall(header[i : i + 7])
        sock.sendall(b"after")
        assert recv_exactly(sock, 5) == b"after"
    # v2 LOCAL (a proxy's own health check): the connection's own address stays the client.
    with client_from(LOOPBACK, rule["listenPort"]) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(proxyproto.v2_header(None, None) + b"local")
        assert recv_exactly(sock, 5) == b"local"
    assert gp.wait_event("connection_closed", rule="ap", client=f"{LOOPBACK}:{local_port}")


def test_a_websocket_rule_behind_a_proxy(start_gportmap, echo):
    port = free_port()
    rule = {
        "protocol": "websocket", "name": "ap", "listenHost": LOOPBACK, "listenPort": port,
        "targetHost": LOOPBACK, "targetPort": echo.port, "acceptProxy": {"trusted": ["127.0.0.1"]},
    }
    gp = start_gportmap([rule])
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET / HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with client_from(LOOPBACK, port) as sock:
        sock.sendall(v2(CLIENT_HOST, LOOPBACK, 7777, port) + request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 101"), answer
        (conn,) = wait_for(lambda: open_connection(gp) or None, what="the connection in /connections")
        assert conn["client"] == f"{CLIENT_HOST}:7777"
    assert gp.wait_event("connection_closed", rule="ap")[-1]["client"] == f"{CLIENT_HOST}:7777"


# --- real proxies in front ----------------------------------------------------------


class HaproxyInFront:
    """HAProxy forwarding to gportmap with ``send-proxy-v2``."""

    def __init__(self, folder: Path, gportmap_port: int) -> None:
        haproxy = require_tool("haproxy")
        folder.mkdir()
        self.port = free_port()
        conf = folder / "haproxy.cfg"
        conf.write_text(
            "global\n  maxconn 64\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
            f"frontend in\n  bind {LOOPBACK}:{self.port}\n  default_backend out\n"
            f"backend out\n  server gportmap {LOOPBACK}:{gportmap_port} send-proxy-v2\n"
        )
        self.peer = Peer("haproxy", [haproxy, "-f", str(conf), "-db"], folder)
        try:
            self.peer.wait_listening(self.port)
        except BaseException:
            self.peer.close()
            raise


class NginxInFront:
    """nginx's stream module forwarding to gportmap with ``proxy_protocol on`` (v1)."""

    def __init__(self, folder: Path, gportmap_port: int) -> None:
        nginx = require_tool("nginx")
        if not NGINX_STREAM_MODULE.exists():
            _missing(f"{NGINX_STREAM_MODULE} (Debian libnginx-mod-stream)")
        folder.mkdir()
        self.port = free_port()
        error_log = folder / "error.log"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = folder / "nginx.conf"
        conf.write_text(
            f"load_module {NGINX_STREAM_MODULE};\n{user}worker_processes 1;\npid {folder / 'nginx.pid'};\n"
            f"error_log {error_log} info;\nevents {{ worker_connections 64; }}\n"
            "stream {\n  server {\n"
            f"    listen {LOOPBACK}:{self.port};\n    proxy_pass {LOOPBACK}:{gportmap_port};\n"
            "    proxy_protocol on;\n  }\n}\n"
        )
        cmd = [nginx, "-p", str(folder), "-c", str(conf), "-e", str(error_log), "-g", "daemon off;"]
        self.peer = Peer("nginx", cmd, folder)
        try:
            self.peer.wait_listening(self.port, (folder / "nginx.pid").exists, error_log)
        except BaseException:
            self.peer.close()
            raise


@pytest.mark.parametrize("front", ["haproxy", "nginx"])
def test_behind_a_real_proxy_gportmap_sees_the_original_client(start_gportmap, tmp_path, front):
    target = LineThenEcho()
    proxy = None
    try:
        allowed = accept_rule(target.port, ["127.0.0.1"], proxyProtocol="v1", deny=["127.0.0.66"])
        gp = start_gportmap([allowed])
        kind = HaproxyInFront if front == "haproxy" else NginxInFront
        proxy = kind(tmp_path / front, allowed["listenPort"])
        payload = os.urandom(100000)
        with client_from(CLIENT_HOST, proxy.port) as sock:
            client_port = sock.getsockname()[1]
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            assert recv_exactly(sock, len(payload)) == payload, proxy.peer.output()
            sender.join(10)
            # (the proxy's readiness probe, from 127.0.0.1, may still be listed)
            client = f"{CLIENT_HOST}:{client_port}"
            wait_for(lambda: [c for c in open_connection(gp) if c["client"] == client], what=f"{client} in /connections")
        # (the proxy's readiness probe was a connection too: from 127.0.0.1)
        record = gp.wait_event("connection_closed", rule="ap", client=f"{CLIENT_HOST}:{client_port}")[-1]
        assert record["bytes_received"] == len(payload)
        # The onward header carries the client, and the address it reached (the proxy's).
        # (the readiness probe's line, from 127.0.0.1, may come in any order)
        onward = f"PROXY TCP4 {CLIENT_HOST} {LOOPBACK} {client_port} {proxy.port}\r\n".encode()
        assert onward in target.lines, target.lines
        # Deny judges the header's client: 127.0.0.66 through the same proxy is refused.
        with client_from("127.0.0.66", proxy.port) as sock:
            assert closed_by_peer(sock, timeout=10)
        rejected = gp.wait_event("connection_rejected", rule="ap", reason="acl")[-1]
        assert rejected["client"].startswith("127.0.0.66:")
    finally:
        if proxy is not None:
            proxy.peer.close()
        target.close()


# --- in process: the wait for a header is bounded and ends with a stop -------------


def test_headers_awaited_on_the_hub_are_bounded_and_a_stop_ends_the_wait():
    """tcp's hub path: connections waiting for their header hold no place under
    the limits (their client is not known yet), so their own number is capped at
    maxConnections, past which one is refused as ``limit`` at once; a stop (kill)
    ends every wait and closes its socket."""
    import gevent
    import gevent.socket
    from conftest import wait_on_hub

    from gportmap.config import Rule
    from gportmap.config.model import AcceptProxy
    from gportmap.engine.relay import BufferPool
    from gportmap.log import RateLimiter
    from gportmap.protocols import ServerContext
    from gportmap.protocols.tcp import TcpServer
    from gportmap.stats import StatsRegistry

    rule = Rule("ap", "tcp", LOOPBACK, 0, LOOPBACK, 9, max_connections=3,
                accept_proxy=AcceptProxy(trusted=(LOOPBACK,), timeout=60))
    server = TcpServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    server.start()
    port = server.listener.getsockname()[1]
    assert server.in_hub
    clients = []
    try:
        for _ in range(3):
            clients.append(gevent.socket.create_connection((LOOPBACK, port)))
        wait_on_hub(lambda: server.awaiting_header == 3, what="three headers awaited")
        over = gevent.socket.create_connection((LOOPBACK, port))
        clients.append(over)
        with gevent.Timeout(10):
            assert over.recv(1) == b""  # refused at once, not left waiting for 60 s
        assert server.stats.rejected["limit"] == 1 and server.awaiting_header == 3
        assert server.active == 3  # a drain waits for them (or cuts them: kill)
        server.kill()
        assert server.awaiting_header == 0 and not server.relays
        with gevent.Timeout(10):
            assert all(sock.recv(1) == b"" for sock in clients[:3])  # closed by the stop
        assert server.stats.rejected["proxy_header"] == 0  # a stop is no rejection
    finally:
        for sock in clients:
            sock.close()
        server.close()
