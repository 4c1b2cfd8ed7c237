"""``--workers N``: processes sharing the ports, summed figures, restarts, stop.

Real processes and sockets throughout: gportmap's master with two workers on
loopback ports, clients and targets in the test process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections import Counter

import psutil
import pytest
from conftest import (
    LOOPBACK,
    HubTurns,
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


@pytest.mark.slow  # three processes, hundreds of connections
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


@pytest.mark.slow
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


@pytest.mark.slow  # three processes and a session flood
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


@pytest.mark.slow
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


@pytest.mark.slow  # three processes and a drain
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


@pytest.mark.slow  # three processes, a kill and their exits
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


@pytest.mark.slow
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


@pytest.mark.slow  # starts gportmap with workers twice
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


@pytest.mark.slow  # three processes, 1,200 connections
def test_connections_lists_each_of_1200_connections_once_with_its_worker(start_gportmap):
    """``--workers 2`` holding 1,200 connections, each worker more than
    ``Channel.encode_slice`` of them, so each sends its rows in slices:
    ``/connections`` lists every connection once, with the client, target and bytes
    of the socket it is, and the worker that holds it; each worker's share is its
    ``connections_active`` in ``/stats``."""
    count = 1200
    target = socket.socket()  # connections complete in its backlog, never accepted: no thread each
    target.bind((LOOPBACK, 0))
    target.listen(2048)
    port = free_port()
    clients: list[socket.socket] = []
    try:
        held = tcp_rule(port, target.getsockname()[1], maxConnections=2 * count)
        gp = start_gportmap(rules(held), "--workers", "2")
        wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
        for _ in range(count):
            sock = connect(port)
            sock.sendall(b"abc")
            clients.append(sock)

        def listed_whole() -> list[dict] | None:
            entries = gp.admin_json("/connections")
            return entries if len(entries) == count and all(e["bytes"]["received"] == 3 for e in entries) else None

        entries = wait_for(listed_whole, timeout=30, what=f"{count} connections listed, 3 bytes each")
        ours = {f"{LOOPBACK}:{sock.getsockname()[1]}" for sock in clients}
        assert {entry["client"] for entry in entries} == ours
        assert len({entry["id"] for entry in entries}) == count
        assert {entry["target"] for entry in entries} == {f"{LOOPBACK}:{target.getsockname()[1]}"}
        assert {entry["listen"] for entry in entries} == {f"{LOOPBACK}:{port}"}
        assert all(entry["bytes"]["sent"] == 0 and entry["started"].endswith("Z") for entry in entries)
        shares = Counter(entry["worker"] for entry in entries)
        assert set(shares) == {0, 1}

        def active_by_worker() -> dict[int, int] | None:
            active = {w["index"]: w["connections_active"] for w in running_workers(gp)}
            return active if active == dict(shares) else None

        wait_for(active_by_worker, what=f"/stats' connections_active per worker: {dict(shares)}")
    finally:
        for sock in clients:
            sock.close()
        target.close()


def test_a_long_list_goes_on_the_channel_in_slices_byte_for_byte():
    """A message with a top-level list of 1,234 rows is encoded 100 at a time with
    the hub running between two slices (a greenlet counting its turns), and the
    bytes are those of one ``json.dumps``; a message without a long list is
    encoded in one go."""
    from gportmap.runtime.workers import _encode

    rows = [[i, "web", f"127.0.0.1:{i}", "127.0.0.1:80", "[::1]:81", 1.5 + i, 0.25, i * 3, None] for i in range(1234)]
    message = {"ok": True, "report": {"active": 3, "rules": {"é": {"total": 1}}}, "id": 7, "rows": rows, "tail": 'a"b'}
    turns = HubTurns()
    start = turns.count
    body = _encode(message, 100)  # in this greenlet: the counter runs only if it yields
    sliced = turns.count - start
    small = _encode({"id": 8, "rows": rows[:100]}, 100)
    whole = turns.count - start - sliced
    turns.stop()
    assert body == json.dumps(message, separators=(",", ":")).encode()
    assert sliced >= 1234 // 100
    assert small == json.dumps({"id": 8, "rows": rows[:100]}, separators=(",", ":")).encode()
    assert whole == 0


def serving_link(service, push_interval: float | None = None):
    """A ``WorkerLink`` on one end of a socket pair, handed its first rules and then
    serving ``service``: the master's ``Channel``, its socket and the stop event.
    Call inside a ``gevent.Timeout``; the answer to the first rules (id 1) is left
    for the caller to read."""
    import gevent.socket
    from gevent.event import Event

    from gportmap.runtime.supervisor import Changes
    from gportmap.runtime.workers import Channel, WorkerLink

    ours, theirs = gevent.socket.socketpair()
    master, link = Channel(ours), WorkerLink(Channel(theirs), 0)
    if push_interval is not None:
        link.push_interval = push_interval
    stop = Event()
    raw = base64.b64encode(b"{}").decode()
    master.send({"id": 1, "op": "apply", "generation": 1, "raw": raw, "path": "rules.json"})
    assert link.first_config() == (b"{}", "rules.json")
    link.serve(service, Changes(), stop)
    return master, ours, stop, link


def test_an_upgrade_waits_for_a_message_being_encoded_in_slices():
    """A worker's long answer yields to the hub between slices while it is encoded;
    ``Channel.hold`` (an upgrade in place handing the channel on) called meanwhile
    returns only once that message is sent whole, as for one being written: the
    master reads it, nothing is dropped by the exec. Encoded outside the send lock,
    hold would return at once and the exec would drop the answer."""
    import gevent
    import gevent.socket

    from gportmap.runtime.workers import Channel

    ours, theirs = gevent.socket.socketpair()
    sender, master = Channel(ours), Channel(theirs)
    sender.encode_slice = 100
    message = {"id": 9, "ok": True, "connection_rows": [[n, "web", "127.0.0.1:1", 0.5] for n in range(5000)]}
    try:
        with gevent.Timeout(10):
            reading = gevent.spawn(master.recv)
            sending = gevent.spawn(sender.send, message)
            gevent.sleep(0)  # the send starts and yields after its first slice
            assert not sending.ready()
            sender.hold()
            assert sending.ready() and sending.successful()
            assert reading.get() == message
            sender.release()
    finally:
        ours.close()
        theirs.close()


class ListingService:
    """A worker's service with three open connections."""

    ROWS = [(n, "web", f"127.0.0.1:{4000 + n}", "127.0.0.1:80", "127.0.0.1:81", 1e9 + n, 2.5, n, 2 * n) for n in (1, 3, 5)]

    def worker_report(self) -> dict:
        return {"pid": os.getpid(), "active": 3, "rules": {}, "states": []}

    def open_rows(self) -> list:
        return list(self.ROWS)

    def apply_raw(self, raw: bytes, source: str):
        from gportmap.runtime.supervisor import Changes

        return Changes()


def test_open_connections_go_as_rows_to_this_master_and_as_entries_to_an_earlier_one():
    """This version's master asks ``"connections": "rows"`` and gets the rows as the
    answer's ``connection_rows``; a master of an earlier version (during an
    upgrade, the workers are handed on first) asks ``true`` and gets the entries in
    the report, as it always did; a report without either carries neither. The
    master's ``/connections`` makes the same entries of both, with the worker."""
    import gevent

    from gportmap.stats import OpenTable, connections_document, open_entry

    def answer(request_id: int) -> dict:
        while True:
            message = master.recv()
            if message.get("id") == request_id:
                return message

    with gevent.Timeout(10):
        master, ours, stop, _ = serving_link(ListingService())
        assert answer(1)["ok"]
        master.send({"id": 2, "op": "report", "connections": "rows"})
        rows = answer(2)
        master.send({"id": 3, "op": "report", "connections": True})
        entries = answer(3)
        master.send({"id": 4, "op": "report"})
        plain = answer(4)
        ours.close()
        stop.wait()
    expected = [open_entry(row) for row in ListingService.ROWS]
    assert rows["ok"] and rows["connection_rows"] == [list(row) for row in ListingService.ROWS]
    assert "connections" not in rows["report"]
    assert entries["ok"] and entries["report"]["connections"] == expected and "connection_rows" not in entries
    assert plain["ok"] and "connections" not in plain["report"] and "connection_rows" not in plain
    assert expected[0]["started"] == "2001-09-09T01:46:41.000Z" and expected[0]["bytes"] == {"received": 1, "sent": 2}
    tables = [OpenTable(0, rows["connection_rows"]), OpenTable(1, entries["report"]["connections"])]
    document = connections_document(tables)
    assert document == [{**e, "worker": 0} for e in expected] + [{**e, "worker": 1} for e in expected]
    assert entries["report"]["connections"] == expected  # the worker's entries are not changed in place


# -- the control plane: request ids, pushed figures, heartbeat, generations ----------------


def status_of(pid: int) -> str | None:
    """The process's status (psutil.STATUS_*), or None once it is gone."""
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return None


def resume(pid: int) -> None:
    """SIGCONT, if the process is still there."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def worker_entry(gp, index: int) -> dict:
    return next(w for w in gp.admin_json("/stats")["workers"] if w["index"] == index)


def echo_on(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


@pytest.mark.slow
def test_a_worker_slow_to_answer_is_not_killed(start_gportmap, echo_target):
    """A worker that does not answer /connections in time (stopped here, ~5 s) is
    left out of that answer and keeps running: same pid, its connections intact.
    Before request ids it was SIGKILLed after 5 s, cutting every connection it held."""
    port = free_port()
    gp = start_gportmap(rules(tcp_rule(port, echo_target.port, name="slow")), "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
    socks = [connect(port) for _ in range(12)]
    try:
        for n, sock in enumerate(socks):
            assert echo_on(sock, b"hello %d" % n) == b"hello %d" % n
        listed = wait_for(lambda: len(found := gp.admin_json("/connections")) == 12 and found)
        victim = listed[0]["worker"]
        pid = worker_entry(gp, victim)["pid"]
        held = {entry["client"] for entry in listed if entry["worker"] == victim}

        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: status_of(pid) == psutil.STATUS_STOPPED, what="the worker stopped")
            partial = gp.admin_json("/connections")  # waits for the stopped worker, then goes on
            assert status_of(pid) == psutil.STATUS_STOPPED, "the slow worker was killed"
            assert {entry["worker"] for entry in partial} <= {1 - victim}
            late = gp.wait_event("worker_request_late", worker=victim)[0]
            assert late["request"] == "report"
        finally:
            resume(pid)

        # it is the same process, it still serves its connections, and the master hears it again
        assert not gp.events("worker_exited") and not gp.events("worker_unresponsive")
        for n, sock in enumerate(socks):
            assert echo_on(sock, b"again %d" % n) == b"again %d" % n
        relisted = wait_for(lambda: len(listed := gp.admin_json("/connections")) == 12 and listed)
        assert {entry["client"] for entry in relisted if entry["worker"] == victim} == held
        entry = worker_entry(gp, victim)
        assert (entry["pid"], entry["restarts"], entry["state"]) == (pid, 0, "running")
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow
def test_scrapes_read_pushed_figures_and_ask_no_worker(start_gportmap, echo_target):
    """/metrics, /stats and /healthz answer from the figures the workers pushed: with a
    worker stopped they answer, its last figures stay in the exact sums, and nothing
    is asked of it (no late request, it is not killed). Before, every scrape asked
    every worker, waited 5 s for the stopped one and then SIGKILLed it."""
    port = free_port()
    gp = start_gportmap(rules(tcp_rule(port, echo_target.port, name="pushed")), "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
    for n in range(30):
        assert echo_once(port, b"%d" % n) == b"%d" % n

    def settled():
        stats = gp.admin_json("/stats")
        counted = stats["rules"][0]["connections"]
        per_worker = sum(w["connections_total"] for w in stats["workers"])
        return counted["total"] == 30 and counted["active"] == 0 and per_worker == 30 and stats

    stats = wait_for(settled, what="30 connections pushed")
    victim = max(stats["workers"], key=lambda w: w["connections_total"])
    assert victim["connections_total"] > 0
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: status_of(victim["pid"]) == psutil.STATUS_STOPPED, what="the worker stopped")
        for _ in range(3):
            status, body, _ = gp.admin("/metrics")
            assert status == 200
            assert 'gportmap_connections_total{protocol="tcp",rule="pushed"} 30.0' in body.decode()
            stats = gp.admin_json("/stats")
            assert stats["rules"][0]["connections"]["total"] == 30
            stopped = next(w for w in stats["workers"] if w["index"] == victim["index"])
            assert (stopped["pid"], stopped["state"]) == (victim["pid"], "running")
            assert stopped["connections_total"] == victim["connections_total"]
            assert gp.admin("/healthz")[0] == 200
        assert status_of(victim["pid"]) == psutil.STATUS_STOPPED, "a scrape killed the stopped worker"
        assert not gp.events("worker_request_late"), "a scrape asked a worker"
    finally:
        resume(victim["pid"])
    # pushes resume: what the worker counts from now on reaches the sums
    for n in range(10):
        assert echo_once(port, b"%d" % n) == b"%d" % n
    wait_for(lambda: gp.admin_json("/stats")["rules"][0]["connections"]["total"] == 40, what="40 counted")
    assert not gp.events("worker_exited")


@pytest.mark.slow
def test_a_worker_that_missed_a_reload_is_brought_back_to_the_current_generation(
    start_gportmap, echo_target, tmp_path
):
    """Worker 0 misses generation 2 for real: it is stopped while the master validates
    the new rules, and its certificate is gone by the time it reads them, so its
    apply fails. Once the file is back, the master's resync brings it to generation 2
    and it listens on the new rule's port. Before, the failure was logged and the
    worker served the old rules until it was restarted."""
    from certs import CA

    pki = tmp_path / "pki"
    pki.mkdir()
    server = CA(pki, "ca").issue("server", "127.0.0.1", ips=("127.0.0.1",))
    plain, secure = free_port(), free_port()
    first = rules(tcp_rule(plain, echo_target.port, name="plain"), watch=False)
    gp = start_gportmap(first, "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, what="two workers")
    pids = {w["index"]: w["pid"] for w in running_workers(gp)}

    def accepts(port: int) -> bool:
        try:
            connect(port, timeout=2).close()
        except ConnectionRefusedError:
            return False
        return True

    tls = {"certFile": str(server.cert), "keyFile": str(server.key)}
    second = rules(
        tcp_rule(plain, echo_target.port, name="plain"),
        tcp_rule(secure, echo_target.port, name="secure", tls=tls),
        watch=False,
    )
    os.kill(pids[0], signal.SIGSTOP)
    try:
        wait_for(lambda: status_of(pids[0]) == psutil.STATUS_STOPPED, what="worker 0 stopped")
        gp.rules_path.write_text(json.dumps(second))
        gp.signal(signal.SIGHUP)
        # worker 1 serves the new rule (worker 0 is stopped): the master has read the certificate
        wait_for(lambda: accepts(secure), what="worker 1 listening on the new rule's port")
        pki.rename(tmp_path / "pki.away")
    finally:
        resume(pids[0])

    failed = gp.wait_event("worker_config_invalid", worker=0)[0]
    resync = gp.wait_event("worker_resync", worker=0)[0]
    assert failed["generation"] == 2
    assert (resync["had"], resync["wanted"]) == (1, 2)
    (tmp_path / "pki.away").rename(pki)

    def listening_on_secure() -> bool:
        return any(
            c.laddr.port == secure and c.status == psutil.CONN_LISTEN
            for c in psutil.Process(pids[0]).net_connections(kind="tcp")
        )

    wait_for(listening_on_secure, timeout=30, what="worker 0 listening on the new rule's port")
    wait_for(lambda: worker_entry(gp, 0)["generation"] == 2, what="worker 0 on generation 2")
    assert worker_entry(gp, 1)["generation"] == 2
    assert {w["index"]: w["pid"] for w in running_workers(gp)} == pids, "no worker was restarted"
    assert not gp.events("worker_exited")
    secure_state = next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == "secure")
    assert secure_state["state"] == "running"


class FakeMaster:
    """The test as a worker's master: a real worker process on the other end of a
    socketpair, spoken to in the channel's framing."""

    def __init__(self, tmp_path, rules_doc: dict) -> None:
        self.sock, theirs = socket.socketpair()
        self.sock.settimeout(15)
        self.log = open(tmp_path / "worker.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gportmap", "--workers", "2", "--worker-fd", str(theirs.fileno()),
             "--worker-index", "0", "--log-format", "json"],
            pass_fds=(theirs.fileno(),),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        theirs.close()
        self.log_path = tmp_path / "worker.log"
        self.pushes: list[dict] = []
        self.answers: list[dict] = []
        path = tmp_path / "rules.json"
        raw = json.dumps(rules_doc).encode()
        path.write_bytes(raw)
        self.raw, self.path = raw, str(path)

    def send_frame(self, body: bytes) -> None:
        self.sock.sendall(struct.pack("!I", len(body)) + body)

    def send(self, message: dict) -> None:
        self.send_frame(json.dumps(message).encode())

    def recv(self) -> dict:
        (size,) = struct.unpack("!I", recv_exactly(self.sock, 4))
        return json.loads(recv_exactly(self.sock, size))

    def answer(self, request_id) -> dict:
        """The answer with this id (None: the answer to a request without an id),
        read until it comes; what else comes on the way is kept."""
        while True:
            found = next((m for m in self.answers if m.get("id") == request_id), None)
            if found is not None:
                self.answers.remove(found)
                return found
            self._read_one()

    def wait_pushes(self, count: int) -> None:
        while len(self.pushes) < count:
            self._read_one()

    def _read_one(self) -> None:
        message = self.recv()
        (self.pushes if message.get("op") == "push" else self.answers).append(message)

    def events(self, event: str) -> list[dict]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [record for record in map(json.loads, lines) if record.get("event") == event]

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self.log.close()


@pytest.mark.slow  # starts a master and workers
def test_the_worker_link_survives_requests_it_cannot_serve(tmp_path, echo_target):
    """A real worker, the test as its master: a frame that is no JSON, an unknown op,
    an apply with a raw that is no base64 text, a request without an id. Each is
    refused (answered when it has an id) and the link goes on: the next report is
    answered, pushes keep coming, the rule keeps serving, and the worker still stops
    when its master's end closes. Before, the apply whose raw was not text raised
    AttributeError out of the channel greenlet: the worker answered nothing more."""
    port = free_port()
    master = FakeMaster(tmp_path, rules(tcp_rule(port, echo_target.port, name="linked")))
    try:
        master.send({"id": 1, "op": "apply", "generation": 1, "source": "start",
                     "raw": base64.b64encode(master.raw).decode(), "path": master.path})
        first = master.answer(1)
        assert first["ok"] and first["generation"] == 1 and first["pid"] == master.proc.pid
        assert echo_once(port, b"up") == b"up"

        master.send_frame(b"\xff not json")
        master.send({"id": 2, "op": "frobnicate"})
        master.send({"id": 3, "op": "apply", "generation": 2, "raw": 12, "path": master.path})
        master.send({"id": 4, "op": "apply", "generation": 2, "raw": "!!! not base64", "path": master.path})
        master.send({"op": "report"})
        master.send({"id": 5, "op": "report", "connections": True})
        for request_id, words in ((2, "unknown request"), (3, "not a string"), (4, "not base64")):
            refused = master.answer(request_id)
            assert refused["ok"] is False and words in refused["errors"][0], refused
            assert refused["generation"] == 1
        anonymous = master.answer(None)
        assert anonymous["ok"] is False and "without an integer id" in anonymous["errors"][0]
        report = master.answer(5)
        assert report["ok"] and report["report"]["rules"]["linked"]["total"] == 1
        assert isinstance(report["report"]["connections"], list)
        master.wait_pushes(len(master.pushes) + 2)  # the heartbeat goes on
        assert master.pushes[-1]["generation"] == 1
        assert echo_once(port, b"still") == b"still"
        assert len(master.events("master_bad_message")) == 5
        assert not master.events("internal_error")
    finally:
        master.close()
    assert master.proc.returncode == 0
    assert master.events("master_gone")


class RaisingService:
    """What the link sees of a service with bugs: its figures with connections and
    its apply raise exceptions that are no ConfigError."""

    def worker_report(self) -> dict:
        return {"pid": os.getpid(), "active": 0, "rules": {}, "states": []}

    def open_rows(self) -> list:
        raise RuntimeError("a bug in the figures")

    def apply_raw(self, raw: bytes, source: str):
        raise ZeroDivisionError("a bug in apply")


def test_a_request_that_raises_is_answered_and_the_link_goes_on(caplog):
    """In-process, with a service whose calls raise: each such request is answered
    as failed, logged once as internal_error with its traceback, and the link keeps
    answering and pushing. Before, the first exception that was no ConfigError ended
    the channel greenlet: the worker never answered again and its master SIGKILLed it."""
    import gevent

    received: list[dict] = []

    def take(request_id: int | None = None, op: str | None = None) -> dict:
        """The first message with this id (or this op), read until it comes."""
        while True:
            for message in received:
                if message.get("op") == op if op is not None else message.get("id") == request_id:
                    received.remove(message)
                    return message
            received.append(master.recv())

    raw = base64.b64encode(b"{}").decode()
    with gevent.Timeout(10):
        master, ours, stop, link = serving_link(RaisingService(), push_interval=0.05)
        assert take(1)["ok"]
        master.send({"id": 2, "op": "report", "connections": "rows"})
        master.send({"id": 3, "op": "apply", "generation": 2, "raw": raw, "path": "rules.json"})
        master.send({"id": 4, "op": "report"})
        broken, failed, fine = take(2), take(3), take(4)
        assert broken["ok"] is False and "RuntimeError" in broken["errors"][0]
        assert failed["ok"] is False and "ZeroDivisionError" in failed["errors"][0]
        assert failed["generation"] == 1 and (link.applied, link.applying) == (1, None)
        assert fine["ok"] and fine["report"]["active"] == 0
        received.clear()
        take(op="push")  # the heartbeat goes on
        take(op="push")
        ours.close()
        stop.wait()  # the master's end closed: the worker stops
    internal = [r for r in caplog.records if getattr(r, "event", None) == "internal_error"]
    assert len(internal) == 2 and all(record.exc_info for record in internal)


class SlowService:
    """A service whose applies take a moment (they yield, as binding does) and that
    remembers the bytes it ran last."""

    def __init__(self) -> None:
        self.running = b""

    def worker_report(self) -> dict:
        return {"pid": os.getpid(), "active": 0, "rules": {}, "states": []}

    def apply_raw(self, raw: bytes, source: str):
        import gevent

        from gportmap.runtime.supervisor import Changes

        gevent.sleep(0.01)
        self.running = raw
        return Changes()


def test_an_older_generation_never_replaces_a_newer_one():
    """Generation 2, then 3, then 2 again (a resync that crossed a reload) reach a
    worker while 2 is being applied: the late 2 is refused, 3 runs and is what the
    worker says it runs; a 3 sent once more is answered at once."""
    import gevent
    import gevent.socket
    from gevent.event import Event

    from gportmap.runtime.supervisor import Changes
    from gportmap.runtime.workers import Channel, WorkerLink

    ours, theirs = gevent.socket.socketpair()
    master, link = Channel(ours), WorkerLink(Channel(theirs), 0)
    service = SlowService()
    answers: dict[int, dict] = {}

    def answer(request_id: int) -> dict:
        while request_id not in answers:
            message = master.recv()
            if message.get("op") != "push":
                answers[message["id"]] = message
        return answers[request_id]

    def apply(request_id: int, generation: int, raw: bytes) -> None:
        encoded = base64.b64encode(raw).decode()
        master.send({"id": request_id, "op": "apply", "generation": generation, "raw": encoded, "path": "r"})

    with gevent.Timeout(10):
        apply(1, 1, b"one")
        link.first_config()
        link.serve(service, Changes(), Event())
        assert answer(1)["generation"] == 1
        apply(2, 2, b"two")
        apply(3, 3, b"three")
        apply(4, 2, b"two")
        assert answer(2)["ok"] and answer(3)["ok"]
        late = answer(4)
        assert late["ok"] is False and "older" in late["errors"][0]
        assert service.running == b"three" and link.applied == 3
        apply(5, 3, b"three")
        assert answer(5)["ok"] and answer(5)["generation"] == 3
        ours.close()


@pytest.mark.slow
def test_only_a_worker_that_sends_nothing_is_killed():
    """The heartbeat, in-process with real processes standing in for two workers:
    one keeps sending (it has a request unanswered, as a slow worker would), the other
    sends nothing. Only the silent one is killed."""
    import gevent
    import gevent.socket

    from gportmap.runtime.workers import Channel, Op, WorkerPool, WorkerState

    pool = WorkerPool(2, [])
    pool.heartbeat_timeout, pool.heartbeat_check = 2.0, 0.05
    # plain subprocesses: gevent's would install a SIGCHLD handler reaping the
    # children of the tests that run after this one
    processes = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    sockets = [gevent.socket.socketpair() for _ in range(2)]
    talking, silent = pool.workers
    for worker, process, (ours, _) in zip(pool.workers, processes, sockets):
        worker.attach(process, Channel(ours))
        worker.state = WorkerState.RUNNING

    def talk() -> None:
        while True:
            talking.receive({"op": "push", "generation": 1})
            gevent.sleep(0.05)

    talker = gevent.spawn(talk)
    unanswered = gevent.spawn(talking.request, Op.REPORT, {"connections": True}, 60)
    watchdog = gevent.spawn(pool._watch)
    try:
        with gevent.Timeout(15):
            while processes[1].poll() is None:  # the hub runs meanwhile (a deadline, not a wait)
                gevent.sleep(0.02)
        assert processes[1].returncode == -signal.SIGKILL
        assert processes[0].poll() is None and silent.killed and not talking.killed
        assert not unanswered.ready()
    finally:
        pool.stopping = True
        for greenlet in (talker, unanswered, watchdog):
            greenlet.kill()
        for process in processes:
            process.kill()
            process.wait()
        for pair in sockets:
            for sock in pair:
                sock.close()
