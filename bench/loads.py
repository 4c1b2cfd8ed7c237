"""The traffic of the comparison: iperf3 bulk streams, wrk HTTP (plain or over TLS),
held connections (plain, TLS or WebSocket) and the memory they cost, and the CPU time
a proxy spends on a measurement. Each function measures one proxy port once, bounded
in time, and raises RuntimeError with the tool's own words when the run did not
measure. UDP and WebSocket traffic come from udp_echo.py and ws_bench.py."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anchors import Processes
from common import LOOPBACK


def iperf3_gbps(port: int, streams: int, seconds: int) -> float:
    """iperf3 client -> ``port`` (a proxy in front of ``iperf3 -s``): Gbit/s received."""
    return iperf3_run(port, streams, seconds)["gbps"]


def iperf3_run(port: int, streams: int, seconds: int) -> dict[str, float]:
    """iperf3 client -> ``port`` (a proxy in front of ``iperf3 -s``): Gbit/s and bytes
    received (``gbps``, ``bytes``).

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
            received = report["end"]["sum_received"]
            return {"gbps": received["bits_per_second"] / 1e9, "bytes": float(received["bytes"])}
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


def wrk_http(
    port: int,
    seconds: int,
    connections: int,
    close: bool,
    tls: bool = False,
    cpu_pgid: int | None = None,
    threads: int = 1,
) -> dict[str, float]:
    """wrk, ``threads`` threads, ``connections`` connections, for ``seconds``:
    requests/s, p99 in ms, and the errors wrk counted. ``close`` sends ``Connection:
    close`` (a new connection per request); ``tls`` speaks https (wrk does not verify
    the certificate, and resumes the session of its previous connection where the
    server allows it). With ``cpu_pgid``, also the CPU time that process group (the
    proxy) spent while wrk ran, in all and per request."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"{'https' if tls else 'http'}://{LOOPBACK}:{port}/")
    with ProxyCpu(cpu_pgid) as meter:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"wrk ran past {seconds + 30} s") from None
    cpu = meter.seconds
    out = proc.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out, re.MULTILINE)
    if proc.returncode != 0 or not rate or not p99 or not done:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {(out + proc.stderr)[-300:]!r}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {
        "rate": float(rate.group(1)),
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)],
        "requests": int(done.group(1)),
        "duration_s": float(done.group(2)) * _UNITS[done.group(3)] / 1e3,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }
    if result["rate"] <= 0 or result["requests"] <= 0:
        raise RuntimeError(f"wrk completed no request: {out[-300:]!r}")
    if cpu is not None:
        result["proxy_cpu_s"] = cpu
        result["cpu_us_per_request"] = cpu * 1e6 / result["requests"]
    return result


#: Clock ticks per second of the utime/stime fields of /proc/PID/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of a proxy: every process in process group ``pgid``
    (the proxy and what it forked: nginx's workers, socat's children) or descended
    from its leader (gportmap's ``--workers`` each start a session of their own), with
    the children each has reaped. A figure to subtract from a later one over the
    same proxy: the ticks of /proc/PID/stat are 1/CLOCK_TICKS s, so a window of a
    second or more keeps the rounding under 1 %."""
    return group_scan(pgid).seconds


@dataclass(frozen=True)
class GroupScan:
    """One pass over /proc for a proxy's processes (``group_scan``)."""

    #: User + system CPU seconds of the processes counted, with their reaped children.
    seconds: float
    #: The processes counted.
    pids: frozenset[int]
    #: How many of them are zombies: exited, not yet reaped.
    zombies: int
    #: Whether a process listed at the start of the pass was gone when its line was
    #: read. A pass is not atomic: a child reaped meanwhile may be counted neither on
    #: its own nor in its parent's cutime (read before the reap), or twice. Which
    #: process it was cannot be told, so any one tears the pass.
    torn: bool

    def settled(self, previous: GroupScan | None) -> bool:
        """Whether this pass can be trusted: nothing exited during it or waits to be
        reaped, and the previous pass saw the same processes (so no reap fell
        between the two either)."""
        return not self.torn and not self.zombies and previous is not None and previous.pids == self.pids


def group_scan(pgid: int) -> GroupScan:
    """A pass over /proc: the processes of ``pgid`` as ``group_cpu_seconds`` counts them."""
    table: dict[int, tuple[int, int, bool, int]] = {}  # pid -> ppid, pgrp, zombie, ticks
    torn = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            torn = True  # exited (and reaped) since the listing
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # After the command: state ppid pgrp ...; utime stime cutime cstime are the
        # 14th-17th fields of the line, 11th-14th after the command.
        ticks = sum(int(n) for n in fields[11:15])
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0] in ("Z", "X"), ticks)

    def counted(pid: int) -> bool:
        for _ in range(64):  # up the tree to the leader, bounded
            if pid not in table:
                return False
            ppid, pgrp, _, _ = table[pid]
            if pid == pgid or pgrp == pgid:
                return True
            pid = ppid
        return False

    mine = {pid: row for pid, row in table.items() if counted(pid)}
    return GroupScan(
        seconds=sum(row[3] for row in mine.values()) / CLOCK_TICKS,
        pids=frozenset(mine),
        zombies=sum(row[2] for row in mine.values()),
        torn=torn,
    )


class ProxyCpu:
    """The CPU time (user + system) a proxy's process group spends over one
    measurement: ``with ProxyCpu(pgid) as meter: run()``, then ``meter.seconds``
    (None when there is no proxy: ``pgid`` None, the direct path). Every row's CPU
    figure comes from here, so that they all count the same way: the whole group
    (nginx's workers, socat's children, gportmap's workers), read from /proc before
    and after, with no sampling of its own in between.

    Each reading is a settled pass (``GroupScan.settled``): a proxy that forks per
    peer (socat) has children exiting at the very moments a measurement starts and
    ends, as the previous client's socket closes, and one pass torn by such an exit
    once lost a whole measurement's CPU (socat: 0.0 s over 14,710 datagrams)."""

    #: At the end of a measurement, how long at most to wait for the processes a
    #: proxy forked per connection (socat, websockify) to exit and be reaped, and for
    #: the reading to settle. A proxy that forks nothing settles in two passes.
    REAP_WAIT = 3.0
    #: At the start, how long at most to wait for the reading to settle.
    SETTLE_WAIT = 1.0
    #: The pause between two passes over /proc.
    PASS_INTERVAL = 0.02

    def __init__(self, pgid: int | None) -> None:
        self.pgid = pgid
        self.seconds: float | None = None
        self._before: GroupScan | None = None

    def __enter__(self) -> ProxyCpu:
        if self.pgid is not None:
            self._before = self._settled(self.SETTLE_WAIT, lambda scan: True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pgid is None or self._before is None:
            return
        before = self._before
        after = self._settled(self.REAP_WAIT, lambda scan: len(scan.pids) <= len(before.pids))
        self.seconds = after.seconds - before.seconds

    def _settled(self, wait: float, done: Callable[[GroupScan], bool]) -> GroupScan:
        """The first pass that is settled and ``done``, else the last one made within
        ``wait`` seconds."""
        assert self.pgid is not None
        deadline = time.monotonic() + wait
        previous = None
        scan = group_scan(self.pgid)
        while not (scan.settled(previous) and done(scan)) and time.monotonic() < deadline:
            time.sleep(self.PASS_INTERVAL)
            previous, scan = scan, group_scan(self.pgid)
        return scan

    def per(self, units: float, scale: float = 1e6) -> float | None:
        """CPU per unit of work, in 1/``scale`` s (µs by default): None without a
        proxy or without work."""
        if self.seconds is None or units <= 0:
            return None
        return self.seconds * scale / units


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
#: "error N why", and holds them until its stdin closes. MODE: tcp (plain bytes), tls
#: (a full handshake, no verification, then the bytes over TLS) or websocket (an
#: upgrade offering the "binary" subprotocol, then one masked binary frame; the echo
#: comes back as the payload of the bridge's frames).
CLIENT = r"""
import base64, os, resource, socket, ssl, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "tcp"
GREETING = b"held-connection!"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE

def read_exactly(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed before the echo came back")
        got += chunk
    return got

def upgrade(s):
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: binary\r\n\r\n"
    ).encode())
    head = b""
    while b"\r\n\r\n" not in head:  # a server sends nothing after its 101 unprompted
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if status.split()[1:2] != [b"101"]:
        raise ConnectionError(f"upgrade refused: {status[:100]!r}")

def frame_payload(s):
    first, second = read_exactly(s, 2)
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(read_exactly(s, 2), "big")
    elif size == 127:
        size = int.from_bytes(read_exactly(s, 8), "big")
    mask = read_exactly(s, 4) if second & 0x80 else None
    data = read_exactly(s, size)
    if mask:
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    if first & 0x0F == 0x8:
        raise ConnectionError(f"closed by the bridge: {data[:60]!r}")
    return data if first & 0x0F in (0x0, 0x1, 0x2) else b""  # pings and pongs: nothing

def round_trip(s):
    if mode != "websocket":
        s.sendall(GREETING)
        read_exactly(s, len(GREETING))
        return
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(GREETING))
    s.sendall(bytes([0x82, 0x80 | len(GREETING)]) + mask + masked)
    got = b""
    while len(got) < len(GREETING):
        got += frame_payload(s)

held = []
try:
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=15)
        if mode == "tls":
            s = context.wrap_socket(s)
        held.append(s)
        if mode == "websocket":
            upgrade(s)
        round_trip(s)
    print("ok", len(held), flush=True)
except OSError as exc:
    print("error", len(held), repr(exc), flush=True)
sys.stdin.read()
"""

#: Connections per client process: few enough processes for 2 cores, each far from
#: the descriptor limit.
PER_CLIENT = 2500
#: The same for TLS and WebSocket, whose handshakes cost the client CPU too: more
#: processes, so that both cores make handshakes.
PER_CLIENT_HANDSHAKING = 500


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


def group_fds(pgid: int) -> int:
    """Open descriptors over every process in process group ``pgid``."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                total += len(os.listdir(Path(entry.path, "fd")))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total


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
    processes: Processes,
    proxy_pgid: int,
    port: int,
    count: int,
    settle: float = 0.5,
    timeout: float = 120.0,
    mode: str = "tcp",
) -> dict[str, float]:
    """Open ``count`` connections through the proxy at ``port`` (a round trip on each,
    after a TLS handshake or a WebSocket upgrade for ``mode`` tls or websocket) and
    hold them idle; return how the proxy group's PSS and RSS grew with them held."""
    per_client = PER_CLIENT if mode == "tcp" else PER_CLIENT_HANDSHAKING
    warm = processes.start(
        "held-warmup",
        [sys.executable, "-c", CLIENT, str(port), "20", mode],
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
            n = min(per_client, remaining)
            clients.append(
                processes.start(
                    f"held-client-{index}",
                    [sys.executable, "-c", CLIENT, str(port), str(n), mode],
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
        fds = group_fds(proxy_pgid)
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
        "pss_per_connection_kb": (held_mem["pss"] - before["pss"]) * 1.024 / count,
        "rss_per_connection_kb": (held_mem["rss"] - before["rss"]) * 1.024 / count,
        "proxy_fds": fds,
    }
