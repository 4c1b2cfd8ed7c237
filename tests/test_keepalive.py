"""``keepAlive`` (issue 24): TCP keepalive on both sides of a rule's connections, seen
from outside the process as the kernel shows it (``ss -o``: a ``keepalive`` timer on
gportmap's socket to the client and on its socket to the target)."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
from conftest import LOOPBACK, connect, free_port, recv_exactly, require_tool, tcp_rule, wait_for

from gportmap.config import parse
from gportmap.errors import ConfigError


def timers(pid: int, port_filter: str) -> list[str]:
    """The timer of each of ``pid``'s established TCP sockets matching the filter:
    ``keepalive,6.9sec,0``-like, or "" for a socket with no timer running."""
    out = subprocess.run(
        [require_tool("ss"), "-tnopH", "state", "established", port_filter],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        timer = re.search(r"timer:\(([^)]*)\)", line)
        found.append(timer.group(1) if timer else "")
    return found


def keepalive_seconds(timer: str) -> float:
    """The time left before the next probe of a ``keepalive,6.9sec,0`` timer, under a
    minute (``ss`` writes "1min39sec" above; iproute2 6.1 labels seconds below a
    minute "ms": "6.996ms" is 6.996 s, so the number is read as seconds either way)."""
    kind, left, _ = timer.split(",")
    assert kind == "keepalive", timer
    match = re.fullmatch(r"([\d.]+)(?:ms|sec|s)", left)
    assert match, f"{timer}: a minute or more, not the rule's idle"
    return float(match.group(1))


def test_keepalive_probes_both_sides_with_the_rules_timings_and_a_reload_turns_them_off(
    start_gportmap, echo_target
):
    port = free_port()
    rule = tcp_rule(port, echo_target.port, name="ka", keepAlive={"idle": 7, "interval": 3, "count": 2})
    gp = start_gportmap([rule])
    client_side, target_side = f"( sport = :{port} )", f"( dport = :{echo_target.port} )"
    with connect(port) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        for side in (client_side, target_side):
            (timer,) = wait_for(lambda side=side: timers(gp.pid, side), what=f"gportmap's socket {side}")
            assert 0 < keepalive_seconds(timer) <= 7, timer  # idle 7 s, not the system's 2 hours

        # keepAlive removed: the kept listener is handed to the new server with it off
        rule.pop("keepAlive")
        gp.rules_path.write_text(json.dumps([rule]))
        gp.signal(signal.SIGHUP)
        gp.wait_event("config_reloaded")
        with connect(port) as fresh:
            fresh.sendall(b"y")
            assert recv_exactly(fresh, 1) == b"y"
            fresh_port = fresh.getsockname()[1]
            (timer,) = wait_for(lambda: timers(gp.pid, f"( sport = :{port} and dport = :{fresh_port} )"),
                                what="the new connection's socket")
            assert timer == "", timer  # no keepalive timer on a connection accepted after


def test_without_keepalive_no_probe_is_armed(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="plain")])
    with connect(port) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        for side in (f"( sport = :{port} )", f"( dport = :{echo_target.port} )"):
            (timer,) = wait_for(lambda side=side: timers(gp.pid, side), what=side)
            assert timer == "", timer


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ({"protocol": "udp", "keepAlive": {}}, "rules[0].keepAlive: applies only to tcp and websocket rules"),
        ({"protocol": "tcp", "keepAlive": {"idle": 0}}, "rules[0].keepAlive.idle: 0 is less than the minimum of 1"),
        ({"protocol": "tcp", "keepAlive": {"count": 128}}, "rules[0].keepAlive.count: 128 is greater than the maximum of 127"),
        ({"protocol": "tcp", "keepAlive": {"idel": 5}}, "rules[0].keepAlive.idel: unknown key (did you mean 'idle'?)"),
    ],
)
def test_keepalive_errors_name_the_path(rule, error):
    document = [{"listenHost": LOOPBACK, "listenPort": 7000, "targetHost": LOOPBACK, "targetPort": 7001, **rule}]
    with pytest.raises(ConfigError) as info:
        parse(json.dumps(document), "rules.json")
    assert info.value.errors == [f"rules.json: {error}"]


def test_keepalive_defaults():
    document = [{"protocol": "websocket", "listenPort": 7000, "targetHost": LOOPBACK, "targetPort": 7001, "keepAlive": {}}]
    keep_alive = parse(json.dumps(document), "rules.json").rules[0].keep_alive
    assert (keep_alive.idle, keep_alive.interval, keep_alive.count) == (60, 10, 6)
