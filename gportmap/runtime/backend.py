"""What runs the rules, as the service, the run loop and the admin layer see it.

Two classes stand in for each other here: ``Supervisor`` (the rule servers of this
process) and ``WorkerPool`` (the same, carried out by worker processes, with the
figures they push summed). Declaring the surface keeps them from drifting apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gevent.event import Event

    from gportmap.config import Config, Rule
    from gportmap.runtime.supervisor import Changes
    from gportmap.stats import OpenTable, RuleStats


class Figures(Protocol):
    """The counters readers use: ``StatsRegistry`` or the workers' sums."""

    @property
    def active(self) -> int: ...

    @property
    def process_limit(self) -> int:
        """The connections this process (with workers: all of them) may hold."""
        ...

    def rule(self, name: str, protocol: str) -> RuleStats: ...

    def open_tables(self) -> list[OpenTable]:
        """The open connections, a table per process, copied without stalling the
        hub (``/connections``)."""
        ...


class RulesBackend(Protocol):
    """Runs a config's rules; ``Supervisor`` and ``WorkerPool`` implement it."""

    stats: Figures
    config: Config | None

    def apply(self, config: Config) -> Changes:
        """Make the running rules those of ``config`` (one apply at a time)."""
        ...

    def rule_states(self) -> list[tuple[Rule, str, str | None]]:
        """(rule, state, error) of every rule of the config, then removed ones draining."""
        ...

    def close_listeners(self) -> None:
        """Stop accepting everywhere; nothing starts again."""
        ...

    def drain(self, timeout: float, force: Event | None = None) -> None:
        """Let open connections finish for up to ``timeout`` s (or until ``force``), then cut them."""
        ...

    def describe_workers(self) -> list[dict[str, Any]]:
        """The worker processes for /stats (none for a single process)."""
        ...
