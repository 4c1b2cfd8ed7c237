"""``--workers N``: N processes share every listening port, one master watches them.

Each worker is an ordinary gportmap data path (supervisor, servers, relay) whose
listeners are bound with ``SO_REUSEPORT``, so the kernel spreads new connections
(and UDP clients, by address) over the workers. The master binds no rule port: it
reads and validates the rules file, starts the workers and restarts any that dies,
fans reloads out, and serves the admin endpoint and the stats log with the figures
of all workers summed.

The control plane is a socketpair the worker inherits, carrying length-prefixed
JSON messages (``Channel``) both ways:

- Requests from the master carry an id; the worker answers each with the same id,
  in any order, and several may be in flight. One reader greenlet at each end
  hands answers to their waiters by id: an answer that comes after its waiter gave
  up is dropped, never taken for another's. A slow answer never kills a worker.
- Every ``WorkerLink.push_interval`` the worker pushes its figures (its rules'
  counters and states) unasked. The push is also its heartbeat: the master kills and
  restarts a worker only when nothing at all came from it for
  ``WorkerPool.heartbeat_timeout``. ``/stats``, ``/metrics`` and ``/healthz`` read the
  last pushed figures; only ``/connections`` asks the workers, with a timeout.
- The master numbers every configuration it applies (generation 1, 2, ...). Every
  message from a worker says which generation it runs; a worker on another one (an
  apply that failed or timed out, a worker started during a reload) is sent the
  current rules again, with back-off, and logged as ``worker_resync``.
- A request that raises in the worker is answered as failed (``internal_error``
  logged with its traceback); the link goes on serving.
- Active health checks run in the master alone (``gportmap.runtime.health``): it
  sends each change of a target's state, unasked and unanswered, as ``Op.HEALTH``
  messages of at most ``WorkerPool.verdicts_per_message`` verdicts, and the whole
  state to a worker that starts or catches up (``health_state``); the worker's
  reader applies them in order (``apply_verdicts``).

The worker stops, draining its connections, when the master's end closes: a master
killed with SIGKILL leaves no orphan holding the ports.

An upgrade in place (``gportmap.runtime.upgrade``) asks each worker in turn to
re-execute itself (``Op.UPGRADE``; it comes back on the same channel, same PID,
``WorkerLink.resumed``, or says at once that it could not, ``Op.UPGRADE_FAILED``),
then re-executes the master, which adopts the running
workers (``WorkerPool.adopt``, ``AdoptedProcess``) instead of starting them. Before
it hands them on, the master waits (``WorkerPool.settle_timeout``) for workers
still starting or waiting for their restart, and stops (SIGKILL, reaped) those that
did not come up in time: the next master starts them, so no process is orphaned
and no slot gets two workers.

A live worker the master restarts *on purpose* is restarted the same way, so that
the restart loses nothing (``WorkerPool.restart_worker``): after the master's
pre-flight of the installed code, the worker re-executes itself in place (same
PID, ``Op.UPGRADE``), carrying its listeners, plain connections and UDP sessions
with their counters, a drainer finishing the rest. That happens to a worker still
on another generation after ``WorkerPool.resync_restart_after`` failed resyncs (a
fresh program applies the current rules where the old one kept failing), and when
asked for (``restart_worker``). A worker that stopped answering (the heartbeat) has
nothing to hand over: it is killed and started afresh.

``WorkerPool`` has the surface of ``Supervisor`` that ``Service`` and the run loop
use (``apply``, ``rule_states``, ``stats``, ``close_listeners``, ``drain``), so the
admin endpoint, metrics and stats log serve both modes unchanged.
"""

from __future__ import annotations

import base64
import binascii
import enum
import itertools
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
import gevent.subprocess
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore
from gevent.pool import Pool

from gportmap.config import Config, Rule
from gportmap.engine.pool import TargetPool, TargetState
from gportmap.errors import ConfigError, GportmapError
from gportmap.events import (
    InternalError,
    MasterBadMessage,
    MasterGone,
    WorkerAnswerLate,
    WorkerBadMessage,
    WorkerChannelError,
    WorkerConfigInvalid,
    WorkerExited,
    WorkerFailed,
    WorkerRequestLate,
    WorkerRestarted,
    WorkerRestartFailed,
    WorkerRestarting,
    WorkerResync,
    WorkersSettled,
    WorkerStarted,
    WorkerStopped,
    WorkerUnresponsive,
    WorkerUpgraded,
)
from gportmap.hubwork import in_slices
from gportmap.log import emit, get_logger
from gportmap.platform import raise_fd_limit
from gportmap.runtime.listeners import check_open_files
from gportmap.runtime.supervisor import Changes
from gportmap.stats import OpenTable, RuleStats, iso_time, open_entry

if TYPE_CHECKING:
    from gportmap.runtime.service import Service

logger = get_logger("workers")

#: A frame larger than this ends the channel: /connections of 10,000 connections
#: is about 2 MB, so this only stops a corrupted length from allocating gigabytes.
#: A sender refuses to send a larger message (``FrameTooLarge``) instead.
MAX_FRAME = 64 << 20


class ChannelError(GportmapError):
    """The master-worker channel broke (a truncated or oversized frame): nothing more
    can be read from it."""


class MalformedMessage(GportmapError):
    """One frame arrived whole but is no JSON object; the channel stays usable."""


class FrameTooLarge(GportmapError):
    """A message to send is over ``MAX_FRAME``: it is not sent, the channel stays usable."""


class BadRequest(GportmapError):
    """A request the worker cannot read (no id, an unknown op, a field of the wrong
    type); answered as failed, with its id when it has one."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class Op(enum.Enum):
    """What a message is: the master's requests, and the worker's unasked push."""

    APPLY = "apply"  #: master -> worker: run these rules (a generation)
    REPORT = "report"  #: master -> worker: your figures now (with the open connections on demand)
    PUSH = "push"  #: worker -> master: figures and generation, every push interval; the heartbeat
    UPGRADE = "upgrade"  #: master -> worker: upgrade in place now (the master checked the installed code)
    #: worker -> master, unasked: its upgrade in place did not happen (``reason``): the
    #: master stops waiting for it at once.
    UPGRADE_FAILED = "upgrade_failed"
    HEALTH = "health"  #: master -> worker, unanswered: targets' states by the master's checks (``Verdict``)


class RestartReason(enum.Enum):
    """Why the master restarts a live worker in place (``WorkerPool.restart_worker``)."""

    #: Still on another rules generation after ``resync_restart_after`` failed resyncs.
    GENERATION = "generation"
    #: Asked for (an operator, a test).
    OPERATOR = "operator"


class Listing(enum.Enum):
    """What a report request asks of the worker's open connections (``/connections``)."""

    NONE = "none"
    #: The ``OpenRow``s, a JSON array each, in the answer's ``connection_rows``
    #: (beside the report, which the master keeps as the worker's last figures),
    #: encoded in slices (``Channel.send``); the master makes the entries in a
    #: thread. What this version's master asks for (``"connections": "rows"``).
    ROWS = "rows"
    #: The entries themselves, in the report's ``connections``: what a master of an
    #: earlier version asks for (``"connections": true``) while an upgrade hands the
    #: workers on before it.
    ENTRIES = "entries"

    @classmethod
    def from_wire(cls, value: Any) -> Listing:
        if value == cls.ROWS.value:
            return cls.ROWS
        return cls.ENTRIES if value else cls.NONE


class WorkerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"


class Channel:
    """Length-prefixed JSON messages over a stream socket.

    Any greenlet may send: a lock keeps frames whole and in order. One greenlet
    reads (the reader of its end). A frame is never cut by a timeout: callers that
    must not wait send from a greenlet of their own (``WorkerProcess.request``)."""

    #: Items of a long top-level list encoded between two yields to the hub: 15,000
    #: open connections in one ``json.dumps`` would hold every connection of the
    #: worker for about 15 ms; 500 rows are about half a millisecond.
    encode_slice = 500

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = Semaphore()
        #: A frame's header was read and its body not yet: an upgrade in place waits
        #: for it (the next program would start reading in the middle of a frame).
        self.reading_frame = False

    def hold(self) -> None:
        """Wait for a message being encoded or sent to be sent whole, then let no
        one send: the channel is handed to the next program (``release`` if that
        fails)."""
        self._send_lock.acquire()

    def release(self) -> None:
        self._send_lock.release()

    def send(self, message: dict[str, Any]) -> None:
        """Send one message whole; FrameTooLarge (nothing sent) past ``MAX_FRAME``.
        A top-level list longer than ``encode_slice`` (a worker's open connections)
        is encoded in slices, with a yield to the hub between two. It is encoded
        under the send lock: ``hold`` (an upgrade in place) waits for a message
        being encoded to be sent whole, as for one being written, instead of the
        exec dropping it."""
        with self._send_lock:
            body = _encode(message, self.encode_slice)
            if len(body) > MAX_FRAME:
                raise FrameTooLarge(f"a message of {len(body)} bytes is over the limit of {MAX_FRAME}")
            self.sock.sendall(struct.pack("!I", len(body)) + body)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the other end closed between messages.
        MalformedMessage: this frame is no JSON object (the next one can be read)."""
        header = self._exactly(4)
        if header is None:
            return None
        (size,) = struct.unpack("!I", header)
        if size > MAX_FRAME:
            raise ChannelError(f"frame of {size} bytes is over the limit of {MAX_FRAME}")
        self.reading_frame = True
        try:
            body = self._exactly(size) if size else b""
        finally:
            self.reading_frame = False
        if body is None:
            raise ChannelError("the channel closed inside a frame")
        try:
            message = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise MalformedMessage(f"a frame of {size} bytes that is no JSON: {str(exc)[:100]}") from None
        if not isinstance(message, dict):
            raise MalformedMessage(f"a frame of {size} bytes that is no JSON object")
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


#: The key of a report answer's open connections (``Listing.ROWS``).
ROWS_KEY = "connection_rows"
_COMPACT = (",", ":")


def _encode(message: dict[str, Any], slice_size: int) -> bytes:
    """``message`` as compact JSON, byte for byte what ``json.dumps`` makes of it,
    with each top-level list longer than ``slice_size`` encoded a slice at a time
    (the C encoder, a yield to the hub between two slices)."""
    if not any(isinstance(value, list) and len(value) > slice_size for value in message.values()):
        return json.dumps(message, separators=_COMPACT).encode()
    pieces = []
    for key, value in message.items():
        name = json.dumps(key)
        if isinstance(value, list) and len(value) > slice_size:
            items = []
            for start in range(0, len(value), slice_size):
                if start:
                    gevent.sleep(0)
                items.append(json.dumps(value[start : start + slice_size], separators=_COMPACT)[1:-1])
            pieces.append(f"{name}:[{','.join(items)}]")
        else:
            pieces.append(f"{name}:{json.dumps(value, separators=_COMPACT)}")
    return ("{" + ",".join(pieces) + "}").encode()


def encode_raw(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_raw(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _int_field(message: dict[str, Any], name: str) -> int | None:
    """An integer field of a message, or None (bools are not integers here)."""
    value = message.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Verdict:
    """A target's state by the active checks, as the master's one prober decided
    it, for the workers' pools (``Op.HEALTH``). A target is known by (rule, host,
    port), as a reload knows it."""

    rule: str
    host: str
    port: int
    up: bool
    error: str | None = None
    #: time.time() of the check that decided it.
    at: float | None = None

    #: Characters of ``error`` sent at most: a message's size stays bounded.
    error_limit = 200

    def to_wire(self) -> list[Any]:
        error = self.error[: self.error_limit] if self.error is not None else None
        return [self.rule, self.host, self.port, self.up, error, self.at]

    @classmethod
    def from_wire(cls, item: object) -> Verdict | None:
        """The verdict in one entry of a message; None when it is malformed."""
        if not isinstance(item, list) or len(item) != 6:
            return None
        rule, host, port, up, error, at = item
        if not (isinstance(rule, str) and isinstance(host, str) and isinstance(up, bool)):
            return None
        if not isinstance(port, int) or isinstance(port, bool) or not (error is None or isinstance(error, str)):
            return None
        if at is not None and (not isinstance(at, (int, float)) or isinstance(at, bool)):
            return None
        return cls(rule, host, port, up, error, at)


def apply_verdicts(service: Service, verdicts: list[Verdict]) -> int:
    """Give the master's verdicts to this worker's pools (``TargetState.set_checked``);
    a rule or target this worker does not have (a reload not applied here yet) is
    skipped. The number applied."""
    pools = {
        stats.name: stats.pool for stats in service.supervisor.stats.rules() if isinstance(stats.pool, TargetPool)
    }
    indexes: dict[str, dict[tuple[str, int], TargetState]] = {}
    applied = 0
    for verdict in verdicts:
        index = indexes.get(verdict.rule)
        if index is None:
            pool = pools.get(verdict.rule)
            index = indexes[verdict.rule] = {t.key: t for t in pool.targets} if pool is not None else {}
        target = index.get((verdict.host, verdict.port))
        if target is not None:
            target.set_checked(verdict.up, verdict.error, verdict.at)
            applied += 1
    return applied


# -- the worker's end ------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A request from the master, as the worker reads it."""

    id: int
    op: Op
    #: apply: the configuration's generation, its rules file bytes and path.
    generation: int = 0
    raw: bytes = field(default=b"", repr=False)
    path: str = ""
    #: report: with the open connections, and in which form.
    listing: Listing = Listing.NONE

    @classmethod
    def parse(cls, message: dict[str, Any]) -> Request:
        """The request in ``message``; BadRequest says what is wrong with it."""
        request_id = _int_field(message, "id")
        if request_id is None:
            raise BadRequest("a request without an integer id")
        try:
            op = Op(message.get("op"))
        except ValueError:
            raise BadRequest(f"unknown request {str(message.get('op'))[:100]!r}", request_id) from None
        if op is Op.REPORT:
            return cls(request_id, op, listing=Listing.from_wire(message.get("connections")))
        if op is Op.UPGRADE:
            return cls(request_id, op)
        if op is not Op.APPLY:
            raise BadRequest(f"unknown request {op.value!r}", request_id)
        generation = _int_field(message, "generation")
        if generation is None or generation < 1:
            raise BadRequest("an apply without a generation number", request_id)
        raw, path = message.get("raw"), message.get("path", "")
        if not isinstance(raw, str) or not isinstance(path, str):
            raise BadRequest("an apply whose raw or path is not a string", request_id)
        try:
            data = decode_raw(raw)
        except (binascii.Error, ValueError):
            raise BadRequest("an apply whose raw is not base64", request_id) from None
        return cls(request_id, op, generation, data, path)


class WorkerLink:
    """A worker's end of the channel: its first configuration, then requests, and its
    figures pushed every ``push_interval``."""

    #: Seconds between two pushes of this worker's figures to the master. The push is
    #: the heartbeat (``WorkerPool.heartbeat_timeout``), and how fresh the master's
    #: /stats, /metrics and /healthz are.
    push_interval = 0.5
    #: Requests answered at once (an apply waits for the applier); the next ones
    #: wait in the channel. The master has few in flight: its applies and /connections.
    max_concurrent = 32

    def __init__(self, channel: Channel, index: int) -> None:
        self.channel = channel
        self.index = index
        #: The generation whose rules run here, and the one being applied (or None).
        self.applied = 0
        self.applying: int | None = None
        #: The newest generation handed to the service: an older one arriving after
        #: it (a resync that crossed a reload) is not applied over it.
        self._submitted = 0
        self._first: Request | None = None
        self._resumed = False
        #: Runs an upgrade in place of this worker (``Op.UPGRADE``); set by the run loop.
        #: Returns only if the upgrade did not happen: why (or None: logged only).
        self.on_upgrade: Callable[[], str | None] | None = None
        self.greenlet: gevent.Greenlet | None = None
        self._last_report: dict[str, Any] | None = None

    def resumed(self, generation: int) -> None:
        """This worker was upgraded in place (``gportmap.runtime.upgrade``): it runs
        the rules of ``generation`` already, and the master sent no first
        configuration to this program; it pushes its figures at once instead."""
        self.applied = self._submitted = generation
        self._resumed = True

    def first_config(self) -> tuple[bytes, str]:
        """(rules file bytes, path) the master validated; the worker starts with them."""
        message = self.channel.recv()
        request = Request.parse(message) if message is not None else None
        if request is None or request.op is not Op.APPLY:
            raise ChannelError("the master sent no configuration")
        self._first = request
        self.applying = self._submitted = request.generation
        return request.raw, request.path

    def serve(self, service: Service, changes: Changes, stop: Event) -> gevent.Greenlet:
        """Answer the first configuration (the rules are started), then push the
        figures and answer every request, until the master's end closes: then
        ``stop`` is set."""
        self.greenlet = gevent.spawn(self._serve, service, changes, stop)
        return self.greenlet

    def detach(self) -> None:
        """In the drainer of an upgrade in place (a copy of this worker): the
        channel is the upgraded worker's now. Stop serving it, without taking its
        closing for the master's end (which would stop the drainer at once)."""
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
        self.channel.close()

    def _serve(self, service: Service, changes: Changes, stop: Event) -> None:
        first = self._first
        assert first is not None or self._resumed, "first_config() comes first"
        pusher: gevent.Greenlet | None = None
        try:
            if first is not None:
                self.applied, self.applying = first.generation, None
                self._send_answer(
                    first.id, {"ok": True, "changes": changes.as_fields(), "pid": os.getpid()}, service
                )
            pusher = gevent.spawn(self._push_loop, service)
            self._read_loop(service)
        except (OSError, ChannelError) as exc:
            emit(logger, WorkerChannelError(error=str(exc)))
        finally:
            if pusher is not None:
                pusher.kill(block=False)
        if not stop.is_set():
            emit(logger, MasterGone())
            stop.set()

    def _read_loop(self, service: Service) -> None:
        """Hand every request to a greenlet of its own, in arrival order, until the
        master's end closes."""
        pool = Pool(self.max_concurrent)
        while True:
            try:
                message = self.channel.recv()
            except MalformedMessage as exc:
                emit(logger, MasterBadMessage(what=f"a message from the master was dropped: {exc}"))
                continue
            if message is None:
                return
            if message.get("op") == Op.HEALTH.value:
                self._health(service, message)  # here, in order: the last verdict is the one that holds
                continue
            pool.spawn(self._handle, service, message)

    def _health(self, service: Service, message: dict[str, Any]) -> None:
        """The master's verdicts (``Op.HEALTH``): applied, not answered."""
        items = message.get("verdicts")
        verdicts = [v for v in map(Verdict.from_wire, items if isinstance(items, list) else []) if v is not None]
        if not isinstance(items, list) or len(verdicts) != len(items):
            emit(logger, MasterBadMessage(what="a health message from the master had malformed entries: they were dropped"))
        try:
            apply_verdicts(service, verdicts)
        except Exception as exc:  # noqa: BLE001 - a bug: logged, the link goes on
            event = InternalError(error=repr(exc)[:200], what="applying the master's health verdicts raised")
            emit(logger, event, exc_info=exc)

    def _handle(self, service: Service, message: dict[str, Any]) -> None:
        """Answer one request, whatever happens while answering it."""
        request_id = _int_field(message, "id")
        try:
            request = Request.parse(message)
            answer = self._answer(service, request)
        except BadRequest as exc:
            emit(logger, MasterBadMessage(what=f"a request from the master was refused: {exc}"))
            answer = {"ok": False, "errors": [str(exc)]}
        except Exception as exc:  # a bug: answered and logged, the link goes on
            event = InternalError(
                request=str(message.get("op"))[:50],
                error=repr(exc)[:200],
                what="answering the master raised: the request failed, the link goes on",
            )
            emit(logger, event, exc_info=exc)
            answer = {"ok": False, "errors": [f"internal error: {exc!r}"[:300]]}
        try:
            self._send_answer(request_id, answer)
        except (OSError, ChannelError):
            return  # the channel broke: the reader sees it and stops the worker
        if message.get("op") == Op.UPGRADE.value and answer.get("ok") and self.on_upgrade is not None:
            reason = self.on_upgrade()  # returns only if this worker was not upgraded (logged why)
            try:  # the master waits for this worker to come back: it is told at once instead
                self.channel.send({"op": Op.UPGRADE_FAILED.value, "generation": self.applied,
                                   "reason": (reason or "see this worker's upgrade_failed record")[:1000]})
            except (OSError, ChannelError):
                return

    def _answer(self, service: Service, request: Request) -> dict[str, Any]:
        if request.op is Op.REPORT:
            report = service.worker_report()
            if request.listing is Listing.ENTRIES:
                report["connections"] = [open_entry(row) for row in in_slices(service.open_rows(), Channel.encode_slice)]
            answer = {"ok": True, "report": report}
            if request.listing is Listing.ROWS:
                answer[ROWS_KEY] = service.open_rows()  # a long top-level list: Channel.send encodes it in slices
            return answer
        if request.op is Op.UPGRADE:
            if self.on_upgrade is None:
                return {"ok": False, "errors": ["this worker cannot upgrade in place"]}
            return {"ok": True}  # _handle starts it once this answer is sent
        return self._apply(service, request)

    def _apply(self, service: Service, request: Request) -> dict[str, Any]:
        """Apply one generation's rules, unless it runs already or a newer one came
        first; the answer carries the figures as they are after it."""
        generation = request.generation
        if generation <= self.applied:
            return {"ok": True, "changes": Changes().as_fields()}
        if generation < self._submitted:
            return {
                "ok": False,
                "errors": [f"generation {generation} is older than {self._submitted}, applied next"],
            }
        self._submitted = self.applying = generation
        try:
            changes = service.apply_raw(request.raw, "master")
        except ConfigError as exc:
            return {"ok": False, "errors": list(exc.errors)}
        finally:
            if self.applying == generation:
                self.applying = None
        self.applied = max(self.applied, generation)
        return {"ok": True, "changes": changes.as_fields(), "report": service.worker_report()}

    def _send_answer(
        self, request_id: int | None, answer: dict[str, Any], service: Service | None = None
    ) -> None:
        """Send an answer with its id and this worker's generation; one that cannot be
        sent as it is (a bug, or over MAX_FRAME) is answered as failed instead."""
        answer = {**answer, "id": request_id, "generation": self.applied}
        if service is not None:
            answer["report"] = service.worker_report()
        try:
            self.channel.send(answer)
        except (TypeError, ValueError, FrameTooLarge) as exc:
            emit(logger, InternalError(error=repr(exc)[:200], what=f"an answer to the master cannot be sent: {exc!s:.200}"))
            self.channel.send(
                {"id": request_id, "generation": self.applied, "ok": False, "errors": [str(exc)[:300]]}
            )

    def _push_loop(self, service: Service) -> None:
        """Push the figures (the heartbeat) now and every ``push_interval``; a push
        whose figures cannot be built still goes, without them."""
        failing = False
        while True:
            try:
                self._push(service)
                failing = False
            except (OSError, ChannelError):
                return  # the channel broke: the reader sees it too and stops the worker
            except Exception as exc:  # a bug: logged once per run of failures, the heartbeat goes on
                if not failing:
                    event = InternalError(
                        error=repr(exc)[:200], what="the figures for the master cannot be built: pushing the heartbeat alone"
                    )
                    emit(logger, event, exc_info=exc)
                failing = True
                try:
                    self.channel.send(self._push_message())
                except (OSError, ChannelError):
                    return
            gevent.sleep(self.push_interval)

    def _push(self, service: Service) -> None:
        """One push; the figures are left out when they are those sent last."""
        message = self._push_message()
        report = service.worker_report()
        if report != self._last_report:
            message["report"] = report
        self.channel.send(message)
        self._last_report = report

    def _push_message(self) -> dict[str, Any]:
        return {"op": Op.PUSH.value, "generation": self.applied, "applying": self.applying}


# -- the master's side -----------------------------------------------------------------


class AdoptedProcess:
    """A worker process this master did not start: started by the program it was
    before an upgrade in place (same PID, so still its child). The part of
    ``Popen`` the pool uses; its end is found by polling ``waitpid``."""

    #: Seconds between two looks for its end.
    poll_interval = 0.2

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by another waiter: its status is lost
                done, status = self.pid, 0
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            gevent.sleep(self.poll_interval)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)


@dataclass(frozen=True)
class HandedWorker:
    """A worker as an upgrade of the master hands it to the next program."""

    index: int
    pid: int
    fd: int  #: the master's end of its channel, kept open across the exec
    restarts: int
    started_at: float
    generation: int
    report: dict[str, Any] | None


class WorkerProcess:
    """One worker as the master sees it: its process, channel, requests in flight,
    last figures and generation."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: gevent.subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.reader: gevent.Greenlet | None = None
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.started_at = 0.0
        self.restarts = 0
        #: Its last figures (pushed, or in an answer), without open connections.
        self.report: dict[str, Any] | None = None
        #: The generation it said it runs, and the one it said it applies.
        self.generation = 0
        self.applying: int | None = None
        #: time.monotonic() of the last message from it: the heartbeat.
        self.heard_at = 0.0
        self.killed = False
        #: Applies sent and not answered yet (no resync meanwhile), and the resync back-off.
        self.applies_in_flight = 0
        self.resync_at = 0.0
        self.resync_delay = 0.0
        #: A send of the master's health verdicts is under way; verdicts came while
        #: it was (the whole state is sent once it ends).
        self.health_sending = False
        self.health_behind = False
        #: Why its last upgrade in place did not happen, as it said (``Op.UPGRADE_FAILED``).
        self.upgrade_error: str | None = None
        #: Resyncs in a row that failed (``WorkerPool.resync_restart_after``).
        self.resync_failures = 0
        #: Restarts in place on purpose (``WorkerPool.restart_worker``): same PID.
        self.restarts_in_place = 0
        self._pending: dict[int, AsyncResult] = {}
        self._ids = itertools.count(1)

    def attach(self, process: gevent.subprocess.Popen, channel: Channel) -> None:
        """A new process for this worker: everything known of the last one is dropped."""
        self.process, self.pid, self.channel = process, process.pid, channel
        self.state, self.report, self.killed = WorkerState.STARTING, None, False
        self.generation, self.applying, self.applies_in_flight = 0, None, 0
        self.resync_at, self.resync_delay, self.resync_failures = 0.0, 0.0, 0
        self.health_sending = self.health_behind = False
        self.started_at, self.heard_at = time.time(), time.monotonic()

    def detach(self) -> None:
        """Its process is gone: close the channel, answer every waiter with None."""
        self.state, self.report = WorkerState.EXITED, None
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.set(None)

    def request(self, op: Op, fields: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Send one request and wait up to ``timeout`` for its answer; None if none
        came (logged). A late answer is dropped when it comes; nobody is killed."""
        channel = self.channel
        if channel is None:
            return None
        request_id = next(self._ids)
        waiter = AsyncResult()
        self._pending[request_id] = waiter
        # Its own greenlet: the frame goes whole even if this caller stops waiting.
        gevent.spawn(self._send, channel, {"id": request_id, "op": op.value, **fields}, waiter)
        try:
            return waiter.get(timeout=timeout)
        except gevent.Timeout:
            emit(
                logger,
                WorkerRequestLate(
                    worker=self.index, pid=self.pid, request=op.value, timeout=timeout, generation=fields.get("generation")
                ),
            )
            return None
        finally:
            self._pending.pop(request_id, None)

    @staticmethod
    def _send(channel: Channel, message: dict[str, Any], waiter: AsyncResult) -> None:
        try:
            channel.send(message)
        except (OSError, ChannelError, FrameTooLarge):
            if not waiter.ready():
                waiter.set(None)  # the process is going: its monitor restarts it

    def receive(self, message: dict[str, Any]) -> None:
        """One message from the worker: note the heartbeat, its generation and
        figures; hand an answer to its waiter (a late one is dropped)."""
        self.heard_at = time.monotonic()
        generation = _int_field(message, "generation")
        if generation is not None:
            self.generation = max(self.generation, generation)  # never goes back within one process
        report = message.get("report")
        if isinstance(report, dict):
            self.report = {key: value for key, value in report.items() if key != "connections"}
        if message.get("op") == Op.PUSH.value:
            self.applying = _int_field(message, "applying")
            return
        if message.get("op") == Op.UPGRADE_FAILED.value:
            self.upgrade_error = str(message.get("reason"))[:1000]
            return
        request_id = _int_field(message, "id")
        waiter = self._pending.pop(request_id, None) if request_id is not None else None
        if waiter is None:
            emit(logger, WorkerAnswerLate(worker=self.index, request_id=request_id))
            return
        waiter.set(message)

    def silent_for(self) -> float:
        """Seconds since the last message from this worker."""
        return time.monotonic() - self.heard_at

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except OSError:
                pass

    def kill(self) -> None:
        self.killed = True
        self.signal(signal.SIGKILL)

    def describe(self) -> dict[str, Any]:
        report = self.report or {}
        running = self.state is WorkerState.RUNNING
        return {
            "index": self.index,
            "pid": self.pid,
            "state": self.state.value,
            "restarts": self.restarts,
            "restarts_in_place": self.restarts_in_place,
            "uptime": round(time.time() - self.started_at, 3) if running else 0.0,
            "generation": self.generation,
            "silent_for": round(self.silent_for(), 3) if running else None,
            "connections_active": report.get("active", 0),
            "connections_total": sum(rule.get("total", 0) for rule in report.get("rules", {}).values()),
        }


def _changes_of(answer: dict[str, Any]) -> Changes | None:
    """The Changes in a worker's answer to an apply (None if it has none)."""
    fields = answer.get("changes")
    if not isinstance(fields, dict):
        return None
    return Changes(
        **{name: list(fields.get(name, [])) for name in ("added", "changed", "removed", "unchanged")}
    )


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

    @property
    def process_limit(self) -> int:
        """The connections the live workers may hold together: each one's share of
        ``maxConnections`` within its own open-file limit, summed."""
        return sum(worker.report.get("cap", 0) for worker in self.pool.live() if worker.report)

    def rule(self, name: str, protocol: str) -> RuleStats:
        total = RuleStats(name, protocol)
        retired = self.retired.get(name)
        if retired is not None:
            total.add(retired.counters(), gauges=False)
        for worker in self.pool.live():
            counters = (worker.report or {}).get("rules", {}).get(name)
            if counters is not None:
                total.add(counters)
        checks = self.pool.checks_of(name) if self.pool.checks_of is not None else None
        if checks and total.remote_targets:
            # Workers hear of a target's state when it changes; the master knows its last check.
            for target, entry in total.remote_targets.items():
                at, error = checks.get(target, (None, None))
                if at is not None:
                    entry["last_check"], entry["last_error"] = iso_time(at), error
        return total

    def retire(self, report: dict[str, Any] | None) -> None:
        """Keep the totals of a worker that has exited."""
        for name, counters in (report or {}).get("rules", {}).items():
            self.retired.setdefault(name, RuleStats(name, "")).add(counters, gauges=False)

    def open_tables(self) -> list[OpenTable]:
        return self.pool.open_tables()


class WorkerPool:
    """The master's stand-in for a ``Supervisor``: the same surface, carried out by
    worker processes (see the module docstring)."""

    #: Seconds a worker has to start its rules and answer its first configuration;
    #: past this it is killed and started again (with the restart back-off).
    start_timeout = 30.0
    #: Seconds a reload waits for each worker to confirm the new rules. A worker that
    #: has not is left to catch up: its later messages say which generation it runs,
    #: and it is sent the rules again if it is not the current one.
    apply_timeout = 10.0
    #: Seconds ``/connections`` waits for each worker's table; a worker that has not
    #: answered by then is left out of that answer (``worker_request_late``).
    request_timeout = 5.0
    #: Seconds without any message from a running worker (it pushes every
    #: ``WorkerLink.push_interval``) before it is taken as hung, killed (SIGKILL) and
    #: restarted. A slow answer alone never kills.
    heartbeat_timeout = 30.0
    #: Seconds between two looks at every worker's heartbeat.
    heartbeat_check = 1.0
    #: Resync back-off: a worker on the wrong generation is sent the current rules at
    #: once, then after 1 s, doubling up to 30 s while it stays behind.
    resync_first, resync_most = 1.0, 30.0
    #: Failed resyncs in a row (its apply failed or timed out) after which a worker
    #: still on the wrong generation is restarted in place, carrying its connections
    #: (``restart_worker``): the fresh program (started from the rules it ran) is
    #: sent the current ones at once, without the old process's state that made
    #: them fail. The back-off goes on across it: a worker that fails again is
    #: restarted again after as many more failed resyncs, further apart each time
    #: (once the back-off is at ``resync_most``, one restart per 90 s at most).
    resync_restart_after = 3
    #: Seconds an upgrade of the master waits, before it hands its workers on, for
    #: workers starting or restarting to come up (a start is about a second, a
    #: restart's back-off up to ``restart_most``); those still starting then are
    #: stopped and the upgraded master starts them.
    settle_timeout = 15.0
    #: Restart back-off: a worker that dies soon after starting is restarted after
    #: 0.5 s, doubling up to 10 s; one that ran for ``stable`` seconds starts over at 0.5 s.
    restart_first, restart_most, stable = 0.5, 10.0, 30.0
    #: Seconds after the drain deadline before a worker that has not exited is killed.
    stop_grace = 5.0
    #: Seconds the monitor of an exited worker waits to read what it sent last.
    last_words = 1.0
    #: Target verdicts per ``Op.HEALTH`` message at most (each is under 300 bytes):
    #: the whole state of many targets goes as several bounded messages.
    verdicts_per_message = 256

    def __init__(self, count: int, command: list[str]) -> None:
        self.count = count
        self.command = command
        self.workers = [WorkerProcess(index) for index in range(count)]
        self.stats = AggregateStats(self)
        self.config: Config | None = None
        #: The number of the configuration applied last (1 for the first).
        self.generation = 0
        self.stopping = False
        self._rules_seen: dict[str, Rule] = {}
        self._watchdog: gevent.Greenlet | None = None
        #: The workers were handed over by the program this master was before an
        #: upgrade in place: the first apply sends them the rules, starts none.
        self._adopted = False
        #: Every target's state by the master's checks (set by the master's
        #: ``HealthProber``): what a worker is sent when it starts or catches up.
        self.health_state: Callable[[], list[Verdict]] | None = None
        #: The master's last check of each target of a rule, by target name:
        #: (time.time(), last error), for ``/stats`` (set by the same prober).
        self.checks_of: Callable[[str], dict[str, tuple[float | None, str | None]]] | None = None
        #: The pre-flight of the installed code (set by the master's ``Upgrader``):
        #: None when it can take over from this program, else why not. A restart in
        #: place runs it first (None here: restarts go ahead unchecked).
        self.installed_check: Callable[[], str | None] | None = None
        #: Held by whatever hands workers over (an upgrade of the master, a restart
        #: in place): one at a time.
        self.handing = Semaphore()
        #: An upgrade of the master is handing the workers on: no worker is started
        #: meanwhile (``_restart`` waits; ``thaw`` if the upgrade does not happen).
        self.frozen = False
        #: Worker processes being spawned right now (``_start``).
        self._spawning = 0
        #: The open-file limit every worker runs with: the master raises its own soft
        #: limit here, as a single process does, and the workers inherit it (None:
        #: unlimited). ``apply`` refuses a version whose listeners do not fit it
        #: before any worker sees it (``check_open_files``, as each worker checks).
        self.open_files = raise_fd_limit()

    # -- upgrade in place ------------------------------------------------------------

    #: Seconds one worker has to come back upgraded: its hand-over's own bounded waits
    #: (its logs flushed, 2 s; a channel frame arriving, 2 s; its drainer letting go,
    #: ``Upgrader.release_timeout``) and its new program's start (about a second, a
    #: few on a loaded host). Its pre-flight is the master's; a hand-over that fails
    #: says so at once (``Op.UPGRADE_FAILED``): this bounds only one that hangs.
    upgrade_timeout = 15.0

    def upgrade_workers(self) -> str | None:
        """Upgrade every running worker in place, one at a time (``Op.UPGRADE``; each
        carries its own listeners and connections): None when all came back, else
        why not (the workers upgraded so far stay upgraded)."""
        for worker in list(self.live()):
            pid = worker.pid
            error = self._upgrade_one(worker)
            if error is not None:
                return error
            emit(logger, WorkerUpgraded(worker=worker.index, pid=pid))
        return None

    def _upgrade_one(self, worker: WorkerProcess) -> str | None:
        """Have one running worker re-execute itself in place, carrying its
        listeners and connections (``Op.UPGRADE``), and wait for it to report from
        its new program: None when it did, else why not (it serves on as it was)."""
        boot = (worker.report or {}).get("boot")
        pid = worker.pid
        worker.upgrade_error = None
        answer = worker.request(Op.UPGRADE, {}, self.request_timeout)
        if answer is None or not answer.get("ok"):
            errors = "; ".join((answer or {}).get("errors", [])) or "no answer"
            return f"worker {worker.index} (pid {pid}) refused to upgrade: {errors}"
        deadline = time.monotonic() + self.upgrade_timeout
        while (worker.report or {}).get("boot") == boot:
            if worker.pid != pid or worker.state is not WorkerState.RUNNING:
                return f"worker {worker.index} (pid {pid}) exited during its upgrade"
            if worker.upgrade_error is not None:
                return f"worker {worker.index} (pid {pid}) could not upgrade: {worker.upgrade_error}"
            if time.monotonic() > deadline:
                return f"worker {worker.index} (pid {pid}) did not come back within {self.upgrade_timeout:g}s"
            gevent.sleep(0.05)
        return None

    def restart_worker(self, index: int, reason: RestartReason = RestartReason.OPERATOR) -> str | None:
        """Restart live worker ``index`` on purpose without losing a connection: the
        pre-flight of the installed code (``installed_check``), then the worker
        re-executes itself in place (``_upgrade_one``): same PID, its listeners,
        plain connections and UDP sessions carried with its counters, the rest
        finishing in a drainer. None when it is done, else why not (logged; the
        worker serves on as it was). A restart while another hand-over (an
        upgrade, another restart) is under way is refused, not queued."""
        if not 0 <= index < self.count:
            return f"there is no worker {index}: the workers are 0 to {self.count - 1}"
        worker = self.workers[index]
        pid = worker.pid

        def failed(error: str) -> str:
            emit(logger, WorkerRestartFailed(worker=index, pid=pid, reason=reason.value, error=error))
            return error

        if self.stopping:
            return failed("gportmap is stopping")
        if worker.state is not WorkerState.RUNNING or worker.channel is None:
            return failed(f"worker {index} is not running (starting, or waiting for its restart)")
        if not self.handing.acquire(blocking=False):
            return failed("an upgrade or another restart in place is under way")
        try:
            emit(logger, WorkerRestarting(worker=index, pid=pid or 0, reason=reason.value,
                                          generation=worker.generation, wanted=self.generation))
            if self.installed_check is not None:
                error = self.installed_check()
                if error is not None:
                    return failed(f"the installed gportmap cannot take over: {error}")
            if worker.pid != pid or worker.state is not WorkerState.RUNNING:
                return failed(f"worker {index} exited meanwhile")
            error = self._upgrade_one(worker)
            if error is not None:
                return failed(error)
            worker.restarts_in_place += 1
            worker.resync_at = 0.0  # the current rules at once (the back-off delay goes on growing)
            emit(logger, WorkerRestarted(worker=index, pid=pid or 0, reason=reason.value))
        finally:
            self.handing.release()
        self._check_generation(worker)
        return None

    def settle(self) -> None:
        """Before an upgrade of this master hands its workers on: wait up to
        ``settle_timeout`` for every worker to run, then freeze (no worker starts
        until ``thaw``) and stop those still starting, waiting until they are
        reaped: the next master starts them (its first apply starts every worker
        it was not handed), so none is orphaned and no slot runs two."""
        began = time.monotonic()
        deadline = began + self.settle_timeout
        waited = False
        while not self.stopping and not all(self._running(worker) for worker in self.workers):
            waited = True
            if time.monotonic() >= deadline:
                break
            gevent.sleep(0.05)
        self.frozen = True
        end = time.monotonic() + self.stop_grace
        while self._spawning and time.monotonic() < end:  # a spawn under way: its process is seen next
            gevent.sleep(0.02)
        stopped = []
        for worker in self.workers:
            process = worker.process
            if worker.state is WorkerState.STARTING and process is not None and process.poll() is None:
                worker.kill()
                stopped.append(worker.index)
                end = time.monotonic() + self.stop_grace
                while process.poll() is None and time.monotonic() < end:
                    gevent.sleep(0.02)
        if waited or stopped:
            emit(logger, WorkersSettled(waited=round(time.monotonic() - began, 3), stopped=stopped))

    def thaw(self) -> None:
        """The upgrade did not happen: workers start again (those waiting do, at their next try)."""
        self.frozen = False

    @staticmethod
    def _running(worker: WorkerProcess) -> bool:
        process = worker.process
        return worker.state is WorkerState.RUNNING and process is not None and process.poll() is None

    def hand_over(self) -> list[HandedWorker]:
        """The running workers for the next program of this master; their channels
        are made inheritable (``undo_hand_over`` if the exec does not happen)."""
        handed = []
        for worker in self.workers:
            if worker.state is not WorkerState.RUNNING or worker.channel is None or worker.pid is None:
                continue  # stopped or gone (``settle`` stopped those still starting): the next master starts it
            fd = worker.channel.sock.fileno()
            os.set_inheritable(fd, True)
            handed.append(HandedWorker(worker.index, worker.pid, fd, worker.restarts, worker.started_at,
                                       worker.generation, worker.report))
        return handed

    def adopt(self, handed: list[HandedWorker], generation: int, retired: dict[str, dict[str, Any]]) -> None:
        """Before the first apply: the workers the program before this one ran (a
        worker it did not hand over is started by the first apply, as usual)."""
        self._adopted = True
        self.generation = generation
        for name, counters in retired.items():
            self.stats.retired.setdefault(name, RuleStats(name, "")).add(counters, gauges=False)
        for item in handed:
            if not 0 <= item.index < self.count:
                continue
            worker = self.workers[item.index]
            sock = socket.socket(fileno=item.fd)
            os.set_inheritable(item.fd, False)
            process = AdoptedProcess(item.pid)
            worker.attach(process, Channel(sock))  # type: ignore[arg-type]
            worker.state, worker.restarts, worker.started_at = WorkerState.RUNNING, item.restarts, item.started_at
            worker.generation, worker.report = item.generation, item.report
            worker.reader = gevent.spawn(self._read, worker, worker.channel)
            gevent.spawn(self._monitor, worker, process)

    # -- the Supervisor surface ----------------------------------------------------

    def apply(self, config: Config) -> Changes:
        """Start the workers (first call) or hand them the new rules, as the next
        generation; the changes are those the workers report (they are identical:
        same rules, same old rules)."""
        check_open_files(config, self.open_files)  # ConfigError: no worker sees a version that cannot fit
        first = self.config is None
        self._remember_rules()
        self.config = config
        self.generation += 1
        if first and self._adopted:
            self._watchdog = gevent.spawn(self._watch)
            missing = [w for w in self.workers if w.state is not WorkerState.RUNNING]
            jobs = [gevent.spawn(self._send_config, w, "upgrade") for w in self.live()]
            jobs += [gevent.spawn(self._start, w) for w in missing]
            gevent.joinall(jobs)
            return next((job.value for job in jobs if job.value is not None), Changes())
        if first:
            return self._start_all()
        jobs = [gevent.spawn(self._send_config, worker, "master") for worker in self.live()]
        gevent.joinall(jobs)
        return next((job.value for job in jobs if job.value is not None), Changes())

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
        if self._watchdog is not None:
            self._watchdog.kill(block=False)
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
            waiter.join(self.stop_grace)
        if not waiter.ready():
            for worker in self.workers:
                worker.kill()
            waiter.join(self.stop_grace)
        waiter.kill()

    def describe_workers(self) -> list[dict[str, Any]]:
        return [worker.describe() for worker in self.workers]

    # -- the shared prober's verdicts ------------------------------------------------

    def share_health(self, verdicts: list[Verdict], workers: list[WorkerProcess] | None = None) -> None:
        """Send ``verdicts`` to every running worker (or to ``workers``), in
        messages of ``verdicts_per_message``, unanswered. Never waits: each worker's
        messages go in order from a greenlet of their own (a worker whose channel
        broke is its monitor's business)."""
        if not verdicts:
            return
        messages = self._health_messages(verdicts)
        for worker in self.live() if workers is None else workers:
            if worker.channel is None:
                continue
            if worker.health_sending:  # one send at a time: a stuck worker piles nothing up
                worker.health_behind = True
                continue
            worker.health_sending = True
            gevent.spawn(self._send_health, worker, worker.channel, messages)

    def _health_messages(self, verdicts: list[Verdict]) -> list[dict[str, Any]]:
        step = self.verdicts_per_message
        return [
            {"op": Op.HEALTH.value, "verdicts": [v.to_wire() for v in verdicts[i : i + step]]}
            for i in range(0, len(verdicts), step)
        ]

    def _send_health(self, worker: WorkerProcess, channel: Channel, messages: list[dict[str, Any]]) -> None:
        """Send one worker its messages in order; verdicts that came meanwhile were
        not queued (``health_behind``): the whole state follows instead."""
        try:
            while True:
                for message in messages:
                    channel.send(message)
                if not worker.health_behind or worker.channel is not channel or self.health_state is None:
                    return
                worker.health_behind = False
                messages = self._health_messages(self.health_state())
        except (OSError, ChannelError, FrameTooLarge):
            pass  # the channel broke: the worker's reader and monitor take over
        except Exception as exc:  # noqa: BLE001 - a bug: logged; the next change is sent all the same
            emit(logger, InternalError(error=repr(exc)[:200], what="the health verdicts for a worker cannot be sent"), exc_info=exc)
        finally:
            if worker.channel is channel:
                worker.health_sending = False

    def running_rules(self) -> set[str]:
        """The rules whose servers run in at least one live worker (the shared
        prober probes them: a rule one worker failed to start still serves in the
        others)."""
        return {
            name
            for worker in self.live()
            if worker.report
            for name, state, _ in worker.report.get("states", [])
            if state == "running"
        }

    def _share_state(self, worker: WorkerProcess) -> None:
        """The whole current state to one worker that started or caught up."""
        if self.health_state is None or worker.state is not WorkerState.RUNNING:
            return
        try:
            verdicts = self.health_state()
        except Exception as exc:  # noqa: BLE001 - a bug: logged; the next change is sent all the same
            emit(logger, InternalError(error=repr(exc)[:200], what="the health state for a worker cannot be built"), exc_info=exc)
            return
        self.share_health(verdicts, [worker])

    # -- figures ---------------------------------------------------------------------

    def live(self) -> list[WorkerProcess]:
        return [worker for worker in self.workers if worker.state is WorkerState.RUNNING]

    def open_tables(self) -> list[OpenTable]:
        """Every running worker's open connections, asked for now (up to
        ``request_timeout`` each; one that has not answered by then is left out and
        logged, ``worker_request_late``). Not kept: a busy worker's table is large
        and stale at once. The rows are made into entries later, in a thread."""
        live = self.live()
        fields = {"connections": Listing.ROWS.value}
        jobs = [gevent.spawn(worker.request, Op.REPORT, fields, self.request_timeout) for worker in live]
        gevent.joinall(jobs)
        tables = []
        for worker, job in zip(live, jobs):
            answer = job.value
            if not answer or not answer.get("ok"):
                continue
            rows = answer.get(ROWS_KEY)
            if rows is None:  # a worker of an earlier version, during an upgrade, made the entries
                report = answer.get("report")
                rows = report.get("connections") if isinstance(report, dict) else None
            if isinstance(rows, list):
                tables.append(OpenTable(worker.index, rows))
        return tables

    # -- generations -------------------------------------------------------------------

    def _send_config(
        self, worker: WorkerProcess, source: str, timeout: float | None = None
    ) -> Changes | None:
        """Send the current rules to one worker and wait for its answer: the changes
        it made, or None (it failed them, or has not answered in time; both logged)."""
        config, generation = self.config, self.generation
        assert config is not None
        fields = {
            "generation": generation,
            "raw": encode_raw(config.raw),
            "path": config.path,
            "source": source,
        }
        worker.applies_in_flight += 1
        try:
            answer = worker.request(Op.APPLY, fields, timeout or self.apply_timeout)
        finally:
            worker.applies_in_flight -= 1
        if answer is None:
            return None
        if not answer.get("ok"):
            emit(
                logger,
                WorkerConfigInvalid(worker=worker.index, generation=generation, errors=answer.get("errors", [])),
            )
            return None
        return _changes_of(answer)

    def _check_generation(self, worker: WorkerProcess) -> None:
        """A running worker on another generation than the current one, and not
        busy with it, is sent the current rules again (with back-off)."""
        if self.stopping or worker.state is not WorkerState.RUNNING or self.handing.locked():
            return  # (a hand-over under way: the worker is re-executing; it is looked at after)
        wanted = self.generation
        if worker.generation == wanted:
            worker.resync_at, worker.resync_delay, worker.resync_failures = 0.0, 0.0, 0
            return
        now = time.monotonic()
        if worker.applying == wanted or worker.applies_in_flight or now < worker.resync_at:
            return
        worker.resync_delay = (
            min(worker.resync_delay * 2, self.resync_most) if worker.resync_delay else self.resync_first
        )
        worker.resync_at = now + worker.resync_delay
        emit(logger, WorkerResync(worker=worker.index, had=worker.generation, wanted=wanted))
        worker.applies_in_flight += 1  # until the greenlet takes over: no second resync meanwhile
        gevent.spawn(self._resync, worker)

    def _resync(self, worker: WorkerProcess) -> None:
        worker.applies_in_flight -= 1
        pid = worker.pid
        if self._send_config(worker, "resync") is not None:
            worker.resync_failures = 0
            self._share_state(worker)  # targets it has only now
            return
        if worker.pid != pid or worker.state is not WorkerState.RUNNING or self.stopping:
            return  # another process now: it starts its count afresh
        worker.resync_failures += 1
        if worker.resync_failures >= self.resync_restart_after and worker.generation != self.generation:
            worker.resync_failures = 0
            self.restart_worker(worker.index, RestartReason.GENERATION)  # its own greenlet already

    # -- processes -----------------------------------------------------------------------

    def _start_all(self) -> Changes:
        jobs = [gevent.spawn(self._start, worker) for worker in self.workers]
        gevent.joinall(jobs)
        self._watchdog = gevent.spawn(self._watch)
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
        self._spawning += 1  # (the spawn yields: ``settle`` waits for it to be seen as starting)
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
            self._spawning -= 1
            master_end.close()
            worker_end.close()
            emit(logger, WorkerFailed(what=f"cannot start worker {worker.index}: {exc}"))
            gevent.spawn_later(self.restart_most, self._restart, worker)
            return None
        worker_end.close()
        channel = Channel(master_end)
        worker.attach(process, channel)
        self._spawning -= 1
        worker.reader = gevent.spawn(self._read, worker, channel)
        gevent.spawn(self._monitor, worker, process)
        generation = self.generation
        answer = worker.request(
            Op.APPLY,
            {
                "generation": generation,
                "raw": encode_raw(self.config.raw),
                "path": self.config.path,
                "source": "start",
            },
            self.start_timeout,
        )
        if answer is None or not answer.get("ok"):
            emit(
                logger,
                WorkerFailed(
                    worker=worker.index,
                    pid=process.pid,
                    errors=(answer or {}).get("errors", []),
                    what=f"worker {worker.index} (pid {process.pid}) did not start",
                ),
            )
            worker.kill()
            return None
        if process.returncode is None and worker.process is process:
            worker.state = WorkerState.RUNNING
        emit(
            logger,
            WorkerStarted(worker=worker.index, pid=process.pid, restarts=worker.restarts, generation=generation),
        )
        self._share_state(worker)  # a down target is down here too from the start
        self._check_generation(worker)  # rules applied while it started skipped it
        return _changes_of(answer) or Changes()

    def _read(self, worker: WorkerProcess, channel: Channel) -> None:
        """Read everything one worker process sends, until its end closes."""
        try:
            while True:
                try:
                    message = channel.recv()
                except MalformedMessage as exc:
                    emit(logger, WorkerBadMessage(worker=worker.index, error=str(exc)))
                    continue
                if message is None:
                    return  # it exited: its monitor takes over
                if worker.channel is not channel:
                    return
                worker.receive(message)
                self._check_generation(worker)
        except (OSError, ChannelError) as exc:
            if worker.channel is channel and not self.stopping:
                emit(logger, WorkerChannelError(worker=worker.index, pid=worker.pid, error=str(exc)))
                worker.kill()

    def _watch(self) -> None:
        """Kill a running worker that has sent nothing for ``heartbeat_timeout``."""
        last = time.monotonic()
        while not self.stopping:
            gevent.sleep(self.heartbeat_check)
            now = time.monotonic()
            paused, last = now - last > 3 * self.heartbeat_check, now
            if paused:
                continue  # this process was stopped itself: read what waits first
            for worker in self.live():
                if not worker.killed and worker.silent_for() > self.heartbeat_timeout:
                    self._kill_silent(worker)

    def _kill_silent(self, worker: WorkerProcess) -> None:
        emit(logger, WorkerUnresponsive(worker=worker.index, pid=worker.pid, silent_for=round(worker.silent_for(), 3)))
        worker.kill()

    def _monitor(self, worker: WorkerProcess, process: gevent.subprocess.Popen) -> None:
        code = process.wait()
        if worker.process is not process:
            return
        if worker.reader is not None:
            worker.reader.join(self.last_words)  # its last push, still in the channel, counts
        self.stats.retire(worker.report)
        worker.detach()
        if self.stopping:
            emit(logger, WorkerStopped(worker=worker.index, code=code))
            return
        lived = time.time() - worker.started_at
        delay = (
            self.restart_first
            if lived >= self.stable
            else min(self.restart_first * 2 ** min(worker.restarts, 10), self.restart_most)
        )
        emit(logger, WorkerExited(worker=worker.index, pid=process.pid, code=code, restart_in=delay))
        gevent.spawn_later(delay, self._restart, worker)

    def _restart(self, worker: WorkerProcess) -> None:
        if self.stopping:
            return
        if self.frozen:  # an upgrade hands the workers on: the next master starts this one
            gevent.spawn_later(self.restart_first, self._restart, worker)
            return
        worker.restarts += 1
        self._start(worker)


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
