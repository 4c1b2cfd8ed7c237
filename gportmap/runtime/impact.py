"""What a new rules version would do to live traffic, without doing it (``?dry_run=1``,
SPEC §10): the changes the supervisor would make, the listeners that would open and
close, the open connections that would drain, and the listeners that would fail.

The changes are computed by the supervisor's own matching (SPEC §4: a rule is known
by its transport, listenHost and listenPort). Problems are found by trying, with as
little effect as an honest answer allows:

- TCP: a fresh socket with ``SO_REUSEADDR`` (as the real listener has) is bound and
  closed at once, never put in listening state: it accepts nothing, and a socket
  that never connected leaves no TIME_WAIT behind. The bind fails exactly where the
  real one would: a listener of another process (whatever its options), a
  privileged port without the capability, an address this host does not have. A
  socket another process bound without listening, and a listener of another
  process that shares its port by ``SO_REUSEPORT`` with gportmap's workers, are not
  seen.
- UDP: a fresh socket *without* ``SO_REUSEADDR`` is bound and closed: it fails when
  any socket holds the address. The real listener sets ``SO_REUSEADDR`` and would
  bind beside a socket of another process that set it too, and then share its
  datagrams: that is reported as the problem it is. A datagram arriving during the
  instant of the probe is dropped, as it would have been with nobody listening.

A bind that fails because a rule this very change removes holds the address is no
problem (removals happen first); only listeners that would open are tried (a
listener in both versions keeps its socket, SPEC §9), port by port for a range,
yielding between slices; the changes and listeners come from the supervisor's own
plan (``gportmap.runtime.listeners``), so a range is named as one ("20000-20099").
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
import gevent.socket

from gportmap.config import Config, Rule, format_address
from gportmap.engine.net import bind_error_message
from gportmap.runtime.listeners import Plan, RuleKey, Span, plan, spans
from gportmap.runtime.supervisor import Changes, RuleRunner

if TYPE_CHECKING:
    from gportmap.runtime.backend import Figures

_WILDCARDS = {"0.0.0.0", "::", ""}


@dataclass(frozen=True)
class Listener:
    """One listening socket a version has: a rule's (transport, host, port)."""

    rule: str
    transport: str
    listen: str

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "transport": self.transport, "listen": self.listen}


@dataclass(frozen=True)
class Problem:
    """A listener that would fail, and why (the words ``rule_failed`` would log)."""

    rule: str
    transport: str
    listen: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {
            "rule": self.rule,
            "transport": self.transport,
            "listen": self.listen,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Impact:
    """The ``impact`` of a dry run (SPEC §10)."""

    listeners_opened: list[Listener] = field(default_factory=list)
    listeners_closed: list[Listener] = field(default_factory=list)
    #: Open connections (UDP: sessions) of each removed or changed rule, by name: they
    #: finish on the old server, cut at drainTimeout.
    connections_to_drain: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "listeners_opened": [listener.as_dict() for listener in self.listeners_opened],
            "listeners_closed": [listener.as_dict() for listener in self.listeners_closed],
            "connections_to_drain": dict(self.connections_to_drain),
            "problems": [problem.as_dict() for problem in self.problems],
        }


#: ``probe(rule, host, port)``: why that listener of ``rule`` could not bind, or None.
Probe = Callable[[Rule, str, int], "str | None"]

def plan_changes(old: Config | None, new: Config) -> Changes:
    """The changes ``Supervisor.apply(new)`` would make after ``old``, by name: a
    rule that takes over listeners of an old one is changed (SPEC §9)."""
    return _changes(_plan(old, new), _running(old), _wanted(new))


def _running(config: Config | None) -> dict[RuleKey, Rule]:
    return {rule.key: rule for rule in (config.enabled_rules if config is not None else ())}


def _wanted(config: Config) -> dict[RuleKey, Rule]:
    return {rule.key: rule for rule in config.enabled_rules}


def _plan(old: Config | None, new: Config) -> Plan:
    return plan(_running(old), _wanted(new))


def _changes(reload: Plan, running: dict[RuleKey, Rule], wanted: dict[RuleKey, Rule]) -> Changes:
    changes = Changes()
    changes.removed.extend(running[key].name for key in reload.removed)
    changes.unchanged.extend(wanted[key].name for key in reload.unchanged)
    for rule_plan in reload.started.values():
        (changes.changed if rule_plan.takes else changes.added).append(rule_plan.rule.name)
    return changes


def assess(
    old: Config | None, new: Config, figures: Figures, probe: Probe | None = None
) -> tuple[Changes, Impact]:
    """The changes and their impact; ``probe`` tries each listener that would open
    (the default binds a fresh socket, see the module docstring), port by port,
    yielding between slices; a span reports its first port that fails. Listeners
    that would close or be handed over are named as ranges ("127.0.0.1:20000-20099")."""
    probe = probe or probe_bind
    running, wanted = _running(old), _wanted(new)
    reload = plan(running, wanted)
    owners = {id(span): rule_plan.rule for rule_plan in reload.started.values() for span in rule_plan.opened}
    impact = Impact(
        listeners_opened=[Listener(owners[id(span)].name, span.transport, span.text) for span in reload.opened],
        listeners_closed=[
            Listener(running[key].name, span.transport, span.text)
            for key in (*reload.removed, *reload.donors)
            for span in _spans_of(reload, key, running)
        ],
        connections_to_drain={
            running[key].name: figures.rule(running[key].name, running[key].protocol).active
            for key in (*reload.removed, *reload.donors)
        },
    )
    removed = [running[key] for key in reload.removed]
    probed = 0
    for span in reload.opened:
        rule = owners[id(span)]
        for _, port in span.keys():
            problem = probe(rule, span.host, port)
            probed += 1
            if probed % RuleRunner.bind_slice == 0:  # as many as a start binds between two pauses
                gevent.sleep(RuleRunner.slice_pause)
            if problem is not None and not _held_by(span.transport, span.host, port, removed):
                impact.problems.append(Problem(rule.name, span.transport, format_address(span.host, port), problem))
                break  # the first port of the span that fails says it
    return _changes(reload, running, wanted), impact


def _spans_of(reload: Plan, key: RuleKey, running: dict[RuleKey, Rule]) -> list[Span]:
    """The spans of old rule ``key`` that close: all of a removed rule's, what a donor drops."""
    if key in reload.dropped:
        return reload.dropped[key]
    return spans(running[key]) if key in reload.removed else []


def _held_by(transport: str, host: str, port: int, removed: list[Rule]) -> bool:
    """Whether a rule this change removes listens where ``host:port`` would (it closes first)."""
    return any(
        other.transport == transport
        and other.listen_ports is not None
        and port in other.listen_ports
        and any(_collide(other_host, host) for other_host in other.listen_hosts)
        for other in removed
    )


def _collide(a: str, b: str) -> bool:
    """Two listen hosts on one port and transport collide: the same address, or a
    wildcard covering the other (``::`` covers IPv4 too where the OS allows)."""
    if a.lower() == b.lower():
        return True
    for wildcard, other in ((a, b), (b, a)):
        if wildcard == "::" or (wildcard in ("0.0.0.0", "") and (_ipv4(other) or other in _WILDCARDS)):
            return True
    return False


def _ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def probe_bind(rule: Rule, host: str | None = None, port: int | None = None) -> str | None:
    """Bind a fresh socket where ``rule`` would listen (at ``host:port``, by default
    its first listener) and close it; the reason it cannot bind (the words of
    ``rule_failed``), or None."""
    udp = rule.transport == "udp"
    sock_type = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    host = rule.listen_host if host is None else host
    port = rule.listen_port if port is None else port
    try:
        infos = gevent.socket.getaddrinfo(
            host or None, port, socket.AF_UNSPEC, sock_type, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"cannot resolve listen address {host!r}: {exc.strerror}"
    family, _, proto, _, sockaddr = infos[0]
    sock = gevent.socket.socket(family, sock_type, proto)
    try:
        if not udp and sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in _WILDCARDS and hasattr(socket, "IPV6_V6ONLY"):
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        sock.bind(sockaddr)
    except OSError as exc:
        if udp and exc.errno == errno.EADDRINUSE:
            return f"{format_address(host, port)} is already in use by another process or rule: a UDP socket is bound there"
        return bind_error_message(host, port, exc)
    finally:
        sock.close()
    return None
