#!/usr/bin/env python3
"""What a pool of targets costs on the new-connection path (issue 17): gportmap with
one target, gportmap with a pool of 3 (``balance: roundrobin``) and HAProxy
``balance roundrobin`` over the same 3, each forwarding wrk's HTTP requests with a
new connection per request (``Connection: close``) to nginx backends, in one run.

    python bench/pool_bench.py --seconds 3 --runs 3
    bench/run --only pool          # the same rows in the comparison table

The proxies take turns, one measurement each per round, the order rotating each
round; medians and ratios are printed, never a pass or fail (the machine is
shared). Everything is on 127.0.0.1; every process started is stopped with its
process group on every path (``anchors.Processes``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
import loads  # noqa: E402
from anchors import MAX_CONNECTIONS, Processes, Proxy  # noqa: E402
from common import LOOPBACK  # noqa: E402

#: The ways of reaching the backends this bench compares, by name: (proxy, number of targets).
KINDS = {
    "gportmap-1": ("gportmap", 1),
    "gportmap-pool3": ("gportmap", 3),
    "haproxy-1": ("haproxy", 1),
    "haproxy-pool3": ("haproxy", 3),
}
#: wrk's concurrent connections (as compare.py's HTTP rows).
WRK_CONNECTIONS = 100


def gportmap_rules(port: int, targets: list[int]) -> dict:
    """One tcp rule: ``targetHost``/``targetPort`` for one target, else a pool."""
    rule: dict[str, object] = {
        "protocol": "tcp",
        "listenHost": LOOPBACK,
        "listenPort": port,
        "maxConnections": MAX_CONNECTIONS,
    }
    if len(targets) == 1:
        rule.update(targetHost=LOOPBACK, targetPort=targets[0])
    else:
        rule.update(targets=[{"host": LOOPBACK, "port": target} for target in targets], balance="roundrobin")
    settings = {"admin": False, "watch": False, "statsInterval": 0, "logLevel": "WARNING",
                "maxConnections": MAX_CONNECTIONS}
    return {"settings": settings, "rules": [rule]}


def haproxy_config(port: int, targets: list[int]) -> str:
    """HAProxy in mode tcp, ``balance roundrobin`` over ``targets`` (no checks: gportmap's
    pool runs none either; both mark a target down only when it fails)."""
    servers = "\n".join(f"    server t{i} {LOOPBACK}:{target}" for i, target in enumerate(targets))
    return f"""global
    maxconn {anchors.reachable_connections()}
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend bench
    bind {LOOPBACK}:{port}
    default_backend pool
backend pool
    balance roundrobin
{servers}
"""


def start_pool_proxy(procs: Processes, workdir: Path, name: str, targets: list[int]) -> Proxy:
    """Start ``name`` (a key of ``KINDS``) in front of ``targets`` and wait until it
    listens; RuntimeError with its log's reason when it does not."""
    kind, count = KINDS[name]
    targets = targets[:count]
    port = anchors.free_port()
    confdir = workdir / f"{name}-{port}"
    confdir.mkdir()
    if kind == "gportmap":
        path = confdir / "rules.json"
        path.write_text(json.dumps(gportmap_rules(port, targets), indent=2))
        cmd = [*anchors.gportmap_command(), str(path), "--admin", "off", "--log-level", "WARNING"]
    else:
        path = confdir / "haproxy.cfg"
        path.write_text(haproxy_config(port, targets))
        cmd = ["haproxy", "-db", "-f", str(path)]
    proc = procs.start(name, cmd)
    try:
        anchors.wait_tcp_listening(port, proc)
    except RuntimeError as exc:
        log = procs.log_tail(name, 2000)
        procs.stop(proc)
        raise RuntimeError(f"{name} did not start: {exc}; {anchors.log_reason(log)}") from None
    return Proxy(name, port, proc)


def start_backends(procs: Processes, workdir: Path, count: int = 3) -> list[int]:
    """``count`` nginx HTTP backends (a 64-byte answer each), their ports."""
    ports = []
    for i in range(count):
        confdir = workdir / f"backend-{i}"
        confdir.mkdir()
        port = anchors.free_port()
        (confdir / "nginx.conf").write_text(anchors.nginx_http_config(confdir, port))
        proc = procs.start(f"backend-{i}", ["nginx", "-p", str(confdir), "-c", str(confdir / "nginx.conf"),
                                            "-e", str(confdir / "error.log")])
        anchors.wait_tcp_listening(port, proc)
        ports.append(port)
    return ports


def missing() -> str | None:
    """Why this bench cannot run here (a tool it needs is not installed), or None."""
    for tool in ("nginx", "wrk"):
        if anchors._venv_script(tool) is None:
            return f"{tool} is not installed"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3, help="length of one measurement (1-30)")
    parser.add_argument("--runs", type=int, default=3, help="rounds, median reported (1-9)")
    args = parser.parse_args()
    seconds, runs = max(1, min(args.seconds, 30)), max(1, min(args.runs, 9))
    why = missing()
    if why:
        print(f"pool_bench: {why}", file=sys.stderr)
        return 2
    anchors.raise_fd_soft_limit()
    names = [name for name in KINDS if KINDS[name][0] == "gportmap" or anchors.missing_tool("haproxy") is None]
    results: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="gportmap-pool-bench-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            backends = start_backends(procs, workdir)
            proxies = [start_pool_proxy(procs, workdir, name, backends) for name in names]
            for proxy in proxies:
                loads.wrk_http(proxy.port, 1, WRK_CONNECTIONS, True)  # warm up
            for r in range(runs):
                for proxy in proxies[r % len(proxies):] + proxies[: r % len(proxies)]:
                    results[proxy.kind].append(loads.wrk_http(proxy.port, seconds, WRK_CONNECTIONS, True)["rate"])
        finally:
            procs.stop_all()
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"HTTP, a new connection per request (wrk -c{WRK_CONNECTIONS}, {seconds}s x {runs}, median req/s)")
    for name, value in medians.items():
        print(f"  {name:16s} {value:10.0f}")
    print(f"gportmap pool of 3 / gportmap one target: {medians['gportmap-pool3'] / medians['gportmap-1']:.2f}")
    if "haproxy-pool3" in medians:
        print(f"gportmap pool of 3 / HAProxy balance roundrobin: {medians['gportmap-pool3'] / medians['haproxy-pool3']:.2f}")
        print(f"HAProxy pool of 3 / HAProxy one target: {medians['haproxy-pool3'] / medians['haproxy-1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
