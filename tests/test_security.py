"""TLS on both sides, mTLS, client admission, the target allowlist, and hostile
input on TLS ports — with real peers (openssl s_client, curl, websocket-client)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websocket
from certs import CA
from conftest import (
    LOOPBACK,
    HttpPage,
    TargetServer,
    connect,
    echo_handler,
    free_port,
    recv_exactly,
    recv_until_eof,
    require_tool,
    tcp_rule,
    wait_for,
)


@pytest.fixture
def pki(tmp_path: Path):
    class PKI:
        ca = CA(tmp_path, "ca")
        other = CA(tmp_path, "other-ca")
        server = ca.issue("server", "127.0.0.1", ips=("127.0.0.1", "::1"), dns=("localhost",))
        client = ca.issue("client", "good-client", client=True)
        stranger = other.issue("stranger", "bad-client", client=True)

    return PKI


def tls_rule(port: int, target: int, pki, **extra) -> dict:
    return tcp_rule(port, target, tls={"certFile": str(pki.server.cert), "keyFile": str(pki.server.key)}, **extra)


def tls_client(port: int, pki, cert=None, server_name: str = "127.0.0.1") -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(pki.ca.path))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context.wrap_socket(connect(port), server_hostname=server_name)


def rule_stats(gp, name: str) -> dict:
    return next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == name)


def test_openssl_curl_and_python_reach_a_tls_rule(start_gportmap, echo_target, pki):
    web = HttpPage(b"hello over tls\n", "text/plain")
    echo_port, web_port = free_port(), free_port()
    gp = start_gportmap(
        [tls_rule(echo_port, echo_target.port, pki, name="echo-tls"), tls_rule(web_port, web.port, pki, name="web-tls")]
    )
    try:
        openssl = subprocess.run(
            [require_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{echo_port}", "-CAfile", str(pki.ca.path),
             "-verify_return_error", "-verify_ip", "127.0.0.1"],
            input=b"", capture_output=True, timeout=30,
        )
        assert openssl.returncode == 0, openssl.stderr
        assert b"Verify return code: 0 (ok)" in openssl.stdout
        assert b"TLSv1.3" in openssl.stdout or b"TLSv1.2" in openssl.stdout
        curl = subprocess.run(
            [require_tool("curl"), "-sS", "--cacert", str(pki.ca.path), f"https://127.0.0.1:{web_port}/"],
            capture_output=True, timeout=30,
        )
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == b"hello over tls\n"
        with tls_client(echo_port, pki) as sock:
            # One thread: an SSLSocket must not be read and written from two at once.
            data = os.urandom(2 * 1024 * 1024)
            echoed = bytearray()
            for offset in range(0, len(data), 65536):
                chunk = data[offset : offset + 65536]
                sock.sendall(chunk)
                echoed += recv_exactly(sock, len(chunk))
            assert echoed == data
        # Plain TCP to a TLS port is refused as a TLS failure, not relayed.
        with connect(echo_port) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                recv_until_eof(plain)
            except ConnectionResetError:
                pass
        wait_for(lambda: rule_stats(gp, "echo-tls")["connections"]["rejected_by_reason"]["tls"] >= 1, what="tls reject")
    finally:
        web.close()


def test_websocket_client_reaches_a_wss_rule(start_gportmap, echo_target, pki):
    port = free_port()
    start_gportmap(
        [{"protocol": "websocket", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
          "targetPort": echo_target.port, "tls": {"certFile": str(pki.server.cert), "keyFile": str(pki.server.key)}}]
    )
    ws = websocket.create_connection(f"wss://127.0.0.1:{port}/", sslopt={"ca_certs": str(pki.ca.path)})
    payload = os.urandom(300_000)
    ws.send_binary(payload)
    got = b""
    while len(got) < len(payload):
        got += ws.recv()
    assert got == payload
    ws.close()


def test_mtls_accepts_a_good_client_and_rejects_the_others(start_gportmap, echo_target, pki):
    port = free_port()
    tls = {"certFile": str(pki.server.cert), "keyFile": str(pki.server.key), "clientCaFile": str(pki.ca.path)}
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="mtls", tls=tls)])
    with tls_client(port, pki, cert=pki.client) as sock:
        sock.sendall(b"trusted")
        assert recv_exactly(sock, 7) == b"trusted"
    for cert in (None, pki.stranger):
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with tls_client(port, pki, cert=cert) as sock:
                sock.sendall(b"let me in")
                if not sock.recv(16):
                    raise ConnectionResetError("closed")
    wait_for(lambda: rule_stats(gp, "mtls")["connections"]["rejected_by_reason"]["tls"] == 2, what="2 tls rejects")
    assert rule_stats(gp, "mtls")["connections"]["total"] == 1
    assert echo_target.accepted == 1  # the rejected clients never reached the target


@pytest.fixture
def tls_echo(pki):
    """A TLS echo server on 127.0.0.1 with a certificate from the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server.cert), str(pki.server.key))

    def handler(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                echo_handler(tls)
        except (ssl.SSLError, OSError):
            pass

    server = TargetServer(handler)
    yield server
    server.close()


@pytest.mark.slow
def test_target_tls_verifies_the_target(start_gportmap, tls_echo, pki):
    ports = {name: free_port() for name in ("right", "wrong-ca", "wrong-name", "no-verify", "system")}
    gp = start_gportmap(
        [
            tcp_rule(ports["right"], tls_echo.port, name="right", targetTls={"caFile": str(pki.ca.path)}),
            tcp_rule(ports["wrong-ca"], tls_echo.port, name="wrong-ca", targetTls={"caFile": str(pki.other.path)}),
            tcp_rule(ports["wrong-name"], tls_echo.port, name="wrong-name",
                     targetTls={"caFile": str(pki.ca.path), "serverName": "db.internal.example"}),
            tcp_rule(ports["no-verify"], tls_echo.port, name="no-verify", targetTls={"verify": False}),
            tcp_rule(ports["system"], tls_echo.port, name="system", targetTls=True),
        ]
    )
    (warning,) = gp.wait_event("tls_verify_off")
    assert warning["rule"] == "no-verify"
    for name in ("right", "no-verify"):
        with connect(ports[name]) as sock:
            sock.sendall(b"secret")
            assert recv_exactly(sock, 6) == b"secret", name
    for name in ("wrong-ca", "wrong-name", "system"):  # the test CA is not in the system store
        with connect(ports[name]) as sock:
            sock.sendall(b"secret")
            try:
                assert recv_until_eof(sock) == b"", name
            except ConnectionResetError:
                pass  # closed with our bytes unread: a reset is the kernel's way to say so
        (closed,) = gp.wait_event("connection_closed", rule=name)
        assert closed["reason"] == "connect_failed" and "TLS handshake with the target failed" in closed["error"], closed
        assert rule_stats(gp, name)["upstream_connect_failures"] == 1


@pytest.mark.slow  # waits out a handshake deadline
def test_silent_clients_are_cut_at_the_handshake_deadline_and_do_not_block_others(start_gportmap, echo_target, pki):
    port = free_port()
    gp = start_gportmap([tls_rule(port, echo_target.port, pki, name="deadline", handshakeTimeout=2)])
    started = time.monotonic()
    silent = [connect(port) for _ in range(200)]
    try:
        with tls_client(port, pki) as sock:
            sock.sendall(b"served")
            assert recv_exactly(sock, 6) == b"served"
        # Not behind the 200: served before their handshake deadline cut any of them
        # (measured against gportmap's own timer, not against the clock).
        assert rule_stats(gp, "deadline")["connections"]["rejected_by_reason"].get("tls", 0) == 0
        for sock in silent:
            sock.settimeout(10)
            assert recv_until_eof(sock) == b""  # cut by the server
        elapsed = time.monotonic() - started
        assert elapsed > 1.5, elapsed  # at the deadline (2 s), not before
        wait_for(lambda: rule_stats(gp, "deadline")["connections"]["rejected_by_reason"]["tls"] == 200, what="200 cut")
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.slow
def test_garbage_truncated_hello_and_http_close_only_their_own_connection(start_gportmap, echo_target, pki):
    port = free_port()
    start_gportmap([tls_rule(port, echo_target.port, pki, name="hostile", handshakeTimeout=2)])
    with tls_client(port, pki) as good:
        good.sendall(b"before")
        assert recv_exactly(good, 6) == b"before"
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32)  # a ClientHello cut short
        for junk in (os.urandom(512), hello, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
            with connect(port) as bad:
                bad.sendall(junk)
                bad.settimeout(10)
                try:
                    recv_until_eof(bad)
                except ConnectionResetError:
                    pass
        good.sendall(b"after!")
        assert recv_exactly(good, 6) == b"after!"


def test_allow_and_deny_for_v4_and_v6_deny_wins(start_gportmap, echo_target):
    v4_ok, v4_denied, v6_denied = free_port(), free_port(), free_port()
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", v6_denied))
        probe.close()
        has_v6 = True
    except OSError:
        has_v6 = False
    rules = [
        tcp_rule(v4_ok, echo_target.port, name="v4-ok", allow=["127.0.0.0/8", "10.0.0.0/8"]),
        tcp_rule(v4_denied, echo_target.port, name="v4-denied", allow=["127.0.0.0/8"], deny=["127.0.0.1"]),
    ]
    if has_v6:
        rules.append(tcp_rule(v6_denied, echo_target.port, name="v6-denied", listenHost="::1", allow=["::1"], deny=["::/0"]))
    gp = start_gportmap(rules)
    with connect(v4_ok) as sock:
        sock.sendall(b"in")
        assert recv_exactly(sock, 2) == b"in"
    with connect(v4_denied) as sock:
        assert recv_until_eof(sock) == b""
    names = ["v4-denied"]
    if has_v6:
        with socket.create_connection(("::1", v6_denied), timeout=5) as sock:
            assert recv_until_eof(sock) == b""
        names.append("v6-denied")
    for name in names:
        stats = rule_stats(gp, name)
        assert stats["connections"]["rejected_by_reason"]["acl"] == 1 and stats["connections"]["total"] == 0
    assert echo_target.accepted == 1


def test_udp_denied_source_never_gets_a_session(start_gportmap):
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((LOOPBACK, 0))
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap(
        [{"protocol": "udp", "name": "dns", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
          "targetPort": echo.getsockname()[1], "deny": ["127.0.0.0/8"]}]
    )
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(5):
            client.sendto(b"query", (LOOPBACK, port))
        wait_for(lambda: rule_stats(gp, "dns")["udp"]["dropped_by_reason"]["acl"] == 5, what="5 acl drops")
        stats = rule_stats(gp, "dns")
        assert stats["udp"]["sessions"] == 0 and stats["connections"]["total"] == 0
        echo.settimeout(0.2)
        with pytest.raises(TimeoutError):
            echo.recv(100)  # nothing reached the target
    finally:
        client.close()
        echo.close()


def test_a_target_outside_allow_targets_fails_check_naming_the_rule(tmp_path):
    rules = {
        "settings": {"allowTargets": ["127.0.0.1/32:8000-8999", "[::1/128]:22"]},
        "rules": [
            tcp_rule(9000, 8080, name="inside"),
            tcp_rule(9001, 9090, name="wrong-port"),
            tcp_rule(9002, 22, name="v6-ssh", targetHost="::1"),
            tcp_rule(9003, 23, name="v6-telnet", targetHost="::1"),
        ],
    }
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    result = subprocess.run([sys.executable, "-m", "gportmap", "--check", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: rules[1]: rule 'wrong-port': target 127.0.0.1:9090 (127.0.0.1) is outside settings.allowTargets",
        f"{path}: rules[3]: rule 'v6-telnet': target [::1]:23 (::1) is outside settings.allowTargets",
    ]


def test_missing_or_mismatched_certificates_are_config_errors(tmp_path, pki):
    rules = [
        tcp_rule(9000, 8080, name="missing", tls={"certFile": "nope.pem", "keyFile": "nope.key"}),
        tcp_rule(9001, 8080, name="mismatch", tls={"certFile": str(pki.server.cert), "keyFile": str(pki.client.key)}),
    ]
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    result = subprocess.run([sys.executable, "-m", "gportmap", "--check", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: rules[0].tls.certFile: cannot read {tmp_path / 'nope.pem'}: No such file or directory"
    assert lines[1] == f"{path}: rules[0].tls.keyFile: cannot read {tmp_path / 'nope.key'}: No such file or directory"
    assert lines[2].startswith(f"{path}: rules[1].tls: cannot load the certificate, key or client CA:")


def test_a_renewed_certificate_applies_on_sighup(start_gportmap, echo_target, pki, tmp_path):
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(pki.server.cert.read_bytes())
    live_key.write_bytes(pki.server.key.read_bytes())
    port = free_port()
    gp = start_gportmap(
        {"settings": {"watch": False}, "rules": [tcp_rule(port, echo_target.port, name="renew", tls={"certFile": "live.pem", "keyFile": "live.key"})]}
    )

    def served_cert() -> bytes:
        with tls_client(port, pki) as sock:
            return sock.getpeercert(binary_form=True)

    first = served_cert()
    kept = tls_client(port, pki)
    kept.sendall(b"old")
    assert recv_exactly(kept, 3) == b"old"
    renewed = pki.ca.issue("renewed", "127.0.0.1", ips=("127.0.0.1",))
    live_cert.write_bytes(renewed.cert.read_bytes())
    live_key.write_bytes(renewed.key.read_bytes())
    gp.signal(signal.SIGHUP)
    (reloaded,) = gp.wait_event("config_reloaded")
    assert reloaded["changed"] == ["renew"]
    second = served_cert()
    assert hashlib.sha256(second).digest() != hashlib.sha256(first).digest()
    kept.sendall(b"still")  # the open connection keeps its session
    assert recv_exactly(kept, 5) == b"still"
    kept.close()


def test_a_tls_client_half_closed_by_the_target_keeps_sending_intact(start_gportmap, pki):
    """The target ends first: the TLS client gets close_notify, and what it sends
    afterwards reaches the target intact: never as ciphertext, and never dropped.
    (The greenlet relay's SSLSocket ran SSL_shutdown twice, and the second call
    discarded the client's bytes when they had arrived by then: lost here about
    one run in five. The hub relay's TLS stage sends close_notify once and reads
    on. tests/test_tls_relay.py forces the race.)"""
    received: list[bytes] = []

    def reply_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        received.append(recv_until_eof(conn))

    target = TargetServer(reply_then_listen)
    port = free_port()
    try:
        gp = start_gportmap([tls_rule(port, target.port, pki, name="halfclose")])
        with tls_client(port, pki) as sock:
            assert recv_exactly(sock, 5) == b"hello"
            assert sock.recv(10) == b""  # close_notify: a clean end of the server's side
            sock.sendall(b"and one more thing")
            try:
                sock.unwrap()
            except (ssl.SSLError, OSError):
                pass
        wait_for(lambda: received, what="the target's EOF")
        assert received == [b"and one more thing"]
        (closed,) = gp.wait_event("connection_closed", rule="halfclose")
        assert (closed["reason"], closed["bytes_received"], closed["bytes_sent"]) == ("closed", 18, 5)
    finally:
        target.close()
