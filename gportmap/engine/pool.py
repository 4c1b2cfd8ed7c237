"""A rule's targets (SPEC §8): which are up, which one a new connection gets.

``TargetPool`` holds one ``TargetState`` per target of a rule (a rule with
``targetHost``/``targetPort`` is a pool of one) and a ``Balancer`` for its
``balance``. Everything here is plain bookkeeping, no socket and no wait, so it
may run in hub callbacks: the connector (``gportmap.engine.connector``) asks
``acquire`` for a target and reports the attempt's outcome; the prober of active
health checks (``gportmap.runtime.health``) reports each check.

The interface other parts use, and keep to (added to, never changed):

- ``TargetPool.for_rule(rule, stats)``: the rule's pool, kept in its counters
  (``RuleStats.pool``) so that a reload that replaces the rule's server keeps the
  state and counters of every target that stays (SPEC §8, known by (host, port)).
- ``pool.targets``: the ``TargetState``s in list order; ``pool.health_check``,
  ``pool.rule``: what to probe and how (``targetTls`` for ``tls`` checks).
- ``pool.acquire(client_key, exclude)`` -> a target, its ``active`` counted, or
  None when no target is up; then exactly one of ``target.connected()`` (the
  connection now holds it: ``target.release(conn)`` at its end) or
  ``target.attempt_failed(error)`` (a passive-health failure; the caller retries
  on another with ``exclude``, at most ``pool.retries`` times). ``target.failed(error)``
  counts a failure seen while still holding it (UDP sessions).
- ``target.check_passed()`` / ``target.check_failed(error)``: one active check's
  result; ``rise`` passes in a row bring a target up, ``fall`` failures take it
  down. ``target.addresses`` (``gportmap.engine.resolver``) for the probe.
- ``pool.up`` (any target up), ``pool.describe()`` (``/stats``' ``targets``).
- ``target.carried()`` / ``target.continue_from(figures)``: after an upgrade in
  place, a carried connection or session holds its target again, and the old
  program's running totals of the target go on (``gportmap.runtime.carry``).

Passive health (HAProxy's ``observe layer4``, nginx's ``max_fails``): ``maxFails``
connect failures in a row take a target out for ``failTimeout`` seconds; after
that one attempt (the half-open trial) is let through, and its outcome decides.
Backups get connections only while no primary can take one. Each transition of a
target between up and down is logged once (``target_down``, ``target_up``).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gportmap.config.model import Balance, HealthCheck, Rule, Target
from gportmap.engine.resolver import TargetAddresses
from gportmap.events import TargetDown, TargetUp
from gportmap.log import emit, get_logger
from gportmap.stats import iso_time

if TYPE_CHECKING:
    from gportmap.stats import Connection, RuleStats

logger = get_logger("pool")


class TargetState:
    """One target of a pool: its health and its counters. Public attributes are
    read by stats, metrics and the prober; only the methods change them."""

    __slots__ = (
        "pool",
        "spec",
        "addresses",
        "checks_up",
        "streak",
        "fails",
        "out_until",
        "trial",
        "active",
        "total",
        "connect_failures",
        "bytes_received",
        "bytes_sent",
        "last_check",
        "last_error",
        "current_weight",
    )

    def __init__(self, pool: TargetPool, spec: Target) -> None:
        self.pool = pool
        self.spec = spec
        self.addresses = TargetAddresses(spec.host, spec.port)
        #: Up by the active checks (True without checks, and at first: as HAProxy
        #: and nginx, a target is up until shown otherwise).
        self.checks_up = True
        #: Checks in a row against the current check state (toward ``rise``/``fall``).
        self.streak = 0
        #: Connect failures in a row (passive health).
        self.fails = 0
        #: Monotonic time until which passive health keeps it out; 0: not out.
        self.out_until = 0.0
        #: Its half-open trial attempt is under way (one at a time).
        self.trial = False
        self.active = 0  # connections holding it, connects under way included
        self.total = 0  # connections that reached it
        self.connect_failures = 0
        self.bytes_received = 0  # from clients, of its connections that ended
        self.bytes_sent = 0
        self.last_check: float | None = None  # time.time() of the last active check
        self.last_error: str | None = None
        self.current_weight = 0  # smooth weighted round robin

    # -- what it is ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.label

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.key

    @property
    def weight(self) -> int:
        return self.spec.weight

    @property
    def backup(self) -> bool:
        return self.spec.backup

    @property
    def up(self) -> bool:
        """Up by its checks and not taken out by passive health."""
        return self.checks_up and not self.out_until

    def available(self, now: float) -> bool:
        """May get a new connection now: up, or out by passive health whose time is
        over and whose trial attempt is not under way."""
        if not self.checks_up:
            return False
        return not self.out_until or (now >= self.out_until and not self.trial)

    # -- connects (the connector) ----------------------------------------------------

    def connected(self) -> None:
        """A connect to it succeeded (and its PROXY header and TLS handshake); the
        connection holds it from now on and gives it back with ``release``."""
        was_up = self.up
        self.total += 1
        self.fails = 0
        self.trial = False
        self.out_until = 0.0
        self._changed(was_up, None)

    def attempt_failed(self, error: str) -> None:
        """A connect to it failed (refused, reset, timed out, a failed TLS handshake
        or PROXY header): it is given back and counted against it."""
        self.active -= 1
        self.failed(error)

    def failed(self, error: str) -> None:
        """A failure of the target seen by what still holds it (a UDP session whose
        datagrams met an ICMP error): counted against it, passive health applied,
        ``active`` unchanged (given back by ``release`` or ``cancelled`` later)."""
        self.connect_failures += 1
        self.last_error = error
        self.pool.count_rule_failure()
        max_fails = self.pool.rule.max_fails
        if not max_fails:
            return
        was_up = self.up
        self.fails += 1
        now = self.pool.clock()
        if self.out_until:
            if now >= self.out_until:  # the trial failed: out again
                self.trial = False
                self.out_until = now + self.pool.rule.fail_timeout
            # else: a connect begun before it was taken out; it is out already
        elif self.fails >= max_fails:
            self.out_until = now + self.pool.rule.fail_timeout
        self._changed(was_up, f"{self.fails} connect failures in a row: {error}")

    def cancelled(self) -> None:
        """A connect to it was given up before it ended (the client left, a drain
        cut-off): given back, counted neither way."""
        self.active -= 1
        self.trial = False

    def release(self, conn: Connection | None = None) -> None:
        """A connection that held it ended; its bytes are added to the target's."""
        self.active -= 1
        if conn is not None:
            self.bytes_received += conn.bytes_received
            self.bytes_sent += conn.bytes_sent

    # -- upgrade in place (gportmap.runtime.carry, gportmap.runtime.resume) -----------

    def carried(self) -> None:
        """A connection (or UDP session) carried over by an upgrade in place holds
        it again in the new program: counted active, as in the old program, and
        given back by ``release`` or ``cancelled`` at its end. Its connect was
        counted by the old program already (``continue_from``)."""
        self.active += 1

    def continue_from(self, figures: dict[str, Any]) -> None:
        """The old program's running totals of this target (its ``describe()``
        entry) go on from here, before this program counts anything of its own;
        its level (``active``) and its health are this program's."""
        self.total += int(figures.get("total", 0))
        self.connect_failures += int(figures.get("connect_failures", 0))
        moved = figures.get("bytes") or {}
        self.bytes_received += int(moved.get("received", 0))
        self.bytes_sent += int(moved.get("sent", 0))

    # -- active checks (the prober) --------------------------------------------------

    def check_passed(self) -> None:
        """One active check passed: ``rise`` in a row bring a down target up (and
        end a passive outage: the checks say it is back)."""
        self.last_check = time.time()
        check = self.pool.health_check
        rise = check.rise if check is not None else 1
        was_up = self.up
        if self.checks_up and not self.out_until:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= rise:
            self.streak = 0
            self.checks_up = True
            self.fails = 0
            self.out_until = 0.0
            self.trial = False
        self._changed(was_up, None)

    def check_failed(self, error: str) -> None:
        """One active check failed: ``fall`` in a row take an up target down; it
        gets no connection until ``rise`` checks pass."""
        self.last_check = time.time()
        self.last_error = error
        check = self.pool.health_check
        fall = check.fall if check is not None else 1
        was_up = self.up
        if not self.checks_up:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= fall:
            self.streak = 0
            self.checks_up = False
        self._changed(was_up, f"{fall} health checks failed in a row: {error}")

    def set_checked(self, up: bool, error: str | None, at: float | None) -> None:
        """Take the checks' verdict another process decided (a worker, from its
        master's one prober): no ``rise``/``fall`` counting here, and no log (the
        master logged the transition). A target brought back up also ends an
        outage passive health started, as a passing ``rise`` does."""
        if up and not self.checks_up:
            self.fails = 0
            self.out_until = 0.0
            self.trial = False
        self.checks_up = up
        self.streak = 0
        if at is not None:
            self.last_check = at
        if error is not None:
            self.last_error = error

    def _changed(self, was_up: bool, reason: str | None) -> None:
        """Log a transition between up and down, once."""
        now_up = self.up
        if now_up == was_up:
            return
        rule = self.pool.rule.name
        if now_up:
            emit(logger, TargetUp(rule=rule, target=self.name, address=self.address))
        else:
            emit(logger, TargetDown(rule=rule, target=self.name, address=self.address, reason=reason))

    def describe(self) -> dict[str, Any]:
        """Its entry in ``/stats`` (SPEC §8)."""
        return {
            "name": self.name,
            "address": self.address,
            "weight": self.weight,
            "backup": self.backup,
            "state": "up" if self.up else "down",
            "active": self.active,
            "total": self.total,
            "connect_failures": self.connect_failures,
            "bytes": {"received": self.bytes_received, "sent": self.bytes_sent},
            "last_check": iso_time(self.last_check) if self.last_check is not None else None,
            "last_error": self.last_error,
            **({"route": self.spec.route} if self.spec.route else {}),  # SPEC §13: a route's target
        }


class Balancer(Protocol):
    """Picks one of ``candidates`` (up targets in list order, never empty) for a
    client (``client_key``: its address without the port, None if unknown)."""

    def pick(self, candidates: Sequence[TargetState], client_key: str | None) -> TargetState:
        ...


class RoundRobin:
    """Smooth weighted round robin (nginx's ``ngx_http_upstream_get_peer``): each
    pick adds every candidate's weight to its current weight, takes the largest and
    subtracts the total from it. Weights 5:1:1 give a a b a c a a, not a a a a a b c."""

    def pick(self, candidates: Sequence[TargetState], client_key: str | None) -> TargetState:
        best: TargetState | None = None
        total = 0
        for target in candidates:
            target.current_weight += target.weight
            total += target.weight
            if best is None or target.current_weight > best.current_weight:
                best = target
        assert best is not None
        best.current_weight -= total
        return best


class LeastConn:
    """Fewest active connections relative to weight; ties in turn, so that an idle
    pool is still spread."""

    def __init__(self) -> None:
        self.turn = 0

    def pick(self, candidates: Sequence[TargetState], client_key: str | None) -> TargetState:
        n = len(candidates)
        self.turn = (self.turn + 1) % n
        best = candidates[self.turn]
        for i in range(1, n):
            target = candidates[(self.turn + i) % n]
            if target.active * best.weight < best.active * target.weight:
                best = target
        return best


class SourceHash:
    """A consistent hash of the client address (HAProxy's ``hash-type consistent``,
    ``lb_chash.c``): each target owns ``points_per_weight`` × weight points on a
    ring, a client goes to the owner of the first point at or after its hash that
    can take it. A target that goes down hands only its own clients on to the next
    points; the others keep theirs."""

    #: Points per unit of weight: enough for shares within a few percent.
    points_per_weight = 160
    #: Points on the ring at most (256 targets of weight 256 would make 10 million, and
    #: the ring is built in one go at each reload): past it, points are shared out in
    #: proportion to weight, at least one per target.
    max_points = 16384

    def __init__(self, targets: Sequence[TargetState]) -> None:
        total = sum(target.weight for target in targets)
        scale = min(float(self.points_per_weight), self.max_points / max(1, total))
        ring: list[tuple[int, int]] = []
        for index, target in enumerate(targets):
            for point in range(max(1, round(target.weight * scale))):
                ring.append((_hash(f"{target.key[0]}:{target.key[1]}#{point}"), index))
        ring.sort()
        self.hashes = [h for h, _ in ring]
        self.owners = [targets[i] for _, i in ring]
        self.rotor = 0

    def pick(self, candidates: Sequence[TargetState], client_key: str | None) -> TargetState:
        if client_key is None:  # no address to hash: spread in turn
            self.rotor = (self.rotor + 1) % len(candidates)
            return candidates[self.rotor]
        allowed = {id(target) for target in candidates}
        start = bisect.bisect_left(self.hashes, _hash(client_key))
        n = len(self.owners)
        for i in range(n):
            owner = self.owners[(start + i) % n]
            if id(owner) in allowed:
                return owner
        return candidates[0]  # a candidate not on the ring (never: every target is)


class First:
    """The first candidate in list order: failover order."""

    def pick(self, candidates: Sequence[TargetState], client_key: str | None) -> TargetState:
        return candidates[0]


class WeightedRandom:
    """A random candidate, chances by weight."""

    def __init__(self) -> None:
        self.random = random.Random()

    def pick(self, candidates: Sequence[TargetState], client_key: str | None) -> TargetState:
        return self.random.choices(candidates, weights=[t.weight for t in candidates])[0]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def make_balancer(balance: Balance, targets: Sequence[TargetState]) -> Balancer:
    """The balancer of ``balance`` over ``targets`` (all of the pool's, in order)."""
    if balance is Balance.LEASTCONN:
        return LeastConn()
    if balance is Balance.SOURCE:
        return SourceHash(targets)
    if balance is Balance.FIRST:
        return First()
    if balance is Balance.RANDOM:
        return WeightedRandom()
    return RoundRobin()


class TargetPool:
    """One rule's targets and how a connection picks one (module docstring)."""

    #: The clock of passive health's ``failTimeout`` (a test may replace it).
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, rule: Rule, stats: RuleStats | None = None) -> None:
        self.rule = rule
        self.stats = stats
        self.targets: tuple[TargetState, ...] = tuple(TargetState(self, spec) for spec in rule.targets)
        self.balancer = make_balancer(rule.balance, self.targets)
        #: The connector's deadline sweeps of this pool's connects, by timeout
        #: (``gportmap.engine.connector.ConnectSweep``; one or two timeouts a rule).
        self.sweeps: dict[float, Any] = {}

    @classmethod
    def for_rule(cls, rule: Rule, stats: RuleStats) -> TargetPool:
        """The pool of ``rule``, kept in its counters across its servers: made the
        first time, reconfigured (``configure``) when the rule changed."""
        pool = stats.pool
        if isinstance(pool, TargetPool):
            pool.configure(rule)
            return pool
        pool = cls(rule, stats)
        stats.pool = pool
        return pool

    def configure(self, rule: Rule) -> None:
        """Take ``rule``'s targets and settings; a target that stays (same host and
        port) keeps its state, counters and connections, a new one starts up."""
        if rule == self.rule:
            return
        old = {state.key: state for state in self.targets}
        self.rule = rule
        states = []
        for spec in rule.targets:
            state = old.pop(spec.key, None)
            if state is None:
                state = TargetState(self, spec)
            else:
                state.spec = spec
                state.current_weight = 0
            states.append(state)
        self.targets = tuple(states)
        self.balancer = make_balancer(rule.balance, self.targets)

    @property
    def health_check(self) -> HealthCheck | None:
        return self.rule.health_check

    @property
    def retries(self) -> int:
        return self.rule.retries

    @property
    def up(self) -> bool:
        """Some target is up: the rule can serve (``/healthz``)."""
        return any(target.up for target in self.targets)

    @property
    def literal(self) -> bool:
        """Every target is an IP address: connects need no lookup, ever."""
        return all(target.addresses.literal for target in self.targets)

    def acquire(self, client_key: str | None, exclude: Collection[TargetState] = ()) -> TargetState | None:
        """The target for a new connection (or its retry, ``exclude`` holding the
        targets tried already), its ``active`` counted; None when none can take
        it. Primaries first; backups only when no primary can."""
        now = self.clock()
        targets = self.targets
        if len(targets) == 1:  # most rules: no candidate lists, no balancer
            target = targets[0]
            if target in exclude or not target.available(now):
                return None
            target.active += 1
            if target.out_until:
                target.trial = True
            return target
        candidates = [t for t in self.targets if not t.backup and t not in exclude and t.available(now)]
        if not candidates:
            candidates = [t for t in self.targets if t.backup and t not in exclude and t.available(now)]
            if not candidates:
                return None
        target = candidates[0] if len(candidates) == 1 else self.balancer.pick(candidates, client_key)
        target.active += 1
        if target.out_until:
            target.trial = True
        return target

    def count_rule_failure(self) -> None:
        """Count an upstream connect failure of the rule: every failed attempt, and
        every connection that found no target up (``unavailable``)."""
        if self.stats is not None:
            self.stats.connect_failures += 1

    def unavailable(self) -> None:
        """A connection found no target that could take it: closed at once, and
        counted as the rule's connect failure."""
        self.count_rule_failure()

    def describe(self) -> list[dict[str, Any]]:
        """``/stats``' ``targets`` of the rule."""
        return [target.describe() for target in self.targets]

    def no_target_error(self) -> str:
        """Why a connection found no target."""
        return "no target is up" if len(self.targets) > 1 else f"target {self.targets[0].address} is down"


def client_key(address: object) -> str | None:
    """What ``source`` hashes: the client's IP address, without its port."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return None
