"""No module-level state read at import or shared by every user (issue 16): the
rate limit of ``internal_error`` records lives with each rule's counters, and
``GPORTMAP_RELAY=splice`` is read into the platform's ``Features`` at start.

Before, ``gportmap.failures`` held one limiter for the process, keyed by rule name:
a second registry (a test's, a worker's after a restart in the same process) found
its records already used up. And ``engine/hubrelay.py`` read the environment once
at import, so a process could not be told otherwise after it.
"""

from __future__ import annotations

import _socket
import logging
import socket

import pytest

import gportmap.inotify
from gportmap.engine import hubrelay
from gportmap.engine.hubrelay import HubRelay
from gportmap.failures import report_internal_error
from gportmap.platform import detect
from gportmap.stats import StatsRegistry


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    handler = Records()
    logger = logging.getLogger("gportmap.connections")
    level, logger.level = logger.level, logging.DEBUG
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_each_registry_limits_its_own_internal_error_records(records) -> None:
    first = StatsRegistry().rule("web", "tcp")
    for _ in range(7):
        report_internal_error(first, "127.0.0.1:1", "127.0.0.1:2", KeyError("x"))
    burst = 5  # records per rule and exception type per 10 s
    assert len(records) == burst  # the rest suppressed (and counted)
    assert first.errors["internal_error"] == 7

    second = StatsRegistry().rule("web", "tcp")  # another process's, or a test's: same rule name
    report_internal_error(second, "127.0.0.1:1", "127.0.0.1:2", KeyError("x"))
    assert len(records) == burst + 1
    assert records[-1].event == "internal_error" and records[-1].rule == "web"
    assert records[-1].exc_info is not None and records[-1].error == "KeyError: 'x'"

    report_internal_error(first, "127.0.0.1:1", "127.0.0.1:2", ValueError("y"))  # another type: its own budget
    assert len(records) == burst + 2


@pytest.mark.parametrize(("relay", "splice_first"), [("splice", True), ("copy", False), ("auto", False), ("", False)])
def test_the_relay_mode_is_read_at_start_into_the_features(monkeypatch, relay: str, splice_first: bool) -> None:
    monkeypatch.delenv("GPORTMAP_PORTABLE", raising=False)
    monkeypatch.setenv("GPORTMAP_RELAY", relay)
    # not this test's business, and it makes an inotify instance in this process
    monkeypatch.setattr(gportmap.inotify, "available", lambda: True)
    features = detect()
    assert features.splice_first is splice_first
    assert "splice_first" not in features.enabled()  # a policy, not a platform feature (the started record)
    if relay == "copy":
        assert not features.splice
    assert not hasattr(hubrelay, "SPLICE_FIRST")  # nothing read at import


def test_the_hub_relay_takes_its_policy_from_the_features(monkeypatch) -> None:
    monkeypatch.setattr(HubRelay, "splice_first", None)
    monkeypatch.setenv("GPORTMAP_RELAY", "splice")
    monkeypatch.setattr(gportmap.inotify, "available", lambda: True)
    HubRelay.configure(detect())
    assert HubRelay.splice_first is True
    monkeypatch.setenv("GPORTMAP_RELAY", "copy")  # too late: read at start, not per connection
    pairs = [socket.socketpair(), socket.socketpair()]
    try:
        client, target = (_socket.socket(fileno=pair[0].detach()) for pair in pairs)
        stats = StatsRegistry()
        conn = stats.open(stats.rule("r", "tcp"), "c", "t")
        ended: list[str] = []
        relay = HubRelay(client, target, conn, 0, zero_copy=True, on_done=lambda reason, error: ended.append(reason))
        assert relay.up.splice_first and relay.down.splice_first
        relay.abort("stopped")
        assert ended == ["stopped"]
    finally:
        for pair in pairs:
            pair[1].close()
