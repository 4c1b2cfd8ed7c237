"""The admin endpoint's guard: what keeps a hostile or broken client of the
endpoint from taking what forwarding needs (issues 18 and 20).

The endpoint is a pywsgi server in the same hub as the data path, so it is an edge
of its own. This module holds everything that edge enforces, apart from the routes
(``gportmap.admin.http``) and the renderings (``gportmap.admin.render``), so that
the limits read in one place and a route cannot bypass them:

- the connection cap (``GuardedServer``): past ``max_connections`` a new connection
  is closed as soon as it is accepted, before any greenlet exists for it, and
  counted, so a flood of idle connections cannot take the descriptors forwarding
  needs;
- the deadlines and size limits of a request (``GuardedHandler``): a head must
  arrive whole within ``header_timeout`` (slowloris), a keep-alive connection is
  closed after ``idle_timeout`` without a request, each send or receive after the
  head gives up after ``body_timeout``, and a head is bounded in size;
- the throttle of wrong tokens (``AuthThrottle``): slowed per client address by a
  token bucket, past it 429, and logged once per client per interval with a count;
- the endpoint's own figures (``AdminFigures``) and its rate-limited records
  (``EdgeLog``).

The limits themselves are documented class attributes of the endpoint
(``gportmap.admin.http.AdminServer``), which this module reads through
``Guarded``; it never imports the routes.
"""

from __future__ import annotations

import enum
import http.client
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from typing import Any, Protocol

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from gportmap.engine.net import peer_text
from gportmap.events import Event, define, if_set
from gportmap.log import ClientErrorsAsLog, RateLimiter, emit, get_logger
from gportmap.security import client_ip

logger = get_logger("admin")


class CutReason(enum.StrEnum):
    """Why the endpoint closed a connection on its own (``/stats``' ``admin.cut``)."""

    HEADER_TIMEOUT = "header_timeout"  # no whole request head within header_timeout
    IDLE_TIMEOUT = "idle_timeout"  # keep-alive: no next request within idle_timeout
    BODY_TIMEOUT = "body_timeout"  # the body did not arrive within body_timeout (answered 408)
    SEND_TIMEOUT = "send_timeout"  # the client did not read the answer: a send waited body_timeout
    HEAD_TOO_LARGE = "head_too_large"  # the head is over max_head bytes (answered 400)


class AdminFigures:
    """The endpoint's own counters (``/stats``' ``admin``, ``gportmap_admin_*``):
    plain integers, kept by the endpoint across moves of its address."""

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


class EdgeLog:
    """The endpoint's records of connections it closed on its own (``admin_busy``,
    ``admin_cut``): at most one per ``interval`` per kind, with the count of those
    left out, so that a flood is a line every few seconds and never a line per
    connection. Called on the hub (the accept callback, a handler): logging only
    queues the record."""

    #: Seconds between two records of one kind (``admin_busy``; ``admin_cut`` per reason).
    interval = 10.0

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._busy = RateLimiter(burst=1, interval=self.interval)
        self._cut = RateLimiter(burst=1, interval=self.interval)

    def busy(self, address: Any) -> None:
        """A connection was closed at the cap."""
        allowed, suppressed = self._busy.allow("busy")
        if allowed:
            emit(
                logger,
                AdminBusy(client=address_text(address), max_connections=self.max_connections, suppressed=suppressed),
            )

    def cut(self, address: Any, reason: CutReason, seconds: float) -> None:
        """A connection was closed on a deadline or an oversized head."""
        allowed, suppressed = self._cut.allow(reason)
        if allowed:
            emit(logger, AdminCut(client=address_text(address), reason=reason, seconds=seconds, suppressed=suppressed))


class Guarded(Protocol):
    """The endpoint as its guard reads it: the limits (``AdminServer``'s documented
    class attributes), its figures and its records."""

    max_connections: int
    header_timeout: float
    idle_timeout: float
    body_timeout: float
    max_head: int
    figures: AdminFigures
    edge: EdgeLog

    def __call__(self, environ: dict, start_response: Any) -> Any:
        """The WSGI application the guarded server serves."""
        ...


class _BoundedHead:
    """The connection's reader as the header parser sees it: at most ``left`` bytes,
    then ``LineTooLong`` (pywsgi answers 400 and closes)."""

    def __init__(self, reader: Any, left: int, handler: GuardedHandler) -> None:
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


class GuardedHandler(ClientErrorsAsLog, WSGIHandler):
    """pywsgi's handler with the endpoint's deadlines and size limits; malformed
    requests never print a traceback (``ClientErrorsAsLog``).

    The head timer starts when a request is awaited (at accept, or at the first
    byte of a keep-alive connection's next request) and stops once the head is
    parsed; the body has its own deadline (the endpoint's ``_read_body``); each
    send or receive after that gives up after ``body_timeout``."""

    too_large = False

    def handle(self) -> None:
        admin: Guarded = self.server.admin
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
            admin.edge.cut(self.client_address, reason, seconds)
        finally:
            if self._timer is not None:
                self._timer.close()

    def handle_one_request(self) -> Any:
        admin: Guarded = self.server.admin
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
            admin: Guarded = self.server.admin
            admin.figures.cut[CutReason.SEND_TIMEOUT] += 1
            admin.edge.cut(self.client_address, CutReason.SEND_TIMEOUT, admin.body_timeout)
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


class GuardedServer(WSGIServer):
    """pywsgi's server with the endpoint's connection cap: a connection past it is
    closed as soon as it is accepted, before any greenlet exists for it."""

    def __init__(self, listener: Any, admin: Guarded) -> None:
        super().__init__(listener, admin, log=None, error_log=logger, handler_class=GuardedHandler)
        self.admin = admin

    def do_handle(self, *args: Any) -> None:
        admin, figures = self.admin, self.admin.figures
        if figures.open >= admin.max_connections:
            figures.refused += 1
            args[0].close()
            admin.edge.busy(args[1])
            return
        figures.open += 1
        super().do_handle(*args)

    def do_close(self, *args: Any) -> None:
        self.admin.figures.open -= 1
        super().do_close(*args)


def address_text(address: Any) -> str:
    """A client's address as the records name it (``host:port``, IPv6 bracketed)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return peer_text(address[:2])
    return str(address)
