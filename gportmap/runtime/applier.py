"""The one reload path: every source queues here, one version is applied at a time.

Reloads come from the file watcher, SIGHUP, ``POST /reload`` and (in a worker) the
master's channel. Applying a version yields (binding resolves addresses through the
resolver's thread pool, reading the file goes through the thread pool), so two
sources applying at once would interleave: rules of two versions running, and
``/stats`` naming a third. The ``Applier`` makes that impossible by construction, in
the manner of HAProxy's master and nginx's reload:

- ``submit`` never applies anything itself: it queues a request and (optionally)
  waits for its outcome. One greenlet, the applier's, applies.
- Requests that queue up while a version is being applied are coalesced: the next
  apply serves all of them at once, with the newest content (the file is read after
  they queued; of bytes handed in, the newest wins). Every waiter gets that outcome.
- A write of the rule API (or a dry run) is a ``Transaction``: served alone, in its
  turn, never coalesced, with its own outcome, because it reads the file, checks
  its version, writes and applies as one step that nothing may come between.
  Reloads queued before and after it are coalesced among themselves, never across it.
- ``close`` (on SIGTERM/SIGINT) refuses every request from then on, answers those
  still queued as refused, and ``join`` waits for an apply in progress to end, so
  that nothing opens a listener after the stop has closed them.
- An exception out of an apply (a bug) is contained: logged once with its traceback
  as ``internal_error``, answered as failed, and the applier goes on with the next.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
from gevent.event import AsyncResult, Event

from gportmap.events import InternalError, ReloadRefused
from gportmap.log import emit, get_logger
from gportmap.runtime.supervisor import Changes
from gportmap.runtime.transaction import Transaction, TxOutcome

logger = get_logger("applier")


class ReloadSource(enum.Enum):
    """Who asked for a reload (the ``source`` field of the reload's log record)."""

    WATCHER = "watcher"
    SIGNAL = "signal"
    ADMIN = "admin"
    MASTER = "master"
    API = "api"  #: a write of the rule API (/rules)


class OutcomeStatus(enum.Enum):
    APPLIED = "applied"  #: the version runs now
    UNCHANGED = "unchanged"  #: a watcher's request and the content was the one applied: nothing done
    INVALID = "invalid"  #: the version was rejected: the old rules keep serving
    FAILED = "failed"  #: applying raised (a bug): logged as internal_error
    REFUSED = "refused"  #: gportmap is stopping: reloads are refused


@dataclass(frozen=True)
class ReloadOutcome:
    """What happened to a reload request."""

    status: OutcomeStatus
    changes: Changes | None = None
    errors: tuple[str, ...] = ()
    #: How many requests this one apply served (1 when nothing queued behind another).
    served: int = 1
    #: A transaction's own answer (None for a reload, and when it was refused or failed).
    result: TxOutcome | None = None


@dataclass(frozen=True)
class ReloadRequest:
    """One queued request: ``raw`` bytes to apply (a worker's master sends them), or
    None to read the rules file; ``force`` applies even unchanged content. A request
    with a ``transaction`` is a write of the rule API or a dry run: served alone."""

    source: ReloadSource
    force: bool = True
    raw: bytes | None = field(default=None, repr=False)
    transaction: Transaction | None = None

    @property
    def applies(self) -> bool:
        """Whether serving it applies a version (a dry run changes nothing)."""
        return self.transaction is None or not self.transaction.dry_run


class Applier:
    """Serialises reloads; ``apply`` is the function that turns a batch into an outcome.

    ``apply(request)`` receives one request standing for the whole batch: the newest
    request's source and content, forced if any request of the batch was."""

    #: Requests waiting at most: every queued request without a waiter is coalesced
    #: into one flag, so only callers that wait (admin requests, a worker's master)
    #: take room here, and they are bounded by the admin endpoint's connections.
    #: Past this, a request is answered ``refused`` at once.
    max_waiting = 10000

    def __init__(self, apply: Callable[[ReloadRequest], ReloadOutcome]) -> None:
        self._apply = apply
        self._queue: list[tuple[ReloadRequest, AsyncResult | None]] = []
        self._waiting = 0  # requests in the queue with a waiter
        self._wake = Event()
        self._closed = False
        self._idle = Event()
        self._idle.set()
        self._greenlet: gevent.Greenlet | None = None
        #: Applies done (batches), for /stats and tests.
        self.applies = 0

    def start(self) -> None:
        """Begin serving requests (those queued before are served first)."""
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, request: ReloadRequest, wait: bool = False) -> ReloadOutcome | None:
        """Queue ``request``; with ``wait`` block this greenlet until it is served and
        return its outcome (the applier's greenlet itself must never wait)."""
        if self._closed:
            outcome = refused(request.source)
            return outcome if wait else None
        result: AsyncResult | None = AsyncResult() if wait else None
        if wait and self._waiting >= self.max_waiting:
            return ReloadOutcome(OutcomeStatus.REFUSED, errors=("too many reload requests are waiting",))
        if not wait:
            request = self._merge_unwaited(request)
        self._queue.append((request, result))
        self._waiting += wait
        self._wake.set()
        return result.get() if result is not None else None

    def _merge_unwaited(self, request: ReloadRequest) -> ReloadRequest:
        """A request nobody waits for replaces the one already queued (the batch would
        serve both at once anyway), so a SIGHUP loop or a busy watcher queues one entry,
        however long an apply takes."""
        for index, (queued, waiter) in enumerate(self._queue):
            if waiter is None and queued.transaction is None:
                del self._queue[index]
                return ReloadRequest(
                    request.source,
                    request.force or queued.force,
                    request.raw if request.raw is not None else queued.raw,
                )
        return request

    def close(self) -> None:
        """Refuse every request from now on; those queued are answered refused."""
        self._closed = True
        queued, self._queue, self._waiting = self._queue, [], 0
        for request, waiter in queued:
            if waiter is not None:
                waiter.set(refused(request.source, log=False))
        if queued:
            refused(queued[-1][0].source, count=len(queued))
        self._wake.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no apply is in progress (after ``close``: none will start)."""
        return bool(self._idle.wait(timeout))

    def kill(self) -> None:
        self.close()
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue and not self._closed:
                batch = self._take()
                self._idle.clear()
                try:
                    outcome = self._serve(batch)
                finally:
                    self._idle.set()
                for _, waiter in batch:
                    if waiter is not None:
                        waiter.set(outcome)
            if self._closed:
                return

    def _take(self) -> list[tuple[ReloadRequest, AsyncResult | None]]:
        """The next batch: a transaction alone, or every reload queued before the next
        transaction (they are served together, the newest content winning)."""
        if self._queue[0][0].transaction is not None:
            end = 1
        else:
            end = next(
                (i for i, (request, _) in enumerate(self._queue) if request.transaction is not None),
                len(self._queue),
            )
        batch, self._queue = self._queue[:end], self._queue[end:]
        self._waiting -= sum(waiter is not None for _, waiter in batch)
        return batch

    def _serve(self, batch: list[tuple[ReloadRequest, AsyncResult | None]]) -> ReloadOutcome:
        newest = batch[-1][0]
        if newest.transaction is not None:
            request = newest
        else:
            raw = next((request.raw for request, _ in reversed(batch) if request.raw is not None), None)
            force = any(request.force for request, _ in batch)
            request = ReloadRequest(newest.source, force, raw)
        self.applies += request.applies
        try:
            outcome = self._apply(request)
        except Exception as exc:  # a bug: contained, the next request is served
            event = InternalError(
                source=request.source.value,
                error=repr(exc)[:200],
                what="applying the rules raised: the reload failed, the applier goes on",
            )
            emit(logger, event, exc_info=exc)
            outcome = ReloadOutcome(OutcomeStatus.FAILED, errors=(f"internal error: {exc!r}"[:300],))
        if len(batch) > 1:
            return ReloadOutcome(outcome.status, outcome.changes, outcome.errors, served=len(batch))
        return outcome


def refused(source: ReloadSource, log: bool = True, count: int = 1) -> ReloadOutcome:
    """The answer to a reload asked for while gportmap stops (logged unless ``log`` is off)."""
    if log:
        emit(logger, ReloadRefused(source=source.value, requests=count))
    return ReloadOutcome(OutcomeStatus.REFUSED, errors=("gportmap is stopping: reloads are refused",))
