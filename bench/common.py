"""What the benchmarks share: loopback ports, waiting for a listener, the settings a
benchmarked gportmap runs with, and stopping a process cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from typing import Any

LOOPBACK = "127.0.0.1"

#: No admin endpoint, watcher or stats log, and quiet logs: only forwarding is measured.
BENCH_SETTINGS = {"admin": False, "watch": False, "statsInterval": 0, "logLevel": "WARNING"}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_listening(port: int, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def bench_rules(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"settings": BENCH_SETTINGS, "rules": list(rules)}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
