"""Network faults on rules (SPEC §12), each measured on real traffic through
gportmap run as a subprocess: latency on round trips, bandwidth over seconds,
limit_data's exact byte count, reset_peer's RST, slicer's pieces, timeout's
hold and close, toxicity's share of connections; a rule without faults keeps
splice; a change of faults alone keeps the rule's connections.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    LOOPBACK,
    ROOT,
    TargetServer,
    connect,
    free_port,
    metric,
    recv_exactly,
    recv_until_eof,
    require_tool,
    rule_stats,
    tcp_rule,
    wait_for,
)
from test_udp import UdpTarget, udp_rule
from test_websocket import frame, handshake, read_frame, ws_rule

from gportmap.config.faults import Fault, FaultType, Stream
from gportmap.engine.faults import FaultBoard, FaultSession, TokenBucket


def fault(kind: str, stream: str = "downstream", toxicity: float = 1.0, **attributes: int) -> dict:
    return {"type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes}


def source_handler(size: int):
    """A target that answers any first bytes with ``size`` bytes, then ends."""

    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        payload = bytes(range(256)) * (size // 256 + 1)
        try:
            conn.sendall(payload[:size])
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        except OSError:
            pass

    return handle


def round_trip(port: int, payload: bytes = b"ping") -> float:
    with connect(port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        return time.monotonic() - started


@pytest.mark.slow  # waits out injected latency
def test_latency_delays_each_round_trip(start_gportmap, echo_target) -> None:
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="slow", faults=[fault("latency", latency=200, jitter=20)])])
    times = [round_trip(port) for _ in range(5)]
    assert min(times) >= 0.18  # 200 ms less at most the 20 ms jitter
    assert max(times) < 2.0  # generous: shared cores
    assert metric(gp, "gportmap_faults_applied_total", rule="slow", type="latency") >= 5
    assert rule_stats(gp, "slow")["faults"] == [
        {"name": "latency_downstream", "type": "latency", "stream": "downstream", "toxicity": 1.0,
         "attributes": {"latency": 200, "jitter": 20}}
    ]


@pytest.mark.slow  # waits out injected latency
def test_latency_is_a_pipeline_not_a_throttle(start_gportmap) -> None:
    """Each chunk is delayed from the moment it was read, while the next ones are
    read on (as Toxiproxy's latency): 4 MB behind 200 ms arrive in about 200 ms
    more than they take, where one chunk after another would take 64 x 200 ms."""
    size = 4 << 20
    target = TargetServer(source_handler(size))
    port = free_port()
    try:
        start_gportmap([tcp_rule(port, target.port, name="pipe", faults=[fault("latency", latency=200)])])
        with connect(port, timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(b"go")
            data = recv_until_eof(sock)
            elapsed = time.monotonic() - started
        assert len(data) == size and data[:256] == bytes(range(256))
        assert 0.19 <= elapsed < 4.0, elapsed
    finally:
        target.close()


def test_upstream_latency_and_no_fault_direction(start_gportmap, echo_target) -> None:
    port, plain = free_port(), free_port()
    start_gportmap([
        tcp_rule(port, echo_target.port, name="up", faults=[fault("latency", "upstream", latency=200)]),
        tcp_rule(plain, echo_target.port, name="plain"),
    ])
    assert round_trip(port) >= 0.19
    assert min(round_trip(plain) for _ in range(3)) < 0.19  # the quickest: the machine may be busy


@pytest.mark.slow  # over 2 s
def test_bandwidth_holds_the_rate_within_five_percent(start_gportmap) -> None:
    size = 500_000  # 5 s at 100 KB/s
    target = TargetServer(source_handler(size))
    port = free_port()
    try:
        start_gportmap([tcp_rule(port, target.port, name="thin", faults=[fault("bandwidth", rate=100)])])
        with connect(port, timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(b"go")
            data = recv_until_eof(sock)
            elapsed = time.monotonic() - started
        assert len(data) == size
        rate = len(data) / elapsed / 1000
        assert 95 <= rate <= 105, rate
    finally:
        target.close()


def test_limit_data_closes_after_exactly_n_bytes(start_gportmap) -> None:
    target = TargetServer(source_handler(100_000))
    port = free_port()
    try:
        gp = start_gportmap([tcp_rule(port, target.port, name="cut", faults=[fault("limit_data", bytes=12345)])])
        for _ in range(3):
            with connect(port) as sock:
                sock.sendall(b"go")
                assert len(recv_until_eof(sock)) == 12345
        closed = gp.wait_event("connection_closed", rule="cut", reason="fault")
        assert closed[0]["error"] == "fault limit_data"
    finally:
        target.close()


def test_reset_peer_is_seen_as_econnreset(start_gportmap, echo_target) -> None:
    port = free_port()
    start_gportmap([tcp_rule(port, echo_target.port, name="rst", faults=[fault("reset_peer", timeout=100)])])
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"ping")
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
        assert time.monotonic() - started >= 0.09


def test_slicer_cuts_writes_into_pieces(start_gportmap) -> None:
    target = TargetServer(source_handler(2000))
    port = free_port()
    try:
        start_gportmap([
            tcp_rule(port, target.port, name="sliced",
                     faults=[fault("slicer", average_size=100, size_variation=20, delay=20000)])
        ])
        with connect(port) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"go")
            sizes = []
            while chunk := sock.recv(65536):
                sizes.append(len(chunk))
        assert sum(sizes) == 2000
        # A 20 ms gap between writes: a read sees one piece of 80 to 120 bytes, or
        # now and then two when this process was late (2 shared cores).
        assert len(sizes) >= 12, sizes  # unsliced: one read or two
        assert sum(size <= 120 for size in sizes) >= 0.75 * len(sizes), sizes
    finally:
        target.close()


def test_timeout_holds_data_then_closes(start_gportmap, echo_target) -> None:
    port = free_port()
    start_gportmap([tcp_rule(port, echo_target.port, name="stall", faults=[fault("timeout", timeout=400)])])
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"ping")
        assert recv_until_eof(sock) == b""  # nothing comes back, then the end
        assert time.monotonic() - started >= 0.38


def test_slow_close_delays_the_end(start_gportmap, echo_target) -> None:
    port = free_port()
    start_gportmap([tcp_rule(port, echo_target.port, name="lazy", faults=[fault("slow_close", delay=300)])])
    with connect(port) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        started = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
        assert time.monotonic() - started >= 0.28


@pytest.mark.slow  # a statistical sample of connections
def test_toxicity_affects_about_half_of_the_connections(start_gportmap, echo_target) -> None:
    """limit_data 0 upstream with toxicity 0.5: an affected connection is closed at
    its first byte, the others echo. Binomial(200, 0.5): 100 ± 32 is 4.5 sd."""
    port = free_port()
    start_gportmap([
        tcp_rule(port, echo_target.port, name="half", faults=[fault("limit_data", "upstream", 0.5, bytes=0)])
    ])
    cut = 0
    for _ in range(200):
        with connect(port) as sock:
            sock.sendall(b"x")
            cut += sock.recv(1) == b""
    assert 68 <= cut <= 132, cut


def test_toxicity_is_decided_once_per_connection_with_a_seeded_rng() -> None:
    board = FaultBoard()
    half = Fault(FaultType.LATENCY, Stream.DOWNSTREAM, 0.5, latency=10)

    class Named:
        name, faults = "r", (half,)

    board.publish([Named])
    sessions = [FaultSession(board, "r", rng=random.Random(seed)) for seed in range(200)]
    first = [bool(s.active(Stream.DOWNSTREAM)) for s in sessions]
    again = [bool(s.active(Stream.DOWNSTREAM)) for s in sessions]
    assert first == again  # once per connection
    expected = [random.Random(seed).random() < 0.5 for seed in range(200)]
    assert first == expected


def test_token_bucket_paces_at_its_rate() -> None:
    bucket = TokenBucket(1000.0, now=0.0)
    assert bucket.wait(100, 0.0) == pytest.approx(0.1)  # starts empty
    assert bucket.wait(100, 0.2) == pytest.approx(0.0)  # 0.1 s refilled 100 tokens, the cap
    assert bucket.wait(1000, 0.2) == pytest.approx(1.0)


def _pipes(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return count


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux only")
def test_a_rule_without_faults_keeps_splice(start_gportmap, echo_target) -> None:
    """With splice from the first byte, an open connection of the rule without faults
    holds a splice pipe; one of the rule with faults (the greenlet relay) holds none."""
    plain, faulty = free_port(), free_port()
    gp = start_gportmap(
        [
            tcp_rule(plain, echo_target.port, name="plain"),
            tcp_rule(faulty, echo_target.port, name="faulty", faults=[fault("latency", latency=1)]),
        ],
        env={"GPORTMAP_RELAY": "splice"},
    )
    if "splice" not in gp.events("started")[0]["features"]:
        pytest.skip("splice is not available here")
    base = _pipes(gp.pid)
    with connect(faulty) as sock:
        sock.sendall(b"x" * 1000)
        assert recv_exactly(sock, 1000) == b"x" * 1000
        assert _pipes(gp.pid) == base
    with connect(plain) as sock:
        sock.sendall(b"x" * 1000)
        assert recv_exactly(sock, 1000) == b"x" * 1000
        assert _pipes(gp.pid) > base


@pytest.mark.slow  # over 2 s
def test_a_change_of_faults_alone_keeps_connections(start_gportmap, echo_target) -> None:
    port = free_port()
    rules = [tcp_rule(port, echo_target.port, name="live", faults=[fault("latency", latency=1)])]
    gp = start_gportmap({"settings": {"drainTimeout": 0.5}, "rules": rules})
    held = connect(port)
    held.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        held.sendall(b"a")
        assert recv_exactly(held, 1) == b"a"
        rules[0]["faults"] = [fault("latency", latency=300)]
        gp.rules_path.write_text(json.dumps({"settings": {"drainTimeout": 0.5}, "rules": rules}))
        reloaded = gp.wait_event("config_reloaded", timeout=15)[-1]
        assert "live" in reloaded["unchanged"]
        wait_for(lambda: rule_stats(gp, "live")["faults"][0]["attributes"]["latency"] == 300)
        started = time.monotonic()
        held.sendall(b"b")
        assert recv_exactly(held, 1) == b"b"  # the old connection still works ...
        assert time.monotonic() - started >= 0.28  # ... and its new data gets the new faults
        assert round_trip(port) >= 0.28  # as new connections do
        wait_for(lambda: time.monotonic() - started > 1.0, timeout=5)  # past drainTimeout
        held.sendall(b"c")
        assert recv_exactly(held, 1) == b"c"
    finally:
        held.close()


def test_faults_are_checked_with_clear_errors(tmp_path) -> None:
    rules = [
        tcp_rule(free_port(), 9, faults=[fault("loss", probability=0.2), fault("slicer", average_size=10, size=3)]),
        {"protocol": "udp", "listenPort": free_port(), "targetHost": LOOPBACK, "targetPort": 9,
         "faults": [fault("loss", probability=1.5)]},
    ]
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    done = subprocess.run(
        [sys.executable, "-m", "gportmap", "--check", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "rules[0].faults[0].type: 'loss' does not apply to tcp rules" in out
    assert "rules[0].faults[1].attributes.size: slicer takes no attribute 'size'" in out
    assert "rules[1].faults[0].attributes.probability: 1.5 is not a probability between 0 and 1" in out


@pytest.mark.slow  # over 2 s
def test_held_data_is_bounded_under_latency(start_gportmap) -> None:
    """A fast sender behind a latency fault: gportmap holds one read per direction,
    the kernel's buffers push back (its memory does not grow with what is sent)."""
    stop = threading.Event()

    def sink(conn: socket.socket) -> None:
        while not stop.is_set() and conn.recv(65536):
            pass

    target = TargetServer(sink)
    port = free_port()
    try:
        gp = start_gportmap([tcp_rule(port, target.port, name="slowup", faults=[fault("latency", "upstream", latency=500)])])
        before = gp.rss_kib()
        with connect(port) as sock:
            sock.setblocking(False)
            sent, deadline = 0, time.monotonic() + 2
            while time.monotonic() < deadline and sent < 64 << 20:
                try:
                    sent += sock.send(b"\0" * 65536)
                except BlockingIOError:
                    time.sleep(0.01)
            assert gp.rss_kib() - before < 16 * 1024  # far less than what a queue would hold
    finally:
        stop.set()
        target.close()


# -- udp rules -------------------------------------------------------------------------


class Counter:
    """A UDP target that counts what it receives (and answers nothing)."""

    def __init__(self) -> None:
        self.seen = 0
        self.lock = threading.Lock()

    def __call__(self, sock: socket.socket, data: bytes, address: tuple) -> None:
        with self.lock:
            self.seen += 1


@pytest.mark.slow  # over 2 s
def test_udp_loss_drops_about_its_share_of_10000_datagrams(start_gportmap) -> None:
    """loss 0.3 upstream on 10,000 datagrams: Binomial(10000, 0.7) arrive, 7000 ±
    206 (4.5 sd). Sent in batches that wait for the target, so that no socket
    buffer drops any (what gportmap dropped on purpose it counts, and the two add up)."""
    counter = Counter()
    target = UdpTarget(counter)
    port = free_port()
    try:
        gp = start_gportmap([udp_rule(port, target.port, name="lossy", faults=[fault("loss", "upstream", probability=0.3)])])
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for batch in range(50):
                for _ in range(200):
                    client.sendto(b"d", (LOOPBACK, port))
                sent = (batch + 1) * 200
                wait_for(
                    lambda sent=sent: counter.seen + (metric(gp, "gportmap_faults_applied_total", rule="lossy", type="loss") or 0)
                    >= sent,
                    timeout=20,
                )
        finally:
            client.close()
        lost = metric(gp, "gportmap_faults_applied_total", rule="lossy", type="loss")
        assert counter.seen + lost == 10000
        assert 6794 <= counter.seen <= 7206, counter.seen
    finally:
        target.close()


def test_udp_latency_and_duplicate(start_gportmap) -> None:
    target = UdpTarget()  # echoes
    port = free_port()
    try:
        start_gportmap([
            udp_rule(port, target.port, name="udpslow",
                     faults=[fault("latency", latency=200), fault("duplicate", probability=1.0)])
        ])
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(5)
        try:
            started = time.monotonic()
            client.sendto(b"one", (LOOPBACK, port))
            assert client.recv(100) == b"one"
            assert time.monotonic() - started >= 0.19
            assert client.recv(100) == b"one"  # the duplicate
        finally:
            client.close()
    finally:
        target.close()


# -- websocket rules: faults on the payload stream --------------------------------------


def test_websocket_latency_and_limit_data_on_the_payload(start_gportmap, echo_target) -> None:
    slow, cut = free_port(), free_port()
    start_gportmap([
        ws_rule(slow, echo_target.port, name="wsslow", faults=[fault("latency", latency=200)]),
        ws_rule(cut, echo_target.port, name="wscut", faults=[fault("limit_data", bytes=3)]),
    ])
    sock, head = handshake(slow)
    with sock:
        assert head.startswith(b"HTTP/1.1 101")
        started = time.monotonic()
        sock.sendall(frame(0x2, b"ping"))
        assert read_frame(sock) == (0x2, b"ping")
        assert time.monotonic() - started >= 0.19
    sock, head = handshake(cut)
    with sock:
        assert head.startswith(b"HTTP/1.1 101")
        sock.sendall(frame(0x2, b"hello"))
        assert read_frame(sock) == (0x2, b"hel")  # 3 bytes of the echo come back ...
        opcode, payload = read_frame(sock)
        assert opcode == 0x8 and payload.endswith(b"fault limit_data")  # ... then a Close


def test_a_tunnel_entry_applies_its_faults(start_gportmap, echo_target) -> None:
    exit_port, entry = free_port(), free_port()
    start_gportmap([
        ws_rule(exit_port, echo_target.port, name="exit"),
        tcp_rule(entry, exit_port, name="entry", targetProtocol="websocket", faults=[fault("latency", latency=200)]),
    ])
    assert round_trip(entry) >= 0.19
    assert round_trip(entry) < 2.0


@pytest.mark.slow  # a browser
def test_the_dashboard_lists_a_rules_faults(start_gportmap, echo_target, tmp_path) -> None:
    from cdp import Chromium

    chromium = Chromium(require_tool("chromium"), tmp_path / "profile")
    gp = start_gportmap([
        tcp_rule(free_port(), echo_target.port, name="web",
                 faults=[fault("latency", latency=100), fault("limit_data", "upstream", 0.25, bytes=10)]),
        tcp_rule(free_port(), echo_target.port, name="plain"),
    ])
    text = "document.querySelector('tr[data-rule=\"{}\"]')?.textContent"
    try:
        chromium.navigate(f"http://{LOOPBACK}:{gp.admin_port}/")
        wait_for(lambda: chromium.evaluate(text.format("web")), timeout=15, what="the page to render")
        assert "faults: latency downstream, limit_data upstream 25%" in chromium.evaluate(text.format("web"))
        assert "faults" not in chromium.evaluate(text.format("plain"))
    finally:
        chromium.close()


def test_faults_and_toxiproxy_settings_load_into_the_model(tmp_path) -> None:
    from gportmap.config import parse
    from gportmap.config.faults import ToxiproxySettings
    from gportmap.errors import ConfigError

    document = {
        "settings": {"toxiproxy": {"listen": "127.0.0.1:18474"}},
        "rules": [tcp_rule(1234, 9, faults=[fault("slicer", "upstream", 0.5, average_size=10, delay=5)])],
    }
    config = parse(json.dumps(document), tmp_path / "rules.json")
    assert config.settings.toxiproxy == ToxiproxySettings("127.0.0.1", 18474)
    (only,) = config.rules[0].faults
    assert only == Fault(FaultType.SLICER, Stream.UPSTREAM, 0.5, average_size=10, delay=5)
    assert only.name == "slicer_upstream"
    assert only.describe()["attributes"] == {"average_size": 10, "size_variation": 0, "delay": 5}
    # a change of faults alone leaves the rule equal: its server and connections stay
    assert config.rules[0] == parse(json.dumps({**document, "rules": [tcp_rule(1234, 9)]}), tmp_path / "r.json").rules[0]
    assert parse(json.dumps({"rules": []}), tmp_path / "rules.json").settings.toxiproxy is None
    with pytest.raises(ConfigError) as error:
        parse(json.dumps({"settings": {"toxiproxy": True}, "rules": []}), tmp_path / "rules.json")
    assert 'settings.toxiproxy: true is not allowed' in str(error.value.errors)
