#!/usr/bin/env python3
"""Port ranges at scale (issue 18, SPEC §9): one rule of 1, 100, 1,000 and 10,000
ports in gportmap, beside the same listeners in HAProxy (``bind 127.0.0.1:A-B``) and
nginx stream (``listen 127.0.0.1:A-B``).

    bench/run ranges                         # or: python bench/ranges.py
    python bench/ranges.py --quick --json /tmp/ranges.json

Per size and proxy, side by side in each round (the order rotating):

- start: from the spawn until the last port of the range answers;
- RSS of the proxy's process group once it serves (KiB), and its growth per port;
- reload: the target of the range changes (gportmap: the rules file and ``POST
  /reload``; HAProxy in master-worker mode: SIGUSR2; nginx: SIGHUP) until the last
  port answers with the new target's banner;
- stall: the longest round trip of a probe connection to another listener (a
  single-port rule of the same process) while the reload runs: how long the reload
  holds the event loop. The probe connects, reads a banner and closes, one after the
  other, bounded by the reload's own deadline.

Targets are banner servers in this process (one selector thread): each connection
gets the port it arrived on. Ports are taken below 20,000 (the tests' single ports
live above), every one checked free. Nothing passes or fails on a number here: the
machine is shared; ratios are to HAProxy, measured in the same rounds. Bounded: the
quick run (sizes 1, 100, 1,000, one round) takes well under a minute, the full one
(all sizes, two rounds) under two.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import NGINX_STREAM_MODULE, Processes, gportmap_command, raise_fd_soft_limit  # noqa: E402
from common import LOOPBACK  # noqa: E402

PROXIES = ("gportmap", "haproxy", "nginx")
SIZES = (1, 100, 1000, 10000)
QUICK_SIZES = (1, 100, 1000)
#: Seconds a start or a reload may take before the row says it failed.
DEADLINE = 60.0


# -- ports and targets ----------------------------------------------------------------------


class Blocks:
    """Consecutive free ports below 20,000, each handed out once."""

    def __init__(self, low: int = 2000, high: int = 19999) -> None:
        self.next, self.high = low + (os.getpid() * 131) % 4000, high

    @staticmethod
    def _free(port: int) -> bool:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((LOOPBACK, port))
                except OSError:
                    return False
        return True

    def take(self, count: int) -> range:
        for _ in range(100):
            if self.next + count > self.high:
                self.next = 2000
            block = range(self.next, self.next + count)
            bad = next((port for port in block if not self._free(port)), None)
            self.next = (bad + 1) if bad is not None else block.stop
            if bad is None:
                return block
        raise RuntimeError(f"no {count} free consecutive ports below {self.high + 1}")


class Banners:
    """One thread answering each connection on ``ports`` with the port, then closing."""

    def __init__(self, ports: list[int]) -> None:
        self.selector = selectors.DefaultSelector()
        self.sockets = []
        for port in ports:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, port))
            sock.listen(1024)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, port)
            self.sockets.append(sock)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.1):
                try:
                    conn, _ = key.fileobj.accept()
                    conn.sendall(b"%d\n" % key.data)
                    conn.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.sockets:
            sock.close()


def banner(port: int, timeout: float = 2.0) -> int | None:
    """The banner behind ``port``, or None (refused, reset, nothing in time)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(32)
                if not chunk:
                    return None
                data += chunk
            return int(data)
    except (OSError, ValueError):
        return None


def wait_banner(port: int, expected: int, deadline: float) -> float:
    """Seconds until ``port`` answers with ``expected``; RuntimeError past ``deadline``."""
    began = time.monotonic()
    while time.monotonic() - began < deadline:
        if banner(port, 1.0) == expected:
            return time.monotonic() - began
        time.sleep(0.005)
    raise RuntimeError(f"port {port} did not answer with {expected} within {deadline:g}s")


class Probe:
    """Connects to ``port`` over and over (one at a time) while running: the longest
    round trip seen, in ms. Bounded by ``stop`` and a count."""

    def __init__(self, port: int, expected: int) -> None:
        self.port, self.expected = port, expected
        self.longest = 0.0
        self.failures = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for _ in range(200_000):
            if self.stop.is_set():
                return
            began = time.monotonic()
            if banner(self.port, 5.0) != self.expected:
                self.failures += 1
            self.longest = max(self.longest, (time.monotonic() - began) * 1000)

    def finish(self) -> float:
        self.stop.set()
        self.thread.join(10)
        return self.longest


# -- the proxies -----------------------------------------------------------------------------


def group_rss_kib(pid: int) -> int:
    """RSS of every process in the process group led by ``pid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            pgrp = int(stat.rsplit(")", 1)[1].split()[2])
            if pgrp != pid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total


class Running:
    """One proxy serving a range and a probe port, reloadable to another target."""

    def __init__(
        self, kind: str, workdir: Path, listen: range, probe: int, targets: tuple[int, int, int], admin: int
    ) -> None:
        self.kind, self.workdir, self.listen, self.probe = kind, workdir, listen, probe
        self.targets = targets  # (range target, its replacement, probe target)
        self.admin_port = admin  # gportmap's admin endpoint
        self.config = workdir / {"gportmap": "rules.json", "haproxy": "haproxy.cfg", "nginx": "nginx.conf"}[kind]

    def write(self, target: int) -> None:
        first, last = self.listen.start, self.listen[-1]
        span = f"{first}-{last}" if last > first else str(first)
        probe_target = self.targets[2]
        if self.kind == "gportmap":
            rules = [
                {"name": "range", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": span if last > first else first,
                 "targetHost": LOOPBACK, "targetPort": target},
                {"name": "probe", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": self.probe,
                 "targetHost": LOOPBACK, "targetPort": probe_target},
            ]
            settings = {"admin": {"listen": f"{LOOPBACK}:{self.admin_port}"}, "watch": False, "statsInterval": 0,
                        "logLevel": "WARNING", "maxConnections": 1000}
            self.config.write_text(json.dumps({"settings": settings, "rules": rules}))
        elif self.kind == "haproxy":
            bind = f"{LOOPBACK}:{span}"
            self.config.write_text(f"""global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend range
    bind {bind}
    default_backend range
backend range
    server t {LOOPBACK}:{target}
frontend probe
    bind {LOOPBACK}:{self.probe}
    default_backend probe
backend probe
    server p {LOOPBACK}:{probe_target}
""")
        else:
            self.config.write_text(f"""load_module {NGINX_STREAM_MODULE};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log error;
events {{ worker_connections {len(self.listen) + 2000}; }}
stream {{
    server {{ listen {LOOPBACK}:{span}; proxy_pass {LOOPBACK}:{target}; }}
    server {{ listen {LOOPBACK}:{self.probe}; proxy_pass {LOOPBACK}:{probe_target}; }}
}}
""")

    def start(self, procs: Processes) -> tuple[float, int]:
        """(seconds until the last port answers, RSS KiB then)."""
        self.write(self.targets[0])
        cmd = {
            "gportmap": [*gportmap_command(), str(self.config), "--log-format", "json"],
            "haproxy": ["haproxy", "-W", "-db", "-f", str(self.config)],
            "nginx": ["nginx", "-p", str(self.workdir), "-c", str(self.config), "-e", str(self.workdir / "error.log")],
        }[self.kind]
        began = time.monotonic()
        self.proc = procs.start(f"{self.kind}-{len(self.listen)}-{self.listen.start}", cmd)
        wait_banner(self.listen[-1], self.targets[0], DEADLINE)
        started = time.monotonic() - began
        wait_banner(self.listen.start, self.targets[0], DEADLINE)
        wait_banner(self.probe, self.targets[2], DEADLINE)
        if self.kind == "gportmap":
            wait_until(lambda: self._admin_up(), DEADLINE)
        time.sleep(0.2)  # settle: workers forked, first allocations done (the same for every proxy)
        return started, group_rss_kib(self.proc.pid)

    def _admin_up(self) -> bool:
        try:
            urllib.request.urlopen(f"http://{LOOPBACK}:{self.admin_port}/healthz", timeout=2).read()
            return True
        except (OSError, ValueError):  # http.client's errors are ValueErrors or OSErrors
            return False

    def reload(self) -> tuple[float, float]:
        """(seconds until the last port answers with the new target, the probe's
        longest round trip meanwhile in ms)."""
        self.write(self.targets[1])
        probe = Probe(self.probe, self.targets[2])
        began = time.monotonic()
        try:
            if self.kind == "gportmap":
                request = urllib.request.Request(f"http://{LOOPBACK}:{self.admin_port}/reload", method="POST")
                urllib.request.urlopen(request, timeout=DEADLINE).read()
            elif self.kind == "haproxy":
                os.kill(self.proc.pid, signal.SIGUSR2)
            else:
                os.kill(self.proc.pid, signal.SIGHUP)
            wait_banner(self.listen[-1], self.targets[1], DEADLINE)
            reloaded = time.monotonic() - began
        finally:
            stall = probe.finish()
        return reloaded, stall

    def stop(self, procs: Processes) -> float:
        began = time.monotonic()
        procs.stop(self.proc)
        return time.monotonic() - began


def wait_until(condition: Any, deadline: float) -> None:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.02)


# -- the run -------------------------------------------------------------------------------------

METRICS = (
    ("start", "start until every port answers", "s"),
    ("rss", "RSS serving", "MiB"),
    ("reload", "reload after a target change", "s"),
    ("stall", "longest probe round trip during the reload", "ms"),
    ("stop", "stop (SIGTERM until exit)", "s"),
)


def measure(sizes: tuple[int, ...], rounds: int, workdir: Path) -> dict[str, Any]:
    raise_fd_soft_limit()
    procs = Processes(workdir)
    blocks = Blocks()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    targets = blocks.take(3)
    banners = Banners(list(targets))
    try:
        for size in sizes:
            # one after the other on the same ports (each stops before the next starts)
            listen, probe, admin = blocks.take(size), blocks.take(1).start, blocks.take(1).start
            for round_ in range(rounds):
                order = PROXIES[round_ % 3:] + PROXIES[:round_ % 3]
                for kind in order:
                    row = results.setdefault(str(size), {}).setdefault(kind, {})
                    confdir = Path(tempfile.mkdtemp(prefix=f"{kind}-{size}-", dir=workdir))
                    running = Running(kind, confdir, listen, probe, (targets[0], targets[1], targets[2]), admin)
                    try:
                        started, rss = running.start(procs)
                        reloaded, stall = running.reload()
                        stopped = running.stop(procs)
                    except (RuntimeError, OSError) as exc:
                        row.setdefault("errors", []).append(str(exc))  # type: ignore[arg-type]
                        procs.stop_all()
                        continue
                    for key, value in (("start", started), ("rss", rss / 1024), ("reload", reloaded),
                                       ("stall", stall), ("stop", stopped)):
                        row.setdefault(key, []).append(value)
    finally:
        procs.stop_all()
        banners.close()
    return {
        size: {
            kind: {key: statistics.median(values) if key != "errors" else values for key, values in row.items()}
            for kind, row in by_kind.items()
        }
        for size, by_kind in results.items()
    }


def growth(results: dict[str, Any], kind: str, key: str, sizes: tuple[int, ...]) -> float | None:
    """Per port, between the smallest and the largest size."""
    low, high = str(sizes[0]), str(sizes[-1])
    try:
        return (results[high][kind][key] - results[low][kind][key]) / (sizes[-1] - sizes[0])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def markdown(results: dict[str, Any], sizes: tuple[int, ...]) -> str:
    lines = ["| ports | measure | gportmap | HAProxy | nginx stream | gportmap / HAProxy | gportmap / nginx |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for size in sizes:
        for key, title, unit in METRICS:
            row = results.get(str(size), {})
            values = [row.get(kind, {}).get(key) for kind in PROXIES]
            cells = [f"{value:,.3g} {unit}" if isinstance(value, float | int) else "failed" for value in values]
            ratios = [
                f"{values[0] / other:.2f}x" if isinstance(values[0], float | int) and isinstance(other, float | int) and other else "-"
                for other in values[1:]
            ]
            lines.append(f"| {size:,} | {title} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    lines.append("")
    lines.append("Growth per port (largest size against the smallest):")
    lines.append("")
    lines.append("| measure | gportmap | HAProxy | nginx stream |")
    lines.append("| --- | ---: | ---: | ---: |")
    for key, title, unit in (("rss", "RSS", "KiB"), ("start", "start", "µs"), ("reload", "reload", "µs")):
        scale = 1024 if key == "rss" else 1e6
        cells = []
        for kind in PROXIES:
            value = growth(results, kind, key, sizes)
            cells.append(f"{value * scale:,.2f} {unit}" if value is not None else "-")
        lines.append(f"| {title} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1, 100 and 1,000, one round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per size (default 2; quick: 1)")
    parser.add_argument("--sizes", default=None, help="comma-separated port counts (default 1,100,1000,10000)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    sizes = tuple(int(size) for size in args.sizes.split(",")) if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    rounds = args.rounds or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory(prefix="gportmap-ranges-") as tmp:
        results = measure(sizes, rounds, Path(tmp))
    print(markdown(results, sizes))
    if args.json is not None:
        args.json.write_text(json.dumps({"quick": args.quick, "sizes": list(sizes), "rounds": rounds,
                                         "results": results}, indent=2))
    failed = [f"{size}/{kind}: {row['errors'][0]}" for size, by_kind in results.items()
              for kind, row in by_kind.items() if "errors" in row and "start" not in row]
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
