#!/usr/bin/env python3
"""Memory per concurrent connection: gportmap side by side with HAProxy.

Opens N connections through the proxy to a loopback echo target, moves one small
round trip on each (so every relay is set up, buffers touched), holds them all
open, and reads the proxy's RSS and PSS from /proc/PID/smaps_rollup before and
after. Reports growth per connection; never a pass/fail threshold (the machine is
shared).

Traffic stays on 127.0.0.1; N is capped (the file-descriptor hard limit here is
20,000 and the proxy needs two per connection).

    python bench/conn_memory.py --connections 2000
    python bench/conn_memory.py --connections 2000 --pythonpath /tmp/old-tree  # another gportmap
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LOOPBACK, bench_rules, free_port, stop, wait_listening
from loads import HOLDER  # the echo target that holds every connection it accepts

MAX_CONNECTIONS = 9000

HAPROXY = """global
    maxconn 9500
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
listen relay
    bind {host}:{port}
    server target {host}:{target_port}
"""


def memory(pid: int) -> dict[str, int]:
    """Rss and Pss of a process in kB, from /proc/PID/smaps_rollup."""
    figures = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            figures[key] = int(rest.split()[0])
    return figures


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_proxy(
    kind: str, target_port: int, workdir: Path, pythonpath: str | None
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "haproxy":
        conf = workdir / "haproxy.cfg"
        conf.write_text(HAPROXY.format(host=LOOPBACK, port=port, target_port=target_port))
        cmd = ["haproxy", "-f", str(conf)]
        env = None
    else:
        rules = workdir / "rules.json"
        rules.write_text(
            json.dumps(
                bench_rules(
                    {
                        "protocol": "tcp",
                        "listenHost": LOOPBACK,
                        "listenPort": port,
                        "targetHost": LOOPBACK,
                        "targetPort": target_port,
                        "maxConnections": 20000,
                    }
                )
                | {"settings": {**bench_rules()["settings"], "maxConnections": 20000}}
            )
        )
        cmd = [sys.executable, "-m", "gportmap", str(rules)]
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=workdir)
    wait_listening(port)
    return proc, port


def measure(kind: str, count: int, pythonpath: str | None) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="gportmap-mem-"))
    target = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    socks: list[socket.socket] = []
    proxy = None
    try:
        target_port = int(target.stdout.readline())
        proxy, port = start_proxy(kind, target_port, workdir, pythonpath)
        time.sleep(0.5)  # let start-up settle before the baseline
        base = memory(proxy.pid)
        for _ in range(count):
            sock = socket.create_connection((LOOPBACK, port), timeout=10)
            sock.sendall(b"x")
            socks.append(sock)
        for sock in socks:
            if sock.recv(1) != b"x":
                raise RuntimeError("the echo through the proxy failed")
        time.sleep(0.5)
        held = memory(proxy.pid)
        fds = open_fds(proxy.pid)
    finally:
        for sock in socks:
            sock.close()
        if proxy is not None:
            stop(proxy)
        target.kill()
        target.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "kind": kind,
        "connections": count,
        "rss_mb": held["Rss"] / 1024,
        "rss_growth_mb": (held["Rss"] - base["Rss"]) / 1024,
        "pss_growth_mb": (held["Pss"] - base["Pss"]) / 1024,
        "pss_kb_per_connection": (held["Pss"] - base["Pss"]) / count,
        "proxy_fds": fds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=2000, help=f"held at once (max {MAX_CONNECTIONS})")
    parser.add_argument("--proxies", default="gportmap,haproxy", help="comma-separated: gportmap, haproxy")
    parser.add_argument("--pythonpath", help="PYTHONPATH for the gportmap measured (another source tree)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    count = max(1, min(args.connections, MAX_CONNECTIONS))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = []
    for kind in args.proxies.split(","):
        if kind == "haproxy" and not shutil.which("haproxy"):
            continue
        results.append(measure(kind, count, args.pythonpath))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for row in results:
        print(
            f"{row['kind']:10s} {row['connections']} connections: RSS {row['rss_mb']:.1f} MB "
            f"(+{row['rss_growth_mb']:.1f}), PSS +{row['pss_growth_mb']:.1f} MB, "
            f"{row['pss_kb_per_connection']:.1f} kB/connection, {row['proxy_fds']} fds"
        )


if __name__ == "__main__":
    main()
