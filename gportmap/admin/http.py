"""The admin HTTP endpoint (SPEC §5): health, metrics, stats, open connections,
reload, the dashboard page, and the rule API (SPEC §10: ``/rules``).

A gevent pywsgi server in the same hub as the data path, so it is an edge of its
own (issue 20) and must never stall forwarding (issue 18):

- its connections are capped (``AdminServer.max_connections``, inside the
  descriptor reserve of ``gportmap.stats.FD_RESERVE``): past the cap a new
  connection is closed at once and counted, so a flood of idle connections cannot
  take the descriptors forwarding needs;
- a request head must arrive whole within ``header_timeout`` (slowloris), a
  keep-alive connection is closed after ``idle_timeout`` without a request, a body
  must arrive within ``body_timeout``, and heads and bodies are bounded in size;
- failed authentication is logged once per client per interval with a count, and
  slowed per client address by a token bucket (``AuthThrottle``): past it, 429;
- ``/metrics``, ``/stats`` and ``/connections`` copy the figures on the hub rule by
  rule, yielding every ``slice_rules`` rules, and format the text in the hub's
  thread pool; concurrent requests share one rendering that started after they
  arrived (``Coalesced``), so ten scrapers cost one rendering at a time, never a
  stale answer.

A request, however malformed, is answered or closed by pywsgi and never touches
forwarding. If its address cannot be bound, gportmap logs it, keeps forwarding,
and retries with back-off.
"""

from __future__ import annotations

import enum
import hmac
import http.client
import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from importlib import resources
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import parse_qs

import gevent
from gevent.event import AsyncResult
from gevent.pywsgi import WSGIHandler, WSGIServer

from gportmap.admin.toxiproxy import ToxiproxyApi
from gportmap.config import AdminSettings
from gportmap.config.edit import EditOp, RuleEdit, read_json
from gportmap.engine.net import BindRetry, bind_listener, peer_text
from gportmap.engine.routes import describe_routes
from gportmap.errors import BindError
from gportmap.events import AdminFailed, AdminStarted, Event, define, if_set
from gportmap.log import ClientErrorsAsLog, RateLimiter, emit, get_logger
from gportmap.runtime.applier import OutcomeStatus, ReloadOutcome, ReloadSource
from gportmap.runtime.transaction import Transaction, TxOutcome, TxStatus, parse_if_match
from gportmap.security import client_ip

if TYPE_CHECKING:
    from types import ModuleType

    from gportmap.runtime.service import Service

logger = get_logger("admin")

StartResponse = Callable[..., Any]
#: What a handler returns: status, body, content type, and extra headers.
Answer = tuple[int, bytes, str, list[tuple[str, str]]]
_STATUS = {
    200: "200 OK",
    201: "201 Created",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    412: "412 Precondition Failed",
    408: "408 Request Timeout",
    413: "413 Content Too Large",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}
_RELOAD_STATUS = {
    OutcomeStatus.APPLIED: 200,
    OutcomeStatus.UNCHANGED: 200,
    OutcomeStatus.INVALID: 400,
    OutcomeStatus.FAILED: 500,
    OutcomeStatus.REFUSED: 503,
}
_TX_STATUS = {
    TxStatus.DONE: 200,
    TxStatus.CREATED: 201,
    TxStatus.PLANNED: 200,
    TxStatus.INVALID: 400,
    TxStatus.NOT_FOUND: 404,
    TxStatus.EXISTS: 409,
    TxStatus.NOT_WRITABLE: 409,
    TxStatus.STALE: 412,
}
_WRITES = {"POST": EditOp.ADD, "PUT": EditOp.PUT, "PATCH": EditOp.PATCH, "DELETE": EditOp.DELETE}
_COLLECTION_METHODS = ("GET", "HEAD", "POST")
_RULE_METHODS = ("GET", "HEAD", "PUT", "PATCH", "DELETE")
_FLAGS = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}


class _Refused(Exception):
    """A request refused before it reaches the service (its body, its parameters)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CutReason(enum.StrEnum):
    """Why the endpoint closed a connection on its own (``/stats``' ``admin.cut``)."""

    HEADER_TIMEOUT = "header_timeout"  # no whole request head within header_timeout
    IDLE_TIMEOUT = "idle_timeout"  # keep-alive: no next request within idle_timeout
    BODY_TIMEOUT = "body_timeout"  # the body did not arrive within body_timeout (answered 408)
    SEND_TIMEOUT = "send_timeout"  # the client did not read the answer: a send waited body_timeout
    HEAD_TOO_LARGE = "head_too_large"  # the head is over max_head bytes (answered 400)


class AdminFigures:
    """The endpoint's own counters (``/stats``' ``admin``, ``gportmap_admin_*``):
    plain integers, kept by the ``AdminServer`` across moves of its address."""

    __slots__ = ("open", "refused", "cut", "auth_failures", "auth_throttled")

    def __init__(self) -> None:
        self.open = 0  # connections open now
        self.refused = 0  # closed at once: the cap was reached
        self.cut = dict.fromkeys(CutReason, 0)
        self.auth_failures = 0  # wrong tokens (answered 401, some after a delay)
        self.auth_throttled = 0  # answered 429

    def as_dict(self, max_connections: int) -> dict[str, Any]:
        return {
            "connections": self.open,
            "max_connections": max_connections,
            "refused": self.refused,
            "cut": {str(reason): count for reason, count in self.cut.items()},
            "auth_failures": self.auth_failures,
            "auth_throttled": self.auth_throttled,
        }


@define("admin_busy", logging.WARNING)
class AdminBusy(Event):
    """Connections closed at once because the endpoint holds its cap (rate-limited)."""

    client: str
    max_connections: int
    suppressed: int = if_set(0)

    def message(self) -> str:
        return (
            f"admin endpoint holds {self.max_connections} connections: a new one from {self.client} "
            "was closed at once"
        )


@define("admin_cut", logging.WARNING)
class AdminCut(Event):
    """A connection the endpoint closed on a deadline or an oversized head (rate-limited)."""

    client: str
    reason: CutReason
    seconds: float
    suppressed: int = if_set(0)

    def message(self) -> str:
        return f"admin connection from {self.client} closed: {self.reason} ({self.seconds:g}s)"


@define("admin_auth_failed", logging.WARNING)
class AdminAuthFailed(Event):
    """Failed authentication from one client address: the first at once, then at most
    one record per interval with the count since the last one."""

    client: str
    failures: int
    throttled: int
    path: str
    interval: float

    def message(self) -> str:
        refused = f", {self.throttled} more refused (429)" if self.throttled else ""
        return f"{self.failures} failed authentication(s) from {self.client}{refused} (last: {self.path})"


class _Client:
    """One client address's failed authentications (``AuthThrottle``)."""

    __slots__ = ("tokens", "stamp", "logged_at", "failures", "throttled", "path")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst  # failures it may still make at once; below 0, a debt
        self.stamp = now  # when tokens was last brought up to date
        self.logged_at = -math.inf  # its last record (monotonic)
        self.failures = 0  # failures since its last record
        self.throttled = 0  # 429 answers since its last record
        self.path = ""


class AuthThrottle:
    """Wrong tokens per client address: slowed by a token bucket, and logged at most
    once per interval per client with a count.

    An address may give ``burst`` wrong tokens at once; past that every wrong one
    is answered 401 only after a delay that grows with its debt (``refill``
    seconds per failure not yet paid back), so a guesser gets one answer per
    ``refill`` seconds however many connections it opens. When the next delay
    would pass ``max_delay`` the address is *locked*: every request of it that
    needs the token is answered 429 with Retry-After at once, the right token
    included (an answer that differed would tell a guesser when it is right).
    Clients with the right token are never delayed; a request with no token at all
    is no guess (a browser, a scraper without its token) and is answered 401 alone.
    The delay runs in the request's greenlet, never on the hub. IPv6 clients are
    keyed by their /64. The table keeps the ``capacity`` addresses seen last (LRU);
    one that falls out starts afresh."""

    def __init__(
        self, burst: int, refill: float, max_delay: float, capacity: int, log_interval: float, figures: AdminFigures
    ) -> None:
        self.burst = burst
        self.refill = refill
        self.max_delay = max_delay
        self.capacity = capacity
        self.log_interval = log_interval
        self.figures = figures
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    @staticmethod
    def key(address: str) -> str:
        """The address a client is counted by: its IP, or the /64 of an IPv6 one."""
        ip = client_ip(address)
        if ip is None:
            return address[:64]
        if ip.version == 6:
            return str(ipaddress.ip_network((int(ip) >> 64 << 64, 64)))
        return str(ip)

    def locked(self, key: str) -> float:
        """Seconds ``key`` stays locked (answered 429); 0: not locked."""
        client = self._clients.get(key)
        if client is None:
            return 0.0
        self._refill(client)
        return max(0.0, (1 - client.tokens) * self.refill - self.max_delay)

    def throttled(self, key: str) -> None:
        """A request of ``key`` was answered 429."""
        self.figures.auth_throttled += 1
        client = self._clients.get(key)
        if client is not None:
            client.throttled += 1

    def failed(self, key: str, path: str) -> float:
        """A request of ``key`` gave a wrong token: the seconds its 401 waits."""
        self.figures.auth_failures += 1
        now = time.monotonic()
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(float(self.burst), now)
            if len(self._clients) > self.capacity:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(key)
            self._refill(client)
        client.tokens -= 1
        client.failures += 1
        client.path = path[:100]
        if now - client.logged_at >= self.log_interval:
            self._log(key, client, now)
        return min(self.max_delay, max(0.0, -client.tokens * self.refill))

    def flush(self) -> None:
        """Log the counts of clients whose interval is over (the endpoint calls this
        every ``log_interval``), and forget clients that paid back their debt."""
        now = time.monotonic()
        for key, client in list(self._clients.items()):
            if client.failures or client.throttled:
                if now - client.logged_at >= self.log_interval:
                    self._log(key, client, now)
                continue
            self._refill(client)
            if client.tokens >= self.burst and now - client.logged_at >= self.log_interval:
                del self._clients[key]

    def _refill(self, client: _Client) -> None:
        now = time.monotonic()
        client.tokens = min(float(self.burst), client.tokens + (now - client.stamp) / self.refill)
        client.stamp = now

    def _log(self, key: str, client: _Client, now: float) -> None:
        emit(
            logger,
            AdminAuthFailed(
                client=key,
                failures=client.failures,
                throttled=client.throttled,
                path=client.path,
                interval=self.log_interval,
            ),
        )
        client.logged_at = now
        client.failures = client.throttled = 0

    def __len__(self) -> int:
        return len(self._clients)


T = TypeVar("T")


class Coalesced(Generic[T]):
    """One rendering at a time, shared by the requests that wait for it.

    A request is answered by a rendering that *started after it arrived*: one that
    arrives while another runs waits for the next, which serves every request that
    queued meanwhile. So the answer is never older than the request (a test that
    reads a counter after an action sees the action), and ten scrapers in a loop
    cost one rendering at a time instead of ten.

    Renderings back to back would still keep the process busy all the time (the
    thread's formatting competes with the hub for the interpreter): the next one
    starts only after a pause of ``(1 / duty - 1)`` times the last one's duration,
    so renderings take at most ``duty`` of the time. A request waits longer then;
    its answer is no older for it. The pause is at most ``max_pause``: a rendering
    that took long because it *waited* (``/connections`` asking a stopped worker,
    up to its 5 s) cost no CPU, and must not hold the next request for three times
    as long."""

    #: The longest pause between two renderings, in seconds.
    max_pause: float = 1.0

    def __init__(self, make: Callable[[], T], duty: float = 0.25) -> None:
        self.make = make
        self.duty = duty
        self._next: AsyncResult | None = None
        self._worker: gevent.Greenlet | None = None
        self._ready_at = 0.0  # monotonic time the next rendering may start

    def get(self) -> T:
        if self._next is None:
            self._next = AsyncResult()
        waiting = self._next
        if self._worker is None:
            self._worker = gevent.spawn(self._run)
        return waiting.get()

    def _run(self) -> None:
        try:
            while self._next is not None:
                pause = self._ready_at - time.monotonic()
                if pause > 0:
                    gevent.sleep(pause)
                waiting, self._next = self._next, None
                started = time.monotonic()
                try:
                    waiting.set(self.make())
                except Exception as exc:  # the requests that waited answer 500; the next may work
                    waiting.set_exception(exc)
                ended = time.monotonic()
                self._ready_at = ended + min((ended - started) * (1 / self.duty - 1), self.max_pause)
        finally:
            self._worker = None


class _BoundedHead:
    """The connection's reader as the header parser sees it: at most ``left`` bytes,
    then ``LineTooLong`` (pywsgi answers 400 and closes)."""

    def __init__(self, reader: Any, left: int, handler: _Handler) -> None:
        self._reader = reader
        self._left = left
        self._handler = handler

    def readline(self, limit: int = -1) -> bytes:
        want = self._left + 1 if limit is None or limit < 0 else min(limit, self._left + 1)
        line = self._reader.readline(want)
        self._left -= len(line)
        if self._left < 0:
            self._handler.too_large = True
            raise http.client.LineTooLong("request head")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class _Handler(ClientErrorsAsLog, WSGIHandler):
    """pywsgi's handler with the endpoint's deadlines and size limits; malformed
    requests never print a traceback (``ClientErrorsAsLog``).

    The head timer starts when a request is awaited (at accept, or at the first
    byte of a keep-alive connection's next request) and stops once the head is
    parsed; the body has its own deadline (``AdminServer._read_body``); each
    send or receive after that gives up after ``body_timeout``."""

    too_large = False

    def handle(self) -> None:
        admin: AdminServer = self.server.admin
        self._timer: gevent.Timeout | None = None
        self._served = 0
        self.socket.settimeout(admin.body_timeout)
        try:
            super().handle()
        except gevent.Timeout as exc:
            if exc is not self._timer:
                raise
            reason, seconds = exc.reason, exc.seconds  # type: ignore[attr-defined]
            admin.figures.cut[reason] += 1
            admin.note_cut(self.client_address, reason, seconds)
        finally:
            if self._timer is not None:
                self._timer.close()

    def handle_one_request(self) -> Any:
        admin: AdminServer = self.server.admin
        if self._served:  # keep-alive: the next request's first byte within idle_timeout
            self._arm(CutReason.IDLE_TIMEOUT, admin.idle_timeout)
            try:
                if not self.rfile.peek(1):
                    return None
            except OSError:
                return None
            finally:
                self._timer.cancel()  # type: ignore[union-attr]
        self._arm(CutReason.HEADER_TIMEOUT, admin.header_timeout)
        self.too_large = False
        try:
            result = super().handle_one_request()
        finally:
            self._timer.cancel()  # type: ignore[union-attr]
        if self.too_large:
            admin.figures.cut[CutReason.HEAD_TOO_LARGE] += 1
        self._served += 1
        return result

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        """pywsgi's hook for an exception while answering: a client that stopped
        reading (a send timed out) is a client's doing, not an internal error."""
        if isinstance(v, TimeoutError):
            admin: AdminServer = self.server.admin
            admin.figures.cut[CutReason.SEND_TIMEOUT] += 1
            admin.note_cut(self.client_address, CutReason.SEND_TIMEOUT, admin.body_timeout)
            self.close_connection = True
            return
        super().handle_error(t, v, tb)

    def _arm(self, reason: CutReason, seconds: float) -> None:
        if self._timer is not None:
            self._timer.close()
        timer = self._timer = gevent.Timeout(seconds)
        timer.reason = reason  # type: ignore[attr-defined]
        timer.start()

    def read_requestline(self) -> str:
        line = super().read_requestline()  # at most 8 KiB (pywsgi's MAX_REQUEST_LINE)
        self._head_left = self.server.admin.max_head - len(line)
        return line

    def MessageClass(self, fp: Any, *args: Any) -> Any:  # noqa: N802 (pywsgi's name)
        return super().MessageClass(_BoundedHead(fp, max(0, self._head_left), self), *args)

    def get_environ(self) -> dict:
        if self._timer is not None:
            self._timer.cancel()  # the head is in: the application runs without it
        return super().get_environ()


class _Server(WSGIServer):
    """pywsgi's server with the endpoint's connection cap: a connection past it is
    closed as soon as it is accepted, before any greenlet exists for it."""

    def __init__(self, listener: Any, admin: AdminServer) -> None:
        super().__init__(listener, admin, log=None, error_log=logger, handler_class=_Handler)
        self.admin = admin

    def do_handle(self, *args: Any) -> None:
        admin, figures = self.admin, self.admin.figures
        if figures.open >= admin.max_connections:
            figures.refused += 1
            args[0].close()
            admin.note_busy(args[1])
            return
        figures.open += 1
        super().do_handle(*args)

    def do_close(self, *args: Any) -> None:
        self.admin.figures.open -= 1
        super().do_close(*args)


class AdminServer:
    """Serves the admin endpoint for one ``Service``; ``apply`` follows settings changes."""

    #: Connections held at once; a new one past it is closed as soon as it is
    #: accepted and counted (``admin.refused``). It is part of the descriptors
    #: ``gportmap.stats.FD_RESERVE`` keeps out of the connection budget, so a flood
    #: of admin connections never takes a descriptor forwarding counts on.
    max_connections = 32
    #: Seconds a client has to send a whole request head, from the accept (or from
    #: the first byte of a keep-alive connection's next request); then it is cut.
    header_timeout = 10.0
    #: Seconds a keep-alive connection may wait for its next request.
    idle_timeout = 30.0
    #: Seconds a request body may take to arrive whole (else 408 and closed), and
    #: the longest any one send or receive may wait once the head is in.
    body_timeout = 30.0
    #: The largest request head (request line and headers) in bytes; a larger one is
    #: answered 400 and closed. A bearer token is a few hundred bytes; pywsgi alone
    #: would read 100 header lines of 64 KiB each (6.4 MB) per connection.
    max_head = 128 * 1024
    #: Wrong tokens a client address may give at once, answered 401 at once ...
    auth_burst = 3
    #: ... past them, each one's 401 waits this many seconds per wrong token not yet
    #: paid back (one paid back per this many seconds) ...
    auth_refill = 1.0
    #: ... and when that wait would pass this many seconds, every request of the
    #: address that needs the token is answered 429 until the debt shrinks.
    auth_max_delay = 5.0
    #: Client addresses whose failures are remembered (the least recent is forgotten).
    auth_clients = 4096
    #: At most one ``admin_auth_failed`` record per client address per this many
    #: seconds, with the count since the previous one.
    auth_log_interval = 60.0
    #: Rules whose figures ``/metrics`` and ``/stats`` copy on the hub between two
    #: yields (each copy costs microseconds; the formatting runs in a thread).
    slice_rules = 100
    #: The share of time renderings of one document may take when requests for it
    #: come back to back (``Coalesced``): a 150 ms ``/metrics`` of 1,000 rules is
    #: followed by a 450 ms pause before the next one starts.
    render_duty = 0.25

    #: The largest request body read, in bytes (one rule, or a merge patch); a larger
    #: one is answered 413 without being parsed. A rule with an allow list of 100,000
    #: networks is about 2 MB.
    max_body = 4 * 1024 * 1024

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings: AdminSettings | None = None
        self.error: str | None = None
        self._server: WSGIServer | None = None
        self._retry: gevent.Greenlet | None = None
        self._backoff = BindRetry()
        #: Imported at the first scrape: prometheus_client is a tenth of a start's imports.
        self._exposition: ModuleType | None = None  # gportmap.admin.metrics, once imported
        self._dashboard = resources.files("gportmap.admin").joinpath("static", "dashboard.html").read_bytes()
        self.figures = AdminFigures()
        self.auth = AuthThrottle(
            self.auth_burst,
            self.auth_refill,
            self.auth_max_delay,
            self.auth_clients,
            self.auth_log_interval,
            self.figures,
        )
        self._flusher: gevent.Greenlet | None = None
        self._busy_log = RateLimiter(burst=1, interval=10.0)
        self._cut_log = RateLimiter(burst=1, interval=10.0)
        self._renders: dict[str, Coalesced[bytes]] = {
            "/metrics": Coalesced(self._render_metrics, self.render_duty),
            "/stats": Coalesced(self._render_stats, self.render_duty),
            "/connections": Coalesced(self._render_connections, self.render_duty),
        }
        #: Toxiproxy's API (SPEC §12), on its own address, following settings.toxiproxy
        #: with this endpoint (``apply``, ``stop``: an upgrade's drainer keeps neither).
        self.toxiproxy = ToxiproxyApi(service)
        self._routes: dict[str, dict[str, Callable[[dict], tuple[int, bytes, str]]]] = {
            "/metrics": {"GET": self._metrics},
            "/stats": {"GET": self._stats},
            "/connections": {"GET": self._connections},
            "/reload": {"POST": self._reload},
            "/": {"GET": self._page},
        }

    # -- life cycle -------------------------------------------------------------------

    def apply(self, settings: AdminSettings | None) -> None:
        """Start, move, or stop the endpoint; a token change alone applies at once."""
        old = self.settings
        self.settings = settings
        same_place = (
            old is not None
            and settings is not None
            and (old.host, old.port) == (settings.host, settings.port)
        )
        if same_place and (self._server is not None or self._retry is not None):
            self.toxiproxy.apply(self.service.config)
            return
        self.stop()
        if settings is not None:
            self._backoff.reset()
            self._start()
        self.toxiproxy.apply(self.service.config)

    def _start(self) -> None:
        self._retry = None
        settings = self.settings
        if settings is None:
            return
        try:
            listener = bind_listener(settings.host, settings.port)
        except BindError as exc:
            self.error = str(exc)
            emit(logger, AdminFailed(listen=settings.listen, error=self.error, retry_in=self._backoff.delay))
            self._retry = self._backoff.schedule(self._start)
            return
        self.error = None
        self._server = _Server(listener, self)
        self._server.start()
        self._flusher = gevent.spawn(self._flush_auth_log)
        emit(logger, AdminStarted(listen=settings.listen, token=settings.token is not None))

    def stop(self) -> None:
        if self._retry is not None:
            self._retry.kill()
            self._retry = None
        if self._flusher is not None:
            self._flusher.kill()
            self._flusher = None
            self.auth.flush()
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None
        self.toxiproxy.stop()  # restarted by the next apply when the endpoint only moves

    @property
    def address(self) -> tuple[str, int] | None:
        return self._server.address[:2] if self._server is not None else None

    # -- WSGI -------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        if path == "/healthz" and method in ("GET", "HEAD"):
            return self._respond(start_response, *self._health(environ))
        refusal = self._authenticate(environ, path)
        if refusal is not None:
            return self._respond(start_response, *refusal)
        if path == "/rules" or path.startswith("/rules/"):
            return self._respond(start_response, *self._rules(environ, path))
        methods = self._routes.get(path)
        if methods is None:
            return self._respond(
                start_response, 404, _json({"error": f"no such endpoint: {path}"}), "application/json"
            )
        handler = methods.get("GET" if method == "HEAD" and "GET" in methods else method)
        if handler is None:
            allowed = ", ".join(methods)
            return self._respond(
                start_response,
                405,
                _json({"error": f"use {allowed}"}),
                "application/json",
                [("Allow", allowed)],
            )
        return self._respond(start_response, *handler(environ))

    def _authenticate(self, environ: dict, path: str) -> Answer | None:
        """None when the request may go on; else the 401 (no token, a wrong one:
        delayed past the address's burst) or, for an address that gave too many
        wrong tokens (``AuthThrottle``), the 429."""
        if self.settings is None or self.settings.token is None:
            return None
        key = self.auth.key(environ.get("REMOTE_ADDR", ""))
        locked = self.auth.locked(key)
        if locked > 0:
            self.auth.throttled(key)
            seconds = math.ceil(locked)
            return _error(
                429,
                f"too many wrong tokens from {key}: try again in {seconds} s",
                [("Retry-After", str(seconds))],
            )
        if self._authorized(environ):
            return None
        if _gave_token(environ):
            delay = self.auth.failed(key, path)
            if delay > 0:
                gevent.sleep(delay)  # this request's greenlet only
        if path == "/" and "text/html" in environ.get("HTTP_ACCEPT", ""):
            # a browser opening the dashboard: a page that says how, not a JSON error
            return 401, _TOKEN_PAGE, "text/html; charset=utf-8", [("WWW-Authenticate", 'Bearer realm="gportmap"')]
        return (
            401,
            _json({"error": "unauthorized: send 'Authorization: Bearer <token>'"}),
            "application/json",
            [("WWW-Authenticate", 'Bearer realm="gportmap"')],
        )

    def _authorized(self, environ: dict) -> bool:
        token = self.settings.token if self.settings is not None else None
        if token is None:
            return True
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
            return True
        if environ["REQUEST_METHOD"] in ("GET", "HEAD"):  # the dashboard's own URL: /?token=...
            given = parse_qs(environ.get("QUERY_STRING", "")).get("token", [""])[0]
            return bool(given) and hmac.compare_digest(given.encode(), token.encode())
        return False

    @staticmethod
    def _respond(
        start_response: StartResponse,
        status: int,
        body: bytes,
        content_type: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> list[bytes]:
        start_response(
            _STATUS[status],
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                *(headers or []),
            ],
        )
        return [body]

    # -- endpoints ----------------------------------------------------------------------

    def _health(self, environ: dict) -> tuple[int, bytes, str]:
        failing = []
        for view in self.service.rule_views():
            if view.state == "failed":
                failing.append({"rule": view.name, "listen": view.rule.listen, "error": view.error})
            elif view.state == "running" and (targets := view.stats.targets()) and all(
                target["state"] != "up" for target in targets
            ):  # it listens, but every connection would be closed at once (SPEC §8)
                failing.append({"rule": view.name, "listen": view.rule.listen, "error": _no_target(targets)})
        if failing:
            return 503, _json({"status": "failing", "failing": failing}), "application/json"
        return 200, _json({"status": "ok"}), "application/json"

    def _metrics(self, environ: dict) -> tuple[int, bytes, str]:
        body = self._renders["/metrics"].get()
        assert self._exposition is not None  # imported by the rendering
        return 200, body, self._exposition.CONTENT_TYPE

    def _stats(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, self._renders["/stats"].get(), "application/json"

    def _connections(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, self._renders["/connections"].get(), "application/json"

    # -- renderings (``Coalesced``): figures copied on the hub in slices, text made in a thread

    def _render_metrics(self) -> bytes:
        # The first scrape imports prometheus_client, in the thread pool: an import
        # reads files, which must not block the hub.
        if self._exposition is None:
            self._exposition = _in_thread(_metrics_module)
        views = []
        for index, view in enumerate(self.service.rule_views()):
            if view.state != "disabled":
                views.append(replace(view, stats=view.stats.frozen()))
            if index % self.slice_rules == self.slice_rules - 1:
                gevent.sleep(0)
        admin_figures = self.figures.as_dict(self.max_connections)
        frozen = self._exposition.FrozenService(self.service, views, admin_figures)
        return _in_thread(self._exposition.render_frozen, frozen)

    def _render_stats(self) -> bytes:
        rules = []
        for index, view in enumerate(self.service.rule_views()):
            snapshot = view.snapshot()  # fresh dicts and lists: the thread reads only them
            if view.rule.routes:  # SPEC §13: each route, its targets and connections
                snapshot["routes"] = describe_routes(view.rule, snapshot.get("targets", []))
            rules.append(snapshot)
            if index % self.slice_rules == self.slice_rules - 1:
                gevent.sleep(0)
        document = self.service.snapshot(rules)
        document["admin"] = self.figures.as_dict(self.max_connections)
        return _in_thread(_json, document)

    def _render_connections(self) -> bytes:
        return _in_thread(_json, self.service.open_connections())

    # -- the endpoint's own edge: records, rate-limited ------------------------------------

    def note_busy(self, address: Any) -> None:
        """A connection was closed at the cap (the accept callback, on the hub: logging
        only queues the line)."""
        allowed, suppressed = self._busy_log.allow("busy")
        if allowed:
            emit(
                logger,
                AdminBusy(client=_address_text(address), max_connections=self.max_connections, suppressed=suppressed),
            )

    def note_cut(self, address: Any, reason: CutReason, seconds: float) -> None:
        allowed, suppressed = self._cut_log.allow(reason)
        if allowed:
            emit(logger, AdminCut(client=_address_text(address), reason=reason, seconds=seconds, suppressed=suppressed))

    def _flush_auth_log(self) -> None:
        while True:
            gevent.sleep(self.auth_log_interval)
            self.auth.flush()

    def _reload(self, environ: dict) -> tuple[int, bytes, str]:
        """Queue a reload and answer once the applier served it (with the others that
        queued meanwhile: ``coalesced`` says how many one apply served); with
        ``?dry_run=1``, what it would do, changing nothing."""
        try:
            dry_run = _dry_run(environ)
        except _Refused as exc:
            return exc.status, _json({"error": str(exc)}), "application/json"
        if dry_run:
            status, body, content_type, _ = self._transaction_answer(
                self.service.transact(Transaction(None, dry_run=True, client=_client(environ), method="POST"))
            )
            return status, body, content_type
        outcome = self.service.request_reload(ReloadSource.ADMIN, force=True, wait=True)
        assert outcome is not None
        status = _RELOAD_STATUS[outcome.status]
        body: dict[str, Any] = {"status": "reloaded" if status == 200 else outcome.status.value}
        if outcome.changes is not None:
            body.update(outcome.changes.as_fields())
        if outcome.errors:
            body["errors"] = list(outcome.errors)
        body["coalesced"] = outcome.served
        return status, _json(body), "application/json"

    # -- the rule API (SPEC §10) ----------------------------------------------------------

    def _rules(self, environ: dict, path: str) -> Answer:
        """``/rules`` and ``/rules/NAME``: read, or one write through the applier."""
        name = path[len("/rules/") :] if path != "/rules" else None
        if name == "":
            return _error(404, "no rule name after /rules/")
        method = environ["REQUEST_METHOD"]
        allowed = _COLLECTION_METHODS if name is None else _RULE_METHODS
        if method not in allowed:
            return _error(405, f"use {', '.join(allowed)}", [("Allow", ", ".join(allowed))])
        if method in ("GET", "HEAD"):
            return self._read_rules(name, allowed)
        refusal = self._write_refusal()
        if refusal is not None:
            return _error(403, refusal)
        try:
            body = self._read_body(environ) if method != "DELETE" else None
            dry_run = _dry_run(environ)
        except _Refused as exc:
            return _error(exc.status, str(exc), [("Connection", "close")] if exc.status in (408, 413) else None)
        transaction = Transaction(
            RuleEdit(_WRITES[method], name, body),
            if_match=parse_if_match(environ.get("HTTP_IF_MATCH")),
            dry_run=dry_run,
            client=_client(environ),
            method=method,
        )
        return self._transaction_answer(self.service.transact(transaction))

    def _read_rules(self, name: str | None, allowed: tuple[str, ...]) -> Answer:
        """The rules as written in the file that runs, with its version as ETag; Allow
        lists the writes this endpoint accepts (the dashboard reads it)."""
        digest, text = self.service.rules_document()
        writable = self._write_refusal() is None
        methods = [method for method in allowed if writable or method in ("GET", "HEAD")]
        headers = [("ETag", f'"{digest}"'), ("Allow", ", ".join(methods))]
        if name is None:
            return 200, _json({"settings": text.settings, "rules": text.rules}), "application/json", headers
        index = text.index_of(name)
        if index is None:
            return _error(404, f"no rule named {name!r}")
        return 200, _json(text.rules[index]), "application/json", headers

    def _write_refusal(self) -> str | None:
        """Why writes are refused here (SPEC §10), or None: with a token every request
        carries it already; without one, only a loopback endpoint takes writes."""
        settings = self.settings
        if settings is None or settings.token is not None or _loopback(settings.host):
            return None
        return (
            f"writes need a token: the admin endpoint listens on {settings.listen}, which is not a loopback "
            "address; set settings.admin.token and send 'Authorization: Bearer <token>'"
        )

    def _read_body(self, environ: dict) -> Any:
        """The request's JSON body, at most ``max_body`` bytes, else _Refused."""
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            try:
                declared = int(length)
            except ValueError:
                raise _Refused(400, f"Content-Length {length[:40]!r} is not a number") from None
            if declared > self.max_body:
                raise _Refused(413, f"the body is {declared:,} bytes, over the limit of {self.max_body:,}")
        try:
            with gevent.Timeout(self.body_timeout):
                data = environ["wsgi.input"].read(self.max_body + 1)
        except (gevent.Timeout, OSError):
            self.figures.cut[CutReason.BODY_TIMEOUT] += 1
            raise _Refused(408, f"the body did not arrive within {self.body_timeout:g} s") from None
        if len(data) > self.max_body:
            raise _Refused(413, f"the body is more than the limit of {self.max_body:,} bytes")
        if not data.strip():
            raise _Refused(400, "the request has no body: send a JSON object")
        try:
            return read_json(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _Refused(400, f"the body is not UTF-8 text (byte {exc.start})") from None
        except (ValueError, RecursionError) as exc:
            raise _Refused(400, f"the body is not valid JSON: {str(exc)[:200]}") from None

    def _transaction_answer(self, outcome: ReloadOutcome) -> Answer:
        result = outcome.result
        if result is None:  # refused (gportmap stops) or failed (a bug)
            return _error(_RELOAD_STATUS[outcome.status], "; ".join(outcome.errors) or outcome.status.value)
        status = _TX_STATUS[result.status]
        headers = [("ETag", f'"{result.etag}"')] if result.etag and status in (200, 201, 412) else []
        if result.status is TxStatus.CREATED and result.name:
            headers.append(("Location", f"/rules/{result.name}"))
        return status, _json(_transaction_body(result)), "application/json", headers

    def _page(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, self._dashboard, "text/html; charset=utf-8"


def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in the hub's thread pool. Its exception comes back as a
    value and is raised here: one leaving a pool function would also be reported
    to the hub's error handler."""

    def call() -> Any:
        try:
            return function(*args)
        except Exception as exc:  # noqa: BLE001 (raised again in the calling greenlet)
            return _Raised(exc)

    outcome = gevent.get_hub().threadpool.apply(call)
    if isinstance(outcome, _Raised):
        raise outcome.exc
    return outcome


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


def _gave_token(environ: dict) -> bool:
    """The request carries a token (a header, or the dashboard's ``?token=``)."""
    return "HTTP_AUTHORIZATION" in environ or "token" in parse_qs(environ.get("QUERY_STRING", ""))


def _address_text(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return peer_text(address[:2])
    return str(address)


#: What a browser gets for the dashboard without the token (``settings.admin.token``
#: or ``tokenFile`` is set): how to open it, and a field that does so. No external assets.
_TOKEN_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gportmap: token needed</title>
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;color:#1d2530}
code{background:#eef0f3;padding:1px 4px;border-radius:4px}input{font:inherit;width:22em}</style></head>
<body><h1>This dashboard needs the admin token</h1>
<p>This gportmap endpoint has a token (<code>settings.admin.token</code>, or the file named by
<code>settings.admin.tokenFile</code>). Open the dashboard as
<code>/?token=TOKEN</code>; the page then sends it as <code>Authorization: Bearer TOKEN</code>.</p>
<form method="get" action="./"><label>Token: <input type="password" name="token" autofocus></label>
<button type="submit">Open the dashboard</button></form>
<p>API clients send the header: <code>curl -H 'Authorization: Bearer TOKEN' .../stats</code>,
or <code>gportmap ctl --token-file FILE stats</code>.</p></body></html>
"""


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1).encode() + b"\n"


def _error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Answer:
    return status, _json({"error": message}), "application/json", headers or []


def _transaction_body(result: TxOutcome) -> dict[str, Any]:
    """SPEC §10: ``{"changes", "etag"}`` after a write, ``{"dry_run", "changes",
    "impact"}`` for a dry run, ``{"errors"}`` when invalid, ``{"error"}`` otherwise."""
    if result.status is TxStatus.INVALID:
        return {"errors": list(result.errors)}
    if result.status in (TxStatus.DONE, TxStatus.CREATED, TxStatus.PLANNED):
        body: dict[str, Any] = {}
        if result.status is TxStatus.PLANNED:
            body["dry_run"] = True
        body["changes"] = result.changes.as_fields() if result.changes is not None else None
        if result.impact is not None:
            body["impact"] = result.impact.as_dict()
        body["etag"] = result.etag
        if result.name is not None:
            body["name"] = result.name
        if result.rule is not None:
            body["rule"] = result.rule
        return body
    body = {"error": " ".join(result.errors)}
    if result.status is TxStatus.STALE:
        body["etag"] = result.etag
    return body


def _dry_run(environ: dict) -> bool:
    """``?dry_run=1`` (or true/yes/on; 0/false/no/off)."""
    values = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get("dry_run")
    if not values:
        return False
    flag = _FLAGS.get(values[-1].strip().lower() or "1")
    if flag is None:
        raise _Refused(400, f"dry_run must be 1 or 0, not {values[-1][:40]!r}")
    return flag


def _client(environ: dict) -> str:
    return peer_text((environ.get("REMOTE_ADDR", ""), int(environ.get("REMOTE_PORT") or 0)))


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _no_target(targets: list[dict[str, Any]]) -> str:
    """Why a running rule fails ``/healthz``: none of its targets is up."""
    names = ", ".join(str(target["name"]) for target in targets[:10])
    more = f" and {len(targets) - 10} more" if len(targets) > 10 else ""
    return f"no target is up ({names}{more} down)"


def _metrics_module() -> ModuleType:
    """``gportmap.admin.metrics``, imported on first use (it pulls in prometheus_client)."""
    from gportmap.admin import metrics

    return metrics
