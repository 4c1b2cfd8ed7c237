"""``gportmap.engine.connector.ConnectSweep``: the connects of one rule share one
timer for their ``connectTimeout``. Each still times out at its own deadline (not
at the first one's, not before), goes on to its next address after, and a connect
that ended (connected, cancelled) never times out. Real sockets on loopback: a
listener whose accept queue is full drops SYNs, so a connect to it waits."""

from __future__ import annotations

import socket
import time

import gevent
import pytest
from conftest import stuck_listener

from gportmap.engine.connector import ConnectSweep, HubConnect

LOOPBACK = "127.0.0.1"
TIMEOUT = 0.3


@pytest.fixture
def stuck():
    """The address of a listener that never accepts, its accept queue full."""
    with stuck_listener() as address:
        yield address


def _poll(condition, seconds: float = 10.0) -> bool:
    """Run the hub until ``condition()`` holds (bounded)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def test_each_connect_times_out_at_its_own_deadline(stuck) -> None:
    good = socket.socket()
    good.bind((LOOPBACK, 0))
    good.listen(8)
    sweep = ConnectSweep(TIMEOUT)
    outcomes: dict[str, tuple[float, object]] = {}
    sockets = []

    def start(name: str, addresses: list) -> tuple[float, HubConnect]:
        def connected(sock: socket.socket) -> None:
            sockets.append(sock)
            outcomes[name] = (time.monotonic(), "connected")

        def failed(error: OSError) -> None:
            outcomes[name] = (time.monotonic(), error)

        connect = HubConnect(addresses, TIMEOUT, connected, failed, sweep=sweep)
        started = time.monotonic()
        connect.start()
        return started, connect

    try:
        first_started, _ = start("first", [(socket.AF_INET, stuck)])
        gevent.sleep(0.1)  # a later deadline for the next ones
        second_started, _ = start("second", [(socket.AF_INET, stuck), (socket.AF_INET, good.getsockname())])
        _, third = start("third", [(socket.AF_INET, stuck)])
        third.cancel()  # a drain cut-off: never reported, never timed out
        assert sweep.timer is not None and len(sweep.entries) >= 2
        assert _poll(lambda: "first" in outcomes and "second" in outcomes)
        at, error = outcomes["first"]
        assert isinstance(error, TimeoutError)
        assert at - first_started >= TIMEOUT - 0.01  # its own deadline, not before
        at, result = outcomes["second"]
        assert result == "connected"  # timed out on the stuck address, then the next one answered
        assert at - second_started >= TIMEOUT - 0.01
        assert _poll(lambda: not sweep.entries and sweep.timer is None)  # nothing left behind
        assert "third" not in outcomes
    finally:
        for sock in sockets:
            sock.close()
        good.close()


def test_a_connect_that_answers_leaves_the_sweep(stuck) -> None:
    good = socket.socket()
    good.bind((LOOPBACK, 0))
    good.listen(8)
    sweep = ConnectSweep(TIMEOUT)
    outcomes: list[object] = []
    try:
        connect = HubConnect([(socket.AF_INET, good.getsockname())], TIMEOUT, outcomes.append, outcomes.append,
                             sweep=sweep)  # fmt: skip
        connect.start()
        assert _poll(lambda: outcomes)
        assert not isinstance(outcomes[0], OSError), outcomes[0]  # the bare connected socket
        outcomes[0].close()
        assert _poll(lambda: not sweep.entries and sweep.timer is None)
        assert len(outcomes) == 1  # the timer that fired found it ended: no timeout reported
    finally:
        good.close()


def test_a_pool_keeps_one_sweep_per_timeout() -> None:
    class Pool:
        sweeps: dict = {}

    pool = Pool()
    pool.sweeps = {}
    first = ConnectSweep.of(pool, 1.0)
    assert ConnectSweep.of(pool, 1.0) is first
    second = ConnectSweep.of(pool, 2.0)  # a reload changed connectTimeout: the idle old one goes
    assert second is not first and list(pool.sweeps) == [2.0]
    assert ConnectSweep.of(object(), 1.0) is None  # no sweeps: a timer per connect
