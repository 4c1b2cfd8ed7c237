"""Shared fixtures: free loopback ports, target servers in threads, and gportmap
itself as a subprocess whose JSON log lines the tests read as events.

Nothing here sleeps to synchronise: ``wait_for`` polls a condition against a deadline.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


class HubTurns:
    """A greenlet counting its turns on the hub, from its making to ``stop``: work
    done in the calling greenlet that yields to the hub lets it run (``count``
    grows), work done in one go does not."""

    def __init__(self) -> None:
        import gevent

        self.count = 0
        self._running = True
        self._greenlet = gevent.spawn(self._tick)
        gevent.sleep(0)  # its first turn

    def _tick(self) -> None:
        import gevent

        while self._running:
            self.count += 1
            gevent.sleep(0)

    def stop(self) -> None:
        self._running = False
        self._greenlet.join(5)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


@contextlib.contextmanager
def stuck_listener() -> Iterator[tuple[str, int]]:
    """The address of a listener that never accepts, its accept queue full: the
    kernel drops SYNs to it, so a connect there waits (for connect timeouts).
    Skips the test on a kernel where the queue cannot be filled."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(50):
            probe = socket.socket()
            probe.settimeout(0.3)
            try:
                probe.connect(listener.getsockname())
            except TimeoutError:
                probe.close()
                break
            fillers.append(probe)
        else:
            pytest.skip("could not fill the accept queue on this kernel")
        yield listener.getsockname()
    finally:
        for probe in fillers:
            probe.close()
        listener.close()


def wait_on_hub(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """``wait_for`` for a test whose servers run on this thread's hub (in-process):
    each poll yields to the hub (``gevent.sleep``) so they can make the condition
    true, where ``time.sleep`` would stop them."""
    import gevent

    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        gevent.sleep(0.01)


def require_tool(name: str) -> str:
    """The path of a real peer program; skip without it, or fail under
    GPORTMAP_REQUIRE_TOOLS=1 (set by .ci/run, which installs them)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path:
        return path
    if os.environ.get("GPORTMAP_REQUIRE_TOOLS", "") not in ("", "0"):
        pytest.fail(f"{name} is required (GPORTMAP_REQUIRE_TOOLS=1) but not installed")
    pytest.skip(f"{name} is not installed (.ci/run installs it)")


class PortPool:
    """Loopback ports for gportmap to bind, handed out so that nothing else takes them
    between the moment a test picks one and the moment gportmap binds it.

    Binding port 0 and releasing it (the usual free-port trick) returns a port of the
    kernel's ephemeral range, the range every outgoing connection of every process
    here draws its source port from: any client socket of this or a concurrent test
    run could take it before gportmap binds, and the rule fails with "address already
    in use". The pool hands out ports *below* that range instead, which the kernel
    never assigns on its own; each one at most once per test session, each checked
    free for TCP and UDP alike (some rules share a port between the two), starting
    from a place that depends on the process id so that concurrent test runs walk
    different stretches of the range. What is left is an explicit bind by another
    program to the same port in that instant; the admin port, which the fixture
    picks itself, is moreover retried on a collision (``Gportmap.wait_started``).
    """

    #: The lowest port handed out; the highest is just below the ephemeral range.
    low = 20000
    #: Used when /proc does not say where the ephemeral range starts.
    default_ephemeral_low = 32768

    def __init__(self) -> None:
        self.high = self._ephemeral_low() - 1
        if self.high - self.low < 1000:  # an unusual ip_local_port_range: use the top of the space
            self.low, self.high = 61000, 65535
        self._span = self.high - self.low + 1
        self._next = self.low + (os.getpid() * 7919) % self._span
        self._given: set[int] = set()
        self._lock = threading.Lock()

    def _ephemeral_low(self) -> int:
        try:
            return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return self.default_ephemeral_low

    @staticmethod
    def _free(port: int) -> bool:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                try:
                    sock.bind((LOOPBACK, port))
                except OSError:
                    return False
        return True

    def take(self) -> int:
        with self._lock:
            for _ in range(self._span):
                port = self._next
                self._next = self.low + (self._next - self.low + 1) % self._span
                if port not in self._given and self._free(port):
                    self._given.add(port)
                    return port
        raise AssertionError(f"no free port left in {self.low}-{self.high}")


_PORTS = PortPool()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free for TCP and UDP, outside the ephemeral range and not handed
    out before in this session (see ``PortPool``). ``kind`` is kept for the callers
    that name the transport; the port is free for both."""
    return _PORTS.take()


class BlockPool:
    """Blocks of consecutive ports below 20,000 (for port ranges), each handed out once
    per session and checked free on every address asked for (TCP and UDP). The single
    ports of ``free_port`` come from 20,000 up, so a block never takes one another test
    was handed. Blocks of ``big`` ports or more come from the bottom of the space and
    the others from the top (from a place that depends on the process id), so that
    small blocks never split the room a 10,000-port block needs."""

    low, split, high = 2000, 12500, 19999
    big = 2000

    def __init__(self) -> None:
        self._next_big = self.low
        self._next_small = self.split + (os.getpid() * 131) % (self.high - self.split - 3000)
        self._given: list[range] = []
        self._lock = threading.Lock()

    @staticmethod
    def _free(port: int, hosts: tuple[str, ...]) -> bool:
        for host in hosts:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as sock:
                    if kind == socket.SOCK_STREAM:  # as gportmap binds: a TIME_WAIT left there is no obstacle
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        sock.bind((host, port))
                    except OSError:
                        return False
        return True

    def take(self, count: int, hosts: tuple[str, ...] = (LOOPBACK,)) -> range:
        big = count >= self.big
        low, high = (self.low, self.split - 1) if big else (self.split, self.high)
        with self._lock:
            start = self._next_big if big else self._next_small
            for _ in range(2 * (high - low) // max(count, 1) + 4):
                if start + count - 1 > high:
                    start = low
                block = range(start, start + count)
                start = block.stop
                if any(block.start < given.stop and given.start < block.stop for given in self._given):
                    continue
                bad = next((port for port in block if not self._free(port, hosts)), None)
                if bad is None:
                    self._given.append(block)
                    if big:
                        self._next_big = start
                    else:
                        self._next_small = start
                    return block
                start = bad + 1
        raise AssertionError(f"no {count} free consecutive ports in {low}-{high}")


_BLOCKS = BlockPool()


def free_block(count: int, hosts: tuple[str, ...] = (LOOPBACK,)) -> range:
    """``count`` consecutive loopback ports, free on every one of ``hosts`` (see ``BlockPool``)."""
    return _BLOCKS.take(count, hosts)


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Drain until the peer closes (EOF or reset): True, or False if it does not
    within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks, got = [], 0
    while got < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class TargetServer:
    """A TCP server on 127.0.0.1:0 that runs ``handler(conn)`` per connection in a thread."""

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 1024) -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for conn in self.conns:
                try:
                    conn.close()
                except OSError:
                    pass


class Pusher:
    """Sends ``chunk`` until ``limit`` bytes or until the peer stops reading (no
    progress for ``stall`` seconds); ``done`` is set when it stops either way."""

    def __init__(self, chunk: bytes, limit: int, stall: float = 2.0) -> None:
        self.chunk, self.limit, self.stall = chunk, limit, stall
        self.bytes = 0
        self.done = threading.Event()

    def push(self, sock: socket.socket) -> None:
        sock.settimeout(self.stall)
        try:
            while self.bytes < self.limit:
                self.bytes += sock.send(self.chunk)
        except OSError:  # the stall timeout, or the connection ended
            pass
        self.done.set()


class HttpPage:
    """A tiny HTTP server on 127.0.0.1 answering every GET with ``body``."""

    def __init__(self, body: bytes, content_type: str = "text/html") -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo_handler(conn: socket.socket) -> None:
    """Echo until EOF, then half-close: the reply side ends after the request side."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class Gportmap:
    """gportmap running as a subprocess on a generated rules file, logging JSON."""

    def __init__(
        self,
        tmp_path: Path,
        rules: Any,
        extra_args: tuple[str, ...] = (),
        env: dict | None = None,
        rules_path: Path | None = None,
    ):
        self.rules_path = rules_path or tmp_path / "rules.json"
        if rules is not None:
            self.rules_path.write_text(json.dumps(rules, indent=2))
        self.log_path = tmp_path / "gportmap.log"
        self._tmp_path = tmp_path
        self._extra_args = extra_args
        self._env = {**os.environ, **(env or {})}
        # gportmap starts hundreds of times per run: let it keep its bytecode, or
        # every start compiles every module it imports again (~60 ms of CPU each).
        self._env.pop("PYTHONDONTWRITEBYTECODE", None)
        # Every instance gets its admin endpoint on a free port unless the test says otherwise.
        self.admin_port: int | None = None
        self._own_admin = not any(arg.startswith("--admin") for arg in extra_args)
        self._spawn()

    def _spawn(self) -> None:
        """Start the process (again, after an admin port collision) with a fresh log."""
        self._log = open(self.log_path, "wb")
        self._records: list[dict] = []
        self._offset = 0
        extra_args = self._extra_args
        if self._own_admin:
            self.admin_port = free_port()
            extra_args = (*extra_args, "--admin", f"{LOOPBACK}:{self.admin_port}")
        cmd = [sys.executable, "-m", "gportmap", str(self.rules_path), "--log-format", "json", *extra_args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self._tmp_path,
            env=self._env,
        )

    def admin(self, path: str, method: str = "GET", token: str | None = None, timeout: float = 10) -> tuple[int, bytes, dict]:
        """One request to the admin endpoint: (status, body, headers)."""
        assert self.admin_port is not None, "this instance has no admin endpoint"
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.admin_port}{path}", method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    def admin_json(self, path: str, method: str = "GET", token: str | None = None) -> Any:
        status, body, _ = self.admin(path, method, token)
        assert status == 200, (status, body)
        return json.loads(body)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def events(self, event: str | None = None) -> list[dict]:
        """Every record so far (parsed incrementally), or those of one event."""
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            self._records.append(json.loads(line))  # a line that is not JSON fails the test
        return [r for r in self._records if event is None or r.get("event") == event]

    def wait_event(self, event: str, timeout: float = 10.0, count: int = 1, **fields: Any) -> list[dict]:
        def matching() -> list[dict]:
            if self.proc.poll() is not None and not self._matching(event, fields, count):
                raise AssertionError(f"gportmap exited ({self.proc.returncode}):\n" + "\n".join(self.lines()))
            return self._matching(event, fields, count)

        return wait_for(matching, timeout, what=f"{count} x {event} {fields}")

    def _matching(self, event: str, fields: dict, count: int) -> list[dict]:
        found = [e for e in self.events(event) if all(e.get(k) == v for k, v in fields.items())]
        return found if len(found) >= count else []

    #: How many times an admin port the fixture picked is picked again when something
    #: else bound it first.
    admin_port_retries = 3

    def wait_started(self, timeout: float = 15.0) -> None:
        self.wait_event("started", timeout)
        if self.admin_port is None:
            return
        # Only a port picked here can be picked again (subclasses that build their own
        # command line, or a test that set admin_port itself, wait as they are).
        retries = self.admin_port_retries if getattr(self, "_own_admin", False) else 0
        for _ in range(retries):
            outcome = self.wait_for_any(("admin_started", "admin_failed"), timeout)
            if outcome["event"] == "admin_started" or "in use" not in str(outcome.get("error")):
                break
            self.close()  # the port was taken between the pick and the bind: pick another
            self._spawn()
            self.wait_event("started", timeout)
        self.wait_event("admin_started", timeout)

    def wait_for_any(self, events: tuple[str, ...], timeout: float = 10.0) -> dict:
        """The first record of any of ``events``."""

        def first() -> dict | None:
            found = [r for r in self.events() if r.get("event") in events]
            if not found and self.proc.poll() is not None:
                raise AssertionError(f"gportmap exited ({self.proc.returncode}):\n" + "\n".join(self.lines()))
            return found[0] if found else None

        return wait_for(first, timeout, what=f"one of {events}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def children(self) -> list[int]:
        """Pids of the worker processes (``--workers``), if any."""
        import psutil

        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def close(self) -> None:
        if self.proc.poll() is None:
            for child in self.children():  # workers would drain after the master's end
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _starter(directory: Callable[[], Path]) -> Iterator[Callable[..., Gportmap]]:
    """The body of the ``start_gportmap`` fixtures: a factory that starts gportmap in
    ``directory()`` and waits until it serves; every process it started is closed
    after."""
    started: list[Gportmap] = []

    def start(
        rules: Any, *extra_args: str, wait: bool = True, env: dict | None = None, rules_path: Path | None = None
    ) -> Gportmap:
        gp = Gportmap(directory(), rules, extra_args, env, rules_path)
        started.append(gp)
        if wait:
            gp.wait_started()
        return gp

    yield start
    for gp in started:
        gp.close()


@pytest.fixture
def start_gportmap(tmp_path: Path) -> Iterator[Callable[..., Gportmap]]:
    """Factory: ``start_gportmap(rules, *args)`` starts gportmap and waits until it serves."""
    yield from _starter(lambda: tmp_path)


@pytest.fixture(scope="module")
def start_shared_gportmap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Gportmap]]:
    """``start_gportmap`` for a whole module: one process, started once, for tests that
    do not interfere (each on a rule of its own, reading only that rule's records and
    figures). A start costs about a second of CPU: a module of a dozen such tests
    saves that many."""
    yield from _starter(lambda: tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def shared_echo_target() -> Iterator[TargetServer]:
    """``echo_target`` for the tests of a module that share one gportmap."""
    server = TargetServer(echo_handler)
    yield server
    server.close()


@pytest.fixture
def lowered_ulimit(monkeypatch: pytest.MonkeyPatch) -> Callable[..., contextlib.AbstractContextManager[None]]:
    """``with lowered_ulimit(256): start_gportmap(...)``: every process the test starts
    inside the block runs under ``ulimit -n 256`` (soft and hard: gportmap cannot raise
    it), its workers too (they inherit it). The test process itself is given ``own``
    descriptors for the clients it holds (skipped where its hard limit is lower)."""

    @contextlib.contextmanager
    def lowered(limit: int, own: int = 3000) -> Iterator[None]:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < own:
            if hard != resource.RLIM_INFINITY and hard < own:
                pytest.skip(f"the test itself needs {own} descriptors; the hard limit is {hard}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (own, hard))
        real_popen = subprocess.Popen

        def limited(*args: Any, **kwargs: Any) -> subprocess.Popen:
            return real_popen(
                *args, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)), **kwargs
            )

        with monkeypatch.context() as patch:
            patch.setattr(subprocess, "Popen", limited)
            yield

    return lowered


@pytest.fixture
def echo_target() -> Iterator[TargetServer]:
    server = TargetServer(echo_handler)
    yield server
    server.close()


def tcp_rule(listen_port: int, target_port: int, **extra: Any) -> dict:
    return {
        "protocol": "tcp",
        "listenHost": LOOPBACK,
        "listenPort": listen_port,
        "targetHost": LOOPBACK,
        "targetPort": target_port,
        **extra,
    }


def connect(port: int, host: str = LOOPBACK, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


def refused(port: int, host: str = LOOPBACK) -> bool:
    """Nothing listens on ``port``: a connection attempt is refused."""
    try:
        connect(port, host, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def echoes(port: int, payload: bytes = b"ping") -> bool:
    """One round trip through ``port`` to an echo target comes back whole."""
    with connect(port) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload)) == payload


# -- what an admin endpoint says about rules, targets and metrics ---------------------


def rule_stats(gp: Gportmap, name: str = "pool") -> dict:
    """The ``/stats`` entry of rule ``name``."""
    return next(rule for rule in gp.admin_json("/stats")["rules"] if rule["name"] == name)


def targets_of(gp: Gportmap, name: str = "pool") -> dict[str, dict]:
    """The ``targets`` of rule ``name`` in ``/stats``, by target name."""
    return {target["name"]: target for target in rule_stats(gp, name)["targets"]}


def metric(gp: Gportmap, name: str, **labels: str) -> float | None:
    """The value of the sample of ``/metrics`` family ``name`` whose labels include
    ``labels``; None when there is none."""
    status, body, _ = gp.admin("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match.group(3))
    return None
