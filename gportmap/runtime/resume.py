"""The new program's side of an upgrade in place (``gportmap.runtime.upgrade``):
read the state the old program handed over, adopt its listeners, workers and
connections, and go on with its figures.

The document is read before the rules are loaded (``Resume.from_environ``); the
listeners are adopted as socket activation's are (``inherited``); the figures go on
before the first rule starts (``prepare``: no connection may take a carried one's
id); the connections are rebuilt once the rules run (``resume``), which logs
``upgraded``. UDP sessions are left for their rules' servers, which adopt them as
they start, before reading a datagram (``leave_sessions``). Drainers of the old
program are this process's children: reaped here, and the bytes each relayed after
the upgrade (its ``DrainerReport``) added to the rules' counters then.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import gevent

from gportmap.config import Config, load, parse
from gportmap.engine.pool import TargetPool
from gportmap.errors import ConfigError
from gportmap.events import ConfigInvalid, InternalError, RestartNeeded, Upgraded, UpgradeFailed
from gportmap.log import emit, get_logger
from gportmap.protocols.udp import UdpServer
from gportmap.protocols.udprange import UdpPort
from gportmap.runtime.carry import (
    STATE_ENV,
    CarriedSession,
    CarriedSockets,
    DrainerReport,
    UnreadableState,
    UpgradeState,
    close_descriptors,
    import_connection,
    import_session,
    restore_counters,
)
from gportmap.runtime.supervisor import RuleState, Supervisor
from gportmap.runtime.workers import HandedWorker, WorkerPool

if TYPE_CHECKING:
    from gportmap.runtime.service import Service
    from gportmap.runtime.systemd import InheritedSockets
    from gportmap.stats import StatsRegistry

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
        self.service: Service | None = None
        #: UDP sessions not yet adopted by their rules' servers; those carried over
        #: and those lost (``adopt_sessions``).
        self.sessions_left: list[CarriedSession] = list(state.sessions)
        self.sessions_carried = self.sessions_lost = 0

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
            emit(logger, UpgradeFailed(reason=str(exc), unreadable=True))
            return None

    def load(self, path: str) -> Config:
        """The rules file, as any start loads it; if it no longer loads (changed since
        the pre-flight), the rules the old program ran, so the carried connections
        and listeners still have their rules."""
        try:
            return load(path)
        except ConfigError as exc:
            emit(
                logger,
                ConfigInvalid(
                    path=path,
                    errors=exc.errors,
                    outcome="the rules file is invalid since the upgrade's pre-flight; running the rules the old program ran",
                ),
            )
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
        figures, every rule's and every target's counters go on, and connection
        ids after the old program's, so that no new connection takes a carried
        one's id; the carried UDP sessions wait for their servers, and the
        running drainers' reports for their ends."""
        state = self.state
        service.continue_from(state.started_at, state.generation, state.reloads, state.digest)
        self.service = service
        for pid, fd in state.drainer_reports.items():
            os.set_inheritable(fd, False)  # a later upgrade hands it on again if its drainer still runs
            service.drainer_reports[int(pid)] = fd
        if isinstance(service.supervisor, Supervisor):  # a master's figures are its workers'
            restore_counters(service.supervisor.stats, state)
            self.continue_targets(service.supervisor.stats, service.config)
            self.leave_sessions(service.supervisor.stats)

    def continue_targets(self, registry: StatsRegistry, config: Config) -> None:
        """Every target's running totals (``/stats``' ``targets``: connections,
        connect failures, bytes) go on from the old program's: the rule's pool is
        made now, before its server, which takes it over (``TargetPool.for_rule``).
        A target the rules file no longer has (known by its address) starts
        nothing; a rule it no longer has keeps its rule counters only."""
        for rule in config.enabled_rules:
            counters = self.state.counters.get(rule.name)
            if not counters or not counters.get("targets"):
                continue
            pool = TargetPool.for_rule(rule, registry.rule(rule.name, rule.protocol))
            old = {entry.get("address"): entry for entry in counters["targets"]}
            for target in pool.targets:
                figures = old.get(target.address)
                if figures is not None:
                    target.continue_from(figures)

    def workers(self, wanted: int) -> int:
        """How many processes run after the upgrade: as many as before (a master keeps
        its workers, a single process stays one); a different count asked for now
        needs a restart."""
        count = self.state.pool_count or 1
        if wanted != count:
            emit(logger, RestartNeeded(workers=wanted, running=count))
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
        carried = 0
        lost = self.sessions_lost + self.end_sessions_left(supervisor.stats)
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
                event = InternalError(
                    rule=conn.rule,
                    client=conn.client,
                    what=f"a carried connection of rule {conn.rule} could not be rebuilt: {exc!r}",
                )
                emit(logger, event, exc_info=exc)
                continue
            carried += 1
        carried += self.sessions_carried  # a udp rule's connections are its sessions (as in /stats)
        imported = time.monotonic()
        if self.sockets is not None:
            self.sockets.settle()
        if self.pending:
            gevent.spawn(self._reap)
        duration = imported - state.began
        pause = imported - state.frozen
        per_connection = (state.export_seconds + imported - started) / carried if carried else 0.0
        emit(
            logger,
            Upgraded(
                carried=carried,
                draining=state.draining,
                lost=lost,
                listeners=len(state.listeners),
                workers=len(state.workers),
                tail_bytes=sum(len(c.up.tail) + len(c.down.tail) for c in state.connections),
                duration=round(duration, 4),
                pause=round(pause, 4),
                per_connection_us=round(per_connection * 1e6, 1),
                pid=os.getpid(),
                sessions=self.sessions_carried,
            ),
        )

    def leave_sessions(self, registry: StatsRegistry) -> None:
        """The carried UDP sessions, left for their rules' servers: each adopts its
        own as it starts, before it reads its listener (``take_carried``)."""
        for name in {item.rule for item in self.sessions_left}:
            registry.carry_over(name, lambda server, name=name: self.adopt_sessions(name, server, registry))

    def adopt_sessions(self, rule: str, server: Any, registry: StatsRegistry) -> None:
        """A rule's server starts: its carried sessions back on it (a hub-safe call:
        nothing here yields or raises). A session that cannot be rebuilt (its
        target is no longer the rule's) ends, its socket closed, counted lost.

        A port of a rule with several (``UdpPort``) takes the sessions of its own
        socket only (``CarriedSession.listen``) and leaves the others for the next
        port to start; a session whose rule changed between one socket and
        several is lost (its replies would leave from another socket)."""
        port = getattr(server, "listen_key", None)  # a port of a range: its socket's address
        later = []
        for item in [item for item in self.sessions_left if item.rule == rule]:
            where = tuple(item.listen) if item.listen is not None else None
            if port is not None and where is not None and where != port:
                later.append(item)  # another port's
                continue
            self.sessions_left.remove(item)
            if type(server) not in (UdpServer, UdpPort) or (where is None) != (port is None):
                close_descriptors([item.fd])
                registry.rule(rule, server.rule.protocol).total += 1  # restore_counters took it out
                self.sessions_lost += 1
                continue
            try:
                import_session(server, item)
            except Exception as exc:  # noqa: BLE001 - one session lost (closed), never the start
                self.sessions_lost += 1
                registry.rule(rule, server.rule.protocol).total += 1
                event = InternalError(
                    rule=rule, what=f"a carried UDP session of rule {rule} could not be rebuilt: {exc!r}"
                )
                emit(logger, event, exc_info=exc)
                continue
            self.sessions_carried += 1
        if later:  # the next port of the rule to start takes them (or ``end_sessions_left``)
            registry.carry_over(rule, lambda server, rule=rule: self.adopt_sessions(rule, server, registry))

    def end_sessions_left(self, registry: StatsRegistry) -> int:
        """Sessions whose rule did not start (gone from the rules file, or failing
        to bind): they end, as a reload removing the rule would end them; how many."""
        left, self.sessions_left = self.sessions_left, []
        for item in left:
            registry.take_carried(item.rule)
            close_descriptors([item.fd])
            registry.rule(item.rule, self.state.protocols.get(item.rule, "udp")).total += 1  # see restore_counters
        return len(left)

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
                    self._count_drained(pid)
            if pids:
                gevent.sleep(self.reap_interval)


    def _count_drained(self, pid: int) -> None:
        """A drainer ended: the bytes it relayed after the upgrade go into this
        program's rule counters (``DrainerReport``; a few hundred bytes of a memfd,
        memory, not a disk). Nothing if it wrote none (killed)."""
        service = self.service
        fd = service.drainer_reports.pop(pid, None) if service is not None else None
        if fd is None:
            return
        try:
            report = DrainerReport.read(fd)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            emit(logger, InternalError(what=f"the report of drainer {pid} cannot be read: {exc!r}"))
            return
        finally:
            os.close(fd)
        if isinstance(service.supervisor, Supervisor):
            report.add_to(service.supervisor.stats)


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
