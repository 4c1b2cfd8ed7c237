"""The one owner of running rule servers.

Each enabled rule gets a ``RuleRunner`` whose life is a small state machine
(``RuleState``, its transitions checked in one place). ``Supervisor.apply(config)``
turns the running set into the one a config asks for, matching each listener
(transport, listen address, port) on its own as SPEC §4 and §9 say (the plan is
``gportmap.runtime.listeners``):

- unchanged rules keep their server and connections;
- a changed rule gets a new server on the *same* listening sockets, handed over
  without closing them, so no connection attempt is refused; the old server drains;
  ports a range drops close, ports it adds are bound first;
- removed or disabled rules close their listeners and drain;
- added rules start; a rule that cannot start (bind error, or any exception of
  its server or plugins) fails alone, is reported and retried with back-off.

A rule's life is one state table (``RuleState``, ``RuleEvent``, ``_TABLE``): every
step is listed, anything else raises ``StateError``. Applies never overlap: the
service's ``Applier`` serialises them, and ``apply`` refuses to be entered twice.

Draining servers finish their connections for up to ``drainTimeout`` seconds and are
then cut. A failure of one rule never touches the others.
"""

from __future__ import annotations

import enum
import itertools
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from gportmap.config import Config, Rule
from gportmap.config.model import PortRange
from gportmap.engine.net import BindRetry, bind_listener, bind_resolved, resolve_listen
from gportmap.engine.relay import BufferPool
from gportmap.errors import BindError, GportmapError
from gportmap.events import (
    ConnectionsCapped,
    ListenersChanged,
    RuleFailed,
    RuleServerRetired,
    RuleStarted,
    RuleStopped,
)
from gportmap.log import RateLimiter, emit, get_logger
from gportmap.protocols import ServerContext, create_server
from gportmap.runtime.listeners import (
    ListenKey,
    Plan,
    RuleKey,
    RulePlan,
    Span,
    check_open_files,
    plan,
    spans,
    subtract,
    texts,
)
from gportmap.stats import StatsRegistry, fd_capacity

if TYPE_CHECKING:
    from gportmap.runtime.systemd import InheritedSockets

logger = get_logger("supervisor")


class RuleState(enum.Enum):
    """Where one enabled rule's server is in its life (``/stats`` ``state``)."""

    STARTING = "starting"  #: binding its listener (may yield: addresses resolve in a thread pool)
    RUNNING = "running"  #: accepting
    FAILED = "failed"  #: could not start; a retry is scheduled
    DRAINING = "draining"  #: not accepting; its open connections finish (up to drainTimeout)
    STOPPING = "stopping"  #: retired while starting: whatever the start binds is closed at once
    STOPPED = "stopped"  #: nothing left: no listener, no connection, no retry


class RuleEvent(enum.Enum):
    """What can happen to a rule's server; ``_TABLE`` says what each does in each state."""

    BOUND = "bound"  #: the start succeeded: the server listens
    START_FAILED = "start_failed"  #: the start raised (a bind error, or a bug in a server or plugin)
    RETRY = "retry"  #: the retry back-off ran out: start again
    RETIRE = "retire"  #: a reload removed or changed the rule, or gportmap stops
    DRAINED = "drained"  #: its connections finished or the drain deadline passed: the rest is cut


#: The complete life cycle, in the manner of h11's ``_state.py``: every (state, event)
#: pair listed here has one outcome; any other pair is a bug and raises StateError,
#: loudly, instead of leaving a rule in a state nobody tracks. Retiring is defined in
#: every state: a rule removed while it is starting (its bind still resolving) ends
#: in STOPPING, and the start that completes then closes what it bound.
_TABLE: dict[tuple[RuleState, RuleEvent], RuleState] = {
    (RuleState.STARTING, RuleEvent.BOUND): RuleState.RUNNING,
    (RuleState.STARTING, RuleEvent.START_FAILED): RuleState.FAILED,
    (RuleState.STARTING, RuleEvent.RETIRE): RuleState.STOPPING,
    (RuleState.RUNNING, RuleEvent.RETIRE): RuleState.DRAINING,
    (RuleState.FAILED, RuleEvent.RETRY): RuleState.STARTING,
    (RuleState.FAILED, RuleEvent.RETIRE): RuleState.STOPPED,
    (RuleState.DRAINING, RuleEvent.RETIRE): RuleState.DRAINING,
    (RuleState.DRAINING, RuleEvent.DRAINED): RuleState.STOPPED,
    (RuleState.STOPPING, RuleEvent.BOUND): RuleState.STOPPED,
    (RuleState.STOPPING, RuleEvent.START_FAILED): RuleState.STOPPED,
    (RuleState.STOPPING, RuleEvent.RETIRE): RuleState.STOPPING,
    (RuleState.STOPPED, RuleEvent.RETIRE): RuleState.STOPPED,
}


def next_state(state: RuleState, event: RuleEvent) -> RuleState:
    """The state after ``event`` in ``state``; StateError if the life cycle has no such step."""
    try:
        return _TABLE[(state, event)]
    except KeyError:
        raise StateError(f"a rule that is {state.value} cannot take the event {event.value}") from None


class StateError(GportmapError):
    """A transition the rule life cycle does not have: a bug, never a user error."""


@dataclass(frozen=True)
class Changes:
    """What one ``apply`` did, by rule name (the ``config_reloaded`` record)."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def as_fields(self) -> dict[str, list[str]]:
        return {
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "unchanged": self.unchanged,
        }


class RuleRunner:
    """One enabled rule's server: its state, its retries, its drain.

    Its server is built at each start, not before: a server whose construction
    raises (a plugin failing when built for real) fails this rule's start like a
    bind error does, and is built again at the retry.

    With ``inherited`` sockets (systemd's socket activation), a start that is handed
    no listener adopts the passed socket of the rule's address, if there is one,
    instead of binding: at the first start and at every retry."""

    def __init__(self, rule: Rule, context: ServerContext, inherited: InheritedSockets | None = None) -> None:
        self.rule = rule
        self.context = context
        self.inherited = inherited
        self.state = RuleState.STARTING
        self.error: str | None = None
        self.server = None  # a protocol server while starting, running or draining
        self._retry: gevent.Greenlet | None = None
        self._backoff = BindRetry()
        #: Its single listener went to a successor (``give``): retiring keeps it open.
        self._given = False
        #: Retired by a reload that handed its listeners to a new server of the same
        #: rule: its end is that server's predecessor finishing, not the rule stopping.
        self.handed_on = False

    def _on(self, event: RuleEvent) -> RuleState:
        self.state = next_state(self.state, event)
        return self.state

    def start(
        self,
        listener: socket.socket | None = None,
        take: Callable[[], Iterator[dict[ListenKey, socket.socket]]] | None = None,
        held: Sequence[Span] = (),
    ) -> bool:
        """Serve on ``listener`` (handed over) or a new socket. Any failure (a bind
        error, or any exception of the server or its plugins: a bug) fails this rule
        alone, is reported and retried; a handed-over listener is then closed, so
        attempts are refused rather than left queueing where nobody accepts.

        A reload hands sockets over with ``take``: an iterator of slices of the
        sockets of the spans ``held`` (each slice served as soon as it is taken,
        without yielding between, so that no attempt is refused); the rest is
        bound first. A rule with several listeners (SPEC §9) starts in
        ``_start_many``."""
        if self.rule.listener_count > 1:
            return self._start_many(take, held)
        if take is not None and listener is None:
            listener = next((sock for given in take() for sock in given.values()), None)
        rule = self.rule
        handover = listener is not None
        adopted = None
        try:
            if listener is None and self.inherited is not None:
                adopted = self.inherited.take(rule)  # may yield: a host name resolves
                listener = adopted.duplicate() if adopted is not None else None
            self.server = create_server(rule, self.context)
            if listener is None and self.context.reuse_port:
                # one of several workers: the socket shares the port with the others
                sock_type = socket.SOCK_DGRAM if rule.transport == "udp" else socket.SOCK_STREAM
                listener = bind_listener(rule.listen_host, rule.listen_port, sock_type, reuse_port=True)
            self.server.start(listener)
        except Exception as exc:  # noqa: BLE001 - contained: one rule fails, never the reload
            self._discard(listener)
            if self._on(RuleEvent.START_FAILED) is RuleState.FAILED:
                self._report_failure(exc)
            return False
        if self._on(RuleEvent.BOUND) is RuleState.STOPPED:
            self.server.close()  # retired while it was binding: it never serves
            self.server = None
            return False
        self.error = None
        if adopted is None:
            source = ""
        elif adopted.name == "upgrade":  # gportmap.runtime.carry.CARRIED_NAME (a higher layer)
            source = f" (carried over by an upgrade, fd {adopted.fd})"
        else:
            source = f" (adopted fd {adopted.fd} '{adopted.name}' from the service manager)"
        emit(
            logger,
            RuleStarted(
                rule=rule.name,
                protocol=rule.protocol,
                listen=rule.listen,
                target=rule.target,
                handover=handover,
                adopted=adopted is not None,
                transport=rule.transport,
                origin=source,
            ),
        )
        return True

    def _start_many(
        self, take: Callable[[], Iterator[dict[ListenKey, socket.socket]]] | None, held: Sequence[Span]
    ) -> bool:
        """``start`` for a rule with several listening sockets: bind every one not
        ``held`` (in slices, yielding between them), then serve with one server on a
        first slice of them and of those taken over, then add the other slices,
        yielding between two (``_take_rest``): a 10,000-port start or handover holds
        the hub for a slice at a time (the old server still accepts on what it has
        not given yet; a bound socket not served yet queues its clients)."""
        rule = self.rule
        sockets: dict[ListenKey, socket.socket] = {}
        adopted = bound_count = 0
        slices: Iterator[dict[ListenKey, socket.socket]] = iter(())
        first: dict[ListenKey, socket.socket] = {}
        try:
            adopted = self._bind_many(held, sockets)  # may yield
            bound_count = len(sockets)
            bound = _chunks(sockets, self.bind_slice)
            first = next(bound, {})
            if take is not None:
                slices = take()
                given = next(slices, {})
                sockets.update(given)
                first.update(given)
            slices = itertools.chain(bound, slices)
            self.server = create_server(rule, self.context)
            start_many = getattr(self.server, "start_many", None)
            if start_many is None:
                raise BindError(f"protocol {rule.protocol!r} cannot listen on several addresses or ports")
            start_many(first)
        except Exception as exc:  # noqa: BLE001 - contained: one rule fails, never the reload
            self._discard(None)
            for sock in sockets.values():
                sock.close()
            if self._on(RuleEvent.START_FAILED) is RuleState.FAILED:
                self._report_failure(exc)
            return False
        if self._on(RuleEvent.BOUND) is RuleState.STOPPED:
            self.server.close()  # retired while it was binding: it never serves
            self.server = None
            return False
        sockets_count = len(first) + self._take_rest(slices)
        handed = sockets_count - bound_count
        self.error = None
        origin = f" ({sockets_count:,} sockets: {handed:,} handed over, {adopted:,} inherited)" if handed or adopted else ""
        event = RuleStarted(
            rule=rule.name,
            protocol=rule.protocol,
            listen=rule.listen,
            target=rule.target,
            listeners=sockets_count,
            handover=handed,
            adopted=adopted,
            transport=rule.transport,
            origin=origin,
        )
        emit(logger, event)
        return True

    #: Sockets a start binds (or a reload hands over) between two yields to the hub:
    #: a 10,000-port range never holds it for the whole bind.
    bind_slice = 256
    #: Seconds waited between two slices: on a timer, so that the loop polls for I/O
    #: and runs its timers in between (``sleep(0)`` only lets ready greenlets run).
    slice_pause = 0.001

    def _take_rest(self, slices: Iterator[dict[ListenKey, socket.socket]]) -> int:
        """Serve on the remaining slices of a handover, one at a time, yielding
        between them; stops (closing what it took) if the rule is retired meanwhile."""
        count = 0
        for given in slices:
            gevent.sleep(self.slice_pause)  # let connections and the admin endpoint run between slices
            if self.state is not RuleState.RUNNING or self.server is None:
                for sock in given.values():
                    sock.close()
                continue  # drain the iterator: each donor's sockets are its to close otherwise
            self.server.add_listeners(given)
            count += len(given)
        return count

    def _bind_many(self, held: Sequence[Span], sockets: dict[ListenKey, socket.socket]) -> int:
        """Bind every listener of the rule outside ``held`` into ``sockets`` (adopting
        inherited ones where passed); the number adopted. BindError on the first
        that fails (the caller closes what was bound)."""
        rule = self.rule
        sock_type = socket.SOCK_DGRAM if rule.transport == "udp" else socket.SOCK_STREAM
        adopted = done = 0
        for span in spans(rule):
            cuts = [other.ports for other in held if other.host == span.host and other.transport == span.transport]
            todo = subtract(span, cuts)
            if not todo:
                continue
            inherited = self._inherited_ports(span)  # may yield: a host name resolves
            address = resolve_listen(span.host, span.ports.first, sock_type)  # may yield, likewise
            for part in todo:
                for key in part.keys():
                    if self.state is RuleState.STOPPING:
                        raise BindError("retired while it was binding")
                    passed = inherited.get(key[1])
                    if passed is not None:
                        sockets[key] = passed.duplicate()
                        adopted += 1
                    else:
                        sockets[key] = bind_resolved(address, key[1], self.context.reuse_port)
                    done += 1
                    if done % self.bind_slice == 0:
                        gevent.sleep(self.slice_pause)  # let connections and the admin endpoint run
        return adopted

    def _inherited_ports(self, span: Span) -> dict[int, Any]:
        """The sockets systemd (or an upgrade) passed for ``span``, by port."""
        if self.inherited is None:
            return {}
        return self.inherited.matching(span.transport, span.host, span.ports)

    def give(self, spans_given: Sequence[Span]) -> dict[ListenKey, socket.socket]:
        """A reload hands the sockets of ``spans_given`` to a successor: stop accepting
        on them and return them, still open (SPEC §9). Nothing unless running."""
        if self.state is not RuleState.RUNNING or self.server is None:
            return {}
        rule = self.rule
        if rule.listener_count == 1:
            key = (rule.listen_host, rule.listen_port)
            if not any(span.host == key[0] and key[1] in span.ports for span in spans_given):
                return {}
            self._given = True
            listener = self.server.release_listener()
            return {key: listener} if listener is not None else {}
        return self.server.take_listeners([key for span in spans_given for key in span.keys()])

    def drop(self, spans_dropped: Sequence[Span]) -> None:
        """A reload drops these listeners of a rule (all of a removed rule's, or those
        of a rule that hands the others on): they close now (attempts refused),
        before any other rule binds, ``bind_slice`` at a time with a pause between
        (closing 10,000 sockets at once would hold the hub)."""
        if self.state is not RuleState.RUNNING or self.server is None or self.rule.listener_count == 1:
            return
        size = self.bind_slice
        for span in spans_dropped:
            for first in range(span.ports.first, span.ports.last + 1, size):
                if self.state is not RuleState.RUNNING or self.server is None:
                    return  # retired meanwhile (gportmap stops): its close takes the rest
                part = Span(span.transport, span.host, PortRange(first, min(first + size - 1, span.ports.last)))
                for sock in self.server.take_listeners(list(part.keys())).values():
                    sock.close()
                if span.count > size:
                    gevent.sleep(self.slice_pause)

    def _discard(self, listener: socket.socket | None) -> None:
        """After a failed start: close what the start opened or was handed."""
        server, self.server = self.server, None
        if server is not None:
            try:
                server.close()
            except Exception:  # noqa: BLE001 - a half-built server; its socket is closed below
                pass
        if listener is not None:
            listener.close()

    def _report_failure(self, exc: Exception) -> None:
        rule = self.rule
        internal = not isinstance(exc, BindError)
        self.error = f"internal error: {exc!r}"[:300] if internal else str(exc)
        event = RuleFailed(rule=rule.name, listen=rule.listen, error=self.error, retry_in=self._backoff.delay)
        emit(logger, event, exc_info=exc if internal else None)  # a bug: its traceback, once
        self._retry = self._backoff.schedule(self._try_again)

    def _try_again(self) -> None:
        self._retry = None
        self._on(RuleEvent.RETRY)
        self.start()

    def retire(self, keep_listener: bool) -> socket.socket | None:
        """Stop accepting. With ``keep_listener`` the open listening socket is
        returned for a successor; otherwise it is closed (attempts are refused).
        Defined in every state (see ``_TABLE``)."""
        if self._retry is not None:
            self._retry.kill()
            self._retry = None
        was = self.state
        self._on(RuleEvent.RETIRE)
        if was is not RuleState.RUNNING:
            return None
        if keep_listener or self._given:
            return self.server.release_listener()
        self.server.close()
        return None

    def finish(self) -> None:
        """After the drain: cut what is left and report the rule's server stopped."""
        if self.state is not RuleState.DRAINING:
            return
        left = self.server.active
        self.server.kill()
        self._on(RuleEvent.DRAINED)
        if self.handed_on:
            emit(logger, RuleServerRetired(rule=self.rule.name, cut_connections=left))
        else:
            emit(logger, RuleStopped(rule=self.rule.name, listen=self.rule.listen, cut_connections=left))


class Supervisor:
    """Owns every rule server: applies configs, drains retired servers, stops all."""

    def __init__(
        self,
        stats: StatsRegistry | None = None,
        splice: bool = False,
        reuse_port: bool = False,
        open_files: int | None = None,
        inherited: InheritedSockets | None = None,
    ) -> None:
        """``open_files``: the process's open-file limit, which caps the connections
        it admits (None: no cap, where the platform has no such limit).
        ``inherited``: the sockets systemd passed, adopted by the rules they match."""
        self.stats = stats or StatsRegistry()
        self.inherited = inherited
        self.open_files = open_files
        self._capped_at: tuple[int, int] | None = None
        self.context = ServerContext(
            stats=self.stats,
            buffers=BufferPool(),
            rejections=RateLimiter(),
            splice=splice,
            reuse_port=reuse_port,
        )
        self.runners: dict[tuple[str, str, int], RuleRunner] = {}
        self.draining: dict[RuleRunner, gevent.Greenlet] = {}
        self.config: Config | None = None
        #: The listeners the last apply kept, opened and closed (``gportmap.runtime.listeners``).
        self.last_plan: Plan | None = None
        #: Set by ``close_listeners``: gportmap stops, no listener opens again.
        self.closed = False
        self._applying = False

    def apply(self, config: Config) -> Changes:
        """Make the running rules those of ``config``; see the module docstring.

        One apply at a time: the service's ``Applier`` serialises every reload, and
        a second apply entering while one yields is a bug, refused loudly. After
        ``close_listeners`` (gportmap stops) nothing starts again."""
        if self.closed:
            raise StateError("gportmap is stopping: no rule starts again")
        if self._applying:
            raise StateError("apply entered twice: reloads must go through the one applier")
        self._applying = True
        try:
            return self._apply(config)
        finally:
            self._applying = False

    def _apply(self, config: Config) -> Changes:
        changes = Changes()
        drain = config.settings.drain_timeout
        self._check_open_files(config)  # before any change: a version that cannot fit changes nothing
        self.stats.max_active = config.settings.max_connections
        self._cap_by_open_files(config)
        for rule in config.rules:
            self.stats.rule(rule.name, rule.protocol)  # every rule's series exist from the start
        wanted = {rule.key: rule for rule in config.enabled_rules}
        running = dict(self.runners)
        reload = plan({key: runner.rule for key, runner in running.items()}, wanted)
        # Removals first: an added rule may need an address a removed one held. Then
        # the ports that rules handing the others over drop, for the same reason.
        for key in reload.removed:
            runner = self.runners.pop(key)
            changes.removed.append(runner.rule.name)
            runner.drop(spans(runner.rule))  # a large range closes in slices (may yield)
            runner.retire(keep_listener=False)
            self._drain_later(runner, drain)
        for key, dropped in reload.dropped.items():
            running[key].drop(dropped)
        changes.unchanged.extend(wanted[key].name for key in reload.unchanged)
        for key, rule_plan in reload.started.items():
            if self.closed:  # a stop arrived while this apply yielded: start nothing more
                raise StateError("gportmap is stopping: the rest of this reload is not applied")
            rule = rule_plan.rule
            runner = RuleRunner(rule, self.context, self.inherited)
            self.runners[key] = runner
            if not rule_plan.takes:
                changes.added.append(rule.name)
                runner.start()  # may yield (the bind resolves its address in a thread pool)
                continue
            changes.changed.append(rule.name)
            self.hand_over([(running[donor], given) for donor, given in rule_plan.takes.items()], runner)
            self._log_listeners(rule, rule_plan, reload.dropped)
        donors = [(key, running[key]) for key in reload.donors]
        for key, donor in donors:
            if self.runners.get(key) is donor:
                del self.runners[key]
        serving = {runner.rule.name for runner in self.runners.values()}
        for _key, donor in donors:
            donor.handed_on = donor.rule.name in serving  # the rule runs on, on its new server
            donor.retire(keep_listener=False)  # what it did not give is closed
            self._drain_later(donor, drain)
        self.config = config
        self.last_plan = reload
        return changes

    def hand_over(self, donors: Sequence[tuple[RuleRunner, Sequence[Span]]], new: RuleRunner) -> None:
        """A changed rule: each old server (``donors``, with the spans each gives)
        stops accepting on what it gives and the new one serves on the same open
        sockets, without yielding in between, so that no connection attempt is
        refused (they wait in the kernel's backlog for the instant between). Ports
        no old rule held are bound first (that may yield: nothing is handed yet); a
        large range then moves ``bind_slice`` sockets at a time, the old server
        accepting on the rest meanwhile. A single-port rule moves in one go."""

        def take() -> Iterator[dict[ListenKey, socket.socket]]:
            """The donors' sockets, ``bind_slice`` at a time (SPEC §9: bounded stalls)."""
            size = RuleRunner.bind_slice
            for donor, given in donors:
                for span in given:
                    for first in range(span.ports.first, span.ports.last + 1, size):
                        part = Span(span.transport, span.host, PortRange(first, min(first + size - 1, span.ports.last)))
                        yield donor.give([part])

        # A donor that is not running (failed, retrying) holds nothing: the new rule binds those.
        held = [span for donor, given in donors if donor.state is RuleState.RUNNING for span in given]
        new.start(take=take, held=held)

    def _log_listeners(self, rule: Rule, rule_plan: RulePlan, dropped: dict[RuleKey, list[Span]]) -> None:
        """One record per changed rule whose listeners changed, ranges named compactly."""
        closed = [span for donor in rule_plan.takes for span in dropped.get(donor, [])]
        if not rule_plan.opened and not closed:
            return
        opened, kept = texts(rule_plan.opened), texts(rule_plan.kept)
        emit(logger, ListenersChanged(rule=rule.name, opened=opened, closed=texts(closed), kept=kept))

    def _check_open_files(self, config: Config) -> None:
        """SPEC §9: the listeners must fit this process's open-file limit
        (``check_open_files``, which a workers' master runs too)."""
        check_open_files(config, self.open_files)

    def _cap_by_open_files(self, config: Config) -> None:
        """Hold the connection limit within what ``ulimit -n`` allows; say so once."""
        if self.open_files is None:
            return
        cap = fd_capacity(self.open_files, sum(rule.listener_count for rule in config.enabled_rules))
        self.stats.fd_cap = cap
        wanted = self.stats.share(config.settings.max_connections)
        if cap < wanted and self._capped_at != (cap, wanted):
            emit(logger, ConnectionsCapped(open_files=self.open_files, limit=cap, max_connections=wanted))
        self._capped_at = (cap, wanted)

    def _drain_later(self, runner: RuleRunner, timeout: float) -> None:
        if runner.state is RuleState.DRAINING:
            self.draining[runner] = gevent.spawn(self._drain, runner, timeout)

    def _drain(self, runner: RuleRunner, timeout: float) -> None:
        try:
            runner.server.join(timeout)
            runner.finish()
        finally:
            self.draining.pop(runner, None)

    def rule_states(self) -> list[tuple[Rule, str, str | None]]:
        """(rule, state, error) of every rule of the config in file order, then the
        removed rules still draining. Disabled rules are ``disabled``."""
        states: list[tuple[Rule, str, str | None]] = []
        if self.config is None:
            return states
        names = set()
        for rule in self.config.rules:
            names.add(rule.name)
            runner = self.runners.get(rule.key) if rule.enabled else None
            if runner is None or runner.rule != rule:
                states.append((rule, "disabled", None))
            else:
                states.append((rule, runner.state.value, runner.error))
        for runner in self.draining:
            if runner.rule.name not in names:
                names.add(runner.rule.name)
                states.append((runner.rule, runner.state.value, None))
        return states

    def describe_workers(self) -> list[dict]:
        """One process, no workers (``WorkerPool`` lists its own)."""
        return []

    def close_listeners(self) -> None:
        """Stop accepting on every rule at once: new connection attempts are refused,
        and from now on nothing starts again (retries included)."""
        self.closed = True
        for runner in self.runners.values():
            runner.retire(keep_listener=False)
        if self.inherited is not None:
            self.inherited.close()

    def drain(self, timeout: float, force: Event | None = None) -> None:
        """Let open connections of every server finish for up to ``timeout`` seconds
        (or until ``force`` is set), then cut the rest."""
        runners = [r for r in self.runners.values() if r.state is RuleState.DRAINING]
        runners += list(self.draining)
        for greenlet in list(self.draining.values()):
            greenlet.kill()  # this drain, with its own deadline, takes over
        joiner = gevent.spawn(_join_all, runners)
        waits: list = [joiner] + ([force] if force is not None else [])
        gevent.wait(waits, count=1, timeout=timeout)
        joiner.kill()
        for runner in runners:
            runner.finish()
        self.draining.clear()

    def stop(self, drain_timeout: float, force: Event | None = None) -> None:
        self.close_listeners()
        self.drain(drain_timeout, force)


def _chunks(sockets: dict[ListenKey, socket.socket], size: int) -> Iterator[dict[ListenKey, socket.socket]]:
    """``sockets`` ``size`` at a time, in order."""
    items = list(sockets.items())
    for at in range(0, len(items), size):
        yield dict(items[at:at + size])


def _join_all(runners: Iterable[RuleRunner]) -> None:
    for runner in runners:
        runner.server.join()
