"""The admin endpoint's documents that grow with the process: ``/metrics``,
``/stats`` and ``/connections``, rendered without stalling forwarding (issue 18).

A rendering of 1,000 rules or 10,000 connections is tens of milliseconds of Python;
on the hub every connection would wait for it. So each rendering is split in two:

- on the hub, the figures are *copied* in slices (``Renderings.slice_rules`` rules,
  ``StatsRegistry.copy_slice`` connections), with a cooperative yield between
  two slices, so that the hub runs its callbacks every fraction of a millisecond;
  each copy is plain data taken at one moment (a rule's counters together, a
  connection's figures together), never read again on the hub;
- in the hub's thread pool (``in_thread``), the copy is formatted (JSON, the
  Prometheus text), and anything that reads the kernel (``/proc/self/fd`` for the
  open-file count, ``/proc/self/statm``) is read there, never on the hub.

Concurrent requests share one rendering that started after they arrived
(``Coalesced``), so ten scrapers cost one rendering at a time, never a stale answer.
The routes that serve these documents are in ``gportmap.admin.http``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import gevent
from gevent.event import AsyncResult

from gportmap.engine.routes import describe_routes
from gportmap.hubwork import in_slices, in_thread
from gportmap.stats import OpenTable, connections_document, process_figures

if TYPE_CHECKING:
    from types import ModuleType

    from gportmap.runtime.service import Service

T = TypeVar("T")


class Coalesced(Generic[T]):
    """One rendering at a time, shared by the requests that wait for it.

    A request is answered by a rendering that *started after it arrived*: one that
    arrives while another runs waits for the next, which serves every request that
    queued meanwhile. So the answer is never older than the request (a test that
    reads a counter after an action sees the action), and ten scrapers in a loop
    cost one rendering at a time instead of ten.

    Renderings back to back would still keep the process busy all the time (the
    thread's formatting competes with the hub for the interpreter): the next one
    starts only after a pause of ``(1 / duty - 1)`` times the last one's duration,
    so renderings take at most ``duty`` of the time. A request waits longer then;
    its answer is no older for it. The pause is at most ``max_pause``: a rendering
    that took long because it *waited* (``/connections`` asking a stopped worker,
    up to its 5 s) cost no CPU, and must not hold the next request for three times
    as long."""

    #: The longest pause between two renderings, in seconds.
    max_pause: float = 1.0

    def __init__(self, make: Callable[[], T], duty: float = 0.25) -> None:
        self.make = make
        self.duty = duty
        self._next: AsyncResult | None = None
        self._worker: gevent.Greenlet | None = None
        self._ready_at = 0.0  # monotonic time the next rendering may start

    def get(self) -> T:
        if self._next is None:
            self._next = AsyncResult()
        waiting = self._next
        if self._worker is None:
            self._worker = gevent.spawn(self._run)
        return waiting.get()

    def _run(self) -> None:
        try:
            while self._next is not None:
                pause = self._ready_at - time.monotonic()
                if pause > 0:
                    gevent.sleep(pause)
                waiting, self._next = self._next, None
                started = time.monotonic()
                try:
                    waiting.set(self.make())
                except Exception as exc:  # the requests that waited answer 500; the next may work
                    waiting.set_exception(exc)
                ended = time.monotonic()
                self._ready_at = ended + min((ended - started) * (1 / self.duty - 1), self.max_pause)
        finally:
            self._worker = None


class Renderings:
    """The three documents of one endpoint, each behind its own ``Coalesced``.

    ``admin_figures`` gives the endpoint's own figures (``/stats``' ``admin``, the
    ``gportmap_admin_*`` metrics) at the moment a rendering copies them."""

    #: Rules whose figures ``/metrics`` and ``/stats`` copy on the hub between two
    #: yields (each copy costs microseconds; the formatting runs in a thread).
    slice_rules = 100
    #: The share of time renderings of one document may take when requests for it
    #: come back to back (``Coalesced``): a 150 ms ``/metrics`` of 1,000 rules is
    #: followed by a 450 ms pause before the next one starts.
    render_duty = 0.25

    def __init__(self, service: Service, admin_figures: Callable[[], dict[str, Any]]) -> None:
        self.service = service
        self.admin_figures = admin_figures
        #: Imported at the first scrape: prometheus_client is a tenth of a start's imports.
        self.exposition: ModuleType | None = None  # gportmap.admin.metrics, once imported
        self.metrics: Coalesced[bytes] = Coalesced(self._render_metrics, self.render_duty)
        self.stats: Coalesced[bytes] = Coalesced(self._render_stats, self.render_duty)
        self.connections: Coalesced[bytes] = Coalesced(self._render_connections, self.render_duty)

    def _render_metrics(self) -> bytes:
        # The first scrape imports prometheus_client, in the thread pool: an import
        # reads files, which must not block the hub.
        if self.exposition is None:
            self.exposition = in_thread(_metrics_module)
        views = [
            replace(view, stats=view.stats.frozen())
            for view in in_slices(self.service.rule_views(), self.slice_rules)
            if view.state != "disabled"
        ]
        frozen = self.exposition.FrozenService(self.service, views, self.admin_figures())
        return in_thread(self.exposition.render_frozen, frozen)

    def _render_stats(self) -> bytes:
        rules = []
        for view in in_slices(self.service.rule_views(), self.slice_rules):
            snapshot = view.snapshot()  # fresh dicts and lists: the thread reads only them
            if view.rule.routes:  # SPEC §13: each route, its targets and connections
                snapshot["routes"] = describe_routes(view.rule, snapshot.get("targets", []))
            rules.append(snapshot)
        document = self.service.snapshot(rules)
        document["admin"] = self.admin_figures()
        return in_thread(_stats_text, document)

    def _render_connections(self) -> bytes:
        # Each process's table: this one's copied on the hub in slices; with workers,
        # each worker copies its own the same way and the master waits on their links.
        tables = self.service.supervisor.stats.open_tables()
        return in_thread(_connections_text, tables)


def json_text(data: Any) -> bytes:
    """A document as every answer of the endpoint writes it."""
    return json.dumps(data, indent=1).encode() + b"\n"


def _stats_text(document: dict[str, Any]) -> bytes:
    """The ``/stats`` text, with the process figures read here, in the thread:
    listing ``/proc/self/fd`` takes milliseconds at 20,000 descriptors."""
    document["process"] = process_figures()
    return json_text(document)


def _connections_text(tables: list[OpenTable]) -> bytes:
    """The ``/connections`` text (SPEC §5) of the copied tables."""
    return json_text(connections_document(tables))


def _metrics_module() -> ModuleType:
    """``gportmap.admin.metrics``, imported on first use (it pulls in prometheus_client)."""
    from gportmap.admin import metrics

    return metrics
