"""Logging for operators: one record per event, text or JSON, never a payload.

Every record carries an ``event`` name (``connection_closed``, ``rule_started``...)
and its fields as ``extra``; the formatters only decide how they look. Warnings and
gevent's hub errors are routed through here so that, in JSON mode, every line on
stderr is one JSON object.

Nothing here writes to stderr from the hub: a record is formatted where it is logged
and handed to a bounded queue that one native thread writes out (``StderrQueue``).
The record made once per connection is not even formatted there: ``emit_fields``
queues its field values and the writer thread makes the line.
A stderr that nobody reads (a full pipe) then costs log lines, counted and reported
as ``log_records_dropped``, never the forwarding itself.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import logging
import os
import select
import stat
import sys
import time
from collections import deque
from typing import Any

from gevent import monkey
from pythonjsonlogger.json import JsonFormatter

from gportmap.events import Event, InternalError, LogRecordsDropped, MalformedRequest, Traceback, from_values
from gportmap.reasons import CloseReason, DropReason, RejectReason

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


def emit(logger: logging.Logger, event: Event, exc_info: Any = None) -> None:
    """Log one event (``gportmap.events``): its level, its message, its fields and
    ``event``. The cheap ``isEnabledFor`` check comes first, so a disabled level
    costs no message and no dict; where even making the event would cost (once per
    connection), the call site checks ``isEnabledFor`` before it makes one.
    ``exc_info``: an exception whose traceback goes with the record."""
    _log_event(logger, event, event.record_level(), exc_info)


def _log_event(logger: logging.Logger, event: Event, level: int, exc_info: Any = None) -> None:
    """``emit``'s work: through ``logging`` (a ``LogRecord``, the handlers)."""
    if logger.isEnabledFor(level):
        fields = event.fields()
        fields["event"] = event.event
        # What ``logger.log`` does once it has checked the level, which was just done.
        logger._log(level, event.message(), (), exc_info=exc_info, extra=fields)  # noqa: SLF001


def emit_fields(logger: logging.Logger, level: int, kind: type[Event], values: tuple) -> None:
    """``emit`` for a record made once per connection (``connection_closed``), at
    ``level`` (the caller has checked ``logger.isEnabledFor(level)``): ``values``
    are the event's fields in ``kind``'s order. When the record would reach only
    the process's ``StderrQueueHandler`` (the usual case: nothing else attached,
    no filter but the ``worker`` field), the hub queues the tuple as it is, with
    the time, and the writer thread makes the event, its message and its line: no
    ``LogRecord``, no dict, no formatting on the hub, and a text line made without
    a ``LogRecord`` at all. The line is the one ``emit`` would have written, byte
    for byte. Otherwise (a test's capture handler, a filter) it is ``emit``."""
    handler = _direct_handler(logger, level)
    if handler is None:
        _log_event(logger, from_values(kind)(values), level)
        return
    handler.queue.put_later((handler, logger.name, level, kind, values, time.time()))


def _direct_handler(logger: logging.Logger, level: int) -> StderrQueueHandler | None:
    """The one handler a record of ``logger`` at ``level`` would reach, when it is
    a ``StderrQueueHandler`` and nothing on the way filters or also handles it
    (what ``Logger.handle`` and ``callHandlers`` would do, answered without a
    record: the first logger up the chain with handlers has this one only, and the
    record goes no further: that logger does not propagate, or is the root); else
    None."""
    if logger.filters or logger.disabled:
        return None
    current: logging.Logger | None = logger
    while current is not None:
        handlers = current.handlers
        if handlers:
            if len(handlers) != 1 or (current.propagate and current.parent is not None):
                return None
            handler = handlers[0]
            if (type(handler) is not StderrQueueHandler or level < handler.level
                    or any(type(f) is not _WorkerField for f in handler.filters)):  # fmt: skip
                return None
            return handler
        if not current.propagate:
            return None  # no handler at all: logging's last resort
        current = current.parent
    return None


def _utc_timestamp(created: float) -> str:
    second = int(created)
    return f"{_utc_second(second)}.{int((created - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)  # a pure function of the second: records of one second share it
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <event>: <message> key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None) or "log"
        fields = ((k, v) for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_"))
        line = _text_line(record.created, record.levelname, event, record.getMessage(), fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_line(created: float, levelname: str, event: str, message: str, fields: Any) -> str:
    """``TextFormatter``'s line of one record without its traceback: ``fields`` the
    (key, value) pairs shown, in order (a record's, or a queued event's: see
    ``StderrQueue._format_later``)."""
    parts = [_utc_timestamp(created), levelname, f"{event}: {_one_line(message)}"]
    multiline: list[str] = []
    for key, value in fields:
        kind = type(value)
        if kind is int or (kind in _PLAIN_STR and value and " " not in value and value.isprintable()):
            parts.append(f"{key}={value}")  # most: as they are
            continue
        if kind is float:
            parts.append(f"{key}={value:.3f}")  # as _text_value writes it
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
    return line


#: The types whose value ``_text_line`` writes as it is when it is one printable
#: word: ``str``, and the reasons (``StrEnum``: formatted as their value, as
#: ``str()`` shows them).
_PLAIN_STR = frozenset({str, CloseReason, RejectReason, DropReason})


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return _one_line(",".join(str(v) for v in value)) or "-"
    text = _one_line(str(value))
    return f'"{text}"' if (" " in text or not text) else text


def _one_line(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\x1b``):
    a value a client chose (a path, an Origin, a server name) can neither start a
    line that reads as a record of its own nor send a terminal escape. The JSON
    format escapes them already."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


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


#: The types ``json.dumps`` writes the same whatever encoder and ``default`` a
#: formatter gives it: ``_json_line`` writes a record of these alone (the reasons
#: are ``str``s, written as their value).
_JSON_PLAIN = frozenset({str, int, float, bool, type(None), CloseReason, RejectReason, DropReason})


def _json_line(
    created: float, levelname: str, event: Event, fields: dict[str, Any], filters: list[Any]
) -> str | None:
    """``EventJsonFormatter``'s line of a record made of ``event`` (its ``fields``)
    at ``levelname``, through ``filters`` (``_WorkerField``s only): the same keys
    in the same order (``timestamp``, ``level``, ``message``, the fields,
    ``event``, then ``worker``) dumped as python-json-logger dumps them, without
    a ``LogRecord`` and the formatter's walk over it (16 against 4 us a record).
    None when a value is not one of ``_JSON_PLAIN``: the caller formats the
    record through the formatter."""
    for value in fields.values():
        if type(value) not in _JSON_PLAIN:
            return None
    data = {"timestamp": _utc_timestamp(created), "level": levelname, "message": event.message()}
    data.update(fields)
    data["event"] = event.event
    for found in filters:
        data["worker"] = found.worker
    return _json_dumps(data)


_json_dumps = json.JSONEncoder(ensure_ascii=True).encode  # json.dumps's default encoder, made once


def setup_logging(log_format: str = "text", level: str = "INFO", worker: int | None = None) -> None:
    """(Re)configure the root handler; called again once the rules file's settings are
    known. In a worker process every record carries ``worker`` (its index).

    Records go through the process's one ``StderrQueue`` whatever the format, so a
    change of format on reload keeps the queue, its writer and its drop count."""
    # No format of ours shows the process, thread or task a record came from; not
    # asking for them saves LogRecord a getpid() and two lookups per record.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # 3.12+; harmless before
    queue = stderr_queue()
    handler = StderrQueueHandler(queue)
    handler.setFormatter(EventJsonFormatter() if log_format == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    queue.report_with(handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").propagate = True


_start_native_thread = monkey.get_original("_thread", "start_new_thread")
_native_select = monkey.get_original("select", "select")
DROP_EVENT = LogRecordsDropped.event


class StderrQueue:
    """A bounded queue of formatted log lines and the one native thread that writes
    them to the stderr descriptor.

    Why a native thread: a write to a pipe nobody reads blocks, and on the hub it
    blocks every connection of the process. The hub side (``put``) only appends to a
    ``deque`` (atomic in CPython) and, when the writer sleeps, writes one byte to a
    non-blocking wake-up pipe; it never takes a lock the writer holds and never waits.
    When the queue is full the line is dropped and counted; once the writer has
    written every line queued before the drops it writes one ``log_records_dropped``
    record, in the current format, so the gap shows where it happened.

    Each counter has one owner thread (``_bytes_in``/``_dropped`` the producers,
    which ``logging.Handler.handle`` already serialises under the handler's lock;
    ``_bytes_out``/``_written``/``_lost``/``_reported`` the writer), so no
    read-modify-write is ever shared between threads.

    The writer is started with the thread function gevent saved before patching
    (``gevent.monkey.get_original``), as gevent's own thread pool does: with the
    process monkeypatched, ``threading.Thread`` would start a greenlet.
    """

    #: Most lines waiting for the writer; a record beyond is dropped (and counted).
    max_lines: int = 10_000
    #: Most bytes (encoded lines) waiting for the writer; a record beyond is dropped.
    max_bytes: int = 8 * 1024 * 1024
    #: Bytes per write(2): whole lines up to PIPE_BUF, so that a write to a pipe that
    #: worker processes share is atomic (a longer line is written on its own).
    write_size: int = getattr(select, "PIPE_BUF", 512)
    #: Bytes per write(2) when stderr is a regular file: there every write appends
    #: whole (the kernel serialises writes to one file), so a batch goes out in
    #: one write: each write costs the writer thread the GIL back, and every
    #: handoff of the GIL stalls the hub (futex calls and a context switch).
    file_write_size: int = 64 * 1024
    #: Seconds the exit flush (atexit) waits for the writer: a stderr that nobody
    #: reads delays the exit by at most this much.
    exit_flush_timeout: float = 5.0
    #: Seconds between two looks at the queue while a flush waits for the writer.
    flush_poll_interval: float = 0.005
    #: Seconds the writer waits once woken before it writes, so that the records of a
    #: busy moment go out in one batch for one wake-up (a record is that much later).
    #: Each wake-up costs the hub a pipe write and both threads handovers of the GIL
    #: (futex calls): 20 ms rather than 5, with the per-connection record made
    #: cheaper, took them from 0.70 to 0.45 futex calls per connection at INFO under
    #: a new connection per request (strace).
    gather_delay: float = 0.02
    #: Bytes a record queued unformatted (``put_later``) counts for under
    #: ``max_bytes`` until the writer has made its line (a connection's record is
    #: about 200 bytes; its length is not known before).
    later_size: int = 512

    def __init__(self, fd: int, encoding: str = "utf-8") -> None:
        self.fd = fd
        self.encoding = encoding
        #: Encoded lines, and records to format (``put_later``), in their order.
        self._lines: deque[bytes | tuple] = deque()
        #: The writer's own: lines taken off ``_lines`` (formatted) for the next write.
        self._ready: deque[bytes] = deque()
        self._bytes_in = self._bytes_out = 0
        self._dropped = self._lost = self._reported = self._written = 0
        self._report_after: int | None = None
        self._reporter: tuple[logging.Formatter, logging.LogRecord] = (
            TextFormatter(),
            _drop_record_template(logging.Filterer()),
        )
        self._busy = self._stopping = False
        #: What a record formatted here (``_format_later``) copies: made on the
        #: caller's side, as ``_drop_record_template`` says why.
        self._template = logging.LogRecord(LOGGER_NAME, logging.INFO, __file__, 0, "", (), None)
        self._wake_pending = False
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                self.write_size = self.file_write_size
        except OSError:
            pass  # no stderr: every write fails, and is counted
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        _start_native_thread(self._run, ())

    # -- the producers' side (the hub): never blocks ---------------------------------

    def put(self, line: bytes) -> bool:
        """Queue one encoded line; False (and counted) if the queue is full."""
        queued = self._bytes_in - self._bytes_out
        if len(self._lines) >= self.max_lines or queued + len(line) > self.max_bytes:
            self.count_dropped()
            return False
        self._bytes_in += len(line)
        self._lines.append(line)
        self._wake()
        return True

    def put_later(self, item: tuple) -> bool:
        """Queue one record for the writer to format (``emit_fields``): (handler,
        logger name, level, event class, field values, time). False (and counted)
        if the queue is full."""
        queued = self._bytes_in - self._bytes_out
        if len(self._lines) >= self.max_lines or queued + self.later_size > self.max_bytes:
            self.count_dropped()
            return False
        self._bytes_in += self.later_size
        self._lines.append(item)
        self._wake()
        return True

    def count_dropped(self) -> None:
        """Count a record that will not be written (full queue, unformattable)."""
        self._dropped += 1
        self._wake()  # an idle writer reports it

    def _wake(self) -> None:
        if self._wake_pending or self._stopping:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # wake-ups already pending: the writer will look

    def report_with(self, handler: logging.Handler) -> None:
        """Format later drop records as ``handler`` formats (its format, its filters:
        the ``worker`` field)."""
        self._reporter = (handler.formatter or TextFormatter(), _drop_record_template(handler))

    def dropped(self) -> int:
        """Records dropped so far: queue full, unformattable, or a failed write."""
        return self._dropped + self._lost

    def idle(self) -> bool:
        """Every queued line written and every drop reported (or given up on)."""
        return not self._lines and not self._ready and not self._busy and self.dropped() == self._reported

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the writer to drain; True if it did.

        Polls with ``time.sleep`` (gevent's when patched): the hub keeps running."""
        deadline = time.monotonic() + timeout
        self._wake()
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.flush_poll_interval)
        return True

    def close(self) -> None:
        """Let the writer end once the queue is drained; nothing may be put after.
        (The process's own queue is never closed: it writes until exit.)"""
        self._stopping = True
        os.close(self._wake_write)  # the writer reads end-of-file, drains and ends

    # -- the writer's side (a native thread): blocking writes ------------------------

    def _run(self) -> None:
        while True:
            woken = os.read(self._wake_read, 512)  # sleeps until a producer wakes it
            if woken and self.gather_delay:
                # Let the lines of the next few milliseconds gather: while the wake-up
                # is pending the hub writes no wake-up byte, so a busy process pays
                # one pipe write (and this thread one read and one write) per batch,
                # not per record.
                _native_select((), (), (), self.gather_delay)
            self._wake_pending = False
            self._drain()
            if not woken:  # close()
                os.close(self._wake_read)
                return

    def _drain(self) -> None:
        self._busy = True
        try:
            while self._lines or self._ready:
                self._write_batch()
                self._report_drops()
            self._report_drops()
        finally:
            self._busy = False

    def _write_batch(self) -> None:
        ready = self._ready
        if not self._take():
            return
        batch = [ready.popleft()]
        size = len(batch[0])
        while (ready or self._take()) and size + len(ready[0]) <= self.write_size:
            line = ready.popleft()
            batch.append(line)
            size += len(line)
        try:
            self._write_all(b"".join(batch))
        except OSError:
            self._lost += len(batch)  # stderr closed or broken: counted, not retried
        self._written += len(batch)

    def _take(self) -> bool:
        """Make sure a line is ready to write (taking the next one off the queue,
        formatting a queued record); False when there is none."""
        while not self._ready:
            if not self._lines:
                return False
            item = self._lines.popleft()
            if type(item) is bytes:
                self._bytes_out += len(item)
                self._ready.append(item)
                continue
            self._bytes_out += self.later_size
            line = self._format_later(item)
            if line is None:
                self._lost += 1  # a field that cannot be shown: counted, as the handler counts it
            else:
                self._ready.append(line)
        return True

    def _format_later(self, item: tuple) -> bytes | None:
        """The line of a record queued by ``emit_fields``, as its handler would
        have formatted it on the hub: the text format straight from the event's
        fields (``_text_line``), the JSON format as one ``json.dumps`` of the
        fields in the order ``EventJsonFormatter`` writes them when every value is
        one JSON writes as it is (``_json_line``), another format through a copy
        of a template record (no ``LogRecord.__init__`` in this thread)."""
        handler, name, level, kind, values, created = item
        try:
            event = from_values(kind)(values)
            fields = event.fields()
            formatter = handler.formatter
            kind_of_formatter = type(formatter)
            if kind_of_formatter is TextFormatter:
                shown = list(fields.items())
                for found in handler.filters:  # _WorkerField only (emit_fields checked)
                    shown.append(("worker", found.worker))
                text = _text_line(created, logging.getLevelName(level), event.event, event.message(), shown)
            elif kind_of_formatter is EventJsonFormatter and (
                text := _json_line(created, logging.getLevelName(level), event, fields, handler.filters)
            ) is not None:
                pass
            else:
                fields["event"] = event.event
                record = copy.copy(self._template)
                record.name, record.levelno, record.levelname = name, level, logging.getLevelName(level)
                record.msg, record.created, record.msecs = event.message(), created, created % 1 * 1000
                record.__dict__.update(fields)
                for found in handler.filters:
                    found.filter(record)
                text = handler.format(record)
            return (text + "\n").encode(self.encoding, "backslashreplace")
        except Exception:  # noqa: BLE001 - a writer that died here would end all logging
            return None

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:  # someone made the descriptor non-blocking
                _native_select((), (self.fd,), ())

    def _report_drops(self) -> None:
        """Write one drop record once every line queued before the drops is out."""
        dropped = self.dropped()
        if dropped == self._reported:
            return
        if self._report_after is None:
            self._report_after = self._written + len(self._lines) + len(self._ready)
        if self._written < self._report_after:
            return
        self._report_after = None
        count, self._reported = dropped - self._reported, dropped
        try:
            self._write_all(self._drop_line(count, dropped))
        except Exception:  # a writer that died here would end all logging
            pass  # the report is lost, the counter (and the metric) still count

    def _drop_line(self, count: int, total: int) -> bytes:
        formatter, template = self._reporter
        record = copy.copy(template)  # no LogRecord.__init__ in this thread
        record.created = time.time()
        record.msecs = record.created % 1 * 1000
        event = LogRecordsDropped(dropped=count, dropped_total=total)
        record.msg = event.message()
        record.__dict__.update(event.fields())
        return (formatter.format(record) + "\n").encode(self.encoding, "backslashreplace")


def _drop_record_template(filters: logging.Filterer) -> logging.LogRecord:
    """The record a drop report copies, passed through ``filters`` (a handler).

    Built on the caller's side: the writer thread never creates a LogRecord, whose
    constructor asks the (monkeypatched) ``threading`` module who is running."""
    record = logging.LogRecord(get_logger("log").name, logging.WARNING, __file__, 0, "", (), None)
    record.event = DROP_EVENT
    filters.filter(record)
    return record


class StderrQueueHandler(logging.Handler):
    """Formats a record where it is logged (cheap, no I/O) and hands the line to a
    ``StderrQueue``: emitting never blocks, whatever stderr's reader does."""

    def __init__(self, queue: StderrQueue) -> None:
        super().__init__()
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(self.queue.encoding, "backslashreplace")
        except Exception:  # a field that cannot be shown: counted, never a stderr traceback
            self.queue.count_dropped()
            return
        self.queue.put(line)

    def flush(self) -> None:
        """Nothing: ``flush_logs`` waits for the writer, once, with a bound (called
        at exit); ``logging.shutdown`` calling this per handler must not wait again."""


_queue: StderrQueue | None = None


def after_fork() -> None:
    """In a forked child (an upgrade's drainer): the writer thread did not survive
    the fork, so the next record starts a queue of the child's own."""
    global _queue
    _queue = None


def stderr_queue() -> StderrQueue:
    """The process's queue to stderr, started on first use; flushed at exit."""
    global _queue
    if _queue is None:
        try:
            sys.stderr.flush()  # what was printed before goes out first
            fd = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            fd = 2
        _queue = StderrQueue(fd, getattr(sys.stderr, "encoding", None) or "utf-8")
        atexit.register(flush_logs)
    return _queue


def flush_logs(timeout: float | None = None) -> bool:
    """Wait (at most ``timeout`` seconds, default ``StderrQueue.exit_flush_timeout``)
    until every record logged so far is written; True if it was. Runs at exit on
    its own (atexit), so a fatal error before the run loop still shows."""
    if _queue is None:
        return True
    return _queue.flush(_queue.exit_flush_timeout if timeout is None else timeout)


def dropped_records() -> int:
    """Log records dropped since start (stderr not read fast enough): for metrics."""
    return _queue.dropped() if _queue is not None else 0


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
        address = getattr(context, "server_host", None) and getattr(context, "address", None)
        where = f"listener {address[0]}:{address[1]}" if isinstance(address, tuple) else repr(context)[:200]
        emit(logger, InternalError(context=where, suppressed=suppressed, what=f"{exc_type.__name__} in {where}: {value}"))
        emit(logger, Traceback(), exc_info=(exc_type, value, tb))

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
        error = text.encode("ascii", "backslashreplace").decode()[:200]
        emit(get_logger("http"), MalformedRequest(client=client, error=error, suppressed=suppressed))
