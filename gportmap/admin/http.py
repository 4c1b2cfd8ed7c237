"""The admin HTTP endpoint (SPEC §5): health, metrics, stats, open connections,
reload, the dashboard page, and the rule API (SPEC §10: ``/rules``).

A gevent pywsgi server in the same hub as the data path. It only reads the plain
counters the relay maintains, at request time; a request, however malformed, is
answered or closed by pywsgi and never touches forwarding. If its address cannot
be bound, gportmap logs it, keeps forwarding, and retries with back-off.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from gportmap.config import AdminSettings
from gportmap.config.edit import EditOp, RuleEdit, read_json
from gportmap.engine.net import BindRetry, bind_listener, peer_text
from gportmap.errors import BindError
from gportmap.log import ClientErrorsAsLog, get_logger, log_event
from gportmap.runtime.applier import OutcomeStatus, ReloadOutcome, ReloadSource
from gportmap.runtime.transaction import Transaction, TxOutcome, TxStatus, parse_if_match

if TYPE_CHECKING:
    from types import ModuleType

    from prometheus_client import CollectorRegistry

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
    413: "413 Content Too Large",
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
    """Serves the admin endpoint for one ``Service``; ``apply`` follows settings changes."""

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
        #: Built at the first scrape: prometheus_client is a tenth of a start's imports.
        self._registry: CollectorRegistry | None = None
        self._exposition: ModuleType | None = None  # gportmap.admin.metrics, once imported
        self._dashboard = resources.files("gportmap.admin").joinpath("static", "dashboard.html").read_bytes()
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
            return
        self.stop()
        if settings is not None:
            self._backoff.reset()
            self._start()

    def _start(self) -> None:
        self._retry = None
        settings = self.settings
        if settings is None:
            return
        try:
            listener = bind_listener(settings.host, settings.port)
        except BindError as exc:
            self.error = str(exc)
            log_event(
                logger,
                logging.ERROR,
                "admin_failed",
                f"admin endpoint cannot start: {exc}; forwarding goes on",
                listen=settings.listen,
                error=self.error,
                retry_in=self._backoff.delay,
            )
            self._retry = self._backoff.schedule(self._start)
            return
        self.error = None
        self._server = WSGIServer(listener, self, log=None, error_log=logger, handler_class=_Handler)
        self._server.start()
        log_event(
            logger,
            logging.INFO,
            "admin_started",
            f"admin endpoint on http://{settings.listen}/",
            listen=settings.listen,
            token=settings.token is not None,
        )

    def stop(self) -> None:
        if self._retry is not None:
            self._retry.kill()
            self._retry = None
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None

    @property
    def address(self) -> tuple[str, int] | None:
        return self._server.address[:2] if self._server is not None else None

    # -- WSGI -------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        if path == "/healthz" and method in ("GET", "HEAD"):
            return self._respond(start_response, *self._health(environ))
        if not self._authorized(environ):
            return self._respond(
                start_response,
                401,
                _json({"error": "unauthorized: send 'Authorization: Bearer <token>'"}),
                "application/json",
                [("WWW-Authenticate", 'Bearer realm="gportmap"')],
            )
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
        # The first scrape imports prometheus_client, in the thread pool: an import
        # reads files, which must not block the hub.
        if self._exposition is None:
            self._exposition = gevent.get_hub().threadpool.apply(_metrics_module)
        if self._registry is None:
            self._registry = self._exposition.build_registry(self.service)
        return 200, self._exposition.render(self._registry), self._exposition.CONTENT_TYPE

    def _stats(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, _json(self.service.snapshot()), "application/json"

    def _connections(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, _json(self.service.open_connections()), "application/json"

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
            return _error(exc.status, str(exc), [("Connection", "close")] if exc.status == 413 else None)
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
        data = environ["wsgi.input"].read(self.max_body + 1)
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


class _Handler(ClientErrorsAsLog, WSGIHandler):
    """pywsgi's handler, with malformed requests never printing a traceback."""


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
