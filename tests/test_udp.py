"""UDP forwarding end to end (issue 5): gportmap as a subprocess, real sockets on
loopback, sessions per client address, expiry, the session cap, a real DNS peer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import gevent.socket
import psutil
import pytest
from conftest import LOOPBACK, free_port, require_tool, wait_for
from gevent.server import DatagramServer

from gportmap.config import parse
from gportmap.runtime.supervisor import Supervisor

Handler = Callable[[socket.socket, bytes, tuple], None]


def echo(sock: socket.socket, data: bytes, address: tuple) -> None:
    sock.sendto(data, address)


class UdpTarget:
    """A UDP server on loopback that runs ``handler`` per datagram in one thread."""

    def __init__(self, handler: Handler = echo, host: str = LOOPBACK, port: int = 0) -> None:
        self.handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.05)  # how often the loop looks at ``_closed``
        self.port = self.sock.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                data, address = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                continue  # a reply's destination went away
            self.handler(self.sock, data, address)

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpTarget]:
    target = UdpTarget()
    yield target
    target.close()


def udp_rule(listen_port: int, target_port: int, **extra) -> dict:
    return {
        "protocol": "udp",
        "listenHost": LOOPBACK,
        "listenPort": listen_port,
        "targetHost": LOOPBACK,
        "targetPort": target_port,
        **extra,
    }


def client(timeout: float = 5.0, family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("::1" if family == socket.AF_INET6 else LOOPBACK, 0))
    sock.settimeout(timeout)
    return sock


def round_trip(sock: socket.socket, port: int, payload: bytes, host: str = LOOPBACK) -> bytes:
    sock.sendto(payload, (host, port))
    data, source = sock.recvfrom(65535)
    assert source[1] == port  # the reply comes from gportmap's listening socket
    return data


def no_reply(sock: socket.socket, wait: float = 0.5) -> bool:
    """True when nothing arrives within ``wait`` seconds (a bounded wait for an absence)."""
    sock.settimeout(wait)
    try:
        sock.recvfrom(65535)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5.0)
    return False


def port_is_free(port: int) -> bool:
    """gportmap binds with SO_REUSEADDR; a probe without it fails while gportmap holds the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def udp_stats(gp, rule: str) -> dict:
    """The rule's ``udp`` block of the admin endpoint's /stats."""
    (found,) = [r for r in gp.admin_json("/stats")["rules"] if r["name"] == rule]
    return found["udp"]


def stop(gp) -> None:
    gp.signal(signal.SIGTERM)
    assert gp.wait_exit() == 0


# --- forwarding --------------------------------------------------------------------


def test_50_clients_x_200_datagrams_each_get_exactly_their_own_replies(start_gportmap, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, udp_echo.port, name="many")])
    socks = [client() for _ in range(50)]
    failures: list[str] = []

    def run(index: int, sock: socket.socket) -> None:
        token = os.urandom(8).hex()
        try:
            for seq in range(200):
                payload = f"{index}:{seq}:{token}".encode()
                reply = round_trip(sock, port, payload)
                if reply != payload:
                    failures.append(f"client {index} sent {payload!r}, got {reply!r}")
                    return
        except OSError as exc:
            failures.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(socks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not failures, failures[:5]
        for sock in socks:  # nothing extra: no client got a reply meant for another
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recvfrom(65535)
        clients = {f"{LOOPBACK}:{s.getsockname()[1]}" for s in socks}
    finally:
        for sock in socks:
            sock.close()
    stop(gp)
    closed = gp.events("session_closed")
    assert {r["client"] for r in closed} == clients and len(closed) == 50
    for record in closed:
        assert (record["packets_received"], record["packets_sent"]) == (200, 200)
        assert record["bytes_received"] == record["bytes_sent"]
        assert record["reason"] == "stopped" and record["target"] == f"{LOOPBACK}:{udp_echo.port}"


def test_datagram_sizes_and_boundaries_are_preserved(start_gportmap, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, udp_echo.port, name="sizes")])
    sizes = [1, 1400, 9000, 65507]
    with client() as sock:
        for size in sizes:
            payload = os.urandom(size)
            assert round_trip(sock, port, payload) == payload, size
        burst = [os.urandom(n) for n in (9000, 1, 65507, 1400)]
        for payload in burst:  # back to back: each must come back as its own datagram
            sock.sendto(payload, (LOOPBACK, port))
        assert [sock.recvfrom(65535)[0] for _ in burst] == burst
    stop(gp)
    (record,) = gp.events("session_closed")
    total = sum(sizes) + sum(map(len, burst))
    assert (record["packets_received"], record["packets_sent"]) == (8, 8)
    assert (record["bytes_received"], record["bytes_sent"]) == (total, total)


def test_ipv6_listener(start_gportmap, udp_echo):
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("::1 is not available here")
    gp = start_gportmap([{**udp_rule(port, udp_echo.port, name="v6"), "listenHost": "::1"}])
    gp.wait_event("rule_started", rule="v6", listen=f"[::1]:{port}")
    with client(family=socket.AF_INET6) as sock:
        assert round_trip(sock, port, b"over IPv6", host="::1") == b"over IPv6"
    stop(gp)
    (record,) = gp.events("session_closed")
    assert record["client"].startswith("[::1]:")


# --- session life --------------------------------------------------------------------


def test_silent_session_expires_and_releases_its_socket(start_gportmap, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, udp_echo.port, name="quiet", sessionTimeout=1)])
    base = gp.open_fds()
    with client() as sock:
        assert round_trip(sock, port, b"ping") == b"ping"
        assert gp.open_fds() == base + 1  # the session's upstream socket
        assert udp_stats(gp, "quiet")["sessions"] == 1
        (record,) = gp.wait_event("session_closed", rule="quiet")
        assert record["reason"] == "expired"
        assert record["duration"] >= 1  # never before sessionTimeout of silence
        assert (record["packets_received"], record["packets_sent"]) == (1, 1)
        wait_for(lambda: gp.open_fds() == base, what="the session's socket closed")
        assert udp_stats(gp, "quiet")["sessions"] == 0
        # The same client afterwards simply gets a new session.
        assert round_trip(sock, port, b"again") == b"again"
        assert gp.open_fds() == base + 1


@pytest.mark.slow
def test_traffic_in_either_direction_alone_keeps_a_session_alive(start_gportmap):
    """sessionTimeout 0.4 s; each stream lasts 1.5 s with a datagram every 0.05 s."""
    received: dict[tuple, int] = {}

    def stream_or_count(sock: socket.socket, data: bytes, address: tuple) -> None:
        if data == b"stream":  # one request, then a one-way stream back

            def send() -> None:
                for seq in range(30):
                    sock.sendto(b"%d" % seq, address)
                    time.sleep(0.05)  # pacing the stream, not synchronisation

            threading.Thread(target=send, daemon=True).start()
        elif data == b"count?":
            sock.sendto(b"%d" % received.get(address, 0), address)
        else:
            received[address] = received.get(address, 0) + 1

    target = UdpTarget(stream_or_count)
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, target.port, name="oneway", sessionTimeout=0.4)])
    try:
        with client() as sock:
            sock.sendto(b"stream", (LOOPBACK, port))
            got = [sock.recvfrom(100)[0] for _ in range(30)]
            assert got == [b"%d" % seq for seq in range(30)]
            (first,) = gp.wait_event("session_closed", rule="oneway")
            assert first["reason"] == "expired"
            assert (first["packets_received"], first["packets_sent"]) == (1, 30)

            for _ in range(30):  # now only the client talks
                sock.sendto(b"x", (LOOPBACK, port))
                time.sleep(0.05)
            # One upstream socket throughout: the target saw all 30 from one address.
            assert round_trip(sock, port, b"count?") == b"30"
            assert len(gp.events("session_closed")) == 1
            (_, second) = gp.wait_event("session_closed", count=2, rule="oneway")
            assert (second["packets_received"], second["packets_sent"]) == (31, 1)
    finally:
        target.close()


def test_max_sessions_drops_new_addresses_and_keeps_the_first(start_gportmap, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, udp_echo.port, name="capped", maxSessions=10)])
    first = [client() for _ in range(10)]
    extra = client()
    try:
        for i, sock in enumerate(first):
            assert round_trip(sock, port, b"hello %d" % i) == b"hello %d" % i
        for _ in range(3):
            extra.sendto(b"let me in", (LOOPBACK, port))
        assert no_reply(extra)
        dropped = gp.wait_event("datagram_dropped", rule="capped", reason="sessions")
        assert dropped[0]["client"] == f"{LOOPBACK}:{extra.getsockname()[1]}"
        assert dropped[0]["level"] == "WARNING"
        for i, sock in enumerate(first):
            assert round_trip(sock, port, b"still here %d" % i) == b"still here %d" % i
        counters = udp_stats(gp, "capped")
        assert counters["sessions"] == 10 and counters["dropped_by_reason"]["sessions"] == 3
        assert (counters["packets_received"], counters["packets_sent"]) == (23, 20)
    finally:
        for sock in [*first, extra]:
            sock.close()
    stop(gp)
    assert len(gp.events("session_closed")) == 10


def test_flood_of_source_ports_does_not_grow_memory(start_gportmap, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, udp_echo.port, name="flood", maxSessions=10)])
    fillers = [client() for _ in range(9)]
    with client() as probe:
        for sock in [probe, *fillers]:  # the table is full before the flood starts
            assert round_trip(sock, port, b"warm") == b"warm"
        before = gp.rss_kib()
        for batch in range(20):
            for _ in range(250):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.sendto(b"x" * 64, (LOOPBACK, port))
            # The listener is read in order: once the probe's reply is back, the batch was read.
            assert round_trip(probe, port, b"batch %d" % batch) == b"batch %d" % batch
        after = gp.rss_kib()
        for sock in fillers:
            sock.close()
    growth = (after - before) / 1024
    print(
        f"\nRSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB after 5,000 source ports: {growth:+.2f} MiB"
    )
    assert growth < 10, growth
    dropped = gp.wait_event("datagram_dropped", rule="flood", reason="sessions")
    assert "session table full (10 sessions)" in dropped[0]["message"]
    counters = udp_stats(gp, "flood")
    assert counters["sessions"] == 10
    # Every datagram of the flood was read and turned away (none lost unseen).
    assert counters["dropped_by_reason"]["sessions"] + counters["dropped_by_reason"]["kernel"] == 5000


def test_many_sessions_expire_and_every_descriptor_is_released(start_gportmap, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, udp_echo.port, name="churn", sessionTimeout=0.5)])
    # UDP sockets only: the admin endpoint's TCP connections come and go on their own
    # schedule, and counting every descriptor made this test race them.
    def udp_sockets() -> int:
        return len(psutil.Process(gp.pid).net_connections(kind="udp"))

    assert udp_sockets() == 1  # the listener
    socks = [client() for _ in range(100)]
    try:
        for i, sock in enumerate(socks):
            assert round_trip(sock, port, b"%d" % i) == b"%d" % i
        assert udp_stats(gp, "churn")["sessions"] == 100
        assert udp_sockets() >= 1 + 100 - len(gp.events("session_closed"))  # one socket per session
        closed = gp.wait_event("session_closed", count=100, rule="churn")
        assert {r["reason"] for r in closed} == {"expired"}
        assert min(r["duration"] for r in closed) >= 0.5  # never before sessionTimeout
        wait_for(lambda: udp_sockets() == 1, what="every session socket closed")
        assert udp_stats(gp, "churn")["sessions"] == 0
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow
def test_a_session_with_replies_keeps_living_while_silent_ones_expire(start_gportmap):
    """A target streaming to one client keeps that session; a client next to it that
    went quiet expires, on the same rule and the same sweep."""
    stop_streaming = threading.Event()

    def stream_on_request(sock: socket.socket, data: bytes, address: tuple) -> None:
        if data != b"stream":
            sock.sendto(data, address)
            return

        def send() -> None:
            seq = 0
            while not stop_streaming.is_set() and seq < 400:  # bounded: 20 s at most
                sock.sendto(b"%d" % seq, address)
                seq += 1
                stop_streaming.wait(0.05)  # pacing the stream, not synchronisation

        threading.Thread(target=send, daemon=True).start()

    target = UdpTarget(stream_on_request)
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, target.port, name="mixed", sessionTimeout=0.3)])
    try:
        with client() as streamed, client() as quiet:
            streamed.sendto(b"stream", (LOOPBACK, port))
            assert streamed.recvfrom(100)[0] == b"0"
            assert round_trip(quiet, port, b"once") == b"once"
            (closed,) = gp.wait_event("session_closed", rule="mixed")
            assert closed["client"] == f"{LOOPBACK}:{quiet.getsockname()[1]}"
            assert closed["reason"] == "expired" and closed["duration"] >= 0.3
            # Many timeouts later the streamed session is still the first one.
            got = [streamed.recvfrom(100)[0] for _ in range(30)]
            assert got == [b"%d" % seq for seq in range(1, 31)]
            assert len(gp.events("session_closed")) == 1
            assert udp_stats(gp, "mixed")["sessions"] == 1
            stop_streaming.set()
            (_, last) = gp.wait_event("session_closed", count=2, rule="mixed")
            assert last["reason"] == "expired" and last["packets_received"] == 1
            assert last["packets_sent"] >= 31
    finally:
        stop_streaming.set()
        target.close()


# --- kernel drops ----------------------------------------------------------------------


def overflowing_count(size: int = 1024) -> int:
    """Datagrams of ``size`` bytes that surely overflow a default receive buffer
    (each takes more than ``size`` of it), bounded for machines with huge defaults."""
    with open("/proc/sys/net/core/rmem_default") as setting:
        default = int(setting.read())
    return min(50_000, max(3000, 2 * default // size))


def flood_while_stopped(gp, port: int, count: int, size: int = 1024) -> None:
    """Send ``count`` datagrams while gportmap is stopped (SIGSTOP): its listener's
    receive buffer fills and the kernel drops the rest."""
    gp.signal(signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(count):
                sock.sendto(b"k" * size, (LOOPBACK, port))
    finally:
        gp.signal(signal.SIGCONT)


@pytest.mark.slow  # floods a receive buffer, then reloads
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the kernel's drop count is read on Linux only"
)
def test_kernel_drops_on_a_full_receive_buffer_are_counted_and_survive_a_handover(start_gportmap):
    sink = UdpTarget(lambda sock, data, address: None)  # no replies: only the listener can overflow
    port = free_port(socket.SOCK_DGRAM)
    rule = udp_rule(port, sink.port, name="full")
    gp = start_gportmap({"settings": {"drainTimeout": 1}, "rules": [rule]}, env={"GPORTMAP_WATCHER": "off"})
    try:
        assert udp_stats(gp, "full")["dropped_by_reason"]["kernel"] == 0
        count = overflowing_count()

        def accounted(total: int) -> dict:
            """The counters once all ``total`` datagrams are either read by gportmap
            or counted as dropped by the kernel: nothing goes missing unseen."""

            def done() -> dict | None:
                counters = udp_stats(gp, "full")
                read, kernel = counters["packets_received"], counters["dropped_by_reason"]["kernel"]
                return counters if read + kernel == total else None

            return wait_for(done, what=f"{total} datagrams read or counted as kernel drops")

        flood_while_stopped(gp, port, count)
        counters = accounted(count)
        first = counters["dropped_by_reason"]["kernel"]
        assert first > 0 and counters["dropped"] >= first
        status, body, _ = gp.admin("/metrics")
        assert status == 200
        assert f'gportmap_udp_packets_dropped_total{{reason="kernel",rule="full"}} {first}.0' in body.decode()

        # A changed rule takes the listener over: the count neither resets nor doubles...
        changed = {"settings": {"drainTimeout": 1}, "rules": [{**rule, "sessionTimeout": 5}]}
        gp.rules_path.write_text(json.dumps(changed))
        gp.signal(signal.SIGHUP)
        gp.wait_event("config_reloaded", changed=["full"])
        gp.wait_event("rule_server_retired", rule="full")  # the old server drained and folded its figures
        assert udp_stats(gp, "full")["dropped_by_reason"]["kernel"] == first
        # ... and goes on counting on the new server.
        flood_while_stopped(gp, port, count)
        assert accounted(2 * count)["dropped_by_reason"]["kernel"] > first
    finally:
        sink.close()


# --- failures, reloads, stop ---------------------------------------------------------


def test_dead_target_then_back_same_client_gets_replies(start_gportmap):
    target = UdpTarget()
    target_port = target.port
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, target_port, name="flaky")])
    with client() as sock:
        me = f"{LOOPBACK}:{sock.getsockname()[1]}"
        assert round_trip(sock, port, b"one") == b"one"
        target.close()
        for _ in range(3):
            sock.sendto(b"anyone?", (LOOPBACK, port))
            assert no_reply(sock, 0.2)
        dropped = gp.wait_event("datagram_dropped", rule="flaky", reason="error")[0]
        assert "refused" in dropped["message"]
        assert udp_stats(gp, "flaky")["dropped_by_reason"]["error"] >= 1
        target = UdpTarget(port=target_port)
        try:
            assert round_trip(sock, port, b"back") == b"back"
            with client() as other:
                assert round_trip(other, port, b"other") == b"other"
            assert gp.events("session_closed") == []  # the session lived through it
        finally:
            target.close()
    stop(gp)
    mine = [r for r in gp.events("session_closed") if r["client"] == me]
    assert [(r["packets_received"], r["packets_sent"]) for r in mine] == [(5, 2)]


def test_removed_rule_releases_its_socket_and_a_changed_one_hands_it_over(start_gportmap, tmp_path, udp_echo):
    prefixed = UdpTarget(lambda sock, data, address: sock.sendto(b"B:" + data, address))
    a, b = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    rules = {
        "settings": {"drainTimeout": 1},
        "rules": [udp_rule(a, udp_echo.port, name="a"), udp_rule(b, udp_echo.port, name="b")],
    }
    gp = start_gportmap(rules, env={"GPORTMAP_WATCHER": "off"})
    base = gp.open_fds()
    try:
        with client() as sock_a, client() as sock_b:
            assert round_trip(sock_a, a, b"to a") == b"to a"
            assert round_trip(sock_b, b, b"to b") == b"to b"
            assert gp.open_fds() == base + 2

            # b changes target: the same socket keeps serving, new datagrams go to the new target.
            rules["rules"] = [udp_rule(a, udp_echo.port, name="a"), udp_rule(b, prefixed.port, name="b")]
            gp.rules_path.write_text(json.dumps(rules))
            gp.signal(signal.SIGHUP)
            gp.wait_event("config_reloaded", changed=["b"])
            assert round_trip(sock_b, b, b"to b") == b"B:to b"
            (old,) = gp.wait_event("session_closed", rule="b")  # the old server's session, cut by the drain
            assert old["reason"] == "stopped" and old["target"] == f"{LOOPBACK}:{udp_echo.port}"

            # a is removed: its listener and its session close, the port is free again.
            rules["rules"] = rules["rules"][1:]
            gp.rules_path.write_text(json.dumps(rules))
            gp.signal(signal.SIGHUP)
            gp.wait_event("config_reloaded", removed=["a"])
            (closed,) = gp.wait_event("session_closed", rule="a")
            assert closed["reason"] == "stopped"
            wait_for(lambda: port_is_free(a), what=f"port {a} released")
            wait_for(
                lambda: gp.open_fds() == base, what="a's listener and session closed, b's new session open"
            )
            assert round_trip(sock_b, b, b"still") == b"B:still"
    finally:
        prefixed.close()
    stop(gp)


def test_sigterm_with_live_sessions_exits_0(start_gportmap, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, udp_echo.port, name="live")])
    socks = [client() for _ in range(3)]
    try:
        for sock in socks:
            assert round_trip(sock, port, b"hi") == b"hi"
        stop(gp)
    finally:
        for sock in socks:
            sock.close()
    assert [r["reason"] for r in gp.events("session_closed")] == ["stopped"] * 3
    assert gp.events("stopped")
    assert port_is_free(port)


# --- a real peer -----------------------------------------------------------------------


def dig(port: int, name: str) -> str | None:
    """The short answer (may be empty), or None when no answer came."""
    result = subprocess.run(
        [require_tool("dig"), f"@{LOOPBACK}", "-p", str(port), name, "A", "+short", "+time=1", "+tries=1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[int]:
    """dnsmasq on a loopback port, answering from a hosts file only; yields once it answers."""
    path = require_tool("dnsmasq")
    require_tool("dig")
    hosts = tmp_path / "hosts"
    hosts.write_text("10.1.2.3 gportmap-test.example\n")
    log = tmp_path / "dnsmasq.log"
    for _attempt in range(3):  # the UDP port was free; its TCP twin, which dnsmasq binds too, may not be
        port = free_port(socket.SOCK_DGRAM)
        with open(log, "wb") as output:
            proc = subprocess.Popen(
                [
                    path,
                    "--no-daemon",
                    f"--port={port}",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    f"--addn-hosts={hosts}",
                    f"--pid-file={tmp_path / 'dnsmasq.pid'}",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda proc=proc, port=port: (
                    proc.poll() is not None or dig(port, "gportmap-test.example") is not None
                ),
                what="dnsmasq answering",
            )
            if proc.poll() is None:
                yield port
                return
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)
    pytest.fail("dnsmasq did not start:\n" + log.read_text(errors="replace"))


def test_dig_through_gportmap_gets_the_same_answer_as_directly(start_gportmap, dnsmasq):
    name = "gportmap-test.example"
    direct = dig(dnsmasq, name)
    assert direct == "10.1.2.3"
    port = free_port(socket.SOCK_DGRAM)
    gp = start_gportmap([udp_rule(port, dnsmasq, name="dns")])
    assert dig(port, name) == direct
    assert dig(port, "unknown.example") == dig(dnsmasq, "unknown.example") == ""
    stop(gp)
    closed = gp.events("session_closed")
    assert len(closed) == 2 and all(r["packets_sent"] == 1 for r in closed)  # dig uses a new port per run


# --- counters, in process ----------------------------------------------------------------


class _Echo(DatagramServer):
    def handle(self, data: bytes, address: tuple) -> None:
        self.socket.sendto(data, address)


def test_rule_stats_count_sessions_packets_and_drops_by_reason():
    echo_server = _Echo(("127.0.0.1", 0))
    echo_server.start()
    port = free_port(socket.SOCK_DGRAM)
    rule = udp_rule(port, echo_server.server_port, name="u", maxSessions=2)
    supervisor = Supervisor()
    supervisor.apply(parse(json.dumps([rule]), "rules.json"))
    stats = supervisor.stats.rule("u", "udp")
    socks = [gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for sock in socks[:2]:
            sock.settimeout(5)
            sock.sendto(b"12345", (LOOPBACK, port))
            assert sock.recvfrom(100)[0] == b"12345"
        socks[2].sendto(b"no room", (LOOPBACK, port))
        with gevent.Timeout(5):
            while stats.udp_dropped["sessions"] == 0:
                gevent.sleep(0.01)
        echo_server.close()  # the target dies: ICMP port unreachable
        socks[0].sendto(b"lost", (LOOPBACK, port))
        with gevent.Timeout(5):
            while stats.udp_dropped["error"] == 0:
                gevent.sleep(0.01)
        snapshot = stats.snapshot()
        assert snapshot["connections"]["active"] == snapshot["udp"]["sessions"] == 2
        assert snapshot["connections"]["total"] == 2 and snapshot["connections"]["counts"] == "sessions"
        assert snapshot["bytes"] == {"received": 5 + 5 + 7 + 4, "sent": 10}
        assert snapshot["udp"]["packets_received"] == 4 and snapshot["udp"]["packets_sent"] == 2
        assert snapshot["udp"]["dropped_by_reason"] == {
            "sessions": 1,
            "acl": 0,
            "plugin": 0,
            "error": 1,
            "kernel": 0,
            "client_limit": 0,
        }
    finally:
        for sock in socks:
            sock.close()
        supervisor.stop(1.0)
    assert stats.udp_sessions == 0 and stats.active == 0
    assert not supervisor.runners[("udp", LOOPBACK, port)].server.sessions


def test_the_sweep_ends_exactly_the_sessions_silent_for_session_timeout():
    """The expiry rule itself, without waiting on a clock: a session past its deadline
    ends, one a second short of it stays, and the next sweep is set for that deadline."""
    echo_server = _Echo(("127.0.0.1", 0))
    echo_server.start()
    port = free_port(socket.SOCK_DGRAM)
    supervisor = Supervisor()
    supervisor.apply(
        parse(json.dumps([udp_rule(port, echo_server.server_port, name="s", sessionTimeout=30)]), "r.json")
    )
    server = supervisor.runners[("udp", LOOPBACK, port)].server
    socks = [gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for sock in socks:
            sock.settimeout(5)
            sock.sendto(b"hi", (LOOPBACK, port))
            assert sock.recvfrom(100)[0] == b"hi"
        old, young = (server.sessions[("127.0.0.1", s.getsockname()[1])] for s in socks)
        now = time.monotonic()
        old.last_active = now - 30.001
        young.last_active = now - 29
        server._sweep()
        assert old.closed and old.reason == "expired"
        assert not young.closed and list(server.sessions.values()) == [young]
        assert server._sweeper is not None and server._sweeper.active  # one timer, set for young's deadline
        assert supervisor.stats.rule("s", "udp").udp_sessions == 1
    finally:
        for sock in socks:
            sock.close()
        supervisor.stop(1.0)
        echo_server.close()
    assert server._sweeper is None and not server.sessions
