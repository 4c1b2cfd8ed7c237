"""UDP over the WebSocket tunnel (SPEC §13), both halves in one gportmap: an entry
(a udp rule with ``targetProtocol: "websocket"``) and an exit (a websocket rule
with ``targetProtocol: "udp"``). Real peers: ``dig`` to dnsmasq, and a UDP echo
target; every loop bounded in count and time, windowed so that loopback buffers
never drop."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import LOOPBACK, free_port, rule_stats, wait_for
from test_udp import dig, dnsmasq  # noqa: F401 - the fixture

from gportmap.plugins import Plugin

#: The largest UDP payload over IPv4.
MAX_UDP = 65507


class UdpEcho:
    """A UDP echo target on loopback, in a thread; large socket buffers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.bind((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, address = self.sock.recvfrom(65535)
                self.received += 1
                self.sock.sendto(data, address)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp_echo():
    echo = UdpEcho()
    yield echo
    echo.close()


def tunnel_rules(entry_port: int, exit_port: int, target_port: int, entry: dict | None = None,
                 exit_: dict | None = None) -> list[dict]:
    return [
        {"name": "exit", "protocol": "websocket", "listenHost": LOOPBACK, "listenPort": exit_port, "path": "/udp",
         "targetProtocol": "udp", "targetHost": LOOPBACK, "targetPort": target_port, **(exit_ or {})},
        {"name": "entry", "protocol": "udp", "listenHost": LOOPBACK, "listenPort": entry_port,
         "targetProtocol": "websocket", "targetPath": "/udp", "targetHost": LOOPBACK, "targetPort": exit_port,
         **(entry or {})},
    ]


def client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.settimeout(10)
    return sock


def test_dig_through_the_udp_tunnel_to_dnsmasq(start_gportmap, dnsmasq):  # noqa: F811
    entry, exit_ = free_port(socket.SOCK_DGRAM), free_port()
    gp = start_gportmap({"rules": tunnel_rules(entry, exit_, dnsmasq)})
    assert dig(entry, "gportmap-test.example") == dig(dnsmasq, "gportmap-test.example") == "10.1.2.3"
    assert dig(entry, "unknown.example") == ""
    stats = rule_stats(gp, "entry")
    assert stats["udp"]["packets_received"] == 2 and stats["udp"]["packets_sent"] == 2
    assert rule_stats(gp, "exit")["connections"]["total"] == 2  # one WebSocket per session


@pytest.mark.slow  # a load test (10,000 datagrams)
def test_ten_thousand_datagrams_of_mixed_sizes_arrive_whole_and_counted(start_gportmap, udp_echo):
    entry, exit_ = free_port(socket.SOCK_DGRAM), free_port()
    gp = start_gportmap({"rules": tunnel_rules(entry, exit_, udp_echo.port)})
    rng = random.Random(20)
    count, window = 10_000, 16
    sizes = [MAX_UDP if i % 500 == 0 else rng.randint(1000, MAX_UDP) if i % 20 == 0 else rng.randint(1, 1400)
             for i in range(count)]
    total = sum(sizes)
    deadline = time.monotonic() + 240
    sent = 0
    with client() as sock:
        while sent < count:
            assert time.monotonic() < deadline, f"only {sent} of {count} datagrams in time"
            batch = []
            for size in sizes[sent:sent + window]:
                seq = sent + len(batch)
                payload = seq.to_bytes(4, "big") + bytes((seq + k) & 0xFF for k in range(min(size, 64)))
                payload = (payload * (size // len(payload) + 1))[:size]
                batch.append(payload)
                sock.sendto(payload, (LOOPBACK, entry))
            replies = [sock.recv(65535) for _ in batch]
            assert sorted(replies) == sorted(batch)  # whole, boundaries kept, none lost
            sent += len(batch)
    entry_stats = rule_stats(gp, "entry")
    assert entry_stats["udp"]["packets_received"] == count == entry_stats["udp"]["packets_sent"]
    assert entry_stats["bytes"] == {"received": total, "sent": total}
    assert entry_stats["udp"]["dropped"] == 0
    exit_stats = rule_stats(gp, "exit")
    assert exit_stats["bytes"] == {"received": total, "sent": total}
    assert exit_stats["udp"]["packets_received"] == count == exit_stats["udp"]["packets_sent"]
    assert udp_echo.received == count


def test_the_entry_session_expiring_closes_the_websocket(start_gportmap, udp_echo):
    entry, exit_ = free_port(socket.SOCK_DGRAM), free_port()
    gp = start_gportmap({"rules": tunnel_rules(entry, exit_, udp_echo.port, entry={"sessionTimeout": 0.5},
                                               exit_={"idleTimeout": 300})})
    baseline = gp.open_fds()
    with client() as sock:
        sock.sendto(b"ping", (LOOPBACK, entry))
        assert sock.recv(100) == b"ping"
        assert gp.open_fds() > baseline  # the socket pair, the WebSocket's two ends, the exit's UDP socket
    gp.wait_event("session_closed", rule="entry", reason="expired")
    closed = gp.wait_event("connection_closed", rule="exit")[0]
    assert closed["bytes_received"] == 4 and closed["bytes_sent"] == 4
    # at most: the baseline may have held a passing descriptor of the start (the rules file)
    wait_for(lambda: gp.open_fds() <= baseline, what="every descriptor of the tunnel closed")


def test_the_exit_expiring_ends_the_entry_session(start_gportmap, udp_echo):
    entry, exit_ = free_port(socket.SOCK_DGRAM), free_port()
    gp = start_gportmap({"rules": tunnel_rules(entry, exit_, udp_echo.port, entry={"sessionTimeout": 300},
                                               exit_={"idleTimeout": 0.5})})
    with client() as sock:
        sock.sendto(b"ping", (LOOPBACK, entry))
        assert sock.recv(100) == b"ping"
        assert gp.wait_event("connection_closed", rule="exit")[0]["reason"] == "expired"
        ended = gp.wait_event("session_closed", rule="entry")[0]
        assert ended["reason"] == "closed" and ended["packets_sent"] == 1
        sock.sendto(b"again", (LOOPBACK, entry))  # a new session, a new WebSocket
        assert sock.recv(100) == b"again"
    wait_for(lambda: rule_stats(gp, "exit")["connections"]["total"] == 2)


def test_max_sessions_holds_for_tunnelled_sessions(start_gportmap, udp_echo):
    entry, exit_ = free_port(socket.SOCK_DGRAM), free_port()
    gp = start_gportmap({"rules": tunnel_rules(entry, exit_, udp_echo.port, entry={"maxSessions": 2})})
    socks = [client() for _ in range(3)]
    try:
        for sock in socks[:2]:
            sock.sendto(b"in", (LOOPBACK, entry))
            assert sock.recv(10) == b"in"
        socks[2].sendto(b"over", (LOOPBACK, entry))
        wait_for(lambda: rule_stats(gp, "entry")["udp"]["dropped_by_reason"]["sessions"] == 1)
        assert rule_stats(gp, "exit")["connections"]["total"] == 2
    finally:
        for sock in socks:
            sock.close()


class ReverseUpstream(Plugin):
    """An ``on_data`` plugin (named by path below): reverses each datagram on its
    way to the target, passes replies as they are."""

    def on_data(self, conn, direction: str, data: bytes) -> bytes:
        return data[::-1] if direction == "upstream" else data


def test_the_exits_on_data_plugins_see_each_datagram(start_gportmap, udp_echo):
    entry, exit_ = free_port(socket.SOCK_DGRAM), free_port()
    tests = str(Path(__file__).parent)
    gp = start_gportmap({"rules": tunnel_rules(
        entry, exit_, udp_echo.port, exit_={"plugins": [{"name": "test_udp_tunnel:ReverseUpstream"}]},
    )}, env={"PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", "")})
    with client() as sock:
        for payload in (b"abc", b"0123456789" * 100):
            sock.sendto(payload, (LOOPBACK, entry))
            assert sock.recv(65535) == payload[::-1]
    assert rule_stats(gp, "exit")["udp"]["packets_received"] == 2


def test_config_errors_of_udp_tunnels():
    import json

    from gportmap.config import parse
    from gportmap.errors import ConfigError

    def error(rule: dict) -> str:
        with pytest.raises(ConfigError) as caught:
            parse(json.dumps({"rules": [rule]}), "rules.json")
        return str(caught.value)

    base = {"protocol": "udp", "listenPort": 5000, "targetHost": LOOPBACK, "targetPort": 5001}
    assert 'rules[0].targetPath: applies to udp rules only with "targetProtocol": "websocket"' in error(
        {**base, "targetPath": "/x"})
    assert "rules[0].targetProtocol: a tcp rule carries 'tcp' or 'websocket', not 'udp'" in error(
        {**base, "protocol": "tcp", "targetProtocol": "udp"})


def test_the_tunnel_over_tls_wss_to_the_exit(start_gportmap, udp_echo, tmp_path):
    """``targetTls`` on the entry, ``tls`` on the exit: the same datagrams, whole, through wss."""
    from certs import CA

    ca = CA(tmp_path, "tunnel-ca")
    server = ca.issue("exit", "127.0.0.1", ips=("127.0.0.1",))
    entry, exit_ = free_port(socket.SOCK_DGRAM), free_port()
    gp = start_gportmap({"rules": tunnel_rules(
        entry, exit_, udp_echo.port,
        entry={"targetTls": {"caFile": str(ca.path)}},
        exit_={"tls": {"certFile": str(server.cert), "keyFile": str(server.key)}},
    )})
    rng = random.Random(7)
    sizes = [MAX_UDP, 1, *(rng.randint(1, 20000) for _ in range(198))]
    with client() as sock:
        for start in range(0, len(sizes), 8):
            batch = [bytes([i & 0xFF]) * size for i, size in enumerate(sizes[start:start + 8], start)]
            for payload in batch:
                sock.sendto(payload, (LOOPBACK, entry))
            assert sorted(sock.recv(65535) for _ in batch) == sorted(batch)
    assert rule_stats(gp, "exit")["bytes"] == {"received": sum(sizes), "sent": sum(sizes)}
