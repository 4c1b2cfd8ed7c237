#!/usr/bin/env python3
"""Admission by allow/deny lists at scale (issue 16): the rate with an empty deny
list, a 10-entry list and a 100,000-entry list, side by side in one run.

Two measures, each with its ratio to the empty list's:
- ``admits()/s``: in-process checks of one client the list does not cover, the
  cost the gevent hub pays per new client (the linear scan of before issue 16 is
  shown too, on the same lists, bounded to a few calls when it is slow);
- ``conn/s``: new TCP connections per second (connect, 64 bytes there and back,
  the target's close passed on; ``--clients`` at once) through ONE gportmap process with three rules that
  differ only in their deny list, to a local echo target. The rules take turns
  round by round, the order rotating, and the median of ``--runs`` is reported.

The issue's target: the 100,000-entry ratio within 10% of the empty list's. Nothing
here passes or fails on a number: the machine is shared. Also printed: the time to
build the 100,000-entry lists, the memory they keep per entry, and the time the
config check takes for the file.

Everything runs on 127.0.0.1; every loop is bounded in time and count; gportmap and
the target are stopped on every path.

    python bench/admission.py --seconds 2 --runs 5
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOOPBACK, bench_rules, free_port, stop  # noqa: E402

from gportmap.config import parse  # noqa: E402
from gportmap.errors import ConfigError  # noqa: E402
from gportmap.security import Admission  # noqa: E402

SIZES = {"empty": 0, "10 entries": 10, "100,000 entries": 100_000}

# The target answers 64 bytes and closes first, so every TIME_WAIT is on a listening
# side: clients and gportmap's connects never run out of ephemeral ports however
# many connections a run makes (with the client closing first, 70,000 TIME_WAIT
# sockets piled up within a minute and the rates drifted down as ports ran short).
TARGET = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(1024)
print(srv.getsockname()[1], flush=True)
def serve():
    while True:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while len(data) < 64 and (chunk := conn.recv(64 - len(data))):
                data += chunk
            conn.sendall(data)
threads = [threading.Thread(target=serve, daemon=True) for _ in range(int(sys.argv[1]))]
for thread in threads:
    thread.start()
threads[0].join()
"""
CLIENT = (LOOPBACK, 40000)
MESSAGE = b"a" * 64


class LinearAdmission:
    """The linear scan gportmap used before issue 16 (the reference of the 'before'
    column; tests/test_admission.py keeps the same copy as its oracle)."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in allow)
        self.deny = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in deny)
        self.open = not self.allow and not self.deny

    def admits(self, address: object) -> bool:
        if self.open:
            return True
        host = address[0] if isinstance(address, tuple) else address
        try:
            ip = ipaddress.ip_address(str(host).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.deny if net.version == ip.version):
            return False
        return not self.allow or any(ip in net for net in self.allow if net.version == ip.version)


def deny_list(count: int, seed: int = 16) -> list[str]:
    """``count`` entries, mostly IPv4 (/16 to /32, 127.0.0.0/8 left alone) and one in
    twenty IPv6, as a long blocklist would read."""
    rnd = random.Random(seed)
    entries: list[str] = []
    while len(entries) < count:
        if rnd.random() < 0.05:
            entries.append(f"2001:db8:{rnd.randrange(1 << 16):x}:{rnd.randrange(1 << 16):x}::/64")
            continue
        first = rnd.randrange(1, 224)
        if first != 127:
            prefix = rnd.choice([16, 24, 28, 32, 32, 32])
            entries.append(f"{first}.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}/{prefix}")
    return entries


@dataclass
class Row:
    """One deny list: what was measured of it."""

    name: str
    deny: list[str]
    checks: float = 0.0
    linear_checks: float = 0.0
    connections: list[float] | None = None


def check_rate(admits: Callable[[object], bool], seconds: float, limit: int = 2_000_000) -> float:
    """Calls per second of ``admits(CLIENT)`` for ``seconds`` (at most ``limit`` calls);
    the clock is read after batches that grow only while calls are fast."""
    count, batch, start = 0, 1, time.perf_counter()
    while count < limit:
        for _ in range(batch):
            if not admits(CLIENT):
                raise RuntimeError("the benchmark client must be admitted")
        count += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        if elapsed < seconds / 1000:
            batch = min(batch * 2, 1000)
    return count / (time.perf_counter() - start)


def build_cost(deny: list[str]) -> tuple[float, int]:
    """Seconds to build an Admission of ``deny`` (best of 3), and the bytes it keeps
    (traced on a separate build: tracing slows allocation)."""
    best = min(_timed(lambda: Admission(deny=deny)) for _ in range(3))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = Admission(deny=deny)
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del kept
    return best, size


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def config_check_cost(document: dict) -> str:
    """How long gportmap's config check takes for the file (or why it refuses it)."""
    data = json.dumps(document).encode()
    start = time.perf_counter()
    try:
        parse(data, "admission-bench.json")
    except ConfigError as exc:
        return f"refused after {time.perf_counter() - start:.2f} s: {exc.errors[0][:160]}"
    return f"{time.perf_counter() - start:.2f} s for {len(data) / 1e6:.1f} MB"


def connection_rate(port: int, seconds: float, clients: int) -> float:
    """New connections per second, ``clients`` threads each connecting, sending 64
    bytes, reading them back and closing, for ``seconds`` (at most 1,000,000 in all)."""
    counts = [0] * clients
    errors: list[BaseException] = []
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        try:
            while time.monotonic() < deadline and counts[i] < 1_000_000 // clients:
                with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
                    sock.sendall(MESSAGE)
                    got = 0
                    while got < len(MESSAGE):
                        chunk = sock.recv(len(MESSAGE) - got)
                        if not chunk:
                            raise RuntimeError("closed before the echo: was the client refused?")
                        got += len(chunk)
                    if sock.recv(1):  # the target's close, passed on: the peers end first
                        raise RuntimeError("more than the echo came back")
                counts[i] += 1
        except (OSError, RuntimeError) as exc:
            errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"port {port}: {errors[0]}")
    return sum(counts) / (time.monotonic() - start)


def rules_document(rows: list[Row], ports: dict[str, int], target_port: int) -> dict:
    """A tcp rule per row, the same but for its port and deny list."""
    return bench_rules(
        *(
            {
                "name": f"deny-{len(row.deny)}",
                "protocol": "tcp",
                "listenHost": LOOPBACK,
                "listenPort": ports[row.name],
                "targetHost": LOOPBACK,
                "targetPort": target_port,
                "deny": row.deny,
            }
            for row in rows
        )
    )


class Gportmap:
    """One gportmap with a tcp rule per row, each on its own port, and the echo target."""

    def __init__(self, rows: list[Row], workdir: Path) -> None:
        self.proc: subprocess.Popen | None = None
        self.log = open(workdir / "gportmap.log", "wb")
        self.target = subprocess.Popen([sys.executable, "-c", TARGET, "8"], stdout=subprocess.PIPE, text=True)
        try:
            target_port = int(self.target.stdout.readline())
            self.ports = {row.name: free_port() for row in rows}
            rules = workdir / "admission.json"
            rules.write_text(json.dumps(rules_document(rows, self.ports, target_port)))
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gportmap", str(rules)], stdout=self.log, stderr=subprocess.STDOUT
            )
            for port in self.ports.values():
                self.wait_listening(port, deadline=time.monotonic() + 120)
        except (RuntimeError, ValueError):
            self.close()
            raise RuntimeError(
                "gportmap did not start:\n" + (workdir / "gportmap.log").read_text()[-1500:]
            ) from None

    def wait_listening(self, port: int, deadline: float) -> None:
        """Until ``port`` takes a connection; RuntimeError when gportmap exits first
        (a config it refuses) or at ``deadline``."""
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {port}")

    def close(self) -> None:
        for proc in (self.proc, self.target):
            if proc is not None and proc.poll() is None:
                stop(proc)
        if self.target.stdout is not None:
            self.target.stdout.close()
        self.log.close()


def measure_checks(rows: list[Row], seconds: float) -> None:
    for row in rows:
        row.checks = check_rate(Admission(deny=row.deny).admits, seconds)
        row.linear_checks = check_rate(LinearAdmission(deny=row.deny).admits, seconds)


def measure_connections(rows: list[Row], gportmap: Gportmap, seconds: float, runs: int, clients: int) -> None:
    """Round by round, each rule once, the order rotating: drift hits all alike."""
    for row in rows:
        connection_rate(gportmap.ports[row.name], min(seconds, 0.5), clients)  # warm up
        row.connections = []
    for r in range(runs):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]
        for row in order:
            row.connections.append(connection_rate(gportmap.ports[row.name], seconds, clients))


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    base = rows[0]
    base_conns = statistics.median(base.connections) if base.connections else 0.0
    print(
        f"\nadmission of a client no list covers ({args.runs} x {args.seconds:g} s, {args.clients} clients, median; ratio = row / empty)"
    )
    print(
        f"  {'deny list':18s} {'admits()/s':>12s} {'ratio':>6s} {'before: linear':>15s} {'ratio':>6s} {'conn/s':>9s} {'ratio':>6s}"
    )
    for row in rows:
        conns = statistics.median(row.connections) if row.connections else 0.0
        conn_ratio = f"{conns / base_conns:6.2f}" if base_conns else "     -"
        print(
            f"  {row.name:18s} {row.checks:12,.0f} {row.checks / base.checks:6.2f} {row.linear_checks:15,.0f}"
            f" {row.linear_checks / base.linear_checks:6.3f} {conns:9,.0f} {conn_ratio}"
        )
    short, long = rows[1], rows[-1]
    print(
        f"  {long.name} against {short.name}: admits() x{long.checks / short.checks:.2f},"
        f" linear x{long.linear_checks / short.linear_checks:.4f} (an empty list skips the check: see 'open')"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement (max 30)")
    parser.add_argument("--runs", type=int, default=5, help="connection rounds, median reported (max 15)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent connecting clients (max 64)")
    args = parser.parse_args()
    args.seconds, args.runs, args.clients = (
        min(args.seconds, 30.0),
        max(1, min(args.runs, 15)),
        max(1, min(args.clients, 64)),
    )
    rows = [Row(name, deny_list(size)) for name, size in SIZES.items()]
    longest = rows[-1].deny

    build, kept = build_cost(longest)
    print(
        f"building the {len(longest):,}-entry deny list: {build:.3f} s (best of 3), {kept / len(longest):.1f} bytes kept per entry"
    )
    document = rules_document(rows, {row.name: 40000 + i for i, row in enumerate(rows)}, 40009)
    entries = sum(len(row.deny) for row in rows)
    print(
        f"config check of the rules file ({len(rows)} rules, {entries:,} entries): {config_check_cost(document)}"
    )
    measure_checks(rows, min(args.seconds, 2.0))
    workdir = Path(tempfile.mkdtemp(prefix="gportmap-admission-"))
    gportmap = None
    try:
        gportmap = Gportmap(rows, workdir)
        measure_connections(rows, gportmap, args.seconds, args.runs, args.clients)
    except RuntimeError as exc:
        print(f"connections not measured: {exc}")
    finally:
        if gportmap is not None:
            gportmap.close()
    print_table(rows, args)


if __name__ == "__main__":
    main()
