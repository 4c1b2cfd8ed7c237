#!/usr/bin/env python3
"""TCP throughput and round-trip rate: gportmap side by side with the alternatives.

Runs the same traffic, in one run, directly to the target, through gportmap,
through gportmap with its byte counters patched out (the cost of counting), and
through socat when it is installed. Prints medians of --runs and ratios, never
absolute pass/fail: the machine is shared (2 cores for client, proxy and target).

Traffic stays on 127.0.0.1; every loop is bounded in time and count.

    python bench/tcp_bench.py --seconds 3 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LOOPBACK, bench_rules, free_port, stop, wait_listening

CHUNK = 1 << 20

TARGET = r"""
import socket, sys, threading
mode = sys.argv[1]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(64)
print(srv.getsockname()[1], flush=True)
def sink(conn):
    buf = bytearray(1 << 20); total = 0
    while n := conn.recv_into(buf):
        total += n
    conn.sendall(str(total).encode()); conn.close()
def echo(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=sink if mode == "sink" else echo, args=(conn,), daemon=True).start()
"""

# gportmap with the relay's counting turned into no-ops: what counting costs.
NO_COUNTERS = r"""
import sys
from gevent import monkey
monkey.patch_all()
import gportmap.stats as stats
stats.Connection.add_received = lambda self, n: None
stats.Connection.add_sent = lambda self, n: None
from gportmap.cli import main
sys.exit(main())
"""


class Proxy:
    """One way of reaching the target: direct, gportmap, gportmap without counters, socat."""

    def __init__(self, kind: str, target_port: int, workdir: Path) -> None:
        self.kind, self.proc = kind, None
        if kind == "direct":
            self.port = target_port
            return
        self.port = free_port()
        if kind == "socat":
            cmd = ["socat", f"TCP-LISTEN:{self.port},bind={LOOPBACK},fork,reuseaddr", f"TCP:{LOOPBACK}:{target_port},nodelay"]
        else:
            rules = workdir / f"{kind}.json"
            rules.write_text(json.dumps(bench_rules(
                {"protocol": "tcp", "listenHost": LOOPBACK, "listenPort": self.port,
                 "targetHost": LOOPBACK, "targetPort": target_port}
            )))
            head = [sys.executable, "-c", NO_COUNTERS] if kind == "gportmap-nocounters" else [sys.executable, "-m", "gportmap"]
            cmd = [*head, str(rules)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def bulk(port: int, seconds: float) -> float:
    """One stream, 1 MiB writes for ``seconds``: bytes per second the target counted."""
    payload = memoryview(os.urandom(CHUNK))
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        start = time.monotonic()
        sent, limit = 0, 64 << 30
        while time.monotonic() - start < seconds and sent < limit:
            sock.sendall(payload)
            sent += CHUNK
        sock.shutdown(socket.SHUT_WR)
        counted = int(sock.recv(64))
        elapsed = time.monotonic() - start
    assert counted == sent, (counted, sent)
    return sent / elapsed


def round_trips(port: int, seconds: float) -> float:
    """64-byte request/response on one connection for ``seconds``: round trips per second."""
    message = b"x" * 64
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start, count = time.monotonic(), 0
        while time.monotonic() - start < seconds and count < 10_000_000:
            sock.sendall(message)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            count += 1
        return count / (time.monotonic() - start)


def connections(port: int, seconds: float) -> float:
    """A new connection per 64-byte round trip: connections per second."""
    start, count = time.monotonic(), 0
    while time.monotonic() - start < seconds and count < 1_000_000:
        with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
            sock.sendall(b"y" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
        count += 1
    return count / (time.monotonic() - start)


WORKLOADS = {"bulk": ("sink", bulk, "MB/s", 1e-6), "round_trips": ("echo", round_trips, "rt/s", 1), "connections": ("echo", connections, "conn/s", 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one measurement (max 30)")
    parser.add_argument("--runs", type=int, default=3, help="measurements per mode, median reported (max 9)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    seconds, runs = min(args.seconds, 30.0), min(args.runs, 9)
    kinds = ["direct", "gportmap", "gportmap-nocounters"] + (["socat"] if shutil.which("socat") else [])
    workdir = Path(tempfile.mkdtemp(prefix="gportmap-bench-"))
    for workload in args.workloads.split(","):
        mode, measure, unit, scale = WORKLOADS[workload]
        target = subprocess.Popen([sys.executable, "-c", TARGET, mode], stdout=subprocess.PIPE, text=True)
        target_port = int(target.stdout.readline())
        results: dict[str, list[float]] = {kind: [] for kind in kinds}
        try:
            for kind in kinds:
                proxy = Proxy(kind, target_port, workdir)
                try:
                    measure(proxy.port, 0.3)  # warm up
                    for _ in range(runs):
                        results[kind].append(measure(proxy.port, seconds))
                finally:
                    proxy.close()
        finally:
            target.kill()
            target.wait()
        base = statistics.median(results["gportmap"])
        print(f"\n{workload} ({seconds:g}s x {runs}, median; ratio = mode / gportmap)")
        for kind in kinds:
            value = statistics.median(results[kind])
            print(f"  {kind:22s} {value * scale:12.1f} {unit:7s} ratio {value / base:5.2f}")


if __name__ == "__main__":
    main()
