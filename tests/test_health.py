"""Active health checks (SPEC §8 ``healthCheck``, issue 17): gportmap as a
subprocess probing real targets on 127.0.0.1 that are dead, alive, or alive but
broken (a wrong HTTP status, a wrong banner, a wrong certificate); and the
prober's bound on probes in flight, held against a target that counts the probes
it has open at once. With ``--workers 2``: one prober, the master's, whose verdicts
every worker follows (from its start, and across reloads)."""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import gevent
import pytest
from certs import CA
from conftest import LOOPBACK, free_port, metric, recv_exactly, targets_of, wait_for, wait_on_hub

from gportmap.config.model import CheckType, HealthCheck, Rule, Target
from gportmap.engine.pool import TargetPool
from gportmap.runtime.health import HealthProber
from gportmap.stats import RuleStats

#: Checks fast enough for a test; ``timeout`` below ``interval`` as the config demands.
FAST = {"interval": 0.3, "timeout": 0.25, "rise": 2, "fall": 3}


class Peer:
    """A TCP target on 127.0.0.1 running ``handler(conn)`` per connection in a
    thread; it can be killed (its port then refuses) and revived on the same port.
    It keeps the first line of every request it reads (``requests``)."""

    def __init__(self, handler: Callable[[Peer, socket.socket], None], tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.port = 0
        self.sock: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self.sock = sock
        threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.handler(self, conn)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()
            with self.lock:
                if conn in self.conns:
                    self.conns.remove(conn)

    def read_line(self, conn: socket.socket) -> bytes:
        line = b""
        while not line.endswith(b"\n") and len(line) < 4096:
            chunk = conn.recv(1)
            if not chunk:
                break
            line += chunk
        with self.lock:
            self.requests.append(line)
        return line

    def kill(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def target(self, name: str) -> dict:
        return {"host": LOOPBACK, "port": self.port, "name": name}


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.kill()


def ident(name: str) -> Callable[[Peer, socket.socket], None]:
    """Sends its name and a newline, then echoes."""

    def handler(peer: Peer, conn: socket.socket) -> None:
        conn.sendall(name.encode() + b"\n")
        while data := conn.recv(65536):
            conn.sendall(data)

    return handler


def http_status(status: int) -> Callable[[Peer, socket.socket], None]:
    """Answers every request with ``status``."""

    def handler(peer: Peer, conn: socket.socket) -> None:
        peer.read_line(conn)
        conn.sendall(f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())

    return handler


def pool_rule(port: int, targets: list[dict], check: dict, **extra: object) -> dict:
    return {"name": "pool", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port, "targets": targets,
            "healthCheck": check, **extra}


def reach(port: int) -> str:
    """Connect through gportmap and return the name the target sent."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        name = b""
        while not name.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk, f"closed by gportmap after {name!r}"
            name += chunk
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        return name.decode().strip()


def checked(gp, *names: str) -> bool:
    """Each named target has been checked at least once (``last_check`` set)."""
    targets = targets_of(gp)
    return all(targets[name]["last_check"] is not None for name in names)


# -- a target killed and revived ------------------------------------------------------


@pytest.mark.slow  # waits out fall and rise rounds
def test_a_killed_target_goes_down_by_its_checks_and_comes_back_after_rise(start_gportmap, peers):
    a, b = Peer(ident("a")), Peer(ident("b"))
    peers += [a, b]
    port = free_port()
    gp = start_gportmap([pool_rule(port, [a.target("a"), b.target("b")], {"type": "tcp", **FAST})])
    wait_for(lambda: checked(gp, "a", "b"), what="a first check of both targets")
    assert metric(gp, "gportmap_target_up", rule="pool", target="b") == 1.0

    b.kill()  # no client connects meanwhile: only the checks can see it
    fall_time = FAST["fall"] * FAST["interval"]
    wait_for(lambda: metric(gp, "gportmap_target_up", rule="pool", target="b") == 0.0, timeout=fall_time + 5,
             interval=0.05, what="b down by its checks")
    down = gp.wait_event("target_down", target="b")[0]
    assert down["rule"] == "pool"
    assert "health checks failed" in down["reason"] and "refused" in down["reason"], down
    assert targets_of(gp)["b"]["connect_failures"] == 0  # not passive health: no client tried it
    assert {reach(port) for _ in range(8)} == {"a"}
    assert metric(gp, "gportmap_target_up", rule="pool", target="a") == 1.0
    assert not gp.events("target_down") or all(e["target"] == "b" for e in gp.events("target_down"))

    b.start()  # revived on the same port
    gp.wait_event("target_up", target="b", timeout=FAST["rise"] * FAST["interval"] + 5)
    assert metric(gp, "gportmap_target_up", rule="pool", target="b") == 1.0
    assert "b" in {reach(port) for _ in range(8)}  # back in rotation


def test_a_target_comes_up_only_after_rise_checks_in_a_row(start_gportmap, peers):
    """Down, then revived: ``target_up`` comes with the ``rise``-th passing check,
    not the first. Only the prober connects to b, and b notes when: by the time of
    the record, at least rise - 1 probes had reached it a good while before (the
    rise-th may be noted a hair after the record, hence the margin)."""
    a = Peer(ident("a"))
    seen: list[float] = []

    def noting(peer: Peer, conn: socket.socket) -> None:
        seen.append(time.time())

    b = Peer(noting)
    peers += [a, b]
    b.kill()
    rise, interval = 4, 0.3
    check = {"type": "tcp", "interval": interval, "timeout": 0.25, "rise": rise, "fall": 1}
    gp = start_gportmap([pool_rule(free_port(), [a.target("a"), b.target("b")], check)])
    gp.wait_event("target_down", target="b")
    b.start()
    up = gp.wait_event("target_up", target="b", timeout=rise * interval + 5)[0]
    at = datetime.strptime(up["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    before = [t for t in seen if t < at - interval / 3]
    assert len(before) >= rise - 1, (len(before), len(seen))
    assert targets_of(gp)["b"]["state"] == "up"


# -- checks that tell a live but broken target from a good one -------------------------


def test_http_check_takes_down_a_target_answering_a_wrong_status(start_gportmap, peers):
    good, broken = Peer(http_status(204)), Peer(http_status(503))
    peers += [good, broken]
    check = {"type": "http", "path": "/health?deep=1", "expectStatus": [200, "204-204"], **FAST}
    gp = start_gportmap([pool_rule(free_port(), [good.target("good"), broken.target("broken")], check)])
    down = gp.wait_event("target_down", target="broken", timeout=10)[0]
    assert "HTTP status 503" in down["reason"], down
    wait_for(lambda: len(good.requests) >= FAST["fall"] + 1, what="checks of the good target")
    assert good.requests[0] == b"GET /health?deep=1 HTTP/1.0\r\n"
    targets = targets_of(gp)
    assert targets["good"]["state"] == "up" and targets["good"]["last_error"] is None
    assert targets["broken"]["state"] == "down" and targets["broken"]["last_error"] == "HTTP status 503"
    assert not gp.events("target_down") or {e["target"] for e in gp.events("target_down")} == {"broken"}


@pytest.mark.slow  # waits out each banner's check timeout
def test_send_expect_check_takes_down_wrong_silent_and_chattering_banners(start_gportmap, peers):
    def redis_like(reply: bytes) -> Callable[[Peer, socket.socket], None]:
        def handler(peer: Peer, conn: socket.socket) -> None:
            if peer.read_line(conn) == b"PING\r\n":
                conn.sendall(reply)
                conn.recv(1)  # until the prober closes

        return handler

    def silent(peer: Peer, conn: socket.socket) -> None:
        conn.recv(4096)
        conn.recv(1)  # holds the connection open without a word

    def chatter(peer: Peer, conn: socket.socket) -> None:
        peer.read_line(conn)
        for _ in range(64):  # far past what a probe reads, never the expected text
            conn.sendall(b"x" * 1024)

    good, wrong, mute, noisy = Peer(redis_like(b"+PONG\r\n")), Peer(redis_like(b"-ERR\r\n")), Peer(silent), Peer(chatter)
    peers += [good, wrong, mute, noisy]
    check = {"type": "send-expect", "send": "PING\r\n", "expect": "+PONG", **FAST}
    targets = [good.target("good"), wrong.target("wrong"), mute.target("mute"), noisy.target("noisy")]
    gp = start_gportmap([pool_rule(free_port(), targets, check)])
    reasons = {name: gp.wait_event("target_down", target=name, timeout=10)[0]["reason"]
               for name in ("wrong", "mute", "noisy")}
    assert "reply without '+PONG' in time" in reasons["wrong"], reasons
    assert "no reply in time" in reasons["mute"], reasons
    assert "bytes of reply without '+PONG'" in reasons["noisy"], reasons
    wait_for(lambda: len(good.requests) >= FAST["fall"] + 1, what="checks of the good target")
    assert targets_of(gp)["good"]["state"] == "up"
    assert "good" not in {e["target"] for e in gp.events("target_down")}


@pytest.mark.slow  # waits out fall rounds
def test_tls_check_takes_down_a_target_with_a_certificate_not_of_the_ca(start_gportmap, peers, tmp_path: Path):
    ca, other = CA(tmp_path, "ca"), CA(tmp_path, "other-ca")

    def serving(issued) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(issued.cert), str(issued.key))
        return context

    def tls_ident(name: str) -> Callable[[Peer, socket.socket], None]:
        def handler(peer: Peer, conn: socket.socket) -> None:
            conn.sendall(name.encode() + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)

        return handler

    good = Peer(tls_ident("good"), serving(ca.issue("good", "127.0.0.1", ips=("127.0.0.1",))))
    stranger = Peer(tls_ident("stranger"), serving(other.issue("stranger", "127.0.0.1", ips=("127.0.0.1",))))
    peers += [good, stranger]
    check = {"type": "tls", **FAST}
    port = free_port()
    gp = start_gportmap([pool_rule(port, [good.target("good"), stranger.target("stranger")], check,
                                   targetTls={"caFile": str(ca.path)})])
    down = gp.wait_event("target_down", target="stranger", timeout=10)[0]
    assert "CERTIFICATE_VERIFY_FAILED" in down["reason"], down
    wait_for(lambda: checked(gp, "good"), what="a check of the good target")
    assert targets_of(gp)["good"]["state"] == "up"
    assert "good" not in {e["target"] for e in gp.events("target_down")}
    # Connections go to the good one only, and get through (TLS to the target).
    for _ in range(4):
        assert reach(port) == "good"


@pytest.mark.slow  # waits out probe rounds
def test_http_check_runs_over_the_rules_target_tls(start_gportmap, peers, tmp_path: Path):
    ca = CA(tmp_path, "ca")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    issued = ca.issue("target", "127.0.0.1", ips=("127.0.0.1",))
    context.load_cert_chain(str(issued.cert), str(issued.key))
    good, broken = Peer(http_status(200), context), Peer(http_status(500), context)
    peers += [good, broken]
    check = {"type": "http", "path": "/ready", **FAST}
    gp = start_gportmap([pool_rule(free_port(), [good.target("good"), broken.target("broken")], check,
                                   targetTls={"caFile": str(ca.path)})])
    down = gp.wait_event("target_down", target="broken", timeout=10)[0]
    assert "HTTP status 500" in down["reason"], down
    wait_for(lambda: len(good.requests) >= 2, what="checks of the good target")
    assert good.requests[0] == b"GET /ready HTTP/1.0\r\n"  # read as plaintext inside TLS
    assert targets_of(gp)["good"]["state"] == "up"


def test_checks_of_a_proxy_protocol_rule_send_their_own_header_first(start_gportmap, peers):
    """A target behind ``proxyProtocol: v1`` reads a PROXY line before anything
    else; the check sends ``PROXY UNKNOWN`` (no client to speak of), then its request."""

    def behind_proxy(peer: Peer, conn: socket.socket) -> None:
        if peer.read_line(conn).startswith(b"PROXY "):
            peer.read_line(conn)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")

    target = Peer(behind_proxy)
    peers.append(target)
    check = {"type": "http", **FAST}
    gp = start_gportmap([pool_rule(free_port(), [target.target("t")], check, proxyProtocol="v1")])
    wait_for(lambda: len(target.requests) >= 4, what="two checks")
    assert target.requests[:2] == [b"PROXY UNKNOWN\r\n", b"GET / HTTP/1.0\r\n"]
    assert targets_of(gp)["t"]["state"] == "up" and targets_of(gp)["t"]["last_error"] is None
    assert not gp.events("target_down")


# -- the bound on probes in flight ----------------------------------------------------


class Counting:
    """Many listening ports served by one thread that accepts, never answers, and
    counts the connections open at once (the most ever: ``peak``). Before it counts
    a new one it drops those whose peer has closed: a probe's close reaches the
    loopback before the next probe's connect, so the count is exact."""

    def __init__(self, count: int) -> None:
        self.listeners = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind((LOOPBACK, 0))
            sock.listen(64)
            sock.setblocking(False)
            self.listeners.append(sock)
        self.open: list[socket.socket] = []
        self.peak = 0
        self.accepted: set[int] = set()  # the ports that saw a probe
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for sock in self.listeners]

    def _run(self) -> None:
        while not self.stop.is_set():
            readable, _, _ = select.select(self.listeners, [], [], 0.05)
            for listener in readable:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                self._prune()
                self.open.append(conn)
                self.accepted.add(listener.getsockname()[1])
                self.peak = max(self.peak, len(self.open))
            self._prune()

    def _prune(self) -> None:
        alive = []
        for conn in self.open:
            try:
                closed = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                conn.close()
            else:
                alive.append(conn)
        self.open = alive

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.listeners + self.open:
            sock.close()


@pytest.mark.slow  # a load test (many targets)
def test_probes_in_flight_stay_within_the_bound_however_many_targets():
    """40 targets whose probes each hang until their timeout, every 0.4 s for 0.3 s:
    unbounded, some 30 would be open at once. With ``max_in_flight`` 4 the target
    never sees more than 4, and still sees all of them reached, in turn."""
    counting = Counting(40)
    try:
        check = HealthCheck(type=CheckType.SEND_EXPECT, interval=0.4, timeout=0.3, rise=1, fall=1, expect="never")
        targets = tuple(Target(LOOPBACK, port) for port in counting.ports)
        rule = Rule("many", "tcp", LOOPBACK, 1, LOOPBACK, targets[0].port, targets=targets, health_check=check)
        pool = TargetPool(rule, RuleStats("many", "tcp"))
        prober = HealthProber(lambda: [pool])
        prober.max_in_flight = 4
        prober.start()
        try:
            wait_on_hub(lambda: not any(target.up for target in pool.targets), 20, "every target failed")
            assert len(counting.accepted) == 40, f"only {len(counting.accepted)} targets probed"
            assert not any(target.up for target in pool.targets)  # every probe hung: every target failed
        finally:
            prober.stop()
        assert counting.peak == 4, counting.peak
        assert prober.peak_in_flight == 4
        assert prober.in_flight == 0
    finally:
        counting.close()


def test_the_first_probes_are_spread_over_the_first_interval():
    """Jitter: the first probe of each of 1,000 targets is set at a random point of
    its first interval, so they do not fire together: no tenth of the interval
    holds more than a fifth of them, and the whole interval is used."""
    check = HealthCheck(type=CheckType.TCP, interval=5.0, timeout=1.0)
    targets = tuple(Target(LOOPBACK, port) for port in range(10000, 10256))
    pools = []
    for n in range(4):  # 4 rules of 256 targets (the most a rule has)
        rule = Rule(f"r{n}", "tcp", LOOPBACK, 1, LOOPBACK, 10000, targets=targets, health_check=check)
        pools.append(TargetPool(rule, RuleStats(f"r{n}", "tcp")))
    prober = HealthProber(lambda: pools)
    start = time.monotonic()
    prober.sync()  # schedules, without starting the prober: nothing is probed here
    try:
        offsets = sorted(due - start for due, _, _ in prober.heap)
        assert len(offsets) == 1024
        assert offsets[0] >= 0 and offsets[-1] <= 5.0 + (time.monotonic() - start)
        tenths = [0] * 10
        for offset in offsets:
            tenths[min(int(offset / 0.5), 9)] += 1
        assert max(tenths) < 1024 / 5, tenths
        assert offsets[-1] - offsets[0] > 4.0, (offsets[0], offsets[-1])
    finally:
        prober.stop()


# -- reloads and the rule's life ------------------------------------------------------


def counting(peer: Peer, conn: socket.socket) -> None:
    """A target that only notes each probe (``requests`` gets an empty line)."""
    with peer.lock:
        peer.requests.append(b"")


def reload_with(gp, rules: list[dict]) -> None:
    gp.rules_path.write_text(json.dumps(rules, indent=2))
    status, body, _ = gp.admin("/reload", "POST")
    assert status == 200, body


@pytest.mark.slow  # waits out probe rounds across a reload
def test_a_reload_keeps_each_staying_targets_health_and_probes_a_new_one(start_gportmap, peers):
    a, b, c = Peer(ident("a")), Peer(ident("b")), Peer(ident("c"))
    peers += [a, b, c]
    b.kill()
    port = free_port()
    check = {"type": "tcp", **FAST}
    gp = start_gportmap([pool_rule(port, [a.target("a"), b.target("b")], check)])
    gp.wait_event("target_down", target="b")

    # Add c (and change the rule otherwise too: a new server on the same pool).
    reload_with(gp, [pool_rule(port, [a.target("a"), b.target("b"), c.target("c")], check, retries=1)])
    gp.wait_event("config_reloaded")
    targets = targets_of(gp)
    assert targets["b"]["state"] == "down"  # kept: not up again until its checks pass
    assert targets["a"]["state"] == "up"
    wait_for(lambda: checked(gp, "c"), what="a check of the new target")
    assert {reach(port) for _ in range(8)} == {"a", "c"}
    assert targets_of(gp)["b"]["state"] == "down"
    assert len(gp.events("target_down")) == 1 and not gp.events("target_up")

    # The check removed: nothing will ever pass for b again, so it is up (as without checks).
    unchecked = pool_rule(port, [a.target("a"), b.target("b"), c.target("c")], check)
    del unchecked["healthCheck"]
    reload_with(gp, [unchecked])
    gp.wait_event("target_up", target="b")


@pytest.mark.slow  # waits out several probe rounds
def test_probes_stop_with_their_rule(start_gportmap, peers):
    """A rule removed by a reload is probed no more; another rule's probes, going on,
    are the clock that shows it."""
    gone, stays = Peer(counting), Peer(counting)
    peers += [gone, stays]
    check = {"type": "tcp", **FAST}
    kept = {**pool_rule(free_port(), [stays.target("s")], check), "name": "kept"}
    gp = start_gportmap([pool_rule(free_port(), [gone.target("g")], check), kept])
    wait_for(lambda: len(gone.requests) >= 2 and len(stays.requests) >= 2, what="both rules probed")

    reload_with(gp, [kept])
    gp.wait_event("rule_stopped", rule="pool")
    before, clock = len(gone.requests), len(stays.requests)
    wait_for(lambda: len(stays.requests) >= clock + 5, what="five more probes of the rule that stays")
    assert len(gone.requests) <= before + 1, (before, len(gone.requests))  # at most one already under way


@pytest.mark.slow  # waits out a bind retry
def test_a_rule_is_probed_only_once_its_server_runs(start_gportmap, peers):
    """A rule whose port is taken fails and is retried: no probe while it cannot
    serve (the other rule's probes are the clock), probes once its retry binds."""
    waiting, clock = Peer(counting), Peer(counting)
    peers += [waiting, clock]
    check = {"type": "tcp", **FAST}
    blocker = socket.socket()
    blocker.bind((LOOPBACK, 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        late = {**pool_rule(port, [waiting.target("w")], check), "name": "late"}
        kept = {**pool_rule(free_port(), [clock.target("c")], check), "name": "kept"}
        gp = start_gportmap([late, kept])
        gp.wait_event("rule_failed", rule="late")
        wait_for(lambda: len(clock.requests) >= 5, what="five probes of the rule that runs")
        assert waiting.requests == []
    finally:
        blocker.close()
    gp.wait_event("rule_started", rule="late", timeout=20)
    wait_for(lambda: len(waiting.requests) >= 2, what="probes of the rule once it runs")


# -- worker processes: one prober, the master's ---------------------------------------


def start_workers(start_gportmap, rules: list[dict]):
    """gportmap with two workers, both running."""
    gp = start_gportmap(rules, "--workers", "2")
    wait_for(lambda: [w["state"] for w in gp.admin_json("/stats")["workers"]] == ["running"] * 2,
             what="two workers running")
    return gp


def held_through(gp, port: int, count: int) -> dict[int, set[int]]:
    """Open ``count`` connections through gportmap and hold them: the target ports
    each worker sent its share to, by worker (from ``/connections``)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection((LOOPBACK, port), timeout=10)
            socks.append(sock)
            assert sock.recv(64), "closed by gportmap"  # the target's name: connected
        entries = wait_for(lambda: (lambda e: e if len(e) == count else None)(gp.admin_json("/connections")),
                           what=f"{count} open connections")
        by_worker: dict[int, set[int]] = {}
        for entry in entries:
            by_worker.setdefault(entry["worker"], set()).add(int(str(entry["target"]).rsplit(":", 1)[1]))
        return by_worker
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow  # three processes
def test_with_two_workers_each_target_is_probed_once_per_interval(start_gportmap, peers):
    """N workers, one prober: a target counting its probes sees one per interval,
    not one per worker and interval. Load can only delay probes, never add any."""
    target = Peer(counting)
    peers.append(target)
    check = {"type": "tcp", **FAST}
    start_workers(start_gportmap, [pool_rule(free_port(), [target.target("t")], check)])
    wait_for(lambda: len(target.requests) >= 1, what="a first probe")
    first, started = len(target.requests), time.monotonic()
    wait_for(lambda: len(target.requests) >= first + 8, timeout=30, what="eight more probes")
    probes, intervals = len(target.requests) - first, (time.monotonic() - started) / check["interval"]
    assert probes <= intervals + 2, (probes, intervals)  # two probers would make about twice as many


@pytest.mark.slow  # three processes
def test_with_two_workers_a_dead_target_is_logged_once_and_avoided_by_every_worker(start_gportmap, peers):
    a, b = Peer(ident("a")), Peer(ident("b"))
    peers += [a, b]
    port = free_port()
    gp = start_workers(start_gportmap, [pool_rule(port, [a.target("a"), b.target("b")], {"type": "tcp", **FAST})])
    assert all(ports == {a.port, b.port} for ports in held_through(gp, port, 20).values())

    b.kill()
    down = gp.wait_event("target_down", target="b")
    assert "worker" not in down[0]  # the master's record
    wait_for(lambda: targets_of(gp)["b"]["state"] == "down", what="b down in every worker (the summed view)")
    failures = targets_of(gp)["b"]["connect_failures"]
    by_worker = held_through(gp, port, 20)
    assert sorted(by_worker) == [0, 1] and all(ports == {a.port} for ports in by_worker.values()), by_worker
    assert targets_of(gp)["b"]["connect_failures"] == failures  # no worker even tried it
    assert len(gp.events("target_down")) == 1  # once, not once per worker
    seen = targets_of(gp)["b"]["last_check"]  # the master's checks go on, and /stats shows them
    wait_for(lambda: targets_of(gp)["b"]["last_check"] > seen, what="a later check of b in /stats")
    assert "connection refused" in targets_of(gp)["b"]["last_error"]

    b.start()  # revived, same port
    gp.wait_event("target_up", target="b")
    wait_for(lambda: targets_of(gp)["b"]["state"] == "up", what="b up again")
    by_worker = held_through(gp, port, 20)  # round robin: a worker holding two or more reaches both
    assert sorted(by_worker) == [0, 1] and all(ports == {a.port, b.port} for ports in by_worker.values()), by_worker
    assert len(gp.events("target_up")) == 1 and len(gp.events("target_down")) == 1


@pytest.mark.slow  # three processes and a restart
def test_a_restarted_worker_gets_the_current_states_from_the_master(start_gportmap, peers):
    """A worker killed and restarted does not start with every target up again: a
    target down by the master's checks is down in the new worker from its start."""
    import os
    import signal

    a, b = Peer(ident("a")), Peer(ident("b"))
    peers += [a, b]
    port = free_port()
    gp = start_workers(start_gportmap, [pool_rule(port, [a.target("a"), b.target("b")], {"type": "tcp", **FAST})])
    b.kill()
    gp.wait_event("target_down", target="b")
    wait_for(lambda: targets_of(gp)["b"]["state"] == "down", what="b down in every worker")

    old = {w["index"]: w["pid"] for w in gp.admin_json("/stats")["workers"]}
    os.kill(old[0], signal.SIGKILL)
    gp.wait_event("worker_started", worker=0, restarts=1, timeout=20)
    wait_for(lambda: [(w["state"], w["pid"] != old[w["index"]]) for w in gp.admin_json("/stats")["workers"]]
             == [("running", True), ("running", False)], what="worker 0 restarted")
    failures = targets_of(gp)["b"]["connect_failures"]
    by_worker = held_through(gp, port, 20)
    assert sorted(by_worker) == [0, 1] and all(ports == {a.port} for ports in by_worker.values()), by_worker
    assert targets_of(gp)["b"]["connect_failures"] == failures  # the new worker did not try it either
    assert targets_of(gp)["b"]["state"] == "down"
    assert len(gp.events("target_down")) == 1


@pytest.mark.slow  # three processes
def test_with_two_workers_a_reload_keeps_a_down_target_down_in_every_worker(start_gportmap, peers):
    a, b, c = Peer(ident("a")), Peer(ident("b")), Peer(ident("c"))
    peers += [a, b, c]
    b.kill()
    port = free_port()
    check = {"type": "tcp", **FAST}
    gp = start_workers(start_gportmap, [pool_rule(port, [a.target("a"), b.target("b")], check)])
    gp.wait_event("target_down", target="b")
    wait_for(lambda: targets_of(gp)["b"]["state"] == "down", what="b down in every worker")

    reload_with(gp, [pool_rule(port, [a.target("a"), b.target("b"), c.target("c")], check, retries=1)])
    gp.wait_event("config_reloaded")
    wait_for(lambda: checked(gp, "c"), what="a check of the new target")
    failures = targets_of(gp)["b"]["connect_failures"]
    by_worker = held_through(gp, port, 20)
    assert sorted(by_worker) == [0, 1] and all(ports == {a.port, c.port} for ports in by_worker.values()), by_worker
    assert targets_of(gp)["b"]["connect_failures"] == failures and targets_of(gp)["b"]["state"] == "down"

    unchecked = pool_rule(port, [a.target("a"), b.target("b"), c.target("c")], check)
    del unchecked["healthCheck"]
    reload_with(gp, [unchecked])  # nothing would ever bring b back: up, in every worker
    up = gp.wait_event("target_up", target="b")
    assert "worker" not in up[0]
    b.start()  # no check will say so: only the master's word brings b back in a worker
    by_worker = held_through(gp, port, 20)
    assert sorted(by_worker) == [0, 1] and all(ports == {a.port, b.port, c.port} for ports in by_worker.values())
    assert len(gp.events("target_up")) == 1 and len(gp.events("target_down")) == 1


def test_the_masters_verdicts_go_in_bounded_messages_and_malformed_ones_are_refused():
    """The whole state of many targets goes as several messages of at most
    ``verdicts_per_message`` verdicts, in order; verdicts that come while a send
    to a worker is under way are not queued: the whole state follows it once. An
    entry that is no verdict is refused."""
    from gevent import socket as gsocket

    from gportmap.runtime.workers import Channel, Verdict, WorkerPool, WorkerState

    pool = WorkerPool(1, [])
    master_end, worker_end = gsocket.socketpair()  # gevent's: the sender is a greenlet
    worker = pool.workers[0]
    worker.channel, worker.state = Channel(master_end), WorkerState.RUNNING
    reader = Channel(worker_end)
    try:
        verdicts = [Verdict("r", LOOPBACK, port, port % 2 == 0, "x" * 500, 1.5) for port in range(1, 601)]
        whole = [Verdict("r", LOOPBACK, 7, False, "refused", 2.5)]
        pool.health_state = lambda: whole
        pool.share_health(verdicts)
        pool.share_health([Verdict("r", LOOPBACK, 7, True)])  # while the first is under way
        assert worker.health_behind
        got: list[Verdict] = []
        sizes = []
        while len(got) < len(verdicts):
            with gevent.Timeout(10):
                message = reader.recv()
            assert message["op"] == "health"
            sizes.append(len(message["verdicts"]))
            got += [Verdict.from_wire(item) for item in message["verdicts"]]
        assert sizes == [256, 256, 88]
        assert [v.port for v in got] == list(range(1, 601))
        with gevent.Timeout(10):
            assert [Verdict.from_wire(item) for item in reader.recv()["verdicts"]] == whole
        wait_on_hub(lambda: not worker.health_sending, 5, "the sender's greenlet to end")
        assert not worker.health_sending and not worker.health_behind
        assert got[1] == Verdict("r", LOOPBACK, 2, True, "x" * Verdict.error_limit, 1.5)  # the error is clipped
    finally:
        master_end.close()
        worker_end.close()
    for bad in (None, [], ["r", LOOPBACK, "80", True, None, None], ["r", LOOPBACK, 80, 1, None, None],
                ["r", LOOPBACK, 80, True, None, True], ["r", LOOPBACK, True, True, None, None]):
        assert Verdict.from_wire(bad) is None, bad
    assert Verdict.from_wire(["r", LOOPBACK, 80, False, "refused", None]) == Verdict("r", LOOPBACK, 80, False, "refused")
