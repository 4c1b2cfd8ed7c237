"""What operators read while gportmap runs: the admin HTTP endpoint (``http``), its
Prometheus exposition (``metrics``), the periodic stats record (``statslog``) and
the dashboard page (``static/``). This layer sits above the runtime: it reads the
``Service`` and follows its settings through ``Service.on_applied``.
"""

from __future__ import annotations

from gportmap.admin.http import AdminServer
from gportmap.admin.statslog import StatsLogger
from gportmap.config import Config
from gportmap.runtime.service import Service


class AdminPlane:
    """The admin endpoint and the stats log of one service, following its settings."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.server = AdminServer(service)
        self.stats_log = StatsLogger(service)

    def apply(self, config: Config) -> None:
        """``settings.admin`` (or ``--admin``) and ``settings.statsInterval``, at once."""
        self.server.apply(self.service.overrides.admin_settings(config.settings))
        self.stats_log.apply(config.settings.stats_interval)

    def stop(self) -> None:
        self.stats_log.stop()
        self.server.stop()
