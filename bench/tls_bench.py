#!/usr/bin/env python3
"""TLS cost: one bulk stream through a plain tcp rule and through a TLS rule
(the client speaks TLS to gportmap, gportmap plain TCP to the target), side by
side in one run. Certificates are made for the run (needs `cryptography`).
Loopback only, bounded in time.

    python bench/tls_bench.py --seconds 3 --runs 3
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from certs import CA  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_SETTINGS, free_port, stop, wait_listening  # noqa: E402
from tcp_bench import CHUNK  # noqa: E402

# Counts each connection's bytes and prints the total at its EOF: the TLS client
# cannot half-close and still read an answer over TLS, so the count comes this way.
SINK = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(64); print(srv.getsockname()[1], flush=True)
def sink(conn):
    buf = bytearray(1 << 20); total = 0
    while n := conn.recv_into(buf):
        total += n
    print(total, flush=True); conn.close()
while True:
    conn, _ = srv.accept(); threading.Thread(target=sink, args=(conn,), daemon=True).start()
"""


def bulk(port: int, seconds: float, context: ssl.SSLContext | None, totals) -> float:
    payload = memoryview(b"\x5a" * CHUNK)
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
    start, sent = time.monotonic(), 0
    with sock:
        while time.monotonic() - start < seconds and sent < 64 << 30:
            sock.sendall(payload)
            sent += CHUNK
        if context:  # a clean TLS close, after reading what the server sent (session tickets)
            try:
                sock.unwrap()
            except (ssl.SSLError, OSError):
                pass
    counted = 0
    while not counted:  # the sink's count, printed at EOF (0s are wait_listening's probes)
        counted = int(totals.readline())
    elapsed = time.monotonic() - start
    assert counted == sent, (counted, sent)
    return sent / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    seconds, runs = min(args.seconds, 30.0), min(args.runs, 9)
    work = Path(tempfile.mkdtemp(prefix="gportmap-tlsbench-"))
    ca = CA(work, "ca")
    server = ca.issue("server", "127.0.0.1", ips=("127.0.0.1",))
    target = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    target_port = int(target.stdout.readline())
    plain, tls = free_port(), free_port()
    base = {"protocol": "tcp", "listenHost": "127.0.0.1", "targetHost": "127.0.0.1", "targetPort": target_port}
    rules = work / "rules.json"
    rules.write_text(json.dumps({
        "settings": BENCH_SETTINGS,
        "rules": [{**base, "name": "plain", "listenPort": plain},
                  {**base, "name": "tls", "listenPort": tls, "tls": {"certFile": str(server.cert), "keyFile": str(server.key)}}],
    }))
    proxy = subprocess.Popen([sys.executable, "-m", "gportmap", str(rules)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    context = ssl.create_default_context(cafile=str(ca.path))
    try:
        wait_listening(plain)
        wait_listening(tls)
        results: dict[str, list[float]] = {"plain": [], "tls": []}
        for _ in range(runs):  # alternate, so drift hits both alike
            results["plain"].append(bulk(plain, seconds, None, target.stdout))
            results["tls"].append(bulk(tls, seconds, context, target.stdout))
        base_rate = statistics.median(results["plain"])
        print(f"\nbulk, 1 stream ({seconds:g}s x {runs}, median)")
        for kind, values in results.items():
            value = statistics.median(values)
            print(f"  {kind:6s} {value / 1e6:9.1f} MB/s  ratio {value / base_rate:5.2f}")
    finally:
        stop(proxy)
        target.kill()
        target.wait()


if __name__ == "__main__":
    main()
