"""The admin HTTP endpoint (SPEC §5): health, metrics, stats, open connections,
reload, and the dashboard page.

A gevent pywsgi server in the same hub as the data path. It only reads the plain
counters the relay maintains, at request time; a request, however malformed, is
answered or closed by pywsgi and never touches forwarding. If its address cannot
be bound, gportmap logs it, keeps forwarding, and retries with back-off.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from gportmap.admin.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gportmap.admin.metrics import build_registry, render
from gportmap.config import AdminSettings
from gportmap.engine.net import BindRetry, bind_listener
from gportmap.errors import BindError
from gportmap.log import ClientErrorsAsLog, get_logger, log_event
from gportmap.runtime.applier import OutcomeStatus, ReloadSource

if TYPE_CHECKING:
    from gportmap.runtime.service import Service

logger = get_logger("admin")

StartResponse = Callable[..., Any]
_STATUS = {
    200: "200 OK",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
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


class AdminServer:
    """Serves the admin endpoint for one ``Service``; ``apply`` follows settings changes."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings: AdminSettings | None = None
        self.error: str | None = None
        self._server: WSGIServer | None = None
        self._retry: gevent.Greenlet | None = None
        self._backoff = BindRetry()
        self._registry = build_registry(service)
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
        failing = [
            {"rule": view.name, "listen": view.rule.listen, "error": view.error}
            for view in self.service.rule_views()
            if view.state == "failed"
        ]
        if failing:
            return 503, _json({"status": "failing", "failing": failing}), "application/json"
        return 200, _json({"status": "ok"}), "application/json"

    def _metrics(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, render(self._registry), METRICS_CONTENT_TYPE

    def _stats(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, _json(self.service.snapshot()), "application/json"

    def _connections(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, _json(self.service.open_connections()), "application/json"

    def _reload(self, environ: dict) -> tuple[int, bytes, str]:
        """Queue a reload and answer once the applier served it (with the others that
        queued meanwhile: ``coalesced`` says how many one apply served)."""
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

    def _page(self, environ: dict) -> tuple[int, bytes, str]:
        return 200, self._dashboard, "text/html; charset=utf-8"


class _Handler(ClientErrorsAsLog, WSGIHandler):
    """pywsgi's handler, with malformed requests never printing a traceback."""


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1).encode() + b"\n"
