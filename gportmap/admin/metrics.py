"""Prometheus exposition of the counters (SPEC §5), read at scrape time.

prometheus-client renders the text format (escaping, HELP/TYPE, ``_total``
suffixes) and supplies the standard ``process_*`` metrics; gportmap's own figures
come from a custom collector that reads the plain integers the relay maintains, so
the data path never touches a metrics library. The collector registry is private
to the admin server (no global registry).

Rendering 1,000 rules takes about a tenth of a second of formatting, which on the hub
would stall every connection: the admin endpoint copies the figures on the hub, rule
by rule (``FrozenService``), and ``render_frozen`` formats them in a thread. The
collector reads only the copy's ``rule_views()``; any other attribute it reads of
the service comes from the live one, from that thread: read plain values there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gportmap.log import dropped_records
from gportmap.stats import ERROR_REASONS, REJECT_REASONS, UDP_DROP_REASONS

if TYPE_CHECKING:
    from gportmap.runtime.service import RuleView, Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GportmapCollector:
    """Builds the metric families from a ``Service`` snapshot on every scrape."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        rule_labels = ["rule", "protocol"]
        up = GaugeMetricFamily("gportmap_rule_up", "1 while the rule's listener serves, 0 when it cannot start.", labels=rule_labels)
        active = GaugeMetricFamily("gportmap_connections_active", "Open connections.", labels=rule_labels)
        total = CounterMetricFamily("gportmap_connections", "Admitted connections.", labels=rule_labels)
        rejected = CounterMetricFamily(
            "gportmap_connections_rejected",
            "Connections closed before relaying, by reason (acl, limit, tls, plugin; handshake: a failed or "
            "timed-out WebSocket upgrade).",
            labels=[*rule_labels, "reason"],
        )
        failures = CounterMetricFamily(
            "gportmap_upstream_connect_failures",
            "Target connects that were refused, timed out or failed their TLS handshake.",
            labels=rule_labels,
        )
        errors = CounterMetricFamily(
            "gportmap_connection_errors",
            "Connections (udp: sessions) ended by gportmap's own fault, by reason (internal_error: an "
            "unexpected exception, logged with its traceback as event internal_error).",
            labels=[*rule_labels, "reason"],
        )
        received = CounterMetricFamily("gportmap_received_bytes", "Bytes received from clients.", labels=rule_labels)
        sent = CounterMetricFamily("gportmap_sent_bytes", "Bytes sent to clients.", labels=rule_labels)
        udp_sessions = GaugeMetricFamily("gportmap_udp_sessions_active", "Open UDP sessions.", labels=["rule"])
        udp_in = CounterMetricFamily("gportmap_udp_packets_received", "Datagrams received from clients.", labels=["rule"])
        udp_out = CounterMetricFamily("gportmap_udp_packets_sent", "Datagrams sent to clients.", labels=["rule"])
        udp_dropped = CounterMetricFamily(
            "gportmap_udp_packets_dropped",
            "Datagrams dropped, by reason (sessions, acl, plugin, error; kernel: dropped by the kernel "
            "on a full socket receive buffer, Linux only).",
            labels=["rule", "reason"],
        )
        target_labels = ["rule", "target"]
        target_up = GaugeMetricFamily(
            "gportmap_target_up", "1 while the target is up (by its health checks and passive health), else 0.",
            labels=target_labels,
        )
        target_active = GaugeMetricFamily(
            "gportmap_target_connections_active", "Open connections to the target (connects under way included).",
            labels=target_labels,
        )
        target_total = CounterMetricFamily(
            "gportmap_target_connections", "Connections that reached the target.", labels=target_labels
        )
        target_failures = CounterMetricFamily(
            "gportmap_target_connect_failures",
            "Connects to the target that were refused, timed out or failed their PROXY header or TLS handshake.",
            labels=target_labels,
        )
        for view in self.service.rule_views():
            if view.state == "disabled":
                continue  # not started, so neither up nor down
            stats, labels = view.stats, [view.name, view.protocol]
            up.add_metric(labels, 1.0 if view.state in ("running", "draining") else 0.0)
            active.add_metric(labels, stats.active)
            total.add_metric(labels, stats.total)
            for reason in REJECT_REASONS:
                rejected.add_metric([*labels, reason], stats.rejected[reason])
            failures.add_metric(labels, stats.connect_failures)
            for reason in ERROR_REASONS:
                errors.add_metric([*labels, reason], stats.errors[reason])
            for target in stats.targets():
                labels_of_target = [view.name, target["name"]]
                target_up.add_metric(labels_of_target, 1.0 if target["state"] == "up" else 0.0)
                target_active.add_metric(labels_of_target, target["active"])
                target_total.add_metric(labels_of_target, target["total"])
                target_failures.add_metric(labels_of_target, target["connect_failures"])
                if target.get("route"):  # SPEC §13: a route's target says which
                    for family in (target_up, target_active, target_total, target_failures):
                        family.samples[-1].labels["route"] = target["route"]
            received.add_metric(labels, stats.bytes_received)
            sent.add_metric(labels, stats.bytes_sent)
            if view.protocol == "udp":
                udp_sessions.add_metric([view.name], stats.udp_sessions)
                udp_in.add_metric([view.name], stats.udp_packets_received)
                udp_out.add_metric([view.name], stats.udp_packets_sent)
                stats.refresh_kernel_drops()  # read from the sockets now, never per datagram
                for reason in UDP_DROP_REASONS:
                    udp_dropped.add_metric([view.name, reason], stats.udp_dropped[reason])
        yield from (up, active, total, rejected, failures, errors, received, sent)
        yield from (udp_sessions, udp_in, udp_out, udp_dropped)
        yield from (target_up, target_active, target_total, target_failures)
        faults = CounterMetricFamily(
            "gportmap_faults_applied",
            "Network faults injected (SPEC section 12), by rule and fault type: chunks delayed, paced or cut, "
            "connections cut, datagrams dropped or duplicated.",
            labels=["rule", "type"],
        )
        for (rule, kind), count in sorted(self.service.faults_applied().items()):
            faults.add_metric([rule, kind], count)
        yield faults

        reloads = CounterMetricFamily("gportmap_config_reloads", "Rules file reloads, by result.", labels=["result"])
        for result in ("success", "failure"):
            reloads.add_metric([result], self.service.reloads[result])
        yield reloads
        last = self.service.last_success_at
        yield GaugeMetricFamily(
            "gportmap_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful load of the rules file.",
            value=last if last is not None else self.service.started_at,
        )
        yield CounterMetricFamily(
            "gportmap_log_records_dropped",
            "Log records this process dropped because stderr was not read fast enough.",
            value=dropped_records(),
        )
        yield from admin_families(getattr(self.service, "admin_figures", None))


def admin_families(figures: dict[str, Any] | None) -> Iterator[Metric]:
    """The admin endpoint's own figures (``AdminServer.figures``), when it serves."""
    if figures is None:
        return
    yield GaugeMetricFamily(
        "gportmap_admin_connections_active", "Connections open to the admin endpoint.", value=figures["connections"]
    )
    yield CounterMetricFamily(
        "gportmap_admin_connections_refused",
        "Admin connections closed as soon as accepted: the endpoint held its cap of connections.",
        value=figures["refused"],
    )
    cut = CounterMetricFamily(
        "gportmap_admin_connections_cut",
        "Admin connections closed by the endpoint, by reason (header_timeout, idle_timeout, body_timeout, send_timeout, "
        "head_too_large).",
        labels=["reason"],
    )
    for reason, count in figures["cut"].items():
        cut.add_metric([reason], count)
    yield cut
    yield CounterMetricFamily(
        "gportmap_admin_auth_failures", "Admin requests with a wrong token (answered 401, past a burst after a delay).",
        value=figures["auth_failures"],
    )
    yield CounterMetricFamily(
        "gportmap_admin_auth_throttled",
        "Admin requests answered 429: their address failed authentication too often.",
        value=figures["auth_throttled"],
    )


class FrozenService:
    """What the collector reads of a ``Service``, copied on the hub so that the
    formatting can run in a thread: the rules' views over frozen figures
    (``RuleStats.frozen``), the reload figures and the admin endpoint's; anything
    else is read from the live service."""

    def __init__(self, service: Service, views: list[RuleView], admin_figures: dict[str, Any] | None) -> None:
        self._service = service
        self._views = views
        self.reloads = dict(service.reloads)
        self.last_success_at = service.last_success_at
        self.started_at = service.started_at
        self.admin_figures = admin_figures

    def rule_views(self) -> list[RuleView]:
        return self._views

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)


def render_frozen(frozen: FrozenService) -> bytes:
    """The exposition of ``frozen``, with the process metrics: run in a thread."""
    return generate_latest(build_registry(frozen))  # type: ignore[arg-type]


def build_registry(service: Service) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GportmapCollector(service))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
