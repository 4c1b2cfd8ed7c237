"""SPEC §5: the admin endpoint, Prometheus metrics, the stats log and the dashboard."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from conftest import (
    LOOPBACK,
    TargetServer,
    closed_by_peer,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    require_tool,
    tcp_rule,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

SPEC_TCP_METRICS = {
    "gportmap_rule_up": ("gauge", {"rule", "protocol"}),
    "gportmap_connections_active": ("gauge", {"rule", "protocol"}),
    "gportmap_connections": ("counter", {"rule", "protocol"}),
    "gportmap_connections_rejected": ("counter", {"rule", "protocol", "reason"}),
    "gportmap_upstream_connect_failures": ("counter", {"rule", "protocol"}),
    "gportmap_received_bytes": ("counter", {"rule", "protocol"}),
    "gportmap_sent_bytes": ("counter", {"rule", "protocol"}),
    "gportmap_config_reloads": ("counter", {"result"}),
    "gportmap_config_last_reload_success_timestamp_seconds": ("gauge", set()),
}


def metrics(gp, token: str | None = None) -> dict[str, dict]:
    """name -> {"type", "samples": {(sample name, frozenset(labels.items())): value}}"""
    status, body, headers = gp.admin("/metrics", token=token)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {}
    for family in text_string_to_metric_families(body.decode()):
        families[family.name] = {
            "type": family.type,
            "samples": {(s.name, frozenset(s.labels.items())): s.value for s in family.samples},
        }
    return families


def sample(families: dict, family: str, name: str, **labels: str) -> float:
    return families[family]["samples"][(name, frozenset(labels.items()))]


def rule_stats(gp, name: str) -> dict:
    return next(rule for rule in gp.admin_json("/stats")["rules"] if rule["name"] == name)


def test_known_traffic_shows_exactly_in_stats_and_metrics(start_gportmap):
    """M=5 connections of N=10000 bytes up and 2N down each, K=2 rejected."""
    up, down = os.urandom(10_000), os.urandom(20_000)
    release = threading.Event()

    def handler(conn: socket.socket) -> None:
        assert recv_exactly(conn, len(up)) == up
        conn.sendall(down)
        release.wait(30)

    target = TargetServer(handler)
    port = free_port()
    gp = start_gportmap([tcp_rule(port, target.port, name="known", maxConnections=5)])
    try:
        socks = [connect(port) for _ in range(5)]
        for sock in socks:
            sock.sendall(up)
            assert recv_exactly(sock, len(down)) == down
        wait_for(lambda: rule_stats(gp, "known")["connections"]["active"] == 5, what="5 active")
        for _ in range(2):
            extra = connect(port)
            assert recv_until_eof(extra) == b""
            extra.close()
        stats = rule_stats(gp, "known")
        connections = {key: stats["connections"][key] for key in ("active", "total", "rejected", "rejected_by_reason")}
        assert connections == {
            "active": 5,
            "total": 5,
            "rejected": 2,
            "rejected_by_reason": {"acl": 0, "limit": 2, "tls": 0, "plugin": 0, "handshake": 0,
                                   "no_route": 0, "proxy_header": 0, "client_limit": 0},
        }
        assert stats["bytes"] == {"received": 5 * len(up), "sent": 5 * len(down)}
        assert stats["state"] == "running" and stats["listen"] == f"127.0.0.1:{port}"
        assert len(gp.admin_json("/connections")) == 5
        families = metrics(gp)
        labels = {"rule": "known", "protocol": "tcp"}
        assert sample(families, "gportmap_connections_active", "gportmap_connections_active", **labels) == 5
        release.set()
        for sock in socks:
            sock.close()
        wait_for(lambda: rule_stats(gp, "known")["connections"]["active"] == 0, what="back to 0 active")
        families = metrics(gp)
        assert sample(families, "gportmap_connections_active", "gportmap_connections_active", **labels) == 0
        assert sample(families, "gportmap_connections", "gportmap_connections_total", **labels) == 5
        assert sample(families, "gportmap_received_bytes", "gportmap_received_bytes_total", **labels) == 5 * len(up)
        assert sample(families, "gportmap_sent_bytes", "gportmap_sent_bytes_total", **labels) == 5 * len(down)
        rejected = "gportmap_connections_rejected"
        assert sample(families, rejected, rejected + "_total", reason="limit", **labels) == 2
        assert sample(families, rejected, rejected + "_total", reason="acl", **labels) == 0
        assert sample(families, "gportmap_rule_up", "gportmap_rule_up", **labels) == 1
    finally:
        release.set()
        target.close()


def test_every_spec_metric_is_present_with_its_labels_from_the_start(start_gportmap, echo_target):
    dead, b_port = free_port(), free_port()
    gp = start_gportmap([tcp_rule(free_port(), echo_target.port, name="a"), tcp_rule(b_port, dead, name="b")])
    families = metrics(gp)
    for name, (kind, labels) in SPEC_TCP_METRICS.items():
        assert name in families, name
        assert families[name]["type"] == kind, name
        for _name, sample_labels in families[name]["samples"]:
            assert {key for key, _ in sample_labels} == labels, (name, sample_labels)
    rules = {dict(labels)["rule"] for _, labels in families["gportmap_rule_up"]["samples"]}
    assert rules == {"a", "b"}
    reasons = {dict(labels)["reason"] for _, labels in families["gportmap_connections_rejected"]["samples"]}
    assert reasons == {"acl", "limit", "tls", "plugin", "handshake", "no_route", "proxy_header", "client_limit"}
    results = {dict(labels)["result"] for _, labels in families["gportmap_config_reloads"]["samples"]}
    assert results == {"success", "failure"}
    assert "process_resident_memory_bytes" in families and "process_open_fds" in families
    # A refused target connect counts as an upstream failure.
    sock = connect(b_port)
    recv_until_eof(sock)
    sock.close()
    wait_for(lambda: rule_stats(gp, "b")["upstream_connect_failures"] == 1, what="connect failure counted")
    families = metrics(gp)
    failures = "gportmap_upstream_connect_failures"
    assert sample(families, failures, failures + "_total", rule="b", protocol="tcp") == 1


def _admin_from(gp, source: str, path: str, method: str, token: str | None = None) -> int:
    """The status of one admin request sent from ``source`` (another client)."""
    conn = http.client.HTTPConnection(LOOPBACK, gp.admin_port, timeout=20, source_address=(source, 0))
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_token_guards_every_endpoint_but_healthz(start_gportmap, echo_target):
    token = "s3cret-token-for-tests"
    gp = start_gportmap({"settings": {"admin": {"token": token}}, "rules": [tcp_rule(free_port(), echo_target.port)]})
    endpoints = [("/metrics", "GET"), ("/stats", "GET"), ("/connections", "GET"), ("/", "GET"), ("/reload", "POST")]
    for number, (path, method) in enumerate(endpoints):
        status, _, headers = gp.admin(path, method)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        # Each wrong token from a loopback address of its own: past a few, one client's
        # wrong tokens are answered only after a growing delay (tests/test_admin_edge.py).
        assert _admin_from(gp, f"127.0.0.{20 + number}", path, method, "wrong") == 401, path
        assert gp.admin(path, method, token=token)[0] == 200, path
    assert gp.admin("/healthz")[0] == 200
    assert gp.admin(f"/?token={token}")[0] == 200  # the dashboard's own URL
    assert _admin_from(gp, "127.0.0.30", "/?token=nope", "GET") == 401
    assert gp.admin(f"/reload?token={token}", "POST")[0] == 401  # query tokens only for reading


@pytest.mark.slow  # headless chromium
def test_a_browser_without_the_token_gets_a_page_that_says_how_and_a_form_that_does_it(
    start_gportmap, echo_target, tmp_path
):
    """A token-protected dashboard opened in a browser: a 401 page naming
    ``/?token=`` with a field for it (not a JSON error); API clients keep the JSON."""
    from cdp import Chromium

    token = "s3cret-token-for-tests"
    gp = start_gportmap({"settings": {"admin": {"token": token}}, "rules": [tcp_rule(free_port(), echo_target.port)]})
    request = urllib.request.Request(f"http://{LOOPBACK}:{gp.admin_port}/", headers={"Accept": "text/html,*/*"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10)
    assert answer.value.code == 401
    assert answer.value.headers["Content-Type"].startswith("text/html")
    page = answer.value.read().decode()
    assert "/?token=TOKEN" in page and 'name="token"' in page and "http" not in page.split("<body>")[0]
    status, body, headers = gp.admin("/")  # no Accept: text/html
    assert (status, headers["Content-Type"]) == (401, "application/json")
    assert json.loads(body)["error"].startswith("unauthorized")

    chromium = Chromium(require_tool("chromium"), tmp_path / "profile")
    try:
        chromium.navigate(f"http://{LOOPBACK}:{gp.admin_port}/")
        wait_for(lambda: chromium.evaluate("document.querySelector('input[name=token]') !== null"), timeout=15,
                 what="the token page")
        chromium.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(token)}")
        chromium.evaluate("document.querySelector('form').submit()")

        def page(expression: str) -> object:
            """The expression on the page; None while the form's navigation replaces it."""
            try:
                return chromium.evaluate(expression)
            except RuntimeError:  # "Inspected target navigated or closed": try again
                return None

        wait_for(lambda: page("document.title") == "gportmap", timeout=15, what="the dashboard")
        wait_for(lambda: str(page("document.getElementById('live')?.textContent")).startswith("live"),
                 timeout=15, what="the dashboard reading /stats with the token")
    finally:
        chromium.close()


def test_healthz_is_503_while_a_rule_cannot_bind(start_gportmap, echo_target):
    blocker = socket.socket()
    blocker.bind((LOOPBACK, 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="late"), tcp_rule(free_port(), echo_target.port, name="ok")])
    status, body, _ = gp.admin("/healthz")
    assert status == 503
    health = json.loads(body)
    assert health["status"] == "failing" and [f["rule"] for f in health["failing"]] == ["late"]
    assert "already in use" in health["failing"][0]["error"]
    assert rule_stats(gp, "late")["state"] == "failed"
    assert sample(metrics(gp), "gportmap_rule_up", "gportmap_rule_up", rule="late", protocol="tcp") == 0
    blocker.close()
    wait_for(lambda: gp.admin("/healthz")[0] == 200, timeout=10, interval=0.2, what="healthz 200")
    assert json.loads(gp.admin("/healthz")[1]) == {"status": "ok"}


def test_reload_endpoint_applies_or_reports_errors(start_gportmap, echo_target):
    port = free_port()
    rules = [tcp_rule(port, echo_target.port, name="web")]
    gp = start_gportmap({"settings": {"watch": False}, "rules": rules})
    extra = tcp_rule(free_port(), echo_target.port, name="extra")
    gp.rules_path.write_text(json.dumps({"settings": {"watch": False}, "rules": rules + [extra]}))
    result = gp.admin_json("/reload", "POST")
    assert result == {"status": "reloaded", "added": ["extra"], "changed": [], "removed": [], "unchanged": ["web"], "coalesced": 1}
    gp.rules_path.write_text('{"rules": [{"protocol": "tcp"}]}')
    status, body, _ = gp.admin("/reload", "POST")
    assert status == 400
    errors = json.loads(body)["errors"]
    assert any("missing required key 'listenPort'" in error for error in errors)
    stats = gp.admin_json("/stats")
    assert stats["config"]["reloads"] == {"success": 1, "failure": 1}
    assert stats["config"]["last_error"] == errors
    assert [r["name"] for r in stats["rules"]] == ["web", "extra"]  # the old rules serve on
    with connect(port) as sock:
        sock.sendall(b"still")
        assert recv_exactly(sock, 5) == b"still"
    families = metrics(gp)
    assert sample(families, "gportmap_config_reloads", "gportmap_config_reloads_total", result="failure") == 1
    assert gp.admin("/reload")[0] == 405
    assert gp.admin("/nope")[0] == 404


@pytest.mark.slow  # a bulk transfer
def test_scraping_during_a_bulk_transfer_changes_nothing(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="bulk")])
    payload = os.urandom(32 * 1024 * 1024)
    sock = connect(port, timeout=60)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_until_eof(sock)))
    reader.start()
    writer = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
    writer.start()
    scrapes = 0
    while scrapes < 1000:
        assert gp.admin("/metrics")[0] == 200
        scrapes += 1
    writer.join(60)
    reader.join(60)
    sock.close()
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()
    (closed,) = gp.wait_event("connection_closed", rule="bulk")
    assert closed["bytes_received"] == closed["bytes_sent"] == len(payload)
    stats = rule_stats(gp, "bulk")
    assert stats["bytes"] == {"received": len(payload), "sent": len(payload)}


@pytest.mark.slow  # starts gportmap three times
def test_admin_off_and_admin_port_taken_never_stop_forwarding(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port)], "--admin", "off")
    assert gp.events("admin_started") == []
    with connect(port) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
    gp.close()

    blocker = socket.socket()
    blocker.bind((LOOPBACK, 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    try:
        gp = start_gportmap([tcp_rule(port, echo_target.port)], "--admin", f"127.0.0.1:{taken}")
        (failed,) = gp.wait_event("admin_failed")
        assert "already in use" in failed["error"]
        with connect(port) as sock:
            sock.sendall(b"b")
            assert recv_exactly(sock, 1) == b"b"
    finally:
        blocker.close()
    gp.wait_event("admin_started", timeout=10)  # retried once the port is free


def test_a_malformed_admin_request_does_not_touch_forwarding(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port)])
    with connect(port) as stream:
        for junk in (b"\x00\xff garbage\r\n\r\n", b"GET " + b"/a" * 40000 + b" HTTP/1.1\r\n\r\n", b"POST /reload HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nx"):
            with connect(gp.admin_port) as admin:
                try:
                    admin.sendall(junk)
                    admin.shutdown(socket.SHUT_WR)
                    recv_until_eof(admin)
                except OSError:
                    pass  # refusing garbage with a reset or closing first is fine; what matters is below
        stream.sendall(b"alive")
        assert recv_exactly(stream, 5) == b"alive"
    assert gp.admin("/healthz")[0] == 200


def test_malformed_requests_are_logged_at_a_bounded_rate_without_their_bytes(start_gportmap, echo_target):
    gp = start_gportmap([tcp_rule(free_port(), echo_target.port)])
    for n in range(40):
        with connect(gp.admin_port) as admin:
            admin.sendall(b"GET /secret-%d HTTP/1\r\n\r\n" % n)  # pywsgi's parser fails on this one
            assert recv_until_eof(admin).startswith(b"HTTP/1.1 400")
    records = gp.wait_event("bad_request", count=5)
    assert gp.admin("/healthz")[0] == 200  # a good request after them: the log has caught up
    records = gp.events("bad_request")
    assert len(records) == 5, "at most 5 per 10 s per server"
    assert all(r["level"] == "WARNING" and r["client"].startswith(LOOPBACK) for r in records)
    assert all(len(r["error"]) <= 200 for r in records)
    assert not [r for r in gp.events() if r["level"] in ("ERROR", "CRITICAL")]


def test_stats_log_records_per_interval_and_on_sigusr1(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap({"settings": {"statsInterval": 0.3}, "rules": [tcp_rule(port, echo_target.port, name="s")]})
    with connect(port) as sock:
        sock.sendall(b"12345")
        assert recv_exactly(sock, 5) == b"12345"
    gp.wait_event("connection_closed")
    records = gp.wait_event("stats", count=2, source="interval")
    last = records[-1]["rules"][0]
    assert last["rule"] == "s" and last["total"] == 1 and last["bytes_received"] == 5 and last["state"] == "running"
    gp.signal(signal.SIGUSR1)
    (on_signal,) = gp.wait_event("stats", source="signal")
    assert on_signal["rules"][0]["bytes_sent"] == 5


@pytest.mark.slow  # headless chromium
def test_dashboard_in_headless_chromium_shows_live_numbers(start_gportmap, echo_target, tmp_path):
    from cdp import Chromium

    chromium = Chromium(require_tool("chromium"), tmp_path / "profile")
    port = free_port()
    gp = start_gportmap(
        [tcp_rule(port, echo_target.port, name="web"), tcp_rule(free_port(), free_port(), name="idle", idleTimeout=5)]
    )
    cell = "document.querySelector('tr[data-rule=\"web\"] .{}')?.textContent"
    try:
        chromium.navigate(f"http://{LOOPBACK}:{gp.admin_port}/")
        wait_for(lambda: chromium.evaluate(cell.format("total")) == "0", timeout=15, what="the page to render")
        assert chromium.evaluate("document.title") == "gportmap"
        socks = [connect(port) for _ in range(3)]
        for sock in socks:
            sock.sendall(os.urandom(300_000))
            recv_exactly(sock, 300_000)
        wait_for(lambda: chromium.evaluate(cell.format("active")) == "3", timeout=10, what="3 open on the page")
        assert chromium.evaluate(cell.format("received")) == "878.9 KiB"
        for sock in socks:
            sock.close()
        wait_for(lambda: chromium.evaluate(cell.format("total")) == "3", timeout=10, what="total 3 on the page")
        wait_for(lambda: chromium.evaluate(cell.format("active")) == "0", timeout=10, what="0 open on the page")
        shot = chromium.screenshot(tmp_path / "dashboard.png")
        assert shot.stat().st_size > 10_000
        print(f"dashboard screenshot: {shot}")
    finally:
        chromium.close()


@pytest.mark.slow  # headless chromium
def test_dashboard_shows_limit_peak_reasons_failures_process_and_a_rule_without_targets(
    start_gportmap, echo_target, tmp_path
):
    """What an operator looks for first (HAProxy's stats page has it): each rule's
    limit and peak, new connections per second, rejections by reason, connect
    failures, the process's descriptors and memory, and a rule whose only target
    refuses shown as not serving rather than a green "running"."""
    from cdp import Chromium

    chromium = Chromium(require_tool("chromium"), tmp_path / "profile")
    port, dead_port = free_port(), free_port()
    gp = start_gportmap([
        tcp_rule(port, echo_target.port, name="web", maxConnections=2),
        tcp_rule(dead_port, free_port(), name="dead", maxFails=1, failTimeout=3600),
    ])
    cell = "document.querySelector('tr[data-rule=\"{}\"] .{}')?.textContent"
    try:
        chromium.navigate(f"http://{LOOPBACK}:{gp.admin_port}/")
        wait_for(lambda: chromium.evaluate(cell.format("web", "limit")) == "2", timeout=15, what="the page")
        assert chromium.evaluate(cell.format("dead", "state")) == "running"
        held = [connect(port) for _ in range(2)]
        for sock in held:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        with connect(port) as third:
            assert closed_by_peer(third)  # over maxConnections: rejected, reason limit
        for sock in held:
            sock.close()
        with connect(dead_port) as sock:
            assert closed_by_peer(sock)  # the target refuses: a connect failure, then down
        wait_for(lambda: chromium.evaluate(cell.format("web", "peak")) == "2", timeout=10, what="peak 2 on web")
        wait_for(lambda: chromium.evaluate(cell.format("web", "active")) == "0", timeout=10, what="0 open on web")
        wait_for(lambda: chromium.evaluate(cell.format("web", "reasons")) == "limit 1", timeout=10, what="reasons")
        wait_for(lambda: chromium.evaluate(cell.format("dead", "state")) == "no target up", timeout=10, what="dead")
        assert chromium.evaluate(cell.format("dead", "failures")) == "1"
        assert chromium.evaluate("document.getElementById('t-rules').textContent") == "1 / 2"
        files = chromium.evaluate("document.getElementById('t-files').textContent")
        assert int(files.replace(",", "")) > 5
        assert chromium.evaluate("document.getElementById('t-files-limit').textContent") != "–"
        assert chromium.evaluate("document.getElementById('t-rss').textContent").endswith("MiB")
        assert chromium.evaluate("document.getElementById('connections-link').getAttribute('href')") == "connections"
    finally:
        chromium.close()
    stats = json.loads(gp.admin("/stats")[1])
    web = next(rule for rule in stats["rules"] if rule["name"] == "web")
    assert (web["limit"], web["connections"]["peak"], web["connections"]["active"]) == (2, 2, 0)
    assert stats["connections"]["cap"] <= stats["connections"]["max"]
    assert stats["process"]["open_files"] > 0 and stats["process"]["rss_bytes"] > 1_000_000


def test_admin_settings_validation(tmp_path):
    from gportmap.config import parse
    from gportmap.errors import ConfigError

    def errors(settings: dict) -> list[str]:
        with pytest.raises(ConfigError) as info:
            parse(json.dumps({"settings": settings, "rules": []}), "rules.json")
        return info.value.errors

    assert errors({"admin": True}) == [
        'rules.json: settings.admin: true is not allowed: give {"listen": "HOST:PORT"} or false to turn it off'
    ]
    assert errors({"admin": {"listen": "9900"}}) == [
        "rules.json: settings.admin.listen: '9900' is not HOST:PORT (e.g. 127.0.0.1:9900)"
    ]
    assert errors({"admin": {"listen": "::1:9900"}})[0].endswith("write an IPv6 address in brackets, e.g. [::1]:9900")
    assert errors({"admin": {"lisen": "x"}}) == ["rules.json: settings.admin.lisen: unknown key (did you mean 'listen'?)"]
    assert errors({"statsInterval": -1}) == ["rules.json: settings.statsInterval: -1 is less than the minimum of 0"]
    config = parse(json.dumps({"settings": {"admin": {"listen": "[::1]:9901", "token": "t"}}, "rules": []}), "r")
    assert (config.settings.admin.host, config.settings.admin.port, config.settings.admin.token) == ("::1", 9901, "t")
    assert parse(json.dumps({"settings": {"admin": False}, "rules": []}), "r").settings.admin is None


@pytest.mark.slow  # headless chromium
def test_dashboard_shows_each_target_of_a_pool_with_its_state_open_and_failures(start_gportmap, echo_target, tmp_path):
    """SPEC §8 on the page: a pool's targets, one line each; a dead one turns down
    after maxFails, with its failures counted, while the live one carries on."""
    from cdp import Chromium

    chromium = Chromium(require_tool("chromium"), tmp_path / "profile")
    port, dead = free_port(), free_port()
    rule = {
        "name": "pool", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port, "maxFails": 1, "failTimeout": 3600,
        "targets": [{"host": LOOPBACK, "port": echo_target.port, "name": "live"},
                    {"host": LOOPBACK, "port": dead, "name": "dead"}],
    }
    gp = start_gportmap([rule])
    field = "document.querySelector('tr[data-rule=\"pool\"] .target[data-target=\"{}\"] .{}')?.textContent"
    try:
        chromium.navigate(f"http://{LOOPBACK}:{gp.admin_port}/")
        wait_for(lambda: chromium.evaluate(field.format("dead", "tstate")) == "up", timeout=15, what="the targets")
        held = [connect(port) for _ in range(2)]  # round robin: the one to "dead" is retried on "live"
        for sock in held:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        wait_for(lambda: chromium.evaluate(field.format("dead", "tstate")) == "down", timeout=10, what="dead down")
        assert chromium.evaluate(field.format("dead", "tfailures")) == "1"
        wait_for(lambda: chromium.evaluate(field.format("live", "tactive")) == "2", timeout=10, what="2 open on live")
        assert chromium.evaluate(field.format("live", "tstate")) == "up"
        for sock in held:
            sock.close()
        wait_for(lambda: chromium.evaluate(field.format("live", "tactive")) == "0", timeout=10, what="0 open on live")
    finally:
        chromium.close()


def test_target_metric_families_exist_from_the_start_and_healthz_names_a_rule_without_targets(
    start_gportmap, echo_target
):
    port, dead = free_port(), free_port()
    rule = {
        "name": "pool", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port, "maxFails": 1, "failTimeout": 3600,
        "targets": [{"host": LOOPBACK, "port": dead, "name": "only"}],
    }
    gp = start_gportmap([rule, tcp_rule(free_port(), echo_target.port, name="other")])
    body = gp.admin("/metrics")[1].decode()
    for line in (
        'gportmap_target_up{rule="pool",target="only"} 1.0',
        'gportmap_target_connections_active{rule="pool",target="only"} 0.0',
        'gportmap_target_connections_total{rule="pool",target="only"} 0.0',
        'gportmap_target_connect_failures_total{rule="pool",target="only"} 0.0',
        f'gportmap_target_up{{rule="other",target="{LOOPBACK}:{echo_target.port}"}} 1.0',
    ):
        assert line in body, line
    assert gp.admin("/healthz")[0] == 200
    with connect(port) as sock:
        assert closed_by_peer(sock)
    gp.wait_event("target_down", rule="pool", target="only")
    status, answer, _ = gp.admin("/healthz")
    assert status == 503
    assert json.loads(answer)["failing"] == [
        {"rule": "pool", "listen": f"{LOOPBACK}:{port}", "error": "no target is up (only down)"}
    ]
    body = gp.admin("/metrics")[1].decode()
    assert 'gportmap_target_up{rule="pool",target="only"} 0.0' in body
    assert 'gportmap_target_connect_failures_total{rule="pool",target="only"} 1.0' in body


def test_token_file_guards_the_endpoint_and_a_rotated_secret_applies_on_reload(start_gportmap, echo_target, tmp_path):
    """settings.admin.tokenFile: a Docker/Kubernetes secret mounted as a file, its
    trailing newline stripped, named relative to the rules file, re-read on reload."""
    secret = tmp_path / "secrets" / "admin-token"
    secret.parent.mkdir()
    secret.write_text("first-token\n")
    gp = start_gportmap(
        {"settings": {"admin": {"tokenFile": "secrets/admin-token"}}, "rules": [tcp_rule(free_port(), echo_target.port)]}
    )
    assert gp.admin("/stats")[0] == 401
    assert gp.admin("/stats", token="first-token")[0] == 200
    assert gp.admin("/healthz")[0] == 200
    secret.write_text("second-token\n")  # the secret rotates; the rules file does not change
    assert gp.admin("/stats", token="first-token")[0] == 200  # not before a reload
    gp.signal(signal.SIGHUP)
    wait_for(lambda: gp.admin("/stats", token="second-token")[0] == 200, what="the rotated token in force")
    assert gp.admin("/stats", token="first-token")[0] == 401
    secret.write_text("")  # an emptied secret is refused: the running token stays
    assert gp.admin("/reload", "POST", token="second-token")[0] == 400
    failed = gp.wait_event("config_invalid")[-1]
    assert str(secret) in json.dumps(failed) and "empty" in json.dumps(failed)
    assert gp.admin("/stats", token="second-token")[0] == 200


def run_check(tmp_path, document: dict) -> subprocess.CompletedProcess:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(document))
    return subprocess.run(
        [sys.executable, "-m", "gportmap", "--check", str(rules)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("admin", "content", "expected"),
    [
        ({"token": "t", "tokenFile": "tok"}, "x\n", "settings.admin: token and tokenFile are both given"),
        ({"tokenFile": "tok"}, "", "is empty: it must hold the admin token"),
        ({"tokenFile": "tok"}, "\n", "is empty: it must hold the admin token"),
        ({"tokenFile": "missing"}, None, "No such file or directory"),
        ({"tokenFile": "tok"}, "x" * 5000, "larger than the limit of 4,096 bytes"),
        ({"tokenFile": "tok"}, "two\nlines\n", "one line of printable characters"),
    ],
)
def test_token_file_problems_are_config_errors_naming_the_file(tmp_path, admin, content, expected):
    if content is not None:
        (tmp_path / "tok").write_text(content)
    result = run_check(tmp_path, {"settings": {"admin": admin}, "rules": []})
    assert result.returncode == 2, result
    assert expected in result.stderr + result.stdout
    if "token and tokenFile" not in expected:
        assert "settings.admin.tokenFile" in result.stderr + result.stdout
        assert str(tmp_path / admin["tokenFile"]) in result.stderr + result.stdout
