"""The C relay engine (``gportmap.engine._pump``, ``gportmap.engine.pumprelay``) in
process, on real sockets: exact bytes both ways, the counters, half-closes,
bounded backpressure, splice, errors, freeze/resume (an upgrade's hand-over), the
abort, the idle clock, a bug in a connection, descriptor reuse, and the switch
that turns it off.

The relays run on this thread's gevent hub, so the peers are cooperative gevent
sockets in greenlets, and every wait yields to the hub against a deadline
(``wait_on_hub``, ``gevent.Timeout``). Where the C engine mirrors the Python relay
(``HubRelay``), a test runs both (``relay_kind``) and asserts the same result.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import hashlib
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import gevent
import gevent.server
import gevent.socket
import psutil
import pytest
from conftest import LOOPBACK, free_port, recv_exactly, recv_until_eof, wait_on_hub
from gevent import get_hub

from gportmap.config import Rule
from gportmap.engine import pumprelay
from gportmap.engine.connector import HubConnect
from gportmap.engine.hubrelay import HubRelay, adopt
from gportmap.engine.idle import waiting
from gportmap.engine.pumprelay import PumpEngine, PumpRelay, make_relay
from gportmap.engine.relay import BUFFER_SIZE, PIPE_SIZE, BufferPool
from gportmap.log import RateLimiter
from gportmap.platform import Features, detect
from gportmap.protocols import ServerContext
from gportmap.protocols.tcp import TcpServer
from gportmap.stats import Connection, RuleStats, StatsRegistry

needs_pump = pytest.mark.skipif(
    not pumprelay.available(), reason="the C engine (gportmap.engine._pump) is not built"
)

#: Seconds any one exchange may take before the test fails (a hang, not a timing).
DEADLINE = 10.0
#: Most loop turns a bounded push loop takes.
MAX_TURNS = 20000


# -- peers and links ---------------------------------------------------------------------


def randbytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def tcp_pair() -> tuple[gevent.socket.socket, _socket.socket]:
    """(a cooperative peer, the relay's bare non-blocking end) of one loopback TCP connection."""
    with gevent.socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        peer = gevent.socket.create_connection(listener.getsockname())
        end, _ = listener.accept()
    return peer, adopt(end)


def unix_pair() -> tuple[gevent.socket.socket, _socket.socket]:
    peer, end = gevent.socket.socketpair()
    return peer, adopt(end)


@dataclass
class Link:
    """One relayed connection: the client's and the target's peers, the relay between."""

    client: gevent.socket.socket
    target: gevent.socket.socket
    relay: HubRelay
    conn: Connection
    ended: list[tuple[str, str | None]] = field(default_factory=list)

    def ways_done(self) -> tuple[bool, bool]:
        """(client -> target ended, target -> client ended), whichever relay it is."""
        relay = self.relay
        if isinstance(relay, PumpRelay):
            return relay.pair.up_done, relay.pair.down_done
        return relay.up.done, relay.down.done

    def closed(self) -> bool:
        return self.relay.client.fileno() == -1 and self.relay.target.fileno() == -1


class Links:
    """Makes links with ``make_relay`` (the relay ``PumpRelay.enabled`` picks) and
    ends whatever a test left open."""

    def __init__(self) -> None:
        self.made: list[Link] = []
        self.count = 0

    def open(
        self,
        kind: str = "tcp",
        idle: float = 0.0,
        zero_copy: bool = False,
        client: tuple[gevent.socket.socket, _socket.socket] | None = None,
        target: tuple[gevent.socket.socket, _socket.socket] | None = None,
    ) -> Link:
        make = tcp_pair if kind == "tcp" else unix_pair
        client_peer, client_end = client or make()
        target_peer, target_end = target or make()
        self.count += 1
        conn = Connection(self.count, RuleStats("pump", "tcp"), f"client{self.count}", f"target{self.count}")
        link = Link(client_peer, target_peer, None, conn)  # type: ignore[arg-type]
        link.relay = make_relay(
            client_end,
            target_end,
            conn,
            idle,
            zero_copy,
            on_done=lambda reason, error: link.ended.append((reason, error)),
        )
        assert type(link.relay) is (PumpRelay if PumpRelay.enabled else HubRelay)
        link.relay.start()
        self.made.append(link)
        return link

    def close(self) -> None:
        for link in self.made:
            if link.relay.reason is None:
                link.relay.abort("test_over")
            for peer in (link.client, link.target):
                peer.close()


@pytest.fixture
def links() -> Iterator[Links]:
    made = Links()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def hub_errors(monkeypatch) -> Iterator[list]:
    """Exceptions that reached the hub (a watcher callback that raised): none may."""
    hub, seen = get_hub(), []
    original = hub.handle_error

    def handle_error(context, kind, value, tb) -> None:
        seen.append((kind, value))
        original(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", handle_error)
    yield seen
    assert seen == []


@pytest.fixture
def engine(monkeypatch, hub_errors) -> PumpEngine:
    """The C engine on (as ``configure`` turns it on for a CLI process), splicing
    only once a direction streams, and nothing of an earlier test left in it."""
    if not pumprelay.available():
        pytest.skip("the C engine (gportmap.engine._pump) is not built")
    monkeypatch.setattr(PumpRelay, "enabled", True)
    monkeypatch.setattr(HubRelay, "splice_first", False)
    current = PumpEngine.current(get_hub().loop)
    assert current.core.registered == 0
    return current


@pytest.fixture(params=["pump", "hub"])
def relay_kind(request, monkeypatch, engine) -> str:
    """Run the test with the C engine and with the Python relay it mirrors."""
    monkeypatch.setattr(PumpRelay, "enabled", request.param == "pump")
    return request.param


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger="gportmap")
    return caplog


def events(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def spawn_exchange(
    client: gevent.socket.socket, target: gevent.socket.socket, up: bytes, down: bytes
) -> tuple[gevent.Greenlet, gevent.Greenlet]:
    """Each peer sends its bytes then its end, and reads the other's until the end:
    greenlets whose values are (what the target got, what the client got)."""

    def send(sock: gevent.socket.socket, data: bytes) -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    gevent.spawn(send, client, up)
    gevent.spawn(send, target, down)
    return gevent.spawn(recv_until_eof, target), gevent.spawn(recv_until_eof, client)


def exchange(
    client: gevent.socket.socket, target: gevent.socket.socket, up: bytes, down: bytes
) -> tuple[bytes, bytes]:
    at_target, at_client = spawn_exchange(client, target, up, down)
    with gevent.Timeout(DEADLINE):
        return at_target.get(), at_client.get()


class Stream:
    """A reproducible stream of ``size`` bytes, sent in chunks, with the digest of
    what went (or came: a reader keeps one too)."""

    #: A prime block length: no chunk boundary lines up with a repetition.
    BLOCK = 1_048_573

    def __init__(self, size: int, seed: int = 7) -> None:
        block = randbytes(self.BLOCK, seed)
        self.pattern = memoryview(block + block[:BUFFER_SIZE])
        self.size = size
        self.offset = 0
        self.digest = hashlib.sha256()

    def chunk(self) -> memoryview:
        start = self.offset % self.BLOCK
        return self.pattern[start : start + min(BUFFER_SIZE, self.size - self.offset)]

    def went(self, chunk: memoryview, n: int) -> None:
        self.digest.update(chunk[:n])
        self.offset += n

    @property
    def done(self) -> bool:
        return self.offset >= self.size

    def send_rest(self, sock: gevent.socket.socket) -> None:
        """Send what is left (blocking, cooperatively), then the end."""
        sock.setblocking(True)
        while not self.done:
            chunk = self.chunk()
            self.went(chunk, sock.send(chunk))
        sock.shutdown(socket.SHUT_WR)


def read_digest(sock: gevent.socket.socket) -> tuple[int, str]:
    """(bytes, sha256) of everything until the end."""
    buffer = bytearray(1 << 18)
    view, digest, total = memoryview(buffer), hashlib.sha256(), 0
    while n := sock.recv_into(buffer):
        digest.update(view[:n])
        total += n
    return total, digest.hexdigest()


def push_until_stuck(sock: gevent.socket.socket, stream: Stream, relay: HubRelay) -> None:
    """Send without blocking until the relay waits to write to a destination that
    takes nothing and the client's socket takes nothing more, through a few turns
    of the hub (bounded in turns)."""
    sock.setblocking(False)
    quiet = 0
    for _ in range(MAX_TURNS):
        if stream.done:
            break
        chunk = stream.chunk()
        try:
            stream.went(chunk, sock.send(chunk))
            quiet = 0
            continue
        except BlockingIOError:
            pass
        quiet = quiet + 1 if relay._writing_fds() else 0
        if quiet >= 3:
            sock.setblocking(True)
            return
        gevent.sleep(0.01)  # the hub serves the relay meanwhile
    sock.setblocking(True)
    raise AssertionError(f"the relay never pushed back ({stream.offset} bytes sent)")


# -- 1. bytes, counters ----------------------------------------------------------------


@pytest.mark.parametrize("size", [5, 8 << 20], ids=["small", "8MB"])
def test_bytes_move_both_ways_exactly_and_are_counted(relay_kind, links, size):
    up, down = randbytes(size, 1), randbytes(size + 3, 2)
    link = links.open()
    stats, before = link.conn.stats, link.conn.last_active
    assert exchange(link.client, link.target, up, down) == (up, down)
    wait_on_hub(lambda: link.ended, what="the relay's end")
    assert link.ended == [("closed", None)]
    assert (link.conn.bytes_received, link.conn.bytes_sent) == (len(up), len(down))
    assert (stats.bytes_received, stats.bytes_sent) == (len(up), len(down))
    assert link.conn.last_active > before
    assert link.closed()


# -- 2. half-close ---------------------------------------------------------------------


@pytest.mark.parametrize("first", ["client", "target"])
def test_a_half_close_is_forwarded_and_the_other_way_goes_on(relay_kind, links, engine, first):
    link = links.open()
    ending, going = (link.client, link.target) if first == "client" else (link.target, link.client)
    with gevent.Timeout(DEADLINE):
        ending.sendall(b"last words")
        ending.shutdown(socket.SHUT_WR)
        assert recv_until_eof(going) == b"last words"  # the end came after them
        assert link.ended == []
        assert link.ways_done() == ((True, False) if first == "client" else (False, True))
        reply = randbytes(1 << 20, 3)
        sender = gevent.spawn(going.sendall, reply)
        assert recv_exactly(ending, len(reply)) == reply  # the other way still flows
        sender.get()
        going.shutdown(socket.SHUT_WR)
        assert recv_until_eof(ending) == b""
    wait_on_hub(lambda: link.ended, what="the relay's end")
    assert link.ended == [("closed", None)]
    assert link.closed()
    assert engine.core.registered == 0


# -- 3. backpressure ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, zero_copy",
    [("pump", False), ("pump", True), ("hub", True)],
    ids=["pump-copy", "pump-splice", "hub-splice"],
)
def test_a_target_that_reads_nothing_holds_the_relay_to_a_buffer(monkeypatch, engine, links, kind, zero_copy):
    """50 MB pushed at a target that reads nothing: the relay keeps at most one
    buffer (and a splice pipe) per direction, the rest stays in the kernel; then
    the target reads all of it, exactly."""
    monkeypatch.setattr(PumpRelay, "enabled", kind == "pump")
    link = links.open(zero_copy=zero_copy)
    stream = Stream(50 << 20)
    process = psutil.Process()
    rss = process.memory_info().rss
    with gevent.Timeout(DEADLINE):
        push_until_stuck(link.client, stream, link.relay)
    grown = process.memory_info().rss - rss
    assert grown < 8 << 20, f"RSS grew {grown} bytes"
    spliced = link.relay.pair.spliced if kind == "pump" else link.relay.up.spliced
    assert spliced is zero_copy
    tail, done = link.relay.freeze()[0]
    assert not done
    assert 0 < len(tail) <= BUFFER_SIZE + (PIPE_SIZE if zero_copy else 0)
    assert stream.offset < stream.size  # it pushed back before the end
    with gevent.Timeout(DEADLINE):
        reader = gevent.spawn(read_digest, link.target)
        stream.send_rest(link.client)
        assert reader.get() == (stream.size, stream.digest.hexdigest())
        link.target.shutdown(socket.SHUT_WR)
        assert recv_until_eof(link.client) == b""
    wait_on_hub(lambda: link.ended, what="the relay's end")
    assert link.ended == [("closed", None)]
    assert link.conn.bytes_received == stream.size


# -- 4. splice -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 4 << 20], ids=["small", "4MB"])
@pytest.mark.parametrize(
    "may_splice, splice_first", [(True, True), (True, False), (False, True), (False, False)],
    ids=["splice-first", "splice-when-streaming", "never-first", "never"],
)  # fmt: skip
def test_a_pair_splices_only_when_allowed(engine, size, may_splice, splice_first):
    client_peer, client_end = tcp_pair()
    target_peer, target_end = tcp_pair()
    conn = Connection(1, RuleStats("pump", "tcp"), "client", "target")
    pair = pumprelay._pump.Pair(
        engine.core, client_end.fileno(), target_end.fileno(), conn, may_splice, splice_first
    )
    try:
        pair.start()
        up, down = randbytes(size, 4), randbytes(size, 5)
        at_target, at_client = spawn_exchange(client_peer, target_peer, up, down)
        wait_on_hub(lambda: pair.ended, what="the pair's end")
        assert pair.error is None and pair.up_done and pair.down_done
        pair.stop()
        client_end.close()  # the last end goes out with the close (the relay's job)
        target_end.close()
        with gevent.Timeout(DEADLINE):
            assert (at_target.get(), at_client.get()) == (up, down)
        # a small exchange never fills a read: it splices only from the first byte
        assert pair.spliced is (may_splice and (splice_first or size > BUFFER_SIZE))
        assert (conn.bytes_received, conn.bytes_sent) == (size, size)
        assert engine.core.registered == 0
    finally:
        pair.stop()
        for sock in (client_peer, client_end, target_peer, target_end):
            sock.close()


# -- 5. errors ---------------------------------------------------------------------------


def reset(sock: gevent.socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), not an end."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def keep_sending(sock: gevent.socket.socket, limit: int = 64 << 20) -> int:
    sent, chunk = 0, b"\x5a" * BUFFER_SIZE
    with contextlib.suppress(OSError):
        while sent < limit:
            sent += sock.send(chunk)
    return sent


@pytest.mark.parametrize("traffic", [True, False], ids=["other-side-sending", "quiet"])
@pytest.mark.parametrize("side", ["target", "client"])
def test_a_reset_ends_the_connection_with_that_sides_error(relay_kind, links, engine, side, traffic):
    """A side that resets: seen on a send to it (the other side keeps sending) or
    on a read of it (a quiet connection), the reason names that side."""
    link = links.open()
    resetting, sending = (link.target, link.client) if side == "target" else (link.client, link.target)
    sender = gevent.spawn(keep_sending, sending) if traffic else None
    if traffic:
        moved = (lambda: link.conn.bytes_received) if side == "target" else (lambda: link.conn.bytes_sent)
        wait_on_hub(moved, what="bytes moving")
    reset(resetting)
    wait_on_hub(lambda: link.ended, what="the relay's end")
    if sender is not None:
        with gevent.Timeout(DEADLINE):
            sender.get()  # the sender saw the end too
    ((reason, error),) = link.ended
    assert reason == f"{side}_error"
    assert error in (os.strerror(errno.ECONNRESET), os.strerror(errno.EPIPE))
    if not traffic:
        assert error == os.strerror(errno.ECONNRESET)  # read, not written
    assert link.closed()
    assert engine.core.registered == 0


# -- 6. freeze / resume: an upgrade's hand-over -------------------------------------------


def carry(links: Links, link: Link, to: str, zero_copy: bool) -> Link:
    """What an upgrade does across processes, here in one: the state frozen, the
    descriptors duplicated (sent), the first relay released, a second one on the
    duplicates started and resumed with that state."""
    up, down = link.relay.freeze()
    client_fd, target_fd = os.dup(link.relay.client.fileno()), os.dup(link.relay.target.fileno())
    link.relay.release()
    assert link.ended == [] and link.closed()  # released: nobody told, its descriptors closed
    PumpRelay.enabled = to == "pump"  # restored by the engine fixture (monkeypatch)
    client = _socket.socket(fileno=client_fd)
    target = _socket.socket(fileno=target_fd)
    client.setblocking(False)
    target.setblocking(False)
    second = links.open(zero_copy=zero_copy, client=(link.client, client), target=(link.target, target))
    second.relay.resume(up, down)
    return second


@pytest.mark.parametrize(
    "first, then, zero_copy",
    [("pump", "pump", False), ("pump", "pump", True), ("hub", "pump", True), ("pump", "hub", True)],
    ids=["pump-copy", "pump-splice", "hub-to-pump", "pump-to-hub"],
)
def test_frozen_bytes_go_on_in_order_through_a_second_relay(
    monkeypatch, engine, links, first, then, zero_copy
):
    monkeypatch.setattr(PumpRelay, "enabled", first == "pump")
    monkeypatch.setattr(HubRelay, "splice_first", zero_copy)  # something in the pipe when splicing
    link = links.open(zero_copy=zero_copy)
    # small buffers on the way: the relay is stuck (and holds bytes) sooner
    for sock in (link.client, link.target, link.relay.client, link.relay.target):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    stream = Stream(8 << 20)
    with gevent.Timeout(DEADLINE):
        link.target.sendall(b"before")
        assert recv_exactly(link.client, 6) == b"before"
        push_until_stuck(link.client, stream, link.relay)
    pending = len(link.relay.freeze()[0][0])
    assert pending > 0  # bytes stuck in the relay: the hand-over must carry them
    second = carry(links, link, then, zero_copy)
    with gevent.Timeout(DEADLINE):
        reader = gevent.spawn(read_digest, second.target)
        second.target.sendall(b"after")
        assert recv_exactly(second.client, 5) == b"after"
        stream.send_rest(second.client)
        assert reader.get() == (stream.size, stream.digest.hexdigest())  # nothing lost, doubled or reordered
        second.target.shutdown(socket.SHUT_WR)
        assert recv_until_eof(second.client) == b""
    wait_on_hub(lambda: second.ended, what="the second relay's end")
    assert second.ended == [("closed", None)] and link.ended == []
    # every byte read from the client counted once, by one relay or the other
    assert link.conn.bytes_received + second.conn.bytes_received == stream.size
    assert engine.core.registered == 0


@pytest.mark.parametrize("then", ["pump", "hub"])
def test_an_end_read_before_the_hand_over_stays_read(engine, links, then):
    link = links.open()
    with gevent.Timeout(DEADLINE):
        link.target.sendall(b"bye")
        link.target.shutdown(socket.SHUT_WR)
        assert recv_until_eof(link.client) == b"bye"  # the target's end went through
    assert link.ways_done() == (False, True)
    up, down = link.relay.freeze()
    assert (up, down) == ((b"", False), (b"", True))
    second = carry(links, link, then, False)
    assert second.ways_done() == (False, True)
    assert second.relay._reading_fds() == [second.relay.client.fileno()]  # not the ended target
    with gevent.Timeout(DEADLINE):
        second.client.sendall(b"thanks")
        second.client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(second.target) == b"thanks"
    wait_on_hub(lambda: second.ended, what="the second relay's end")
    assert second.ended == [("closed", None)]


@pytest.mark.parametrize("then", ["pump", "hub"])
def test_a_hand_over_of_two_ended_ways_ends_at_once(monkeypatch, engine, links, then):
    monkeypatch.setattr(PumpRelay, "enabled", then == "pump")
    link = links.open()
    link.relay.resume((b"", True), (b"", True))
    assert link.ended == [("closed", None)] and link.closed()
    assert engine.core.registered == 0


# -- 7. abort ------------------------------------------------------------------------------


def test_an_abort_ends_at_once_and_a_peer_sending_later_harms_nothing(relay_kind, links, engine, records):
    link = links.open()
    with gevent.Timeout(DEADLINE):
        link.client.sendall(b"ping")
        assert recv_exactly(link.target, 4) == b"ping"
    link.relay.abort("drain_timeout")
    assert link.ended == [("drain_timeout", None)]  # at once, not on a later turn
    assert link.closed() and engine.core.registered == 0
    with gevent.Timeout(DEADLINE):
        assert recv_until_eof(link.target) == b""  # the target saw the end
        keep_sending(link.client, 1 << 20)  # the client did not: it keeps sending
        assert recv_until_eof(link.client) == b""
        other = links.open()  # the engine goes on
        assert exchange(other.client, other.target, b"up", b"down") == (b"up", b"down")
    wait_on_hub(lambda: other.ended, what="the other relay's end")
    assert link.ended == [("drain_timeout", None)] and other.ended == [("closed", None)]
    assert events(records, "internal_error") == []


# -- 8. idle -------------------------------------------------------------------------------


def test_the_idle_clock_cuts_silence_and_spares_traffic(engine, links):
    """About 1.5 s: traffic every 0.1 s keeps a connection with a 0.4 s idle
    timeout open; silence then ends it with ``idle_timeout``."""
    idle = 0.4
    link = links.open(idle=idle)
    assert isinstance(link.relay, PumpRelay)
    with gevent.Timeout(DEADLINE):
        for _ in range(12):  # every 0.1 s for 1.2 s: three times the timeout
            link.client.sendall(b".")
            assert recv_exactly(link.target, 1) == b"."
            gevent.sleep(0.1)  # the traffic's pace, not a synchronisation
            assert link.ended == []
    wait_on_hub(lambda: link.ended, what="the idle cut")
    assert link.ended == [("idle_timeout", None)]
    assert link.conn.last_active + idle <= time.monotonic()  # not cut before its time
    assert link.closed() and engine.core.registered == 0


def test_the_idle_check_looks_where_each_direction_waits(engine, links):
    """``_could_go_on`` on the C pair's state: bytes waiting where a direction reads,
    room where one waits to write; neither: idle. The hub does not run between the
    looks (the engine would move the bytes)."""
    link = links.open(kind="unix")
    relay = link.relay
    assert not relay._could_go_on()
    link.target.send(b"x")
    assert relay._could_go_on()  # bytes wait where the download reads
    with gevent.Timeout(DEADLINE):
        assert recv_exactly(link.client, 1) == b"x"  # relayed
    assert not relay._could_go_on()
    with gevent.Timeout(DEADLINE):
        push_until_stuck(link.client, Stream(64 << 20), relay)  # the target reads nothing
    assert relay._writing_fds() == [relay.target.fileno()]
    assert relay._reading_fds() == [relay.target.fileno()]  # the upload is paused
    assert not relay._could_go_on()  # the client's bytes are a stalled peer's, not activity
    link.target.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(MAX_TURNS):  # the target reads it all: room again
            if not link.target.recv(1 << 20):
                break
    assert relay._could_go_on()  # room where the upload waits to write: not idle


# -- 9. a bug in a connection --------------------------------------------------------------


def echo(sock, _address) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def test_a_bug_handling_a_pairs_end_ends_only_that_connection(monkeypatch, engine, records):
    """As ``test_internal_errors``' hub relay test, on the C engine: an exception in
    ``PumpRelay.on_pump`` (where a pair's end is handled) is counted and logged,
    its connection ends with ``internal_error``, the engine serves the next one."""
    original, calls = PumpRelay.on_pump, []

    def on_pump(relay, pair) -> None:
        calls.append(relay.conn.client)
        if len(calls) == 1:
            raise AttributeError("'NoneType' object has no attribute 'error'")
        original(relay, pair)

    monkeypatch.setattr(PumpRelay, "on_pump", on_pump)
    echo_server = gevent.server.StreamServer((LOOPBACK, 0), echo)
    echo_server.start()
    port = free_port()
    context = ServerContext(StatsRegistry(), BufferPool(), RateLimiter())
    server = TcpServer(Rule("pumped", "tcp", LOOPBACK, port, LOOPBACK, echo_server.server_port), context)
    server.start()
    try:
        assert server.in_hub
        with gevent.Timeout(DEADLINE):
            with gevent.socket.create_connection((LOOPBACK, port)) as first:
                first.sendall(b"boom")
                first.shutdown(socket.SHUT_WR)
                with contextlib.suppress(ConnectionResetError):
                    recv_until_eof(first)  # ended, not hanging
            with gevent.socket.create_connection((LOOPBACK, port)) as second:
                second.sendall(b"fine")
                second.shutdown(socket.SHUT_WR)
                assert recv_until_eof(second) == b"fine"
        wait_on_hub(lambda: len(events(records, "connection_closed")) == 2, what="both closes")
        assert [r.reason for r in events(records, "connection_closed")] == ["internal_error", "closed"]
        assert len(calls) == 2  # both went through the C engine
        (error,) = events(records, "internal_error")
        assert error.levelno == logging.ERROR and error.rule == "pumped" and error.client == calls[0]
        assert error.exc_info is not None and error.exc_info[0] is AttributeError
        assert server.stats.errors == {"internal_error": 1} and server.stats.active == 0
        assert engine.core.registered == 0
    finally:
        server.close()
        echo_server.stop()


# -- 10. descriptor reuse -------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_reused_by_later_pairs_never_cross(monkeypatch, engine, links):
    """300 short connections, ten at a time, each closing before the next ten
    start: the numbers come back, the bytes never go to another connection, and
    nothing is left open (some splice from the first byte: their pipes too)."""
    monkeypatch.setattr(HubRelay, "splice_first", True)
    fds = None
    for batch in range(30):
        group = [links.open(kind="unix" if n % 2 else "tcp", zero_copy=n % 4 == 0) for n in range(10)]
        payloads = [
            (f"up {batch}.{n} ".encode() * (n + 1), f"down {batch}.{n} ".encode() * (n + 2))
            for n in range(10)
        ]
        spawned = [
            spawn_exchange(link.client, link.target, *payload) for link, payload in zip(group, payloads)
        ]
        with gevent.Timeout(DEADLINE):
            got = [(at_target.get(), at_client.get()) for at_target, at_client in spawned]
        assert got == payloads
        wait_on_hub(lambda group=group: all(link.ended for link in group), what="the batch's ends")
        assert all(link.ended == [("closed", None)] for link in group)
        for link in group:
            link.client.close()
            link.target.close()
        links.made.clear()
        if fds is None:
            fds = open_fds()  # counted after a first batch: whatever gevent makes once is made
    assert engine.core.registered == 0
    assert open_fds() == fds


def test_more_ready_sockets_than_one_run_serves(engine, links):
    """400 relayed sockets ready at once (one run() serves at most 256 events):
    the rest are served on the next turns, every stream exact."""
    group = [links.open(kind="unix") for _ in range(200)]
    payloads = [(f"up {n} ".encode() * 50, f"down {n} ".encode() * 60) for n in range(200)]
    for link, (up, down) in zip(group, payloads):  # all sent before the hub runs
        link.client.sendall(up)
        link.client.shutdown(socket.SHUT_WR)
        link.target.sendall(down)
        link.target.shutdown(socket.SHUT_WR)
    with gevent.Timeout(DEADLINE):
        got = [(recv_until_eof(link.target), recv_until_eof(link.client)) for link in group]
    assert got == payloads
    wait_on_hub(lambda: all(link.ended for link in group), what="every relay's end")
    assert all(link.ended == [("closed", None)] for link in group)
    assert engine.core.registered == 0


def test_a_connect_waits_in_the_engine_and_its_pair_takes_the_wait_over(engine, links):
    """The connect of a plain connection waits in the engine (``PumpEngine.waiter``):
    two refused addresses (their sockets' numbers come back for the next attempt),
    then one that answers, whose wait the relay's pair takes over when the relay is
    made in the connect's callback (as the pipeline does): exact bytes, and nothing
    left in the engine."""
    refused = []
    for _ in range(2):
        with socket.socket() as closed:  # a port nobody listens on
            closed.bind((LOOPBACK, 0))
            refused.append((socket.AF_INET, closed.getsockname()))
    listener = gevent.socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    accepted = gevent.spawn(listener.accept)
    client_peer, client_end = tcp_pair()
    conn = Connection(1, RuleStats("pump", "tcp"), "client", "target")
    ended: list = []
    made: list = []

    def on_connected(target_end: _socket.socket) -> None:
        spare = connect.take_spare()
        assert type(spare) is pumprelay._pump.Waiter and spare.registered
        relay = make_relay(
            client_end, target_end, conn, 0, on_done=lambda *why: ended.append(why), target_reader=spare
        )
        assert not spare.registered and engine.core.registered == 1  # the pair holds the registration now
        relay.start()
        made.append(relay)

    connect = HubConnect(
        [*refused, (socket.AF_INET, listener.getsockname())],
        DEADLINE,
        on_connected=on_connected,
        on_failed=made.append,
        on_crash=made.append,
    )
    try:
        connect.start()
        assert engine.core.registered == 1  # the first attempt waits in the engine
        wait_on_hub(lambda: made, what="the connect's outcome")
        (relay,) = made
        assert isinstance(relay, PumpRelay), relay
        with gevent.Timeout(DEADLINE):
            target_peer, _ = accepted.get()
        links.made.append(Link(client_peer, target_peer, relay, conn, ended))
        up, down = b"up" * 1000, b"down" * 1000
        assert exchange(client_peer, target_peer, up, down) == (up, down)
        wait_on_hub(lambda: ended, what="the relay's end")
        assert ended == [("closed", None)]
        assert engine.core.registered == 0
    finally:
        connect.cancel()
        listener.close()


# -- 11. the switch ------------------------------------------------------------------------


def test_without_the_built_engine_plain_connections_use_the_python_relay(monkeypatch, links):
    monkeypatch.setattr(PumpRelay, "enabled", PumpRelay.enabled)
    monkeypatch.setattr(HubRelay, "splice_first", HubRelay.splice_first)
    monkeypatch.setattr(pumprelay, "_pump", None)
    features = Features(posix_signals=True, fd_limit=True, inotify=True, splice=True, pump=True)
    assert not pumprelay.available()
    in_force = pumprelay.configure(features)
    assert in_force == replace(features, pump=False)
    assert "pump" not in in_force.enabled()
    assert PumpRelay.enabled is False
    link = links.open()  # asserts make_relay gave the Python relay
    assert type(link.relay) is HubRelay
    assert exchange(link.client, link.target, b"up", b"down") == (b"up", b"down")


@needs_pump
def test_configure_turns_the_engine_on_when_built(monkeypatch):
    monkeypatch.setattr(PumpRelay, "enabled", PumpRelay.enabled)
    monkeypatch.setattr(HubRelay, "splice_first", HubRelay.splice_first)
    features = Features(posix_signals=True, fd_limit=True, inotify=True, splice=True, pump=True)
    assert pumprelay.configure(features) == features
    assert PumpRelay.enabled is True
    assert pumprelay.configure(replace(features, pump=False)).pump is False
    assert PumpRelay.enabled is False


@pytest.mark.parametrize(
    "value, wanted", [("off", False), ("0", False), ("no", False), ("auto", True), ("", True)]
)
def test_gportmap_pump_in_the_environment(monkeypatch, value, wanted):
    monkeypatch.delenv("GPORTMAP_PORTABLE", raising=False)
    monkeypatch.setenv("GPORTMAP_PUMP", value)
    assert detect().pump is wanted


# -- descriptions that outlive their pair ---------------------------------------------------


def test_a_pair_whose_sockets_live_on_elsewhere_leaves_the_engine_quiet(engine, links):
    """A connection ends while its sockets' descriptions live on in another
    descriptor (a forked child, a hand-over in flight: here a dup) with something
    to read: the engine's epoll set must not keep reporting them, or its watcher
    would call ``run()`` on every turn of the loop for nothing (a busy hub)."""
    link = links.open(kind="unix")
    held = [os.dup(link.relay.client.fileno()), os.dup(link.relay.target.fileno())]
    try:
        at_target, at_client = spawn_exchange(link.client, link.target, b"up", b"down")
        wait_on_hub(lambda: link.ended, what="the relay's end")
        assert link.ended == [("closed", None)] and link.closed()
        # both ends stay readable (an end of stream) on the held descriptions
        assert waiting(held[:1]) and waiting(held[1:])
        engine.core.run()  # whatever is reported is served
        assert not waiting([engine.core.fileno()]), "the engine reports sockets of a connection that ended"
    finally:
        for fd in held:
            os.close(fd)
    with gevent.Timeout(DEADLINE):  # the last end goes out with the last descriptor
        assert (at_target.get(), at_client.get()) == (b"up", b"down")
