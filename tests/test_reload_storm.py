"""Reloads from every source at once, and reloads during the stop (issue 15), with
gportmap as a subprocess: what listens afterwards is exactly the last version, and
nothing opens after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import LOOPBACK, connect, free_port, recv_exactly, refused, tcp_rule, wait_for

#: Seconds the storm lasts: bounded, like every load loop here.
STORM_SECONDS = 4.0


def distinct_free_ports(count: int) -> list[int]:
    """``count`` different ports (free_port() alone may hand out one twice)."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def write_atomically(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)



def post_reload(admin_port: int) -> int:
    request = urllib.request.Request(f"http://{LOOPBACK}:{admin_port}/reload", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def stats_rules(gp) -> dict[str, str]:
    return {rule["name"]: rule["state"] for rule in gp.admin_json("/stats")["rules"]}


class Traffic:
    """Short echo connections to one port until stopped (bounded by ``limit``),
    counting the refused and the broken ones."""

    def __init__(self, port: int, limit: int = 20000) -> None:
        self.port, self.limit = port, limit
        self.ok = self.refused = self.broken = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.ok + self.refused + self.broken < self.limit:
            try:
                with connect(self.port, timeout=10) as sock:
                    sock.sendall(b"storm")
                    if recv_exactly(sock, 5) == b"storm":
                        self.ok += 1
                    else:
                        self.broken += 1
            except ConnectionRefusedError:
                self.refused += 1
            except OSError:
                self.broken += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.slow
def test_a_reload_storm_from_every_source_ends_on_exactly_the_last_version(start_gportmap, echo_target, tmp_path):
    target = echo_target.port
    common, *ports = distinct_free_ports(7)
    settings = {"drainTimeout": 2, "statsInterval": 0}

    def version(*rules: dict) -> str:
        return json.dumps({"settings": settings, "rules": [tcp_rule(common, target, name="common"), *rules]})

    v1 = version(tcp_rule(ports[0], target, name="x1"), tcp_rule(ports[1], target, name="x2"))
    v2 = version(
        tcp_rule(ports[2], target, name="y1"),
        tcp_rule(ports[3], target, name="y2", maxConnections=9),
        tcp_rule(ports[0], target, name="x1", maxConnections=5),  # x1 changed
    )
    last = version(tcp_rule(ports[4], target, name="z"), tcp_rule(ports[5], target, name="zz"))
    path = tmp_path / "rules.json"
    path.write_text(v1)
    gp = start_gportmap(None, rules_path=path)
    idle_fds = gp.open_fds()  # three listeners: common, x1, x2

    traffic = Traffic(common)
    stop = threading.Event()
    statuses: list[int] = []

    def writer() -> None:
        flip = False
        while not stop.is_set():
            text = v2 if flip else v1
            if flip:
                write_atomically(path, text)
            else:
                path.write_text(text)  # in place
            flip = not flip
            time.sleep(0.01)

    def hupper() -> None:
        while not stop.is_set():
            gp.signal(signal.SIGHUP)
            time.sleep(0.02)

    def poster() -> None:
        while not stop.is_set():
            statuses.append(post_reload(gp.admin_port))

    threads = [threading.Thread(target=f, daemon=True) for f in (writer, hupper, *[poster] * 20)]
    for thread in threads:
        thread.start()
    time.sleep(STORM_SECONDS)  # the storm's length, not a synchronisation
    stop.set()
    for thread in threads:
        thread.join(60)
    write_atomically(path, last)  # the last version, given last
    gp.signal(signal.SIGHUP)
    assert post_reload(gp.admin_port) == 200

    wait_for(lambda: set(stats_rules(gp)) == {"common", "z", "zz"}, timeout=30, what="the last version in /stats")
    assert set(stats_rules(gp).values()) == {"running"}
    traffic.stop()
    assert gp.proc.poll() is None
    for port in ports[:4]:
        assert refused(port), f"port {port} of an earlier version still listens"
    assert not refused(ports[4]) and not refused(ports[5]) and not refused(common)
    assert traffic.refused == 0 and traffic.broken == 0 and traffic.ok > 0, vars(traffic)
    assert statuses and set(statuses) <= {200, 400}, sorted(set(statuses))
    assert not gp.events("internal_error")
    # /stats names the file as it is, and the counters say every reload was handled.
    stats = gp.admin_json("/stats")
    assert stats["config"]["last_error"] is None
    # Back to the idle descriptors once the drains end: the same three listeners' worth.
    wait_for(lambda: gp.open_fds() == idle_fds, timeout=30, what=f"fds back to {idle_fds}")


@pytest.mark.slow
def test_a_sighup_during_a_reload_of_200_rules_to_one(start_gportmap, echo_target, tmp_path):
    """The bug (two SIGHUPs 50 ms apart did it): the second reload ran while the first
    still bound its 200 listeners;
    all 201 ports ended up listening, the removed rules kept forwarding, vanished from
    /stats, and could not be added back until a restart."""
    target = echo_target.port
    one, *many = distinct_free_ports(201)
    path = tmp_path / "rules.json"
    settings = {"drainTimeout": 1, "statsInterval": 0}
    path.write_text(json.dumps({"settings": settings, "rules": [tcp_rule(one, target, name="one")]}))
    gp = start_gportmap(None, rules_path=path)
    for attempt in range(3):
        write_atomically(path, json.dumps({"settings": settings, "rules": [tcp_rule(p, target, name=f"r{p}") for p in many]}))
        gp.signal(signal.SIGHUP)
        # The second SIGHUP lands while the first reload is binding its listeners.
        wait_for(lambda: not refused(many[0]), timeout=10, what="the first reload under way")
        write_atomically(path, json.dumps({"settings": settings, "rules": [tcp_rule(one, target, name="one")]}))
        gp.signal(signal.SIGHUP)
        wait_for(lambda: post_reload(gp.admin_port) == 200 and list(stats_rules(gp)) == ["one"], timeout=30)
        listening = [p for p in many if not refused(p)]
        assert listening == [], f"attempt {attempt}: {len(listening)} removed rules still listen"
    # A removed rule's port can be used again at once.
    write_atomically(path, json.dumps({"settings": settings, "rules": [tcp_rule(one, target, name="one"), tcp_rule(many[0], target, name="back")]}))
    assert post_reload(gp.admin_port) == 200
    assert stats_rules(gp) == {"one": "running", "back": "running"}


def test_after_sigterm_reloads_are_refused_and_no_listener_opens(start_gportmap, echo_target, tmp_path):
    """The bug: SIGHUP and POST /reload stayed live during the stop drain, and a reload
    then re-opened listeners that SIGTERM had closed."""
    target = echo_target.port
    port, added = free_port(), free_port()
    path = tmp_path / "rules.json"
    settings = {"drainTimeout": 30, "statsInterval": 0}
    path.write_text(json.dumps({"settings": settings, "rules": [tcp_rule(port, target, name="a")]}))
    gp = start_gportmap(None, rules_path=path)
    held = connect(port)
    held.sendall(b"hold")
    assert recv_exactly(held, 4) == b"hold"
    gp.signal(signal.SIGTERM)
    gp.wait_event("stopping")
    path.write_text(json.dumps({"settings": settings, "rules": [tcp_rule(port, target, name="a"), tcp_rule(added, target, name="b")]}))
    gp.signal(signal.SIGHUP)
    gp.wait_event("reload_refused", source="signal")
    status, body, _ = gp.admin("/reload", method="POST")
    assert status == 503 and json.loads(body)["status"] == "refused"
    assert refused(added) and refused(port)
    assert not gp.events("config_reloaded")
    held.sendall(b"more")  # the drained connection still works
    assert recv_exactly(held, 4) == b"more"
    held.close()
    assert gp.wait_exit(30) == 0


@pytest.mark.slow
def test_a_rule_whose_start_raises_fails_alone_and_later_edits_still_apply(start_gportmap, echo_target, tmp_path):
    """The bug: an exception applying a rule that was not a config error (here a
    plugin whose construction fails when the rule's server is built, after the rules
    validated) killed the watcher greenlet: later valid edits were never applied,
    while /stats still said the file was watched."""
    target = echo_target.port
    good, bad, later = distinct_free_ports(3)
    budget = tmp_path / "budget"
    budget.write_text("1")  # validation builds the plugin once; the server's build fails
    path = tmp_path / "rules.json"
    settings = {"statsInterval": 0}

    def write(*rules: dict) -> None:
        write_atomically(path, json.dumps({"settings": settings, "rules": list(rules)}))

    path.write_text(json.dumps({"settings": settings, "rules": [tcp_rule(good, target, name="good")]}))
    tests_dir = str(Path(__file__).resolve().parent)
    gp = start_gportmap(None, rules_path=path, env={"PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")})
    faulty = tcp_rule(bad, target, name="bad", plugins=[{"name": "plugin_budget:BuildBudget", "options": {"budget": str(budget)}}])
    write(tcp_rule(good, target, name="good"), faulty)  # through the watcher
    failed = gp.wait_event("rule_failed", rule="bad")[0]
    assert "licence server is unreachable" in failed["error"]
    wait_for(lambda: stats_rules(gp).get("bad") == "failed", timeout=10)
    status, body, _ = gp.admin("/healthz")
    assert status == 503 and json.loads(body)["failing"][0]["rule"] == "bad"
    assert stats_rules(gp)["good"] == "running" and not refused(good)

    write(tcp_rule(good, target, name="good"), tcp_rule(later, target, name="later"))  # the watcher goes on
    wait_for(lambda: stats_rules(gp) == {"good": "running", "later": "running"}, timeout=10, what="the later edit")
    assert not refused(later) and refused(bad)
    assert gp.admin("/healthz")[0] == 200
    assert gp.admin_json("/stats")["config"]["watching"] == "inotify"
