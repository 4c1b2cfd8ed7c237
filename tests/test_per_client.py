"""``perClient`` (SPEC §13, issue 20): limits per client address, so that one client
cannot take a rule's whole ``maxConnections`` or its accept rate.

- The table (``gportmap.engine.clientlimit.ClientTable``) is checked in process
  with a fake clock: the token bucket refuses the burst+1th, refills at the rate;
  the LRU of idle entries stays within ``max_idle`` while entries of clients with
  live connections are never evicted.
- gportmap as a subprocess, real sockets: client A (127.0.0.1) at its limit is
  refused (``client_limit``, counted, logged) while client B (127.0.0.2) is
  served; the rate refuses the burst+1th connection; behind ``acceptProxy`` the
  header's client is the one limited; a websocket rule too.
- udp ``packetRate``: one client's flood is dropped past its burst while another
  is served; 100,000 spoofed source addresses (sockets bound to 127.x.y.z) leave
  the table bounded (in process, where its size can be read) and the process's
  memory bounded (as a subprocess: a second 100,000 do not grow it).
"""

from __future__ import annotations

import base64
import os
import socket

import gevent
import gevent.socket
import pytest
from conftest import (
    LOOPBACK,
    TargetServer,
    closed_by_peer,
    echo_handler,
    free_port,
    metric,
    recv_exactly,
    rule_stats,
    tcp_rule,
    wait_for,
    wait_on_hub,
)

from gportmap.config import Rule
from gportmap.config.model import PerClient
from gportmap.engine import proxyproto
from gportmap.engine.clientlimit import ClientLimits, ClientTable, limits_for
from gportmap.engine.relay import BufferPool
from gportmap.log import RateLimiter
from gportmap.protocols import ServerContext
from gportmap.protocols import udp as udp_module
from gportmap.stats import StatsRegistry

CLIENT_A, CLIENT_B = "127.0.0.1", "127.0.0.2"


# --- the table ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_refuses_the_burst_plus_first_and_refills_at_the_rate():
    clock = Clock()
    table = ClientTable(ClientLimits(rate=2.0, burst=3), clock)
    leases = [table.admit((CLIENT_A, 1)) for _ in range(3)]
    assert all(not isinstance(lease, str) for lease in leases)
    refused = table.admit((CLIENT_A, 1))
    assert isinstance(refused, str) and "connectionRate" in refused
    assert not isinstance(table.admit((CLIENT_B, 1)), str)  # another client has its own bucket
    clock.now += 0.5  # one token back at 2 a second
    assert not isinstance(table.admit((CLIENT_A, 2)), str)
    assert isinstance(table.admit((CLIENT_A, 3)), str)
    clock.now += 100  # never more than the burst
    assert [isinstance(table.admit((CLIENT_A, 4)), str) for _ in range(4)] == [False, False, False, True]


def test_concurrent_connections_per_client_and_leases_given_back_once():
    table = ClientTable(ClientLimits(max_connections=2))
    first, second = table.admit(("::ffff:127.0.0.1", 1)), table.admit((CLIENT_A, 2))  # one client, two spellings
    assert "maxConnections" in table.admit((CLIENT_A, 3))
    first.release()
    first.release()  # a second release gives nothing back twice
    third = table.admit((CLIENT_A, 4))
    assert not isinstance(third, str)
    assert isinstance(table.admit((CLIENT_A, 5)), str)
    second.release()
    third.release()
    assert len(table.live) == 0 and len(table.idle) == 1


def test_connections_carried_by_an_upgrade_take_their_places_without_tokens():
    """After an upgrade in place each carried connection takes its client's live
    place back (``ClientTable.carried``): more carried connections than the burst
    are all counted, spend no token, and the client's next new connection meets
    its limit as before the upgrade."""
    clock = Clock()
    table = ClientTable(ClientLimits(max_connections=5, rate=1.0, burst=2), clock)
    carried = [table.carried((CLIENT_A, port)) for port in range(5)]
    assert table.live[table.key((CLIENT_A, 1))].live == 5
    assert "maxConnections" in table.admit((CLIENT_A, 9))  # five live: the limit holds
    carried[0].release()
    assert not isinstance(table.admit((CLIENT_A, 9)), str)  # the burst's tokens were not spent
    for lease in carried[1:]:
        lease.release()
    assert len(table.live) == 1


def test_the_lru_stays_bounded_and_never_evicts_a_client_with_live_connections(monkeypatch):
    monkeypatch.setattr(ClientTable, "max_idle", 100)
    table = ClientTable(ClientLimits(max_connections=1, rate=1000.0, burst=1000))
    held = table.admit(("10.0.0.1", 1))  # a client with a live connection
    for i in range(10000):  # a flood of other addresses
        lease = table.admit((f"10.1.{i // 256}.{i % 256}", 1))
        lease.release()
        assert len(table.idle) <= 100
    assert len(table) <= 101 and table.evicted == 10000 - 100
    # Its entry survived the flood: its count still refuses a second connection.
    assert "maxConnections" in table.admit(("10.0.0.1", 2))
    held.release()
    assert not isinstance(table.admit(("10.0.0.1", 3)), str)


def test_limits_for_chooses_per_protocol_and_defaults_the_burst():
    assert limits_for(None, udp=False) is None
    assert limits_for(PerClient(packet_rate=5.0), udp=False) is None
    assert limits_for(PerClient(max_connections=3), udp=False) == ClientLimits(max_connections=3, rate=None, burst=1)
    assert limits_for(PerClient(connection_rate=2.5), udp=False) == ClientLimits(rate=2.5, burst=3)
    assert limits_for(PerClient(packet_rate=100.0, burst=7), udp=True) == ClientLimits(rate=100.0, burst=7)


# --- tcp and websocket rules, gportmap as a subprocess -----------------------------


@pytest.fixture
def echo():
    server = TargetServer(echo_handler)
    yield server
    server.close()


def client_from(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((host, 0))
    sock.connect((LOOPBACK, port))
    return sock


def served(sock: socket.socket, payload: bytes = b"ping") -> bool:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload)) == payload


def rejected(gp, reason: str) -> int:
    return rule_stats(gp, "pc")["connections"]["rejected_by_reason"].get(reason, 0)


#: The hub path (an IP target) and a greenlet's (a name to resolve first).
PATHS = {"hub": LOOPBACK, "greenlet": "localhost"}


@pytest.mark.parametrize("path", PATHS)
def test_client_a_at_its_limit_is_refused_while_client_b_is_served(start_gportmap, echo, path):
    rule = tcp_rule(free_port(), echo.port, name="pc", targetHost=PATHS[path], perClient={"maxConnections": 2})
    gp = start_gportmap([rule])
    port = rule["listenPort"]
    a1, a2 = client_from(CLIENT_A, port), client_from(CLIENT_A, port)
    try:
        assert served(a1) and served(a2)
        with client_from(CLIENT_A, port) as a3:
            assert closed_by_peer(a3)
        record = gp.wait_event("connection_rejected", rule="pc")[-1]
        assert record["reason"] == "client_limit" and record["client"].startswith(f"{CLIENT_A}:")
        assert "maxConnections" in record["error"]
        with client_from(CLIENT_B, port) as b1:
            assert served(b1)
        assert rejected(gp, "client_limit") == 1
        a1.close()  # its place comes back when the connection ends
        gp.wait_event("connection_closed", rule="pc", count=2)
        with client_from(CLIENT_A, port) as a4:
            assert served(a4)
    finally:
        a1.close()
        a2.close()
    assert rejected(gp, "client_limit") == 1
    assert rule_stats(gp, "pc")["connections"]["rejected_by_reason"]["limit"] == 0
    assert metric(gp, "gportmap_connections_rejected_total", rule="pc", reason="client_limit") == 1


def test_the_rate_refuses_the_burst_plus_first_connection(start_gportmap, echo):
    rule = tcp_rule(free_port(), echo.port, name="pc", perClient={"connectionRate": 0.01, "burst": 3})
    gp = start_gportmap([rule])
    for _ in range(3):
        with client_from(CLIENT_A, rule["listenPort"]) as sock:
            assert served(sock)
    with client_from(CLIENT_A, rule["listenPort"]) as sock:
        assert closed_by_peer(sock)
    record = gp.wait_event("connection_rejected", rule="pc")[-1]
    assert record["reason"] == "client_limit" and "connectionRate" in record["error"]
    with client_from(CLIENT_B, rule["listenPort"]) as sock:
        assert served(sock)
    assert rejected(gp, "client_limit") == 1


def test_behind_accept_proxy_the_headers_client_is_limited(start_gportmap, echo):
    rule = tcp_rule(
        free_port(), echo.port, name="pc", perClient={"maxConnections": 1},
        acceptProxy={"trusted": [LOOPBACK]},
    )
    gp = start_gportmap([rule])
    port = rule["listenPort"]

    def through_proxy(client: str, client_port: int) -> socket.socket:
        sock = client_from(LOOPBACK, port)  # every connection from the one proxy address
        sock.sendall(proxyproto.v2_header((client, client_port), (LOOPBACK, port)))
        return sock

    first = through_proxy("192.0.2.1", 1000)
    try:
        assert served(first)
        with through_proxy("192.0.2.1", 1001) as second:
            assert closed_by_peer(second)
        with through_proxy("192.0.2.2", 1002) as other:
            assert served(other)
    finally:
        first.close()
    record = gp.wait_event("connection_rejected", rule="pc")[-1]
    assert (record["reason"], record["client"]) == ("client_limit", "192.0.2.1:1001")


def test_a_websocket_rule_limits_each_client(start_gportmap, echo):
    port = free_port()
    rule = {
        "protocol": "websocket", "name": "pc", "listenHost": LOOPBACK, "listenPort": port,
        "targetHost": LOOPBACK, "targetPort": echo.port, "perClient": {"maxConnections": 1},
    }
    gp = start_gportmap([rule])

    def upgrade(host: str) -> socket.socket:
        sock = client_from(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 101"), answer
        return sock

    with client_from(CLIENT_A, port) as failed:  # an upgrade that fails gives its place back
        failed.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_peer(failed)
    first = upgrade(CLIENT_A)
    try:
        with client_from(CLIENT_A, port) as second:
            assert closed_by_peer(second)  # refused before any HTTP is read
        upgrade(CLIENT_B).close()
    finally:
        first.close()
    assert wait_for(lambda: rejected(gp, "client_limit") == 1, what="one client_limit rejection")


# --- udp rules: packetRate ---------------------------------------------------------


class UdpEcho:
    """A UDP echo target on a thread."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                data, address = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(data, address)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


def udp_rule(target_port: int, **extra: object) -> dict:
    return {
        "protocol": "udp", "name": "pc", "listenHost": LOOPBACK, "listenPort": free_port(socket.SOCK_DGRAM),
        "targetHost": LOOPBACK, "targetPort": target_port, **extra,
    }


def dropped(gp, reason: str) -> int:
    return rule_stats(gp, "pc")["udp"]["dropped_by_reason"].get(reason, 0)


def test_udp_packet_rate_drops_one_clients_flood_and_serves_another(start_gportmap):
    target = UdpEcho()
    try:
        rule = udp_rule(target.port, perClient={"packetRate": 0.01, "burst": 5}, deny=["127.0.0.3"])
        gp = start_gportmap([rule])
        flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flooder.bind((CLIENT_A, 0))
        flooder.settimeout(5)
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind((CLIENT_B, 0))
        other.settimeout(5)
        with flooder, other:
            for i in range(20):
                flooder.sendto(b"%d" % i, (LOOPBACK, rule["listenPort"]))
            wait_for(lambda: dropped(gp, "client_limit") == 15, what="15 datagrams dropped as client_limit")
            replies = sorted(int(flooder.recvfrom(100)[0]) for _ in range(5))
            assert replies == [0, 1, 2, 3, 4]
            other.sendto(b"b", (LOOPBACK, rule["listenPort"]))
            assert other.recvfrom(100)[0] == b"b"
        record = gp.wait_event("datagram_dropped", rule="pc", reason="client_limit")[-1]
        assert record["client"].startswith(f"{CLIENT_A}:")
        # allow/deny comes first: a denied client's datagrams are acl drops, not client_limit.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as denied:
            denied.bind(("127.0.0.3", 0))
            for _ in range(10):
                denied.sendto(b"d", (LOOPBACK, rule["listenPort"]))
        wait_for(lambda: dropped(gp, "acl") == 10, what="10 datagrams dropped as acl")
        assert dropped(gp, "client_limit") == 15
    finally:
        target.close()


def spoofed(count: int, start: int = 0) -> list[str]:
    """``count`` distinct loopback addresses 127.1.0.0 and up (127.0.0.0/8 is all loopback)."""
    return [f"127.{1 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}" for i in range(start, start + count)]


def send_from_each(addresses: list[str], port: int) -> None:
    """One datagram from each address, one socket each (bound, sent, closed)."""
    for host in addresses:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
            sock.sendto(b"x", (LOOPBACK, port))


@pytest.mark.slow  # a load test (100,000 sources)
def test_100000_spoofed_sources_leave_the_client_table_bounded(monkeypatch):
    """In process, where the table can be read: its idle entries never pass
    ``max_idle`` (lowered here to 1,000), and the live sessions stay within
    maxSessions."""
    monkeypatch.setattr(ClientTable, "max_idle", 1000)
    target = UdpEcho()
    listener = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((LOOPBACK, 0))
    try:  # room for a whole batch while the hub waits: the test sends from this thread
        listener.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 16 << 20)  # Linux
    except OSError:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    port = listener.getsockname()[1]
    rule = Rule(
        "pc", "udp", LOOPBACK, port, LOOPBACK, target.port, max_sessions=50,
        per_client=PerClient(packet_rate=1.0, burst=2),
    )
    server = udp_module.UdpServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    server.start(listener)
    largest = 0
    try:
        addresses = spoofed(100_000)
        for i in range(0, len(addresses), 1000):  # in batches, the hub reading between them
            send_from_each(addresses[i : i + 1000], port)
            sent = i + 1000
            wait_on_hub(
                lambda: server.stats.udp_packets_received + server.kernel_drops() >= sent,  # noqa: B023
                what=f"{sent} datagrams read or counted dropped",
            )
            largest = max(largest, len(server.clients))
        assert len(server.clients.idle) <= 1000
        assert largest <= 1000 + len(server.clients.live)
        assert server.clients.evicted >= 90_000
        assert len(server.sessions) <= 50
    finally:
        server.close()
        target.close()


@pytest.mark.slow  # a load test (spoofed sources, memory)
def test_spoofed_sources_leave_the_process_memory_bounded(start_gportmap):
    """As a subprocess with the default table bound: a second 100,000 new source
    addresses, after a first 100,000 filled the table, do not grow gportmap."""
    target = UdpEcho()
    try:
        rule = udp_rule(target.port, maxSessions=100, perClient={"packetRate": 1, "burst": 2})
        gp = start_gportmap([rule])

        def accounted() -> tuple[int, int]:
            """Datagrams gportmap read, and those the kernel dropped before it could."""
            udp = rule_stats(gp, "pc")["udp"]
            return udp["packets_received"], udp["dropped_by_reason"]["kernel"]

        def flood(start: int) -> int:
            """100,000 new source addresses, in batches that gportmap reads (or the
            kernel counts as dropped) before the next; how many it read."""
            before = accounted()[0]
            addresses = spoofed(100_000, start)
            for i in range(0, len(addresses), 5000):
                send_from_each(addresses[i : i + 5000], rule["listenPort"])
                wait_for(lambda: sum(accounted()) >= start + i + 5000, timeout=60,  # noqa: B023
                         what="the batch read or counted dropped")
            return accounted()[0] - before

        assert flood(0) > 2 * ClientTable.max_idle  # more new clients than the table holds reached it

        after_first = gp.rss_kib()
        assert flood(100_000) > 2 * ClientTable.max_idle
        after_second = gp.rss_kib()
        assert after_second - after_first < 8 * 1024, (after_first, after_second)
    finally:
        target.close()


# --- the rules file ----------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, problem",
    [
        ({"perClient": {"packetRate": 5}}, "rules[0].perClient.packetRate: applies to udp rules only"),
        ({"perClient": {"burst": 5}}, "rules[0].perClient.burst: is the bucket of connectionRate"),
        ({"perClient": {}}, "rules[0].perClient"),
        ({"perClient": {"maxConnections": 0}}, "rules[0].perClient.maxConnections"),
        ({"perClient": {"connectionRate": -1}}, "rules[0].perClient.connectionRate"),
        ({"protocol": "udp", "perClient": {"maxConnections": 3}},
         "rules[0].perClient.maxConnections: applies to tcp and websocket rules only"),
        ({"protocol": "udp", "perClient": {"burst": 3}}, "rules[0].perClient.burst: is the bucket of packetRate"),
        ({"acceptProxy": {"trusted": ["10.0.0.0/33"]}},
         "rules[0].acceptProxy.trusted[0]: '10.0.0.0/33' is not an IP address or CIDR network"),
        ({"acceptProxy": {"trusted": []}}, "rules[0].acceptProxy.trusted"),
        ({"acceptProxy": {"trusted": ["10.0.0.1"], "timeout": 0}}, "rules[0].acceptProxy.timeout"),
        ({"protocol": "udp", "acceptProxy": {"trusted": ["10.0.0.1"]}},
         "rules[0].acceptProxy: applies only to tcp and websocket rules"),
    ],
)
def test_a_bad_edge_key_is_an_error_naming_file_path_and_problem(extra, problem):
    import json

    from gportmap.config import loader
    from gportmap.errors import ConfigError

    rule = {"protocol": "tcp", "listenPort": 7001, "targetHost": LOOPBACK, "targetPort": 7002, **extra}
    with pytest.raises(ConfigError) as failed:
        loader.parse(json.dumps([rule]), "/etc/gportmap/rules.json")
    assert f"/etc/gportmap/rules.json: {problem}" in str(failed.value)


def test_the_edge_keys_load_into_the_model():
    import json

    from gportmap.config import loader
    from gportmap.config.model import AcceptProxy

    rule = {
        "protocol": "tcp", "listenPort": 7001, "targetHost": LOOPBACK, "targetPort": 7002,
        "acceptProxy": {"trusted": ["10.0.0.0/8"]}, "perClient": {"maxConnections": 4, "connectionRate": 2.5},
    }
    (loaded,) = loader.parse(json.dumps([rule]), "rules.json").rules
    assert loaded.accept_proxy == AcceptProxy(trusted=("10.0.0.0/8",), timeout=3.0)
    assert loaded.per_client == PerClient(max_connections=4, connection_rate=2.5)
    assert limits_for(loaded.per_client, udp=False) == ClientLimits(max_connections=4, rate=2.5, burst=3)
