"""Soak: mixed TCP, UDP and WebSocket traffic through one gportmap for a long time,
with a reload every few seconds, watching for slow leaks and silent damage.

    python bench/soak.py                      # 10 minutes, a reload every 10 s
    python bench/soak.py --duration 120       # a shortened run

Every TCP and WebSocket exchange and every UDP datagram carries data whose digest the
client checks, so corruption, truncation or a reply sent to the wrong client counts
as a data error. Every ``--reload-every`` seconds the rules file is rewritten (the tcp,
websocket and udp rules change in turn, so their servers are replaced and their
listeners handed over; an extra rule is added and removed) and SIGHUP applies it.
Every ``--sample-every`` seconds the process's RSS and open descriptors are sampled.

It prints the samples, the slopes of RSS and descriptors after the warm-up (least
squares), the data errors, refused and broken connections, lost datagrams, and a
verdict against the targets of issue 11: zero data errors, zero broken or refused
connections, descriptors back to their idle count once the load stops, RSS growth
under 5 MiB after the warm-up. Exit status 0 when every target is met.

Worker kills: with ``--workers N`` (default 2) a random worker is killed with SIGKILL
every ``--kill-every`` seconds (default 60) and the master restarts it. Connections
that die with a killed worker are deliberate losses, not failures: just before each
kill the soak reads ``/connections`` and notes the clients the victim holds, and a
connection broken or refused within 2 s of a kill with a reset (one the kernel had
queued on the victim's socket) is counted with them. Everything else that breaks is
a failure. RSS and descriptors are those of the master and its workers together.
``--workers 1`` runs one process and kills nothing.

All traffic stays on 127.0.0.1; every loop ends with the run. Not part of CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOOPBACK, free_port, stop, wait_listening  # noqa: E402

MIB = 1024 * 1024


# --- targets -------------------------------------------------------------------------


class TcpEcho:
    """Echo until EOF, then half-close; one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


class UdpEcho:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, address = self.sock.recvfrom(65535)
                self.sock.sendto(data, address)
            except OSError:
                if self.sock.fileno() < 0:
                    return

    def close(self) -> None:
        self.sock.close()


# --- the process under test ------------------------------------------------------------


class Proc:
    """gportmap: its master and its workers, counted together."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        children = []
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as file:
                children = [int(pid) for pid in file.read().split()]
        except OSError:
            pass
        return [self.pid, *children]

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as status:
                    total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass  # a worker that just died
        return total / 1024

    def fds(self) -> int:
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.pids() if os.path.isdir(f"/proc/{pid}/fd"))

    def fd_kinds(self) -> Counter:
        kinds: Counter = Counter()
        for pid in self.pids():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    kinds[os.readlink(f"/proc/{pid}/fd/{fd}").split(":[")[0]] += 1
                except OSError:
                    pass
        return kinds


def rules_document(ports: dict[str, int], targets: dict[str, int], admin: int, generation: int) -> dict:
    """The rules of one generation: one rule changes per generation, in turn, and an
    extra rule comes and goes, so each reload replaces servers and hands listeners over."""
    turn = generation % 3
    rules = [
        {"name": "tcp", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": ports["tcp"], "targetHost": LOOPBACK,
         "targetPort": targets["tcp"], "idleTimeout": 300 + (generation if turn == 0 else 0)},
        {"name": "ws", "protocol": "websocket", "listenHost": LOOPBACK, "listenPort": ports["ws"], "targetHost": LOOPBACK,
         "targetPort": targets["tcp"], "path": "/soak", "idleTimeout": 300 + (generation if turn == 1 else 0)},
        {"name": "udp", "protocol": "udp", "listenHost": LOOPBACK, "listenPort": ports["udp"], "targetHost": LOOPBACK,
         "targetPort": targets["udp"], "sessionTimeout": 6 + generation % 4 if turn == 2 else 5},
    ]
    if generation % 2:
        rules.append({"name": "extra", "protocol": "tcp", "listenHost": LOOPBACK, "listenPort": ports["extra"],
                      "targetHost": LOOPBACK, "targetPort": targets["tcp"]})
    settings = {"admin": {"listen": f"{LOOPBACK}:{admin}"}, "watch": False, "statsInterval": 0, "logLevel": "WARNING",
                "drainTimeout": 60}
    return {"settings": settings, "rules": rules}


# --- clients -----------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(
            ["tcp_conns", "tcp_exchanges", "ws_conns", "ws_messages", "udp_datagrams", "bytes",
             "data_errors", "refused", "broken", "udp_lost"], 0)
        self.notes: list[str] = []
        #: (monotonic time, client address, what) of every broken or refused
        #: connection, to tell deliberate losses (worker kills) from failures.
        self.losses: list[tuple[float, str, str]] = []

    def lost(self, kind: str, client: str, exc: BaseException | str) -> None:
        with self.lock:
            self.counts[kind] += 1
            if len(self.losses) < 100000:
                self.losses.append((time.monotonic(), client, f"{kind}: {exc!r}"))

    def add(self, **deltas: int) -> None:
        with self.lock:
            for key, value in deltas.items():
                self.counts[key] += value

    def note(self, text: str) -> None:
        with self.lock:
            if len(self.notes) < 20:
                self.notes.append(f"{time.strftime('%H:%M:%S')} {text}")


def local_address(sock: socket.socket | None) -> str:
    try:
        if sock is None:
            return ""
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"
    except OSError:
        return ""


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def tcp_client(port: int, tally: Tally, stop_at: float, rng: random.Random) -> None:
    while time.monotonic() < stop_at:
        try:
            sock = socket.create_connection((LOOPBACK, port), timeout=10)
        except OSError as exc:
            tally.lost("refused", "", exc)
            continue
        client = local_address(sock)
        with sock:
            try:
                for _ in range(rng.randint(1, 20)):
                    data = rng.randbytes(rng.choice([1, 100, 1500, 16384, 65536, 262144]))
                    sender = threading.Thread(target=sock.sendall, args=(data,))
                    sender.start()
                    back = recv_exactly(sock, len(data))
                    sender.join()
                    if len(back) < len(data) and back == data[: len(back)]:
                        # cut short, nothing wrong in what came: a connection lost (a kill?)
                        tally.lost("broken", client, f"truncated: sent {len(data)}, got {len(back)} bytes")
                        break
                    if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
                        tally.add(data_errors=1)
                        tally.note(f"tcp data error: sent {len(data)}, got {len(back)} bytes")
                        break
                    tally.add(tcp_exchanges=1, bytes=2 * len(data))
                sock.shutdown(socket.SHUT_WR)
                if sock.recv(1):
                    tally.add(data_errors=1)
                tally.add(tcp_conns=1)
            except OSError as exc:
                tally.lost("broken", client, exc)


def ws_client(port: int, tally: Tally, stop_at: float, rng: random.Random) -> None:
    while time.monotonic() < stop_at:
        try:
            ws = websocket.create_connection(f"ws://{LOOPBACK}:{port}/soak", timeout=10)
        except (OSError, websocket.WebSocketException) as exc:
            tally.lost("refused", "", exc)
            continue
        client = local_address(ws.sock)
        try:
            for _ in range(rng.randint(1, 20)):
                # The target echoes bytes, not messages: read until the whole reply is back.
                data = rng.randbytes(rng.choice([1, 125, 126, 4096, 65536, 200000]))
                ws.send_binary(data)
                back = bytearray()
                while len(back) < len(data):
                    back += ws.recv()
                if len(back) < len(data) and bytes(back) == data[: len(back)]:
                    tally.lost("broken", client, f"truncated: sent {len(data)}, got {len(back)} bytes")
                    break
                if bytes(back) != data:
                    tally.add(data_errors=1)
                    tally.note(f"ws data error: sent {len(data)}, got {len(back)} bytes")
                    break
                tally.add(ws_messages=1, bytes=2 * len(data))
            ws.close()
            tally.add(ws_conns=1)
        except (OSError, websocket.WebSocketException) as exc:
            tally.lost("broken", client, exc)
            ws.shutdown()


def udp_client(port: int, tally: Tally, stop_at: float, rng: random.Random) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((LOOPBACK, port))
    sock.settimeout(2)
    seq = 0
    with sock:
        while time.monotonic() < stop_at:
            seq += 1
            body = seq.to_bytes(8, "big") + rng.randbytes(rng.choice([1, 200, 1400, 8000, 60000]))
            datagram = hashlib.sha256(body).digest()[:8] + body
            sock.send(datagram)
            try:
                while True:  # a late reply to an earlier datagram is not an error, just skipped
                    reply = sock.recv(65535)
                    if reply == datagram:
                        tally.add(udp_datagrams=1, bytes=2 * len(datagram))
                        break
                    if hashlib.sha256(reply[8:]).digest()[:8] != reply[:8]:
                        tally.add(data_errors=1)
                        tally.note("udp data error: a reply that is no datagram of ours")
                        break
            except TimeoutError:
                tally.add(udp_lost=1)
                tally.note(f"udp datagram {seq} got no reply in 2 s")


# --- the run -------------------------------------------------------------------------------


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope, per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


def warm_up(ports: dict[str, int]) -> None:
    with socket.create_connection((LOOPBACK, ports["tcp"]), timeout=10) as sock:
        sock.sendall(b"warm")
        recv_exactly(sock, 4)
    ws = websocket.create_connection(f"ws://{LOOPBACK}:{ports['ws']}/soak", timeout=10)
    ws.send_binary(b"warm")
    ws.recv()
    ws.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"warm", (LOOPBACK, ports["udp"]))
        sock.recv(100)


def open_count(admin: int) -> int:
    """Open connections and udp sessions (sessions expire after sessionTimeout)."""
    return sum(rule["connections"]["active"] for rule in admin_json(admin, "/stats")["rules"])


def admin_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=10) as response:
        return json.load(response)


class Killer:
    """Kills a random worker every so often and remembers whom it held."""

    def __init__(self, admin: int, rng: random.Random) -> None:
        self.admin = admin
        self.rng = rng
        self.kills: list[tuple[float, set[str]]] = []  # (time, clients the victim held)

    def kill(self) -> str:
        workers = [w for w in admin_json(self.admin, "/stats")["workers"] if w["state"] == "running"]
        if not workers:
            return "no running worker to kill"
        victim = self.rng.choice(workers)
        held = {entry["client"] for entry in admin_json(self.admin, "/connections") if entry["worker"] == victim["index"]}
        self.kills.append((time.monotonic(), held))
        os.kill(victim["pid"], signal.SIGKILL)
        return f"killed worker {victim['index']} (pid {victim['pid']}) holding {len(held)} connection(s)"

    def deliberate(self, when: float, client: str, what: str) -> bool:
        """A loss caused by a kill: the victim held the connection, or it broke within
        2 s of the kill (accepted by the victim after /connections was read, or queued
        on its socket and reset by the kernel)."""
        return any(
            (client and client in held and when >= killed_at) or killed_at <= when <= killed_at + 2
            for killed_at, held in self.kills
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--reload-every", type=float, default=10, help="seconds between reloads (default 10)")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between samples (default 5)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before growth is measured (default: a fifth, at most 60)")
    parser.add_argument("--tcp-clients", type=int, default=4)
    parser.add_argument("--ws-clients", type=int, default=3)
    parser.add_argument("--udp-clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=2, help="gportmap --workers (default 2; 1 = no kills)")
    parser.add_argument("--kill-every", type=float, default=60, help="seconds between worker kills (default 60)")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 5)

    tcp_target, udp_target = TcpEcho(), UdpEcho()
    targets = {"tcp": tcp_target.port, "udp": udp_target.port}
    ports = {"tcp": free_port(), "ws": free_port(), "udp": free_port(socket.SOCK_DGRAM), "extra": free_port()}
    admin = free_port()
    folder = Path(tempfile.mkdtemp(prefix="gportmap-soak-"))
    rules_path, log_path = folder / "rules.json", folder / "gportmap.log"
    rules_path.write_text(json.dumps(rules_document(ports, targets, admin, 0), indent=1))
    log = open(log_path, "wb")
    gp = subprocess.Popen(
        [sys.executable, "-m", "gportmap", str(rules_path), "--log-format", "json", "--workers", str(args.workers)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    proc = Proc(gp.pid)
    print(f"soak: {args.duration:.0f}s of load, reload every {args.reload_every:.0f}s, warm-up {warmup:.0f}s; "
          f"{args.tcp_clients} tcp + {args.ws_clients} websocket + {args.udp_clients} udp clients; log {log_path}")
    if args.workers > 1:
        print(f"workers: {args.workers}; a random worker is killed with SIGKILL every {args.kill_every:.0f}s")
    else:
        print("workers: 1 (one process, no deliberate kills)")
    tally = Tally()
    killer = Killer(admin, random.Random(args.seed + 1))
    samples: list[tuple[float, float, int]] = []
    status = 1
    try:
        wait_listening(ports["tcp"])
        wait_listening(admin)
        deadline = time.monotonic() + 30
        while args.workers > 1 and time.monotonic() < deadline and sum(
            w["state"] == "running" for w in admin_json(admin, "/stats")["workers"]
        ) < args.workers:
            time.sleep(0.2)
        warm_up(ports)  # one exchange per protocol: what is created once (threads, pools) exists now
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and open_count(admin):
            time.sleep(0.2)  # the warm-up's udp session expires after sessionTimeout
        idle_fds_before, kinds_before = proc.fds(), proc.fd_kinds()
        start = time.monotonic()
        stop_at = start + args.duration
        rng = random.Random(args.seed)
        clients = (
            [threading.Thread(target=tcp_client, args=(ports["tcp"], tally, stop_at, random.Random(rng.random())))
             for _ in range(args.tcp_clients)]
            + [threading.Thread(target=ws_client, args=(ports["ws"], tally, stop_at, random.Random(rng.random())))
               for _ in range(args.ws_clients)]
            + [threading.Thread(target=udp_client, args=(ports["udp"], tally, stop_at, random.Random(rng.random())))
               for _ in range(args.udp_clients)]
        )
        for thread in clients:
            thread.start()
        generation = 0
        next_reload, next_sample = start + args.reload_every, start
        next_kill = start + args.kill_every if args.workers > 1 else float("inf")
        print(f"{'t':>6} {'RSS MiB':>8} {'fds':>5} {'tcp conns':>9} {'ws conns':>8} {'udp dgrams':>10} {'MiB moved':>9} "
              f"{'errors':>6} {'broken':>6} {'refused':>7} {'reloads':>7}")
        while time.monotonic() < stop_at:
            now = time.monotonic()
            if gp.poll() is not None:
                raise RuntimeError(f"gportmap exited ({gp.returncode}); see {log_path}")
            if now >= next_reload:
                generation += 1
                rules_path.write_text(json.dumps(rules_document(ports, targets, admin, generation), indent=1))
                gp.send_signal(signal.SIGHUP)
                next_reload += args.reload_every
            if now >= next_kill:
                tally.note(killer.kill())
                next_kill += args.kill_every
            if now >= next_sample:
                t = now - start
                samples.append((t, proc.rss_mib(), proc.fds()))
                c = tally.counts
                print(f"{t:6.0f} {samples[-1][1]:8.2f} {samples[-1][2]:5d} {c['tcp_conns']:9d} {c['ws_conns']:8d} "
                      f"{c['udp_datagrams']:10d} {c['bytes'] / MIB:9.0f} {c['data_errors']:6d} {c['broken']:6d} "
                      f"{c['refused']:7d} {generation:7d}", flush=True)
                next_sample += args.sample_every
            time.sleep(max(0.0, min(next_reload, next_sample, next_kill, stop_at) - time.monotonic()))  # load: threads
        for thread in clients:
            thread.join(60)
        if generation % 2:  # the extra rule's listener is there on odd generations
            generation += 1
            rules_path.write_text(json.dumps(rules_document(ports, targets, admin, generation), indent=1))
            gp.send_signal(signal.SIGHUP)
        # Load over: every connection ends, and the descriptors must be back to idle.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            open_count(admin)
            or sum(w["state"] == "running" for w in admin_json(admin, "/stats")["workers"]) < min(args.workers, 2) - 1
        ):
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.fds() > idle_fds_before:
            time.sleep(0.2)
        idle_fds_after, kinds_after = proc.fds(), proc.fd_kinds()
        stats = admin_json(admin, "/stats")
        reloads = stats["config"]["reloads"]

        after = [(t, rss) for t, rss, _ in samples if t >= warmup]
        fd_after = [(t, fds) for t, _, fds in samples if t >= warmup]
        base_rss = after[0][1] if after else samples[-1][1]
        growth = max(rss for _, rss in after) - base_rss if after else 0.0
        c = tally.counts
        deliberate = [loss for loss in tally.losses if killer.deliberate(*loss)]
        failures = [loss for loss in tally.losses if not killer.deliberate(*loss)]
        broken_failures = sum(1 for _, _, what in failures if what.startswith("broken"))
        refused_failures = sum(1 for _, _, what in failures if what.startswith("refused"))
        for when, client, what in failures[:10]:
            tally.note(f"{when - start:7.1f}s {client or '-'} {what}")
        print()
        print(f"duration {args.duration:.0f}s, {len(samples)} samples, warm-up {warmup:.0f}s")
        print(f"traffic: {c['tcp_conns']} tcp connections ({c['tcp_exchanges']} exchanges), {c['ws_conns']} websocket "
              f"connections ({c['ws_messages']} messages), {c['udp_datagrams']} udp round trips, {c['bytes'] / MIB:.0f} MiB moved")
        print(f"reloads: {generation} sent, {reloads['success']} applied, {reloads['failure']} failed")
        print(f"RSS: {samples[0][1]:.2f} MiB at start, {base_rss:.2f} after warm-up, {samples[-1][1]:.2f} at the end; "
              f"growth after warm-up {growth:+.2f} MiB; slope {slope(after):+.3f} MiB/min")
        print(f"fds: {idle_fds_before} idle before, {idle_fds_after} idle after; under load "
              f"{min(f for _, _, f in samples)}-{max(f for _, _, f in samples)}, slope {slope(fd_after):+.2f} fds/min")
        if kinds_after != kinds_before:
            print(f"fds by kind: before {dict(kinds_before)}, after {dict(kinds_after)}")
        print(f"data errors {c['data_errors']}, broken connections {c['broken']}, refused connections {c['refused']}, "
              f"udp datagrams without a reply {c['udp_lost']}")
        if killer.kills:
            held = sum(len(h) for _, h in killer.kills)
            print(f"worker kills: {len(killer.kills)}, holding {held} connection(s); losses at the kills "
                  f"(deliberate): {len(deliberate)}; broken outside the kills: {broken_failures}, "
                  f"refused outside the kills: {refused_failures}; workers restarted: "
                  f"{sum(w['restarts'] for w in stats['workers'])}")
        for note in tally.notes:
            print(f"  {note}")
        checks = {
            "zero data errors": c["data_errors"] == 0,
            "zero broken connections (outside deliberate kills)": broken_failures == 0,
            "zero refused connections (outside deliberate kills)": refused_failures == 0,
            "every reload applied": reloads["success"] >= generation and reloads["failure"] == 0,
            "fds back to idle": idle_fds_after <= idle_fds_before,
            "RSS growth < 5 MiB after warm-up": growth < 5,
        }
        for name, ok in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
        status = 0 if all(checks.values()) else 1
    finally:
        stop(gp)
        log.close()
        tcp_target.close()
        udp_target.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
