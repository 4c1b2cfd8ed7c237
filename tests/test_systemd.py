"""systemd's protocols, spoken for real with gportmap as a subprocess.

- Readiness (``sd_notify``): the test plays the service manager's end, an
  ``AF_UNIX`` datagram socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
  abstract namespace), and reads what gportmap says: ``READY=1`` once it serves,
  ``RELOADING=1``/``READY=1`` around each applied reload and none around a rejected
  one, ``STATUS=`` lines, ``STOPPING=1`` at SIGTERM, ``WATCHDOG=1`` pings for its own
  PID only.
- Socket activation (``$LISTEN_FDS``): ``systemd-socket-activate`` (from Debian's
  systemd package) holds a loopback port and starts gportmap at the first connection,
  which gportmap then serves; a raw launcher passes TCP and UDP sockets as fd 3, 4, 5
  the way systemd does, for adoption, reloads and the stop.

systemd itself does not run in this sandbox as a service manager, so the real unit is
not started here: the unit file is checked by ``systemd-analyze verify`` in
tests/test_deploy.py, and the protocols it relies on are tried here end to end.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    LOOPBACK,
    Gportmap,
    connect,
    free_block,
    free_port,
    recv_exactly,
    refused,
    require_tool,
    tcp_rule,
    wait_for,
)

from gportmap.config import parse
from gportmap.runtime.systemd import (
    InheritedSocket,
    InheritedSockets,
    notify_address,
    take_listen_fds,
    watchdog_interval,
)

#: struct ucred: the sender's pid, uid and gid.
CREDENTIALS = struct.Struct("3i")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC is one clock for every process: gportmap's MONOTONIC_USEC
    can be compared with it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class NotifySocket:
    """The service manager's end of ``sd_notify``: every datagram gportmap sends,
    parsed into ``{KEY: VALUE}`` plus the sender's PID under ``"pid"`` (from the
    kernel's credentials, as systemd checks ``NotifyAccess=main``), read by a thread so
    that none is lost to a full queue while the test waits on something else."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.received: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def _read(self) -> None:
        while not self._closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(CREDENTIALS.size))
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    fields["pid"] = str(CREDENTIALS.unpack(value)[0])
            with self._lock:
                self.received.append(fields)

    def messages(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.received)

    def message(self, index: int) -> dict[str, str]:
        return self.messages()[index]

    def wait(self, predicate: Callable[[dict[str, str]], bool], what: str, after: int = 0) -> int:
        """The index of the first message from ``after`` on that ``predicate`` accepts."""

        def found() -> int | None:
            for index, message in enumerate(self.messages()[after:], after):
                if predicate(message):
                    return index + 1  # truthy even for the first message
            return None

        try:
            return wait_for(found, 20, what=what) - 1
        except AssertionError:
            raise AssertionError(f"no {what}; received: {self.messages()}") from None

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: an AF_UNIX address must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gpm-sd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify(short_dir: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(short_dir / "notify"))
    yield listener
    listener.close()


def is_ready(message: dict[str, str]) -> bool:
    return message.get("READY") == "1"


def is_reloading(message: dict[str, str]) -> bool:
    return message.get("RELOADING") == "1"


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def write_rules(path: Path, rules: Any) -> None:
    """A new version renamed over the file, as editors save."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rules))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# the protocol's parts, in process
# --------------------------------------------------------------------------------------


def test_notify_socket_addresses():
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@gportmap/notify") == "\0gportmap/notify"  # the abstract namespace
    assert notify_address("vsock:2:1234") is None  # a kind of address not spoken here
    assert notify_address("") is None and notify_address(None) is None


def test_watchdog_is_for_the_pid_it_names():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0  # pings at half the timeout
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval({}, 42) is None


def test_listen_fds_of_another_process_are_ignored_and_the_variables_cleared():
    """``$LISTEN_FDS`` meant for another PID (a parent that forgot to clear them) names
    descriptors this process does not have; nothing is taken, and the variables are
    gone so that no child of this one takes them either."""
    environ = {"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert take_listen_fds(environ, pid=4242) == []
    assert environ == {"PATH": "/bin"}
    for broken in ({"LISTEN_FDS": "two", "LISTEN_PID": "4242"}, {"LISTEN_FDS": "1"}, {"LISTEN_PID": "4242"}):
        assert take_listen_fds(dict(broken), pid=4242) == []


def test_a_passed_socket_on_any_port_and_address_of_a_rule_is_that_rules():
    """A rule on two addresses and three ports adopts a passed socket on any of the
    six (the match the start uses, ``matching``), so none of them is reported
    unmatched; one of another transport, address or port is."""
    (rule,) = parse(
        json.dumps(
            [{**tcp_rule(7000, 9, name="both"), "listenHost": [LOOPBACK, "127.0.0.2"], "listenPort": "7000-7002"}]
        ),
        "rules.json",
    ).enabled_rules

    def passed(fd: int, host: str, port: int, transport: str = "tcp") -> InheritedSocket:
        return InheritedSocket(f"fd{fd}", fd, transport, ipaddress.ip_address(host), port, None)  # type: ignore[arg-type]

    ours = [passed(3, "127.0.0.2", 7002), passed(4, LOOPBACK, 7001)]
    others = [passed(5, LOOPBACK, 7001, "udp"), passed(6, "127.0.0.3", 7001), passed(7, LOOPBACK, 7003)]
    inherited = InheritedSockets([*ours, *others])
    assert inherited.adopted_by(rule) == [ours[1], ours[0]]  # in the rule's order: address, then port
    assert inherited.report_unmatched([rule]) == others


# --------------------------------------------------------------------------------------
# readiness, reloads, status, stop
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ready_once_serving_then_status_and_stopping(start_gportmap, echo_target, notify):
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port, name="web")]}, env=notify.env, wait=False)
    ready = notify.message(notify.wait(is_ready, "READY=1"))
    # READY=1 comes once the rules run and the admin endpoint started: both answer at
    # once, with no retry.
    with connect(port) as sock:
        assert echo(sock, b"ready") == b"ready"
    status, body, _ = gp.admin("/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert ready["STATUS"] == "serving 1 rule, 0 connections"
    assert "WATCHDOG" not in ready  # no watchdog asked for
    assert sum(map(is_ready, notify.messages())) == 1

    # STATUS= follows the figures (at most every few seconds).
    held = connect(port)
    assert echo(held, b"held") == b"held"
    notify.wait(
        lambda m: m.get("STATUS") == "serving 1 rule, 1 connection", "STATUS with the open connection"
    )

    gp.signal(signal.SIGTERM)
    stopping = notify.wait(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
    assert notify.messages()[stopping]["STATUS"] == "stopping: draining 1 connection(s)"
    held.close()
    assert gp.wait_exit() == 0
    assert not any(map(is_ready, notify.messages()[stopping:]))


@pytest.mark.slow
def test_each_applied_reload_is_bracketed_by_reloading_and_ready(start_gportmap, echo_target, notify):
    """RELOADING=1 (with MONOTONIC_USEC) before the new version changes anything and
    READY=1 after it, for the watcher and SIGHUP alike; a rejected version applies
    nothing and sends neither, but the status says the last reload was rejected."""
    first, second = free_port(), free_port()
    rules = {"settings": {"drainTimeout": 1}, "rules": [tcp_rule(first, echo_target.port, name="a")]}
    gp = start_gportmap(rules, env=notify.env)
    ready = notify.wait(is_ready, "READY=1")

    def bracketed(after: int, serving: str) -> int:
        """The RELOADING=1 ... READY=1 pair after message ``after``; its READY index."""
        reloading = notify.wait(is_reloading, "RELOADING=1", after)
        usec = int(notify.messages()[reloading]["MONOTONIC_USEC"])
        assert before <= usec <= monotonic_usec()
        done = notify.wait(is_ready, "READY=1 after the reload", reloading + 1)
        assert notify.messages()[done]["STATUS"] == serving
        assert not any(map(is_reloading, notify.messages()[reloading + 1 : done]))
        return done

    before = monotonic_usec()
    rules["rules"].append(tcp_rule(second, echo_target.port, name="b"))
    write_rules(gp.rules_path, rules)
    gp.wait_event("config_reloaded", source="watcher")
    ready = bracketed(ready, "serving 2 rules, 0 connections")

    before = monotonic_usec()
    gp.signal(signal.SIGHUP)
    gp.wait_event("config_reloaded", source="signal")
    ready = bracketed(ready, "serving 2 rules, 0 connections")

    gp.rules_path.write_text('{"rules": [')
    gp.wait_event("config_invalid")
    rejected = notify.wait(
        lambda m: m.get("STATUS") == "serving 2 rules, 0 connections; last reload rejected",
        "STATUS naming the rejected reload",
        ready,
    )

    before = monotonic_usec()
    del rules["rules"][1]
    write_rules(gp.rules_path, rules)
    gp.wait_event("config_reloaded", source="watcher", count=2)
    bracketed(rejected, "serving 1 rule, 0 connections")
    # Three applied reloads, three brackets: none for the rejected version.
    assert sum(map(is_reloading, notify.messages())) == 3
    assert sum(map(is_ready, notify.messages())) == 4


@pytest.mark.slow  # three processes
def test_with_workers_only_the_master_notifies(start_gportmap, echo_target, notify):
    """NotifyAccess=main: systemd takes messages from the main process only. With
    --workers the master says READY=1 once every worker serves, and brackets reloads;
    no worker sends anything."""
    port = free_port()
    gp = start_gportmap(
        {"rules": [tcp_rule(port, echo_target.port, name="web")]},
        "--workers",
        "2",
        env=notify.env,
        wait=False,
    )
    ready = notify.wait(is_ready, "READY=1")
    for _ in range(4):  # every worker serves already: the kernel spreads these over them
        with connect(port) as sock:
            assert echo(sock, b"w") == b"w"
    assert notify.message(ready)["STATUS"] == "serving 1 rule, 0 connections"
    assert len(gp.wait_event("worker_started", count=2)) == 2
    gp.signal(signal.SIGHUP)
    reloading = notify.wait(is_reloading, "RELOADING=1", ready)
    notify.wait(is_ready, "READY=1 after the reload", reloading)
    gp.signal(signal.SIGTERM)
    notify.wait(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
    assert gp.wait_exit() == 0
    assert {m["pid"] for m in notify.messages()} == {str(gp.pid)}


class Launched(Gportmap):
    """gportmap started by a launcher (``prefix``) that execs it in place, keeping its
    PID, as systemd, systemd-socket-activate and ``sh -c 'exec ...'`` do. Lines of the
    launcher's own in the shared log (``launcher_lines``) are set aside."""

    launcher_lines = (b"Listening on ", b"Communication attempt on ", b"Execing ", b"Failed to ")

    def __init__(
        self,
        tmp_path: Path,
        rules: Any,
        prefix: Sequence[str],
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        log_name: str = "gportmap.log",
    ) -> None:
        self.rules_path = tmp_path / "rules.json"
        if rules is not None:
            self.rules_path.write_text(json.dumps(rules))
        self.log_path = tmp_path / log_name
        self._log = open(self.log_path, "wb")
        self._records: list[dict] = []
        self._offset = 0
        self.launcher_output: list[bytes] = []
        self.admin_port = free_port()
        cmd = [
            *prefix,
            sys.executable, "-m", "gportmap", str(self.rules_path),
            "--log-format", "json", "--admin", f"{LOOPBACK}:{self.admin_port}", *extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
            env={**os.environ, **(env or {})},
            pass_fds=tuple(pass_fds),
        )

    def events(self, event: str | None = None) -> list[dict]:
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            if line.startswith(self.launcher_lines):
                self.launcher_output.append(line)
            else:
                self._records.append(json.loads(line))  # anything else must be gportmap's JSON
        return [r for r in self._records if event is None or r.get("event") == event]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    started: list[Launched] = []

    def start(*args: Any, **kwargs: Any) -> Launched:
        gp = Launched(tmp_path, *args, **kwargs)
        started.append(gp)
        return gp

    yield start
    for gp in started:
        gp.close()


#: ``sh`` puts its own PID (which ``exec`` keeps for gportmap) in WATCHDOG_PID, as
#: systemd names the main process.
OWN_PID = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"]


def test_watchdog_pings_go_to_the_pid_they_are_meant_for(launch, echo_target, short_dir):
    notify = NotifySocket("@" + short_dir.name + "-watchdog")  # the abstract namespace
    try:
        port = free_port()
        gp = launch(
            {"rules": [tcp_rule(port, echo_target.port)]},
            OWN_PID,
            env={**notify.env, "WATCHDOG_USEC": "400000"},
        )
        ready = notify.wait(is_ready, "READY=1")
        assert notify.messages()[ready].get("WATCHDOG") == "1"  # the first ping with READY=1
        pings = lambda: [m for m in notify.messages() if m.get("WATCHDOG") == "1"]  # noqa: E731
        wait_for(lambda: len(pings()) >= 4, 20, what="WATCHDOG=1 every WATCHDOG_USEC/2")
        gp.signal(signal.SIGTERM)
        assert gp.wait_exit() == 0
    finally:
        notify.close()


def test_no_watchdog_pings_for_another_pid(start_gportmap, echo_target, notify):
    """$WATCHDOG_PID names another process (gportmap inherited it): no pings. The
    first ping would ride on READY=1, so its absence there shows it without waiting."""
    gp = start_gportmap(
        {"rules": [tcp_rule(free_port(), echo_target.port)]},
        env={**notify.env, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())},
    )
    ready = notify.wait(is_ready, "READY=1")
    gp.signal(signal.SIGHUP)
    notify.wait(is_ready, "READY=1 after a reload", ready + 1)
    gp.signal(signal.SIGTERM)
    assert gp.wait_exit() == 0
    notify.wait(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
    assert not [m for m in notify.messages() if "WATCHDOG" in m]


def test_a_notify_socket_nobody_reads_is_logged_once_and_changes_nothing(
    start_gportmap, echo_target, short_dir
):
    """The manager's socket is gone: every send fails at once (never blocks), the
    first failure is logged, and gportmap serves, reloads and stops as usual."""
    port = free_port()
    gp = start_gportmap(
        {"rules": [tcp_rule(port, echo_target.port)]},
        env={"NOTIFY_SOCKET": str(short_dir / "nobody"), "WATCHDOG_USEC": "200000"},
    )
    (failed,) = gp.wait_event("notify_failed")
    assert failed["address"] == str(short_dir / "nobody")
    with connect(port) as sock:
        assert echo(sock, b"still") == b"still"
    gp.signal(signal.SIGHUP)
    gp.wait_event("config_reloaded", source="signal")
    gp.signal(signal.SIGTERM)
    assert gp.wait_exit() == 0
    assert len(gp.events("notify_failed")) == 1  # READY, pings, reload, STOPPING: logged once


# --------------------------------------------------------------------------------------
# socket activation
# --------------------------------------------------------------------------------------


class UdpEcho:
    """A UDP target on 127.0.0.1 that sends every datagram back."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
                self.sock.sendto(data, peer)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def udp_echo(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(payload, (LOOPBACK, port))
        return client.recv(65535)



def passed_environment() -> list[str]:
    """systemd-socket-activate hands its child only PATH, HOME and the LISTEN_*
    variables: ``-E`` for those this interpreter was given that change what it runs."""
    return [f"--setenv={name}={os.environ[name]}" for name in ("PYTHONPATH",) if name in os.environ]


def socket_activated(
    launch, choose: Callable[[], tuple[Any, Sequence[int]]], names: str
) -> tuple[Launched, Sequence[int]]:
    """gportmap under systemd-socket-activate, which listens on the loopback ports
    ``choose`` returns with the rules for them (fd 3, 4, ... named ``names``) and
    starts gportmap at the first connection. The ports are picked free, then bound
    by the tool: a collision is retried with others."""
    activate = require_tool("systemd-socket-activate")
    for attempt in range(5):
        rules, ports = choose()
        listens = [f"--listen={LOOPBACK}:{port}" for port in ports]
        gp = launch(
            rules,
            [activate, *listens, f"--fdname={names}", *passed_environment()],
            log_name=f"activate-{attempt}.log",
        )

        def listening_or_gone(gp: Launched = gp, wanted: int = len(ports)) -> bool:
            gp.events()
            listening = sum(b"Listening on" in line for line in gp.launcher_output)
            return listening == wanted or gp.proc.poll() is not None

        wait_for(listening_or_gone, 10, what="systemd-socket-activate listening")
        if gp.proc.poll() is None:
            return gp, ports
    pytest.fail(f"systemd-socket-activate could not listen: {gp.launcher_output}")


def test_systemd_socket_activate_starts_gportmap_at_the_first_connection(launch, echo_target, tmp_path):
    """systemd-socket-activate listens, and starts gportmap only when a client
    connects: that client, which connected before gportmap ran at all, is served on
    the socket gportmap adopted."""

    def choose() -> tuple[Any, list[int]]:
        port = free_port()
        return {"rules": [tcp_rule(port, echo_target.port, name="web")]}, [port]

    gp, (port,) = socket_activated(launch, choose, "web")
    assert not gp.events("started")  # nothing runs yet: the tool waits for a client

    with connect(port, timeout=30) as early:
        early.sendall(b"before gportmap ran")
        early.settimeout(30)
        assert recv_exactly(early, 19) == b"before gportmap ran"
    (started,) = gp.wait_event("rule_started", rule="web")
    assert started["adopted"] is True and started["handover"] is False
    (passed,) = gp.events("listen_fds")
    assert passed["sockets"] == [{"fd": 3, "name": "web", "listen": f"{LOOPBACK}:{port}", "transport": "tcp"}]
    (run,) = gp.wait_event("started")
    assert run["pid"] == gp.pid  # the tool exec'd gportmap in its place, as LISTEN_PID says
    assert any(b"Execing" in line for line in gp.launcher_output)

    gp.signal(signal.SIGTERM)
    assert gp.wait_exit() == 0
    assert refused(port)  # the only holder of the socket closed it


def test_systemd_socket_activate_on_two_ports_of_a_range_each_adopted_by_the_range_rule(launch, echo_target):
    """A socket unit listening on some ports of a rule's range (``ListenStream=``
    twice): the range rule adopts each passed socket on its own port, binds the port
    that was not passed itself, and no socket of the range is reported unmatched; a
    passed socket outside every rule is (``socket_unmatched``, the last fd)."""

    def choose() -> tuple[Any, list[int]]:
        block = free_block(4)
        rule = {**tcp_rule(block[0], echo_target.port, name="range"), "listenPort": f"{block[0]}-{block[2]}"}
        return {"rules": [rule]}, [block[1], block[2], block[3]]

    gp, (second, third, spare) = socket_activated(launch, choose, "second:third:spare")
    assert not gp.events("started")
    early = [connect(port, timeout=30) for port in (second, third)]  # the first starts gportmap
    try:
        for sock, payload in zip(early, (b"second", b"third!"), strict=True):
            sock.sendall(payload)
            sock.settimeout(30)
            assert recv_exactly(sock, 6) == payload
    finally:
        for sock in early:
            sock.close()
    (started,) = gp.wait_event("rule_started", rule="range")
    assert (started["listeners"], started["adopted"], started["handover"]) == (3, 2, 0)
    (unmatched,) = gp.wait_event("socket_unmatched")  # the fds are reported in order: the spare's is last
    assert (unmatched["fd"], unmatched["fd_name"], unmatched["listen"]) == (5, "spare", f"{LOOPBACK}:{spare}")
    first = second - 1
    with connect(first) as sock:  # the port no unit passed: bound by gportmap
        assert echo(sock, b"bound") == b"bound"
    gp.signal(signal.SIGTERM)
    assert gp.wait_exit() == 0
    assert len(gp.events("socket_unmatched")) == 1
    assert all(refused(port) for port in (first, second, third, spare))


#: Passes the given descriptors as fd 3, 4, ... with LISTEN_FDS, LISTEN_PID (its own
#: PID, which exec keeps) and LISTEN_FDNAMES, as systemd does, then execs the command.
#: Usage: LAUNCHER NAMES FD... -- COMMAND...
LAUNCHER = r"""
import fcntl, os, sys
split = sys.argv.index("--")
names, fds = sys.argv[1], [int(fd) for fd in sys.argv[2:split]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)  # only fd 3, 4, ... reach the command
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)  # inheritable, as exec needs
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=names)
command = sys.argv[split + 1 :]
os.execv(command[0], command)
"""


def listening_socket(kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind((LOOPBACK, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(16)
    return sock


def launch_with_sockets(
    launch, rules: Any, sockets: Sequence[socket.socket], names: str, *args: str
) -> Launched:
    """gportmap with ``sockets`` passed as fd 3, 4, ...; the test's own copies are
    closed once it runs, so gportmap holds them alone."""
    fds = [str(sock.fileno()) for sock in sockets]
    gp = launch(
        rules,
        [sys.executable, "-c", LAUNCHER, names, *fds, "--"],
        args,
        pass_fds=[sock.fileno() for sock in sockets],
    )
    for sock in sockets:
        sock.close()
    return gp


def test_inherited_tcp_and_udp_sockets_are_adopted_kept_across_reloads_and_closed_at_stop(
    launch, echo_target
):
    udp_target = UdpEcho()
    web, dns, spare = (
        listening_socket(socket.SOCK_STREAM),
        listening_socket(socket.SOCK_DGRAM),
        listening_socket(socket.SOCK_STREAM),
    )
    web_port, dns_port, spare_port = (s.getsockname()[1] for s in (web, dns, spare))
    web_rule = tcp_rule(web_port, echo_target.port, name="web")
    dns_rule = {**tcp_rule(dns_port, udp_target.port, name="dns"), "protocol": "udp"}
    rules = {"settings": {"drainTimeout": 5}, "rules": [web_rule, dns_rule]}
    try:
        gp = launch_with_sockets(launch, rules, [web, dns, spare], "web:dns:spare")
        gp.wait_started()
        adopted = {e["rule"]: e["adopted"] for e in gp.events("rule_started")}
        assert adopted == {"web": True, "dns": True}
        (unmatched,) = gp.events("socket_unmatched")
        assert (unmatched["fd"], unmatched["fd_name"], unmatched["listen"]) == (
            5,
            "spare",
            f"{LOOPBACK}:{spare_port}",
        )
        with connect(web_port) as sock:
            assert echo(sock, b"tcp") == b"tcp"
        assert udp_echo(dns_port, b"udp") == b"udp"

        # A reload that removes the rule closes its listener; the socket stays open in
        # gportmap (as in systemd, which keeps its own copy): a client waits in its
        # backlog, and is served once the rule is back on the same socket.
        write_rules(gp.rules_path, {**rules, "rules": [dns_rule]})
        gp.wait_event("rule_stopped", rule="web")
        waiting = connect(web_port)
        waiting.sendall(b"waited")
        write_rules(gp.rules_path, rules)
        gp.wait_event("rule_started", rule="web", count=2)
        assert gp.events("rule_started")[-1]["adopted"] is True
        waiting.settimeout(10)
        assert recv_exactly(waiting, 6) == b"waited"
        waiting.close()

        # The stop closes every listener, inherited ones included: new attempts are
        # refused while an open connection drains.
        held = connect(web_port)
        assert echo(held, b"held") == b"held"
        gp.signal(signal.SIGTERM)
        gp.wait_event("stopping")
        assert refused(web_port) and refused(spare_port)
        assert echo(held, b"drain") == b"drain"
        held.close()
        assert gp.wait_exit() == 0
    finally:
        udp_target.close()


def test_inherited_sockets_with_workers_are_refused_at_start(launch, echo_target):
    """Socket activation serves one process: with --workers gportmap says so and
    exits 2 rather than run workers whose binds the socket unit's port refuses."""
    web = listening_socket(socket.SOCK_STREAM)
    port = web.getsockname()[1]
    gp = launch_with_sockets(
        launch, {"rules": [tcp_rule(port, echo_target.port, name="web")]}, [web], "web", "--workers", "2"
    )
    assert gp.wait_exit() == 2
    (refusal,) = gp.events("usage_error")
    assert refusal["sockets"] == 1 and "socket activation serves one process" in refusal["message"]
    assert not gp.events("worker_started")
