"""Logging for operators: one record per event, text or JSON, never a payload.

Every record carries an ``event`` name (``connection_closed``, ``rule_started``...)
and its fields as ``extra``; the formatters only decide how they look. Warnings and
gevent's hub errors are routed through here so that, in JSON mode, every line on
stderr is one JSON object.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter

LOGGER_NAME = "gportmap"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: LogRecord attributes that are not event fields.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "event",
    "taskName",
}


def get_logger(name: str = "") -> logging.Logger:
    """The project's logger, or a child of it (``get_logger("tcp")``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def log_event(logger: logging.Logger, level: int, event: str, message: str, **fields: Any) -> None:
    """Emit one event record; the cheap ``isEnabledFor`` check keeps disabled levels free."""
    if logger.isEnabledFor(level):
        fields["event"] = event
        logger.log(level, message, extra=fields)


def _utc_timestamp(created: float) -> str:
    seconds = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <event>: <message> key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None) or "log"
        parts = [
            _utc_timestamp(record.created),
            record.levelname,
            f"{event}: {record.getMessage()}",
        ]
        multiline: list[str] = []
        for key, value in record.__dict__.items():
            if key in _RESERVED or key.startswith("_"):
                continue
            if isinstance(value, (list, tuple)) and key == "errors":
                multiline.extend(f"  {item}" for item in value)
                continue
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
                # e.g. the per-rule figures of a ``stats`` record: one indented line each
                multiline.extend(
                    "  " + " ".join(f"{k}={_text_value(v)}" for k, v in item.items()) for item in value
                )
                continue
            parts.append(f"{key}={_text_value(value)}")
        line = " ".join(parts)
        if multiline:
            line += "\n" + "\n".join(multiline)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


class EventJsonFormatter(JsonFormatter):
    """JSON lines with ``timestamp``, ``level``, ``message`` and ``event`` always present."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(message)s",
            rename_fields={"levelname": "level"},
            timestamp=False,
        )

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        log_data["timestamp"] = _utc_timestamp(record.created)
        super().add_fields(log_data, record, message_dict)
        log_data.setdefault("event", "log")
        log_data.pop("taskName", None)


def setup_logging(log_format: str = "text", level: str = "INFO", worker: int | None = None) -> None:
    """(Re)configure the root handler; called again once the rules file's settings are
    known. In a worker process every record carries ``worker`` (its index)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventJsonFormatter() if log_format == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").propagate = True


class _WorkerField(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def route_gevent_errors() -> None:
    """Send errors the gevent hub would print to stderr (uncaught greenlet
    exceptions, accept errors such as EMFILE) into logging as ``internal_error``
    records, rate-limited: an accept loop out of descriptors fails on every retry."""
    import gevent

    hub = gevent.get_hub()
    logger = get_logger("hub")
    limiter = RateLimiter(burst=5, interval=10.0)

    def print_exception(context: Any, exc_type: type, value: BaseException, tb: Any) -> None:
        allowed, suppressed = limiter.allow((exc_type, type(context)))
        if not allowed:
            return
        fields = {"suppressed": suppressed} if suppressed else {}
        address = getattr(context, "server_host", None) and getattr(context, "address", None)
        where = f"listener {address[0]}:{address[1]}" if isinstance(address, tuple) else repr(context)[:200]
        log_event(
            logger,
            logging.ERROR,
            "internal_error",
            f"{exc_type.__name__} in {where}: {value}",
            context=where,
            **fields,
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("traceback", exc_info=(exc_type, value, tb), extra={"event": "traceback"})

    hub.print_exception = print_exception  # type: ignore[method-assign]


class RateLimiter:
    """Lets through at most ``burst`` events per ``interval`` seconds per key.

    Rejections can arrive by the thousand (a flood, a scanner); the counters count
    every one, the log shows the first few per interval and then how many it skipped.
    The table is bounded: keys are (rule, reason) pairs from the config, not clients.
    """

    def __init__(self, burst: int = 5, interval: float = 10.0) -> None:
        self.burst = burst
        self.interval = interval
        self._windows: dict[Any, list[float | int]] = {}

    def allow(self, key: Any) -> tuple[bool, int]:
        """Return (log this one?, how many were suppressed before it)."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            suppressed = int(window[2]) if window else 0
            self._windows[key] = [now, 1, 0]
            return True, suppressed
        if window[1] < self.burst:
            window[1] += 1
            return True, 0
        window[2] += 1
        return False, 0


class ClientErrorsAsLog:
    """Mixin for gevent pywsgi handlers: malformed requests become rate-limited
    ``bad_request`` records.

    pywsgi answers a malformed request with 400 and writes one ERROR line per request
    to ``error_log``, carrying the request line itself: a scanner or a fuzzer fills
    the log at its own rate, with its own bytes. Here each is one WARNING record with
    the client and a clipped reason, at most ``burst`` per ``interval`` per server,
    then a count of the ones skipped. When its parser fails with anything but
    ValueError or OSError (``GET / HTTP/1`` raises IndexError) pywsgi would also print
    a traceback straight to stderr, breaking one JSON object per line: such input is
    a client error like any other."""

    def _handle_client_error(self, ex: BaseException):  # pywsgi's hook for bad client input
        if not isinstance(ex, (ValueError, OSError)):
            ex = ValueError(str(ex) or type(ex).__name__)
        return super()._handle_client_error(ex)  # type: ignore[misc]

    def log_error(self, msg: str, *args: Any) -> None:  # pywsgi's only error output
        server = self.server  # type: ignore[attr-defined]
        limiter = getattr(server, "gportmap_bad_requests", None)
        if limiter is None:
            limiter = server.gportmap_bad_requests = RateLimiter(burst=5, interval=10.0)
        allowed, suppressed = limiter.allow("bad_request")
        if not allowed:
            return
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):
            text = msg
        address = getattr(self, "client_address", None)
        client = f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else str(address)
        fields: dict[str, Any] = {"suppressed": suppressed} if suppressed else {}
        log_event(
            get_logger("http"),
            logging.WARNING,
            "bad_request",
            "malformed HTTP request answered with 400",
            client=client,
            error=text.encode("ascii", "backslashreplace").decode()[:200],
            **fields,
        )
