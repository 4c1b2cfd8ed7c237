"""Upgrade in place (SPEC §11): SIGUSR2 re-executes gportmap, same PID, carrying
listeners, plain TCP connections and UDP sessions.

The old program (``Upgrader``), in one greenlet:

1. ``upgrade_started``; where the platform lacks ``memfd_create``, ``fork`` or
   ``execve`` (or ``GPORTMAP_PORTABLE`` is set), ``upgrade_unsupported`` and nothing
   changes.
2. The pre-flight, off the hub: a fresh ``python -m gportmap --check RULES
   --upgrade-state N`` of the *installed* code. It fails when that code does not
   import, rejects the rules file, or does not read this state document's version:
   ``upgrade_failed`` with its output, and the running program serves on.
3. Without yielding from here on (no hub callback may move a byte once the
   connections' state is read): every running rule's listener, every plain
   connection and every UDP session of a rule without plugins
   (``gportmap.runtime.carry``) is described in the state document and made
   inheritable. If some connections cannot be carried (TLS, plugins,
   WebSocket, handshakes in progress, rules the file no longer has), a child is
   forked first: the *drainer*
   keeps running the old code for exactly those, lets go of everything else
   (listeners closed, carried connections' descriptors closed without a shutdown,
   carried sessions forgotten, the admin endpoint closed) and tells the parent so
   through a pipe, then drains for up to ``drainTimeout``, writes the bytes it
   relayed meanwhile into a memfd the next program reads when it reaps it
   (``DrainerReport``), and exits.
4. ``execve`` of the same command line with ``$GPORTMAP_UPGRADE_STATE`` naming the
   memfd. Listening sockets never close: connection attempts wait in their
   backlog for the new program, none is refused. The signals whose default action
   ends a process are blocked across the exec and released once the new program's
   handlers are in place (``HELD_SIGNALS``).

With ``--workers``, the master runs the pre-flight, waits for workers starting or
restarting to come up and stops those that do not in time (``WorkerPool.settle``:
no process outlives the exec, no slot gets two workers; none is started until
the exec, or ``thaw`` if it fails), then has each worker in turn do
steps 3 and 4 for itself (``Op.UPGRADE`` on their channel: a worker ignores SIGUSR2,
which ``systemctl kill`` sends to every process) and waits for it to report from its
new program (a worker whose hand-over fails says so at once, ``Op.UPGRADE_FAILED``,
and the upgrade stops there); last, it re-executes itself, handing on its channels to the workers
(``WorkerPool.hand_over``/``adopt``). A channel is handed on between two frames:
its send lock held, no frame half read.

The new program (``gportmap.runtime.resume.Resume``) reads the document before it loads the rules, adopts
the listeners the way socket activation's are adopted (``CarriedSockets``), starts
its rules, then rebuilds every carried connection on its rule's server, restores the
counters, reaps the drainers when they end, and logs ``upgraded`` with the figures.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import gevent
from gevent import monkey
from gevent.event import Event

from gportmap import log as gportmap_log
from gportmap.config import parse, read_rules_file
from gportmap.errors import ConfigError
from gportmap.events import (
    UpgradeDrained,
    UpgradeDrainerFailed,
    UpgradeDraining,
    UpgradeFailed,
    UpgradeFailure,
    UpgradeStarted,
    UpgradeUnsupported,
)
from gportmap.log import emit, flush_logs, get_logger, setup_logging
from gportmap.platform import Features, portable_mode
from gportmap.protocols.udp import UdpServer
from gportmap.runtime.carry import (
    STATE_ENV,
    STATE_VERSION,
    CarriedConnection,
    CarriedListener,
    CarriedSession,
    DrainerReport,
    UpgradeState,
    carried_relay,
    describe_listener,
    export_relay,
    export_session,
    forget_relay,
    udp_sessions,
)
from gportmap.runtime.supervisor import RuleState, Supervisor
from gportmap.runtime.workers import Channel, HandedWorker, WorkerPool

if TYPE_CHECKING:
    from gportmap.runtime.service import Service
    from gportmap.runtime.workers import WorkerLink

logger = get_logger("upgrade")

_native_select = monkey.get_original("select", "select")


#: Signals blocked across the exec (the mask survives it): their default action ends
#: a process, and the new program has no handler for them until it has started.
#: Blocked, they wait and are handled then (``release_signals``).
HELD_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


def hold_signals() -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def release_signals() -> None:
    """The handlers are in place: signals held since the exec are delivered now."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


def unsupported_reason(features: Features) -> str | None:
    """Why this platform cannot upgrade in place, or None when it can."""
    if portable_mode():
        return "GPORTMAP_PORTABLE is set: the upgrade needs Linux's memfd and fork"
    missing = [name for name in ("memfd_create", "fork", "execve", "set_inheritable") if not hasattr(os, name)]
    if missing:
        return f"this platform has no {', '.join('os.' + name for name in missing)}"
    if not hasattr(sys, "orig_argv"):
        return "this Python does not keep its command line (sys.orig_argv, Python 3.10+)"
    return None


@dataclass(frozen=True)
class Preflight:
    """What the installed code said about the current rules (``--check``)."""

    ok: bool
    reason: str = ""


class Upgrader:
    """SIGUSR2 in the main process: pre-flight, hand-over, exec (module docstring)."""

    #: Seconds the installed code's ``--check`` may take (imports on a loaded host).
    preflight_timeout = 60.0
    #: Seconds the hand-over waits for a reload in progress to finish.
    reload_wait = 5.0
    #: Seconds the old program waits for the drainer to let go of the listeners and
    #: the admin endpoint before it execs; past it, it execs anyway (the new program
    #: retries a port it cannot bind yet).
    release_timeout = 3.0
    #: Most characters of the pre-flight's output quoted in ``upgrade_failed``.
    max_reason = 2000
    #: Looks (10 ms apart) for a worker channel's frame to arrive whole before the exec.
    frame_waits = 200

    def __init__(
        self,
        service: Service,
        stop_services: Callable[[], None],
        features: Features,
        stopping: Event,
        link: WorkerLink | None = None,
    ) -> None:
        """``stop_services``: closes what only the main program may hold (the admin
        endpoint, the stats log, systemd's notifier): the drainer calls it.
        ``link``: this process is a worker of a master, which upgrades it (after
        its own pre-flight) before it upgrades itself."""
        self.service = service
        self.stop_services = stop_services
        self.features = features
        self.stopping = stopping
        self.link = link
        #: Drainer processes of earlier upgrades still running: handed on to be reaped.
        self.drainers: list[int] = []
        self.busy = False
        #: This process is a drainer: a signal meant for the main process (``systemctl
        #: kill`` signals the whole group by default) upgrades nothing here.
        self.draining_here = False
        if link is None and isinstance(service.supervisor, WorkerPool):
            # A worker restarted in place on purpose runs the installed code: the
            # master checks it first, as for an upgrade.
            service.supervisor.installed_check = self.check_installed

    # -- the signal ------------------------------------------------------------------

    def request(self, signum: int) -> None:
        """SIGUSR2 (a greenlet of gevent's signal handling). A worker takes the
        order from its master (``Op.UPGRADE``, after the master's pre-flight),
        not from a signal (``systemctl kill`` signals every process of a unit)."""
        if self.draining_here:
            return
        if self.link is not None:
            emit(logger, UpgradeUnsupported(reason="worker"))
            return
        self.run()

    def run(self) -> str | None:
        """Upgrade now, unless one is under way: SIGUSR2 to the main process, or a
        worker's master's order. Returns only if the upgrade did not happen: why
        (logged already; a worker tells its master, ``WorkerLink.on_upgrade``)."""
        if self.draining_here:
            return "this process is a drainer"
        if self.busy:
            emit(logger, UpgradeFailed(reason=UpgradeFailure.IN_PROGRESS))
            return "an upgrade is already in progress"
        self.busy = True
        try:
            return self.upgrade()
        except Exception as exc:  # noqa: BLE001 - a bug: logged with its traceback, serving goes on
            reason = f"internal error: {exc!r}"[:300]
            emit(logger, UpgradeFailed(reason=reason), exc_info=exc)
            return reason
        finally:
            self.busy = False

    def upgrade(self) -> str:
        """Upgrade now; returns only if the upgrade did not happen: why (logged)."""
        reason = unsupported_reason(self.features)
        if reason is not None:
            emit(logger, UpgradeUnsupported(reason=reason))
            return reason
        if self.stopping.is_set():
            emit(logger, UpgradeFailed(reason=UpgradeFailure.STOPPING))
            return "gportmap is stopping"
        began = time.monotonic()
        what = ("handing this worker over to the installed gportmap" if self.link is not None
                else f"checking the installed gportmap against {self.service.path}")
        emit(logger, UpgradeStarted(path=self.service.path, pid=os.getpid(), what=what))
        keep = None
        if self.link is None:  # a worker's master checked the installed code already
            check = self.preflight()
            if not check.ok:
                return self._failed(check.reason)
            keep = self.rules_kept()
        pool = self.service.supervisor if isinstance(self.service.supervisor, WorkerPool) else None
        if pool is None:
            return self._exec(began, keep, None)
        if not pool.handing.acquire(timeout=pool.upgrade_timeout):
            return self._failed(f"a worker was still being restarted in place after {pool.upgrade_timeout:g}s; "
                                "send SIGUSR2 again")
        try:  # every slot running (or stopped, for the next master to start) before any is handed on
            pool.settle()
            error = pool.upgrade_workers()  # each in turn, carrying its connections
            if error is not None:
                return self._failed(f"{error}; this master is not upgraded (the workers upgraded so far are)")
            return self._exec(began, keep, pool)
        finally:  # only reached if the exec did not happen
            pool.thaw()
            pool.handing.release()

    def _exec(self, began: float, keep: frozenset[str] | None, pool: WorkerPool | None) -> str:
        """The hand-over and the exec, once the workers (if any) are upgraded;
        returns only if the exec did not happen: why (logged)."""
        if not self.service.applier.join(self.reload_wait):
            return self._failed("a reload is still in progress; send SIGUSR2 again")
        channels = self._channels(pool)
        for channel in channels:
            channel.hold()  # a frame being sent goes whole; none starts after it
        try:
            # What follows may end with the exec: nothing logged may wait in the
            # queue. (This yields: a reload that starts in that instant is cut by
            # the exec, and the new program loads the rules file anyway.)
            flush_logs(2.0)
            for _ in range(self.frame_waits):
                if not any(channel.reading_frame for channel in channels):
                    break
                gevent.sleep(0.01)
            if any(channel.reading_frame for channel in channels):
                raise OSError("a message on a worker channel is still arriving; send SIGUSR2 again")
            if self.stopping.is_set():
                raise OSError("gportmap started stopping during the pre-flight")
            self.hand_over(began, keep, pool)
            return self._failed("the exec did not happen")  # hand_over returns only by raising
        except OSError as exc:
            return self._failed(f"the hand-over failed: {exc}")
        finally:  # only reached if the exec did not happen
            for channel in channels:
                channel.release()

    def _channels(self, pool: WorkerPool | None) -> list[Channel]:
        """The worker channels handed to the next program: a master's, or a worker's one."""
        if self.link is not None:
            return [self.link.channel]
        if pool is not None:
            return [worker.channel for worker in pool.live() if worker.channel is not None]
        return []

    def _failed(self, reason: str) -> str:
        emit(logger, UpgradeFailed(reason=reason))
        return reason

    # -- 1. the pre-flight -------------------------------------------------------------

    def check_installed(self) -> str | None:
        """The installed code can take over from this one here (the platform
        allows it, the pre-flight passes): None, else why not."""
        reason = unsupported_reason(self.features)
        if reason is not None:
            return reason
        check = self.preflight()
        return None if check.ok else check.reason

    def preflight_command(self) -> list[str]:
        return [sys.executable, "-m", "gportmap", "--check", self.service.path, "--upgrade-state", str(STATE_VERSION)]

    def preflight(self) -> Preflight:
        """The installed code loads the current rules and reads this state version:
        run in a child process (gevent's subprocess: the hub keeps serving)."""
        try:
            done = subprocess.run(
                self.preflight_command(), stdin=subprocess.DEVNULL, capture_output=True,
                timeout=self.preflight_timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            return Preflight(False, f"the installed gportmap's --check did not answer in {self.preflight_timeout:g}s")
        except OSError as exc:
            return Preflight(False, f"cannot run the installed gportmap: {exc}")
        if done.returncode == 0:
            return Preflight(True)
        output = (done.stderr or done.stdout or b"").decode(errors="replace").strip()
        return Preflight(False, f"the installed gportmap's --check exited {done.returncode}: "
                                f"{output[-self.max_reason:] or 'no output'}")

    def rules_kept(self) -> frozenset[str] | None:
        """The enabled rules the new program will run, as this code reads the rules
        file: connections of the others drain in the old code, as a reload removing
        their rule would drain them. None when this code cannot tell (a file only the
        new code understands): then every plain connection is carried."""
        try:
            raw = gevent.get_hub().threadpool.apply(read_rules_file, (self.service.path,))
            config = parse(raw, self.service.path)
        except ConfigError:
            return None
        return frozenset(rule.name for rule in config.enabled_rules)

    # -- 2. the hand-over (never yields: see the module docstring) -----------------------

    def hand_over(self, began: float, keep: frozenset[str] | None = None, pool: WorkerPool | None = None) -> None:
        """Describe, fork the drainer if needed, exec. Returns only on failure
        (OSError), with the running program intact, every descriptor close-on-exec
        again (a drainer already forked is killed before it took anything over)."""
        frozen = time.monotonic()
        service = self.service
        supervisor: Supervisor = service.supervisor  # type: ignore[assignment]
        hand = Handover()
        try:
            if pool is not None:
                hand.workers = pool.hand_over()
            else:
                hand.take(supervisor, keep)
            if self.link is not None:
                hand.keep_open(self.link.channel.sock.fileno())  # the same --worker-fd in the next program
            reports = {pid: fd for pid, fd in service.drainer_reports.items() if pid in self.drainers}
            for fd in reports.values():  # drainers of earlier upgrades still running: handed on
                hand.keep_open(fd)
            exported = time.monotonic()
            if not os.access(sys.executable, os.X_OK):
                raise OSError(f"{sys.executable} is not executable")
        except Exception:
            hand.undo()
            raise
        drainer = None
        if hand.draining > 0:
            try:
                report = os.memfd_create("gportmap-drainer", 0)  # what it relays after the exec
            except OSError:
                hand.undo()
                raise
            try:
                drainer = self._fork_drainer(hand, report)
            except OSError:  # no process left, say: nothing was forked
                os.close(report)
                hand.undo()
                raise
            hand.keep_open(report)
            reports[drainer] = report
        try:
            stats = supervisor.stats
            local = pool is None
            state = UpgradeState(
                version=STATE_VERSION,
                began=began,
                frozen=frozen,
                started_at=service.started_at,
                generation=service.generation,
                digest=service.config.digest,
                reloads=dict(service.reloads),
                rules=service.config.raw.decode("utf-8", errors="surrogateescape"),
                counters={rule.name: rule.counters() for rule in stats.rules()} if local else {},
                protocols={rule.name: rule.protocol for rule in stats.rules()} if local else {},
                next_id=stats.next_id() if local else 0,
                path=service.path,
                link_generation=self.link.applied if self.link is not None else 0,
                workers=[asdict(item) for item in hand.workers],
                pool_generation=pool.generation if pool is not None else 0,
                pool_count=pool.count if pool is not None else 0,
                retired={name: rs.counters() for name, rs in pool.stats.retired.items()} if pool else {},
                listeners=hand.listeners,
                connections=hand.connections,
                sessions=hand.sessions,
                drainers=self.drainers + ([drainer] if drainer else []),
                drainer_reports={str(pid): fd for pid, fd in reports.items()},
                draining=hand.draining,
                export_seconds=exported - frozen,
            )
            memfd = os.memfd_create("gportmap-upgrade", 0)  # no MFD_CLOEXEC: the new program reads it
            os.set_inheritable(memfd, True)
            os.write(memfd, state.encode())
            os.lseek(memfd, 0, os.SEEK_SET)
            environ = dict(os.environ, **{STATE_ENV: str(memfd)})
            sys.stdout.flush()
            sys.stderr.flush()
            hold_signals()
            os.execve(sys.executable, list(sys.orig_argv), environ)
        except Exception as exc:  # the exec did not happen: serve on
            release_signals()
            hand.undo()
            if drainer is not None:
                os.kill(drainer, signal.SIGKILL)
                os.waitpid(drainer, 0)
                os.close(reports[drainer])
            raise OSError(str(exc)) from exc

    # -- 3. the drainer ------------------------------------------------------------------

    def _fork_drainer(self, hand: Handover, report: int) -> int:
        """Fork the process that finishes what cannot be carried; return its pid once
        it let go of the listeners (or after ``release_timeout``)."""
        ready_read, ready_write = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(ready_read)
            os.close(ready_write)
            raise
        if pid == 0:  # the drainer: never returns
            os.close(ready_read)
            self._drain_in_child(hand, ready_write, report)
        os.close(ready_write)
        try:
            _native_select([ready_read], [], [], self.release_timeout)  # blocks the hub on purpose
        finally:
            os.close(ready_read)
        return pid

    def _drain_in_child(self, hand: Handover, ready: int, report: int) -> None:
        """The drainer's life (never returns): let go of what the new program
        carries, drain the rest, and report the bytes it relayed meanwhile in
        ``report`` (a memfd the new program reads once it reaped this process)."""
        code = 0
        self.draining_here = True
        supervisor: Supervisor = self.service.supervisor  # type: ignore[assignment]
        baseline = DrainerReport.baseline(supervisor.stats)  # as the state document has them
        try:
            gportmap_log.after_fork()  # the parent's writer thread does not run here
            setup_logging(*self.service.overrides.logging(self.service.config.settings))
            for handler in logging.getLogger().handlers:
                handler.addFilter(_DrainerField(os.getpid()))
            for server, item, relay in hand.carried:
                forget_relay(relay)
                server.untrack(item)
                supervisor.stats.close(relay.conn)
            for udp, session in hand.carried_sessions:
                udp.forget_session(session)
            supervisor.close_listeners()
            self.service.applier.close()
            self.service.stop_watching()
            self.stop_services()
            os.write(ready, b"x")
            os.close(ready)
            drain = self.service.config.settings.drain_timeout
            emit(logger, UpgradeDraining(drainer=os.getpid(), draining=hand.draining, drain_timeout=drain))
            supervisor.drain(drain)
            DrainerReport.since(supervisor.stats, baseline).write(report)
            emit(logger, UpgradeDrained(drainer=os.getpid()))
        except BaseException as exc:  # noqa: BLE001 - the drainer must end here, whatever happened
            code = 1
            try:
                emit(logger, UpgradeDrainerFailed(), exc_info=exc)
            except Exception:  # noqa: BLE001
                pass
        finally:
            flush_logs(2.0)
            os._exit(code)


class Handover:
    """What the hand-over takes from the running supervisor, and gives back if the
    exec does not happen (the descriptors close-on-exec again)."""

    def __init__(self) -> None:
        self.listeners: list[CarriedListener] = []
        self.connections: list[CarriedConnection] = []
        #: (server, the item it tracks, the relay) of every carried connection.
        self.carried: list[tuple[Any, Any, Any]] = []
        #: Connections that cannot be carried: the drainer's.
        self.draining = 0
        #: A master's workers (their channels), handed to the next master.
        self.workers: list[HandedWorker] = []
        self.kept: list[int] = []
        #: UDP sessions carried, and (server, session) of each for the drainer.
        self.sessions: list[CarriedSession] = []
        self.carried_sessions: list[tuple[UdpServer, Any]] = []

    def keep_open(self, fd: int) -> None:
        """One more descriptor the next program finds where this one had it."""
        os.set_inheritable(fd, True)
        self.kept.append(fd)

    def take(self, supervisor: Supervisor, keep: frozenset[str] | None = None) -> None:
        """Listeners of the running rules (and systemd's sockets, kept for a rule a
        reload adds), and every plain connection and UDP session of those rules
        that ``keep`` names (None: all); the other connections count as draining
        (with those of servers still draining after a reload), the other sessions
        end."""
        for runner in supervisor.runners.values():
            server = runner.server
            if runner.state is not RuleState.RUNNING or server is None:
                continue
            # every listening socket of the rule: a port range's too (SPEC §9, §11)
            listening = getattr(server, "listening", None)
            if listening is not None:
                sockets = list(listening().values())
            else:
                sockets = [server.listener] if server.listener is not None else []
            for sock in sockets:
                self.listeners.append(describe_listener(sock))
            sessions = udp_sessions(server)  # a udp rule's (a port range's: each port's), or None
            if sessions is not None:
                if keep is None or runner.rule.name in keep:  # else they end, as after a reload
                    for part, session in sessions:
                        self.sessions.append(export_session(session, runner.rule.name, part))
                        self.carried_sessions.append((part, session))
                continue
            if not hasattr(server, "relays"):
                continue
            self.draining += server.active
            if keep is not None and runner.rule.name not in keep:
                continue  # its rule goes: it drains, as after a reload
            for item in list(server.relays):
                relay = carried_relay(item, server)
                if relay is not None:
                    self.connections.append(export_relay(relay, runner.rule.name))
                    self.carried.append((server, item, relay))
        self.draining -= len(self.carried)
        for runner in supervisor.draining:
            if hasattr(runner.server, "relays"):
                self.draining += runner.server.active
        if supervisor.inherited is not None:
            for sock in supervisor.inherited.sockets:
                self.listeners.append(describe_listener(sock.sock, origin="systemd", name=sock.name))

    def undo(self) -> None:
        fds = [item.fd for item in self.listeners] + [item.fd for item in self.workers] + self.kept
        for conn in self.connections:
            fds.extend(conn.fds)
        fds.extend(item.fd for item in self.sessions)
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass


class _DrainerField(logging.Filter):
    """Every record of a drainer says so (``drainer``: its pid): its ``rule_stopped``
    and ``connection_closed`` are the old program's, not the running one's."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid

    def filter(self, record: logging.LogRecord) -> bool:
        record.drainer = self.pid
        return True
