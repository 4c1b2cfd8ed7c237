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
problem (removals happen first); only added listeners are tried (a changed rule
keeps its socket).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent.socket

from gportmap.config import Config, Rule
from gportmap.engine.net import bind_error_message
from gportmap.runtime.supervisor import Changes

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


#: ``probe(rule)``: why its listener could not bind, or None.
Probe = Callable[[Rule], "str | None"]


def plan_changes(old: Config | None, new: Config) -> Changes:
    """The changes ``Supervisor.apply(new)`` would make after ``old``, by name."""
    running = {rule.key: rule for rule in (old.enabled_rules if old is not None else ())}
    wanted = {rule.key: rule for rule in new.enabled_rules}
    changes = Changes()
    changes.removed.extend(rule.name for key, rule in running.items() if key not in wanted)
    for key, rule in wanted.items():
        before = running.get(key)
        if before is None:
            changes.added.append(rule.name)
        elif before == rule:
            changes.unchanged.append(rule.name)
        else:
            changes.changed.append(rule.name)
    return changes


def assess(
    old: Config | None, new: Config, figures: Figures, probe: Probe | None = None
) -> tuple[Changes, Impact]:
    """The changes and their impact; ``probe`` tries each added listener (the
    default binds a fresh socket, see the module docstring). Yields while a listen
    host name resolves."""
    probe = probe or probe_bind
    running = {rule.key: rule for rule in (old.enabled_rules if old is not None else ())}
    wanted = {rule.key: rule for rule in new.enabled_rules}
    removed = [rule for key, rule in running.items() if key not in wanted]
    added = [rule for key, rule in wanted.items() if key not in running]
    changed = [running[key] for key, rule in wanted.items() if key in running and running[key] != rule]
    impact = Impact(
        listeners_opened=[_listener(rule) for rule in added],
        listeners_closed=[_listener(rule) for rule in removed],
        connections_to_drain={
            rule.name: figures.rule(rule.name, rule.protocol).active for rule in removed + changed
        },
    )
    for rule in added:
        problem = probe(rule)
        if problem is not None and not _held_by(rule, removed):
            impact.problems.append(Problem(rule.name, rule.transport, rule.listen, problem))
    return plan_changes(old, new), impact


def _listener(rule: Rule) -> Listener:
    return Listener(rule.name, rule.transport, rule.listen)


def _held_by(rule: Rule, removed: list[Rule]) -> bool:
    """Whether a rule this change removes listens where ``rule`` would (it closes first)."""
    return any(
        other.transport == rule.transport
        and other.listen_port == rule.listen_port
        and _collide(other.listen_host, rule.listen_host)
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


def probe_bind(rule: Rule) -> str | None:
    """Bind a fresh socket where ``rule`` would listen and close it; the reason it
    cannot bind (the words of ``rule_failed``), or None."""
    udp = rule.transport == "udp"
    sock_type = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    host, port = rule.listen_host, rule.listen_port
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
            return f"{rule.listen} is already in use by another process or rule: a UDP socket is bound there"
        return bind_error_message(host, port, exc)
    finally:
        sock.close()
    return None
