"""The periodic ``stats`` log record (SPEC §6) and the one SIGUSR1 asks for.

For operators who read logs rather than scrape metrics: one record per interval
with every rule's figures, and the change since the previous record so that the
rate is readable without arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gevent

from gportmap.events import StatsRecord
from gportmap.hubwork import in_slices
from gportmap.log import emit, get_logger

if TYPE_CHECKING:
    from gportmap.runtime.service import Service

logger = get_logger("stats")


class StatsLogger:
    """The periodic record, and the one SIGUSR1 asks for (both run in a greenlet)."""

    #: Rules read between two yields to the hub (as the admin endpoint's renderings).
    slice_rules = 100

    def __init__(self, service: Service) -> None:
        self.service = service
        self.interval = 0.0
        self._greenlet: gevent.Greenlet | None = None
        self._previous: dict[str, tuple[int, int]] = {}

    def apply(self, interval: float) -> None:
        """(Re)start the periodic records; 0 stops them."""
        if interval == self.interval and (self._greenlet is not None or not interval):
            return
        self.stop()
        self.interval = interval
        if interval:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            gevent.sleep(self.interval)
            self.log_now("interval")

    def log_now(self, source: str = "signal") -> None:
        rules: list[dict[str, Any]] = []
        for view in in_slices(self.service.rule_views(), self.slice_rules):
            stats = view.stats
            before = self._previous.get(view.name, (0, 0))
            self._previous[view.name] = (stats.bytes_received, stats.bytes_sent)
            entry = {
                "rule": view.name,
                "state": view.state,
                "active": stats.active,
                "total": stats.total,
                "rejected": sum(stats.rejected.values()),
                "bytes_received": stats.bytes_received,
                "bytes_sent": stats.bytes_sent,
                "bytes_received_delta": stats.bytes_received - before[0],
                "bytes_sent_delta": stats.bytes_sent - before[1],
            }
            if view.protocol == "udp":
                entry.update(
                    sessions=stats.udp_sessions,
                    packets_received=stats.udp_packets_received,
                    packets_sent=stats.udp_packets_sent,
                    dropped=sum(stats.udp_dropped.values()),
                )
            rules.append(entry)
        active = self.service.supervisor.stats.active
        emit(logger, StatsRecord(source=source, active=active, rules=rules))

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
