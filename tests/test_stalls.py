"""The idle clock reads traffic missed, not time passed: a gportmap process stalled
(SIGSTOP, then SIGCONT) for longer than a rule's idleTimeout or sessionTimeout
keeps the WebSocket connections and UDP sessions that had bytes waiting for it,
and still cuts (expires) the ones that were silent.

The stall is the stimulus here, so it is a real pause of the subprocess; every
wait for an effect polls with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
import websocket
from conftest import LOOPBACK, connect, free_port, recv_exactly, tcp_rule, wait_for

from gportmap.engine.hubrelay import HubRelay, adopt
from gportmap.engine.relay import BufferPool, IdleTimeout
from gportmap.engine.wsbridge import WsBridge
from gportmap.stats import Connection, RuleStats

#: idleTimeout / sessionTimeout of the rules: long enough that a loaded machine's
#: delay between the last exchange and the SIGSTOP stays far below it.
TIMEOUT = 2.0
#: How long the process stays stopped: well past the timeout.
STALL = 2 * TIMEOUT


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def waiting_for_events(pid: int) -> bool:
    """The main thread sleeps in the event loop's poll: the state a server spends its
    time in, and the one whose stop makes the first loop turn after SIGCONT see its
    expired timers before any socket (the poll returns EINTR, with no events)."""
    with open(f"/proc/{pid}/wchan") as wchan:
        where = wchan.read().strip()
    return process_state(pid) == "S" and "poll" in where


@contextlib.contextmanager
def stalled(gp) -> Iterator[None]:
    """gportmap stopped while the body runs and then for STALL seconds, then continued."""
    try:
        wait_for(lambda: waiting_for_events(gp.pid), timeout=5, what="gportmap waiting in its event loop")
    except AssertionError:
        pass  # a kernel that hides wchan: stopped wherever it is, the stall is still one
    os.kill(gp.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: process_state(gp.pid) == "T", what="gportmap stopped")
        yield
        time.sleep(STALL)  # the stall itself: what is tested, not a synchronisation
    finally:
        os.kill(gp.pid, signal.SIGCONT)


def ws_rule(port: int, target: int, **extra) -> dict:
    return {
        "protocol": "websocket",
        "listenHost": LOOPBACK,
        "listenPort": port,
        "targetHost": LOOPBACK,
        "targetPort": target,
        **extra,
    }


def client_text(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


@pytest.mark.slow
def test_a_stall_cuts_idle_websocket_connections_and_spares_busy_ones(start_gportmap, echo_target):
    port = free_port()
    gp = start_gportmap([ws_rule(port, echo_target.port, name="ws", idleTimeout=TIMEOUT)])
    busy, idle = (websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10) for _ in range(2))
    for ws in (busy, idle):
        ws.send_binary(b"hello")
        assert ws.recv() == b"hello"
    busy_client, idle_client = client_text(busy.sock), client_text(idle.sock)
    with stalled(gp):
        busy.send_binary(b"sent during the stall")  # waits in the kernel for the process
    assert busy.recv() == b"sent during the stall"
    busy.send_binary(b"still here")  # at once, well within idleTimeout of the stall's end
    assert busy.recv() == b"still here"
    (closed,) = gp.wait_event("connection_closed", client=idle_client)
    assert closed["reason"] == "idle_timeout"
    # Quiet from now on, the busy one is cut by its idle clock like any other.
    (closed,) = gp.wait_event("connection_closed", client=busy_client, timeout=5 * TIMEOUT)
    assert closed["reason"] == "idle_timeout"
    idle.close()
    busy.close()


@pytest.mark.slow
def test_a_stall_spares_a_busy_tunnel_at_both_ends(start_gportmap, echo_target):
    """Both bridge roles: the tunnel's entry (a tcp rule, WebSocket client) and its
    exit (a websocket rule) run in the stalled process."""
    exit_port, entry = free_port(), free_port()
    gp = start_gportmap(
        [
            ws_rule(exit_port, echo_target.port, name="exit", idleTimeout=TIMEOUT),
            tcp_rule(entry, exit_port, name="entry", targetProtocol="websocket", idleTimeout=TIMEOUT),
        ]
    )
    busy, idle = connect(entry), connect(entry)
    for sock in (busy, idle):
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
    with stalled(gp):
        busy.sendall(b"during the stall")
    assert recv_exactly(busy, 16) == b"during the stall"
    busy.sendall(b"still here")  # at once, well within idleTimeout of the stall's end
    assert recv_exactly(busy, 10) == b"still here"
    # The idle one is cut: at the entry or at the exit, whichever clock the loop
    # serves first; either way its client sees the end.
    idle.settimeout(10)
    assert idle.recv(1) == b""
    cuts = gp.wait_event("connection_closed", reason="idle_timeout")
    assert all(cut["bytes_received"] == 5 for cut in cuts)  # the idle one's legs, never the busy one's
    idle.close()
    busy.close()


@pytest.mark.slow
def test_a_stall_expires_silent_udp_sessions_and_spares_busy_ones(start_gportmap):
    """Three sessions: one silent; one whose client sends during the stall (the
    datagram waits on the shared listening socket); one whose target answers during
    the stall (the reply waits on the session's own socket)."""
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind((LOOPBACK, 0))
    target.settimeout(10)
    port = free_port(socket.SOCK_DGRAM)
    rule = {
        "protocol": "udp",
        "name": "udp",
        "listenHost": LOOPBACK,
        "listenPort": port,
        "targetHost": LOOPBACK,
        "targetPort": target.getsockname()[1],
        "sessionTimeout": TIMEOUT,
    }
    gp = start_gportmap([rule])
    clients, upstream = {}, {}
    try:
        for name in ("silent", "asking", "answered"):
            sock = clients[name] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((LOOPBACK, 0))
            sock.settimeout(10)
            sock.sendto(name.encode(), (LOOPBACK, port))
            data, address = target.recvfrom(100)
            upstream[data.decode()] = address  # the session's own socket, as the target sees it
        for name, sock in clients.items():
            target.sendto(b"hi " + name.encode(), upstream[name])
            assert sock.recv(100) == b"hi " + name.encode()
        with stalled(gp):
            clients["asking"].sendto(b"during the stall", (LOOPBACK, port))
            target.sendto(b"late reply", upstream["answered"])
        data, address = target.recvfrom(100)
        assert data == b"during the stall"
        assert address == upstream["asking"]  # through the same session, not a new one
        assert clients["answered"].recv(100) == b"late reply"  # its session kept its socket
        (closed,) = gp.wait_event("session_closed", client=client_text(clients["silent"]))
        assert closed["reason"] == "expired"
        # Silent from now on, the two others expire like any session.
        closed = gp.wait_event("session_closed", reason="expired", count=3, timeout=5 * TIMEOUT)
        assert {record["client"] for record in closed} == {client_text(sock) for sock in clients.values()}
        stats = next(r for r in gp.admin_json("/stats")["rules"] if r["name"] == "udp")
        assert stats["connections"]["total"] == 3  # no session was made again
    finally:
        target.close()
        for sock in clients.values():
            sock.close()


def test_the_idle_check_looks_where_each_direction_waits():
    """In-process, on socket pairs: a direction waiting to read is not idle while
    bytes wait for it; one waiting to write is not idle while there is room; with
    neither, the connection is idle. (A busy download to a client that read during
    a stall has room waiting, not bytes.)"""
    ws, ws_peer = socket.socketpair()
    tcp, tcp_peer = socket.socketpair()
    sockets = (ws, ws_peer, tcp, tcp_peer)
    try:
        conn = Connection(1, RuleStats("ws", "websocket"), "client", "target")
        bridge = WsBridge(ws, b"", tcp, conn, TIMEOUT, BufferPool(), 1 << 20, False)
        bridge.settle_timeout = 0.01
        upload, download = object(), object()  # the two directions' greenlets
        bridge._waits[upload] = (ws.fileno(), False)
        with pytest.raises(IdleTimeout):
            bridge._check_idle()
        ws_peer.sendall(b"x")
        bridge._check_idle()  # bytes wait: not idle
        ws.recv(1)
        tcp.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                tcp.send(b"\0" * 65536)  # the target reads nothing: no room
        bridge._waits[download] = (tcp.fileno(), True)
        with pytest.raises(IdleTimeout):
            bridge._check_idle()
        tcp_peer.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while tcp_peer.recv(1 << 20):  # the target reads it all: room again
                pass
        bridge._check_idle()  # room to write: not idle
    finally:
        for sock in sockets:
            sock.close()


def test_the_hub_relays_idle_check_looks_where_each_direction_waits():
    """The same for the hub relay (``HubRelay._could_go_on``, on socket pairs): not
    idle while bytes wait on a socket a direction reads, nor while there is room on
    one a direction waits to write to; idle with neither."""
    client, client_peer = socket.socketpair()
    target, target_peer = socket.socketpair()
    try:
        conn = Connection(1, RuleStats("ws", "websocket"), "client", "target")
        relay = HubRelay(adopt(client), adopt(target), conn, TIMEOUT, on_done=lambda reason, error: None)
        relay.up.reader.start(relay.up.on_readable)
        relay.down.reader.start(relay.down.on_readable)
        assert not relay._could_go_on()
        client_peer.sendall(b"x")
        assert relay._could_go_on()  # bytes wait where the upload reads
        relay.client.recv(1)
        relay.target.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                relay.target.send(b"\0" * 65536)  # the target reads nothing: no room
        relay.up._wait_writable()  # the upload now waits to write to the target
        assert not relay._could_go_on()
        target_peer.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while target_peer.recv(1 << 20):  # the target reads it all: room again
                pass
        assert relay._could_go_on()  # room where the upload waits to write: not idle
        relay.abort("stopped")
    finally:
        for sock in (client_peer, target_peer):
            sock.close()
