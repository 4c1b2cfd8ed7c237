"""The running gportmap: one rules file, its supervisor, its watcher, and reloads.

Every way of reloading (the file watcher, SIGHUP, ``POST /reload``, a worker's
master) queues into the service's one ``Applier``, which applies one version at a
time: read the file (bounded, in the thread pool), validate it, and only then hand
it to the supervisor. An invalid file changes nothing; the old rules keep serving.
Once gportmap stops, reloads are refused.

Writes of the rule API and dry runs queue there too, as transactions
(``gportmap.runtime.transaction``): read, check the version, edit, validate, write,
apply, as one step. The digest of what a write put in the file is recorded as seen,
so the watcher's event for that write applies nothing a second time.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import gevent

from gportmap import __version__
from gportmap.config import AdminSettings, Config, Rule, Settings, parse, read_rules_file
from gportmap.config.edit import (
    EditError,
    NotWritable,
    RulesText,
    edit_rules,
    read_rules_text,
    write_atomically,
)
from gportmap.errors import ConfigError, WatcherError
from gportmap.events import (
    ConfigInvalid,
    ConfigReloaded,
    ReloadAbandoned,
    RestartNeeded,
    RulesChanged,
    WatcherFallback,
    Watching,
)
from gportmap.log import emit, get_logger, setup_logging
from gportmap.runtime.applier import Applier, OutcomeStatus, ReloadOutcome, ReloadRequest, ReloadSource
from gportmap.runtime.impact import assess
from gportmap.runtime.overlay import ChangeRefused, HeldRules, RuntimeChange
from gportmap.runtime.supervisor import Changes, Supervisor
from gportmap.runtime.transaction import EDIT_STATUS, Transaction, TxOutcome, TxStatus, etag_matches
from gportmap.runtime.watcher import InotifyWatcher, PollWatcher, create_watcher
from gportmap.stats import RuleStats, iso_time

if TYPE_CHECKING:
    from gportmap.runtime.backend import RulesBackend

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
        if settings.admin is None:
            return AdminSettings(host=host, port=port)
        return replace(settings.admin, host=host, port=port)


class ReloadListener(Protocol):
    """Told around every applied reload (systemd's ``RELOADING=1`` ... ``READY=1``)."""

    def reloading(self) -> None:
        """A valid new version is about to change the running rules."""

    def reloaded(self) -> None:
        """That reload is over, however it ended (an exception included)."""


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
            limit=self.rule.max_sessions if self.rule.protocol == "udp" else self.rule.max_connections,
            state=self.state,
            error=self.error,
            source=self.rule.source.value,
            faults=[fault.describe() for fault in self.rule.faults],
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
        backend: RulesBackend | None = None,
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
        #: When this program image started (an upgrade in place starts a new one in
        #: the same process): the master sees a worker come back upgraded by it.
        self.booted = time.monotonic()
        #: Drainers of upgrades in place still running, by pid: the memfd in which
        #: each reports the bytes it relayed after the upgrade (``runtime.resume``).
        self.drainer_reports: dict[int, int] = {}
        self.supervisor: RulesBackend = backend if backend is not None else Supervisor(splice=splice)
        self.reloads = {"success": 0, "failure": 0}
        #: The number of the rules version running: 1 at start, +1 per applied reload
        #: (with workers, the generation each worker acknowledges).
        self.generation = 1
        self.last_error: list[str] | None = None
        self.loaded_at = time.time()
        self.last_success_at: float | None = None
        self._seen_digest = config.digest
        self._document: tuple[str, RulesText] | None = None  # (digest, the applied file read for /rules)
        #: Every reload goes through here, one at a time (started once the first
        #: config runs: a SIGHUP during start-up is queued and served after it).
        self.applier = Applier(self._serve_reload)
        #: Rules held in memory beside the file's (the Toxiproxy API's proxies, SPEC §12).
        self.held = HeldRules()
        self._watcher: PollWatcher | InotifyWatcher | None = None
        #: Called with the config after the start and after every applied reload:
        #: what follows the settings above the runtime (the admin endpoint and the
        #: stats log, wired by the command line) without the runtime importing it.
        self.on_applied: list[Callable[[Config], None]] = []
        #: Told before and after every applied reload (not the start): the command
        #: line wires systemd's notifier here.
        self.reload_listeners: list[ReloadListener] = []

    def continue_from(self, started_at: float, generation: int, reloads: dict[str, int], digest: str) -> None:
        """After an upgrade in place (``gportmap.runtime.upgrade``): the figures an
        operator follows go on from the old program's (same process, same uptime);
        the generation moves on by one if the rules file changed since it ran."""
        self.started_at = started_at
        self.reloads = {"success": reloads.get("success", 0), "failure": reloads.get("failure", 0)}
        self.generation = generation if digest == self.config.digest else generation + 1

    def start(self) -> Changes:
        changes = self.supervisor.apply(self._running(self.config))
        self._publish_faults()
        self._update_watcher()
        self._apply_services()
        self.applier.start()
        return changes

    def _apply_services(self) -> None:
        for listener in self.on_applied:
            listener(self.config)

    def request_reload(self, source: ReloadSource, force: bool = True, wait: bool = False) -> ReloadOutcome | None:
        """Queue a reload of the rules file; with ``wait``, block this greenlet until it
        is served and return the outcome. ``force`` off (the watcher) skips content
        already seen."""
        return self.applier.submit(ReloadRequest(source, force), wait=wait)

    def reload(self, source: ReloadSource = ReloadSource.ADMIN) -> Changes:
        """Reload now and wait: the changes made, or ConfigError with the errors
        (invalid rules, or the reload refused because gportmap stops)."""
        outcome = self.request_reload(source, force=True, wait=True)
        assert outcome is not None
        return _changes_or_raise(outcome)

    def apply_raw(self, raw: bytes, source: str = "master") -> Changes:
        """Apply the rules file's bytes a worker's master validated, through the
        applier, and wait: the changes, or ConfigError with the errors."""
        outcome = self.applier.submit(ReloadRequest(ReloadSource.MASTER, True, raw), wait=True)
        assert outcome is not None
        return _changes_or_raise(outcome)

    def transact(self, transaction: Transaction) -> ReloadOutcome:
        """Queue a write of the rule API (or a dry run) and wait for its outcome: its
        ``result``, or REFUSED (gportmap stops) or FAILED (a bug) without one."""
        source = ReloadSource.API if transaction.edit is not None else ReloadSource.ADMIN
        outcome = self.applier.submit(ReloadRequest(source, True, None, transaction), wait=True)
        assert outcome is not None
        return outcome

    def _serve_reload(self, request: ReloadRequest) -> ReloadOutcome:
        """The applier's work for one (coalesced) request: read, validate, apply; or
        one transaction (a write of the rule API, a dry run), served alone."""
        if isinstance(request.transaction, RuntimeChange):
            return self._serve_runtime(request.transaction)
        if request.transaction is not None:
            result = self._serve_transaction(request.transaction)
            status = {TxStatus.DONE: OutcomeStatus.APPLIED, TxStatus.CREATED: OutcomeStatus.APPLIED}
            return ReloadOutcome(
                status.get(result.status, OutcomeStatus.INVALID), result.changes, result.errors, result=result
            )
        source = request.source.value
        raw = request.raw
        if raw is None:
            try:
                raw = gevent.get_hub().threadpool.apply(read_rules_file, (self.path,))
            except ConfigError as exc:
                digest = "unreadable:" + "\n".join(exc.errors)
                if not request.force and digest == self._seen_digest:
                    return ReloadOutcome(OutcomeStatus.UNCHANGED)
                self._seen_digest = digest
                errors = [f"{error}; keeping the current rules" for error in exc.errors]
                self._fail(source, errors)
                return ReloadOutcome(OutcomeStatus.INVALID, errors=tuple(errors))
        digest = hashlib.sha256(raw).hexdigest()
        if not request.force and digest == self._seen_digest:
            return ReloadOutcome(OutcomeStatus.UNCHANGED)
        self._seen_digest = digest
        try:
            config = _parse_off_hub(raw, self.path)
        except ConfigError as exc:
            self._fail(source, exc.errors, exc.count)
            return ReloadOutcome(OutcomeStatus.INVALID, errors=tuple(exc.errors))
        try:
            changes = self._apply(config, source)
        except ConfigError as exc:  # SPEC §9: its listeners do not fit this process's open-file limit
            self._fail(source, exc.errors)
            return ReloadOutcome(OutcomeStatus.INVALID, errors=tuple(exc.errors))
        return ReloadOutcome(OutcomeStatus.APPLIED, changes)

    # -- rules held in memory (SPEC §12: Toxiproxy's proxies) -------------------------

    def _running(self, config: Config) -> Config:
        """What runs: the file's rules and, after them, the rules held in memory."""
        return self.held.merge(config)

    def _publish_faults(self) -> None:
        """Tell the running servers each rule's faults (a change of faults alone
        leaves a rule unchanged for the supervisor: ``Rule.faults``)."""
        context = getattr(self.supervisor, "context", None)
        running = getattr(self.supervisor, "config", None)
        if context is not None and running is not None:
            context.faults.publish(running.enabled_rules)

    def faults_applied(self) -> dict[tuple[str, str], int]:
        """(rule, fault type) -> how often it acted (``gportmap_faults_applied_total``)."""
        context = getattr(self.supervisor, "context", None)
        return dict(context.faults.applied) if context is not None else {}

    def apply_runtime(self, change: RuntimeChange) -> ReloadOutcome:
        """Change the rules held in memory and apply, in the applier's turn, and
        wait: ``change.result`` or ``change.refused`` says how it went."""
        outcome = self.applier.submit(ReloadRequest(ReloadSource.API, True, None, change), wait=True)  # type: ignore[arg-type]
        assert outcome is not None
        return outcome

    def _serve_runtime(self, change: RuntimeChange) -> ReloadOutcome:
        """One write of the rules held in memory, in the applier's turn: change
        them, apply the file's config merged with them, check; a refusal at any
        step restores them (``change.undo``) and what runs."""
        try:
            change.result = change.run()
        except ChangeRefused as exc:
            change.refused = exc
            return ReloadOutcome(OutcomeStatus.INVALID, errors=(str(exc),))
        try:
            changes = self._apply(self.config, "toxiproxy")
        except ConfigError as exc:  # the process cannot hold the new listeners (its open-file limit)
            change.refused = ChangeRefused(500, "; ".join(exc.errors))
            if change.undo is not None:
                change.undo()
                self._apply(self.config, "toxiproxy")
            return ReloadOutcome(OutcomeStatus.INVALID, errors=tuple(exc.errors))
        if change.check is not None:
            try:
                change.check()
            except ChangeRefused as exc:
                change.refused = exc
                if change.undo is not None:
                    change.undo()
                    changes = self._apply(self.config, "toxiproxy")
                return ReloadOutcome(OutcomeStatus.INVALID, changes, errors=(str(exc),))
        return ReloadOutcome(OutcomeStatus.APPLIED, changes)

    def _serve_transaction(self, tx: Transaction) -> TxOutcome:
        """One write or dry run, in the applier's turn: nothing else reloads meanwhile,
        so the file read here is the file the write replaces."""
        try:
            raw = gevent.get_hub().threadpool.apply(read_rules_file, (self.path,))
        except ConfigError as exc:
            status = TxStatus.NOT_WRITABLE if tx.edit is not None else TxStatus.INVALID
            return TxOutcome(status, errors=tuple(exc.errors))
        digest = hashlib.sha256(raw).hexdigest()
        if not etag_matches(tx.if_match, digest):
            return TxOutcome(
                TxStatus.STALE,
                etag=digest,
                errors=(f"the rules file is at version {digest}, not the one named by If-Match",),
            )
        new_raw, name, rule, created = raw, None, None, False
        if tx.edit is not None:
            try:
                edited = edit_rules(raw, tx.edit, self.path)
            except EditError as exc:
                return TxOutcome(EDIT_STATUS[exc.problem], etag=digest, errors=tuple(exc.errors))
            new_raw, name, rule, created = edited.raw, edited.name, edited.rule, edited.created
        try:
            config = _parse_off_hub(new_raw, self.path)
        except ConfigError as exc:
            return TxOutcome(TxStatus.INVALID, etag=digest, errors=tuple(exc.errors), name=name)
        if tx.dry_run:
            changes, impact = assess(self.config, config, self.supervisor.stats)
            return TxOutcome(TxStatus.PLANNED, etag=digest, changes=changes, impact=impact, name=name, rule=rule)
        if new_raw != raw:
            try:
                gevent.get_hub().threadpool.apply(write_atomically, (self.path, new_raw))
            except NotWritable as exc:
                return TxOutcome(TxStatus.NOT_WRITABLE, etag=digest, errors=(str(exc),), name=name)
        self._seen_digest = config.digest  # the watcher's event for this write is a no-op
        changes = self._apply(config, ReloadSource.API.value)
        self._log_write(tx, name, changes, config.digest)
        status = TxStatus.CREATED if created else TxStatus.DONE
        return TxOutcome(status, etag=config.digest, changes=changes, name=name, rule=rule)

    def _log_write(self, tx: Transaction, name: str | None, changes: Changes, etag: str) -> None:
        fields = changes.as_fields()
        del fields["unchanged"]  # config_reloaded lists them; here: what this write did
        emit(logger, RulesChanged(client=tx.client, method=tx.method, rule=name, changes=fields, etag=etag))

    def rules_document(self) -> tuple[str, RulesText]:
        """(digest, text) of the rules file that runs, as written: ``GET /rules``."""
        config = self.config
        if self._document is None or self._document[0] != config.digest:
            self._document = (config.digest, read_rules_text(config.raw))
        return self._document

    def _apply(self, config: Config, source: str) -> Changes:
        """Apply a valid new version, telling the reload listeners before and after."""
        for listener in self.reload_listeners:
            listener.reloading()
        try:
            return self._apply_config(config, source)
        finally:
            for listener in self.reload_listeners:
                listener.reloaded()

    def _apply_config(self, config: Config, source: str) -> Changes:
        old_settings = self.config.settings
        changes = self.supervisor.apply(self._running(config))
        self._publish_faults()
        self.config = config
        self.generation += 1
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
            emit(logger, RestartNeeded(workers=config.settings.workers))
        emit(
            logger,
            ConfigReloaded(
                source=source,
                settings_changed=settings_changed,
                added=changes.added,
                changed=changes.changed,
                removed=changes.removed,
                unchanged=changes.unchanged,
                in_worker=bool(self.worker),  # the master logs the reload once
            ),
        )
        return changes

    def _fail(self, source: str, errors: list[str], count: str | None = None) -> None:
        """Count and log an invalid version; ``count`` words the number of errors when
        the list is clipped ("at least 1,000 errors")."""
        self.reloads["failure"] += 1
        self.last_error = list(errors)
        emit(
            logger,
            ConfigInvalid(
                path=self.path,
                source=source,
                errors=list(errors),
                outcome=f"new rules rejected ({source}), the running rules stay: {count or f'{len(errors)} error(s)'}",
            ),
        )

    def file_changed(self) -> None:
        """The watcher's callback: queue a reload (never waits, never applies in the
        watcher's greenlet); the applier skips content already seen."""
        self.request_reload(ReloadSource.WATCHER, force=False)

    def stop_reloading(self, timeout: float) -> None:
        """SIGTERM/SIGINT: refuse reloads from now on, and wait (up to ``timeout``) for
        one in progress, so that nothing opens a listener after the stop closes them."""
        self.stop_watching()
        self.applier.close()
        if not self.applier.join(timeout):
            emit(logger, ReloadAbandoned(timeout=timeout))

    def _update_watcher(self) -> None:
        """Start or stop watching as ``settings.watch`` says."""
        want = self.config.settings.watch and self.watch_mode != "off"
        if want and self._watcher is None:
            self._watcher = create_watcher(self.watch_mode, self.path, self.file_changed)
            try:
                self._watcher.start()
            except WatcherError as exc:
                emit(logger, WatcherFallback(why=f"{exc}; polling instead"))
                self.watch_mode = "poll"
                self._watcher = create_watcher(self.watch_mode, self.path, self.file_changed)
                self._watcher.start()
            emit(logger, Watching(path=self.path, mode=self.watch_mode))
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

    def snapshot(self, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The /stats document (SPEC §5); ``rules``: the rules' entries, built by the
        caller (the admin endpoint builds them in slices, yielding between them).
        Its ``process`` figures are the admin endpoint's to add, in its rendering
        thread: listing /proc/self/fd takes milliseconds at 20,000 descriptors, which
        must not run on the hub (``gportmap.admin.render``)."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "config": {
                "path": self.path,
                "loaded_at": iso_time(self.loaded_at),
                "reloads": dict(self.reloads),
                "generation": self.generation,
                "applies": self.applier.applies,
                "reloading": "refused" if self.applier.closed else "on",
                "last_error": self.last_error,
                # "off" also while the watcher restarts after a failure: no watch is in place
                "watching": self.watch_mode if self._watcher is not None and self._watcher.alive else "off",
                "watcher_restarts": self._watcher.restarts if self._watcher is not None else 0,
            },
            "connections": {
                "active": self.supervisor.stats.active,
                "max": self.config.settings.max_connections,
                # what this process may hold: its share of max, within its open-file limit
                "cap": self.supervisor.stats.process_limit,
            },
            "rules": rules if rules is not None else [view.snapshot() for view in self.rule_views()],
            "workers": self.supervisor.describe_workers(),
        }

    def worker_report(self) -> dict[str, Any]:
        """What a worker tells its master: every figure as plain data and the rules'
        states (its open connections, on request: ``open_rows``)."""
        stats = self.supervisor.stats
        report: dict[str, Any] = {
            "pid": os.getpid(),
            "boot": self.booted,
            "active": stats.active,
            "cap": stats.process_limit,
            "rules": {rule_stats.name: rule_stats.counters() for rule_stats in stats.rules()},
            "states": [[rule.name, state, error] for rule, state, error in self.supervisor.rule_states()],
        }
        return report

    def open_rows(self) -> list[Sequence[Any] | dict[str, Any]]:
        """This process's open connections as ``OpenRow``s (``StatsRegistry.open_tables``:
        copied in slices), for its master."""
        (table,) = self.supervisor.stats.open_tables()
        return table.rows

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None


def _changes_or_raise(outcome: ReloadOutcome) -> Changes:
    if outcome.status is OutcomeStatus.APPLIED and outcome.changes is not None:
        return outcome.changes
    if outcome.status is OutcomeStatus.UNCHANGED:
        return Changes()
    raise ConfigError(list(outcome.errors))


def _parse_off_hub(raw: bytes, path: str) -> Config:
    """``parse`` in the hub's thread pool: it reads the files the rules name (TLS
    certificates, ``settings.admin.tokenFile``), which must not block the hub.

    A ConfigError comes back as a value and is raised here: an exception leaving a
    thread-pool function is also reported to the hub's error handler, which would
    log an invalid file as an ``internal_error``."""
    outcome = gevent.get_hub().threadpool.apply(_parse_or_error, (raw, path))
    if isinstance(outcome, ConfigError):
        raise outcome
    return outcome


def _parse_or_error(raw: bytes, path: str) -> Config | ConfigError:
    try:
        return parse(raw, path)
    except ConfigError as exc:
        return exc
