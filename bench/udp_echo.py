#!/usr/bin/env python3
"""UDP datagrams per second: gportmap side by side with socat, on the same traffic.

64-byte request/reply datagrams to a UDP echo target, directly, through one
gportmap udp rule, and through ``socat UDP-LISTEN:...,fork,reuseaddr UDP:...``
(one child process per client address). Each client is a socket with one datagram
in flight; ``--clients`` of them are driven by one epoll loop, so a run with 8
clients keeps 8 round trips in the air. Prints medians of ``--runs`` and the ratio
gportmap / socat, never a pass/fail: the machine is shared (client, proxy and
target on the same cores).

Traffic stays on 127.0.0.1; every loop is bounded in time and count.

    python bench/udp_echo.py --seconds 3 --runs 3 --clients 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LOOPBACK, bench_rules, free_port

SIZE = 64
#: A datagram unanswered for this long counts as lost and is sent again.
RESEND_AFTER = 0.5

ECHO = r"""
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
buf = bytearray(65535)
while True:
    n, address = sock.recvfrom_into(buf)
    sock.sendto(buf[:n], address)
"""


class Proxy:
    """One way of reaching the echo target: direct, gportmap or socat."""

    def __init__(self, kind: str, target_port: int, workdir: Path) -> None:
        self.kind, self.proc = kind, None
        if kind == "direct":
            self.port = target_port
            return
        self.port = free_port(socket.SOCK_DGRAM)
        if kind == "socat":
            cmd = [
                "socat",
                "-T",
                "30",  # a child per client address, ending after 30 s of silence
                f"UDP-LISTEN:{self.port},bind={LOOPBACK},fork,reuseaddr",
                f"UDP:{LOOPBACK}:{target_port}",
            ]
        else:
            rules = workdir / "gportmap.json"
            rules.write_text(
                json.dumps(
                    bench_rules(
                        {
                            "protocol": "udp",
                            "listenHost": LOOPBACK,
                            "listenPort": self.port,
                            "targetHost": LOOPBACK,
                            "targetPort": target_port,
                        }
                    )
                )
            )
            cmd = [sys.executable, "-m", "gportmap", str(rules)]
        # Its own process group: socat's per-client children go with it.
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_answering()

    def _wait_answering(self, deadline: float = 15.0) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.2)
            end = time.monotonic() + deadline
            while time.monotonic() < end:
                probe.sendto(b"?", (LOOPBACK, self.port))
                try:
                    probe.recvfrom(64)
                    return
                except (TimeoutError, ConnectionRefusedError):
                    continue
        raise RuntimeError(f"{self.kind} does not answer on {self.port}")

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this script created
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def echo_rate(port: int, clients: int, seconds: float, limit: int = 5_000_000) -> tuple[float, int]:
    """Round trips per second with ``clients`` sockets, one datagram in flight each,
    and how many datagrams were lost (and sent again)."""
    message = b"x" * SIZE
    socks = []
    poller = select.epoll()
    try:
        for _ in range(clients):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((LOOPBACK, port))
            sock.setblocking(False)
            socks.append(sock)
            poller.register(sock.fileno(), select.EPOLLIN)
        by_fd = {sock.fileno(): sock for sock in socks}
        sent_at = {}
        start = time.monotonic()
        for sock in socks:
            sock.send(message)
            sent_at[sock.fileno()] = start
        done = lost = 0
        while done < limit:
            now = time.monotonic()
            if now - start >= seconds:
                break
            for fd, _ in poller.poll(0.1):
                sock = by_fd[fd]
                try:
                    while True:  # drain: a late duplicate of a resent datagram counts once
                        sock.recv(65535)
                        done += 1
                except (BlockingIOError, ConnectionRefusedError):
                    pass
                sock.send(message)
                sent_at[fd] = time.monotonic()
            now = time.monotonic()
            for fd, when in sent_at.items():
                if now - when > RESEND_AFTER:
                    lost += 1
                    by_fd[fd].send(message)
                    sent_at[fd] = now
        return done / (time.monotonic() - start), lost
    finally:
        poller.close()
        for sock in socks:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one measurement (max 30)")
    parser.add_argument("--runs", type=int, default=3, help="measurements per mode, median reported (max 9)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (each max 256)")
    args = parser.parse_args()
    seconds, runs = min(args.seconds, 30.0), min(args.runs, 9)
    client_counts = [min(int(n), 256) for n in args.clients.split(",")]
    kinds = ["direct", "gportmap"] + (["socat"] if shutil.which("socat") else [])
    if "socat" not in kinds:
        print("socat is not installed: no comparison (apt-get install socat)", file=sys.stderr)
    tmp = tempfile.TemporaryDirectory(prefix="gportmap-bench-")
    workdir = Path(tmp.name)
    target = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        target_port = int(target.stdout.readline())
        for clients in client_counts:
            results: dict[str, list[float]] = {kind: [] for kind in kinds}
            losses: dict[str, int] = dict.fromkeys(kinds, 0)
            for kind in kinds:
                proxy = Proxy(kind, target_port, workdir)
                try:
                    echo_rate(proxy.port, clients, 0.5)  # warm up: sessions, socat's children
                    for _ in range(runs):
                        rate, lost = echo_rate(proxy.port, clients, seconds)
                        results[kind].append(rate)
                        losses[kind] += lost
                finally:
                    proxy.close()
            print(
                f"\n{SIZE}-byte request/reply, {clients} client(s) ({seconds:g}s x {runs}, median datagrams/s)"
            )
            for kind in kinds:
                print(f"  {kind:10s} {statistics.median(results[kind]):10.0f} /s   lost {losses[kind]}")
            if "socat" in kinds:
                ratio = statistics.median(results["gportmap"]) / statistics.median(results["socat"])
                print(f"  gportmap / socat = {ratio:.2f}")
    finally:
        target.kill()
        target.wait()
        tmp.cleanup()


if __name__ == "__main__":
    main()
