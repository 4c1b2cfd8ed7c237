"""``--workers N``: N processes share every listening port, one master watches them.

Each worker is an ordinary gportmap data path (supervisor, servers, relay) whose
listeners are bound with ``SO_REUSEPORT``, so the kernel spreads new connections
(and UDP clients, by address) over the workers. The master binds no rule port: it
reads and validates the rules file, starts the workers and restarts any that dies,
fans reloads out, and serves the admin endpoint and the stats log with the figures
of all workers summed.

Master and worker talk over a socketpair the worker inherits: length-prefixed JSON
requests from the master, one answer each (``Channel``). The worker stops, draining
its connections, when the master's end closes: a master killed with SIGKILL
leaves no orphan holding the ports.

``WorkerPool`` has the surface of ``Supervisor`` that ``Service`` and the run loop
use (``apply``, ``rule_states``, ``stats``, ``close_listeners``, ``drain``), so the
admin endpoint, metrics and stats log serve both modes unchanged.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.subprocess
from gevent.event import Event
from gevent.lock import Semaphore

from gportmap.config import Config, Rule
from gportmap.errors import ConfigError, GportmapError
from gportmap.log import get_logger, log_event
from gportmap.stats import RuleStats
from gportmap.supervisor import Changes

if TYPE_CHECKING:
    from gportmap.service import Service

logger = get_logger("workers")

#: A frame larger than this ends the channel: /connections of 10,000 connections
#: is about 2 MB, so this only stops a corrupted length from allocating gigabytes.
MAX_FRAME = 64 << 20
#: Seconds a worker has to start its rules and answer its first configuration.
START_TIMEOUT = 30.0
#: Seconds the master waits for a worker's figures before using its last ones.
REQUEST_TIMEOUT = 5.0
#: Seconds between the master's own reads of every worker's counters, so that a
#: worker that dies takes at most this much of its counting with it.
POLL_INTERVAL = 2.0
#: Restart back-off: a worker that dies soon after starting is restarted after
#: 0.5 s, doubling up to 10 s; one that ran for STABLE seconds starts over at 0.5 s.
RESTART_FIRST, RESTART_MOST, STABLE = 0.5, 10.0, 30.0
#: Seconds after the drain deadline before a worker that has not exited is killed.
STOP_GRACE = 5.0


class ChannelError(GportmapError):
    """The master-worker channel broke (a truncated or oversized frame)."""


class Channel:
    """Length-prefixed JSON messages over a stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        self.sock.sendall(struct.pack("!I", len(body)) + body)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the other end closed between messages."""
        header = self._exactly(4)
        if header is None:
            return None
        (size,) = struct.unpack("!I", header)
        if size > MAX_FRAME:
            raise ChannelError(f"frame of {size} bytes is over the limit of {MAX_FRAME}")
        body = self._exactly(size) if size else b""
        if body is None:
            raise ChannelError("the channel closed inside a frame")
        message = json.loads(body)
        if not isinstance(message, dict):
            raise ChannelError("a frame that is not a JSON object")
        return message

    def _exactly(self, size: int) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(min(size - len(data), 1 << 20))
            if not chunk:
                if data:
                    raise ChannelError("the channel closed inside a frame")
                return None
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self.sock.close()


def encode_raw(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_raw(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


# -- the worker's end ------------------------------------------------------------------


class WorkerLink:
    """A worker's end of the channel: its first configuration, then requests."""

    def __init__(self, channel: Channel, index: int) -> None:
        self.channel = channel
        self.index = index

    def first_config(self) -> tuple[bytes, str]:
        """(rules file bytes, path) the master validated; the worker starts with them."""
        message = self.channel.recv()
        if message is None or message.get("op") != "apply":
            raise ChannelError("the master sent no configuration")
        return decode_raw(message["raw"]), message["path"]

    def serve(self, service: Service, changes: Changes, stop: Event) -> gevent.Greenlet:
        """Answer the first configuration (the rules are started) and then every
        request, until the master's end closes: then ``stop`` is set."""
        return gevent.spawn(self._serve, service, changes, stop)

    def _serve(self, service: Service, changes: Changes, stop: Event) -> None:
        try:
            self.channel.send({"ok": True, "changes": changes.as_fields(), "pid": os.getpid()})
            while True:
                message = self.channel.recv()
                if message is None:
                    break
                self.channel.send(self._answer(service, message))
        except (OSError, ChannelError, ValueError) as exc:
            log_event(logger, logging.ERROR, "worker_channel_error", f"channel to the master broke: {exc}")
        if not stop.is_set():
            log_event(logger, logging.WARNING, "master_gone", "the master process is gone: stopping")
            stop.set()

    @staticmethod
    def _answer(service: Service, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "report":
            return {"ok": True, "report": service.worker_report(bool(message.get("connections")))}
        if op == "apply":
            try:
                changes = service.apply_raw(decode_raw(message["raw"]), message.get("source", "master"))
            except ConfigError as exc:
                return {"ok": False, "errors": exc.errors}
            return {"ok": True, "changes": changes.as_fields()}
        return {"ok": False, "errors": [f"unknown request {op!r}"]}


# -- the master's side -----------------------------------------------------------------


class WorkerProcess:
    """One worker as the master sees it: its process, channel and last figures."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: gevent.subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.state = "starting"  # starting, running, exited
        self.pid: int | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.report: dict[str, Any] | None = None
        self.lock = Semaphore()

    def request(self, message: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any] | None:
        """Send one request and wait for its answer; None if the worker cannot answer."""
        channel = self.channel
        if channel is None:
            return None
        with self.lock:
            try:
                with gevent.Timeout(timeout):
                    channel.send(message)
                    return channel.recv()
            except (gevent.Timeout, OSError, ChannelError, ValueError):
                # A late answer would be read as the next request's: the channel is
                # unusable. Killing the process makes the monitor restart it.
                self.kill()
                return None

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except OSError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def describe(self) -> dict[str, Any]:
        report = self.report or {}
        return {
            "index": self.index,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "uptime": round(time.time() - self.started_at, 3) if self.state == "running" else 0.0,
            "connections_active": report.get("active", 0),
            "connections_total": sum(rule.get("total", 0) for rule in report.get("rules", {}).values()),
        }


class AggregateStats:
    """The figures of every worker summed, with the shape of ``StatsRegistry`` the
    readers use. Totals of workers that are gone stay in the sums (``retired``), so
    counters never go backwards when a worker is restarted."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.retired: dict[str, RuleStats] = {}

    @property
    def active(self) -> int:
        return sum(worker.report.get("active", 0) for worker in self.pool.live() if worker.report)

    def rule(self, name: str, protocol: str) -> RuleStats:
        total = RuleStats(name, protocol)
        retired = self.retired.get(name)
        if retired is not None:
            total.add(retired.counters(), gauges=False)
        for worker in self.pool.live():
            counters = (worker.report or {}).get("rules", {}).get(name)
            if counters is not None:
                total.add(counters)
        return total

    def retire(self, report: dict[str, Any] | None) -> None:
        """Keep the totals of a worker that has exited."""
        for name, counters in (report or {}).get("rules", {}).items():
            self.retired.setdefault(name, RuleStats(name, "")).add(counters, gauges=False)

    def describe_open(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for worker, report in self.pool.collect(connections=True):
            for entry in report.get("connections", []):
                entry["worker"] = worker.index
                entries.append(entry)
        return entries


class WorkerPool:
    """The master's stand-in for a ``Supervisor``: the same surface, carried out by
    worker processes (see the module docstring)."""

    def __init__(self, count: int, command: list[str]) -> None:
        self.count = count
        self.command = command
        self.workers = [WorkerProcess(index) for index in range(count)]
        self.stats = AggregateStats(self)
        self.config: Config | None = None
        self.stopping = False
        self._rules_seen: dict[str, Rule] = {}
        self._poller: gevent.Greenlet | None = None

    # -- the Supervisor surface ----------------------------------------------------

    def apply(self, config: Config) -> Changes:
        """Start the workers (first call) or hand them the new rules; the changes are
        those the workers report (they are identical: same rules, same old rules)."""
        first = self.config is None
        self._remember_rules()
        self.config = config
        if first:
            return self._start_all()
        message = {"op": "apply", "raw": encode_raw(config.raw), "source": "master"}
        jobs = [gevent.spawn(worker.request, message, START_TIMEOUT) for worker in self.live()]
        gevent.joinall(jobs)
        changes: Changes | None = None
        for worker, job in zip(self.live(), jobs):
            answer = job.value
            if answer and answer.get("ok"):
                changes = changes or Changes(**answer["changes"])
            elif answer is not None:
                log_event(
                    logger,
                    logging.ERROR,
                    "worker_config_invalid",
                    f"worker {worker.index} could not apply the rules; it keeps its old ones",
                    worker=worker.index,
                    errors=answer.get("errors", []),
                )
        return changes or Changes()

    def _remember_rules(self) -> None:
        """Keep the rules of the config being replaced, for /stats to show those that
        some worker still drains; forget the ones no worker reports any more."""
        reported = {
            name for worker in self.live() if worker.report for name, _, _ in worker.report.get("states", [])
        }
        self._rules_seen = {name: rule for name, rule in self._rules_seen.items() if name in reported}
        self._rules_seen.update({rule.name: rule for rule in (self.config.rules if self.config else ())})

    def rule_states(self) -> list[tuple[Rule, str, str | None]]:
        """Each rule's state over all workers: failed if any worker cannot serve it
        (its error names the worker), running when all serve it."""
        if self.config is None:
            return []
        reports = [(worker, worker.report) for worker in self.live() if worker.report is not None]
        by_name: dict[str, list[tuple[int, str, str | None]]] = {}
        for worker, report in reports:
            for name, state, error in report.get("states", []):
                by_name.setdefault(name, []).append((worker.index, state, error))
        states: list[tuple[Rule, str, str | None]] = []
        names = set()
        for rule in self.config.rules:
            names.add(rule.name)
            if not rule.enabled:
                states.append((rule, "disabled", None))
                continue
            seen = by_name.get(rule.name, [])
            if not seen:
                states.append((rule, "failed", "no worker is running"))
                continue
            failed = [(index, error) for index, state, error in seen if state == "failed"]
            if failed:
                error = "; ".join(f"worker {index}: {error}" for index, error in failed)
                states.append((rule, "failed", error))
            elif all(state == "running" for _, state, _ in seen):
                states.append((rule, "running", None))
            else:
                states.append((rule, next(state for _, state, _ in seen if state != "running"), None))
        for name, seen in by_name.items():  # removed rules some worker still drains
            rule = self._rules_seen.get(name)
            if name not in names and rule is not None and any(state == "draining" for _, state, _ in seen):
                names.add(name)
                states.append((rule, "draining", None))
        return states

    def close_listeners(self) -> None:
        """Stop: every worker closes its listeners and drains (SIGTERM)."""
        self.stopping = True
        if self._poller is not None:
            self._poller.kill()
        for worker in self.workers:
            worker.signal(signal.SIGTERM)

    def drain(self, timeout: float, force: Event | None = None) -> None:
        """Wait for the workers to exit: a second signal (``force``) is passed on
        (they stop at once); past the deadline and a grace, they are killed."""
        processes = [worker.process for worker in self.workers if worker.process is not None]
        waiter = gevent.spawn(lambda: [process.wait() for process in processes])
        waits: list = [waiter] + ([force] if force is not None else [])
        gevent.wait(waits, count=1, timeout=timeout)
        if not waiter.ready():
            for worker in self.workers:
                worker.signal(signal.SIGTERM)  # the second signal: stop now
            waiter.join(STOP_GRACE)
        if not waiter.ready():
            for worker in self.workers:
                worker.kill()
            waiter.join(STOP_GRACE)
        waiter.kill()

    def describe_workers(self) -> list[dict[str, Any]]:
        return [worker.describe() for worker in self.workers]

    # -- figures ---------------------------------------------------------------------

    def live(self) -> list[WorkerProcess]:
        return [worker for worker in self.workers if worker.state == "running"]

    def refresh(self) -> None:
        """Read every running worker's figures now: what an admin request or a stats
        record shows is then exact as of that request."""
        self.collect()

    def collect(self, connections: bool = False) -> list[tuple[WorkerProcess, dict[str, Any]]]:
        """Every running worker's figures, read now. With ``connections`` they carry
        the open connections (not kept: a busy worker's table is large and stale at once)."""
        live = self.live()
        fresh: dict[int, dict[str, Any]] = {}
        message = {"op": "report", "connections": connections}
        jobs = [gevent.spawn(worker.request, message) for worker in live]
        gevent.joinall(jobs)
        for worker, job in zip(live, jobs):
            answer = job.value
            if answer and answer.get("ok"):
                report = fresh[worker.index] = answer["report"]
                worker.report = {key: value for key, value in report.items() if key != "connections"}
        return [
            (worker, fresh.get(worker.index, worker.report)) for worker in live if worker.report is not None
        ]

    # -- processes -----------------------------------------------------------------------

    def _start_all(self) -> Changes:
        jobs = [gevent.spawn(self._start, worker) for worker in self.workers]
        gevent.joinall(jobs)
        self._poller = gevent.spawn(self._poll)
        for job in jobs:
            if job.value is not None:
                return job.value
        return Changes(added=[rule.name for rule in self.config.enabled_rules] if self.config else [])

    def _start(self, worker: WorkerProcess) -> Changes | None:
        """Start one worker with the current rules; watch it, restart it if it dies."""
        assert self.config is not None
        master_end, worker_end = socket.socketpair()
        command = [
            *self.command,
            "--worker-fd",
            str(worker_end.fileno()),
            "--worker-index",
            str(worker.index),
        ]
        try:
            process = gevent.subprocess.Popen(
                command,
                pass_fds=(worker_end.fileno(),),
                # Its own session: a Ctrl-C in the terminal reaches the master alone,
                # which then stops the workers once (a second signal would cut the drain).
                start_new_session=True,
                stdin=gevent.subprocess.DEVNULL,
            )
        except OSError as exc:
            master_end.close()
            worker_end.close()
            log_event(logger, logging.ERROR, "worker_failed", f"cannot start worker {worker.index}: {exc}")
            gevent.spawn_later(RESTART_MOST, self._restart, worker)
            return None
        worker_end.close()
        worker.process, worker.pid = process, process.pid
        worker.channel = Channel(master_end)
        worker.state, worker.report = "starting", None
        worker.started_at = time.time()
        gevent.spawn(self._monitor, worker, process)
        config = self.config
        message = {"op": "apply", "raw": encode_raw(config.raw), "path": config.path, "source": "start"}
        answer = worker.request(message, START_TIMEOUT)
        if answer is None or not answer.get("ok"):
            log_event(
                logger,
                logging.ERROR,
                "worker_failed",
                f"worker {worker.index} (pid {process.pid}) did not start",
                worker=worker.index,
                pid=process.pid,
                errors=(answer or {}).get("errors", []),
            )
            worker.kill()
            return None
        if process.returncode is None:
            worker.state = "running"
        while self.config is not config and worker.state == "running":
            # Rules applied while it started: apply() skipped it, as it was not running yet.
            config = self.config
            worker.request({"op": "apply", "raw": encode_raw(config.raw), "source": "master"}, START_TIMEOUT)
        log_event(
            logger,
            logging.INFO,
            "worker_started",
            f"worker {worker.index} started (pid {process.pid})",
            worker=worker.index,
            pid=process.pid,
            restarts=worker.restarts,
        )
        return Changes(**answer["changes"])

    def _monitor(self, worker: WorkerProcess, process: gevent.subprocess.Popen) -> None:
        code = process.wait()
        if worker.process is not process:
            return
        self.stats.retire(worker.report)
        worker.state, worker.report = "exited", None
        if worker.channel is not None:
            worker.channel.close()
            worker.channel = None
        if self.stopping:
            log_event(
                logger,
                logging.INFO,
                "worker_stopped",
                f"worker {worker.index} stopped",
                worker=worker.index,
                code=code,
            )
            return
        lived = time.time() - worker.started_at
        delay = (
            RESTART_FIRST
            if lived >= STABLE
            else min(RESTART_FIRST * 2 ** min(worker.restarts, 10), RESTART_MOST)
        )
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        log_event(
            logger,
            logging.ERROR,
            "worker_exited",
            f"worker {worker.index} (pid {process.pid}) exited unexpectedly ({how}); restarting in {delay:g}s",
            worker=worker.index,
            pid=process.pid,
            code=code,
            restart_in=delay,
        )
        gevent.spawn_later(delay, self._restart, worker)

    def _restart(self, worker: WorkerProcess) -> None:
        if self.stopping:
            return
        worker.restarts += 1
        self._start(worker)

    def _poll(self) -> None:
        while not self.stopping:
            gevent.sleep(POLL_INTERVAL)
            self.collect()


def worker_command(count: int, log_format: str | None, log_level: str | None) -> list[str]:
    """How the master starts a worker: this interpreter, this package."""
    command = [sys.executable, "-m", "gportmap", "--workers", str(count)]
    if log_format:
        command += ["--log-format", log_format]
    if log_level:
        command += ["--log-level", log_level]
    return command


def resolve_workers(value: int | str | None, cpu_count: Callable[[], int | None] = os.cpu_count) -> int:
    """``--workers``/``settings.workers`` as a count: "auto" is one per core."""
    if value is None:
        return 1
    if value == "auto":
        return max(1, cpu_count() or 1)
    return int(value)
