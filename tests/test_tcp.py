"""TCP forwarding end to end: gportmap as a subprocess, real sockets on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time

import pytest
from conftest import (
    LOOPBACK,
    Pusher,
    TargetServer,
    closed_by_peer,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    stuck_listener,
    tcp_rule,
    wait_for,
)

MB = 1024 * 1024


RELAYS = pytest.mark.parametrize("relay", ["splice", "copy"])  # GPORTMAP_RELAY: zero-copy or copying


@RELAYS
@pytest.mark.slow
def test_10mb_each_way_intact_at_once_and_in_small_writes(start_gportmap, relay):
    upload = [os.urandom(10 * MB), os.urandom(10 * MB)]
    download = os.urandom(10 * MB)
    seen: list[str] = []

    def sink_and_source(conn: socket.socket) -> None:
        sender = threading.Thread(target=lambda: (conn.sendall(download), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        digest = hashlib.sha256()
        while chunk := conn.recv(65536):
            digest.update(chunk)
        seen.append(digest.hexdigest())
        sender.join()

    target = TargetServer(sink_and_source)
    port = free_port()
    gp = start_gportmap([tcp_rule(port, target.port, name="bulk")], env={"GPORTMAP_RELAY": relay})
    assert ("splice" in gp.events("started")[0]["features"]) == (relay == "splice")
    try:
        for mode, payload in zip(("at_once", "small_writes"), upload):
            sock = connect(port)

            def send(sock=sock, payload=payload, mode=mode) -> None:
                if mode == "at_once":
                    sock.sendall(payload)
                else:
                    rng, view, offset = random.Random(7), memoryview(payload), 0
                    while offset < len(payload):
                        size = rng.randint(1, 1500)
                        sock.sendall(view[offset : offset + size])
                        offset += size
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            received = recv_until_eof(sock)
            sender.join()
            sock.close()
            assert hashlib.sha256(received).hexdigest() == hashlib.sha256(download).hexdigest(), mode
        wait_for(lambda: len(seen) == 2, what="both uploads seen by the target")
        assert seen == [hashlib.sha256(p).hexdigest() for p in upload]
        closed = gp.wait_event("connection_closed", count=2, rule="bulk")
        for record in closed:
            assert record["bytes_received"] == 10 * MB
            assert record["bytes_sent"] == 10 * MB
            assert record["reason"] == "closed"
    finally:
        target.close()


@pytest.mark.slow  # a load test (500 connections)
def test_500_concurrent_connections_each_get_their_own_data(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="many")])
    socks = [connect(port) for _ in range(500)]
    try:
        payloads = [os.urandom(64) + str(i).encode() for i in range(len(socks))]
        for sock, payload in zip(socks, payloads):
            sock.sendall(payload)
        for sock, payload in zip(socks, payloads):
            assert recv_exactly(sock, len(payload)) == payload
        wait_for(lambda: echo_target.accepted == 500, what="500 target connections")
    finally:
        for sock in socks:
            sock.close()
    gp.wait_event("connection_closed", count=500, timeout=30, rule="many")


@RELAYS
def test_half_close_keeps_the_reply_flowing(start_gportmap, relay):
    reply = os.urandom(3 * MB)

    def read_all_then_reply(conn: socket.socket) -> None:
        request = recv_until_eof(conn)  # EOF forwarded by gportmap
        conn.sendall(hashlib.sha256(request).digest() + reply)
        conn.shutdown(socket.SHUT_WR)

    target = TargetServer(read_all_then_reply)
    port = free_port()
    gp = start_gportmap([tcp_rule(port, target.port, name="half")], env={"GPORTMAP_RELAY": relay})
    try:
        sock = connect(port)
        request = os.urandom(100_000)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock)
        assert answer[:32] == hashlib.sha256(request).digest()
        assert answer[32:] == reply
        sock.close()
        (record,) = gp.wait_event("connection_closed", rule="half")
        assert record["reason"] == "closed"
        assert record["bytes_received"] == len(request)
        assert record["bytes_sent"] == len(answer)
    finally:
        target.close()


def test_target_down_closes_client_promptly_and_logs_it(start_gportmap):
    port, dead = free_port(), free_port()
    # A refused connect must end the client at once, not at connectTimeout: with a
    # connectTimeout of 60 s, a close within the 10 s the read waits tells them apart.
    gp = start_gportmap([tcp_rule(port, dead, name="down", connectTimeout=60)])
    sock = connect(port)
    assert closed_by_peer(sock, timeout=10)
    (record,) = gp.wait_event("connection_closed", rule="down")
    assert record["reason"] == "connect_failed"
    assert record["error"] == "connection refused"
    assert record["level"] == "WARNING"
    assert record["client"].startswith("127.0.0.1:")
    assert record["target"] == f"127.0.0.1:{dead}"


@pytest.mark.slow
def test_target_that_never_accepts_is_cut_at_connect_timeout(start_gportmap):
    # A listener that never accepts, with its accept queue full: SYNs are dropped.
    with stuck_listener() as stuck:
        port = free_port()
        gp = start_gportmap([tcp_rule(port, stuck[1], name="stuck", connectTimeout=1)])
        sock = connect(port)
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=10)
        elapsed = time.monotonic() - started
        assert elapsed >= 0.8, elapsed  # at connectTimeout, not before; the read above waits at most 10 s
        (record,) = gp.wait_event("connection_closed", rule="stuck")
        assert record["reason"] == "connect_failed"
        assert record["error"] == "connect timed out"


@pytest.mark.slow
def test_idle_timeout_closes_silent_connections_only(start_gportmap, echo_target):
    def count_then_report(conn: socket.socket) -> None:
        total = 0
        while chunk := conn.recv(65536):
            total += len(chunk)
        conn.sendall(str(total).encode())

    counter = TargetServer(count_then_report)
    idle_port, talk_port, upload_port = free_port(), free_port(), free_port()
    gp = start_gportmap(
        [
            tcp_rule(idle_port, echo_target.port, name="silent", idleTimeout=0.5),
            tcp_rule(talk_port, echo_target.port, name="talker", idleTimeout=0.5),
            tcp_rule(upload_port, counter.port, name="uploader", idleTimeout=0.5),
        ]
    )
    try:
        silent = connect(idle_port)
        started = time.monotonic()
        assert closed_by_peer(silent, timeout=5)
        assert time.monotonic() - started >= 0.4  # not before idleTimeout (0.5 s)
        (record,) = gp.wait_event("connection_closed", rule="silent")
        assert record["reason"] == "idle_timeout"

        # Round trips for three idle periods: never idle, never closed.
        talker = connect(talk_port)
        deadline = time.monotonic() + 1.5
        trips = 0
        while time.monotonic() < deadline:
            talker.sendall(b"ping")
            assert recv_exactly(talker, 4) == b"ping"
            trips += 1
        assert trips > 10
        talker.close()
        (record,) = gp.wait_event("connection_closed", rule="talker")
        assert record["reason"] == "closed"

        # One direction moving is activity too: an upload with no reply stays open.
        uploader = connect(upload_port)
        sent = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and sent < 200 * MB:
            uploader.sendall(b"x" * 10000)
            sent += 10000
        uploader.shutdown(socket.SHUT_WR)
        assert recv_until_eof(uploader) == str(sent).encode()
        uploader.close()
        (record,) = gp.wait_event("connection_closed", rule="uploader")
        assert record["reason"] == "closed"
        assert record["bytes_received"] == sent
    finally:
        counter.close()


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"], ids=["hub", "staged"])
def test_connection_over_max_connections_is_closed_at_once_and_counted(start_gportmap, echo_target, target_host):
    """The limit is taken at admission on both tcp paths: all in hub callbacks (an
    IP target), or a greenlet first (a name to resolve)."""
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="capped", maxConnections=3, targetHost=target_host)])
    first = [connect(port) for _ in range(3)]
    for i, sock in enumerate(first):
        sock.sendall(b"hello %d" % i)
        assert recv_exactly(sock, 7) == b"hello %d" % i
    extra = connect(port)
    # Closed while the first three still hold every place: never queued for one.
    assert closed_by_peer(extra)
    (record,) = gp.wait_event("connection_rejected", rule="capped")
    assert record["reason"] == "limit"
    for i, sock in enumerate(first):  # the first N keep working
        sock.sendall(b"again %d" % i)
        assert recv_exactly(sock, 7) == b"again %d" % i
    first.pop().close()
    gp.wait_event("connection_closed", rule="capped")
    again = connect(port)
    again.sendall(b"room")
    assert recv_exactly(again, 4) == b"room"
    for sock in first + [again, extra]:
        sock.close()
    assert echo_target.accepted == 4  # the rejected client never reached the target


def test_global_max_connections_applies_across_rules(start_gportmap, echo_target):
    a, b = free_port(), free_port()
    gp = start_gportmap(
        {"settings": {"maxConnections": 2}, "rules": [tcp_rule(a, echo_target.port), tcp_rule(b, echo_target.port)]}
    )
    held = [connect(a), connect(b)]
    for sock in held:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    extra = connect(b)
    assert closed_by_peer(extra)
    (record,) = gp.wait_event("connection_rejected")
    assert record["reason"] == "limit" and record["rule"] == f"tcp-{b}"
    for sock in held + [extra]:
        sock.close()


@RELAYS
@pytest.mark.parametrize("stalled_side", ["client", "target"])
@pytest.mark.slow
def test_a_reader_that_stops_does_not_grow_memory(start_gportmap, stalled_side, relay):
    """100 MB pushed at a reader that never reads: backpressure, not buffering."""
    release = threading.Event()
    pusher = Pusher(os.urandom(MB), 100 * MB)

    def target_handler(conn: socket.socket) -> None:
        if target.accepted == 1:
            return  # the warm-up connection
        if stalled_side == "client":
            pusher.push(conn)
        release.wait(60)

    target = TargetServer(target_handler)
    port = free_port()
    gp = start_gportmap([tcp_rule(port, target.port, name="stall")], env={"GPORTMAP_RELAY": relay})
    try:
        warm = connect(port)  # one full connection first, so imports and pools are warm
        warm.close()
        gp.wait_event("connection_closed", rule="stall", timeout=30)
        before = gp.rss_kib()
        sock = connect(port)
        if stalled_side == "target":
            pusher.push(sock)
        wait_for(pusher.done.is_set, timeout=60, what="the pusher to stall")
        after = gp.rss_kib()
        growth_mib = (after - before) / 1024
        print(f"stalled {stalled_side}: pushed {pusher.bytes / MB:.1f} MiB, RSS growth {growth_mib:.2f} MiB")
        assert pusher.bytes < 100 * MB, "nothing pushed back: the reader is not stalled"
        assert growth_mib < 4, f"RSS grew by {growth_mib:.1f} MiB"
        sock.close()
    finally:
        release.set()
        target.close()


def test_a_rule_that_cannot_bind_leaves_the_others_serving(start_gportmap, echo_target):
    blocker = socket.socket()
    blocker.bind((LOOPBACK, 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    good = free_port()
    try:
        gp = start_gportmap([tcp_rule(busy, echo_target.port, name="busy"), tcp_rule(good, echo_target.port, name="good")])
        (failed,) = gp.wait_event("rule_failed", rule="busy")
        assert "already in use" in failed["error"]
        gp.wait_event("rule_started", rule="good")
        sock = connect(good)
        sock.sendall(b"ok")
        assert recv_exactly(sock, 2) == b"ok"
        sock.close()
    finally:
        blocker.close()


def test_ipv6_listen_address(start_gportmap, echo_target):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
        probe.close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="v6", listenHost="::1")])
    (started,) = gp.wait_event("rule_started", rule="v6")
    assert started["listen"] == f"[::1]:{port}"
    sock = socket.create_connection(("::1", port), timeout=5)
    sock.sendall(b"six")
    assert recv_exactly(sock, 3) == b"six"
    sock.close()
    (record,) = gp.wait_event("connection_closed", rule="v6")
    assert record["client"].startswith("[::1]:")


def test_json_logs_carry_the_spec_fields(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="logged")])
    sock = connect(port)
    sock.sendall(b"abc")
    assert recv_exactly(sock, 3) == b"abc"
    sock.close()
    gp.wait_event("connection_closed", rule="logged")
    records = gp.events()  # parses every line: a non-JSON line fails here
    assert records
    for record in records:
        for key in ("timestamp", "level", "message", "event"):
            assert key in record, (key, record)
    (started,) = gp.events("rule_started")
    assert started["rule"] == "logged" and started["listen"] == f"127.0.0.1:{port}"
    (closed,) = gp.events("connection_closed")
    for key in ("rule", "client", "target", "bytes_received", "bytes_sent", "duration", "reason"):
        assert key in closed
    assert closed["bytes_received"] == 3 and closed["bytes_sent"] == 3
    assert "abc" not in gp.log_path.read_text()  # no payloads in logs


@RELAYS
def test_idle_timeout_counts_from_the_last_byte_moved(start_gportmap, echo_target, relay):
    """The idle clock restarts with every byte: a connection that moved something
    after it opened outlives the first idle period, and a silent one does not."""
    port = free_port()
    rule = tcp_rule(port, echo_target.port, name="idle", idleTimeout=0.6)
    gp = start_gportmap([rule], env={"GPORTMAP_RELAY": relay})
    silent_started = time.monotonic()
    silent = connect(port)  # never sends a byte
    talker = connect(port)
    time.sleep(0.3)  # the scenario: the talker moves a byte half-way through the first idle period
    pinged = time.monotonic()
    talker.sendall(b"ping")
    assert recv_exactly(talker, 4) == b"ping"
    assert closed_by_peer(silent, timeout=10)
    assert time.monotonic() - silent_started >= 0.59
    assert closed_by_peer(talker, timeout=10)
    assert time.monotonic() - pinged >= 0.59, "cut by the idle period that began at connect"
    records = gp.wait_event("connection_closed", count=2, rule="idle")
    assert [r["reason"] for r in records] == ["idle_timeout", "idle_timeout"]
    assert sorted(r["bytes_received"] for r in records) == [0, 4]
    silent.close()
    talker.close()


@RELAYS
def test_connections_ended_every_way_leave_no_descriptor_behind(start_gportmap, echo_target, relay):
    """Round trips, a streamed upload with a half-close (the splice path), resets and
    clients that send nothing: once all are closed, gportmap holds exactly the
    descriptors it held before, and every byte count is exact."""
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="fds")], env={"GPORTMAP_RELAY": relay})
    warm = connect(port)
    warm.sendall(b"w")
    assert recv_exactly(warm, 1) == b"w"
    warm.close()
    gp.wait_event("connection_closed", rule="fds")
    baseline = gp.open_fds()
    bulk = os.urandom(2 * MB)
    rounds = 25
    for _ in range(rounds):
        small = connect(port)
        small.sendall(b"hello")
        assert recv_exactly(small, 5) == b"hello"
        small.close()

        streamed = connect(port)
        sender = threading.Thread(target=lambda s=streamed: (s.sendall(bulk), s.shutdown(socket.SHUT_WR)))
        sender.start()
        assert recv_until_eof(streamed) == bulk
        sender.join()
        streamed.close()

        reset = connect(port)
        reset.sendall(b"bye")
        assert recv_exactly(reset, 3) == b"bye"
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        reset.close()  # RST

        connect(port).close()  # nothing sent at all
    records = gp.wait_event("connection_closed", count=1 + 4 * rounds, timeout=60, rule="fds")
    streamed_records = [r for r in records if r["bytes_received"] == len(bulk)]
    assert len(streamed_records) == rounds
    assert all(r["bytes_sent"] == len(bulk) and r["reason"] == "closed" for r in streamed_records)
    wait_for(lambda: gp.open_fds() == baseline, timeout=10, what=f"descriptors back to {baseline}")


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"])
@pytest.mark.slow
def test_literal_and_named_targets_relay_alike(start_gportmap, echo_target, target_host):
    """An IP literal target is connected from the event loop (no greenlet at all); a
    host name is resolved and connected in a greenlet, then relayed the same way."""
    port = free_port()
    rule = tcp_rule(port, echo_target.port, name="named", targetHost=target_host)
    gp = start_gportmap([rule])
    payload = os.urandom(300_000)
    sock = connect(port)
    sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    assert recv_until_eof(sock) == payload
    sender.join()
    sock.close()
    (record,) = gp.wait_event("connection_closed", rule="named")
    assert (record["reason"], record["bytes_received"], record["bytes_sent"]) == ("closed", len(payload), len(payload))
