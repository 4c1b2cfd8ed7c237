"""Which listening sockets a reload keeps, opens and closes (SPEC §4, §9), on intervals.

A rule listens on spans: one address over a port range (``Span``). A reload matches
each listener (transport, address, port) of the new version with the old one's on
its own: a new rule takes over the sockets of every old rule it shares listeners
with (those old rules are *donors*: their other sockets close, their connections
drain), binds what no old rule held, and an old rule that shares nothing is removed
first (its addresses may be what an added rule needs).

Everything is computed on intervals: the old spans are indexed per (transport,
address) sorted by first port (they never overlap: the old version was valid), so
finding what a new span shares is a bisection, and a 10,000-port range is one entry.
The supervisor applies the plan; a dry run (``gportmap.runtime.impact``) reports it.

Every listener is a descriptor: a version whose listeners do not fit the open-file
limit is refused before anything changes (``check_open_files``), by the supervisor
that would bind them and, with ``--workers``, by the master before it sends the
version to any worker.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gportmap.config.model import Config, PortRange, Rule, format_address
from gportmap.errors import ConfigError
from gportmap.stats import FD_RESERVE

#: What identifies a rule's runner: its first listener (``Rule.key``).
RuleKey = tuple[str, str, int]
#: One listening socket of a rule: (host as written, port).
ListenKey = tuple[str, int]


@dataclass(frozen=True)
class Span:
    """One listen address of a rule over a port range."""

    transport: str
    host: str
    ports: PortRange

    @property
    def text(self) -> str:
        """"127.0.0.1:20000-20099": how logs and the dry run name it."""
        return format_address(self.host, self.ports.text)

    @property
    def count(self) -> int:
        return len(self.ports)

    def keys(self) -> Iterator[ListenKey]:
        """Every socket of the span; only where sockets are handled one by one."""
        host = self.host
        return ((host, port) for port in range(self.ports.first, self.ports.last + 1))


def spans(rule: Rule) -> list[Span]:
    return [Span(listen.transport, listen.host, listen.ports) for listen in rule.listeners]


def subtract(span: Span, cuts: Iterable[PortRange]) -> list[Span]:
    """``span`` without the port ranges ``cuts`` (which lie within it)."""
    left: list[Span] = []
    start = span.ports.first
    for cut in sorted(cuts):
        if cut.first > start:
            left.append(Span(span.transport, span.host, PortRange(start, cut.first - 1)))
        start = max(start, cut.last + 1)
    if start <= span.ports.last:
        left.append(Span(span.transport, span.host, PortRange(start, span.ports.last)))
    return left


def texts(items: Iterable[Span]) -> list[str]:
    return [span.text for span in items]


class SpanIndex:
    """The spans of a set of rules, to find what a new rule shares with them."""

    def __init__(self, rules: Mapping[RuleKey, Rule]) -> None:
        by_address: dict[tuple[str, str], list[tuple[int, int, RuleKey]]] = {}
        for key, rule in rules.items():
            for span in spans(rule):
                by_address.setdefault((span.transport, span.host), []).append((span.ports.first, span.ports.last, key))
        self._index = {address: sorted(entries) for address, entries in by_address.items()}
        self._firsts = {address: [entry[0] for entry in entries] for address, entries in self._index.items()}

    def shared(self, span: Span) -> Iterator[tuple[RuleKey, Span]]:
        """(rule key, common span) of every indexed rule that listens on part of ``span``."""
        address = (span.transport, span.host)
        entries = self._index.get(address)
        if not entries:
            return
        at = bisect.bisect_right(self._firsts[address], span.ports.last) - 1
        while at >= 0 and entries[at][1] >= span.ports.first:
            first, last, key = entries[at]
            common = PortRange(max(first, span.ports.first), min(last, span.ports.last))
            yield key, Span(span.transport, span.host, common)
            at -= 1


@dataclass
class RulePlan:
    """What a reload does to one new (added or changed) rule's listeners."""

    rule: Rule
    #: Donor rule key -> the spans its sockets hand over to this rule.
    takes: dict[RuleKey, list[Span]] = field(default_factory=dict)
    #: Spans no old rule held: bound anew.
    opened: list[Span] = field(default_factory=list)

    @property
    def kept(self) -> list[Span]:
        return [span for shared in self.takes.values() for span in shared]


@dataclass
class Plan:
    """A reload on listeners: see the module docstring."""

    unchanged: list[RuleKey] = field(default_factory=list)
    #: Old rules that share no listener with any new one: removed first.
    removed: list[RuleKey] = field(default_factory=list)
    #: New rules that are not unchanged, in file order.
    started: dict[RuleKey, RulePlan] = field(default_factory=dict)
    #: Old rules that hand sockets over (then retire and drain).
    donors: list[RuleKey] = field(default_factory=list)
    #: Spans of old rules (removed or donors) that no new rule takes: closed.
    closed: list[Span] = field(default_factory=list)
    #: Per donor, its spans that no new rule takes (closed before anything binds).
    dropped: dict[RuleKey, list[Span]] = field(default_factory=dict)

    def changed(self, key: RuleKey, old: Mapping[RuleKey, Any]) -> bool:
        """A started rule counts as changed when it takes over an old rule's listeners
        (as SPEC §4's same-key rule did), else as added."""
        return bool(self.started[key].takes) or key in old

    @property
    def opened(self) -> list[Span]:
        return [span for plan in self.started.values() for span in plan.opened]

    @property
    def kept(self) -> list[Span]:
        return [span for plan in self.started.values() for span in plan.kept]


def plan(old: Mapping[RuleKey, Rule], new: Mapping[RuleKey, Rule]) -> Plan:
    """The reload from the rules ``old`` (running, by key) to ``new`` (enabled, by key)."""
    result = Plan()
    for key, rule in new.items():
        if old.get(key) == rule:
            result.unchanged.append(key)
    unchanged = set(result.unchanged)
    candidates = {key: rule for key, rule in old.items() if key not in unchanged}
    index = SpanIndex(candidates)
    taken: dict[RuleKey, list[Span]] = {}
    for key, rule in new.items():
        if key in unchanged:
            continue
        rule_plan = RulePlan(rule)
        for span in spans(rule):
            cuts = []
            for donor, common in index.shared(span):
                rule_plan.takes.setdefault(donor, []).append(common)
                taken.setdefault(donor, []).append(common)
                cuts.append(common.ports)
            rule_plan.opened.extend(subtract(span, cuts))
        result.started[key] = rule_plan
    for key, rule in candidates.items():
        if key in taken:
            result.donors.append(key)
        else:
            result.removed.append(key)
        given = taken.get(key, [])
        for span in spans(rule):
            cuts = [common.ports for common in given if common.host == span.host and common.transport == span.transport]
            left = subtract(span, cuts)
            result.closed.extend(left)
            if key in taken:
                result.dropped.setdefault(key, []).extend(left)
    return result


def check_open_files(config: Config, open_files: int | None) -> None:
    """SPEC §9: the listening sockets of every enabled rule must fit the open-file
    limit ``open_files`` (None: none) with the reserve the process needs; a
    ConfigError names the rules that take the most and the limit that would fit."""
    if open_files is None:
        return
    listeners = sum(rule.listener_count for rule in config.enabled_rules)
    # Under a tiny limit (a container's 48) the whole reserve cannot be kept: a
    # quarter of the limit is, and the connection cap shrinks to what is left.
    reserve = min(FD_RESERVE, open_files // 4)
    room = open_files - reserve
    if listeners <= room:
        return
    biggest = sorted(config.enabled_rules, key=lambda rule: -rule.listener_count)[:3]
    named = ", ".join(f"{rule.name} {rule.listener_count:,}" for rule in biggest)
    raise ConfigError(
        [
            f"{config.path}: the enabled rules listen on {listeners:,} sockets ({named}), but the "
            f"open-file limit ({open_files:,}) leaves room for {max(room, 0):,} after the {reserve} "
            f"the process keeps for itself; raise the limit (ulimit -n, LimitNOFILE=, docker --ulimit "
            f"nofile=) to at least {listeners + FD_RESERVE + 2:,}, or listen on fewer ports"
        ]
    )
