"""TLS through the hub relay (issue 16): the sans-IO stage on either side or both,
handshakes on the hub, limits taken before the handshake, the idle clock after a
stall of the whole process. Real peers: ``openssl s_client``/``s_server`` and
Python's ssl, on 127.0.0.1 only.

``BioTls`` is a peer that can half-close a TLS connection (send close_notify and
keep reading), which ``SSLSocket`` cannot: its ``unwrap`` waits for the other
side's close_notify and drops what arrives before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
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

MB = 1024 * 1024
TESTS = str(Path(__file__).resolve().parent)
SAMPLES = {"PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def pki(tmp_path: Path):
    class PKI:
        ca = CA(tmp_path, "ca")
        other = CA(tmp_path, "other-ca")
        server = ca.issue("server", "127.0.0.1", ips=("127.0.0.1",), dns=("localhost",))
        target = ca.issue("target", "127.0.0.1", ips=("127.0.0.1",))
        client = ca.issue("client", "good-client", client=True)
        stranger = other.issue("stranger", "bad-client", client=True)

    return PKI


def listener_tls(pki, **extra) -> dict:
    return {"certFile": str(pki.server.cert), "keyFile": str(pki.server.key), **extra}


def client_context(pki, cert=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.path))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context


def target_context(pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.target.cert), str(pki.target.key))
    return context


def rule_stats(gp, name: str) -> dict:
    return next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == name)


class BioTls:
    """A blocking TLS peer over a socket through memory BIOs, able to half-close."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool, server_hostname=None) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side, server_hostname)
        self.early: list[bytes] = []  # read while half-closing, handed out by recv first

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def handshake(self, then: bytes = b"") -> None:
        """The handshake; ``then`` goes out in the same write as its last flight."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        if then:
            self.tls.write(then)
        self._flush()

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        for offset in range(0, len(view), 65536):
            self.tls.write(view[offset : offset + 65536])
            self._flush()

    def recv(self) -> bytes:
        """Plaintext, b"" at the peer's close_notify (SSLEOFError on a bare TCP end)."""
        if self.early:
            return self.early.pop(0)
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._fill()
            except ssl.SSLZeroReturnError:  # what read says instead of b"" once we half-closed too
                return b""

    def recv_all(self) -> bytes:
        chunks = []
        while chunk := self.recv():
            chunks.append(chunk)
        return b"".join(chunks)

    def half_close(self) -> None:
        """close_notify, keep reading: complete records are read first, or the
        second SSL_shutdown that ``unwrap`` runs would drop them."""
        while True:
            try:
                chunk = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            self.early.append(chunk)
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush()


def tls_target(pki, handler) -> TargetServer:
    """A TargetServer whose handler gets a BioTls (server side, handshake done)."""
    context = target_context(pki)

    def run(conn: socket.socket) -> None:
        peer = BioTls(conn, context, server_side=True)
        try:
            peer.handshake()
        except (ssl.SSLError, OSError):
            return
        handler(peer)

    return TargetServer(run)


def bio_client(port: int, pki, cert=None) -> BioTls:
    peer = BioTls(connect(port), client_context(pki, cert), server_side=False, server_hostname="127.0.0.1")
    peer.handshake()
    return peer


# --- bytes both ways, ends both ways ------------------------------------------------


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"], ids=["hub", "staged"])
def test_10mb_each_way_through_tls_on_both_sides_with_half_closes_both_ways(start_gportmap, pki, target_host):
    """The client uploads 10 MB and half-closes (close_notify, still reading); the
    target, having read to that end, sends 10 MB and half-closes in turn. Both
    ends are relayed as ends, every byte arrives (sha256), counts are exact."""
    upload, download = os.urandom(10 * MB), os.urandom(10 * MB)
    seen: list[str] = []

    def sink_then_source(peer: BioTls) -> None:
        seen.append(hashlib.sha256(peer.recv_all()).hexdigest())  # to the client's close_notify
        peer.sendall(download)
        peer.half_close()
        peer.recv_all()  # nothing more comes: the relay ends with our end

    target = tls_target(pki, sink_then_source)
    port = free_port()
    rule = tcp_rule(port, target.port, name="both", targetHost=target_host, tls=listener_tls(pki),
                    targetTls={"caFile": str(pki.ca.path), "serverName": "127.0.0.1"})
    gp = start_gportmap([rule])
    try:
        client = bio_client(port, pki)
        client.sendall(upload)
        client.half_close()
        got = client.recv_all()  # ends with gportmap's close_notify, not a bare TCP end
        client.sock.close()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(download).hexdigest()
        wait_for(lambda: seen, what="the target's read to the client's end")
        assert seen == [hashlib.sha256(upload).hexdigest()]
        (closed,) = gp.wait_event("connection_closed", rule="both")
        assert (closed["reason"], closed["bytes_received"], closed["bytes_sent"]) == ("closed", 10 * MB, 10 * MB)
    finally:
        target.close()


def test_target_ends_first_and_the_tls_client_keeps_sending_both_sides_tls(start_gportmap, pki):
    """The mirror of tests/test_security.py's half-close test with TLS to the
    target too: the target's close_notify reaches the client as an end, and what
    the client sends afterwards reaches the target intact."""
    received: list[bytes] = []

    def hello_then_listen(peer: BioTls) -> None:
        peer.sendall(b"hello")
        peer.half_close()
        received.append(peer.recv_all())

    target = tls_target(pki, hello_then_listen)
    port = free_port()
    gp = start_gportmap([tcp_rule(port, target.port, name="mirror", tls=listener_tls(pki),
                                  targetTls={"caFile": str(pki.ca.path)})])
    try:
        client = bio_client(port, pki)
        assert client.recv() == b"hello"
        assert client.recv() == b""  # the target's end, as close_notify
        client.sendall(b"and one more thing")
        client.half_close()
        assert client.recv() == b""
        client.sock.close()
        wait_for(lambda: received, what="the target's end")
        assert received == [b"and one more thing"]
        (closed,) = gp.wait_event("connection_closed", rule="mirror")
        assert closed["reason"] == "closed" and closed["bytes_received"] == 18
    finally:
        target.close()


def test_openssl_s_client_10mb_both_ways_at_once(start_gportmap, pki, tmp_path):
    """A real TLS client streaming both ways at once: backpressure on both
    directions of a staged relay."""
    openssl = require_tool("openssl")
    upload, download = os.urandom(10 * MB), os.urandom(10 * MB)
    seen: list[str] = []

    def sink_and_source(conn: socket.socket) -> None:
        sender = threading.Thread(target=conn.sendall, args=(download,))
        sender.start()
        digest, got = hashlib.sha256(), 0
        while got < len(upload) and (chunk := conn.recv(65536)):
            digest.update(chunk)
            got += len(chunk)
        seen.append(digest.hexdigest())
        sender.join()
        conn.shutdown(socket.SHUT_WR)

    target = TargetServer(sink_and_source)
    port = free_port()
    source = tmp_path / "upload.bin"
    source.write_bytes(upload)
    gp = start_gportmap([tcp_rule(port, target.port, name="stream", tls=listener_tls(pki))])
    try:
        with open(source, "rb") as stdin:
            run = subprocess.run(
                [openssl, "s_client", "-quiet", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki.ca.path),
                 "-verify_return_error"],
                stdin=stdin, capture_output=True, timeout=120,
            )
        assert hashlib.sha256(run.stdout).hexdigest() == hashlib.sha256(download).hexdigest(), run.stderr[-500:]
        wait_for(lambda: seen, what="the target's digest")
        assert seen == [hashlib.sha256(upload).hexdigest()]
        (closed,) = gp.wait_event("connection_closed", rule="stream")
        assert (closed["bytes_received"], closed["bytes_sent"]) == (10 * MB, 10 * MB)
    finally:
        target.close()


def test_openssl_s_server_as_the_tls_target(start_gportmap, pki, tmp_path):
    """targetTls against OpenSSL's own server (``-rev``: each line back reversed),
    behind a TLS listener: two sessions of different libraries' making, one relay."""
    openssl = require_tool("openssl")
    target_port = free_port()
    server = subprocess.Popen(
        [openssl, "s_server", "-rev", "-accept", f"127.0.0.1:{target_port}", "-cert", str(pki.target.cert),
         "-key", str(pki.target.key)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex((LOOPBACK, target_port)) == 0

        wait_for(listening, what="openssl s_server")  # a probe without a handshake: it serves on
        port = free_port()
        start_gportmap([tcp_rule(port, target_port, name="rev", tls=listener_tls(pki),
                                 targetTls={"caFile": str(pki.ca.path)})])
        with client_context(pki).wrap_socket(connect(port), server_hostname="127.0.0.1") as sock:
            sock.sendall(b"gportmap\n")
            assert recv_exactly(sock, 9) == b"pamtropg\n"
    finally:
        server.kill()
        server.wait(10)


def test_bytes_right_behind_the_handshake_are_relayed(start_gportmap, pki):
    """Records that arrive with the handshake's last flight sit in the stage, not
    in the socket: no readiness event announces them. Both ways: a client whose
    request rides with its Finished, and a TLS 1.2 target whose banner rides with
    its Finished (the client side completes on that flight)."""

    def banner_then_echo(conn: socket.socket) -> None:
        context = target_context(pki)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        peer = BioTls(conn, context, server_side=True)
        peer.handshake(then=b"220 ready\r\n")
        while data := peer.recv():
            peer.sendall(data)
        peer.half_close()

    target = TargetServer(banner_then_echo)
    port = free_port()
    gp = start_gportmap([tcp_rule(port, target.port, name="early", tls=listener_tls(pki),
                                  targetTls={"caFile": str(pki.ca.path)})])
    try:
        client = BioTls(connect(port), client_context(pki), server_side=False, server_hostname="127.0.0.1")
        client.handshake(then=b"EHLO client\r\n")
        assert recv_n(client, 11) == b"220 ready\r\n"
        assert recv_n(client, 13) == b"EHLO client\r\n"
        client.half_close()
        assert client.recv_all() == b""
        client.sock.close()
        (closed,) = gp.wait_event("connection_closed", rule="early")
        assert closed["reason"] == "closed" and (closed["bytes_received"], closed["bytes_sent"]) == (13, 24)
    finally:
        target.close()


def recv_n(peer: BioTls, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = peer.recv()
        if not chunk:
            break
        got += chunk
    return got


# --- client certificates, handshake failures ------------------------------------------


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"], ids=["hub", "staged"])
def test_client_certificates_accepted_and_refused(start_gportmap, echo_target, pki, target_host):
    port = free_port()
    tls = listener_tls(pki, clientCaFile=str(pki.ca.path))
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="mtls", targetHost=target_host, tls=tls)])
    with client_context(pki, pki.client).wrap_socket(connect(port), server_hostname="127.0.0.1") as sock:
        sock.sendall(b"trusted")
        assert recv_exactly(sock, 7) == b"trusted"
    for cert in (None, pki.stranger):
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with client_context(pki, cert).wrap_socket(connect(port), server_hostname="127.0.0.1") as sock:
                sock.sendall(b"let me in")
                if not sock.recv(16):
                    raise ConnectionResetError("closed")
    records = gp.wait_event("connection_rejected", count=2, rule="mtls")
    assert {r["reason"] for r in records} == {"tls"}
    assert any("CERTIFICATE" in r.get("error", "") for r in records), records
    wait_for(lambda: rule_stats(gp, "mtls")["connections"]["active"] == 0, what="no connection left open")
    stats = rule_stats(gp, "mtls")["connections"]
    assert stats["total"] == 1 and stats["rejected_by_reason"]["tls"] == 2
    assert echo_target.accepted == 1  # the refused clients never reached the target


def test_a_handshake_timeout_is_counted_as_a_tls_rejection(start_gportmap, echo_target, pki):
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="slow", tls=listener_tls(pki), handshakeTimeout=0.5)])
    with connect(port) as silent:
        assert closed_by_peer(silent, timeout=10)  # cut by the timer, the client never sent a byte
    (record,) = gp.wait_event("connection_rejected", rule="slow")
    assert record["reason"] == "tls" and record["error"] == "no TLS handshake in time"
    status, body, _ = gp.admin("/metrics")
    assert status == 200
    line = next(
        line for line in body.decode().splitlines()
        if line.startswith("gportmap_connections_rejected_total{") and 'rule="slow"' in line and 'reason="tls"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) == 1.0
    stats = rule_stats(gp, "slow")["connections"]
    assert (stats["active"], stats["total"]) == (0, 0)
    assert echo_target.accepted == 0


def test_a_target_tls_failure_is_an_upstream_connect_failure(start_gportmap, pki):
    """The target's certificate is signed by a CA the rule does not trust."""
    target = tls_target(pki, lambda peer: None)
    port = free_port()
    gp = start_gportmap([tcp_rule(port, target.port, name="distrust", tls=listener_tls(pki),
                                  targetTls={"caFile": str(pki.other.path)})])
    try:
        with client_context(pki).wrap_socket(connect(port), server_hostname="127.0.0.1") as sock:
            assert sock.recv(16) == b""  # handshaken with gportmap, then ended with close_notify or EOF
        (closed,) = gp.wait_event("connection_closed", rule="distrust")
        assert closed["reason"] == "connect_failed"
        assert closed["error"] == (
            "TLS handshake with the target failed: CERTIFICATE_VERIFY_FAILED (unable to get local issuer certificate)"
        )
        assert rule_stats(gp, "distrust")["upstream_connect_failures"] == 1
    finally:
        target.close()


# --- maxConnections at admission ------------------------------------------------------


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"], ids=["hub", "staged"])
def test_max_connections_counts_tls_clients_from_admission(start_gportmap, echo_target, pki, target_host):
    """``maxConnections: 2``: two handshaken TLS connections, or two clients that
    opened TCP and sent nothing yet, hold both places; the third is refused at
    once as ``limit``. (It used to be checked before the handshake and counted
    after it: ten TLS clients were served at once.)"""
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="capped", targetHost=target_host,
                                  tls=listener_tls(pki), maxConnections=2, handshakeTimeout=30)])
    context = client_context(pki)

    def tls_connect() -> ssl.SSLSocket:
        return context.wrap_socket(connect(port), server_hostname="127.0.0.1")

    def refused(count: int) -> None:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with tls_connect() as sock:  # refused before any TLS: the handshake fails
                sock.sendall(b"x")
                if not sock.recv(1):
                    raise ConnectionResetError("closed")
        records = gp.wait_event("connection_rejected", count=count, rule="capped")
        assert [r["reason"] for r in records] == ["limit"] * count

    held = [tls_connect(), tls_connect()]
    for sock in held:
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
    refused(1)
    for sock in held:
        sock.close()
    gp.wait_event("connection_closed", count=2, rule="capped")
    mid_handshake = [connect(port), connect(port)]  # TCP open, no ClientHello
    wait_for(lambda: rule_stats(gp, "capped")["connections"]["handshaking"] == 2, what="2 admitted")
    refused(2)
    for sock in mid_handshake:
        sock.close()
    wait_for(lambda: rule_stats(gp, "capped")["connections"]["handshaking"] == 0, what="places given back")
    with tls_connect() as sock:  # room again
        sock.sendall(b"room")
        assert recv_exactly(sock, 4) == b"room"
    stats = rule_stats(gp, "capped")["connections"]
    assert stats["rejected_by_reason"]["limit"] == 2 and stats["rejected_by_reason"]["tls"] == 2


# --- the idle clock -----------------------------------------------------------------------


def plain_client(port: int, pki) -> socket.socket:
    return connect(port)


def tls_client(port: int, pki) -> socket.socket:
    return client_context(pki).wrap_socket(connect(port), server_hostname="127.0.0.1")


RELAYS = {
    # relay: (extra rule keys, client factory)
    "hub-plain": ({}, plain_client),
    "hub-tls": ({"tls": None}, tls_client),
    "greenlet": ({"plugins": [{"name": "plugin_samples:Boom"}]}, plain_client),
}


@pytest.mark.slow
@pytest.mark.parametrize("relay", list(RELAYS))
def test_a_stall_of_the_process_cuts_only_connections_that_were_idle(start_gportmap, echo_target, pki, relay):
    """gportmap is stopped (SIGSTOP) for 2.5 s, past the rule's idleTimeout of 1 s,
    while one client sends: when it runs again that connection had bytes waiting,
    it was not idle, and goes on (it used to be cut at once, its bytes unread); the
    one that sent nothing is cut as idle."""
    extra, make_client = RELAYS[relay]
    extra = {key: (listener_tls(pki) if key == "tls" else value) for key, value in extra.items()}
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="stall", idleTimeout=1, **extra)], env=SAMPLES)
    busy, idle = make_client(port, pki), make_client(port, pki)
    try:
        for sock in (busy, idle):
            sock.sendall(b"warm")
            assert recv_exactly(sock, 4) == b"warm"
        os.kill(gp.pid, signal.SIGSTOP)
        try:
            busy.sendall(b"sent during the stop")
            time.sleep(2.5)  # the scenario: a stall longer than idleTimeout
        finally:
            os.kill(gp.pid, signal.SIGCONT)
        assert recv_exactly(busy, 20) == b"sent during the stop"
        busy.sendall(b"still here")  # at once: well within a second of its last byte
        assert recv_exactly(busy, 10) == b"still here"
        assert closed_by_peer(idle, timeout=10)
        # Both end as idle in the end (the busy one a second after its last byte):
        # told apart by what they moved.
        records = gp.wait_event("connection_closed", count=2, rule="stall")
        assert sorted((r["bytes_received"], r["reason"]) for r in records) == [
            (4, "idle_timeout"), (4 + 20 + 10, "idle_timeout")
        ]
    finally:
        busy.close()
        idle.close()


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP has taken effect: it is asynchronous)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


ROUNDS = 5


def test_bytes_a_tls_client_sends_as_the_target_ends_are_not_lost(start_gportmap, pki):
    """The race of tests/test_security.py's half-close test, forced: while
    gportmap is stopped, the client sends a record and then the target ends; when
    it runs again it finds both at once. The greenlet relay forwarded the target's
    end with Python's SSL_shutdown, whose second call read the client's record
    off the socket and dropped it (in 2 rounds of 3 here, whichever direction the
    event loop ran first; hence several rounds). The TLS stage sends close_notify
    once and leaves the client's records to the upload direction."""
    port, targets = free_port(), []

    def end_on_cue_then_listen(conn: socket.socket) -> None:
        go, ended, received = targets[-1]
        conn.sendall(b"hello")
        go.wait(30)
        conn.shutdown(socket.SHUT_WR)
        ended.set()
        received.append(recv_until_eof(conn))

    target = TargetServer(end_on_cue_then_listen)
    try:
        gp = start_gportmap([tcp_rule(port, target.port, name="race", tls=listener_tls(pki))])
        for _ in range(ROUNDS):
            go, ended, received = threading.Event(), threading.Event(), []
            targets.append((go, ended, received))
            sock = tls_client(port, pki)
            assert recv_exactly(sock, 5) == b"hello"
            os.kill(gp.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: stopped(gp.pid), what="gportmap stopped")
                sock.sendall(b"and one more thing")
                go.set()
                assert ended.wait(10)
            finally:
                os.kill(gp.pid, signal.SIGCONT)
            assert sock.recv(10) == b""  # the target's end, as close_notify
            try:
                sock.unwrap()
            except (ssl.SSLError, OSError):
                pass
            sock.close()
            wait_for(lambda received=received: received, what="the target's EOF")
            assert received == [b"and one more thing"]
        records = gp.wait_event("connection_closed", count=ROUNDS, rule="race")
        assert {(r["reason"], r["bytes_received"], r["bytes_sent"]) for r in records} == {("closed", 18, 5)}
    finally:
        target.close()


# --- plugins ------------------------------------------------------------------------------


@pytest.mark.parametrize("plugin", ["on_data", "on_close"])
def test_tls_rules_with_plugins(start_gportmap, echo_target, pki, tmp_path, plugin):
    """``on_data`` (user code on every chunk) keeps the greenlet relay, TLS through
    SSLSocket; hooks without it run in a greenlet, then the hub relay carries the
    TLS: ``on_close``, called when the hub relay ends, still runs where it may wait."""
    summaries = tmp_path / "summaries.jsonl"
    plugins = {
        "on_data": [{"name": "plugin_samples:Boom"}],
        "on_close": [{"name": "tls_plugin_samples:WaitsOnClose", "options": {"path": str(summaries)}}],
    }[plugin]
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="hooked", tls=listener_tls(pki), plugins=plugins)],
                        env=SAMPLES)
    payload = os.urandom(MB)
    with tls_client(port, pki) as sock:
        for offset in range(0, len(payload), 65536):
            chunk = payload[offset : offset + 65536]
            sock.sendall(chunk)
            assert recv_exactly(sock, len(chunk)) == chunk
    (closed,) = gp.wait_event("connection_closed", rule="hooked")
    assert (closed["reason"], closed["bytes_received"], closed["bytes_sent"]) == ("closed", MB, MB)
    if plugin == "on_close":
        wait_for(summaries.exists, what="the on_close summary")
        (line,) = summaries.read_text().splitlines()
        summary = json.loads(line)
        assert (summary["reason"], summary["bytes_received"], summary["bytes_sent"]) == ("closed", MB, MB)
    assert gp.events("plugin_error") == []
