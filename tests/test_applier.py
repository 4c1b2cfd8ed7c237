"""The one reload path and the rule life cycle, in-process where a race needs control.

Each test here pins a bug of the first version (issue 15):
- two reloads applied at once interleaved (rules of two versions running);
- a rule retired while its retry was binding came up later, untracked;
- an apply that raised ended the applier (and with it the watcher);
- a changed rule's handover yielded (websocket: a reverse name lookup);
- the life cycle had states with no defined answer to a retire.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import gevent
import gevent.socket
import greenlet
import pytest
from conftest import free_port, tcp_rule, wait_on_hub
from gevent.event import Event
from gevent.server import StreamServer

from gportmap.config import parse
from gportmap.runtime.applier import Applier, OutcomeStatus, ReloadOutcome, ReloadRequest, ReloadSource
from gportmap.runtime.service import Overrides, Service
from gportmap.runtime.supervisor import RuleEvent, RuleState, StateError, Supervisor, next_state


def _echo(sock, _address) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


@pytest.fixture
def echo_server():
    server = StreamServer(("127.0.0.1", 0), _echo)
    server.start()
    yield server
    server.stop()


def document(*rules: dict, **settings) -> str:
    return json.dumps({"settings": {"admin": False, "watch": False, "drainTimeout": 1, **settings}, "rules": list(rules)})


def listening(port: int) -> bool:
    try:
        gevent.socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except ConnectionRefusedError:
        return False


# -- the life cycle ---------------------------------------------------------------------

#: The life cycle as the issue asks for it: retire defined in every state.
EXPECTED = {
    (RuleState.STARTING, RuleEvent.BOUND): RuleState.RUNNING,
    (RuleState.STARTING, RuleEvent.START_FAILED): RuleState.FAILED,
    (RuleState.STARTING, RuleEvent.RETIRE): RuleState.STOPPING,
    (RuleState.RUNNING, RuleEvent.RETIRE): RuleState.DRAINING,
    (RuleState.FAILED, RuleEvent.RETRY): RuleState.STARTING,
    (RuleState.FAILED, RuleEvent.RETIRE): RuleState.STOPPED,
    (RuleState.DRAINING, RuleEvent.RETIRE): RuleState.DRAINING,
    (RuleState.DRAINING, RuleEvent.DRAINED): RuleState.STOPPED,
    (RuleState.STOPPING, RuleEvent.BOUND): RuleState.STOPPED,
    (RuleState.STOPPING, RuleEvent.START_FAILED): RuleState.STOPPED,
    (RuleState.STOPPING, RuleEvent.RETIRE): RuleState.STOPPING,
    (RuleState.STOPPED, RuleEvent.RETIRE): RuleState.STOPPED,
}


@pytest.mark.parametrize("state", list(RuleState))
@pytest.mark.parametrize("event", list(RuleEvent))
def test_every_state_answers_every_event_as_the_table_says(state, event):
    if (state, event) in EXPECTED:
        assert next_state(state, event) is EXPECTED[(state, event)]
    else:
        with pytest.raises(StateError, match=f"{state.value} cannot take the event {event.value}"):
            next_state(state, event)


def test_retire_is_defined_in_every_state():
    assert {state for state, event in EXPECTED if event is RuleEvent.RETIRE} == set(RuleState)


def test_a_rule_retired_while_its_retry_binds_never_comes_up(echo_server, monkeypatch):
    """The bug: retire() was a no-op while STARTING, so a retry that was resolving its
    address when a reload removed the rule came up afterwards, untracked, serving the
    old settings and holding the port against a rule added there later."""
    port = free_port()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    supervisor = Supervisor()
    supervisor.apply(parse(document(tcp_rule(port, echo_server.server_port, name="old")), "rules.json"))
    (runner,) = supervisor.runners.values()
    assert runner.state is RuleState.FAILED  # the port is taken: a retry is scheduled
    blocker.close()

    gate, resolving = Event(), Event()
    real = gevent.socket.getaddrinfo

    def held_getaddrinfo(*args, **kwargs):
        resolving.set()
        gate.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(gevent.socket, "getaddrinfo", held_getaddrinfo)
    resolving.wait(timeout=10)
    assert runner.state is RuleState.STARTING  # the retry is inside its bind
    monkeypatch.setattr(gevent.socket, "getaddrinfo", real)

    changes = supervisor.apply(parse(document(), "rules.json"))  # the rule is removed
    assert changes.removed == ["old"] and runner.state is RuleState.STOPPING
    gate.set()
    wait_on_hub(lambda: runner.state is RuleState.STOPPED)
    assert runner.server is None and not listening(port)

    changes = supervisor.apply(parse(document(tcp_rule(port, echo_server.server_port, name="new")), "rules.json"))
    (new,) = supervisor.runners.values()
    assert changes.added == ["new"] and new.state is RuleState.RUNNING
    assert listening(port)
    supervisor.stop(1.0)


def test_a_rule_whose_server_raises_fails_alone_and_is_retried(echo_server, monkeypatch):
    """A start that raises something other than a bind error (a plugin failing when
    built for real, a bug in a server) used to escape apply(): the apply was left half
    done, and the watcher greenlet that ran it died."""
    good, bad = free_port(), free_port()
    import gportmap.runtime.supervisor as supervisor_module

    real_create = supervisor_module.create_server
    failures = {"left": 1}

    def create_server(rule, context):
        if rule.name == "bad" and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the plugin's licence server is down")
        return real_create(rule, context)

    monkeypatch.setattr(supervisor_module, "create_server", create_server)
    monkeypatch.setattr(supervisor_module.BindRetry, "first", 0.05)
    supervisor = Supervisor()
    config = parse(
        document(tcp_rule(bad, echo_server.server_port, name="bad"), tcp_rule(good, echo_server.server_port, name="good")),
        "rules.json",
    )
    changes = supervisor.apply(config)
    assert changes.added == ["bad", "good"]
    states = {rule.name: (state, error) for rule, state, error in supervisor.rule_states()}
    assert states["good"] == ("running", None)
    assert states["bad"][0] == "failed" and "licence server is down" in states["bad"][1]
    assert listening(good)
    wait_on_hub(lambda: supervisor.runners[("tcp", "127.0.0.1", bad)].state is RuleState.RUNNING)
    assert listening(bad)
    supervisor.stop(1.0)


def test_an_apply_after_the_stop_starts_nothing(echo_server):
    supervisor = Supervisor()
    port = free_port()
    supervisor.apply(parse(document(tcp_rule(port, echo_server.server_port, name="a")), "rules.json"))
    supervisor.close_listeners()
    with pytest.raises(StateError, match="stopping"):
        supervisor.apply(parse(document(tcp_rule(free_port(), echo_server.server_port, name="b")), "rules.json"))
    assert not listening(port)
    supervisor.drain(1.0)


# -- the handover never yields ---------------------------------------------------------------


def _rule_of(protocol: str, port: int, target: int, **extra) -> dict:
    rule = {"protocol": protocol, "listenHost": "127.0.0.1", "listenPort": port, "targetHost": "127.0.0.1", "targetPort": target, **extra}
    if protocol == "udp":
        rule["sessionTimeout"] = 5
    return rule


@pytest.mark.parametrize("protocol", ["tcp", "udp", "websocket"])
def test_a_changed_rule_is_handed_over_without_a_greenlet_switch(echo_server, protocol):
    """Between the old server's last accept and the new one's first, the applying
    greenlet must not yield: another greenlet (a reload, a stop) could otherwise act
    on a rule that is half handed over. Starting a websocket rule used to yield on
    a reverse name lookup (pywsgi's getfqdn)."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    port = free_port(kind)
    supervisor = Supervisor()
    supervisor.apply(parse(document(_rule_of(protocol, port, echo_server.server_port, name="r")), "rules.json"))
    (old,) = supervisor.runners.values()
    assert old.state is RuleState.RUNNING

    switches: list[tuple] = []
    applying = greenlet.getcurrent()
    real_hand_over = supervisor.hand_over

    def traced_hand_over(old_runner, new_runner):
        def trace(event, args):
            if event in ("switch", "throw") and args[0] is applying:
                switches.append((event, args[1]))

        previous = greenlet.settrace(trace)
        try:
            real_hand_over(old_runner, new_runner)
        finally:
            greenlet.settrace(previous)

    supervisor.hand_over = traced_hand_over
    changed = _rule_of(protocol, port, echo_server.server_port, name="r", enabled=True)
    changed["maxConnections" if protocol != "udp" else "maxSessions"] = 7
    changes = supervisor.apply(parse(document(changed), "rules.json"))
    assert changes.changed == ["r"]
    (new,) = supervisor.runners.values()
    assert new.state is RuleState.RUNNING and new is not old
    assert switches == [], f"the handover yielded: {switches}"
    supervisor.stop(1.0)


# -- the applier ------------------------------------------------------------------------------


def test_requests_queued_during_an_apply_are_coalesced_and_served_in_order():
    applied: list[ReloadRequest] = []
    release = Event()

    def apply(request: ReloadRequest) -> ReloadOutcome:
        applied.append(request)
        if len(applied) == 1:
            release.wait()
        return ReloadOutcome(OutcomeStatus.APPLIED)

    applier = Applier(apply)
    applier.start()
    first = gevent.spawn(applier.submit, ReloadRequest(ReloadSource.SIGNAL), True)
    wait_on_hub(lambda: len(applied) == 1)
    waiters = [gevent.spawn(applier.submit, ReloadRequest(ReloadSource.ADMIN), True) for _ in range(20)]
    wait_on_hub(lambda: applier._waiting == 20)
    for _ in range(1000):  # a SIGHUP loop: requests nobody waits for take one entry
        applier.submit(ReloadRequest(ReloadSource.SIGNAL, force=False))
    applier.submit(ReloadRequest(ReloadSource.MASTER, raw=b"newest"))
    applier.submit(ReloadRequest(ReloadSource.WATCHER, force=False))
    assert len(applier._queue) == 21
    gevent.idle()  # every greenlet that could run has run: the applier had its chance
    assert len(applied) == 1  # nothing applies beside the one in progress
    release.set()
    gevent.joinall([first, *waiters], timeout=10)
    assert first.value.served == 1
    assert [waiter.value.served for waiter in waiters] == [21] * 20  # one apply served them all
    # the newest source; forced as one of them was; the newest bytes handed in
    assert len(applied) == 2 and applied[1].source is ReloadSource.WATCHER
    assert applied[1].raw == b"newest" and applied[1].force
    assert applier.applies == 2


def test_an_apply_that_raises_is_contained_and_the_next_is_served():
    calls = []

    def apply(request: ReloadRequest) -> ReloadOutcome:
        calls.append(request)
        if len(calls) == 1:
            raise KeyError("a bug")
        return ReloadOutcome(OutcomeStatus.APPLIED)

    applier = Applier(apply)
    applier.start()
    outcome = applier.submit(ReloadRequest(ReloadSource.WATCHER), wait=True)
    assert outcome.status is OutcomeStatus.FAILED and "a bug" in outcome.errors[0]
    assert applier.submit(ReloadRequest(ReloadSource.WATCHER), wait=True).status is OutcomeStatus.APPLIED


def test_after_close_every_request_is_refused_and_join_waits_for_the_apply_in_progress():
    release = Event()
    applied = []

    def apply(request: ReloadRequest) -> ReloadOutcome:
        applied.append(request)
        release.wait()
        return ReloadOutcome(OutcomeStatus.APPLIED)

    applier = Applier(apply)
    applier.start()
    running = gevent.spawn(applier.submit, ReloadRequest(ReloadSource.SIGNAL), True)
    wait_on_hub(lambda: applied)
    queued = gevent.spawn(applier.submit, ReloadRequest(ReloadSource.ADMIN), True)
    wait_on_hub(lambda: applier._waiting == 1)  # it waits in the queue
    applier.close()
    assert queued.get(timeout=5).status is OutcomeStatus.REFUSED
    assert applier.submit(ReloadRequest(ReloadSource.SIGNAL), wait=True).status is OutcomeStatus.REFUSED
    assert not applier.join(timeout=0.05)  # the apply in progress is not cut
    release.set()
    assert applier.join(timeout=5)
    assert running.get(timeout=5).status is OutcomeStatus.APPLIED
    assert len(applied) == 1


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def test_concurrent_reloads_of_two_versions_leave_exactly_the_last_one_running(tmp_path, echo_server):
    """The bug: Supervisor.apply yields while binding, so two reloads (the watcher's and
    a POST /reload, say) ran interleaved: rules of both files served, a rule of
    neither was gone, and /stats named the older file as applied."""
    ports = [free_port() for _ in range(12)]
    target = echo_server.server_port
    version_a = document(*(tcp_rule(port, target, name=f"a{i}") for i, port in enumerate(ports[:6])))
    version_b = document(
        tcp_rule(ports[0], target, name="a0", maxConnections=5),  # changed
        *(tcp_rule(port, target, name=f"b{i}") for i, port in enumerate(ports[6:])),
    )
    path = tmp_path / "rules.json"
    _write(path, version_a)
    service = Service(parse(version_a, str(path)), "off", Overrides(admin="off"))
    service.start()
    try:
        last = version_a
        for round_ in range(6):
            for text in (version_b, version_a, version_b) if round_ % 2 == 0 else (version_a, version_b):
                _write(path, text)
                last = text
                gevent.spawn(service.reload, ReloadSource.ADMIN)
                gevent.sleep(0)  # the reload begins and yields in the middle of its apply
        final = service.reload(ReloadSource.ADMIN)  # queued after every one of them
        assert final is not None
        digest = hashlib.sha256(last.encode()).hexdigest()
        assert service.config.digest == digest
        wanted = {rule.listen_port: rule for rule in parse(last, str(path)).rules}
        running = {key[2]: runner for key, runner in service.supervisor.runners.items()}
        assert set(running) == set(wanted)
        assert all(runner.rule == wanted[port] and runner.state is RuleState.RUNNING for port, runner in running.items())
        for port in ports:
            assert listening(port) == (port in wanted), port
        names = [rule.name for rule, state, _ in service.supervisor.rule_states() if state == "running"]
        assert sorted(names) == sorted(rule.name for rule in wanted.values())
    finally:
        service.stop_reloading(5)
        service.supervisor.stop(1.0)
