"""One port for many services (``routes``, SPEC §13), with real peers.

Targets are loopback servers made here: TLS servers with certificates of their own
names (so a client that verifies them proves the TLS went through untouched), an
HTTP page, a target that speaks an SSH banner, and recorders. Clients: ``openssl
s_client``, ``curl --resolve`` (127.0.0.1 only), OpenSSH ``ssh``, and raw sockets
where exact bytes matter. The ClientHello parser is fuzzed (bounded).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from certs import CA
from conftest import (
    LOOPBACK,
    HttpPage,
    TargetServer,
    closed_by_peer,
    connect,
    free_port,
    metric,
    recv_exactly,
    recv_until_eof,
    require_tool,
    rule_stats,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gportmap.config import parse
from gportmap.config.model import RouteMatch, RuleRoute, SniffProtocol, Target
from gportmap.engine.sniff import SNIFF_CAP, ClientHello, Verdict, decide, http_host, parse_client_hello
from gportmap.errors import ConfigError

# -- helpers ------------------------------------------------------------------------------


class TlsNamed:
    """A TLS server on loopback with a certificate for ``names``, answering one
    HTTP/1.0 request with its label and the ALPN protocol it agreed."""

    def __init__(self, ca: CA, label: str, names: tuple[str, ...], alpn: tuple[str, ...] = ()) -> None:
        issued = ca.issue(label, names[0], dns=names)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(issued.cert, issued.key)
        if alpn:
            self.context.set_alpn_protocols(list(alpn))
        self.label = label
        self.server = TargetServer(self._handle)
        self.port = self.server.port

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with self.context.wrap_socket(conn, server_side=True) as tls:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                head += chunk
            body = f"{self.label} alpn={tls.selected_alpn_protocol()}".encode()
            tls.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            try:
                tls.unwrap()  # close_notify: a clean end for the client
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self.server.close()


class Recorder:
    """A plain target that keeps every byte a connection sends, and greets first
    with ``greeting`` (an SSH server speaks first)."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        self.server = TargetServer(self._handle)
        self.port = self.server.port

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        if self.greeting:
            conn.sendall(self.greeting)
        data = bytearray()
        index = None
        with self.lock:
            index = len(self.received)
            self.received.append(b"")
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            with self.lock:
                self.received[index] = bytes(data)
            if data.startswith(b"SSH-") and b"\r\n" in data:
                break  # an SSH client's banner: all this fake server wanted
            if data.endswith(b"\r\n\r\n") and b"GET " in data:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nrecorder")
                break

    def got(self) -> list[bytes]:
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path, "routes-ca")


def route(name: str, port: int, **match) -> dict:
    """A route to 127.0.0.1:``port`` matching ``match`` (SPEC §13 keys); none: the default."""
    return {"name": name, "targetHost": LOOPBACK, "targetPort": port, **(match or {"default": True})}


def routed_rule(port: int, routes: list[dict], **extra) -> dict:
    return {"name": "edge", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port, "routes": routes, **extra}


def s_client(port: int, ca: CA, server_name: str, alpn: str | None = None) -> str:
    openssl = require_tool("openssl")
    args = [openssl, "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", server_name,
            "-CAfile", str(ca.path), "-verify_return_error", "-verify_hostname", server_name, "-ign_eof", "-quiet"]
    if alpn:
        args += ["-alpn", alpn]
    done = subprocess.run(args, input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode(errors="replace")


def curl(url: str, port: int, host: str, ca: CA | None = None) -> str:
    args = [require_tool("curl"), "-sS", "--max-time", "20", "--resolve", f"{host}:{port}:{LOOPBACK}", url]
    if ca is not None:
        args += ["--cacert", str(ca.path)]
    done = subprocess.run(args, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode(errors="replace")


def client_hello(server_name: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The ClientHello Python's TLS client sends (nothing on the wire)."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, pieces: int) -> bytes:
    """The same handshake message in ``pieces`` TLS records (legal, and rarely sent)."""
    header, body = hello[:5], hello[5:]
    step = -(-len(body) // pieces)
    return b"".join(header[:3] + len(part).to_bytes(2, "big") + part
                    for part in (body[i:i + step] for i in range(0, len(body), step)))


# -- through gportmap, real clients ---------------------------------------------------


def test_sni_alpn_http_host_and_ssh_each_reach_their_route(start_gportmap, ca, tmp_path):
    a = TlsNamed(ca, "route-a", ("a.test",))
    b = TlsNamed(ca, "route-b", ("www.b.test", "x.b.test"))
    h2 = TlsNamed(ca, "route-h2", ("h2.test",), alpn=("h2",))
    web = HttpPage(b"route-web")
    ssh_target = Recorder(b"SSH-2.0-RouteTest_1.0\r\n")
    rest = Recorder()
    port = free_port()
    try:
        gp = start_gportmap({"rules": [routed_rule(port, [
            route("a", a.port, sni=["a.test"]),
            route("b", b.port, sni=["*.b.test"]),
            route("h2", h2.port, alpn=["h2"]),
            route("ssh", ssh_target.port, protocol="ssh"),
            route("web", web.port, http_host=["www.web.test"]),
            route("rest", rest.port),
        ], sniffTimeout=2)]})
        assert "route-a alpn=None" in s_client(port, ca, "a.test")
        assert "route-b" in curl(f"https://www.b.test:{port}/", port, "www.b.test", ca)
        assert "route-b" in s_client(port, ca, "x.b.test")
        assert "route-h2 alpn=h2" in s_client(port, ca, "h2.test", alpn="h2")
        assert curl(f"http://www.web.test:{port}/", port, "www.web.test") == "route-web"
        # a real OpenSSH client: it cannot log in to a banner, but its banner reaches the ssh route
        ssh = require_tool("ssh")
        subprocess.run(
            [ssh, "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", f"nobody@{LOOPBACK}", "true"],
            capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
        )
        wait_for(lambda: any(got.startswith(b"SSH-2.0-OpenSSH") for got in ssh_target.got()), what="ssh banner")
        # an HTTP client on the same port whose Host matches no route: the default
        assert curl(f"http://elsewhere.test:{port}/", port, "elsewhere.test") == "recorder"
        assert rest.got()[0].startswith(b"GET / HTTP/1.1\r\nHost: elsewhere.test")

        stats = rule_stats(gp, "edge")
        by_route = {target["route"]: target for target in stats["targets"]}
        assert by_route["a"]["total"] == 1 and by_route["b"]["total"] == 2 and by_route["h2"]["total"] == 1
        assert by_route["web"]["total"] == 1 and by_route["ssh"]["total"] == 1 and by_route["rest"]["total"] == 1
        assert metric(gp, "gportmap_target_connections_total", rule="edge", route="b") == 2.0
        routes = {entry["name"]: entry for entry in stats["routes"]}
        assert routes["b"] == {"name": "b", "default": False, "match": {"sni": ["*.b.test"]},
                               "targets": [f"{LOOPBACK}:{b.port}"], "active": 0, "total": 2}
        assert routes["rest"]["default"] and routes["ssh"]["match"] == {"protocol": "ssh"}
    finally:
        for server in (a, b, h2, web, ssh_target, rest):
            server.close()


def test_a_silent_client_takes_the_ssh_route_else_the_default(start_gportmap):
    ssh_target = Recorder(b"SSH-2.0-Silent\r\n")
    rest = Recorder(b"default-hello\n")
    with_ssh, without = free_port(), free_port()
    try:
        start_gportmap({"rules": [
            routed_rule(with_ssh, [route("tls", free_port(), protocol="tls"), route("ssh", ssh_target.port, protocol="ssh"),
                                   route("rest", rest.port)], sniffTimeout=0.5),
            {**routed_rule(without, [route("tls2", free_port(), sni=["a.test"]), route("rest2", rest.port)],
                           sniffTimeout=0.5), "name": "edge2"},
        ]})
        with connect(with_ssh) as sock:  # says nothing: an SSH client waiting for the server's banner
            assert recv_exactly(sock, 16) == b"SSH-2.0-Silent\r\n"
        with connect(without) as sock:
            assert recv_exactly(sock, 14) == b"default-hello\n"
    finally:
        ssh_target.close()
        rest.close()


def test_the_sniffed_bytes_arrive_exactly_even_in_one_byte_writes(start_gportmap):
    """A ClientHello split over three TLS records, written one byte at a time, then
    more bytes: the target gets every byte once, in order (nothing lost, nothing
    doubled by the peek)."""
    recorder, other = Recorder(), Recorder()
    port = free_port()
    try:
        start_gportmap({"rules": [routed_rule(port, [
            route("other", other.port, sni=["other.test"]),
            route("a", recorder.port, sni=["a.test"]),
        ])]})
        hello = refragment(client_hello("a.test"), 3)
        assert parse_client_hello(hello) == ClientHello("a.test", ())
        tail = bytes(range(256)) * 64
        with connect(port) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(hello)):
                sock.send(hello[i:i + 1])
            sock.sendall(tail)
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        wait_for(lambda: recorder.got() == [hello + tail], what="the exact bytes at the target")
        assert other.got() == []
    finally:
        recorder.close()
        other.close()


def test_proxy_protocol_goes_before_the_sniffed_bytes(start_gportmap):
    """``proxyProtocol`` applies to every route: the header, then the client's bytes."""
    recorder = Recorder()
    port = free_port()
    try:
        start_gportmap({"rules": [routed_rule(port, [route("web", recorder.port, protocol="http")], proxyProtocol="v1")]})
        request = b"GET / HTTP/1.0\r\n\r\n"
        with connect(port) as sock:
            sock.sendall(request)
            assert recv_until_eof(sock) == b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nrecorder"
            client_port = sock.getsockname()[1]
        header = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\n".encode()
        assert recorder.got() == [header + request]
    finally:
        recorder.close()


def test_no_matching_route_and_no_default_is_refused_and_counted(start_gportmap):
    recorder = Recorder()
    port = free_port()
    try:
        gp = start_gportmap({"rules": [routed_rule(port, [route("a", recorder.port, sni=["a.test"])])]})
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not TLS: cannot be a.test
            assert closed_by_peer(sock)
        with connect(port) as sock:  # a ClientHello for another name
            sock.sendall(client_hello("b.test"))
            assert closed_by_peer(sock)
        wait_for(lambda: rule_stats(gp, "edge")["connections"]["rejected_by_reason"]["no_route"] == 2)
        assert recorder.got() == []
        assert gp.wait_event("connection_rejected", reason="no_route")
    finally:
        recorder.close()


def test_route_targets_given_by_name_take_the_greenlet_path(start_gportmap):
    """A target host name (resolved off the hub) runs the staged path: the same routes."""
    a, rest = Recorder(b"A"), Recorder(b"R")
    port = free_port()
    try:
        start_gportmap({"rules": [routed_rule(port, [
            {"name": "a", "protocol": "http", "targetHost": "localhost", "targetPort": a.port},
            {"name": "rest", "default": True, "targetHost": "localhost", "targetPort": rest.port},
        ], sniffTimeout=0.5)]})
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert recv_exactly(sock, 1) == b"A"
        with connect(port) as sock:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(sock, 1) == b"R"
    finally:
        a.close()
        rest.close()


# -- config errors ------------------------------------------------------------------------


def _errors(rule: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(__import__("json").dumps({"rules": [rule]}), "/etc/gportmap/rules.json")
    return str(caught.value)


@pytest.mark.parametrize(
    ("routes", "extra", "expected"),
    [
        ([{"sni": ["a.test"]}], {}, "rules[0].routes[0]: a route needs a target"),
        ([route("a", 1, sni=["a.test"]), route("b", 2), route("c", 3)], {}, "rules[0].routes[2].default: routes[1] is the default already"),
        ([{"targetHost": LOOPBACK, "targetPort": 1}], {}, "rules[0].routes[0]: a route needs something to match: 'sni', 'alpn', 'http_host', 'protocol'"),
        ([route("a", 1, sni=["a.test"]), {**route("b", 2), "alpn": ["h2"]}], {}, "rules[0].routes[1].alpn: a default route takes every client"),
        ([route("a", 1, protocol="gopher")], {}, "rules[0].routes[0].protocol: 'gopher' is not a supported protocol"),
        ([route("a", 1, sni=["*a.test"])], {}, "rules[0].routes[0].sni[0]: '*a.test' is not a server name pattern"),
        ([route("a", 1, http_host=["a..test"])], {}, "rules[0].routes[0].http_host[0]: 'a..test' is not a server name pattern"),
        ([route("a", 1, sni=["a.test"]), route("b", 1, sni=["b.test"])], {}, "rules[0].routes[1]: target 127.0.0.1:1 is already a target of routes[0]"),
        ([route("a", 1, sni=["a.test"]), route("a", 2)], {}, "rules[0].routes[1].name: 'a' is already the name of routes[0]"),
        ([route("a", 1)], {"targetHost": LOOPBACK, "targetPort": 2}, "rules[0]: give either 'routes' or 'targetHost' and 'targetPort', not both"),
        ([route("a", 1)], {"targetTls": True}, "rules[0].targetTls: cannot go with 'routes'"),
    ],
)
def test_config_errors_name_the_route(routes, extra, expected):
    rule = {"protocol": "tcp", "listenPort": 4000, "routes": routes, **extra}
    assert expected in _errors(rule)


def test_sniff_timeout_needs_routes_and_routes_need_tcp():
    assert "rules[0].sniffTimeout: applies only to rules with 'routes'" in _errors(
        {"protocol": "tcp", "listenPort": 4000, "targetHost": LOOPBACK, "targetPort": 1, "sniffTimeout": 1}
    )
    assert "rules[0].routes: applies only to tcp rules" in _errors(
        {"protocol": "udp", "listenPort": 4000, "routes": [route("a", 1)]}
    )


# -- the sans-IO parts ----------------------------------------------------------------


def _routes(*entries: tuple[str, RouteMatch, bool]) -> tuple[RuleRoute, ...]:
    return tuple(RuleRoute(name, match, (Target(LOOPBACK, i + 1, route=name),), default)
                 for i, (name, match, default) in enumerate(entries))


def test_decide_waits_while_an_earlier_route_cannot_tell():
    routes = _routes(
        ("sni", RouteMatch(sni=("a.test", "*.b.test")), False),
        ("http", RouteMatch(protocol=SniffProtocol.HTTP), False),
        ("rest", RouteMatch(), True),
    )
    hello = client_hello("x.b.test", ("h2",))
    assert parse_client_hello(hello) == ClientHello("x.b.test", ("h2",))
    for cut in (1, 5, 40, len(hello) - 1):
        assert decide(routes, hello[:cut], final=False) is Verdict.MORE
        assert decide(routes, hello[:cut], final=True).name == "rest"
    assert decide(routes, hello, final=False).name == "sni"
    assert decide(routes, client_hello("b.test"), final=False).name == "rest"  # '*.' needs a label in front
    assert decide(routes, b"GET", final=False) is Verdict.MORE
    assert decide(routes, b"GET ", final=False).name == "http"
    assert decide(routes, b"", final=True, silent=True).name == "rest"
    assert http_host(b"GET / HTTP/1.1\r\nHOST: Www.Test:8080\r\n") == "www.test"
    assert http_host(b"GET / HTTP/1.1\r\nHost: www.te") is Verdict.MORE
    assert http_host(b"GET / HTTP/1.1\r\n\r\n") is Verdict.NO


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=600), flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=8))
def test_client_hello_parser_fuzzed(data, flips):
    """Random bytes, and a real ClientHello with bytes changed: never an exception,
    always a ClientHello or a verdict; never past the cap."""
    assert isinstance(parse_client_hello(data), ClientHello | Verdict)
    hello = bytearray(_HELLO)
    for where, value in flips:
        hello[where % len(hello)] = value
    result = parse_client_hello(bytes(hello))
    assert isinstance(result, ClientHello | Verdict)
    assert isinstance(parse_client_hello(bytes(hello[: len(hello) // 2])), ClientHello | Verdict)
    assert isinstance(http_host(data), str | Verdict)
    assert parse_client_hello(b"\x16\x03\x01" + b"\xff" * SNIFF_CAP) in (Verdict.NO, Verdict.MORE)


_HELLO = refragment(client_hello("fuzz.test", ("h2", "http/1.1")), 2)
