"""The one owner of running rule servers.

Each enabled rule gets a ``RuleRunner`` whose life is a small state machine
(``RuleState``, its transitions checked in one place). ``Supervisor.apply(config)``
turns the running set into the one a config asks for, matching rules by
(transport, listenHost, listenPort) as SPEC §4 says:

- unchanged rules keep their server and connections;
- a changed rule gets a new server on the *same* listening socket, handed over
  without closing it, so no connection attempt is refused; the old server drains;
- removed or disabled rules close their listener and drain;
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
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from gportmap.config import Config, Rule
from gportmap.engine.net import BindRetry, bind_listener
from gportmap.engine.relay import BufferPool
from gportmap.errors import BindError, GportmapError
from gportmap.log import RateLimiter, get_logger, log_event
from gportmap.protocols import ServerContext, create_server
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

    def _on(self, event: RuleEvent) -> RuleState:
        self.state = next_state(self.state, event)
        return self.state

    def start(self, listener: socket.socket | None = None) -> bool:
        """Serve on ``listener`` (handed over) or a new socket. Any failure (a bind
        error, or any exception of the server or its plugins: a bug) fails this rule
        alone, is reported and retried; a handed-over listener is then closed, so
        attempts are refused rather than left queueing where nobody accepts."""
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
        log_event(
            logger,
            logging.INFO,
            "rule_started",
            f"rule {rule.name} listening on {rule.listen}/{rule.transport}{source}, forwarding to {rule.target}",
            rule=rule.name,
            protocol=rule.protocol,
            listen=rule.listen,
            target=rule.target,
            handover=handover,
            adopted=adopted is not None,
        )
        return True

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
        fields = dict(rule=rule.name, listen=rule.listen, error=self.error, retry_in=self._backoff.delay)
        message = f"rule {rule.name} cannot start: {self.error}"
        if internal:  # a bug: its traceback, once
            logger.error(message, exc_info=exc, extra={"event": "rule_failed", **fields})
        else:
            log_event(logger, logging.ERROR, "rule_failed", message, **fields)
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
        if keep_listener:
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
        log_event(
            logger,
            logging.INFO,
            "rule_stopped",
            f"rule {self.rule.name} stopped on {self.rule.listen}",
            rule=self.rule.name,
            listen=self.rule.listen,
            cut_connections=left,
        )


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
        self.stats.max_active = config.settings.max_connections
        self._cap_by_open_files(config)
        for rule in config.rules:
            self.stats.rule(rule.name, rule.protocol)  # every rule's series exist from the start
        wanted = {rule.key: rule for rule in config.enabled_rules}
        # Removals first: an added rule may need an address a removed one held.
        for key in [key for key in self.runners if key not in wanted]:
            runner = self.runners.pop(key)
            changes.removed.append(runner.rule.name)
            runner.retire(keep_listener=False)
            self._drain_later(runner, drain)
        for key, rule in wanted.items():
            old = self.runners.get(key)
            if old is not None and old.rule == rule:
                changes.unchanged.append(rule.name)
                continue
            if self.closed:  # a stop arrived while this apply yielded: start nothing more
                raise StateError("gportmap is stopping: the rest of this reload is not applied")
            runner = RuleRunner(rule, self.context, self.inherited)
            self.runners[key] = runner
            if old is None:
                changes.added.append(rule.name)
                runner.start()  # may yield (the bind resolves its address in a thread pool)
            else:
                changes.changed.append(rule.name)
                self.hand_over(old, runner)
                self._drain_later(old, drain)
        self.config = config
        return changes

    def hand_over(self, old: RuleRunner, new: RuleRunner) -> None:
        """A changed rule: the old server stops accepting and the new one serves on
        the same open socket, in one go without yielding, so that no connection
        attempt is refused (they wait in the kernel's backlog for the instant between)."""
        listener = old.retire(keep_listener=True)
        new.start(listener)

    def _cap_by_open_files(self, config: Config) -> None:
        """Hold the connection limit within what ``ulimit -n`` allows; say so once."""
        if self.open_files is None:
            return
        cap = fd_capacity(self.open_files, len(config.enabled_rules))
        self.stats.fd_cap = cap
        wanted = self.stats.share(config.settings.max_connections)
        if cap < wanted and self._capped_at != (cap, wanted):
            log_event(
                logger,
                logging.WARNING,
                "connections_capped",
                f"the open-file limit ({self.open_files}) leaves room for {cap} connections, fewer than "
                f"maxConnections ({wanted}): connections past {cap} are refused; raise the limit "
                "(ulimit -n, LimitNOFILE=, docker --ulimit nofile=) to lift it",
                open_files=self.open_files,
                limit=cap,
                max_connections=wanted,
            )
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


def _join_all(runners: Iterable[RuleRunner]) -> None:
    for runner in runners:
        runner.server.join()
