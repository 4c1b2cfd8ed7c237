"""Work that must not stall the hub: a long loop in slices with a yield between
them, or a whole computation in the hub's thread pool.

Every greenlet of a process shares one hub; a loop over 10,000 connections or a
``json.dumps`` of megabytes on it holds every connection's forwarding for tens of
milliseconds. The admin endpoint's renderings, the stats log's record and a
worker's answer to its master (its open connections) go through these two."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import gevent

T = TypeVar("T")


def in_slices(items: Iterable[T], size: int) -> Iterator[T]:
    """``items`` one by one, yielding to the hub before each slice of ``size`` but
    the first: a copy of thousands of figures on the hub lets every connection run
    between two slices."""
    for index, item in enumerate(items):
        if index and not index % size:
            gevent.sleep(0)
        yield item


def in_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in the hub's thread pool. Its exception comes back as a
    value and is raised here: one leaving a pool function would also be reported
    to the hub's error handler."""

    def call() -> Any:
        try:
            return function(*args)
        except Exception as exc:  # noqa: BLE001 (raised again in the calling greenlet)
            return _Raised(exc)

    outcome = gevent.get_hub().threadpool.apply(call)
    if isinstance(outcome, _Raised):
        raise outcome.exc
    return outcome


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
