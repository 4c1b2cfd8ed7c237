"""The traffic of the comparison: iperf3 bulk streams, wrk HTTP, held connections and
the memory they cost. Each function measures one proxy port once, bounded in time,
and raises RuntimeError with the tool's own words when the run did not measure.
UDP and WebSocket traffic come from udp_echo.py and ws_bench.py."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from anchors import Processes
from common import LOOPBACK


def iperf3_gbps(port: int, streams: int, seconds: int) -> float:
    """iperf3 client -> ``port`` (a proxy in front of ``iperf3 -s``): Gbit/s received.

    ``iperf3 -s`` runs one test at a time and takes a moment after one before it
    takes the next ("busy", or a reset control connection): an error is retried for
    up to 10 s, then reported."""
    cmd = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]
    retry_until = time.monotonic() + 10
    while True:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"iperf3 ran past {seconds + 30} s") from None
        try:
            report = json.loads(out)
        except ValueError:
            report = {"error": f"iperf3 printed no report: {out[-200:]!r}"}
        if "error" not in report:
            return report["end"]["sum_received"]["bits_per_second"] / 1e9
        if time.monotonic() >= retry_until:
            raise RuntimeError(f"iperf3: {report['error']}")
        time.sleep(0.3)


def tcp_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``, read from /proc/net/tcp
    without connecting (a probe connection would be a test to ``iperf3 -s``)."""
    wanted = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(f[1] == wanted and f[3] == "0A" for f in (line.split() for line in lines))


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_http(port: int, seconds: int, connections: int, close: bool) -> dict[str, float]:
    """wrk, one thread, ``connections`` connections, for ``seconds``: requests/s, p99 in
    ms, and the errors wrk counted. ``close`` sends ``Connection: close`` (a new
    connection per request)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://{LOOPBACK}:{port}/")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk ran past {seconds + 30} s") from None
    out = proc.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
    if proc.returncode != 0 or not rate or not p99:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {(out + proc.stderr)[-300:]!r}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {
        "rate": float(rate.group(1)),
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)],
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }
    if result["rate"] <= 0:
        raise RuntimeError(f"wrk completed no request: {out[-300:]!r}")
    return result


# --- held connections ------------------------------------------------------------------

#: Accepts without bound, echoes each connection's greeting and keeps it open (epoll,
#: one thread): the target of the connection-count workloads.
HOLDER = r"""
import resource, selectors, socket
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(4096); srv.setblocking(False)
print(srv.getsockname()[1], flush=True)
sel = selectors.DefaultSelector(); sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is srv:
            try:
                while True:
                    conn, _ = srv.accept(); conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
            except (BlockingIOError, OSError):
                pass
            continue
        conn = key.fileobj
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if data:
            conn.send(data)
        else:
            sel.unregister(conn); conn.close()
"""

#: Opens COUNT connections to PORT one after another, a 16-byte round trip on each (so
#: the proxy has connected upstream and relayed both ways), prints "ok N" or
#: "error N why", and holds them until its stdin closes.
CLIENT = r"""
import resource, socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
try:
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=15)
        held.append(s)
        s.sendall(b"held-connection!")
        got = b""
        while len(got) < 16:
            chunk = s.recv(16 - len(got))
            if not chunk:
                raise ConnectionError("closed before the echo came back")
            got += chunk
    print("ok", len(held), flush=True)
except OSError as exc:
    print("error", len(held), repr(exc), flush=True)
sys.stdin.read()
"""

#: Connections per client process: few enough processes for 2 cores, each far from
#: the descriptor limit.
PER_CLIENT = 2500


def group_memory_kib(pgid: int) -> dict[str, int]:
    """PSS, anonymous PSS and RSS in KiB, summed over every process in process group
    ``pgid`` (a proxy and what it forked). PSS splits shared pages fairly; its file
    part also moves whenever another process maps the same binary or libraries (another
    HAProxy starting elsewhere), so the anonymous part is the per-connection figure.
    RSS counts shared pages once per process."""
    fields = {"Pss:": "pss", "Pss_Anon:": "pss_anon", "Rss:": "rss"}
    totals = dict.fromkeys(fields.values(), 0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[2]) != pgid:
                continue
            for line in Path(entry.path, "smaps_rollup").read_text().splitlines():
                key = fields.get(line.split(maxsplit=1)[0]) if line else None
                if key:
                    totals[key] += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return totals


def first_lines(procs: list[subprocess.Popen], deadline: float) -> list[str]:
    """The first stdout line of each process, waiting at most until ``deadline``."""
    lines: dict[int, str] = {}
    pending = {proc.stdout.fileno(): i for i, proc in enumerate(procs)}
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
        for fd in ready:
            i = pending.pop(fd)
            line = procs[i].stdout.readline().decode(errors="replace").strip()
            lines[i] = line or f"error 0 closed its output (status {procs[i].poll()}) before saying anything"
    if pending:
        raise RuntimeError(f"{len(pending)} client process(es) still connecting at the deadline")
    return [lines[i] for i in range(len(procs))]


def hold_connections(
    processes: Processes, proxy_pgid: int, port: int, count: int, settle: float = 0.5, timeout: float = 120.0
) -> dict[str, float]:
    """Open ``count`` connections through the proxy at ``port`` (a round trip on each)
    and hold them; return how the proxy group's PSS and RSS grew with them held."""
    warm = processes.start(
        "held-warmup",
        [sys.executable, "-c", CLIENT, str(port), "20"],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        line = first_lines([warm], time.monotonic() + 30)[0]
        if not line.startswith("ok"):
            raise RuntimeError(f"warm-up: {line}")
    finally:
        processes.stop(warm)
    time.sleep(settle)
    before = group_memory_kib(proxy_pgid)
    clients = []
    try:
        remaining, index = count, 0
        while remaining > 0:
            n = min(PER_CLIENT, remaining)
            clients.append(
                processes.start(
                    f"held-client-{index}",
                    [sys.executable, "-c", CLIENT, str(port), str(n)],
                    stdout=subprocess.PIPE,
                    stdin=subprocess.PIPE,
                )
            )
            remaining -= n
            index += 1
        lines = first_lines(clients, time.monotonic() + timeout)
        held = sum(int(line.split()[1]) for line in lines if len(line.split()) > 1)
        failures = [line for line in lines if not line.startswith("ok")]
        if failures:
            raise RuntimeError(f"held {held} of {count}: {failures[0][:200]}")
        time.sleep(settle)
        held_mem = group_memory_kib(proxy_pgid)
    finally:
        for client in clients:
            processes.stop(client)
    return {
        "held": held,
        "pss_before_mb": before["pss"] / 1024,
        "pss_growth_mb": (held_mem["pss"] - before["pss"]) / 1024,
        "pss_anon_growth_mb": (held_mem["pss_anon"] - before["pss_anon"]) / 1024,
        "rss_mb": held_mem["rss"] / 1024,
        "rss_growth_mb": (held_mem["rss"] - before["rss"]) / 1024,
        "pss_anon_per_connection_kb": (held_mem["pss_anon"] - before["pss_anon"]) * 1.024 / count,
    }
