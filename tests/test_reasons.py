"""Close, reject and drop reasons are enum members (``gportmap.reasons``, issue 16),
and what users read is unchanged: the same words in the records, in ``/stats``'
``*_by_reason`` tables and in the metrics' ``reason`` label.

The scan reads the modules that make or compare reasons and fails on any reason
word written as a string literal there (a typo would be a new counter key, or a
comparison that never matches), and on a reason made by an f-string.
"""

from __future__ import annotations

import ast
import json
import logging
import socket
import struct
from pathlib import Path

import pytest

import gportmap
from gportmap import stats as stats_module
from gportmap.engine import wsframe
from gportmap.engine.wsstage import WsStage
from gportmap.log import EventJsonFormatter, TextFormatter
from gportmap.reasons import CloseReason, DropReason, RejectReason
from gportmap.stats import RuleStats
from tests.conftest import LOOPBACK, connect, free_port, recv_exactly, rule_stats, tcp_rule, wait_for

PACKAGE = Path(gportmap.__file__).resolve().parent
#: Where reasons are made, passed on and compared (the relays, the protocol
#: servers, the counters, internal_error reporting).
SCANNED = sorted([*PACKAGE.glob("engine/*.py"), *PACKAGE.glob("protocols/*.py"),
                  PACKAGE / "stats.py", PACKAGE / "failures.py"])
WORDS = {member.value for enum in (CloseReason, RejectReason, DropReason) for member in enum}
#: Literals with a reason's spelling that are not reasons: (file, word).
NOT_REASONS = {
    ("stats.py", "sessions"),  # /stats' ``counts``: what a udp rule's connections are
}
#: RuleStats' tables keyed by reason.
COUNTER_TABLES = {"rejected", "udp_dropped", "errors"}
#: Call sites that take a reason: method name -> position of the reason argument.
REASON_ARGUMENT = {"reject": 1, "finish": 1, "abort": 0, "_abort": 0, "_finish": 0, "_end": 0,
                   "_end_sessions": 1, "_drop": 0, "goodbye": 0}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _allowed_literals(tree: ast.AST) -> set[int]:
    """ids of string constants that are not values: docstrings, dict keys and
    indexes (but those of the counter tables), the ``event`` of a record,
    ``__slots__`` entries."""
    allowed: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            allowed.add(id(body[0].value))
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                allowed.add(id(key))
                if isinstance(key, ast.Constant) and key.value == "event":
                    allowed.add(id(value))
        if isinstance(node, ast.Assign) and any(_name(t) == "__slots__" for t in node.targets):
            allowed.update(id(child) for child in ast.walk(node.value))
        if isinstance(node, ast.Subscript) and _name(node.value) not in COUNTER_TABLES:
            allowed.add(id(node.slice))  # a record's field, not a counter's key
        if isinstance(node, ast.JoinedStr):  # f-string parts: checked as a whole below
            allowed.update(id(child) for child in node.values)
    return allowed


def reason_literals(path: Path) -> list[str]:
    """Every place in ``path`` where a reason is spelled as a literal (or made by an
    f-string where a reason goes), as ``file:line: word``."""
    tree = ast.parse(path.read_text(), str(path))
    allowed = _allowed_literals(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in WORDS
                and id(node) not in allowed and (path.name, node.value) not in NOT_REASONS):
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.Call):
            position = REASON_ARGUMENT.get(_name(node.func))
            arguments = [*node.args[position:position + 1]] if position is not None else []
            arguments += [k.value for k in node.keywords if k.arg == "reason"]
            found += [f"{path.name}:{a.lineno}: f-string reason" for a in arguments if isinstance(a, ast.JoinedStr)]
        if isinstance(node, ast.Compare) and any("reason" in _name(side) for side in (node.left, *node.comparators)):
            found += [f"{path.name}:{node.lineno}: f-string compared with a reason"
                      for side in (node.left, *node.comparators) if isinstance(side, ast.JoinedStr)]
    return found


def test_no_reason_is_spelled_as_a_string_where_reasons_are_made():
    assert len(SCANNED) > 10  # the folders are where they are said to be
    found = [hit for path in SCANNED for hit in reason_literals(path)]
    assert found == [], "use gportmap.reasons members:\n" + "\n".join(found)


def test_the_scan_finds_literals_and_f_strings(tmp_path):
    """The scan itself: each kind of site it must catch, and what it must let be."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docstring naming closed and acl."""\n'
        "def f(self, side, reason):\n"
        '    self.reject(client, "acl")\n'
        '    self._abort(f"{side}_error", None)\n'
        '    if reason == "idle_timeout":\n'
        '        return "connect_failed", None\n'
        '    if reason in ("stopped", "x"):\n'
        '        return {"error": 1, "event": "internal_error"}\n'
        '    __slots__ = ("closed",)\n'
        '    extra["error"] = self.stats.rejected["limit"]\n'
    )
    assert sorted(reason_literals(sample)) == sorted([
        "sample.py:3: 'acl'", "sample.py:4: f-string reason", "sample.py:5: 'idle_timeout'",
        "sample.py:6: 'connect_failed'", "sample.py:7: 'stopped'", "sample.py:10: 'limit'",
    ])


def test_words_and_order_are_unchanged():
    """The public words, in the order /stats and the metrics list them (SPEC §5)."""
    assert stats_module.REJECT_REASONS == (
        "acl", "limit", "tls", "plugin", "handshake", "no_route", "proxy_header", "client_limit"
    )
    assert stats_module.UDP_DROP_REASONS == ("sessions", "acl", "plugin", "error", "kernel", "client_limit")
    assert stats_module.ERROR_REASONS == ("internal_error",)
    assert {r.value for r in CloseReason} >= {"closed", "idle_timeout", "client_error", "target_error",
                                              "connect_failed", "stopped", "internal_error", "plugin_error",
                                              "expired", "error", "fault"}
    assert CloseReason.side_error("client") is CloseReason.CLIENT_ERROR
    assert CloseReason.side_error("target") is CloseReason.TARGET_ERROR
    for enum in (CloseReason, RejectReason, DropReason):
        for member in enum:
            assert member == member.value and hash(member) == hash(member.value)
            assert (str(member), f"{member}", json.dumps(member)) == (member.value, member.value, f'"{member.value}"')


def test_counters_stay_keyed_by_plain_strings():
    """Counted through members, the tables hold plain ``str`` keys: what a worker
    sends its master and what /stats shows are the words, not enum reprs."""
    figures = RuleStats("r", "udp")
    figures.rejected[RejectReason.ACL] += 2
    figures.udp_dropped[DropReason.SESSIONS] += 1
    figures.errors[CloseReason.INTERNAL_ERROR] += 1
    snapshot = figures.snapshot()
    for table in (snapshot["connections"]["rejected_by_reason"], snapshot["connections"]["errors_by_reason"],
                  snapshot["udp"]["dropped_by_reason"], *figures.counters().values()):
        if isinstance(table, dict):
            assert all(type(key) is str for key in table)
    assert ('"rejected_by_reason": {"acl": 2, "limit": 0, "tls": 0, "plugin": 0, "handshake": 0, '
            '"no_route": 0, "proxy_header": 0, "client_limit": 0}') in json.dumps(snapshot)
    assert snapshot["udp"]["dropped_by_reason"]["sessions"] == 1
    assert snapshot["connections"]["errors_by_reason"] == {"internal_error": 1}


@pytest.mark.parametrize("formatter", [EventJsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_records_carry_the_word(formatter):
    record = logging.LogRecord("gportmap.connections", logging.INFO, __file__, 1, "connection closed", None, None)
    record.event, record.reason = "connection_closed", CloseReason.IDLE_TIMEOUT
    line = formatter.format(record)
    if isinstance(formatter, EventJsonFormatter):
        assert json.loads(line)["reason"] == "idle_timeout" and '"reason": "idle_timeout"' in line
    else:
        assert line.endswith("reason=idle_timeout")


@pytest.mark.parametrize("reason", [CloseReason.IDLE_TIMEOUT, "idle_timeout", "stopped", "client_error", "target_error",
                                    "plugin_error", "internal_error", "closed", "a_plugin_protocol_word"])
def test_a_plain_string_reason_works_as_its_member(reason):
    """A protocol of a plugin package passes plain strings: they act as the members."""
    as_member = CloseReason(reason) if reason in WORDS else reason
    plain, member = WsStage(False, 1 << 20), WsStage(False, 1 << 20)
    assert plain.goodbye(str(reason), "boom") == member.goodbye(as_member, "boom")


def test_going_away_for_a_stop():
    frame = WsStage(False, 1 << 20).goodbye("stopped", None)
    assert frame[2:4] == struct.pack("!H", wsframe.CLOSE_GOING_AWAY)


def test_gportmap_reports_the_same_words(start_gportmap, echo_target):
    """End to end: a refused connection, a clean one, a failed connect and a
    dropped datagram; /stats, /metrics and the JSON records name them as before."""
    denied, echo, down, udp = free_port(), free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    nobody = free_port()
    gp = start_gportmap([
        tcp_rule(denied, echo_target.port, name="denied", deny=["127.0.0.0/8"]),
        tcp_rule(echo, echo_target.port, name="echo"),
        tcp_rule(down, nobody, name="down"),
        {**tcp_rule(udp, echo_target.port, name="dns", deny=["127.0.0.0/8"]), "protocol": "udp"},
    ])
    with connect(denied) as sock:
        sock.settimeout(5)
        assert sock.recv(1) == b""
    with connect(echo) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    with connect(down) as sock:
        sock.settimeout(5)
        assert sock.recv(1) == b""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"q", (LOOPBACK, udp))
    assert gp.wait_event("connection_rejected", rule="denied")[0]["reason"] == "acl"
    assert gp.wait_event("connection_closed", rule="echo")[0]["reason"] == "closed"
    assert gp.wait_event("connection_closed", rule="down")[0]["reason"] == "connect_failed"
    assert gp.wait_event("datagram_dropped", rule="dns")[0]["reason"] == "acl"
    assert any('"reason": "closed"' in line for line in gp.lines())

    assert rule_stats(gp, "denied")["connections"]["rejected_by_reason"] == {
        "acl": 1, "limit": 0, "tls": 0, "plugin": 0, "handshake": 0,
        "no_route": 0, "proxy_header": 0, "client_limit": 0}
    assert rule_stats(gp, "echo")["connections"]["errors_by_reason"] == {"internal_error": 0}
    wait_for(lambda: rule_stats(gp, "dns")["udp"]["dropped_by_reason"]["acl"] == 1, what="udp drop counted")
    assert set(rule_stats(gp, "dns")["udp"]["dropped_by_reason"]) == {
        "sessions", "acl", "plugin", "error", "kernel", "client_limit"}

    status, body, _ = gp.admin("/metrics")
    assert status == 200
    text = body.decode()
    assert 'gportmap_connections_rejected_total{protocol="tcp",reason="acl",rule="denied"} 1.0' in text
    assert 'gportmap_udp_packets_dropped_total{reason="acl",rule="dns"} 1.0' in text
    assert "CloseReason" not in text and "RejectReason" not in text and "DropReason" not in text
