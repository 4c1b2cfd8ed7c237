"""``proxyProtocol`` (SPEC §3): a tcp rule sends a PROXY protocol header to its target
first. Checked against the receivers people put behind a forwarder:

- nginx's stream module (``listen ... proxy_protocol``) answers the addresses it
  parsed (``$proxy_protocol_addr`` ...), and relays what follows the header to an
  echo target;
- HAProxy (``bind ... accept-proxy``) accepts the header, then passes the
  connection on with a header of its own (``send-proxy``) to a test target, which
  therefore reads exactly what HAProxy understood; a header HAProxy rejects ends
  the connection instead. One case puts TLS behind the header (``targetTls`` to an
  ``accept-proxy ssl`` bind): the header goes first, in the clear.

Both peers run as subprocesses of the test, with their own configuration, pid file
and logs in ``tmp_path``, on loopback ports only.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from certs import CA
from conftest import (
    LOOPBACK,
    TargetServer,
    closed_by_peer,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    require_tool,
    tcp_rule,
    wait_for,
)

from gportmap.config import Rule
from gportmap.engine import proxyproto
from gportmap.engine.connector import PoolConnect
from gportmap.engine.relay import BufferPool
from gportmap.log import RateLimiter
from gportmap.protocols import ServerContext, stream
from gportmap.protocols.stream import ClientGone
from gportmap.protocols.tcp import TcpServer
from gportmap.stats import StatsRegistry

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
VERSIONS = ("v1", "v2")
#: (listenHost of the rule, the address the client connects to, what the target must see)
FAMILIES = {
    "ipv4": (LOOPBACK, LOOPBACK, LOOPBACK),
    "ipv6": ("::1", "::1", "::1"),
    # An IPv4 client of a dual-stack listener: getpeername says ::ffff:127.0.0.1,
    # the header must say 127.0.0.1 (TCP4), as HAProxy writes it.
    "dual-stack": ("::", LOOPBACK, LOOPBACK),
}


def ipv6_port() -> int:
    """A port free on ::1 (free_port looks at 127.0.0.1 only)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
            return sock.getsockname()[1]
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")


def listen_port(host: str) -> int:
    return ipv6_port() if host == "::1" else free_port()


class Peer:
    """A server program run by the test: started, checked for readiness, stopped."""

    def __init__(self, name: str, cmd: list[str], folder: Path) -> None:
        self.name = name
        self.log_path = folder / f"{name}.out"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder
        )

    def output(self, extra: Path | None = None) -> str:
        text = self.log_path.read_text(errors="replace")
        if extra is not None and extra.exists():
            text += extra.read_text(errors="replace")
        return text

    def wait_listening(
        self, port: int, ready: Callable[[], bool] = lambda: True, extra_log: Path | None = None
    ) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.output(extra_log)}"
                )
            if not ready():
                return False
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(up, 15, what=f"{self.name} listening on {port}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class Nginx:
    """nginx with two stream servers that both expect a PROXY header (v1 or v2, nginx
    tells them apart): ``answer_port`` answers the addresses the header carried and
    closes; ``relay_port`` proxies what follows the header to ``echo_port``."""

    def __init__(self, folder: Path, echo_port: int) -> None:
        nginx = require_tool("nginx")
        if not NGINX_STREAM_MODULE.exists():
            _missing(f"{NGINX_STREAM_MODULE} (Debian libnginx-mod-stream)")
        folder.mkdir()
        self.answer_port, self.relay_port = free_port(), free_port()
        self.error_log = folder / "error.log"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = folder / "nginx.conf"
        conf.write_text(
            f"load_module {NGINX_STREAM_MODULE};\n"
            f"{user}worker_processes 1;\n"
            f"pid {folder / 'nginx.pid'};\n"
            f"error_log {self.error_log} info;\n"
            "events { worker_connections 64; }\n"
            "stream {\n"
            "  proxy_protocol_timeout 10s;\n"
            "  server {\n"
            f"    listen {LOOPBACK}:{self.answer_port} proxy_protocol;\n"
            '    return "$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr '
            '$proxy_protocol_server_port\\n";\n'
            "  }\n"
            "  server {\n"
            f"    listen {LOOPBACK}:{self.relay_port} proxy_protocol;\n"
            f"    proxy_pass {LOOPBACK}:{echo_port};\n"
            "  }\n"
            "}\n"
        )
        cmd = [nginx, "-p", str(folder), "-c", str(conf), "-e", str(self.error_log), "-g", "daemon off;"]
        self.peer = Peer("nginx", cmd, folder)
        try:
            # nginx writes its pid file after it has bound every listener.
            self.peer.wait_listening(self.relay_port, (folder / "nginx.pid").exists, self.error_log)
        except BaseException:
            self.peer.close()
            raise

    def close(self) -> None:
        self.peer.close()


class HaproxyBehind:
    """HAProxy accepting a PROXY header (``accept-proxy``) and sending its own v1
    header (``send-proxy``) to a test target that records that line, then echoes."""

    def __init__(self, folder: Path, ssl_pem: Path | None = None) -> None:
        haproxy = require_tool("haproxy")
        folder.mkdir()
        self.lines: list[bytes] = []
        self.target = TargetServer(self._record_then_echo)
        self.port = free_port()
        ssl = f" ssl crt {ssl_pem}" if ssl_pem else ""
        conf = folder / "haproxy.cfg"
        conf.write_text(
            "global\n"
            "  maxconn 64\n"
            "defaults\n"
            "  mode tcp\n"
            "  timeout connect 5s\n"
            "  timeout client 30s\n"
            "  timeout server 30s\n"
            "frontend in\n"
            f"  bind {LOOPBACK}:{self.port} accept-proxy{ssl}\n"
            "  default_backend out\n"
            "backend out\n"
            f"  server target {LOOPBACK}:{self.target.port} send-proxy\n"
        )
        self.peer = Peer("haproxy", [haproxy, "-f", str(conf), "-db"], folder)
        try:
            self.peer.wait_listening(self.port)
        except BaseException:
            self.close()
            raise

    def _record_then_echo(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\r\n") and len(line) < 108:
            byte = conn.recv(1)  # byte by byte: not one byte past the line
            if not byte:
                return
            line += byte
        self.lines.append(line)
        while data := conn.recv(65536):
            conn.sendall(data)

    def close(self) -> None:
        self.peer.close()
        self.target.close()


def _missing(what: str) -> None:
    if os.environ.get("GPORTMAP_REQUIRE_TOOLS", "") not in ("", "0"):
        pytest.fail(f"{what} is required (GPORTMAP_REQUIRE_TOOLS=1) but not installed")
    pytest.skip(f"{what} is not installed (.ci/run installs it)")


@pytest.fixture
def nginx(tmp_path: Path, echo_target: TargetServer) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx", echo_target.port)
    yield server
    server.close()


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HaproxyBehind]:
    server = HaproxyBehind(tmp_path / "haproxy")
    yield server
    server.close()


def rule_to(port: int, listen_host: str, version: str, **extra: object) -> dict:
    return tcp_rule(
        listen_port(listen_host), port, name="pp", listenHost=listen_host, proxyProtocol=version, **extra
    )


def echo_through(port: int, host: str, payload: bytes) -> tuple[bytes, tuple]:
    """Send ``payload`` (from a thread, so that neither side waits on the other's
    buffers) and read as many bytes back; (what came back, the client's address)."""
    with connect(port, host) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join(10)
        return echoed, sock.getsockname()


def closed_record(gp, count: int = 1) -> dict:
    return gp.wait_event("connection_closed", count=count, rule="pp")[-1]


def rule_stats(gp) -> dict:
    return next(rule for rule in gp.admin_json("/stats")["rules"] if rule["name"] == "pp")


# --- nginx --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("version", VERSIONS)
def test_nginx_reads_the_client_address_and_the_address_it_reached(start_gportmap, nginx, version, family):
    listen_host, client_host, seen_host = FAMILIES[family]
    rule = rule_to(nginx.answer_port, listen_host, version)
    gp = start_gportmap([rule])
    with connect(rule["listenPort"], client_host) as sock:
        client_port = sock.getsockname()[1]
        answer = recv_until_eof(sock, 1024)
    assert answer.decode() == f"{seen_host} {client_port} {seen_host} {rule['listenPort']}\n", (
        nginx.peer.output(nginx.error_log)
    )
    record = closed_record(gp)
    assert record["reason"] == "closed"
    # The header is gportmap's, not the client's: the client sent nothing.
    assert (record["bytes_received"], record["bytes_sent"]) == (0, len(answer))


@pytest.mark.parametrize("version", VERSIONS)
def test_bytes_behind_the_header_reach_nginx_intact_both_ways(start_gportmap, nginx, version):
    rule = rule_to(nginx.relay_port, LOOPBACK, version)
    gp = start_gportmap([rule])
    payload = os.urandom(512 * 1024)
    echoed, _ = echo_through(rule["listenPort"], LOOPBACK, payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    record = closed_record(gp)
    assert (record["bytes_received"], record["bytes_sent"]) == (len(payload), len(payload))
    stats = rule_stats(gp)
    assert stats["bytes"] == {"received": len(payload), "sent": len(payload)}
    assert stats["upstream_connect_failures"] == 0


# --- HAProxy ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("version", VERSIONS)
def test_haproxy_accepts_the_header_and_understands_the_addresses(start_gportmap, haproxy, version, family):
    listen_host, client_host, seen_host = FAMILIES[family]
    rule = rule_to(haproxy.port, listen_host, version)
    gp = start_gportmap([rule])
    payload = os.urandom(64 * 1024) + b"\r\n\r\n\x00\r\nQUIT\nPROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    echoed, client = echo_through(rule["listenPort"], client_host, payload)
    assert echoed == payload, haproxy.peer.output()
    tcp = "TCP6" if ":" in seen_host else "TCP4"
    assert haproxy.lines == [
        f"PROXY {tcp} {seen_host} {seen_host} {client[1]} {rule['listenPort']}\r\n".encode()
    ]
    record = closed_record(gp)
    assert (record["bytes_received"], record["bytes_sent"]) == (len(payload), len(payload))
    assert rule_stats(gp)["bytes"] == {"received": len(payload), "sent": len(payload)}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_header_goes_before_the_tls_handshake_with_the_target(start_gportmap, tmp_path, version):
    ca = CA(tmp_path, "ca")
    server = ca.issue("server", "127.0.0.1", ips=(LOOPBACK,))
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(server.cert.read_bytes() + server.key.read_bytes())
    behind = HaproxyBehind(tmp_path / "haproxy", ssl_pem=pem)
    try:
        rule = rule_to(behind.port, LOOPBACK, version, targetTls={"caFile": str(ca.path)})
        gp = start_gportmap([rule])
        payload = os.urandom(32 * 1024)
        echoed, client = echo_through(rule["listenPort"], LOOPBACK, payload)
        assert echoed == payload, behind.peer.output()
        assert behind.lines == [
            f"PROXY TCP4 {LOOPBACK} {LOOPBACK} {client[1]} {rule['listenPort']}\r\n".encode()
        ]
        record = closed_record(gp)
        assert (record["bytes_received"], record["bytes_sent"]) == (len(payload), len(payload))
    finally:
        behind.close()


def test_without_the_key_no_header_is_sent(start_gportmap, haproxy):
    """The control: the same HAProxy refuses a connection that brings no header, so
    the tests above would fail if the header were missing."""
    rule = tcp_rule(free_port(), haproxy.port, name="pp")
    gp = start_gportmap([rule])
    with connect(rule["listenPort"]) as sock:
        sock.sendall(b"hello\r\n")
        assert closed_by_peer(sock)  # by a FIN or, when HAProxy aborts with a reset, an RST
    closed_record(gp)
    assert haproxy.lines == [] and haproxy.target.accepted == 0


# --- the bytes on the wire ---------------------------------------------------------


@pytest.mark.parametrize("client_tls", [False, True], ids=["plain", "tls-listener"])
@pytest.mark.parametrize("version", VERSIONS)
def test_the_rule_sends_the_version_it_names_then_the_client_bytes(
    start_gportmap, tmp_path, version, client_tls
):
    """nginx and HAProxy take either version; here the target reads the raw bytes.
    With ``tls`` on the listener the addresses come from the TLS-wrapped socket."""
    received = bytearray()
    done = threading.Event()

    def read_all(conn: socket.socket) -> None:
        received.extend(recv_until_eof(conn, 4096))
        done.set()

    target = TargetServer(read_all)
    try:
        extra: dict = {}
        if client_tls:
            ca = CA(tmp_path, "ca")
            server = ca.issue("server", LOOPBACK, ips=(LOOPBACK,))
            extra["tls"] = {"certFile": str(server.cert), "keyFile": str(server.key)}
        rule = rule_to(target.port, LOOPBACK, version, **extra)
        gp = start_gportmap([rule])
        with connect(rule["listenPort"]) as plain:
            client = plain.getsockname()
            if client_tls:
                context = ssl.create_default_context(cafile=str(ca.path))
                # TLS 1.2: no session tickets arrive after the handshake, so closing
                # with them unread cannot turn the close into a reset (a client that
                # resets before its address is read is refused: see the test below).
                context.maximum_version = ssl.TLSVersion.TLSv1_2
                with context.wrap_socket(plain, server_hostname=LOOPBACK) as sock:
                    sock.sendall(b"after the header")
            else:
                plain.sendall(b"after the header")
        assert done.wait(10)
        expected = proxyproto.header(version, client, (LOOPBACK, rule["listenPort"]))
        assert expected.startswith(
            b"PROXY TCP4 " if version == "v1" else proxyproto.V2_SIGNATURE + b"\x21\x11"
        )
        assert bytes(received) == expected + b"after the header"
        assert closed_record(gp)["bytes_received"] == len(b"after the header")
    finally:
        target.close()


# --- a header that cannot be sent -------------------------------------------------


def test_a_header_that_cannot_be_sent_is_an_upstream_connect_failure(monkeypatch) -> None:
    """The target went away between the connect and the header: the upstream socket
    is closed, the failure is counted (against the target and the rule), and the
    error says what happened. (``retries`` 0: the one target is not tried again.)"""
    rule = Rule("pp", "tcp", LOOPBACK, 1, LOOPBACK, 2, proxy_protocol="v2", retries=0)
    server = TcpServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    upstream, target_end = socket.socketpair()
    target_end.close()  # a send now fails with EPIPE, deterministically

    def connected(pool, key, timeout):  # the pool's connect reached its one target: this socket
        connector = PoolConnect(pool, key, timeout, None, None)
        connector.target = pool.acquire(key)
        connector.tried.append(connector.target)
        return upstream, connector

    monkeypatch.setattr(stream, "await_connect", connected)
    with socket.create_server((LOOPBACK, 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client, listener.accept()[0] as accepted:
            assert client.getpeername() == accepted.getsockname()
            with pytest.raises(OSError) as failed:
                server.connect_target(accepted)
    assert upstream.fileno() == -1
    assert server.stats.connect_failures == 1
    (target,) = server.target_pool.targets
    assert (target.connect_failures, target.active) == (1, 0)
    # What tcp.py logs for it (reason connect_failed, as for a refused connect):
    assert server.connect_failed(failed.value) == (
        "connect_failed",
        "cannot send the PROXY protocol header: Broken pipe",
    )


def test_a_client_that_reset_before_its_address_was_read_never_reaches_the_target(monkeypatch) -> None:
    """Without a peer address the header could only be UNKNOWN/LOCAL, which tells the
    target to trust the connection's own endpoint (gportmap): the client's bytes
    must not go there under it. No target connection, no upstream failure counted."""
    rule = Rule("pp", "tcp", LOOPBACK, 1, LOOPBACK, 2, proxy_protocol="v1")
    server = TcpServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    connects: list[int] = []
    monkeypatch.setattr(stream, "await_connect", lambda *args: connects.append(1))
    with socket.create_server((LOOPBACK, 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        with listener.accept()[0] as accepted:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.sendall(b"bytes the target must not see")
            client.close()  # with linger 0: a reset

            def reset_arrived() -> bool:
                try:
                    accepted.getpeername()
                except OSError:
                    return True
                return False

            wait_for(reset_arrived, what="the reset to arrive")
            with pytest.raises(ClientGone) as gone:
                server.connect_target(accepted)
    assert connects == [] and server.stats.connect_failures == 0
    reason, error = server.connect_failed(gone.value)
    assert reason == "client_error"
    assert error is not None and error.startswith(
        "the client left before the PROXY protocol header was sent: "
    )
