"""With the Linux-only features forced off (GPORTMAP_PORTABLE=1), gportmap still
forwards and stops cleanly: the fallbacks other platforms use are tested here."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import resource
import signal
import socket
import sys
import types

import pytest
from conftest import connect, free_port, recv_until_eof, tcp_rule

import gportmap.inotify
import gportmap.platform
from gportmap.platform import raise_fd_limit


def test_portable_mode_forwards_and_stops(start_gportmap, echo_target) -> None:
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="portable")], env={"GPORTMAP_PORTABLE": "1"})
    (started,) = gp.events("started")
    assert started["features"] == []
    payload = os.urandom(1 << 20)
    sock = connect(port)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == payload
    sock.close()
    gp.wait_event("connection_closed", rule="portable")
    gp.signal(signal.SIGTERM)
    assert gp.wait_exit(15) == 0


def test_linux_features_are_reported_when_available(start_gportmap, echo_target) -> None:
    gp = start_gportmap([tcp_rule(free_port(), echo_target.port)])
    (started,) = gp.events("started")
    assert {"posix_signals", "fd_limit"} <= set(started["features"])


# -- the open-file limit: raised as far as the platform allows -------------------------


class FakeNoFile:
    """RLIMIT_NOFILE of a simulated kernel: ``accepts(soft)`` says which soft limits
    setrlimit takes; refused ones raise ValueError as CPython does for EINVAL/EPERM."""

    def __init__(self, soft: int, hard: int, accepts) -> None:
        self.soft, self.hard, self.accepts = soft, hard, accepts
        self.tried: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.tried.append(limits)
        soft, hard = limits
        if hard != self.hard or not self.accepts(soft):
            raise ValueError("current limit exceeds maximum limit")
        self.soft = soft


@pytest.fixture
def nofile(monkeypatch):
    def simulate(soft: int, hard: int, accepts, system: str = "linux", max_files_per_proc: int | None = None):
        fake = FakeNoFile(soft, hard, accepts)
        monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
        monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
        monkeypatch.setattr(sys, "platform", system)
        monkeypatch.setattr(gportmap.platform, "macos_max_files_per_proc", lambda: max_files_per_proc)
        return fake

    return simulate


def test_macos_refusing_more_than_open_max_still_gets_open_max(nofile) -> None:
    """macOS: the hard limit is unlimited and setrlimit refuses anything above
    OPEN_MAX (kern.maxfilesperproc unreadable). Raising to the hard limit failed and
    left the default 256, about 95 connections; now the soft limit is 10240."""
    fake = nofile(256, resource.RLIM_INFINITY, lambda soft: soft <= 10240, system="darwin")
    assert raise_fd_limit() == 10240
    assert fake.soft == 10240
    assert fake.tried[0] == (1 << 20, resource.RLIM_INFINITY)  # the most first, the hard limit kept


def test_macos_uses_kern_maxfilesperproc_when_it_can_read_it(nofile) -> None:
    fake = nofile(256, resource.RLIM_INFINITY, lambda soft: soft <= 24576, system="darwin", max_files_per_proc=24576)
    assert raise_fd_limit() == 24576 and fake.soft == 24576


def test_a_finite_hard_limit_is_taken_whole(nofile) -> None:
    fake = nofile(1024, 524288, lambda soft: True)
    assert raise_fd_limit() == 524288
    assert fake.tried == [(524288, 524288)]


def test_elsewhere_the_limit_steps_down_until_the_kernel_accepts(nofile) -> None:
    """Linux with an unlimited hard limit refuses more than fs.nr_open (EPERM)."""
    fake = nofile(1024, resource.RLIM_INFINITY, lambda soft: soft <= 300000)
    assert raise_fd_limit() == 262144 and fake.soft == 262144


def test_the_soft_limit_is_never_lowered(nofile) -> None:
    fake = nofile(65536, 65536, lambda soft: True)
    assert raise_fd_limit() == 65536 and fake.tried == []
    refused = nofile(4096, resource.RLIM_INFINITY, lambda soft: False, system="darwin")
    assert raise_fd_limit() == 4096 and refused.soft == 4096
    assert all(soft > 4096 for soft, _ in refused.tried)


def test_an_unlimited_soft_limit_is_reported_as_none(nofile) -> None:
    fake = nofile(resource.RLIM_INFINITY, resource.RLIM_INFINITY, lambda soft: True)
    assert raise_fd_limit() is None and fake.tried == []


# -- inotify: probed, not assumed; the watcher polls wherever it is missing or fails ------

#: A sitecustomize.py (found first on PYTHONPATH, run by Python at start-up) that
#: replaces libc as ``gportmap.inotify`` sees it, so that the subprocess meets a
#: system without inotify, or without instances left. Test-only: the product has no
#: switch for this; the probe and the watcher run their real code on the fake libc.
LIBC_SHADOW = """
import ctypes
import errno
import types

import gportmap.inotify


def _init1_failing(flags):
    ctypes.set_errno(errno.{code})
    return -1


def _libc():
    {body}


gportmap.inotify._libc = _libc
"""

#: The fake libc per simulated system: (the errno its inotify_init1 fails with, where
#: it has one; the body of ``_libc``).
FAKE_LIBCS = {
    # macOS, or a libc without the symbol: what ctypes raises for a missing one.
    "no_symbol": ("ENOSYS", 'raise AttributeError("libc.so.6: undefined symbol: inotify_init1")'),
    # A kernel built without inotify, or a seccomp filter refusing it.
    "enosys": ("ENOSYS", "return types.SimpleNamespace(inotify_init1=_init1_failing)"),
    # fs.inotify.max_user_instances reached (by other processes of the same user).
    "emfile": ("EMFILE", "return types.SimpleNamespace(inotify_init1=_init1_failing)"),
}


def shadowed_libc(tmp_path, kind: str) -> dict[str, str]:
    """The environment for a gportmap that sees the fake libc ``kind``."""
    shadow = tmp_path / f"libc_{kind}"
    shadow.mkdir()
    code, body = FAKE_LIBCS[kind]
    (shadow / "sitecustomize.py").write_text(LIBC_SHADOW.format(code=code, body=body))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))}


def assert_polls_and_applies_an_edit(gp, echo_target) -> None:
    """``/stats`` says poll, and a rule added to the file starts forwarding."""
    assert gp.admin_json("/stats")["config"]["watching"] == "poll"
    gp.wait_event("watching", mode="poll")
    (first,) = json.loads(gp.rules_path.read_text())
    second = free_port()
    gp.rules_path.write_text(json.dumps([first, tcp_rule(second, echo_target.port, name="second")]))
    (reloaded,) = gp.wait_event("config_reloaded")
    assert reloaded["added"] == ["second"]
    with connect(second) as sock:
        sock.sendall(b"polled")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"polled"


@pytest.mark.parametrize("absent", ["portable", "no_symbol", "enosys"])
def test_without_inotify_the_rules_file_is_polled(start_gportmap, echo_target, tmp_path, absent) -> None:
    """Where the system offers no inotify, gportmap starts, reports no inotify, and
    follows the rules file by polling, as planned rather than as a failed watch (no
    ``watcher_fallback``). Before, ``Features.inotify`` only said whether pyinotify
    imported, which the watcher no longer uses: a kernel without inotify was
    reported as having it."""
    env = {"GPORTMAP_PORTABLE": "1"} if absent == "portable" else shadowed_libc(tmp_path, absent)
    gp = start_gportmap([tcp_rule(free_port(), echo_target.port, name="first")], env={**env, "GPORTMAP_WATCHER": ""})
    (started,) = gp.events("started")
    assert "inotify" not in started["features"]
    assert ("posix_signals" in started["features"]) == (absent != "portable")
    assert_polls_and_applies_an_edit(gp, echo_target)
    assert not gp.events("watcher_fallback")


def test_no_inotify_instance_left_when_the_watch_starts_falls_back_to_polling(
    start_gportmap, echo_target, tmp_path
) -> None:
    """inotify_init1 failing with EMFILE (the per-user instance limit, which cannot
    be lowered safely on a shared machine, so libc is faked): inotify is there, so
    the feature is reported, and the watch that cannot start says why
    (``watcher_fallback``) and polls."""
    env = {**shadowed_libc(tmp_path, "emfile"), "GPORTMAP_WATCHER": ""}
    gp = start_gportmap([tcp_rule(free_port(), echo_target.port, name="first")], env=env)
    (started,) = gp.events("started")
    assert "inotify" in started["features"]
    (fallback,) = gp.events("watcher_fallback")
    assert os.strerror(errno.EMFILE) in fallback["message"], fallback
    assert_polls_and_applies_an_edit(gp, echo_target)


def test_linux_watches_with_inotify(start_gportmap, echo_target) -> None:
    gp = start_gportmap([tcp_rule(free_port(), echo_target.port)], env={"GPORTMAP_WATCHER": ""})
    (started,) = gp.events("started")
    assert "inotify" in started["features"]
    assert gp.admin_json("/stats")["config"]["watching"] == "inotify"
    assert not gp.events("watcher_fallback")


def inotify_fds() -> int:
    """inotify instances open in this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return count


def test_the_probe_finds_inotify_here_and_leaves_no_instance_open() -> None:
    before = inotify_fds()
    assert gportmap.inotify.available()
    assert inotify_fds() == before


class FakeLibc:
    """libc whose inotify_init1 fails with ``code``, setting errno as libc does."""

    def __init__(self, code: int) -> None:
        self.code = code

    def inotify_init1(self, flags: int) -> int:
        ctypes.set_errno(self.code)
        return -1


@pytest.mark.parametrize(
    "code, expected",
    [
        (errno.ENOSYS, False),  # no inotify in the kernel, or seccomp says so
        (errno.EPERM, False),  # a sandbox refusing it
        (errno.EINVAL, False),
        (errno.EMFILE, True),  # instances used up: there, but none left now
        (errno.ENFILE, True),
        (errno.ENOMEM, True),
    ],
    ids=lambda value: str(value) if isinstance(value, bool) else errno.errorcode[value],
)
def test_the_probe_tells_absence_from_exhaustion(monkeypatch, code, expected) -> None:
    monkeypatch.setattr(gportmap.inotify, "_libc", lambda: FakeLibc(code))
    assert gportmap.inotify.available() is expected


def test_the_probe_says_no_without_the_symbol_or_off_linux(monkeypatch) -> None:
    def no_symbol():
        raise AttributeError("undefined symbol: inotify_init1")

    monkeypatch.setattr(gportmap.inotify, "_libc", no_symbol)
    assert gportmap.inotify.available() is False
    monkeypatch.undo()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert gportmap.inotify.available() is False


# -- Windows: an ICMP port unreachable arrives as a connection reset on UDP sockets -------


class ResetOnce:
    """A UDP socket whose next read raises ConnectionResetError once: what Windows
    does after an ICMP port unreachable (WSAECONNRESET on the next recv/recvfrom,
    listening sockets included). Linux never does, so the test injects it."""

    def __init__(self, real, armed: bool = True) -> None:
        self.real, self.armed = real, armed

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def _reset(self) -> None:
        if self.armed:
            self.armed = False
            raise ConnectionResetError(errno.ECONNRESET, "An existing connection was forcibly closed by the remote host")

    def recvfrom(self, size: int):
        self._reset()
        return self.real.recvfrom(size)

    def recv(self, size: int):
        self._reset()
        return self.real.recv(size)


class ListenerWithReset:
    """What ``UdpServer.start`` takes as a handed-over listener: ``_sock`` is read."""

    def __init__(self, sock) -> None:
        self.sock, self._sock = sock, ResetOnce(sock._sock)

    def close(self) -> None:
        self.sock.close()


def test_udp_treats_windows_connection_resets_as_transient(monkeypatch, caplog) -> None:
    """A reset on the listening socket and one on a session's socket: neither closes
    the listener or the session (before, the session ended with ``error`` and the
    reply waiting in its socket was lost; the listener logged a WARNING
    ``listener_error``). Datagrams keep flowing both ways through a real UdpServer."""
    import _socket

    import gevent
    import gevent.socket
    from gevent.server import DatagramServer

    from gportmap.config import Rule
    from gportmap.engine.relay import BufferPool
    from gportmap.log import RateLimiter
    from gportmap.protocols import ServerContext
    from gportmap.protocols import udp as udp_module
    from gportmap.stats import StatsRegistry

    target = DatagramServer(("127.0.0.1", 0), lambda data, address: target.sendto(data, address))
    target.start()
    upstreams: list[ResetOnce] = []

    def upstream_socket(family: int, kind: int) -> ResetOnce:
        upstreams.append(ResetOnce(_socket.socket(family, kind)))
        return upstreams[-1]

    monkeypatch.setattr(udp_module, "_socket", types.SimpleNamespace(socket=upstream_socket, getaddrinfo=_socket.getaddrinfo))
    caplog.set_level(logging.DEBUG, logger="gportmap")
    bound = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bound.bind(("127.0.0.1", 0))
    port = bound.getsockname()[1]
    rule = Rule("dns", "udp", "127.0.0.1", port, "127.0.0.1", target.server_port)
    server = udp_module.UdpServer(rule, ServerContext(StatsRegistry(), BufferPool(), RateLimiter()))
    listener = ListenerWithReset(bound)
    server.start(listener)
    client = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with gevent.Timeout(10):
            client.sendto(b"first", ("127.0.0.1", port))  # the listener's read raises first
            assert client.recvfrom(100)[0] == b"first"  # and the session's first read too
            (session,) = server.sessions.values()
            assert not listener._sock.armed and not upstreams[0].armed  # both resets happened
            client.sendto(b"second", ("127.0.0.1", port))
            assert client.recvfrom(100)[0] == b"second"
        assert list(server.sessions.values()) == [session] and not session.closed
        assert len(upstreams) == 1 and session.packets_received == 2 and session.packets_sent == 2
        assert server.stats.udp_dropped["error"] == 1  # counted like Linux's ECONNREFUSED
        assert server._reader is not None  # still reading the listener
        events = [getattr(record, "event", None) for record in caplog.records]
        assert "listener_error" not in events and "session_closed" not in events
        (icmp,) = [r for r in caplog.records if getattr(r, "event", None) == "udp_icmp_error"]
        assert icmp.levelno == logging.DEBUG
    finally:
        client.close()
        server.close()
        target.stop()
