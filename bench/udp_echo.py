#!/usr/bin/env python3
"""UDP datagrams per second: gportmap side by side with nginx stream and socat.

64-byte request/reply datagrams to a UDP echo target, directly, through one
gportmap udp rule, through nginx's stream module (``listen ... udp; proxy_pass``,
one worker process, the anchor issue 8 sets) and through
``socat UDP-LISTEN:...,fork,reuseaddr UDP:...`` (one child process per client
address). Each client is a socket with one datagram in flight; ``--clients`` of
them (each its own source port) are driven by one epoll loop, so a run with 50
clients keeps 50 round trips in the air. The proxies take turns within each run
(``--runs`` rounds, each proxy measured once per round), and the medians and the
ratios gportmap / nginx and gportmap / socat are printed, never a pass/fail: the
machine is shared (client, proxy and target on the same cores). Beside each rate,
the proxy's CPU time (user + system of its process group, ``loads.ProxyCpu``, as
``bench/compare.py`` counts it) per datagram forwarded, a round trip being two:
on two shared cores a rate mixes the proxy's cost with everyone's scheduling, the
CPU per datagram is what the proxy pays. ``--json PATH`` also writes every sample.

Traffic stays on 127.0.0.1; every loop is bounded in time and count.

    python bench/udp_echo.py --seconds 3 --runs 3 --clients 1,50
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
from loads import ProxyCpu

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


#: nginx with the stream module, one worker, as Debian ships it (libnginx-mod-stream).
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
NGINX_CONF = """
load_module {module};
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen {host}:{port} udp;
        proxy_pass {host}:{target};
        proxy_responses 1;
        proxy_timeout 30s;
    }}
}}
"""


def nginx_available() -> bool:
    """nginx is installed with its stream module (Debian: nginx + libnginx-mod-stream)."""
    return shutil.which("nginx") is not None and Path(NGINX_STREAM_MODULE).exists()


def nginx_command(port: int, target_port: int, workdir: Path) -> list[str]:
    """nginx in the foreground, one process, proxying UDP ``port`` to ``target_port``."""
    conf = workdir / f"nginx-{port}.conf"
    conf.write_text(
        NGINX_CONF.format(
            module=NGINX_STREAM_MODULE, workdir=workdir, host=LOOPBACK, port=port, target=target_port
        )
    )
    return ["nginx", "-e", "stderr", "-p", str(workdir), "-c", str(conf)]


class Proxy:
    """One way of reaching the echo target: direct, gportmap, nginx or socat."""

    def __init__(self, kind: str, target_port: int, workdir: Path) -> None:
        self.kind, self.proc = kind, None
        if kind == "direct":
            self.port = target_port
            return
        self.port = free_port(socket.SOCK_DGRAM)
        if kind == "nginx":
            cmd = nginx_command(self.port, target_port, workdir)
        elif kind == "socat":
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


def anchors() -> list[str]:
    """The proxies this machine can run, gportmap first, then the anchors installed."""
    kinds = ["direct", "gportmap"]
    if nginx_available():
        kinds.append("nginx")
    else:
        print("nginx with the stream module is not installed: no nginx anchor", file=sys.stderr)
    if shutil.which("socat"):
        kinds.append("socat")
    else:
        print("socat is not installed: no socat anchor (apt-get install socat)", file=sys.stderr)
    return kinds


def measure(
    kinds: list[str], target_port: int, workdir: Path, clients: int, seconds: float, runs: int
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, list[float]]]:
    """Datagrams/s samples per proxy, and the proxy's CPU µs per datagram (none for
    the direct path): every proxy runs once per round, in turn, so a neighbour's
    load spike hits them alike. Each proxy starts afresh per sample."""
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    losses: dict[str, int] = dict.fromkeys(kinds, 0)
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(runs):
        for kind in kinds:
            proxy = Proxy(kind, target_port, workdir)
            try:
                echo_rate(proxy.port, clients, 0.5)  # warm up: sessions, socat's children
                with ProxyCpu(proxy.proc.pid if proxy.proc is not None else None) as meter:
                    started = time.monotonic()
                    rate, lost = echo_rate(proxy.port, clients, seconds)
                    elapsed = time.monotonic() - started
                results[kind].append(rate)
                losses[kind] += lost
                per = meter.per(2 * rate * elapsed)  # two datagrams per round trip
                if per is not None:
                    cpu[kind].append(per)
            finally:
                proxy.close()
    return results, losses, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one measurement (max 30)")
    parser.add_argument("--runs", type=int, default=3, help="rounds, median reported (max 9)")
    parser.add_argument("--clients", default="1,50", help="comma-separated client port counts (each max 256)")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    args = parser.parse_args()
    seconds, runs = min(args.seconds, 30.0), min(args.runs, 9)
    client_counts = [min(int(n), 256) for n in args.clients.split(",")]
    kinds = anchors()
    report: dict[str, dict] = {}
    tmp = tempfile.TemporaryDirectory(prefix="gportmap-bench-")
    workdir = Path(tmp.name)
    target = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        target_port = int(target.stdout.readline())
        for clients in client_counts:
            results, losses, cpu = measure(kinds, target_port, workdir, clients, seconds, runs)
            medians = {kind: statistics.median(samples) for kind, samples in results.items()}
            cpu_medians = {kind: statistics.median(samples) for kind, samples in cpu.items() if samples}
            print(
                f"\n{SIZE}-byte request/reply, {clients} client port(s) "
                f"({seconds:g}s x {runs}, median round trips/s [min-max], proxy CPU per datagram)"
            )
            for kind in kinds:
                low, high = min(results[kind]), max(results[kind])
                per = f"{cpu_medians[kind]:6.2f} µs" if kind in cpu_medians else "     -   "
                print(f"  {kind:10s} {medians[kind]:10.0f} /s  [{low:.0f}-{high:.0f}]  {per}   lost {losses[kind]}")
            ratios = {
                f"gportmap/{anchor}": medians["gportmap"] / medians[anchor]
                for anchor in ("nginx", "socat")
                if anchor in medians and medians[anchor] > 0
            }
            for name, ratio in ratios.items():
                print(f"  {name} = {ratio:.2f}")
            report[str(clients)] = {
                "samples": results,
                "medians": medians,
                "lost": losses,
                "ratios": ratios,
                "cpu_us_per_datagram": cpu,
            }
        if args.json is not None:
            args.json.write_text(json.dumps({"size": SIZE, "seconds": seconds, "clients": report}, indent=2))
    finally:
        target.kill()
        target.wait()
        tmp.cleanup()


if __name__ == "__main__":
    main()
