"""The admin HTTP endpoint (SPEC §5): health, metrics, stats, open connections,
reload, the dashboard page, and the rule API (SPEC §10: ``/rules``).

A gevent pywsgi server in the same hub as the data path, so it is an edge of its
own (issue 20) and must never stall forwarding (issue 18). This module holds the
routes and what they answer; the rest is in one module per job:

- ``gportmap.admin.guard``: the connection cap, the request deadlines and size
  limits, the throttle of wrong tokens, the endpoint's own figures and records
  (the limits are ``AdminServer``'s documented class attributes);
- ``gportmap.admin.render``: ``/metrics``, ``/stats`` and ``/connections``, copied
  on the hub in slices and formatted in the hub's thread pool, one shared rendering
  at a time (``Coalesced``).

A request, however malformed, is answered or closed by pywsgi and never touches
forwarding. If its address cannot be bound, gportmap logs it, keeps forwarding,
and retries with back-off.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import gevent

from gportmap.admin.guard import AdminFigures, AuthThrottle, CutReason, EdgeLog, GuardedServer
from gportmap.admin.render import Renderings, json_text
from gportmap.admin.toxiproxy import ToxiproxyApi
from gportmap.config import AdminSettings
from gportmap.config.edit import EditOp, RuleEdit, read_json
from gportmap.engine.net import BindRetry, bind_listener, peer_text
from gportmap.errors import BindError
from gportmap.events import AdminFailed, AdminStarted
from gportmap.log import emit, get_logger
from gportmap.runtime.applier import OutcomeStatus, ReloadOutcome, ReloadSource
from gportmap.runtime.transaction import Transaction, TxOutcome, TxStatus, parse_if_match
from gportmap.runtime.workers import WorkerPool

if TYPE_CHECKING:
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


class AdminServer:
    """Serves the admin endpoint for one ``Service``; ``apply`` follows settings changes.

    Its class attributes are the endpoint's limits, which ``gportmap.admin.guard``
    enforces; the renderings' own (slices, duty) are ``gportmap.admin.render.Renderings``'."""

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

    #: The largest request body read, in bytes (one rule, or a merge patch); a larger
    #: one is answered 413 without being parsed. A rule with an allow list of 100,000
    #: networks is about 2 MB.
    max_body = 4 * 1024 * 1024

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings: AdminSettings | None = None
        self.error: str | None = None
        self._server: GuardedServer | None = None
        self._retry: gevent.Greenlet | None = None
        self._backoff = BindRetry()
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
        self.edge = EdgeLog(self.max_connections)
        self.renderings = Renderings(service, lambda: self.figures.as_dict(self.max_connections))
        #: Toxiproxy's API (SPEC §12), on its own address, following settings.toxiproxy
        #: with this endpoint (``apply``, ``stop``: an upgrade's drainer keeps neither).
        self.toxiproxy = ToxiproxyApi(service)
        self._routes: dict[str, dict[str, Callable[[dict], tuple[int, bytes, str]]]] = {
            "/metrics": {"GET": self._metrics},
            "/stats": {"GET": self._stats},
            "/connections": {"GET": self._connections},
            "/reload": {"POST": self._reload},
            "/": {"GET": self._page},
            "/workers/restart": {"POST": self._restart_worker},
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
        self._server = GuardedServer(listener, self)
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
                start_response, 404, json_text({"error": f"no such endpoint: {path}"}), "application/json"
            )
        handler = methods.get("GET" if method == "HEAD" and "GET" in methods else method)
        if handler is None:
            allowed = ", ".join(methods)
            return self._respond(
                start_response,
                405,
                json_text({"error": f"use {allowed}"}),
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
            json_text({"error": "unauthorized: send 'Authorization: Bearer <token>'"}),
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
            return 503, json_text({"status": "failing", "failing": failing}), "application/json"
        return 200, json_text({"status": "ok"}), "application/json"

    def _metrics(self, environ: dict) -> tuple[int, bytes, str]:
        body = self.renderings.metrics.get()
        assert self.renderings.exposition is not None  # imported by the rendering
        return 200, body, self.renderings.exposition.CONTENT_TYPE

    def _stats(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, self.renderings.stats.get(), "application/json"

    def _connections(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, self.renderings.connections.get(), "application/json"

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
            return exc.status, json_text({"error": str(exc)}), "application/json"
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
        return status, json_text(body), "application/json"

    def _restart_worker(self, environ: dict) -> tuple[int, bytes, str]:
        """``POST /workers/restart?worker=N``: restart worker N in place, carrying its
        connections (``WorkerPool.restart_worker``); answered once it serves again
        (a pre-flight and a start: seconds), or 409 with why it was not restarted."""
        pool = self.service.supervisor
        values = parse_qs(environ.get("QUERY_STRING", "")).get("worker", [])
        index = int(values[0]) if len(values) == 1 and values[0].isdigit() else None
        refusal = self._write_refusal()
        if refusal is not None:
            status, body = 403, {"error": refusal}
        elif not isinstance(pool, WorkerPool):
            status, body = 409, {"error": "gportmap runs without workers (--workers): no worker to restart"}
        elif index is None:
            status, body = 400, {"error": "say which worker: ?worker=N (its index in /stats' workers)"}
        elif index >= pool.count:
            status, body = 404, {"error": f"there is no worker {index}: the workers are 0 to {pool.count - 1}"}
        else:
            error = pool.restart_worker(index)  # this request's greenlet waits; forwarding does not
            if error is not None:
                status, body = 409, {"error": error, "worker": index}
            else:
                status, body = 200, {"status": "restarted", "worker": index}
        return status, json_text(body), "application/json"

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
            return 200, json_text({"settings": text.settings, "rules": text.rules}), "application/json", headers
        index = text.index_of(name)
        if index is None:
            return _error(404, f"no rule named {name!r}")
        return 200, json_text(text.rules[index]), "application/json", headers

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
        return status, json_text(_transaction_body(result)), "application/json", headers

    def _page(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, self._dashboard, "text/html; charset=utf-8"


def _gave_token(environ: dict) -> bool:
    """The request carries a token (a header, or the dashboard's ``?token=``)."""
    return "HTTP_AUTHORIZATION" in environ or "token" in parse_qs(environ.get("QUERY_STRING", ""))


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


def _error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Answer:
    return status, json_text({"error": message}), "application/json", headers or []


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
