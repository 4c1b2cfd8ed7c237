"""``--workers N``: processes sharing the ports, summed figures, restarts, stop.

Real processes and sockets throughout: gportmap's master with two workers on
loopback ports, clients and targets in the test process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket

import psutil
import pytest
from conftest import (
    LOOPBACK,
    TargetServer,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    tcp_rule,
    wait_for,
)
from test_udp import UdpTarget, client, round_trip, udp_rule

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")

SETTINGS = {"statsInterval": 0, "drainTimeout": 5}


def rules(*rule_list: dict, **settings) -> dict:
    return {"settings": {**SETTINGS, **settings}, "rules": list(rule_list)}


def running_workers(gp) -> list[dict]:
    workers = gp.admin_json("/stats")["workers"]
    return [w for w in workers if w["state"] == "running"]


def echo_once(port: int, payload: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


def test_two_workers_share_a_port_and_the_sums_are_exact(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(rules(tcp_rule(port, echo_target.port, name="shared")), "--workers", "2")
    workers = wait_for(lambda: len(running_workers(gp)) == 2 and running_workers(gp), what="two workers")
    pids = {w["pid"] for w in workers}
    assert pids == set(gp.children()), "the workers are the master's children"
    assert gp.pid not in pids

    total_in = total_out = 0
    for i in range(60):
        payload = os.urandom(1000 + i * 37)
        assert echo_once(port, payload) == payload
        total_in += len(payload)
        total_out += len(payload)

    def settled():
        stats = gp.admin_json("/stats")
        rule = stats["rules"][0]
        return rule["connections"]["active"] == 0 and rule["connections"]["total"] == 60 and stats

    stats = wait_for(settled, what="60 connections counted")
    rule = stats["rules"][0]
    assert rule["bytes"] == {"received": total_in, "sent": total_out}
    assert rule["state"] == "running"
    per_worker = [w["connections_total"] for w in stats["workers"]]
    assert sum(per_worker) == 60
    assert all(count > 0 for count in per_worker), f"the kernel gave one worker everything: {per_worker}"

    metrics = gp.admin("/metrics")[1].decode()
    assert 'gportmap_connections_total{protocol="tcp",rule="shared"} 60.0' in metrics
    assert f'gportmap_received_bytes_total{{protocol="tcp",rule="shared"}} {float(total_in)}' in metrics
    # one connection_closed record per connection, from the worker that served it
    closed = gp.wait_event("connection_closed", count=60)
    assert {record["worker"] for record in closed} == {0, 1}


def test_udp_sessions_stay_on_one_worker_and_counts_are_exact(start_gportmap):
    target = UdpTarget()
    port = free_port(socket.SOCK_DGRAM)
    clients = [client() for _ in range(20)]
    try:
        gp = start_gportmap(rules(udp_rule(port, target.port, name="dns")), "--workers", "2")
        wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
        for round_ in range(5):
            for n, sock in enumerate(clients):
                payload = f"{n}:{round_}".encode()
                assert round_trip(sock, port, payload) == payload

        def counted():
            udp = gp.admin_json("/stats")["rules"][0]
            return udp["udp"]["packets_sent"] == 100 and udp

        udp = wait_for(counted, what="100 replies counted")
        assert udp["udp"]["packets_received"] == 100
        # 20 sessions in all: each client kept to one worker (the kernel hashes its address)
        assert udp["connections"]["total"] == 20
        assert udp["udp"]["sessions"] == 20
    finally:
        target.close()
        for sock in clients:
            sock.close()


def test_udp_max_sessions_is_shared_between_workers(start_gportmap):
    target = UdpTarget()
    port = free_port(socket.SOCK_DGRAM)
    clients = [client() for _ in range(30)]
    try:
        gp = start_gportmap(rules(udp_rule(port, target.port, name="few", maxSessions=4)), "--workers", "2")
        wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
        for n, sock in enumerate(clients):
            sock.sendto(b"%d" % n, (LOOPBACK, port))
        udp = wait_for(
            lambda: (u := gp.admin_json("/stats")["rules"][0]["udp"])["packets_received"] == 30
            and u["packets_sent"] == u["sessions"]
            and u,
            what="every datagram counted, every admitted one answered",
        )
        answered = 0
        for n, sock in enumerate(clients):
            sock.setblocking(False)
            try:
                answered += sock.recv(100) == b"%d" % n
            except BlockingIOError:
                pass  # dropped: that worker's share of the session table was full
        # each worker keeps ceil(4 / 2) = 2 sessions
        assert 2 <= udp["sessions"] <= 4
        assert answered == udp["sessions"]
        assert udp["dropped_by_reason"]["sessions"] == 30 - answered
    finally:
        target.close()
        for sock in clients:
            sock.close()


def test_a_killed_worker_is_restarted_and_the_other_keeps_serving(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(rules(tcp_rule(port, echo_target.port, name="kept")), "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
    for _ in range(10):
        echo_once(port, b"warm")
    # a long stream, then find which worker carries it and kill the other one
    stream = connect(port)
    stream.sendall(b"x" * 1000)
    assert recv_exactly(stream, 1000) == b"x" * 1000
    connections = wait_for(lambda: gp.admin_json("/connections"), what="the open stream listed")
    carrier = connections[0]["worker"]
    workers = running_workers(gp)
    victim = next(w for w in workers if w["index"] != carrier)
    before = gp.admin_json("/stats")["rules"][0]["connections"]["total"]
    os.kill(victim["pid"], signal.SIGKILL)

    # Once it is gone, the other worker serves every new connection and the stream
    # goes on. "Gone" is when the master has reaped it (worker_exited): a zombie
    # group leader is not enough, its other threads may still hold the listening
    # socket, and the kernel resets what it queues there.
    exited = gp.wait_event("worker_exited", worker=victim["index"])[0]
    assert exited["code"] == -signal.SIGKILL
    for _ in range(20):
        assert echo_once(port, b"still here") == b"still here"
    digest = hashlib.sha256()
    for _ in range(50):
        chunk = os.urandom(20000)
        stream.sendall(chunk)
        assert recv_exactly(stream, len(chunk)) == chunk
        digest.update(chunk)
    stream.close()

    gp.wait_event("worker_started", count=3)

    def replaced():
        now = running_workers(gp)
        return len(now) == 2 and victim["pid"] not in {w["pid"] for w in now} and now

    now = wait_for(replaced, timeout=20, what="the killed worker replaced")
    assert next(w for w in now if w["index"] == victim["index"])["restarts"] == 1
    assert psutil.Process(gp.pid).is_running()
    # counters never go backwards: the dead worker's totals stay in the sums
    after = gp.admin_json("/stats")["rules"][0]["connections"]["total"]
    assert after >= before + 20
    # the restarted worker serves too
    for _ in range(30):
        assert echo_once(port, b"again") == b"again"
    wait_for(
        lambda: (
            next(w for w in running_workers(gp) if w["index"] == victim["index"])["connections_total"] > 0
        ),
        what="connections counted by the restarted worker",
    )


def test_reload_fans_out_to_every_worker(start_gportmap, echo_target, tmp_path):
    other = TargetServer(lambda conn: (conn.sendall(b"other\n"), conn.shutdown(socket.SHUT_WR)))
    try:
        port = free_port()
        gp = start_gportmap(rules(tcp_rule(port, echo_target.port, name="moving")), "--workers", "2")
        wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
        gp.rules_path.write_text(json.dumps(rules(tcp_rule(port, other.port, name="moving"))))
        reloaded = gp.wait_event("config_reloaded", timeout=15)
        assert reloaded[0]["changed"] == ["moving"]
        assert "worker" not in reloaded[0], "the master logs the reload once"
        # every worker now forwards to the new target
        answers = {echo_once(port, b"") for _ in range(40)}
        assert answers == {b"other\n"}
        stats = gp.admin_json("/stats")
        assert stats["config"]["reloads"]["success"] == 1
        assert stats["rules"][0]["target"] == f"{LOOPBACK}:{other.port}"

        # an invalid file changes nothing in any worker
        gp.rules_path.write_text("{ nope")
        gp.wait_event("config_invalid", timeout=15)
        assert {echo_once(port, b"") for _ in range(20)} == {b"other\n"}
        status, body, _ = gp.admin("/reload", "POST")
        assert status == 400
    finally:
        other.close()


def test_stop_drains_every_worker_and_exits_zero(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(rules(tcp_rule(port, echo_target.port)), "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
    pids = gp.children()
    open_conn = connect(port)
    open_conn.sendall(b"before")
    assert recv_exactly(open_conn, 6) == b"before"
    gp.signal(signal.SIGTERM)
    gp.wait_event("stopping", count=3)  # the master and both workers

    def refused():
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, what="the listeners closed")
    open_conn.sendall(b"during the drain")
    assert recv_exactly(open_conn, 16) == b"during the drain"
    open_conn.shutdown(socket.SHUT_WR)
    assert recv_until_eof(open_conn) == b""
    open_conn.close()
    assert gp.wait_exit(20) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_workers_stop_by_themselves_when_the_master_is_killed(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(rules(tcp_rule(port, echo_target.port)), "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
    pids = gp.children()
    gp.proc.kill()
    gp.proc.wait(10)

    def gone():
        return not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids
        )

    wait_for(gone, timeout=15, what="orphaned workers exit")

    def port_free() -> bool:  # a zombie's other threads may hold the socket a moment longer
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                return False
            return True

    wait_for(port_free, what="nothing holds the port any more")


def test_limits_are_shared_between_workers(start_gportmap):
    held: list[socket.socket] = []
    hold = TargetServer(lambda conn: conn.recv(1))
    try:
        port = free_port()
        gp = start_gportmap(rules(tcp_rule(port, hold.port, maxConnections=4)), "--workers", "2")
        wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
        for _ in range(30):
            held.append(connect(port))

        # each worker admits ceil(4 / 2) = 2; the rest are accepted and closed
        def settled():
            rule = gp.admin_json("/stats")["rules"][0]["connections"]
            return rule["active"] + rule["rejected"] == 30 and rule

        counts = wait_for(settled, what="every attempt admitted or rejected")
        assert 2 <= counts["active"] <= 4
        assert counts["rejected_by_reason"]["limit"] == 30 - counts["active"]
    finally:
        for sock in held:
            sock.close()
        hold.close()


def test_more_than_one_worker_needs_reuse_port(start_gportmap, echo_target):
    gp = start_gportmap(
        rules(tcp_rule(free_port(), echo_target.port)),
        "--workers",
        "2",
        wait=False,
        env={"GPORTMAP_PORTABLE": "1"},
    )
    assert gp.wait_exit(15) == 2
    assert any("SO_REUSEPORT" in record.get("message", "") for record in gp.events("usage_error"))


def test_workers_from_settings_and_auto(start_gportmap, echo_target):
    gp = start_gportmap(rules(tcp_rule(free_port(), echo_target.port), workers="auto"))
    expected = os.cpu_count() or 1
    started = gp.wait_event("started")[0]
    assert started["workers"] == expected
    if expected > 1:
        wait_for(lambda: len(running_workers(gp)) == expected, what="one worker per core")


def test_bad_workers_flag_is_a_usage_error(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "gportmap", "--workers", "0", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--workers" in result.stderr and "expected a number from 1" in result.stderr


def test_connection_ids_are_unique_across_workers(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap(rules(tcp_rule(port, echo_target.port)), "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
    socks = [connect(port) for _ in range(16)]
    try:
        for sock in socks:
            sock.sendall(b"hi")
            assert recv_exactly(sock, 2) == b"hi"
        listed = wait_for(lambda: len(gp.admin_json("/connections")) == 16 and gp.admin_json("/connections"))
        ids = [entry["id"] for entry in listed]
        assert len(set(ids)) == 16
        assert {entry["worker"] for entry in listed} == {0, 1}
        assert all(entry["id"] % 2 == (entry["worker"] + 1) % 2 for entry in listed)
    finally:
        for sock in socks:
            sock.close()
