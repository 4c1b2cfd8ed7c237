"""Listen addresses of enabled rules that would collide at bind time (SPEC §3, §9),
found on intervals: a rule of 10,000 ports is one interval per listen address here,
never 10,000 entries.

Per transport, every (rule, host, port range) is swept in order of its first port;
the intervals still open at a point are indexed by host, so a new one is compared
only with those it can collide with (the same host, and the wildcards): 10,000
single-port rules cost about as much as 10,000 dictionary look-ups, and 100 rules of
10,000 ports about as much as 100. Each rule is reported once, against the earliest
rule (in file order) it collides with, naming the first address they share; two
addresses of one rule that collide are reported on its ``listenHost``.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gportmap.config.messages import Problem, show
from gportmap.config.model import PortRange, Rule, format_address

Host = ipaddress.IPv4Address | ipaddress.IPv6Address | str


@dataclass(frozen=True)
class _Interval:
    """One listen address of a rule over its ports."""

    seq: int
    rule: Rule
    host: str  # as written
    normal: Host
    ports: PortRange


@dataclass(frozen=True)
class Collision:
    """``later`` cannot bind where ``earlier`` listens: first at ``port``."""

    earlier: _Interval
    later: _Interval
    port: int

    @property
    def order(self) -> tuple[int, int]:
        return (self.earlier.rule.index, self.port)


@dataclass
class _Open:
    """The intervals open at the sweep's point, indexed by what a new one collides with."""

    by_host: dict[Host, dict[int, _Interval]] = field(default_factory=dict)
    ipv4: dict[int, _Interval] = field(default_factory=dict)  # on IPv4 addresses (wildcard included)
    ipv4_wildcards: dict[int, _Interval] = field(default_factory=dict)
    ipv6_wildcards: dict[int, _Interval] = field(default_factory=dict)
    every: dict[int, _Interval] = field(default_factory=dict)

    def _groups(self, interval: _Interval) -> list[dict[int, _Interval]]:
        host = interval.normal
        groups = [self.every]
        if isinstance(host, ipaddress.IPv4Address):
            groups.append(self.ipv4)
            if host.is_unspecified:
                groups.append(self.ipv4_wildcards)
        elif isinstance(host, ipaddress.IPv6Address) and host.is_unspecified:
            groups.append(self.ipv6_wildcards)
        return groups

    def add(self, interval: _Interval) -> None:
        self.by_host.setdefault(interval.normal, {})[interval.seq] = interval
        for group in self._groups(interval):
            group[interval.seq] = interval

    def remove(self, interval: _Interval) -> None:
        same = self.by_host[interval.normal]
        del same[interval.seq]
        if not same:
            del self.by_host[interval.normal]
        for group in self._groups(interval):
            del group[interval.seq]

    def colliding(self, interval: _Interval) -> Iterator[_Interval]:
        """The open intervals a listener on ``interval.host`` collides with."""
        host = interval.normal
        yield from self.by_host.get(host, {}).values()
        yield from (other for other in self.ipv6_wildcards.values() if other.normal != host)
        if isinstance(host, ipaddress.IPv4Address):
            yield from (other for other in self.ipv4_wildcards.values() if other.normal != host)
            if host.is_unspecified:
                yield from (other for other in self.ipv4.values() if other.normal != host)
        elif isinstance(host, ipaddress.IPv6Address) and host.is_unspecified:
            yield from (other for other in self.every.values() if other.normal != host)


def collisions(rules: Iterable[Rule], normal: Any) -> list[Collision]:
    """Per rule that collides with an earlier one (or with itself), the collision
    with the earliest such rule at their first common port. ``normal`` turns a
    host into what compares equal for the same address (``checks._normal_host``)."""
    by_transport: dict[str, list[_Interval]] = {}
    seq = 0
    for rule in rules:
        assert rule.listen_ports is not None
        for host in rule.listen_hosts:
            by_transport.setdefault(rule.transport, []).append(
                _Interval(seq, rule, host, normal(host), rule.listen_ports)
            )
            seq += 1
    found: dict[int, Collision] = {}  # by the later rule's index
    for intervals in by_transport.values():
        _sweep(intervals, found)
    return sorted(found.values(), key=lambda collision: collision.later.rule.index)


def _sweep(intervals: list[_Interval], found: dict[int, Collision]) -> None:
    intervals.sort(key=lambda interval: (interval.ports.first, interval.seq))
    open_now = _Open()
    ends: list[tuple[int, int, _Interval]] = []  # (last port, seq, interval): a heap
    for interval in intervals:
        while ends and ends[0][0] < interval.ports.first:
            open_now.remove(heapq.heappop(ends)[2])
        for other in open_now.colliding(interval):
            first, second = sorted((other, interval), key=lambda i: (i.rule.index, i.seq))
            collision = Collision(first, second, interval.ports.first)
            known = found.get(second.rule.index)
            if known is None or collision.order < known.order:
                found[second.rule.index] = collision
        open_now.add(interval)
        heapq.heappush(ends, (interval.ports.last, interval.seq, interval))


def collision_problem(collision: Collision, why: str | None) -> Problem:
    """The message for one collision (``why``: ``checks._overlap``'s words, "" for the
    same address). Single-port rules read as they always did."""
    earlier, later, port = collision.earlier, collision.later, collision.port
    new = _at(later, port)
    old = _at(earlier, port)
    if earlier.rule is later.rule:
        return (
            ("rules", later.rule.index, "listenHost"),
            f"{show(later.host)} overlaps {show(earlier.host)} in the same list: {why or 'the same address'}",
        )
    other = f"rules[{earlier.rule.index}] ({show(earlier.rule.name)})"
    if why:
        return (("rules", later.rule.index), f"listen address {new} overlaps {old} of {other}: {why}")
    return (
        ("rules", later.rule.index),
        f"listen address {new} is already used by {other}"
        f"{_range_note(earlier)}; two enabled {later.rule.transport} rules cannot listen on the same address and port",
    )


def _at(interval: _Interval, port: int) -> str:
    """The address at ``port``, and the range it belongs to when there is one."""
    address = format_address(interval.host, port)
    if len(interval.ports) == 1:
        return address
    return f"{address} (in {format_address(interval.host, interval.ports.text)})"


def _range_note(interval: _Interval) -> str:
    return "" if len(interval.ports) == 1 else f" (its {format_address(interval.host, interval.ports.text)})"
