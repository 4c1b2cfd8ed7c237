"""Toxiproxy's HTTP API on gportmap (SPEC §12): Toxiproxy's own Python client
library (``toxiproxy-python``, from PyPI) drives gportmap run as a subprocess:
make a proxy, add and remove toxics, and see the effect on real traffic; the API's
status codes and error bodies; proxies beside the rules file's rules, surviving
its reloads, and the file winning a clash.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import toxiproxy  # toxiproxy-python from PyPI, a test extra (setup.py)
from conftest import (
    LOOPBACK,
    closed_by_peer,
    connect,
    free_port,
    metric,
    recv_exactly,
    rule_stats,
    tcp_rule,
    wait_for,
)


def api(port: int, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """One request to the Toxiproxy API: (status, JSON body or text, None when empty)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    if not raw:
        return status, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def round_trip(port: int, sock: socket.socket | None = None) -> float:
    own = sock is None
    sock = sock or connect(port)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        return time.monotonic() - started
    finally:
        if own:
            sock.close()


def fastest(port: int, sock: socket.socket | None = None) -> float:
    """The quickest of three round trips: a slow one on 2 shared cores is the
    machine's doing; a fault delays all three."""
    return min(round_trip(port, sock) for _ in range(3))


@pytest.fixture
def with_api(start_gportmap, echo_target):
    """gportmap with the Toxiproxy API on, one file rule ("filerule"), and the
    client library pointed at it."""
    api_port, file_port = free_port(), free_port()
    rules = {
        "settings": {"toxiproxy": {"listen": f"{LOOPBACK}:{api_port}"}},
        "rules": [tcp_rule(file_port, echo_target.port, name="filerule")],
    }
    gp = start_gportmap(rules)
    gp.wait_event("toxiproxy_started")
    server = toxiproxy.Toxiproxy()
    server.update_api_consumer(LOOPBACK, api_port)
    yield gp, server, api_port, file_port, rules, echo_target


def test_the_client_library_makes_a_proxy_and_toxics_change_its_traffic(with_api) -> None:
    gp, server, api_port, _, _, echo = with_api
    port = free_port()
    proxy = server.create(upstream=f"{LOOPBACK}:{echo.port}", name="db", listen=f"{LOOPBACK}:{port}")
    assert proxy.listen == f"{LOOPBACK}:{port}" and proxy.enabled
    assert fastest(port) < 0.19
    held = connect(port)  # a connection open before the toxic gets it on its next data
    try:
        assert fastest(port, held) < 0.19
        proxy.add_toxic(type="latency", attributes={"latency": 200})
        assert list(proxy.toxics()) == ["latency_downstream"]
        assert round_trip(port) >= 0.19
        assert round_trip(port, held) >= 0.19
        proxy.destroy_toxic("latency_downstream")
        assert fastest(port) < 0.19
        assert fastest(port, held) < 0.19
    finally:
        held.close()
    stats = rule_stats(gp, "db")
    assert stats["source"] == "toxiproxy" and stats["listen"] == f"{LOOPBACK}:{port}"
    assert rule_stats(gp, "filerule")["source"] == "file"
    assert metric(gp, "gportmap_faults_applied_total", rule="db", type="latency") >= 2
    held = connect(port)
    with proxy.down():  # Toxiproxy drops the proxy's connections: no drainTimeout (30 s) here
        wait_for(lambda: _refused(port))
        assert closed_by_peer(held, timeout=5)
    held.close()
    assert round_trip(port) < 1
    assert json.loads(server.version()) == {"version": "2.9.0"}
    proxy.destroy()
    assert server.proxies() == {}
    wait_for(lambda: _refused(port))


def _refused(port: int) -> bool:
    try:
        connect(port, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_timeout_added_to_an_open_connection_closes_it_without_data(with_api) -> None:
    """As Toxiproxy's: the timeout runs from the moment the toxic is added."""
    _, server, _, _, _, echo = with_api
    port = free_port()
    proxy = server.create(upstream=f"{LOOPBACK}:{echo.port}", name="stall", listen=f"{LOOPBACK}:{port}")
    with connect(port) as held:
        assert round_trip(port, held) < 1
        proxy.add_toxic(type="timeout", attributes={"timeout": 300})
        started = time.monotonic()
        assert closed_by_peer(held, timeout=10)
        assert 0.25 <= time.monotonic() - started < 5


def test_limit_data_and_reset_through_the_api(with_api) -> None:
    _, server, _, _, _, echo = with_api
    port = free_port()
    proxy = server.create(upstream=f"{LOOPBACK}:{echo.port}", name="cut", listen=f"{LOOPBACK}:{port}")
    proxy.add_toxic(type="reset_peer", stream="upstream", attributes={"timeout": 0})
    with connect(port) as sock:
        sock.sendall(b"ping")
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    server.reset()  # removes every toxic
    assert proxy.toxics() == {}
    assert round_trip(port) < 1


def test_status_codes_and_error_bodies_are_toxiproxys(with_api) -> None:
    _, _, api_port, file_port, _, echo = with_api
    port = free_port()
    upstream = f"{LOOPBACK}:{echo.port}"
    assert api(api_port, "/version") == (200, {"version": "2.9.0"})
    assert api(api_port, "/proxies") == (200, {})
    status, made = api(api_port, "/proxies", "POST", {"name": "p", "listen": f"{LOOPBACK}:{port}", "upstream": upstream})
    assert status == 201
    assert made == {"name": "p", "listen": f"{LOOPBACK}:{port}", "upstream": upstream, "enabled": True, "toxics": []}
    assert api(api_port, "/proxies", "POST", {"name": "p", "listen": f"{LOOPBACK}:{free_port()}", "upstream": upstream}) == (
        409, {"error": "proxy already exists", "status": 409}
    )
    assert api(api_port, "/proxies", "POST", {"listen": "127.0.0.1:0", "upstream": upstream}) == (
        400, {"error": "missing required field: name", "status": 400}
    )
    assert api(api_port, "/proxies/nope") == (404, {"error": "proxy not found", "status": 404})
    assert api(api_port, "/proxies/p/toxics", "POST", {"type": "nonsense"}) == (
        400, {"error": "invalid toxic type", "status": 400}
    )
    assert api(api_port, "/proxies/p/toxics", "POST", {"type": "latency", "stream": "sideways"}) == (
        400, {"error": "stream was invalid, can be either upstream or downstream", "status": 400}
    )
    toxic = {"name": "lag", "type": "latency", "stream": "upstream", "toxicity": 1.0, "attributes": {"latency": 10, "jitter": 0}}
    assert api(api_port, "/proxies/p/toxics", "POST", toxic) == (200, toxic)
    assert api(api_port, "/proxies/p/toxics", "POST", toxic) == (409, {"error": "toxic already exists", "status": 409})
    updated = {**toxic, "attributes": {"latency": 20, "jitter": 0}}
    assert api(api_port, "/proxies/p/toxics/lag", "POST", {"attributes": {"latency": 20}}) == (200, updated)
    assert api(api_port, "/proxies/p/toxics/lag") == (200, updated)
    assert api(api_port, "/proxies/p/toxics") == (200, [updated])
    assert api(api_port, "/proxies/p/toxics/lag", "DELETE") == (204, None)
    assert api(api_port, "/proxies/p/toxics/lag") == (404, {"error": "toxic not found", "status": 404})
    assert api(api_port, "/proxies/p", "POST", {"enabled": False})[1]["enabled"] is False
    wait_for(lambda: _refused(port))
    # the rules file's names and ports are not the API's to take
    assert api(api_port, "/proxies", "POST", {"name": "filerule", "listen": f"{LOOPBACK}:{free_port()}", "upstream": upstream}) == (
        409, {"error": "the rules file has a rule named filerule", "status": 409}
    )
    assert api(api_port, "/proxies", "POST", {"name": "q", "listen": f"{LOOPBACK}:{file_port}", "upstream": upstream}) == (
        409, {"error": f"port {file_port} is used by rule filerule of the rules file", "status": 409}
    )
    taken = socket.socket()  # another process's port: Toxiproxy answers 500 with the bind error
    try:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        status, body = api(api_port, "/proxies", "POST", {"name": "busy", "listen": f"{LOOPBACK}:{taken.getsockname()[1]}", "upstream": upstream})
        assert status == 500 and "in use" in body["error"], body
        assert api(api_port, "/proxies/busy")[0] == 404  # nothing is held
    finally:
        taken.close()
    status, body = api(api_port, "/populate", "POST", [{"name": "r", "listen": f"{LOOPBACK}:{free_port()}", "upstream": upstream}])
    assert status == 201 and [proxy["name"] for proxy in body["proxies"]] == ["r"]
    assert api(api_port, "/reset", "POST") == (204, None)
    assert api(api_port, "/proxies/p")[1]["enabled"] is True  # reset enables every proxy
    assert api(api_port, "/proxies/r", "DELETE") == (204, None)
    assert sorted(api(api_port, "/proxies")[1]) == ["p"]


def test_proxies_survive_reloads_and_the_file_wins_a_clash(with_api) -> None:
    gp, server, _, file_port, rules, echo = with_api
    port = free_port()
    server.create(upstream=f"{LOOPBACK}:{echo.port}", name="kept", listen=f"{LOOPBACK}:{port}")
    generation = gp.admin_json("/stats")["config"]["generation"]

    def reload(document: dict) -> None:
        nonlocal generation
        gp.rules_path.write_text(json.dumps(document))
        wait_for(lambda: gp.admin_json("/stats")["config"]["generation"] > generation, timeout=15)
        generation = gp.admin_json("/stats")["config"]["generation"]

    rules["rules"][0]["idleTimeout"] = 100  # any change of the file
    reload(rules)
    assert round_trip(port) < 1
    assert rule_stats(gp, "kept")["source"] == "toxiproxy"
    # the file takes the proxy's port: the reload applies, the file's rule serves there
    rules["rules"].append(tcp_rule(port, echo.port, name="takes"))
    reload(rules)
    assert gp.admin_json("/stats")["config"]["last_error"] is None
    assert rule_stats(gp, "takes")["state"] == "running"
    assert "kept" not in [rule["name"] for rule in gp.admin_json("/stats")["rules"]]
    assert gp.wait_event("toxiproxy_shadowed", proxy="kept")
    assert "kept" in server.proxies()  # still held, as Toxiproxy would
    # the file gives the port back: the proxy runs again
    rules["rules"].pop()
    reload(rules)
    wait_for(lambda: rule_stats(gp, "kept")["state"] == "running")
    assert round_trip(port) < 1


def test_proxies_obey_allow_targets(start_gportmap, echo_target) -> None:
    api_port = free_port()
    gp = start_gportmap({
        "settings": {"toxiproxy": {"listen": f"{LOOPBACK}:{api_port}"}, "allowTargets": [f"127.0.0.1/32:{echo_target.port}"]},
        "rules": [],
    })
    gp.wait_event("toxiproxy_started")
    listen = f"{LOOPBACK}:{free_port()}"
    status, body = api(api_port, "/proxies", "POST", {"name": "out", "listen": listen, "upstream": f"{LOOPBACK}:{echo_target.port + 1}"})
    assert status == 403 and "outside settings.allowTargets" in body["error"], body
    status, _ = api(api_port, "/proxies", "POST", {"name": "in", "listen": listen, "upstream": f"{LOOPBACK}:{echo_target.port}"})
    assert status == 201
    assert round_trip(int(listen.rsplit(":", 1)[1])) < 1


@pytest.mark.slow  # an upgrade in place
def test_after_an_upgrade_in_place_the_api_listens_again(with_api) -> None:
    """SIGUSR2 with a connection that cannot be carried (a proxy's: the greenlet
    relay) forks a drainer: it must not keep the API's listening socket, or the new
    program could not bind it. The proxies themselves live in memory, as
    Toxiproxy's do: the new program starts without them."""
    gp, server, api_port, _, _, echo = with_api
    port = free_port()
    server.create(upstream=f"{LOOPBACK}:{echo.port}", name="up", listen=f"{LOOPBACK}:{port}")
    with connect(port) as held:
        assert round_trip(port, held) < 1
        gp.signal(signal.SIGUSR2)
        record = gp.wait_for_any(("upgraded", "upgrade_unsupported", "upgrade_failed"), timeout=60)
        if record["event"] == "upgrade_unsupported":
            pytest.skip(record.get("message", "no upgrade in place here"))
        assert record["event"] == "upgraded", record
        assert record["draining"] >= 1
        gp.wait_event("toxiproxy_started", timeout=30, count=2)
        assert not gp.events("toxiproxy_failed")
        assert api(api_port, "/version") == (200, {"version": "2.9.0"})
        assert round_trip(port, held) < 1  # the drainer still relays it
