"""The running gportmap: one rules file, its supervisor, its watcher, and reloads.

Every way of reloading (the file watcher, SIGHUP, and later ``POST /reload``) goes
through ``Service.reload``: read the file, validate it, and only then hand it to the
supervisor. An invalid file changes nothing; the old rules keep serving.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gportmap import __version__
from gportmap.admin import AdminServer
from gportmap.config import AdminSettings, Config, Rule, Settings, parse
from gportmap.errors import ConfigError, WatcherError
from gportmap.log import get_logger, log_event, setup_logging
from gportmap.stats import RuleStats, iso_time
from gportmap.statslog import StatsLogger
from gportmap.supervisor import Changes, Supervisor
from gportmap.watcher import InotifyWatcher, PollWatcher, create_watcher

if TYPE_CHECKING:
    from gportmap.workers import WorkerPool

logger = get_logger()


@dataclass(frozen=True)
class Overrides:
    """Command-line flags that win over ``settings`` (None = not given)."""

    log_format: str | None = None
    log_level: str | None = None
    #: ``--admin``: "off", or (host, port) replacing only settings.admin.listen.
    admin: str | tuple[str, int] | None = None
    #: ``--workers``: a count or "auto", replacing settings.workers.
    workers: int | str | None = None
    #: This process is worker number ``worker`` of a master: its log records say so.
    worker: int | None = None

    def logging(self, settings: Settings) -> tuple[str, str]:
        return (self.log_format or settings.log_format, self.log_level or settings.log_level)

    def admin_settings(self, settings: Settings) -> AdminSettings | None:
        if self.admin is None:
            return settings.admin
        if self.admin == "off":
            return None
        host, port = self.admin
        token = settings.admin.token if settings.admin is not None else None
        return AdminSettings(host=host, port=port, token=token)


@dataclass(frozen=True)
class RuleView:
    """What an operator sees of one rule: its config, its state, its counters."""

    rule: Rule
    state: str
    error: str | None
    stats: RuleStats

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def protocol(self) -> str:
        return self.rule.protocol

    def snapshot(self) -> dict[str, Any]:
        data = self.stats.snapshot()
        data.update(
            listen=self.rule.listen,
            target=self.rule.target,
            enabled=self.rule.enabled,
            state=self.state,
            error=self.error,
        )
        if data.get("udp") is None:
            data.pop("udp", None)
        return data


class Service:
    """Owns the supervisor and the reload bookkeeping an operator sees in /stats."""

    def __init__(
        self,
        config: Config,
        watch_mode: str,
        overrides: Overrides | None = None,
        splice: bool = False,
        backend: Supervisor | WorkerPool | None = None,
        worker: bool = False,
    ) -> None:
        """``backend`` runs the rules: this process's own ``Supervisor`` (the
        default), or the master's ``WorkerPool``. A ``worker`` process serves rules
        only: its master owns the rules file, the admin endpoint and the stats log."""
        self.path = config.path
        self.config = config
        self.worker = worker
        self.watch_mode = "off" if worker else watch_mode
        self.overrides = overrides or Overrides()
        self.started_at = time.time()
        self.supervisor = backend if backend is not None else Supervisor(splice=splice)
        self.reloads = {"success": 0, "failure": 0}
        self.last_error: list[str] | None = None
        self.loaded_at = time.time()
        self.last_success_at: float | None = None
        self._seen_digest = config.digest
        self._watcher: PollWatcher | InotifyWatcher | None = None
        self.admin = AdminServer(self)
        self.stats_log = StatsLogger(self)

    def start(self) -> Changes:
        changes = self.supervisor.apply(self.config)
        self._update_watcher()
        self._apply_services()
        return changes

    def _apply_services(self) -> None:
        """Settings that drive the admin endpoint and the stats log."""
        if self.worker:
            return
        self.admin.apply(self.overrides.admin_settings(self.config.settings))
        self.stats_log.apply(self.config.settings.stats_interval)

    def stop_services(self) -> None:
        self.stop_watching()
        self.stats_log.stop()
        self.admin.stop()

    def reload(self, source: str, force: bool = True) -> Changes | None:
        """Load the rules file and apply it. Returns the changes, or None when the
        content is the one already seen and ``force`` is off (a touch, a no-op save).
        Raises ConfigError (after logging and counting it) when the file is invalid."""
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except OSError as exc:
            digest = f"unreadable:{exc.errno}"
            if not force and digest == self._seen_digest:
                return None
            self._seen_digest = digest
            self._fail(
                source, [f"{self.path}: cannot read: {exc.strerror or exc}; keeping the current rules"]
            )
            raise ConfigError(self.last_error or []) from None
        digest = hashlib.sha256(data).hexdigest()
        if not force and digest == self._seen_digest:
            return None
        self._seen_digest = digest
        return self.apply_raw(data, source)

    def apply_raw(self, raw: bytes, source: str) -> Changes:
        """Validate the rules file's bytes and apply them: the end of every reload, and
        all of a worker's (the bytes its master validated)."""
        try:
            config = parse(raw, self.path)
        except ConfigError as exc:
            self._fail(source, exc.errors)
            raise
        return self._apply(config, source)

    def _apply(self, config: Config, source: str) -> Changes:
        old_settings = self.config.settings
        changes = self.supervisor.apply(config)
        self.config = config
        self.reloads["success"] += 1
        self.last_error = None
        self.loaded_at = self.last_success_at = time.time()
        settings_changed = [
            name
            for name in Settings.__dataclass_fields__
            if getattr(old_settings, name) != getattr(config.settings, name)
        ]
        if self.overrides.logging(old_settings) != self.overrides.logging(config.settings):
            setup_logging(*self.overrides.logging(config.settings), worker=self.overrides.worker)
        self._update_watcher()
        self._apply_services()
        if "workers" in settings_changed:
            log_event(
                logger,
                logging.WARNING,
                "restart_needed",
                "settings.workers changed: the number of workers is read at start-up, restart gportmap to apply it",
                workers=config.settings.workers,
            )
        log_event(
            logger,
            logging.DEBUG if self.worker else logging.INFO,  # the master logs the reload once
            "config_reloaded",
            f"rules reloaded ({source}): {len(changes.added)} added, {len(changes.changed)} changed, "
            f"{len(changes.removed)} removed, {len(changes.unchanged)} unchanged",
            source=source,
            settings_changed=settings_changed,
            **changes.as_fields(),
        )
        return changes

    def _fail(self, source: str, errors: list[str]) -> None:
        self.reloads["failure"] += 1
        self.last_error = list(errors)
        log_event(
            logger,
            logging.ERROR,
            "config_invalid",
            f"{self.path}: new rules rejected ({source}), the running rules stay: {len(errors)} error(s)",
            path=self.path,
            source=source,
            errors=list(errors),
        )

    def file_changed(self) -> None:
        """The watcher's callback: reload if the content differs from what was last seen."""
        try:
            self.reload("watcher", force=False)
        except ConfigError:
            pass  # logged and counted by reload(); the old rules keep serving

    def _update_watcher(self) -> None:
        """Start or stop watching as ``settings.watch`` says."""
        want = self.config.settings.watch and self.watch_mode != "off"
        if want and self._watcher is None:
            self._watcher = create_watcher(self.watch_mode, self.path, self.file_changed)
            try:
                self._watcher.start()
            except WatcherError as exc:
                log_event(logger, logging.WARNING, "watcher_fallback", f"{exc}; polling instead")
                self.watch_mode = "poll"
                self._watcher = create_watcher(self.watch_mode, self.path, self.file_changed)
                self._watcher.start()
            log_event(
                logger,
                logging.INFO,
                "watching",
                f"watching {self.path} for changes ({self.watch_mode})",
                path=self.path,
                mode=self.watch_mode,
            )
        elif not want and self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    # -- what the admin endpoint and the stats log read -----------------------------

    def rule_views(self) -> list[RuleView]:
        stats = self.supervisor.stats
        return [
            RuleView(rule, state, error, stats.rule(rule.name, rule.protocol))
            for rule, state, error in self.supervisor.rule_states()
        ]

    def snapshot(self) -> dict[str, Any]:
        """The /stats document (SPEC §5)."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "config": {
                "path": self.path,
                "loaded_at": iso_time(self.loaded_at),
                "reloads": dict(self.reloads),
                "last_error": self.last_error,
                "watching": self.watch_mode if self._watcher is not None else "off",
            },
            "connections": {
                "active": self.supervisor.stats.active,
                "max": self.config.settings.max_connections,
            },
            "rules": [view.snapshot() for view in self.rule_views()],
            "workers": self.supervisor.describe_workers(),
        }

    def worker_report(self, connections: bool = False) -> dict[str, Any]:
        """What a worker tells its master: every figure as plain data, the rules'
        states, and on request the open connections."""
        stats = self.supervisor.stats
        report: dict[str, Any] = {
            "pid": os.getpid(),
            "active": stats.active,
            "rules": {rule_stats.name: rule_stats.counters() for rule_stats in stats.rules()},
            "states": [[rule.name, state, error] for rule, state, error in self.supervisor.rule_states()],
        }
        if connections:
            report["connections"] = stats.describe_open()
        return report

    def open_connections(self) -> list[dict[str, Any]]:
        return self.supervisor.stats.describe_open()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
