#!/usr/bin/env python3
"""Memory per concurrent connection: gportmap side by side with the proxies its users
would otherwise pick, for each kind of connection it holds.

- tcp: a plain ``tcp`` rule, next to HAProxy (mode tcp);
- tls: a ``tcp`` rule with ``tls`` (TLS terminated, plain to the target), next to
  HAProxy ``bind ... ssl crt`` and nginx stream ``listen ... ssl`` (same certificate,
  made for the run);
- websocket: a ``websocket`` rule, next to websockify (which forks a process per
  connection, so it holds at most ``--websockify-max-held``).

Opens N connections through the proxy to a loopback echo target that holds them, one
small round trip on each (after the TLS handshake or the WebSocket upgrade, so every
relay is set up, buffers touched), holds them all idle, and reads the proxy's process
group from /proc/PID/smaps_rollup before and while they are held. Reports growth per
connection; never a pass/fail threshold (the machine is shared). bench/compare.py
runs the same measurement for its held-connection rows.

Traffic stays on 127.0.0.1; N is capped by the file-descriptor hard limit (the proxy
needs two per connection).

    python bench/conn_memory.py --connections 2000
    python bench/conn_memory.py --protocols tls,websocket --connections 1000
    python bench/conn_memory.py --connections 2000 --pythonpath /tmp/old-tree  # another gportmap
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
import loads  # noqa: E402
from anchors import Processes  # noqa: E402
from common import TlsFiles, make_certificate  # noqa: E402

#: The proxies each kind of connection is measured through, by default.
PROXIES = {
    "tcp": ["gportmap", "haproxy"],
    "tls": ["gportmap", "haproxy", "nginx"],
    "websocket": ["gportmap", "websockify"],
}


def start_holder(procs: Processes) -> int:
    """The echo target that holds every connection it accepts; its port."""
    holder = procs.start("holder", [sys.executable, "-c", loads.HOLDER], stdout=subprocess.PIPE)
    line = loads.first_lines([holder], time.monotonic() + 20)[0]
    if not line.isdigit():
        raise RuntimeError(f"the holder did not start: {procs.log_tail('holder')}")
    return int(line)


def measure(
    procs: Processes, workdir: Path, kind: str, protocol: str, target: int, count: int, tls: TlsFiles | None
) -> dict[str, object]:
    """``count`` connections of ``protocol`` held through a fresh ``kind``: its
    figures, or why it could not be measured."""
    why = anchors.missing_tool(kind, protocol)
    if why is not None:
        return {"kind": kind, "protocol": protocol, "connections": count, "skipped": why}
    try:
        proxy = anchors.start_proxy(procs, workdir, kind, target, protocol, 1, tls)
    except RuntimeError as exc:
        return {"kind": kind, "protocol": protocol, "connections": count, "failed": str(exc)}
    try:
        result = loads.hold_connections(procs, proxy.proc.pid, proxy.port, count, mode=protocol)
    except RuntimeError as exc:
        return {"kind": kind, "protocol": protocol, "connections": count, "failed": str(exc)}
    finally:
        procs.stop(proxy.proc)
    return {"kind": kind, "protocol": protocol, "connections": count, "session": proxy.session, **result}


def describe(row: dict[str, object]) -> str:
    """One line of the text report."""
    head = f"{row['protocol']:9s} {row['kind']:10s} {row['connections']:>5} connections:"
    if "skipped" in row or "failed" in row:
        return f"{head} {row.get('skipped') or 'failed: ' + str(row['failed'])}"
    return (
        f"{head} RSS {row['rss_mb']:.1f} MB (+{row['rss_growth_mb']:.1f}), "
        f"PSS +{row['pss_growth_mb']:.1f} MB; per connection: anonymous PSS "
        f"{row['pss_anon_per_connection_kb']:.1f} KB, PSS {row['pss_per_connection_kb']:.1f} KB, "
        f"RSS {row['rss_per_connection_kb']:.1f} KB; {row['proxy_fds']} fds"
        + (f"; {row['session']}" if row.get("session") else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=2000, help="held at once (capped by the fd limit)")
    parser.add_argument(
        "--protocols", default="tcp,tls,websocket", help="comma-separated: tcp, tls, websocket"
    )
    parser.add_argument(
        "--proxies",
        help="comma-separated subset of gportmap, haproxy, nginx, websockify (default: each protocol's own)",
    )
    parser.add_argument(
        "--websockify-max-held",
        type=int,
        default=200,
        help="websockify forks per connection: hold at most this many through it",
    )
    parser.add_argument("--pythonpath", help="PYTHONPATH for the gportmap measured (another source tree)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args()
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(protocols) - set(PROXIES))
    if unknown:
        parser.error(f"--protocols: unknown {', '.join(unknown)}; known: {', '.join(PROXIES)}")
    wanted = set(args.proxies.split(",")) if args.proxies else None
    if args.pythonpath:
        os.environ["PYTHONPATH"] = args.pythonpath  # ahead of the venv's own gportmap
    anchors.raise_fd_soft_limit()
    count = max(1, min(args.connections, anchors.reachable_connections()))
    results = []
    with tempfile.TemporaryDirectory(prefix="gportmap-mem-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            target = start_holder(procs)
            tls = make_certificate(workdir / "tls") if "tls" in protocols else None
            for protocol in protocols:
                for kind in PROXIES[protocol]:
                    if wanted is not None and kind not in wanted:
                        continue
                    held = min(count, args.websockify_max_held) if kind == "websockify" else count
                    certificate = tls if protocol == "tls" else None
                    results.append(measure(procs, workdir, kind, protocol, target, held, certificate))
        finally:
            procs.stop_all()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for row in results:
        print(describe(row))


if __name__ == "__main__":
    main()
