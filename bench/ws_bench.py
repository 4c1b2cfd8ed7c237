#!/usr/bin/env python3
"""WebSocket to TCP echo: gportmap's websocket rule side by side with websockify.

The same client (websocket-client, one connection, a writer thread and a reader
thread) drives both bridges to the same TCP echo target in one run: 64 KiB
messages (MB/s) and 32-byte messages (messages/s). The client is Python too, so
the figures are a ratio under a shared bottleneck, not either bridge's ceiling.
Needs `pip install websockify websocket-client`. Loopback only, bounded in time.

    python bench/ws_bench.py --seconds 3 --runs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import websocket
from common import LOOPBACK, bench_rules, free_port, stop, wait_listening

ECHO = r"""
import socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(64); print(srv.getsockname()[1], flush=True)
def echo(c):
    try:
        while d := c.recv(262144):
            c.sendall(d)
    except OSError:
        pass
    c.close()
while True:
    c, _ = srv.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
"""


def start_bridge(kind: str, target: int, workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "websockify":
        cmd = [shutil.which("websockify") or "websockify", f"{LOOPBACK}:{port}", f"{LOOPBACK}:{target}"]
    else:
        rules = workdir / "ws.json"
        rules.write_text(
            json.dumps(
                bench_rules(
                    {
                        "protocol": "websocket",
                        "listenHost": LOOPBACK,
                        "listenPort": port,
                        "targetHost": LOOPBACK,
                        "targetPort": target,
                        "maxMessageSize": 1 << 20,
                    }
                )
            )
        )
        cmd = [sys.executable, "-m", "gportmap", str(rules)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc, port


def measure(port: int, size: int, seconds: float) -> tuple[float, float]:
    """(MB/s, messages/s) echoed back within ``seconds`` (bounded message count)."""
    ws = websocket.create_connection(f"ws://{LOOPBACK}:{port}/", subprotocols=["binary"])
    payload = b"z" * size
    stop = threading.Event()
    sent = {"bytes": 0}
    received = {"bytes": 0}
    window = 64 * max(size, 1024)  # bytes in flight, so neither side buffers without bound

    def writer() -> None:
        while not stop.is_set() and sent["bytes"] < 1 << 34:
            if sent["bytes"] - received["bytes"] > window:
                time.sleep(0)
                continue
            ws.send_binary(payload)
            sent["bytes"] += size

    thread = threading.Thread(target=writer)
    start = time.monotonic()
    thread.start()
    while time.monotonic() - start < seconds:
        received["bytes"] += len(ws.recv())
    elapsed = time.monotonic() - start
    stop.set()
    thread.join()
    ws.close()
    return received["bytes"] / elapsed / 1e6, received["bytes"] / size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    seconds, runs = min(args.seconds, 30.0), min(args.runs, 9)
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    target = int(echo.stdout.readline())
    kinds = ["gportmap"] + (["websockify"] if shutil.which("websockify") else [])
    workdir = Path(tempfile.mkdtemp(prefix="gportmap-wsbench-"))
    try:
        for size, unit in ((65536, "MB/s"), (32, "msg/s")):
            results: dict[str, list[float]] = {kind: [] for kind in kinds}
            for _ in range(runs):
                for kind in kinds:  # alternate, so drift hits both alike
                    proc, port = start_bridge(kind, target, workdir)
                    try:
                        measure(port, size, 0.3)
                        mbps, mps = measure(port, size, seconds)
                        results[kind].append(mbps if unit == "MB/s" else mps)
                    finally:
                        stop(proc)
            base = statistics.median(results["gportmap"])
            print(
                f"\n{size}-byte messages ({seconds:g}s x {runs}, median and range; ratio = gportmap / other)"
            )
            for kind in kinds:
                values = results[kind]
                value = statistics.median(values)
                spread = f"{min(values):.1f}-{max(values):.1f}"
                print(f"  {kind:12s} {value:12.1f} {unit:6s} ({spread:>19s})  ratio {base / value:5.2f}")
    finally:
        echo.kill()
        echo.wait()


if __name__ == "__main__":
    main()
