"""The new program's side of an upgrade in place (``gportmap.runtime.upgrade``):
read the state the old program handed over, adopt its listeners, workers and
connections, and go on with its figures.

The document is read before the rules are loaded (``Resume.from_environ``); the
listeners are adopted as socket activation's are (``inherited``); the figures go on
before the first rule starts (``prepare``: no connection may take a carried one's
id); the connections are rebuilt once the rules run (``resume``), which logs
``upgraded``. Drainers of the old program are this process's children: reaped here.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import gevent

from gportmap.config import Config, load, parse
from gportmap.errors import ConfigError
from gportmap.log import get_logger, log_event
from gportmap.runtime.carry import (
    STATE_ENV,
    CarriedSockets,
    UnreadableState,
    UpgradeState,
    close_descriptors,
    import_connection,
    restore_counters,
)
from gportmap.runtime.supervisor import RuleState, Supervisor
from gportmap.runtime.workers import HandedWorker, WorkerPool

if TYPE_CHECKING:
    from gportmap.runtime.service import Service
    from gportmap.runtime.systemd import InheritedSockets

logger = get_logger("upgrade")


class Resume:
    """The new program's side: the state the old one handed over."""

    #: Seconds between two looks for ended drainers (children of this process).
    reap_interval = 0.5
    #: Most bytes read of a state document.
    max_state = 1 << 30

    def __init__(self, state: UpgradeState) -> None:
        self.state = state
        self.sockets: CarriedSockets | None = None
        #: The drainers of earlier upgrades not yet ended (this process reaps them).
        self.pending: list[int] = list(state.drainers)

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> Resume | None:
        """The state ``$GPORTMAP_UPGRADE_STATE`` names (the variable is removed), or
        None. A document this code cannot read is logged (``upgrade_failed``) and
        every descriptor it may have passed closed: the program starts afresh."""
        environ = os.environ if environ is None else environ
        value = environ.pop(STATE_ENV, None)
        if value is None:
            return None
        try:
            fd = int(value)
            os.lseek(fd, 0, os.SEEK_SET)
            chunks, size = [], 0
            while size < cls.max_state:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            os.close(fd)
            return cls(UpgradeState.decode(b"".join(chunks)))
        except (ValueError, OSError, UnreadableState) as exc:
            close_descriptors(_inherited_descriptors())
            log_event(logger, logging.ERROR, "upgrade_failed",
                      f"the upgrade's state cannot be read ({exc}): starting afresh, connections are lost",
                      reason=str(exc))
            return None

    def load(self, path: str) -> Config:
        """The rules file, as any start loads it; if it no longer loads (changed since
        the pre-flight), the rules the old program ran, so the carried connections
        and listeners still have their rules."""
        try:
            return load(path)
        except ConfigError as exc:
            log_event(logger, logging.ERROR, "config_invalid",
                      f"{path}: the rules file is invalid since the upgrade's pre-flight; "
                      "running the rules the old program ran", path=path, errors=exc.errors)
            return parse(self.rules_raw(), path)

    def inherited(self, systemd: InheritedSockets | None) -> InheritedSockets | None:
        """The carried listeners, with systemd's (none after the first start: the
        old program took them and passed them on as ``systemd`` listeners); a
        master has none (its workers listen)."""
        if not self.state.listeners:
            return systemd
        self.sockets = CarriedSockets.open(self.state.listeners)
        if systemd is not None:
            for sock in systemd.sockets:
                self.sockets.sockets.append(sock)
                self.sockets.origins[sock.fd] = "systemd"
        return self.sockets

    def prepare(self, service: Service) -> None:
        """Before the rules start (no connection is counted yet): the service's
        figures and every rule's counters go on, and connection ids after the
        old program's, so that no new connection takes a carried one's id."""
        state = self.state
        service.continue_from(state.started_at, state.generation, state.reloads, state.digest)
        if isinstance(service.supervisor, Supervisor):  # a master's figures are its workers'
            restore_counters(service.supervisor.stats, state)

    def workers(self, wanted: int) -> int:
        """How many processes run after the upgrade: as many as before (a master keeps
        its workers, a single process stays one); a different count asked for now
        needs a restart."""
        count = self.state.pool_count or 1
        if wanted != count:
            log_event(logger, logging.WARNING, "restart_needed",
                      f"{wanted} worker(s) asked for, {count} running: an upgrade in place keeps them; "
                      "restart gportmap to change it", workers=wanted, running=count)
        return count

    def adopt_workers(self, pool: WorkerPool) -> None:
        """A master: the workers the old program ran (upgraded already) are this one's."""
        pool.adopt([HandedWorker(**item) for item in self.state.workers], self.state.pool_generation,
                   self.state.retired)

    def rules_raw(self) -> bytes:
        """The rules the old program ran (a worker starts with them: its master sends
        none to a worker that was upgraded)."""
        return self.state.rules.encode("utf-8", errors="surrogateescape")

    def resume(self, service: Service) -> None:
        """After the rules started: the carried connections, the listeners closed
        that the rules now hold, and ``upgraded``."""
        state = self.state
        supervisor = service.supervisor
        runners = supervisor.runners.values() if isinstance(supervisor, Supervisor) else ()
        servers = {runner.rule.name: runner.server for runner in runners
                   if runner.server is not None and runner.state is RuleState.RUNNING}
        started = time.monotonic()
        carried = lost = 0
        for conn in state.connections:
            server = servers.get(conn.rule)
            if server is None or not hasattr(server, "adopt_relay"):
                # Its rule is gone from the rules file (or no longer TCP): it ends, as
                # a reload removing the rule would have ended it after its drain.
                close_descriptors(conn.fds)
                supervisor.stats.rule(conn.rule, state.protocols.get(conn.rule, "tcp")).total += 1
                lost += 1
                continue
            try:
                import_connection(server, conn)
            except Exception as exc:  # noqa: BLE001 - one connection lost (closed), never the start
                lost += 1
                logger.error(f"a carried connection of rule {conn.rule} could not be rebuilt: {exc!r}",
                             exc_info=exc, extra={"event": "internal_error", "rule": conn.rule,
                                                  "client": conn.client})
                continue
            carried += 1
        imported = time.monotonic()
        if self.sockets is not None:
            self.sockets.settle()
        if self.pending:
            gevent.spawn(self._reap)
        duration = imported - state.began
        pause = imported - state.frozen
        per_connection = (state.export_seconds + imported - started) / carried if carried else 0.0
        log_event(
            logger, logging.INFO, "upgraded",
            f"upgraded in place in {duration:.3f}s: {carried} connection(s) carried "
            f"(paused {pause * 1000:.1f} ms), {state.draining} finishing in the old code",
            carried=carried, draining=state.draining, lost=lost, listeners=len(state.listeners),
            workers=len(state.workers),
            tail_bytes=sum(len(c.up.tail) + len(c.down.tail) for c in state.connections),
            duration=round(duration, 4), pause=round(pause, 4),
            per_connection_us=round(per_connection * 1e6, 1), pid=os.getpid(),
        )

    def _reap(self) -> None:
        """Wait for the drainers to end (they are this process's children now)."""
        pids = self.pending
        while pids:
            for pid in list(pids):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid  # reaped elsewhere (gevent's child watcher)
                if done:
                    pids.remove(pid)
            if pids:
                gevent.sleep(self.reap_interval)


def _inherited_descriptors() -> list[int]:
    """Descriptors above stdio that this process inherited (no close-on-exec): what
    an unreadable hand-over may have passed."""
    found = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if os.get_inheritable(fd):
                found.append(fd)
        except OSError:
            continue
    return found
