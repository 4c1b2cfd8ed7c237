"""The supervisor in-process, on gevent sockets: the rule life cycle, listener
handover, and counters that survive reloads."""

from __future__ import annotations

import json

import gevent
import gevent.socket
import pytest
from conftest import free_port, tcp_rule, wait_on_hub
from gevent.server import StreamServer

from gportmap.config import parse
from gportmap.runtime.supervisor import RuleEvent, RuleRunner, RuleState, StateError, Supervisor


def _echo(sock, _address) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


@pytest.fixture
def echo_server():
    server = StreamServer(("127.0.0.1", 0), _echo)
    server.start()
    yield server
    server.stop()


def config_of(*rules: dict, **settings):
    return parse(json.dumps({"settings": settings, "rules": list(rules)}), "rules.json")


def round_trip(port: int, payload: bytes) -> bytes:
    with gevent.socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(gevent.socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_counters_survive_a_changed_rule_and_the_listener_is_handed_over(echo_server):
    port = free_port()
    supervisor = Supervisor()
    first = config_of(tcp_rule(port, echo_server.server_port, name="web", maxConnections=10))
    supervisor.apply(first)
    (runner,) = supervisor.runners.values()
    listener = runner.server.listener
    assert round_trip(port, b"hello") == b"hello"
    wait_on_hub(lambda: supervisor.stats.rule("web", "tcp").active == 0)

    changes = supervisor.apply(config_of(tcp_rule(port, echo_server.server_port, name="web", maxConnections=20)))
    assert changes.changed == ["web"]
    (new_runner,) = supervisor.runners.values()
    assert new_runner is not runner and new_runner.server.listener is listener  # same socket
    assert new_runner.state is RuleState.RUNNING
    wait_on_hub(lambda: runner.state is RuleState.STOPPED)
    assert round_trip(port, b"again!") == b"again!"
    wait_on_hub(lambda: supervisor.stats.rule("web", "tcp").active == 0)
    stats = supervisor.stats.rule("web", "tcp")
    assert (stats.total, stats.bytes_received, stats.bytes_sent) == (2, 11, 11)
    supervisor.stop(1.0)
    assert new_runner.state is RuleState.STOPPED


def test_unchanged_rules_keep_their_runner_and_removed_ones_stop(echo_server):
    a, b = free_port(), free_port()
    supervisor = Supervisor()
    supervisor.apply(config_of(tcp_rule(a, echo_server.server_port, name="a"), tcp_rule(b, echo_server.server_port, name="b")))
    runner_a = supervisor.runners[("tcp", "127.0.0.1", a)]
    changes = supervisor.apply(config_of(tcp_rule(a, echo_server.server_port, name="a")))
    assert (changes.unchanged, changes.removed, changes.added, changes.changed) == (["a"], ["b"], [], [])
    assert supervisor.runners == {("tcp", "127.0.0.1", a): runner_a}
    with pytest.raises(ConnectionRefusedError):
        gevent.socket.create_connection(("127.0.0.1", b), timeout=2)
    assert round_trip(a, b"x") == b"x"
    supervisor.stop(1.0)


def test_disabling_a_rule_removes_it(echo_server):
    port = free_port()
    supervisor = Supervisor()
    supervisor.apply(config_of(tcp_rule(port, echo_server.server_port, name="web")))
    changes = supervisor.apply(config_of(tcp_rule(port, echo_server.server_port, name="web", enabled=False)))
    assert changes.removed == ["web"] and supervisor.runners == {}
    supervisor.stop(1.0)


def test_the_life_cycle_rejects_impossible_transitions(echo_server):
    config = config_of(tcp_rule(free_port(), echo_server.server_port, name="web"))
    runner = RuleRunner(config.rules[0], Supervisor().context)
    assert runner.state is RuleState.STARTING
    with pytest.raises(StateError, match="starting cannot take the event drained"):
        runner._on(RuleEvent.DRAINED)
    assert runner.start()
    with pytest.raises(StateError, match="running cannot take the event retry"):
        runner._on(RuleEvent.RETRY)
    runner.retire(keep_listener=False)
    assert runner.state is RuleState.DRAINING
    runner.finish()
    assert runner.state is RuleState.STOPPED
    with pytest.raises(StateError):
        runner._on(RuleEvent.BOUND)
