"""What ``/connections`` costs the connections a worker forwards while it lists
them: ``python bench/listing_stall.py [--connections N] [--seconds S] [--old TREE]``.

gportmap runs with ``--workers 2`` and one tcp rule to an echo target; N idle
connections are held through it, and 16 probe connections take turns at 16-byte
round trips (one every 2 ms per turn). Two windows of S seconds each: in the first
nothing else happens; in the second a process of its own asks ``/connections``
back to back (a process: its ``json.load`` of megabytes would hold this one's
GIL). The figures are the probes' round trips: maximum, 99.9th and 99th
percentile. A worker whose hub stalls while it answers its master shows in the
maximum; so does the CPU the listing takes on a machine of two cores (the lister,
the master and its formatting thread run beside the workers).

``GEVENT_MONITOR_THREAD_ENABLE=1 GEVENT_MAX_BLOCKING_TIME=0.003`` in the
environment makes gevent report, in the gportmap log the script names, every
greenlet that held a hub for longer than that, with its stack. ``--old TREE``
runs another source tree (a ``git worktree`` with its C engine built in place,
``python setup.py build_ext --inplace``) in turns with this one.

Everything runs on 127.0.0.1, in a temporary folder; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from anchors import raise_fd_soft_limit
from common import LOOPBACK, free_port
from profile_newconn import FROM_PATH

#: An echo target holding every connection in one selector loop (no thread each).
ECHO = """
import selectors, socket
sel = selectors.DefaultSelector()
lsn = socket.socket()
lsn.bind(("127.0.0.1", 0)); lsn.listen(4096); lsn.setblocking(False)
sel.register(lsn, selectors.EVENT_READ)
print(lsn.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is lsn:
            try:
                while True:
                    conn, _ = lsn.accept(); conn.setblocking(False); sel.register(conn, selectors.EVENT_READ)
            except BlockingIOError:
                pass
            continue
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if data:
            key.fileobj.send(data)
        else:
            sel.unregister(key.fileobj); key.fileobj.close()
"""

#: Asks ``/connections`` back to back for S seconds and prints how many times.
LISTER = """
import json, sys, time, urllib.request
url, seconds, expected = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
end, calls = time.monotonic() + seconds, 0
while time.monotonic() < end:
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert len(json.load(answer)) == expected
    calls += 1
print(calls)
"""

PROBES = 16


def admin_json(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=30) as answer:
        return json.load(answer)


def wait_for(condition, what: str, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def probe_window(probes: list, seconds: float) -> list[float]:
    """Round trips of the probes, in turns, for ``seconds``."""
    rtts = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for probe in probes:
            started = time.perf_counter()
            probe.sendall(b"x" * 16)
            got = 0
            while got < 16:
                chunk = probe.recv(64)
                if not chunk:
                    raise RuntimeError("a probe connection closed")
                got += len(chunk)
            rtts.append(time.perf_counter() - started)
        time.sleep(0.002)
    return sorted(rtts)


def figures(rtts: list[float]) -> dict[str, float]:
    def at(share: float) -> float:
        return round(rtts[min(len(rtts) - 1, int(len(rtts) * share))] * 1e3, 2)

    return {"max_ms": round(rtts[-1] * 1e3, 2), "p999_ms": at(0.999), "p99_ms": at(0.99), "round_trips": len(rtts)}


def measure(tree: Path, count: int, seconds: float) -> dict[str, object]:
    import socket

    workdir = Path(tempfile.mkdtemp(prefix="listing-"))
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    held: list[socket.socket] = []
    gportmap = None
    try:
        target = int(echo.stdout.readline())
        port, admin = free_port(), free_port()
        rules = {
            "settings": {"maxConnections": 4 * count, "statsInterval": 0, "watch": False, "logLevel": "WARNING",
                         "admin": {"listen": f"{LOOPBACK}:{admin}"}},
            "rules": [{"protocol": "tcp", "listenHost": LOOPBACK, "listenPort": port, "targetHost": LOOPBACK,
                       "targetPort": target, "maxConnections": 4 * count}],
        }  # fmt: skip
        (workdir / "rules.json").write_text(json.dumps(rules))
        log = workdir / "gportmap.log"
        with open(log, "wb") as stderr:
            gportmap = subprocess.Popen([sys.executable, "-c", FROM_PATH, "rules.json", "--workers", "2"],
                                        env={**os.environ, "PYTHONPATH": str(tree)}, cwd=workdir,
                                        stdin=subprocess.DEVNULL, stderr=stderr)  # fmt: skip

        def running() -> bool:
            try:
                return [w["state"] for w in admin_json(admin, "/stats")["workers"]] == ["running"] * 2
            except OSError:
                return False

        wait_for(running, "two workers running")
        for _ in range(count + PROBES):
            held.append(socket.create_connection((LOOPBACK, port), timeout=10))
        probes = held[-PROBES:]
        wait_for(lambda: len(admin_json(admin, "/connections")) == count + PROBES, f"{count + PROBES} connections")
        quiet = figures(probe_window(probes, seconds))
        url = f"http://{LOOPBACK}:{admin}/connections"
        lister = subprocess.Popen([sys.executable, "-c", LISTER, url, str(seconds), str(count + PROBES)],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        listing = figures(probe_window(probes, seconds))
        out, _ = lister.communicate(timeout=60)
        if lister.returncode != 0:
            raise RuntimeError("the lister failed")
        return {"tree": str(tree), "connections": count, "quiet": quiet,
                "listing": {**listing, "listings": int(out)}, "log": str(log)}  # fmt: skip
    finally:
        for sock in held:
            sock.close()
        if gportmap is not None:
            gportmap.terminate()
            try:
                gportmap.wait(20)
            except subprocess.TimeoutExpired:
                gportmap.kill()
                gportmap.wait()
        echo.kill()
        echo.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=12000, help="idle connections held (default 12000)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each window (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each tree once per round (default 2)")
    parser.add_argument("--old", type=Path, help="another source tree, measured in turns with this one")
    args = parser.parse_args()
    if not 1 <= args.connections <= 15000 or not 0.5 <= args.seconds <= 30 or not 1 <= args.rounds <= 9:
        parser.error("--connections 1-15000, --seconds 0.5-30, --rounds 1-9")
    raise_fd_soft_limit()  # this process holds every client end
    trees = [Path(__file__).resolve().parent.parent] + ([args.old.resolve()] if args.old else [])
    for _ in range(args.rounds):
        for tree in trees:
            print(json.dumps(measure(tree, args.connections, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
