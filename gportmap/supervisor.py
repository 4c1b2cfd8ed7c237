"""The one owner of running rule servers.

Each enabled rule gets a ``RuleRunner`` whose life is a small state machine
(``RuleState``, its transitions checked in one place). ``Supervisor.apply(config)``
turns the running set into the one a config asks for, matching rules by
(transport, listenHost, listenPort) as SPEC §4 says:

- unchanged rules keep their server and connections;
- a changed rule gets a new server on the *same* listening socket, handed over
  without closing it, so no connection attempt is refused; the old server drains;
- removed or disabled rules close their listener and drain;
- added rules start; a rule that cannot bind is retried with back-off.

Draining servers finish their connections for up to ``drainTimeout`` seconds and are
then cut. A failure of one rule never touches the others.
"""

from __future__ import annotations

import enum
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import gevent
from gevent.event import Event

from gportmap.config import Config, Rule
from gportmap.errors import BindError, GportmapError
from gportmap.log import RateLimiter, get_logger, log_event
from gportmap.net import BindRetry, bind_listener
from gportmap.protocols import ServerContext, create_server
from gportmap.relay import BufferPool
from gportmap.stats import StatsRegistry, fd_capacity

logger = get_logger("supervisor")


class RuleState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    DRAINING = "draining"
    STOPPED = "stopped"


_TRANSITIONS: dict[RuleState, frozenset[RuleState]] = {
    RuleState.STARTING: frozenset({RuleState.RUNNING, RuleState.FAILED}),
    RuleState.RUNNING: frozenset({RuleState.DRAINING}),
    RuleState.FAILED: frozenset({RuleState.STARTING, RuleState.STOPPED}),
    RuleState.DRAINING: frozenset({RuleState.STOPPED}),
    RuleState.STOPPED: frozenset(),
}


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
    """One enabled rule's server: its state, its retries, its drain."""

    def __init__(self, rule: Rule, context: ServerContext) -> None:
        self.rule = rule
        self.context = context
        self.state = RuleState.STARTING
        self.error: str | None = None
        self.server = create_server(rule, context)
        self._retry: gevent.Greenlet | None = None
        self._backoff = BindRetry()

    def _move(self, new: RuleState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise StateError(f"rule {self.rule.name}: cannot go from {self.state.value} to {new.value}")
        self.state = new

    def start(self, listener: socket.socket | None = None) -> bool:
        """Serve on ``listener`` (handed over) or a new socket; on a bind failure
        report it and schedule a retry."""
        rule = self.rule
        handover = listener is not None
        try:
            if listener is None and self.context.reuse_port:
                # one of several workers: the socket shares the port with the others
                sock_type = socket.SOCK_DGRAM if rule.transport == "udp" else socket.SOCK_STREAM
                listener = bind_listener(rule.listen_host, rule.listen_port, sock_type, reuse_port=True)
            self.server.start(listener)
        except BindError as exc:
            self._move(RuleState.FAILED)
            self.error = str(exc)
            log_event(
                logger,
                logging.ERROR,
                "rule_failed",
                f"rule {rule.name} cannot start: {exc}",
                rule=rule.name,
                listen=rule.listen,
                error=self.error,
                retry_in=self._backoff.delay,
            )
            self._retry = self._backoff.schedule(self._try_again)
            return False
        self._move(RuleState.RUNNING)
        self.error = None
        log_event(
            logger,
            logging.INFO,
            "rule_started",
            f"rule {rule.name} listening on {rule.listen}/{rule.transport}, forwarding to {rule.target}",
            rule=rule.name,
            protocol=rule.protocol,
            listen=rule.listen,
            target=rule.target,
            handover=handover,
        )
        return True

    def _try_again(self) -> None:
        self._retry = None
        self._move(RuleState.STARTING)
        self.start()

    def retire(self, keep_listener: bool) -> socket.socket | None:
        """Stop accepting. With ``keep_listener`` the open listening socket is
        returned for a successor; otherwise it is closed (attempts are refused)."""
        if self._retry is not None:
            self._retry.kill()
            self._retry = None
        if self.state is not RuleState.RUNNING:
            if self.state is RuleState.FAILED:
                self._move(RuleState.STOPPED)
            return None
        self._move(RuleState.DRAINING)
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
        self._move(RuleState.STOPPED)
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
    ) -> None:
        """``open_files``: the process's open-file limit, which caps the connections
        it admits (None: no cap, where the platform has no such limit)."""
        self.stats = stats or StatsRegistry()
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

    def apply(self, config: Config) -> Changes:
        """Make the running rules those of ``config``; see the module docstring."""
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
            runner = RuleRunner(rule, self.context)
            self.runners[key] = runner
            if old is None:
                changes.added.append(rule.name)
                runner.start()
            else:
                changes.changed.append(rule.name)
                listener = old.retire(keep_listener=True)
                runner.start(listener)  # same greenlet, no yield: the socket never closes
                self._drain_later(old, drain)
        self.config = config
        return changes

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

    def refresh(self) -> None:
        """The figures are this process's own, always current (``WorkerPool`` reads its workers')."""

    def describe_workers(self) -> list[dict]:
        """One process, no workers (``WorkerPool`` lists its own)."""
        return []

    def close_listeners(self) -> None:
        """Stop accepting on every rule at once: new connection attempts are refused."""
        for runner in self.runners.values():
            runner.retire(keep_listener=False)

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
