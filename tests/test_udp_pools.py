"""UDP rules with a pool of targets (SPEC §8, issue 17): sessions spread by
``balance`` and keep their target; a dead target's new sessions go to the others
(by passive health: its ICMP port unreachable; or by a UDP ``send-expect``
check). gportmap runs as a subprocess; targets are UDP sockets on 127.0.0.1 that
answer with their name."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import LOOPBACK, free_port, metric, targets_of, wait_for


class UdpPeer:
    """A UDP target on 127.0.0.1 answering each datagram with ``name:`` and the
    datagram, or (``pong``) answering ``ping`` with ``pong`` (``mute``: nothing,
    ``wrong``: ``nope``). It can be killed (the port then answers with ICMP port
    unreachable) and revived on the same port."""

    def __init__(self, name: str, health: str = "pong") -> None:
        self.name = name
        self.health = health
        self.port = 0
        self.sock: socket.socket | None = None
        self.clients: set[tuple] = set()  # client-side session addresses seen (gportmap's upstream sockets)
        self.pings = 0
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOOPBACK, self.port))
        sock.settimeout(0.05)  # a closed socket does not wake a blocked recv: look at self.sock
        self.port = sock.getsockname()[1]
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
        self.thread.start()

    def _serve(self, sock: socket.socket) -> None:
        while self.sock is sock:
            try:
                data, address = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                if data == b"ping":
                    with self.lock:
                        self.pings += 1
                    if self.health == "pong":
                        sock.sendto(b"pong", address)
                    elif self.health == "wrong":
                        sock.sendto(b"nope", address)
                    continue
                with self.lock:
                    self.clients.add(address)
                sock.sendto(self.name.encode() + b":" + data, address)
            except OSError:
                return

    def kill(self) -> None:
        """Close the port: datagrams to it get ICMP port unreachable."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
            # A recv under way keeps the socket (and its port) alive until it returns.
            self.thread.join(5)

    def target(self, **extra: object) -> dict:
        return {"host": LOOPBACK, "port": self.port, "name": self.name, **extra}


@pytest.fixture
def udp_peers() -> Iterator[list[UdpPeer]]:
    made: list[UdpPeer] = []
    yield made
    for peer in made:
        peer.kill()


def udp_pool(port: int, targets: list[dict], **extra: object) -> dict:
    return {"name": "pool", "protocol": "udp", "listenHost": LOOPBACK, "listenPort": port, "targets": targets,
            **extra}


class Client:
    """One UDP client (its own source port: its own session)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(5)
        self.sock.connect((LOOPBACK, port))

    def ask(self, payload: bytes = b"hello") -> str:
        """Send ``payload``; the name of the target that answered."""
        self.sock.send(payload)
        reply = self.sock.recv(65535)
        name, _, echoed = reply.partition(b":")
        assert echoed == payload, reply
        return name.decode()

    def close(self) -> None:
        self.sock.close()


def test_sessions_spread_by_weight_and_keep_their_target(start_gportmap, udp_peers):
    a, b, c = UdpPeer("a"), UdpPeer("b"), UdpPeer("c")
    udp_peers += [a, b, c]
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_pool(port, [a.target(), b.target(weight=2), c.target()])])
    clients = [Client(port) for _ in range(40)]
    try:
        first = [client.ask() for client in clients]
        # Smooth weighted round robin over 1:2:1, every target up: exact shares.
        assert Counter(first) == {"a": 10, "b": 20, "c": 10}, Counter(first)
        # A session keeps its target: each client's later datagrams go where its first went.
        for client, name in zip(clients, first, strict=True):
            assert [client.ask(b"again"), client.ask(b"more")] == [name, name]
        targets = targets_of(gp)
        assert {name: targets[name]["total"] for name in "abc"} == {"a": 10, "b": 20, "c": 10}
        assert {name: targets[name]["active"] for name in "abc"} == {"a": 10, "b": 20, "c": 10}
        assert metric(gp, "gportmap_target_connections_active", rule="pool", target="b") == 20.0
    finally:
        for client in clients:
            client.close()


def test_source_balance_keeps_a_client_address_on_its_target_across_sessions(start_gportmap, udp_peers):
    """``source`` hashes the client's address (not its port): every session of one
    address lands on one target; different addresses of 127/8 spread."""
    peers = [UdpPeer(name) for name in "abcd"]
    udp_peers += peers
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_pool(port, [peer.target() for peer in peers], balance="source")])
    assert gp is not None
    where: dict[str, set[str]] = {}
    for n in range(2, 42):
        source = f"127.0.{n}.1"
        for _ in range(3):  # three sessions (source ports) of one address
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            try:
                sock.bind((source, 0))
                sock.sendto(b"hi", (LOOPBACK, port))
                reply = sock.recv(65535)
            finally:
                sock.close()
            where.setdefault(source, set()).add(reply.partition(b":")[0].decode())
    assert all(len(names) == 1 for names in where.values()), where
    assert len({next(iter(names)) for names in where.values()}) >= 3  # spread over the pool


@pytest.mark.slow  # waits out session rounds
def test_a_dead_target_is_taken_out_by_its_port_unreachable_and_new_sessions_avoid_it(start_gportmap, udp_peers):
    a, b, c = UdpPeer("a"), UdpPeer("b"), UdpPeer("c")
    udp_peers += [a, b, c]
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_pool(port, [a.target(), b.target(), c.target()], maxFails=2, failTimeout=60)])
    b.kill()
    lost = 0
    clients: list[Client] = []
    try:
        # New sessions, one at a time: those given b get no answer (and its ICMP
        # error counts against b) until maxFails of them take b out.
        def new_session_answered() -> bool:
            nonlocal lost
            client = Client(port)
            client.sock.settimeout(0.5)
            clients.append(client)
            try:
                client.ask()
            except TimeoutError:
                lost += 1
            return targets_of(gp)["b"]["state"] == "down"

        wait_for(new_session_answered, timeout=30, interval=0, what="b out by passive health")
        assert lost == 2, lost  # exactly maxFails sessions were given the dead target
        down = gp.wait_event("target_down", target="b")[0]
        assert "port unreachable" in down["reason"], down
        assert targets_of(gp)["b"]["connect_failures"] == 2
        assert metric(gp, "gportmap_target_up", rule="pool", target="b") == 0.0
        fresh = [Client(port) for _ in range(20)]
        clients += fresh
        shares = Counter(client.ask() for client in fresh)
        assert set(shares) == {"a", "c"} and min(shares.values()) >= 8, shares
    finally:
        for client in clients:
            client.close()


@pytest.mark.slow  # waits out check rounds
def test_a_udp_send_expect_check_takes_down_dead_and_wrong_targets(start_gportmap, udp_peers):
    good, wrong, mute, dead = UdpPeer("good"), UdpPeer("wrong", "wrong"), UdpPeer("mute", "mute"), UdpPeer("dead")
    udp_peers += [good, wrong, mute, dead]
    dead.kill()
    port = free_port(socket.SOCK_DGRAM)
    check = {"type": "send-expect", "send": "ping", "expect": "pong", "interval": 0.3, "timeout": 0.25,
             "rise": 1, "fall": 2}
    gp = start_gportmap([udp_pool(port, [p.target() for p in (good, wrong, mute, dead)], healthCheck=check)])
    reasons = {name: gp.wait_event("target_down", target=name, timeout=10)[0]["reason"]
               for name in ("wrong", "mute", "dead")}
    assert "reply without 'pong'" in reasons["wrong"] or "replies without 'pong'" in reasons["wrong"], reasons
    assert "no reply in time" in reasons["mute"], reasons
    assert "port unreachable" in reasons["dead"], reasons
    wait_for(lambda: good.pings >= 3, what="checks of the good target")
    assert targets_of(gp)["good"]["state"] == "up"
    clients = [Client(port) for _ in range(6)]
    try:
        assert {client.ask() for client in clients} == {"good"}  # only the one that passes its checks
    finally:
        for client in clients:
            client.close()
    # Revived, the dead one passes its check and takes new sessions again.
    dead.start()
    gp.wait_event("target_up", target="dead", timeout=10)
    clients = [Client(port) for _ in range(4)]
    try:
        assert {client.ask() for client in clients} == {"good", "dead"}
    finally:
        for client in clients:
            client.close()
