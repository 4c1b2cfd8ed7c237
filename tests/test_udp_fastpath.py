"""The short path of a udp rule (issue 23): an established session's datagrams on a
plain rule skip the checks of plugins, perClient and faults, so whether a rule is
plain must follow its faults as they change on a running rule (the fault board
tells the server, ``FaultBoard.watch``), for the sessions already open too.
"""

from __future__ import annotations

import json
import socket
import weakref

from conftest import free_port, rule_stats, wait_for
from test_toxics import fault
from test_udp import UdpTarget, client, round_trip, udp_rule

from gportmap.config.faults import Fault, FaultType, Stream
from gportmap.engine.faults import FaultBoard


def test_faults_added_and_removed_reach_an_established_session(start_gportmap) -> None:
    """A session established on a rule without faults gets the faults a reload adds
    (a duplicate of every reply) and loses them when a second reload takes them
    away: the same session throughout, the rule unchanged for the supervisor."""
    target = UdpTarget()  # echoes
    port = free_port(socket.SOCK_DGRAM)
    rules = [udp_rule(port, target.port, name="u", sessionTimeout=60)]
    settings = {"settings": {"drainTimeout": 0.5}}
    gp = start_gportmap({**settings, "rules": rules})
    sock = client()
    try:
        assert round_trip(sock, port, b"one") == b"one"
        assert round_trip(sock, port, b"two") == b"two"  # established: the short path

        def reload(faults: list[dict], count: int) -> None:
            rules[0]["faults"] = faults
            gp.rules_path.write_text(json.dumps({**settings, "rules": rules}))
            reloaded = gp.wait_event("config_reloaded", timeout=15, count=count)[-1]
            assert "u" in reloaded["unchanged"]
            wait_for(lambda: len(rule_stats(gp, "u")["faults"]) == len(faults), what="the faults in /stats")

        reload([fault("duplicate", probability=1.0)], 1)
        assert round_trip(sock, port, b"three") == b"three"
        assert sock.recvfrom(100)[0] == b"three"  # the duplicate, on the session opened before

        reload([], 2)
        assert round_trip(sock, port, b"four") == b"four"
        assert round_trip(sock, port, b"five") == b"five"  # no duplicate of "four" came between
        udp = rule_stats(gp, "u")["udp"]
        assert udp["sessions"] == 1  # the one session throughout
        assert udp["packets_received"] == 5 and udp["packets_sent"] == 6
    finally:
        sock.close()
        target.close()


class Watcher:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def faults_changed(self, faults: tuple) -> None:
        self.seen.append(faults)


def test_the_fault_board_tells_its_watchers_of_changes_only() -> None:
    """Told once per change of the rule's faults, not on every publish; not after
    ``unwatch``; and a watcher that is gone is not kept alive by the board."""

    class Rule:
        def __init__(self, name: str, faults: tuple) -> None:
            self.name, self.faults = name, faults

    latency = Fault(FaultType.LATENCY, Stream.DOWNSTREAM, 1.0, latency=5)
    board, watcher = FaultBoard(), Watcher()
    board.watch("u", watcher)
    board.publish([Rule("u", ()), Rule("other", (latency,))])
    board.publish([Rule("u", (latency,))])
    board.publish([Rule("u", (latency,)), Rule("other", ())])  # no change for u
    board.publish([Rule("u", ())])
    assert watcher.seen == [(), (latency,), ()]
    board.unwatch("u", watcher)
    board.publish([Rule("u", (latency,))])
    assert len(watcher.seen) == 3
    gone = Watcher()
    board.watch("u", gone)
    held = weakref.ref(gone)
    del gone
    assert held() is None  # the board did not keep it
    board.publish([Rule("u", ())])  # nothing left to tell, nothing raised
