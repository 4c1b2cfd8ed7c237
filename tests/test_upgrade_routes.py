"""Upgrade in place (SPEC §11) of what ``tests/test_upgrade.py`` does not cover: routed
connections (``routes``, SPEC §13), connections behind a trusted proxy
(``acceptProxy``), the sessions of a udp port range (SPEC §9), and UDP tunnelled
over a WebSocket, which is not carried but finishes in the drainer. gportmap runs
as a subprocess; every peer is real.

The figures (pause, hand-over cost per connection) are printed with ``-s``; no
test asserts a wall-clock time.
"""

from __future__ import annotations

import json
import socket

import pytest
from conftest import (
    LOOPBACK,
    Gportmap,
    TargetServer,
    closed_by_peer,
    connect,
    echo_handler,
    free_block,
    free_port,
    recv_exactly,
    tcp_rule,
    wait_for,
)
from test_accept_proxy import client_from, v1
from test_upgrade import (
    Stream,
    StreamPeer,
    UdpEchoLoop,
    UdpEchoTarget,
    rule,
    settings,
    upgrade,
    worker_records,
)

#: Upgrades in a row under load here (tests/test_upgrade.py runs the long series).
UPGRADES = 4
#: Streams per route.
STREAMS = 3


def ssh_seed(n: int) -> int:
    """A stream seed whose 8 bytes (the stream's first) start as an SSH client's
    banner does: the sniffer sends it to the ``"protocol": "ssh"`` route."""
    return int.from_bytes(b"SSH-" + n.to_bytes(4, "big"), "big")


def routes_of(gp, name: str) -> dict[str, dict]:
    return {entry["name"]: entry for entry in rule(gp, name)["routes"]}


def stream_figures(streams: list[Stream]) -> list[int]:
    return [stream.progress() for stream in streams]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
def test_routed_streams_are_carried_through_upgrades(start_gportmap, workers):
    """Checksummed streams on two routes of one port (an SSH-looking client to one
    target, the rest to the default's) through several upgrades: every one is
    carried (none left to a drainer), no byte lost or reordered, the same PID, and
    each route's figures in ``/stats`` go on (its connections counted once)."""
    ssh_peer, other_peer = StreamPeer(), StreamPeer()
    port = free_port()
    rules = {"rules": [{"name": "edge", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port,
                        "routes": [
                            {"name": "ssh", "protocol": "ssh", "targetHost": LOOPBACK,
                             "targetPort": ssh_peer.server.port},
                            {"name": "other", "default": True, "targetHost": LOOPBACK,
                             "targetPort": other_peer.server.port},
                        ]}],
             "settings": settings(drainTimeout=2)}
    gp = start_gportmap(rules, *(("--workers", str(workers)) if workers > 1 else ()))
    errors = ssh_peer.errors
    other_peer.errors = errors
    streams: list[Stream] = []
    try:
        pid = gp.pid
        streams = [Stream(port, ssh_seed(i), errors) for i in range(STREAMS)]
        streams += [Stream(port, 1000 * (i + 1), errors) for i in range(STREAMS)]
        wait_for(lambda: len(ssh_peer.receivers) == len(other_peer.receivers) == STREAMS, 30,
                 what="every stream at its route's target")
        def route_figures() -> dict[str, tuple[int, int]]:  # a master's sums follow its workers' pushes
            return {name: (r["total"], r["active"]) for name, r in routes_of(gp, "edge").items()}

        counted = {"ssh": (STREAMS, STREAMS), "other": (STREAMS, STREAMS)}
        wait_for(lambda: route_figures() == counted, 10, what=f"each route counting its streams: {counted}")
        records = []
        for n in range(1, UPGRADES + 1):
            marks = stream_figures(streams)
            wait_for(lambda marks=marks: all(s.progress() > m for s, m in zip(streams, marks)), 30,
                     what="every stream moving")
            records.append(upgrade(gp, n))
            assert gp.pid == pid and gp.proc.poll() is None
            # each connection counted once, never again, never reset
            if workers == 1:
                assert route_figures() == counted, (n, route_figures())
            else:
                wait_for(lambda: route_figures() == counted, 10, what=f"the master's sums {counted} ({n})")
            assert not errors, errors
        carriers = records if workers == 1 else worker_records(gp)
        assert sum(r["carried"] for r in carriers) == 2 * STREAMS * UPGRADES
        assert not any(r["draining"] or r["lost"] for r in carriers), carriers
        marks = stream_figures(streams)
        wait_for(lambda: all(s.progress() > m for s, m in zip(streams, marks)), 30,
                 what="every stream moving after the last upgrade")
        for stream in streams:
            stream.stop_upload.set()
        for stream in streams:
            (ssh_peer if stream.seed >= ssh_seed(0) else other_peer).stop_download(stream.seed)
        for stream in streams:
            stream.sender.thread.join(60)
            stream.receiver.thread.join(60)
        peers = [*ssh_peer.receivers.values(), *other_peer.receivers.values()]
        wait_for(lambda: all(r.ended.is_set() for r in peers), 60, what="the peers' reads to end")
        assert not errors, errors
        for stream in streams:  # every byte arrived, in order (checked as it came), none extra
            peer = ssh_peer if stream.seed >= ssh_seed(0) else other_peer
            assert stream.receiver.ended.is_set()
            assert stream.receiver.received == peer.senders[stream.seed].sent
            assert peer.receivers[stream.seed].received == stream.sender.sent
        ended = {"ssh": (STREAMS, 0), "other": (STREAMS, 0)}
        wait_for(lambda: route_figures() == ended, 30, what=f"every routed connection closed, counted once: {ended}")
        closed = gp.wait_event("connection_closed", 10, count=2 * STREAMS)
        assert not [e for e in closed if e.get("drainer")]
        pauses = sorted(r["pause"] for r in carriers)
        costs = sorted(r["per_connection_us"] for r in carriers)
        print(f"\n{UPGRADES} upgrades, {2 * STREAMS} routed streams, {workers} worker(s): pause median "
              f"{pauses[len(pauses) // 2] * 1000:.0f} ms; per carried connection median {costs[len(costs) // 2]:.0f} us")
    finally:
        for stream in streams:
            stream.stop_upload.set()
            stream.sock.close()
        ssh_peer.close()
        other_peer.close()


@pytest.mark.slow  # an upgrade: a Python start-up twice
def test_a_connection_still_sniffing_finishes_in_the_drainer(start_gportmap):
    """A client that has sent nothing yet when the upgrade comes is still being
    sniffed: it is not carried; the drainer routes it when its bytes come and
    relays it until it ends. A routed one beside it is carried, and the drainer
    lets go of it: it goes on after the drainer ended."""
    target = TargetServer(echo_handler)
    port = free_port()
    rules = {"rules": [{"name": "edge", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port,
                        "sniffTimeout": 30,
                        "routes": [{"name": "any", "default": True, "targetHost": LOOPBACK,
                                    "targetPort": target.port}]}],
             "settings": settings(drainTimeout=30)}
    gp = start_gportmap(rules)
    try:
        with connect(port) as routed, connect(port) as silent:
            routed.sendall(b"first")
            assert recv_exactly(routed, 5) == b"first"
            wait_for(lambda: rule(gp, "edge")["connections"]["handshaking"] == 1, what="the client being sniffed")
            record = upgrade(gp, 1)
            assert (record["carried"], record["draining"]) == (1, 1)
            silent.sendall(b"late words")
            assert recv_exactly(silent, 10) == b"late words"
            silent.close()
            closed = gp.wait_event("connection_closed", 20, rule="edge")[0]
            assert closed["drainer"] and closed["bytes_received"] == 10
            gp.wait_event("upgrade_drained", 20)
            routed.sendall(b"second")
            assert recv_exactly(routed, 6) == b"second"
        assert not gp.wait_event("connection_closed", 20, rule="edge", count=2)[1].get("drainer")
    finally:
        target.close()


@pytest.mark.slow  # an upgrade: a Python start-up twice
def test_a_connection_behind_a_proxy_keeps_its_client(start_gportmap):
    """``acceptProxy``: the carried connection is still the header's client's in the
    new program: in ``/connections`` (with the address it came in on), and in its
    ``perClient`` count (a second connection of that client is refused after the
    upgrade as before it)."""
    target = TargetServer(echo_handler)
    rules = {"rules": [tcp_rule(free_port(), target.port, name="ap",
                                acceptProxy={"trusted": ["127.0.0.1/32"], "timeout": 3},
                                perClient={"maxConnections": 1})],
             "settings": settings()}
    port = rules["rules"][0]["listenPort"]
    gp = start_gportmap(rules)
    try:
        with client_from(LOOPBACK, port) as sock:
            sock.sendall(v1("10.9.8.7", LOOPBACK, 41234, port) + b"before")
            assert recv_exactly(sock, 6) == b"before"
            (before,) = gp.admin_json("/connections")
            assert before["client"] == "10.9.8.7:41234" and before["listen"]

            def second_refused() -> bool:
                with client_from(LOOPBACK, port) as again:
                    again.sendall(v1("10.9.8.7", LOOPBACK, 41235, port) + b"x")
                    return closed_by_peer(again, 10)

            assert second_refused()
            record = upgrade(gp, 1)
            assert record["carried"] == 1
            (after,) = gp.admin_json("/connections")
            assert {k: after[k] for k in ("id", "client", "listen", "started")} == \
                {k: before[k] for k in ("id", "client", "listen", "started")}
            assert second_refused()  # its place is held in the new program too
            assert rule(gp, "ap")["connections"]["rejected_by_reason"]["client_limit"] == 2
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"
        closed = gp.wait_event("connection_closed", 20, rule="ap", client="10.9.8.7:41234")[0]
        assert closed["bytes_received"] == 11 and not closed.get("drainer")
    finally:
        target.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
def test_udp_range_sessions_are_carried_through_upgrades(start_gportmap, workers):
    """Echo loops on several ports of a ``listenPort: "A-B"`` udp rule through
    several upgrades: not a datagram lost, each client seen by the target from
    one source port throughout (its session on its port is the same flow),
    sessions made once."""
    target = UdpEchoTarget()
    block = free_block(4)
    rules = {"rules": [{"protocol": "udp", "name": "span", "listenHost": LOOPBACK,
                        "listenPort": f"{block.start}-{block[-1]}", "targetHost": LOOPBACK,
                        "targetPort": target.port, "sessionTimeout": 10}],
             "settings": settings()}
    gp = start_gportmap(rules, *(("--workers", str(workers)) if workers > 1 else ()))
    errors: list[str] = []
    loops: list[UdpEchoLoop] = []
    try:
        pid = gp.pid
        loops = [UdpEchoLoop(client, block[client % len(block)], errors) for client in range(6)]
        records = []
        for n in range(1, UPGRADES + 1):
            marks = [loop.answered for loop in loops]
            wait_for(lambda marks=marks: all(loop.answered > m for loop, m in zip(loops, marks)), 30,
                     what="every echo loop answered")
            records.append(upgrade(gp, n))
            assert gp.pid == pid
            assert not errors, errors
        marks = [loop.answered for loop in loops]
        wait_for(lambda: all(loop.answered > m for loop, m in zip(loops, marks)), 30, what="answers after the last")
        for loop in loops:
            loop.finish()
        assert not errors, errors
        lost = {loop.client: sorted(loop.outstanding) for loop in loops if loop.outstanding}
        assert not lost, f"datagrams lost: {lost}"
        assert {client: len(ports) for client, ports in target.sources.items()} == dict.fromkeys(range(6), 1)
        carriers = records if workers == 1 else worker_records(gp)
        assert sum(r["carried"] for r in carriers) == len(loops) * UPGRADES and not any(r["lost"] for r in carriers)
        sent = sum(loop.sent for loop in loops)

        def figures() -> dict:
            stats = rule(gp, "span")
            return {"sessions": stats["connections"]["total"], "received": stats["udp"]["packets_received"],
                    "sent": stats["udp"]["packets_sent"]}

        expected = {"sessions": len(loops), "received": sent, "sent": sent}
        wait_for(lambda: figures() == expected, 10, what=f"the final figures {expected}")
        pauses = sorted(r["pause"] for r in carriers)
        print(f"\n{UPGRADES} upgrades, {len(loops)} UDP loops on {len(block)} ports, {workers} worker(s): "
              f"{sent} datagrams, 0 lost; pause median {pauses[len(pauses) // 2] * 1000:.0f} ms")
    finally:
        for loop in loops:
            loop.finish()
        target.close()


@pytest.mark.slow
def test_a_udp_tunnel_finishes_in_the_drainer_then_reconnects(start_gportmap, tmp_path):
    """UDP over a WebSocket tunnel, the exit upgraded: its WebSocket is not carried
    (SPEC §11) but finishes in the drainer, which keeps the tunnel working until
    ``drainTimeout``; then the entry's session ends, and the client's next
    datagram opens a new tunnel to the new program."""
    target = UdpEchoTarget()
    exit_port, entry_port = free_port(), free_port(socket.SOCK_DGRAM)
    gp = start_gportmap({"rules": [{"name": "exit", "protocol": "websocket", "listenHost": LOOPBACK,
                                    "listenPort": exit_port, "path": "/udp", "targetProtocol": "udp",
                                    "targetHost": LOOPBACK, "targetPort": target.port}],
                         "settings": settings(drainTimeout=4)})
    (tmp_path / "entry").mkdir()
    entry = Gportmap(tmp_path / "entry", {"rules": [
        {"name": "entry", "protocol": "udp", "listenHost": LOOPBACK, "listenPort": entry_port,
         "targetProtocol": "websocket", "targetPath": "/udp", "targetHost": LOOPBACK, "targetPort": exit_port,
         "sessionTimeout": 60}], "settings": settings()})
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(10)
    try:
        entry.wait_started()

        def ask(n: int) -> None:
            client.sendto(b"%d ask" % n, (LOOPBACK, entry_port))
            assert client.recv(100) == b"%d ask" % n

        ask(1)
        record = upgrade(gp, 1)
        assert (record["carried"], record["draining"]) == (0, 1)
        drainer = gp.wait_event("upgrade_draining", 10)[0]["drainer"]
        ask(1)  # through the drainer: the same tunnel, the same source port at the target
        assert rule(gp, "exit")["connections"]["active"] == 0  # not the new program's
        # cut at drainTimeout (a WebSocket rule's records say "closed": it ends with a Close frame)
        cut = gp.wait_event("connection_closed", 20, rule="exit", drainer=drainer)[0]
        assert cut["bytes_received"] == cut["bytes_sent"] == 10  # both asks: the one after the upgrade too
        gp.wait_event("upgrade_drained", 10, drainer=drainer)
        entry.wait_event("session_closed", 20, rule="entry")
        ask(2)  # a new session, a new WebSocket: to the new program
        wait_for(lambda: rule(gp, "exit")["connections"]["total"] == 2, what="the new tunnel counted")
        assert rule(gp, "exit")["connections"]["active"] == 1
        assert {client_id: len(ports) for client_id, ports in target.sources.items()} == {1: 1, 2: 1}
        assert target.sources[1] != target.sources[2]  # the exit's new session: a new socket
    finally:
        client.close()
        entry.close()
        target.close()


def test_state_documents_of_version_2_are_still_read():
    """Version 3 added a connection's route and listen address and a session's
    listening socket; a version 2 document (without them) still reads, with the
    defaults, and a version 3 one round-trips."""
    from gportmap.runtime.carry import (
        STATE_VERSION,
        CarriedConnection,
        CarriedDirection,
        CarriedSession,
        UpgradeState,
        reads_version,
    )

    assert STATE_VERSION == 3 and all(reads_version(n) for n in (1, 2, 3))
    state = UpgradeState(
        version=3, began=1.0, frozen=2.0, started_at=3.0, generation=4, digest="d", reloads={},
        rules="{}", counters={}, protocols={}, next_id=9,
        connections=[CarriedConnection("r", 6, 7, 8, "10.9.8.7:41234", "t", 1.0, 2.0, 3.0, 4, 5,
                                       CarriedDirection(), CarriedDirection(), route="ssh",
                                       listen="127.0.0.1:2222")],
        sessions=[CarriedSession("u", 9, ["127.0.0.1", 53], "127.0.0.1:53", 1.0, 2.0, 3, 4, 5, 6, "established",
                                 listen=["127.0.0.1", 5300])],
    )
    assert UpgradeState.decode(state.encode()) == state
    older = json.loads(state.encode())
    older["version"] = 2
    for item in older["connections"]:
        del item["route"], item["listen"]
    for item in older["sessions"]:
        del item["listen"]
    read = UpgradeState.decode(json.dumps(older).encode())
    assert (read.connections[0].route, read.connections[0].listen, read.sessions[0].listen) == ("", "", None)


def test_the_client_of_a_carried_connection_is_read_back_from_its_text():
    """``perClient`` keys a carried connection by the host of its client text
    (the PROXY header's client's for one behind a proxy)."""
    from gportmap.runtime.carry import client_host

    assert client_host("10.9.8.7:41234") == "10.9.8.7"
    assert client_host("[2001:db8::7]:41234") == "2001:db8::7"
    assert client_host("[::ffff:10.0.0.1]:1") == "::ffff:10.0.0.1"
