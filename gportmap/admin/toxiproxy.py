"""Toxiproxy's HTTP API (v2) on ``settings.toxiproxy.listen`` (SPEC §12), so that
Toxiproxy's client libraries and CLI drive gportmap unchanged.

Covered: ``GET /version``; ``GET|POST /proxies``; ``GET|POST|PATCH|DELETE
/proxies/NAME``; ``GET|POST /proxies/NAME/toxics``; ``GET|POST|PATCH|DELETE
/proxies/NAME/toxics/TOXIC``; ``POST /reset``; ``POST /populate``; with
Toxiproxy's JSON shapes, status codes (201 made, 204 deleted, 404, 409, 400)
and error bodies ``{"error": "...", "status": N}``.

A proxy is a tcp rule held in memory (``gportmap.runtime.overlay``); its toxics
are the rule's faults. Every write goes through the service's applier
(``Service.apply_runtime``). A name or port that a rule of the file holds is a
409 here; a later file that takes it wins (the proxy stops running, is kept).

A pywsgi server of its own, in the hub, as the admin endpoint; off unless
``settings.toxiproxy`` is given; moved or stopped with the settings on reload.
The admin endpoint's ``AdminServer`` owns it (its ``apply`` and ``stop``), so it
runs in the main process only: never in a worker, nor in an upgrade's drainer.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from gportmap.config import Config
from gportmap.config.checks import check_targets
from gportmap.config.faults import (
    ATTRIBUTES,
    STREAM_TYPES,
    Fault,
    FaultType,
    RuleSource,
    Stream,
    ToxiproxySettings,
    attribute_problems,
)
from gportmap.engine.net import bind_listener
from gportmap.errors import BindError
from gportmap.events import InternalError, ToxiproxyFailed, ToxiproxyStarted
from gportmap.hubwork import in_thread
from gportmap.log import ClientErrorsAsLog, emit, get_logger
from gportmap.runtime.applier import OutcomeStatus
from gportmap.runtime.overlay import ChangeRefused, HeldProxy, RuntimeChange

if TYPE_CHECKING:
    from gportmap.runtime.service import Service

logger = get_logger("toxiproxy")

#: What ``/version`` answers: the Toxiproxy API version this speaks.
VERSION = "2.9.0"

StartResponse = Callable[..., Any]
_STATUS = {
    200: "200 OK",
    201: "201 Created",
    204: "204 No Content",
    400: "400 Bad Request",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    413: "413 Content Too Large",
    500: "500 Internal Server Error",
    501: "501 Not Implemented",
    503: "503 Service Unavailable",
}


class ToxiproxyApi:
    """The API for one service; ``apply`` follows ``settings.toxiproxy``."""

    #: The largest request body read (a populate of many proxies fits).
    max_body = 1024 * 1024

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings: ToxiproxySettings | None = None
        self._server: WSGIServer | None = None

    # -- life cycle -------------------------------------------------------------------

    def apply(self, config: Config) -> None:
        settings = getattr(config.settings, "toxiproxy", None)
        if settings == self.settings and (self._server is not None or settings is None):
            return
        self.stop()
        self.settings = settings
        if settings is None:
            return
        try:
            listener = bind_listener(settings.host, settings.port)
        except BindError as exc:
            emit(logger, ToxiproxyFailed(error=str(exc)))
            return
        self._server = WSGIServer(listener, self, log=None, error_log=logger, handler_class=_Handler)
        self._server.start()
        listen = f"{settings.host}:{settings.port}"
        emit(logger, ToxiproxyStarted(listen=listen))

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None

    @property
    def address(self) -> tuple[str, int] | None:
        return self._server.address[:2] if self._server is not None else None

    # -- WSGI -------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        parts = [part for part in environ.get("PATH_INFO", "/").split("/") if part]
        try:
            status, body = self._route(method, parts, environ)
        except ChangeRefused as exc:
            status, body = exc.status, {"error": str(exc), "status": exc.status}
        except Exception as exc:  # noqa: BLE001 - a bug: this request fails (500), logged with its traceback
            emit(logger, InternalError(error=repr(exc)[:200], what="toxiproxy API request failed"), exc_info=exc)
            status, body = 500, {"error": f"internal error: {type(exc).__name__}", "status": 500}
        if status == 204:
            start_response(_STATUS[204], [])
            return [b""]
        data = json.dumps(body).encode() + b"\n"
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        start_response(_STATUS.get(status, f"{status} Error"), headers)
        return [data]

    def _route(self, method: str, parts: list[str], environ: dict) -> tuple[int, Any]:
        if method == "PATCH":
            method = "POST"  # Toxiproxy 2.6+ takes PATCH for updates; POST is the older word
        if parts == ["version"] and method == "GET":
            return 200, {"version": VERSION}
        if parts == ["reset"] and method == "POST":
            return self._write(self._reset)
        if parts == ["populate"] and method == "POST":
            body = self._body(environ)
            names = {entry.get("name") for entry in body if isinstance(entry, dict)} if isinstance(body, list) else set()
            return self._write(lambda: self._populate(body), self._after(names))
        if parts == ["proxies"]:
            if method == "GET":
                return 200, {name: self._proxy_json(held) for name, held in self.held.proxies.items()}
            if method == "POST":
                body = self._body(environ)
                made = body.get("name") if isinstance(body, dict) else None
                return self._write(lambda: (201, self._proxy_json(self._create(body))), self._after({made}))
        if len(parts) >= 2 and parts[0] == "proxies":
            name = parts[1]
            if len(parts) == 2:
                if method == "GET":
                    return 200, self._proxy_json(self._proxy(name))
                if method == "POST":
                    body = self._body(environ)
                    return self._write(lambda: (200, self._proxy_json(self._update(name, body))), self._after({name}))
                if method == "DELETE":
                    return self._write(lambda: self._delete(name), self._after({name}))
            if len(parts) == 3 and parts[2] == "toxics":
                if method == "GET":
                    return 200, [fault.describe() for fault in self._proxy(name).toxics]
                if method == "POST":
                    body = self._body(environ)
                    return self._write(lambda: (200, self._add_toxic(name, body).describe()))
            if len(parts) == 4 and parts[2] == "toxics":
                toxic = parts[3]
                if method == "GET":
                    return 200, self._toxic(self._proxy(name), toxic).describe()
                if method == "POST":
                    body = self._body(environ)
                    return self._write(lambda: (200, self._update_toxic(name, toxic, body).describe()))
                if method == "DELETE":
                    return self._write(lambda: self._remove_toxic(name, toxic))
        return 404, {"error": "404 page not found", "status": 404}

    @property
    def held(self):
        return self.service.held

    def _body(self, environ: dict) -> Any:
        data = environ["wsgi.input"].read(self.max_body + 1)
        if len(data) > self.max_body:
            raise ChangeRefused(413, "request body too large")
        try:
            return json.loads(data or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ChangeRefused(400, "bad request body") from None

    def _write(self, run: Callable[[], tuple[int, Any]], check: Callable[[], None] | None = None) -> tuple[int, Any]:
        """Run one write in the applier's turn (``Service.apply_runtime``)."""
        if getattr(self.service.supervisor, "context", None) is None:
            raise ChangeRefused(
                501, "gportmap runs workers (settings.workers): proxies of the Toxiproxy API need a single process"
            )
        saved: dict[str, HeldProxy] = {}

        def run_saving() -> tuple[int, Any]:
            saved.update(self.held.proxies)  # in the applier's turn: what this write changes
            return run()

        def undo() -> None:
            self.held.proxies = dict(saved)

        change = RuntimeChange(run_saving, check, undo)
        outcome = self.service.apply_runtime(change)
        if change.refused is not None:
            raise change.refused
        if outcome.status is OutcomeStatus.REFUSED:
            raise ChangeRefused(503, "; ".join(outcome.errors) or "gportmap is stopping")
        if outcome.status is not OutcomeStatus.APPLIED or change.result is None:
            if change.result is not None:
                undo()  # applied nothing (a bug, logged by the applier): hold what runs
            raise ChangeRefused(500, "; ".join(outcome.errors) or outcome.status.value)
        return change.result

    # -- reads ------------------------------------------------------------------------

    def _proxy(self, name: str) -> HeldProxy:
        held = self.held.proxies.get(name)
        if held is None:
            raise ChangeRefused(404, "proxy not found")
        return held

    @staticmethod
    def _toxic(held: HeldProxy, name: str) -> Fault:
        for fault in held.toxics:
            if fault.name == name:
                return fault
        raise ChangeRefused(404, "toxic not found")

    @staticmethod
    def _proxy_json(held: HeldProxy) -> dict[str, Any]:
        host = f"[{held.listen_host}]" if ":" in held.listen_host else held.listen_host
        return {
            "name": held.name,
            "listen": f"{host}:{held.listen_port}",
            "upstream": held.upstream,
            "enabled": held.enabled,
            "toxics": [fault.describe() for fault in held.toxics],
        }

    # -- writes (each run in the applier's turn) ----------------------------------------

    def _create(self, body: Any, replace_existing: bool = False) -> HeldProxy:
        if not isinstance(body, dict):
            raise ChangeRefused(400, "bad request body")
        for key in ("name", "upstream"):
            if not body.get(key):
                raise ChangeRefused(400, f"missing required field: {key}")
        name = str(body["name"])
        if name in self.held.proxies and not replace_existing:
            raise ChangeRefused(409, "proxy already exists")
        listen_host, listen_port = _address(str(body.get("listen") or "127.0.0.1:0"), "listen")
        upstream_host, upstream_port = _address(str(body["upstream"]), "upstream")
        if listen_port == 0:
            listen_port = _free_port(listen_host)
        enabled = body.get("enabled", True) is not False
        own = name if replace_existing else None
        problem = self.held.clash(self.service.config, name, listen_port, own) if enabled else None
        if problem is not None:
            raise ChangeRefused(409, problem)
        old = self.held.proxies.get(name)
        held = HeldProxy(
            name, listen_host, listen_port, upstream_host, upstream_port, str(body["upstream"]), enabled,
            old.toxics if old is not None and replace_existing else (),
        )
        self._check_upstream(held)
        self.held.proxies[name] = held
        return held

    def _check_upstream(self, held: HeldProxy) -> None:
        """``settings.allowTargets`` binds the API's proxies as it binds the file's
        rules (the upstream resolved in the thread pool): 403 outside it."""
        allowed = self.service.config.settings.allow_targets
        if not allowed:
            return
        rule = held.rule(0)
        problems = in_thread(check_targets, [rule], {"allowTargets": list(allowed)})
        if problems:
            raise ChangeRefused(403, problems[0][1])

    def _after(self, names: set[str | None]) -> Callable[[], None]:
        """What follows the apply of a write to proxies ``names``: Toxiproxy drops
        the connections of a proxy it disables, deletes or moves, so their retired
        servers are stopped at once instead of draining for ``drainTimeout``; and it
        answers 500 when a proxy cannot listen (the write is then undone)."""

        def after() -> None:
            supervisor = self.service.supervisor
            for runner in list(getattr(supervisor, "draining", ())):
                if runner.rule.name in names and runner.rule.source is RuleSource.TOXIPROXY:
                    gevent.spawn(runner.server.kill)
            for rule, state, error in supervisor.rule_states():
                if rule.name in names and rule.source is RuleSource.TOXIPROXY and state == "failed":
                    raise ChangeRefused(500, error or f"proxy {rule.name} cannot listen")

        return after

    def _update(self, name: str, body: Any) -> HeldProxy:
        held = self._proxy(name)
        if not isinstance(body, dict):
            raise ChangeRefused(400, "bad request body")
        host, port, upstream = held.listen_host, held.listen_port, held.upstream
        upstream_host, upstream_port = held.upstream_host, held.upstream_port
        if body.get("listen"):
            host, port = _address(str(body["listen"]), "listen")
            if port == 0:
                port = _free_port(host)
        if body.get("upstream"):
            upstream = str(body["upstream"])
            upstream_host, upstream_port = _address(upstream, "upstream")
        enabled = held.enabled if "enabled" not in body else bool(body["enabled"])
        if enabled:
            problem = self.held.clash(self.service.config, name, port, own=name)
            if problem is not None:
                raise ChangeRefused(409, problem)
        new = replace(
            held, listen_host=host, listen_port=port, upstream=upstream,
            upstream_host=upstream_host, upstream_port=upstream_port, enabled=enabled,
        )
        self._check_upstream(new)
        self.held.proxies[name] = new
        return new

    def _delete(self, name: str) -> tuple[int, Any]:
        self._proxy(name)
        del self.held.proxies[name]
        return 204, None

    def _reset(self) -> tuple[int, Any]:
        for name, held in list(self.held.proxies.items()):
            self.held.proxies[name] = replace(held, enabled=True, toxics=())
        return 204, None

    def _populate(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, list):
            raise ChangeRefused(400, "bad request body")
        made = []
        for entry in body:
            if not isinstance(entry, dict):
                raise ChangeRefused(400, "bad request body")
            made.append(self._create(entry, replace_existing=True))
        return 201, {"proxies": [self._proxy_json(held) for held in made]}

    def _add_toxic(self, name: str, body: Any) -> Fault:
        held = self._proxy(name)
        fault = _toxic_from(body, None)
        if any(existing.name == fault.name for existing in held.toxics):
            raise ChangeRefused(409, "toxic already exists")
        self.held.proxies[name] = replace(held, toxics=(*held.toxics, fault))
        return fault

    def _update_toxic(self, name: str, toxic: str, body: Any) -> Fault:
        held = self._proxy(name)
        old = self._toxic(held, toxic)
        fault = _toxic_from(body, old)
        self.held.proxies[name] = replace(held, toxics=tuple(fault if t.name == toxic else t for t in held.toxics))
        return fault

    def _remove_toxic(self, name: str, toxic: str) -> tuple[int, Any]:
        held = self._proxy(name)
        self._toxic(held, toxic)
        self.held.proxies[name] = replace(held, toxics=tuple(t for t in held.toxics if t.name != toxic))
        return 204, None


def _toxic_from(body: Any, old: Fault | None) -> Fault:
    """A toxic from a request body: a new one, or ``old`` updated by the keys given."""
    if not isinstance(body, dict):
        raise ChangeRefused(400, "bad request body")
    kind_text = body.get("type", old.type.value if old else None)
    try:
        kind = FaultType(kind_text)
    except ValueError:
        raise ChangeRefused(400, "invalid toxic type") from None
    if kind not in STREAM_TYPES:
        raise ChangeRefused(400, "invalid toxic type")
    stream_text = body.get("stream", old.stream.value if old else "downstream")
    try:
        stream = Stream({"up": "upstream", "down": "downstream"}.get(stream_text, stream_text))
    except ValueError:
        raise ChangeRefused(400, "stream was invalid, can be either upstream or downstream") from None
    toxicity = body.get("toxicity", old.toxicity if old else 1.0)
    if isinstance(toxicity, bool) or not isinstance(toxicity, (int, float)) or not 0 <= toxicity <= 1:
        raise ChangeRefused(400, "toxicity must be between 0 and 1")
    attributes = dict(old.attributes) if old is not None else {}
    given = body.get("attributes") or {}
    if not isinstance(given, dict):
        raise ChangeRefused(400, "bad request body")
    problems = attribute_problems(kind, given, ("attributes",))
    if problems:
        where, text = problems[0]
        raise ChangeRefused(400, f"{'.'.join(map(str, where))}: {text}")
    attributes.update(given)
    values = {key: int(attributes.get(key, default)) for key, default in ATTRIBUTES[kind].items()}
    name = body.get("name") or (old.name if old else f"{kind.value}_{stream.value}")
    return Fault(type=kind, stream=stream, toxicity=float(toxicity), name=str(name), **values)


def _address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535 or (what == "upstream" and int(port) == 0):
        raise ChangeRefused(400, f"{what} must be HOST:PORT, not {text!r}")
    return host or "0.0.0.0", int(port)


def _free_port(host: str) -> int:
    """A port the kernel gives for ``listen: HOST:0`` (Toxiproxy's random port),
    asked in the thread pool (a host name is looked up)."""
    return in_thread(_bind_free, host)


def _bind_free(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            raise ChangeRefused(500, f"listen {host}: {exc.strerror}") from None
        return probe.getsockname()[1]


class _Handler(ClientErrorsAsLog, WSGIHandler):
    """pywsgi's handler, with malformed requests never printing a traceback."""

