"""Target pools (SPEC §8, issue 17): balancing, retries, passive health, backups,
reload, and what an operator sees, with gportmap as a subprocess and real targets
on 127.0.0.1 that tell the client which of them it reached."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import (
    LOOPBACK,
    closed_by_peer,
    connect,
    free_port,
    metric,
    recv_exactly,
    rule_stats,
    targets_of,
    wait_for,
)

from gportmap.config.model import Balance, Rule, Target
from gportmap.engine.pool import SourceHash, TargetPool
from gportmap.stats import RuleStats


class Ident:
    """A target on 127.0.0.1 that sends its name and a newline to every client,
    then echoes. It can be killed (its port then refuses) and revived on the same
    port."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.sock: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        sock.listen(512)
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
            conn.sendall(self.name.encode() + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                if conn in self.conns:
                    self.conns.remove(conn)

    def kill(self) -> None:
        """Stop listening and cut every connection: a dead target (refused)."""
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept: a close alone leaves it listening
            except OSError:
                pass
            sock.close()
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def target(self) -> dict:
        return {"host": LOOPBACK, "port": self.port, "name": self.name}


@pytest.fixture
def idents() -> Iterator[list[Ident]]:
    made: list[Ident] = []
    yield made
    for ident in made:
        ident.kill()


def make(idents: list[Ident], *names: str) -> list[Ident]:
    for name in names:
        idents.append(Ident(name))
    return idents[-len(names):]


def pool_rule(port: int, targets: list[dict], **extra: object) -> dict:
    return {"name": "pool", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port, "targets": targets, **extra}


def reach(port: int, source: str | None = None) -> str:
    """Connect through gportmap (from ``source``, an address of 127/8) and return the
    name of the target reached; the round trip of a payload checks the relay."""
    sock = socket.socket()
    sock.settimeout(10)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect((LOOPBACK, port))
        name = b""
        while not name.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk, f"closed by gportmap after {name!r}: the client saw a failure"
            name += chunk
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        return name.decode().strip()
    finally:
        sock.close()


def quiet(gp, name: str = "pool") -> bool:
    """No connection of the rule is open any more (the last client's end was seen)."""
    return rule_stats(gp, name)["connections"]["active"] == 0


# -- balancing ------------------------------------------------------------------------


def test_roundrobin_weights_1_2_1_share_400_connections(start_gportmap, idents):
    a, b, c = make(idents, "a", "b", "c")
    port = free_port()
    targets = [a.target, {**b.target, "weight": 2}, c.target]
    gp = start_gportmap([pool_rule(port, targets)])
    counts = Counter(reach(port) for _ in range(400))
    assert set(counts) == {"a", "b", "c"}
    for name, share in (("a", 0.25), ("b", 0.5), ("c", 0.25)):
        assert abs(counts[name] / 400 - share) <= 0.03, counts
    wait_for(lambda: quiet(gp))
    figures = targets_of(gp)
    assert {name: figures[name]["total"] for name in "abc"} == dict(counts)
    assert all(figures[name]["state"] == "up" and figures[name]["active"] == 0 for name in "abc")
    assert figures["b"]["weight"] == 2 and figures["b"]["address"] == f"{LOOPBACK}:{b.port}"
    assert metric(gp, "gportmap_target_connections_total", rule="pool", target="b") == counts["b"]
    # The connection log names the target each connection reached.
    closed = gp.wait_event("connection_closed", count=400, rule="pool")
    assert Counter(record["target"] for record in closed) == {
        f"{LOOPBACK}:{a.port}": counts["a"], f"{LOOPBACK}:{b.port}": counts["b"], f"{LOOPBACK}:{c.port}": counts["c"]
    }


def read_name(sock: socket.socket) -> str:
    """The name a target sends first on a connection."""
    name = b""
    while not name.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, f"closed after {name!r}"
        name += chunk
    return name.decode().strip()


def test_leastconn_sends_new_connections_to_the_target_with_fewer_open(start_gportmap, idents):
    a, b = make(idents, "a", "b")
    port = free_port()
    gp = start_gportmap([pool_rule(port, [a.target, b.target], balance="leastconn")])
    held: list[tuple[socket.socket, str]] = []
    try:
        for _ in range(4):
            sock = connect(port)
            held.append((sock, read_name(sock)))
        assert Counter(name for _, name in held) == {"a": 2, "b": 2}
        # Each open connection names the target it holds (/connections, SPEC §5).
        listed = Counter(entry["target"] for entry in gp.admin_json("/connections"))
        assert listed == {f"{LOOPBACK}:{a.port}": 2, f"{LOOPBACK}:{b.port}": 2}
        # a's two connections end: a has none open, b two; the next two both go to a.
        for sock, name in held:
            if name == "a":
                sock.close()
        held = [(sock, name) for sock, name in held if name != "a"]
        wait_for(lambda: targets_of(gp)["a"]["active"] == 0, what="a's connections closed")
        assert targets_of(gp)["b"]["active"] == 2
        for _ in range(2):
            sock = connect(port)
            held.append((sock, read_name(sock)))
        assert [name for _, name in held[-2:]] == ["a", "a"]
        wait_for(lambda: [targets_of(gp)[n]["active"] for n in "ab"] == [2, 2], what="2 open on each")
    finally:
        for sock, _ in held:
            sock.close()


def test_source_keeps_each_client_on_one_target_and_a_lost_target_moves_only_its_clients(start_gportmap, idents):
    targets = make(idents, "a", "b", "c", "d")
    port = free_port()
    gp = start_gportmap([pool_rule(port, [t.target for t in targets], balance="source")])
    clients = [f"127.0.1.{i}" for i in range(1, 121)]
    before = {client: reach(port, client) for client in clients}
    assert {client: reach(port, client) for client in clients} == before  # sticky
    assert len(set(before.values())) == 4
    lost = targets[1]
    lost.kill()
    after = {client: reach(port, client) for client in clients}  # no client sees the dead one
    moved = [client for client in clients if after[client] != before[client]]
    assert all(before[client] == "b" for client in moved)  # only b's clients moved...
    assert set(moved) == {client for client in clients if before[client] == "b"}  # ...all of them
    assert 0.1 <= len(moved) / len(clients) <= 0.4, len(moved)  # about a quarter
    assert "b" not in after.values()
    wait_for(lambda: quiet(gp))
    assert targets_of(gp)["b"]["state"] == "down"


def test_consistent_hash_moves_about_a_quarter_when_one_of_four_goes():
    """The ring itself, over many clients: losing one of 4 equal targets moves its
    clients only, about a quarter of all."""
    rule = Rule("r", "tcp", "0.0.0.0", 1, "127.0.0.1", 1, balance=Balance.SOURCE,
                targets=tuple(Target("127.0.0.1", p) for p in (1, 2, 3, 4)))
    pool = TargetPool(rule, RuleStats("r", "tcp"))
    ring = SourceHash(pool.targets)
    clients = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(20000)]
    before = {client: ring.pick(pool.targets, client) for client in clients}
    shares = Counter(target.name for target in before.values())
    assert all(abs(share / len(clients) - 0.25) < 0.05 for share in shares.values()), shares
    lost = pool.targets[2]
    left = [t for t in pool.targets if t is not lost]
    after = {client: ring.pick(left, client) for client in clients}
    moved = [client for client in clients if after[client] is not before[client]]
    assert all(before[client] is lost for client in moved)
    assert abs(len(moved) / len(clients) - 0.25) < 0.05


def test_first_takes_everything_until_it_dies_then_the_second(start_gportmap, idents):
    a, b, c = make(idents, "a", "b", "c")
    port = free_port()
    gp = start_gportmap([pool_rule(port, [a.target, b.target, c.target], balance="first")])
    assert {reach(port) for _ in range(20)} == {"a"}
    a.kill()
    assert {reach(port) for _ in range(20)} == {"b"}  # no client sees a's death
    wait_for(lambda: quiet(gp))
    assert targets_of(gp)["a"]["state"] == "down"


def test_backups_serve_only_while_every_primary_is_down(start_gportmap, idents):
    a, b, spare = make(idents, "a", "b", "spare")
    port = free_port()
    targets = [a.target, b.target, {**spare.target, "backup": True}]
    gp = start_gportmap([pool_rule(port, targets, failTimeout=0.3, maxFails=1)])
    assert {reach(port) for _ in range(30)} == {"a", "b"}
    a.kill()
    b.kill()
    assert {reach(port) for _ in range(10)} == {"spare"}
    wait_for(lambda: quiet(gp))
    figures = targets_of(gp)
    assert (figures["a"]["state"], figures["b"]["state"], figures["spare"]["state"]) == ("down", "down", "up")
    assert figures["spare"]["backup"] is True
    a.start()  # back on its port: after failTimeout a trial connection finds it, and it takes over
    wait_for(lambda: reach(port) == "a", timeout=10, what="a back in rotation")
    assert "spare" not in {reach(port) for _ in range(10)}
    gp.wait_event("target_up", rule="pool", target="a")


# -- failures -------------------------------------------------------------------------


@pytest.mark.slow  # a load test
@pytest.mark.parametrize("host", [LOOPBACK, "localhost"], ids=["hub", "greenlet"])
def test_a_target_killed_under_load_costs_no_client_anything(start_gportmap, idents, host):
    """``localhost`` targets take the greenlet path (a name to resolve); both paths
    share the one connector and its retries."""
    a, b, c = make(idents, "a", "b", "c")
    port = free_port()
    targets = [{**t.target, "host": host} for t in (a, b, c)]
    gp = start_gportmap([pool_rule(port, targets, maxFails=2, failTimeout=3600)])  # no trial within the test
    seen: Counter[str] = Counter()
    for i in range(300):
        if i == 100:
            b.kill()
        seen[reach(port)] += 1  # reach() fails the test on any client-visible failure
    assert seen["b"] < 100 and seen["a"] > 100 and seen["c"] > 100
    down = gp.wait_event("target_down", rule="pool", target="b")
    assert len(down) == 1 and "connection refused" in down[0]["reason"]
    assert metric(gp, "gportmap_target_up", rule="pool", target="b") == 0.0
    assert metric(gp, "gportmap_target_up", rule="pool", target="a") == 1.0
    failures = metric(gp, "gportmap_target_connect_failures_total", rule="pool", target="b")
    assert failures == 2  # maxFails, then it got no more attempts (within failTimeout)
    assert rule_stats(gp)["upstream_connect_failures"] == 2
    assert not gp.events("target_up")


def test_all_targets_down_closes_the_client_at_once_counted_and_healthz_503(start_gportmap, idents):
    a, b = make(idents, "a", "b")
    port = free_port()
    gp = start_gportmap([pool_rule(port, [a.target, b.target], maxFails=1, failTimeout=3600)])
    assert gp.admin("/healthz")[0] == 200
    a.kill()
    b.kill()
    with connect(port) as sock:  # tries a and b (refused), then closes the client
        assert closed_by_peer(sock)
    record = gp.wait_event("connection_closed", rule="pool", reason="connect_failed")[0]
    assert record["error"] == "connection refused"
    with connect(port) as sock:  # both down now: no attempt at all
        assert closed_by_peer(sock)
    records = gp.wait_event("connection_closed", count=2, rule="pool", reason="connect_failed")
    assert records[1]["error"] == "no target is up"
    assert rule_stats(gp)["upstream_connect_failures"] == 3  # two attempts, then one without any
    status, body, _ = gp.admin("/healthz")
    assert status == 503
    (failing,) = json.loads(body)["failing"]
    assert failing["rule"] == "pool" and "no target is up" in failing["error"]
    assert metric(gp, "gportmap_target_up", rule="pool", target="a") == 0.0
    assert {r["target"] for r in gp.events("target_down")} == {"a", "b"}


def test_a_single_target_rule_is_a_pool_of_one(start_gportmap, idents):
    (a,) = make(idents, "a")
    port = free_port()
    gp = start_gportmap([{"protocol": "tcp", "name": "one", "listenHost": LOOPBACK, "listenPort": port,
                          "targetHost": LOOPBACK, "targetPort": a.port}])
    assert reach(port) == "a"
    wait_for(lambda: quiet(gp, "one"))
    (only,) = rule_stats(gp, "one")["targets"]
    assert only["name"] == only["address"] == f"{LOOPBACK}:{a.port}"
    assert (only["state"], only["total"], only["active"], only["connect_failures"]) == ("up", 1, 0, 0)
    assert only["bytes"] == {"received": 4, "sent": 6}


# -- reload ---------------------------------------------------------------------------


def test_a_reload_that_adds_a_target_keeps_the_others_counters_and_health(start_gportmap, idents):
    a, b, c = make(idents, "a", "b", "c")
    port = free_port()
    b.kill()
    rules = [pool_rule(port, [a.target, b.target], maxFails=1, failTimeout=3600)]
    gp = start_gportmap(rules)
    assert {reach(port) for _ in range(10)} == {"a"}
    wait_for(lambda: quiet(gp))
    before = targets_of(gp)
    assert before["a"]["total"] == 10 and before["b"]["state"] == "down" and before["b"]["connect_failures"] == 1
    rules[0]["targets"].append(c.target)
    gp.rules_path.write_text(json.dumps(rules))  # the watcher reloads it
    gp.wait_event("config_reloaded", changed=["pool"])
    after = targets_of(gp)
    assert after["a"] == before["a"]  # counters and state kept
    assert after["b"] == before["b"]  # still down: no connection until failTimeout
    assert after["c"]["state"] == "up" and after["c"]["total"] == 0
    assert {reach(port) for _ in range(10)} == {"a", "c"}
    wait_for(lambda: quiet(gp))
    assert targets_of(gp)["a"]["total"] > 10


# -- WebSocket rules ------------------------------------------------------------------


def test_a_websocket_rule_spreads_over_its_pool_and_survives_a_dead_target(start_gportmap, idents):
    import websocket

    a, b = make(idents, "a", "b")
    port = free_port()
    rule = {**pool_rule(port, [a.target, b.target], maxFails=1, failTimeout=3600), "protocol": "websocket"}
    gp = start_gportmap([rule])

    def reach_ws() -> str:
        ws = websocket.create_connection(f"ws://{LOOPBACK}:{port}/", timeout=10)
        try:
            name = b""
            while not name.endswith(b"\n"):
                name += ws.recv()  # binary frames: the target's bytes
            return name.decode().strip()
        finally:
            ws.close()

    assert Counter(reach_ws() for _ in range(20)) == {"a": 10, "b": 10}
    b.kill()
    assert {reach_ws() for _ in range(10)} == {"a"}  # the one to b is retried on a
    wait_for(lambda: quiet(gp))
    figures = targets_of(gp)
    assert (figures["a"]["total"], figures["b"]["total"]) == (20, 10)
    assert (figures["b"]["state"], figures["b"]["connect_failures"]) == ("down", 1)


# -- the pool's interface for active checks and passive health -----------------------


def unit_pool(**extra: object) -> tuple[TargetPool, list[float]]:
    """A pool of two targets on a clock the test moves."""
    rule = Rule("r", "tcp", "0.0.0.0", 1, "127.0.0.1", 1,
                targets=(Target("127.0.0.1", 1, name="a"), Target("127.0.0.1", 2, name="b")), **extra)
    pool = TargetPool(rule, RuleStats("r", "tcp"))
    now = [100.0]
    pool.clock = lambda: now[0]
    return pool, now


def test_rise_and_fall_count_checks_in_a_row():
    from gportmap.config.model import HealthCheck

    pool, _ = unit_pool(health_check=HealthCheck(rise=2, fall=3))
    a = pool.targets[0]
    a.check_failed("refused")
    a.check_failed("refused")
    a.check_passed()  # the run of failures is broken
    a.check_failed("refused")
    a.check_failed("refused")
    assert a.up
    a.check_failed("refused")  # the third in a row
    assert not a.up and a.last_error == "refused" and a.last_check is not None
    assert [pool.acquire(None).name for _ in range(3)] == ["b", "b", "b"]
    a.check_passed()
    assert not a.up
    a.check_passed()
    assert a.up and pool.up


def test_passive_health_takes_a_target_out_then_lets_one_trial_through():
    pool, now = unit_pool(max_fails=2, fail_timeout=10.0, balance=Balance.FIRST)
    a, b = pool.targets
    for _ in range(2):
        assert pool.acquire(None) is a
        a.attempt_failed("connection refused")
    assert not a.up and a.active == 0 and a.connect_failures == 2
    assert pool.acquire(None) is b
    b.connected()
    now[0] += 10.0  # failTimeout over: the next connection is a's trial, and only it
    trial = pool.acquire(None)
    assert trial is a and a.trial
    assert pool.acquire(None) is b  # while the trial is under way
    a.attempt_failed("connection refused")  # failed: out for another failTimeout
    assert not a.up and pool.acquire(None) is b
    now[0] += 10.0
    assert pool.acquire(None) is a
    a.connected()
    assert a.up and a.fails == 0
    assert pool.stats.connect_failures == 3  # every failed attempt is the rule's connect failure too


def test_no_target_up_gives_none_and_backups_wait_for_every_primary():
    rule = Rule("r", "tcp", "0.0.0.0", 1, "127.0.0.1", 1, max_fails=1,
                targets=(Target("127.0.0.1", 1, name="a"), Target("127.0.0.1", 2, name="spare", backup=True)))
    pool = TargetPool(rule, RuleStats("r", "tcp"))
    a, spare = pool.targets
    assert {pool.acquire(None).name for _ in range(5)} == {"a"}
    assert pool.acquire(None, exclude=[a]) is spare  # a tried already for this connection
    a.attempt_failed("refused")
    assert pool.acquire(None) is spare
    spare.check_failed("refused")
    spare.check_failed("refused")
    spare.check_failed("refused")
    assert pool.acquire(None) is None and not pool.up


def test_a_proxy_header_that_cannot_be_sent_is_a_failed_connect_retried_on_the_next_target(monkeypatch, idents):
    """The greenlet path (plugins, names to resolve, tunnels): the connect reached
    the first target, which went away before the PROXY header could be sent; that is
    counted against it (and the rule) and the next target is connected, on the hub
    connector, and gets the header."""
    from gportmap.engine.connector import PoolConnect
    from gportmap.engine.relay import BufferPool
    from gportmap.log import RateLimiter
    from gportmap.protocols import ServerContext, stream
    from gportmap.protocols.tcp import TcpServer
    from gportmap.stats import StatsRegistry

    (b,) = make(idents, "b")
    rule = Rule("pp", "tcp", LOOPBACK, 1, LOOPBACK, 2, proxy_protocol="v1", balance=Balance.FIRST,
                targets=(Target(LOOPBACK, 2, name="a"), Target(LOOPBACK, b.port, name="b")))
    server = TcpServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    upstream, target_end = socket.socketpair()
    target_end.close()  # a send now fails with EPIPE, deterministically

    def connected(pool, key, timeout):  # the pool's connect reached "a": this socket
        connector = PoolConnect(pool, key, timeout, None, None)
        connector.target = pool.acquire(key)
        connector.tried.append(connector.target)
        return upstream, connector

    monkeypatch.setattr(stream, "await_connect", connected)
    with socket.create_server((LOOPBACK, 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client, listener.accept()[0] as accepted:
            assert client.getpeername() == accepted.getsockname()
            reached = server.connect_target(accepted)
            try:
                reached.settimeout(10)
                header = f"PROXY TCP4 {LOOPBACK} {LOOPBACK} {client.getsockname()[1]} {listener.getsockname()[1]}\r\n"
                expected = "b\n" + header  # b's name, then the header it echoes
                assert recv_exactly(reached, len(expected)).decode() == expected
            finally:
                reached.close()
    assert upstream.fileno() == -1
    a, b_state = server.target_pool.targets
    assert (a.connect_failures, a.active, a.last_error) == (1, 0, "cannot send the PROXY protocol header: Broken pipe")
    assert (b_state.total, b_state.active) == (1, 0)  # no connection held it: counted, given back
    assert server.stats.connect_failures == 1


@pytest.mark.slow  # starts a master and two workers
def test_with_two_workers_the_master_sums_each_targets_figures(start_gportmap, idents):
    a, b = make(idents, "a", "b")
    port = free_port()
    gp = start_gportmap([pool_rule(port, [a.target, b.target])], "--workers", "2")
    wait_for(lambda: len([w for w in gp.admin_json("/stats")["workers"] if w["state"] == "running"]) == 2,
             what="two workers")
    seen = Counter(reach(port) for _ in range(40))

    def settled() -> dict | None:
        figures = targets_of(gp)
        done = sum(t["total"] for t in figures.values()) == 40 and all(t["active"] == 0 for t in figures.values())
        return figures if done else None

    figures = wait_for(settled, what="40 connections summed over the targets")
    assert {name: figures[name]["total"] for name in "ab"} == dict(seen)
    assert {figures[name]["state"] for name in "ab"} == {"up"}
    assert metric(gp, "gportmap_target_connections_total", rule="pool", target="a") == seen["a"]


def test_a_target_name_that_does_not_resolve_is_a_failed_connect_and_the_next_is_tried(idents):
    """The lookup's failure is injected (a real one would ask the system's DNS
    server, off this host): the name is not asked again within ``negative_ttl``,
    its attempt fails, counted against its own target, and the next is reached."""
    import time

    from gportmap.engine.relay import BufferPool
    from gportmap.log import RateLimiter
    from gportmap.protocols import ServerContext
    from gportmap.protocols.tcp import TcpServer
    from gportmap.stats import StatsRegistry

    (a,) = make(idents, "a")
    rule = Rule("pool", "tcp", LOOPBACK, 1, "ghost.example", 9, balance=Balance.FIRST, max_fails=2,
                targets=(Target("ghost.example", 9, name="ghost"), Target(LOOPBACK, a.port, name="a")))
    server = TcpServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    ghost, live = server.target_pool.targets
    ghost.addresses.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    ghost.addresses.failed_until = time.monotonic() + 3600
    for _ in range(3):
        upstream = server.connect_target()
        try:
            upstream.settimeout(10)
            assert read_name(upstream) == "a"
        finally:
            upstream.close()
    assert (ghost.connect_failures, ghost.up, ghost.total) == (2, False, 0)  # maxFails, then left out
    assert ghost.last_error == "cannot resolve ghost.example: Name or service not known"
    assert (live.total, live.active) == (3, 0)
    assert server.stats.connect_failures == 2


def test_a_staged_connect_retries_a_failed_tls_handshake_on_the_next_target(idents, tmp_path):
    """``connect_staged`` (plugins, names to resolve, tunnels on the hub relay): the
    PROXY header and the TLS handshake run on the hub; a target that does not speak
    TLS fails its handshake, counted against it, and the next target is readied."""
    import ssl
    import threading

    from certs import CA

    from gportmap.config.model import TlsTarget
    from gportmap.engine.relay import BufferPool
    from gportmap.log import RateLimiter
    from gportmap.protocols import ServerContext
    from gportmap.protocols.tcp import TcpServer
    from gportmap.stats import StatsRegistry

    (plain,) = make(idents, "plain")  # answers a ClientHello with "plain\n": no TLS
    ca = CA(tmp_path, "ca")
    issued = ca.issue("server", LOOPBACK, ips=(LOOPBACK,))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    listener = socket.create_server((LOOPBACK, 0))
    handshakes: list[str] = []

    def serve_tls() -> None:
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                handshakes.append(tls.version() or "")
                tls.recv(1)  # until the client closes
        except OSError:
            pass

    threading.Thread(target=serve_tls, daemon=True).start()
    rule = Rule("tls", "tcp", LOOPBACK, 1, LOOPBACK, plain.port, balance=Balance.FIRST,
                target_tls=TlsTarget(str(ca.path), None, True, ""),
                targets=(Target(LOOPBACK, plain.port, name="plain"), Target(LOOPBACK, listener.getsockname()[1], name="tls")))
    server = TcpServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    try:
        raw, stage = server.connect_staged()
        try:
            assert stage is not None and stage.handshaken
            wait_for(lambda: handshakes, what="the TLS target's handshake")
        finally:
            raw.close()
    finally:
        listener.close()
    bad, good = server.target_pool.targets
    assert (bad.connect_failures, bad.total, bad.active) == (1, 0, 0)
    assert bad.last_error.startswith("TLS handshake with the target failed"), bad.last_error
    assert (good.connect_failures, good.total) == (0, 1)


@pytest.mark.slow  # waits out a connect timeout
def test_a_connect_started_from_a_greenlet_after_a_long_stretch_gets_its_whole_timeout():
    """libev's timers count from the loop's cached clock, which a greenlet that ran
    (or a process that slept) for long has left behind: a connect's timer must count
    from now, or it fires at once (as ``gevent.Timeout`` knows). The target never
    answers (its backlog is full), so only the timer can end the connect."""
    import time

    import gevent
    from gevent.event import AsyncResult

    from gportmap.engine.connector import HubConnect

    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    try:
        for _ in range(4):  # the backlog full: further SYNs are dropped, a connect stays in progress
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        gevent.sleep(0.1)  # the loop's clock is now...
        time.sleep(2)  # ...and 2 s behind
        result = AsyncResult()
        connect = HubConnect([(socket.AF_INET, address)], 1.0, result.set, result.set_exception)
        connect.start()
        try:
            gevent.sleep(0.05)  # a few loop iterations
            assert not result.ready(), f"ended before its timeout: {result.exception or result.value}"
        finally:
            connect.cancel()
    finally:
        for sock in (*fillers, listener):
            sock.close()


def test_smooth_round_robin_interleaves_as_nginx_does():
    rule = Rule("r", "tcp", "0.0.0.0", 1, "127.0.0.1", 1, targets=(
        Target("127.0.0.1", 1, 5, name="a"), Target("127.0.0.1", 2, 1, name="b"), Target("127.0.0.1", 3, 1, name="c")))
    pool = TargetPool(rule, RuleStats("r", "tcp"))
    picks = []
    for _ in range(14):
        target = pool.acquire(None)
        picks.append(target.name)
        target.connected()
        target.release()
    assert picks == list("aabacaa") * 2  # ngx_http_upstream_round_robin.c's sequence for 5:1:1


def test_random_follows_the_weights_and_leastconn_weighs_the_open_connections():
    weights = (Target("127.0.0.1", 1, 1, name="a"), Target("127.0.0.1", 2, 3, name="b"))
    pool = TargetPool(Rule("r", "tcp", "0.0.0.0", 1, "127.0.0.1", 1, balance=Balance.RANDOM, targets=weights))
    pool.balancer.random.seed(17)  # type: ignore[attr-defined]
    picks = Counter()
    for _ in range(4000):
        target = pool.acquire(None)
        picks[target.name] += 1
        target.cancelled()
    assert abs(picks["b"] / 4000 - 0.75) < 0.03, picks
    pool = TargetPool(Rule("r", "tcp", "0.0.0.0", 1, "127.0.0.1", 1, balance=Balance.LEASTCONN, targets=weights))
    held = [pool.acquire(None) for _ in range(8)]  # none ends: b (weight 3) takes 3 for each of a's
    assert Counter(target.name for target in held) == {"a": 2, "b": 6}


def test_a_sole_target_is_not_taken_out_by_failed_connects_unless_max_fails_is_set(start_gportmap, idents):
    """With nowhere else to send a client, a single target stays in after refused
    connects (as nginx's upstream of one): the first client after it comes back is
    served, not closed for failTimeout. Set explicitly, maxFails takes it out."""
    (a,) = make(idents, "a")
    a.kill()  # its port refuses until it is revived
    port, explicit_port = free_port(), free_port()
    gp = start_gportmap([
        {"protocol": "tcp", "name": "one", "listenHost": LOOPBACK, "listenPort": port,
         "targetHost": LOOPBACK, "targetPort": a.port, "failTimeout": 3600},
        {"protocol": "tcp", "name": "strict", "listenHost": LOOPBACK, "listenPort": explicit_port,
         "targets": [{"host": LOOPBACK, "port": a.port}], "maxFails": 2, "failTimeout": 3600},
    ])
    for _ in range(5):
        with connect(port) as sock:
            assert closed_by_peer(sock)
    for _ in range(2):
        with connect(explicit_port) as sock:
            assert closed_by_peer(sock)
    gp.wait_event("target_down", rule="strict")
    (only,) = rule_stats(gp, "one")["targets"]
    assert (only["state"], only["connect_failures"]) == ("up", 5)
    a.start()
    assert reach(port) == "a"
    assert rule_stats(gp, "strict")["targets"][0]["state"] == "down"  # out for its failTimeout
