"""Rules held in memory beside the rules file's: the proxies of Toxiproxy's API
(SPEC §12, ``gportmap.admin.toxiproxy``).

The service runs ``merge(file config)``: the file's rules, then these. They
survive reloads of the file because every apply merges them again. The file
wins a clash: a held rule whose name or listening port a file rule takes (the
file was edited after the proxy was made) is left out of what runs, logged once
as ``toxiproxy_shadowed``, and kept in memory, so it runs again once the file
gives the place back. A write through the API that would clash is refused
there (409), never applied.

Every write is a ``RuntimeChange`` served in the applier's turn
(``Service.apply_runtime``), like every other change of what runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gportmap.config import Config, Rule
from gportmap.config.faults import Fault, RuleSource
from gportmap.events import ToxiproxyShadowed
from gportmap.log import emit, get_logger

logger = get_logger("toxiproxy")


@dataclass(frozen=True)
class HeldProxy:
    """One Toxiproxy proxy: a tcp rule (``listen``, ``upstream``, ``enabled``) and its toxics."""

    name: str
    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    upstream: str  # as the client wrote it ("localhost:6379")
    enabled: bool = True
    toxics: tuple[Fault, ...] = ()

    def rule(self, index: int) -> Rule:
        return Rule(
            name=self.name,
            protocol="tcp",
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            target_host=self.upstream_host,
            target_port=self.upstream_port,
            enabled=self.enabled,
            max_fails=0,
            index=index,
            faults=self.toxics,
            source=RuleSource.TOXIPROXY,
        )


class ChangeRefused(Exception):
    """A runtime write refused with an HTTP status (Toxiproxy's error body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class RuntimeChange:
    """One write of the held rules, run in the applier's turn by the service: ``run``
    changes them (or raises ``ChangeRefused``); the service then applies the file's
    config merged with them; ``check`` (optional) looks at what runs after the
    apply and may refuse (then ``undo`` restores the held rules and the service
    applies again)."""

    run: Callable[[], Any]
    check: Callable[[], None] | None = None
    undo: Callable[[], None] | None = None
    #: Set by the service: what ``run`` returned, or the refusal.
    result: Any = None
    refused: ChangeRefused | None = None
    #: Never a dry run (the applier counts applies by this).
    dry_run: bool = field(default=False, init=False)


class HeldRules:
    """The proxies made through Toxiproxy's API, in creation order (as Toxiproxy
    lists them). Changed only by ``RuntimeChange.run`` in the applier's turn."""

    def __init__(self) -> None:
        self.proxies: dict[str, HeldProxy] = {}
        self._shadowed: set[str] = set()

    def merge(self, config: Config) -> Config:
        """``config`` with the held rules after its own, less any a file rule clashes with."""
        if not self.proxies:
            self._shadowed.clear()
            return config
        extra = []
        shadowed = set()
        for held in self.proxies.values():
            clash = file_clash(config, held.name, held.listen_port)
            if clash is not None:
                shadowed.add(held.name)
                if held.name not in self._shadowed:
                    emit(logger, ToxiproxyShadowed(proxy=held.name, error=clash))
                continue
            extra.append(held.rule(len(config.rules) + len(extra)))
        self._shadowed = shadowed
        return replace(config, rules=config.rules + tuple(extra))

    def clash(self, config: Config, name: str, port: int, own: str | None = None) -> str | None:
        """Why a proxy ``name`` on ``port`` cannot be held: a file rule or another
        proxy (``own``: the proxy being updated) has that name or port."""
        problem = file_clash(config, name, port)
        if problem is not None:
            return problem
        for held in self.proxies.values():
            if held.name != own and held.enabled and held.listen_port == port:
                return f"port {port} is already used by proxy {held.name}"
        return None


def file_clash(config: Config, name: str, port: int) -> str | None:
    """A rule of the file named ``name`` or listening on TCP ``port``."""
    for rule in config.rules:
        if rule.name == name:
            return f"the rules file has a rule named {name}"
        if rule.enabled and rule.transport == "tcp" and port in rule_ports(rule):
            return f"port {port} is used by rule {rule.name} of the rules file"
    return None


def rule_ports(rule: Rule) -> range:
    """The TCP ports a rule listens on (a port range's, SPEC §9, where it has one)."""
    ports = getattr(rule, "listen_ports", None)
    if ports is not None:
        return range(ports.first, ports.last + 1)
    return range(rule.listen_port, rule.listen_port + 1)
