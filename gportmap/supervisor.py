"""The one owner of running rule servers.

Each enabled rule gets a ``RuleRunner`` whose life is a small state machine
(``RuleState``, transitions checked in one place); the ``Supervisor`` starts the
runners, retries those that cannot bind, and stops them all with a bounded drain.
A rule that fails never affects the others.
"""

from __future__ import annotations

import enum
import logging

import gevent
from gevent.event import Event

from gportmap.config import Config, Rule
from gportmap.errors import BindError, GportmapError
from gportmap.log import RateLimiter, get_logger, log_event
from gportmap.protocols import ServerContext, create_server
from gportmap.relay import BufferPool
from gportmap.stats import StatsRegistry

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


class RuleRunner:
    """One enabled rule: its server, its state, and its retries when it cannot bind."""

    #: Seconds before the first retry of a rule that could not start; doubles up to the max.
    retry_min = 1.0
    retry_max = 30.0

    def __init__(self, rule: Rule, context: ServerContext) -> None:
        self.rule = rule
        self.context = context
        self.state = RuleState.STARTING
        self.error: str | None = None
        self.server = create_server(rule, context)
        self._retry: gevent.Greenlet | None = None
        self._delay = self.retry_min

    def _move(self, new: RuleState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise StateError(f"rule {self.rule.name}: cannot go from {self.state.value} to {new.value}")
        self.state = new

    def start(self) -> bool:
        """Try to start serving; on failure report it and schedule a retry."""
        rule = self.rule
        try:
            self.server.start()
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
                retry_in=self._delay,
            )
            self._retry = gevent.spawn_later(self._delay, self._try_again)
            self._delay = min(self._delay * 2, self.retry_max)
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
        )
        return True

    def _try_again(self) -> None:
        self._retry = None
        self._move(RuleState.STARTING)
        self.start()

    def stop_accepting(self) -> None:
        """Close the listener now; open connections go on until drained or killed."""
        if self._retry is not None:
            self._retry.kill()
            self._retry = None
        if self.state is RuleState.FAILED:
            self._move(RuleState.STOPPED)
        elif self.state is RuleState.RUNNING:
            self._move(RuleState.DRAINING)
            self.server.close()

    def finish(self) -> None:
        """After the drain: cut what is left and report the rule stopped."""
        if self.state is not RuleState.DRAINING:
            return
        left = self.server.active
        self.server.kill()
        self._move(RuleState.STOPPED)
        log_event(
            logger,
            logging.INFO,
            "rule_stopped",
            f"rule {self.rule.name} stopped",
            rule=self.rule.name,
            listen=self.rule.listen,
            cut_connections=left,
        )


class Supervisor:
    """Starts the rules of a config and stops them all with a bounded drain."""

    def __init__(self, stats: StatsRegistry | None = None) -> None:
        self.stats = stats or StatsRegistry()
        self.context = ServerContext(stats=self.stats, buffers=BufferPool(), rejections=RateLimiter())
        self.runners: list[RuleRunner] = []
        self.config: Config | None = None

    def start(self, config: Config) -> None:
        self.config = config
        self.stats.max_active = config.settings.max_connections
        for rule in config.rules:
            self.stats.rule(rule.name, rule.protocol)  # every rule's series exist from the start
        for rule in config.enabled_rules:
            runner = RuleRunner(rule, self.context)
            self.runners.append(runner)
            runner.start()

    def close_listeners(self) -> None:
        """Stop accepting on every rule at once: new connection attempts are refused."""
        for runner in self.runners:
            runner.stop_accepting()

    def drain(self, timeout: float, force: Event | None = None) -> None:
        """Let open connections finish for up to ``timeout`` seconds (or until
        ``force`` is set), then cut the rest."""
        draining = [r for r in self.runners if r.state is RuleState.DRAINING]
        joiner = gevent.spawn(lambda: [r.server.join() for r in draining])
        waits: list = [joiner] + ([force] if force is not None else [])
        gevent.wait(waits, count=1, timeout=timeout)
        joiner.kill()
        for runner in draining:
            runner.finish()

    def stop(self, drain_timeout: float, force: Event | None = None) -> None:
        self.close_listeners()
        self.drain(drain_timeout, force)
