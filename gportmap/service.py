"""The running gportmap: one rules file, its supervisor, its watcher, and reloads.

Every way of reloading (the file watcher, SIGHUP, and later ``POST /reload``) goes
through ``Service.reload``: read the file, validate it, and only then hand it to the
supervisor. An invalid file changes nothing; the old rules keep serving.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from gportmap.config import Config, Settings, parse
from gportmap.errors import ConfigError, WatcherError
from gportmap.log import get_logger, log_event, setup_logging
from gportmap.supervisor import Changes, Supervisor
from gportmap.watcher import InotifyWatcher, PollWatcher, create_watcher

logger = get_logger()


@dataclass(frozen=True)
class LogOverrides:
    """Command-line flags that win over ``settings`` (None = not given)."""

    log_format: str | None = None
    log_level: str | None = None

    def effective(self, settings: Settings) -> tuple[str, str]:
        return (self.log_format or settings.log_format, self.log_level or settings.log_level)


class Service:
    """Owns the supervisor and the reload bookkeeping an operator sees in /stats."""

    def __init__(self, config: Config, watch_mode: str, overrides: LogOverrides | None = None) -> None:
        self.path = config.path
        self.config = config
        self.watch_mode = watch_mode
        self.overrides = overrides or LogOverrides()
        self.supervisor = Supervisor()
        self.reloads = {"success": 0, "failure": 0}
        self.last_error: list[str] | None = None
        self.loaded_at = time.time()
        self.last_success_at: float | None = None
        self._seen_digest = config.digest
        self._watcher: PollWatcher | InotifyWatcher | None = None

    def start(self) -> None:
        self.supervisor.apply(self.config)
        self._update_watcher()

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
            self._fail(source, [f"{self.path}: cannot read: {exc.strerror or exc}; keeping the current rules"])
            raise ConfigError(self.last_error or []) from None
        digest = hashlib.sha256(data).hexdigest()
        if not force and digest == self._seen_digest:
            return None
        self._seen_digest = digest
        try:
            config = parse(data, self.path)
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
            name for name in Settings.__dataclass_fields__ if getattr(old_settings, name) != getattr(config.settings, name)
        ]
        if self.overrides.effective(old_settings) != self.overrides.effective(config.settings):
            setup_logging(*self.overrides.effective(config.settings))
        self._update_watcher()
        log_event(
            logger,
            logging.INFO,
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

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
