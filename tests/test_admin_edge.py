"""The admin endpoint as an edge (issue 20) that never stalls forwarding (issue 18),
and allow/deny lists at scale: gportmap as a subprocess, real sockets.

The endpoint's limits are class attributes of ``AdminServer``; the values below are
its defaults (read from it when this code has them, so that the same tests can run
against an older gportmap to show what they catch)."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    LOOPBACK,
    TargetServer,
    closed_by_peer,
    connect,
    echo_handler,
    free_port,
    tcp_rule,
    wait_for,
)

try:
    from gportmap.admin.http import AdminServer
except ImportError:  # pragma: no cover
    AdminServer = None  # type: ignore[assignment,misc]

MAX_CONNECTIONS = getattr(AdminServer, "max_connections", 32)
HEADER_TIMEOUT = getattr(AdminServer, "header_timeout", 10.0)
IDLE_TIMEOUT = getattr(AdminServer, "idle_timeout", 30.0)
AUTH_BURST = getattr(AdminServer, "auth_burst", 3)
AUTH_REFILL = getattr(AdminServer, "auth_refill", 1.0)
AUTH_MAX_DELAY = getattr(AdminServer, "auth_max_delay", 5.0)
TOKEN = "s3cret-admin-token"
WRONG = "guess-7Qx9"


def request(port: int, path: str, token: str | None = None, source: str = LOOPBACK) -> tuple[int, dict, bytes]:
    """One GET from ``source`` (another loopback address is another client)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=20, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def admin_figures(port: int, token: str | None = None) -> dict:
    """``/stats``' ``admin``; retried while the endpoint still holds connections that
    a test closed a moment ago (it refuses past its cap until it sees them go)."""

    def read() -> dict | None:
        try:
            status, _, body = request(port, "/stats", token)
        except OSError:
            return None
        assert status == 200, body
        return json.loads(body)["admin"]

    return wait_for(read, what="/stats answered")


def round_trip(sock: socket.socket) -> float:
    started = time.perf_counter()
    sock.sendall(b"ping")
    got = b""
    while len(got) < 4:
        chunk = sock.recv(4 - len(got))
        assert chunk, "the probe's connection closed"
        got += chunk
    return time.perf_counter() - started


@pytest.fixture
def echo() -> TargetServer:
    target = TargetServer(echo_handler)
    yield target
    target.close()


def test_connections_past_the_cap_are_closed_at_once_and_forwarding_goes_on(start_gportmap, echo):
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo.port, name="fwd")]})
    held = [connect(gp.admin_port) for _ in range(MAX_CONNECTIONS)]
    try:
        # Every held connection is accepted (a request on one is answered) ...
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(100).startswith(b"HTTP/1.1 200")
        # ... and the next ones are closed as soon as they are accepted.
        extra = [connect(gp.admin_port) for _ in range(5)]
        assert all(closed_by_peer(sock, timeout=5) for sock in extra)
        with connect(port) as client:  # forwarding has its descriptors
            assert round_trip(client) >= 0
        for sock in extra:
            sock.close()
    finally:
        for sock in held:
            sock.close()
    figures = wait_for(lambda: (f := admin_figures(gp.admin_port))["refused"] >= 5 and f, what="refusals counted")
    assert figures["max_connections"] == MAX_CONNECTIONS  # refused: 5, and any /stats retried above
    assert gp.wait_event("admin_busy")[0]["max_connections"] == MAX_CONNECTIONS


@pytest.mark.slow  # more than 2 s
def test_admin_connections_never_take_the_descriptors_forwarding_needs(start_gportmap, echo, lowered_ulimit):
    """Under ``ulimit -n 256``: 400 idle admin connections (before: each one a
    descriptor until "Too many open files") leave every connection forwarding may
    hold (its cap, derived from the limit) served."""
    port = free_port()
    with lowered_ulimit(256, own=2000):
        gp = start_gportmap({"rules": [tcp_rule(port, echo.port, name="fwd")]})
    cap = gp.wait_event("connections_capped")[0]["limit"]
    idle = [connect(gp.admin_port) for _ in range(400)]
    held: list[socket.socket] = []
    try:
        for i in range(cap):
            sock = connect(port)
            sock.sendall(b"%04d" % i)
            sock.settimeout(10)
            assert sock.recv(4) == b"%04d" % i, f"connection {i} of {cap} not served"
            held.append(sock)
        assert not gp.events("internal_error")
        assert gp.open_fds() <= 256
    finally:
        for sock in (*held, *idle):
            sock.close()
    assert admin_figures(gp.admin_port)["refused"] >= 400 - MAX_CONNECTIONS


@pytest.mark.slow  # more than 2 s
def test_slow_heads_and_idle_keepalive_are_cut_at_their_deadlines(start_gportmap):
    gp = start_gportmap({"rules": []})
    keepalive = connect(gp.admin_port)
    keepalive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert keepalive.recv(200).startswith(b"HTTP/1.1 200")
    slow = [connect(gp.admin_port) for _ in range(5)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(b"GET /stats HTTP/1.1\r\n")
    # A byte a second keeps every recv busy, never the head complete (slowloris).
    deadline = started + HEADER_TIMEOUT + 15
    open_ = list(slow)
    while open_ and time.monotonic() < deadline:
        for sock in list(open_):
            try:
                sock.sendall(b"X")
            except OSError:
                open_.remove(sock)
                continue
            if closed_by_peer(sock, timeout=0.01):
                open_.remove(sock)
        time.sleep(0.2)
    cut_after = time.monotonic() - started
    assert not open_, f"{len(open_)} slow heads still open after {cut_after:.1f}s"
    assert cut_after >= HEADER_TIMEOUT - 1
    # The keep-alive connection, silent since its answer, goes at idle_timeout.
    assert closed_by_peer(keepalive, timeout=IDLE_TIMEOUT + 10)
    figures = admin_figures(gp.admin_port)
    assert figures["cut"]["header_timeout"] == 5
    assert figures["cut"]["idle_timeout"] == 1
    assert gp.wait_event("admin_cut", reason="header_timeout")
    for sock in (*slow, keepalive):
        sock.close()


def test_an_oversized_head_is_refused(start_gportmap):
    gp = start_gportmap({"rules": []})
    with connect(gp.admin_port) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 8000 + b"\r\n")
        for _ in range(20):  # 160 KB of headers, each line within pywsgi's own limit
            sock.sendall(b"X-More: " + b"b" * 8000 + b"\r\n")
        sock.sendall(b"\r\n")
        answer = sock.recv(100)
        assert answer.startswith(b"HTTP/1.1 400"), answer
    assert admin_figures(gp.admin_port)["cut"]["head_too_large"] == 1


@pytest.mark.slow  # more than 2 s
def test_wrong_tokens_are_logged_once_per_interval_and_slowed_per_client(start_gportmap):
    """No token is no guess: 401 at once, unlogged. Wrong tokens: AUTH_BURST answered
    at once, the next one later; a client that keeps guessing in parallel is locked
    (429 for the right token too) while another address is served as usual."""
    gp = start_gportmap({"settings": {"admin": {"token": TOKEN}}, "rules": []})
    port = gp.admin_port
    assert [request(port, "/stats")[0] for _ in range(5)] == [401] * 5
    assert [request(port, "/stats", WRONG)[0] for _ in range(AUTH_BURST)] == [401] * AUTH_BURST
    started = time.monotonic()
    assert request(port, "/stats", WRONG)[0] == 401  # one more in a row: answered later
    assert time.monotonic() - started >= AUTH_REFILL / 2
    stop = threading.Event()
    answers: list[int] = []

    def guess() -> None:  # bounded: stopped once the checks below are done
        for _ in range(500):
            if stop.is_set():
                return
            answers.append(request(port, "/stats", WRONG)[0])

    guessers = [threading.Thread(target=guess, daemon=True) for _ in range(8)]
    for thread in guessers:
        thread.start()
    try:
        wait_for(lambda: answers.count(429) >= 5, timeout=30, what="the guesser locked out")
        own = [request(port, "/stats", TOKEN) for _ in range(5)]
        assert 429 in [status for status, _, _ in own], "the right token is refused too while locked"
        assert all(int(headers["Retry-After"]) >= 1 for status, headers, _ in own if status == 429)
        # Another client address is not slowed: its wrong token is a 401, its right one works.
        assert request(port, "/stats", WRONG, source="127.0.0.2")[0] == 401
        status, _, body = request(port, "/stats", TOKEN, source="127.0.0.2")
        assert status == 200
    finally:
        stop.set()
        for thread in guessers:
            thread.join(60)
    figures = json.loads(body)["admin"]
    assert figures["auth_failures"] >= AUTH_BURST + 2 and figures["auth_throttled"] >= 5
    # One record per client address so far: its first wrong token, at once; the rest
    # are counted into its next record (one per interval).
    records = gp.wait_event("admin_auth_failed", count=2)
    assert sorted(record["client"] for record in records) == ["127.0.0.1", "127.0.0.2"]
    assert all(record["failures"] == 1 for record in records)
    log = gp.log_path.read_text()
    assert TOKEN not in log
    assert WRONG not in log
    # The debt is paid back over time: the right token is served again.
    wait_for(lambda: request(port, "/stats", TOKEN)[0] == 200, timeout=AUTH_MAX_DELAY + 20, what="served again")


@pytest.mark.slow  # more than 2 s
def test_metrics_under_load_do_not_stall_forwarding(start_gportmap, echo):
    """Ten clients scrape /metrics in a loop on 300 rules while a probe's round trip
    through a rule is timed; against the same probe without the load. Before,
    each rendering ran on the hub and the probe waited for seconds."""
    ports = [free_port() for _ in range(300)]
    gp = start_gportmap({"rules": [tcp_rule(p, echo.port, name=f"r{i}") for i, p in enumerate(ports)]})
    probe = connect(ports[0], timeout=60)

    def probe_median(count: int = 40) -> float:
        times = []
        for _ in range(count):
            times.append(round_trip(probe))
            time.sleep(0.01)
        return statistics.median(times)

    idle = probe_median()
    stop = threading.Event()
    scrapes = [0]

    def scrape() -> None:
        conn = http.client.HTTPConnection(LOOPBACK, gp.admin_port, timeout=60)
        for _ in range(200):  # bounded; stopped as soon as the probe is done
            if stop.is_set():
                break
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            scrapes[0] += 1
        conn.close()

    threads = [threading.Thread(target=scrape, daemon=True) for _ in range(10)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: scrapes[0] >= 2, timeout=60, what="the scrapers got going")
        loaded = probe_median()
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    probe.close()
    assert scrapes[0] >= 2
    # Generous: the load may cost the probe something (the interpreter is shared with
    # the thread that formats), never a multiple of a rendering.
    assert loaded < max(idle, 0.0005) * 100, f"probe median {loaded * 1000:.2f} ms loaded, {idle * 1000:.2f} ms idle"


def _deny_rules(port: int, target: int, deny: list) -> dict:
    return {"rules": [tcp_rule(port, target, name="edge", deny=deny)]}


def _big_deny_list() -> list[str]:
    """100,000 networks, none of them loopback, and 127.0.0.2 at the end."""
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(99_999)] + ["127.0.0.2/32"]


@pytest.mark.slow  # more than 2 s
def test_a_bad_entry_in_a_100k_list_gets_a_clipped_error(tmp_path: Path):
    cases = {
        "entry": lambda deny: deny[:50_000] + ["not-an-address"] + deny[50_000:],
        "type": lambda deny: {"networks": deny},  # an object, not a list: the value is 2 MB
        "nested": lambda deny: [deny],
    }
    for name, make in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_deny_rules(20000, 20001, make(_big_deny_list()))))
        done = subprocess.run(
            [sys.executable, "-m", "gportmap", str(path), "--check"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, (name, done.stdout[-500:], done.stderr[-500:])
        output = done.stdout + done.stderr
        errors = [line for line in output.splitlines() if str(path) in line]
        assert errors, (name, output[-1000:])
        assert len(output) < 5000, (name, len(output))
        assert all(len(line) <= 1000 for line in errors)
        assert "rules[0].deny" in errors[0]
        if name == "entry":
            assert "rules[0].deny[50000]" in errors[0] and "not-an-address" in errors[0]


@pytest.mark.slow  # more than 2 s
def test_a_100k_deny_list_under_a_flood_keeps_serving_an_allowed_client(start_gportmap, echo):
    port = free_port()
    gp = start_gportmap(_deny_rules(port, echo.port, _big_deny_list()))
    flood_count = 2000
    done = threading.Event()
    closed = [0]

    def flood() -> None:  # a denied client (127.0.0.2) connecting as fast as it can
        for _ in range(flood_count):
            with socket.socket() as sock:
                sock.settimeout(10)
                sock.bind(("127.0.0.2", 0))
                sock.connect((LOOPBACK, port))
                if sock.recv(1) == b"":
                    closed[0] += 1
        done.set()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    served = 0
    with connect(port, timeout=30) as client:
        while not done.is_set() and served < 100_000:
            round_trip(client)
            served += 1
    thread.join(60)
    assert closed[0] == flood_count
    assert served > 0
    stats = wait_for(
        lambda: (s := next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == "edge"))[
            "connections"
        ]["rejected_by_reason"]["acl"]
        >= flood_count
        and s,
        what="the flood counted",
    )
    assert stats["connections"]["rejected_by_reason"]["acl"] == flood_count
    assert stats["connections"]["total"] == 1


def test_the_admin_cap_fits_in_the_descriptors_kept_out_of_the_connection_budget():
    """The connection budget derived from ``ulimit -n`` leaves FD_RESERVE descriptors
    for everything else, the admin endpoint's connections included."""
    from gportmap.stats import FD_RESERVE

    assert MAX_CONNECTIONS <= FD_RESERVE // 2
