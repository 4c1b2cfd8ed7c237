#!/usr/bin/env python3
"""gportmap against the proxies its users would otherwise pick, on the same loopback
traffic in one run (issue 8): direct (no proxy), socat, HAProxy (mode tcp, with and
without ``option splice-auto``), nginx stream and websockify.

    bench/run                      # installs the anchors when missing, then this
    python bench/compare.py --quick --json /tmp/bench.json
    bench/run --only tls,held-tls,held-ws   # some workloads only (their rows)

Workloads: iperf3 bulk (1 and 8 streams), wrk HTTP keep-alive (req/s, p99) and a new
connection per request against an nginx backend, the same two over TLS terminated by
the proxy, connections held (PSS/RSS growth of the proxy's process group; plain, then
TLS and WebSocket per connection), UDP 64-byte echo from 1 and 50 client ports,
WebSocket to TCP echo (64 KiB and 32-byte messages), 2 workers/threads on the HTTP
rates, a pool of 3 targets against one target on the new-connection rate
(``pool_bench``: gportmap and HAProxy ``balance roundrobin``), and real clients
(issue 23, ``realclients``): pgbench ``-S`` and ``-S -C`` against a throwaway
PostgreSQL, dnsperf against dnsmasq. Every HTTP row runs with wrk on 1 and on 2
threads. Under every throughput row, the proxy's CPU time (user + system of its
process group, ``loads.ProxyCpu``) per unit of work: per request, new connection, GB,
datagram, query or message. gportmap also runs as users run it (``VARIANTS``: INFO;
INFO with the admin endpoint, watcher and stats log) in the HTTP, UDP, pgbench and
dnsperf rows, each on a line of its own under the row, its ratio to the
stripped-down gportmap.

The proxies of a workload run side by side and take turns, one measurement each per
round, the order rotating each round; the median of the rounds is reported with its
ratio to the row's reference (HAProxy, HAProxy with splice, nginx or websockify).
Nothing here passes or fails on a number: the machine is shared. A row a proxy cannot
run says why ("skipped: ...", or "failed: ..." when it broke).

Everything runs on 127.0.0.1 with free ports and configs in a temp dir; every process
started is stopped with its process group on every path (and dies with the driver).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
import loads  # noqa: E402
import pool_bench  # noqa: E402
import realclients  # noqa: E402
from anchors import GPORTMAP_VARIANTS, Processes, Proxy, start_proxy  # noqa: E402
from common import LOOPBACK, TlsFiles, make_certificate  # noqa: E402

TCP_PROXIES = ["direct", "gportmap", "socat", "haproxy", "haproxy-splice", "nginx"]
UDP_PROXIES = ["direct", "gportmap", "socat", "nginx"]
#: gportmap as users run it (INFO; INFO + admin + watcher + stats log), measured in the
#: same rounds as the rest; the table gives each its own line under the row.
VARIANTS = list(GPORTMAP_VARIANTS)
#: Real clients (issue 23): pgbench through a tcp rule, dnsperf through a udp rule.
PG_PROXIES = ["direct", "gportmap", "haproxy", "nginx"]
DNS_PROXIES = ["direct", "gportmap", "nginx"]
WS_PROXIES = ["gportmap", "websockify"]
WORKER_PROXIES = ["gportmap", "haproxy", "nginx"]
#: TLS terminated on the listener, plain TCP to the target.
TLS_PROXIES = ["gportmap", "haproxy", "nginx"]
COLUMNS = ["direct", "gportmap", "socat", "haproxy", "haproxy-splice", "nginx", "websockify"]
HEADINGS = {"haproxy-splice": "HAProxy + splice", "haproxy": "HAProxy", "nginx": "nginx stream"}

#: Keep-alive and new-connection wrk runs use this many connections.
WRK_CONNECTIONS = 100
#: Every HTTP row is measured with wrk on one thread and on two: on two cores, one
#: wrk thread can be the bottleneck, two take a core from the proxy.
WRK_THREADS = (1, 2)
#: The workloads ``--only`` can pick, in the order they run.
STEPS = (
    "bulk", "http", "tls", "held", "held-tls", "held-ws", "udp", "websocket", "workers", "pool", "pgbench", "dns",
)  # fmt: skip


@dataclass
class Workload:
    """One row of the table."""

    key: str
    title: str
    unit: str
    reference: str
    proxies: list[str]
    lower_is_better: bool = False
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: What the table's first column says ("" = the title): a CPU row, printed under
    #: its throughput row, says only "↳ proxy CPU per ...".
    label: str = ""
    #: The key of the row this one is printed under (a CPU row's throughput row).
    under: str = ""

    def add(self, proxy: str, value: float, detail: dict[str, Any] | None = None) -> None:
        if proxy not in self.proxies:
            return  # measured for a neighbour row (the direct path has no CPU row)
        entry = self.results.setdefault(proxy, {"runs": [], "details": []})
        entry["runs"].append(value)
        if detail:
            entry["details"].append(detail)

    def fail(self, proxy: str, why: str) -> None:
        if proxy not in self.proxies:
            return
        entry = self.results.setdefault(proxy, {"runs": [], "details": []})
        entry.setdefault("errors", []).append(why)

    def skip(self, proxy: str, why: str) -> None:
        self.results[proxy] = {"skip": why if why.startswith("skipped") else f"skipped: {why}"}

    def finish(self) -> None:
        """Medians and ratios; a proxy whose every run failed gets ``failed: why``."""
        for proxy in self.proxies:
            entry = self.results.setdefault(proxy, {"runs": [], "details": []})
            if "skip" in entry:
                continue
            if entry["runs"]:
                entry["value"] = statistics.median(entry["runs"])
            else:
                errors = entry.get("errors") or ["not measured"]
                entry["failed"] = f"failed: {errors[0]}"
        ref = self.results.get(self.reference, {}).get("value")
        for entry in self.results.values():
            if "value" in entry and ref:
                entry["ratio"] = entry["value"] / ref
        plain = self.results.get("gportmap", {}).get("value")
        for kind in VARIANTS:
            entry = self.results.get(kind, {})
            if "value" in entry and plain:
                entry["ratio_to_gportmap"] = entry["value"] / plain


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.rows: list[Workload] = []
        self.started = time.monotonic()
        self.gportmap_workers = False
        self.large_note = ""
        self.notes: list[str] = []
        self.http_backend: int | None = None
        self.tls_files: TlsFiles | None = None
        self.tls_sessions: dict[str, set[str]] = {}

    def row(self, *args: Any, **kwargs: Any) -> Workload:
        workload = Workload(*args, **kwargs)
        self.rows.append(workload)
        return workload

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def cpu_row(self, row: Workload, per: str, unit: str = "µs") -> Workload:
        """The row under ``row``: the CPU time (user + system) of each proxy's process
        group over each of its measurements, per unit of work (``per``); every proxy
        of ``row`` but the direct path, which has no proxy."""
        kinds = [kind for kind in row.proxies if kind != "direct"]
        return self.row(
            f"{row.key}_cpu", f"{row.title}: proxy CPU per {per}", unit, row.reference, kinds, True,
            label=f"↳ proxy CPU per {per}", under=row.key,
        )  # fmt: skip

    @staticmethod
    def record(
        row: Workload,
        cpu: Workload,
        proxy: Proxy,
        value: float,
        meter: loads.ProxyCpu,
        units: float,
        detail: dict[str, Any] | None = None,
        scale: float = 1e6,
    ) -> None:
        """One measurement: ``value`` in ``row``, and the proxy's CPU over it divided
        by ``units`` of work (in 1/``scale`` s) in ``cpu``."""
        row.add(proxy.kind, value, detail)
        per = meter.per(units, scale)
        if proxy.kind in cpu.proxies:
            if per is None:
                cpu.fail(proxy.kind, "no work measured")
            else:
                cpu.add(proxy.kind, per, {"proxy_cpu_s": meter.seconds, "units": units})

    @staticmethod
    def pgid(proxy: Proxy) -> int | None:
        """The process group whose CPU counts for ``proxy`` (None: the direct path)."""
        return proxy.proc.pid if proxy.proc is not None else None

    # --- helpers ---------------------------------------------------------------------

    def start_target(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, int]:
        """A target that prints its port on its first stdout line."""
        proc = self.procs.start(name, cmd, stdout=subprocess.PIPE)
        line = loads.first_lines([proc], time.monotonic() + 20)[0]
        if not line.isdigit():
            raise RuntimeError(f"{name} did not start: {self.procs.log_tail(name)}")
        return proc, int(line)

    def start_nginx_http(self) -> int:
        confdir = self.workdir / "http-backend"
        confdir.mkdir(exist_ok=True)
        port = anchors.free_port()
        (confdir / "nginx.conf").write_text(anchors.nginx_http_config(confdir, port))
        proc = self.procs.start(
            "http-backend",
            [
                "nginx",
                "-p",
                str(confdir),
                "-c",
                str(confdir / "nginx.conf"),
                "-e",
                str(confdir / "error.log"),
            ],
        )
        anchors.wait_tcp_listening(port, proc)
        return port

    def certificate(self) -> TlsFiles:
        """The one certificate every TLS listener of this run serves (made once)."""
        if self.tls_files is None:
            self.tls_files = make_certificate(self.workdir / "tls")
        return self.tls_files

    def start_proxies(
        self,
        rows: list[Workload],
        kinds: list[str],
        target: int,
        transport: str = "tcp",
        workers: int = 1,
        udp_probe: bytes = b"?",
    ) -> list[Proxy]:
        """Start every runnable kind; the rows of one that cannot run say why."""
        started: list[Proxy] = []
        try:
            tls = self.certificate() if transport == "tls" else None
        except RuntimeError as exc:
            for row in rows:
                for kind in kinds:
                    row.skip(kind, f"skipped: {exc}")
            return started
        for kind in kinds:
            why = anchors.missing_tool(kind, transport)
            if why is None and kind == "gportmap" and workers > 1 and not self.gportmap_workers:
                why = "skipped: gportmap has no --workers"
            if why is None:
                try:
                    proxy = start_proxy(self.procs, self.workdir, kind, target, transport, workers, tls, udp_probe)
                    started.append(proxy)
                    if proxy.session:
                        self.tls_sessions.setdefault(proxy.kind, set()).add(proxy.session)
                    continue
                except RuntimeError as exc:
                    why = f"failed: {exc}"
            for row in rows:
                if why.startswith("skipped"):
                    row.skip(kind, why)
                else:
                    row.results[kind] = {"runs": [], "details": [], "errors": [why[len("failed: ") :]]}
        return started

    def lacks(self, rows: list[Workload], tools: list[str]) -> bool:
        """Whether a load generator or target of ``rows`` is missing; if so, every
        proxy of those rows is skipped with the reason."""
        for tool in tools:
            if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
                for row in rows:
                    for kind in row.proxies:
                        row.skip(kind, f"skipped: {tool} is not installed (bench/run installs it)")
                return True
        return False

    def stop_proxies(self, proxies: list[Proxy]) -> None:
        for proxy in proxies:
            if proxy.proc is not None:
                self.procs.stop(proxy.proc)

    def rounds(
        self, proxies: list[Proxy], measure: Callable[[Proxy], None], warmup: Callable[[Proxy], None] | None
    ) -> None:
        """Each proxy measured once per round, the order rotating: drift hits all alike."""
        if warmup is not None:
            for proxy in proxies:
                try:
                    warmup(proxy)
                except (RuntimeError, OSError) as exc:
                    self.say(f"warm-up of {proxy.kind} failed: {exc}")
        for r in range(self.args.runs):
            order = proxies[r % len(proxies) :] + proxies[: r % len(proxies)] if proxies else []
            for proxy in order:
                measure(proxy)

    # --- workloads -------------------------------------------------------------------

    def tcp_bulk(self) -> None:
        rows = {
            streams: self.row(
                f"bulk_{streams}",
                f"TCP bulk, {streams} stream{'s' if streams > 1 else ''} (iperf3)",
                "Gbit/s",
                "haproxy-splice",
                TCP_PROXIES,
            )
            for streams in (1, 8)
        }
        cpu_rows = {streams: self.cpu_row(row, "GB", "ms") for streams, row in rows.items()}
        if self.lacks([*rows.values(), *cpu_rows.values()], ["iperf3"]):
            return
        # The proxies first, so that their readiness probes find no iperf3 server to
        # disturb; then the server, seen listening without a connection.
        port = anchors.free_port()
        proxies = self.start_proxies([*rows.values(), *cpu_rows.values()], TCP_PROXIES, port)
        server = self.procs.start("iperf3-server", ["iperf3", "-s", "-B", LOOPBACK, "-p", str(port)])
        deadline = time.monotonic() + 20
        while not loads.tcp_listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                self.stop_proxies(proxies)
                raise RuntimeError(f"iperf3 -s did not listen: {self.procs.log_tail('iperf3-server')}")
            time.sleep(0.05)
        seconds = max(1, round(self.args.seconds))
        try:
            for streams, row in rows.items():
                self.say(f"{row.title}: {', '.join(p.kind for p in proxies)}")

                def measure(proxy: Proxy, streams: int = streams, row: Workload = row) -> None:
                    cpu = cpu_rows[streams]
                    try:
                        with loads.ProxyCpu(self.pgid(proxy)) as meter:
                            result = loads.iperf3_run(proxy.port, streams, seconds)
                    except RuntimeError as exc:
                        row.fail(proxy.kind, str(exc))
                        cpu.fail(proxy.kind, str(exc))
                        return
                    self.record(row, cpu, proxy, result["gbps"], meter, result["bytes"] / 1e9, result, scale=1e3)

                self.rounds(proxies, measure, None)
        finally:
            self.stop_proxies(proxies)
            self.procs.stop(server)

    def http(self, workers: int = 1) -> None:
        """wrk through each proxy to the nginx HTTP backend, keep-alive and a new
        connection per request, wrk on each of ``WRK_THREADS``: req/s (and p99 on
        keep-alive) with the proxy's CPU per request under each. One proxy process
        (and gportmap as users run it beside the stripped-down one), or ``workers``
        workers/threads of each."""
        kinds = TCP_PROXIES + VARIANTS if workers == 1 else WORKER_PROXIES
        prefix, lead = ("", "HTTP") if workers == 1 else (f"w{workers}_", f"{workers} workers/threads: HTTP")
        plan: list[tuple[int, bool, Workload, Workload, Workload | None]] = []
        for threads in WRK_THREADS:
            suffix = "" if threads == 1 else f"_t{threads}"
            for conn_close in (False, True):
                name = "close" if conn_close else "keepalive"
                what = "new connection per request" if conn_close else "keep-alive"
                row = self.row(
                    f"{prefix}http_{name}{suffix}",
                    f"{lead} {what} (wrk -t{threads} -c{WRK_CONNECTIONS})",
                    "req/s",
                    "haproxy",
                    kinds,
                )
                cpu = self.cpu_row(row, "new connection" if conn_close else "request")
                p99 = None
                if workers == 1 and not conn_close:
                    p99 = self.row(
                        f"http_keepalive_p99{suffix}",
                        f"HTTP keep-alive, p99 latency (wrk -t{threads})",
                        "ms",
                        "haproxy",
                        TCP_PROXIES,
                        lower_is_better=True,
                    )
                plan.append((threads, conn_close, row, cpu, p99))
        rows = [r for entry in plan for r in entry[2:] if r is not None]
        if self.lacks(rows, ["nginx", "wrk"]):
            return
        if self.http_backend is None:
            self.http_backend = self.start_nginx_http()
        proxies = self.start_proxies(rows, kinds, self.http_backend, "tcp", workers)
        seconds = max(1, round(self.args.seconds))
        try:
            for threads, conn_close, row, cpu, p99 in plan:
                self.say(f"{row.title}: {', '.join(p.kind for p in proxies)}")

                def measure(
                    proxy: Proxy,
                    threads: int = threads,
                    conn_close: bool = conn_close,
                    row: Workload = row,
                    cpu: Workload = cpu,
                    p99: Workload | None = p99,
                ) -> None:
                    try:
                        result = loads.wrk_http(
                            proxy.port, seconds, WRK_CONNECTIONS, conn_close, threads=threads,
                            cpu_pgid=self.pgid(proxy),
                        )  # fmt: skip
                    except RuntimeError as exc:
                        for failed in (row, cpu, p99):
                            if failed is not None:
                                failed.fail(proxy.kind, str(exc))
                        return
                    row.add(proxy.kind, result["rate"], result)
                    if "cpu_us_per_request" in result:
                        cpu.add(proxy.kind, result["cpu_us_per_request"])
                    if p99 is not None:
                        p99.add(proxy.kind, result["p99_ms"])

                def warmup(proxy: Proxy, conn_close: bool = conn_close, threads: int = threads) -> None:
                    loads.wrk_http(proxy.port, 1, WRK_CONNECTIONS, conn_close, threads=threads)

                # Warmed once per kind of traffic: the -t2 pass follows the -t1 one.
                self.rounds(proxies, measure, None if self.args.quick or threads != 1 else warmup)
        finally:
            self.stop_proxies(proxies)

    def held(self, label: str, count: int) -> None:
        kinds = TCP_PROXIES
        pss = self.row(
            f"held_{label}_pss",
            f"{count} connections held: PSS growth (anonymous)",
            "MB",
            "haproxy",
            kinds,
            True,
        )
        rss = self.row(
            f"held_{label}_rss", f"{count} connections held: RSS (whole proxy)", "MB", "haproxy", kinds, True
        )
        holder, port = self.start_target(f"holder-{label}", [sys.executable, "-c", loads.HOLDER])
        try:
            for kind in kinds:
                if kind == "direct":
                    for row in (pss, rss):
                        row.skip(kind, "skipped: no proxy process on the direct path")
                    continue
                if kind == "socat" and count > self.args.socat_max_held:
                    for row in (pss, rss):
                        row.skip(
                            kind,
                            f"skipped: socat forks a process per connection; {count} processes exceed "
                            f"this run's cap of {self.args.socat_max_held}",
                        )
                    continue
                for _ in range(self.args.memory_runs):
                    proxies = self.start_proxies([pss, rss], [kind], port)
                    if not proxies:
                        break
                    self.say(f"{count} held connections through {kind}")
                    try:
                        result = loads.hold_connections(
                            self.procs,
                            proxies[0].proc.pid,
                            proxies[0].port,
                            count,
                            settle=0.2 if self.args.quick else 0.5,
                        )
                        pss.add(kind, result["pss_anon_growth_mb"], result)
                        rss.add(kind, result["rss_mb"])
                    except RuntimeError as exc:
                        pss.fail(kind, str(exc))
                        rss.fail(kind, str(exc))
                    finally:
                        self.stop_proxies(proxies)
        finally:
            self.procs.stop(holder)

    def tls_http(self) -> None:
        """wrk over https to each proxy terminating TLS in front of the HTTP backend,
        wrk on each of ``WRK_THREADS``: req/s, and the proxy's CPU time per request
        (what the user pays for it)."""
        plan: list[tuple[int, bool, Workload, Workload]] = []
        for threads in WRK_THREADS:
            suffix = "" if threads == 1 else f"_t{threads}"
            for conn_close, key, title in (
                (False, "tls_keepalive", f"TLS termination, HTTP keep-alive (wrk -t{threads} -c{WRK_CONNECTIONS})"),
                (True, "tls_close", f"TLS termination, new connection per request (wrk -t{threads})"),
            ):
                rate = self.row(f"{key}{suffix}", title, "req/s", "haproxy", TLS_PROXIES)
                plan.append((threads, conn_close, rate, self.cpu_row(rate, "new connection" if conn_close else "request")))
        every = [row for entry in plan for row in entry[2:]]
        if self.lacks(every, ["nginx", "wrk"]):
            return
        if self.http_backend is None:
            self.http_backend = self.start_nginx_http()
        proxies = self.start_proxies(every, TLS_PROXIES, self.http_backend, "tls")
        seconds = max(1, round(self.args.seconds))
        try:
            for threads, conn_close, rate, cpu in plan:
                self.say(f"{rate.title}: {', '.join(p.kind for p in proxies)}")

                def measure(
                    proxy: Proxy,
                    rate: Workload = rate,
                    cpu: Workload = cpu,
                    conn_close: bool = conn_close,
                    threads: int = threads,
                ) -> None:
                    try:
                        result = loads.wrk_http(
                            proxy.port, seconds, WRK_CONNECTIONS, conn_close, tls=True,
                            cpu_pgid=self.pgid(proxy), threads=threads,
                        )  # fmt: skip
                    except RuntimeError as exc:
                        rate.fail(proxy.kind, str(exc))
                        cpu.fail(proxy.kind, str(exc))
                        return
                    rate.add(proxy.kind, result["rate"], result)
                    cpu.add(proxy.kind, result["cpu_us_per_request"])

                def warmup(proxy: Proxy, conn_close: bool = conn_close, threads: int = threads) -> None:
                    loads.wrk_http(proxy.port, 1, WRK_CONNECTIONS, conn_close, tls=True, threads=threads)

                self.rounds(proxies, measure, None if self.args.quick or threads != 1 else warmup)
        finally:
            self.stop_proxies(proxies)

    def held_per_connection(self, mode: str, count: int) -> None:
        """``count`` TLS (handshake done) or WebSocket (upgraded) connections held idle
        through a fresh proxy each: PSS and RSS growth per connection, next to HAProxy
        and nginx terminating TLS, or websockify (a process per connection, so it holds
        at most ``--websockify-max-held``)."""
        label, kinds, reference, transport = {
            "tls": ("TLS", TLS_PROXIES, "haproxy", "tls"),
            "websocket": ("WebSocket", WS_PROXIES, "websockify", "websocket"),
        }[mode]
        pss = self.row(
            f"held_{mode}_pss",
            f"{count} {label} connections held: PSS growth (anonymous) per connection",
            "KB",
            reference,
            kinds,
            True,
        )
        rss = self.row(
            f"held_{mode}_rss",
            f"{count} {label} connections held: RSS growth per connection",
            "KB",
            reference,
            kinds,
            True,
        )
        holder, port = self.start_target(f"holder-{mode}", [sys.executable, "-c", loads.HOLDER])
        try:
            for kind in kinds:
                held = count
                if kind == "websockify" and count > self.args.websockify_max_held:
                    held = self.args.websockify_max_held
                    self.notes.append(
                        "WebSocket connections held: websockify forks a process per connection, so it "
                        f"held {held} (--websockify-max-held), not {count}; its figures are per "
                        "connection all the same"
                    )
                for _ in range(self.args.memory_runs):
                    proxies = self.start_proxies([pss, rss], [kind], port, transport)
                    if not proxies:
                        break
                    self.say(f"{held} held {label} connections through {kind}")
                    try:
                        result = loads.hold_connections(
                            self.procs,
                            proxies[0].proc.pid,
                            proxies[0].port,
                            held,
                            settle=0.2 if self.args.quick else 0.5,
                            mode=mode,
                        )
                        pss.add(kind, result["pss_anon_per_connection_kb"], result)
                        rss.add(kind, result["rss_per_connection_kb"])
                    except RuntimeError as exc:
                        pss.fail(kind, str(exc))
                        rss.fail(kind, str(exc))
                    finally:
                        self.stop_proxies(proxies)
        finally:
            self.procs.stop(holder)

    def tls_note(self) -> str:
        """Whether every TLS listener negotiated the same protocol and cipher with the
        bench's client (the readiness probe's handshake, OpenSSL's defaults)."""
        seen = {session for sessions in self.tls_sessions.values() for session in sessions}
        if not seen:
            return ""
        if len(seen) == 1:
            session = seen.pop()
            handshakes = (
                "resumed handshakes (wrk offers the session of its previous connection)"
                if "resumes sessions" in session
                else "full handshakes"
            )
            return (
                f"TLS rows: every proxy served the same ECDSA P-256 certificate and negotiated {session}; "
                f"the new-connection row is {handshakes}"
            )
        listed = "; ".join(
            f"{HEADINGS.get(kind, kind)} {', '.join(sorted(sessions))}"
            for kind, sessions in sorted(self.tls_sessions.items())
        )
        return f"TLS rows: the proxies negotiated different sessions ({listed}): compare with care"

    def udp(self) -> None:
        import udp_echo

        rows = {
            clients: self.row(
                f"udp_{clients}",
                f"UDP 64-byte echo, {clients} client port{'s' if clients > 1 else ''}",
                "packets/s",
                "nginx",
                UDP_PROXIES + VARIANTS,
            )
            for clients in (1, 50)
        }
        # A round trip is two datagrams through the proxy: the request and the echo.
        cpu_rows = {clients: self.cpu_row(row, "datagram") for clients, row in rows.items()}
        every = [*rows.values(), *cpu_rows.values()]
        echo, port = self.start_target("udp-echo", [sys.executable, "-c", udp_echo.ECHO])
        proxies = self.start_proxies(every, UDP_PROXIES + VARIANTS, port, "udp")
        try:
            for clients, row in rows.items():
                self.say(f"{row.title}: {', '.join(p.kind for p in proxies)}")

                def measure(proxy: Proxy, clients: int = clients, row: Workload = row) -> None:
                    cpu = cpu_rows[clients]
                    try:
                        with loads.ProxyCpu(self.pgid(proxy)) as meter:
                            started = time.monotonic()
                            rate, lost = udp_echo.echo_rate(proxy.port, clients, self.args.seconds)
                            elapsed = time.monotonic() - started
                    except OSError as exc:
                        row.fail(proxy.kind, repr(exc))
                        cpu.fail(proxy.kind, repr(exc))
                        return
                    if rate > 0:
                        self.record(row, cpu, proxy, rate, meter, 2 * rate * elapsed, {"lost": lost})
                    else:
                        row.fail(proxy.kind, f"no datagram came back ({lost} lost)")
                        cpu.fail(proxy.kind, f"no datagram came back ({lost} lost)")

                def warmup(proxy: Proxy, clients: int = clients) -> None:
                    udp_echo.echo_rate(proxy.port, clients, 0.5)  # sessions, socat's children

                self.rounds(proxies, measure, warmup)
        finally:
            self.stop_proxies(proxies)
            self.procs.stop(echo)

    def websocket(self) -> None:
        import websocket as wsclient
        import ws_bench

        wsclient.setdefaulttimeout(15)  # a stalled bridge fails the run instead of hanging it
        rows = {
            65536: self.row(
                "ws_64k", "WebSocket to TCP echo, 64 KiB messages", "MB/s", "websockify", WS_PROXIES
            ),
            32: self.row(
                "ws_32", "WebSocket to TCP echo, 32-byte messages", "msg/s", "websockify", WS_PROXIES
            ),
        }
        # Per GB echoed (each byte crosses the bridge both ways), per message echoed.
        cpu_rows = {65536: self.cpu_row(rows[65536], "GB echoed", "ms"), 32: self.cpu_row(rows[32], "message echoed")}
        echo, port = self.start_target("ws-echo", [sys.executable, "-c", ws_bench.ECHO])
        proxies = self.start_proxies([*rows.values(), *cpu_rows.values()], WS_PROXIES, port, "websocket")
        try:
            for size, row in rows.items():
                self.say(f"{row.title}: {', '.join(p.kind for p in proxies)}")

                def measure(proxy: Proxy, size: int = size, row: Workload = row) -> None:
                    cpu = cpu_rows[size]
                    try:
                        with loads.ProxyCpu(self.pgid(proxy)) as meter:
                            started = time.monotonic()
                            mbps, mps = ws_bench.measure(proxy.port, size, self.args.seconds)
                            elapsed = time.monotonic() - started
                    except (OSError, wsclient.WebSocketException) as exc:
                        row.fail(proxy.kind, repr(exc))
                        cpu.fail(proxy.kind, repr(exc))
                        return
                    if size == 65536:
                        self.record(row, cpu, proxy, mbps, meter, mbps * elapsed / 1e3, scale=1e3)
                    else:
                        self.record(row, cpu, proxy, mps, meter, mps * elapsed)

                def warmup(proxy: Proxy, size: int = size) -> None:
                    try:
                        ws_bench.measure(proxy.port, size, 0.3)
                    except wsclient.WebSocketException as exc:
                        raise RuntimeError(repr(exc)) from None

                self.rounds(proxies, measure, warmup)
        finally:
            self.stop_proxies(proxies)
            self.procs.stop(echo)

    def pool(self) -> None:
        """Issue 17: a pool of 3 (roundrobin) against one target, gportmap and HAProxy
        ``balance roundrobin`` over the same 3 nginx backends, a new connection per
        request, wrk on each of ``WRK_THREADS``, with the proxy's CPU per connection;
        the four take turns in each round (``pool_bench``)."""
        titles = {1: "HTTP new connection per request, 1 target", 3: "HTTP new connection per request, pool of 3 (roundrobin)"}
        # (targets, wrk threads) -> (rate row, CPU row)
        rows: dict[tuple[int, int], tuple[Workload, Workload]] = {}
        for threads in WRK_THREADS:
            for count, title in titles.items():
                rate = self.row(
                    f"pool_close_{count}" + ("" if threads == 1 else f"_t{threads}"),
                    f"{title} (wrk -t{threads})",
                    "req/s",
                    "haproxy",
                    ["gportmap", "haproxy"],
                )
                rows[count, threads] = (rate, self.cpu_row(rate, "new connection"))
        every = [row for pair in rows.values() for row in pair]
        if self.lacks(every, ["nginx", "wrk"]):
            return

        def of_count(count: int) -> list[Workload]:
            return [row for (n, _), pair in rows.items() if n == count for row in pair]

        backend_dir = self.workdir / "pool-backends"
        backend_dir.mkdir(exist_ok=True)
        backends = pool_bench.start_backends(self.procs, backend_dir, 3)
        proxies: list[Proxy] = []
        for name, (kind, count) in pool_bench.KINDS.items():
            why = anchors.missing_tool(kind)
            if why is not None:
                for row in of_count(count):
                    row.skip(kind, why)
                continue
            try:
                proxies.append(pool_bench.start_pool_proxy(self.procs, self.workdir, name, backends))
            except RuntimeError as exc:
                for row in of_count(count):
                    row.fail(kind, str(exc))
        seconds = max(1, round(self.args.seconds))
        try:
            for threads in WRK_THREADS:
                self.say(f"pool of 3 (wrk -t{threads}): {', '.join(p.kind for p in proxies)}")

                def measure(proxy: Proxy, threads: int = threads) -> None:
                    kind, count = pool_bench.KINDS[proxy.kind]
                    rate, cpu = rows[count, threads]
                    try:
                        result = loads.wrk_http(
                            proxy.port, seconds, pool_bench.WRK_CONNECTIONS, True, threads=threads,
                            cpu_pgid=self.pgid(proxy),
                        )  # fmt: skip
                    except RuntimeError as exc:
                        rate.fail(kind, str(exc))
                        cpu.fail(kind, str(exc))
                        return
                    rate.add(kind, result["rate"], result)
                    cpu.add(kind, result["cpu_us_per_request"])

                def warmup(proxy: Proxy) -> None:
                    loads.wrk_http(proxy.port, 1, pool_bench.WRK_CONNECTIONS, True)

                self.rounds(proxies, measure, None if self.args.quick or threads != 1 else warmup)
        finally:
            self.stop_proxies(proxies)
        one, three = (rows[n, 1][0].results.get("gportmap", {}).get("runs") for n in (1, 3))
        if one and three:
            self.notes.append(
                f"pool of 3: gportmap {statistics.median(three) / statistics.median(one):.2f}x its one-target rate"
                " on new connections (same run, wrk -t1)"
            )

    def pgbench(self) -> None:
        """pgbench ``-S`` (select-only: small round trips) and ``-S -C`` (a new
        connection per transaction) through each proxy to a throwaway PostgreSQL, with
        the proxy's CPU per transaction and per new connection (``realclients``)."""
        kinds = PG_PROXIES + VARIANTS
        select = self.row(
            "pg_select", f"PostgreSQL select-only (pgbench -S -c{realclients.PGBENCH_CLIENTS} -j1)", "tps",
            "haproxy", kinds,
        )  # fmt: skip
        select_cpu = self.cpu_row(select, "transaction")
        connect = self.row(
            "pg_connect", f"PostgreSQL, new connection per transaction (pgbench -S -C -c{realclients.PGBENCH_CLIENTS})",
            "tps", "haproxy", kinds,
        )  # fmt: skip
        connect_cpu = self.cpu_row(connect, "new connection")
        every = [select, select_cpu, connect, connect_cpu]
        why = realclients.missing_postgres()
        if why is not None:
            for row in every:
                for kind in row.proxies:
                    row.skip(kind, why)
            return
        server = realclients.start_postgres(self.procs)
        try:
            proxies = self.start_proxies(every, kinds, server.port)
            seconds = max(1, round(self.args.seconds))
            try:
                for row, cpu, connect_each in ((select, select_cpu, False), (connect, connect_cpu, True)):
                    self.say(f"{row.title}: {', '.join(p.kind for p in proxies)}")

                    def measure(
                        proxy: Proxy, row: Workload = row, cpu: Workload = cpu, connect_each: bool = connect_each
                    ) -> None:
                        try:
                            with loads.ProxyCpu(self.pgid(proxy)) as meter:
                                result = realclients.pgbench(proxy.port, seconds, connect_each)
                        except RuntimeError as exc:
                            row.fail(proxy.kind, str(exc))
                            cpu.fail(proxy.kind, str(exc))
                            return
                        self.record(row, cpu, proxy, result["rate"], meter, result["transactions"], result)

                    def warmup(proxy: Proxy, connect_each: bool = connect_each) -> None:
                        realclients.pgbench(proxy.port, 1, connect_each)

                    self.rounds(proxies, measure, None if self.args.quick else warmup)
            finally:
                self.stop_proxies(proxies)
        finally:
            realclients.stop_postgres(self.procs, server)

    def dns(self) -> None:
        """dnsperf from one client port through each proxy's udp listener to dnsmasq:
        queries/s, with the proxy's CPU per query (two datagrams through it)."""
        kinds = DNS_PROXIES + VARIANTS
        row = self.row("dns", "DNS queries to dnsmasq (dnsperf -c1 -q100)", "queries/s", "nginx", kinds)
        cpu = self.cpu_row(row, "query")
        why = realclients.missing_dns()
        if why is not None:
            for each in (row, cpu):
                for kind in each.proxies:
                    each.skip(kind, why)
            return
        queries = realclients.write_query_file(self.workdir)
        server, port = realclients.start_dnsmasq(self.procs)
        try:
            proxies = self.start_proxies([row, cpu], kinds, port, "udp", udp_probe=realclients.dns_query())
            seconds = max(1, round(self.args.seconds))
            try:
                self.say(f"{row.title}: {', '.join(p.kind for p in proxies)}")

                def measure(proxy: Proxy) -> None:
                    try:
                        with loads.ProxyCpu(self.pgid(proxy)) as meter:
                            result = realclients.dnsperf(proxy.port, seconds, queries)
                    except RuntimeError as exc:
                        row.fail(proxy.kind, str(exc))
                        cpu.fail(proxy.kind, str(exc))
                        return
                    self.record(row, cpu, proxy, result["rate"], meter, result["queries"], result)

                def warmup(proxy: Proxy) -> None:
                    realclients.dnsperf(proxy.port, 1, queries)

                self.rounds(proxies, measure, None if self.args.quick else warmup)
            finally:
                self.stop_proxies(proxies)
        finally:
            self.procs.stop(server)

    def run(self) -> None:
        self.gportmap_workers = anchors.gportmap_has_workers()
        hard = anchors.raise_fd_soft_limit()
        # A proxy holding N connections needs 2N descriptors plus its own few.
        reachable = anchors.reachable_connections()
        small, large = (300, 1000) if self.args.quick else (2000, 10000)
        handshaking = min(300 if self.args.quick else 2000, reachable)
        large_reached = min(large, reachable)
        self.large_note = (
            f"{large} requested; {large_reached} reached: the fd hard limit is {hard} and the proxy needs 2 per connection"
            if large_reached < large
            else ""
        )
        steps: list[tuple[str, Callable[..., None], tuple]] = [
            ("bulk", self.tcp_bulk, ()),
            ("http", self.http, ()),
            ("tls", self.tls_http, ()),
            ("held", self.held, ("small", small)),
            ("held", self.held, ("large", large_reached)),
            ("held-tls", self.held_per_connection, ("tls", handshaking)),
            ("held-ws", self.held_per_connection, ("websocket", handshaking)),
            ("udp", self.udp, ()),
            ("websocket", self.websocket, ()),
            ("workers", self.http, (2,)),
            ("pool", self.pool, ()),
            ("pgbench", self.pgbench, ()),
            ("dns", self.dns, ()),
        ]
        if "held" not in self.args.only:
            self.large_note = ""
        for name, step, step_args in steps:
            if name not in self.args.only:
                continue
            first_row = len(self.rows)
            try:
                step(*step_args)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                # A target that would not start: this workload's rows say so, the rest run.
                self.say(f"{step.__name__} failed: {exc}")
                for row in self.rows[first_row:]:
                    for kind in row.proxies:
                        entry = row.results.get(kind, {})
                        if not entry.get("runs") and "skip" not in entry:
                            row.fail(kind, str(exc))
        for row in self.rows:
            row.finish()
        self.notes.insert(0, self.tls_note())
        self.notes = list(dict.fromkeys(note for note in self.notes if note))


# --- output --------------------------------------------------------------------------


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(entry: dict[str, Any] | None, ratio_key: str = "ratio") -> str:
    """A figure with its ratio, or why there is none."""
    if entry is None:
        return ""
    if "value" in entry:
        ratio = f" ({entry[ratio_key]:.2f}x)" if ratio_key in entry else ""
        return fmt(entry["value"]) + ratio
    if "skip" in entry:
        return "skipped"
    return "**failed**"


def variant_lines(row: Workload, used: list[str]) -> list[str]:
    """A line under ``row`` for each gportmap variant it measured: its figure in the
    gportmap column, its ratio to the stripped-down gportmap of the same row."""
    lines = []
    for kind in VARIANTS:
        if kind not in row.proxies or "gportmap" not in used:
            continue
        name = f"{row.label}, {GPORTMAP_VARIANTS[kind]}" if row.label else f"↳ {GPORTMAP_VARIANTS[kind]}"
        cells = [name, row.unit]
        cells += [cell(row.results.get(kind), "ratio_to_gportmap") if c == "gportmap" else "" for c in used]
        cells.append("gportmap (WARNING)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def in_table_order(rows: list[Workload]) -> list[Workload]:
    """``rows`` in the order they were made, each followed by the rows printed under
    it (its CPU row)."""
    keys = {row.key for row in rows}
    below: dict[str, list[Workload]] = {}
    for row in rows:
        if row.under in keys:
            below.setdefault(row.under, []).append(row)
    ordered: list[Workload] = []

    def place(row: Workload) -> None:
        ordered.append(row)
        for child in below.get(row.key, []):
            place(child)

    for row in rows:
        if row.under not in keys:
            place(row)
    return ordered


def markdown(rows: list[Workload]) -> str:
    used = [c for c in COLUMNS if any(c in row.proxies for row in rows)]
    head = ["workload", "unit", *(HEADINGS.get(c, c) for c in used), "ratio to"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in in_table_order(rows):
        cells = [row.label or row.title, row.unit]
        for column in used:
            cells.append(cell(row.results.get(column)) if column in row.proxies else "")
        cells.append(HEADINGS.get(row.reference, row.reference))
        lines.append("| " + " | ".join(cells) + " |")
        lines += variant_lines(row, used)
    reasons: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for proxy, entry in row.results.items():
            why = entry.get("skip") or entry.get("failed")
            if why:
                reasons.setdefault((proxy, why), []).append(row.title)
    notes = [
        f"- {HEADINGS.get(proxy, GPORTMAP_VARIANTS.get(proxy, proxy))}, {'; '.join(titles)}: {why}"
        for (proxy, why), titles in reasons.items()
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 1 s, 300/1000 held connections, 300 TLS/WebSocket ones (3-4 min)",
    )
    parser.add_argument(
        "--runs", type=int, help="rounds per workload, median reported (default 3, quick 1; max 9)"
    )
    parser.add_argument(
        "--seconds", type=float, help="length of one measurement (default 3, quick 1; max 30)"
    )
    parser.add_argument(
        "--memory-runs", type=int, default=1, help="repeats of each held-connections measurement"
    )
    parser.add_argument(
        "--socat-max-held", type=int, default=2000, help="socat forks per connection: hold at most this many"
    )
    parser.add_argument(
        "--websockify-max-held",
        type=int,
        default=200,
        help="websockify forks per connection: hold at most this many WebSocket connections",
    )
    parser.add_argument(
        "--only",
        default=",".join(STEPS),
        help=f"comma-separated workloads to run, of: {', '.join(STEPS)} (default: all)",
    )
    parser.add_argument("--json", type=Path, help="also write every run, median and ratio here")
    args = parser.parse_args()
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(STEPS))
    if unknown:
        parser.error(f"--only: unknown workload(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    args.runs = min(9, max(1, args.runs or (1 if args.quick else 3)))
    args.seconds = min(30.0, max(1.0, args.seconds or (1.0 if args.quick else 3.0)))
    args.memory_runs = min(5, max(1, args.memory_runs))

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: processes stopped

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    started, load_before = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gportmap-compare-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.run()
        finally:
            bench.procs.stop_all()
    elapsed, load_after = time.monotonic() - started, os.getloadavg()
    table = markdown(bench.rows)
    print(table)
    header = (
        f"\n{platform.node()}: {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}; "
        f"{'quick' if args.quick else 'full'} run, {args.runs} round(s) of {args.seconds:g} s, "
        f"{elapsed:.0f} s in all; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after. "
        "Ratio = value / the reference column of the row (for MB, KB, ms and µs, lower is better)."
    )
    if bench.large_note:
        header += f" Held connections: {bench.large_note}."
    for note in bench.notes:
        header += f" {note}."
    print(header)
    if args.json:
        document = {
            "quick": args.quick,
            "runs": args.runs,
            "seconds": args.seconds,
            "elapsed_s": elapsed,
            "only": args.only,
            "load_average": {"before": load_before, "after": load_after},
            "host": {"cores": len(os.sched_getaffinity(0)), "socket_hostname": socket.gethostname()},
            "notes": ([bench.large_note] if bench.large_note else []) + bench.notes,
            "workloads": {
                row.key: {
                    "title": row.title,
                    "label": row.label or row.title,
                    "unit": row.unit,
                    "reference": row.reference,
                    "lower_is_better": row.lower_is_better,
                    "results": row.results,
                }
                for row in bench.rows
            },
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
