"""Port ranges and several listen addresses per rule (SPEC §9, issue 18): real
sockets, gportmap as a subprocess. The targets are banner servers that answer each
connection (each datagram) with the port it arrived on, so a test sees which target
port a listen port forwarded to.

The ranges are taken below 20,000 (``conftest.free_block``): the single ports of
``conftest.free_port`` come from 20,000 up to the ephemeral range, so a block here
never takes one another test was handed; every port of a block is checked free
(TCP and UDP, on every address the test listens on) before it is used.
"""

from __future__ import annotations

import json
import os
import random
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket
from conftest import LOOPBACK, connect, free_block, recv_exactly, refused, wait_for

from gportmap.config import parse
from gportmap.errors import ConfigError

SECOND_LOOPBACK = "127.0.0.2"  # Linux routes all of 127.0.0.0/8 to lo


def span(block: range) -> str:
    return f"{block.start}-{block[-1]}"


# -- banner targets ------------------------------------------------------------------------


class Banners:
    """Servers on many ports in one thread (one selector): a TCP connection gets the
    port it arrived on as a line and is closed; a datagram is answered with
    ``port:payload``. Bounded: only the ports given, until ``close``."""

    def __init__(self, ports: range | list[int], udp: bool = False, host: str = LOOPBACK) -> None:
        self.udp = udp
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            if not udp:
                sock.listen(64)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, port)
            self.sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                sock, port = key.fileobj, key.data
                try:
                    if self.udp:
                        data, address = sock.recvfrom(65536)
                        sock.sendto(f"{port}:".encode() + data, address)
                    else:
                        conn, _ = sock.accept()
                        conn.sendall(f"{port}\n".encode())
                        conn.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()
        self.selector.close()


def banner(port: int, host: str = LOOPBACK) -> int:
    """The port the target of ``host:port`` says it was reached on."""
    with connect(port, host) as sock:
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk, f"{host}:{port} closed before its banner"
            line += chunk
    return int(line)


def udp_banner(port: int, payload: bytes = b"hi", host: str = LOOPBACK) -> tuple[int, bytes]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(payload, (host, port))
        data = sock.recv(65536)
    target, _, echoed = data.partition(b":")
    return int(target), echoed


@pytest.fixture
def banners() -> Iterator[Any]:
    opened: list[Banners] = []

    def open_banners(ports: range | list[int], udp: bool = False) -> Banners:
        server = Banners(ports, udp)
        opened.append(server)
        return server

    yield open_banners
    for server in opened:
        server.close()


def range_rule(listen: range, target: range | int, protocol: str = "tcp", **extra: Any) -> dict:
    return {
        "name": extra.pop("name", "range"),
        "protocol": protocol,
        "listenHost": extra.pop("listenHost", LOOPBACK),
        "listenPort": span(listen) if len(listen) > 1 else listen.start,
        "targetHost": LOOPBACK,
        "targetPort": span(target) if isinstance(target, range) else target,
        **extra,
    }


def sample(block: range, count: int) -> list[int]:
    """``count`` ports of ``block``: its first and last and others at random."""
    ports = [block.start, block[-1]]
    ports += random.Random(len(block)).sample(list(block[1:-1]), min(count - 2, len(block) - 2))
    return ports


# -- forwarding ----------------------------------------------------------------------------


def test_a_1000_port_range_reaches_each_port_of_a_1000_port_target_range(start_gportmap, banners):
    listen, target = free_block(1000), free_block(1000)
    banners(target)
    gp = start_gportmap([range_rule(listen, target)])
    for port in sample(listen, 50):
        assert banner(port) == target.start + (port - listen.start)
    stats = gp.admin_json("/stats")["rules"][0]
    assert stats["listen"] == f"{LOOPBACK}:{span(listen)}" and stats["target"] == f"{LOOPBACK}:{span(target)}"
    assert stats["connections"]["total"] == 50  # one rule, one set of counters over every port


def test_a_range_forwards_to_one_target_port(start_gportmap, banners):
    listen, target = free_block(20), free_block(1)
    banners(target)
    start_gportmap([range_rule(listen, target.start)])
    assert {banner(port) for port in listen} == {target.start}


def test_a_pool_of_target_ranges_moves_each_target_and_retries_on_the_next(start_gportmap, banners):
    """Two "C-D" targets, the first with nothing listening: each connection on
    listen port A+i is refused at C+i, retried and answered at E+i (the retry must
    not pick the same target again, whatever port it was moved to)."""
    listen, dead, alive = free_block(20), free_block(20), free_block(20)
    banners(alive)
    rule = {
        "name": "pool", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": span(listen),
        "targets": [{"host": LOOPBACK, "port": span(dead)}, {"host": LOOPBACK, "port": span(alive)}],
        "maxFails": 0,
    }
    gp = start_gportmap([rule])
    for port in sample(listen, 8):
        assert banner(port) == alive.start + port - listen.start
    targets = {t["name"]: t for t in gp.admin_json("/stats")["rules"][0]["targets"]}
    assert targets[f"{LOOPBACK}:{alive.start}"]["total"] == 8  # one target, counted over all its ports
    assert targets[f"{LOOPBACK}:{dead.start}"]["connect_failures"] >= 4


def test_a_udp_range_keeps_a_session_per_listen_port(start_gportmap, banners):
    listen, target = free_block(30), free_block(30)
    banners(target, udp=True)
    gp = start_gportmap([range_rule(listen, target, protocol="udp")])
    for port in (listen.start, listen.start + 7, listen[-1]):
        assert udp_banner(port, b"x%d" % port) == (target.start + port - listen.start, b"x%d" % port)
    # the same client address on two ports: two sessions, each answered by its own target port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for port in (listen.start + 1, listen.start + 2):
            sock.sendto(b"s", (LOOPBACK, port))
            data, source = sock.recvfrom(100)
            assert data == f"{target.start + port - listen.start}:s".encode() and source[1] == port
    assert gp.admin_json("/stats")["rules"][0]["udp"]["sessions"] >= 5


def test_a_websocket_range_reaches_each_target_port(start_gportmap, banners):
    listen, target = free_block(10), free_block(10)
    banners(target)
    start_gportmap([range_rule(listen, target, protocol="websocket")])
    for port in (listen.start, listen.start + 4, listen[-1]):
        ws = websocket.create_connection(f"ws://{LOOPBACK}:{port}/", timeout=5)
        try:
            assert ws.recv() == f"{target.start + port - listen.start}\n".encode()
        finally:
            ws.close()


def test_every_address_of_a_listen_host_list_listens_on_every_port(start_gportmap, banners):
    listen, target = free_block(5, (LOOPBACK, SECOND_LOOPBACK)), free_block(5)
    banners(target)
    gp = start_gportmap([range_rule(listen, target, listenHost=[LOOPBACK, SECOND_LOOPBACK])])
    for host in (LOOPBACK, SECOND_LOOPBACK):
        for port in (listen.start, listen[-1]):
            assert banner(port, host) == target.start + port - listen.start
    assert gp.admin_json("/stats")["rules"][0]["listen"] == (
        f"{LOOPBACK}:{span(listen)},{SECOND_LOOPBACK}:{span(listen)}"
    )


def test_connections_show_the_address_each_came_in_on(start_gportmap, echo_target):
    """SPEC §9: one rule, many listeners; ``/connections`` says which one."""
    listen = free_block(3, (LOOPBACK, SECOND_LOOPBACK))
    gp = start_gportmap([range_rule(listen, echo_target.port, listenHost=[LOOPBACK, SECOND_LOOPBACK])])
    held, socks = {}, []
    try:
        for host, port in ((LOOPBACK, listen.start), (SECOND_LOOPBACK, listen[-1])):
            sock = connect(port, host)
            socks.append(sock)
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
            held[str(sock.getsockname()[1])] = f"{host}:{port}"
        open_ = gp.admin_json("/connections")
        assert {entry["client"].rsplit(":", 1)[1]: entry["listen"] for entry in open_} == held
    finally:
        for sock in socks:
            sock.close()


# -- reload per listener ---------------------------------------------------------------------


def _rewrite(gp: Any, rules: list[dict]) -> None:
    gp.rules_path.write_text(json.dumps(rules))
    gp.admin_json("/reload", method="POST")


def test_growing_a_range_keeps_connections_and_refuses_no_attempt_on_kept_ports(start_gportmap, banners, echo_target):
    listen = free_block(40)
    rule = range_rule(listen[:20], echo_target.port, name="grow")
    gp = start_gportmap([rule])
    held = [connect(port) for port in (listen.start, listen.start + 19)]
    for sock in held:
        sock.sendall(b"before")
        assert recv_exactly(sock, 6) == b"before"
    attempts, refusals = [0], []
    stop = threading.Event()

    def knock() -> None:  # bounded: until stop, at most 5,000 attempts
        while not stop.is_set() and attempts[0] < 5000:
            port = listen.start + attempts[0] % 20
            attempts[0] += 1
            try:
                connect(port, timeout=5).close()
            except OSError as exc:
                refusals.append((port, repr(exc)))

    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        time.sleep(0)  # the thread runs alongside: no synchronisation needed here
        _rewrite(gp, [{**rule, "listenPort": span(listen)}])
        wait_for(lambda: gp.events("listeners_changed"), what="the reload")
    finally:
        stop.set()
        knocker.join(30)
    assert attempts[0] > 0 and refusals == []
    for sock in held:  # kept ports: the open connections go on
        sock.sendall(b"after")
        assert recv_exactly(sock, 5) == b"after"
        sock.close()
    assert banner_echo(listen[-1])
    (record,) = gp.events("listeners_changed")
    assert record["opened"] == [f"{LOOPBACK}:{listen.start + 20}-{listen[-1]}"]
    assert record["kept"] == [f"{LOOPBACK}:{span(listen[:20])}"] and record["closed"] == []


def banner_echo(port: int) -> bool:
    with connect(port) as sock:
        sock.sendall(b"new")
        return recv_exactly(sock, 3) == b"new"


def test_shrinking_a_range_closes_only_the_dropped_ports(start_gportmap, echo_target):
    listen = free_block(30)
    rule = range_rule(listen, echo_target.port, name="shrink")
    gp = start_gportmap([rule])
    kept_conn, dropped_conn = connect(listen.start), connect(listen[-1])
    _rewrite(gp, [{**rule, "listenPort": span(listen[:10])}])
    (record,) = gp.wait_event("listeners_changed")
    assert record["closed"] == [f"{LOOPBACK}:{listen.start + 10}-{listen[-1]}"] and record["opened"] == []
    with pytest.raises(ConnectionRefusedError):
        connect(listen[-1], timeout=5)
    assert banner_echo(listen.start) and banner_echo(listen.start + 9)
    for sock in (kept_conn, dropped_conn):  # open connections finish (drainTimeout)
        sock.sendall(b"still")
        assert recv_exactly(sock, 5) == b"still"
        sock.close()


def test_a_udp_range_grows_and_its_kept_ports_keep_their_sessions(start_gportmap, banners):
    listen, target = free_block(20), free_block(20)
    banners(target, udp=True)
    rule = range_rule(listen[:10], span(target[:10]), protocol="udp", name="udp-grow")
    rule["targetPort"] = span(target[:10])
    gp = start_gportmap([rule])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"a", (LOOPBACK, listen.start + 3))
        assert client.recv(100) == f"{target.start + 3}:a".encode()
        _rewrite(gp, [{**rule, "listenPort": span(listen), "targetPort": span(target)}])
        gp.wait_event("listeners_changed")
        client.sendto(b"b", (LOOPBACK, listen.start + 3))  # the session on a kept port goes on
        assert client.recv(100) == f"{target.start + 3}:b".encode()
    assert udp_banner(listen[-1]) == (target[-1], b"hi")  # an added port serves


# -- overlaps and bad ranges (the loader: no process needed) ------------------------------------


def errors(rules: list[dict]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(json.dumps(rules), "rules.json")
    return caught.value.errors


def test_overlapping_ranges_lists_and_single_ports_are_errors_naming_both_rules():
    rule = {"protocol": "tcp", "targetHost": LOOPBACK, "targetPort": 9}
    assert errors([{**rule, "name": "a", "listenPort": "20000-20099"}, {**rule, "name": "b", "listenPort": "20050-20150"}]) == [
        "rules.json: rules[1]: listen address 0.0.0.0:20050 (in 0.0.0.0:20050-20150) is already used by rules[0] "
        "('a') (its 0.0.0.0:20000-20099); two enabled tcp rules cannot listen on the same address and port"
    ]
    assert errors([{**rule, "name": "a", "listenPort": "20000-20099"}, {**rule, "name": "b", "listenPort": 20099, "listenHost": LOOPBACK}]) == [
        "rules.json: rules[1]: listen address 127.0.0.1:20099 overlaps 0.0.0.0:20099 (in 0.0.0.0:20000-20099) of "
        "rules[0] ('a'): '0.0.0.0' listens on every IPv4 address"
    ]
    assert errors([{**rule, "name": "a", "listenPort": 80, "listenHost": [LOOPBACK, SECOND_LOOPBACK]}, {**rule, "name": "b", "listenPort": "70-90", "listenHost": "::"}]) == [
        "rules.json: rules[1]: listen address [::]:80 (in [::]:70-90) overlaps 127.0.0.1:80 of rules[0] ('a'): "
        "'::' listens on every address, IPv4 included"
    ]
    assert errors([{**rule, "name": "a", "listenPort": 80, "listenHost": ["0.0.0.0", SECOND_LOOPBACK]}]) == [
        "rules.json: rules[0].listenHost: '127.0.0.2' overlaps '0.0.0.0' in the same list: '0.0.0.0' listens on every IPv4 address"
    ]
    # tcp and udp have their own ports; a disabled rule listens nowhere
    parse(json.dumps([{**rule, "listenPort": "1000-1100"}, {**rule, "protocol": "udp", "listenPort": "1050-1060"},
                      {**rule, "name": "off", "listenPort": 1055, "enabled": False}]), "rules.json")


def test_bad_ranges_are_errors_naming_file_path_and_problem():
    rule = {"protocol": "tcp", "targetHost": LOOPBACK}
    assert errors([{**rule, "listenPort": "20099-20000", "targetPort": 1}]) == [
        "rules.json: rules[0].listenPort: '20099-20000' is not a range (the first port must not be above the last)"
    ]
    assert errors([{**rule, "listenPort": "1000-70000", "targetPort": 1}]) == [
        "rules.json: rules[0].listenPort: '1000-70000': port 70000 is not from 1 to 65535"
    ]
    assert errors([{**rule, "listenPort": "1000-1099", "targetPort": "2000-2098"}]) == [
        "rules.json: rules[0].targetPort: '2000-2098' is 99 ports but listenPort 1000-1099 is 100: a target range "
        "must be as long as the listen range (or give one port, which every listen port forwards to)"
    ]
    assert errors([{**rule, "listenPort": "ten", "targetPort": 1}]) == [
        "rules.json: rules[0].listenPort: 'ten' is not a valid listenPort (a port from 1 to 65535, or a range \"A-B\")"
    ]
    routed = {"protocol": "tcp", "listenPort": "1000-1009",
              "routes": [{"name": "a", "default": True, "targets": [{"host": LOOPBACK, "port": "2000-2009"}]}]}
    assert errors([routed]) == [
        "rules.json: rules[0].routes[0].targets[0].port: '2000-2009': a route's target takes one port, not a range"
    ]
    assert errors([{"protocol": "udp", "listenPort": "1000-1009", "targets": [{"host": LOOPBACK, "port": "2000-2001"}]}]) == [
        "rules.json: rules[0].targets[0].port: '2000-2001' is 2 ports but listenPort 1000-1009 is 10: a target range "
        "must be as long as the listen range (or give one port, which every listen port forwards to)"
    ]


def test_overlaps_are_found_on_intervals_fast_at_100_rules_of_10000_ports():
    """100 rules of 10,000 ports on 100 addresses, and one more overlapping the last:
    a set of every port would be a million entries; intervals are 101. Checked as a
    ratio against 100 single-port rules (no wall-clock threshold)."""
    base = {"protocol": "tcp", "targetHost": "10.0.0.1", "targetPort": 9}
    ranged = [{**base, "name": f"r{i}", "listenHost": f"127.0.{i}.1", "listenPort": "10000-19999"} for i in range(100)]
    single = [{**base, "name": f"r{i}", "listenHost": f"127.0.{i}.1", "listenPort": 10000} for i in range(100)]

    def timed(rules: list[dict]) -> float:
        began = time.perf_counter()
        parse(json.dumps(rules), "rules.json")
        return time.perf_counter() - began

    assert timed(ranged) < 5 * timed(single) + 0.05  # the same work: one interval per rule
    assert errors([*ranged, {**base, "name": "late", "listenHost": "127.0.99.1", "listenPort": 19999}]) == [
        "rules.json: rules[100]: listen address 127.0.99.1:19999 is already used by rules[99] ('r99') "
        "(its 127.0.99.1:10000-19999); two enabled tcp rules cannot listen on the same address and port"
    ]


# -- the open-file budget ---------------------------------------------------------------------------


def test_listeners_that_do_not_fit_the_open_file_limit_are_refused_naming_the_rules(tmp_path):
    """300 listeners under a limit of 256 open files: gportmap refuses to start and
    says what does not fit (a reload would be refused the same way)."""
    rules = [range_rule(free_block(300), 9, name="wide")]
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    done = subprocess.run(
        [sys.executable, "-m", "gportmap", str(path), "--admin", "off"],
        preexec_fn=limited, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert (
        f"{path}: the enabled rules listen on 300 sockets (wide 300), but the open-file limit (256) leaves room for "
        "192 after the 64 the process keeps for itself; raise the limit (ulimit -n, LimitNOFILE=, docker --ulimit "
        "nofile=) to at least 366, or listen on fewer ports"
    ) in done.stderr + done.stdout


def test_a_reload_past_the_open_file_limit_changes_nothing(start_gportmap, banners, tmp_path):
    """Started under a limit of 256 open files (a ``sitecustomize`` sets it in the
    gportmap process before it runs: gportmap raises its soft limit to the hard one),
    a reload to 300 listeners is refused with the words of the budget, and the
    running range keeps serving."""
    listen, target = free_block(300), free_block(1)
    banners(target)
    small = range_rule(listen[:10], target.start, name="wide")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n")
    path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    gp = start_gportmap([small], env={"PYTHONPATH": path})
    gp.rules_path.write_text(json.dumps([{**small, "listenPort": span(listen)}]))
    status, _, _ = gp.admin("/reload", method="POST")
    assert status != 200
    (record,) = gp.wait_event("config_invalid")
    assert "the enabled rules listen on 300 sockets (wide 300), but the open-file limit (256)" in record["errors"][0]
    assert banner(listen.start) == target.start and refused(listen.start + 10)


@pytest.mark.slow  # three processes
def test_with_workers_a_reload_past_the_open_file_limit_is_refused_by_the_master(
    start_gportmap, banners, lowered_ulimit
):
    """``--workers 2`` under ``ulimit -n 256`` (the workers inherit the master's
    limit): a reload to 300 listeners is refused by the master with the words of the
    budget before any worker is sent it (before: each worker refused it on its own,
    late, while the master counted the reload as applied and resent it), and the
    running range keeps serving in every worker."""
    listen, target = free_block(300), free_block(1)
    banners(target)
    small = range_rule(listen[:10], target.start, name="wide")
    with lowered_ulimit(256):
        gp = start_gportmap([small], "--workers", "2")
    gp.wait_event("worker_started", count=2)
    gp.rules_path.write_text(json.dumps([{**small, "listenPort": span(listen)}]))
    status, body, _ = gp.admin("/reload", method="POST")
    assert status != 200
    message = "the enabled rules listen on 300 sockets (wide 300), but the open-file limit (256)"
    assert message in body.decode()
    (record,) = gp.wait_event("config_invalid", source="admin")  # the watcher may see the file too
    assert message in record["errors"][0]
    gp.rules_path.write_text(json.dumps([small]))  # back to what runs: applied as it is, nothing changes
    assert gp.admin("/reload", method="POST")[0] == 200
    gp.wait_event("config_reloaded", source="admin")
    assert not gp.events("worker_config_invalid") and not gp.events("worker_resync")
    assert all(banner(listen.start) == target.start for _ in range(8)) and refused(listen.start + 10)


def test_with_workers_listeners_past_the_open_file_limit_are_refused_at_start(tmp_path, lowered_ulimit):
    """The same budget at start: the master says what does not fit and exits, no
    worker started (before: every worker failed its first rules, and was restarted
    over and over)."""
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([range_rule(free_block(300), 9, name="wide")]))
    with lowered_ulimit(256):
        done = subprocess.run(
            [sys.executable, "-m", "gportmap", str(path), "--admin", "off", "--workers", "2", "--log-format", "json"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
    records = [json.loads(line) for line in done.stdout.splitlines() + done.stderr.splitlines() if line.startswith("{")]
    assert done.returncode != 0
    assert any(
        "the enabled rules listen on 300 sockets (wide 300), but the open-file limit (256)" in json.dumps(record)
        for record in records
    ), records
    assert not [record for record in records if record["event"].startswith("worker_")]


# -- 10,000 ports --------------------------------------------------------------------------------


@pytest.mark.slow  # 10,000 listeners, three starts
def test_a_10000_port_rule_starts_reloads_and_stops_in_seconds(start_gportmap, banners, tmp_path):
    """Its idle memory per port is printed (RSS growth / ports) for the report."""
    listen = free_block(10000)
    target = free_block(2)
    banners(target)
    small = start_gportmap([range_rule(range(listen.start, listen.start + 1), target.start, name="one")])
    small_rss = small.rss_kib()
    small.close()
    began = time.monotonic()
    gp = start_gportmap([range_rule(listen, target.start, name="big")])
    started = time.monotonic() - began
    assert banner(listen[-1]) == target.start and banner(listen.start + 5000) == target.start
    rss = gp.rss_kib()
    began = time.monotonic()
    _rewrite(gp, [range_rule(listen, target.start + 1, name="big")])
    reloaded = time.monotonic() - began
    assert banner(listen[-1]) == target.start + 1
    began = time.monotonic()
    gp.signal()
    assert gp.wait_exit(60) == 0
    stopped = time.monotonic() - began
    per_port = (rss - small_rss) * 1024 / (len(listen) - 1)
    print(f"\n10,000 ports: start {started:.2f}s, reload {reloaded:.2f}s, stop {stopped:.2f}s, "
          f"RSS {rss / 1024:.1f} MiB vs {small_rss / 1024:.1f} MiB for one port: {per_port:.0f} bytes per idle port")
    assert per_port < 16384  # a descriptor and a watcher, not a server object per port


# -- dry run, workers, upgrade in place --------------------------------------------------------


def test_a_dry_run_names_ranges_compactly_and_the_first_port_in_use(start_gportmap, echo_target):
    listen = free_block(30)
    rule = range_rule(listen[:10], echo_target.port, name="grow")
    gp = start_gportmap([rule])
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind((LOOPBACK, listen.start + 25))
    blocker.listen(1)
    try:
        gp.rules_path.write_text(json.dumps([{**rule, "listenPort": span(listen)}]))
        status, body, _ = gp.admin("/reload?dry_run=1", method="POST")
        answer = json.loads(body)
    finally:
        blocker.close()
    assert status == 200 and answer["changes"]["changed"] == ["grow"]
    impact = answer["impact"]
    assert impact["listeners_opened"] == [{"rule": "grow", "transport": "tcp", "listen": f"{LOOPBACK}:{listen.start + 10}-{listen[-1]}"}]
    assert impact["listeners_closed"] == []
    assert [(p["rule"], p["listen"]) for p in impact["problems"]] == [("grow", f"{LOOPBACK}:{listen.start + 25}")]
    assert refused(listen.start + 10)  # nothing changed


def listening_inodes(ports: range) -> set[str]:
    """Inodes of the TCP sockets listening on ``ports`` (any process)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].rsplit(":", 1)[1], 16)
        if fields[3] == "0A" and port in ports:
            inodes.add(fields[9])
    return inodes


def held_sockets(pid: int, inodes: set[str]) -> int:
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


def test_every_worker_listens_on_every_port_of_a_range(start_gportmap, banners):
    listen, target = free_block(50), free_block(50)
    banners(target)
    gp = start_gportmap([range_rule(listen, target)], "--workers", "2")
    workers = wait_for(lambda: len(gp.children()) == 2 and gp.children(), what="two workers")
    wait_for(lambda: all(held_sockets(pid, listening_inodes(listen)) == 50 for pid in workers),
             what="each worker holding its own socket on each of the 50 ports")
    assert len(listening_inodes(listen)) == 100  # SO_REUSEPORT: a socket per worker and port
    for port in sample(listen, 10):
        assert banner(port) == target.start + port - listen.start


@pytest.mark.slow  # an upgrade: two programs
def test_an_upgrade_in_place_keeps_a_range_serving(start_gportmap, banners):
    listen, target = free_block(40), free_block(40)
    udp_listen, udp_target = free_block(5), free_block(5)
    banners(target)
    banners(udp_target, udp=True)
    gp = start_gportmap([range_rule(listen, target), range_rule(udp_listen, udp_target, protocol="udp", name="udp")])
    pid = gp.pid
    before = listening_inodes(listen)
    assert len(before) == len(listen)
    gp.signal(signal.SIGUSR2)
    gp.wait_event("upgraded", 30)
    assert gp.pid == pid
    # every port's listening socket carried across the exec, none bound anew: no
    # attempt can be refused in between
    assert listening_inodes(listen) == before
    wait_for(lambda: banner_or_none(listen[-1]) == target[-1], what="the range serving after the upgrade")
    for port in sample(listen, 10):
        assert banner(port) == target.start + port - listen.start
    wait_for(lambda: udp_banner_or_none(udp_listen[-1]) == udp_target[-1], what="the udp range after the upgrade")


def udp_banner_or_none(port: int) -> int | None:
    try:
        return udp_banner(port)[0]
    except OSError:
        return None


def banner_or_none(port: int) -> int | None:
    try:
        return banner(port)
    except (OSError, AssertionError):
        return None
