"""Active health checks (SPEC §8 ``healthCheck``): every target of every running
rule that has one is probed every ``interval`` seconds, and each result goes to its
pool (``TargetState.check_passed`` / ``check_failed``, which apply ``rise`` and
``fall`` and log ``target_up`` / ``target_down``).

Everything runs on the hub, in watcher callbacks: a probe is a small object
driven by io watchers and one timer (``Probe``), never a thread and never a
greenlet per target. The TCP connect is the data path's own ``HubConnect``; the
TLS handshake of ``tls`` checks (and of ``http`` / ``send-expect`` checks of a
rule with ``targetTls``) is ``HubHandshake`` over a ``TlsStage``, the same code
that readies a connection to a target, so a check tests what a connection will
do. One greenlet serves the whole prober: it follows which rules run
(``sync_interval``) and has the TLS contexts built in the thread pool (they read
CA files); a probe of a target whose host name is not resolved yet waits for the
lookup in a greenlet of its own, inside the bound below.

Bounds: at most ``HealthProber.max_in_flight`` probes at once, whatever the
number of targets (those due meanwhile wait their turn in a queue holding each
target once); the first probe of a target comes at a random point of its first
interval, so that a thousand targets do not fire together; a reply is read up to
``Probe.reply_limit`` bytes (and ``Probe.max_datagrams`` datagrams over UDP); each
probe ends by ``timeout`` and closes its socket on every path.

Which rules run, and their pools, come from the rules backend
(``running_pools``): a rule is probed while its server runs, with the pool its
counters hold (``TargetPool.for_rule``), so a reload that keeps a target keeps
its health state and the prober follows the pool's current targets (a target is
known by (host, port)). ``HealthProber.attach(service)`` wires it to a service.

Worker processes (``--workers``): one prober, the master's, for all of them. The
master keeps pools of its own for the rules of the applied configuration
(``MasterPools``: no connection ever goes through them; a reload keeps a staying
target's state, as a worker's pool does), probes the targets of the rules its
workers run, and logs ``target_up`` / ``target_down`` once. Each change of a
target's state goes to every worker (``SharedVerdicts``, ``Op.HEALTH``), and the
whole state goes to a worker that starts, is restarted or catches up with a reload,
to every worker after a reload, and for a rule whose servers start running; a
worker applies it to its pool (``TargetState.set_checked``) without counting
``rise``/``fall`` and without logging. A worker runs no prober. Passive health
stays each worker's own: it counts the connects that worker makes.
"""

from __future__ import annotations

import _socket
import errno
import heapq
import itertools
import random
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import gevent
from gevent import get_hub
from gevent.event import Event
from gevent.lock import Semaphore

from gportmap.config.model import CheckType, HealthCheck, Rule, TlsTarget
from gportmap.engine import proxyproto
from gportmap.engine.connector import HubConnect
from gportmap.engine.net import READ, WRITE, connect_error_text
from gportmap.engine.pipeline import HubHandshake
from gportmap.engine.pool import TargetPool, TargetState
from gportmap.engine.resolver import Address
from gportmap.engine.stage import NEED_DATA
from gportmap.engine.tls import TlsError, TlsStage
from gportmap.events import InternalError
from gportmap.failures import report_internal_error
from gportmap.log import emit, get_logger
from gportmap.runtime.workers import Verdict, WorkerPool
from gportmap.security import client_context

if TYPE_CHECKING:
    from gportmap.runtime.backend import RulesBackend
    from gportmap.runtime.service import Service

logger = get_logger("health")

#: What a probe reports: None when the check passed, else why it failed.
Outcome = str | None

#: ``HTTP/1.1 200 OK``: the status of an http check's reply.
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? +(\d{3})(?:[ \r]|$)")


class Probe:
    """One check of one target, from the connect to the verdict, in hub callbacks.

    ``on_done(outcome)`` is called exactly once (None: passed; else the reason it
    failed), unless ``cancel()`` came first; by then every watcher is stopped and
    the socket closed. The whole check, however many steps, ends by
    ``check.timeout`` (one timer). A bug in a callback never reaches the hub: it
    goes to ``on_crash`` and the probe ends without a verdict."""

    #: Bytes of a reply read at most: an http status line or a ``send-expect``
    #: answer is short; a target that sends more without the answer has failed.
    reply_limit = 4096
    #: Datagrams a UDP ``send-expect`` probe reads at most before it fails.
    max_datagrams = 8

    __slots__ = ("check", "udp", "addresses", "tls", "server_name", "request", "preamble", "on_done", "on_crash",
                 "loop", "timer", "step", "sock", "stage", "reader", "writer", "pending", "reply", "datagrams",
                 "done", "started")

    def __init__(
        self,
        check: HealthCheck,
        addresses: tuple[Address, ...],
        on_done: Callable[[Outcome], None],
        on_crash: Callable[[Exception], None],
        udp: bool = False,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        host_header: str = "",
        preamble: bytes = b"",
    ) -> None:
        self.check = check
        #: ``send-expect`` over UDP (a udp rule's check); every other check is TCP.
        self.udp = udp and check.type is CheckType.SEND_EXPECT
        self.addresses = addresses
        self.tls = tls
        self.server_name = server_name
        self.request = _request(check, host_header)
        #: The PROXY protocol header (LOCAL) a rule with ``proxyProtocol`` sends first.
        self.preamble = preamble
        self.on_done = on_done
        self.on_crash = on_crash
        self.loop = get_hub().loop
        self.timer = None
        self.step: HubConnect | HubHandshake | None = None
        self.sock: _socket.socket | None = None
        self.stage: TlsStage | None = None
        self.reader = self.writer = None
        self.pending = memoryview(b"")
        self.reply = bytearray()
        self.datagrams = 0
        self.done = False
        self.started = time.monotonic()

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        self.started = time.monotonic()
        self.timer = self.loop.timer(self.check.timeout)
        self.timer.start(self._on_timeout)
        self._guarded(self._udp_start if self.udp else self._connect)

    def cancel(self) -> None:
        """Stop now (the rule stopped, the prober stops): no verdict."""
        self.done = True
        self._close()

    def _finish(self, outcome: Outcome) -> None:
        if self.done:
            return
        self.done = True
        self._close()
        self.on_done(outcome)

    def _close(self) -> None:
        step, self.step = self.step, None
        if step is not None:
            step.cancel()
        for watcher in (self.timer, self.reader, self.writer):
            if watcher is not None:
                watcher.close()
        self.timer = self.reader = self.writer = None
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def _guarded(self, step: Callable[[], None]) -> None:
        """How every callback here runs: a socket error is the check's failure, a
        bug ends the probe through ``on_crash``; nothing reaches the hub."""
        try:
            try:
                step()
            except OSError as exc:
                self._finish(_error_text(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub (module docstring)
            self.cancel()
            self.on_crash(exc)

    def _on_timeout(self) -> None:
        self._guarded(self._time_out)

    def _time_out(self) -> None:
        if isinstance(self.step, HubConnect):
            self._finish("connect timed out")
        elif self.step is not None:
            self._finish("TLS handshake timed out" if self.stage is not None else "PROXY protocol header timed out")
        elif not self.reply and not self.datagrams:
            self._finish("no reply in time")
        elif self.check.type is CheckType.HTTP:
            self._finish("no HTTP status line in time")
        else:
            self._finish(f"reply without {self.check.expect!r} in time")

    def _remaining(self) -> float:
        return max(0.001, self.check.timeout - (time.monotonic() - self.started))

    # -- TCP: connect, TLS, request, reply ------------------------------------------

    def _connect(self) -> None:
        self.step = HubConnect(self.addresses, self.check.timeout, self._connected, self._connect_failed, self._crash)
        self.step.start()

    def _connect_failed(self, error: OSError) -> None:
        self.step = None
        self._finish(connect_error_text(error))

    def _connected(self, sock: _socket.socket) -> None:
        self.step = None
        self.sock = sock
        if self.check.type is CheckType.TCP and not self.preamble:
            self._finish(None)
            return
        if self.tls is not None and self.check.type is not CheckType.TCP:
            self.stage = TlsStage.client(self.tls, self.server_name)
        if self.stage is None and not self.preamble:
            self._ready()
            return
        self.step = HubHandshake(sock, self.stage, self._remaining(), self._handshaken, self._handshake_failed,
                                 self._crash, self.preamble)
        self.step.start()

    def _handshake_failed(self, error: OSError) -> None:
        step, self.step = self.step, None
        if isinstance(error, TlsError):
            self._finish(f"TLS handshake failed: {error.reason}")
        elif step is not None and step.preamble_left:
            self._finish(f"cannot send the PROXY protocol header: {_error_text(error)}")
        else:
            self._finish(f"TLS handshake failed: {_error_text(error)}")

    def _handshaken(self) -> None:
        self.step = None
        self._guarded(self._ready)

    def _ready(self) -> None:
        """Connected (and handshaken): a ``tcp`` / ``tls`` check has passed; the
        others send their request and read the reply."""
        if self.check.type in (CheckType.TCP, CheckType.TLS):
            if self.stage is not None:
                self._goodbye()
            self._finish(None)
            return
        data = self.request
        if self.stage is not None and data:
            data = self.stage.encrypt(data)
        self.pending = memoryview(data)
        self._send()
        if not self.done and self.stage is not None and self.stage.has_input:
            self._receive_plain()  # what came with the handshake's last records

    def _goodbye(self) -> None:
        """close_notify, if the socket takes it now (never waited for): a target
        then logs a clean end rather than a client that vanished mid-session."""
        try:
            self.sock.send(self.stage.close())
        except OSError:
            pass

    def _send(self) -> None:
        while self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                self._watch(WRITE)
                return
            self.pending = self.pending[sent:]
        self._watch(READ)

    def _watch(self, mask: int) -> None:
        if mask == WRITE:
            if self.writer is None:
                self.writer = self.loop.io(self.sock.fileno(), WRITE)
            if not self.writer.active:
                self.writer.start(self._on_writable)
            return
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.reader is None:
            self.reader = self.loop.io(self.sock.fileno(), READ)
            self.reader.start(self._on_readable)

    def _on_writable(self) -> None:
        self._guarded(self._send)

    def _on_readable(self) -> None:
        self._guarded(self._udp_receive if self.udp else self._receive)

    def _receive(self) -> None:
        room = self.reply_limit - len(self.reply)
        try:
            data = self.sock.recv(max(room, 1) if self.stage is None else 16384)
        except BlockingIOError:
            return
        if self.stage is None:
            if data:
                self.reply += data
            self._judge(eof=not data)
            return
        if data:
            self.stage.feed(data)
        else:
            self.stage.feed_eof()
        self._receive_plain()

    def _receive_plain(self) -> None:
        """Plaintext out of the TLS stage, up to the limit."""
        view = memoryview(bytearray(self.reply_limit))
        while not self.done:
            n = self.stage.read_into(view)
            if n == NEED_DATA:
                return
            if n == 0:
                self._judge(eof=True)
                return
            self.reply += view[: min(n, self.reply_limit - len(self.reply))]
            self._judge(eof=False)

    def _judge(self, eof: bool) -> None:
        """A verdict once the reply says enough: its status line (http), the
        expected text (send-expect), its end, or the read limit."""
        check, reply = self.check, bytes(self.reply)
        full = len(reply) >= self.reply_limit
        if check.type is CheckType.HTTP:
            end = reply.find(b"\n")
            if end < 0 and not (eof or full):
                return
            line = reply[: end if end >= 0 else len(reply)]
            match = _STATUS_LINE.match(line)
            if match is None:
                self._finish("no HTTP status line in the reply" if reply else "closed without a reply")
                return
            status = int(match.group(1))
            if any(low <= status <= high for low, high in check.expect_status):
                self._finish(None)
            else:
                self._finish(f"HTTP status {status}")
            return
        expect = check.expect.encode()
        if expect in reply:
            self._finish(None)
        elif eof:
            self._finish(f"closed without {check.expect!r} in the reply" if reply else "closed without a reply")
        elif full:
            self._finish(f"{self.reply_limit} bytes of reply without {check.expect!r}")

    # -- UDP send-expect -------------------------------------------------------------

    def _udp_start(self) -> None:
        if not self.addresses:
            self._finish("the target resolved to no address")
            return
        family, sockaddr = self.addresses[0]
        self.sock = _socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(sockaddr)
        self.sock.send(self.request)
        self.reader = self.loop.io(self.sock.fileno(), READ)
        self.reader.start(self._on_readable)

    def _udp_receive(self) -> None:
        try:
            data = self.sock.recv(self.reply_limit)
        except BlockingIOError:
            return
        except ConnectionRefusedError:
            self._finish("port unreachable (ICMP)")
            return
        self.datagrams += 1
        if self.check.expect.encode() in data:
            self._finish(None)
        elif self.datagrams >= self.max_datagrams:
            self._finish(f"{self.datagrams} replies without {self.check.expect!r}")

    def _crash(self, exc: Exception) -> None:
        self.cancel()
        self.on_crash(exc)


def _request(check: HealthCheck, host_header: str) -> bytes:
    """What a check sends: the http request, or ``send``."""
    if check.type is CheckType.HTTP:
        return (
            f"GET {check.path} HTTP/1.0\r\nHost: {host_header}\r\nUser-Agent: gportmap-health-check\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
    if check.type is CheckType.SEND_EXPECT:
        return check.send.encode()
    return b""


def _error_text(exc: OSError) -> str:
    if isinstance(exc, TlsError):
        return f"TLS: {exc.reason}"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "connection reset"
    return connect_error_text(exc)


class Watch:
    """One target the prober probes: (rule, target key); its next probe's time and
    the probe in flight."""

    __slots__ = ("rule", "key", "due", "probe", "cancelled")

    def __init__(self, rule: str, key: tuple[str, int], due: float) -> None:
        self.rule = rule
        self.key = key
        self.due = due
        self.probe: Probe | None = None
        self.cancelled = False


class HealthProber:
    """Probes every target of the pools ``pools()`` returns (those of the running
    rules with a ``healthCheck``): see the module docstring."""

    #: Probes in flight at most, all rules together: more targets due at once wait
    #: their turn (a probe lasts at most its ``timeout``).
    max_in_flight = 64
    #: Seconds between two looks at which rules run (a rule that started after a
    #: failed bind, one that stopped); every applied reload looks at once too.
    sync_interval = 1.0

    def __init__(
        self,
        pools: Callable[[], Iterable[TargetPool]],
        on_change: Callable[[TargetPool, TargetState], None] | None = None,
    ) -> None:
        self.pools = pools
        #: Told of every change of a target's state by its checks (up to down or
        #: back), in a hub callback: it must not block (a master's ``SharedVerdicts``).
        self.on_change = on_change
        self.loop = get_hub().loop
        self.random = random.Random()
        self.watches: dict[tuple[str, tuple[str, int]], Watch] = {}
        self.by_rule: dict[str, TargetPool] = {}
        #: Per rule: the pool's targets tuple last seen, and its targets by key.
        self.indexes: dict[str, tuple[tuple[TargetState, ...], dict[tuple[str, int], TargetState]]] = {}
        #: (due, order, watch) of every watch not in flight; cancelled ones are
        #: skipped when they come up (and compacted away when they pile up).
        self.heap: list[tuple[float, int, Watch]] = []
        self.order = itertools.count()
        #: Watches due but waiting for room under ``max_in_flight``.
        self.ready: deque[Watch] = deque()
        self.in_flight = 0
        #: The most probes that were in flight at once (a figure for tests and docs).
        self.peak_in_flight = 0
        self.contexts: dict[TlsTarget, ssl.SSLContext | str] = {}
        self.timer = None
        self.timer_due: float | None = None
        self.launching = False
        self.greenlet: gevent.Greenlet | None = None
        self.syncing = Semaphore()

    @classmethod
    def attach(cls, service: Service) -> HealthProber | None:
        """A prober for ``service``'s running rules, following every applied reload
        at once (``Service.on_applied``) and the rules' states every
        ``sync_interval``; started now. In a workers' master it probes for all
        the workers and shares its verdicts with them; in a worker, none (None):
        its master's verdicts come over the channel (module docstring)."""
        if service.worker:
            return None
        backend = service.supervisor
        if isinstance(backend, WorkerPool):
            return cls._attach_master(service, backend)
        prober = cls(running_pools(backend))
        service.on_applied.append(lambda config: prober.follow_now())
        prober.start()
        return prober

    @classmethod
    def _attach_master(cls, service: Service, backend: WorkerPool) -> HealthProber:
        shared = SharedVerdicts(backend)
        pools = MasterPools(backend, shared.started)
        shared.pools = pools
        prober = cls(pools, shared.changed)
        backend.health_state = shared.state
        backend.checks_of = shared.checks_of

        def applied(config: object) -> None:
            prober.follow_now()
            shared.send_all()  # a reload: every worker gets the whole state again

        service.on_applied.append(applied)
        shared.start()
        prober.start()
        return prober

    def start(self) -> None:
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._follow)

    def stop(self) -> None:
        """Stop probing: probes in flight are cut (no verdict), nothing is due."""
        greenlet, self.greenlet = self.greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)
        for watch in list(self.watches.values()):
            self._drop(watch)
        self.heap.clear()
        self.ready.clear()
        self._disarm()

    def follow_now(self) -> None:
        """``sync``, never raising: what runs after a reload (whose other listeners
        must run whatever happens here) and every ``sync_interval``."""
        try:
            self.sync()
        except Exception as exc:  # noqa: BLE001 - a bug: logged, the next look tries again
            event = InternalError(error=repr(exc)[:200], what=f"health checks: cannot follow the rules: {exc!r}")
            emit(logger, event, exc_info=exc)

    def _follow(self) -> None:
        while True:
            self.follow_now()
            gevent.sleep(self.sync_interval)

    # -- which targets --------------------------------------------------------------

    def sync(self) -> None:
        """Probe the targets of the pools that run now: new ones from a random point
        of their first interval, gone ones (their rule stopped, the target left the
        pool, the rule lost its check) no more. In a greenlet: a TLS context is
        built in the thread pool, so one look may wait, and looks take turns."""
        with self.syncing:
            self._sync()

    def _sync(self) -> None:
        pools = {}
        for pool in self.pools():
            if pool.health_check is not None:
                pools[pool.rule.name] = pool
            else:
                for target in _checks_over(pool):
                    self._tell(pool, target)
        self.by_rule = pools
        for name in [name for name in self.indexes if name not in pools]:
            del self.indexes[name]
        wanted: set[tuple[str, tuple[str, int]]] = set()
        now = time.monotonic()
        for name, pool in pools.items():
            self._context(pool.rule)
            interval = pool.health_check.interval
            for target in pool.targets:
                ident = (name, target.key)
                wanted.add(ident)
                if ident not in self.watches:
                    watch = self.watches[ident] = Watch(name, target.key, now + self.random.uniform(0, interval))
                    self._schedule(watch)
        for ident in [ident for ident in self.watches if ident not in wanted]:
            self._drop(self.watches[ident])
        used = {pool.rule.target_tls for pool in pools.values()}
        for tls in [tls for tls in self.contexts if tls not in used]:
            del self.contexts[tls]
        if len(self.heap) > 2 * len(self.watches) + 16:
            self.heap = [entry for entry in self.heap if not entry[2].cancelled]
            heapq.heapify(self.heap)
        self._arm()

    def _context(self, rule: Rule) -> ssl.SSLContext | str | None:
        """The client context of the rule's ``targetTls`` (built here, once per
        version of it), or the text of why it cannot be built; None without TLS."""
        tls = rule.target_tls
        if tls is None:
            return None
        context = self.contexts.get(tls)
        if context is None:
            try:  # reads the CA file (or the system store): in the thread pool, never on the hub
                context = gevent.get_hub().threadpool.apply(client_context, (tls.ca_file, tls.verify))
            except (OSError, ssl.SSLError) as exc:
                context = f"cannot load targetTls: {exc.strerror or exc}"
            self.contexts[tls] = context
        return context

    def _drop(self, watch: Watch) -> None:
        watch.cancelled = True
        self.watches.pop((watch.rule, watch.key), None)
        probe, watch.probe = watch.probe, None
        if probe is not None:
            probe.cancel()
            self.in_flight -= 1

    # -- when ----------------------------------------------------------------------

    def _schedule(self, watch: Watch) -> None:
        heapq.heappush(self.heap, (watch.due, next(self.order), watch))

    def _arm(self) -> None:
        """The one timer, set for the earliest due probe."""
        while self.heap and self.heap[0][2].cancelled:
            heapq.heappop(self.heap)
        if not self.heap:
            self._disarm()
            return
        due = self.heap[0][0]
        if self.timer is not None and self.timer_due == due:
            return
        self._disarm()
        self.timer_due = due
        self.timer = self.loop.timer(max(0.0, due - time.monotonic()))
        self.timer.start(self._on_timer)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.close()
        self.timer = self.timer_due = None

    def _on_timer(self) -> None:
        try:
            self._disarm()  # fired: closed, a new one is set below
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                _, _, watch = heapq.heappop(self.heap)
                if not watch.cancelled:
                    self.ready.append(watch)
            self._launch()
            self._arm()
        except Exception as exc:  # noqa: BLE001 - a bug: never to the hub
            self._bug(exc, None)
            self._arm()

    def _launch(self) -> None:
        """Start due probes while there is room (not re-entered: a probe that ends
        at once, inside ``start``, leaves the loop here to go on)."""
        if self.launching:
            return
        self.launching = True
        try:
            while self.ready and self.in_flight < self.max_in_flight:
                watch = self.ready.popleft()
                if watch.cancelled:
                    continue
                try:
                    self._probe(watch)
                except Exception as exc:  # noqa: BLE001 - a bug: reported; the target is probed again later
                    self._bug(exc, watch)
                    if watch.probe is None and not watch.cancelled:
                        watch.due = time.monotonic() + self.sync_interval
                        self._schedule(watch)
        finally:
            self.launching = False

    def _find(self, watch: Watch) -> tuple[TargetPool, TargetState] | None:
        """The watch's pool and target as they are now (a reload may have given the
        pool new targets since: a staying one keeps its state object)."""
        pool = self.by_rule.get(watch.rule)
        if pool is None or pool.health_check is None:
            return None
        targets, index = self.indexes.get(watch.rule, ((), {}))
        if targets is not pool.targets:  # the pool changed: index it again (once per change)
            targets = pool.targets
            index = {target.key: target for target in targets}
            self.indexes[watch.rule] = (targets, index)
        target = index.get(watch.key)
        return (pool, target) if target is not None else None

    def _probe(self, watch: Watch) -> None:
        found = self._find(watch)
        if found is None:  # gone since the last look: the next look drops it
            self._drop(watch)
            return
        pool, target = found
        rule, check = pool.rule, pool.health_check
        watch.due = time.monotonic() + check.interval
        context = self.contexts.get(rule.target_tls) if rule.target_tls is not None else None
        if isinstance(context, str):
            self._report(watch, context)
            self._schedule(watch)
            return
        addresses = target.addresses.cached
        preamble = proxyproto.header(rule.proxy_protocol, None, None) if rule.proxy_protocol else b""
        tls_name = (rule.target_tls.server_name or target.spec.host) if rule.target_tls is not None else None
        probe = Probe(check, addresses or (), lambda outcome: self._done(watch, probe, outcome),
                      lambda exc: self._crashed(watch, probe, exc), udp=rule.protocol == "udp", tls=context,
                      server_name=tls_name, host_header=target.address, preamble=preamble)
        watch.probe = probe
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        if addresses is None:  # a host name not resolved (or stale): looked up in a greenlet, never here
            gevent.spawn(self._resolve_then_start, watch, probe, target)
        else:
            probe.start()

    def _resolve_then_start(self, watch: Watch, probe: Probe, target: TargetState) -> None:
        try:
            addresses = target.addresses.resolve()
        except OSError as exc:
            if watch.probe is probe:
                self._done(watch, probe, f"cannot resolve {target.spec.host}: {exc.strerror or exc}")
            return
        if watch.probe is probe:
            probe.addresses = addresses
            probe.start()

    def _done(self, watch: Watch, probe: Probe, outcome: Outcome) -> None:
        if watch.probe is not probe:
            return  # dropped meanwhile: counted off already
        watch.probe = None
        self.in_flight -= 1
        if not watch.cancelled:
            self._report(watch, outcome)
            self._schedule(watch)
        self._launch()
        self._arm()

    def _report(self, watch: Watch, outcome: Outcome) -> None:
        found = self._find(watch)
        if found is None:
            return
        pool, target = found
        was_up = target.checks_up
        if outcome is None:
            target.check_passed()
        else:
            target.check_failed(outcome)
        if target.checks_up != was_up:
            self._tell(pool, target)

    def _tell(self, pool: TargetPool, target: TargetState) -> None:
        if self.on_change is not None:
            self.on_change(pool, target)

    def _crashed(self, watch: Watch, probe: Probe, exc: Exception) -> None:
        """A bug in a probe: reported once, no verdict; the target is probed again
        at its next interval."""
        self._bug(exc, watch)
        if watch.probe is probe:
            watch.probe = None
            self.in_flight -= 1
            if not watch.cancelled:
                self._schedule(watch)
            self._launch()
            self._arm()

    def _bug(self, exc: Exception, watch: Watch | None) -> None:
        pool = self.by_rule.get(watch.rule) if watch is not None else None
        if pool is not None and pool.stats is not None:
            target = f"{watch.key[0]}:{watch.key[1]}"
            report_internal_error(pool.stats, "health-check", target, exc)
        else:
            emit(logger, InternalError(error=repr(exc)[:200], what=f"health checks: unexpected error: {exc!r}"))


def _checks_over(pool: TargetPool) -> list[TargetState]:
    """A running rule without a check (a reload removed it): a target its checks
    had taken down would stay down for good, as only a passing check brings it
    back. With no check, one pass is all it takes (``rise`` is 1): it is up. The
    targets brought up."""
    raised = []
    for target in pool.targets:
        if not target.checks_up:
            target.check_passed()
            raised.append(target)
    return raised


def verdict(pool: TargetPool, target: TargetState) -> Verdict:
    """A target's state by its checks, for the workers."""
    host, port = target.key
    return Verdict(pool.rule.name, host, port, target.checks_up, target.last_error, target.last_check)


class MasterPools:
    """A workers' master's own pools, one per enabled rule of the applied
    configuration: what its prober probes for the workers (no connection goes
    through them). A reload keeps a staying target's state (``configure``), as a
    worker's pool does. Called, it gives the pools of the rules some live worker
    runs, and tells ``on_started`` of a rule that runs now and did not at
    the last look (its workers' pools may be new: they are sent its state)."""

    def __init__(self, backend: WorkerPool, on_started: Callable[[TargetPool], None]) -> None:
        self.backend = backend
        self.on_started = on_started
        self.by_rule: dict[str, TargetPool] = {}
        self.running: set[str] = set()

    def __call__(self) -> list[TargetPool]:
        config = self.backend.config
        if config is None:
            return []
        kept: dict[str, TargetPool] = {}
        for rule in config.enabled_rules:
            pool = self.by_rule.get(rule.name)
            if pool is None:
                pool = TargetPool(rule)
            else:
                pool.configure(rule)
            kept[rule.name] = pool
        self.by_rule = kept
        running = self.backend.running_rules()
        found = [pool for name, pool in kept.items() if name in running]
        for pool in found:
            if pool.rule.name not in self.running:
                self.on_started(pool)
        self.running = {pool.rule.name for pool in found}
        return found


class SharedVerdicts:
    """A workers' master's side of the shared prober: every change of a target's
    state (told in a hub callback, so only noted here) is sent to every worker by
    one greenlet. What waits to be sent holds one verdict per target (the latest),
    so it stays bounded by the number of targets however fast they flap."""

    def __init__(self, backend: WorkerPool) -> None:
        self.backend = backend
        self.pools: MasterPools | None = None
        self.pending: dict[tuple[str, tuple[str, int]], Verdict] = {}
        self.wake = Event()
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._send_loop)

    def changed(self, pool: TargetPool, target: TargetState) -> None:
        """A target's state changed (never blocks: a hub callback calls it)."""
        self.pending[(pool.rule.name, target.key)] = verdict(pool, target)
        self.wake.set()

    def started(self, pool: TargetPool) -> None:
        """A rule's servers run now: its workers get its whole state."""
        for target in pool.targets:
            self.changed(pool, target)

    def state(self) -> list[Verdict]:
        """Every target's state, for a worker that starts or catches up."""
        pools = self.pools.by_rule.values() if self.pools is not None else ()
        return [verdict(pool, target) for pool in pools for target in pool.targets]

    def checks_of(self, rule: str) -> dict[str, tuple[float | None, str | None]]:
        """The last check of each target of ``rule`` (the workers hear only of changes)."""
        pool = self.pools.by_rule.get(rule) if self.pools is not None else None
        return {t.name: (t.last_check, t.last_error) for t in pool.targets} if pool is not None else {}

    def send_all(self) -> None:
        """Every worker gets the whole state (after a reload)."""
        self.backend.share_health(self.state())

    def _send_loop(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            batch, self.pending = list(self.pending.values()), {}
            try:
                self.backend.share_health(batch)
            except Exception as exc:  # noqa: BLE001 - a bug: logged, the next change goes all the same
                emit(
                    logger,
                    InternalError(error=repr(exc)[:200], what=f"health checks: cannot send verdicts to the workers: {exc!r}"),
                )


def running_pools(backend: RulesBackend) -> Callable[[], list[TargetPool]]:
    """The pools of ``backend``'s rules whose server runs now (not starting, failed,
    draining or stopped), as their counters hold them (a single process; a
    workers' master has ``MasterPools``)."""

    def pools() -> list[TargetPool]:
        found = []
        for rule, state, _ in backend.rule_states():
            if state != "running":
                continue
            pool = backend.stats.rule(rule.name, rule.protocol).pool
            if isinstance(pool, TargetPool):
                found.append(pool)
        return found

    return pools
